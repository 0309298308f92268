"""The stack comes up, answers directly and through Envoy, and Envoy's admin stays on loopback."""

from __future__ import annotations

import json
import socket
import struct
import sys
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from far.gamed.v1 import gamed_service_pb2, gamed_service_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from devstack import catalog
from devstack.processes import ProcessDied, http_get
from devstack.stack import Stack
from tests.e2e.conftest import SERVICES

pytestmark = pytest.mark.e2e

GAMED = catalog.get("gamed")
NOT_RUNNING = [s for s in catalog.SERVICES if s.name not in SERVICES]


def _raw(channel: grpc.Channel, path: str) -> grpc.UnaryUnaryMultiCallable[bytes, bytes]:
    return channel.unary_unary(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)


def _post(url: str, body: bytes, content_type: str) -> tuple[int, dict[str, str], bytes]:
    headers = {"content-type": content_type}
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)  # noqa: S310 - loopback
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310 - loopback
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


class TestGamedDirect:
    @pytest.mark.parametrize("service", ["", GAMED.service_name])
    def test_health_serving(self, gamed_channel_direct: grpc.Channel, service: str) -> None:
        response = health_pb2_grpc.HealthStub(gamed_channel_direct).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
        assert response.status == health_pb2.HealthCheckResponse.SERVING

    def test_reflection_lists_the_service(self, gamed_channel_direct: grpc.Channel) -> None:
        stub = reflection_pb2_grpc.ServerReflectionStub(gamed_channel_direct)
        (response,) = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names = {s.name for s in response.list_services_response.service}
        assert {GAMED.service_name, "grpc.health.v1.Health"} <= names


