"""Compile contracts/*.sol with solc-js (npm `solc`) into generated/contracts/<Name>.json.

python -m tools.compile_contracts [--out DIR]   (`make generate` runs it as part of tools.generate)

Each artefact holds the ABI, creation and runtime bytecode, method identifiers, the source name and
the compiler version and settings. Output is deterministic: sources are named by repository-relative
paths, JSON keys are sorted and nothing records a time or an absolute path, so `--check` can compare.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONTRACTS = ROOT / "contracts"
RUNNER = ROOT / "tools" / "contracts.mjs"
# OpenZeppelin 5 uses `mcopy` (Cancun); BNB Smart Chain has had Cancun since its Tycho upgrade (2024).
SETTINGS: dict[str, Any] = {
    "evmVersion": "cancun",
    "optimizer": {"enabled": True, "runs": 200},
}
OUTPUT_SELECTION = ["abi", "evm.bytecode.object", "evm.deployedBytecode.object", "evm.methodIdentifiers"]


class CompileError(SystemExit):
    pass


def _sources() -> dict[str, dict[str, str]]:
    files = sorted(CONTRACTS.glob("*.sol"))
    if not files:
        raise CompileError(f"compile_contracts: no .sol files in {CONTRACTS}")
    return {f"contracts/{f.name}": {"content": f.read_text()} for f in files}


def _solc(standard_input: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(compiler version, standard-JSON output)."""
    node = shutil.which("node")
    if node is None:
        raise CompileError("compile_contracts: `node` is not on PATH (Node.js runs solc-js)")
    if not (ROOT / "node_modules" / "solc").is_dir():
        raise CompileError("compile_contracts: node_modules/solc is missing (run `make install`)")
    result = subprocess.run(
        [node, str(RUNNER)], input=json.dumps(standard_input), capture_output=True, text=True, check=False, cwd=ROOT
    )
    if result.returncode != 0:
        raise CompileError(f"compile_contracts: solc-js failed:\n{result.stderr}")
    answer = json.loads(result.stdout)
    return answer["version"], answer["output"]


def compile_contracts(dest: Path) -> list[str]:
    """Compile every contract under contracts/ and write one `<Name>.json` per contract into `dest`."""
    sources = _sources()
    standard_input = {
        "language": "Solidity",
        "sources": sources,
        "settings": {**SETTINGS, "outputSelection": {name: {"*": OUTPUT_SELECTION} for name in sources}},
    }
    version, output = _solc(standard_input)
    errors = [e for e in output.get("errors", []) if e.get("severity") == "error"]
    warnings = [e for e in output.get("errors", []) if e.get("severity") != "error"]
    if errors or warnings:
        # Warnings fail the build too: contracts that hold value should compile cleanly.
        details = "\n".join(e.get("formattedMessage", e.get("message", "")) for e in errors + warnings)
        raise CompileError(f"compile_contracts: solc reported problems:\n{details}")
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for source_name in sorted(sources):
        for name, contract in sorted(output["contracts"][source_name].items()):
            artefact = {
                "contractName": name,
                "sourceName": source_name,
                "abi": contract["abi"],
                "bytecode": "0x" + contract["evm"]["bytecode"]["object"],
                "deployedBytecode": "0x" + contract["evm"]["deployedBytecode"]["object"],
                "methodIdentifiers": contract["evm"]["methodIdentifiers"],
                "compiler": {"name": "solc", "version": version, "settings": SETTINGS},
            }
            (dest / f"{name}.json").write_text(json.dumps(artefact, indent=2, sort_keys=True) + "\n")
            written.append(name)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "generated" / "contracts")
    args = parser.parse_args()
    names = compile_contracts(args.out)
    print(f"compiled {', '.join(names)} into {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
