// Compiles a Solidity standard-JSON input (stdin) with solc-js and prints
// {"version": <solc version>, "output": <standard-JSON output>} (stdout). Imports under @openzeppelin/ resolve to node_modules; nothing else is read from disk.
// Driven by tools/compile_contracts.py, which builds the input and writes generated/contracts/.
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";

const require = createRequire(import.meta.url);
const solc = require("solc");

const NODE_MODULES = path.resolve(path.dirname(new URL(import.meta.url).pathname), "..", "node_modules");
const PACKAGES = ["@openzeppelin/contracts/"];

function findImports(importPath) {
  if (!PACKAGES.some((prefix) => importPath.startsWith(prefix)) || importPath.split("/").includes("..")) {
    return { error: `import ${importPath} is not in an allowed package (${PACKAGES.join(", ")})` };
  }
  try {
    return { contents: readFileSync(path.join(NODE_MODULES, importPath), "utf8") };
  } catch (err) {
    return { error: `import ${importPath}: ${err.message}` };
  }
}

const output = JSON.parse(solc.compile(readFileSync(0, "utf8"), { import: findImports }));
process.stdout.write(JSON.stringify({ version: solc.version(), output }));
