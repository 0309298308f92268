"""Running one job on the fleet: pick a node, stream from its Triton, fail over before the first token.

`execute` hands every piece to `on_piece` as it arrives (the caller relays it and queues it for the
token stream) and returns the `Outcome`. A node that fails before the first token is penalised in the
directory and the job moves to the next node; after the first token the job fails with NODE_FAILED,
because text already sent cannot be taken back. Cancelling the task that runs `execute` cancels the
Triton request (the node frees its slot within about a token).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import structlog
from far.inference.v1 import job_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from opentelemetry import propagate, trace
from tritonclient.grpc.aio import InferenceServerClient

from servers.common.errors import FailedPrecondition, InvalidArgument, Unavailable
from servers.inference.nodes import NodeDirectory, NodeInfo
from servers.inference.triton_stream import (
    Accepted,
    Finish,
    Generation,
    NodeError,
    Piece,
    PromptTooLong,
    count_prompt,
    stream_generation,
)

log = structlog.get_logger("far.inference.executor")
_tracer = trace.get_tracer("far.inference")
DOMAIN = "inference.far.network"

FINISH_REASONS = {
    "stop": job_pb2.FINISH_REASON_STOP,
    "stop_sequence": job_pb2.FINISH_REASON_STOP_SEQUENCE,
    "length": job_pb2.FINISH_REASON_LENGTH,
    "cancelled": job_pb2.FINISH_REASON_CANCELLED,
}


def error_status(code: int, reason: str, message: str, **metadata: str) -> status_pb2.Status:
    """A google.rpc.Status with an ErrorInfo, as a job's `error` carries it."""
    status = status_pb2.Status(code=code, message=message)
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata))
    return status


@dataclass
class Outcome:
    """How a job ended on the fleet."""

    state: int
    finish_reason: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: status_pb2.Status | None = None
    node: str = ""
    first_token_at: float | None = None
    """`time.monotonic()` when the first piece arrived."""
    text: list[str] = field(default_factory=list)


class Clients:
    """One tritonclient asyncio client per node endpoint, reused by every job."""

    def __init__(self) -> None:
        self._clients: dict[str, InferenceServerClient] = {}

    def get(self, node: NodeInfo) -> InferenceServerClient:
        client = self._clients.get(node.endpoint)
        if client is None:
            client = InferenceServerClient(node.endpoint, ssl=node.tls)
            self._clients[node.endpoint] = client
        return client

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()


def _nodes(directory: NodeDirectory, model: str, tried: list[str], max_attempts: int) -> Iterator[NodeInfo]:
    """The nodes to try for `model`, least loaded first, each once, at most `max_attempts` (`tried` collects
    their endpoints)."""
    while len(tried) < max_attempts:
        node = directory.pick(model, exclude=tried)
        if node is None:
            return
        tried.append(node.endpoint)
        yield node


def _failed(reason: str, message: str, outcome: Outcome, code: int = code_pb2.UNAVAILABLE) -> Outcome:
    outcome.state = job_pb2.Job.STATE_FAILED
    outcome.finish_reason = job_pb2.FINISH_REASON_ERROR
    outcome.error = error_status(code, reason, message)
    return outcome


