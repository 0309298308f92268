"""The auth schema: accounts with their roles, sessions, and the refresh tokens of each session."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, ForeignKeyConstraint, Index, LargeBinary, MetaData, SmallInteger, Text, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SCHEMA = "auth"


class Base(DeclarativeBase):
    metadata = MetaData(schema=SCHEMA)


class AccountRow(Base):
    """One wallet. `roles` holds the granted roles (far.auth.v1.Role numbers); `user` is implied."""

    __tablename__ = "accounts"

    wallet: Mapped[str] = mapped_column(Text, primary_key=True)
    roles: Mapped[list[int]] = mapped_column(ARRAY(SmallInteger), server_default=text("'{}'"))
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    update_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_sign_in_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index("accounts_create_time_idx", "create_time", "wallet"),
        Index("accounts_roles_idx", "roles", postgresql_using="gin"),
    )


class SessionRow(Base):
    """One SignIn and every token rotated from it. Revoked sessions stay (revoke_time, revoke_reason) for audit."""

    __tablename__ = "sessions"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    wallet: Mapped[str] = mapped_column(Text)
    user_agent: Mapped[str] = mapped_column(Text, server_default="")
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    refresh_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    refresh_expire_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoke_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoke_reason: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        ForeignKeyConstraint(["wallet"], [f"{SCHEMA}.accounts.wallet"], ondelete="CASCADE"),
        Index("sessions_live_idx", "wallet", "create_time", "id", postgresql_where=text("revoke_time IS NULL")),
    )


class RefreshTokenRow(Base):
    """A refresh token (its SHA-256 only) and the access token issued with it.

    The current token of a session has no rotate_time; rotated ones stay until they expire, so that a
    second use is recognised as reuse. `access_token_id` lets a revocation refuse every live access
    token of the session, not only the newest.
    """

    __tablename__ = "refresh_tokens"

    token_hash: Mapped[bytes] = mapped_column(LargeBinary, primary_key=True)
    session_id: Mapped[str] = mapped_column(Text)
    issue_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expire_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    rotate_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    access_token_id: Mapped[str] = mapped_column(Text)
    access_expire_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        ForeignKeyConstraint(["session_id"], [f"{SCHEMA}.sessions.id"], ondelete="CASCADE"),
        Index("refresh_tokens_session_idx", "session_id", "access_expire_time"),
    )
