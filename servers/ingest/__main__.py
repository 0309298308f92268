"""`python -m servers.ingest`: the chain event ingester, a process of its own (no gRPC).

Reads BSC_RPC_URL, CHAIN_ID, the FAR_*_ADDRESS variables and CHAIN_CONFIRMATIONS (servers.common.chain),
DATABASE_URL and REDIS_URL (embedded ones in FAR_DATA_DIR when unset), REDIS_KEY_PREFIX, LOG_LEVEL,
LOG_FORMAT, and INGEST_START_BLOCK (0: where to begin when no cursor is stored), INGEST_MAX_BLOCK_RANGE
(1000 blocks per eth_getLogs), INGEST_POLL_SECONDS (2). Its schema is `ingest`
(`python -m servers.common.migrations upgrade ingest` first). Stops on SIGTERM / SIGINT; a malformed
variable stops it at start with one line (exit 2).
"""

from __future__ import annotations

import asyncio
import signal
import sys
from contextlib import suppress
from pathlib import Path

import structlog
from redis.asyncio import Redis

from servers.common import event_loop
from servers.common.chain import Chain, ChainSettings
from servers.common.config import ConfigError, Env
from servers.common.db import Database, redact
from servers.common.event_loop import DEFAULT_EVENT_LOOP, EVENT_LOOPS
from servers.common.events import EventBus
from servers.common.observability import configure_logging
from servers.common.outbox import Outbox
from servers.ingest.ingester import Ingester, outbox

log = structlog.get_logger("far.ingest")


async def serve(env: Env, chain_settings: ChainSettings) -> None:
    data_dir = Path(env.text("FAR_DATA_DIR", ".run/data") or ".run/data")
    database_url = env.url("DATABASE_URL", ("postgresql", "postgres", "postgresql+asyncpg"))
    if database_url is None:
        from servers.common.embedded import ensure_postgres

        database_url = ensure_postgres(data_dir / "postgres")
        log.warning("DATABASE_URL is not set: using the embedded PostgreSQL", url=redact(database_url))
    redis_url = env.url("REDIS_URL", ("redis", "rediss", "unix"))
    if redis_url is None:
        from servers.common.embedded import ensure_redis

        redis_url = ensure_redis(data_dir / "redis").url
    start_block = env.integer("INGEST_START_BLOCK", 0, maximum=2**62)
    max_range = env.integer("INGEST_MAX_BLOCK_RANGE", 1000, minimum=1, maximum=100_000)
    poll_s = env.number("INGEST_POLL_SECONDS", 2.0, minimum=0.05)

    redis = Redis.from_url(redis_url, decode_responses=False)
    bus = EventBus(redis, env.text("REDIS_KEY_PREFIX", "far:") or "far:")
    database = Database(database_url, events=bus, outbox=Outbox(outbox, bus, source="ingest"), pool_size=2)
    chain = Chain(chain_settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await chain.check()
        ingester = Ingester(chain, database, start_block=start_block, max_block_range=max_range)
        log.info("ingesting", chain_id=chain.chain_id, confirmations=ingester.confirmations, start_block=start_block)
        tasks = [
            asyncio.create_task(ingester.run(poll_interval_s=poll_s)),
            asyncio.create_task(database.run_outbox_relay()),
        ]
        await stop.wait()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with suppress(asyncio.CancelledError):
                await task
        log.info("stopped")
    finally:
        await chain.close()
        await database.close()
        await redis.aclose()


def main() -> None:
    env = Env()
    try:
        chain_settings = ChainSettings.from_env()
        configure_logging(
            env.text("SERVICE_NAME", "ingest") or "ingest",
            env.choice("LOG_LEVEL", "info", ("debug", "info", "warning", "error")),
            env.choice("LOG_FORMAT", "json", ("json", "console")),
        )
        event_loop.run(serve(env, chain_settings), env.choice("EVENT_LOOP", DEFAULT_EVENT_LOOP, EVENT_LOOPS))
    except ConfigError as error:
        print(f"far-ingest: configuration error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
