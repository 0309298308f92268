"""Paid token streaming through the real edge: anvil with the contracts, auth + gpu + inference behind Envoy (mTLS),
a local GPU node (tritonserver + agent, registered through the partner listener), and clients in each transport:
JSON array, NDJSON and SSE over HTTP, gRPC over h2c, gRPC-Web with buf curl."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from eth_account.signers.local import LocalAccount
from far.inference.v1 import inference_service_pb2 as pb
from far.inference.v1 import inference_service_pb2_grpc, job_pb2
from web3 import Web3

from devstack import catalog
from devstack.chain import DevChain, contract_at, dev_account, job_key, model_key, start_dev_chain, transact
from devstack.node import LocalNode, start_local_node
from devstack.stack import Stack, run_migrations
from gpu.agent.config import TlsFiles
from gpu.triton import CHAT_MODEL

pytestmark = pytest.mark.e2e

SERVICES = ["auth", "gpu", "inference"]
MODEL = f"models/{CHAT_MODEL}"
BUF = catalog.ROOT / "node_modules" / ".bin" / "buf"


@pytest.fixture(scope="module")
def dev_chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevChain]:
    run_dir = tmp_path_factory.mktemp("chain")
    chain = start_dev_chain(run_dir / "deployments.json", run_dir / "anvil.log", port=0)
    try:
        yield chain
    finally:
        chain.stop()


@pytest.fixture(scope="module")
def platform(
    isolated_env: Callable[[str], dict[str, str]], dev_chain: DevChain, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Stack, LocalNode]]:
    run_dir = tmp_path_factory.mktemp("inference-stack")
    env = {
        **isolated_env("inference"),
        **dev_chain.env(),
        "GPU_REPORT_INTERVAL_S": "1",
        "INFERENCE_NODES_REFRESH_S": "0.5",
        "INFERENCE_SLOTS_PER_MODEL": "2",
        "INFERENCE_MAX_QUEUE": "1",
        "INFERENCE_MAX_JOBS_PER_ACCOUNT": "8",
    }
    run_migrations(SERVICES, env, log_path=run_dir / "logs" / "migrations.log")
    with Stack(SERVICES, env=env, run_dir=run_dir) as stack:
        assert stack.pki is not None
        files = stack.pki.ensure_identity("partner", "node-agent")
        node = start_local_node(
            run_dir,
            gpu_service=stack.envoy_partner_target,
            tls=TlsFiles(ca=stack.pki.ca_file, cert=files.cert, key=files.key),
            triton_env={"FAR_LLAMA_SLOTS": "2"},
        )
        try:
            _wait_available(stack)
            yield stack, node
        finally:
            node.stop()


def _wait_available(stack: Stack, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        model = httpx.get(f"{stack.envoy_http_url}/v1/{MODEL}", timeout=5).json()
        if model.get("availability") == "AVAILABILITY_AVAILABLE":
            return
        assert time.monotonic() < deadline, f"the model never became available: {model}"
        time.sleep(0.3)


@pytest.fixture(scope="module")
def stack(platform: tuple[Stack, LocalNode]) -> Stack:
    return platform[0]


class Customer:
    """A dev wallet with FAR, signed in (a token for its address), paying quotes on the dev chain."""

    def __init__(self, stack: Stack, chain: DevChain, account: LocalAccount, token: str) -> None:
        self.stack = stack
        self.account = account
        self.wallet = account.address.lower()
        self.headers = {"authorization": f"Bearer {token}"}
        self.w3 = Web3(Web3.HTTPProvider(chain.anvil.url))
        self.token = contract_at(self.w3, "FARToken", chain.deployment.addresses["FARToken"])
        self.payment = contract_at(self.w3, "InferencePayment", chain.deployment.addresses["InferencePayment"])

    def quote(self, max_tokens: int, max_prompt_tokens: int = 64) -> dict[str, Any]:
        answer = httpx.post(
            f"{self.stack.envoy_http_url}/v1/quotes",
            json={"model": MODEL, "maxTokens": max_tokens, "maxPromptTokens": max_prompt_tokens},
            headers=self.headers,
            timeout=10,
        )
        assert answer.status_code == 200, answer.text
        quote: dict[str, Any] = answer.json()
        return quote

    def pay(self, quote: dict[str, Any], tokens: int | None = None) -> str:
        tokens = tokens if tokens is not None else quote["maxTokens"] + quote["maxPromptTokens"]
        job = job_key(quote["job"].removeprefix("jobs/"))
        transact(
            self.w3, self.account, self.token.functions.approve(self.payment.address, int(quote["price"]["value"]))
        )
        receipt = transact(self.w3, self.account, self.payment.functions.pay(job, model_key(CHAT_MODEL), tokens))
        return str(receipt["transactionHash"].to_0x_hex())

    def paid_body(self, max_tokens: int = 12, prompt: str = "Tell me about cats.") -> dict[str, Any]:
        quote = self.quote(max_tokens)
        tx = self.pay(quote)
        return {
            "chat": {"messages": [{"role": "ROLE_USER", "content": prompt}]},
            "maxTokens": max_tokens,
            "sampling": {"temperature": 0, "seed": 7},
            "payment": {"quote": quote["name"], "transaction": {"chainId": "97", "txHash": tx}},
        }


@pytest.fixture(scope="module")
def customers(stack: Stack, dev_chain: DevChain, make_token: Callable[..., str]) -> list[Customer]:
    accounts = [dev_account(i) for i in (2, 3, 4)]
    return [Customer(stack, dev_chain, account, make_token(account.address.lower())) for account in accounts]


def generate_url(stack: Stack) -> str:
    return f"{stack.envoy_http_url}/v1/{MODEL}:generate"


def check_stream(messages: list[dict[str, Any]]) -> str:
    """job first, contiguous deltas, final last and SUCCEEDED; returns the text."""
    assert "job" in messages[0], messages[0]
    final = messages[-1]["final"]
    assert final["state"] == "STATE_SUCCEEDED", final
    assert "error" not in final
    offset = 0
    text = ""
    for message in messages[1:-1]:
        if "delta" in message:
            delta = message["delta"]
            assert delta.get("offset", 0) == offset
            offset += delta["tokenCount"]
            text += delta.get("text", "")
    assert final["nextOffset"] == offset == final["usage"]["completionTokens"]
    return text


def test_json_array_stream(stack: Stack, customers: list[Customer]) -> None:
    customer = customers[0]
    answer = httpx.post(generate_url(stack), json=customer.paid_body(), headers=customer.headers, timeout=60)
    assert answer.status_code == 200, answer.text
    messages = answer.json()
    assert isinstance(messages, list)
    text = check_stream(messages)
    job = httpx.get(f"{stack.envoy_http_url}/v1/{messages[0]['job']['name']}", headers=customer.headers, timeout=10)
    assert job.json()["outputText"] == text
    assert job.json()["payment"]["payer"] == customer.wallet


@pytest.mark.parametrize("accept", ["application/x-ndjson", "text/event-stream"])
def test_ndjson_and_sse_with_curl(stack: Stack, customers: list[Customer], accept: str, tmp_path: Path) -> None:
    customer = customers[0]
    body = tmp_path / "body.json"
    body.write_text(json.dumps(customer.paid_body()))
    result = subprocess.run(
        [
            "curl", "-sS", "-N", "--fail-with-body", "-X", "POST", generate_url(stack),
            "-H", f"Accept: {accept}", "-H", "Content-Type: application/json",
            "-H", f"Authorization: {customer.headers['authorization']}", "--data-binary", f"@{body}",
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout
    if accept == "text/event-stream":
        lines = [line.removeprefix("data: ") for line in result.stdout.splitlines() if line.startswith("data: ")]
    else:
        lines = [line for line in result.stdout.splitlines() if line.strip()]
    check_stream([json.loads(line) for line in lines])


def test_grpc_over_h2c_through_envoy(stack: Stack, customers: list[Customer]) -> None:
    customer = customers[1]
    body = customer.paid_body()
    request = pb.GenerateRequest(model=MODEL, max_tokens=body["maxTokens"])
    request.chat.messages.add(role=job_pb2.ChatMessage.ROLE_USER, content="Tell me about cats.")
    request.payment.quote = body["payment"]["quote"]
    request.payment.transaction.chain_id = 97
    request.payment.transaction.tx_hash = body["payment"]["transaction"]["txHash"]
    with grpc.insecure_channel(stack.envoy_grpc_target) as channel:
        stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
        responses = list(stub.Generate(request, metadata=tuple(customer.headers.items()), timeout=60))
    assert responses[0].HasField("job")
    assert responses[-1].final.state == job_pb2.Job.STATE_SUCCEEDED
    assert responses[-1].final.usage.completion_tokens > 0


def test_grpc_web_with_buf_curl(stack: Stack, customers: list[Customer]) -> None:
    customer = customers[1]
    result = subprocess.run(
        [
            str(BUF), "curl", "--protocol", "grpcweb", "--schema", str(catalog.DESCRIPTOR_SET),
            "-H", f"Authorization: {customer.headers['authorization']}",
            "-d", json.dumps({"model": MODEL, **customer.paid_body()}),
            f"{stack.envoy_http_url}/far.inference.v1.InferenceService/Generate",
        ],
        capture_output=True, text=True, timeout=60, check=False, cwd=catalog.ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    messages = [json.loads(chunk) for chunk in _json_documents(result.stdout)]
    check_stream(messages)


def _json_documents(text: str) -> Iterator[str]:
    """buf curl prints one pretty JSON document per stream message."""
    decoder = json.JSONDecoder()
    index = 0
    while index < len(text):
        while index < len(text) and text[index].isspace():
            index += 1
        if index >= len(text):
            return
        _, end = decoder.raw_decode(text, index)
        yield text[index:end]
        index = end


def test_payment_problems_come_back_as_json_errors(stack: Stack, customers: list[Customer]) -> None:
    customer, other = customers[0], customers[2]
    body = customer.paid_body(max_tokens=4)
    first = httpx.post(generate_url(stack), json=body, headers=customer.headers, timeout=60)
    assert first.status_code == 200
    again = httpx.post(generate_url(stack), json=body, headers=customer.headers, timeout=60)
    assert again.status_code == 409, again.text  # ALREADY_EXISTS: the payment paid a job already
    details = again.json()["details"]
    info = next(d for d in details if d["@type"].endswith("ErrorInfo"))
    assert info["reason"] == "PAYMENT_ALREADY_USED"
    assert info["metadata"]["job"] == first.json()[0]["job"]["name"]
    # Another account cannot redeem the quote (it does not exist for them) ...
    stolen = httpx.post(generate_url(stack), json=customer.paid_body(max_tokens=4), headers=other.headers, timeout=60)
    assert stolen.status_code == 404, stolen.text
    # ... and an unpaid quote is refused before anything runs.
    quote = customer.quote(4)
    unpaid = {
        **body,
        "payment": {"quote": quote["name"], "transaction": {"chainId": "97", "txHash": "0x" + "12" * 32}},
    }
    refused = httpx.post(generate_url(stack), json=unpaid, headers=customer.headers, timeout=60)
    assert refused.status_code == 400, refused.text  # FAILED_PRECONDITION: PAYMENT_NOT_FOUND
    info = next(d for d in refused.json()["details"] if d["@type"].endswith("ErrorInfo"))
    assert info["reason"] == "PAYMENT_NOT_FOUND"


def test_a_paid_job_with_too_long_a_prompt_is_refused_and_its_payment_kept(
    stack: Stack, customers: list[Customer]
) -> None:
    """CreateJob consumes the payment before a node runs the job: the prompt is counted first, so one over what
    the quote covers (64 prompt tokens) is a 400 and the same payment still pays for a job that fits."""
    customer = customers[1]
    base = f"{stack.envoy_http_url}/v1/jobs"
    body = customer.paid_body(max_tokens=4, prompt="word " * 80)
    refused = httpx.post(base, json={"model": MODEL, **body}, headers=customer.headers, timeout=30)
    assert refused.status_code == 400, refused.text
    info = next(d for d in refused.json()["details"] if d["@type"].endswith("ErrorInfo"))
    assert info["reason"] == "PROMPT_TOO_LONG"
    body["chat"]["messages"][0]["content"] = "Tell me about cats."
    accepted = httpx.post(base, json={"model": MODEL, **body}, headers=customer.headers, timeout=30)
    assert accepted.status_code == 200, accepted.text  # the payment was not consumed by the refused call
    assert accepted.json()["payment"]["transaction"]["txHash"] == body["payment"]["transaction"]["txHash"]


def test_a_paid_generate_with_too_long_a_prompt_is_refused_and_its_payment_kept(
    stack: Stack, customers: list[Customer]
) -> None:
    """Generate starts the model at once and writes the job (consuming the payment) while the node tokenizes the
    prompt; the node's refusal rolls that write back, so the same payment then pays a stream that fits."""
    customer = customers[1]
    body = customer.paid_body(max_tokens=4, prompt="word " * 80)
    refused = httpx.post(generate_url(stack), json=body, headers=customer.headers, timeout=60)
    assert refused.status_code == 400, refused.text
    info = next(d for d in refused.json()["details"] if d["@type"].endswith("ErrorInfo"))
    assert info["reason"] == "PROMPT_TOO_LONG"
    body["chat"]["messages"][0]["content"] = "Tell me about cats."
    served = httpx.post(generate_url(stack), json=body, headers=customer.headers, timeout=60)
    assert served.status_code == 200, served.text  # the payment was not consumed by the refused call
    messages = served.json()
    check_stream(messages)
    assert messages[0]["job"]["payment"]["transaction"]["txHash"] == body["payment"]["transaction"]["txHash"]


