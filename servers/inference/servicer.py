"""far.inference.v1.InferenceService: models, quotes, jobs, and the Generate / StreamJob token streams."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
from far.inference.v1 import inference_service_pb2 as pb
from far.inference.v1 import inference_service_pb2_grpc, job_pb2, model_pb2, quote_pb2
from google.rpc import code_pb2

from servers.common.auth import Principal, Role
from servers.common.chain import Chain
from servers.common.context import call_started, current_principal
from servers.common.db import Database, UnitOfWork
from servers.common.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from servers.common.names import parse_name
from servers.common.pagination import PageTokens, page_size
from servers.common.validation import normalize_wallet
from servers.inference import convert, jobs, metrics, repository, streams
from servers.inference.admission import Admission, JobsWaiting, Ticket
from servers.inference.catalog import Catalog, ModelSpec
from servers.inference.executor import error_status
from servers.inference.models import JobRow
from servers.inference.nodes import NodeDirectory
from servers.inference.overlap import overlapped
from servers.inference.prices import Prices
from servers.inference.quotes import Quotes, token_amount
from servers.inference.requests import JobSpec, validate
from servers.inference.runner import Runner
from servers.inference.token_stream import TokenStreams
from servers.inference.triton_stream import Piece

Context = grpc.aio.ServicerContext[Any, Any]
JOB_PATTERN = "jobs/{job}"
DISCONNECT_GRACE_S = 30.0
ACCEPT_IN_TRANSACTION_S = 0.25
_PRIVILEGED = (Role.ADMIN, Role.OPERATOR)


@dataclass
class Parts:
    """What the servicer works with (built once by server.setup)."""

    database: Database
    catalog: Catalog
    prices: Prices
    quotes: Quotes
    admission: Admission
    streams: TokenStreams
    directory: NodeDirectory
    runner: Runner
    page_tokens: PageTokens
    chain: Chain | None
    disconnect_grace_s: float = DISCONNECT_GRACE_S
    """How long a Generate job whose caller went away runs on without a follower before it is cancelled."""
    accept_in_transaction_s: float = ACCEPT_IN_TRANSACTION_S
    """How long a started Generate job's uncommitted insert waits for the model to take the prompt."""


def _visible(principal: Principal, owner: str) -> bool:
    return principal.subject == owner or principal.has_any_role(*_PRIVILEGED)


def _recorded(uow: UnitOfWork, row: JobRow, ticket: Ticket) -> job_pb2.Job:
    """A job just inserted in `uow`: its message, with its place in the queue, and its job event (published
    once `uow` commits)."""
    message = convert.job(row)
    message.queue_position = ticket.position
    uow.publish(jobs.JOBS_TOPIC, convert.job(row, with_output=False))
    return message


