"""Deploy the exported model to a SageMaker real-time endpoint with target-tracking autoscaling.

``python -m serving.sagemaker deploy --model-dir DIR --image-uri URI --role ARN --max-rps R``

The path from a trained model to an autoscaled endpoint:

1. package ``model.json`` + the ONNX file(s) into a deterministic ``model.tar.gz`` (files at the archive
   root, because SageMaker extracts it into ``/opt/ml/model``, the serving image's default model dir);
2. upload it to ``s3://<bucket>/<model name>/<version>-<hash>/model.tar.gz`` (content-addressed, so a
   re-run uploads nothing);
3. create the Model and an EndpointConfig whose names carry a hash of their content, then create the
   Endpoint, or ``UpdateEndpoint`` it to the new config (SageMaker's blue/green update: no downtime);
4. smoke-invoke the endpoint with a real image; if that fails after an update, roll the endpoint back
   to the previous config (and re-register the autoscaling an instance-type change had removed);
5. register the variant with Application Auto Scaling and put a target-tracking policy on
   ``SageMakerVariantInvocationsPerInstance``. The target is derived from a *measured* capacity
   (``--max-rps`` from the load test x 0.5 safety factor x 60 s), not a guess;
6. delete the previous config and model.

Requests are built by pure functions (:class:`DeployPlan`); :func:`deploy` executes them with boto3.
``--dry-run`` prints every call as a JSON line and makes none. Validation (role ARN, instance type,
model directory, region, scaling bounds) happens before any client is created.
"""

from __future__ import annotations

import argparse
import difflib
import gzip
import hashlib
import json
import logging
import math
import os
import re
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from components.common import ConfigError, format_table, setup_logging
from components.modelspec import MODEL_JSON, ModelSpec, load_model_spec

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


class DeployError(RuntimeError):
    """An AWS call failed or the endpoint did not become healthy; the message says what to do."""


# --------------------------------------------------------------------------------------------------
# Validation (no AWS calls)
# --------------------------------------------------------------------------------------------------


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


def resolve_region(region: str | None, env: Mapping[str, str] | None = None) -> str:
    """--region, else AWS_REGION / AWS_DEFAULT_REGION; never a silent default region."""
    env = os.environ if env is None else env
    value = region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if not value:
        raise ConfigError("no AWS region: pass --region us-east-1 or set AWS_REGION")
    if not re.match(r"^[a-z]{2}(-[a-z]+)+-\d$", value):
        raise ConfigError(f"{value!r} is not an AWS region name like us-east-1")
    return value


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


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Packaging
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackagedModel:
    """A ``model.tar.gz`` on local disk and what identifies it."""

    path: Path
    sha256: str
    members: tuple[str, ...]
    spec: ModelSpec

    @property
    def version(self) -> str:
        """``model.json`` version plus a content hash: the same files always map to the same S3 key."""
        return f"{self.spec.version}-{self.sha256[:12]}"


def model_files(model_dir: Path, spec: ModelSpec) -> list[str]:
    """What the serving container needs at ``/opt/ml/model`` (no ``model.pt``: serving is torch-free)."""
    names = {MODEL_JSON, spec.onnx_file}
    if spec.onnx_int8_file and (model_dir / spec.onnx_int8_file).is_file():
        names.add(spec.onnx_int8_file)
    return sorted(names)


