"""The inference service's node path against a real tritonserver with the SmolLM2 model: pieces with contiguous
offsets and usage, failover before the first token, and cancellation freeing the node."""

from __future__ import annotations

import asyncio
import re
from dataclasses import replace

import pytest
from far.inference.v1 import job_pb2

from devstack.processes import free_port, http_get
from gpu.triton import CHAT_MODEL, TritonProcess
from servers.common.errors import FailedPrecondition, InvalidArgument, Unavailable
from servers.inference.executor import Clients, count, execute
from servers.inference.nodes import NodeDirectory, NodeInfo, static_source
from servers.inference.triton_stream import Generation, Piece

GREEDY = Generation(prompt="The capital of France is", max_tokens=12, temperature=0.0, seed=1)


@pytest.fixture
async def clients() -> object:
    pool = Clients()
    yield pool
    await pool.close()


async def directory_of(*nodes: NodeInfo) -> NodeDirectory:
    directory = NodeDirectory(static_source({CHAT_MODEL: nodes}), [CHAT_MODEL])
    await directory.refresh()
    return directory


def real(triton: TritonProcess, load: int = 0) -> NodeInfo:
    return NodeInfo(name="nodes/real", endpoint=triton.grpc_url, load=load)


def dead(load: int = 0) -> NodeInfo:
    return NodeInfo(name="nodes/dead", endpoint=f"127.0.0.1:{free_port()}", load=load)


async def test_pieces_are_contiguous_and_the_outcome_has_usage(triton: TritonProcess, clients: Clients) -> None:
    pieces: list[Piece] = []
    outcome = await execute(
        await directory_of(real(triton)), clients, CHAT_MODEL, GREEDY, job_id="jtest1", on_piece=pieces.append
    )
    assert outcome.state == job_pb2.Job.STATE_SUCCEEDED
    assert outcome.finish_reason in (job_pb2.FINISH_REASON_LENGTH, job_pb2.FINISH_REASON_STOP)
    assert outcome.node == "nodes/real"
    assert len(pieces) > 1
    offsets = [p.offset for p in pieces]
    assert offsets == [sum(p.token_count for p in pieces[:i]) for i in range(len(pieces))]
    assert all(p.token_count >= 1 for p in pieces)
    assert outcome.completion_tokens == pieces[-1].offset + pieces[-1].token_count
    assert outcome.prompt_tokens > 0
    assert "".join(p.text for p in pieces).strip()
    assert outcome.first_token_at is not None


async def test_a_node_that_fails_before_the_first_token_hands_over(triton: TritonProcess, clients: Clients) -> None:
    broken = dead(load=0)
    directory = await directory_of(broken, real(triton, load=5))  # the broken node looks least loaded
    nodes: list[str] = []
    pieces: list[Piece] = []
    outcome = await execute(
        directory,
        clients,
        CHAT_MODEL,
        GREEDY,
        job_id="jtest2",
        on_piece=pieces.append,
        on_node=lambda node: nodes.append(node.name),
    )
    assert nodes == ["nodes/dead", "nodes/real"]
    assert outcome.state == job_pb2.Job.STATE_SUCCEEDED
    assert outcome.node == "nodes/real"
    assert pieces
    assert directory.pick(CHAT_MODEL) == real(triton, load=5)  # the broken node sits out its penalty


async def test_no_node_or_only_broken_nodes_fail_the_job(clients: Clients) -> None:
    outcome = await execute(await directory_of(), clients, CHAT_MODEL, GREEDY, job_id="j3", on_piece=lambda _: None)
    assert outcome.state == job_pb2.Job.STATE_FAILED
    assert outcome.error is not None
    assert "MODEL_UNAVAILABLE" in outcome.error.details[0].value.decode(errors="replace")
    outcome = await execute(
        await directory_of(dead(), dead()), clients, CHAT_MODEL, GREEDY, job_id="j4", on_piece=lambda _: None
    )
    assert outcome.state == job_pb2.Job.STATE_FAILED
    assert outcome.finish_reason == job_pb2.FINISH_REASON_ERROR
    assert "NODE_FAILED" in outcome.error.details[0].value.decode(errors="replace")  # type: ignore[union-attr]


def cancelled_count(triton: TritonProcess) -> float:
    status, body = http_get(triton.metrics_url)
    assert status == 200
    found = re.search(r'far_llm_requests_finished_total\{[^}]*finish_reason="cancelled"[^}]*\} (\S+)', body)
    return float(found.group(1)) if found else 0.0


async def test_cancelling_the_task_cancels_the_triton_request(triton: TritonProcess, clients: Clients) -> None:
    before = cancelled_count(triton)
    first = asyncio.Event()

    def on_piece(piece: Piece) -> None:
        first.set()

    story = [{"role": "user", "content": "Write a long story about a dragon."}]
    long = Generation(messages=story, max_tokens=400, temperature=0.0, seed=1)
    task = asyncio.create_task(
        execute(await directory_of(real(triton)), clients, CHAT_MODEL, long, job_id="jcancel", on_piece=on_piece)
    )
    async with asyncio.timeout(60):
        await first.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The model saw the cancellation and ended the request as cancelled (well before its 400 tokens).
    for _ in range(200):
        if cancelled_count(triton) > before:
            break
        await asyncio.sleep(0.05)
    assert cancelled_count(triton) == before + 1


class TestCount:
    """`count`: the prompt's length on a node's tokenizer, before a paid job is queued."""

    async def test_a_broken_node_hands_the_count_over(self, triton: TritonProcess, clients: Clients) -> None:
        directory = await directory_of(dead(load=0), real(triton, load=5))
        counted = await count(directory, clients, CHAT_MODEL, replace(GREEDY, max_prompt_tokens=64))
        pieces: list[Piece] = []
        outcome = await execute(directory, clients, CHAT_MODEL, GREEDY, job_id="jcount", on_piece=pieces.append)

        assert counted == outcome.prompt_tokens > 0  # the tokens the generation reports
        assert directory.pick(CHAT_MODEL) == real(triton, load=5)  # the broken node sits out its penalty

    async def test_over_the_limit_is_prompt_too_long(self, triton: TritonProcess, clients: Clients) -> None:
        with pytest.raises(InvalidArgument) as caught:
            await count(await directory_of(real(triton)), clients, CHAT_MODEL, replace(GREEDY, max_prompt_tokens=2))
        assert caught.value.reason == "PROMPT_TOO_LONG"

    async def test_no_node_or_only_broken_ones(self, clients: Clients) -> None:
        with pytest.raises(FailedPrecondition) as none:
            await count(await directory_of(), clients, CHAT_MODEL, GREEDY)
        with pytest.raises(Unavailable) as broken:
            await count(await directory_of(dead(), dead()), clients, CHAT_MODEL, GREEDY)

        assert none.value.reason == "MODEL_UNAVAILABLE"
        assert broken.value.reason == "NODE_FAILED"
        assert broken.value.retry_after_s == 1.0
