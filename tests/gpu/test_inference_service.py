"""far.inference.v1 over gRPC against a real tritonserver: Generate streams, resume with StreamJob, cancel, the
admission limits, and privacy of jobs. The model is configured free here (payments: tests/chain/test_inference_*)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from far.inference.v1 import inference_service_pb2 as pb
from far.inference.v1 import inference_service_pb2_grpc, job_pb2, model_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from devstack.processes import free_port
from gpu.triton import CHAT_MODEL, MODEL_REPOSITORY, TritonProcess
from servers.common.config import Settings
from servers.common.events import EventBus
from servers.common.server import RunningServer, start_server
from servers.inference.admission import Admission
from servers.inference.server import make_spec
from tests.gpu.triton_support import metric, wait_idle
from tests.integration.rich_errors import rich_error

MODEL = f"models/{CHAT_MODEL}"
Metadata = tuple[tuple[str, str], ...]


def server_environ(triton: TritonProcess, service_env: dict[str, str], catalog: Path) -> dict[str, str]:
    catalog.write_text(json.dumps([{"id": CHAT_MODEL, "context_length": 2048, "max_output_tokens": 200, "free": True}]))
    return {
        **service_env,
        "GRPC_LISTEN": "127.0.0.1:0",
        "INFERENCE_MODELS_FILE": str(catalog),
        "INFERENCE_STATIC_NODES": f"{CHAT_MODEL}=local@{triton.grpc_url}",
        "INFERENCE_SLOTS_PER_MODEL": "1",
        "INFERENCE_MAX_QUEUE": "1",
        "INFERENCE_MAX_JOBS_PER_ACCOUNT": "2",
        "INFERENCE_DISCONNECT_GRACE_S": "0.5",
    }


@pytest.fixture(scope="module")
async def inference_server(
    triton: TritonProcess, service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningServer]:
    environ = server_environ(triton, service_env, tmp_path_factory.mktemp("inference") / "models.json")
    running = await start_server(make_spec(environ), Settings.from_env("inference", 0, environ=environ))
    try:
        yield running
    finally:
        await running.stop()


@pytest.fixture(scope="module")
async def stub(inference_server: RunningServer) -> AsyncIterator[Any]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{inference_server.port}") as channel:
        yield inference_service_pb2_grpc.InferenceServiceStub(channel)


@pytest.fixture
def caller(make_token: Callable[..., str]) -> Callable[[str], Metadata]:
    def metadata(wallet: str) -> Metadata:
        return (("authorization", f"Bearer {make_token(wallet)}"),)

    return metadata


def wallet() -> str:
    return "0x" + uuid.uuid4().hex + "0" * 8


def story(max_tokens: int = 24) -> pb.GenerateRequest:
    request = pb.GenerateRequest(model=MODEL, max_tokens=max_tokens)
    request.chat.messages.add(role=job_pb2.ChatMessage.ROLE_USER, content="Tell me a story about a brave cat.")
    request.sampling.temperature = 0.0
    request.sampling.seed = 3
    return request


def text_of(responses: list[pb.GenerateResponse]) -> str:
    return "".join(r.delta.text for r in responses if r.HasField("delta"))


def check_contiguous(responses: list[pb.GenerateResponse], start: int = 0) -> None:
    """Deltas follow each other from `start` without gaps or repeats, and `final` says where they stopped."""
    expected = start
    for item in (r.delta for r in responses if r.HasField("delta")):
        assert (item.offset, item.token_count >= 1) == (expected, True)
        expected = item.offset + item.token_count
    assert responses[-1].final.next_offset == expected


async def test_models_are_listed_with_live_availability(stub: Any) -> None:
    listed = await stub.ListModels(pb.ListModelsRequest())
    (model,) = listed.models
    assert model.name == MODEL
    assert model.availability == model_pb2.Model.AVAILABILITY_AVAILABLE
    assert model.serving_node_count == 1
    assert model.price_per_token.value == "0"
    assert await stub.GetModel(pb.GetModelRequest(name=MODEL)) == model


async def test_generate_streams_the_job_then_deltas_then_final(stub: Any, caller: Callable[[str], Metadata]) -> None:
    owner = wallet()
    responses = [r async for r in stub.Generate(story(), metadata=caller(owner))]
    first, last = responses[0], responses[-1]
    assert first.HasField("job")
    assert first.job.owner == owner
    assert last.HasField("final")
    assert last.final.state == job_pb2.Job.STATE_SUCCEEDED
    assert last.final.finish_reason in (job_pb2.FINISH_REASON_LENGTH, job_pb2.FINISH_REASON_STOP)
    assert last.final.usage.completion_tokens == last.final.next_offset > 0
    assert last.final.usage.prompt_tokens > 0
    assert not last.final.HasField("error")
    check_contiguous(responses)
    job = await stub.GetJob(pb.GetJobRequest(name=first.job.name), metadata=caller(owner))
    assert job.state == job_pb2.Job.STATE_SUCCEEDED
    assert job.output_text == text_of(responses)
    assert job.HasField("time_to_first_token")


async def test_stream_job_resumes_without_repeats(stub: Any, caller: Callable[[str], Metadata]) -> None:
    owner = wallet()
    job = await stub.CreateJob(
        pb.CreateJobRequest(job=job_pb2.Job(model=MODEL, prompt="One, two, three,", max_tokens=16)),
        metadata=caller(owner),
    )
    assert job.state == job_pb2.Job.STATE_QUEUED
    # A client that saw the first deltas, lost its connection, and resumes from where it stopped.
    seen: list[pb.GenerateResponse] = []
    async for response in stub.StreamJob(pb.StreamJobRequest(name=job.name), metadata=caller(owner)):
        seen.append(response)
        if sum(1 for r in seen if r.HasField("delta")) == 3:
            break
    resume_at = [r.delta for r in seen if r.HasField("delta")][-1]
    offset = resume_at.offset + resume_at.token_count
    rest = [
        r async for r in stub.StreamJob(pb.StreamJobRequest(name=job.name, from_offset=offset), metadata=caller(owner))
    ]
    assert rest[0].HasField("job")
    check_contiguous(rest, offset)
    whole = await stub.GetJob(pb.GetJobRequest(name=job.name), metadata=caller(owner))
    assert text_of(seen) + text_of(rest) == whole.output_text  # the full text exactly once


async def test_a_retry_with_the_same_request_id_streams_the_first_job(
    stub: Any, caller: Callable[[str], Metadata]
) -> None:
    owner = wallet()
    request = story(max_tokens=24)
    request.request_id = str(uuid.uuid4())
    call = stub.Generate(request, metadata=caller(owner))
    head = [r async for r in _take(call, 2)]
    during = [r async for r in stub.Generate(request, metadata=caller(owner))]  # the first still runs
    first = head + [r async for r in call]
    after = [r async for r in stub.Generate(request, metadata=caller(owner))]  # a free slot: the fast path
    listed = await stub.ListJobs(pb.ListJobsRequest(), metadata=caller(owner))

    assert first[-1].final.state == job_pb2.Job.STATE_SUCCEEDED
    for retry in (during, after):
        assert retry[0].job.name == first[0].job.name
        assert text_of(retry) == text_of(first)  # from the start, whole
        check_contiguous(retry)
        assert retry[-1].final.state == job_pb2.Job.STATE_SUCCEEDED
    assert [job.name for job in listed.jobs] == [first[0].job.name]  # one job for the three calls


async def test_another_accounts_job_does_not_exist(stub: Any, caller: Callable[[str], Metadata]) -> None:
    owner, stranger = wallet(), wallet()
    job = await stub.CreateJob(
        pb.CreateJobRequest(job=job_pb2.Job(model=MODEL, prompt="Hi", max_tokens=2)), metadata=caller(owner)
    )
    for call in (
        stub.GetJob(pb.GetJobRequest(name=job.name), metadata=caller(stranger)),
        stub.CancelJob(pb.CancelJobRequest(name=job.name), metadata=caller(stranger)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert rich_error(caught.value).reason == "JOB_NOT_FOUND"
    listed = await stub.ListJobs(pb.ListJobsRequest(), metadata=caller(stranger))
    assert list(listed.jobs) == []


async def test_cancel_ends_a_running_job_and_frees_the_node(stub: Any, caller: Callable[[str], Metadata]) -> None:
    owner = wallet()
    stream = stub.Generate(story(max_tokens=180), metadata=caller(owner))
    seen: list[pb.GenerateResponse] = []
    async for response in stream:
        seen.append(response)
        if response.HasField("delta"):
            break
    job_name = seen[0].job.name
    cancelled = await stub.CancelJob(pb.CancelJobRequest(name=job_name), metadata=caller(owner))
    assert cancelled.state == job_pb2.Job.STATE_CANCELLED
    assert cancelled.finish_reason == job_pb2.FINISH_REASON_CANCELLED
    async for response in stream:
        seen.append(response)
    assert seen[-1].final.state == job_pb2.Job.STATE_CANCELLED
    assert seen[-1].final.error.message
    assert seen[-1].final.usage.completion_tokens < 180
    # The single slot is free again: the next job runs at once.
    after = [r async for r in stub.Generate(story(max_tokens=4), metadata=caller(owner))]
    assert after[-1].final.state == job_pb2.Job.STATE_SUCCEEDED


async def test_a_full_queue_is_resource_exhausted_with_retry_info(stub: Any, caller: Callable[[str], Metadata]) -> None:
    # One slot and a queue of one: a running job, a waiting job, and the third is refused.
    running = stub.Generate(story(max_tokens=180), metadata=caller(wallet()))
    first = [r async for r in _take(running, 2)]
    assert first[1].HasField("delta")
    waiting = await stub.CreateJob(
        pb.CreateJobRequest(job=job_pb2.Job(model=MODEL, prompt="Hi", max_tokens=2)), metadata=caller(wallet())
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateJob(
            pb.CreateJobRequest(job=job_pb2.Job(model=MODEL, prompt="Hi", max_tokens=2)), metadata=caller(wallet())
        )
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert rich_error(caught.value).reason == "QUEUE_FULL"
    status = rpc_status.from_call(caught.value)
    assert status is not None
    assert any(detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for detail in status.details)
    queued = await stub.GetJob(pb.GetJobRequest(name=waiting.name), metadata=caller(waiting.owner))
    assert queued.queue_position == 1
    await stub.CancelJob(pb.CancelJobRequest(name=first[0].job.name), metadata=caller(first[0].job.owner))
    running.cancel()
    for _ in range(200):
        job = await stub.GetJob(pb.GetJobRequest(name=waiting.name), metadata=caller(waiting.owner))
        if job.state == job_pb2.Job.STATE_SUCCEEDED:
            break
        await asyncio.sleep(0.05)
    assert job.state == job_pb2.Job.STATE_SUCCEEDED  # the waiting job ran once the slot was free


async def test_a_prompt_too_long_is_refused_before_its_job_exists_on_every_path(
    stub: Any, caller: Callable[[str], Metadata]
) -> None:
    """Jobs that are created (and paid) before a node runs them: CreateJob, and a Generate that has to queue. A
    node's tokenizer counts the prompt first, so an over-long one is refused at the call and no job exists."""
    owner = wallet()
    too_long = "word " * 1900  # ~1,900 tokens; the catalog leaves 2048 - 200 = 1,848 for a prompt
    job = job_pb2.Job(model=MODEL, prompt=too_long, max_tokens=200)
    with pytest.raises(grpc.aio.AioRpcError) as created:  # the slot is free: the job would start at once
        await stub.CreateJob(pb.CreateJobRequest(job=job), metadata=caller(owner))
    other = wallet()
    running = stub.Generate(story(max_tokens=180), metadata=caller(other))
    head = [r async for r in _take(running, 2)]
    try:
        assert head[1].HasField("delta")  # the one slot is taken
        with pytest.raises(grpc.aio.AioRpcError) as queued:
            await stub.CreateJob(pb.CreateJobRequest(job=job), metadata=caller(owner))
        request = pb.GenerateRequest(model=MODEL, prompt=too_long, max_tokens=200)
        with pytest.raises(grpc.aio.AioRpcError) as generated:
            _ = [r async for r in stub.Generate(request, metadata=caller(owner))]
        fits = await stub.CreateJob(
            pb.CreateJobRequest(job=job_pb2.Job(model=MODEL, prompt="word " * 1800, max_tokens=200)),
            metadata=caller(owner),
        )
        listed = await stub.ListJobs(pb.ListJobsRequest(), metadata=caller(owner))
        await stub.CancelJob(pb.CancelJobRequest(name=fits.name), metadata=caller(owner))  # before it can start
    finally:
        await stub.CancelJob(pb.CancelJobRequest(name=head[0].job.name), metadata=caller(other))
        running.cancel()
    for refused in (created, queued, generated):
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert rich_error(refused.value).reason == "PROMPT_TOO_LONG"
    assert fits.state == job_pb2.Job.STATE_QUEUED  # just under the limit: queued as usual
    assert [j.name for j in listed.jobs] == [fits.name]  # the refused calls left no job


