"""What the platform adds to a token stream: Triton straight from tritonclient vs Generate through the service.

    python -m bench.inference [--tokens 32] [--rounds 1.0] [--placement shared|split|both]      (make bench)
                              [--slots 4] [--replicas 1] [--tag NAME]

One run, one machine, one tritonserver (SmolLM2-135M on llama.cpp, 4 slots x 1 thread, gpu/models) and three
ways to stream the same generation from it, each 1, 4 and 16 streams at a time:

- `triton_direct`: tritonclient.grpc.aio `stream_infer` with the inputs the service itself sends (`build_inputs`);
- `service_direct`: `InferenceService.Generate` on the inference server's own port (mTLS, a `service/bench`
  client certificate and an account's JWT);
- `via_envoy`: the same call through Envoy's web listener (gRPC over h2c, JWT checked at the edge, mTLS upstream).

The catalog makes the model free, so no quote, payment or chain read is on the measured path: the figures are the
platform's own cost (validation, admission in Redis, the job row in PostgreSQL, relaying, the edge). The service
gets 16 local slots so that every stream takes its fast path (no Redis hop between Triton and the caller);
the 16-stream rounds then queue inside Triton, the same way for every path. Paths take turns within each round,
each round in another of the six orders (so that drift, and whatever a round leaves behind for the next, favours
none). Time to first token is from the call to the first token (the
first `delta` for Generate); tokens/s is all completion tokens of a round over its wall time. CPU per token of
the inference server, Envoy, Triton and (when they are local TCP servers) PostgreSQL and Redis comes from their
process times over the rounds of each path. tritonserver's Python backend can crash under 16 concurrent streams
(bench/RESULTS.md): a round it crashed in is dropped and run again on a fresh Triton and stack, and the crashes
are recorded. Figures go to bench/results/inference.json and to the inference section of bench/RESULTS.md.

Placements (both by default, one after the other): `shared` lets every process run on every core, so the model
and the platform take CPU from each other; `split` pins Triton (and so its stub and llama.cpp's threads) to the
last CPU and the server, Envoy and the client to the others (CPU 1 and CPU 0 on the 2-core machine), as a
deployment puts the model on a GPU node of its own. The
platform's cost per token and per job is the same in both; what differs is whether it is paid out of the model's
CPU. The CPUs each process was allowed are recorded with the figures.

`--replicas N` runs N inference server processes behind Envoy's one cluster (`devstack.Stack(replicas=...)`):
`via_envoy` calls are spread over them, `service_direct` calls the first, and the server's CPU and histograms
are summed over all of them. It is for a machine with cores to spare (on the 2-core machine the platform has one
core in `split`, which more processes cannot widen; on a bigger one `split` gives the platform every CPU but the
model's).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import re
import secrets
import statistics
import time
import urllib.parse
from collections import defaultdict
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import httpx
import psutil
from far.inference.v1 import inference_service_pb2 as pb
from far.inference.v1 import inference_service_pb2_grpc, job_pb2
from tritonclient.grpc import InferRequestedOutput
from tritonclient.grpc.aio import InferenceServerClient

from bench.provenance import code_state, machine
from bench.results_file import write_section
from bench.scratch import scratch
from devstack.stack import Stack, run_migrations
from gpu.triton import CHAT_MODEL, MODEL_REPOSITORY, SHM_DIR, TritonProcess, _stub_shm_regions
from servers.common.auth import JwtKeys, TokenIssuer
from servers.inference.requests import generation_from
from servers.inference.triton_stream import OUTPUTS, build_inputs


def _table_header(*columns: str) -> str:
    return "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)


ROOT = Path(__file__).resolve().parent.parent
RESULTS_MD = ROOT / "bench" / "RESULTS.md"
RESULTS_DIR = ROOT / "bench" / "results"


def _outputs(tag: str) -> tuple[Path, str, str]:
    """The JSON file and the RESULTS.md markers of a run: `inference`, or `inference-<tag>` for a variant."""
    name = f"inference-{tag}" if tag else "inference"
    return RESULTS_DIR / f"{name}.json", f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


JWT_SECRET = "bench-" + secrets.token_hex(24)
ACCOUNT = "0x" + "b1" * 20
PATHS = ("triton_direct", "service_direct", "via_envoy")
# Every order of the paths, one per round in turn: each path runs first, second and last equally often, and
# before and after each other path equally often (a rotation alone put triton_direct first in 2 of 4 rounds).
ORDERS = list(itertools.permutations(PATHS))
# Rounds per concurrency at --rounds 1: whole cycles of ORDERS, about the same number of streams for each
# concurrency but the last (24, 24, 96).
ROUNDS = {1: 24, 4: 6, 16: 6}
PROMPT = "Write a long story about a lighthouse keeper and the storm that changed his life."
SEED = 7
CASE_HEADER = _table_header(
    "path", "streams at once", "streams", "TTFT p50 ms", "TTFT p99 ms", "tokens/s (all streams)",
    "ms/token per stream", "job message p50 ms", "time to model mean ms", "TTFT mean ms", "model TTFT mean ms",
    "service CPU ms/token",
    "Envoy CPU ms/token", "Triton CPU ms/token", "PostgreSQL + Redis CPU ms/token",
)  # fmt: skip
ADDED_HEADER = _table_header(
    "streams at once", "TTFT p50 ms", "TTFT p99 ms", "TTFT paired by round ms", "TTFT mean, less the model's own ms",
    "tokens/s ratio", "ms/token per stream", "service direct: TTFT p50 ms", "service direct: TTFT paired ms",
    "service direct: TTFT mean, less the model's own ms", "service direct: tokens/s ratio",
)  # fmt: skip
LLAMA_SLOTS = 4
"""The model's concurrent generations by default (`--slots`): 16 streams then queue 12 in Triton."""
STORES = {"postgres": "DATABASE_URL", "redis": "REDIS_URL"}
# A round of 16 streams takes seconds; one that takes this long is stuck (the model's stub died).
ROUND_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Placement:
    """Which CPUs the model and the platform run on: all shared, or the model on CPUs of its own."""

    name: str
    model_cpus: frozenset[int] | None
    """None: every process may run on every CPU."""
    platform_cpus: frozenset[int] | None
    description: str


