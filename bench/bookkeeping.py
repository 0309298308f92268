"""What one job's records cost the inference server in CPU: the servicer's own code on real PostgreSQL and Redis.

`python -m bench.bookkeeping` builds the inference servicer's parts in-process (DATABASE_URL/REDIS_URL or the
embedded ones; a free model, so no chain) and times three of its paths:

- `fast`: what Generate's fast path does once the node has accepted the prompt (`_create_started`): BEGIN, the
  job's insert, the admission (a Lua call in Redis), the job event staged in the outbox, COMMIT, the event
  published to Redis. At a burst of calls this runs on the server's core beside the burst's later arrivals,
  so its CPU is added to their time to first token (bench/RESULTS.md, inference).
- `queued`: the queued path of Generate and CreateJob (`_create` after the admission): the same records
  without the wait for the node.
- `end`: what the runner writes when a job ends (`Runner._finish`): the row's end and its event in one
  transaction, the End entry of the job's token stream, the account's admission count. It runs after the
  stream, so it is not in front of any token, but it is CPU per job all the same.

Each figure is the process CPU time (and wall time) of the path's own part per job over `--jobs` jobs, in
rounds that rotate the paths; the median round is reported. Nothing else runs in the process, but PostgreSQL
and Redis share the machine, so the wall times include their share of it. Figures go to
bench/results/bookkeeping.json and the "Job bookkeeping" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from far.inference.v1 import job_pb2
from redis.asyncio import Redis

from bench.provenance import code_state, machine
from bench.results_file import write_section
from bench.scratch import scratch
from devstack.stack import run_migrations
from servers.common import event_loop
from servers.common.auth import Principal
from servers.common.db import Database
from servers.common.events import EventBus
from servers.common.outbox import Outbox
from servers.common.pagination import PageTokens
from servers.inference.admission import Admission
from servers.inference.catalog import DEFAULT_MODELS, Catalog, ModelSpec
from servers.inference.executor import Clients, Outcome
from servers.inference.jobs import resolve
from servers.inference.models import OUTBOX
from servers.inference.nodes import NodeDirectory, NodeInfo, static_source
from servers.inference.prices import Prices
from servers.inference.quotes import Quotes, new_id
from servers.inference.requests import JobSpec, validate
from servers.inference.runner import Runner, _Running
from servers.inference.servicer import InferenceServicer, Parts
from servers.inference.token_stream import TokenStreams, TokenWriter

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "RESULTS.md"
JSON_OUT = ROOT / "results" / "bookkeeping.json"
BEGIN, END = "<!-- bookkeeping:begin -->", "<!-- bookkeeping:end -->"
PROMPT = "Tell me about lighthouses. " * 8


async def _servicer(database_url: str, redis: Redis, prefix: str) -> tuple[InferenceServicer, Database, ModelSpec]:
    model = replace(DEFAULT_MODELS[0], free=True)
    catalog = Catalog((model,))
    events = EventBus(redis, prefix)
    database = Database(database_url, events=events, outbox=Outbox(OUTBOX, events, source="inference"))
    directory = NodeDirectory(
        static_source({model.served_as: (NodeInfo("nodes/bench", "127.0.0.1:1"),)}), [model.served_as]
    )
    await directory.refresh()
    admission = Admission(redis, prefix)
    streams = TokenStreams(redis, prefix)
    prices = Prices(None, catalog)
    quotes = Quotes(redis, prefix, catalog, prices, chain_id=0, payment_contract="0x" + "0" * 40)
    runner = Runner(database, admission, streams, directory, Clients())
    parts = Parts(
        database=database,
        catalog=catalog,
        prices=prices,
        quotes=quotes,
        admission=admission,
        streams=streams,
        directory=directory,
        runner=runner,
        page_tokens=PageTokens(b"bench-bookkeeping-page-tokens"),
        chain=None,
    )
    return InferenceServicer(parts), database, model


async def _spec(servicer: InferenceServicer, model: ModelSpec) -> JobSpec:
    job = job_pb2.Job(model=model.name, prompt=PROMPT, max_tokens=32)
    spec, _ = await resolve(servicer._p.quotes, "", validate(model, job, request_id=""))
    return spec


def _principal() -> Principal:
    # A new account per job: the admission counts each account's unfinished jobs (4 at most).
    return Principal(subject="0x" + os.urandom(20).hex())


Timed = tuple[float, float]
"""(process CPU seconds, wall seconds) of one job's records."""


async def _timed(work: Awaitable[object]) -> Timed:
    cpu, wall = time.process_time(), time.perf_counter()
    await work
    return time.process_time() - cpu, time.perf_counter() - wall