@pytest.mark.parametrize("via", ["Generate", "CreateJob"])
async def test_a_free_slot_does_not_let_a_call_jump_the_queue(
    triton: TritonProcess,
    service_env: dict[str, str],
    tmp_path: Path,
    caller: Callable[[str], Metadata],
    redis_url: str,
    via: str,
) -> None:
    """Generate starts the model before it checks the queue (nothing in Redis in front of the model); when jobs
    wait, the job's admission refuses the start at once, and the call drops its start and queues behind them.
    CreateJob on a free slot queues behind them too."""
    prefix = f"{service_env['REDIS_KEY_PREFIX']}behind-{via}:"  # a queue of its own: no other replica's dispatcher
    redis = Redis.from_url(redis_url)
    elsewhere = Admission(redis, prefix)
    await elsewhere.ensure_group(CHAT_MODEL)
    # A job another replica's dispatcher has read and is about to claim: it waits, and this replica never reads it.
    other = wallet()
    waiting = await elsewhere.admit(CHAT_MODEL, "jwaitingelsewhere", other)
    assert await elsewhere.read(CHAT_MODEL, "elsewhere", block_ms=100) is not None
    environ = {
        **server_environ(triton, {**service_env, "REDIS_KEY_PREFIX": prefix}, tmp_path / "models.json"),
        "INFERENCE_MAX_QUEUE": "4",
    }
    replica = await start_server(make_spec(environ), Settings.from_env("inference", 0, environ=environ))
    owner = wallet()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}") as channel:
            stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
            if via == "Generate":
                call = stub.Generate(story(max_tokens=4), metadata=caller(owner))
                (first,) = [r async for r in _take(call, 1)]
                job = first.job
                await elsewhere.withdraw(waiting, other)  # the other job goes away ...
                rest = [r async for r in call]  # ... and this one runs on the slot its dropped start gave back
                ended = rest[-1].final.state
            else:
                created = job_pb2.Job(model=MODEL, prompt="Hi", max_tokens=4)
                job = await stub.CreateJob(pb.CreateJobRequest(job=created), metadata=caller(owner))
                await elsewhere.withdraw(waiting, other)
                for _ in range(200):
                    got = await stub.GetJob(pb.GetJobRequest(name=job.name), metadata=caller(owner))
                    if got.state == job_pb2.Job.STATE_SUCCEEDED:
                        break
                    await asyncio.sleep(0.05)
                ended = got.state
    finally:
        await replica.stop()
        await redis.aclose()
    assert job.state == job_pb2.Job.STATE_QUEUED
    assert job.queue_position == 2  # behind the waiting job, although the one slot was free
    assert ended == job_pb2.Job.STATE_SUCCEEDED