def package_model(model_dir: str | os.PathLike[str], out_path: str | os.PathLike[str]) -> PackagedModel:
    """Write a deterministic ``model.tar.gz`` (sorted, mtime 0, no owners) so equal models hash equal."""
    model_dir = Path(model_dir)
    spec = load_model_spec(model_dir)
    members = model_files(model_dir, spec)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with (
        open(out_path, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar,
    ):
        for name in members:
            src = model_dir / name
            info = tarfile.TarInfo(name)
            info.size = src.stat().st_size
            info.mode = 0o644
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with open(src, "rb") as fh:
                tar.addfile(info, fh)
    digest = hashlib.sha256()
    with open(out_path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return PackagedModel(path=out_path, sha256=digest.hexdigest(), members=tuple(members), spec=spec)


# --------------------------------------------------------------------------------------------------
# The plan: request dicts built by pure functions
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One AWS API call: what ``--dry-run`` prints and what the executor runs."""

    service: str
    operation: str
    params: dict[str, Any]
    when: str | None = None

    def to_json(self) -> str:
        """One JSON line (``when`` only for calls that depend on what already exists)."""
        d: dict[str, Any] = {"service": self.service, "operation": self.operation, "params": self.params}
        if self.when:
            d["when"] = self.when
        return json.dumps(d, sort_keys=False, default=str)


def _short_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def _tags(endpoint_name: str) -> list[dict[str, str]]:
    return [dict(PROJECT_TAG), {"Key": ENDPOINT_TAG_KEY, "Value": endpoint_name}]


@dataclass(frozen=True)
class DeployPlan:
    """Names and request bodies of one deploy; no AWS state is read to build it."""

    config: DeployConfig
    package: PackagedModel

    @property
    def s3_key(self) -> str:
        """Content-addressed key: one object per model version, never overwritten."""
        return f"{self.package.spec.name}/{self.package.version}/model.tar.gz"

    @property
    def model_data_url(self) -> str:
        """Where SageMaker downloads the archive from before extracting it into /opt/ml/model."""
        return f"s3://{self.config.bucket}/{self.s3_key}"

    @property
    def environment(self) -> dict[str, str]:
        """Container environment: model identity for logs/metrics, plus the user's --env values."""
        return {
            "MODEL_NAME": self.package.spec.name,
            "MODEL_VERSION": self.package.version,
            **self.config.environment,
        }

    @property
    def model_name(self) -> str:
        """Unique per (archive, image, role, env): a changed input makes a new Model."""
        c = self.config
        key = [self.package.sha256, c.image_uri, c.role_arn, self.environment]
        return f"{c.endpoint_name}-{_short_hash(key)}"

    @property
    def endpoint_config_name(self) -> str:
        """Unique per (model, instance type, variant); the instance count is not part of it."""
        c = self.config
        return f"{c.endpoint_name}-{_short_hash([self.model_name, c.instance_type, c.variant_name])}"

    @property
    def resource_id(self) -> str:
        """Application Auto Scaling's id for the variant."""
        return f"endpoint/{self.config.endpoint_name}/variant/{self.config.variant_name}"

    @property
    def policy_name(self) -> str:
        """One target-tracking policy per endpoint; put_scaling_policy replaces it in place."""
        return f"{self.config.endpoint_name}-invocations-per-instance"

    def create_bucket_request(self) -> dict[str, Any]:
        """us-east-1 is the one region that rejects an explicit LocationConstraint."""
        params: dict[str, Any] = {"Bucket": self.config.bucket}
        if self.config.region != "us-east-1":
            params["CreateBucketConfiguration"] = {"LocationConstraint": self.config.region}
        return params

    def upload_request(self) -> dict[str, Any]:
        """Arguments of ``s3.upload_file`` (multipart for large models)."""
        return {
            "Filename": str(self.package.path),
            "Bucket": self.config.bucket,
            "Key": self.s3_key,
            "ExtraArgs": {"Metadata": {"sha256": self.package.sha256, "model-version": self.package.version}},
        }

    def model_request(self) -> dict[str, Any]:
        """CreateModel: the custom serving image answers /ping and /invocations on 8080 itself."""
        return {
            "ModelName": self.model_name,
            "ExecutionRoleArn": self.config.role_arn,
            "PrimaryContainer": {
                "Image": self.config.image_uri,
                "ModelDataUrl": self.model_data_url,
                "Environment": self.environment,
            },
            "Tags": _tags(self.config.endpoint_name),
        }

    def endpoint_config_request(self, initial_instance_count: int | None = None) -> dict[str, Any]:
        """CreateEndpointConfig: one variant; on update it starts at the endpoint's current count."""
        count = initial_instance_count or self.config.min_instances
        return {
            "EndpointConfigName": self.endpoint_config_name,
            "ProductionVariants": [
                {
                    "VariantName": self.config.variant_name,
                    "ModelName": self.model_name,
                    "InstanceType": self.config.instance_type,
                    "InitialInstanceCount": count,
                    "InitialVariantWeight": 1.0,
                }
            ],
            "Tags": _tags(self.config.endpoint_name),
        }

    def create_endpoint_request(self) -> dict[str, Any]:
        """CreateEndpoint (first deploy)."""
        return {
            "EndpointName": self.config.endpoint_name,
            "EndpointConfigName": self.endpoint_config_name,
            "Tags": _tags(self.config.endpoint_name),
        }

    def update_endpoint_request(self) -> dict[str, Any]:
        """UpdateEndpoint: SageMaker brings up the new fleet before it shifts traffic (no downtime)."""
        return {"EndpointName": self.config.endpoint_name, "EndpointConfigName": self.endpoint_config_name}

    def waiter_config(self) -> dict[str, int]:
        """Waiter pacing; 30 s x 120 by default (endpoint creation takes 5-10 minutes)."""
        return {"Delay": self.config.wait_delay, "MaxAttempts": self.config.wait_attempts}

    def scalable_target_request(self) -> dict[str, Any]:
        """RegisterScalableTarget: min/max instances for the variant (an upsert)."""
        return {
            "ServiceNamespace": "sagemaker",
            "ResourceId": self.resource_id,
            "ScalableDimension": SCALABLE_DIMENSION,
            "MinCapacity": self.config.min_instances,
            "MaxCapacity": self.config.max_instances,
        }

    def scaling_policy_request(self) -> dict[str, Any]:
        """PutScalingPolicy: target tracking on invocations per instance per minute."""
        if self.config.target_invocations is None:
            raise ValueError("autoscaling is disabled for this plan")
        return {
            "PolicyName": self.policy_name,
            "ServiceNamespace": "sagemaker",
            "ResourceId": self.resource_id,
            "ScalableDimension": SCALABLE_DIMENSION,
            "PolicyType": "TargetTrackingScaling",
            "TargetTrackingScalingPolicyConfiguration": {
                "TargetValue": float(self.config.target_invocations),
                "PredefinedMetricSpecification": {"PredefinedMetricType": SCALING_METRIC},
                "ScaleInCooldown": self.config.scale_in_cooldown,
                "ScaleOutCooldown": self.config.scale_out_cooldown,
            },
        }

    def calls(self) -> list[Call]:
        """Every call a deploy may make, in order; ``when`` marks those that depend on existing state."""
        c = self.config
        ep = {"EndpointName": c.endpoint_name}
        calls = [
            Call("sagemaker", "describe_endpoint", ep),
            Call("sagemaker", "list_tags", {"ResourceArn": "<endpoint arn>"}, when="endpoint exists"),
            Call("s3", "head_bucket", {"Bucket": c.bucket}),
            Call("s3", "create_bucket", self.create_bucket_request(), when="bucket missing"),
            Call("s3", "head_object", {"Bucket": c.bucket, "Key": self.s3_key}),
            Call("s3", "upload_file", self.upload_request(), when="object missing"),
            Call("sagemaker", "describe_model", {"ModelName": self.model_name}),
            Call("sagemaker", "create_model", self.model_request(), when="model missing"),
            Call(
                "sagemaker",
                "create_endpoint_config",
                self.endpoint_config_request(),
                when="config missing; on update InitialInstanceCount = the variant's current desired count",
            ),
            Call("sagemaker", "create_endpoint", self.create_endpoint_request(), when="endpoint missing"),
            Call(
                "sagemaker",
                "update_endpoint",
                self.update_endpoint_request(),
                when="endpoint exists on another config",
            ),
            Call("sagemaker", "wait:endpoint_in_service", {**ep, "WaiterConfig": self.waiter_config()}),
        ]
        if c.smoke_image is not None:
            calls.append(
                Call(
                    "sagemaker-runtime",
                    "invoke_endpoint",
                    {
                        **ep,
                        "ContentType": SMOKE_CONTENT_TYPE,
                        "Accept": "application/json",
                        "Body": f"<{c.smoke_image}>",
                    },
                )
            )
        if c.target_invocations is not None:
            calls += [
                Call("application-autoscaling", "register_scalable_target", self.scalable_target_request()),
                Call("application-autoscaling", "put_scaling_policy", self.scaling_policy_request()),
            ]
        else:
            calls.append(
                Call(
                    "application-autoscaling",
                    "deregister_scalable_target",
                    _target_key(self.resource_id),
                    when="autoscaling disabled and a scalable target exists",
                )
            )
        calls += [
            Call(
                "sagemaker",
                "delete_endpoint_config",
                {"EndpointConfigName": "<previous config>"},
                when="endpoint was updated",
            ),
            Call(
                "sagemaker",
                "delete_model",
                {"ModelName": "<previous model>"},
                when="endpoint was updated and the previous model is no longer used",
            ),
        ]
        return calls


def _target_key(resource_id: str) -> dict[str, str]:
    return {
        "ServiceNamespace": "sagemaker",
        "ResourceId": resource_id,
        "ScalableDimension": SCALABLE_DIMENSION,
    }


# --------------------------------------------------------------------------------------------------
# The executor
# --------------------------------------------------------------------------------------------------


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


@dataclass
class DeployResult:
    """What a deploy did; printed as JSON by the CLI."""

    endpoint_name: str
    endpoint_arn: str
    action: str  # created | updated | unchanged
    model_name: str
    endpoint_config_name: str
    model_data_url: str
    target_invocations: int | None
    min_instances: int
    max_instances: int
    smoke: dict[str, Any] | None = None
    deleted: list[str] = field(default_factory=list)


def _error_code(e: Exception) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))