async def _measure(
    servicer: InferenceServicer, model: ModelSpec, spec: JobSpec, *, jobs: int, rounds: int
) -> dict[str, dict[str, float]]:
    admission, runner, streams = servicer._p.admission, servicer._p.runner, servicer._p.streams
    accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    accepted.set_result(12)  # the node has taken the prompt

    async def fast() -> Timed:
        return await _timed(servicer._create_started(_principal(), spec, None, model, new_id("j"), accepted))

    async def queued() -> Timed:
        principal = _principal()
        ticket = await admission.admit(model.served_as, new_id("j"), principal.subject)
        timed = await _timed(servicer._create(principal, spec, None, ticket, streamed=True))
        await admission.claim(ticket)  # out of the queue, so that it never fills
        return timed

    async def end() -> Timed:
        principal, job_id = _principal(), new_id("j")
        await servicer._create_started(principal, spec, None, model, job_id, accepted)
        outcome = Outcome(
            job_pb2.Job.STATE_SUCCEEDED, job_pb2.FINISH_REASON_LENGTH, 40, 32, node="nodes/bench", text=["token "] * 32
        )
        writer = TokenWriter(streams, job_id)
        runner.try_reserve(model)  # the slot that the end gives back
        return await _timed(runner._finish(job_id, principal.subject, model, outcome, 250, writer, _Running()))

    paths: dict[str, Callable[[], Awaitable[Timed]]] = {"fast": fast, "queued": queued, "end": end}
    for path in paths.values():  # warm the statement caches and the connection pools
        for _ in range(50):
            await path()
    per_round: dict[str, list[Timed]] = {name: [] for name in paths}
    for number in range(rounds):
        for name in list(paths)[number % len(paths) :] + list(paths)[: number % len(paths)]:
            timed = [await paths[name]() for _ in range(jobs)]
            per_round[name].append((sum(cpu for cpu, _ in timed) / jobs, sum(wall for _, wall in timed) / jobs))
    return {
        name: {
            "cpu_ms_per_job": round(1000 * statistics.median(cpu for cpu, _ in values), 3),
            "wall_ms_per_job": round(1000 * statistics.median(wall for _, wall in values), 3),
            "cpu_ms_per_job_min": round(1000 * min(cpu for cpu, _ in values), 3),
            "cpu_ms_per_job_max": round(1000 * max(cpu for cpu, _ in values), 3),
        }
        for name, values in per_round.items()
    }


async def _run(database_url: str, redis_url: str, prefix: str, *, jobs: int, rounds: int) -> dict[str, object]:
    redis = Redis.from_url(redis_url)
    servicer, database, model = await _servicer(database_url, redis, prefix)
    try:
        figures = await _measure(servicer, model, await _spec(servicer, model), jobs=jobs, rounds=rounds)
    finally:
        await database.close()
        await redis.aclose()
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "code": code_state("servers/inference", "servers/common"),
        "jobs_per_round": jobs,
        "rounds": rounds,
        **figures,
    }


def _section(summary: dict[str, object]) -> str:
    rows = []
    labels = {
        "fast": "Generate's fast path (`_create_started`)",
        "queued": "queued (`_create`)",
        "end": "the job's end (`Runner._finish`)",
    }
    for name, label in labels.items():
        figures = summary[name]
        assert isinstance(figures, dict)
        rows.append(
            f"| {label} | {figures['cpu_ms_per_job']} ({figures['cpu_ms_per_job_min']}-"
            f"{figures['cpu_ms_per_job_max']}) | {figures['wall_ms_per_job']} |"
        )
    machine = summary["machine"]
    assert isinstance(machine, dict)
    return "\n".join(
        [
            BEGIN,
            "## Job bookkeeping: the inference server's CPU per job's records (`python -m bench.bookkeeping`)",
            "",
            f"Run {summary['date']} on {machine['cpu']} ({machine['cores']} cores): {summary['rounds']} rounds of "
            f"{summary['jobs_per_round']} jobs per path,",
            "rotating; the median round, and the range of CPU over the rounds. PostgreSQL and Redis are real and",
            "share the machine. The fast path's records: BEGIN, the job's insert, the admission (a Lua call in Redis),",
            "the job event in the outbox, COMMIT, the event to Redis. The queued path's are the same but for the",
            "admission, which comes before them (and is not counted). The end's: the row's end and its event",
            "(one transaction), the End entry of the job's token stream, the account's admission count.",
            "",
            "| path | server CPU per job, ms | wall per job, ms |",
            "|---|---|---|",
            *rows,
            END,
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200, help="jobs per round and path")
    parser.add_argument("--rounds", type=int, default=6, help="rounds per path")
    args = parser.parse_args()
    with scratch("bookkeeping") as run:
        run_migrations(["inference"], run.env(), log_path=run.work / "migrations.log")
        summary = event_loop.run(  # the servers' own loop (uvloop)
            _run(run.database_url, run.redis_url, run.redis_key_prefix, jobs=args.jobs, rounds=args.rounds)
        )
    print(json.dumps(summary, indent=2))
    JSON_OUT.parent.mkdir(exist_ok=True)
    JSON_OUT.write_text(json.dumps(summary, indent=2) + "\n")
    write_section(RESULTS, BEGIN, END, _section(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
