"""far.auth.v1 accounts and roles: GetAccount, ListAccounts, GrantRole, RevokeRole."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import jwt
import pytest
from far.auth.v1 import account_pb2, auth_service_pb2, session_pb2
from far.gamed.v1 import game_pb2, gamed_service_pb2

from tests.integration.auth_support import (
    ADMIN,
    ORGANIZER,
    PUBLISHER,
    USER,
    Stub,
    bearer,
    expect_auth_error,
    grant,
    new_admin,
    new_wallet,
    refresh,
    revoke,
    session_metadata,
    sign_in,
    wallet_of,
)
from tests.integration.gamed_support import Stub as GamedStub
from tests.integration.gamed_support import outcome, unique_id

pytestmark = pytest.mark.integration

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
DENIED = grpc.StatusCode.PERMISSION_DENIED
OPERATOR = account_pb2.ROLE_OPERATOR
KeepAdmins = Callable[..., Awaitable[None]]
REVIEWER = account_pb2.ROLE_REVIEWER


def roles_claim(session: session_pb2.Session) -> list[str]:
    claims = jwt.decode(session.access_token, options={"verify_signature": False})
    roles: list[str] = claims["roles"]
    return roles


async def get_account(api: Stub, caller: session_pb2.Session, name: str = "accounts/me") -> account_pb2.Account:
    return await api.GetAccount(auth_service_pb2.GetAccountRequest(name=name), metadata=session_metadata(caller))


async def list_accounts(
    api: Stub, caller: session_pb2.Session, **request: object
) -> auth_service_pb2.ListAccountsResponse:
    return await api.ListAccounts(
        auth_service_pb2.ListAccountsRequest(**request),  # type: ignore[arg-type]
        metadata=session_metadata(caller),
    )


async def all_holders(api: Stub, admin: session_pb2.Session, role: int) -> list[str]:
    wallets: list[str] = []
    token = ""
    while True:
        page = await list_accounts(api, admin, role=role, page_size=500, page_token=token)
        wallets += [a.wallet_address for a in page.accounts]
        token = page.next_page_token
        if not token:
            return wallets


class TestGetAccount:
    async def test_me(self, auth_api: Stub) -> None:
        account = new_wallet()
        session = await sign_in(auth_api, account)
        found = await get_account(auth_api, session)
        assert found == session.account
        assert found.name == f"accounts/{wallet_of(account)}"
        assert list(found.roles) == [USER]
        assert found.create_time == found.update_time == found.last_sign_in_time

    async def test_my_own_address_in_any_case(self, auth_api: Stub) -> None:
        account = new_wallet()
        session = await sign_in(auth_api, account)
        assert (await get_account(auth_api, session, f"accounts/{account.address}")).name == session.account.name

    async def test_another_account_is_not_found_for_a_user(self, auth_api: Stub) -> None:
        me = await sign_in(auth_api, new_wallet())
        other = await sign_in(auth_api, new_wallet())
        await expect_auth_error(get_account(auth_api, me, other.account.name), NOT_FOUND, "ACCOUNT_NOT_FOUND")

    async def test_an_admin_reads_any_account(self, auth_api: Stub, auth_admin: session_pb2.Session) -> None:
        other = await sign_in(auth_api, new_wallet())
        assert await get_account(auth_api, auth_admin, other.account.name) == other.account
        unknown = f"accounts/{wallet_of(new_wallet())}"
        await expect_auth_error(get_account(auth_api, auth_admin, unknown), NOT_FOUND, "ACCOUNT_NOT_FOUND")

    async def test_a_wallet_that_never_signed_in(self, auth_api: Stub, make_token: Callable[..., str]) -> None:
        call = auth_api.GetAccount(
            auth_service_pb2.GetAccountRequest(name="accounts/me"), metadata=bearer(make_token(wallet_of(new_wallet())))
        )
        await expect_auth_error(call, NOT_FOUND, "ACCOUNT_NOT_FOUND")

    @pytest.mark.parametrize("name", ["", "accounts/", "accounts/0x12", "accounts/bob", "users/me"])
    async def test_bad_name(self, auth_api: Stub, name: str) -> None:
        me = await sign_in(auth_api, new_wallet())
        await expect_auth_error(get_account(auth_api, me, name), INVALID, fields=["name"])

    async def test_needs_a_signed_in_caller(self, auth_api: Stub) -> None:
        await expect_auth_error(
            auth_api.GetAccount(auth_service_pb2.GetAccountRequest(name="accounts/me")),
            grpc.StatusCode.UNAUTHENTICATED,
        )


class TestListAccounts:
    async def test_newest_first_in_pages_filtered_by_role(
        self, auth_api: Stub, auth_admin: session_pb2.Session
    ) -> None:
        # Only this test grants `operator`, so the filtered list is exactly these accounts.
        wallets = [wallet_of(new_wallet()) for _ in range(3)]
        for wallet in wallets:
            await grant(auth_api, auth_admin, wallet, OPERATOR)
        first = await list_accounts(auth_api, auth_admin, role=OPERATOR, page_size=2)
        assert first.next_page_token
        second = await list_accounts(auth_api, auth_admin, role=OPERATOR, page_size=2, page_token=first.next_page_token)
        assert second.next_page_token == ""
        listed = [a.wallet_address for a in [*first.accounts, *second.accounts]]
        assert listed == list(reversed(wallets))
        assert all(list(a.roles) == [USER, OPERATOR] for a in first.accounts)

    async def test_everyone_holds_user(self, auth_api: Stub, auth_admin: session_pb2.Session) -> None:
        newest = await sign_in(auth_api, new_wallet())
        for role in (account_pb2.ROLE_UNSPECIFIED, USER):
            page = await list_accounts(auth_api, auth_admin, role=role, page_size=1)
            assert [a.name for a in page.accounts] == [newest.account.name]

    async def test_token_is_bound_to_the_filter(self, auth_api: Stub, auth_admin: session_pb2.Session) -> None:
        page = await list_accounts(auth_api, auth_admin, page_size=1)
        await expect_auth_error(
            list_accounts(auth_api, auth_admin, page_size=1, role=ADMIN, page_token=page.next_page_token),
            INVALID,
            fields=["page_token"],
        )

    @pytest.mark.parametrize(("request_fields", "bad"), [({"page_size": -1}, "page_size"), ({"role": 42}, "role")])
    async def test_bad_request(
        self, auth_api: Stub, auth_admin: session_pb2.Session, request_fields: dict[str, int], bad: str
    ) -> None:
        await expect_auth_error(list_accounts(auth_api, auth_admin, **request_fields), INVALID, fields=[bad])

    async def test_admins_only(self, auth_api: Stub) -> None:
        user = await sign_in(auth_api, new_wallet())
        await expect_auth_error(list_accounts(auth_api, user), DENIED, "MISSING_ROLE")
        await expect_auth_error(
            auth_api.ListAccounts(auth_service_pb2.ListAccountsRequest()), grpc.StatusCode.UNAUTHENTICATED
        )


class TestGrantRole:
    async def test_the_next_access_token_carries_the_role(
        self, auth_api: Stub, auth_admin: session_pb2.Session, gamed: GamedStub
    ) -> None:
        account = new_wallet()
        before = await sign_in(auth_api, account)
        granted = await grant(auth_api, auth_admin, wallet_of(account), PUBLISHER)
        assert list(granted.roles) == [USER, PUBLISHER]
        assert granted.update_time.ToDatetime() > before.account.update_time.ToDatetime()
        create = gamed_service_pb2.CreateGameRequest(game_id=unique_id(), game=game_pb2.Game(display_name="Mine"))
        # The token issued before the grant does not carry it (until it is refreshed) ...
        assert roles_claim(before) == ["user"]
        assert await outcome(gamed.CreateGame(create, metadata=session_metadata(before))) == (
            "PERMISSION_DENIED/MISSING_ROLE"
        )
        # ... the next one does, and gamed lets the publisher in.
        after = await refresh(auth_api, before)
        assert roles_claim(after) == ["publisher", "user"]
        assert list(after.account.roles) == [USER, PUBLISHER]
        game = await gamed.CreateGame(create, metadata=session_metadata(after))
        assert game.publisher == wallet_of(account)

    async def test_is_idempotent(self, auth_api: Stub, auth_admin: session_pb2.Session) -> None:
        wallet = wallet_of(new_wallet())
        first = await grant(auth_api, auth_admin, wallet, ORGANIZER)
        second = await grant(auth_api, auth_admin, wallet, ORGANIZER)
        assert second == first
        both = await grant(auth_api, auth_admin, wallet, PUBLISHER)
        assert list(both.roles) == [USER, PUBLISHER, ORGANIZER]

    async def test_creates_an_account_before_its_first_sign_in(
        self, auth_api: Stub, auth_admin: session_pb2.Session
    ) -> None:
        account = new_wallet()
        created = await grant(auth_api, auth_admin, account.address, PUBLISHER)  # EIP-55 case is folded
        assert created.name == f"accounts/{wallet_of(account)}"
        assert not created.HasField("last_sign_in_time")
        session = await sign_in(auth_api, account)
        assert list(session.account.roles) == [USER, PUBLISHER]
        assert roles_claim(session) == ["publisher", "user"]
        assert session.account.create_time == created.create_time

    @pytest.mark.parametrize("role", [USER, account_pb2.ROLE_UNSPECIFIED])
    async def test_user_is_not_grantable(self, auth_api: Stub, auth_admin: session_pb2.Session, role: int) -> None:
        await expect_auth_error(
            grant(auth_api, auth_admin, wallet_of(new_wallet()), role), INVALID, "ROLE_NOT_GRANTABLE", fields=["role"]
        )

    async def test_unknown_role(self, auth_api: Stub, auth_admin: session_pb2.Session) -> None:
        await expect_auth_error(grant(auth_api, auth_admin, wallet_of(new_wallet()), 42), INVALID, fields=["role"])

    async def test_non_admin_cannot_grant(self, auth_api: Stub) -> None:
        publisher = new_wallet()
        session = await sign_in(auth_api, publisher)
        await expect_auth_error(grant(auth_api, session, wallet_of(publisher), ADMIN), DENIED, "MISSING_ROLE")
        await expect_auth_error(
            auth_api.GrantRole(auth_service_pb2.GrantRoleRequest(name="accounts/me", role=ADMIN)),
            grpc.StatusCode.UNAUTHENTICATED,
        )

    @pytest.mark.parametrize("name", ["", "accounts/0x1", "games/chess"])
    async def test_bad_name(self, auth_api: Stub, auth_admin: session_pb2.Session, name: str) -> None:
        await expect_auth_error(
            auth_api.GrantRole(
                auth_service_pb2.GrantRoleRequest(name=name, role=PUBLISHER), metadata=session_metadata(auth_admin)
            ),
            INVALID,
            fields=["name"],
        )


@pytest.fixture
async def only_admins(auth_api: Stub, auth_admin: session_pb2.Session) -> AsyncIterator[KeepAdmins]:
    """`await only_admins(*wallets)` leaves exactly those admins; the others get admin back after the test."""
    removed: list[str] = []

    async def keep(*wallets: str) -> None:
        for wallet in await all_holders(auth_api, auth_admin, ADMIN):
            if wallet not in wallets:
                await revoke(auth_api, auth_admin, wallet, ADMIN)
                removed.append(wallet)

    try:
        yield keep
    finally:
        for wallet in removed:
            await grant(auth_api, auth_admin, wallet, ADMIN)


class TestRevokeRole:
    async def test_the_next_access_token_lacks_the_role(self, auth_api: Stub, auth_admin: session_pb2.Session) -> None:
        account = new_wallet()
        await grant(auth_api, auth_admin, wallet_of(account), PUBLISHER)
        session = await sign_in(auth_api, account)
        assert roles_claim(session) == ["publisher", "user"]
        revoked = await revoke(auth_api, auth_admin, wallet_of(account), PUBLISHER)
        assert list(revoked.roles) == [USER]
        assert roles_claim(await refresh(auth_api, session)) == ["user"]
        assert await revoke(auth_api, auth_admin, wallet_of(account), PUBLISHER) == revoked  # idempotent

    async def test_unknown_account(self, auth_api: Stub, auth_admin: session_pb2.Session) -> None:
        await expect_auth_error(
            revoke(auth_api, auth_admin, wallet_of(new_wallet()), PUBLISHER), NOT_FOUND, "ACCOUNT_NOT_FOUND"
        )

    async def test_user_is_not_revocable(self, auth_api: Stub, auth_admin: session_pb2.Session) -> None:
        me = await sign_in(auth_api, new_wallet())
        await expect_auth_error(
            revoke(auth_api, auth_admin, me.account.wallet_address, USER),
            INVALID,
            "ROLE_NOT_GRANTABLE",
            fields=["role"],
        )

    async def test_non_admin_cannot_revoke(self, auth_api: Stub, auth_admin: session_pb2.Session) -> None:
        me = await sign_in(auth_api, new_wallet())
        await expect_auth_error(revoke(auth_api, me, auth_admin.account.wallet_address, ADMIN), DENIED, "MISSING_ROLE")

    async def test_the_last_admin_keeps_admin(
        self, auth_api: Stub, auth_admin: session_pb2.Session, only_admins: KeepAdmins
    ) -> None:
        last, last_session = await new_admin(auth_api, auth_admin)
        await only_admins(wallet_of(last))
        await expect_auth_error(
            revoke(auth_api, last_session, wallet_of(last), ADMIN), grpc.StatusCode.FAILED_PRECONDITION, "LAST_ADMIN"
        )
        assert list((await get_account(auth_api, last_session)).roles) == [USER, ADMIN]

    async def test_two_admins_revoking_each_other(
        self, auth_api: Stub, auth_admin: session_pb2.Session, only_admins: KeepAdmins
    ) -> None:
        (one, one_session), (two, two_session) = await asyncio.gather(
            new_admin(auth_api, auth_admin), new_admin(auth_api, auth_admin)
        )
        await only_admins(wallet_of(one), wallet_of(two))
        results = await asyncio.gather(
            outcome(revoke(auth_api, one_session, wallet_of(two), ADMIN)),
            outcome(revoke(auth_api, two_session, wallet_of(one), ADMIN)),
        )
        assert sorted(results) == ["FAILED_PRECONDITION/LAST_ADMIN", "OK"]
        assert len(await all_holders(auth_api, auth_admin, ADMIN)) == 1