async def _take(stream: Any, count: int) -> AsyncIterator[pb.GenerateResponse]:
    taken = 0
    async for response in stream:
        yield response
        taken += 1
        if taken == count:
            return


async def _wait_for_state(stub: Any, name: str, owner: str, caller: Callable[[str], Metadata], state: int) -> Any:
    for _ in range(300):
        job = await stub.GetJob(pb.GetJobRequest(name=name), metadata=caller(owner))
        if job.state == state:
            return job
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name} never reached {job_pb2.Job.State.Name(state)}: {job}")


async def test_a_job_whose_caller_left_is_cancelled_unless_followed(
    stub: Any, caller: Callable[[str], Metadata]
) -> None:
    owner = wallet()
    # Left alone: cancelled after the grace time (0.5 s here, 30 s by default), reason CALLER_DISCONNECTED.
    call = stub.Generate(story(max_tokens=180), metadata=caller(owner))
    first = [r async for r in _take(call, 2)]
    call.cancel()
    job = await _wait_for_state(stub, first[0].job.name, owner, caller, job_pb2.Job.STATE_CANCELLED)
    info = error_details_pb2.ErrorInfo()
    job.error.details[0].Unpack(info)
    assert info.reason == "CALLER_DISCONNECTED"
    # Followed within the grace time: the job runs to its end.
    call = stub.Generate(story(max_tokens=12), metadata=caller(owner))
    first = [r async for r in _take(call, 2)]
    call.cancel()
    follow = [r async for r in stub.StreamJob(pb.StreamJobRequest(name=first[0].job.name), metadata=caller(owner))]
    assert follow[-1].final.state == job_pb2.Job.STATE_SUCCEEDED


