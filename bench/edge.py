"""What the edge costs: gamed's GetGame and ListGames straight to the server vs through Envoy, with mTLS on.

    python -m bench.edge [--duration 8] [--warmup 2] [--runs 3]      (make bench)

One machine: a gamed server (one process) and Envoy from devstack as deployed (the services listen on mTLS
only), PostgreSQL/Redis from DATABASE_URL/REDIS_URL or the embedded ones, 50 published games.

- `grpc_direct` and `grpc_via_envoy`: the same Python client (grpc.aio, raw bytes, no stubs) with a
  certificate of the stack's dev CA: straight to gamed's mTLS port (as a FAR service), or to Envoy's partner
  listener (as the game-server partner; Envoy then talks mTLS to gamed). Like for like: only the edge differs.
  h2load cannot present a client certificate, so it cannot reach gamed any more.
- `json_via_envoy`: h2load (Debian's nghttp2-client) with GET on the REST path of Envoy's web listener
  (cleartext, as browsers reach it behind the load balancer). h2load costs far less CPU per request than the
  Python client, so its figures are not comparable with the two gRPC rows; they track the JSON path over time.

Each case runs `--runs` times; the figures are the medians. Same connection and stream counts everywhere.
Figures go to bench/results/edge.json and to the edge section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
from far.gamed.v1 import build_pb2, game_pb2, gamed_service_pb2, gamed_service_pb2_grpc
from google.protobuf.field_mask_pb2 import FieldMask

from bench.provenance import machine
from bench.results_file import write_section
from bench.scratch import scratch
from devstack.stack import Stack, run_migrations
from servers.common.auth import JwtKeys, TokenIssuer

ROOT = Path(__file__).resolve().parent.parent
RESULTS_MD = ROOT / "bench" / "RESULTS.md"
RESULTS_JSON = ROOT / "bench" / "results" / "edge.json"
BEGIN, END = "<!-- edge:begin -->", "<!-- edge:end -->"
JWT_SECRET = "bench-" + secrets.token_hex(24)
PUBLISHER = "0x" + "be" * 20
GAMES = 50
# (connections, streams per connection): concurrency 1 and 32.
CONCURRENCY = {1: (1, 1), 32: (8, 4)}


@dataclass
class Case:
    method: str
    path: str  # "grpc_direct" | "grpc_via_envoy" | "json_via_envoy"
    concurrency: int
    requests: int
    failed: int
    rps: float
    p50_ms: float
    p99_ms: float
    mean_ms: float


async def _seed(target: str, credentials: grpc.ChannelCredentials, token: str) -> None:
    metadata = (("authorization", f"Bearer {token}"),)
    async with grpc.aio.secure_channel(target, credentials) as channel:
        stub = gamed_service_pb2_grpc.GamedServiceStub(channel)
        for i in range(GAMES):
            game_id = f"bench-{i:03d}"
            await stub.CreateGame(
                gamed_service_pb2.CreateGameRequest(
                    game_id=game_id,
                    game=game_pb2.Game(
                        display_name=f"Bench game {i}",
                        description="A game seeded for the edge benchmark. " * 4,
                        genres=["strategy", "bench"],
                    ),
                ),
                metadata=metadata,
            )
            await stub.CreateBuild(
                gamed_service_pb2.CreateBuildRequest(
                    parent=f"games/{game_id}",
                    build=build_pb2.Build(
                        platform=game_pb2.PLATFORM_LINUX,
                        version="1.0.0",
                        assets=[build_pb2.Asset(path="bin/game", size_bytes=1 << 20, sha256="ab" * 32)],
                    ),
                ),
                metadata=metadata,
            )
            await stub.UpdateGame(
                gamed_service_pb2.UpdateGameRequest(
                    game=game_pb2.Game(name=f"games/{game_id}", state=game_pb2.Game.STATE_PUBLISHED),
                    update_mask=FieldMask(paths=["state"]),
                ),
                metadata=metadata,
            )


async def _grpc_load(
    target: str,
    credentials: grpc.ChannelCredentials,
    method: str,
    request: bytes,
    concurrency: int,
    duration: float,
    warmup: float,
) -> Case:
    """`concurrency` callers over `CONCURRENCY[concurrency]` connections for warm-up + duration seconds;
    the calls that begin after the warm-up are counted and timed."""
    connections, streams = CONCURRENCY[concurrency]
    # A local subchannel pool per channel: one HTTP/2 connection each, as h2load's --clients.
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.secure_channel(target, credentials, options=options) for _ in range(connections)]
    loop = asyncio.get_running_loop()
    start = loop.time()
    measured_from, stop = start + warmup, start + warmup + duration
    durations: list[float] = []
    failed = 0

    async def caller(channel: grpc.aio.Channel) -> None:
        nonlocal failed
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            f"/far.gamed.v1.GamedService/{method}"
        )
        while (began := loop.time()) < stop:
            try:
                await call(request, timeout=10)
            except grpc.aio.AioRpcError:
                if began >= measured_from:
                    failed += 1
                continue
            if began >= measured_from:
                durations.append((loop.time() - began) * 1000)

    try:
        await asyncio.gather(*(caller(channel) for channel in channels for _ in range(streams)))
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))
    if not durations:
        raise RuntimeError(f"no successful {method} calls to {target}")
    durations.sort()
    return Case(
        method=method,
        path="",
        concurrency=concurrency,
        requests=len(durations),
        failed=failed,
        rps=len(durations) / duration,
        p50_ms=statistics.median(durations),
        p99_ms=durations[min(len(durations) - 1, int(len(durations) * 0.99))],
        mean_ms=statistics.fmean(durations),
    )


def _h2load(url: str, concurrency: int, duration: float, warmup: float, work: Path) -> Case:
    connections, streams = CONCURRENCY[concurrency]
    log_file = work / f"h2load-{secrets.token_hex(4)}.log"
    argv = [
        "h2load",
        f"--duration={duration:g}",
        f"--warm-up-time={warmup:g}",
        f"--clients={connections}",
        f"--max-concurrent-streams={streams}",
        "--threads=1",
        f"--log-file={log_file}",
        url,
    ]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=duration + warmup + 60).stdout
    match = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed", out)
    rps = re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", out)
    if match is None or rps is None:
        raise RuntimeError(f"unexpected h2load output:\n{out}")
    durations = sorted(
        int(line.split("\t")[2]) / 1000 for line in log_file.read_text().splitlines() if line.split("\t")[1] == "200"
    )
    if not durations:
        raise RuntimeError(f"no successful requests:\n{out}")
    return Case(
        method="",
        path="",
        concurrency=concurrency,
        requests=int(match.group(3)),
        failed=int(match.group(4)),
        rps=float(rps.group(1)),
        p50_ms=statistics.median(durations),
        p99_ms=durations[min(len(durations) - 1, int(len(durations) * 0.99))],
        mean_ms=statistics.fmean(durations),
    )


def _machine() -> dict[str, str]:
    h2load = subprocess.run(["h2load", "--version"], capture_output=True, text=True, check=False).stdout.strip()
    return {**machine(), "h2load": h2load.splitlines()[0] if h2load else "unknown"}


def _median_case(runs: list[Case]) -> Case:
    """One case from several runs of it: the median of each figure, the sums of the counts."""
    first = runs[0]
    return Case(
        method=first.method,
        path=first.path,
        concurrency=first.concurrency,
        requests=sum(c.requests for c in runs),
        failed=sum(c.failed for c in runs),
        rps=statistics.median(c.rps for c in runs),
        p50_ms=statistics.median(c.p50_ms for c in runs),
        p99_ms=statistics.median(c.p99_ms for c in runs),
        mean_ms=statistics.median(c.mean_ms for c in runs),
    )


def _write_results(
    cases: list[Case],
    summary: dict[str, float],
    machine: dict[str, str],
    load: tuple[float, float],
    args: argparse.Namespace,
) -> None:
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_JSON.write_text(
        json.dumps(
            {
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "machine": machine,
                "load_average": {"start": load[0], "end": load[1]},
                "duration_s": args.duration,
                "warmup_s": args.warmup,
                "runs": args.runs,
                "figures": "median over runs; requests and failed summed over runs",
                **summary,
                "cases": [asdict(case) for case in cases],
            },
            indent=2,
        )
        + "\n"
    )
    rows = "\n".join(
        f"| {c.method} | {c.path} | {c.concurrency} | {c.rps:,.0f} | {c.p50_ms:.2f} | {c.p99_ms:.2f} | {c.failed} |"
        for c in cases
    )
    section = f"""{BEGIN}
