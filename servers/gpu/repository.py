"""All of gpu's node SQL. Functions take the RPC's session and flush; they never commit."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import ColumnElement, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from servers.gpu.models import NodeRow


@dataclass(frozen=True)
class NodeFilter:
    """ListNodes filters; `operator` None means every operator (admins)."""

    states: tuple[int, ...]
    operator: str | None
    region: str = ""
    gpu_model: str = ""
    loaded_model: str = ""
    min_free_memory_bytes: int = 0
    labels: tuple[tuple[str, str], ...] = ()


async def insert_node(session: AsyncSession, row: NodeRow) -> bool:
    """Insert unless the id is taken; returns whether it was inserted."""
    values = {c.key: getattr(row, c.key) for c in NodeRow.__table__.columns}
    values = {k: v for k, v in values.items() if v is not None}
    result = await session.execute(
        insert(NodeRow).values(**values).on_conflict_do_nothing(index_elements=["id"]).returning(NodeRow.id)
    )
    return result.scalar_one_or_none() is not None


async def get_node(session: AsyncSession, node_id: str, *, for_update: bool = False) -> NodeRow | None:
    query = select(NodeRow).where(NodeRow.id == node_id)
    if for_update:
        query = query.with_for_update()
    return (await session.execute(query)).scalar_one_or_none()


async def node_of_token(session: AsyncSession, token_hash: str) -> str | None:
    """The id of the node whose current agent token has this hash."""
    result = await session.execute(select(NodeRow.id).where(NodeRow.token_hash == token_hash))
    return result.scalar_one_or_none()


async def list_nodes(session: AsyncSession, where: NodeFilter, *, after: str | None, limit: int) -> list[NodeRow]:
    """Nodes matching every filter, in id order, after the id `after`."""
    conditions: list[ColumnElement[bool]] = [NodeRow.state.in_(where.states)]
    if where.operator is not None:
        conditions.append(NodeRow.operator == where.operator)
    if where.region:
        conditions.append(NodeRow.region == where.region)
    if where.gpu_model:
        conditions.append(NodeRow.gpu_models.contains([where.gpu_model.lower()]))
    if where.loaded_model:
        conditions.append(NodeRow.ready_models.contains([where.loaded_model]))
    if where.min_free_memory_bytes > 0:
        conditions.append(NodeRow.max_free_memory_bytes >= where.min_free_memory_bytes)
    if where.labels:
        conditions.append(NodeRow.labels.contains(dict(where.labels)))
    if after is not None:
        conditions.append(NodeRow.id > after)
    query = select(NodeRow).where(*conditions).order_by(NodeRow.id).limit(limit)
    return list((await session.execute(query)).scalars())


async def nodes_in_states(session: AsyncSession, states: Sequence[int], *, for_update: bool = False) -> list[NodeRow]:
    """Every node in one of `states` (the sweeper's working set: HEALTHY and DRAINING nodes)."""
    query = select(NodeRow).where(NodeRow.state.in_(states)).order_by(NodeRow.id)
    if for_update:
        query = query.with_for_update(skip_locked=True)
    return list((await session.execute(query)).scalars())
