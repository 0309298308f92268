"""Follow the platform's contract events on chain and publish them, once confirmed, to the event bus.

One step: lock this chain's cursor row (so one ingester works at a time, however many run), check that
the cursor's block is still canonical (else retract what a reorg took back), fetch the logs of the next
confirmed block range with eth_getLogs, publish them through the outbox and move the cursor, all in one
PostgreSQL transaction. A crash anywhere leaves the cursor and the events of a range committed together
or not at all; the outbox publishes what committed (at least once, consumers dedupe on chain id + tx
hash + log index). See far.chain.v1.ChainEvent for what consumers get.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from far.chain.v1 import chain_events_pb2 as pb
from far.type.v1 import token_amount_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from hexbytes import HexBytes
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    delete,
    func,
    select,
)
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession
from web3.types import BlockData, LogReceipt

from servers.common.chain import Chain, contract_abi
from servers.common.db import Database, UnitOfWork
from servers.common.outbox import outbox_table

log = structlog.get_logger("far.ingest")

SCHEMA = "ingest"
metadata = MetaData(schema=SCHEMA)

cursors = Table(
    "cursors",
    metadata,
    Column("chain_id", BigInteger, primary_key=True, autoincrement=False),
    Column("block_number", BigInteger, nullable=False),
    Column("block_hash", Text, nullable=False),
    Column("update_time", DateTime(timezone=True), server_default=func.now(), nullable=False),
)

# Hashes of the blocks ingested lately (each range's last block and every block with events): where a
# reorg is detected and the fork point found.
blocks = Table(
    "blocks",
    metadata,
    Column("chain_id", BigInteger, nullable=False),
    Column("block_number", BigInteger, nullable=False),
    Column("block_hash", Text, nullable=False),
    PrimaryKeyConstraint("chain_id", "block_number", name="blocks_pkey"),
)

# The events published lately, kept to publish their retraction if a reorg takes their block back.
published_events = Table(
    "published_events",
    metadata,
    Column("chain_id", BigInteger, nullable=False),
    Column("tx_hash", Text, nullable=False),
    Column("log_index", Integer, nullable=False),
    Column("block_number", BigInteger, nullable=False),
    Column("topic", Text, nullable=False),
    Column("event", LargeBinary, nullable=False),
    PrimaryKeyConstraint("chain_id", "tx_hash", "log_index", name="published_events_pkey"),
    Index("published_events_block_idx", "chain_id", "block_number"),
)

outbox = outbox_table(metadata)

# Topic and events followed, per contract.
TOPICS = {"FARToken": "chain.far_token", "InferencePayment": "chain.inference_payment", "Staking": "chain.staking"}


def _hex(value: bytes | str) -> str:
    return HexBytes(value).to_0x_hex().lower()


def _far(value: int) -> token_amount_pb2.TokenAmount:
    return token_amount_pb2.TokenAmount(value=str(value), symbol="FAR", decimals=18)


def _seconds(value: int) -> Timestamp:
    return Timestamp(seconds=value)


_BUILDERS: dict[str, Callable[[Any], pb.ChainEvent]] = {
    "Transfer": lambda a: pb.ChainEvent(
        transfer=pb.Transfer(**{"from": str(a["from"]).lower()}, to=str(a["to"]).lower(), value=_far(a["value"]))
    ),
    "PaymentReceived": lambda a: pb.ChainEvent(
        payment_received=pb.PaymentReceived(
            payment_job_id=_hex(a["jobId"]), payer=str(a["payer"]).lower(), amount=_far(a["amount"])
        )
    ),
    "PriceSet": lambda a: pb.ChainEvent(
        price_set=pb.PriceSet(model_key=_hex(a["modelId"]), price_per_token=_far(a["pricePerToken"]))
    ),
    "Withdrawn": lambda a: pb.ChainEvent(withdrawn=pb.Withdrawn(to=str(a["to"]).lower(), amount=_far(a["amount"]))),
    "Staked": lambda a: pb.ChainEvent(staked=pb.Staked(account=str(a["account"]).lower(), amount=_far(a["amount"]))),
    "Unstaked": lambda a: pb.ChainEvent(
        unstaked=pb.Unstaked(account=str(a["account"]).lower(), amount=_far(a["amount"]))
    ),
    "RewardPaid": lambda a: pb.ChainEvent(
        reward_paid=pb.RewardPaid(account=str(a["account"]).lower(), reward=_far(a["reward"]))
    ),
    "RewardAdded": lambda a: pb.ChainEvent(
        reward_added=pb.RewardAdded(
            reward=_far(a["reward"]),
            reward_rate=_far(a["rewardRate"]),
            period_finish_time=_seconds(a["periodFinish"]),
        )
    ),
    "RewardsDurationUpdated": lambda a: pb.ChainEvent(
        rewards_duration_updated=pb.RewardsDurationUpdated(rewards_duration_seconds=a["rewardsDuration"])
    ),
}


@dataclass(frozen=True, slots=True)
class _Decoder:
    topic: str
    event: Any  # a web3 AsyncContractEvent
    build: Callable[[Any], pb.ChainEvent]


class ReorgInProgress(Exception):
    """A log's block hash is not the canonical one: the chain changed under this step; try again."""


