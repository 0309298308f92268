"""A local node as `make run` would start it: the agent reaches the gpu service through Envoy's partner listener
(mTLS with the dev `partner/node-agent` certificate), the only way in for a node agent when the servers
themselves accept only platform identities (servers/common/tls.py).

Real processes throughout: the gpu server (`python -m servers.gpu`), Envoy, tritonserver and the agent.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from far.gpu.v1 import gpu_service_pb2, gpu_service_pb2_grpc, node_pb2

from devstack.node import start_local_node
from devstack.processes import wait_until
from devstack.stack import Stack
from gpu.agent.config import TlsFiles
from gpu.triton import CHAT_MODEL

pytestmark = pytest.mark.e2e


def test_local_node_turns_healthy_through_envoys_partner_listener(
    service_env: dict[str, str], tmp_path: Path, make_token: Callable[..., str]
) -> None:
    env = {**service_env, "LOG_FORMAT": "json", "GPU_REPORT_INTERVAL_S": "0.5"}
    with Stack(["gpu"], env=env, run_dir=tmp_path / "stack", envoy=True) as stack:
        assert stack.pki is not None
        agent_cert = stack.pki.ensure_identity("partner", "node-agent")
        node = start_local_node(
            tmp_path,
            gpu_service=stack.envoy_partner_target,
            tls=TlsFiles(ca=stack.pki.ca_file, cert=agent_cert.cert, key=agent_cert.key),
            triton_env={"FAR_LLAMA_SLOTS": "1"},
        )
        try:
            metadata = (("authorization", f"Bearer {make_token(node.operator, ('user',))}"),)
            credentials = stack.client_credentials("service", "e2e")
            with grpc.secure_channel(stack.grpc_target("gpu"), credentials) as channel:
                gpu = gpu_service_pb2_grpc.GpuServiceStub(channel)

                def healthy() -> node_pb2.Node | None:
                    found = gpu.GetNode(gpu_service_pb2.GetNodeRequest(name=node.name), metadata=metadata)
                    ready = any(
                        m.model == CHAT_MODEL and m.state == node_pb2.MODEL_STATE_READY for m in found.loaded_models
                    )
                    return found if found.state == node_pb2.Node.STATE_HEALTHY and ready else None

                found = wait_until(healthy, timeout=60, what=f"{node.name} HEALTHY", watch=[node.agent], interval=0.2)
            assert found.endpoint == node.triton.grpc_url
        finally:
            node.stop()
        assert node.agent.returncode == 0