SHARED = Placement(
    "shared",
    None,
    None,
    "Triton, the inference server, Envoy, the client and the stores all share every core",
)
PLACEMENT_NAMES = ("shared", "split")


def split_placement(cpus: Iterable[int]) -> Placement:
    """`split` on these CPUs: the model on the last one, the platform on all the others (on the 2-core machine,
    CPU 1 and CPU 0; on a bigger one the platform's side has room for `--replicas`)."""
    ordered = sorted(cpus)
    if len(ordered) < 2:
        raise SystemExit("bench: the split placement needs two CPUs at least")
    model, platform = ordered[-1], ordered[:-1]
    if len(platform) == 1:
        where = f"CPU {platform[0]}"
    elif platform == list(range(platform[0], platform[-1] + 1)):
        where = f"CPUs {platform[0]}-{platform[-1]}"
    else:
        where = "CPUs " + ", ".join(map(str, platform))
    return Placement(
        "split",
        frozenset({model}),
        frozenset(platform),
        f"Triton (tritonserver, its Python stub and llama.cpp's threads) pinned to CPU {model}; the inference "
        f"server, Envoy, the client (and PostgreSQL and Redis when the bench starts them) pinned to {where}: the "
        "model has hardware of its own, as on a GPU node",
    )


@dataclass(frozen=True, slots=True)
class Stream:
    """One generation as the client saw it (perf_counter seconds)."""

    start: float
    first_token: float
    last_token: float
    end: float
    tokens: int
    text: str
    job: float | None = None
    """When Generate's first message (the job) arrived: the bookkeeping before the model is asked."""


# The server's own histograms the bench reads: time in front of the model, and the model's time to first token.
SERVER_FIGURES = ("time_to_model", "model_time_to_first_token")


@dataclass
class Tally:
    """Everything measured for one path at one concurrency, over all its rounds."""

    streams: list[Stream] = field(default_factory=list)
    round_ttft_p50_ms: list[float] = field(default_factory=list)
    """Each round's median time to first token, in round order (paths take turns, so rounds pair up)."""
    wall_s: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    server: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    """The server's histograms over the rounds (`SERVER_FIGURES`: sums and counts)."""

    def server_mean_ms(self, name: str) -> float | None:
        count = self.server.get(f"{name}_count", 0.0)
        return self.server[f"{name}_sum"] * 1000 / count if count else None


@dataclass
class Case:
    path: str
    concurrency: int
    streams: int
    tokens: int
    ttft_p50_ms: float
    ttft_p99_ms: float
    ttft_added_paired_ms: float | None
    """Median over rounds of (this path's round median TTFT - triton_direct's in the same round)."""
    tokens_per_s: float
    ms_per_token: float
    """Mean time between a stream's first and last token, per token after the first."""
    time_to_job_p50_ms: float | None
    time_to_model_mean_ms: float | None
    """The server's own figure: from a call's arrival to its Triton request going out (mean)."""
    ttft_mean_ms: float
    model_ttft_mean_ms: float | None
    """The server's own figure for the same calls: from the Triton request to its first token (mean)."""
    service_cpu_ms_per_token: float | None
    envoy_cpu_ms_per_token: float | None
    triton_cpu_ms_per_token: float
    stores_cpu_ms_per_token: float | None
    """PostgreSQL + Redis (None when they are not local TCP servers)."""