## Edge: gRPC direct vs through Envoy, mTLS on (`make bench`, `bench/edge.py`)

Measured {datetime.now(UTC):%Y-%m-%d} on {machine["cpu"]}, {machine["cores"]} cores, {machine["memory"]};
Python {machine["python"]}, Envoy {machine["envoy"]}, {machine["h2load"]}. One gamed process, Envoy with
2 worker threads and the load generator all share the machine's cores (load average, 1 min: {load[0]:.2f}
before, {load[1]:.2f} after): the figures move by +-30% from run to run. {args.duration:g} s per case
after {args.warmup:g} s of warm-up, {args.runs} runs, medians. Concurrency 32 = 8 HTTP/2 connections x 4
streams. GetGame reads one game; ListGames returns a page of 20 (of {GAMES} published games).

The platform as deployed: gamed listens on mTLS only. `grpc_direct` and `grpc_via_envoy` use one Python
client (grpc.aio, raw bytes) with a dev-CA client certificate, straight to gamed or through Envoy's partner
listener (TLS in, mTLS out to gamed): like for like, only the edge differs. h2load cannot present a client
certificate, so it no longer measures the direct path; `json_via_envoy` is h2load on the cleartext web
listener (JSON transcoding + jwt_authn rules + mTLS upstream). h2load spends far less CPU per request than
the Python client, so compare `json_via_envoy` with its own history, not with the gRPC rows.