def _generate_until(stack: Stack, customer: Customer, body: dict[str, Any], *, deltas: int) -> list[dict[str, Any]]:
    """Generate as NDJSON through Envoy, dropping the connection once `deltas` deltas came; the messages seen."""
    seen: list[dict[str, Any]] = []
    with httpx.stream(
        "POST",
        generate_url(stack),
        json=body,
        headers={**customer.headers, "accept": "application/x-ndjson"},
        timeout=60,
    ) as response:
        for line in response.iter_lines():
            if line.strip():
                seen.append(json.loads(line))
            if sum(1 for m in seen if "delta" in m) == deltas:
                break
    return seen


def test_a_payment_reused_while_its_job_runs_leaves_that_job_alone(stack: Stack, customers: list[Customer]) -> None:
    """A second Generate with the same quote and payment (the same job id) while the first job runs is a 409,
    and the running job stays this replica's to cancel."""
    customer = customers[0]
    body = customer.paid_body(max_tokens=200, prompt="Write a long story about a lighthouse keeper.")
    seen = _generate_until(stack, customer, body, deltas=1)  # the job runs (and does after the disconnect)
    again = httpx.post(generate_url(stack), json=body, headers=customer.headers, timeout=60)
    assert again.status_code == 409, again.text
    info = next(d for d in again.json()["details"] if d["@type"].endswith("ErrorInfo"))
    assert info["reason"] == "PAYMENT_ALREADY_USED"
    name = seen[0]["job"]["name"]
    cancelled = httpx.post(f"{stack.envoy_http_url}/v1/{name}:cancel", json={}, headers=customer.headers, timeout=30)
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["state"] == "STATE_CANCELLED"  # found and stopped, not left running