async def test_job_events_and_metrics(
    stub: Any, caller: Callable[[str], Metadata], redis_url: str, redis_key_prefix: str
) -> None:
    owner = wallet()
    labels = {"model": CHAT_MODEL}
    before = REGISTRY.get_sample_value("far_inference_time_to_first_token_seconds_count", labels) or 0
    to_model = REGISTRY.get_sample_value("far_inference_time_to_model_seconds_count", labels) or 0
    to_model_s = REGISTRY.get_sample_value("far_inference_time_to_model_seconds_sum", labels) or 0
    model_ttft = REGISTRY.get_sample_value("far_inference_model_time_to_first_token_seconds_count", labels) or 0
    started = time.monotonic()
    responses = [r async for r in stub.Generate(story(max_tokens=4), metadata=caller(owner))]
    elapsed = time.monotonic() - started
    name = responses[0].job.name
    after = REGISTRY.get_sample_value("far_inference_time_to_first_token_seconds_count", labels)
    assert after == before + 1
    # The call started at once: its time in front of the model is observed once, and is part of the call's.
    assert REGISTRY.get_sample_value("far_inference_time_to_model_seconds_count", labels) == to_model + 1
    assert (
        0 < (REGISTRY.get_sample_value("far_inference_time_to_model_seconds_sum", labels) or 0) - to_model_s < elapsed
    )
    assert REGISTRY.get_sample_value("far_inference_model_time_to_first_token_seconds_count", labels) == model_ttft + 1
    assert REGISTRY.get_sample_value("far_inference_tokens_total", {"model": CHAT_MODEL, "kind": "completion"})
    # Job events on the bus for the realtime service (through the outbox). A Generate that starts at once is
    # inserted RUNNING (it never queued): started, then ended.
    redis = Redis.from_url(redis_url)
    topic = EventBus(redis, redis_key_prefix).stream_key("inference.jobs")
    events: list[job_pb2.Job] = []
    for _ in range(100):
        entries = await redis.xrange(topic)
        events = [job for job in (job_pb2.Job.FromString(fields[b"data"]) for _, fields in entries) if job.name == name]
        if len(events) >= 2:
            break
        await asyncio.sleep(0.05)
    await redis.aclose()
    assert [job.state for job in events] == [job_pb2.Job.STATE_RUNNING, job_pb2.Job.STATE_SUCCEEDED]
    assert events[0].node
    assert events[0].start_time.ToDatetime() == events[0].create_time.ToDatetime()


