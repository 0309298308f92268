"""The node registry's rules: registration, visibility, the lifecycle, placement, reports and liveness.

Transport-agnostic: it takes plain values and the caller's Principal, works through the repository inside
the RPC's unit of work, and returns rows. Redis (live state, control notices) is touched only by
`announce`, which the caller runs after the commit. Field paths in errors are the contract's.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from enum import IntEnum

from servers.common.auth import Principal
from servers.common.db import UnitOfWork
from servers.common.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from servers.common.names import parse_name
from servers.common.pagination import PageTokens, page_size
from servers.common.validation import Violations, normalize_wallet
from servers.gpu import repository as repo
from servers.gpu.control import DEREGISTERED, DRAIN, OPENED, PLACEMENT, ControlHub
from servers.gpu.live import LiveState
from servers.gpu.models import NodeRow
from servers.gpu.registration import NONCE, NonceRegistry, RegistrationProof, new_agent_token, nonce_reused, token_hash
from servers.gpu.registration import verify_proof as verify_registration
from servers.gpu.reports import LOADING, READY, ReportSummary
from servers.gpu.settings import GpuSettings
from servers.gpu.stake import StakeGate

NODE = "nodes/{node}"
NODES_TOPIC = "gpu.nodes"  # every committed change of a node, as the Node message
UPDATABLE_NODE_FIELDS = frozenset({"region", "labels"})
REGION = re.compile(r"^[a-z][a-z0-9-]{0,62}\Z")
LABEL_KEY = re.compile(r"^[a-z0-9_.-]{1,63}\Z")
MODEL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}\Z")
ENDPOINT = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?):[0-9]{1,5}\Z")
SIGNATURE = re.compile(r"^0x[0-9a-fA-F]{130}\Z")
MAX_LABELS = 32
MAX_PLACEMENT = 64
DEFAULT_GRACE = timedelta(minutes=10)
MAX_GRACE = timedelta(hours=1)


class State(IntEnum):
    REGISTERING = 1
    HEALTHY = 2
    UNHEALTHY = 3
    DRAINING = 4
    DRAINED = 5
    DEREGISTERED = 6


LISTED_BY_DEFAULT = tuple(s for s in State if s != State.DEREGISTERED)


@dataclass(frozen=True)
class Inventory:
    """What a registration declares about the node."""

    endpoint: str
    endpoint_tls: bool = False
    region: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    gpus: tuple[tuple[str, int, int], ...] = ()  # (model name, memory bytes, count)
    cpu_cores: int = 0
    memory_bytes: int = 0


@dataclass(frozen=True)
class NodeListQuery:
    page_size: int = 0
    page_token: str = ""
    states: tuple[int, ...] = ()
    operator: str = ""
    region: str = ""
    gpu_model: str = ""
    loaded_model: str = ""
    min_free_memory_bytes: int = 0
    labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class Placement:
    model: str
    version: int = 0


@dataclass(frozen=True)
class Change:
    """A node after a command, whether the command changed it, and the notice its stream should get."""

    row: NodeRow
    changed: bool
    notice: str = ""


def etag_of(row: NodeRow) -> str:
    content = [row.id, row.operator, row.endpoint, row.endpoint_tls, row.region, row.labels]
    content += [row.desired_models, row.placement_revision, row.token_hash]
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:20]


def node_id_of(name: str, field: str = "name") -> str:
    return parse_name(NODE, name, field=field)["node"]


def desired_of(row: NodeRow) -> list[Placement]:
    return [Placement(str(m["model"]), int(m["version"])) for m in row.desired_models]


def placement_delta(row: NodeRow) -> tuple[list[Placement], list[Placement]]:
    """(load, unload): desired versions not READY in the last report; loaded versions not desired."""
    desired = desired_of(row)
    loaded = [(str(m["model"]), int(m["version"]), int(m["state"])) for m in row.loaded_models]
    ready = {(model, version) for model, version, state in loaded if state == READY}
    load = [
        p
        for p in desired
        if not any(model == p.model and (p.version == 0 or version == p.version) for model, version in ready)
    ]
    wanted = {(p.model, p.version) for p in desired}
    unload = [
        Placement(model, version)
        for model, version, state in loaded
        if state in (LOADING, READY) and (model, version) not in wanted and (model, 0) not in wanted
    ]
    return load, unload


def _heard_since(row: NodeRow, since: datetime) -> bool:
    """Whether the row's last accepted report came at or after `since`."""
    return row.last_seen_time is not None and row.last_seen_time >= since


