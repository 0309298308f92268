"""The jobs this replica runs: slots per model, dispatch from the admission queue, cancellation, bookkeeping.

A job runs in a task of its own: it is marked RUNNING, streams from a node (`executor.execute`), and every
piece goes to the job's token stream (in the background, `TokenWriter`) and to a local listener when the
caller that created the job is on this replica (the fast path: no Redis hop between the node and that
caller). Whatever ends the job (the model, an error, a cancel) the ending is written once: the row, the
job event (outbox), the End entry of the token stream, the account's admission count, the slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import structlog
from far.inference.v1 import inference_service_pb2, job_pb2
from google.rpc import code_pb2, error_details_pb2

from servers.common.db import Database
from servers.common.errors import DomainError, FailedPrecondition, InvalidArgument, Unavailable
from servers.inference import convert, metrics, repository
from servers.inference.admission import Admission
from servers.inference.catalog import ModelSpec
from servers.inference.executor import Clients, Outcome, count, error_status, execute
from servers.inference.jobs import JOBS_TOPIC
from servers.inference.models import JobRow
from servers.inference.nodes import NodeDirectory, NodeInfo
from servers.inference.requests import generation_from
from servers.inference.sweeper import JobHeartbeats
from servers.inference.token_stream import Delta, TokenStreams, TokenWriter
from servers.inference.triton_stream import Generation, Piece

log = structlog.get_logger("far.inference.runner")

Listener = Callable[[Piece | inference_service_pb2.GenerateEnd], None]


@dataclass
class _Running:
    listeners: list[Listener] = field(default_factory=list)
    cancel_reason: str = "JOB_CANCELLED"
    task: asyncio.Task[None] | None = None


class Slots:
    """How many jobs of one model this replica may run at once: a semaphore with a non-blocking take."""

    def __init__(self, size: int) -> None:
        self.free = size
        self._changed = asyncio.Event()

    def try_take(self) -> bool:
        if self.free <= 0:
            return False
        self.free -= 1
        return True

    async def wait_free(self) -> None:
        """Until a slot is free (not taking it: the fast path of a caller on this replica may take it first)."""
        while self.free <= 0:
            self._changed.clear()
            await self._changed.wait()

    async def take(self) -> None:
        while not self.try_take():
            self._changed.clear()
            await self._changed.wait()

    def give(self) -> None:
        self.free += 1
        self._changed.set()


def end_message(row_state: int, outcome: Outcome, ttft_ms: int | None) -> inference_service_pb2.GenerateEnd:
    end = inference_service_pb2.GenerateEnd(state=job_pb2.Job.State.ValueType(row_state))
    end.finish_reason = job_pb2.FinishReason.ValueType(outcome.finish_reason)
    end.usage.prompt_tokens = outcome.prompt_tokens
    end.usage.completion_tokens = outcome.completion_tokens
    end.usage.total_tokens = outcome.prompt_tokens + outcome.completion_tokens
    if ttft_ms is not None:
        end.time_to_first_token.FromMilliseconds(ttft_ms)
    if outcome.error is not None:
        end.error.CopyFrom(outcome.error)
    end.next_offset = outcome.completion_tokens
    return end


class Runner:
    def __init__(
        self,
        database: Database,
        admission: Admission,
        streams: TokenStreams,
        directory: NodeDirectory,
        clients: Clients,
        *,
        slots_per_model: int = 4,
        heartbeats: JobHeartbeats | None = None,
    ) -> None:
        self._db = database
        self._admission = admission
        self._streams = streams
        self._directory = directory
        self._clients = clients
        self._slots: dict[str, Slots] = defaultdict(lambda: Slots(slots_per_model))
        self._running: dict[str, _Running] = {}
        self._heartbeats = heartbeats

    def try_reserve(self, model: ModelSpec) -> bool:
        """Take a local slot for `model` now if one is free (then `start` must follow, or `unreserve`)."""
        return self._slots[model.id].try_take()

    def unreserve(self, model: ModelSpec) -> None:
        self._slots[model.id].give()

    def is_running(self, job_id: str) -> bool:
        return job_id in self._running

    def start(
        self,
        job_id: str,
        owner: str,
        model: ModelSpec,
        generation: Generation,
        listener: Listener | None = None,
        *,
        gate: asyncio.Future[JobRow] | None = None,
        accepted: asyncio.Future[int] | None = None,
        arrived: float | None = None,
    ) -> None:
        """Run the job in a task (a slot must be reserved for it, and the id must not run here already:
        `is_running`).

        With a `gate`, generation starts now but nothing is written or delivered until the gate is set: the
        caller creates the job (payment, row; inserted RUNNING) meanwhile and sets the gate with its row. A
        gate set with an exception cancels the generation
        and leaves no trace (the job does not exist). `accepted` resolves with the prompt's token count once the
        model took the prompt, or fails with the domain error that stopped it first (PROMPT_TOO_LONG, no node).
        `arrived` (`time.monotonic()` when the call came in) times the platform's work before the model.
        """
        running = _Running(listeners=[listener] if listener is not None else [])
        self._running[job_id] = running
        running.task = asyncio.create_task(
            self._run(job_id, owner, model, generation, running, gate, accepted, arrived), name=f"job:{job_id}"
        )

    async def count_prompt(self, model: ModelSpec, generation: Generation) -> int:
        """The prompt's length on a node's tokenizer, refused with PROMPT_TOO_LONG past the generation's
        `max_prompt_tokens` (`executor.count`): for jobs whose payment is consumed before a node sees them."""
        return await count(self._directory, self._clients, model.served_as, generation)

    def _forget(self, job_id: str, running: _Running) -> None:
        """Drop the job's entry if it is still this run's (a call that queued after an optimistic start may
        have the same job started again meanwhile)."""
        if self._running.get(job_id) is running:
            del self._running[job_id]

    def node_for(self, model: ModelSpec) -> str:
        """The node a job of `model` starting now is placed on, as the job row records it."""
        node = self._directory.pick(model.served_as)
        return node.name if node else ""

    def cancel(self, job_id: str, reason: str = "JOB_CANCELLED") -> asyncio.Task[None] | None:
        """Cancel a job running here: its task (done once the ending is written), or None when it does not run
        on this replica."""
        running = self._running.get(job_id)
        if running is None or running.task is None:
            return None
        running.cancel_reason = reason
        running.task.cancel()
        return running.task

    async def dispatch(self, model: ModelSpec, consumer: str) -> None:
        """Take jobs of `model` from the admission queue whenever a local slot is free; runs until cancelled."""
        await self._admission.ensure_group(model.served_as)
        slots = self._slots[model.id]
        while True:
            await slots.wait_free()
            try:
                # Short blocks: redis-py 7 gives every read a 5 s socket timeout, blocking ones included.
                ticket = await self._admission.read(model.served_as, consumer, block_ms=1_000)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # Redis away: wait and try again, the queue is still there
                log.warning("dispatch failed", model=model.id, error=str(error))
                await asyncio.sleep(1.0)
                continue
            if ticket is None:
                continue
            # The slot may have gone to a caller's fast path meanwhile: the job waits (still queued) for one.
            await slots.take()
            if not await self._admission.claim(ticket):  # cancelled while it waited
                slots.give()
                continue
            row = await self._queued_row(ticket.job)
            if row is None or row.state != job_pb2.Job.STATE_QUEUED:
                slots.give()
                continue
            generation = generation_from(job_pb2.Job.FromString(row.input))
            self.start(ticket.job, row.owner, model, replace(generation, max_prompt_tokens=row.max_prompt_tokens))

    async def _queued_row(self, job_id: str, *, wait_s: float = 5.0) -> JobRow | None:
        """The job's row. A job is queued just before the transaction that inserts it commits, so a
        dispatcher can see the entry first: wait a little for the row (None if its creation failed)."""
        deadline = time.monotonic() + wait_s
        while True:
            async with self._db.read() as uow:
                row = await repository.get_job(uow.session, job_id)
            if row is not None or time.monotonic() > deadline:
                return row
            await asyncio.sleep(0.02)

    async def _run(
        self,
        job_id: str,
        owner: str,
        model: ModelSpec,
        generation: Generation,
        running: _Running,
        gate: asyncio.Future[JobRow] | None,
        accepted: asyncio.Future[int] | None = None,
        arrived: float | None = None,
    ) -> None:
        writer: TokenWriter | None = None
        beating: asyncio.Task[None] | None = None
        held: list[Piece] = []  # pieces that came before the gate opened
        outcome = Outcome(state=job_pb2.Job.STATE_RUNNING, finish_reason=job_pb2.FINISH_REASON_UNSPECIFIED)
        first_token_wall: float | None = None
        last_token_wall = 0.0
        sent_at = 0.0  # time.monotonic() when the job's Triton request went out
        create_time: datetime | None = None

        def deliver(piece: Piece) -> None:
            assert writer is not None
            writer.push(Delta(piece.text, piece.offset, piece.token_count))
            for listener in running.listeners:
                listener(piece)

        def on_piece(piece: Piece) -> None:
            nonlocal first_token_wall, last_token_wall
            last_token_wall = time.time()
            if first_token_wall is None:
                first_token_wall = last_token_wall
                metrics.MODEL_TIME_TO_FIRST_TOKEN.labels(model.id).observe(time.monotonic() - sent_at)
            outcome.text.append(piece.text)
            outcome.completion_tokens = piece.offset + piece.token_count
            if accepted is not None and not accepted.done():  # a model that does not announce acceptance
                accepted.set_result(0)
            if writer is None:
                held.append(piece)
            else:
                deliver(piece)

        def on_node(node: NodeInfo) -> None:
            nonlocal arrived, sent_at
            sent_at = time.monotonic()  # each node's try: the model's own time runs from its request
            if arrived is not None:  # the first node only: a failover's retry is not the platform's delay
                metrics.TIME_TO_MODEL.labels(model.id).observe(time.monotonic() - arrived)
                arrived = None

        def accept(prompt_tokens: int) -> None:
            if accepted is not None and not accepted.done():
                accepted.set_result(prompt_tokens)

        generating = asyncio.create_task(
            execute(
                self._directory,
                self._clients,
                model.served_as,
                generation,
                job_id=job_id,
                on_piece=on_piece,
                on_node=on_node,
                on_accepted=accept,
            ),
            name=f"generate:{job_id}",
        )
        if accepted is not None:
            generating.add_done_callback(lambda done: _settle(accepted, done))
        try:
            started: JobRow | None = None
            if gate is not None:
                try:
                    started = await gate
                except BaseException:  # the job was never created: stop the model, leave no trace
                    self._forget(job_id, running)  # at once: the call may queue the same job id next
                    generating.cancel()
                    with contextlib.suppress(BaseException):
                        await generating
                    self._slots[model.id].give()
                    return
            writer = TokenWriter(self._streams, job_id)
            if self._heartbeats is not None:  # so that the stale-job sweeper knows this job is alive
                beating = asyncio.create_task(self._heartbeats.keep(job_id), name=f"heartbeat:{job_id}")
            for piece in held:
                deliver(piece)
            held.clear()
            if started is not None:  # inserted RUNNING by the caller: it never waited
                create_time = started.create_time
                metrics.QUEUE_TIME.labels(model.id).observe(0.0)
            else:
                async with self._db.transaction() as uow:
                    row = await repository.mark_started(
                        uow.session, job_id, node=self.node_for(model), start_time=datetime.now(UTC)
                    )
                    if row is None:  # cancelled while it waited
                        generating.cancel()
                        return
                    create_time = row.create_time
                    if row.start_time is not None:
                        queued_s = (row.start_time - row.create_time).total_seconds()
                        metrics.QUEUE_TIME.labels(model.id).observe(queued_s)
                    uow.publish(JOBS_TOPIC, convert.job(row, with_output=False))
            result = await generating
            result.text = outcome.text
            outcome = result
        except asyncio.CancelledError:
            generating.cancel()
            outcome.state = job_pb2.Job.STATE_CANCELLED
            outcome.finish_reason = job_pb2.FINISH_REASON_CANCELLED
            outcome.error = error_status(code_pb2.CANCELLED, running.cancel_reason, "the job was cancelled")
        except Exception as error:
            generating.cancel()
            log.exception("job failed", job=job_id)
            outcome.state = job_pb2.Job.STATE_FAILED
            outcome.finish_reason = job_pb2.FINISH_REASON_ERROR
            outcome.error = error_status(
                code_pb2.INTERNAL, "GENERATION_FAILED", f"the job failed: {type(error).__name__}"
            )
        finally:
            if beating is not None:
                beating.cancel()
            if writer is not None:
                ttft_ms = (
                    int((first_token_wall - create_time.timestamp()) * 1000)
                    if first_token_wall is not None and create_time is not None
                    else None
                )
                if ttft_ms is not None:
                    metrics.TIME_TO_FIRST_TOKEN.labels(model.id).observe(ttft_ms / 1000)
                if first_token_wall is not None and outcome.completion_tokens > 1:
                    per_token = (last_token_wall - first_token_wall) / (outcome.completion_tokens - 1)
                    metrics.TIME_PER_OUTPUT_TOKEN.labels(model.id).observe(per_token)
                # The ending must be written even when this task is being cancelled.
                await asyncio.shield(self._finish(job_id, owner, model, outcome, ttft_ms, writer, running))

    async def _finish(
        self,
        job_id: str,
        owner: str,
        model: ModelSpec,
        outcome: Outcome,
        ttft_ms: int | None,
        writer: TokenWriter,
        running: _Running,
    ) -> None:
        try:
            state = outcome.state if outcome.state != job_pb2.Job.STATE_RUNNING else job_pb2.Job.STATE_FAILED
            metrics.JOBS_ENDED.labels(model.id, job_pb2.Job.State.Name(job_pb2.Job.State.ValueType(state))).inc()
            metrics.TOKENS.labels(model.id, "prompt").inc(outcome.prompt_tokens)
            metrics.TOKENS.labels(model.id, "completion").inc(outcome.completion_tokens)
            end = end_message(state, outcome, ttft_ms)
            async with self._db.transaction() as uow:
                values = {
                    "state": state,
                    "finish_reason": outcome.finish_reason,
                    "prompt_tokens": outcome.prompt_tokens,
                    "completion_tokens": outcome.completion_tokens,
                    "output_text": "".join(outcome.text),
                    "error": outcome.error.SerializeToString() if outcome.error is not None else None,
                    "end_time": datetime.now(UTC),
                    "time_to_first_token_ms": ttft_ms,
                }
                if outcome.node:
                    values["node"] = outcome.node
                row = await repository.mark_ended(uow.session, job_id, **values)
                if row is not None:
                    uow.publish(JOBS_TOPIC, convert.job(row, with_output=False))
            try:
                await writer.close(end.SerializeToString())
            except Exception:
                log.exception("token stream end failed", job=job_id)
            for listener in running.listeners:
                listener(end)
        finally:
            self._forget(job_id, running)
            self._slots[model.id].give()
            with contextlib.suppress(Exception):
                await self._admission.release(job_id, owner)


def _settle(accepted: asyncio.Future[int], done: asyncio.Task[Outcome]) -> None:
    """The generation ended before the model took the prompt: the reason becomes the caller's error."""
    if accepted.done():
        return
    if done.cancelled():
        accepted.cancel()
        return
    error = done.exception()
    if error is not None:
        accepted.set_exception(error)
        return
    outcome = done.result()
    if outcome.error is None:
        accepted.set_result(outcome.prompt_tokens)
        return
    info = error_details_pb2.ErrorInfo()
    reason = "NODE_FAILED"
    if outcome.error.details and outcome.error.details[0].Unpack(info):
        reason = info.reason
    problem: DomainError
    if reason == "PROMPT_TOO_LONG":
        problem = InvalidArgument(outcome.error.message, reason=reason)
    elif reason == "MODEL_UNAVAILABLE":
        problem = FailedPrecondition(outcome.error.message, reason=reason)
    else:
        problem = Unavailable(outcome.error.message, reason=reason)
    accepted.set_exception(problem)