class Ingester:
    """Ingests the FARToken, InferencePayment and Staking events of one chain into the event bus."""

    def __init__(
        self,
        chain: Chain,
        database: Database,
        *,
        confirmations: int | None = None,
        start_block: int = 0,
        max_block_range: int = 1000,
        retained_blocks: int = 1000,
    ) -> None:
        if database.outbox is None or database.outbox.table is not outbox:
            raise ValueError("the ingester's Database needs an Outbox on servers.ingest.ingester.outbox")
        self.chain = chain
        self.database = database
        self.confirmations = chain.settings.confirmations if confirmations is None else confirmations
        self.start_block = start_block
        self.max_block_range = max_block_range
        self.retained_blocks = retained_blocks
        contracts = {"FARToken": chain.token, "InferencePayment": chain.inference_payment, "Staking": chain.staking}
        self.addresses = [contract.address for contract in contracts.values()]
        self._decoders: dict[tuple[str, bytes], _Decoder] = {}
        for name, contract in contracts.items():
            for item in contract_abi(name):
                if item.get("type") == "event" and item.get("name") in _BUILDERS:
                    event = contract.events[str(item["name"])]()
                    key = (contract.address.lower(), bytes(HexBytes(event.topic)))
                    self._decoders[key] = _Decoder(TOPICS[name], event, _BUILDERS[str(item["name"])])

    async def run(self, *, poll_interval_s: float = 2.0) -> None:
        """Ingest until cancelled: as fast as ranges come while behind, every `poll_interval_s` when caught up."""
        while True:
            try:
                advanced = await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("ingest step failed; retrying", exc_info=True)
                advanced = 0
            if not advanced:
                await asyncio.sleep(poll_interval_s)

    async def step(self) -> int:
        """One step; returns the number of blocks ingested or rolled back (0: nothing to do yet)."""
        chain_id = self.chain.chain_id
        try:
            async with self.database.transaction() as unit:
                session = unit.session
                # The row is there before it is locked, so a second ingester waits here even on the first step.
                await session.execute(
                    insert(cursors)
                    .values(chain_id=chain_id, block_number=self.start_block - 1, block_hash="")
                    .on_conflict_do_nothing()
                )
                row = (
                    await session.execute(select(cursors).where(cursors.c.chain_id == chain_id).with_for_update())
                ).one()
                if row.block_hash:  # "": nothing ingested yet
                    canonical = await self.chain.block(int(row.block_number))
                    if canonical is None or _hex(canonical["hash"]) != row.block_hash:
                        return await self._roll_back(unit, int(row.block_number))
                first = int(row.block_number) + 1
                safe = await self.chain.block_number() - self.confirmations + 1
                if first > safe:
                    return 0
                last = min(safe, first + self.max_block_range - 1)
                await self._ingest(unit, first, last)
                return last - first + 1
        except ReorgInProgress as error:
            log.info("the chain changed during the step; trying again", detail=str(error))
            return 0

    async def _ingest(self, unit: UnitOfWork, first: int, last: int) -> None:
        chain_id = self.chain.chain_id
        logs: list[LogReceipt] = list(
            await self.chain.retrying(
                "eth_getLogs",
                lambda: self.chain.w3.eth.get_logs({"fromBlock": first, "toBlock": last, "address": self.addresses}),
            )
        )
        numbers = sorted({int(entry["blockNumber"]) for entry in logs} | {last})
        headers: dict[int, BlockData] = {}
        for number in numbers:
            header = await self.chain.block(number)
            if header is None:
                raise ReorgInProgress(f"block {number} is gone")
            headers[number] = header
        rows = []
        for entry in sorted(logs, key=lambda e: (int(e["blockNumber"]), int(e["logIndex"]))):
            number = int(entry["blockNumber"])
            if entry.get("removed") or _hex(entry["blockHash"]) != _hex(headers[number]["hash"]):
                raise ReorgInProgress(f"a log of block {number} is from another fork")
            decoder = self._decoders.get((entry["address"].lower(), bytes(HexBytes(entry["topics"][0]))))
            if decoder is None:
                continue  # an event the platform does not follow (OwnershipTransferred, ...)
            message = decoder.build(decoder.event.process_log(entry)["args"])
            message.log.CopyFrom(
                pb.ChainLog(
                    chain_id=chain_id,
                    contract=entry["address"].lower(),
                    tx_hash=_hex(entry["transactionHash"]),
                    log_index=int(entry["logIndex"]),
                    block_number=number,
                    block_hash=_hex(entry["blockHash"]),
                    block_time=_seconds(int(headers[number]["timestamp"])),
                )
            )
            unit.publish(decoder.topic, message)
            rows.append(
                {
                    "chain_id": chain_id,
                    "tx_hash": message.log.tx_hash,
                    "log_index": message.log.log_index,
                    "block_number": number,
                    "topic": decoder.topic,
                    "event": message.SerializeToString(),
                }
            )
        session = unit.session
        if rows:
            await session.execute(insert(published_events).on_conflict_do_nothing(), rows)
        hashes = [{"chain_id": chain_id, "block_number": n, "block_hash": _hex(headers[n]["hash"])} for n in numbers]
        statement = insert(blocks)
        await session.execute(
            statement.on_conflict_do_update(
                index_elements=["chain_id", "block_number"], set_={"block_hash": statement.excluded.block_hash}
            ),
            hashes,
        )
        await self._move_cursor(session, last, _hex(headers[last]["hash"]))
        horizon = last - self.retained_blocks
        await session.execute(delete(blocks).where(blocks.c.chain_id == chain_id, blocks.c.block_number < horizon))
        await session.execute(
            delete(published_events).where(
                published_events.c.chain_id == chain_id, published_events.c.block_number < horizon
            )
        )
        if rows:
            log.info("ingested", first=first, last=last, events=len(rows))

    async def _move_cursor(self, session: AsyncSession, number: int, block_hash: str) -> None:
        statement = insert(cursors).values(chain_id=self.chain.chain_id, block_number=number, block_hash=block_hash)
        await session.execute(
            statement.on_conflict_do_update(
                index_elements=["chain_id"],
                set_={"block_number": number, "block_hash": block_hash, "update_time": func.now()},
            )
        )

    async def _roll_back(self, unit: UnitOfWork, cursor_block: int) -> int:
        """The cursor's block was replaced: find the newest stored block still canonical (the fork point),
        retract every published event above it, and move the cursor back there."""
        chain_id = self.chain.chain_id
        session = unit.session
        stored = await session.execute(
            select(blocks.c.block_number, blocks.c.block_hash)
            .where(blocks.c.chain_id == chain_id, blocks.c.block_number <= cursor_block)
            .order_by(blocks.c.block_number.desc())
        )
        fork: tuple[int, str] | None = None
        lowest = cursor_block
        for number, block_hash in stored:
            lowest = int(number)
            canonical = await self.chain.block(int(number))
            if canonical is not None and _hex(canonical["hash"]) == block_hash:
                fork = (int(number), block_hash)
                break
        if fork is None:
            # Deeper than what is retained: start again below everything retained.
            log.error("reorg deeper than the retained blocks", lowest_retained=lowest)
            number = max(lowest - 1, self.start_block - 1)
            canonical = await self.chain.block(number) if number >= 0 else None
            fork = (number, _hex(canonical["hash"]) if canonical is not None else "")
        retracted = await session.execute(
            delete(published_events)
            .where(published_events.c.chain_id == chain_id, published_events.c.block_number > fork[0])
            .returning(published_events.c.topic, published_events.c.event, published_events.c.block_number)
        )
        events = sorted(retracted, key=lambda r: (r.block_number, pb.ChainEvent.FromString(r.event).log.log_index))
        for row in events:
            unit.publish(row.topic, pb.ChainEventRetracted(log=pb.ChainEvent.FromString(row.event).log))
        await session.execute(delete(blocks).where(blocks.c.chain_id == chain_id, blocks.c.block_number > fork[0]))
        await self._move_cursor(session, fork[0], fork[1])
        log.warning("reorg: rolled back", from_block=cursor_block, to_block=fork[0], retracted=len(events))
        return cursor_block - fork[0]