| method | path | concurrency | req/s | p50 ms | p99 ms | failed |
|---|---|---|---|---|---|---|
{rows}

- gRPC through Envoy / gRPC direct throughput at concurrency 32 (mean of both methods):
  **{summary["grpc_via_envoy_over_direct_c32"]:.2f}** (goal >= 0.9)
- Added latency at concurrency 1, p50, gRPC through Envoy minus direct (mean of both methods):
  **{summary["added_ms_p50_c1"]:.2f} ms** (goal <= 0.25 ms)

Figures as JSON: `bench/results/edge.json`.
{END}"""
    write_section(RESULTS_MD, BEGIN, END, section)


PATHS = ("grpc_direct", "grpc_via_envoy", "json_via_envoy")


def _measure(stack: Stack, args: argparse.Namespace, work: Path) -> list[Case]:
    """Every (method, concurrency, path) case `args.runs` times, interleaved so that a burst of other work
    on the machine hits all paths alike; one median case each."""
    targets = {
        "grpc_direct": (stack.grpc_target("gamed"), stack.client_credentials("service", "bench")),
        "grpc_via_envoy": (stack.envoy_partner_target, stack.client_credentials("partner", "game-server")),
    }
    requests = {
        "GetGame": (
            gamed_service_pb2.GetGameRequest(name="games/bench-007").SerializeToString(),
            "/v1/games/bench-007",
        ),
        "ListGames": (
            gamed_service_pb2.ListGamesRequest(page_size=20).SerializeToString(),
            "/v1/games?pageSize=20",
        ),
    }
    runs: dict[tuple[str, str, int], list[Case]] = {}
    for run in range(1, args.runs + 1):
        for method, (grpc_request, rest_path) in requests.items():
            for concurrency in CONCURRENCY:
                for path in PATHS:
                    if path == "json_via_envoy":
                        url = f"{stack.envoy_http_url}{rest_path}"
                        case = _h2load(url, concurrency, args.duration, args.warmup, work)
                    else:
                        target, credentials = targets[path]
                        case = asyncio.run(
                            _grpc_load(
                                target, credentials, method, grpc_request, concurrency, args.duration, args.warmup
                            )
                        )
                    case.method, case.path = method, path
                    runs.setdefault((method, path, concurrency), []).append(case)
                    print(
                        f"run {run}: {method:9} {path:14} c={concurrency:<2} {case.rps:8.0f} req/s  "
                        f"p50 {case.p50_ms:6.2f} ms  p99 {case.p99_ms:6.2f} ms  failed {case.failed}",
                        flush=True,
                    )
    return [_median_case(cases) for cases in runs.values()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds measured per case")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per case")
    parser.add_argument("--runs", type=int, default=3, help="runs of every case; the figures are medians")
    args = parser.parse_args()
    if shutil.which("h2load") is None:
        print("bench: h2load is missing; install Debian's nghttp2-client (apt-get install nghttp2-client)")
        return 2

    load_start = os.getloadavg()[0]
    with scratch("edge") as run:
        env = run.env(JWT_SECRET=JWT_SECRET, LOG_LEVEL="warning")
        run_migrations(["gamed"], env, log_path=run.work / "migrations.log")
        with Stack(["gamed"], env=env, run_dir=run.work / "stack", metrics=False) as stack:
            token = TokenIssuer(JwtKeys("k1", {"k1": JWT_SECRET})).issue(PUBLISHER, ["publisher"])
            asyncio.run(_seed(stack.grpc_target("gamed"), stack.client_credentials("service", "bench"), token))
            cases = _measure(stack, args, run.work)

    def pick(method: str, path: str, concurrency: int) -> Case:
        return next(c for c in cases if (c.method, c.path, c.concurrency) == (method, path, concurrency))

    methods = sorted({c.method for c in cases})
    summary = {
        "grpc_via_envoy_over_direct_c32": statistics.fmean(
            pick(m, "grpc_via_envoy", 32).rps / pick(m, "grpc_direct", 32).rps for m in methods
        ),
        "added_ms_p50_c1": statistics.fmean(
            pick(m, "grpc_via_envoy", 1).p50_ms - pick(m, "grpc_direct", 1).p50_ms for m in methods
        ),
    }
    _write_results(cases, summary, _machine(), (load_start, os.getloadavg()[0]), args)
    print(json.dumps(summary, indent=2))
    print(f"written: {RESULTS_MD.relative_to(ROOT)}, {RESULTS_JSON.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
