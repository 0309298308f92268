"""One local GPU node for `make run` and the end-to-end tests: a tritonserver with the model repository and
the node agent (`python -m gpu.agent`) attached to it, registering with a running gpu service.

    node = start_local_node(run_dir, gpu_service="127.0.0.1:50057")
    ...                       # nodes/local-gpu-1 turns HEALTHY with smollm2-135m-instruct READY
    node.stop()               # the agent closes its stream, then Triton stops

The operator is a funded dev account of the local chain (devstack/chain.py), its key written to a 0600
file in the run dir: the agent reads it from there, never from its command line or environment.
Triton starts with the model loaded and the agent leaves it so until a placement is set
(SetModelPlacement), so the node serves the model as soon as it is HEALTHY.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from devstack.chain import DEV_CHAIN_ID, dev_account
from devstack.processes import ManagedProcess, stop_all, wait_until
from devstack.stack import python_env
from gpu.agent.config import TlsFiles
from gpu.triton import CHAT_MODEL, MODEL_REPOSITORY, TritonProcess

DEFAULT_NODE_ID = "local-gpu-1"
DEFAULT_MODELS = (CHAT_MODEL,)
DEV_OPERATOR_ACCOUNT = 1


@dataclass
class LocalNode:
    node_id: str
    operator: str
    triton: TritonProcess
    agent: ManagedProcess

    @property
    def name(self) -> str:
        return f"nodes/{self.node_id}"

    def stop(self, timeout: float = 15.0) -> None:
        """The agent first (SIGTERM: it half-closes its stream and waits for `closed`), then Triton."""
        stop_all([self.agent], timeout=timeout)
        self.triton.stop()


def write_operator_key(path: Path, private_key: str) -> Path:
    """The key in a file only its owner can read (created 0600, never briefly wider)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(private_key + "\n")
    tmp.replace(path)
    return path


def agent_registered(log_path: Path) -> bool:
    """Whether the agent's JSON log holds its `registered` line."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return False
    for line in lines:
        try:
            if json.loads(line).get("event") == "registered":
                return True
        except (ValueError, AttributeError):
            continue
    return False


def agent_environment(
    *,
    node_id: str,
    gpu_service: str,
    key_file: Path,
    triton: TritonProcess,
    chain_id: int,
    region: str,
    tls: TlsFiles | None,
) -> dict[str, str]:
    env = {
        "AGENT_NODE_ID": node_id,
        "AGENT_GPU_SERVICE": gpu_service,
        "AGENT_OPERATOR_KEY_FILE": str(key_file),
        "AGENT_CHAIN_ID": str(chain_id),
        "AGENT_REGION": region,
        "AGENT_TRITON_GRPC": triton.grpc_url,
        "AGENT_TRITON_METRICS": triton.metrics_url,
    }
    if tls is not None:
        env["AGENT_TLS_CA_FILE"] = str(tls.ca)
        if tls.cert is not None and tls.key is not None:
            env["AGENT_TLS_CERT_FILE"], env["AGENT_TLS_KEY_FILE"] = str(tls.cert), str(tls.key)
        if tls.server_name:
            env["AGENT_TLS_SERVER_NAME"] = tls.server_name
    return env


def start_local_node(
    run_dir: Path,
    *,
    gpu_service: str,
    node_id: str = DEFAULT_NODE_ID,
    operator_account: int = DEV_OPERATOR_ACCOUNT,
    chain_id: int = DEV_CHAIN_ID,
    region: str = "local",
    model_repository: Path = MODEL_REPOSITORY,
    load_models: Sequence[str] = DEFAULT_MODELS,
    tls: TlsFiles | None = None,
    triton_env: Mapping[str, str] | None = None,
    triton_trace_url: str | None = None,
    agent_env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
) -> LocalNode:
    """Start Triton (models loaded) and the agent; return once the agent has registered the node.

    Files go to `run_dir/node-<node_id>/` (Triton's backends copy and log, the agent's log, the operator
    key). `triton_env` reaches the model (e.g. FAR_LLAMA_SLOTS); `triton_trace_url` turns on Triton's
    OpenTelemetry tracing (an OTLP/HTTP collector's `host:port/v1/traces`); `agent_env` is added to the agent's
    environment (e.g. LOG_LEVEL). Raises ProcessDied with the log's tail if either process exits while
    starting; nothing is left running then.
    """
    workdir = (run_dir / f"node-{node_id}").resolve()
    account = dev_account(operator_account)
    key_file = write_operator_key(workdir / "operator.key", "0x" + bytes(account.key).hex())
    triton = TritonProcess.start(
        model_repository, workdir / "triton", load_models=load_models, env=triton_env, trace_url=triton_trace_url
    )
    env = agent_environment(
        node_id=node_id,
        gpu_service=gpu_service,
        key_file=key_file,
        triton=triton,
        chain_id=chain_id,
        region=region,
        tls=tls,
    )
    agent = ManagedProcess(
        "gpu-agent",
        [sys.executable, "-m", "gpu.agent"],
        log_path=workdir / "agent.log",
        env=python_env({**os.environ, "LOG_FORMAT": "json", **env, **(agent_env or {})}),
        cwd=workdir,
    )
    node = LocalNode(node_id=node_id, operator=account.address.lower(), triton=triton, agent=agent)
    try:
        agent.start()
        wait_until(
            lambda: agent_registered(agent.log_path),
            timeout=timeout,
            what=f"the node agent to register {node.name}",
            watch=[agent, triton.process],
            interval=0.1,
        )
    except BaseException:
        node.stop()
        raise
    return node
