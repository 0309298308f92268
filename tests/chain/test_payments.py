"""servers.common.payments: a real payment on anvil is accepted, every bad one is refused with its reason,
and a payment is consumed once in PostgreSQL however many transactions race for it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from eth_account.signers.local import LocalAccount
from google.rpc import code_pb2, error_details_pb2
from hexbytes import HexBytes
from sqlalchemy import MetaData, func, select, text
from web3 import Web3
from web3.contract.contract import ContractFunction
from web3.logs import DISCARD
from web3.types import TxParams, TxReceipt

from devstack.chain import Anvil, contract_at, deploy, job_key, model_key, transact
from servers.common.chain import Chain
from servers.common.db import Database
from servers.common.errors import DomainError, to_rpc_status
from servers.common.payments import (
    PaymentAlreadyUsed,
    PaymentMismatch,
    PaymentNotFound,
    PaymentUnconfirmed,
    VerifiedPayment,
    consume_payment,
    payment_consumptions_table,
    verify_payment,
)
from tests.chain.chain_support import Contracts

MODEL = model_key("smollm2-135m-instruct")
PRICE = 10**12
TOKENS = 1_000
AMOUNT = TOKENS * PRICE
JOB = job_key("01jd5m0qv3paymenttest")
SCHEMA = "payments_test"
CONSUMPTIONS = payment_consumptions_table(MetaData(schema=SCHEMA))


@pytest.fixture
def priced(w3: Web3, contracts: Contracts, owner: LocalAccount, alice: LocalAccount) -> None:
    transact(w3, owner, contracts.payment.functions.setPrice(MODEL, PRICE))
    transact(w3, alice, contracts.token.functions.approve(contracts.payment.address, 10 * AMOUNT))


def send(w3: Web3, sender: LocalAccount, call: ContractFunction, *, gas: int | None = None) -> HexBytes:
    """Sign and send without waiting or checking (the transaction may stay pending or revert)."""
    params: dict[str, Any] = {"from": sender.address, "nonce": w3.eth.get_transaction_count(sender.address, "pending")}
    if gas is not None:
        params["gas"] = gas
    tx: Any = call.build_transaction(TxParams(**params))  # type: ignore[typeddict-item]
    return HexBytes(w3.eth.send_raw_transaction(sender.sign_transaction(tx).raw_transaction))


def pay(w3: Web3, contracts: Contracts, payer: LocalAccount, job: bytes = JOB) -> TxReceipt:
    return transact(w3, payer, contracts.payment.functions.pay(job, MODEL, TOKENS))


async def refused(chain: Chain, tx_hash: HexBytes | str, **overrides: Any) -> DomainError:
    checks: dict[str, Any] = {"job_id": JOB, "payer": overrides.pop("payer_address", None), "min_amount": AMOUNT}
    checks.update(overrides)
    with pytest.raises(DomainError) as caught:
        await verify_payment(chain, tx_hash if isinstance(tx_hash, str) else tx_hash.to_0x_hex(), **checks)
    return caught.value


@pytest.mark.usefixtures("priced")
class TestVerifyPayment:
    async def test_accepts_a_good_payment(
        self, w3: Web3, chain: Chain, contracts: Contracts, alice: LocalAccount
    ) -> None:
        receipt = pay(w3, contracts, alice)
        payment = await verify_payment(
            chain, receipt["transactionHash"].to_0x_hex(), job_id=JOB, payer=alice.address, min_amount=AMOUNT
        )
        block = w3.eth.get_block(receipt["blockNumber"])
        assert payment == VerifiedPayment(
            chain_id=97,
            tx_hash=receipt["transactionHash"].to_0x_hex(),
            log_index=payment.log_index,
            block_number=receipt["blockNumber"],
            block_hash=receipt["blockHash"].to_0x_hex(),
            block_time=payment.block_time,
            payment_contract=contracts.payment.address.lower(),
            payment_job_id="0x" + JOB.hex(),
            payer=alice.address.lower(),
            amount=AMOUNT,
            confirmations=1,
        )
        assert int(payment.block_time.timestamp()) == block["timestamp"]
        # The PaymentReceived log, not the token's Transfer that follows it.
        assert receipt["logs"][payment.log_index]["address"] == contracts.payment.address
        # Upper-case input, the job id as hex, more than the price asked: the same payment.
        again = await verify_payment(
            chain,
            receipt["transactionHash"],
            job_id="0x" + JOB.hex().upper(),
            payer=alice.address.upper().replace("0X", "0x"),
            min_amount=AMOUNT - 1,
        )
        assert again == payment

    async def test_wrong_job(self, w3: Web3, chain: Chain, contracts: Contracts, alice: LocalAccount) -> None:
        receipt = pay(w3, contracts, alice)
        error = await refused(chain, receipt["transactionHash"], payer_address=alice.address, job_id=job_key("other"))
        assert isinstance(error, PaymentMismatch)
        assert (error.reason, error.metadata["field"]) == ("PAYMENT_MISMATCH", "payment_job_id")

    async def test_another_payer(
        self, w3: Web3, chain: Chain, contracts: Contracts, alice: LocalAccount, bob: LocalAccount
    ) -> None:
        receipt = pay(w3, contracts, alice)
        error = await refused(chain, receipt["transactionHash"], payer_address=bob.address)
        assert isinstance(error, PaymentMismatch)
        assert error.metadata["field"] == "payer"

    async def test_too_low(self, w3: Web3, chain: Chain, contracts: Contracts, alice: LocalAccount) -> None:
        receipt = pay(w3, contracts, alice)
        error = await refused(chain, receipt["transactionHash"], payer_address=alice.address, min_amount=AMOUNT + 1)
        assert isinstance(error, PaymentMismatch)
        assert error.metadata["field"] == "amount"

    async def test_too_few_confirmations(
        self, w3: Web3, anvil: Anvil, chain: Chain, contracts: Contracts, alice: LocalAccount
    ) -> None:
        receipt = pay(w3, contracts, alice)
        tx = receipt["transactionHash"]
        error = await refused(chain, tx, payer_address=alice.address, confirmations=3)
        assert isinstance(error, PaymentUnconfirmed)
        assert error.reason == "PAYMENT_UNCONFIRMED"
        assert error.metadata == {
            "tx_hash": tx.to_0x_hex(),
            "cause": "shallow",
            "confirmations": "1",
            "required_confirmations": "3",
        }
        assert error.retry_after_s == 2 * chain.settings.block_time_s
        status = to_rpc_status(error, "inference.far.network")
        assert status.code == code_pb2.FAILED_PRECONDITION
        retry = error_details_pb2.RetryInfo()
        assert status.details[1].Unpack(retry)
        assert retry.retry_delay.seconds == 6
        anvil.rpc("anvil_mine", 2)
        payment = await verify_payment(
            chain, tx.to_0x_hex(), job_id=JOB, payer=alice.address, min_amount=AMOUNT, confirmations=3
        )
        assert payment.confirmations == 3

    async def test_pending(
        self, w3: Web3, anvil: Anvil, chain: Chain, contracts: Contracts, alice: LocalAccount
    ) -> None:
        anvil.rpc("evm_setAutomine", False)
        try:
            tx = send(w3, alice, contracts.payment.functions.pay(JOB, MODEL, TOKENS), gas=300_000)
            error = await refused(chain, tx, payer_address=alice.address)
            assert isinstance(error, PaymentUnconfirmed)
            assert (error.metadata["cause"], error.metadata["confirmations"]) == ("pending", "0")
            anvil.rpc("evm_mine")
        finally:
            anvil.rpc("evm_setAutomine", True)
        assert (await verify_payment(chain, tx, job_id=JOB, payer=alice.address, min_amount=AMOUNT)).amount == AMOUNT

    async def test_reverted(self, w3: Web3, chain: Chain, contracts: Contracts, alice: LocalAccount) -> None:
        transact(w3, alice, contracts.payment.functions.pay(JOB, MODEL, TOKENS))
        # Paying the same job again reverts (JobAlreadyPaid); with a fixed gas limit it is mined anyway.
        tx = send(w3, alice, contracts.payment.functions.pay(JOB, MODEL, TOKENS), gas=300_000)
        assert w3.eth.wait_for_transaction_receipt(tx)["status"] == 0
        error = await refused(chain, tx, payer_address=alice.address)
        assert isinstance(error, PaymentNotFound)
        assert (error.reason, error.metadata["cause"]) == ("PAYMENT_NOT_FOUND", "reverted")

    async def test_unknown_transaction(self, chain: Chain, alice: LocalAccount) -> None:
        error = await refused(chain, "0x" + "ab" * 32, payer_address=alice.address)
        assert isinstance(error, PaymentNotFound)
        assert error.metadata["cause"] == "unknown_transaction"

    async def test_not_a_payment(self, w3: Web3, chain: Chain, contracts: Contracts, alice: LocalAccount) -> None:
        receipt = transact(w3, alice, contracts.token.functions.transfer(contracts.payment.address, AMOUNT))
        error = await refused(chain, receipt["transactionHash"], payer_address=alice.address)
        assert isinstance(error, PaymentNotFound)
        assert error.metadata["cause"] == "no_payment_event"

    async def test_a_look_alike_contract_does_not_count(
        self, w3: Web3, chain: Chain, contracts: Contracts, owner: LocalAccount, alice: LocalAccount
    ) -> None:
        # A second, real InferencePayment emits the very same PaymentReceived event: not ours.
        address, _ = deploy(w3, owner, "InferencePayment", contracts.token.address, owner.address)
        look_alike = contract_at(w3, "InferencePayment", address)
        transact(w3, owner, look_alike.functions.setPrice(MODEL, PRICE))
        transact(w3, alice, contracts.token.functions.approve(address, AMOUNT))
        receipt = transact(w3, alice, look_alike.functions.pay(JOB, MODEL, TOKENS))
        assert look_alike.events.PaymentReceived().process_receipt(receipt, errors=DISCARD)[0]["args"]["jobId"] == JOB
        error = await refused(chain, receipt["transactionHash"], payer_address=alice.address)
        assert isinstance(error, PaymentNotFound)
        assert error.metadata == {
            "tx_hash": receipt["transactionHash"].to_0x_hex(),
            "cause": "no_payment_event",
            "payment_contract": contracts.payment.address.lower(),
        }

    async def test_reorged_out(
        self, w3: Web3, anvil: Anvil, chain: Chain, contracts: Contracts, alice: LocalAccount
    ) -> None:
        receipt = pay(w3, contracts, alice)
        tx = receipt["transactionHash"]
        anvil.rpc("anvil_mine", 2)
        await verify_payment(chain, tx, job_id=JOB, payer=alice.address, min_amount=AMOUNT, confirmations=3)
        # The last three blocks, the payment's among them, are replaced by empty ones.
        anvil.rpc("anvil_reorg", 3, [])
        assert w3.eth.get_block(receipt["blockNumber"])["hash"] != receipt["blockHash"]
        error = await refused(chain, tx, payer_address=alice.address)
        assert isinstance(error, PaymentNotFound)
        assert error.metadata["cause"] == "unknown_transaction"

    async def test_reverted_snapshot(
        self, w3: Web3, anvil: Anvil, chain: Chain, contracts: Contracts, alice: LocalAccount
    ) -> None:
        snapshot = anvil.rpc("evm_snapshot")
        tx = pay(w3, contracts, alice)["transactionHash"]
        assert (await verify_payment(chain, tx, job_id=JOB, payer=alice.address, min_amount=AMOUNT)).amount == AMOUNT
        assert anvil.rpc("evm_revert", snapshot) is True
        anvil.rpc("anvil_mine", 3)
        assert isinstance(await refused(chain, tx, payer_address=alice.address), PaymentNotFound)

    async def test_a_stale_receipt_of_a_reorged_block(
        self, w3: Web3, anvil: Anvil, chain: Chain, contracts: Contracts, alice: LocalAccount
    ) -> None:
        """A node (or a load-balanced pool of them) that still serves the receipt of a replaced block."""
        receipt = pay(w3, contracts, alice)
        stale = await chain.receipt(receipt["transactionHash"])
        anvil.rpc("anvil_reorg", 1, [])
        anvil.rpc("anvil_mine", 2)

        async def lagging_receipt(tx_hash: str | bytes) -> Any:
            return stale

        chain.receipt = lagging_receipt  # type: ignore[method-assign]
        error = await refused(chain, receipt["transactionHash"], payer_address=alice.address)
        assert isinstance(error, PaymentUnconfirmed)
        assert (error.metadata["cause"], error.metadata["confirmations"]) == ("reorged", "0")

    async def test_mined_again_after_a_reorg(
        self, w3: Web3, anvil: Anvil, chain: Chain, contracts: Contracts, alice: LocalAccount
    ) -> None:
        anvil.rpc("evm_setAutomine", False)
        try:
            tx = send(w3, alice, contracts.payment.functions.pay(JOB, MODEL, TOKENS), gas=300_000)
            raw = w3.eth.get_raw_transaction(tx).to_0x_hex()
            anvil.rpc("evm_mine")
        finally:
            anvil.rpc("evm_setAutomine", True)
        anvil.rpc("evm_mine")
        first = await verify_payment(chain, tx, job_id=JOB, payer=alice.address, min_amount=AMOUNT)
        # Both blocks replaced, the payment mined again in the second (a block of its own number: a new hash).
        anvil.rpc("anvil_reorg", 2, [[raw, 1]])
        second = await verify_payment(chain, tx, job_id=JOB, payer=alice.address, min_amount=AMOUNT)
        assert second.block_number == first.block_number + 1
        assert second.block_hash != first.block_hash
        # The same payment (tx hash, log index): it can still be consumed only once.
        assert (second.tx_hash, second.log_index) == (first.tx_hash, first.log_index)


# --- Consumption in PostgreSQL ---------------------------------------------------------------------


@pytest.fixture(scope="module")
async def database(database_url: str) -> AsyncIterator[Database]:
    db = Database(database_url, pool_size=8)
    async with db.engine.begin() as connection:
        await connection.execute(text(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
        await connection.run_sync(CONSUMPTIONS.metadata.create_all)
    try:
        yield db
    finally:
        await db.close()


def a_payment(n: int) -> VerifiedPayment:
    return VerifiedPayment(
        chain_id=97,
        tx_hash="0x" + f"{n:064x}",
        log_index=0,
        block_number=10,
        block_hash="0x" + "cd" * 32,
        block_time=datetime(2026, 11, 25, tzinfo=UTC),
        payment_contract="0x" + "ef" * 20,
        payment_job_id="0x" + JOB.hex(),
        payer="0x" + "12" * 20,
        amount=10**30,
        confirmations=1,
    )


async def consumptions(database: Database, payment: VerifiedPayment) -> list[str]:
    async with database.read() as unit:
        rows = await unit.session.execute(
            select(CONSUMPTIONS.c.resource).where(CONSUMPTIONS.c.tx_hash == payment.tx_hash)
        )
        return list(rows.scalars())


class TestConsumePayment:
    async def test_once(self, database: Database) -> None:
        payment = a_payment(1)
        async with database.transaction() as unit:
            await consume_payment(unit.session, CONSUMPTIONS, payment, resource="jobs/a")
        with pytest.raises(PaymentAlreadyUsed) as caught:
            async with database.transaction() as unit:
                await consume_payment(unit.session, CONSUMPTIONS, payment, resource="jobs/b")
        assert caught.value.reason == "PAYMENT_ALREADY_USED"
        assert caught.value.metadata == {"tx_hash": payment.tx_hash, "log_index": "0", "resource": "jobs/a"}
        assert to_rpc_status(caught.value, "x").code == code_pb2.ALREADY_EXISTS
        assert await consumptions(database, payment) == ["jobs/a"]

    async def test_another_log_of_the_same_transaction_is_another_payment(self, database: Database) -> None:
        payment = a_payment(2)
        async with database.transaction() as unit:
            await consume_payment(unit.session, CONSUMPTIONS, payment, resource="jobs/a")
            await consume_payment(unit.session, CONSUMPTIONS, replace(payment, log_index=3), resource="jobs/b")
        assert sorted(await consumptions(database, payment)) == ["jobs/a", "jobs/b"]

    async def test_a_rolled_back_consumption_frees_the_payment(self, database: Database) -> None:
        payment = a_payment(3)

        class JobFailed(Exception):
            pass

        async def failing_job() -> None:
            async with database.transaction() as unit:
                await consume_payment(unit.session, CONSUMPTIONS, payment, resource="jobs/a")
                raise JobFailed

        with pytest.raises(JobFailed):
            await failing_job()
        async with database.transaction() as unit:
            await consume_payment(unit.session, CONSUMPTIONS, payment, resource="jobs/b")
        assert await consumptions(database, payment) == ["jobs/b"]

    async def test_the_transaction_stays_usable_after_the_error(self, database: Database) -> None:
        payment = a_payment(4)
        async with database.transaction() as unit:
            await consume_payment(unit.session, CONSUMPTIONS, payment, resource="jobs/a")
        async with database.transaction() as unit:
            with pytest.raises(PaymentAlreadyUsed):
                await consume_payment(unit.session, CONSUMPTIONS, payment, resource="jobs/b")
            assert (await unit.session.execute(select(func.count()).select_from(CONSUMPTIONS))).scalar_one() >= 1

    async def test_concurrent_attempts_one_wins(self, database: Database) -> None:
        payment = a_payment(5)
        started = asyncio.Event()

        async def attempt(n: int) -> str:
            try:
                async with database.transaction() as unit:
                    await unit.session.execute(text("SELECT 1"))  # every transaction is open before any inserts
                    await started.wait()
                    await consume_payment(unit.session, CONSUMPTIONS, payment, resource=f"jobs/{n}")
                    await asyncio.sleep(0.05)  # hold the row uncommitted while the others try
                return f"jobs/{n}"
            except PaymentAlreadyUsed:
                return "used"

        tasks = [asyncio.create_task(attempt(n)) for n in range(8)]
        await asyncio.sleep(0.1)
        started.set()
        results = await asyncio.gather(*tasks)
        winners = [r for r in results if r != "used"]
        assert len(winners) == 1
        assert await consumptions(database, payment) == winners


class TestArguments:
    async def test_a_malformed_tx_hash_is_invalid_argument(self, chain: Chain, alice: LocalAccount) -> None:
        error = await refused(chain, "0x1234", payer_address=alice.address)
        assert error.reason == "INVALID_ARGUMENT"
        assert to_rpc_status(error, "x").code == code_pb2.INVALID_ARGUMENT

    @pytest.mark.parametrize(
        ("job_id", "payer"), [(b"short", "0x" + "12" * 20), (JOB, "0x1234"), ("abc", "0x" + "12" * 20)]
    )
    async def test_malformed_expectations_are_programming_errors(
        self, chain: Chain, job_id: bytes | str, payer: str
    ) -> None:
        with pytest.raises(ValueError, match="must be"):
            await verify_payment(chain, "0x" + "ab" * 32, job_id=job_id, payer=payer, min_amount=1)
