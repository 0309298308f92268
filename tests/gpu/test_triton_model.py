"""The chat model served by a real tritonserver, driven through Triton's gRPC stream API.

Prompts are chosen so that greedy decoding (temperature 0) is predictable for SmolLM2-135M: after
"Count: 1, 2, 3," it keeps counting " 4, 5, 6, ..." and never stops by itself.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import tritonclient.grpc.aio as triton_aio

from devstack.processes import ProcessDied, wait_until
from gpu.triton import CHAT_MODEL, MODEL_REPOSITORY, TritonProcess
from tests.gpu.triton_support import (
    COUNTING,
    Response,
    Stream,
    chat_inputs,
    generate,
    metric,
    tensor,
    text_of,
    wait_idle,
)


def assert_well_formed(responses: list[Response]) -> Response:
    """Only the last response is final and carries a finish reason; token counts only grow. Returns the last."""
    *pieces, last = responses
    assert last.final
    assert last.finish_reason
    assert all(not r.final and not r.finish_reason and not r.error for r in pieces)
    counts = [r.completion_tokens for r in responses]
    assert counts == sorted(counts)
    assert {r.prompt_tokens for r in responses} == {last.prompt_tokens}
    return last


class TestStreaming:
    async def test_streams_pieces_of_text_then_a_final_response_with_usage(self, triton: TritonProcess) -> None:
        responses = await generate(triton.grpc_url, prompt=COUNTING, max_tokens=12, temperature=0)

        last = assert_well_formed(responses)
        assert len([r for r in responses[:-1] if r.text]) >= 5
        assert text_of(responses).startswith(" 4, 5, 6")
        assert last.finish_reason == "length"
        assert last.completion_tokens == 12
        assert last.prompt_tokens > 0

    async def test_one_token_is_one_final_response(self, triton: TritonProcess) -> None:
        responses = await generate(triton.grpc_url, prompt=COUNTING, max_tokens=1, temperature=0)

        assert len(responses) == 1
        assert responses[0].final
        assert responses[0].finish_reason == "length"
        assert responses[0].completion_tokens == 1

    async def test_chat_messages_get_the_chat_template(self, triton: TritonProcess) -> None:
        raw = await generate(triton.grpc_url, prompt=COUNTING, max_tokens=4, temperature=0)
        chat = await generate(
            triton.grpc_url, messages=[{"role": "user", "content": COUNTING}], max_tokens=4, temperature=0
        )

        assert_well_formed(chat)
        assert text_of(chat).strip()
        # The template wraps the message in role markers and adds the model's default system prompt.
        assert chat[-1].prompt_tokens > raw[-1].prompt_tokens + 10
        assert text_of(chat) != text_of(raw)


class TestStopSequences:
    async def test_text_ends_before_the_stop_sequence(self, triton: TritonProcess) -> None:
        responses = await generate(triton.grpc_url, prompt=COUNTING, max_tokens=40, temperature=0, stop=[" 7"])

        last = assert_well_formed(responses)
        assert text_of(responses) == " 4, 5, 6,"
        assert last.finish_reason == "stop"
        assert last.completion_tokens < 40

    async def test_the_earliest_stop_sequence_wins(self, triton: TritonProcess) -> None:
        responses = await generate(triton.grpc_url, prompt=COUNTING, max_tokens=40, temperature=0, stop=["6", ", 5"])

        assert text_of(responses) == " 4"
        assert responses[-1].finish_reason == "stop"


class TestSampling:
    async def test_the_same_seed_gives_the_same_text(self, triton: TritonProcess) -> None:
        def ask(seed: int) -> asyncio.Future[list[Response]]:
            return asyncio.ensure_future(
                generate(triton.grpc_url, prompt="Once upon a time", max_tokens=16, temperature=1.0, seed=seed)
            )

        first, again, other = [text_of(r) for r in await asyncio.gather(ask(1234), ask(1234), ask(99))]

        assert first == again
        assert first != other

    async def test_a_tiny_top_p_is_greedy_whatever_the_seed_while_top_p_1_samples(self, triton: TritonProcess) -> None:
        seeds = (1, 2, 3, 4)

        async def texts(top_p: float) -> list[str]:
            return [
                text_of(r)
                for r in await asyncio.gather(
                    *(
                        generate(
                            triton.grpc_url,
                            prompt="Once upon a time",
                            max_tokens=8,
                            temperature=1.0,
                            top_p=top_p,
                            seed=s,
                        )
                        for s in seeds
                    )
                )
            ]

        nucleus_of_one = await texts(1e-6)
        full = await texts(1.0)
        greedy = text_of(await generate(triton.grpc_url, prompt="Once upon a time", max_tokens=8, temperature=0))

        assert nucleus_of_one == [greedy] * len(seeds)  # only the likeliest token is left to draw from
        assert len(set(full)) > 1  # the same seeds, the whole distribution: the texts differ
        assert set(full) != {greedy}

    async def test_concurrent_streams_do_not_disturb_each_other(self, triton: TritonProcess) -> None:
        alone = text_of(await generate(triton.grpc_url, prompt=COUNTING, max_tokens=10, temperature=0))

        together = await asyncio.gather(
            *(generate(triton.grpc_url, prompt=COUNTING, max_tokens=10, temperature=0) for _ in range(4))
        )

        assert [text_of(r) for r in together] == [alone] * 4


class TestCancellation:
    async def test_cancelling_the_stream_stops_generation_and_frees_the_slot(self, triton: TritonProcess) -> None:
        url = triton.metrics_url
        cancelled_before = metric(url, "far_llm_requests_finished_total", finish_reason="cancelled")
        tokens_before = metric(url, "far_llm_completion_tokens_total")
        client = triton_aio.InferenceServerClient(triton.grpc_url)
        try:
            stream = Stream(client, chat_inputs(prompt=COUNTING, max_tokens=1500, temperature=0))
            seen = []
            async for response in stream:
                seen.append(response)
                if len(seen) == 3:
                    stream.cancel()
                    break
        finally:
            await client.close()

        assert all(r.text and not r.final for r in seen)
        wait_until(
            lambda: metric(url, "far_llm_requests_finished_total", finish_reason="cancelled") == cancelled_before + 1,
            timeout=30,
            what="the model to finish the request as cancelled",
        )
        assert metric(url, "far_llm_slots_busy") == 0
        generated = metric(url, "far_llm_completion_tokens_total") - tokens_before
        assert 3 <= generated < 1500
        # The freed slot serves the next request.
        after = await generate(triton.grpc_url, prompt=COUNTING, max_tokens=3, temperature=0)
        assert after[-1].finish_reason == "length"


class TestBadInput:
    @pytest.mark.parametrize(
        ("inputs", "message"),
        [
            ({"max_tokens": 5}, "exactly one of the inputs 'prompt' and 'messages'"),
            ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "exactly one of"),
            ({"prompt": ""}, "'prompt' is empty"),
            ({"prompt": "a", "max_tokens": 0}, "'max_tokens' must be between 1 and"),
            ({"prompt": "a", "temperature": -1.0}, "'temperature'"),
            ({"prompt": "a", "top_p": 0.0}, "'top_p'"),
            ({"messages": [{"role": "robot", "content": "hi"}]}, "'messages'[0]"),
        ],
    )
    async def test_is_answered_with_an_error(
        self, triton: TritonProcess, inputs: dict[str, object], message: str
    ) -> None:
        responses = await generate(triton.grpc_url, **inputs)

        assert len(responses) == 1
        assert message in responses[0].error

    async def test_a_prompt_longer_than_the_context_is_refused(self, triton: TritonProcess) -> None:
        responses = await generate(triton.grpc_url, prompt="word " * 3000, max_tokens=5)

        assert len(responses) == 1
        assert "the context holds 2048" in responses[0].error

    async def test_messages_that_are_not_json_are_refused(self, triton: TritonProcess) -> None:
        client = triton_aio.InferenceServerClient(triton.grpc_url)
        try:
            responses = [r async for r in Stream(client, [tensor("messages", "BYTES", [b"not json"])])]
        finally:
            await client.close()

        assert len(responses) == 1
        assert "'messages' is not JSON" in responses[0].error


class TestCountPrompt:
    """`count_prompt`: the prompt's length on the model's own tokenizer, without a slot and without generating."""

    async def test_the_count_is_the_length_a_generation_reports(self, triton: TritonProcess) -> None:
        messages = [{"role": "user", "content": "Name three colours."}]
        wait_idle(triton.metrics_url)
        before = metric(triton.metrics_url, "far_llm_completion_tokens_total")
        counted = await generate(triton.grpc_url, messages=messages, max_tokens=4, count_prompt=True)
        generated = await generate(triton.grpc_url, messages=messages, max_tokens=4, temperature=0)

        assert [(r.text, r.finish_reason, r.completion_tokens, r.final) for r in counted] == [("", "counted", 0, True)]
        assert counted[0].prompt_tokens == generated[-1].prompt_tokens > 10  # the chat template counts too
        assert metric(triton.metrics_url, "far_llm_completion_tokens_total") == before + 4  # the count made none

    async def test_a_prompt_over_the_limit_is_refused_as_a_generation_would_be(self, triton: TritonProcess) -> None:
        refused = await generate(triton.grpc_url, prompt=COUNTING, max_prompt_tokens=3, count_prompt=True)
        overflow = await generate(triton.grpc_url, prompt="word " * 3000, count_prompt=True)

        assert len(refused) == 1
        assert "PROMPT_TOO_LONG" in refused[0].error
        assert len(overflow) == 1
        assert "the context holds 2048" in overflow[0].error

    async def test_counting_does_not_wait_for_a_free_slot(self, triton: TritonProcess) -> None:
        slots = int(metric(triton.metrics_url, "far_llm_slots"))
        client = triton_aio.InferenceServerClient(triton.grpc_url)
        busy = [Stream(client, chat_inputs(prompt=COUNTING, max_tokens=1500, temperature=0)) for _ in range(slots)]
        firsts = [aiter(stream) for stream in busy]
        try:
            for responses in firsts:  # every slot is generating
                await anext(responses)
            assert metric(triton.metrics_url, "far_llm_slots_busy") == slots
            counted = await generate(triton.grpc_url, prompt=COUNTING, count_prompt=True)
            still_busy = metric(triton.metrics_url, "far_llm_slots_busy")
        finally:
            for stream in busy:
                stream.cancel()
            await client.close()
            wait_idle(triton.metrics_url)

        assert counted[0].finish_reason == "counted"
        assert counted[0].prompt_tokens > 0
        assert still_busy == slots  # answered while all the slots were still generating


class TestSettings:
    def test_the_environment_overrides_the_slots_of_config_pbtxt(self, tmp_path: Path) -> None:
        triton = TritonProcess.start(MODEL_REPOSITORY, tmp_path, load_models=[CHAT_MODEL], env={"FAR_LLAMA_SLOTS": "2"})
        try:
            assert metric(triton.metrics_url, "far_llm_slots") == 2
        finally:
            triton.stop()

    def test_a_bad_setting_fails_the_model_load_with_the_reason(self, tmp_path: Path) -> None:
        with pytest.raises(ProcessDied, match="threads must be a positive integer"):
            TritonProcess.start(MODEL_REPOSITORY, tmp_path, load_models=[CHAT_MODEL], env={"FAR_LLAMA_THREADS": "0"})


class TestPromptLimit:
    """`max_prompt_tokens`: what the caller paid for. Within it the model says so before its prefill; past it,
    it refuses with PROMPT_TOO_LONG and generates nothing."""

    async def test_a_prompt_within_the_limit_is_accepted_first(self, triton: TritonProcess) -> None:
        responses = await generate(triton.grpc_url, prompt=COUNTING, max_tokens=4, temperature=0, max_prompt_tokens=64)

        accepted, *rest = responses
        assert (accepted.text, accepted.completion_tokens, accepted.final, accepted.error) == ("", 0, False, "")
        assert accepted.prompt_tokens > 0
        last = assert_well_formed(rest)
        assert last.prompt_tokens == accepted.prompt_tokens
        assert last.completion_tokens == 4

    async def test_the_prompt_is_accepted_or_refused_while_every_slot_is_busy(self, triton: TritonProcess) -> None:
        """The prompt is tokenized before the request waits for a slot: the platform can record the job (or
        refuse the call) while the request still waits behind busy slots."""
        wait_idle(triton.metrics_url)
        slots = int(metric(triton.metrics_url, "far_llm_slots"))
        client = triton_aio.InferenceServerClient(triton.grpc_url)
        busy = [Stream(client, chat_inputs(prompt=COUNTING, max_tokens=1500, temperature=0)) for _ in range(slots)]
        waiting: Stream | None = None
        try:
            for responses in [aiter(stream) for stream in busy]:  # every slot is generating
                await anext(responses)
            waiting = Stream(client, chat_inputs(prompt=COUNTING, max_tokens=4, temperature=0, max_prompt_tokens=64))
            accepted = await anext(aiter(waiting))
            waiters = metric(triton.metrics_url, "far_llm_requests_waiting")
            refused = await generate(triton.grpc_url, prompt=COUNTING, max_tokens=4, max_prompt_tokens=3)
            still_busy = metric(triton.metrics_url, "far_llm_slots_busy")
        finally:
            for stream in [*busy, *([waiting] if waiting is not None else [])]:
                stream.cancel()
            await client.close()
            wait_idle(triton.metrics_url)

        assert (accepted.text, accepted.completion_tokens, accepted.final, accepted.error) == ("", 0, False, "")
        assert accepted.prompt_tokens > 0
        assert waiters == 1  # accepted, and still waiting for a slot
        assert len(refused) == 1
        assert "PROMPT_TOO_LONG" in refused[0].error
        assert still_busy == slots  # answered while all the slots were still generating

    async def test_a_longer_prompt_is_refused_before_generating(self, triton: TritonProcess) -> None:
        wait_idle(triton.metrics_url)
        before = metric(triton.metrics_url, "far_llm_completion_tokens_total")
        responses = await generate(triton.grpc_url, prompt=COUNTING, max_tokens=4, max_prompt_tokens=3)

        assert len(responses) == 1
        assert responses[0].error
        assert "PROMPT_TOO_LONG" in responses[0].error
        assert metric(triton.metrics_url, "far_llm_completion_tokens_total") == before