def _is_not_found(e: Exception) -> bool:
    """SageMaker reports a missing resource as ValidationException 'Could not find ...'."""
    code = _error_code(e)
    msg = str(e)
    return code in {"404", "NoSuchBucket", "NoSuchKey", "NotFound", "ResourceNotFound"} or (
        code == "ValidationException" and "Could not find" in msg
    )


def _as_deploy_error(desc: str, e: Exception) -> DeployError:
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
        raise _as_deploy_error(desc, e) from e


def _exists(desc: str, fn: Callable[..., Any], **params: Any) -> dict[str, Any] | None:
    """``describe_*``/``head_*`` that returns None for a missing resource instead of raising."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return fn(**params)
    except ClientError as e:
        if _is_not_found(e):
            return None
        raise _as_deploy_error(desc, e) from e
    except BotoCoreError as e:
        raise _as_deploy_error(desc, e) from e


def _wait(clients: Clients, waiter: str, endpoint_name: str, waiter_config: dict[str, int]) -> None:
    from botocore.exceptions import BotoCoreError, WaiterError

    try:
        clients.sagemaker.get_waiter(waiter).wait(EndpointName=endpoint_name, WaiterConfig=waiter_config)
    except BotoCoreError as e:
        if not isinstance(e, WaiterError):
            raise _as_deploy_error(f"waiting for {endpoint_name}", e) from e
        reason = ""
        desc = _exists("describe_endpoint", clients.sagemaker.describe_endpoint, EndpointName=endpoint_name)
        if desc:
            reason = f" (status {desc.get('EndpointStatus')}: {desc.get('FailureReason', 'no reason given')})"
        raise DeployError(
            f"endpoint {endpoint_name} did not reach the expected state{reason}; check the container logs "
            f"in CloudWatch (/aws/sagemaker/Endpoints/{endpoint_name})"
        ) from e


def _has_our_tags(clients: Clients, arn: str, endpoint_name: str) -> bool:
    tags = aws_call("list_tags", clients.sagemaker.list_tags, ResourceArn=arn).get("Tags", [])
    kv = {t["Key"]: t["Value"] for t in tags}
    return kv.get(PROJECT_TAG["Key"]) == PROJECT_TAG["Value"] and kv.get(ENDPOINT_TAG_KEY) == endpoint_name


def ensure_artifact(plan: DeployPlan, clients: Clients) -> None:
    """Create the bucket if needed and upload the archive unless that exact version is already there."""
    from botocore.exceptions import ClientError

    bucket = plan.config.bucket
    try:
        found = _exists("head_bucket", clients.s3.head_bucket, Bucket=bucket)
    except DeployError as e:
        if isinstance(e.__cause__, ClientError) and _error_code(e.__cause__) in {"403", "AccessDenied"}:
            raise DeployError(
                f"bucket {bucket} exists but these credentials cannot use it (403): pass --bucket with a "
                "bucket in this account"
            ) from e
        raise
    if found is None:
        log.info("creating bucket s3://%s", bucket)
        aws_call("create_bucket", clients.s3.create_bucket, **plan.create_bucket_request())
    if _exists("head_object", clients.s3.head_object, Bucket=bucket, Key=plan.s3_key) is not None:
        log.info("%s already uploaded", plan.model_data_url)
        return
    log.info("uploading %s (%d bytes)", plan.model_data_url, plan.package.path.stat().st_size)
    aws_call("upload_file", clients.s3.upload_file, **plan.upload_request())


def smoke_invoke(
    clients: Clients, endpoint_name: str, image: Path, classes: Sequence[int] | None = None
) -> dict[str, Any]:
    """POST a real image through SageMaker's runtime API; expect the server's V1 answer with a count."""
    body = image.read_bytes()
    resp = aws_call(
        "invoke_endpoint",
        clients.runtime.invoke_endpoint,
        EndpointName=endpoint_name,
        ContentType=SMOKE_CONTENT_TYPE,
        Accept="application/json",
        Body=body,
    )
    payload = resp["Body"].read()
    try:
        answer = json.loads(payload)
        count = answer["predictions"][0]["count"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError) as e:
        raise DeployError(
            f"smoke test: endpoint {endpoint_name} answered {resp.get('ContentType')!r} without "
            f'{{"predictions": [{{"count": ...}}]}}: {payload[:200]!r}'
        ) from e
    if classes is not None and count not in classes:
        raise DeployError(
            f"smoke test: predicted count {count!r} is not one of the model's classes {classes}"
        )
    log.info("smoke test on %s: count %s", image.name, count)
    return {"image": str(image), "count": count, "response": answer}


def _current_variant(
    clients: Clients, endpoint: dict[str, Any], variant: str
) -> tuple[int | None, str | None]:
    """(desired instance count, instance type) of the variant the endpoint runs now."""
    count = None
    for v in endpoint.get("ProductionVariants", []):
        if v.get("VariantName") == variant:
            count = v.get("DesiredInstanceCount") or v.get("CurrentInstanceCount")
    cfg = _exists(
        "describe_endpoint_config",
        clients.sagemaker.describe_endpoint_config,
        EndpointConfigName=endpoint["EndpointConfigName"],
    )
    itype = None
    for v in (cfg or {}).get("ProductionVariants", []):
        if v.get("VariantName") == variant:
            itype = v.get("InstanceType")
    return count, itype


def _models_of_config(clients: Clients, config_name: str) -> list[str]:
    cfg = _exists(
        "describe_endpoint_config", clients.sagemaker.describe_endpoint_config, EndpointConfigName=config_name
    )
    return [v["ModelName"] for v in (cfg or {}).get("ProductionVariants", [])]


def _delete_config_and_models(
    clients: Clients, config_name: str, endpoint_name: str, keep_models: set[str]
) -> list[str]:
    """Delete a config we created and its models that nothing kept uses; never touch foreign resources."""
    deleted: list[str] = []
    cfg = _exists(
        "describe_endpoint_config", clients.sagemaker.describe_endpoint_config, EndpointConfigName=config_name
    )
    if cfg is None:
        return deleted
    if not _has_our_tags(clients, cfg["EndpointConfigArn"], endpoint_name):
        log.warning("leaving endpoint config %s: it was not created by this tool", config_name)
        return deleted
    aws_call(
        "delete_endpoint_config", clients.sagemaker.delete_endpoint_config, EndpointConfigName=config_name
    )
    deleted.append(f"endpoint-config/{config_name}")
    for model in {v["ModelName"] for v in cfg.get("ProductionVariants", [])} - keep_models:
        desc = _exists("describe_model", clients.sagemaker.describe_model, ModelName=model)
        if desc and _has_our_tags(clients, desc["ModelArn"], endpoint_name):
            aws_call("delete_model", clients.sagemaker.delete_model, ModelName=model)
            deleted.append(f"model/{model}")
    return deleted


def _scalable_target(clients: Clients, resource_id: str) -> dict[str, Any] | None:
    """The variant's registered scalable target, or None."""
    targets = aws_call(
        "describe_scalable_targets",
        clients.autoscaling.describe_scalable_targets,
        ServiceNamespace="sagemaker",
        ResourceIds=[resource_id],
        ScalableDimension=SCALABLE_DIMENSION,
    ).get("ScalableTargets", [])
    return next((t for t in targets if t["ResourceId"] == resource_id), None)


