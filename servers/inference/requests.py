"""Validation of a job request (Generate's fields or CreateJob's job) against the model, before anything runs.

Every bad field is reported at once (google.rpc.BadRequest); the contract's specific reasons
(`CHAT_NOT_SUPPORTED`, `QUOTE_MISMATCH`, ...) are raised on their own. The result, `JobSpec`, is what the
rest of the service works from: the input as the model will get it, the limits, and the payment to verify.
"""

from __future__ import annotations

import math
import re
import uuid
from dataclasses import dataclass

from far.inference.v1 import job_pb2

from servers.common.errors import InvalidArgument
from servers.common.validation import Violations
from servers.inference.catalog import ModelSpec
from servers.inference.triton_stream import Generation

MAX_PROMPT_CHARS = 262_144
MAX_CHAT_MESSAGES = 256
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 64
FREE_DEFAULT_MAX_TOKENS = 256
_TX_HASH = re.compile(r"0x[0-9a-f]{64}\Z")
_ROLES = {
    job_pb2.ChatMessage.ROLE_SYSTEM: "system",
    job_pb2.ChatMessage.ROLE_USER: "user",
    job_pb2.ChatMessage.ROLE_ASSISTANT: "assistant",
}


@dataclass(frozen=True, slots=True)
class JobSpec:
    """A validated job request: what to generate and, for a paid model, the payment to verify."""

    model: ModelSpec
    job: job_pb2.Job
    """The job's input fields as given (prompt or chat, sampling, stop sequences), `max_tokens` resolved
    when there is no quote (a paid job resolves it against its quote: `with_quote_limit`)."""
    generation: Generation
    request_id: str
    quote: str
    chain_id: int
    tx_hash: str

    @property
    def paid(self) -> bool:
        return not self.model.free


def generation_from(job: job_pb2.Job) -> Generation:
    """What the model gets for a (validated) job: its input, max tokens, sampling and stop sequences."""
    sampling = job.sampling
    chat = job.WhichOneof("input") == "chat"
    return Generation(
        prompt=None if chat else job.prompt,
        messages=[{"role": _ROLES.get(m.role, ""), "content": m.content} for m in job.chat.messages] if chat else None,
        max_tokens=job.max_tokens,
        temperature=sampling.temperature if sampling.HasField("temperature") else None,
        top_p=sampling.top_p if sampling.HasField("top_p") else None,
        stop=tuple(job.stop_sequences),
        seed=sampling.seed if sampling.HasField("seed") else None,
    )


def _check_chat(chat: job_pb2.Chat, problems: Violations, field: str) -> None:
    messages = list(chat.messages)
    if not 1 <= len(messages) <= MAX_CHAT_MESSAGES:
        problems.add(f"{field}.messages", f"must hold 1-{MAX_CHAT_MESSAGES} messages")
    total = 0
    for index, message in enumerate(messages):
        total += len(message.content)
        if message.role not in _ROLES:
            problems.add(f"{field}.messages[{index}].role", "must be ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT")
        elif message.role == job_pb2.ChatMessage.ROLE_SYSTEM and index != 0:
            problems.add(f"{field}.messages[{index}].role", "a system message may only come first")
    if total > MAX_PROMPT_CHARS:
        problems.add(f"{field}.messages", f"must hold at most {MAX_PROMPT_CHARS} characters in all")


def validate(
    model: ModelSpec,
    job: job_pb2.Job,
    *,
    request_id: str,
    prefix: str = "",
) -> JobSpec:
    """Check a job request for `model`; INVALID_ARGUMENT naming each bad field (`prefix` + field name).

    CHAT_NOT_SUPPORTED (INVALID_ARGUMENT) for chat input to a model without chat. `max_tokens` 0 stays 0
    for paid jobs (the quote decides) and becomes 256 (at most the model's limit) for free ones.
    """
    problems = Violations()
    which = job.WhichOneof("input")
    if which is None:
        problems.add(f"{prefix}prompt", "a prompt or chat messages are required")
    elif which == "prompt":
        if not 1 <= len(job.prompt) <= MAX_PROMPT_CHARS:
            problems.add(f"{prefix}prompt", f"must be 1-{MAX_PROMPT_CHARS} characters")
    else:
        if not model.supports_chat:
            raise InvalidArgument(
                f"{model.name} takes plain prompts only", reason="CHAT_NOT_SUPPORTED", metadata={"model": model.name}
            )
        _check_chat(job.chat, problems, f"{prefix}chat")
    sampling = job.sampling
    if sampling.HasField("temperature") and not (
        math.isfinite(sampling.temperature) and 0.0 <= sampling.temperature <= 2.0
    ):
        problems.add(f"{prefix}sampling.temperature", "must be 0.0-2.0")
    if sampling.HasField("top_p") and not (math.isfinite(sampling.top_p) and 0.0 < sampling.top_p <= 1.0):
        problems.add(f"{prefix}sampling.top_p", "must be above 0.0 and at most 1.0")
    if job.max_tokens < 0 or job.max_tokens > model.max_output_tokens:
        problems.add(f"{prefix}max_tokens", f"must be 0-{model.max_output_tokens} for {model.name}")
    if len(job.stop_sequences) > MAX_STOP_SEQUENCES:
        problems.add(f"{prefix}stop_sequences", f"at most {MAX_STOP_SEQUENCES}")
    for index, stop in enumerate(job.stop_sequences):
        if not 1 <= len(stop) <= MAX_STOP_CHARS:
            problems.add(f"{prefix}stop_sequences[{index}]", f"must be 1-{MAX_STOP_CHARS} characters")
    if request_id:
        try:
            uuid.UUID(request_id)
        except ValueError:
            problems.add("request_id", "must be a UUID")
    payment = job.payment
    tx_hash = payment.transaction.tx_hash.strip().lower()
    if not model.free:
        problems.require(payment.quote, f"{prefix}payment.quote")
        if not _TX_HASH.match(tx_hash):
            problems.add(f"{prefix}payment.transaction.tx_hash", "must be 0x and 64 hex digits")
        problems.require(payment.transaction.chain_id, f"{prefix}payment.transaction.chain_id")
    problems.raise_if_any()

    resolved = job_pb2.Job()
    resolved.CopyFrom(job)
    resolved.ClearField("payment")
    if model.free and resolved.max_tokens == 0:
        resolved.max_tokens = min(FREE_DEFAULT_MAX_TOKENS, model.max_output_tokens)
    generation = generation_from(resolved)
    return JobSpec(
        model=model,
        job=resolved,
        generation=generation,
        request_id=request_id,
        quote="" if model.free else payment.quote,
        chain_id=0 if model.free else payment.transaction.chain_id,
        tx_hash="" if model.free else tx_hash,
    )
