"""servers.ingest against the real anvil, PostgreSQL and Redis: confirmed events only, bounded ranges, a
cursor that survives restarts, retractions after reorgs, and the process itself."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from eth_account.signers.local import LocalAccount
from far.chain.v1 import chain_events_pb2 as pb
from redis.asyncio import Redis
from sqlalchemy import func, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from web3 import Web3

from devstack.chain import FAR, Anvil, Deployment, job_key, model_key, transact
from servers.common.chain import Chain
from servers.common.db import Database, async_url
from servers.common.events import EventBus
from servers.common.migrations import upgrade
from servers.common.outbox import Outbox
from servers.ingest.ingester import SCHEMA, Ingester, cursors, metadata, outbox, published_events
from tests.chain.chain_support import Contracts, chain_env

MODEL = model_key("smollm2-135m-instruct")
PRICE = 10**12
TOKENS = 1_000
AMOUNT = TOKENS * PRICE
JOB = job_key("01jd5m0qv3ingesttest")
PAYMENTS = "chain.inference_payment"
STAKING = "chain.staking"
TOKEN = "chain.far_token"


@pytest.fixture(scope="module")
def ingest_database_url(database_url: str) -> str:
    upgrade("ingest", database_url)
    return database_url


def _differences(connection: Connection) -> list[Any]:
    def only_ingest(name: str | None, type_: str, parent_names: dict[str, Any]) -> bool:
        return name == SCHEMA if type_ == "schema" else True

    context = MigrationContext.configure(
        connection, opts={"include_schemas": True, "include_name": only_ingest, "version_table_schema": SCHEMA}
    )
    return list(compare_metadata(context, metadata))


async def test_migrations_match_the_tables(ingest_database_url: str) -> None:
    engine = create_async_engine(async_url(ingest_database_url))
    try:
        async with engine.connect() as connection:
            assert await connection.run_sync(_differences) == []
    finally:
        await engine.dispose()


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, decode_responses=False)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def bus(redis_client: Redis, redis_key_prefix: str) -> EventBus:
    return EventBus(redis_client, f"{redis_key_prefix}ingest-{uuid.uuid4().hex[:8]}:")


@pytest.fixture
async def database(ingest_database_url: str, bus: EventBus) -> AsyncIterator[Database]:
    db = Database(ingest_database_url, events=bus, outbox=Outbox(outbox, bus, source="ingest"), pool_size=2)
    async with db.engine.begin() as connection:
        await connection.execute(text("TRUNCATE ingest.cursors, ingest.blocks, ingest.published_events, ingest.outbox"))
    try:
        yield db
    finally:
        await db.close()


@pytest.fixture
def start_block(w3: Web3) -> int:
    """Each test ingests only the blocks it makes (the session's deployment comes before)."""
    return int(w3.eth.block_number) + 1


@pytest.fixture
def priced(w3: Web3, contracts: Contracts, owner: LocalAccount, alice: LocalAccount, start_block: int) -> None:
    transact(w3, owner, contracts.payment.functions.setPrice(MODEL, PRICE))
    transact(w3, alice, contracts.token.functions.approve(contracts.payment.address, 10 * AMOUNT))


def ingester(chain: Chain, database: Database, start: int, **options: Any) -> Ingester:
    return Ingester(chain, database, confirmations=options.pop("confirmations", 2), start_block=start, **options)


async def drain(ingest: Ingester) -> None:
    while await ingest.step():
        pass


async def events(bus: EventBus, topic: str) -> list[tuple[str, Any]]:
    """(kind, message) of every entry on the topic, in order."""
    found: list[tuple[str, Any]] = []
    for delivery in await bus.read_range(topic, count=1000):
        message: Any = pb.ChainEvent() if delivery.type == "far.chain.v1.ChainEvent" else pb.ChainEventRetracted()
        delivery.parse(message)
        kind = message.WhichOneof("event") if delivery.type == "far.chain.v1.ChainEvent" else "retracted"
        found.append((kind, message))
    return found


@pytest.mark.usefixtures("priced")
class TestIngester:
    async def test_publishes_confirmed_events_only(
        self,
        w3: Web3,
        anvil: Anvil,
        chain: Chain,
        database: Database,
        bus: EventBus,
        contracts: Contracts,
        alice: LocalAccount,
        start_block: int,
    ) -> None:
        ingest = ingester(chain, database, start_block)
        receipt = transact(w3, alice, contracts.payment.functions.pay(JOB, MODEL, TOKENS))
        await drain(ingest)
        # PriceSet is confirmed (two blocks on it counting its own); the payment has one block: not yet.
        assert [kind for kind, _ in await events(bus, PAYMENTS)] == ["price_set"]
        anvil.rpc("evm_mine")
        await drain(ingest)
        (_, price_set), (kind, paid) = await events(bus, PAYMENTS)
        assert price_set.price_set.model_key == "0x" + MODEL.hex()
        assert price_set.price_set.price_per_token.value == str(PRICE)
        assert kind == "payment_received"
        assert paid.payment_received.payment_job_id == "0x" + JOB.hex()
        assert paid.payment_received.payer == alice.address.lower()
        assert (paid.payment_received.amount.value, paid.payment_received.amount.symbol) == (str(AMOUNT), "FAR")
        block = w3.eth.get_block(receipt["blockNumber"])
        assert paid.log.chain_id == 97
        assert paid.log.contract == contracts.payment.address.lower()
        assert paid.log.tx_hash == receipt["transactionHash"].to_0x_hex()
        assert paid.log.block_number == receipt["blockNumber"]
        assert paid.log.block_hash == receipt["blockHash"].to_0x_hex()
        assert paid.log.block_time.seconds == block["timestamp"]
        assert receipt["logs"][paid.log.log_index]["address"] == contracts.payment.address
        # Each event carries a stable id from the outbox, and the outbox is empty once the published rows go.
        assert all(d.event_id.startswith("ingest:") for d in await bus.read_range(PAYMENTS))
        await database.forget_delivered_events()
        async with database.engine.connect() as connection:
            assert (await connection.execute(select(func.count()).select_from(outbox))).scalar_one() == 0

    async def test_staking_events(
        self,
        w3: Web3,
        anvil: Anvil,
        chain: Chain,
        database: Database,
        bus: EventBus,
        contracts: Contracts,
        owner: LocalAccount,
        alice: LocalAccount,
        start_block: int,
    ) -> None:
        transact(w3, alice, contracts.staking.functions.stake(5 * FAR))
        transact(w3, owner, contracts.staking.functions.notifyRewardAmount(1_000_000))
        anvil.rpc("anvil_mine", 2)
        await drain(ingester(chain, database, start_block))
        (kind, staked), (kind2, added) = await events(bus, STAKING)
        assert (kind, staked.staked.account, staked.staked.amount.value) == (
            "staked",
            alice.address.lower(),
            str(5 * FAR),
        )
        assert kind2 == "reward_added"
        assert added.reward_added.reward.value == "1000000"
        assert added.reward_added.period_finish_time.seconds == contracts.staking.functions.periodFinish().call()

    async def test_token_transfers(
        self,
        w3: Web3,
        anvil: Anvil,
        chain: Chain,
        database: Database,
        bus: EventBus,
        contracts: Contracts,
        owner: LocalAccount,
        alice: LocalAccount,
        start_block: int,
    ) -> None:
        receipt = transact(w3, alice, contracts.token.functions.transfer(owner.address, 7 * FAR))
        anvil.rpc("anvil_mine", 2)
        await drain(ingester(chain, database, start_block))
        transfers = [m for kind, m in await events(bus, TOKEN) if kind == "transfer"]
        (sent,) = [m for m in transfers if m.log.tx_hash == receipt["transactionHash"].to_0x_hex()]
        assert getattr(sent.transfer, "from") == alice.address.lower()
        assert sent.transfer.to == owner.address.lower()
        assert (sent.transfer.value.value, sent.transfer.value.symbol) == (str(7 * FAR), "FAR")
        assert sent.log.contract == contracts.token.address.lower()

    async def test_bounded_ranges_and_restarts(
        self,
        w3: Web3,
        anvil: Anvil,
        chain: Chain,
        database: Database,
        bus: EventBus,
        contracts: Contracts,
        alice: LocalAccount,
        start_block: int,
    ) -> None:
        transact(w3, alice, contracts.payment.functions.pay(JOB, MODEL, TOKENS))
        anvil.rpc("anvil_mine", 5)
        head = w3.eth.block_number
        first = ingester(chain, database, start_block, max_block_range=2)
        assert await first.step() == 2
        assert await first.step() == 2
        # A new process (a restart) carries on from the stored cursor: nothing twice, nothing skipped.
        second = ingester(chain, database, start_block, max_block_range=2)
        await drain(second)
        async with database.engine.connect() as connection:
            stored = (await connection.execute(select(cursors.c.block_number))).scalar_one()
        assert stored == head - 1  # two confirmations
        assert [kind for kind, _ in await events(bus, PAYMENTS)] == ["price_set", "payment_received"]
        assert await second.step() == 0

    async def test_a_reorg_retracts_and_republishes(
        self,
        w3: Web3,
        anvil: Anvil,
        chain: Chain,
        database: Database,
        bus: EventBus,
        contracts: Contracts,
        alice: LocalAccount,
        start_block: int,
    ) -> None:
        ingest = ingester(chain, database, start_block)
        receipt = transact(w3, alice, contracts.payment.functions.pay(JOB, MODEL, TOKENS))
        raw = w3.eth.get_raw_transaction(receipt["transactionHash"]).to_0x_hex()
        anvil.rpc("anvil_mine", 2)
        await drain(ingest)
        (_, _), (_, paid) = await events(bus, PAYMENTS)
        # The last three blocks, the payment's among them, are replaced; the payment is mined again
        # in the second of the new blocks.
        anvil.rpc("anvil_reorg", 3, [[raw, 1]])
        await drain(ingest)
        entries = await events(bus, PAYMENTS)
        assert [kind for kind, _ in entries] == ["price_set", "payment_received", "retracted", "payment_received"]
        retracted, again = entries[2][1], entries[3][1]
        assert retracted.log == paid.log
        assert (again.log.tx_hash, again.log.log_index) == (paid.log.tx_hash, paid.log.log_index)
        assert again.log.block_hash != paid.log.block_hash
        assert again.log.block_number == paid.log.block_number + 1
        assert again.log.block_hash == w3.eth.get_block(again.log.block_number)["hash"].to_0x_hex()

    async def test_a_reorg_that_drops_the_payment(
        self,
        w3: Web3,
        anvil: Anvil,
        chain: Chain,
        database: Database,
        bus: EventBus,
        contracts: Contracts,
        alice: LocalAccount,
        start_block: int,
    ) -> None:
        ingest = ingester(chain, database, start_block)
        transact(w3, alice, contracts.payment.functions.pay(JOB, MODEL, TOKENS))
        anvil.rpc("anvil_mine", 2)
        await drain(ingest)
        anvil.rpc("anvil_reorg", 3, [])
        anvil.rpc("anvil_mine", 3)
        await drain(ingest)
        assert [kind for kind, _ in await events(bus, PAYMENTS)] == ["price_set", "payment_received", "retracted"]
        async with database.engine.connect() as connection:
            rows = (await connection.execute(select(func.count()).select_from(published_events))).scalar_one()
        assert rows == 1  # PriceSet's, kept for a later reorg

    async def test_two_ingesters_publish_each_event_once(
        self,
        w3: Web3,
        anvil: Anvil,
        chain: Chain,
        database: Database,
        bus: EventBus,
        contracts: Contracts,
        alice: LocalAccount,
        start_block: int,
        ingest_database_url: str,
    ) -> None:
        other = Database(ingest_database_url, events=bus, outbox=Outbox(outbox, bus, source="ingest"), pool_size=1)
        try:
            replicas = [ingester(chain, database, start_block), ingester(chain, other, start_block)]
            for job in ("one", "two"):  # the first step creates the cursor, the second moves a stored one
                transact(w3, alice, contracts.payment.functions.pay(job_key(job), MODEL, TOKENS))
                anvil.rpc("anvil_mine", 2)
                for _ in range(2):
                    await asyncio.gather(*(replica.step() for replica in replicas))
        finally:
            await other.close()
        kinds = [kind for kind, _ in await events(bus, PAYMENTS)]
        assert kinds == ["price_set", "payment_received", "payment_received"]

    async def test_a_log_from_another_fork_waits_for_the_next_step(
        self,
        w3: Web3,
        anvil: Anvil,
        chain: Chain,
        database: Database,
        bus: EventBus,
        contracts: Contracts,
        alice: LocalAccount,
        start_block: int,
    ) -> None:
        receipt = transact(w3, alice, contracts.payment.functions.pay(JOB, MODEL, TOKENS))
        anvil.rpc("anvil_mine", 2)
        real_block = chain.block

        async def another_fork(number: int) -> Any:
            header = await real_block(number)
            if number == receipt["blockNumber"] and header is not None:
                return {**header, "hash": b"\x01" * 32}
            return header

        chain.block = another_fork  # type: ignore[method-assign]
        ingest = ingester(chain, database, start_block)
        assert await ingest.step() == 0
        assert await events(bus, PAYMENTS) == []
        chain.block = real_block  # type: ignore[method-assign]
        await drain(ingest)
        assert [kind for kind, _ in await events(bus, PAYMENTS)] == ["price_set", "payment_received"]


@pytest.fixture
def process_env(
    anvil: Anvil, deployment: Deployment, ingest_database_url: str, redis_url: str, redis_key_prefix: str
) -> dict[str, str]:
    prefix = f"{redis_key_prefix}ingest-process-{uuid.uuid4().hex[:8]}:"
    return {
        **os.environ,
        **chain_env(anvil, deployment),
        "DATABASE_URL": ingest_database_url,
        "REDIS_URL": redis_url,
        "REDIS_KEY_PREFIX": prefix,
        "CHAIN_CONFIRMATIONS": "1",
        "INGEST_POLL_SECONDS": "0.1",
        "LOG_FORMAT": "console",
    }


class TestProcess:
    def test_bad_configuration_exits_2_with_one_line(self, process_env: dict[str, str]) -> None:
        env = {**process_env, "FAR_STAKING_ADDRESS": "0x12"}
        done = subprocess.run(
            [sys.executable, "-m", "servers.ingest"], env=env, capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 2
        assert done.stderr.strip().splitlines() == [
            "far-ingest: configuration error: FAR_STAKING_ADDRESS='0x12' is not a 0x-prefixed 20-byte hex address"
        ]

    @pytest.mark.usefixtures("priced")
    async def test_runs_until_sigterm(
        self,
        w3: Web3,
        database: Database,
        contracts: Contracts,
        alice: LocalAccount,
        process_env: dict[str, str],
        redis_client: Redis,
        start_block: int,
    ) -> None:
        receipt = transact(w3, alice, contracts.payment.functions.pay(JOB, MODEL, TOKENS))
        env = {**process_env, "INGEST_START_BLOCK": str(receipt["blockNumber"])}
        process = await asyncio.create_subprocess_exec(sys.executable, "-m", "servers.ingest", env=env)
        try:
            bus = EventBus(redis_client, env["REDIS_KEY_PREFIX"])
            deadline = time.monotonic() + 15
            while not await bus.read_range(PAYMENTS) and time.monotonic() < deadline:  # noqa: ASYNC110 - polling Redis
                await asyncio.sleep(0.1)
            (kind, paid), *_ = await events(bus, PAYMENTS)
            assert kind == "payment_received"
            assert paid.log.tx_hash == receipt["transactionHash"].to_0x_hex()
        finally:
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(15):
                assert await process.wait() == 0