async def test_a_server_stop_ends_streams_with_an_interrupted_final(
    triton: TritonProcess,
    service_env: dict[str, str],
    tmp_path: Path,
    caller: Callable[[str], Metadata],
) -> None:
    # A second replica of its own (the module's server stays up); 0.3 s of drain delay, then the stop hook.
    environ = {**server_environ(triton, service_env, tmp_path / "models.json"), "DRAIN_DELAY_SECONDS": "0.3"}
    replica = await start_server(make_spec(environ), Settings.from_env("inference", 0, environ=environ))
    owner = wallet()
    stopping: asyncio.Task[None] | None = None
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}") as channel:
            stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
            call = stub.Generate(story(max_tokens=180), metadata=caller(owner))
            seen = [r async for r in _take(call, 2)]
            stopping = asyncio.create_task(replica.stop())
            seen += [r async for r in call]
            await stopping
    finally:
        if stopping is None:
            await replica.stop()
    end = seen[-1].final
    assert end.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
    info = error_details_pb2.ErrorInfo()
    end.error.details[0].Unpack(info)
    assert info.reason == "STREAM_INTERRUPTED"
    assert end.next_offset == sum(r.delta.token_count for r in seen if r.HasField("delta"))


async def _replica(triton: TritonProcess, service_env: dict[str, str], tmp_path: Path, nodes: str) -> RunningServer:
    environ = {**server_environ(triton, service_env, tmp_path / "models.json"), "INFERENCE_STATIC_NODES": nodes}
    return await start_server(make_spec(environ), Settings.from_env("inference", 0, environ=environ))


