"""far.auth.v1 sessions: RefreshSession, SignOut, ListSessions, RevokeSession, and what other services see."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from datetime import UTC, timedelta

import asyncpg
import grpc
import jwt
import pytest
from far.auth.v1 import auth_service_pb2, session_pb2
from far.gamed.v1 import gamed_service_pb2

from tests.integration.auth_support import (
    Stub,
    bearer,
    expect_auth_error,
    new_wallet,
    refresh,
    session_metadata,
    sign_in,
    wallet_of,
)
from tests.integration.conftest import MovableClock
from tests.integration.gamed_support import Stub as GamedStub
from tests.integration.gamed_support import outcome

pytestmark = pytest.mark.integration

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
REVOKED = "UNAUTHENTICATED/TOKEN_REVOKED"


async def gamed_says(gamed: GamedStub, token: str) -> str:
    """What gamed makes of an access token: OK, or CODE/REASON."""
    return await outcome(gamed.ListGames(gamed_service_pb2.ListGamesRequest(page_size=1), metadata=bearer(token)))


async def auth_says(api: Stub, token: str) -> str:
    return await outcome(api.GetAccount(auth_service_pb2.GetAccountRequest(name="accounts/me"), metadata=bearer(token)))


def refresh_request(token: str) -> auth_service_pb2.RefreshSessionRequest:
    return auth_service_pb2.RefreshSessionRequest(refresh_token=token)


async def sign_out(api: Stub, refresh_token: str = "", metadata: tuple[tuple[str, str], ...] = ()) -> None:
    await api.SignOut(auth_service_pb2.SignOutRequest(refresh_token=refresh_token), metadata=metadata)


async def list_sessions(api: Stub, session: session_pb2.Session, parent: str = "accounts/me") -> list[str]:
    response = await api.ListSessions(
        auth_service_pb2.ListSessionsRequest(parent=parent), metadata=session_metadata(session)
    )
    return [s.name for s in response.sessions]


class TestRefreshSession:
    async def test_rotates_both_tokens_and_keeps_the_session(self, auth_api: Stub, clock: MovableClock) -> None:
        first = await sign_in(auth_api, new_wallet())
        clock.advance(timedelta(minutes=10))
        second = await refresh(auth_api, first)
        assert second.name == first.name
        assert second.create_time == first.create_time
        assert second.refresh_time.ToDatetime(UTC) - first.create_time.ToDatetime(UTC) >= timedelta(minutes=10)
        assert second.refresh_token not in ("", first.refresh_token)
        assert second.access_token not in ("", first.access_token)
        assert second.access_token_expire_time.ToDatetime() > first.access_token_expire_time.ToDatetime()
        assert second.refresh_token_expire_time.ToDatetime() > first.refresh_token_expire_time.ToDatetime()
        assert second.account == first.account
        claims = jwt.decode(second.access_token, options={"verify_signature": False})
        assert claims["sid"] == first.name.rsplit("/", 1)[1]

    async def test_the_new_refresh_token_works_and_the_chain_goes_on(self, auth_api: Stub) -> None:
        session = await sign_in(auth_api, new_wallet())
        for _ in range(3):
            session = await refresh(auth_api, session)
        assert await auth_says(auth_api, session.access_token) == "OK"

    async def test_reuse_revokes_the_whole_family(self, auth_api: Stub, gamed: GamedStub) -> None:
        first = await sign_in(auth_api, new_wallet())
        second = await refresh(auth_api, first)
        assert await gamed_says(gamed, second.access_token) == "OK"
        # The first refresh token comes back (stolen, or a client bug): the session is taken for compromised.
        await expect_auth_error(
            auth_api.RefreshSession(refresh_request(first.refresh_token)), UNAUTHENTICATED, "REFRESH_TOKEN_REUSED"
        )
        await expect_auth_error(
            auth_api.RefreshSession(refresh_request(second.refresh_token)), UNAUTHENTICATED, "SESSION_REVOKED"
        )
        for token in (first.access_token, second.access_token):
            assert await gamed_says(gamed, token) == REVOKED
            assert await auth_says(auth_api, token) == REVOKED

    async def test_reuse_leaves_other_sessions_alone(self, auth_api: Stub) -> None:
        account = new_wallet()
        other = await sign_in(auth_api, account)
        first = await sign_in(auth_api, account)
        await refresh(auth_api, first)
        await expect_auth_error(
            auth_api.RefreshSession(refresh_request(first.refresh_token)), UNAUTHENTICATED, "REFRESH_TOKEN_REUSED"
        )
        assert await auth_says(auth_api, other.access_token) == "OK"
        await refresh(auth_api, other)

    async def test_concurrent_refreshes_with_one_token(self, auth_api: Stub) -> None:
        session = await sign_in(auth_api, new_wallet())
        results = await asyncio.gather(
            *(outcome(auth_api.RefreshSession(refresh_request(session.refresh_token))) for _ in range(4))
        )
        # One rotation wins; the next presents a token that is no longer current (reuse: the family is
        # revoked), and any later one finds the session revoked.
        assert results.count("OK") == 1
        assert "UNAUTHENTICATED/REFRESH_TOKEN_REUSED" in results
        assert set(results) <= {"OK", "UNAUTHENTICATED/REFRESH_TOKEN_REUSED", "UNAUTHENTICATED/SESSION_REVOKED"}
        await expect_auth_error(
            auth_api.RefreshSession(refresh_request(session.refresh_token)), UNAUTHENTICATED, "SESSION_REVOKED"
        )

    async def test_expired_refresh_token(self, auth_api: Stub, clock: MovableClock) -> None:
        session = await sign_in(auth_api, new_wallet())
        clock.advance(timedelta(days=30, seconds=1))
        await expect_auth_error(
            auth_api.RefreshSession(refresh_request(session.refresh_token)), UNAUTHENTICATED, "REFRESH_TOKEN_EXPIRED"
        )

    @pytest.mark.parametrize("token", ["A" * 43, "not a token!", "x" * 257])
    async def test_unknown_or_malformed_token(self, auth_api: Stub, token: str) -> None:
        await expect_auth_error(
            auth_api.RefreshSession(refresh_request(token)), UNAUTHENTICATED, "REFRESH_TOKEN_INVALID"
        )

    async def test_missing_token(self, auth_api: Stub) -> None:
        await expect_auth_error(
            auth_api.RefreshSession(refresh_request("")), grpc.StatusCode.INVALID_ARGUMENT, fields=["refresh_token"]
        )

    async def test_only_hashes_are_stored(self, auth_api: Stub, migrated_database_url: str) -> None:
        session = await refresh(auth_api, await sign_in(auth_api, new_wallet()))
        connection = await asyncpg.connect(migrated_database_url)
        try:
            rows = await connection.fetch(
                "SELECT t.* FROM auth.refresh_tokens t WHERE t.session_id = $1", session.name.rsplit("/", 1)[1]
            )
        finally:
            await connection.close()
        assert len(rows) == 2
        digest = hashlib.sha256(session.refresh_token.encode()).digest()
        assert digest in [bytes(row["token_hash"]) for row in rows]
        assert all(session.refresh_token not in str(dict(row)) for row in rows)


class TestSignOut:
    async def test_with_the_refresh_token(self, auth_api: Stub, gamed: GamedStub) -> None:
        first = await sign_in(auth_api, new_wallet())
        session = await refresh(auth_api, first)
        await sign_out(auth_api, session.refresh_token)
        for token in (first.access_token, session.access_token):
            assert await gamed_says(gamed, token) == REVOKED
        await expect_auth_error(
            auth_api.RefreshSession(refresh_request(session.refresh_token)), UNAUTHENTICATED, "SESSION_REVOKED"
        )

    async def test_with_the_access_token(self, auth_api: Stub, gamed: GamedStub) -> None:
        session = await sign_in(auth_api, new_wallet())
        await sign_out(auth_api, metadata=session_metadata(session))
        assert await gamed_says(gamed, session.access_token) == REVOKED
        await expect_auth_error(
            auth_api.RefreshSession(refresh_request(session.refresh_token)), UNAUTHENTICATED, "SESSION_REVOKED"
        )

    async def test_ends_only_its_own_session(self, auth_api: Stub) -> None:
        account = new_wallet()
        kept = await sign_in(auth_api, account)
        ended = await sign_in(auth_api, account)
        await sign_out(auth_api, ended.refresh_token)
        assert await auth_says(auth_api, kept.access_token) == "OK"
        assert await auth_says(auth_api, ended.access_token) == REVOKED

    @pytest.mark.parametrize("token", ["A" * 43, "not a token!"])
    async def test_is_safe_to_repeat_and_takes_any_token(self, auth_api: Stub, token: str) -> None:
        session = await sign_in(auth_api, new_wallet())
        await sign_out(auth_api, session.refresh_token)
        await sign_out(auth_api, session.refresh_token)
        await sign_out(auth_api, token)

    async def test_a_token_from_outside_a_session_is_revoked_itself(
        self, auth_api: Stub, gamed: GamedStub, make_token: Callable[..., str]
    ) -> None:
        token = make_token(wallet_of(new_wallet()), ("user",))
        await sign_out(auth_api, metadata=bearer(token))
        assert await gamed_says(gamed, token) == REVOKED

    async def test_needs_a_refresh_or_access_token(self, auth_api: Stub) -> None:
        await expect_auth_error(auth_api.SignOut(auth_service_pb2.SignOutRequest()), UNAUTHENTICATED)


class TestListSessions:
    async def test_live_sessions_newest_first_without_tokens(self, auth_api: Stub) -> None:
        account = new_wallet()
        sessions = [await sign_in(auth_api, account) for _ in range(4)]
        await sign_out(auth_api, sessions[1].refresh_token)
        response = await auth_api.ListSessions(
            auth_service_pb2.ListSessionsRequest(parent="accounts/me"), metadata=session_metadata(sessions[3])
        )
        assert [s.name for s in response.sessions] == [sessions[3].name, sessions[2].name, sessions[0].name]
        assert response.next_page_token == ""
        listed = response.sessions[0]
        assert (listed.access_token, listed.refresh_token, listed.HasField("account")) == ("", "", False)
        assert listed.create_time == sessions[3].create_time
        assert listed.refresh_token_expire_time == sessions[3].refresh_token_expire_time
        assert listed.user_agent.startswith("grpc-python")

    async def test_pages(self, auth_api: Stub) -> None:
        account = new_wallet()
        sessions = [await sign_in(auth_api, account) for _ in range(3)]
        me = sessions[0]
        first = await auth_api.ListSessions(
            auth_service_pb2.ListSessionsRequest(parent=f"accounts/{account.address}", page_size=2),
            metadata=session_metadata(me),
        )
        assert len(first.sessions) == 2
        assert first.next_page_token
        second = await auth_api.ListSessions(
            auth_service_pb2.ListSessionsRequest(parent="accounts/me", page_size=2, page_token=first.next_page_token),
            metadata=session_metadata(me),
        )
        assert [s.name for s in [*first.sessions, *second.sessions]] == [s.name for s in reversed(sessions)]
        assert second.next_page_token == ""

    async def test_expired_sessions_are_not_live(self, auth_api: Stub, clock: MovableClock) -> None:
        account = new_wallet()
        old = await sign_in(auth_api, account)
        clock.advance(timedelta(days=29))
        recent = await sign_in(auth_api, account)
        clock.advance(timedelta(days=2))
        assert await list_sessions(auth_api, old) == [recent.name]

    async def test_another_account_is_not_found_for_a_user(self, auth_api: Stub) -> None:
        me = await sign_in(auth_api, new_wallet())
        other = new_wallet()
        await sign_in(auth_api, other)
        await expect_auth_error(
            auth_api.ListSessions(
                auth_service_pb2.ListSessionsRequest(parent=f"accounts/{wallet_of(other)}"),
                metadata=session_metadata(me),
            ),
            grpc.StatusCode.NOT_FOUND,
            "ACCOUNT_NOT_FOUND",
        )

    async def test_an_admin_lists_any_account(self, auth_api: Stub, auth_admin: session_pb2.Session) -> None:
        other = new_wallet()
        session = await sign_in(auth_api, other)
        assert await list_sessions(auth_api, auth_admin, f"accounts/{wallet_of(other)}") == [session.name]

    async def test_token_is_bound_to_the_account(self, auth_api: Stub, auth_admin: session_pb2.Session) -> None:
        one, two = new_wallet(), new_wallet()
        for account in (one, one, two):
            await sign_in(auth_api, account)
        page = await auth_api.ListSessions(
            auth_service_pb2.ListSessionsRequest(parent=f"accounts/{wallet_of(one)}", page_size=1),
            metadata=session_metadata(auth_admin),
        )
        await expect_auth_error(
            auth_api.ListSessions(
                auth_service_pb2.ListSessionsRequest(
                    parent=f"accounts/{wallet_of(two)}", page_size=1, page_token=page.next_page_token
                ),
                metadata=session_metadata(auth_admin),
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            fields=["page_token"],
        )

    @pytest.mark.parametrize("parent", ["", "accounts/0x123", "users/me", "accounts/me/sessions"])
    async def test_bad_parent(self, auth_api: Stub, parent: str) -> None:
        me = await sign_in(auth_api, new_wallet())
        await expect_auth_error(
            auth_api.ListSessions(auth_service_pb2.ListSessionsRequest(parent=parent), metadata=session_metadata(me)),
            grpc.StatusCode.INVALID_ARGUMENT,
            fields=["parent"],
        )

    async def test_needs_a_signed_in_caller(self, auth_api: Stub) -> None:
        await expect_auth_error(
            auth_api.ListSessions(auth_service_pb2.ListSessionsRequest(parent="accounts/me")), UNAUTHENTICATED
        )


class TestRevokeSession:
    async def test_revokes_one_of_my_sessions(self, auth_api: Stub, gamed: GamedStub) -> None:
        account = new_wallet()
        me = await sign_in(auth_api, account)
        lost = await sign_in(auth_api, account)
        session_id = lost.name.rsplit("/", 1)[1]
        await auth_api.RevokeSession(
            auth_service_pb2.RevokeSessionRequest(name=f"accounts/me/sessions/{session_id}"),
            metadata=session_metadata(me),
        )
        assert await gamed_says(gamed, lost.access_token) == REVOKED
        assert await gamed_says(gamed, me.access_token) == "OK"
        assert await list_sessions(auth_api, me) == [me.name]
        await expect_auth_error(
            auth_api.RefreshSession(refresh_request(lost.refresh_token)), UNAUTHENTICATED, "SESSION_REVOKED"
        )
        # Revoking a revoked session succeeds.
        again = auth_service_pb2.RevokeSessionRequest(name=lost.name)
        await auth_api.RevokeSession(again, metadata=session_metadata(me))

    async def test_another_accounts_session_is_not_found_for_a_user(self, auth_api: Stub) -> None:
        me = await sign_in(auth_api, new_wallet())
        victim = await sign_in(auth_api, new_wallet())
        await expect_auth_error(
            auth_api.RevokeSession(
                auth_service_pb2.RevokeSessionRequest(name=victim.name), metadata=session_metadata(me)
            ),
            grpc.StatusCode.NOT_FOUND,
            "SESSION_NOT_FOUND",
        )
        # Nor under the caller's own name.
        await expect_auth_error(
            auth_api.RevokeSession(
                auth_service_pb2.RevokeSessionRequest(name=f"accounts/me/sessions/{victim.name.rsplit('/', 1)[1]}"),
                metadata=session_metadata(me),
            ),
            grpc.StatusCode.NOT_FOUND,
            "SESSION_NOT_FOUND",
        )
        assert await auth_says(auth_api, victim.access_token) == "OK"

    async def test_an_admin_revokes_anyones(
        self, auth_api: Stub, gamed: GamedStub, auth_admin: session_pb2.Session
    ) -> None:
        victim = await sign_in(auth_api, new_wallet())
        await auth_api.RevokeSession(
            auth_service_pb2.RevokeSessionRequest(name=victim.name), metadata=session_metadata(auth_admin)
        )
        assert await gamed_says(gamed, victim.access_token) == REVOKED

    async def test_unknown_session(self, auth_api: Stub) -> None:
        me = await sign_in(auth_api, new_wallet())
        await expect_auth_error(
            auth_api.RevokeSession(
                auth_service_pb2.RevokeSessionRequest(name="accounts/me/sessions/snosuchsession"),
                metadata=session_metadata(me),
            ),
            grpc.StatusCode.NOT_FOUND,
            "SESSION_NOT_FOUND",
        )

    @pytest.mark.parametrize("name", ["", "accounts/me", "accounts/me/sessions/Bad_Id", "sessions/s1"])
    async def test_bad_name(self, auth_api: Stub, name: str) -> None:
        me = await sign_in(auth_api, new_wallet())
        await expect_auth_error(
            auth_api.RevokeSession(auth_service_pb2.RevokeSessionRequest(name=name), metadata=session_metadata(me)),
            grpc.StatusCode.INVALID_ARGUMENT,
            fields=["name"],
        )
