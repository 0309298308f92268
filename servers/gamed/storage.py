"""Presigned S3 links for build assets (SigV4, computed locally: no network call)."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import boto3
import structlog
from botocore.config import Config as BotoConfig

from servers.common.config import Env

log = structlog.get_logger("far.gamed.storage")


@dataclass(frozen=True)
class StorageSettings:
    bucket: str
    region: str
    endpoint_url: str | None
    key_prefix: str

    @classmethod
    def from_env(cls, env: Env) -> StorageSettings:
        return cls(
            bucket=env.text("GAMED_S3_BUCKET", "far-gamed-dev") or "far-gamed-dev",
            region=env.text("GAMED_S3_REGION", "us-east-1") or "us-east-1",
            endpoint_url=env.url("GAMED_S3_ENDPOINT_URL", ("http", "https")),
            key_prefix=(env.text("GAMED_S3_KEY_PREFIX", "") or "").strip("/"),
        )


@dataclass(frozen=True)
class SignedLink:
    url: str
    headers: dict[str, str]


class AssetStorage:
    """Signs GET and PUT links for objects at `<prefix>/games/<game>/builds/<build>/<path>`."""

    def __init__(self, settings: StorageSettings) -> None:
        self.settings = settings
        session = boto3.session.Session()
        credentials: dict[str, Any] = {}
        if session.get_credentials() is None:
            # No AWS credentials (a dev machine): links are well-formed but only a local S3 stand-in takes them.
            log.warning("no AWS credentials found; signing links with placeholder development credentials")
            credentials = {"aws_access_key_id": "far-dev", "aws_secret_access_key": "far-dev-secret"}
        self._client = session.client(
            "s3",
            region_name=settings.region,
            endpoint_url=settings.endpoint_url,
            config=BotoConfig(signature_version="s3v4", s3={"addressing_style": "virtual"}),
            **credentials,
        )

    def object_key(self, game: str, build: str, path: str) -> str:
        key = f"games/{game}/builds/{build}/{path}"
        return f"{self.settings.key_prefix}/{key}" if self.settings.key_prefix else key

    def download_link(self, key: str, *, ttl_s: int, content_type: str, filename: str) -> SignedLink:
        url = self._client.generate_presigned_url(
            "get_object",
            Params={
                "Bucket": self.settings.bucket,
                "Key": key,
                "ResponseContentType": content_type,
                "ResponseContentDisposition": f'attachment; filename="{filename}"',
            },
            ExpiresIn=ttl_s,
        )
        return SignedLink(url=url, headers={})

    def upload_link(self, key: str, *, ttl_s: int, size_bytes: int, sha256_hex: str, content_type: str) -> SignedLink:
        checksum = base64.b64encode(bytes.fromhex(sha256_hex)).decode()
        url = self._client.generate_presigned_url(
            "put_object",
            Params={
                "Bucket": self.settings.bucket,
                "Key": key,
                "ContentLength": size_bytes,
                "ContentType": content_type,
                "ChecksumSHA256": checksum,
            },
            ExpiresIn=ttl_s,
        )
        headers = {
            "Content-Length": str(size_bytes),
            "Content-Type": content_type,
            "x-amz-checksum-sha256": checksum,
        }
        return SignedLink(url=url, headers=headers)