def test_disconnect_and_resume_yields_the_whole_text_once(stack: Stack, customers: list[Customer]) -> None:
    customer = customers[2]
    body = customer.paid_body(max_tokens=40, prompt="Write a short poem about the sea.")
    seen = _generate_until(stack, customer, body, deltas=3)  # the connection drops here
    job_name = seen[0]["job"]["name"]
    offset = sum(m["delta"]["tokenCount"] for m in seen if "delta" in m)
    rest = httpx.get(
        f"{stack.envoy_http_url}/v1/{job_name}:stream",
        params={"fromOffset": offset},
        headers={**customer.headers, "accept": "application/x-ndjson"},
        timeout=60,
    )
    assert rest.status_code == 200, rest.text
    tail = [json.loads(line) for line in rest.text.splitlines() if line.strip()]
    assert "job" in tail[0]
    assert tail[-1]["final"]["state"] == "STATE_SUCCEEDED"
    text = "".join(m["delta"].get("text", "") for m in seen + tail if "delta" in m)
    job = httpx.get(f"{stack.envoy_http_url}/v1/{job_name}", headers=customer.headers, timeout=10).json()
    assert text == job["outputText"]
    assert tail[-1]["final"]["nextOffset"] == job["usage"]["completionTokens"]


def _job(stack: Stack, customer: Customer, name: str) -> dict[str, Any]:
    answer = httpx.get(f"{stack.envoy_http_url}/v1/{name}", headers=customer.headers, timeout=10)
    assert answer.status_code == 200, answer.text
    job: dict[str, Any] = answer.json()
    return job


