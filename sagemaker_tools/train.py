"""Run ``components.train`` as a SageMaker training job, so both backends train with identical code.

``python -m sagemaker_tools.train --image-uri URI --role ARN --data s3://…/ingest/ --split s3://…/split/
--output s3://…/training/ --hp epochs=20 --hp lr=0.1``

The components image is the training image and ``python -m components.train`` its entry point
(``ContainerEntrypoint``/``ContainerArguments``), with hyperparameters mapped to the same CLI flags the
Kubeflow pipeline passes. Two input channels, mounted read-only by SageMaker:

* ``data``  -> ``/opt/ml/input/data/data``: the ingest output (``images/<id>.jpg``), used as ``--data-root``;
* ``split`` -> ``/opt/ml/input/data/split``: ``train.csv`` and ``val.csv`` from the split step (their
  paths are relative to the data root, so nothing needs rewriting).

The exported model directory is written to ``/opt/ml/model``; SageMaker uploads it as
``<output>/<job>/output/model.tar.gz`` when the job ends.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from components.common import ConfigError, setup_logging
from sagemaker_tools.aws import Clients, DeployError, aws_call, make_clients, quiet_botocore, resolve_region
from sagemaker_tools.config import NAME_RE, PROJECT_TAG, validate_image_uri, validate_role

log = logging.getLogger(__name__)

CHANNEL_ROOT = "/opt/ml/input/data"
MODEL_OUT = "/opt/ml/model"
ENTRYPOINT = ("python", "-m", "components.train")
DEFAULT_TRAINING_INSTANCE = "ml.g4dn.xlarge"
TRAINING_INSTANCE_TYPES: tuple[str, ...] = (
    *(f"ml.m5.{s}" for s in ("large", "xlarge", "2xlarge", "4xlarge", "12xlarge", "24xlarge")),
    *(f"ml.c5.{s}" for s in ("xlarge", "2xlarge", "4xlarge", "9xlarge", "18xlarge")),
    *(f"ml.g4dn.{s}" for s in ("xlarge", "2xlarge", "4xlarge", "8xlarge", "12xlarge", "16xlarge")),
    *(f"ml.g5.{s}" for s in ("xlarge", "2xlarge", "4xlarge", "8xlarge", "12xlarge", "16xlarge", "24xlarge")),
    *(f"ml.p3.{s}" for s in ("2xlarge", "8xlarge", "16xlarge")),
)
S3_URI_RE = re.compile(r"^s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(/.*)?$")


def hyperparameter_types() -> dict[str, type]:
    """Flag name (without ``--``) -> type of every setting a training job may set."""
    from components.settings import hyperparameters
    from components.training.config import TrainConfig

    return hyperparameters(TrainConfig)


def parse_hyperparameters(pairs: Sequence[str]) -> dict[str, str]:
    """``--hp epochs=20`` into train flags; unknown names fail with the closest real ones.

    The names and types are the :class:`~components.training.config.TrainConfig` settings marked as
    hyperparameters, spelled as ``components.train``'s flags, so the job cannot pass a flag it lacks.
    """
    known = hyperparameter_types()
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("_", "-")
        if not sep or not value:
            raise ConfigError(f"--hp expects NAME=VALUE like epochs=20, got {pair!r}")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(known)}"
            raise ConfigError(f"unknown hyperparameter {key!r}: {hint}")
        try:
            known[key](value)
        except ValueError as e:
            raise ConfigError(f"--hp {key}={value}: expected {known[key].__name__}") from e
        out[key] = value
    return out


def validate_s3_uri(uri: str | None, flag: str) -> str:
    """An ``s3://bucket/prefix`` URI, normalised to end with ``/`` (a channel is a prefix)."""
    if not uri or not S3_URI_RE.match(uri):
        raise ConfigError(f"{flag} must be an S3 prefix like s3://my-bucket/inventory/ingest/, got {uri!r}")
    return uri if uri.endswith("/") else uri + "/"


