"""What a deploy is asked to do, validated before any AWS client exists: role ARN, ECR image,
instance type, endpoint name, scaling bounds (the target derived from a measured capacity).
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from components.common import ConfigError
from components.modelspec import load_model_spec
from sagemaker_tools.aws import resolve_region

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "inventory-counter"
DEFAULT_VARIANT = "AllTraffic"
DEFAULT_INSTANCE_TYPE = "ml.m5.large"
#: Fraction of the measured per-instance capacity the target-tracking policy aims for (AWS's guidance:
#: load-test one instance, then target about half of its maximum so scale-out starts with headroom).
SAFETY_FACTOR = 0.5
SCALABLE_DIMENSION = "sagemaker:variant:DesiredInstanceCount"
SCALING_METRIC = "SageMakerVariantInvocationsPerInstance"
PROJECT_TAG = {"Key": "project", "Value": "inventory-monitor"}
ENDPOINT_TAG_KEY = "inventory-monitor:endpoint"
SMOKE_CONTENT_TYPE = "image/jpeg"
#: Longest endpoint name that still leaves room for the ``-<hash12>`` suffix of models and configs.
MAX_ENDPOINT_NAME = 63 - 13
ROLE_ARN_RE = re.compile(r"^arn:aws[a-z-]*:iam::(\d{12}):role/[\w+=,.@/-]{1,512}$")
ECR_IMAGE_RE = re.compile(
    r"^(\d{12})\.dkr\.ecr\.([a-z0-9-]+)\.amazonaws\.com(?:\.cn)?/[a-z0-9._/-]+(?::[\w.-]+|@sha256:[0-9a-f]{64})$"
)
NAME_RE = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9])*$")
ENV_KEY_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]{0,1023}$")


def _sizes(family: str, sizes: str) -> tuple[str, ...]:
    return tuple(f"ml.{family}.{s}" for s in sizes.split())


#: Real-time hosting instance types this tool accepts: a curated list (x86, since the serving image is
#: amd64 onnxruntime), so a typo fails here instead of at CreateEndpointConfig minutes later.
HOSTING_INSTANCE_TYPES: tuple[str, ...] = (
    *_sizes("t2", "medium large xlarge 2xlarge"),
    *_sizes("m5", "large xlarge 2xlarge 4xlarge 12xlarge 24xlarge"),
    *_sizes("m5d", "large xlarge 2xlarge 4xlarge 12xlarge 24xlarge"),
    *_sizes("m6i", "large xlarge 2xlarge 4xlarge 8xlarge 12xlarge 16xlarge 24xlarge 32xlarge"),
    *_sizes("m7i", "large xlarge 2xlarge 4xlarge 8xlarge 12xlarge 16xlarge 24xlarge 48xlarge"),
    *_sizes("c5", "large xlarge 2xlarge 4xlarge 9xlarge 18xlarge"),
    *_sizes("c5d", "large xlarge 2xlarge 4xlarge 9xlarge 18xlarge"),
    *_sizes("c6i", "large xlarge 2xlarge 4xlarge 8xlarge 12xlarge 16xlarge 24xlarge 32xlarge"),
    *_sizes("c7i", "large xlarge 2xlarge 4xlarge 8xlarge 12xlarge 16xlarge 24xlarge 48xlarge"),
    *_sizes("r5", "large xlarge 2xlarge 4xlarge 12xlarge 24xlarge"),
    *_sizes("g4dn", "xlarge 2xlarge 4xlarge 8xlarge 12xlarge 16xlarge"),
    *_sizes("g5", "xlarge 2xlarge 4xlarge 8xlarge 12xlarge 16xlarge 24xlarge 48xlarge"),
    *_sizes("p3", "2xlarge 8xlarge 16xlarge"),
)
GPU_FAMILIES: tuple[str, ...] = ("ml.g4dn.", "ml.g5.", "ml.p3.")


def validate_role(role: str | None) -> str:
    """The execution role SageMaker assumes to pull the image and read the model from S3."""
    if not role:
        raise ConfigError(
            "no execution role: pass --role arn:aws:iam::<account>:role/<name> or set SAGEMAKER_ROLE "
            "(a role SageMaker can assume, with read access to the model bucket and ECR)"
        )
    if not ROLE_ARN_RE.match(role):
        raise ConfigError(
            f"--role must be an IAM role ARN like arn:aws:iam::123456789012:role/SageMakerExecution, "
            f"got {role!r} (a role name or a user/policy ARN is not enough)"
        )
    return role


def role_account(role: str) -> str:
    """The 12-digit account id inside a role ARN (used for SageMaker's default bucket name)."""
    m = ROLE_ARN_RE.match(role)
    if not m:
        raise ConfigError(f"not an IAM role ARN: {role!r}")
    return m.group(1)


def validate_instance_type(instance_type: str) -> str:
    """Reject unknown hosting instance types with the closest valid spellings."""
    if instance_type in HOSTING_INSTANCE_TYPES:
        return instance_type
    close = difflib.get_close_matches(instance_type, HOSTING_INSTANCE_TYPES, n=4, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else f"e.g. {DEFAULT_INSTANCE_TYPE}, ml.c5.xlarge"
    raise ConfigError(f"unknown SageMaker hosting instance type {instance_type!r}: {hint}")


def validate_endpoint_name(name: str) -> str:
    """SageMaker names: letters, digits and single hyphens; short enough for the hash suffix."""
    if not NAME_RE.match(name) or len(name) > MAX_ENDPOINT_NAME:
        raise ConfigError(
            f"--endpoint-name {name!r} is invalid: use letters, digits and hyphens (no leading/trailing "
            f"hyphen), at most {MAX_ENDPOINT_NAME} characters"
        )
    return name


def validate_image_uri(image_uri: str | None, region: str) -> str:
    """SageMaker hosting pulls the serving image from Amazon ECR; anything else fails at CreateModel."""
    if not image_uri:
        raise ConfigError(
            "no image: pass --image-uri "
            "<account>.dkr.ecr.<region>.amazonaws.com/inventory-monitor/serving:<tag>"
        )
    m = ECR_IMAGE_RE.match(image_uri)
    if not m:
        raise ConfigError(
            f"--image-uri must be an Amazon ECR image like "
            f"123456789012.dkr.ecr.{region}.amazonaws.com/inventory-monitor/serving:<tag>, "
            f"got {image_uri!r}: "
            "push the serving image (make images) to ECR first"
        )
    if m.group(2) != region:
        log.warning("image %s is in %s but the endpoint is in %s", image_uri, m.group(2), region)
    return image_uri


def target_from_max_rps(max_rps: float, safety_factor: float = SAFETY_FACTOR) -> int:
    """Invocations per instance per minute the policy should hold, from a measured max requests/s."""
    if not math.isfinite(max_rps) or max_rps <= 0:
        raise ConfigError(f"--max-rps must be a positive number of requests/s, got {max_rps}")
    target = math.floor(max_rps * safety_factor * 60 + 1e-9)
    if target < 1:
        raise ConfigError(f"--max-rps {max_rps} gives a target below 1 invocation/minute per instance")
    return target


def parse_env(pairs: Sequence[str]) -> dict[str, str]:
    """``KEY=VALUE`` flags into the container's environment."""
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not ENV_KEY_RE.match(key):
            raise ConfigError(f"--env expects KEY=VALUE with KEY like MODEL_THREADS, got {pair!r}")
        if len(value) > 1024:
            raise ConfigError(f"--env {key}: SageMaker allows at most 1024 characters per value")
        env[key] = value
    return env


@dataclass(frozen=True)
class DeployConfig:
    """Everything one deploy needs, validated; build it with :func:`make_deploy_config`."""

    model_dir: Path
    image_uri: str
    role_arn: str
    region: str
    bucket: str
    endpoint_name: str = DEFAULT_ENDPOINT
    variant_name: str = DEFAULT_VARIANT
    instance_type: str = DEFAULT_INSTANCE_TYPE
    min_instances: int = 1
    max_instances: int = 3
    target_invocations: int | None = None
    scale_in_cooldown: int = 300
    scale_out_cooldown: int = 60
    environment: dict[str, str] = field(default_factory=dict)
    smoke_image: Path | None = None
    endpoint_url: str | None = None
    wait_delay: int = 30
    wait_attempts: int = 120


def make_deploy_config(
    *,
    model_dir: str | os.PathLike[str],
    image_uri: str | None,
    role_arn: str | None,
    region: str | None = None,
    bucket: str | None = None,
    endpoint_name: str = DEFAULT_ENDPOINT,
    variant_name: str = DEFAULT_VARIANT,
    instance_type: str = DEFAULT_INSTANCE_TYPE,
    min_instances: int = 1,
    max_instances: int = 3,
    target_invocations: int | None = None,
    max_rps: float | None = None,
    autoscaling: bool = True,
    scale_in_cooldown: int = 300,
    scale_out_cooldown: int = 60,
    environment: Mapping[str, str] | None = None,
    smoke_image: str | os.PathLike[str] | None = None,
    endpoint_url: str | None = None,
    wait_delay: int = 30,
    wait_attempts: int = 120,
    env: Mapping[str, str] | None = None,
) -> DeployConfig:
    """Validate every input (no AWS call) and fill defaults from the standard environment."""
    env = os.environ if env is None else env
    role_arn = validate_role(role_arn or env.get("SAGEMAKER_ROLE"))
    region = resolve_region(region, env)
    image_uri = validate_image_uri(image_uri, region)
    validate_instance_type(instance_type)
    validate_endpoint_name(endpoint_name)
    if not NAME_RE.match(variant_name):
        raise ConfigError(f"--variant-name {variant_name!r}: use letters, digits and hyphens")
    load_model_spec(model_dir)  # model.json parses and the ONNX file is there
    if min_instances < 1 or max_instances < 1:
        raise ConfigError(f"--min and --max must be >= 1, got {min_instances} and {max_instances}")
    if min_instances > max_instances:
        raise ConfigError(f"--min {min_instances} is greater than --max {max_instances}")
    if target_invocations is not None and max_rps is not None:
        raise ConfigError("pass either --target-invocations or --max-rps, not both")
    if max_rps is not None:
        target_invocations = target_from_max_rps(max_rps)
    if not autoscaling:
        target_invocations = None
    elif target_invocations is None:
        raise ConfigError(
            "no scaling target: pass --max-rps R with the requests/s one instance sustained in the load "
            "test (make bench-serve), or --target-invocations N (per instance per minute), "
            "or --no-autoscaling"
        )
    elif target_invocations < 1:
        raise ConfigError(f"--target-invocations must be >= 1, got {target_invocations}")
    if scale_in_cooldown < 0 or scale_out_cooldown < 0:
        raise ConfigError("cooldowns must be >= 0 seconds")
    if smoke_image is not None and not Path(smoke_image).is_file():
        raise ConfigError(f"--smoke-image {smoke_image} does not exist: pass a real JPEG of a bin")
    if wait_delay < 0 or wait_attempts < 1:
        raise ConfigError("--wait-delay must be >= 0 and --wait-attempts >= 1")
    bucket = bucket or env.get("SAGEMAKER_BUCKET") or f"sagemaker-{region}-{role_account(role_arn)}"
    if not re.match(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", bucket):
        raise ConfigError(f"--bucket {bucket!r} is not a valid S3 bucket name")
    if instance_type.startswith(GPU_FAMILIES):
        log.warning("%s is a GPU instance; the serving image runs onnxruntime on CPU", instance_type)
    return DeployConfig(
        model_dir=Path(model_dir),
        image_uri=image_uri,
        role_arn=role_arn,
        region=region,
        bucket=bucket,
        endpoint_name=endpoint_name,
        variant_name=variant_name,
        instance_type=instance_type,
        min_instances=min_instances,
        max_instances=max_instances,
        target_invocations=target_invocations,
        scale_in_cooldown=scale_in_cooldown,
        scale_out_cooldown=scale_out_cooldown,
        environment=dict(environment or {}),
        smoke_image=Path(smoke_image) if smoke_image is not None else None,
        endpoint_url=endpoint_url,
        wait_delay=wait_delay,
        wait_attempts=wait_attempts,
    )
