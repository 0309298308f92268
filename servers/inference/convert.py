"""Job rows -> far.inference.v1.Job, and the immutable input part of a job <-> its stored bytes."""

from __future__ import annotations

from datetime import datetime

from far.inference.v1 import inference_service_pb2, job_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import status_pb2

from servers.inference.models import JobRow
from servers.inference.quotes import token_amount


def timestamp(value: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def job_input(job: job_pb2.Job) -> bytes:
    """The input fields of `job` (prompt or chat, sampling, max tokens, stop sequences), serialized."""
    kept = job_pb2.Job(max_tokens=job.max_tokens, stop_sequences=job.stop_sequences)
    which = job.WhichOneof("input")
    if which == "prompt":
        kept.prompt = job.prompt
    elif which == "chat":
        kept.chat.CopyFrom(job.chat)
    if job.HasField("sampling"):
        kept.sampling.CopyFrom(job.sampling)
    return kept.SerializeToString(deterministic=True)


def job(row: JobRow, *, with_output: bool = True) -> job_pb2.Job:
    """The Job message of a row (ListJobs leaves `output_text` out)."""
    message = job_pb2.Job.FromString(row.input)
    message.name = f"jobs/{row.id}"
    message.model = row.model
    message.state = job_pb2.Job.State.ValueType(row.state)
    message.owner = row.owner
    message.node = row.node
    message.usage.prompt_tokens = row.prompt_tokens
    message.usage.completion_tokens = row.completion_tokens
    message.usage.total_tokens = row.prompt_tokens + row.completion_tokens
    message.finish_reason = job_pb2.FinishReason.ValueType(row.finish_reason)
    if row.error:
        message.error.CopyFrom(status_pb2.Status.FromString(row.error))
    if with_output:
        message.output_text = row.output_text
    message.create_time.CopyFrom(timestamp(row.create_time))
    if row.start_time is not None:
        message.start_time.CopyFrom(timestamp(row.start_time))
    if row.end_time is not None:
        message.end_time.CopyFrom(timestamp(row.end_time))
    if row.time_to_first_token_ms is not None:
        message.time_to_first_token.FromMilliseconds(row.time_to_first_token_ms)
    if row.tx_hash:
        payment = message.payment
        payment.quote = row.quote
        payment.transaction.chain_id = row.chain_id or 0
        payment.transaction.tx_hash = row.tx_hash
        payment.payment_job_id = row.payment_job_id or ""
        payment.payer = row.payer or ""
        payment.amount.CopyFrom(token_amount(int(row.amount or 0)))
        payment.payment_contract = row.payment_contract or ""
        if row.verify_time is not None:
            payment.verify_time.CopyFrom(timestamp(row.verify_time))
    return message


def generate_end(row: JobRow) -> inference_service_pb2.GenerateEnd:
    """The `final` of an ended job, from its row (a stream that missed the runner's own End)."""
    end = inference_service_pb2.GenerateEnd(
        state=job_pb2.Job.State.ValueType(row.state), finish_reason=job_pb2.FinishReason.ValueType(row.finish_reason)
    )
    end.usage.prompt_tokens = row.prompt_tokens
    end.usage.completion_tokens = row.completion_tokens
    end.usage.total_tokens = row.prompt_tokens + row.completion_tokens
    if row.error:
        end.error.ParseFromString(row.error)
    if row.time_to_first_token_ms is not None:
        end.time_to_first_token.FromMilliseconds(row.time_to_first_token_ms)
    end.next_offset = row.completion_tokens
    return end