@dataclass(frozen=True)
class TrainingJobConfig:
    """One training job, validated by :func:`make_training_config`."""

    job_name: str
    image_uri: str
    role_arn: str
    region: str
    data_uri: str
    split_uri: str
    output_uri: str
    instance_type: str = DEFAULT_TRAINING_INSTANCE
    volume_gb: int = 50
    max_runtime_s: int = 24 * 3600
    hyperparameters: dict[str, str] = field(default_factory=dict)

    def container_arguments(self) -> list[str]:
        """The same flags ``python -m components.train`` gets in the pipeline, with SageMaker's paths."""
        args = [
            "--train",
            f"{CHANNEL_ROOT}/split/train.csv",
            "--val",
            f"{CHANNEL_ROOT}/split/val.csv",
            "--data-root",
            f"{CHANNEL_ROOT}/data",
            "--out",
            MODEL_OUT,
            "--no-progress",
        ]
        for key, value in sorted(self.hyperparameters.items()):
            args += [f"--{key}", value]
        return args

    def request(self) -> dict[str, Any]:
        """CreateTrainingJob parameters."""

        def channel(name: str, uri: str) -> dict[str, Any]:
            return {
                "ChannelName": name,
                "DataSource": {
                    "S3DataSource": {
                        "S3DataType": "S3Prefix",
                        "S3Uri": uri,
                        "S3DataDistributionType": "FullyReplicated",
                    }
                },
                "InputMode": "File",
            }

        return {
            "TrainingJobName": self.job_name,
            "RoleArn": self.role_arn,
            "AlgorithmSpecification": {
                "TrainingImage": self.image_uri,
                "TrainingInputMode": "File",
                "ContainerEntrypoint": list(ENTRYPOINT),
                "ContainerArguments": self.container_arguments(),
            },
            # recorded for the console and lineage; the container reads its flags, not this file
            "HyperParameters": dict(sorted(self.hyperparameters.items())),
            "InputDataConfig": [channel("data", self.data_uri), channel("split", self.split_uri)],
            "OutputDataConfig": {"S3OutputPath": self.output_uri},
            "ResourceConfig": {
                "InstanceType": self.instance_type,
                "InstanceCount": 1,
                "VolumeSizeInGB": self.volume_gb,
            },
            "StoppingCondition": {"MaxRuntimeInSeconds": self.max_runtime_s},
            "Tags": [dict(PROJECT_TAG)],
        }