def percentile(values: list[float], q: float) -> float:
    """Nearest rank: with n samples, p99 is the largest unless n >= 100."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _generate_request(tokens: int) -> pb.GenerateRequest:
    request = pb.GenerateRequest(model=f"models/{CHAT_MODEL}", max_tokens=tokens)
    request.chat.messages.add(role=job_pb2.ChatMessage.ROLE_USER, content=PROMPT)
    request.sampling.temperature = 0.0
    request.sampling.seed = SEED
    return request


def _triton_request(request: pb.GenerateRequest) -> dict[str, Any]:
    """The request the service sends Triton for `request` (same inputs, same outputs asked for)."""
    job = job_pb2.Job(model=request.model, chat=request.chat, sampling=request.sampling, max_tokens=request.max_tokens)
    return {
        "model_name": CHAT_MODEL,
        "inputs": build_inputs(generation_from(job)),
        "outputs": [InferRequestedOutput(name) for name in OUTPUTS],
    }


async def _triton_stream(client: InferenceServerClient, request: pb.GenerateRequest) -> Stream:
    triton_request = _triton_request(request)

    async def requests() -> Any:
        yield triton_request

    start = time.perf_counter()
    first = last = 0.0
    tokens = 0
    text: list[str] = []
    async for result, error in client.stream_infer(requests()):
        if error is not None:
            raise RuntimeError(f"triton: {error}")
        completion = result.as_numpy("completion_tokens")
        if completion is not None and completion.size and int(completion.reshape(-1)[0]) > tokens:
            last = time.perf_counter()
            first = first or last
            tokens = int(completion.reshape(-1)[0])
        piece = result.as_numpy("text")
        if piece is not None and piece.size:
            text.append(piece.reshape(-1)[0].decode())
    return Stream(start, first, last, time.perf_counter(), tokens, "".join(text))


async def _generate_stream(stub: Any, request: pb.GenerateRequest, metadata: Any) -> Stream:
    start = time.perf_counter()
    job: float | None = None
    first = last = 0.0
    text: list[str] = []
    final: pb.GenerateEnd | None = None
    async for response in stub.Generate(request, metadata=metadata):
        if response.HasField("delta"):
            last = time.perf_counter()
            first = first or last
            text.append(response.delta.text)
        elif response.HasField("job"):
            job = time.perf_counter()
        elif response.HasField("final"):
            final = response.final
    if final is None or final.state != job_pb2.Job.STATE_SUCCEEDED:
        raise RuntimeError(f"Generate did not succeed: {final}")
    return Stream(start, first, last, time.perf_counter(), final.usage.completion_tokens, "".join(text), job)


class Processes:
    """CPU seconds (user + system) of the processes on the path, each with its children (live and exited):
    the inference server, Envoy, Triton with its model stub, and PostgreSQL and Redis when they listen on TCP
    here (they serve other clients too: their figures hold only on an otherwise idle machine)."""

    def __init__(self, pids: Mapping[str, int | Sequence[int]]) -> None:
        """`pids`: a process, or several (a service's replicas, summed), by name."""
        self.pids = {name: [pid] if isinstance(pid, int) else list(pid) for name, pid in pids.items()}
        self._procs = {name: [psutil.Process(pid) for pid in roots] for name, roots in self.pids.items()}

    def cpu_s(self) -> dict[str, float]:
        totals = {}
        for name, roots in self._procs.items():
            total = 0.0
            for root in roots:
                for member in [root, *root.children(recursive=True)]:
                    try:
                        times = member.cpu_times()
                    except psutil.NoSuchProcess:
                        continue
                    total += times.user + times.system
                    if member is root:
                        total += times.children_user + times.children_system
            totals[name] = total
        return totals


def _listener_pid(url: str) -> int | None:
    """The process that listens on the TCP port of `url` on this machine (None for sockets or remote hosts)."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.hostname not in ("127.0.0.1", "localhost", "::1") or parsed.port is None:
        return None
    for connection in psutil.net_connections(kind="tcp"):
        address = connection.laddr
        if connection.status == psutil.CONN_LISTEN and address and address[1] == parsed.port and connection.pid:
            return int(connection.pid)
    return None


async def _round(
    streams: Callable[[], Coroutine[Any, Any, Stream]], concurrency: int, processes: Processes, tally: Tally
) -> None:
    before = processes.cpu_s()
    started = time.perf_counter()
    async with asyncio.TaskGroup() as group:  # one failed stream cancels the others
        tasks = [group.create_task(streams()) for _ in range(concurrency)]
    done = [task.result() for task in tasks]
    tally.wall_s += time.perf_counter() - started
    after = processes.cpu_s()
    for name in after:
        tally.cpu_s[name] += after[name] - before[name]
    tally.streams.extend(done)
    tally.round_ttft_p50_ms.append(statistics.median((s.first_token - s.start) * 1000 for s in done))


def _case(path: str, concurrency: int, tally: Tally, direct: Tally) -> Case:
    streams = tally.streams
    tokens = sum(s.tokens for s in streams)
    ttft = [(s.first_token - s.start) * 1000 for s in streams]
    jobs = [(s.job - s.start) * 1000 for s in streams if s.job is not None]

    def per_token(name: str) -> float:
        return tally.cpu_s[name] * 1000 / tokens

    stores = [per_token(name) for name in STORES if name in tally.cpu_s]

    return Case(
        path=path,
        concurrency=concurrency,
        streams=len(streams),
        tokens=tokens,
        ttft_p50_ms=statistics.median(ttft),
        ttft_p99_ms=percentile(ttft, 0.99),
        ttft_added_paired_ms=None
        if tally is direct
        else statistics.median(a - b for a, b in zip(tally.round_ttft_p50_ms, direct.round_ttft_p50_ms, strict=True)),
        tokens_per_s=tokens / tally.wall_s,
        ms_per_token=statistics.fmean((s.last_token - s.first_token) * 1000 / (s.tokens - 1) for s in streams),
        time_to_job_p50_ms=statistics.median(jobs) if jobs else None,
        time_to_model_mean_ms=tally.server_mean_ms("time_to_model"),
        ttft_mean_ms=statistics.fmean(ttft),
        model_ttft_mean_ms=tally.server_mean_ms("model_time_to_first_token"),
        service_cpu_ms_per_token=per_token("inference") if path != "triton_direct" else None,
        envoy_cpu_ms_per_token=per_token("envoy") if path == "via_envoy" else None,
        triton_cpu_ms_per_token=per_token("triton"),
        stores_cpu_ms_per_token=sum(stores) if stores else None,
    )


class TritonCrashed(RuntimeError):
    """tritonserver died during a round (its Python backend can crash under many concurrent streams)."""


class Rig:
    """Triton, the inference server and Envoy, with a client for each path; started again after a Triton crash."""

    def __init__(
        self,
        work: Path,
        env: Mapping[str, str],
        token: str,
        request: pb.GenerateRequest,
        placement: Placement,
        slots: int = LLAMA_SLOTS,
        replicas: int = 1,
    ) -> None:
        self._work = work
        self.placement = placement
        self.slots = slots
        self.replicas = replicas
        self._env = env
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._request = request
        self.starts = 0
        self.triton: TritonProcess | None = None
        self.stack: Stack | None = None
        self._client: InferenceServerClient | None = None
        self._channels: list[grpc.aio.Channel] = []
        self.paths: dict[str, Callable[[], Coroutine[Any, Any, Stream]]] = {}
        self._shm: set[str] = set()
        self.processes: Processes | None = None

    def start(self) -> None:
        self.starts += 1
        run = self._work / f"run-{self.starts}"
        # A child process inherits the CPU affinity of the thread that starts it: Triton (and every thread and
        # process it makes) gets the model's CPUs, what starts after it the platform's.
        if self.placement.model_cpus is not None:
            os.sched_setaffinity(0, self.placement.model_cpus)
        try:
            self.triton = TritonProcess.start(
                MODEL_REPOSITORY,
                run / "triton",
                load_models=[CHAT_MODEL],
                env={"FAR_LLAMA_SLOTS": str(self.slots), "FAR_LLAMA_THREADS": "1"},
            )
        finally:
            if self.placement.platform_cpus is not None:
                os.sched_setaffinity(0, self.placement.platform_cpus)
        # TritonProcess.stop frees the stub's shared memory only while the stub lives; after a crash, we do.
        self._shm = _stub_shm_regions(self.triton.pid)
        env = {
            **self._env,
            "REDIS_KEY_PREFIX": f"far-bench-{secrets.token_hex(4)}:",
            "INFERENCE_STATIC_NODES": f"{CHAT_MODEL}=bench@{self.triton.grpc_url}",
        }
        self.stack = Stack(["inference"], env=env, run_dir=run / "stack", replicas={"inference": self.replicas}).start()
        assert self.stack.envoy_process is not None
        stores = {name: _listener_pid(self._env[variable]) for name, variable in STORES.items()}
        self.processes = Processes(
            {
                "inference": [info.process.pid for info in self.stack.replicas["inference"]],
                "envoy": self.stack.envoy_process.pid,
                "triton": self.triton.pid,
                **{name: pid for name, pid in stores.items() if pid is not None},
            }
        )
        client = self._client = InferenceServerClient(self.triton.grpc_url)
        direct = grpc.aio.secure_channel(
            self.stack.grpc_target("inference"), self.stack.client_credentials("service", "bench")
        )
        edge = grpc.aio.insecure_channel(self.stack.envoy_grpc_target)
        self._channels = [direct, edge]
        direct_stub = inference_service_pb2_grpc.InferenceServiceStub(direct)
        edge_stub = inference_service_pb2_grpc.InferenceServiceStub(edge)
        self.paths = {
            "triton_direct": lambda: _triton_stream(client, self._request),
            "service_direct": lambda: _generate_stream(direct_stub, self._request, self._metadata),
            "via_envoy": lambda: _generate_stream(edge_stub, self._request, self._metadata),
        }

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.close()
        for channel in self._channels:
            await channel.close()
        if self.stack is not None:
            self.stack.stop()
        if self.triton is not None:
            self.triton.stop()
        for name in self._shm:
            (SHM_DIR / name).unlink(missing_ok=True)
        self._client, self._channels, self.stack, self.triton = None, [], None, None

    async def round(self, path: str, concurrency: int, tally: Tally) -> None:
        """One round of `concurrency` streams on `path`, added to `tally`; TritonCrashed if Triton died in it."""
        assert self.processes is not None
        assert self.triton is not None
        assert self.stack is not None
        metrics = [self.stack.metrics_url("inference", replica) for replica in range(self.replicas)]
        before = _server_figures(metrics)
        try:
            async with asyncio.timeout(ROUND_TIMEOUT_S):
                await _round(self.paths[path], concurrency, self.processes, tally)
            for name, value in _server_figures(metrics).items():
                tally.server[name] += value - before[name]
        except TimeoutError as error:
            if not _stub_alive(self.triton):
                raise TritonCrashed(f"the model's Python stub died during a {path} round of {concurrency}") from error
            raise
        except Exception as error:
            if await asyncio.to_thread(_died, self.triton, 5.0):
                raise TritonCrashed(f"tritonserver died during a {path} round of {concurrency}") from error
            raise


def _server_figures(metrics_urls: Sequence[str | None]) -> dict[str, float]:
    """Sums and counts of the SERVER_FIGURES histograms over the server's replicas (read between rounds, so not
    on the clock)."""
    found = {f"{name}_{kind}": 0.0 for name in SERVER_FIGURES for kind in ("sum", "count")}
    for url in metrics_urls:
        assert url is not None
        text = httpx.get(url, timeout=10).text
        for name in SERVER_FIGURES:
            for kind in ("sum", "count"):
                pattern = rf"^far_inference_{name}_seconds_{kind}\{{[^}}]*\}} (\S+)$"
                match = re.search(pattern, text, re.MULTILINE)
                found[f"{name}_{kind}"] += float(match.group(1)) if match else 0.0
    return found


def _stub_alive(triton: TritonProcess) -> bool:
    """Whether the model's Python backend stub still runs (when it dies alone, its requests hang)."""
    try:
        children = psutil.Process(triton.pid).children()
    except psutil.NoSuchProcess:
        return False
    return any(
        child.name().startswith("triton_python") and child.status() != psutil.STATUS_ZOMBIE for child in children
    )