def _scaling_policies(clients: Clients, resource_id: str) -> list[dict[str, Any]]:
    """The variant's scaling policies (the API may return others' too: they are filtered out)."""
    policies = aws_call(
        "describe_scaling_policies",
        clients.autoscaling.describe_scaling_policies,
        ServiceNamespace="sagemaker",
        ResourceId=resource_id,
        ScalableDimension=SCALABLE_DIMENSION,
    ).get("ScalingPolicies", [])
    return [p for p in policies if p["ResourceId"] == resource_id]


def _remove_autoscaling(clients: Clients, resource_id: str) -> list[str]:
    """Delete the variant's policies and deregister it (Application Auto Scaling keeps them otherwise)."""
    removed: list[str] = []
    key = _target_key(resource_id)
    for p in _scaling_policies(clients, resource_id):
        aws_call(
            "delete_scaling_policy",
            clients.autoscaling.delete_scaling_policy,
            PolicyName=p["PolicyName"],
            **key,
        )
        removed.append(f"scaling-policy/{p['PolicyName']}")
    if _scalable_target(clients, resource_id) is not None:
        aws_call("deregister_scalable_target", clients.autoscaling.deregister_scalable_target, **key)
        removed.append(f"scalable-target/{resource_id}")
    return removed


@dataclass(frozen=True)
class SavedAutoscaling:
    """A variant's scalable target and policies as described, to re-register them after a rollback."""

    target: dict[str, Any]
    policies: tuple[dict[str, Any], ...]


