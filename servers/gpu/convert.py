"""Rows and domain records -> far.gpu.v1 messages."""

from __future__ import annotations

from datetime import datetime

from far.gpu.v1 import gpu_service_pb2, node_pb2, telemetry_pb2
from far.type.v1 import token_amount_pb2
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from servers.gpu.history import Series
from servers.gpu.live import ServingCandidate
from servers.gpu.models import NodeRow
from servers.gpu.registry import Placement, desired_of, etag_of, placement_delta
from servers.gpu.settings import FAR_DECIMALS


def timestamp(value: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def timestamp_ms(value_ms: int) -> Timestamp:
    ts = Timestamp()
    ts.FromMilliseconds(value_ms)
    return ts


def duration_s(seconds: float) -> Duration:
    value = Duration()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


def placement(item: Placement) -> node_pb2.ModelPlacement:
    return node_pb2.ModelPlacement(model=item.model, version=item.version)


def node(row: NodeRow) -> node_pb2.Node:
    message = node_pb2.Node(
        name=f"nodes/{row.id}",
        operator=row.operator,
        endpoint=row.endpoint,
        endpoint_tls=row.endpoint_tls,
        region=row.region,
        labels=row.labels,
        gpus=[
            node_pb2.GpuInventory(
                model_name=str(g["model_name"]), memory_bytes=int(g["memory_bytes"]), count=int(g["count"])
            )
            for g in row.gpus
        ],
        cpu_cores=row.cpu_cores,
        memory_bytes=row.memory_bytes,
        state=node_pb2.Node.State.ValueType(row.state),
        state_message=row.state_message,
        loaded_models=[
            node_pb2.ModelStatus(
                model=str(m["model"]),
                version=int(m["version"]),
                state=node_pb2.ModelState.ValueType(int(m["state"])),
                message=str(m.get("message", "")),
            )
            for m in row.loaded_models
        ],
        desired_models=[placement(p) for p in desired_of(row)],
        agent_version=row.agent_version,
        triton_version=row.triton_version,
        create_time=timestamp(row.create_time),
        update_time=timestamp(row.update_time),
        etag=etag_of(row),
    )
    if row.last_seen_time is not None:
        message.last_seen_time.CopyFrom(timestamp(row.last_seen_time))
    if row.stake_wei is not None:
        message.stake.CopyFrom(
            token_amount_pb2.TokenAmount(value=str(int(row.stake_wei)), symbol="FAR", decimals=FAR_DECIMALS)
        )
    return message


def placement_instruction(row: NodeRow) -> gpu_service_pb2.PlacementInstruction:
    load, unload = placement_delta(row)
    return gpu_service_pb2.PlacementInstruction(
        revision=row.placement_revision,
        desired=[placement(p) for p in desired_of(row)],
        load=[placement(p) for p in load],
        unload=[placement(p) for p in unload],
    )


def serving_node(candidate: ServingCandidate) -> gpu_service_pb2.ServingNode:
    return gpu_service_pb2.ServingNode(
        node=f"nodes/{candidate.node_id}",
        endpoint=candidate.endpoint,
        endpoint_tls=candidate.endpoint_tls,
        region=candidate.region,
        version=candidate.version,
        active_requests=candidate.active_requests,
        pending_requests=candidate.pending_requests,
        free_memory_bytes=candidate.free_memory_bytes,
        gpu_utilization_percent=candidate.gpu_utilization_percent,
        report_time=timestamp_ms(candidate.report_time_ms),
    )


def time_series(series: Series) -> telemetry_pb2.TimeSeries:
    message = telemetry_pb2.TimeSeries(
        metric=telemetry_pb2.TelemetryMetric.ValueType(series.metric),
        model=series.model,
        model_version=series.model_version,
        points=[telemetry_pb2.Point(time=timestamp_ms(t), value=value) for t, value in series.points],
    )
    if series.gpu_index is not None:
        message.gpu_index = series.gpu_index
    return message