def _validate_labels(labels: Sequence[tuple[str, str]], field: str, v: Violations) -> None:
    if len(labels) > MAX_LABELS:
        v.add(field, f"at most {MAX_LABELS} labels")
    for key, value in labels:
        if not LABEL_KEY.match(key):
            v.add(f"{field}[{key}]", "keys are 1-63 lower-case letters, digits, '_', '-' or '.'")
        if len(value) > 255:
            v.add(f"{field}[{key}]", "values are at most 255 characters")


def _validate_inventory(inventory: Inventory, v: Violations) -> None:
    if v.require(inventory.endpoint, "node.endpoint") and (
        len(inventory.endpoint) > 255 or not ENDPOINT.match(inventory.endpoint)
    ):
        v.add("node.endpoint", "must be host:port (IPv6 in brackets), at most 255 characters")
    if inventory.region and not REGION.match(inventory.region):
        v.add("node.region", "must be 1-63 lower-case letters, digits or hyphens, starting with a letter")
    _validate_labels(inventory.labels, "node.labels", v)
    for index, (model_name, memory, count) in enumerate(inventory.gpus):
        if not 1 <= len(model_name) <= 255:
            v.add(f"node.gpus[{index}].model_name", "must be 1-255 characters")
        if memory <= 0:
            v.add(f"node.gpus[{index}].memory_bytes", "must be positive")
        if not 1 <= count <= 64:
            v.add(f"node.gpus[{index}].count", "must be 1-64")
    if not 0 <= inventory.cpu_cores <= 4096:
        v.add("node.cpu_cores", "must be 1-4096")
    if inventory.memory_bytes < 0:
        v.add("node.memory_bytes", "must not be negative")


