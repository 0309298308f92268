"""Building blocks for the auth integration tests: wallets, signed challenges, signed-in callers.

Wallets are real key pairs (eth_account), fresh per test unless a test needs a fixed one. The in-process
auth server (tests/integration/conftest.py) accepts the domains and chains in AUTH_TEST_SETTINGS there.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount
from far.auth.v1 import account_pb2, auth_service_pb2, auth_service_pb2_grpc, session_pb2

from tests.integration.rich_errors import RichError, expect_error

Metadata = tuple[tuple[str, str], ...]
if TYPE_CHECKING:  # the stub of a grpc.aio channel; only the .pyi names this type
    Stub: TypeAlias = auth_service_pb2_grpc.AuthServiceAsyncStub
else:
    Stub = auth_service_pb2_grpc.AuthServiceStub

ERROR_DOMAIN = "auth.far.network"
DOMAIN = "app.far.test"
URI = "https://app.far.test/login"
OTHER_DOMAIN = "partner.far.test:8443"
OTHER_URI = "https://partner.far.test:8443/"
CHAIN_ID = 97
# A fixed key: its wallet is in AUTH_BOOTSTRAP_ADMINS, so it becomes admin at its first sign-in.
BOOTSTRAP_ADMIN: LocalAccount = Account.from_key("0x" + "ad" * 32)

USER = account_pb2.ROLE_USER
PUBLISHER = account_pb2.ROLE_PUBLISHER
ORGANIZER = account_pb2.ROLE_ORGANIZER
ADMIN = account_pb2.ROLE_ADMIN


def new_wallet() -> LocalAccount:
    return Account.from_key(secrets.token_bytes(32))


def wallet_of(account: LocalAccount) -> str:
    """The canonical (lower-case) address, as the service names accounts."""
    return str(account.address).lower()


def sign(account: LocalAccount, message: str) -> str:
    """The EIP-191 personal_sign signature of `message`, 0x-prefixed hex (what a wallet returns)."""
    return str(Account.sign_message(encode_defunct(text=message), account.key).signature.to_0x_hex())


def bearer(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),)


def session_metadata(session: session_pb2.Session) -> Metadata:
    return bearer(session.access_token)


async def challenge(
    api: Stub, account: LocalAccount, *, domain: str = DOMAIN, uri: str = URI, chain_id: int = CHAIN_ID
) -> auth_service_pb2.CreateChallengeResponse:
    return await api.CreateChallenge(
        auth_service_pb2.CreateChallengeRequest(
            wallet_address=account.address, chain_id=chain_id, domain=domain, uri=uri
        )
    )


async def sign_in(api: Stub, account: LocalAccount, **where: Any) -> session_pb2.Session:
    """Challenge, sign, sign in: a new session of `account`."""
    issued = await challenge(api, account, **where)
    return await api.SignIn(
        auth_service_pb2.SignInRequest(message=issued.message, signature=sign(account, issued.message))
    )


async def refresh(api: Stub, session: session_pb2.Session) -> session_pb2.Session:
    return await api.RefreshSession(auth_service_pb2.RefreshSessionRequest(refresh_token=session.refresh_token))


async def admin_session(api: Stub) -> session_pb2.Session:
    """A session of the bootstrap admin."""
    session = await sign_in(api, BOOTSTRAP_ADMIN)
    assert ADMIN in session.account.roles
    return session


async def grant(api: Stub, admin: session_pb2.Session, wallet: str, role: int) -> account_pb2.Account:
    return await api.GrantRole(
        auth_service_pb2.GrantRoleRequest(name=f"accounts/{wallet}", role=role),  # type: ignore[arg-type]
        metadata=session_metadata(admin),
    )


async def revoke(api: Stub, admin: session_pb2.Session, wallet: str, role: int) -> account_pb2.Account:
    return await api.RevokeRole(
        auth_service_pb2.RevokeRoleRequest(name=f"accounts/{wallet}", role=role),  # type: ignore[arg-type]
        metadata=session_metadata(admin),
    )


async def new_admin(api: Stub, admin: session_pb2.Session) -> tuple[LocalAccount, session_pb2.Session]:
    """A fresh wallet made admin by `admin`, signed in after the grant."""
    account = new_wallet()
    await grant(api, admin, wallet_of(account), ADMIN)
    return account, await sign_in(api, account)


async def expect_auth_error(
    call: Awaitable[Any], code: grpc.StatusCode, reason: str | None = None, **kwargs: Any
) -> RichError:
    """expect_error with the auth service's ErrorInfo domain."""
    return await expect_error(call, code, reason, domain=ERROR_DOMAIN, **kwargs)
