"""The inference server: `python -m servers.inference`.

Configuration (besides the common settings): `INFERENCE_MODELS_FILE` (the catalog; default: the dev model),
`INFERENCE_STATIC_NODES` (`model=node@host:port,...`: attach Triton nodes by hand) or `INFERENCE_GPU_SERVICE`
(host:port of the gpu service, asked for serving nodes every `INFERENCE_NODES_REFRESH_S`), `INFERENCE_SLOTS_PER_MODEL`,
`INFERENCE_MAX_QUEUE`, `INFERENCE_MAX_JOBS_PER_ACCOUNT`, and the chain settings (`BSC_RPC_URL`, ...) for paid models.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import structlog
from far.gpu.v1 import gpu_service_pb2, gpu_service_pb2_grpc
from far.inference.v1 import inference_service_pb2, inference_service_pb2_grpc

from servers.common.chain import Chain, ChainSettings
from servers.common.config import ConfigError, Env
from servers.common.lease import Lease
from servers.common.server import Runtime, ServiceSpec
from servers.inference.admission import Admission, Limits
from servers.inference.catalog import Catalog, load_models
from servers.inference.executor import Clients
from servers.inference.models import OUTBOX
from servers.inference.nodes import NodeDirectory, NodeInfo, NodeSource, static_nodes, static_source
from servers.inference.prices import Prices
from servers.inference.quotes import Quotes
from servers.inference.runner import Runner
from servers.inference.servicer import ACCEPT_IN_TRANSACTION_S, DISCONNECT_GRACE_S, InferenceServicer, Parts
from servers.inference.sweeper import JobHeartbeats, StaleJobSweeper
from servers.inference.token_stream import TokenStreams

SERVICE_NAME = inference_service_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
log = structlog.get_logger("far.inference")


def _gpu_channel(env: Env, target: str) -> grpc.aio.Channel:
    """A channel to the gpu service, over mTLS with this service's own certificate when it has one."""
    cert, key, ca = (env.text(name) for name in ("GRPC_TLS_CERT_FILE", "GRPC_TLS_KEY_FILE", "GRPC_TLS_CLIENT_CA_FILE"))
    if cert and key and ca:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=Path(ca).read_bytes(),
            private_key=Path(key).read_bytes(),
            certificate_chain=Path(cert).read_bytes(),
        )
        return grpc.aio.secure_channel(target, credentials)
    return grpc.aio.insecure_channel(target)


def gpu_service_source(channel: grpc.aio.Channel) -> NodeSource:
    stub = gpu_service_pb2_grpc.GpuServiceStub(channel)

    async def find(model: str) -> Sequence[NodeInfo]:
        answer = await stub.FindServingNodes(
            gpu_service_pb2.FindServingNodesRequest(model=model, max_results=50), timeout=5.0
        )
        return tuple(
            NodeInfo(
                name=node.node,
                endpoint=node.endpoint,
                load=node.active_requests + node.pending_requests,
                tls=node.endpoint_tls,
            )
            for node in answer.nodes
        )

    return find


def _background(runtime: Runtime, name: str, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
    task: asyncio.Task[None] = asyncio.create_task(work(), name=name)

    def report(done: asyncio.Task[None]) -> None:
        if not done.cancelled() and done.exception() is not None:
            log.error("background task died", task=name, error=repr(done.exception()))

    task.add_done_callback(report)

    async def stop() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    runtime.on_close(stop)


async def _listen_for_cancels(runtime: Runtime, streams: TokenStreams, runner: Runner) -> None:
    assert runtime.redis is not None
    pubsub = runtime.redis.pubsub()
    await pubsub.subscribe(streams.cancel_channel)
    try:
        async for message in pubsub.listen():
            if message.get("type") != "message":
                continue
            job, _, reason = message["data"].decode().partition(" ")
            runner.cancel(job, reason or "JOB_CANCELLED")
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]  # untyped before redis 8.2


def make_spec(environ: Mapping[str, str] | None = None) -> ServiceSpec:
    """The server, reading its own settings from `environ` (default: the process environment)."""

    async def setup(server: grpc.aio.Server, runtime: Runtime) -> None:
        await _setup(server, runtime, environ)

    return ServiceSpec(name="inference", default_port=50052, service_names=[SERVICE_NAME], setup=setup, outbox=OUTBOX)