def _died(triton: TritonProcess, within_s: float) -> bool:
    """Whether tritonserver is gone or goes within `within_s` (a crash shows at the client first)."""
    deadline = time.monotonic() + within_s
    while triton.alive():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


async def _measure(
    rig: Rig, args: argparse.Namespace
) -> tuple[list[Case], dict[str, list[str]], list[str], dict[str, list[int]]]:
    """Warm up, then every concurrency's rounds; returns the cases, each path's distinct texts, the crashes and
    the CPUs the measured processes were allowed (after the warm-up: every llama thread exists by then)."""
    texts: dict[str, list[str]] = defaultdict(list)
    crashes: list[str] = []

    async def attempt(path: str, concurrency: int, tally: Tally) -> None:
        """A round, again on a fresh rig after a Triton crash (the crashed round's streams are dropped)."""
        restart = False
        while True:
            partial = Tally()
            try:
                if restart:
                    await rig.stop()
                    rig.start()
                    await _warm_up(rig)
                await rig.round(path, concurrency, partial)
            except TritonCrashed as crash:
                crashes.append(str(crash))
                print(f"bench: {crash}; starting Triton and the stack again", flush=True)
                if len(crashes) > args.max_restarts:
                    raise
                restart = True
                continue
            tally.streams.extend(partial.streams)
            tally.round_ttft_p50_ms.extend(partial.round_ttft_p50_ms)
            tally.wall_s += partial.wall_s
            for name, value in partial.server.items():
                tally.server[name] += value
            for name, seconds in partial.cpu_s.items():
                tally.cpu_s[name] += seconds
            return

    try:
        rig.start()
        await _warm_up(rig)  # a crash here fails the run: Triton was too busy to be measured at all
        affinity = _affinities(rig)
        cases: list[Case] = []
        for concurrency, rounds in ROUNDS.items():
            tallies = {path: Tally() for path in PATHS}
            for number in range(max(1, round(rounds * args.rounds))):
                for path in ORDERS[number % len(ORDERS)]:
                    await attempt(path, concurrency, tallies[path])
            for path in PATHS:
                case = _case(path, concurrency, tallies[path], tallies["triton_direct"])
                cases.append(case)
                texts[path].extend(sorted({s.text for s in tallies[path].streams}))
                print(
                    f"{path:15} c={concurrency:<2} ttft p50 {case.ttft_p50_ms:7.1f} ms  "
                    f"p99 {case.ttft_p99_ms:7.1f} ms  {case.tokens_per_s:6.1f} tok/s  "
                    f"{case.ms_per_token:5.2f} ms/token  ({case.streams} streams)",
                    flush=True,
                )
        return cases, texts, crashes, affinity
    finally:
        await rig.stop()


