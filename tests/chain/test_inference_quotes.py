"""Inference quotes priced from the InferencePayment contract on anvil, stored in Redis, private to their owner;
paying a quote on chain exactly as it says passes the common payment verification."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from eth_account.signers.local import LocalAccount
from far.inference.v1 import quote_pb2
from redis.asyncio import Redis
from web3 import Web3

from devstack.chain import Deployment, job_key, model_key, transact
from servers.common.chain import Chain, ChainSettings
from servers.common.errors import DomainError, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from servers.common.payments import verify_payment
from servers.inference.catalog import Catalog, ModelSpec
from servers.inference.prices import Prices
from servers.inference.quotes import QuotePolicy, Quotes
from tests.chain.chain_support import Contracts

PAID = ModelSpec("paid-model", "Paid", "", context_length=2048, max_output_tokens=1024)
FREE = ModelSpec("free-model", "Free", "", context_length=512, max_output_tokens=128, free=True)
PRICE = 10**12


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def prices(chain: Chain) -> Prices:
    return Prices(chain, [PAID, FREE])


@pytest.fixture
def quotes(redis: Redis, redis_key_prefix: str, prices: Prices, chain: Chain, request: pytest.FixtureRequest) -> Quotes:
    # Each test its own keys: the per-account rate limit counts across tests otherwise (the wallets repeat).
    return Quotes(
        redis,
        f"{redis_key_prefix}{request.node.name}:",
        Catalog([PAID, FREE]),
        prices,
        chain_id=chain.chain_id,
        payment_contract=chain.inference_payment.address,
        policy=QuotePolicy(per_minute=5),
    )


def set_price(w3: Web3, contracts: Contracts, owner: LocalAccount, price: int) -> None:
    transact(w3, owner, contracts.payment.functions.setPrice(model_key(PAID.id), price))


async def test_a_model_without_a_price_on_chain_is_not_quoted(quotes: Quotes, prices: Prices) -> None:
    await prices.refresh()
    with pytest.raises(FailedPrecondition) as caught:
        await quotes.create("0x" + "a" * 40, quote_pb2.Quote(model="models/paid-model", max_tokens=10))
    assert caught.value.reason == "MODEL_UNAVAILABLE"


async def test_the_quote_is_the_contract_price_and_paying_it_verifies(
    quotes: Quotes,
    prices: Prices,
    chain: Chain,
    w3: Web3,
    contracts: Contracts,
    owner: LocalAccount,
    alice: LocalAccount,
) -> None:
    set_price(w3, contracts, owner, PRICE)
    await prices.refresh()
    wallet = alice.address.lower()
    request = quote_pb2.Quote(model="models/paid-model", max_tokens=100, max_prompt_tokens=400)
    quote = await quotes.create(wallet, request)
    assert quote.price.value == str(500 * PRICE)
    assert quote.price_per_token.value == str(PRICE)
    assert quote.payment_contract == contracts.payment.address.lower()
    job_id = quote.job.removeprefix("jobs/")
    assert quote.payment_job_id == "0x" + job_key(job_id).hex()
    assert quote.expire_time.seconds - quote.create_time.seconds == 600
    assert await quotes.get(wallet, quote.name) == quote

    # The wallet pays exactly what the quote says, through the contract's own price.
    transact(w3, alice, contracts.token.functions.approve(contracts.payment.address, int(quote.price.value)))
    receipt = transact(w3, alice, contracts.payment.functions.pay(job_key(job_id), model_key(PAID.id), 500))
    verified = await verify_payment(
        chain, receipt["transactionHash"].to_0x_hex(), job_id=job_key(job_id), payer=wallet, min_amount=500 * PRICE
    )
    assert verified.amount == int(quote.price.value)


async def test_max_prompt_tokens_defaults_to_the_rest_of_the_context(quotes: Quotes) -> None:
    quote = await quotes.create("0x" + "b" * 40, quote_pb2.Quote(model="models/free-model", max_tokens=100))
    assert quote.max_prompt_tokens == 412
    assert quote.price.value == "0"


@pytest.mark.parametrize(
    ("request_quote", "fields"),
    [
        (quote_pb2.Quote(model="models/free-model", max_tokens=0), ["quote.max_tokens"]),
        (quote_pb2.Quote(model="models/free-model", max_tokens=129), ["quote.max_tokens"]),
        (quote_pb2.Quote(model="models/free-model", max_tokens=99, max_prompt_tokens=414), ["quote.max_prompt_tokens"]),
        (quote_pb2.Quote(model="models/free-model", max_tokens=1, max_prompt_tokens=-1), ["quote.max_prompt_tokens"]),
        (quote_pb2.Quote(model="free-model", max_tokens=1), ["quote.model"]),
    ],
)
async def test_bad_quotes_name_each_bad_field(
    quotes: Quotes, request_quote: quote_pb2.Quote, fields: list[str]
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await quotes.create("0x" + "c" * 40, request_quote)
    assert [violation.field for violation in caught.value.violations] == fields


async def test_unknown_model_and_other_accounts_quotes_are_not_found(quotes: Quotes) -> None:
    with pytest.raises(NotFound) as caught:
        await quotes.create("0x" + "d" * 40, quote_pb2.Quote(model="models/nope", max_tokens=1))
    assert caught.value.reason == "MODEL_NOT_FOUND"
    quote = await quotes.create("0x" + "d" * 40, quote_pb2.Quote(model="models/free-model", max_tokens=1))
    for owner, name in (("0x" + "e" * 40, quote.name), ("0x" + "d" * 40, "quotes/qnothere")):
        with pytest.raises(NotFound) as caught:
            await quotes.get(owner, name)
        assert caught.value.reason == "QUOTE_NOT_FOUND"


async def test_quotes_are_rate_limited_per_account(quotes: Quotes) -> None:
    request = quote_pb2.Quote(model="models/free-model", max_tokens=1)
    for _ in range(5):
        await quotes.create("0x" + "f" * 40, request)
    with pytest.raises(ResourceExhausted) as caught:
        await quotes.create("0x" + "f" * 40, request)
    assert caught.value.reason == "RATE_LIMITED"
    assert caught.value.retry_after_s is not None
    assert 0 < caught.value.retry_after_s <= 60
    await quotes.create("0x" + "0" * 40, request)  # another account is not affected


async def test_an_unreachable_chain_fails_the_refresh_not_the_free_models(deployment: Deployment) -> None:
    from devstack.processes import free_port

    env = {"BSC_RPC_URL": f"http://127.0.0.1:{free_port()}", "CHAIN_ID": "97", **deployment.env()}
    dead = Chain(ChainSettings.from_env(env), backoff_s=0.01)
    try:
        prices = Prices(dead, [PAID, FREE])
        with pytest.raises(DomainError) as caught:
            await prices.refresh()
        assert caught.value.reason == "CHAIN_UNAVAILABLE"
        assert prices.price(PAID) is None
        assert prices.price(FREE) == 0
    finally:
        await dead.close()