async def _setup(server: grpc.aio.Server, runtime: Runtime, environ: Mapping[str, str] | None) -> None:
    env = Env(environ)
    assert runtime.database is not None
    assert runtime.redis is not None
    settings = runtime.settings
    catalog = Catalog(load_models(env))
    chain: Chain | None = None
    if env.text("BSC_RPC_URL"):
        chain = Chain(ChainSettings.from_env(environ))
        runtime.on_close(chain.close)
    prices = Prices(chain, catalog)
    with contextlib.suppress(Exception):  # a chain outage at start: paid models stay unpriced until it returns
        await prices.refresh()
    static = env.text("INFERENCE_STATIC_NODES")
    gpu_target = env.text("INFERENCE_GPU_SERVICE")
    if static:
        source = static_source(static_nodes(static))
    elif gpu_target:
        channel = _gpu_channel(env, gpu_target)
        runtime.on_close(channel.close)
        source = gpu_service_source(channel)
    else:
        raise ConfigError("set INFERENCE_GPU_SERVICE (the gpu service) or INFERENCE_STATIC_NODES (nodes by hand)")
    directory = NodeDirectory(source, [spec.served_as for spec in catalog])
    await directory.refresh()
    prefix = settings.redis_key_prefix
    limits = Limits(
        max_queue=env.integer("INFERENCE_MAX_QUEUE", 64, minimum=1),
        max_unfinished_per_account=env.integer("INFERENCE_MAX_JOBS_PER_ACCOUNT", 4, minimum=1),
        reclaim_after_s=env.number("INFERENCE_RECLAIM_AFTER_S", 30.0, minimum=0.1),
    )
    admission = Admission(runtime.redis, prefix, limits)
    streams = TokenStreams(runtime.redis, prefix)
    clients = Clients()
    runtime.on_close(clients.close)
    heartbeats = JobHeartbeats(runtime.redis, prefix)
    runner = Runner(
        runtime.database,
        admission,
        streams,
        directory,
        clients,
        slots_per_model=env.integer("INFERENCE_SLOTS_PER_MODEL", 4, minimum=1),
        heartbeats=heartbeats,
    )
    sweeper = StaleJobSweeper(
        runtime.database,
        heartbeats,
        streams,
        admission,
        Lease(runtime.redis, f"{prefix}inference:sweeper", ttl_ms=30_000),
    )
    quotes = Quotes(
        runtime.redis,
        prefix,
        catalog,
        prices,
        chain_id=chain.chain_id if chain is not None else 0,
        payment_contract=chain.inference_payment.address if chain is not None else "0x" + "0" * 40,
    )
    parts = Parts(
        database=runtime.database,
        catalog=catalog,
        prices=prices,
        quotes=quotes,
        admission=admission,
        streams=streams,
        directory=directory,
        runner=runner,
        page_tokens=runtime.page_tokens,
        chain=chain,
        disconnect_grace_s=env.number("INFERENCE_DISCONNECT_GRACE_S", DISCONNECT_GRACE_S, minimum=0.0),
        accept_in_transaction_s=env.number("INFERENCE_ACCEPT_IN_TRANSACTION_S", ACCEPT_IN_TRANSACTION_S, minimum=0.0),
    )
    servicer = InferenceServicer(parts)
    runtime.on_close(servicer.close)
    runtime.on_stopping(servicer.stopping)
    inference_service_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    consumer = f"{socket.gethostname()}:{os.getpid()}"
    refresh_s = env.number("INFERENCE_NODES_REFRESH_S", 2.0, minimum=0.05)
    _background(runtime, "nodes", lambda: directory.run(refresh_s))
    _background(runtime, "prices", lambda: prices.run(30.0))
    _background(runtime, "cancels", lambda: _listen_for_cancels(runtime, streams, runner))
    _background(runtime, "stale-jobs", sweeper.run)
    for spec in catalog:
        _background(runtime, f"dispatch:{spec.id}", lambda spec=spec: runner.dispatch(spec, consumer))  # type: ignore[misc]
    log.info("inference ready", models=[spec.id for spec in catalog], paid=chain is not None)


SPEC = make_spec()