async def _warm_up(rig: Rig) -> None:
    """Connections, every llama slot, the server's code paths."""
    for path in PATHS:
        for concurrency in (1, rig.slots):
            await rig.round(path, concurrency, Tally())


def _summary(cases: list[Case]) -> dict[str, Any]:
    def pick(path: str, concurrency: int) -> Case:
        return next(c for c in cases if (c.path, c.concurrency) == (path, concurrency))

    summary: dict[str, Any] = {}
    for path, tag in (("via_envoy", ""), ("service_direct", "_service_direct")):
        for concurrency in ROUNDS:
            base, case = pick("triton_direct", concurrency), pick(path, concurrency)
            suffix = tag if concurrency == 16 else f"{tag}_c{concurrency}"
            summary[f"ttft_added_p50_ms{suffix}"] = round(case.ttft_p50_ms - base.ttft_p50_ms, 2)
            summary[f"ttft_added_p99_ms{suffix}"] = round(case.ttft_p99_ms - base.ttft_p99_ms, 2)
            summary[f"ttft_added_paired_ms{suffix}"] = round(case.ttft_added_paired_ms or 0.0, 2)
            summary[f"tokens_per_s_ratio{suffix}"] = round(case.tokens_per_s / base.tokens_per_s, 3)
            summary[f"ms_per_token_added{suffix}"] = round(case.ms_per_token - base.ms_per_token, 3)
            summary[f"time_to_model_mean_ms{suffix}"] = round(case.time_to_model_mean_ms or 0.0, 3)
            # The platform's share of its callers' mean TTFT: theirs less the model's own for the same calls.
            summary[f"ttft_added_mean_ms{suffix}"] = round(case.ttft_mean_ms - (case.model_ttft_mean_ms or 0.0), 2)
    return summary