#: Fields of a described policy that PutScalingPolicy accepts back (besides the target key and name).
_POLICY_FIELDS = ("PolicyType", "TargetTrackingScalingPolicyConfiguration", "StepScalingPolicyConfiguration")


def _read_autoscaling(clients: Clients, resource_id: str) -> SavedAutoscaling | None:
    """The variant's scalable target and its policies, or None when it is not registered."""
    target = _scalable_target(clients, resource_id)
    if target is None:
        return None
    return SavedAutoscaling(target=target, policies=tuple(_scaling_policies(clients, resource_id)))


def _restore_autoscaling(clients: Clients, saved: SavedAutoscaling) -> list[str]:
    """Register the saved target (min/max, suspended state) and put its policies back, as they were."""
    t = saved.target
    key = _target_key(t["ResourceId"])
    target_params: dict[str, Any] = {**key, "MinCapacity": t["MinCapacity"], "MaxCapacity": t["MaxCapacity"]}
    if t.get("SuspendedState"):
        target_params["SuspendedState"] = t["SuspendedState"]
    aws_call("register_scalable_target", clients.autoscaling.register_scalable_target, **target_params)
    restored = [f"scalable-target/{t['ResourceId']}"]
    for p in saved.policies:
        params = {k: p[k] for k in _POLICY_FIELDS if k in p}
        aws_call(
            "put_scaling_policy",
            clients.autoscaling.put_scaling_policy,
            PolicyName=p["PolicyName"],
            **key,
            **params,
        )
        restored.append(f"scaling-policy/{p['PolicyName']}")
    return restored


def apply_autoscaling(plan: DeployPlan, clients: Clients) -> None:
    """Register min/max and (re)put the target-tracking policy; both calls are upserts."""
    if plan.config.target_invocations is None:
        removed = _remove_autoscaling(clients, plan.resource_id)
        if removed:
            log.info("autoscaling disabled: removed %s", ", ".join(removed))
        return
    aws_call(
        "register_scalable_target",
        clients.autoscaling.register_scalable_target,
        **plan.scalable_target_request(),
    )
    aws_call("put_scaling_policy", clients.autoscaling.put_scaling_policy, **plan.scaling_policy_request())
    log.info(
        "autoscaling %s: %d..%d instances, target %d invocations/instance/minute",
        plan.resource_id,
        plan.config.min_instances,
        plan.config.max_instances,
        plan.config.target_invocations,
    )


def _existing_endpoint(plan: DeployPlan, clients: Clients) -> dict[str, Any] | None:
    """The endpoint if it exists, is ours and is InService (waiting out an update in progress)."""
    c = plan.config
    sm = clients.sagemaker
    endpoint = _exists("describe_endpoint", sm.describe_endpoint, EndpointName=c.endpoint_name)
    if endpoint is None:
        return None
    if not _has_our_tags(clients, endpoint["EndpointArn"], c.endpoint_name):
        raise DeployError(
            f"endpoint {c.endpoint_name} exists but was not created by this tool (no "
            f"{PROJECT_TAG['Key']}={PROJECT_TAG['Value']} tag); choose another --endpoint-name"
        )
    if endpoint["EndpointStatus"] in {"Creating", "Updating", "SystemUpdating", "RollingBack"}:
        log.info("endpoint %s is %s; waiting for it first", c.endpoint_name, endpoint["EndpointStatus"])
        _wait(clients, "endpoint_in_service", c.endpoint_name, plan.waiter_config())
        endpoint = aws_call("describe_endpoint", sm.describe_endpoint, EndpointName=c.endpoint_name)
    if endpoint["EndpointStatus"] != "InService":
        raise DeployError(
            f"endpoint {c.endpoint_name} is {endpoint['EndpointStatus']} "
            f"({endpoint.get('FailureReason', 'no reason given')}): run "
            f"`python -m serving.sagemaker teardown --endpoint-name {c.endpoint_name}` and deploy again"
        )
    return endpoint


