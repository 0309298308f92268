"""Validation of job requests: every bad field named at once, the contract's own reasons, defaults resolved."""

from __future__ import annotations

import pytest
from far.inference.v1 import job_pb2

from servers.common.errors import InvalidArgument
from servers.inference.catalog import ModelSpec
from servers.inference.requests import validate

PAID = ModelSpec("paid", "Paid", "", context_length=2048, max_output_tokens=512)
FREE = ModelSpec("free", "Free", "", context_length=1024, max_output_tokens=128, free=True)
PLAIN = ModelSpec("plain", "Plain", "", context_length=1024, max_output_tokens=128, free=True, supports_chat=False)
TX = "0x" + "ab" * 32
Role = job_pb2.ChatMessage


def paid_job(**fields: object) -> job_pb2.Job:
    job = job_pb2.Job(prompt="Hello", **fields)  # type: ignore[arg-type]
    job.payment.quote = "quotes/q1"
    job.payment.transaction.chain_id = 97
    job.payment.transaction.tx_hash = TX.upper().replace("0X", "0x")
    return job


def fields_of(error: InvalidArgument) -> list[str]:
    return [violation.field for violation in error.violations]


def test_a_paid_prompt_job_resolves_to_its_generation() -> None:
    job = paid_job(max_tokens=64, stop_sequences=["\n\n"])
    job.sampling.temperature = 0.0
    job.sampling.seed = 7
    spec = validate(PAID, job, request_id="6f1c8f5e-2f7e-4c63-9a4e-2b0f3f1f9d10")
    assert spec.paid
    assert (spec.quote, spec.chain_id, spec.tx_hash) == ("quotes/q1", 97, TX)  # the hash is normalised
    assert not spec.job.HasField("payment")
    generation = spec.generation
    assert (generation.prompt, generation.messages, generation.max_tokens) == ("Hello", None, 64)
    assert (generation.temperature, generation.top_p, generation.seed, generation.stop) == (0.0, None, 7, ("\n\n",))


def test_a_free_chat_job_gets_the_default_max_tokens_and_role_names() -> None:
    job = job_pb2.Job()
    job.chat.messages.add(role=Role.ROLE_SYSTEM, content="Be brief.")
    job.chat.messages.add(role=Role.ROLE_USER, content="Hi")
    spec = validate(FREE, job, request_id="")
    assert spec.job.max_tokens == 128  # 256 capped at the model's limit
    assert spec.generation.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    assert not spec.paid


def test_every_bad_field_is_named_at_once() -> None:
    job = job_pb2.Job(max_tokens=513, stop_sequences=["", "x" * 65, "a", "b", "c"])
    job.sampling.temperature = 2.5
    job.sampling.top_p = 0.0
    with pytest.raises(InvalidArgument) as caught:
        validate(PAID, job, request_id="not-a-uuid", prefix="job.")
    assert fields_of(caught.value) == [
        "job.prompt",
        "job.sampling.temperature",
        "job.sampling.top_p",
        "job.max_tokens",
        "job.stop_sequences",
        "job.stop_sequences[0]",
        "job.stop_sequences[1]",
        "request_id",
        "job.payment.quote",
        "job.payment.transaction.tx_hash",
        "job.payment.transaction.chain_id",
    ]


def test_chat_rules() -> None:
    job = job_pb2.Job()
    job.chat.messages.add(role=Role.ROLE_USER, content="x" * 200_000)
    job.chat.messages.add(role=Role.ROLE_SYSTEM, content="late system")
    job.chat.messages.add(role=Role.ROLE_UNSPECIFIED, content="y" * 70_000)
    with pytest.raises(InvalidArgument) as caught:
        validate(FREE, job, request_id="")
    assert fields_of(caught.value) == ["chat.messages[1].role", "chat.messages[2].role", "chat.messages"]


def test_chat_to_a_plain_model_has_its_own_reason() -> None:
    job = job_pb2.Job()
    job.chat.messages.add(role=Role.ROLE_USER, content="Hi")
    with pytest.raises(InvalidArgument) as caught:
        validate(PLAIN, job, request_id="")
    assert caught.value.reason == "CHAT_NOT_SUPPORTED"


@pytest.mark.parametrize("prompt", ["", "x" * 262_145])
def test_prompt_length_bounds(prompt: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate(FREE, job_pb2.Job(prompt=prompt), request_id="")
    assert fields_of(caught.value) == ["prompt"]


def test_free_models_ignore_the_payment() -> None:
    spec = validate(FREE, paid_job(), request_id="")
    assert (spec.quote, spec.tx_hash, spec.chain_id) == ("", "", 0)