def test_a_full_queue_is_429_and_cancel_frees_the_node(stack: Stack, customers: list[Customer]) -> None:
    # Two slots and a queue of one (the module's settings): two running jobs, one waiting, the next refused.
    customer = customers[0]
    base = f"{stack.envoy_http_url}/v1/jobs"

    def create(max_tokens: int) -> httpx.Response:
        body = customer.paid_body(max_tokens=max_tokens, prompt="Write a long story about a lighthouse keeper.")
        # The HTTP body is the job itself (`body: "job"`).
        return httpx.post(base, json={"model": MODEL, **body}, headers=customer.headers, timeout=30)

    created = [create(200) for _ in range(2)]
    assert all(answer.status_code == 200 for answer in created), [answer.text for answer in created]
    running = [answer.json()["name"] for answer in created]
    deadline = time.monotonic() + 30
    while any(_job(stack, customer, name)["state"] != "STATE_RUNNING" for name in running):
        assert time.monotonic() < deadline, [_job(stack, customer, name) for name in running]
        time.sleep(0.1)
    waiting = create(4)
    assert waiting.status_code == 200, waiting.text
    assert waiting.json()["state"] == "STATE_QUEUED"
    refused = create(4)
    assert refused.status_code == 429, refused.text
    details = refused.json()["details"]
    assert next(d for d in details if d["@type"].endswith("ErrorInfo"))["reason"] == "QUEUE_FULL"
    assert any(d["@type"].endswith("RetryInfo") for d in details)
    assert _job(stack, customer, waiting.json()["name"])["queuePosition"] == 1
    for name in running:
        cancelled = httpx.post(
            f"{stack.envoy_http_url}/v1/{name}:cancel", json={}, headers=customer.headers, timeout=30
        )
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["state"] == "STATE_CANCELLED"
        assert cancelled.json()["finishReason"] == "FINISH_REASON_CANCELLED"
    # The freed slots take the waiting job at once.
    deadline = time.monotonic() + 30
    while _job(stack, customer, waiting.json()["name"])["state"] != "STATE_SUCCEEDED":
        assert time.monotonic() < deadline, _job(stack, customer, waiting.json()["name"])
        time.sleep(0.1)