def make_training_config(
    *,
    image_uri: str | None,
    role_arn: str | None,
    data_uri: str | None,
    split_uri: str | None,
    output_uri: str | None,
    region: str | None = None,
    job_name: str | None = None,
    instance_type: str = DEFAULT_TRAINING_INSTANCE,
    volume_gb: int = 50,
    max_runtime_s: int = 24 * 3600,
    hyperparameters: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
) -> TrainingJobConfig:
    """Validate everything before any AWS call."""
    env = os.environ if env is None else env
    role_arn = validate_role(role_arn or env.get("SAGEMAKER_ROLE"))
    region = resolve_region(region, env)
    image_uri = validate_image_uri(image_uri, region)
    if instance_type not in TRAINING_INSTANCE_TYPES:
        close = difflib.get_close_matches(instance_type, TRAINING_INSTANCE_TYPES, n=4, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else f"e.g. {DEFAULT_TRAINING_INSTANCE}"
        raise ConfigError(f"unknown SageMaker training instance type {instance_type!r}: {hint}")
    job_name = job_name or f"inventory-counter-train-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    if not NAME_RE.match(job_name) or len(job_name) > 63:
        raise ConfigError(f"--job-name {job_name!r}: letters, digits and hyphens, at most 63 characters")
    if not 1 <= volume_gb <= 16384:
        raise ConfigError(f"--volume-gb must be in [1, 16384], got {volume_gb}")
    if not 60 <= max_runtime_s <= 28 * 24 * 3600:
        raise ConfigError(f"--max-runtime must be between 60 s and 28 days, got {max_runtime_s}")
    return TrainingJobConfig(
        job_name=job_name,
        image_uri=image_uri,
        role_arn=role_arn,
        region=region,
        data_uri=validate_s3_uri(data_uri, "--data"),
        split_uri=validate_s3_uri(split_uri, "--split"),
        output_uri=validate_s3_uri(output_uri, "--output"),
        instance_type=instance_type,
        volume_gb=volume_gb,
        max_runtime_s=max_runtime_s,
        hyperparameters=dict(hyperparameters or {}),
    )


def launch(
    cfg: TrainingJobConfig, clients: Clients, *, wait: bool = False, delay: int = 60, attempts: int = 1440
) -> dict[str, Any]:
    """Create the job; with ``wait`` block until it ends and return where the model archive is."""
    from botocore.exceptions import WaiterError

    sm = clients.sagemaker
    aws_call("create_training_job", sm.create_training_job, **cfg.request())
    log.info("training job %s started on %s", cfg.job_name, cfg.instance_type)
    if wait:
        try:
            sm.get_waiter("training_job_completed_or_stopped").wait(
                TrainingJobName=cfg.job_name, WaiterConfig={"Delay": delay, "MaxAttempts": attempts}
            )
        except WaiterError as e:
            raise DeployError(
                f"training job {cfg.job_name} failed: see CloudWatch /aws/sagemaker/TrainingJobs"
            ) from e
    desc = aws_call("describe_training_job", sm.describe_training_job, TrainingJobName=cfg.job_name)
    return {
        "job_name": cfg.job_name,
        "status": desc.get("TrainingJobStatus"),
        "model_artifacts": desc.get("ModelArtifacts", {}).get("S3ModelArtifacts"),
    }


def build_parser() -> argparse.ArgumentParser:
    """The training-job CLI."""
    p = argparse.ArgumentParser(prog="python -m sagemaker_tools.train", description=__doc__.split("\n")[0])
    p.add_argument("--image-uri", help="components image in ECR (has `python -m components.train`)")
    p.add_argument("--role", help="SageMaker execution role ARN (default: SAGEMAKER_ROLE)")
    p.add_argument("--data", help="S3 prefix of the ingest output (images/)")
    p.add_argument("--split", help="S3 prefix of the split output (train.csv, val.csv)")
    p.add_argument("--output", help="S3 prefix for the model archive")
    p.add_argument("--region")
    p.add_argument("--job-name")
    p.add_argument("--instance-type", default=DEFAULT_TRAINING_INSTANCE)
    p.add_argument("--volume-gb", type=int, default=50)
    p.add_argument("--max-runtime", type=int, default=24 * 3600, help="seconds")
    p.add_argument("--hp", action="append", default=[], metavar="NAME=VALUE", help="components.train flag")
    p.add_argument("--wait", action="store_true", help="block until the job ends")
    p.add_argument("--wait-delay", type=int, default=60)
    p.add_argument("--endpoint-url", help="one URL for every AWS API (a local test server)")
    p.add_argument("--dry-run", action="store_true", help="print the CreateTrainingJob request; make no call")
    p.add_argument("--log-level", default="INFO")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: ConfigError -> exit 2 before any AWS call; AWS failures -> exit 1."""
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    quiet_botocore()
    try:
        cfg = make_training_config(
            image_uri=args.image_uri,
            role_arn=args.role,
            data_uri=args.data,
            split_uri=args.split,
            output_uri=args.output,
            region=args.region,
            job_name=args.job_name,
            instance_type=args.instance_type,
            volume_gb=args.volume_gb,
            max_runtime_s=args.max_runtime,
            hyperparameters=parse_hyperparameters(args.hp),
        )
        if args.dry_run:
            print(
                json.dumps(
                    {"service": "sagemaker", "operation": "create_training_job", "params": cfg.request()}
                )
            )
            return 0
        result = launch(
            cfg, make_clients(cfg.region, args.endpoint_url), wait=args.wait, delay=args.wait_delay
        )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DeployError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