@dataclass
class Measured:
    """One placement's run: its cases, the summary figures and the context they were measured in."""

    placement: Placement
    cases: list[Case]
    summary: dict[str, Any]
    context: dict[str, Any]


def _affinities(rig: Rig) -> dict[str, list[int]]:
    """The CPUs each measured process (and Triton's children) may run on, as the kernel reports them."""
    assert rig.processes is not None
    assert rig.triton is not None
    found: dict[str, list[int]] = {}
    for name, pids in rig.processes.pids.items():
        with contextlib.suppress(psutil.Error):  # a service's replicas: the CPUs any of them may use
            found[name] = sorted({cpu for pid in pids for cpu in psutil.Process(pid).cpu_affinity() or []})
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(rig.triton.pid).children(recursive=True):
            found[f"triton child {child.name()}"] = sorted(child.cpu_affinity() or [])
    return found


def _headline(measured: list[Measured]) -> Measured:
    """The figures the JSON's top-level keys carry: the shared placement when it ran (the conservative one:
    at 16 streams the split placement's TTFT difference swings to either side by hundreds of ms from run to
    run), else the one that ran."""
    return next((m for m in measured if m.placement is SHARED), measured[0])


def _write_results(measured: list[Measured], machine: dict[str, str], tag: str = "") -> None:
    headline = _headline(measured)
    results_json, begin, end = _outputs(tag)
    slots = headline.context["llama_slots"]
    replicas = headline.context.get("inference_replicas", 1)
    servers = "one inference server process" if replicas == 1 else f"{replicas} inference server processes"
    replicas_flag = "" if replicas == 1 else f" --replicas {replicas}"
    results_json.parent.mkdir(parents=True, exist_ok=True)
    results_json.write_text(
        json.dumps(
            {
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "machine": machine,
                "headline_placement": headline.placement.name,
                **headline.summary,
                "placements": {
                    m.placement.name: {
                        "description": m.placement.description,
                        **m.context,
                        **m.summary,
                        "cases": [asdict(case) for case in m.cases],
                    }
                    for m in measured
                },
            },
            indent=2,
        )
        + "\n"
    )
    sections = "\n\n".join(_placement_section(m) for m in measured)
    placement = "" if len(measured) > 1 else f" --placement {measured[0].placement.name}"
    title = (
        ""
        if not tag
        else f", {slots} slots (`python -m bench.inference{placement} --slots {slots}{replicas_flag} --tag {tag}`)"
    )
    section = f"""{begin}
## Inference: Triton direct vs Generate through the platform (`make bench`, `bench/inference.py`){title}

Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {machine["cpu"]}, {machine["cores"]} cores, {machine["memory"]};
Python {machine["python"]}, Envoy {machine["envoy"]}. One tritonserver (SmolLM2-135M Q4_1 on llama.cpp,
{slots} slots x 1 thread, CPU), {servers}, Envoy with 2 workers; every figure is
Triton direct against the platform on the same Triton in the same run. {headline.context["max_tokens"]} tokens
per stream, temperature 0, seed {SEED}, one chat prompt; the model is free in the bench's catalog, so no payment
is verified. Streams per row = rounds x concurrency; paths take turns in every round, each round in the next
of the six orders. Two placements, one after the other: **shared** (everything on both cores) and **split**
(the model on a core of its own, as on a GPU node, where the model never shares the platform's CPUs).
`{results_json.relative_to(ROOT)}` carries both; its top-level keys are the **{headline.placement.name}**
placement's.

{sections}

Figures as JSON: `{results_json.relative_to(ROOT)}`.
{end}"""
    write_section(RESULTS_MD, begin, end, section)


