"""far.auth.v1.AuthService: proto in, sessions / accounts call, proto out."""

from __future__ import annotations

from typing import Any

import grpc
from far.auth.v1 import account_pb2, auth_service_pb2, auth_service_pb2_grpc, session_pb2
from google.protobuf import empty_pb2

from servers.auth import convert
from servers.auth.accounts import Accounts
from servers.auth.sessions import Sessions
from servers.common.context import current_principal
from servers.common.db import Database

Context = grpc.aio.ServicerContext[Any, Any]


def _user_agent(context: Context) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "user-agent":
            return value if isinstance(value, str) else value.decode(errors="replace")
    return ""


class AuthServicer(auth_service_pb2_grpc.AuthServiceServicer):
    def __init__(self, database: Database, sessions: Sessions, accounts: Accounts) -> None:
        self._db = database
        self._sessions = sessions
        self._accounts = accounts

    async def CreateChallenge(
        self, request: auth_service_pb2.CreateChallengeRequest, context: Context
    ) -> auth_service_pb2.CreateChallengeResponse:
        challenge = await self._sessions.create_challenge(
            request.wallet_address, request.chain_id, request.domain, request.uri
        )
        return convert.challenge(challenge)

    async def SignIn(self, request: auth_service_pb2.SignInRequest, context: Context) -> session_pb2.Session:
        async with self._db.transaction() as uow:
            issued = await self._sessions.sign_in(uow, request.message, request.signature, _user_agent(context))
        return convert.issued_session(issued)

    async def RefreshSession(
        self, request: auth_service_pb2.RefreshSessionRequest, context: Context
    ) -> session_pb2.Session:
        async with self._db.transaction() as uow:
            refreshed = await self._sessions.refresh(uow, request.refresh_token)
        # A reused refresh token revokes the session: that commits first, then the error is raised.
        return convert.issued_session(refreshed.unwrap())

    async def SignOut(self, request: auth_service_pb2.SignOutRequest, context: Context) -> empty_pb2.Empty:
        async with self._db.transaction() as uow:
            await self._sessions.sign_out(uow, current_principal(), request.refresh_token)
        return empty_pb2.Empty()

    async def ListSessions(
        self, request: auth_service_pb2.ListSessionsRequest, context: Context
    ) -> auth_service_pb2.ListSessionsResponse:
        async with self._db.read() as uow:
            rows, token = await self._sessions.list_sessions(
                uow, current_principal(), request.parent, request.page_size, request.page_token
            )
            return auth_service_pb2.ListSessionsResponse(
                sessions=[convert.session(r) for r in rows], next_page_token=token
            )

    async def RevokeSession(self, request: auth_service_pb2.RevokeSessionRequest, context: Context) -> empty_pb2.Empty:
        async with self._db.transaction() as uow:
            await self._sessions.revoke_session(uow, current_principal(), request.name)
        return empty_pb2.Empty()

    async def GetAccount(self, request: auth_service_pb2.GetAccountRequest, context: Context) -> account_pb2.Account:
        async with self._db.read() as uow:
            return convert.account(await self._accounts.get_account(uow, current_principal(), request.name))

    async def ListAccounts(
        self, request: auth_service_pb2.ListAccountsRequest, context: Context
    ) -> auth_service_pb2.ListAccountsResponse:
        async with self._db.read() as uow:
            rows, token = await self._accounts.list_accounts(
                uow, current_principal(), request.page_size, request.page_token, request.role
            )
            return auth_service_pb2.ListAccountsResponse(
                accounts=[convert.account(r) for r in rows], next_page_token=token
            )

    async def GrantRole(self, request: auth_service_pb2.GrantRoleRequest, context: Context) -> account_pb2.Account:
        async with self._db.transaction() as uow:
            row = await self._accounts.grant_role(uow, current_principal(), request.name, request.role)
            return convert.account(row)

    async def RevokeRole(self, request: auth_service_pb2.RevokeRoleRequest, context: Context) -> account_pb2.Account:
        async with self._db.transaction() as uow:
            row = await self._accounts.revoke_role(uow, current_principal(), request.name, request.role)
            return convert.account(row)
