"""S3 helpers shared by the steps (torch-free): the client (retries, pool, unsigned without credentials),
``s3://`` URLs, errors turned into messages that say what to do, and reading objects and prefixes."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from components.common import ConfigError

log = logging.getLogger(__name__)


def error_code(e: Exception) -> str:
    """The ``Error.Code`` of a botocore ClientError (``""`` for any other exception)."""
    resp = getattr(e, "response", None) or {}
    return str(resp.get("Error", {}).get("Code", ""))


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket[/prefix]`` -> (bucket, prefix with a trailing slash or "")."""
    if not url.startswith("s3://"):
        raise ConfigError(f"not an s3:// URL: {url!r}")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not bucket or not all(c.isalnum() or c in "-._" for c in bucket):
        raise ConfigError(f"invalid bucket name in {url!r}: expected s3://bucket[/prefix]")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def make_s3_client(
    *,
    endpoint_url: str | None = None,
    no_sign_request: bool = False,
    workers: int = 16,
    max_attempts: int = 10,
    connect_timeout: float = 10.0,
    session: Any = None,
    unsigned: bool | None = None,
) -> tuple[Any, bool]:
    """One shared client (thread-safe) with retries/backoff; unsigned when no credentials exist.

    Returns ``(client, unsigned)``. Unsigned requests let the public ``aft-vbi-pds`` bucket work on
    machines without AWS credentials, as ``aws s3 --no-sign-request`` does. Pass ``session`` and
    ``unsigned`` from a first call to skip a second credential lookup (slow where it probes EC2).
    """
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    session = session or boto3.Session()
    if unsigned is None:
        unsigned = no_sign_request or session.get_credentials() is None
    config = Config(
        signature_version=UNSIGNED if unsigned else None,
        retries={"max_attempts": max_attempts, "mode": "standard"},
        max_pool_connections=max(10, workers + 4),
        connect_timeout=connect_timeout,
        read_timeout=60,
    )
    client = session.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=session.region_name or "us-east-1",
        config=config,
    )
    return client, unsigned


def source_error(e: Exception, bucket: str, endpoint_url: str | None, unsigned: bool) -> ConfigError:
    """Turn a botocore failure on the first request into a message that says what to do."""
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
    )

    where = endpoint_url or "AWS S3"
    if isinstance(e, EndpointConnectionError | ConnectTimeoutError):
        if endpoint_url:
            return ConfigError(f"cannot reach the S3 endpoint {where}: is it running? (check --endpoint-url)")
        return ConfigError(
            f"cannot reach AWS S3 for s3://{bucket}: check the network (proxy, firewall), or use a local "
            "mirror in the bucket layout (--source DIR; make run DATA_SOURCE=DIR)"
        )
    if isinstance(e, NoCredentialsError):
        return ConfigError(
            f"no AWS credentials for s3://{bucket}: configure them (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
            "or AWS_PROFILE), or pass --no-sign-request for a public bucket"
        )
    code = error_code(e)
    status = (getattr(e, "response", None) or {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code in {"NoSuchBucket", "404", "NotFound"} or status == 404:
        return ConfigError(f"bucket {bucket!r} not found at {where} (check --source / --endpoint-url)")
    if code in {
        "AccessDenied",
        "403",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AllAccessDisabled",
    } or (status == 403):
        if unsigned:
            hint = (
                "requests were unsigned because no AWS credentials were found: configure credentials "
                "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE) for a private bucket"
            )
        else:
            hint = (
                "check the AWS credentials in use (AWS_ACCESS_KEY_ID/AWS_PROFILE), "
                "or pass --no-sign-request for a public bucket"
            )
        return ConfigError(f"access to s3://{bucket} denied ({code or status}): {hint}")
    if isinstance(e, ClientError):
        return ConfigError(f"S3 error on s3://{bucket} at {where}: {code or status}: {e}")
    return ConfigError(f"S3 request to s3://{bucket} at {where} failed: {e}")


def signed_client(endpoint_url: str | None, store: str) -> Any:
    """The shared client (retries, pool) for writing to ``store``: writes must be signed."""
    client, unsigned = make_s3_client(endpoint_url=endpoint_url, workers=4)
    if unsigned:
        raise ConfigError(
            f"no AWS credentials to write {store}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or "
            "AWS_PROFILE (on a cluster: the aws-credentials Secret)"
        )
    return client


def store_error(e: Exception, store: str) -> ConfigError:
    """A failed request on a model store (``store`` as the user wrote it), as a message saying what to do."""
    from botocore.exceptions import ClientError, NoCredentialsError

    if isinstance(e, NoCredentialsError):
        return ConfigError(
            f"no AWS credentials for {store}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
        )
    if isinstance(e, ClientError):
        code = e.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchBucket", "404"):
            return ConfigError(f"bucket of {store} does not exist: create it or fix --store")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return ConfigError(f"access to {store} denied ({code}): check the credentials and bucket policy")
        return ConfigError(f"S3 error on {store}: {code or e}")
    return ConfigError(f"cannot reach {store}: {e}")


def read_json_object(s3: Any, bucket: str, key: str) -> tuple[dict[str, Any] | None, str | None]:
    """A JSON index and its ETag: ``(index, ETag)``; ``(None, None)`` when there is none yet,
    ``(None, ETag)`` when it is broken."""
    from botocore.exceptions import ClientError

    try:
        obj = s3.get_object(Bucket=bucket, Key=key)
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None, None
        raise
    etag = obj.get("ETag")
    try:
        return json.loads(obj["Body"].read()), etag
    except json.JSONDecodeError:
        log.warning("s3://%s/%s is not valid JSON; starting a new index", bucket, key)
        return None, etag


def download_prefix(s3: Any, bucket: str, prefix: str, dest: Path) -> None:
    """Every object directly under ``prefix/`` into ``dest`` (one file per key, by its last segment)."""
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/")
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    for key in keys:
        name = key.rsplit("/", 1)[1]
        if name:
            s3.download_file(bucket, key, str(dest / name))