class InferenceServicer(inference_service_pb2_grpc.InferenceServiceServicer):
    def __init__(self, parts: Parts) -> None:
        self._p = parts
        self._watchdogs: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._listeners: set[asyncio.Queue[Any]] = set()

    async def stopping(self) -> None:
        """The server is shutting down: end every stream now with an interrupted `final` (clients resume with
        StreamJob elsewhere) instead of having them cancelled without one."""
        self._stopping.set()
        for queue in list(self._listeners):
            queue.put_nowait(streams.Interrupt())

    # --- Models and quotes ---------------------------------------------------------------------------

    async def _model_message(self, spec: ModelSpec) -> model_pb2.Model:
        serving = self._p.directory.serving(spec.served_as)
        price = self._p.prices.price(spec)
        return model_pb2.Model(
            name=spec.name,
            display_name=spec.display_name,
            description=spec.description,
            context_length=spec.context_length,
            max_output_tokens=spec.max_output_tokens,
            price_per_token=token_amount(price or 0),
            supports_chat=spec.supports_chat,
            availability=(
                model_pb2.Model.AVAILABILITY_AVAILABLE
                if serving and price is not None
                else model_pb2.Model.AVAILABILITY_UNAVAILABLE
            ),
            serving_node_count=serving,
            queue_length=await self._p.admission.length(spec.served_as),
        )

    async def GetModel(self, request: pb.GetModelRequest, context: Context) -> model_pb2.Model:
        return await self._model_message(self._p.quotes.model(request.name, "name"))

    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        size = page_size(request.page_size, default=50, maximum=100)
        scope = PageTokens.scope("models", request.available_only)
        after = ""
        if request.page_token:
            cursor = self._p.page_tokens.decode(request.page_token, scope=scope)
            if cursor is None:
                raise InvalidArgument.field("page_token", "is not a token of this listing")
            after = str(cursor["after"])
        models = [await self._model_message(spec) for spec in self._p.catalog if spec.id > after]
        if request.available_only:
            models = [m for m in models if m.availability == model_pb2.Model.AVAILABILITY_AVAILABLE]
        page, rest = models[:size], models[size:]
        token = (
            self._p.page_tokens.encode({"after": page[-1].name.removeprefix("models/")}, scope=scope) if rest else ""
        )
        return pb.ListModelsResponse(models=page, next_page_token=token)

    async def CreateQuote(self, request: pb.CreateQuoteRequest, context: Context) -> quote_pb2.Quote:
        return await self._p.quotes.create(current_principal().subject, request.quote)

    async def GetQuote(self, request: pb.GetQuoteRequest, context: Context) -> quote_pb2.Quote:
        return await self._p.quotes.get(current_principal().subject, request.name)

    # --- Jobs ----------------------------------------------------------------------------------------

    def _check_serving(self, model: ModelSpec) -> None:
        if self._p.directory.serving(model.served_as) == 0:
            raise FailedPrecondition(
                f"no healthy node serves {model.name} now", reason="MODEL_UNAVAILABLE", metadata={"model": model.name}
            )

    async def _earlier(self, principal: Principal, spec: JobSpec) -> job_pb2.Job | None:
        """The job an earlier call with the same request id created (AIP-155 retries), if any."""
        if not spec.request_id:
            return None
        async with self._p.database.read() as uow:
            existing = await repository.job_by_request_id(uow.session, principal.subject, spec.request_id)
        return convert.job(existing) if existing is not None else None

    async def _create(
        self,
        principal: Principal,
        spec: JobSpec,
        paid: jobs.Paid | None,
        ticket: Ticket,
        *,
        streamed: bool,
        started_on: str | None = None,
    ) -> tuple[job_pb2.Job, bool, JobRow]:
        """Insert the admitted job (consuming its payment; RUNNING on `started_on` when it started at once);
        withdraws the admission if it is not created."""
        try:
            async with self._p.database.transaction() as uow:
                row, created = await jobs.create(
                    uow, principal, spec, paid, streamed=streamed, job_id=ticket.job, started_on=started_on
                )
                message = _recorded(uow, row, ticket) if created else convert.job(row)
        except BaseException:
            await self._p.admission.withdraw(ticket, principal.subject)
            raise
        if not created:
            await self._p.admission.withdraw(ticket, principal.subject)
        return message, created, row

    async def _create_started(
        self,
        principal: Principal,
        spec: JobSpec,
        paid: jobs.Paid | None,
        model: ModelSpec,
        job_id: str,
        accepted: asyncio.Future[int],
    ) -> tuple[job_pb2.Job, bool, JobRow]:
        """The fast path's job, inserted RUNNING (one transaction and one job event fewer than QUEUED, then
        started) while the node tokenizes the prompt, and committed once the node accepted it.

        The insert (and the payment it consumes) waits uncommitted for the node's word: a prompt longer than
        what was paid for rolls it back, so the payment stays unused, and the job message follows the node's
        reply by an admission and a COMMIT instead of the whole transaction. The admission refuses a start at
        once while jobs wait in the model's queue (`JobsWaiting`, which rolls the insert back: the call
        queues). The node answers within milliseconds (before its request waits for a slot), but one on a slow
        link or one that fails before it answers can take longer, and the open transaction holds a database
        connection: it waits at most `accept_in_transaction_s`, then rolls back, waits for the node outside, and
        writes the job afterwards.
        """
        ticket: Ticket | None = None
        try:
            async with self._p.database.transaction() as uow:
                row, created = await jobs.create(
                    uow, principal, spec, paid, streamed=True, job_id=job_id, started_on=self._p.runner.node_for(model)
                )
                if not created:  # a concurrent retry with the same request id made it: nothing was written
                    return convert.job(row), False, row
                try:
                    async with asyncio.timeout(self._p.accept_in_transaction_s):
                        await asyncio.shield(accepted)
                except TimeoutError:
                    raise _SlowAccept from None
                ticket = await self._p.admission.admit(model.served_as, job_id, principal.subject, queued=False)
                message = _recorded(uow, row, ticket)
        except _SlowAccept:
            metrics.SLOW_ACCEPTS.labels(model.id).inc()
            await accepted
            ticket = await self._p.admission.admit(model.served_as, job_id, principal.subject, queued=False)
            return await self._create(
                principal, spec, paid, ticket, streamed=True, started_on=self._p.runner.node_for(model)
            )
        except BaseException:
            if ticket is not None:  # the commit failed after the admission
                await self._p.admission.withdraw(ticket, principal.subject)
            raise
        return message, True, row

    async def CreateJob(self, request: pb.CreateJobRequest, context: Context) -> job_pb2.Job:
        principal = current_principal()
        model = self._p.quotes.model(request.job.model, "job.model")
        spec = validate(model, request.job, request_id=request.request_id, prefix="job.")
        self._check_serving(model)
        spec, quote = await jobs.resolve(self._p.quotes, principal.subject, spec, prefix="job.")
        earlier = await self._earlier(principal, spec)
        if earlier is not None:
            return earlier
        # The payment is consumed when the job is inserted, before any node sees the prompt: a node's tokenizer
        # checks it first, while the payment is verified.
        paid = await overlapped(
            jobs.pay(self._p.chain, principal.subject, spec, quote),
            self._p.runner.count_prompt(model, spec.generation),
        )
        job_id = jobs.job_id_for(paid.quote if paid is not None else None)
        # A free slot here runs the job at once, unless jobs wait in the model's queue (they go first).
        here = self._p.runner.try_reserve(model)
        try:
            ticket: Ticket | None = None
            if here:
                try:
                    ticket = await self._p.admission.admit(model.served_as, job_id, principal.subject, queued=False)
                except JobsWaiting:
                    self._p.runner.unreserve(model)
                    here = False
            if ticket is None:
                ticket = await self._p.admission.admit(model.served_as, job_id, principal.subject)
            message, created, _ = await self._create(principal, spec, paid, ticket, streamed=False)
        except BaseException:
            if here:
                self._p.runner.unreserve(model)
            raise
        if here and created:
            self._p.runner.start(job_id, principal.subject, model, spec.generation)
        elif here:
            self._p.runner.unreserve(model)
        return message

    async def Generate(self, request: pb.GenerateRequest, context: Context) -> AsyncIterator[pb.GenerateResponse]:
        principal = current_principal()
        model = self._p.quotes.model(request.model, "model")
        job = job_pb2.Job(
            model=request.model,
            sampling=request.sampling,
            max_tokens=request.max_tokens,
            stop_sequences=request.stop_sequences,
            payment=request.payment,
        )
        if request.WhichOneof("input") == "prompt":
            job.prompt = request.prompt
        elif request.WhichOneof("input") == "chat":
            job.chat.CopyFrom(request.chat)
        spec = validate(model, job, request_id=request.request_id)
        self._check_serving(model)
        if spec.paid and self._p.chain is None:
            raise FailedPrecondition(f"{model.name} is paid and this server has no chain", reason="MODEL_UNAVAILABLE")
        spec, quote = await jobs.resolve(self._p.quotes, principal.subject, spec)
        job_id = jobs.job_id_for(quote)
        # A paid job's id is its quote's: a call that reuses a payment whose job runs here must not start a second
        # run under that id (it goes the queued way, where the payment is found used).
        if not self._p.runner.is_running(job_id) and self._p.runner.try_reserve(model):
            # The fast path: the model starts its prefill now, while the payment is verified and the job is
            # admitted and recorded; its pieces are held until that is done (none reaches the caller unpaid).
            # Even the checks that may turn the call away come after the start: an earlier call with the same
            # request id (PostgreSQL), and jobs waiting in the model's queue (they go first: the admission, in
            # the job's transaction, refuses a start at once while any waits).
            queue: asyncio.Queue[Piece | pb.GenerateEnd | streams.Interrupt] = asyncio.Queue()
            loop = asyncio.get_running_loop()
            gate: asyncio.Future[JobRow] = loop.create_future()
            accepted: asyncio.Future[int] = loop.create_future()
            self._p.runner.start(
                job_id,
                principal.subject,
                model,
                spec.generation,
                queue.put_nowait,
                gate=gate,
                accepted=accepted,
                arrived=call_started() or None,
            )
            try:
                earlier = await self._earlier(principal, spec)
                if earlier is not None:  # a retry: stream the earlier call's job from the start
                    raise _Duplicate(earlier)
                paid = await jobs.pay(self._p.chain, principal.subject, spec, quote)
                message, created, row = await self._create_started(principal, spec, paid, model, job_id, accepted)
                if not created:
                    raise _Duplicate(message)
            except JobsWaiting as waiting:  # nothing was written; the runner gives the slot back at the gate
                gate.set_exception(waiting)  # the started generation is dropped, and this call queues
            except _Duplicate as duplicate:
                gate.set_exception(duplicate)
                async for response in self._replay(duplicate.job, model):
                    yield response
                return
            except BaseException as error:
                if isinstance(error, asyncio.CancelledError):
                    gate.cancel()
                else:
                    gate.set_exception(error)
                raise
            else:
                gate.set_result(row)
                yield streams.job_message(message)
                finished = False
                self._listeners.add(queue)
                try:
                    async for response in streams.from_listener(queue):
                        finished = response.HasField("final")
                        yield response
                finally:
                    self._listeners.discard(queue)
                    if not finished:
                        self._watch_disconnect(job_id)
                return
        earlier = await self._earlier(principal, spec)
        if earlier is not None:
            async for response in self._replay(earlier, model):
                yield response
            return
        # Queued: the payment is consumed when the job is inserted, before any node sees the prompt, so a
        # node's tokenizer checks it first (no slot needed), while the payment is verified.
        paid = await overlapped(
            jobs.pay(self._p.chain, principal.subject, spec, quote), self._p.runner.count_prompt(model, spec.generation)
        )
        ticket = await self._p.admission.admit(model.served_as, job_id, principal.subject)
        message, created, _ = await self._create(principal, spec, paid, ticket, streamed=True)
        yield streams.job_message(message)
        try:
            finished = False
            async for response in self._follow(job_id, model, 0, ticket=ticket if created else None):
                finished = response.HasField("final")
                yield response
        finally:
            if not finished and created:
                self._watch_disconnect(job_id)

    async def _replay(self, earlier: job_pb2.Job, model: ModelSpec) -> AsyncIterator[pb.GenerateResponse]:
        """A retry of an earlier call (the same request id): that call's job, streamed from the start."""
        yield streams.job_message(earlier)
        async for response in self._follow(earlier.name.removeprefix("jobs/"), model, 0):
            yield response

    def _watch_disconnect(self, job_id: str) -> None:
        """The Generate caller went away: cancel its job in 30 s unless someone follows it by then."""

        async def watch() -> None:
            await asyncio.sleep(self._p.disconnect_grace_s)
            if await self._p.streams.followers(job_id) == 0:
                await self._cancel(job_id, "CALLER_DISCONNECTED")

        task = asyncio.create_task(watch(), name=f"disconnect:{job_id}")
        self._watchdogs.add(task)
        task.add_done_callback(self._watchdogs.discard)

    async def _follow(
        self, job_id: str, model: ModelSpec, from_offset: int, *, ticket: Ticket | None = None
    ) -> AsyncIterator[pb.GenerateResponse]:
        admission = self._p.admission

        async def position() -> int:
            found = ticket or await admission.ticket(model.served_as, job_id)
            return await admission.position(found) if found is not None else 0

        async def ended_without_stream() -> pb.GenerateEnd | None:
            if await self._p.streams.exists(job_id):
                return None
            async with self._p.database.read() as uow:
                row = await repository.get_job(uow.session, job_id)
            if row is None or row.state in repository.UNFINISHED:
                return None
            return convert.generate_end(row)

        async with self._p.streams.following(job_id):
            async for response in streams.from_token_stream(
                self._p.streams,
                job_id,
                from_offset,
                position=position,
                ended_without_stream=ended_without_stream,
                stop=self._stopping,
            ):
                yield response

    async def StreamJob(self, request: pb.StreamJobRequest, context: Context) -> AsyncIterator[pb.GenerateResponse]:
        if request.from_offset < 0:
            raise InvalidArgument.field("from_offset", "must not be negative")
        row = await self._visible_job(request.name)
        spec = self._p.catalog.get(row.model.removeprefix("models/"))
        if spec is None:
            raise NotFound(f"there is no model {row.model}", reason="MODEL_NOT_FOUND")
        ended_long_ago = (
            row.end_time is not None and (datetime.now(UTC) - row.end_time).total_seconds() > self._p.streams.ttl_s
        )
        if ended_long_ago and not await self._p.streams.exists(row.id):
            raise FailedPrecondition(
                f"{request.name} ended more than 24 hours ago; read its output with GetJob", reason="STREAM_EXPIRED"
            )
        yield streams.job_message(convert.job(row))
        async for response in self._follow(row.id, spec, request.from_offset):
            yield response

    async def _visible_job(self, name: str) -> Any:
        job_id = parse_name(JOB_PATTERN, name)["job"]
        principal = current_principal()
        async with self._p.database.read() as uow:
            row = await repository.get_job(uow.session, job_id)
        if row is None or not _visible(principal, row.owner):
            raise NotFound(f"there is no job {name}", reason="JOB_NOT_FOUND", metadata={"job": name})
        return row

    async def GetJob(self, request: pb.GetJobRequest, context: Context) -> job_pb2.Job:
        row = await self._visible_job(request.name)
        message = convert.job(row)
        if row.state == job_pb2.Job.STATE_QUEUED:
            ticket = await self._p.admission.ticket(self._served_as(row.model), row.id)
            message.queue_position = await self._p.admission.position(ticket) if ticket else 0
        return message

    async def ListJobs(self, request: pb.ListJobsRequest, context: Context) -> pb.ListJobsResponse:
        principal = current_principal()
        owner = principal.subject
        if request.owner:
            owner = normalize_wallet(request.owner, "owner")
            if owner != principal.subject and not principal.has_any_role(*_PRIVILEGED):
                raise PermissionDenied("only admins and operators may list other accounts' jobs")
        if request.model:
            parse_name("models/{model}", request.model, field="model")
        size = page_size(request.page_size, default=20, maximum=100)
        scope = PageTokens.scope("jobs", owner, int(request.state), request.model)
        after = None
        if request.page_token:
            cursor = self._p.page_tokens.decode(request.page_token, scope=scope)
            if cursor is None:
                raise InvalidArgument.field("page_token", "is not a token of this listing")
            after = (datetime.fromisoformat(str(cursor["t"])), str(cursor["id"]))
        async with self._p.database.read() as uow:
            rows = await repository.list_jobs(
                uow.session, owner=owner, state=int(request.state), model=request.model, after=after, limit=size + 1
            )
        page = rows[:size]
        token = ""
        if len(rows) > size:
            token = self._p.page_tokens.encode({"t": page[-1].create_time.isoformat(), "id": page[-1].id}, scope=scope)
        return pb.ListJobsResponse(jobs=[convert.job(row, with_output=False) for row in page], next_page_token=token)

    async def CancelJob(self, request: pb.CancelJobRequest, context: Context) -> job_pb2.Job:
        row = await self._visible_job(request.name)
        principal = current_principal()
        if row.owner != principal.subject and not principal.is_admin:
            raise NotFound(f"there is no job {request.name}", reason="JOB_NOT_FOUND", metadata={"job": request.name})
        if row.state in (job_pb2.Job.STATE_SUCCEEDED, job_pb2.Job.STATE_FAILED):
            raise FailedPrecondition(f"{request.name} has ended already", reason="JOB_ENDED")
        if row.state == job_pb2.Job.STATE_CANCELLED:
            return convert.job(row)
        ended_here = await self._cancel(row.id, "JOB_CANCELLED")
        if ended_here is not None:  # it ran here: its ending is written when the task is done (at most 5 s)
            await asyncio.wait({ended_here}, timeout=5.0)
        for _ in range(500):  # elsewhere: the replica running it ends it within about a token
            async with self._p.database.read() as uow:
                row = await repository.get_job(uow.session, row.id)
            if row is not None and row.state not in repository.UNFINISHED:
                break
            await asyncio.sleep(0.01)
        return convert.job(row)

    async def _cancel(self, job_id: str, reason: str) -> asyncio.Task[None] | None:
        """Cancel wherever the job is: queued (ended here), running here (its task is returned), or running on
        another replica (asked over the cancel channel)."""
        task = self._p.runner.cancel(job_id, reason)
        if task is not None:
            return task
        async with self._p.database.transaction() as uow:
            row = await repository.get_job(uow.session, job_id, for_update=True)
            if row is None or row.state not in repository.UNFINISHED:
                return None
            if row.state == job_pb2.Job.STATE_QUEUED:
                ticket = await self._p.admission.ticket(self._served_as(row.model), job_id)
                if ticket is not None and await self._p.admission.withdraw(ticket, row.owner):
                    status = error_status(code_pb2.CANCELLED, reason, "the job was cancelled before it started")
                    ended = await repository.mark_ended(
                        uow.session,
                        job_id,
                        state=job_pb2.Job.STATE_CANCELLED,
                        finish_reason=job_pb2.FINISH_REASON_CANCELLED,
                        error=status.SerializeToString(),
                        end_time=datetime.now(UTC),
                    )
                    if ended is not None:
                        uow.publish(jobs.JOBS_TOPIC, convert.job(ended, with_output=False))
                        await self._p.streams.end(job_id, convert.generate_end(ended).SerializeToString())
                    return None
        await self._p.streams.request_cancel(job_id, reason)
        return None

    def _served_as(self, model_name: str) -> str:
        """The queue (Triton model name) of a catalog model, `models/{model}`."""
        spec = self._p.catalog.get(model_name.removeprefix("models/"))
        return spec.served_as if spec is not None else model_name.removeprefix("models/")

    async def close(self) -> None:
        for task in list(self._watchdogs):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class _SlowAccept(Exception):
    """The model had not taken the prompt within the time a job's open transaction may wait for it."""


class _Duplicate(Exception):
    """The job exists already (a concurrent retry with the same request id created it)."""

    def __init__(self, job: job_pb2.Job) -> None:
        super().__init__(job.name)
        self.job = job
