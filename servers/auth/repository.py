"""All of auth's SQL. Functions take the RPC's session and flush; they never commit."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ColumnElement, delete, func, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from servers.auth.models import AccountRow, RefreshTokenRow, SessionRow

# Accounts


async def get_account(session: AsyncSession, wallet: str, *, for_update: bool = False) -> AccountRow | None:
    query = select(AccountRow).where(AccountRow.wallet == wallet).execution_options(populate_existing=True)
    if for_update:
        query = query.with_for_update()
    return (await session.execute(query)).scalar_one_or_none()


async def insert_account(session: AsyncSession, wallet: str, now: datetime) -> None:
    """Create the account unless it exists (a concurrent first sign-in or grant may have made it)."""
    await session.execute(
        insert(AccountRow)
        .values(wallet=wallet, roles=[], create_time=now, update_time=now)
        .on_conflict_do_nothing(index_elements=["wallet"])
    )


async def set_roles(session: AsyncSession, wallet: str, roles: list[int], now: datetime) -> None:
    await session.execute(update(AccountRow).where(AccountRow.wallet == wallet).values(roles=roles, update_time=now))


async def set_last_sign_in(session: AsyncSession, wallet: str, now: datetime) -> None:
    await session.execute(update(AccountRow).where(AccountRow.wallet == wallet).values(last_sign_in_time=now))


async def lock_holders(session: AsyncSession, role: int) -> list[str]:
    """The wallets holding `role`, locked until the transaction ends (serializes last-admin checks)."""
    result = await session.execute(
        select(AccountRow.wallet).where(AccountRow.roles.contains([role])).order_by(AccountRow.wallet).with_for_update()
    )
    return list(result.scalars())


async def list_accounts(
    session: AsyncSession, *, role: int | None, after: tuple[datetime, str] | None, limit: int
) -> list[AccountRow]:
    """Accounts newest first (create_time, then wallet, descending), after the keyset cursor `after`."""
    conditions: list[ColumnElement[bool]] = []
    if role is not None:
        conditions.append(AccountRow.roles.contains([role]))
    if after is not None:
        conditions.append(tuple_(AccountRow.create_time, AccountRow.wallet) < tuple_(*after))
    result = await session.execute(
        select(AccountRow)
        .where(*conditions)
        .order_by(AccountRow.create_time.desc(), AccountRow.wallet.desc())
        .limit(limit)
    )
    return list(result.scalars())


# Sessions


async def insert_session(session: AsyncSession, row: SessionRow) -> None:
    session.add(row)
    await session.flush()


async def get_session(session: AsyncSession, session_id: str, *, for_update: bool = False) -> SessionRow | None:
    query = select(SessionRow).where(SessionRow.id == session_id).execution_options(populate_existing=True)
    if for_update:
        query = query.with_for_update()
    return (await session.execute(query)).scalar_one_or_none()


async def list_live_sessions(
    session: AsyncSession, wallet: str, *, now: datetime, after: tuple[datetime, str] | None, limit: int
) -> list[SessionRow]:
    """Sessions neither revoked nor expired, newest first, after the keyset cursor `after` (create_time, id)."""
    conditions = [SessionRow.wallet == wallet, SessionRow.revoke_time.is_(None), SessionRow.refresh_expire_time > now]
    if after is not None:
        conditions.append(tuple_(SessionRow.create_time, SessionRow.id) < tuple_(*after))
    result = await session.execute(
        select(SessionRow).where(*conditions).order_by(SessionRow.create_time.desc(), SessionRow.id.desc()).limit(limit)
    )
    return list(result.scalars())


async def rotate_session(
    session: AsyncSession, session_id: str, *, now: datetime, refresh_expire_time: datetime
) -> None:
    await session.execute(
        update(SessionRow)
        .where(SessionRow.id == session_id)
        .values(refresh_time=now, refresh_expire_time=refresh_expire_time)
    )


async def revoke_session(session: AsyncSession, session_id: str, *, now: datetime, reason: str) -> bool:
    """Mark the session revoked; False when it already was."""
    result = await session.execute(
        update(SessionRow)
        .where(SessionRow.id == session_id, SessionRow.revoke_time.is_(None))
        .values(revoke_time=now, revoke_reason=reason)
        .returning(SessionRow.id)
    )
    return result.scalar_one_or_none() is not None


# Refresh tokens


async def insert_refresh_token(session: AsyncSession, row: RefreshTokenRow) -> None:
    session.add(row)
    await session.flush()


async def get_refresh_token(
    session: AsyncSession, token_hash: bytes, *, for_update: bool = False
) -> RefreshTokenRow | None:
    """The token with this hash. Locked, the row read is the latest committed one (a racing rotation shows)."""
    query = (
        select(RefreshTokenRow)
        .where(RefreshTokenRow.token_hash == token_hash)
        .execution_options(populate_existing=True)
    )
    if for_update:
        query = query.with_for_update()
    return (await session.execute(query)).scalar_one_or_none()


async def mark_rotated(session: AsyncSession, token_hash: bytes, now: datetime) -> None:
    await session.execute(
        update(RefreshTokenRow).where(RefreshTokenRow.token_hash == token_hash).values(rotate_time=now)
    )


async def live_access_tokens(session: AsyncSession, session_id: str, now: datetime) -> list[tuple[str, datetime]]:
    """(token id, expiry) of every access token of the session that has not expired yet."""
    result = await session.execute(
        select(RefreshTokenRow.access_token_id, RefreshTokenRow.access_expire_time).where(
            RefreshTokenRow.session_id == session_id, RefreshTokenRow.access_expire_time > now
        )
    )
    return [(token_id, expires) for token_id, expires in result]


async def delete_expired_refresh_tokens(session: AsyncSession, session_id: str, now: datetime) -> None:
    """Forget rotated tokens of the session that have expired: they can no longer be presented as reuse."""
    await session.execute(
        delete(RefreshTokenRow).where(
            RefreshTokenRow.session_id == session_id,
            RefreshTokenRow.rotate_time.is_not(None),
            RefreshTokenRow.expire_time <= now,
            RefreshTokenRow.access_expire_time <= now,
        )
    )


async def now(session: AsyncSession) -> datetime:
    """The transaction's timestamp from PostgreSQL."""
    value: datetime = (await session.execute(select(func.now()))).scalar_one()
    return value
