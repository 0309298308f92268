"""Rows and domain records -> far.auth.v1 messages."""

from __future__ import annotations

from datetime import UTC, datetime

from far.auth.v1 import account_pb2, auth_service_pb2, session_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from servers.auth.accounts import account_name, role_ids
from servers.auth.challenges import Challenge
from servers.auth.models import AccountRow, SessionRow
from servers.auth.sessions import IssuedSession


def timestamp(value: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def account(row: AccountRow) -> account_pb2.Account:
    message = account_pb2.Account(
        name=account_name(row.wallet),
        wallet_address=row.wallet,
        roles=[account_pb2.Role.ValueType(role) for role in role_ids(row)],
        create_time=timestamp(row.create_time),
        update_time=timestamp(row.update_time),
    )
    if row.last_sign_in_time is not None:
        message.last_sign_in_time.CopyFrom(timestamp(row.last_sign_in_time))
    return message


def session(row: SessionRow) -> session_pb2.Session:
    return session_pb2.Session(
        name=f"accounts/{row.wallet}/sessions/{row.id}",
        refresh_token_expire_time=timestamp(row.refresh_expire_time),
        create_time=timestamp(row.create_time),
        refresh_time=timestamp(row.refresh_time),
        user_agent=row.user_agent,
    )


def issued_session(issued: IssuedSession) -> session_pb2.Session:
    message = session(issued.session)
    message.account.CopyFrom(account(issued.account))
    message.access_token = issued.access.token
    message.access_token_expire_time.CopyFrom(timestamp(datetime.fromtimestamp(issued.access.expires_at, UTC)))
    message.refresh_token = issued.refresh_token
    return message


def challenge(record: Challenge) -> auth_service_pb2.CreateChallengeResponse:
    return auth_service_pb2.CreateChallengeResponse(
        message=record.message,
        nonce=record.nonce,
        issue_time=timestamp(record.issue_time),
        expire_time=timestamp(record.expire_time),
    )
