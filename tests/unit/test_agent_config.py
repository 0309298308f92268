"""gpu.agent.config: AgentSettings.from_env, and `python -m gpu.agent` stopping with one line on bad settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpu.agent.config import AgentSettings, TritonAttach, TritonLaunch
from servers.common.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]
KEY = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d"


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "operator.key"
    path.write_text(KEY + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def base(key_file: Path) -> dict[str, str]:
    return {
        "AGENT_NODE_ID": "gpu-node-1",
        "AGENT_GPU_SERVICE": "127.0.0.1:50057",
        "AGENT_OPERATOR_KEY_FILE": str(key_file),
        "AGENT_TRITON_GRPC": "127.0.0.1:8001",
        "AGENT_TRITON_METRICS": "http://127.0.0.1:8002",
    }


def config_error(environ: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as error:
        AgentSettings.from_env(environ)
    message = str(error.value)
    assert "\n" not in message
    return message


class TestValid:
    def test_attach_with_defaults(self, base: dict[str, str]) -> None:
        s = AgentSettings.from_env(base)
        assert s.node_name == "nodes/gpu-node-1"
        assert s.operator_key == KEY
        assert KEY not in repr(s)
        assert s.chain_id == 97
        assert s.region == "local"
        assert s.labels == {}
        assert s.endpoint is None
        assert s.tls is None
        assert s.triton == TritonAttach(grpc_address="127.0.0.1:8001", metrics_url="http://127.0.0.1:8002/metrics")

    def test_every_optional_setting(self, base: dict[str, str], tmp_path: Path) -> None:
        for name in ("ca.pem", "agent.pem", "agent.key"):
            (tmp_path / name).write_text("-")
        s = AgentSettings.from_env(
            {
                **base,
                "AGENT_REGION": "eu-west-1",
                "AGENT_LABELS": "tier=dev, gpu.kind=h100",
                "AGENT_ENDPOINT": "[::1]:9001",
                "AGENT_ENDPOINT_TLS": "true",
                "AGENT_CHAIN_ID": "56",
                "AGENT_TLS_CA_FILE": str(tmp_path / "ca.pem"),
                "AGENT_TLS_CERT_FILE": str(tmp_path / "agent.pem"),
                "AGENT_TLS_KEY_FILE": str(tmp_path / "agent.key"),
                "AGENT_TLS_SERVER_NAME": "gpu.far.internal",
            }
        )
        assert s.region == "eu-west-1"
        assert s.labels == {"tier": "dev", "gpu.kind": "h100"}
        assert s.endpoint == "[::1]:9001"
        assert s.endpoint_tls is True
        assert s.chain_id == 56
        assert s.tls is not None
        assert s.tls.cert == tmp_path / "agent.pem"
        assert s.tls.server_name == "gpu.far.internal"

    def test_start_triton(self, base: dict[str, str], tmp_path: Path) -> None:
        environ = {k: v for k, v in base.items() if not k.startswith("AGENT_TRITON")}
        s = AgentSettings.from_env(
            {
                **environ,
                "AGENT_START_TRITON": "1",
                "AGENT_MODEL_REPOSITORY": str(tmp_path),
                "AGENT_TRITON_LOAD_MODELS": "a, b",
            }
        )
        assert s.triton == TritonLaunch(
            model_repository=tmp_path, workdir=Path(".run/triton-gpu-node-1"), load_models=("a", "b")
        )


class TestErrors:
    @pytest.mark.parametrize(
        ("change", "expected"),
        [
            ({"AGENT_NODE_ID": ""}, "AGENT_NODE_ID is not set"),
            ({"AGENT_NODE_ID": "Node_1"}, "AGENT_NODE_ID='Node_1' must be"),
            ({"AGENT_NODE_ID": "node-"}, "AGENT_NODE_ID='node-' must be"),
            ({"AGENT_GPU_SERVICE": "localhost"}, "AGENT_GPU_SERVICE='localhost' must be host:port"),
            ({"AGENT_GPU_SERVICE": "h:70000"}, "must be host:port"),
            ({"AGENT_REGION": "EU West"}, "AGENT_REGION='EU West'"),
            ({"AGENT_LABELS": "novalue"}, "AGENT_LABELS: 'novalue' must be key=value"),
            ({"AGENT_LABELS": "Bad=1"}, "AGENT_LABELS: 'Bad=1'"),
            ({"AGENT_ENDPOINT_TLS": "maybe"}, "AGENT_ENDPOINT_TLS='maybe' must be one of"),
            ({"AGENT_TRITON_METRICS": ""}, "AGENT_TRITON_GRPC (host:port) and AGENT_TRITON_METRICS"),
            ({"AGENT_TRITON_METRICS": "ftp://x/metrics"}, "AGENT_TRITON_METRICS must be a http:// or https:// URL"),
            ({"AGENT_START_TRITON": "1"}, "AGENT_START_TRITON=1 starts Triton: leave AGENT_TRITON_GRPC"),
            ({"AGENT_CHAIN_ID": "0"}, "AGENT_CHAIN_ID=0 must be between 1"),
            ({"AGENT_OPERATOR_KEY_FILE": ""}, "AGENT_OPERATOR_KEY_FILE is not set"),
            ({"AGENT_OPERATOR_KEY_FILE": "/nonexistent/key"}, "is not a readable file"),
            ({"AGENT_TLS_CERT_FILE": __file__}, "AGENT_TLS_CERT_FILE and AGENT_TLS_KEY_FILE must be set together"),
            (
                {"AGENT_TLS_CERT_FILE": __file__, "AGENT_TLS_KEY_FILE": __file__},
                "AGENT_TLS_CERT_FILE needs AGENT_TLS_CA_FILE",
            ),
        ],
    )
    def test_one_line_naming_the_variable(self, base: dict[str, str], change: dict[str, str], expected: str) -> None:
        assert expected in config_error({**base, **change})

    def test_key_file_readable_by_others_is_refused(self, base: dict[str, str], key_file: Path) -> None:
        key_file.chmod(0o644)
        assert "accessible by group or others: chmod 600 it" in config_error(base)

    def test_key_file_without_a_key_is_refused_without_echoing_it(self, base: dict[str, str], key_file: Path) -> None:
        key_file.write_text("0x1234 secret-ish")
        message = config_error(base)
        assert "must hold one 0x-prefixed 32-byte hex private key" in message
        assert "secret-ish" not in message


def test_module_exits_2_with_one_line(base: dict[str, str]) -> None:
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "generated" / "python")]),
        **base,
        "AGENT_NODE_ID": "Bad",
    }
    result = subprocess.run(
        [sys.executable, "-m", "gpu.agent"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("far-gpu-agent: configuration error: AGENT_NODE_ID='Bad' must be")
