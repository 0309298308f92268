"""The gpu server: `python -m servers.gpu`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import grpc
from far.gpu.v1 import gpu_service_pb2, gpu_service_pb2_grpc

from servers.common.chain import Chain, ChainSettings
from servers.common.config import Env
from servers.common.server import Runtime, ServiceSpec
from servers.gpu.agent_auth import AgentTokenAuthenticator
from servers.gpu.control import ControlHub
from servers.gpu.history import History
from servers.gpu.live import LiveState
from servers.gpu.models import OUTBOX
from servers.gpu.registration import NonceRegistry
from servers.gpu.registry import Registry
from servers.gpu.servicer import GpuServicer
from servers.gpu.settings import GpuSettings
from servers.gpu.stake import StakeGate
from servers.gpu.streams import TelemetryStreams
from servers.gpu.sweeper import LivenessSweeper
from servers.gpu.telemetry_dynamodb import DynamoTelemetryStore
from servers.gpu.telemetry_postgres import PostgresTelemetryStore
from servers.gpu.telemetry_store import TelemetryStore

SERVICE_NAME = gpu_service_pb2.DESCRIPTOR.services_by_name["GpuService"].full_name


@dataclass
class GpuApp:
    """Builds the service; keeps its parts reachable so tests can drive the sweeper and the control hub."""

    environ: Mapping[str, str] | None = None
    control: ControlHub | None = field(default=None, init=False)
    sweeper: LivenessSweeper | None = field(default=None, init=False)
    history: History | None = field(default=None, init=False)

    async def setup(self, server: grpc.aio.Server, runtime: Runtime) -> None:
        assert runtime.database is not None
        assert runtime.redis is not None
        env = Env(self.environ)
        settings = GpuSettings.from_env(env)
        prefix = runtime.settings.redis_key_prefix
        stake = None
        if settings.min_operator_stake_wei is not None:
            chain = Chain(ChainSettings.from_env(self.environ))
            runtime.on_close(chain.close)
            stake = StakeGate(chain, settings.min_operator_stake_wei)
        store: TelemetryStore
        if settings.telemetry.kind == "dynamodb":
            store = await DynamoTelemetryStore.open(settings.telemetry)
        else:
            store = PostgresTelemetryStore(runtime.database)
        runtime.on_close(store.close)
        history = History(store, retention_days=settings.telemetry.retention_days)
        live = LiveState(runtime.redis, prefix, ttl_s=settings.liveness_ttl_s)
        control = ControlHub(runtime.redis, prefix)
        await control.start()
        runtime.on_close(control.stop)
        runtime.on_stopping(control.drain_streams)  # streams end with SERVER_SHUTDOWN, not cancelled
        registry = Registry(settings, runtime.page_tokens, NonceRegistry(runtime.redis, prefix), live, control, stake)
        runtime.authenticators.append(AgentTokenAuthenticator(runtime.database, registry))
        streams = TelemetryStreams(
            runtime.database, registry, live, history, control, report_interval_s=settings.report_interval_s
        )
        sweeper = LivenessSweeper(
            runtime.database, registry, history, runtime.redis, prefix, interval_s=settings.report_interval_s
        )
        sweeper.start()
        runtime.on_close(sweeper.stop)
        self.control, self.sweeper, self.history = control, sweeper, history
        servicer = GpuServicer(runtime.database, registry, live, history, streams)
        gpu_service_pb2_grpc.add_GpuServiceServicer_to_server(servicer, server)

    def spec(self) -> ServiceSpec:
        return ServiceSpec(
            name="gpu", default_port=50057, service_names=[SERVICE_NAME], setup=self.setup, outbox=OUTBOX
        )


SPEC = GpuApp().spec()
