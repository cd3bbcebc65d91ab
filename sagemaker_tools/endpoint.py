"""Deploy the exported model to a SageMaker real-time endpoint with target-tracking autoscaling.

``python -m sagemaker_tools.endpoint deploy --model-dir DIR --image-uri URI --role ARN --max-rps R``

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

Requests are built by pure functions (:mod:`sagemaker_tools.plan`); :mod:`sagemaker_tools.deploy`
executes them with boto3. ``--dry-run`` prints every call as a JSON line and makes none. Validation
(role ARN, instance type, model directory, region, scaling bounds) happens before any client is created.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from components.common import ConfigError, format_table, setup_logging
from sagemaker_tools.aws import DeployError, make_clients, quiet_botocore, resolve_region
from sagemaker_tools.config import (
    DEFAULT_ENDPOINT,
    DEFAULT_INSTANCE_TYPE,
    DEFAULT_VARIANT,
    DeployConfig,
    make_deploy_config,
    parse_env,
    validate_endpoint_name,
)
from sagemaker_tools.deploy import deploy, status, teardown
from sagemaker_tools.package import package_model
from sagemaker_tools.plan import DeployPlan


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
    parser = argparse.ArgumentParser(
        prog="python -m sagemaker_tools.endpoint", description=__doc__.split("\n")[0]
    )
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
    quiet_botocore()
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
