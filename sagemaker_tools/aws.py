"""The one place boto3 is set up for the SageMaker tools: session and clients, the region, and AWS
errors turned into :class:`DeployError` messages that name the step (missing credentials included).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from functools import cached_property
from typing import Any

from components.common import ConfigError

log = logging.getLogger(__name__)


class DeployError(RuntimeError):
    """An AWS call failed or the endpoint did not become healthy; the message says what to do."""


def resolve_region(region: str | None, env: Mapping[str, str] | None = None) -> str:
    """--region, else AWS_REGION / AWS_DEFAULT_REGION; never a silent default region."""
    env = os.environ if env is None else env
    value = region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if not value:
        raise ConfigError("no AWS region: pass --region us-east-1 or set AWS_REGION")
    if not re.match(r"^[a-z]{2}(-[a-z]+)+-\d$", value):
        raise ConfigError(f"{value!r} is not an AWS region name like us-east-1")
    return value


class Clients:
    """The four boto3 clients from one session (one region, one set of credentials), made on first use.

    Without ``endpoint_url`` boto3 honours ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_<SERVICE>`` itself.
    """

    def __init__(self, region: str, endpoint_url: str | None = None) -> None:
        import boto3
        from botocore.config import Config

        self._session = boto3.session.Session(region_name=region)
        self._endpoint_url = endpoint_url
        self._config = Config(retries={"max_attempts": 5, "mode": "standard"})

    def _client(self, name: str) -> Any:
        return self._session.client(name, endpoint_url=self._endpoint_url, config=self._config)

    @cached_property
    def sagemaker(self) -> Any:
        """Control plane: models, endpoint configs, endpoints."""
        return self._client("sagemaker")

    @cached_property
    def runtime(self) -> Any:
        """Data plane: InvokeEndpoint."""
        return self._client("sagemaker-runtime")

    @cached_property
    def s3(self) -> Any:
        """The model archive bucket."""
        return self._client("s3")

    @cached_property
    def autoscaling(self) -> Any:
        """Application Auto Scaling (scalable targets and policies)."""
        return self._client("application-autoscaling")


def make_clients(region: str, endpoint_url: str | None = None) -> Clients:
    """Lazily created boto3 clients for ``region`` (no API call until one is used)."""
    return Clients(region, endpoint_url)


def error_code(e: Exception) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))


def is_not_found(e: Exception) -> bool:
    """SageMaker reports a missing resource as ValidationException 'Could not find ...'."""
    code = error_code(e)
    msg = str(e)
    return code in {"404", "NoSuchBucket", "NoSuchKey", "NotFound", "ResourceNotFound"} or (
        code == "ValidationException" and "Could not find" in msg
    )


def as_deploy_error(desc: str, e: Exception) -> DeployError:
    from botocore.exceptions import ClientError, NoCredentialsError

    if isinstance(e, NoCredentialsError):
        return DeployError(f"{desc}: no AWS credentials found; set AWS_PROFILE or run `aws sso login`")
    if isinstance(e, ClientError):
        return DeployError(f"{desc} failed: {e}")
    return DeployError(f"{desc} failed: {e} (check credentials, region and network)")


def aws_call(desc: str, fn: Callable[..., Any], **params: Any) -> Any:
    """Run one boto3 call, turning its errors into a :class:`DeployError` that names the step."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    log.debug("%s %s", desc, params)
    try:
        return fn(**params)
    except (ClientError, BotoCoreError, Boto3Error) as e:
        raise as_deploy_error(desc, e) from e


def exists(desc: str, fn: Callable[..., Any], **params: Any) -> dict[str, Any] | None:
    """``describe_*``/``head_*`` that returns None for a missing resource instead of raising."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return fn(**params)
    except ClientError as e:
        if is_not_found(e):
            return None
        raise as_deploy_error(desc, e) from e
    except BotoCoreError as e:
        raise as_deploy_error(desc, e) from e


def quiet_botocore() -> None:
    """botocore's INFO lines (credentials found…) are noise unless the root logger is at DEBUG."""
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("botocore").setLevel(logging.WARNING)