async def execute(
    directory: NodeDirectory,
    clients: Clients,
    model: str,
    generation: Generation,
    *,
    job_id: str,
    on_piece: Callable[[Piece], None],
    on_node: Callable[[NodeInfo], None] | None = None,
    on_accepted: Callable[[int], None] | None = None,
    max_attempts: int = 3,
) -> Outcome:
    """Run `generation` on the least loaded node serving `model` (the Triton model name)."""
    outcome = Outcome(state=job_pb2.Job.STATE_RUNNING, finish_reason=job_pb2.FINISH_REASON_UNSPECIFIED)
    tried: list[str] = []
    for node in _nodes(directory, model, tried, max_attempts):
        outcome.node = node.name
        if on_node is not None:
            on_node(node)
        directory.started(node)
        span = _tracer.start_span("triton.generate", attributes={"far.node": node.name, "far.model": model})
        headers: dict[str, str] = {}
        propagate.inject(headers, context=trace.set_span_in_context(span))  # Triton continues the trace
        try:
            async for item in stream_generation(
                clients.get(node), model, generation, request_id=job_id, headers=headers
            ):
                if isinstance(item, Accepted):
                    outcome.prompt_tokens = item.prompt_tokens
                    if on_accepted is not None:
                        on_accepted(item.prompt_tokens)
                    continue
                if isinstance(item, Finish):
                    outcome.prompt_tokens = item.prompt_tokens
                    outcome.completion_tokens = item.completion_tokens
                    if item.reason == "error":
                        return _failed(
                            "GENERATION_FAILED", "the model failed while generating", outcome, code_pb2.INTERNAL
                        )
                    outcome.finish_reason = FINISH_REASONS.get(item.reason, job_pb2.FINISH_REASON_STOP)
                    outcome.state = (
                        job_pb2.Job.STATE_CANCELLED
                        if outcome.finish_reason == job_pb2.FINISH_REASON_CANCELLED
                        else job_pb2.Job.STATE_SUCCEEDED
                    )
                    return outcome
                if outcome.first_token_at is None:
                    outcome.first_token_at = time.monotonic()
                outcome.text.append(item.text)
                outcome.completion_tokens = item.offset + item.token_count
                on_piece(item)
            return _failed("NODE_FAILED", "the node ended the stream early", outcome)
        except PromptTooLong as error:  # the caller's doing, not the node's: no other node would take it
            return _failed("PROMPT_TOO_LONG", f"the prompt is too long: {error}", outcome, code_pb2.INVALID_ARGUMENT)
        except NodeError as error:
            if outcome.first_token_at is not None:
                log.warning("node failed mid-stream", job=job_id, node=node.name, error=str(error))
                return _failed("NODE_FAILED", f"the node {node.name} failed after the first token", outcome)
            log.warning(
                "node failed before the first token; trying another", job=job_id, node=node.name, error=str(error)
            )
            directory.failed(node)
        finally:
            span.end()
            directory.finished(node)
    if not tried:
        return _failed("MODEL_UNAVAILABLE", f"no healthy node serves {model}", outcome)
    return _failed("NODE_FAILED", f"{len(tried)} node(s) failed before the first token", outcome)


async def count(
    directory: NodeDirectory, clients: Clients, model: str, generation: Generation, *, max_attempts: int = 2
) -> int:
    """The prompt's length on a node serving `model` (its tokenizer, no slot), checked against the generation's
    `max_prompt_tokens`. For a job that is paid and queued before any node sees it: a prompt the model would
    refuse is refused now, before the payment is consumed. InvalidArgument `PROMPT_TOO_LONG`;
    FailedPrecondition `MODEL_UNAVAILABLE` (no node); Unavailable `NODE_FAILED` (with RetryInfo) when the nodes
    tried all failed."""
    tried: list[str] = []
    for node in _nodes(directory, model, tried, max_attempts):
        headers: dict[str, str] = {}
        propagate.inject(headers)
        try:
            return await count_prompt(clients.get(node), model, generation, headers=headers)
        except PromptTooLong as error:
            raise InvalidArgument(f"the prompt is too long: {error}", reason="PROMPT_TOO_LONG") from None
        except NodeError as error:
            log.warning("node failed to count a prompt", node=node.name, error=str(error))
            directory.failed(node)
    if not tried:
        raise FailedPrecondition(f"no healthy node serves {model} now", reason="MODEL_UNAVAILABLE")
    problem = Unavailable(f"{len(tried)} node(s) failed to check the prompt; nothing was charged", reason="NODE_FAILED")
    problem.retry_after_s = 1.0
    raise problem
