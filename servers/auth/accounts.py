"""Accounts and roles: who may read which account, role grants, the bootstrap admins.

Transport-agnostic: plain values and the caller's Principal in, rows out. Role numbers are those of
far.auth.v1.Role; an account's stored roles are the granted ones, `user` is implied.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from datetime import datetime
from enum import IntEnum

from servers.auth import repository as repo
from servers.auth.models import AccountRow
from servers.common.auth import Principal, Role, require_signed_in
from servers.common.db import UnitOfWork
from servers.common.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound, PermissionDenied
from servers.common.pagination import PageTokens, page_size

ACCOUNT_NAME = re.compile(r"^accounts/(?P<account>me|0x[0-9a-fA-F]{40})\Z")
ACCOUNT_PAGE_DEFAULT, ACCOUNT_PAGE_MAX = 50, 500


class RoleId(IntEnum):
    """far.auth.v1.Role."""

    USER = 1
    PUBLISHER = 2
    ORGANIZER = 3
    REVIEWER = 4
    OPERATOR = 5
    ADMIN = 6

    @property
    def claim(self) -> str:
        """The name in the access token's `roles` claim (servers.common.auth.Role)."""
        return Role[self.name].value


def role_ids(row: AccountRow) -> list[RoleId]:
    """The account's roles in enum order, `user` first."""
    return [RoleId.USER, *sorted(RoleId(r) for r in set(row.roles) if r != RoleId.USER)]


def role_claims(row: AccountRow) -> list[str]:
    return [role.claim for role in role_ids(row)]


def account_name(wallet: str) -> str:
    return f"accounts/{wallet}"


def account_not_found(wallet: str) -> NotFound:
    name = account_name(wallet)
    return NotFound(f"{name} does not exist", reason="ACCOUNT_NOT_FOUND", metadata={"resource": name})


def parse_account(name: str, principal: Principal, *, field: str = "name") -> str:
    """The wallet (lower-case) an `accounts/{account}` name means; `me` is the caller."""
    match = ACCOUNT_NAME.match(name)
    if match is None:
        description = "is required" if not name else "must be accounts/{wallet address} or accounts/me"
        raise InvalidArgument.field(field, description)
    account = match.group("account")
    return principal.subject if account == "me" else account.lower()


def require_admin(principal: Principal) -> None:
    require_signed_in(principal)
    if not principal.is_admin:
        raise PermissionDenied("this method needs the admin role")


def check_visible(wallet: str, principal: Principal) -> None:
    """Another account than one's own does not exist for a non-admin caller."""
    if wallet != principal.subject and not principal.is_admin:
        raise account_not_found(wallet)


def _grantable(role: int) -> RoleId:
    if role in (RoleId.USER, 0):
        raise InvalidArgument(
            "ROLE_USER and ROLE_UNSPECIFIED cannot be granted or revoked",
            violations=[FieldViolation("role", "must be a role other than ROLE_USER")],
            reason="ROLE_NOT_GRANTABLE",
        )
    try:
        return RoleId(role)
    except ValueError:
        raise InvalidArgument.field("role", "is not a far.auth.v1.Role") from None


class Accounts:
    """Account reads and role changes. Each takes the RPC's unit of work and the caller."""

    def __init__(self, page_tokens: PageTokens, bootstrap_admins: Iterable[str], clock: Callable[[], datetime]) -> None:
        self._tokens = page_tokens
        self._bootstrap_admins = frozenset(bootstrap_admins)
        self._clock = clock

    async def signed_in(self, uow: UnitOfWork, wallet: str, now: datetime) -> AccountRow:
        """The account of a wallet that just signed in: created on first sign-in, admin if bootstrapped."""
        account = await repo.get_account(uow.session, wallet, for_update=True)
        if account is None:
            await repo.insert_account(uow.session, wallet, now)
            account = await repo.get_account(uow.session, wallet, for_update=True)
            assert account is not None
        first_sign_in = account.last_sign_in_time is None
        if first_sign_in and wallet in self._bootstrap_admins and RoleId.ADMIN not in account.roles:
            await repo.set_roles(uow.session, wallet, sorted({*account.roles, RoleId.ADMIN}), now)
        await repo.set_last_sign_in(uow.session, wallet, now)
        found = await repo.get_account(uow.session, wallet)
        assert found is not None
        return found

    async def get_account(self, uow: UnitOfWork, principal: Principal, name: str) -> AccountRow:
        require_signed_in(principal)
        wallet = parse_account(name, principal)
        check_visible(wallet, principal)
        account = await repo.get_account(uow.session, wallet)
        if account is None:
            raise account_not_found(wallet)
        return account

    async def list_accounts(
        self, uow: UnitOfWork, principal: Principal, size: int, token: str, role: int
    ) -> tuple[list[AccountRow], str]:
        require_admin(principal)
        limit = page_size(size, default=ACCOUNT_PAGE_DEFAULT, maximum=ACCOUNT_PAGE_MAX)
        if role and role not in RoleId.__members__.values():
            raise InvalidArgument.field("role", "is not a far.auth.v1.Role")
        scope = self._tokens.scope("accounts", role)
        cursor = self._tokens.decode(token, scope=scope)
        after = (datetime.fromisoformat(cursor["t"]), str(cursor["id"])) if cursor else None
        # Every account holds `user`: filtering by it filters nothing.
        role_filter = role if role and role != RoleId.USER else None
        rows = await repo.list_accounts(uow.session, role=role_filter, after=after, limit=limit + 1)
        next_token = ""
        if len(rows) > limit:
            rows = rows[:limit]
            last = rows[-1]
            next_token = self._tokens.encode({"t": last.create_time.isoformat(), "id": last.wallet}, scope=scope)
        return rows, next_token

    async def grant_role(self, uow: UnitOfWork, principal: Principal, name: str, role: int) -> AccountRow:
        require_admin(principal)
        wallet = parse_account(name, principal)
        granted = _grantable(role)
        now = self._clock()
        account = await repo.get_account(uow.session, wallet, for_update=True)
        if account is None:
            await repo.insert_account(uow.session, wallet, now)
            account = await repo.get_account(uow.session, wallet, for_update=True)
            assert account is not None
        if granted not in account.roles:
            await repo.set_roles(uow.session, wallet, sorted({*account.roles, granted}), now)
            account = await repo.get_account(uow.session, wallet)
            assert account is not None
        return account

    async def revoke_role(self, uow: UnitOfWork, principal: Principal, name: str, role: int) -> AccountRow:
        require_admin(principal)
        wallet = parse_account(name, principal)
        revoked = _grantable(role)
        if revoked == RoleId.ADMIN:
            # Lock every admin first, so two admins revoking each other cannot both succeed.
            admins = await repo.lock_holders(uow.session, RoleId.ADMIN)
            if admins == [wallet]:
                raise FailedPrecondition("the last admin cannot lose the admin role", reason="LAST_ADMIN")
        account = await repo.get_account(uow.session, wallet, for_update=True)
        if account is None:
            raise account_not_found(wallet)
        if revoked in account.roles:
            await repo.set_roles(uow.session, wallet, sorted(set(account.roles) - {revoked}), self._clock())
            account = await repo.get_account(uow.session, wallet)
            assert account is not None
        return account
