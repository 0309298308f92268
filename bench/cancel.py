"""How fast a cancel reaches the node: CancelJob on a running job, measured on the real tritonserver.

`python -m bench.cancel` starts tritonserver with the SmolLM2 model (one slot, so "the node is free again"
is the only slot being free) and the inference server in-process (DATABASE_URL/REDIS_URL or the embedded
ones; the model configured free so payments stay out of it). Each round starts a long Generate (400 tokens),
lets it stream some tokens, calls CancelJob and measures:

- `cancel_rpc_ms`: CancelJob's own latency (it returns once the job row has ended);
- `slot_free_ms`: from the CancelJob call until Triton's `far_llm_slots_busy` gauge is back to 0;
- `tokens_after_cancel`: completion tokens the job recorded beyond the ones the caller had seen when it
  cancelled (the contract: "within a token or so").

Figures go to bench/results/cancel.json and the "Cancellation" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
from far.inference.v1 import inference_service_pb2 as pb
from far.inference.v1 import inference_service_pb2_grpc, job_pb2

from bench.scratch import scratch
from devstack.processes import http_get
from devstack.stack import run_migrations
from gpu.triton import CHAT_MODEL, MODEL_REPOSITORY, TritonProcess
from servers.common.auth import JwtKeys, TokenIssuer
from servers.common.config import Settings
from servers.common.server import start_server
from servers.inference.server import make_spec

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "RESULTS.md"
JSON_OUT = ROOT / "results" / "cancel.json"
SECTION = "## Cancellation"
JWT_SECRET = "bench-" + "c" * 40


def _busy(triton: TritonProcess) -> float:
    _, body = http_get(triton.metrics_url)
    found = re.search(r"^far_llm_slots_busy\{[^}]*\} (\S+)", body, re.MULTILINE)
    return float(found.group(1)) if found else -1.0


async def _round(stub: Any, token: str, triton: TritonProcess, seen_tokens: int) -> dict[str, float]:
    metadata = (("authorization", f"Bearer {token}"),)
    request = pb.GenerateRequest(model=f"models/{CHAT_MODEL}", max_tokens=400, request_id=str(uuid.uuid4()))
    request.chat.messages.add(role=job_pb2.ChatMessage.ROLE_USER, content="Write a long story about a lighthouse.")
    call = stub.Generate(request, metadata=metadata)
    name, seen = "", 0
    async for response in call:
        if response.HasField("job"):
            name = response.job.name
        elif response.HasField("delta"):
            seen = response.delta.offset + response.delta.token_count
            if seen >= seen_tokens:
                break
    started = time.perf_counter()
    job = await stub.CancelJob(pb.CancelJobRequest(name=name), metadata=metadata)
    cancel_rpc = time.perf_counter() - started
    while _busy(triton) > 0:  # noqa: ASYNC110 - an external gauge: nothing to wait on but polling it
        await asyncio.sleep(0.002)
    slot_free = time.perf_counter() - started
    call.cancel()
    assert job.state == job_pb2.Job.STATE_CANCELLED, job
    return {
        "cancel_rpc_ms": cancel_rpc * 1000,
        "slot_free_ms": slot_free * 1000,
        "tokens_after_cancel": float(job.usage.completion_tokens - seen),
    }


async def _measure(env: dict[str, str], triton: TritonProcess, rounds: int) -> list[dict[str, float]]:
    catalog = Path(env["FAR_DATA_DIR"]) / "models.json"
    catalog.write_text(json.dumps([{"id": CHAT_MODEL, "context_length": 2048, "max_output_tokens": 400, "free": True}]))
    environ = {
        **env,
        "GRPC_LISTEN": "127.0.0.1:0",
        "INFERENCE_MODELS_FILE": str(catalog),
        "INFERENCE_STATIC_NODES": f"{CHAT_MODEL}=local@{triton.grpc_url}",
        "INFERENCE_SLOTS_PER_MODEL": "1",
    }
    server = await start_server(make_spec(environ), Settings.from_env("inference", 0, environ=environ))
    token = TokenIssuer(JwtKeys("k1", {"k1": JWT_SECRET})).issue("0x" + "be" * 20, ["user"])
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
            await _round(stub, token, triton, 4)  # warm-up
            return [await _round(stub, token, triton, 8 + 4 * (i % 5)) for i in range(rounds)]
    finally:
        await server.stop()


def _write(summary: dict[str, Any]) -> None:
    JSON_OUT.parent.mkdir(parents=True, exist_ok=True)
    JSON_OUT.write_text(json.dumps(summary, indent=2) + "\n")
    rows = "\n".join(
        f"| {name} | {values['p50']:.1f} | {values['max']:.1f} |" for name, values in summary["figures"].items()
    )
    section = f"""{SECTION}

`python -m bench.cancel` ({summary["rounds"]} rounds, one model slot, a 400-token story cancelled after
8-24 tokens; {summary["load"]}). CancelJob returns once the job row has ended; the slot is free when
Triton's `far_llm_slots_busy` is back to 0; tokens after the cancel are those the job recorded beyond what
the caller had seen. Figures: bench/results/cancel.json.

| measure | p50 | max |
|---|---|---|
{rows}

The model checks `is_cancelled()` between tokens (`gpu/models/.../generation.py`), so the node stops within
about one token (SmolLM2 on 2 CPU cores: ~15-20 ms a token) once Triton has the cancel.
"""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmarks\n"
    if SECTION in text:
        start = text.index(SECTION)
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + section + (text[end + 1 :] if end != -1 else "")
    else:
        text = text.rstrip() + "\n\n" + section
    RESULTS.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    with scratch("cancel") as run:
        env = run.env(JWT_SECRET=JWT_SECRET, JWT_KEY_ID="k1", LOG_LEVEL="warning", FAR_DATA_DIR=str(run.work))
        run_migrations(["inference"], env, log_path=run.work / "migrations.log")
        triton = TritonProcess.start(
            MODEL_REPOSITORY, run.work / "triton", load_models=[CHAT_MODEL], env={"FAR_LLAMA_SLOTS": "1"}
        )
        try:
            results = asyncio.run(_measure(env, triton, args.rounds))
        finally:
            triton.stop()
    figures = {
        name: {
            "p50": statistics.median(r[name] for r in results),
            "max": max(r[name] for r in results),
        }
        for name in ("cancel_rpc_ms", "slot_free_ms", "tokens_after_cancel")
    }
    load = f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
    summary = {"rounds": len(results), "load": load, "figures": figures, "rounds_raw": results}
    for name, values in figures.items():
        print(f"{name:20} p50 {values['p50']:7.1f}  max {values['max']:7.1f}")
    _write(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