async def test_a_node_that_fails_before_the_first_token_is_replaced(
    triton: TritonProcess, service_env: dict[str, str], tmp_path: Path, caller: Callable[[str], Metadata]
) -> None:
    dead = f"127.0.0.1:{free_port()}"  # listed first: the directory tries it first
    replica = await _replica(
        triton, service_env, tmp_path, f"{CHAT_MODEL}=dead@{dead},{CHAT_MODEL}=live@{triton.grpc_url}"
    )
    owner = wallet()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}") as channel:
            stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
            responses = [r async for r in stub.Generate(story(max_tokens=6), metadata=caller(owner))]
            job = await stub.GetJob(pb.GetJobRequest(name=responses[0].job.name), metadata=caller(owner))
    finally:
        await replica.stop()
    assert responses[-1].final.state == job_pb2.Job.STATE_SUCCEEDED
    assert job.node == "nodes/live"


async def test_a_node_lost_after_the_first_token_fails_the_job_and_says_so(
    service_env: dict[str, str], tmp_path: Path, caller: Callable[[str], Metadata]
) -> None:
    doomed = TritonProcess.start(MODEL_REPOSITORY, tmp_path / "doomed", load_models=[CHAT_MODEL])
    try:
        replica = await _replica(doomed, service_env, tmp_path, f"{CHAT_MODEL}=doomed@{doomed.grpc_url}")
        owner = wallet()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}") as channel:
                stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
                call = stub.Generate(story(max_tokens=180), metadata=caller(owner))
                seen = [r async for r in _take(call, 2)]
                os.kill(doomed.pid, signal.SIGKILL)
                seen += [r async for r in call]
        finally:
            await replica.stop()
    finally:
        doomed.stop()
    end = seen[-1].final
    assert end.state == job_pb2.Job.STATE_FAILED
    assert end.finish_reason == job_pb2.FINISH_REASON_ERROR
    info = error_details_pb2.ErrorInfo()
    end.error.details[0].Unpack(info)
    assert info.reason == "NODE_FAILED"
    assert "after the first token" in end.error.message


