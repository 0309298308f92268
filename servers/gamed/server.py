"""The gamed server: `python -m servers.gamed`."""

from __future__ import annotations

import grpc
from far.gamed.v1 import gamed_service_pb2, gamed_service_pb2_grpc

from servers.common.config import Env
from servers.common.server import Runtime, ServiceSpec
from servers.gamed.catalog import Catalog
from servers.gamed.models import OUTBOX
from servers.gamed.servicer import GamedServicer
from servers.gamed.storage import AssetStorage, StorageSettings

SERVICE_NAME = gamed_service_pb2.DESCRIPTOR.services_by_name["GamedService"].full_name


async def setup(server: grpc.aio.Server, runtime: Runtime) -> None:
    assert runtime.database is not None
    storage = AssetStorage(StorageSettings.from_env(Env()))
    catalog = Catalog(runtime.page_tokens, storage)
    gamed_service_pb2_grpc.add_GamedServiceServicer_to_server(GamedServicer(runtime.database, catalog), server)


SPEC = ServiceSpec(name="gamed", default_port=50056, service_names=[SERVICE_NAME], setup=setup, outbox=OUTBOX)