def _prepare_update(
    plan: DeployPlan, clients: Clients, endpoint: dict[str, Any]
) -> tuple[int | None, SavedAutoscaling | None]:
    """Initial count for the new config; unblocks an instance-type change.

    Returns the count and, when the variant's autoscaling had to be removed, what it was (a rollback
    registers it again).
    """
    c = plan.config
    count, itype = _current_variant(clients, endpoint, c.variant_name)
    saved = None
    if itype and itype != c.instance_type:
        # Application Auto Scaling rejects an update that changes the instance type of a scaled variant.
        saved = _read_autoscaling(clients, plan.resource_id)
        removed = _remove_autoscaling(clients, plan.resource_id)
        if removed:
            log.info("instance type %s -> %s: removed %s before the update", itype, c.instance_type, removed)
    # start the new fleet at today's size (within min..max): an update must not drop capacity under load
    initial = max(c.min_instances, min(c.max_instances, int(count))) if count else None
    return initial, saved


def _rollback(
    plan: DeployPlan,
    clients: Clients,
    old_config: str,
    error: DeployError,
    saved_autoscaling: SavedAutoscaling | None = None,
) -> DeployError:
    """Point the endpoint back at ``old_config``, restore the autoscaling an instance-type change removed,
    and delete the new config/model; returns the error."""
    c = plan.config
    log.error("smoke test failed; rolling %s back to %s", c.endpoint_name, old_config)
    aws_call(
        "update_endpoint",
        clients.sagemaker.update_endpoint,
        EndpointName=c.endpoint_name,
        EndpointConfigName=old_config,
    )
    _wait(clients, "endpoint_in_service", c.endpoint_name, plan.waiter_config())
    message = f"{error}; rolled {c.endpoint_name} back to {old_config}"
    if saved_autoscaling is not None:
        try:
            restored = _restore_autoscaling(clients, saved_autoscaling)
        except DeployError as e:
            log.error("could not restore the autoscaling of %s: %s", c.endpoint_name, e)
            message += (
                f" but could not restore its autoscaling ({e}): run `python -m serving.sagemaker status` "
                "and deploy the previous version again"
            )
        else:
            log.info("restored %s", ", ".join(restored))
    keep = set(_models_of_config(clients, old_config))
    _delete_config_and_models(clients, plan.endpoint_config_name, c.endpoint_name, keep)
    return DeployError(message)


def deploy(plan: DeployPlan, clients: Clients) -> DeployResult:
    """Upload, create or update the endpoint, smoke-test it, autoscale it, then delete the old version.

    The old config and model are deleted only after the new version answered the smoke test; if it
    does not, the endpoint goes back to the old config (exit 1) and the new one is deleted.
    """
    c = plan.config
    sm = clients.sagemaker
    endpoint = _existing_endpoint(plan, clients)
    ensure_artifact(plan, clients)
    if _exists("describe_model", sm.describe_model, ModelName=plan.model_name) is None:
        log.info("creating model %s (%s)", plan.model_name, c.image_uri)
        aws_call("create_model", sm.create_model, **plan.model_request())
    initial, saved_autoscaling = _prepare_update(plan, clients, endpoint) if endpoint else (None, None)
    config_name = plan.endpoint_config_name
    if (
        _exists("describe_endpoint_config", sm.describe_endpoint_config, EndpointConfigName=config_name)
        is None
    ):
        aws_call("create_endpoint_config", sm.create_endpoint_config, **plan.endpoint_config_request(initial))

    old_config = endpoint["EndpointConfigName"] if endpoint else None
    if endpoint is None:
        action = "created"
        log.info("creating endpoint %s on %s", c.endpoint_name, config_name)
        aws_call("create_endpoint", sm.create_endpoint, **plan.create_endpoint_request())
    elif old_config == config_name:
        action, old_config = "unchanged", None
        log.info("endpoint %s already runs %s", c.endpoint_name, config_name)
    else:
        action = "updated"
        log.info("updating endpoint %s: %s -> %s", c.endpoint_name, old_config, config_name)
        aws_call("update_endpoint", sm.update_endpoint, **plan.update_endpoint_request())
    _wait(clients, "endpoint_in_service", c.endpoint_name, plan.waiter_config())
    endpoint = aws_call("describe_endpoint", sm.describe_endpoint, EndpointName=c.endpoint_name)

    smoke = None
    if c.smoke_image is None:
        log.info("no --smoke-image: skipping the smoke invocation")
    else:
        try:
            smoke = smoke_invoke(clients, c.endpoint_name, c.smoke_image, plan.package.spec.classes)
        except DeployError as e:
            if old_config is None:
                raise DeployError(f"{e}; the endpoint is up but unhealthy: fix it and deploy again") from e
            raise _rollback(plan, clients, old_config, e, saved_autoscaling) from e

    apply_autoscaling(plan, clients)
    deleted: list[str] = []
    if old_config:
        deleted = _delete_config_and_models(clients, old_config, c.endpoint_name, {plan.model_name})
    return DeployResult(
        endpoint_name=c.endpoint_name,
        endpoint_arn=endpoint["EndpointArn"],
        action=action,
        model_name=plan.model_name,
        endpoint_config_name=config_name,
        model_data_url=plan.model_data_url,
        target_invocations=c.target_invocations,
        min_instances=c.min_instances,
        max_instances=c.max_instances,
        smoke=smoke,
        deleted=deleted,
    )