async def test_a_prompt_longer_than_allowed_is_refused_before_anything_runs(
    triton: TritonProcess, service_env: dict[str, str], tmp_path: Path, caller: Callable[[str], Metadata]
) -> None:
    # A catalog context of 24 tokens and 8 to generate: a free job's prompt may have 16 tokens.
    catalog = tmp_path / "small.json"
    environ = {**server_environ(triton, service_env, tmp_path / "models.json"), "INFERENCE_MODELS_FILE": str(catalog)}
    catalog.write_text(json.dumps([{"id": CHAT_MODEL, "context_length": 24, "max_output_tokens": 8, "free": True}]))
    replica = await start_server(make_spec(environ), Settings.from_env("inference", 0, environ=environ))
    owner = wallet()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}") as channel:
            stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
            long = pb.GenerateRequest(model=MODEL, max_tokens=8, prompt="word " * 40)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                _ = [r async for r in stub.Generate(long, metadata=caller(owner))]
            short = pb.GenerateRequest(model=MODEL, max_tokens=8, prompt="Count: 1, 2, 3,")
            fine = [r async for r in stub.Generate(short, metadata=caller(owner))]
            listed = await stub.ListJobs(pb.ListJobsRequest(), metadata=caller(owner))
    finally:
        await replica.stop()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rich_error(caught.value).reason == "PROMPT_TOO_LONG"
    assert fine[-1].final.state == job_pb2.Job.STATE_SUCCEEDED
    assert [job.name for job in listed.jobs] == [fine[0].job.name]  # the refused call left no job


async def test_a_call_waiting_for_a_node_slot_has_its_job_at_once(
    triton: TritonProcess, service_env: dict[str, str], tmp_path: Path, caller: Callable[[str], Metadata]
) -> None:
    """The node accepts (or refuses) a prompt before the request waits for one of its slots: a call that the
    service starts while the node's slots are all busy gets its job (committed) at once, not when a slot
    frees, and a prompt too long for it is refused at once."""
    environ = {
        **server_environ(triton, service_env, tmp_path / "models.json"),
        "INFERENCE_SLOTS_PER_MODEL": "6",  # more than Triton's 4: the service starts calls Triton must hold
    }
    replica = await start_server(make_spec(environ), Settings.from_env("inference", 0, environ=environ))
    owner = wallet()
    slots = int(metric(triton.metrics_url, "far_llm_slots"))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}") as channel:
            stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
            busy = [stub.Generate(story(max_tokens=48), metadata=caller(wallet())) for _ in range(slots)]
            for call in busy:  # each holds one of Triton's slots
                assert [r async for r in _take(call, 2)][1].HasField("delta")
            finished_before = _finished_on_node(triton)
            waiting = stub.Generate(story(max_tokens=4), metadata=caller(owner))
            (head,) = [r async for r in _take(waiting, 1)]
            job = await stub.GetJob(pb.GetJobRequest(name=head.job.name), metadata=caller(owner))
            long = pb.GenerateRequest(model=MODEL, prompt="word " * 1900, max_tokens=200)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                _ = [r async for r in stub.Generate(long, metadata=caller(owner))]
            finished_between = _finished_on_node(triton) - finished_before
            rest = [r async for r in waiting]
            listed = await stub.ListJobs(pb.ListJobsRequest(), metadata=caller(owner))
            for call in busy:
                call.cancel()
    finally:
        await replica.stop()
        wait_idle(triton.metrics_url)
    assert job.state == job_pb2.Job.STATE_RUNNING  # committed while the node's slots were all still busy
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rich_error(refused.value).reason == "PROMPT_TOO_LONG"
    assert finished_between == 0  # both answers came before any of the node's requests ended (and freed a slot)
    assert rest[-1].final.state == job_pb2.Job.STATE_SUCCEEDED
    assert rest[-1].final.usage.completion_tokens == 4
    assert [j.name for j in listed.jobs] == [head.job.name]  # the refused call left no job


