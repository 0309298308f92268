"""What the edge costs: gamed's GetGame and ListGames as gRPC straight to the server vs JSON through Envoy.

    python -m bench.edge [--duration 8] [--warmup 2]      (make bench)

One run, one machine: a gamed server (one process) and Envoy from devstack, PostgreSQL/Redis from
DATABASE_URL/REDIS_URL or the embedded ones, 50 published games. h2load (Debian's nghttp2-client) drives
both paths over HTTP/2 with the same connection and stream counts: gRPC with a pre-framed request body,
JSON with GET on the REST path. Latency percentiles come from h2load's per-request log.
Figures go to bench/results/edge.json and to the edge section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
from far.gamed.v1 import build_pb2, game_pb2, gamed_service_pb2, gamed_service_pb2_grpc
from google.protobuf.field_mask_pb2 import FieldMask

from devstack.stack import Stack, run_migrations
from servers.common.auth import JwtKeys, TokenIssuer
from servers.common.db import run_admin_statement, with_database
from servers.common.embedded import ensure_redis, start_postgres

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
    path: str  # "grpc_direct" | "json_via_envoy"
    concurrency: int
    requests: int
    failed: int
    rps: float
    p50_ms: float
    p99_ms: float
    mean_ms: float


def _grpc_frame(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


async def _seed(target: str, token: str) -> None:
    metadata = (("authorization", f"Bearer {token}"),)
    async with grpc.aio.insecure_channel(target) as channel:
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


def _h2load(url: str, concurrency: int, duration: float, warmup: float, work: Path, grpc_body: bytes | None) -> Case:
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
    ]
    if grpc_body is not None:
        body = work / "body.bin"
        body.write_bytes(grpc_body)
        argv += [
            f"--data={body}",
            "--header=content-type: application/grpc",
            "--header=te: trailers",
        ]
    argv.append(url)
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
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = "unknown"
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f"{kib / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    envoy = subprocess.run(
        [str(Path(sys.executable).parent / "envoy"), "--version"], capture_output=True, text=True, check=False
    ).stdout
    envoy_version = re.search(r"/(\d+\.\d+\.\d+)/", envoy)
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": memory,
        "python": platform.python_version(),
        "envoy": envoy_version.group(1) if envoy_version else "unknown",
        "h2load": subprocess.run(["h2load", "--version"], capture_output=True, text=True, check=False)
        .stdout.strip()
        .splitlines()[0],
    }


def _write_results(
    cases: list[Case], summary: dict[str, float], machine: dict[str, str], args: argparse.Namespace
) -> None:
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_JSON.write_text(
        json.dumps(
            {
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "machine": machine,
                "duration_s": args.duration,
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
## Edge: gRPC direct vs JSON through Envoy (`make bench`, `bench/edge.py`)

Measured {datetime.now(UTC):%Y-%m-%d} on {machine["cpu"]}, {machine["cores"]} cores, {machine["memory"]};
Python {machine["python"]}, Envoy {machine["envoy"]}, {machine["h2load"]}. One gamed process, Envoy with
2 worker threads, h2load on the same machine (all three share the cores), {args.duration:g} s per case after
{args.warmup:g} s of warm-up. Concurrency 32 = 8 HTTP/2 connections x 4 streams. GetGame reads one game;
ListGames returns a page of 20 (of {GAMES} published games).

| method | path | concurrency | req/s | p50 ms | p99 ms | failed |
|---|---|---|---|---|---|---|
{rows}

- JSON via Envoy / gRPC direct throughput at concurrency 32 (mean of both methods):
  **{summary["json_via_envoy_over_grpc_c32"]:.2f}** (goal >= 0.9)
- Added latency at concurrency 1, p50 (mean of both methods): **{summary["added_ms_p50_c1"]:.2f} ms** (goal <= 0.25 ms)

Figures as JSON: `bench/results/edge.json`.
{END}"""
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else "# Benchmark results\n\n"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    RESULTS_MD.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds measured per case")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per case")
    args = parser.parse_args()
    if shutil.which("h2load") is None:
        print("bench: h2load is missing; install Debian's nghttp2-client (apt-get install nghttp2-client)")
        return 2

    work = Path(tempfile.mkdtemp(prefix="far-bench-"))
    embedded = []
    server_url = os.environ.get("DATABASE_URL", "").strip()
    if not server_url:
        pg = start_postgres(work / "postgres")
        embedded.append(pg)
        server_url = pg.url
    redis_url = os.environ.get("REDIS_URL", "").strip()
    if not redis_url:
        redis = ensure_redis(work / "redis")
        embedded.append(redis)
        redis_url = redis.url
    database = f"far_bench_{secrets.token_hex(4)}"
    asyncio.run(run_admin_statement(server_url, f'CREATE DATABASE "{database}"'))
    env = {
        "DATABASE_URL": with_database(server_url, database),
        "REDIS_URL": redis_url,
        "REDIS_KEY_PREFIX": f"far-bench-{secrets.token_hex(4)}:",
        "JWT_SECRET": JWT_SECRET,
        "LOG_LEVEL": "warning",
    }
    try:
        run_migrations(["gamed"], env, log_path=work / "migrations.log")
        with Stack(["gamed"], env=env, run_dir=work / "stack", metrics=False) as stack:
            token = TokenIssuer(JwtKeys("k1", {"k1": JWT_SECRET})).issue(PUBLISHER, ["publisher"])
            direct = stack.grpc_target("gamed")
            asyncio.run(_seed(direct, token))
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
            cases: list[Case] = []
            for method, (grpc_request, rest_path) in requests.items():
                for concurrency in CONCURRENCY:
                    for path in ("grpc_direct", "json_via_envoy"):
                        if path == "grpc_direct":
                            url = f"http://{direct}/far.gamed.v1.GamedService/{method}"
                            case = _h2load(
                                url, concurrency, args.duration, args.warmup, work, _grpc_frame(grpc_request)
                            )
                        else:
                            url = f"{stack.envoy_http_url}{rest_path}"
                            case = _h2load(url, concurrency, args.duration, args.warmup, work, None)
                        case.method, case.path = method, path
                        cases.append(case)
                        print(
                            f"{method:9} {path:14} c={concurrency:<2} {case.rps:8.0f} req/s  "
                            f"p50 {case.p50_ms:6.2f} ms  p99 {case.p99_ms:6.2f} ms  failed {case.failed}",
                            flush=True,
                        )
    finally:
        asyncio.run(run_admin_statement(server_url, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
        for server in embedded:
            if server.started:
                server.stop()
        shutil.rmtree(work, ignore_errors=True)

    def pick(method: str, path: str, concurrency: int) -> Case:
        return next(c for c in cases if (c.method, c.path, c.concurrency) == (method, path, concurrency))

    methods = list(requests)
    summary = {
        "json_via_envoy_over_grpc_c32": statistics.fmean(
            pick(m, "json_via_envoy", 32).rps / pick(m, "grpc_direct", 32).rps for m in methods
        ),
        "added_ms_p50_c1": statistics.fmean(
            pick(m, "json_via_envoy", 1).p50_ms - pick(m, "grpc_direct", 1).p50_ms for m in methods
        ),
    }
    _write_results(cases, summary, _machine(), args)
    print(json.dumps(summary, indent=2))
    print(f"written: {RESULTS_MD.relative_to(ROOT)}, {RESULTS_JSON.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