def test_another_accounts_job_is_not_found(stack: Stack, customers: list[Customer]) -> None:
    owner, stranger = customers[1], customers[2]
    answer = httpx.post(generate_url(stack), json=owner.paid_body(max_tokens=2), headers=owner.headers, timeout=60)
    name = answer.json()[0]["job"]["name"]
    for method, path in (("GET", name), ("GET", f"{name}:stream"), ("POST", f"{name}:cancel")):
        refused = httpx.request(
            method, f"{stack.envoy_http_url}/v1/{path}", headers=stranger.headers, timeout=10,
            json={} if method == "POST" else None,
        )  # fmt: skip
        assert refused.status_code == 404, (path, refused.text)
    listed = httpx.get(f"{stack.envoy_http_url}/v1/jobs", headers=stranger.headers, timeout=10).json()
    assert name not in [job["name"] for job in listed.get("jobs", [])]


def test_grpc_over_the_partner_mtls_listener(stack: Stack, customers: list[Customer]) -> None:
    # A partner backend (the dev game server's certificate) relays its user's access token: the call is the
    # user's, and the stream is the same as everywhere else.
    customer = customers[2]
    body = customer.paid_body()
    request = pb.GenerateRequest(model=MODEL, max_tokens=body["maxTokens"])
    request.chat.messages.add(role=job_pb2.ChatMessage.ROLE_USER, content="Tell me about cats.")
    request.payment.quote = body["payment"]["quote"]
    request.payment.transaction.chain_id = 97
    request.payment.transaction.tx_hash = body["payment"]["transaction"]["txHash"]
    credentials = stack.client_credentials("partner", "game-server")
    with grpc.secure_channel(stack.envoy_partner_target, credentials) as channel:
        stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
        responses = list(stub.Generate(request, metadata=tuple(customer.headers.items()), timeout=60))
        with pytest.raises(grpc.RpcError) as caught:  # without the user's token the partner is not an account
            list(stub.Generate(request, timeout=60))
    assert responses[0].job.owner == customer.wallet
    assert responses[-1].final.state == job_pb2.Job.STATE_SUCCEEDED
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
