"""Where images come from: a local directory or an S3 bucket (the same layout), behind one small protocol."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from components.common import (
    ConfigError,
)
from components.ingesting.config import IMAGES_DIR, METADATA_DIR
from components.s3 import error_code, make_s3_client, parse_s3_url, source_error

# --------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------


class ObjectMissingError(Exception):
    """The requested object does not exist in the source (a data problem, not a config problem)."""


class Source(Protocol):
    """Read-only view of a dataset in the bucket layout; implementations must be thread-safe."""

    def describe(self) -> str: ...

    def url(self, key: str) -> str: ...

    def read(self, key: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def iter_keys(self, prefix: str) -> Iterator[str]: ...


class LocalSource:
    """A directory in the bucket layout (a mirror, or the shared sample)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def describe(self) -> str:
        return str(self.root)

    def url(self, key: str) -> str:
        return str(self.root / key)

    def read(self, key: str) -> bytes:
        try:
            return (self.root / key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
            raise ObjectMissingError(key) from e

    def exists(self, key: str) -> bool:
        return (self.root / key).is_file()

    def iter_keys(self, prefix: str) -> Iterator[str]:
        """Keys under ``prefix`` (a directory, with trailing slash) in S3 key order."""
        directory = self.root / prefix
        if not directory.is_dir():
            return
        for name in sorted(os.listdir(directory)):
            yield f"{prefix}{name}"


class S3Source:
    """A bucket (and optional prefix) read through one shared, thread-safe boto3 client."""

    def __init__(self, client: Any, bucket: str, prefix: str, endpoint_url: str | None) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix  # "" or "some/prefix/"
        self.endpoint_url = endpoint_url

    def describe(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"s3://{self.bucket}/{self.prefix}{where}"

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}{key}"

    def read(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)
            return resp["Body"].read()
        except ClientError as e:
            if error_code(e) in {"NoSuchKey", "404", "NotFound"}:
                raise ObjectMissingError(key) from e
            raise

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self.prefix + key)
            return True
        except ClientError as e:
            # S3 answers 403 rather than 404 for a missing key when listing is not allowed; read
            # access itself was checked by open_source, so both mean "not there".
            if error_code(e) in {"NoSuchKey", "404", "NotFound", "403", "AccessDenied", "Forbidden"}:
                return False
            raise

    def iter_keys(self, prefix: str) -> Iterator[str]:
        """Keys under ``prefix`` relative to the source prefix, in S3 (lexicographic) key order."""
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
            for obj in page.get("Contents", ()):
                yield obj["Key"][len(self.prefix) :]


def open_source(
    source: str,
    *,
    endpoint_url: str | None = None,
    no_sign_request: bool = False,
    workers: int = 16,
) -> Source:
    """Open and check a source: one cheap request up front turns config mistakes into clear errors."""
    if source.startswith("s3://"):
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, prefix = parse_s3_url(source)
        # A fail-fast client for the probe (no 10x retry on a wrong endpoint), then the real one.
        import boto3

        probe_session = boto3.Session()
        probe, unsigned = make_s3_client(
            endpoint_url=endpoint_url,
            no_sign_request=no_sign_request,
            max_attempts=2,
            connect_timeout=3,
            session=probe_session,
        )
        try:
            resp = probe.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}{METADATA_DIR}/", MaxKeys=1)
            first = [o["Key"] for o in resp.get("Contents", ())]
            if first:  # listing may be public while objects are not: read one to find out now
                probe.get_object(Bucket=bucket, Key=first[0])["Body"].read()
        except (BotoCoreError, ClientError) as e:
            raise source_error(e, bucket, endpoint_url, unsigned) from e
        if not first:
            raise ConfigError(
                f"no {METADATA_DIR}/ objects under s3://{bucket}/{prefix}: check the prefix in --source "
                f"(expected {IMAGES_DIR}/ and {METADATA_DIR}/ under it)"
            )
        client, _ = make_s3_client(
            endpoint_url=endpoint_url, workers=workers, session=probe_session, unsigned=unsigned
        )
        return S3Source(client, bucket, prefix, endpoint_url)
    if "://" in source:
        raise ConfigError(f"unsupported source {source!r}: use s3://bucket[/prefix] or a local directory")
    if endpoint_url:
        raise ConfigError("--endpoint-url only applies to an s3:// source")
    root = Path(source).expanduser()
    if not root.is_dir():
        raise ConfigError(f"source directory {root} does not exist (or use s3://bucket[/prefix])")
    if not (root / METADATA_DIR).is_dir() or not (root / IMAGES_DIR).is_dir():
        raise ConfigError(f"{root} is not in the bucket layout: expected {IMAGES_DIR}/ and {METADATA_DIR}/")
    return LocalSource(root)
