"""The gpu schema: nodes (registration, state, placement, last report summary), telemetry history, outbox."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import BigInteger, Boolean, DateTime, Index, Integer, MetaData, Numeric, SmallInteger, Text, func
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from servers.common.outbox import outbox_table

SCHEMA = "gpu"


class Base(DeclarativeBase):
    metadata = MetaData(schema=SCHEMA)


class NodeRow(Base):
    __tablename__ = "nodes"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    operator: Mapped[str] = mapped_column(Text, index=True)
    endpoint: Mapped[str] = mapped_column(Text)
    endpoint_tls: Mapped[bool] = mapped_column(Boolean, default=False)
    region: Mapped[str] = mapped_column(Text, default="")
    labels: Mapped[dict[str, str]] = mapped_column(JSONB, default=dict)
    gpus: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, default=list)
    # Lower-cased GPU model names of `gpus`, for the ListNodes filter.
    gpu_models: Mapped[list[str]] = mapped_column(ARRAY(Text), default=list)
    cpu_cores: Mapped[int] = mapped_column(Integer, default=0)
    memory_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    state: Mapped[int] = mapped_column(SmallInteger)
    state_message: Mapped[str] = mapped_column(Text, default="")
    desired_models: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, default=list)
    placement_revision: Mapped[int] = mapped_column(BigInteger, default=0)
    stake_wei: Mapped[Decimal | None] = mapped_column(Numeric(78, 0), nullable=True)
    token_hash: Mapped[str | None] = mapped_column(Text, nullable=True, unique=True)
    drain_deadline: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # The reason given to DrainNode, kept while DRAINING and DRAINED for the agent's drain notice.
    drain_reason: Mapped[str] = mapped_column(Text, default="", server_default="")
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    update_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # The summary of the last accepted report (the full report goes to the telemetry store).
    last_seen_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    loaded_models: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, default=list)
    ready_models: Mapped[list[str]] = mapped_column(ARRAY(Text), default=list)
    max_free_memory_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    agent_version: Mapped[str] = mapped_column(Text, default="")
    triton_version: Mapped[str] = mapped_column(Text, default="")

    __table_args__ = (
        Index("nodes_state_idx", "state"),
        Index("nodes_ready_models_idx", "ready_models", postgresql_using="gin"),
        Index("nodes_labels_idx", "labels", postgresql_using="gin"),
    )


class TelemetryRow(Base):
    """One report's values (series key -> value) in the PostgreSQL telemetry store."""

    __tablename__ = "telemetry"

    node_id: Mapped[str] = mapped_column(Text, primary_key=True)
    time_ms: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    values: Mapped[dict[str, float]] = mapped_column(JSONB)

    __table_args__ = (Index("telemetry_time_idx", "time_ms"),)


OUTBOX = outbox_table(Base.metadata)
