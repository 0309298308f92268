"""The inference schema: jobs, the payments they consumed, and the outbox of job events.

A job's input (prompt or chat, sampling, max tokens, stop sequences) is immutable and only ever read
whole, so it is kept as the serialized `far.inference.v1.Job` holding just those fields (`input`); what
changes or is filtered on has columns of its own.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from sqlalchemy import (
    BigInteger,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    SmallInteger,
    Text,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from servers.common.outbox import outbox_table
from servers.common.payments import payment_consumptions_table

SCHEMA = "inference"


class Base(DeclarativeBase):
    metadata = MetaData(schema=SCHEMA)


class JobRow(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    owner: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(Text)
    request_id: Mapped[str | None] = mapped_column(Text)
    streamed: Mapped[bool] = mapped_column(default=False)
    """Created by Generate (cancelled when its caller goes away and nobody follows) rather than CreateJob."""
    input: Mapped[bytes] = mapped_column(LargeBinary)
    max_tokens: Mapped[int] = mapped_column(Integer)
    max_prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    """The most prompt tokens the job may use (its quote's, or what the context leaves for a free job)."""
    state: Mapped[int] = mapped_column(SmallInteger)
    node: Mapped[str] = mapped_column(Text, default="")
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    finish_reason: Mapped[int] = mapped_column(SmallInteger, default=0)
    error: Mapped[bytes | None] = mapped_column(LargeBinary)
    """The serialized google.rpc.Status of a failed or cancelled job."""
    output_text: Mapped[str] = mapped_column(Text, default="")
    quote: Mapped[str] = mapped_column(Text, default="")
    chain_id: Mapped[int | None] = mapped_column(BigInteger)
    tx_hash: Mapped[str | None] = mapped_column(Text)
    payment_job_id: Mapped[str | None] = mapped_column(Text)
    payer: Mapped[str | None] = mapped_column(Text)
    amount: Mapped[Decimal | None] = mapped_column(Numeric(78, 0))
    payment_contract: Mapped[str | None] = mapped_column(Text)
    verify_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    start_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    end_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    time_to_first_token_ms: Mapped[int | None] = mapped_column(Integer)

    __table_args__ = (
        # ListJobs: the caller's jobs, newest first.
        Index("jobs_owner_create_time_idx", "owner", "create_time", "id"),
        # AIP-155 retries: one job per (owner, request id).
        Index(
            "jobs_owner_request_id_key",
            "owner",
            "request_id",
            unique=True,
            postgresql_where=text("request_id IS NOT NULL"),
        ),
        # Unfinished jobs per account (TOO_MANY_JOBS) and the sweeper of stale ones.
        Index("jobs_unfinished_idx", "owner", postgresql_where=text("state IN (1, 2)")),
    )


OUTBOX = outbox_table(Base.metadata)
PAYMENTS = payment_consumptions_table(Base.metadata)
