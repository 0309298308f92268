"""On-chain payments: verify a PaymentReceived of the InferencePayment contract, and consume it once.

    payment = await verify_payment(chain, tx_hash, job_id=quote.payment_job_id, payer=principal.wallet,
                                   min_amount=quote.price)
    async with database.transaction() as unit:
        await consume_payment(unit.session, CONSUMPTIONS, payment, resource=f"jobs/{job_id}")
        ...insert the job...                      # the same transaction: both commit, or neither

Verification reads the chain only; consumption is the row in the service's own `payment_consumptions`
table, unique per (chain id, tx hash, log index), so a payment pays for one resource, once, even when
several replicas race for it. The errors follow the inference service's contract
(`far.inference.v1.InferenceService.Generate`):

- PAYMENT_NOT_FOUND (FAILED_PRECONDITION): the node does not know the transaction (metadata `cause`
  unknown_transaction), it reverted (`reverted`), or it holds no PaymentReceived emitted by exactly the
  configured contract (`no_payment_event`: a look-alike contract's event does not count). Metadata
  tx_hash, cause, payment_contract.
- PAYMENT_UNCONFIRMED (FAILED_PRECONDITION, with RetryInfo): pending (`cause` pending), fewer blocks
  than required (`shallow`), or its block is no longer canonical (`reorged`; it may be mined again).
  Metadata tx_hash, cause, confirmations, required_confirmations.
- PAYMENT_MISMATCH (FAILED_PRECONDITION): for another job (metadata `field` payment_job_id), from
  another wallet (`payer`), or below the price (`amount`). Metadata tx_hash, field.
- PAYMENT_ALREADY_USED (ALREADY_EXISTS): consumed before. Metadata tx_hash, log_index, resource (what
  it paid for).
- CHAIN_UNAVAILABLE (UNAVAILABLE): the node cannot be reached (servers.common.chain). Metadata call.

ALREADY_EXISTS rather than FAILED_PRECONDITION for a used payment: what the caller asks for (a resource
paid by this payment) exists already, and `resource` names it, so a retry that lost its answer can find it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from hexbytes import HexBytes
from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Integer,
    MetaData,
    Numeric,
    PrimaryKeyConstraint,
    Table,
    Text,
    func,
    select,
)
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession
from web3.types import LogReceipt

from servers.common.chain import Chain
from servers.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument

_TX_HASH = re.compile(r"^0x[0-9a-fA-F]{64}\Z")
_BYTES32 = re.compile(r"^0x[0-9a-fA-F]{64}\Z")
_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}\Z")


class PaymentNotFound(FailedPrecondition):
    default_reason = "PAYMENT_NOT_FOUND"


class PaymentUnconfirmed(FailedPrecondition):
    default_reason = "PAYMENT_UNCONFIRMED"

    def __init__(self, message: str, *, retry_after_s: float, metadata: dict[str, str]) -> None:
        super().__init__(message, metadata=metadata)
        self.retry_after_s = retry_after_s


class PaymentMismatch(FailedPrecondition):
    default_reason = "PAYMENT_MISMATCH"


class PaymentAlreadyUsed(AlreadyExists):
    default_reason = "PAYMENT_ALREADY_USED"


@dataclass(frozen=True, slots=True)
class VerifiedPayment:
    """A PaymentReceived event that passed every check. Hex strings are 0x-prefixed and lower-case."""

    chain_id: int
    tx_hash: str
    log_index: int
    block_number: int
    block_hash: str
    block_time: datetime
    payment_contract: str
    payment_job_id: str
    payer: str
    amount: int
    confirmations: int


def _hex(value: bytes | str) -> str:
    return HexBytes(value).to_0x_hex().lower()


def _tx_hash(tx_hash: str | bytes) -> str:
    if isinstance(tx_hash, bytes) and len(tx_hash) == 32:
        return _hex(tx_hash)
    if isinstance(tx_hash, str) and _TX_HASH.match(tx_hash):
        return tx_hash.lower()
    raise InvalidArgument.field("tx_hash", "must be 0x and 64 hex characters")


def _job_id(job_id: bytes | str) -> str:
    if isinstance(job_id, bytes) and len(job_id) == 32:
        return _hex(job_id)
    if isinstance(job_id, str) and _BYTES32.match(job_id):
        return job_id.lower()
    raise ValueError("job_id must be 32 bytes or 0x and 64 hex characters (keccak256 of the job id)")


def _wallet(payer: str) -> str:
    if not _ADDRESS.match(payer):
        raise ValueError("payer must be a 0x-prefixed 20-byte address")
    return payer.lower()


@dataclass(frozen=True, slots=True)
class _Event:
    log_index: int
    job_id: str
    payer: str
    amount: int


def _payment_events(chain: Chain, logs: list[LogReceipt]) -> list[_Event]:
    """The PaymentReceived events emitted by exactly the configured contract (web3 does not check emitters)."""
    contract = chain.inference_payment
    event = contract.events.PaymentReceived()
    topic = HexBytes(event.topic)
    found = []
    for entry in logs:
        if entry.get("removed") or entry["address"].lower() != contract.address.lower():
            continue
        if not entry["topics"] or HexBytes(entry["topics"][0]) != topic:
            continue
        args: Any = event.process_log(entry)["args"]
        found.append(
            _Event(int(entry["logIndex"]), _hex(args["jobId"]), str(args["payer"]).lower(), int(args["amount"]))
        )
    return found


async def verify_payment(
    chain: Chain,
    tx_hash: str | bytes,
    *,
    job_id: bytes | str,
    payer: str,
    min_amount: int,
    confirmations: int | None = None,
) -> VerifiedPayment:
    """Check that transaction `tx_hash` paid job `job_id` (bytes32: keccak256 of the job id) from wallet
    `payer`, at least `min_amount` (smallest unit), to the configured InferencePayment contract, and that
    its block is canonical with at least `confirmations` blocks (default: CHAIN_CONFIRMATIONS) counting
    its own. Raises the errors the module docstring lists; reads the chain only (consume it with
    `consume_payment`). The caller checks `block_time` against the quote's expiry.
    """
    tx = _tx_hash(tx_hash)
    wanted_job = _job_id(job_id)
    wanted_payer = _wallet(payer)
    required = chain.settings.confirmations if confirmations is None else confirmations
    contract = chain.inference_payment.address.lower()

    def unconfirmed(message: str, cause: str, depth: int) -> PaymentUnconfirmed:
        missing = max(1, required - depth)
        metadata = {"tx_hash": tx, "cause": cause, "confirmations": str(depth), "required_confirmations": str(required)}
        return PaymentUnconfirmed(message, retry_after_s=missing * chain.settings.block_time_s, metadata=metadata)

    receipt = await chain.receipt(tx)
    if receipt is None:
        if await chain.transaction(tx) is not None:
            raise unconfirmed(f"transaction {tx} is not mined yet", "pending", 0)
        raise PaymentNotFound(
            f"transaction {tx} is not on chain {chain.chain_id}",
            metadata={"tx_hash": tx, "cause": "unknown_transaction", "payment_contract": contract},
        )
    if receipt["status"] != 1:
        raise PaymentNotFound(
            f"transaction {tx} reverted: it paid nothing",
            metadata={"tx_hash": tx, "cause": "reverted", "payment_contract": contract},
        )
    events = _payment_events(chain, list(receipt["logs"]))
    if not events:
        raise PaymentNotFound(
            f"transaction {tx} holds no payment to the inference payment contract {contract}",
            metadata={"tx_hash": tx, "cause": "no_payment_event", "payment_contract": contract},
        )
    paid = next((e for e in events if e.job_id == wanted_job), None)
    if paid is None:
        raise PaymentMismatch(
            f"transaction {tx} paid another job, not {wanted_job}", metadata={"tx_hash": tx, "field": "payment_job_id"}
        )
    if paid.payer != wanted_payer:
        raise PaymentMismatch(
            f"the payment in {tx} came from {paid.payer}, not from the caller's wallet {wanted_payer}",
            metadata={"tx_hash": tx, "field": "payer"},
        )
    if paid.amount < min_amount:
        raise PaymentMismatch(
            f"the payment in {tx} is {paid.amount}, less than the price {min_amount}",
            metadata={"tx_hash": tx, "field": "amount"},
        )

    head = await chain.block_number()
    block_number = int(receipt["blockNumber"])
    block = await chain.block(block_number)
    if block is None or HexBytes(block["hash"]) != HexBytes(receipt["blockHash"]):
        raise unconfirmed(f"the block of transaction {tx} is no longer canonical (a reorg)", "reorged", 0)
    depth = head - block_number + 1
    if depth < required:
        raise unconfirmed(f"transaction {tx} has {depth} of {required} confirmations", "shallow", max(depth, 0))
    return VerifiedPayment(
        chain_id=chain.chain_id,
        tx_hash=tx,
        log_index=paid.log_index,
        block_number=block_number,
        block_hash=_hex(receipt["blockHash"]),
        block_time=datetime.fromtimestamp(int(block["timestamp"]), UTC),
        payment_contract=contract,
        payment_job_id=paid.job_id,
        payer=paid.payer,
        amount=paid.amount,
        confirmations=depth,
    )


def payment_consumptions_table(metadata: MetaData) -> Table:
    """The payments a service has consumed, in its own schema (add it to its metadata and migrations).

    One row per payment (chain id, tx hash, log index: the primary key, so a payment is consumed once)
    and the resource it paid for.
    """
    return Table(
        "payment_consumptions",
        metadata,
        Column("chain_id", BigInteger, nullable=False),
        Column("tx_hash", Text, nullable=False),
        Column("log_index", Integer, nullable=False),
        Column("resource", Text, nullable=False),
        Column("payment_contract", Text, nullable=False),
        Column("payment_job_id", Text, nullable=False),
        Column("payer", Text, nullable=False),
        Column("amount", Numeric(78, 0), nullable=False),
        Column("block_number", BigInteger, nullable=False),
        Column("block_hash", Text, nullable=False),
        Column("consume_time", DateTime(timezone=True), server_default=func.now(), nullable=False),
        PrimaryKeyConstraint("chain_id", "tx_hash", "log_index", name="payment_consumptions_pkey"),
        CheckConstraint("tx_hash = lower(tx_hash)", name="payment_consumptions_tx_hash_lower"),
    )


async def consume_payment(session: AsyncSession, table: Table, payment: VerifiedPayment, *, resource: str) -> None:
    """Record that `payment` pays for `resource` (e.g. `jobs/abc`), inside the caller's transaction.

    PaymentAlreadyUsed (ALREADY_EXISTS, `PAYMENT_ALREADY_USED`, metadata `resource`: what it paid for)
    when it was consumed before. Concurrent attempts wait on each other's row: exactly one commits it;
    if that transaction rolls back, the payment is free again. The caller's transaction stays usable
    after the error (no failed statement: the insert does nothing on conflict).
    """
    inserted = await session.execute(
        insert(table)
        .values(
            chain_id=payment.chain_id,
            tx_hash=payment.tx_hash,
            log_index=payment.log_index,
            resource=resource,
            payment_contract=payment.payment_contract,
            payment_job_id=payment.payment_job_id,
            payer=payment.payer,
            amount=payment.amount,
            block_number=payment.block_number,
            block_hash=payment.block_hash,
        )
        .on_conflict_do_nothing(index_elements=["chain_id", "tx_hash", "log_index"])
        .returning(table.c.log_index)
    )
    if inserted.first() is not None:
        return
    key = (
        (table.c.chain_id == payment.chain_id)
        & (table.c.tx_hash == payment.tx_hash)
        & (table.c.log_index == payment.log_index)
    )
    used_for = (await session.execute(select(table.c.resource).where(key))).scalar_one_or_none()
    raise PaymentAlreadyUsed(
        f"the payment in {payment.tx_hash} was used already" + (f" for {used_for}" if used_for else ""),
        metadata={"tx_hash": payment.tx_hash, "log_index": str(payment.log_index), "resource": used_for or ""},
    )
