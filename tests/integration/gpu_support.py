"""The gpu service in tests: an in-process server, signed registrations, and a scripted node agent.

How to run the gpu service in a test (the node agent's tests use the same pieces). Under tests/integration the
fixtures `gpu_server`, `gpu_channel`, `gpu` and `moto_dynamodb` come from its conftest; elsewhere import them.

    async def test_x(gpu: GpuStub, make_token):
        operator = Operator.new()
        registered = await gpu.RegisterNode(operator.registration("n-1", "127.0.0.1:8001"))
        async with AgentStream.open(gpu, registered.agent_token, "nodes/n-1") as agent:
            config = await agent.next()              # `config`, then `placement`
            await agent.send(report(1, models=[("smollm2", 1)]))

`gpu_server` is `servers.common.server.start_server` with the same setup as `python -m servers.gpu`, on a free
port, with the run's PostgreSQL / Redis (tests/conftest.py), the PostgreSQL telemetry store and a report
interval of `REPORT_INTERVAL_S` (a silent node is UNHEALTHY after 3 of them plus one sweep). For other settings
(stake gate, DynamoDB store) use `running_gpu(service_env, {...})`. Admin calls: metadata from `make_token(wallet,
("admin",))`; FindServingNodes takes an admin token (services use their mTLS identity).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
import pytest
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount
from far.gpu.v1 import gpu_service_pb2, gpu_service_pb2_grpc, node_pb2, telemetry_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from devstack.processes import ManagedProcess, free_port, http_get, wait_until
from servers.common.config import Settings
from servers.common.server import RunningServer, start_server
from servers.gpu.registration import RegistrationProof, registration_message
from servers.gpu.server import GpuApp

if TYPE_CHECKING:  # the stub of a grpc.aio channel; only the .pyi names this type
    GpuStub: TypeAlias = gpu_service_pb2_grpc.GpuServiceAsyncStub
else:
    GpuStub = gpu_service_pb2_grpc.GpuServiceStub

REPORT_INTERVAL_S = 0.5
# moto's DynamoDB is a stand-in for AWS; any credentials pass, none must come from the developer's profile.
MOTO_AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}
CHAIN_ID = 97
READY = node_pb2.MODEL_STATE_READY
Metadata = tuple[tuple[str, str], ...]


@dataclass
class RunningGpu:
    server: RunningServer
    app: GpuApp

    @property
    def port(self) -> int:
        return self.server.port


@asynccontextmanager
async def running_gpu(
    service_env: Mapping[str, str], extra: Mapping[str, str] | None = None
) -> AsyncIterator[RunningGpu]:
    """The gpu service in-process on a free port with `service_env` plus `extra` settings; stopped at the end."""
    environ = {"GPU_REPORT_INTERVAL_S": str(REPORT_INTERVAL_S), **service_env, **(extra or {})}
    environ["GRPC_LISTEN"] = "127.0.0.1:0"
    app = GpuApp(environ)
    running = await start_server(app.spec(), Settings.from_env("gpu", 0, environ=environ))
    try:
        yield RunningGpu(running, app)
    finally:
        await running.stop()


@pytest.fixture(scope="session")
async def gpu_server(service_env: dict[str, str]) -> AsyncIterator[RunningGpu]:
    async with running_gpu(service_env) as running:
        yield running


@pytest.fixture(scope="session")
async def gpu_channel(gpu_server: RunningGpu) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gpu_server.port}") as channel:
        yield channel


@pytest.fixture(scope="session")
def gpu(gpu_channel: grpc.aio.Channel) -> GpuStub:
    return gpu_service_pb2_grpc.GpuServiceStub(gpu_channel)


@pytest.fixture(scope="session")
def moto_dynamodb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """moto's standalone server (a DynamoDB stand-in) on a free port; yields the settings that point at it.

    Also puts test credentials in this process's environment (aioboto3 reads them there), restored at the end.
    """
    port = free_port()
    binary = Path(sys.executable).with_name("moto_server")
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    process = ManagedProcess("moto", [str(binary), "-H", "127.0.0.1", "-p", str(port)], log_path=log)
    # Started from a worker thread: from the main thread ManagedProcess runs a Python pre-exec hook in the
    # forked child, which aborts there when an in-process gRPC server of the run is already up.
    with ThreadPoolExecutor(1) as starter:
        starter.submit(process.start).result()
    saved = {key: os.environ.get(key) for key in MOTO_AWS_ENV}
    os.environ.update(MOTO_AWS_ENV)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_get(url)[0] != 0, timeout=30, what="moto_server", watch=[process])
        yield {**MOTO_AWS_ENV, "AWS_ENDPOINT_URL_DYNAMODB": url, "GPU_DYNAMODB_CREATE_TABLE": "true"}
    finally:
        process.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def unique_node_id() -> str:
    return f"n-{secrets.token_hex(5)}"


def bearer(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),)


def ts(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


@dataclass
class Operator:
    """A wallet that signs node registrations."""

    account: LocalAccount

    @classmethod
    def new(cls) -> Operator:
        return cls(Account.create())

    @property
    def address(self) -> str:
        return str(self.account.address).lower()

    def registration(
        self,
        node_id: str,
        endpoint: str = "127.0.0.1:8001",
        *,
        node: node_pb2.Node | None = None,
        chain_id: int = CHAIN_ID,
        nonce: str | None = None,
        issue_time: datetime | None = None,
        validity: timedelta = timedelta(minutes=5),
        operator: str | None = None,
    ) -> gpu_service_pb2.RegisterNodeRequest:
        """A RegisterNodeRequest signed by this wallet (`operator` overrides the address it claims)."""
        issued = (issue_time or datetime.now(UTC)).replace(microsecond=0)
        proof = RegistrationProof(
            node_id=node_id,
            endpoint=endpoint,
            operator=operator or self.address,
            chain_id=chain_id,
            nonce=nonce or secrets.token_hex(12),
            issue_time=issued,
            expire_time=issued + validity,
            signature="",
        )
        signed = self.account.sign_message(encode_defunct(text=registration_message(proof)))
        message = node_pb2.Node()
        if node is not None:
            message.CopyFrom(node)
        message.endpoint = endpoint
        return gpu_service_pb2.RegisterNodeRequest(
            node_id=node_id,
            node=message,
            operator=proof.operator,
            chain_id=chain_id,
            nonce=proof.nonce,
            issue_time=ts(proof.issue_time),
            expire_time=ts(proof.expire_time),
            signature="0x" + bytes(signed.signature).hex(),
        )


def report(
    sequence: int,
    *,
    models: Iterable[tuple[str, int]] = (),
    active: int = 0,
    pending: int = 0,
    healthy: bool = True,
    gpus: Sequence[tuple[float, int, int]] = ((10.0, 2 * 1024**3, 16 * 1024**3),),
    inference_count: int = 0,
    sample_time: datetime | None = None,
) -> gpu_service_pb2.StreamTelemetryRequest:
    """A report message: `models` READY with `active`/`pending` requests each; `gpus` as (util %, used, total)."""
    message = telemetry_pb2.TelemetryReport(
        sequence=sequence,
        sample_time=ts(sample_time or datetime.now(UTC)),
        cpu_utilization_percent=25.0,
        memory_used_bytes=4 * 1024**3,
        memory_total_bytes=32 * 1024**3,
        agent_version="0.1.0",
        triton=telemetry_pb2.TritonStats(
            live=healthy,
            ready=healthy,
            version="2.51.0",
            models=[
                telemetry_pb2.ModelStats(
                    model=model,
                    version=version,
                    state=READY,
                    active_requests=active,
                    pending_requests=pending,
                    inference_count=inference_count,
                )
                for model, version in models
            ],
        ),
        gpus=[
            telemetry_pb2.GpuSample(
                index=index,
                uuid=f"GPU-{index}",
                model_name="NVIDIA H100 80GB HBM3",
                utilization_percent=util,
                memory_used_bytes=used,
                memory_total_bytes=total,
                temperature_celsius=50.0,
                power_watts=200.0,
            )
            for index, (util, used, total) in enumerate(gpus)
        ],
    )
    return gpu_service_pb2.StreamTelemetryRequest(report=message)


class AgentStream:
    """A node agent's StreamTelemetry call driven step by step: `send()` messages, `next()` instructions."""

    def __init__(self, call: Any, outgoing: asyncio.Queue[gpu_service_pb2.StreamTelemetryRequest | None]) -> None:
        self._call = call
        self._outgoing = outgoing

    @classmethod
    @asynccontextmanager
    async def open(cls, gpu: GpuStub, token: str, node: str) -> AsyncIterator[AgentStream]:
        outgoing: asyncio.Queue[gpu_service_pb2.StreamTelemetryRequest | None] = asyncio.Queue()
        outgoing.put_nowait(gpu_service_pb2.StreamTelemetryRequest(node=node))

        async def requests() -> AsyncIterator[gpu_service_pb2.StreamTelemetryRequest]:
            while (message := await outgoing.get()) is not None:
                yield message

        call = gpu.StreamTelemetry(requests(), metadata=bearer(token))
        try:
            yield cls(call, outgoing)
        finally:
            outgoing.put_nowait(None)  # end the request generator before cancelling the call
            call.cancel()

    async def send(self, message: gpu_service_pb2.StreamTelemetryRequest) -> None:
        await self._outgoing.put(message)

    def half_close(self) -> None:
        self._outgoing.put_nowait(None)

    async def next(self, within_s: float = 10.0) -> gpu_service_pb2.NodeInstruction:
        async with asyncio.timeout(within_s):
            message = await self._call.read()
        assert message is not grpc.aio.EOF, "the stream ended"
        assert isinstance(message, gpu_service_pb2.NodeInstruction)
        return message

    async def next_of(self, kind: str, within_s: float = 10.0) -> gpu_service_pb2.NodeInstruction:
        """The next instruction of `kind` (`ack`, `placement`, ...), skipping others; fails on `closed`."""
        while True:
            message = await self.next(within_s)
            which = message.WhichOneof("instruction")
            if which == kind:
                return message
            assert which != "closed", f"the stream closed ({message.closed}) while waiting for {kind}"

    async def closed(self, within_s: float = 10.0) -> gpu_service_pb2.StreamClosed:
        """The `closed` message (skipping others), after which the call ends with OK."""
        message = await self.next_of("closed", within_s)
        async with asyncio.timeout(within_s):
            assert await self._call.read() is grpc.aio.EOF
        assert await self._call.code() == grpc.StatusCode.OK
        return message.closed

    async def keep_reporting(self, first_sequence: int, **report_fields: Any) -> None:
        """Report every half interval (as a live agent does) and read the acks, until cancelled."""
        sequence = first_sequence
        while True:
            await self.send(report(sequence, **report_fields))
            await self.next_of("ack")
            sequence += 1
            await asyncio.sleep(REPORT_INTERVAL_S / 2)

    async def status(self) -> grpc.StatusCode:
        code: grpc.StatusCode = await self._call.code()
        return code


async def registered(gpu: GpuStub, operator: Operator, node_id: str | None = None, **kwargs: Any) -> tuple[str, str]:
    """Register a node of `operator`; returns (node name, agent token)."""
    node_id = node_id or unique_node_id()
    response = await gpu.RegisterNode(operator.registration(node_id, **kwargs))
    return response.node.name, response.agent_token


async def wait_for_state(
    gpu: GpuStub, name: str, metadata: Metadata, state: int, *, within_s: float = 10.0
) -> node_pb2.Node:
    """Poll GetNode until the node is in `state`."""
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        node = await gpu.GetNode(gpu_service_pb2.GetNodeRequest(name=name), metadata=metadata)
        if node.state == state:
            return node
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{name} stayed {node_pb2.Node.State.Name(node.state)}, wanted {state}")
        await asyncio.sleep(0.05)