class Registry:
    def __init__(
        self,
        settings: GpuSettings,
        page_tokens: PageTokens,
        nonces: NonceRegistry,
        live: LiveState,
        control: ControlHub,
        stake: StakeGate | None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._settings = settings
        self._page_tokens = page_tokens
        self._nonces = nonces
        self._live = live
        self._control = control
        self._stake = stake
        self._clock = clock

    # --- registration --------------------------------------------------------------------------

    async def register(
        self, uow: UnitOfWork, node_id: str, inventory: Inventory, proof: RegistrationProof
    ) -> tuple[Change, str]:
        """The node (new or registered again) and its fresh agent token."""
        v = Violations()
        if v.require(node_id, "node_id"):
            v.check_resource_id(node_id, "node_id")
        _validate_inventory(inventory, v)
        operator = proof.operator.strip().lower()
        if v.require(operator, "operator"):
            try:
                operator = normalize_wallet(operator, "operator")
            except InvalidArgument:
                v.add("operator", "must be a 0x-prefixed 20-byte hex address")
        if v.require(proof.nonce, "nonce") and not NONCE.match(proof.nonce):
            v.add("nonce", "must be 16-64 letters and digits")
        if v.require(proof.signature, "signature") and not SIGNATURE.match(proof.signature):
            v.add("signature", "must be 0x and 130 hex digits")
        v.require(proof.chain_id, "chain_id")
        v.raise_if_any()
        if self._settings.operator_allowlist and operator not in self._settings.operator_allowlist:
            raise PermissionDenied("this wallet may not operate nodes on the platform", reason="OPERATOR_NOT_ALLOWED")
        verify_registration(proof, chain_id=self._settings.chain_id, now=self._clock())
        if await self._nonces.was_used(operator, proof.nonce):
            raise nonce_reused()
        stake = None if self._stake is None else await self._stake.require(operator)
        await self._nonces.consume(operator, proof.nonce, ttl=proof.expire_time - self._clock())
        token = new_agent_token()
        row = await repo.get_node(uow.session, node_id, for_update=True)
        now = self._clock()
        if row is None:
            row = NodeRow(
                id=node_id,
                operator=operator,
                labels=dict(inventory.labels),
                state=State.REGISTERING,
                state_message="",
                drain_reason="",
                desired_models=[],
                placement_revision=0,
                create_time=now,
                loaded_models=[],
                ready_models=[],
                agent_version="",
                triton_version="",
            )
            self._apply_inventory(row, inventory, stake, token, now)
            if not await repo.insert_node(uow.session, row):
                raise AlreadyExists(f"the node id {node_id} is taken", reason="NODE_ALREADY_EXISTS")
            return Change(row, True), token
        if row.operator != operator:
            raise AlreadyExists(f"the node id {node_id} belongs to another operator", reason="NODE_ALREADY_EXISTS")
        self._apply_inventory(row, inventory, stake, token, now)
        if row.state == State.DEREGISTERED:
            row.state, row.state_message = State.REGISTERING, ""
        await uow.session.flush()
        return Change(row, True, OPENED), token

    @staticmethod
    def _apply_inventory(row: NodeRow, inventory: Inventory, stake: int | None, token: str, now: datetime) -> None:
        row.endpoint = inventory.endpoint
        row.endpoint_tls = inventory.endpoint_tls
        if inventory.region:
            row.region = inventory.region
        elif row.region is None:
            row.region = ""
        row.gpus = [{"model_name": m, "memory_bytes": b, "count": c} for m, b, c in inventory.gpus]
        row.gpu_models = sorted({m.lower() for m, _, _ in inventory.gpus})
        row.cpu_cores = inventory.cpu_cores
        row.memory_bytes = inventory.memory_bytes
        row.stake_wei = None if stake is None else Decimal(stake)
        row.token_hash = token_hash(token)
        row.update_time = now

    # --- reads ---------------------------------------------------------------------------------

    async def get(self, uow: UnitOfWork, principal: Principal, name: str, *, for_update: bool = False) -> NodeRow:
        """The node if the caller operates it or is an admin; NOT_FOUND (`NODE_NOT_FOUND`) otherwise."""
        node_id = node_id_of(name)
        row = await repo.get_node(uow.session, node_id, for_update=for_update)
        if row is None or not (principal.is_admin or row.operator == principal.subject):
            raise NotFound(f"no node {name}", reason="NODE_NOT_FOUND")
        return row

    async def list_nodes(
        self, uow: UnitOfWork, principal: Principal, query: NodeListQuery
    ) -> tuple[list[NodeRow], str]:
        size = page_size(query.page_size)
        v = Violations()
        for index, state in enumerate(query.states):
            if state not in State.__members__.values():
                v.add(f"states[{index}]", "is not a node state")
        operator = query.operator.strip().lower()
        if operator:
            try:
                operator = normalize_wallet(operator, "operator")
            except InvalidArgument:
                v.add("operator", "must be a 0x-prefixed 20-byte hex address")
        if query.min_free_memory_bytes < 0:
            v.add("min_free_memory_bytes", "must not be negative")
        if len(query.labels) > 10:
            v.add("labels", "at most 10")
        labels = []
        for index, item in enumerate(query.labels):
            key, sep, value = item.partition("=")
            if not sep or not LABEL_KEY.match(key):
                v.add(f"labels[{index}]", "must be key=value")
            labels.append((key, value))
        v.raise_if_any()
        if not principal.is_admin:
            operator = principal.subject
        states = tuple(sorted(set(query.states))) or tuple(int(s) for s in LISTED_BY_DEFAULT)
        where = repo.NodeFilter(
            states=states,
            operator=operator or None,
            region=query.region,
            gpu_model=query.gpu_model,
            loaded_model=query.loaded_model,
            min_free_memory_bytes=query.min_free_memory_bytes,
            labels=tuple(sorted(labels)),
        )
        scope = PageTokens.scope("nodes", where, principal.subject)
        cursor = self._page_tokens.decode(query.page_token, scope=scope)
        after = str(cursor["id"]) if cursor else None
        rows = await repo.list_nodes(uow.session, where, after=after, limit=size + 1)
        token = ""
        if len(rows) > size:
            rows = rows[:size]
            token = self._page_tokens.encode({"id": rows[-1].id}, scope=scope)
        return rows, token

    # --- operator commands ---------------------------------------------------------------------

    async def _writable(self, uow: UnitOfWork, principal: Principal, name: str, etag: str = "") -> NodeRow:
        row = await self.get(uow, principal, name, for_update=True)
        if row.state == State.DEREGISTERED:
            raise FailedPrecondition(f"{name} is deregistered", reason="NODE_DEREGISTERED")
        if etag and etag != etag_of(row):
            raise Aborted("the node changed since it was read (etag mismatch)", reason="ETAG_MISMATCH")
        return row

    async def update(
        self,
        uow: UnitOfWork,
        principal: Principal,
        name: str,
        region: str,
        labels: Sequence[tuple[str, str]],
        paths: set[str],
        etag: str,
    ) -> Change:
        v = Violations()
        if "region" in paths and region and not REGION.match(region):
            v.add("node.region", "must be 1-63 lower-case letters, digits or hyphens, starting with a letter")
        if "labels" in paths:
            _validate_labels(labels, "node.labels", v)
        v.raise_if_any()
        row = await self._writable(uow, principal, name, etag)
        before = etag_of(row)
        if "region" in paths:
            row.region = region
        if "labels" in paths:
            row.labels = dict(labels)
        if etag_of(row) == before:
            return Change(row, False)
        row.update_time = self._clock()
        await uow.session.flush()
        return Change(row, True)

    async def drain(
        self, uow: UnitOfWork, principal: Principal, name: str, reason: str, grace: timedelta | None
    ) -> Change:
        if len(reason) > 500:
            raise InvalidArgument.field("reason", "must be at most 500 characters")
        if grace is not None and not timedelta() <= grace <= MAX_GRACE:
            raise InvalidArgument.field("grace_period", "must be between 0 and 1 hour")
        row = await self._writable(uow, principal, name)
        if row.state in (State.DRAINING, State.DRAINED):
            return Change(row, False)
        now = self._clock()
        row.state = State.DRAINING
        row.state_message = row.drain_reason = reason or "drained by the operator"
        row.drain_deadline = now + (DEFAULT_GRACE if grace is None else grace)
        row.update_time = now
        if grace == timedelta() or not self._busy(row):
            self._set_drained(row, now)
        await uow.session.flush()
        return Change(row, True, DRAIN)

    async def resume(self, uow: UnitOfWork, principal: Principal, name: str) -> Change:
        row = await self._writable(uow, principal, name)
        if row.state not in (State.DRAINING, State.DRAINED):
            raise FailedPrecondition(f"{name} is not draining or drained", reason="NODE_NOT_DRAINING")
        health = await self._live.live_health([row.id])
        if health.get(row.id):
            row.state, row.state_message = State.HEALTHY, ""
        else:
            row.state = State.UNHEALTHY
            row.state_message = "no recent healthy telemetry report"
        row.drain_deadline, row.drain_reason = None, ""
        row.update_time = self._clock()
        await uow.session.flush()
        return Change(row, True)

    async def deregister(self, uow: UnitOfWork, principal: Principal, name: str, *, force: bool) -> Change:
        row = await self.get(uow, principal, name, for_update=True)
        if row.state == State.DEREGISTERED:
            return Change(row, False)
        if row.state != State.DRAINED and not force:
            raise FailedPrecondition(
                f"{name} is not drained; drain it first or deregister with force", reason="NODE_NOT_DRAINED"
            )
        row.state, row.state_message = State.DEREGISTERED, ""
        row.token_hash = None
        row.drain_deadline, row.drain_reason = None, ""
        row.update_time = self._clock()
        await uow.session.flush()
        return Change(row, True, DEREGISTERED)

    async def set_placement(
        self, uow: UnitOfWork, principal: Principal, name: str, models: Sequence[Placement], etag: str
    ) -> Change:
        v = Violations()
        if len(models) > MAX_PLACEMENT:
            v.add("models", f"at most {MAX_PLACEMENT} models")
        seen: set[str] = set()
        for index, placement in enumerate(models):
            if not MODEL_NAME.match(placement.model):
                v.add(f"models[{index}].model", "must be 1-128 letters, digits, '_', '-' or '.'")
            if placement.version < 0:
                v.add(f"models[{index}].version", "must not be negative")
            if placement.model in seen:
                v.add(f"models[{index}].model", "is listed twice")
            seen.add(placement.model)
        v.raise_if_any()
        row = await self._writable(uow, principal, name, etag)
        # Sent again even when the set is unchanged: the agent converges on it (an explicit empty set
        # unloads what Triton was started with, which revision 0 leaves alone).
        row.desired_models = [{"model": p.model, "version": p.version} for p in models]
        row.placement_revision += 1
        row.update_time = self._clock()
        await uow.session.flush()
        return Change(row, True, PLACEMENT)

    async def announce(self, change: Change) -> None:
        """After the commit: refresh the node's live fields and notify its telemetry stream."""
        if not change.changed:
            return
        await self._live.write_node(change.row)
        if change.row.state == State.DEREGISTERED:
            await self._live.forget(change.row.id, change.row.ready_models)
        if change.notice == OPENED:  # registered again: the old token's streams end as SUPERSEDED
            seq = await self._control.next_stream_seq(change.row.id)
            await self._control.send(change.row.id, OPENED, stream_seq=seq)
        elif change.notice:
            await self._control.send(change.row.id, change.notice)

    # --- the agent's side ----------------------------------------------------------------------

    async def node_of_token(self, uow: UnitOfWork, token: str) -> str | None:
        return await repo.node_of_token(uow.session, token_hash(token))

    async def streamed_node(self, uow: UnitOfWork, node_id: str) -> NodeRow:
        row = await repo.get_node(uow.session, node_id)
        if row is None or row.state == State.DEREGISTERED:
            raise FailedPrecondition(f"nodes/{node_id} is deregistered", reason="NODE_DEREGISTERED")
        return row

    async def record_report(self, uow: UnitOfWork, node_id: str, summary: ReportSummary) -> tuple[Change, list[str]]:
        """Apply an accepted report; returns the change and the models the previous report had READY."""
        row = await repo.get_node(uow.session, node_id, for_update=True)
        if row is None or row.state == State.DEREGISTERED:
            raise FailedPrecondition(f"nodes/{node_id} is deregistered", reason="NODE_DEREGISTERED")
        previously_ready = list(row.ready_models)
        row.last_seen_time = summary.received_time
        row.loaded_models = summary.loaded_models
        row.ready_models = summary.ready_model_names
        row.max_free_memory_bytes = summary.max_free_memory_bytes
        row.agent_version = summary.agent_version
        row.triton_version = summary.triton_version
        if summary.gpus:
            row.gpus = summary.gpus
            row.gpu_models = sorted({str(g["model_name"]).lower() for g in summary.gpus})
        state = (row.state, row.state_message)
        if row.state in (State.REGISTERING, State.UNHEALTHY, State.HEALTHY) and summary.healthy:
            row.state, row.state_message = State.HEALTHY, ""
        elif row.state in (State.HEALTHY, State.UNHEALTHY) and not summary.healthy:
            row.state, row.state_message = State.UNHEALTHY, summary.problem
        elif row.state == State.DRAINING and not summary.busy:
            self._set_drained(row, summary.received_time)
        changed = (row.state, row.state_message) != state
        if changed:
            row.update_time = summary.received_time
        await uow.session.flush()
        return Change(row, changed), previously_ready

    # --- liveness ------------------------------------------------------------------------------

    async def sweep(self, uow: UnitOfWork) -> list[Change]:
        """HEALTHY nodes without a live report become UNHEALTHY; DRAINING nodes past their deadline DRAINED.

        A report commits its row before its live key is written, so a sweep between the two finds a HEALTHY row
        and no key: a node is silent only when its row's last report is also older than the liveness window."""
        rows = await repo.nodes_in_states(uow.session, [State.HEALTHY, State.DRAINING], for_update=True)
        health = await self._live.live_health([row.id for row in rows if row.state == State.HEALTHY])
        now = self._clock()
        heard_since = now - timedelta(seconds=self._settings.liveness_ttl_s)
        changes = []
        for row in rows:
            if row.state == State.HEALTHY and row.id not in health and not _heard_since(row, heard_since):
                row.state = State.UNHEALTHY
                row.state_message = f"no telemetry report for {self._settings.liveness_ttl_s:g} seconds"
            elif row.state == State.DRAINING and row.drain_deadline is not None and row.drain_deadline <= now:
                self._set_drained(row, now)
            else:
                continue
            row.update_time = now
            changes.append(Change(row, True))
        await uow.session.flush()
        return changes

    @staticmethod
    def _busy(row: NodeRow) -> bool:
        return any(
            int(m.get("state", 0)) == READY and (m.get("active", 0) or m.get("pending", 0)) for m in row.loaded_models
        )

    @staticmethod
    def _set_drained(row: NodeRow, now: datetime) -> None:
        row.state, row.state_message = State.DRAINED, ""
        row.drain_deadline = None
        row.update_time = now