def _finished_on_node(triton: TritonProcess) -> float:
    """Requests the model has finished, whatever their finish reason."""
    reasons = ("stop", "length", "cancelled", "error")
    return sum(metric(triton.metrics_url, "far_llm_requests_finished_total", finish_reason=r) for r in reasons)


class SlowLink:
    """A TCP relay to `upstream` that delivers every byte coming back `delay_s` late: a node on a slow link."""

    def __init__(self, upstream: str, delay_s: float) -> None:
        self._host, _, port = upstream.rpartition(":")
        self._port = int(port)
        self._delay_s = delay_s
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.address = ""

    async def __aenter__(self) -> SlowLink:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        up_reader, up_writer = await asyncio.open_connection(self._host, self._port)
        late: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def forward() -> None:
            while chunk := await reader.read(65536):
                up_writer.write(chunk)
                await up_writer.drain()

        async def receive() -> None:
            while chunk := await up_reader.read(65536):
                late.put_nowait((time.monotonic() + self._delay_s, chunk))
            late.put_nowait((time.monotonic() + self._delay_s, b""))

        async def deliver() -> None:
            while True:
                due, chunk = await late.get()
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                if not chunk:
                    return
                writer.write(chunk)
                await writer.drain()

        try:
            pumps = [asyncio.create_task(pump()) for pump in (forward, receive, deliver)]
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for side in (writer, up_writer):
                side.close()
            self._tasks.discard(task)


async def test_a_node_slow_to_accept_the_prompt_gets_the_job_written_after_it_replies(
    triton: TritonProcess, service_env: dict[str, str], tmp_path: Path, caller: Callable[[str], Metadata]
) -> None:
    """A started Generate's job waits uncommitted while the node checks the prompt, but only so long: past
    INFERENCE_ACCEPT_IN_TRANSACTION_S the insert is rolled back and written after the node's answer. The job
    then runs as usual, and a prompt too long for it still leaves no job."""
    labels = {"model": CHAT_MODEL}
    owner = wallet()
    async with SlowLink(triton.grpc_url, delay_s=0.4) as link:
        environ = {
            **server_environ(triton, service_env, tmp_path / "models.json"),
            "INFERENCE_STATIC_NODES": f"{CHAT_MODEL}=far-away@{link.address}",
            "INFERENCE_ACCEPT_IN_TRANSACTION_S": "0.1",
        }
        replica = await start_server(make_spec(environ), Settings.from_env("inference", 0, environ=environ))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}") as channel:
                stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
                slow_before = REGISTRY.get_sample_value("far_inference_slow_accepts_total", labels) or 0
                served = [r async for r in stub.Generate(story(max_tokens=4), metadata=caller(owner))]
                long = pb.GenerateRequest(model=MODEL, prompt="word " * 1900, max_tokens=200)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    _ = [r async for r in stub.Generate(long, metadata=caller(owner))]
                slow_after = REGISTRY.get_sample_value("far_inference_slow_accepts_total", labels) or 0
                listed = await stub.ListJobs(pb.ListJobsRequest(), metadata=caller(owner))
        finally:
            await replica.stop()
    assert slow_after - slow_before == 2  # both answers came back past the bound
    assert served[0].job.state == job_pb2.Job.STATE_RUNNING
    assert served[0].job.node == "nodes/far-away"
    assert served[-1].final.state == job_pb2.Job.STATE_SUCCEEDED
    assert served[-1].final.usage.completion_tokens == 4
    check_contiguous(served)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rich_error(refused.value).reason == "PROMPT_TOO_LONG"
    assert [job.name for job in listed.jobs] == [served[0].job.name]  # the refused call left no job
