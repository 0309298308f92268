"""One tritonserver for the whole run, with the chat model loaded, on free ports; stopped by PID at the end.

It runs the nvidia-pytriton wheel's binary with the models in this interpreter's environment, or in
$FAR_TRITON_PYTHON's (gpu/triton.py). Its log: `triton.process.log_path`.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gpu.triton import CHAT_MODEL, MODEL_REPOSITORY, TritonProcess


@pytest.fixture(scope="session")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonProcess]:
    """tritonserver serving gpu/models with `smollm2-135m-instruct` ready: `grpc_url`, `http_url`, `metrics_url`."""
    server = TritonProcess.start(MODEL_REPOSITORY, tmp_path_factory.mktemp("triton"), load_models=[CHAT_MODEL])
    try:
        yield server
    finally:
        server.stop()