# --------------------------------------------------------------------------------------------------
# Teardown and status
# --------------------------------------------------------------------------------------------------


def _paginate(clients: Clients, operation: str, key: str, **params: Any) -> Iterator[dict[str, Any]]:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        for page in clients.sagemaker.get_paginator(operation).paginate(**params):
            yield from page.get(key, [])
    except (ClientError, BotoCoreError) as e:
        raise _as_deploy_error(operation, e) from e


def teardown(
    endpoint_name: str, clients: Clients, *, wait_delay: int = 15, wait_attempts: int = 80
) -> list[str]:
    """Delete policy, scalable target, endpoint, then every config and model this tool tagged for it.

    Idempotent: on a clean account it deletes nothing and returns an empty list. The S3 archives stay
    (they are the model versions; a bucket lifecycle rule is the place to expire them).
    """
    validate_endpoint_name(endpoint_name)
    sm = clients.sagemaker
    deleted: list[str] = []
    endpoint = _exists("describe_endpoint", sm.describe_endpoint, EndpointName=endpoint_name)
    if endpoint is not None and not _has_our_tags(clients, endpoint["EndpointArn"], endpoint_name):
        raise DeployError(f"endpoint {endpoint_name} was not created by this tool; refusing to delete it")

    prefix = f"endpoint/{endpoint_name}/variant/"
    targets = aws_call(
        "describe_scalable_targets",
        clients.autoscaling.describe_scalable_targets,
        ServiceNamespace="sagemaker",
    ).get("ScalableTargets", [])
    for rid in sorted({t["ResourceId"] for t in targets if t["ResourceId"].startswith(prefix)}):
        deleted += _remove_autoscaling(clients, rid)

    if endpoint is not None:
        aws_call("delete_endpoint", sm.delete_endpoint, EndpointName=endpoint_name)
        deleted.append(f"endpoint/{endpoint_name}")
        _wait(clients, "endpoint_deleted", endpoint_name, {"Delay": wait_delay, "MaxAttempts": wait_attempts})

    name_prefix = f"{endpoint_name}-"
    for cfg in list(_paginate(clients, "list_endpoint_configs", "EndpointConfigs", NameContains=name_prefix)):
        name = cfg["EndpointConfigName"]
        if name.startswith(name_prefix) and _has_our_tags(clients, cfg["EndpointConfigArn"], endpoint_name):
            aws_call("delete_endpoint_config", sm.delete_endpoint_config, EndpointConfigName=name)
            deleted.append(f"endpoint-config/{name}")
    for model in list(_paginate(clients, "list_models", "Models", NameContains=name_prefix)):
        name = model["ModelName"]
        if name.startswith(name_prefix) and _has_our_tags(clients, model["ModelArn"], endpoint_name):
            aws_call("delete_model", sm.delete_model, ModelName=name)
            deleted.append(f"model/{name}")
    return deleted


def status(endpoint_name: str, clients: Clients) -> dict[str, Any] | None:
    """The endpoint, its config, instance counts, scalable target and policy; None if it does not exist."""
    sm = clients.sagemaker
    endpoint = _exists("describe_endpoint", sm.describe_endpoint, EndpointName=endpoint_name)
    if endpoint is None:
        return None
    cfg = (
        _exists(
            "describe_endpoint_config",
            sm.describe_endpoint_config,
            EndpointConfigName=endpoint["EndpointConfigName"],
        )
        or {}
    )
    types = {v["VariantName"]: v.get("InstanceType") for v in cfg.get("ProductionVariants", [])}
    models = {v["VariantName"]: v.get("ModelName") for v in cfg.get("ProductionVariants", [])}
    variants = []
    for v in endpoint.get("ProductionVariants", []):
        name = v["VariantName"]
        rid = f"endpoint/{endpoint_name}/variant/{name}"
        target = _scalable_target(clients, rid)
        policy = next(iter(_scaling_policies(clients, rid)), None)
        tt = (policy or {}).get("TargetTrackingScalingPolicyConfiguration", {})
        variants.append(
            {
                "variant": name,
                "model": models.get(name),
                "instance_type": types.get(name),
                "current_instances": v.get("CurrentInstanceCount"),
                "desired_instances": v.get("DesiredInstanceCount"),
                "min": target["MinCapacity"] if target else None,
                "max": target["MaxCapacity"] if target else None,
                "policy": policy["PolicyName"] if policy else None,
                "target_invocations": tt.get("TargetValue"),
                "scale_in_cooldown": tt.get("ScaleInCooldown"),
                "scale_out_cooldown": tt.get("ScaleOutCooldown"),
            }
        )
    return {
        "endpoint": endpoint_name,
        "status": endpoint["EndpointStatus"],
        "endpoint_config": endpoint["EndpointConfigName"],
        "variants": variants,
    }


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint-name", default=DEFAULT_ENDPOINT, help="stable endpoint name")
    p.add_argument("--region", help="AWS region (default: AWS_REGION / AWS_DEFAULT_REGION)")
    p.add_argument(
        "--endpoint-url",
        help="one URL for every AWS API (a local test server); AWS_ENDPOINT_URL[_<SERVICE>] also work",
    )
    p.add_argument("--log-level", default="INFO")


