"""Creating a job: check its quote, verify its payment on chain, then insert the job and consume the payment in
one transaction (so a payment pays one job once, and a failed insert leaves the payment unused).

`verify` only reads (Redis for the quote, the chain for the payment) and may run while the model does its
prefill; `create` is the one write. A retry with the same request id returns the first call's job and consumes
nothing, even when it races the first call with another payment.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal

from far.inference.v1 import job_pb2, quote_pb2

from servers.common.auth import Principal
from servers.common.chain import Chain
from servers.common.db import UnitOfWork
from servers.common.errors import FailedPrecondition, InvalidArgument
from servers.common.payments import (
    PaymentAlreadyUsed,
    PaymentMismatch,
    VerifiedPayment,
    consume_payment,
    verify_payment,
)
from servers.inference import repository
from servers.inference.convert import job_input
from servers.inference.models import PAYMENTS, JobRow
from servers.inference.quotes import Quotes, new_id
from servers.inference.requests import JobSpec

JOBS_TOPIC = "inference.jobs"


@dataclass(frozen=True, slots=True)
class Paid:
    """A verified payment and the quote it pays."""

    quote: quote_pb2.Quote
    payment: VerifiedPayment


async def resolve(
    quotes: Quotes, owner: str, spec: JobSpec, *, prefix: str = ""
) -> tuple[JobSpec, quote_pb2.Quote | None]:
    """The spec with `max_tokens` resolved against its quote, and the quote (None for free models).

    One Redis read: cheap enough to sit in front of the model. QUOTE_NOT_FOUND, QUOTE_MISMATCH, QUOTE_EXPIRED,
    and PAYMENT_MISMATCH (`field` chain_id) for a payment named on another chain than the quote's.
    """
    if not spec.paid:
        # A free job may use the context that its max_tokens leaves.
        room = spec.model.context_length - spec.generation.max_tokens
        return replace(spec, generation=replace(spec.generation, max_prompt_tokens=room)), None
    quote = await quotes.get(owner, spec.quote, field=f"{prefix}payment.quote")
    if quote.model != spec.model.name:
        raise InvalidArgument(
            f"{spec.quote} is a quote for {quote.model}, not {spec.model.name}",
            reason="QUOTE_MISMATCH",
            metadata={"quote": spec.quote, "field": "model"},
        )
    max_tokens = spec.job.max_tokens or quote.max_tokens
    if max_tokens > quote.max_tokens:
        raise InvalidArgument(
            f"max_tokens {max_tokens} is more than the {quote.max_tokens} the quote covers",
            reason="QUOTE_MISMATCH",
            metadata={"quote": spec.quote, "field": "max_tokens"},
        )
    if time.time() > quote.expire_time.seconds + quotes.policy.redeem_window_s:
        raise FailedPrecondition(f"{spec.quote} expired", reason="QUOTE_EXPIRED", metadata={"quote": spec.quote})
    if spec.chain_id != quote.chain_id:
        raise PaymentMismatch(
            f"the quote is payable on chain {quote.chain_id}, not {spec.chain_id}",
            metadata={"tx_hash": spec.tx_hash, "field": "chain_id"},
        )
    job = job_pb2.Job()
    job.CopyFrom(spec.job)
    job.max_tokens = max_tokens
    generation = replace(spec.generation, max_tokens=max_tokens, max_prompt_tokens=quote.max_prompt_tokens)
    return replace(spec, job=job, generation=generation), quote


async def pay(chain: Chain | None, owner: str, spec: JobSpec, quote: quote_pb2.Quote | None) -> Paid | None:
    """The verified on-chain payment of a resolved paid spec (None for free ones): several chain reads, so the
    Generate fast path runs it while the model does its prefill. Raises the errors of `verify_payment`, and
    PAYMENT_MISMATCH (`field` block_time) for a payment mined after the quote expired."""
    if quote is None:
        return None
    if chain is None:
        raise FailedPrecondition(f"{spec.model.name} is paid and this server has no chain", reason="MODEL_UNAVAILABLE")
    payment = await verify_payment(
        chain, spec.tx_hash, job_id=quote.payment_job_id, payer=owner, min_amount=int(quote.price.value)
    )
    if payment.block_time.timestamp() > quote.expire_time.seconds:
        raise PaymentMismatch(
            f"the payment in {spec.tx_hash} was mined after the quote expired",
            metadata={"tx_hash": spec.tx_hash, "field": "block_time"},
        )
    return Paid(quote, payment)


async def verify(
    chain: Chain | None, quotes: Quotes, owner: str, spec: JobSpec, *, prefix: str = ""
) -> tuple[JobSpec, Paid | None]:
    """`resolve` then `pay`: the resolved spec and its verified payment (None for free models)."""
    if spec.paid and chain is None:
        raise FailedPrecondition(f"{spec.model.name} is paid and this server has no chain", reason="MODEL_UNAVAILABLE")
    resolved, quote = await resolve(quotes, owner, spec, prefix=prefix)
    return resolved, await pay(chain, owner, resolved, quote)


def job_id_for(quote: quote_pb2.Quote | None) -> str:
    """A paid job takes the id its quote reserved; a free one gets a new id."""
    return quote.job.removeprefix("jobs/") if quote is not None else new_id("j")


async def create(
    uow: UnitOfWork,
    principal: Principal,
    spec: JobSpec,
    paid: Paid | None,
    *,
    streamed: bool,
    job_id: str | None = None,
    started_on: str | None = None,
) -> tuple[JobRow, bool]:
    """Insert the job (QUEUED, or RUNNING on node `started_on` for one that started at once), then consume its
    payment; returns (row, created).

    created is False when the caller already has a job with this request id: that job is returned and nothing
    was written (the payment stays unused). PAYMENT_ALREADY_USED (metadata `job`) when the payment paid a job
    before; the insert is then rolled back with the caller's transaction, which the error ends.

    The insert comes first so that a duplicate request is found before anything is consumed: a concurrent call
    with the same request id waits on this insert's unique key and then finds this job, whatever it paid with.
    (The other way round, a concurrent call with the same request id and another payment consumed its payment,
    then found the job taken and committed, and that payment paid for nothing.)
    """
    job_id = job_id or job_id_for(paid.quote if paid is not None else None)
    now = datetime.now(UTC)
    row = JobRow(
        id=job_id,
        owner=principal.subject,
        model=spec.model.name,
        request_id=spec.request_id or None,
        streamed=streamed,
        input=job_input(spec.job),
        max_tokens=spec.job.max_tokens,
        max_prompt_tokens=spec.generation.max_prompt_tokens,
        state=job_pb2.Job.STATE_QUEUED if started_on is None else job_pb2.Job.STATE_RUNNING,
        node=started_on or "",
        prompt_tokens=0,
        completion_tokens=0,
        finish_reason=0,
        output_text="",
        quote=spec.quote,
        create_time=now,
        start_time=None if started_on is None else now,
    )
    if paid is not None:
        payment = paid.payment
        row.chain_id = payment.chain_id
        row.tx_hash = payment.tx_hash
        row.payment_job_id = payment.payment_job_id
        row.payer = payment.payer
        row.amount = Decimal(payment.amount)
        row.payment_contract = payment.payment_contract
        row.verify_time = now
    session = uow.session
    inserted = await repository.insert_job(session, row)
    if inserted is None and spec.request_id:
        existing = await repository.job_by_request_id(session, principal.subject, spec.request_id)
        if existing is not None:  # a retry of this call (or one racing it): answer with its job
            return existing, False
    if paid is not None:
        # The job's id is taken (inserted is None) only by the job its quote paid for: the chain takes one
        # payment per quote's job, so consuming it below finds it used and names that job.
        try:
            await consume_payment(session, PAYMENTS, paid.payment, resource=f"jobs/{job_id}")
        except PaymentAlreadyUsed as error:
            used_for = error.metadata.get("resource", "")
            raise PaymentAlreadyUsed(
                f"this payment paid {used_for or 'another job'} already",
                metadata={**error.metadata, "job": used_for},
            ) from None
    if inserted is None:  # pragma: no cover - a new id, or a paid job's id that its payment names above
        raise RuntimeError(f"job id jobs/{job_id} is taken")
    return inserted, True
