"""Paid job creation on anvil + PostgreSQL + Redis: the quote, the payment verified on chain, consumed once in the
transaction that inserts the job; unpaid, underpaid, reused and other wallets' payments refused with their reason."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from eth_account.signers.local import LocalAccount
from far.inference.v1 import job_pb2, quote_pb2
from redis.asyncio import Redis
from sqlalchemy import text
from web3 import Web3

from devstack.chain import job_key, model_key, transact
from servers.common.auth import Principal
from servers.common.chain import Chain
from servers.common.db import Database
from servers.common.errors import DomainError
from servers.inference import convert, jobs
from servers.inference.catalog import Catalog, ModelSpec
from servers.inference.models import JobRow
from servers.inference.prices import Prices
from servers.inference.quotes import Quotes
from servers.inference.requests import validate
from tests.chain.chain_support import Contracts

MODEL = ModelSpec("paid-model", "Paid", "", context_length=2048, max_output_tokens=512)
FREE = ModelSpec("free-model", "Free", "", context_length=1024, max_output_tokens=128, free=True)
PRICE = 10**9


@pytest.fixture
async def database(migrated_database_url: str) -> AsyncIterator[Database]:
    db = Database(migrated_database_url)
    try:
        yield db
    finally:
        await db.close()


@pytest.fixture
async def quotes(
    redis_url: str,
    redis_key_prefix: str,
    chain: Chain,
    w3: Web3,
    contracts: Contracts,
    owner: LocalAccount,
    request: pytest.FixtureRequest,
) -> AsyncIterator[Quotes]:
    transact(w3, owner, contracts.payment.functions.setPrice(model_key(MODEL.id), PRICE))
    prices = Prices(chain, [MODEL, FREE])
    await prices.refresh()
    redis = Redis.from_url(redis_url)
    try:
        yield Quotes(
            redis,
            f"{redis_key_prefix}{request.node.name}:",  # own keys per test (the wallets repeat across tests)
            Catalog([MODEL, FREE]),
            prices,
            chain_id=chain.chain_id,
            payment_contract=chain.inference_payment.address,
        )
    finally:
        await redis.aclose()


def principal(account: LocalAccount) -> Principal:
    return Principal(subject=account.address.lower(), roles=frozenset({"user"}))


async def quote_for(quotes: Quotes, account: LocalAccount, max_tokens: int = 32) -> quote_pb2.Quote:
    request = quote_pb2.Quote(model=MODEL.name, max_tokens=max_tokens, max_prompt_tokens=64)
    return await quotes.create(account.address.lower(), request)


def pay(w3: Web3, contracts: Contracts, payer: LocalAccount, quote: quote_pb2.Quote, tokens: int | None = None) -> str:
    tokens = quote.max_tokens + quote.max_prompt_tokens if tokens is None else tokens
    job = job_key(quote.job.removeprefix("jobs/"))
    transact(w3, payer, contracts.token.functions.approve(contracts.payment.address, tokens * PRICE))
    receipt = transact(w3, payer, contracts.payment.functions.pay(job, model_key(MODEL.id), tokens))
    return receipt["transactionHash"].to_0x_hex()


def request(quote: quote_pb2.Quote, tx_hash: str, chain_id: int = 97, **fields: object) -> job_pb2.Job:
    job = job_pb2.Job(model=MODEL.name, prompt="Say hi", **fields)  # type: ignore[arg-type]
    job.payment.quote = quote.name
    job.payment.transaction.chain_id = chain_id
    job.payment.transaction.tx_hash = tx_hash
    return job


async def submit(
    database: Database,
    chain: Chain,
    quotes: Quotes,
    account: LocalAccount,
    job: job_pb2.Job,
    *,
    model: ModelSpec = MODEL,
    request_id: str = "",
) -> tuple[job_pb2.Job, bool]:
    caller = principal(account)
    spec = validate(model, job, request_id=request_id)
    spec, paid = await jobs.verify(chain, quotes, caller.subject, spec)
    async with database.transaction() as uow:
        row, created = await jobs.create(uow, caller, spec, paid, streamed=True)
    return convert.job(row), created


async def refused(coro: object) -> DomainError:
    with pytest.raises(DomainError) as caught:
        await coro  # type: ignore[misc]
    return caught.value


async def test_a_paid_job_is_created_with_its_payment(
    database: Database, chain: Chain, quotes: Quotes, w3: Web3, contracts: Contracts, alice: LocalAccount
) -> None:
    quote = await quote_for(quotes, alice)
    tx = pay(w3, contracts, alice, quote)
    job, created = await submit(database, chain, quotes, alice, request(quote, tx))
    assert created
    assert job.name == quote.job
    assert job.state == job_pb2.Job.STATE_QUEUED
    assert job.max_tokens == quote.max_tokens  # 0 on input: the quote's
    assert job.owner == alice.address.lower()
    assert job.prompt == "Say hi"
    assert job.payment.transaction.tx_hash == tx
    assert job.payment.payer == alice.address.lower()
    assert job.payment.amount.value == quote.price.value
    assert job.payment.payment_job_id == quote.payment_job_id
    assert job.payment.HasField("verify_time")


async def test_the_same_payment_pays_once_and_names_its_job(
    database: Database, chain: Chain, quotes: Quotes, w3: Web3, contracts: Contracts, alice: LocalAccount
) -> None:
    quote = await quote_for(quotes, alice)
    tx = pay(w3, contracts, alice, quote)
    first, _ = await submit(database, chain, quotes, alice, request(quote, tx))
    error = await refused(submit(database, chain, quotes, alice, request(quote, tx)))
    assert error.reason == "PAYMENT_ALREADY_USED"
    assert error.metadata["job"] == first.name


async def test_a_retry_with_the_request_id_returns_the_first_job(
    database: Database, chain: Chain, quotes: Quotes, w3: Web3, contracts: Contracts, alice: LocalAccount
) -> None:
    quote = await quote_for(quotes, alice)
    tx = pay(w3, contracts, alice, quote)
    request_id = str(uuid.uuid4())
    first, created = await submit(database, chain, quotes, alice, request(quote, tx), request_id=request_id)
    again, created_again = await submit(database, chain, quotes, alice, request(quote, tx), request_id=request_id)
    assert (created, created_again) == (True, False)
    assert again == first


async def _waiting_on_a_lock(database: Database, *, timeout_s: float = 10.0) -> None:
    """Until a session of this database waits on a row or key lock (another test's would do as well: only a
    later step's outcome tells)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    query = text(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    while asyncio.get_running_loop().time() < deadline:
        async with database.read() as uow:
            if (await uow.session.execute(query)).scalar_one() > 0:
                return
        await asyncio.sleep(0.02)
    raise AssertionError("the racing call never waited on the first call's insert")


async def test_a_racing_call_with_the_request_id_and_another_payment_spends_nothing(
    database: Database, chain: Chain, quotes: Quotes, w3: Web3, contracts: Contracts, alice: LocalAccount
) -> None:
    """Two calls with one request id but two payments, the second while the first's transaction is open: the
    second gets the first's job, and its own payment stays unused."""
    caller, request_id = principal(alice), str(uuid.uuid4())
    first_quote, second_quote = await quote_for(quotes, alice), await quote_for(quotes, alice)
    first_tx, second_tx = pay(w3, contracts, alice, first_quote), pay(w3, contracts, alice, second_quote)
    first, first_paid = await jobs.verify(
        chain, quotes, caller.subject, validate(MODEL, request(first_quote, first_tx), request_id=request_id)
    )
    second, second_paid = await jobs.verify(
        chain, quotes, caller.subject, validate(MODEL, request(second_quote, second_tx), request_id=request_id)
    )

    async def second_call() -> tuple[JobRow, bool]:
        async with database.transaction() as uow:
            return await jobs.create(uow, caller, second, second_paid, streamed=True)

    async with database.transaction() as uow:
        first_row, created = await jobs.create(uow, caller, first, first_paid, streamed=True)
        racing = asyncio.create_task(second_call())
        await _waiting_on_a_lock(database)  # the second call's insert waits on the first's request id
    row, created_again = await racing
    assert (created, created_again) == (True, False)
    assert row.id == first_row.id
    # The second payment paid for nothing, so it is still free: its quote's job can be created with it.
    job, created = await submit(
        database, chain, quotes, alice, request(second_quote, second_tx), request_id=str(uuid.uuid4())
    )
    assert created
    assert job.name == second_quote.job


async def test_unpaid_and_underpaid_jobs_are_refused(
    database: Database, chain: Chain, quotes: Quotes, w3: Web3, contracts: Contracts, alice: LocalAccount
) -> None:
    quote = await quote_for(quotes, alice)
    approve = transact(w3, alice, contracts.token.functions.approve(contracts.payment.address, 1))
    error = await refused(
        submit(database, chain, quotes, alice, request(quote, approve["transactionHash"].to_0x_hex()))
    )
    assert (error.reason, error.metadata["cause"]) == ("PAYMENT_NOT_FOUND", "no_payment_event")

    short = pay(w3, contracts, alice, quote, tokens=quote.max_tokens)  # the prompt tokens left unpaid
    error = await refused(submit(database, chain, quotes, alice, request(quote, short)))
    assert (error.reason, error.metadata["field"]) == ("PAYMENT_MISMATCH", "amount")


async def test_another_wallets_quote_or_payment_is_refused(
    database: Database,
    chain: Chain,
    quotes: Quotes,
    w3: Web3,
    contracts: Contracts,
    alice: LocalAccount,
    bob: LocalAccount,
) -> None:
    alices = await quote_for(quotes, alice)
    alices_tx = pay(w3, contracts, alice, alices)
    # Bob cannot redeem Alice's quote: to him it does not exist.
    error = await refused(submit(database, chain, quotes, bob, request(alices, alices_tx)))
    assert error.reason == "QUOTE_NOT_FOUND"
    # Nor use her payment for his own quote (it paid her job id) ...
    bobs = await quote_for(quotes, bob)
    error = await refused(submit(database, chain, quotes, bob, request(bobs, alices_tx)))
    assert (error.reason, error.metadata["field"]) == ("PAYMENT_MISMATCH", "payment_job_id")
    # ... nor a payment for his job made from her wallet.
    paid_by_alice = pay(w3, contracts, alice, bobs)
    error = await refused(submit(database, chain, quotes, bob, request(bobs, paid_by_alice)))
    assert (error.reason, error.metadata["field"]) == ("PAYMENT_MISMATCH", "payer")


async def test_quote_mismatches(
    database: Database, chain: Chain, quotes: Quotes, w3: Web3, contracts: Contracts, alice: LocalAccount
) -> None:
    quote = await quote_for(quotes, alice, max_tokens=16)
    tx = pay(w3, contracts, alice, quote)
    error = await refused(submit(database, chain, quotes, alice, request(quote, tx, max_tokens=17)))
    assert (error.reason, error.metadata["field"]) == ("QUOTE_MISMATCH", "max_tokens")
    error = await refused(submit(database, chain, quotes, alice, request(quote, tx, chain_id=56)))
    assert (error.reason, error.metadata["field"]) == ("PAYMENT_MISMATCH", "chain_id")
    # Nothing above consumed the payment: the right request still goes through.
    job, created = await submit(database, chain, quotes, alice, request(quote, tx, max_tokens=16))
    assert created
    assert job.max_tokens == 16


async def test_a_free_job_needs_no_payment(
    database: Database, chain: Chain, quotes: Quotes, carol: LocalAccount
) -> None:
    job, created = await submit(database, chain, quotes, carol, job_pb2.Job(model=FREE.name, prompt="Hi"), model=FREE)
    assert created
    assert job.name.startswith("jobs/j")
    assert job.max_tokens == 128
    assert not job.HasField("payment")
