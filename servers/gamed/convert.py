"""Rows and domain records -> far.gamed.v1 messages."""

from __future__ import annotations

from datetime import datetime, timedelta

from far.gamed.v1 import build_pb2, channel_pb2, game_pb2, gamed_service_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from servers.gamed.catalog import GameRecord, LinkSet
from servers.gamed.models import BuildRow, ChannelRow, ReleaseRow


def timestamp(value: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def game(record: GameRecord) -> game_pb2.Game:
    row = record.row
    return game_pb2.Game(
        name=f"games/{row.id}",
        display_name=row.display_name,
        description=row.description,
        genres=row.genres,
        publisher=row.publisher,
        state=game_pb2.Game.State.ValueType(row.state),
        platforms=[game_pb2.Platform.ValueType(p) for p in record.platforms],
        create_time=timestamp(row.create_time),
        update_time=timestamp(row.update_time),
        etag=record.etag,
    )


def build(row: BuildRow) -> build_pb2.Build:
    return build_pb2.Build(
        name=f"games/{row.game_id}/builds/{row.id}",
        platform=game_pb2.Platform.ValueType(row.platform),
        version=row.version,
        release_notes=row.release_notes,
        assets=[
            build_pb2.Asset(
                path=a["path"], size_bytes=a["size_bytes"], sha256=a["sha256"], content_type=a["content_type"]
            )
            for a in row.assets
        ],
        total_size_bytes=row.total_size_bytes,
        creator=row.creator,
        create_time=timestamp(row.create_time),
    )


def release(row: ReleaseRow) -> channel_pb2.Release:
    return channel_pb2.Release(
        name=f"games/{row.game_id}/channels/{row.channel_id}/releases/{row.id}",
        build=f"games/{row.game_id}/builds/{row.build_id}",
        platform=game_pb2.Platform.ValueType(row.platform),
        version=row.version,
        state=channel_pb2.Release.State.ValueType(row.state),
        promoter=row.promoter,
        create_time=timestamp(row.create_time),
    )


def channel(row: ChannelRow, current: list[ReleaseRow]) -> channel_pb2.Channel:
    return channel_pb2.Channel(
        name=f"games/{row.game_id}/channels/{row.id}",
        description=row.description,
        current_releases=[release(r) for r in current],
        create_time=timestamp(row.create_time),
        update_time=timestamp(row.update_time),
    )


def links(link_set: LinkSet, now: datetime) -> tuple[list[gamed_service_pb2.AssetLink], Timestamp]:
    messages = [
        gamed_service_pb2.AssetLink(
            path=item.path,
            url=item.link.url,
            size_bytes=item.size_bytes,
            sha256=item.sha256,
            headers=item.link.headers,
        )
        for item in link_set.links
    ]
    return messages, timestamp(now + timedelta(seconds=link_set.ttl_s))
