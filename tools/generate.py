"""Regenerate everything under generated/ from protos/ (and third_party/googleapis from its wheel),
and the contract artefacts in generated/contracts/ from contracts/ (tools/compile_contracts.py).

python -m tools.generate           write generated/
python -m tools.generate --check   exit 1 and list the files a regeneration would change
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.util
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
THIRD_PARTY = ROOT / "third_party" / "googleapis"
GENERATED = ROOT / "generated"

VENDORED_GOOGLE_PROTOS = (
    "google/api/annotations.proto",
    "google/api/client.proto",
    "google/api/field_behavior.proto",
    "google/api/http.proto",
    "google/api/httpbody.proto",
    "google/api/launch_stage.proto",
    "google/api/resource.proto",
    "google/rpc/code.proto",
    "google/rpc/error_details.proto",
    "google/rpc/status.proto",
)
# Envoy prints error details as JSON only when their types are in its descriptor set.
DESCRIPTOR_EXTRAS = ("google/rpc/status.proto", "google/rpc/error_details.proto")
DESCRIPTOR_SET = "descriptors/far.binpb"
OPENAPI = "openapi/far.openapi.json"
CONTRACT_ARTEFACTS = "contracts"


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise SystemExit(f"generate: the package {name!r} is not installed (run `make install`)")
    return Path(spec.origin).parent


def vendor_google_protos(dest: Path) -> None:
    """Copy google/api and google/rpc protos from the installed googleapis-common-protos wheel."""
    site = _package_dir("google.api.http_pb2").parent.parent
    for rel in VENDORED_GOOGLE_PROTOS:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(site / rel, target)


def far_protos() -> list[str]:
    return sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))


def _protoc(args: list[str], googleapis: Path) -> None:
    wkt = _package_dir("grpc_tools") / "_proto"
    plugin_dir = Path(sysconfig.get_path("scripts"))
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{googleapis}",
        f"-I{wkt}",
        f"--plugin=protoc-gen-mypy={plugin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={plugin_dir / 'protoc-gen-mypy_grpc'}",
        *args,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"protoc failed:\n{result.stderr}")


def generate(out: Path, googleapis: Path) -> None:
    protos = far_protos()
    python_out = out / "python"
    python_out.mkdir(parents=True)
    _protoc(
        [
            f"--python_out={python_out}",
            f"--grpc_python_out={python_out}",
            f"--mypy_out={python_out}",
            f"--mypy_grpc_out={python_out}",
            *protos,
        ],
        googleapis,
    )
    for module in python_out.rglob("*_pb2_grpc.py"):
        # protoc writes gRPC modules for every file; keep only those of files that define a service.
        if "def add_" not in module.read_text():
            module.unlink()
            module.with_suffix(".pyi").unlink()
    for package in {p.parent for p in python_out.rglob("*.py")}:
        while package != python_out:
            (package / "__init__.py").touch()
            package = package.parent
    (python_out / "far" / "py.typed").touch()

    descriptor = out / DESCRIPTOR_SET
    descriptor.parent.mkdir(parents=True)
    _protoc(
        [
            f"--descriptor_set_out={descriptor}",
            "--include_imports",
            "--include_source_info",
            *protos,
            *DESCRIPTOR_EXTRAS,
        ],
        googleapis,
    )

    from tools.openapi import write_openapi

    openapi = out / OPENAPI
    openapi.parent.mkdir(parents=True)
    write_openapi(descriptor, openapi)

    from tools.compile_contracts import compile_contracts

    compile_contracts(out / CONTRACT_ARTEFACTS)


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def diff_trees(new: Path, old: Path) -> list[str]:
    new_files, old_files = _tree(new), _tree(old) if old.exists() else set()
    changed = sorted(new_files ^ old_files)
    changed += sorted(f for f in new_files & old_files if not filecmp.cmp(new / f, old / f, shallow=False))
    return changed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        staged_google = Path(tmp) / "googleapis"
        vendor_google_protos(staged_google)
        staged = Path(tmp) / "generated"
        if args.check:
            stale = [f"third_party/googleapis/{f}" for f in diff_trees(staged_google, THIRD_PARTY)]
            generate(staged, staged_google)
            stale += [f"generated/{f}" for f in diff_trees(staged, GENERATED)]
            if stale:
                print("generated code is stale; run `make generate` and commit:", *stale, sep="\n  ")
                return 1
            print("generated code is up to date")
            return 0
        shutil.rmtree(THIRD_PARTY, ignore_errors=True)
        shutil.copytree(staged_google, THIRD_PARTY)
        generate(staged, staged_google)
        shutil.rmtree(GENERATED, ignore_errors=True)
        shutil.copytree(staged, GENERATED)
    print(f"generated {len(far_protos())} protos and the contracts into {GENERATED.relative_to(ROOT)}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
