"""gpu/triton.py against the real tritonserver, with tiny Python models written for each test."""

from __future__ import annotations

from pathlib import Path

import pytest

from devstack.processes import ProcessDied
from gpu.triton import SHM_DIR, TritonProcess, _stub_shm_regions

CONFIG = """
name: "{name}"
backend: "python"
max_batch_size: 0
input [ {{ name: "x", data_type: TYPE_INT32, dims: [ 1 ] }} ]
output [ {{ name: "y", data_type: TYPE_INT32, dims: [ 1 ] }} ]
instance_group [ {{ count: 1, kind: KIND_CPU }} ]
"""


def write_model(repository: Path, name: str, initialize: str) -> None:
    version = repository / name / "1"
    version.mkdir(parents=True)
    (repository / name / "config.pbtxt").write_text(CONFIG.format(name=name))
    (version / "model.py").write_text(
        "class TritonPythonModel:\n"
        f"    def initialize(self, args):\n        {initialize}\n"
        "    def execute(self, requests):\n        return []\n"
    )


def test_a_model_that_fails_to_load_fails_the_start_with_the_reason(tmp_path: Path) -> None:
    write_model(tmp_path / "models", "broken", "raise RuntimeError('weights are missing')")

    with pytest.raises(ProcessDied, match="weights are missing") as failed:
        TritonProcess.start(tmp_path / "models", tmp_path / "run", load_models=["broken"])

    assert not failed.value.process.alive()


def test_a_killed_server_leaves_no_shared_memory_behind(tmp_path: Path) -> None:
    write_model(tmp_path / "models", "idle", "pass")
    triton = TritonProcess.start(tmp_path / "models", tmp_path / "run", load_models=["idle"])
    regions = _stub_shm_regions(triton.pid)
    assert regions
    assert all((SHM_DIR / name).exists() for name in regions)

    # No time for a clean exit: the server and its stub are killed.
    triton.stop(timeout=0)

    assert not triton.alive()
    assert not any((SHM_DIR / name).exists() for name in regions)