class TestThroughEnvoy:
    def test_envoy_health_checks_see_gamed_healthy(self, stack: Stack) -> None:
        assert stack.unhealthy_clusters() == {}

    def test_grpc_by_service_prefix(self, envoy_channel: grpc.Channel) -> None:
        stub = gamed_service_pb2_grpc.GamedServiceStub(envoy_channel)
        response = stub.ListGames(gamed_service_pb2.ListGamesRequest(page_size=1), timeout=10)
        assert isinstance(response, gamed_service_pb2.ListGamesResponse)

    def test_json_transcoded(self, stack: Stack) -> None:
        status, body = http_get(f"{stack.envoy_http_url}/v1/games?pageSize=1", timeout=10)
        assert status == 200, body
        assert "games" in json.loads(body)

    def test_grpc_error_as_json_status(self, stack: Stack) -> None:
        status, body = http_get(f"{stack.envoy_http_url}/v1/games/no-such-game", timeout=10)
        assert status == 404, body
        error = json.loads(body)
        assert error["code"] == grpc.StatusCode.NOT_FOUND.value[0]
        assert error["details"][0]["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"

    def test_grpc_web(self, stack: Stack) -> None:
        message = gamed_service_pb2.ListGamesRequest(page_size=1).SerializeToString()
        frame = struct.pack(">BI", 0, len(message)) + message
        url = f"{stack.envoy_http_url}{GAMED.grpc_prefix}ListGames"
        status, headers, body = _post(url, frame, "application/grpc-web+proto")
        assert status == 200
        assert headers["content-type"].startswith("application/grpc-web")
        # The last frame (flag 0x80) carries the trailers.
        assert b"grpc-status:0" in body.replace(b" ", b"")

    @pytest.mark.parametrize("service", NOT_RUNNING, ids=lambda s: s.name)
    def test_service_without_server_is_unimplemented(
        self, envoy_channel: grpc.Channel, service: catalog.Service
    ) -> None:
        with pytest.raises(grpc.RpcError) as raised:
            _raw(envoy_channel, f"{service.grpc_prefix}AnyMethod")(b"", timeout=5)
        assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert service.service_name in (raised.value.details() or "")

    def test_unknown_service_is_unimplemented(self, envoy_channel: grpc.Channel) -> None:
        with pytest.raises(grpc.RpcError) as raised:
            _raw(envoy_channel, "/far.nosuch.v1.NosuchService/Get")(b"", timeout=5)
        assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED


class TestEnvoyAdmin:
    def test_admin_answers_on_loopback(self, stack: Stack) -> None:
        assert stack.envoy_admin_url.startswith("http://127.0.0.1:")
        status, body = http_get(f"{stack.envoy_admin_url}/ready")
        assert (status, body.strip()) == (200, "LIVE")

    def test_admin_bound_to_loopback_only(self, stack: Stack) -> None:
        status, body = http_get(f"{stack.envoy_admin_url}/config_dump")
        assert status == 200
        configs = json.loads(body)["configs"]
        admin = next(c["bootstrap"]["admin"] for c in configs if "bootstrap" in c)
        assert admin["address"]["socket_address"]["address"] == "127.0.0.1"

    def test_admin_unreachable_on_other_addresses(self, stack: Stack) -> None:
        address = _non_loopback_address()
        if address is None:
            pytest.skip("this machine has no non-loopback IPv4 address")
        port = int(stack.envoy_admin_url.rsplit(":", 1)[1])
        with (
            pytest.raises((ConnectionRefusedError, TimeoutError)),
            socket.create_connection((address, port), timeout=2),
        ):
            pass


def _non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            # No packet is sent: connecting a UDP socket only picks the outgoing interface.
            probe.connect(("10.255.255.255", 1))
            address = str(probe.getsockname()[0])
        except OSError:
            return None
    return None if address.startswith("127.") else address


class TestStackFailures:
    def test_server_dying_at_start_is_reported_and_nothing_is_left(self, tmp_path: Path) -> None:
        crash = [sys.executable, "-c", "import sys; print('boom: no database'); sys.exit(3)"]
        stack = Stack(["gamed"], run_dir=tmp_path, commands={"gamed": crash}, start_timeout=20)
        with pytest.raises(ProcessDied, match=r"gamed exited with status 3(.|\n)*boom: no database"):
            stack.start()
        assert all(not p.alive() for p in stack.processes())
        assert stack.envoy_process is None

    def test_replicas_share_no_fixed_port(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="several replicas cannot share a fixed port"):
            Stack(["gamed"], run_dir=tmp_path, replicas={"gamed": 2}, grpc_ports={"gamed": 50051})


class TestReplicas:
    def test_envoy_spreads_calls_over_a_services_replicas(
        self, stack: Stack, stack_env: dict[str, str], tmp_path: Path
    ) -> None:
        """`replicas`: several processes of a service behind one Envoy cluster (`stack` ran the migrations)."""
        with Stack(["gamed"], env=stack_env, run_dir=tmp_path, replicas={"gamed": 2}) as pair:
            assert len(pair.replicas["gamed"]) == 2
            assert pair.servers["gamed"] is pair.replicas["gamed"][0]
            ports = {info.grpc_port for info in pair.replicas["gamed"]}
            assert len(ports) == 2
            before = [_handled(pair, replica, "ListGames") for replica in range(2)]
            with grpc.insecure_channel(pair.envoy_grpc_target) as channel:
                stub = gamed_service_pb2_grpc.GamedServiceStub(channel)
                for _ in range(20):
                    stub.ListGames(gamed_service_pb2.ListGamesRequest(page_size=1), timeout=10)
            served = [_handled(pair, replica, "ListGames") - before[replica] for replica in range(2)]
            processes = [info.process for info in pair.replicas["gamed"]]
            assert (pair.log_dir / "gamed-1.log").exists()
        assert sum(served) == 20
        assert min(served) > 0, served  # both replicas served calls
        assert all(not process.alive() for process in processes)


def _handled(stack: Stack, replica: int, method: str) -> float:
    url = stack.metrics_url("gamed", replica)
    assert url is not None
    status, body = http_get(url, timeout=5.0)
    assert status == 200
    total = 0.0
    for line in body.splitlines():
        if line.startswith("grpc_server_handled_total{") and f'grpc_method="{method}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total