def build_parser() -> argparse.ArgumentParser:
    """The ``deploy | plan | teardown | status`` CLI."""
    parser = argparse.ArgumentParser(prog="python -m serving.sagemaker", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("deploy", "plan"):
        p = sub.add_parser(
            name, help="deploy the model" if name == "deploy" else "print the calls of a deploy"
        )
        _add_common(p)
        p.add_argument("--model-dir", required=True, help="exported model dir (model.json + model.onnx)")
        p.add_argument("--image-uri", help="serving image in ECR")
        p.add_argument("--role", help="SageMaker execution role ARN (default: SAGEMAKER_ROLE)")
        p.add_argument(
            "--bucket", help="model bucket (default: SAGEMAKER_BUCKET, else sagemaker-<region>-<account>)"
        )
        p.add_argument("--instance-type", default=DEFAULT_INSTANCE_TYPE)
        p.add_argument("--variant-name", default=DEFAULT_VARIANT)
        p.add_argument("--min", dest="min_instances", type=int, default=1)
        p.add_argument("--max", dest="max_instances", type=int, default=3)
        g = p.add_mutually_exclusive_group()
        g.add_argument("--target-invocations", type=int, help="invocations/instance/minute to hold")
        g.add_argument("--max-rps", type=float, help="requests/s one instance sustained in the load test")
        g.add_argument("--no-autoscaling", action="store_true", help="fixed size: --min instances, no policy")
        p.add_argument("--scale-in-cooldown", type=int, default=300)
        p.add_argument("--scale-out-cooldown", type=int, default=60)
        p.add_argument(
            "--env", action="append", default=[], metavar="KEY=VALUE", help="container environment"
        )
        p.add_argument("--smoke-image", help="a real bin JPEG to invoke the endpoint with after the deploy")
        p.add_argument("--wait-delay", type=int, default=30, help="seconds between status polls")
        p.add_argument("--wait-attempts", type=int, default=120)
        if name == "deploy":
            p.add_argument("--dry-run", action="store_true", help="print every call as JSON lines; make none")
    for name, text in (("teardown", "delete everything deploy created"), ("status", "show the endpoint")):
        p = sub.add_parser(name, help=text)
        _add_common(p)
        if name == "teardown":
            p.add_argument("--wait-delay", type=int, default=15)
            p.add_argument("--wait-attempts", type=int, default=80)
        else:
            p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _config_from_args(args: argparse.Namespace) -> DeployConfig:
    return make_deploy_config(
        model_dir=args.model_dir,
        image_uri=args.image_uri,
        role_arn=args.role,
        region=args.region,
        bucket=args.bucket,
        endpoint_name=args.endpoint_name,
        variant_name=args.variant_name,
        instance_type=args.instance_type,
        min_instances=args.min_instances,
        max_instances=args.max_instances,
        target_invocations=args.target_invocations,
        max_rps=args.max_rps,
        autoscaling=not args.no_autoscaling,
        scale_in_cooldown=args.scale_in_cooldown,
        scale_out_cooldown=args.scale_out_cooldown,
        environment=parse_env(args.env),
        smoke_image=args.smoke_image,
        endpoint_url=args.endpoint_url,
        wait_delay=args.wait_delay,
        wait_attempts=args.wait_attempts,
    )


def _run(args: argparse.Namespace) -> int:
    if args.command in ("deploy", "plan"):
        cfg = _config_from_args(args)
        with tempfile.TemporaryDirectory(prefix="sagemaker-model-") as tmp:
            package = package_model(cfg.model_dir, Path(tmp) / "model.tar.gz")
            plan = DeployPlan(cfg, package)
            if args.command == "plan" or args.dry_run:
                for call in plan.calls():
                    print(call.to_json())
                return 0
            result = deploy(plan, make_clients(cfg.region, cfg.endpoint_url))
        print(json.dumps(asdict(result), indent=2, default=str))
        return 0
    region = resolve_region(args.region)
    endpoint_name = validate_endpoint_name(args.endpoint_name)
    clients = make_clients(region, args.endpoint_url)
    if args.command == "teardown":
        deleted = teardown(
            endpoint_name, clients, wait_delay=args.wait_delay, wait_attempts=args.wait_attempts
        )
        if deleted:
            print("\n".join(f"deleted {d}" for d in deleted))
        else:
            print(f"nothing to delete for endpoint {endpoint_name}")
        return 0
    info = status(endpoint_name, clients)
    if info is None:
        print(f"endpoint {endpoint_name} does not exist in {region}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print(f"endpoint {info['endpoint']}: {info['status']} (config {info['endpoint_config']})")
        cols = [
            "variant",
            "instance_type",
            "current_instances",
            "desired_instances",
            "min",
            "max",
            "target_invocations",
        ]
        print(format_table([[v[k] for k in cols] for v in info["variants"]], cols))
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: ConfigError -> exit 2 before any AWS call; AWS failures -> exit 1."""
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    if logging.getLogger().level > logging.DEBUG:  # botocore's INFO lines (credentials found…) are noise
        logging.getLogger("botocore").setLevel(logging.WARNING)
    try:
        return _run(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DeployError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
