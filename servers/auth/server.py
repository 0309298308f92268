"""The auth server: `python -m servers.auth`."""

from __future__ import annotations

from collections.abc import Mapping

import grpc
from far.auth.v1 import auth_service_pb2, auth_service_pb2_grpc

from servers.auth.accounts import Accounts
from servers.auth.challenges import ChallengeStore
from servers.auth.servicer import AuthServicer
from servers.auth.sessions import Clock, Sessions, system_clock
from servers.auth.settings import AuthSettings
from servers.common.auth import TokenIssuer
from servers.common.config import Env
from servers.common.server import Runtime, ServiceSpec

SERVICE_NAME = auth_service_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name


def make_spec(clock: Clock = system_clock, environ: Mapping[str, str] | None = None) -> ServiceSpec:
    """The server's spec. Tests pass a clock they can move and the `AUTH_*` settings (default: os.environ)."""

    async def setup(server: grpc.aio.Server, runtime: Runtime) -> None:
        assert runtime.database is not None
        assert runtime.redis is not None
        assert runtime.revocations is not None
        settings = AuthSettings.from_env(Env(environ))
        accounts = Accounts(runtime.page_tokens, settings.bootstrap_admins, clock)
        sessions = Sessions(
            settings,
            ChallengeStore(runtime.redis, runtime.settings.redis_key_prefix),
            TokenIssuer(runtime.settings.jwt_keys),
            runtime.revocations,
            accounts,
            runtime.page_tokens,
            clock,
        )
        auth_service_pb2_grpc.add_AuthServiceServicer_to_server(
            AuthServicer(runtime.database, sessions, accounts), server
        )

    return ServiceSpec(name="auth", default_port=50051, service_names=[SERVICE_NAME], setup=setup)


SPEC = make_spec()