def _placement_section(m: Measured) -> str:
    cases, summary, context = m.cases, m.summary, m.context

    def ms(value: float | None, digits: int = 2) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    rows = "\n".join(
        f"| {c.path} | {c.concurrency} | {c.streams} | {c.ttft_p50_ms:.1f} | {c.ttft_p99_ms:.1f} | "
        f"{c.tokens_per_s:.1f} | {c.ms_per_token:.2f} | {ms(c.time_to_job_p50_ms, 1)} | "
        f"{ms(c.time_to_model_mean_ms)} | {c.ttft_mean_ms:.1f} | {ms(c.model_ttft_mean_ms, 1)} | "
        f"{ms(c.service_cpu_ms_per_token)} | {ms(c.envoy_cpu_ms_per_token)} | {c.triton_cpu_ms_per_token:.2f} | "
        f"{ms(c.stores_cpu_ms_per_token)} |"
        for c in sorted(cases, key=lambda c: (c.concurrency, PATHS.index(c.path)))
    )
    added = "\n".join(
        f"| {concurrency} | {summary[f'ttft_added_p50_ms{sfx}']:+.1f} | {summary[f'ttft_added_p99_ms{sfx}']:+.1f} | "
        f"{summary[f'ttft_added_paired_ms{sfx}']:+.1f} | {summary[f'ttft_added_mean_ms{sfx}']:+.1f} | "
        f"{summary[f'tokens_per_s_ratio{sfx}']:.3f} | {summary[f'ms_per_token_added{sfx}']:+.2f} | "
        f"{summary[f'ttft_added_p50_ms_service_direct{sfx}']:+.1f} | "
        f"{summary[f'ttft_added_paired_ms_service_direct{sfx}']:+.1f} | "
        f"{summary[f'ttft_added_mean_ms_service_direct{sfx}']:+.1f} | "
        f"{summary[f'tokens_per_s_ratio_service_direct{sfx}']:.3f} |"
        for concurrency, sfx in ((c, "" if c == 16 else f"_c{c}") for c in ROUNDS)
    )
    load = context["load_average"]

    def verdict(ok: bool) -> str:
        return "met" if ok else "**not met**"

    return f"""### Placement `{m.placement.name}`: {m.placement.description}

Load average (1 min) {load["start"]:.2f} before, {load["end"]:.2f} after. Identical text on every path:
{context["same_text_on_every_path"]}. tritonserver crashed {len(context["triton_crashes"])} time(s) (each crashed
round was dropped and run again on a fresh Triton and stack).

{CASE_HEADER}
{rows}

Added by the platform (via Envoy unless marked), against `triton_direct` at the same concurrency:

{ADDED_HEADER}
{added}

- Targets at 16 streams through Envoy: added TTFT p50 **{summary["ttft_added_p50_ms"]:+.1f} ms** (goal <= 1 ms:
  {verdict(summary["ttft_added_p50_ms"] <= 1)}), p99 **{summary["ttft_added_p99_ms"]:+.1f} ms** (goal <= 5 ms:
  {verdict(summary["ttft_added_p99_ms"] <= 5)}); tokens/s ratio **{summary["tokens_per_s_ratio"]:.3f}** (goal >= 0.95:
  {verdict(summary["tokens_per_s_ratio"] >= 0.95)}).
- The same calls against the model's own time to first token (as the server saw it): the platform adds
  **{summary["ttft_added_mean_ms"]:+.1f} ms** to the mean at 16 streams through Envoy, of which
  {summary["time_to_model_mean_ms"]:.1f} ms in the server before the model is asked."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32, help="completion tokens per stream")
    parser.add_argument("--rounds", type=float, default=1.0, help="scale the rounds per concurrency (24, 6, 6)")
    parser.add_argument("--max-restarts", type=int, default=10, help="Triton crashes tolerated (each round is redone)")
    parser.add_argument(
        "--placement",
        choices=(*PLACEMENT_NAMES, "both"),
        default="both",
        help="shared: every process on every core; split: the model on the last CPU, the platform on the others "
        "(CPU 1 and CPU 0 on 2 cores; default both)",
    )
    parser.add_argument("--slots", type=int, default=LLAMA_SLOTS, help="the model's concurrent generations")
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="inference server processes behind Envoy (service_direct calls the first), for machines with spare cores",
    )
    parser.add_argument(
        "--tag", default="", help="a variant's name: figures go to inference-<tag>.json and a section of their own"
    )
    args = parser.parse_args()
    every_cpu = os.sched_getaffinity(0)
    names = PLACEMENT_NAMES if args.placement == "both" else (args.placement,)
    placements = [SHARED if name == "shared" else split_placement(every_cpu) for name in names]

    code = code_state("servers/inference", "gpu/models")
    measured: list[Measured] = []
    for placement in placements:
        os.sched_setaffinity(0, placement.platform_cpus or every_cpu)
        load_start = os.getloadavg()[0]
        print(f"bench: placement {placement.name}: {placement.description}", flush=True)
        with scratch("inference") as run:
            catalog = run.work / "models.json"
            catalog.write_text(
                json.dumps([{"id": CHAT_MODEL, "context_length": 2048, "max_output_tokens": 1024, "free": True}])
            )
            env = run.env(
                JWT_SECRET=JWT_SECRET,
                LOG_LEVEL="warning",
                BSC_RPC_URL="",
                INFERENCE_MODELS_FILE=str(catalog),
                INFERENCE_SLOTS_PER_MODEL=str(max(ROUNDS)),
                INFERENCE_MAX_QUEUE="64",
                INFERENCE_MAX_JOBS_PER_ACCOUNT=str(4 * max(ROUNDS)),
            )
            token = TokenIssuer(JwtKeys("k1", {"k1": JWT_SECRET})).issue(ACCOUNT, ["user"], ttl_s=3600)
            rig = Rig(run.work, env, token, _generate_request(args.tokens), placement, args.slots, args.replicas)
            run_migrations(["inference"], env, log_path=run.work / "migrations.log")
            cases, texts, crashes, affinity = asyncio.run(_measure(rig, args))
        context = {
            "max_tokens": args.tokens,
            "rounds": {str(c): max(1, round(r * args.rounds)) for c, r in ROUNDS.items()},
            "llama_slots": args.slots,
            "inference_replicas": args.replicas,
            "load_average": {"start": load_start, "end": os.getloadavg()[0]},
            "same_text_on_every_path": len({text for found in texts.values() for text in found}) == 1,
            "triton_crashes": crashes,
            "cpu_affinity": affinity,
            "code": code,
            "gpu": None,
        }
        measured.append(Measured(placement, cases, _summary(cases), context))
        print(json.dumps({"placement": placement.name, **context, **measured[-1].summary}, indent=2), flush=True)
    os.sched_setaffinity(0, every_cpu)
    _write_results(measured, machine(), args.tag)
    print(f"written: {RESULTS_MD.relative_to(ROOT)}, {_outputs(args.tag)[0].relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
