"""Compile, upload and start a run on a Kubeflow Pipelines cluster: ``make submit KFP_HOST=http://…``.

``python -m pipeline.submit --host URL --profile full [--experiment E] [--run-name R] [--upload]``

The pipeline is compiled exactly as ``make compile`` does; the profile's values are the run's
arguments (override any with ``--param NAME=VALUE``). By default the package is attached to the run
(``create_run_from_pipeline_package``); ``--upload`` also registers it in the UI's pipeline list (a new
version of ``--pipeline-name`` when that pipeline exists) and starts the run from that version.

The cluster needs the components image pushed (``make images``), the ``optuna-db`` Secret (key ``url``,
a PostgreSQL URL reachable from the pods; ``kubectl apply -k k8s/overlays/kubeflow`` runs a database
and generates it) and, for a private bucket or an s3:// model store, the
optional ``aws-credentials`` Secret (keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from components.common import ConfigError, setup_logging
from pipeline.compile import add_build_flags, compile_pipeline, options_from_args, parse_param_overrides
from pipeline.pipeline import PIPELINE_NAME
from pipeline.profiles import pipeline_parameters

TOKEN_ENV = "KFP_TOKEN"
#: Set to 1 by ``make submit``: errors then name the make variables (SUBMIT_ARGS=...), not the flags.
VIA_MAKE_ENV = "SUBMIT_VIA_MAKE"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,99}$")


@dataclass(frozen=True)
class Submission:
    """Everything a run needs, validated before any network call."""

    host: str
    experiment: str
    run_name: str
    params: dict[str, Any]
    namespace: str | None = None
    upload: bool = False
    pipeline_name: str = PIPELINE_NAME
    service_account: str | None = None


def validate_submission(
    host: str,
    profile: str,
    params: Mapping[str, Any],
    *,
    experiment: str,
    run_name: str | None = None,
    namespace: str | None = None,
    upload: bool = False,
    pipeline_name: str = PIPELINE_NAME,
    service_account: str | None = None,
    via_make: bool = False,
) -> Submission:
    """Check what a cluster run needs and that a local-only setting did not slip in.

    ``via_make``: the hints name ``make submit``'s variables instead of this CLI's flags.
    """
    if not re.match(r"^https?://[^\s/]+", host or ""):
        raise ConfigError(f"--host {host!r} must be the KFP API URL, e.g. http://localhost:8080")
    for flag, value in (("--experiment", experiment), ("--pipeline-name", pipeline_name)):
        if not _NAME_RE.match(value or ""):
            raise ConfigError(f"{flag} {value!r}: use letters, digits, space, '.', '_' or '-' (at most 100)")
    run_name = run_name or f"{profile}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"
    if not _NAME_RE.match(run_name):
        raise ConfigError(f"--run-name {run_name!r}: use letters, digits, space, '.', '_' or '-'")
    store = str(params.get("model_store", ""))
    if not store.startswith("s3://"):
        if via_make:
            how = (
                f"set the model store: make submit KFP_HOST={host} PROFILE={profile} "
                'SUBMIT_ARGS="--param model_store=s3://bucket/prefix"'
            )
        else:
            how = "pass --param model_store=s3://bucket/prefix"
        what = (
            f"no model_store (profile {profile} has none): a cluster run publishes the model to S3"
            if not store
            else f"model_store {store!r} is not reachable from the cluster's pods"
        )
        raise ConfigError(f"{what}: {how}")
    source = str(params.get("source", ""))
    if not source.startswith("s3://"):
        raise ConfigError(f"source {source!r} is a local path: a cluster run reads s3://bucket[/prefix]")
    storage = str(params.get("optuna_storage", ""))
    if storage.startswith("sqlite"):
        raise ConfigError(
            "optuna_storage is a SQLite file: tuning workers run in separate pods; leave it empty to use "
            "the optuna-db Secret, or pass a postgresql:// URL"
        )
    return Submission(
        host=host.rstrip("/"),
        experiment=experiment,
        run_name=run_name,
        params=dict(params),
        namespace=namespace,
        upload=upload,
        pipeline_name=pipeline_name,
        service_account=service_account,
    )


def submit(sub: Submission, package: Path, token: str | None = None) -> str:
    """Start the run on the cluster; returns the run id. Needs a reachable KFP API (not tested offline)."""
    import kfp

    client = kfp.Client(host=sub.host, namespace=sub.namespace or "kubeflow", existing_token=token)
    if not sub.upload:
        result = client.create_run_from_pipeline_package(
            str(package),
            arguments=sub.params,
            run_name=sub.run_name,
            experiment_name=sub.experiment,
            namespace=sub.namespace,
            service_account=sub.service_account,
        )
        return str(result.run_id)
    pipeline_id = client.get_pipeline_id(sub.pipeline_name)
    if pipeline_id is None:
        pipeline = client.upload_pipeline(
            str(package), pipeline_name=sub.pipeline_name, namespace=sub.namespace
        )
        pipeline_id = pipeline.pipeline_id
        versions = client.list_pipeline_versions(pipeline_id, page_size=1, sort_by="created_at desc")
        version_id = versions.pipeline_versions[0].pipeline_version_id
    else:
        version = client.upload_pipeline_version(
            str(package), pipeline_version_name=sub.run_name, pipeline_id=pipeline_id
        )
        version_id = version.pipeline_version_id
    experiment = client.create_experiment(sub.experiment, namespace=sub.namespace)
    run = client.run_pipeline(
        experiment_id=experiment.experiment_id,
        job_name=sub.run_name,
        params=sub.params,
        pipeline_id=pipeline_id,
        version_id=version_id,
        service_account=sub.service_account,
    )
    return str(run.run_id)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.submit", description=__doc__.split("\n")[0])
    p.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080")
    add_build_flags(p)
    p.add_argument("--experiment", default="inventory-monitor", help="experiment to file the run under")
    p.add_argument("--run-name", default=None, help="run name (default: PROFILE-UTC timestamp)")
    p.add_argument("--namespace", default=None, help="Kubeflow profile namespace (multi-user installs)")
    p.add_argument("--service-account", default=None, help="service account the run's pods use")
    p.add_argument(
        "--upload", action="store_true", help="also register the pipeline (new version if present)"
    )
    p.add_argument("--pipeline-name", default=PIPELINE_NAME, help="name in the UI's pipeline list (--upload)")
    p.add_argument("--package", type=Path, default=None, help="also keep the compiled YAML here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging("WARNING")
    try:
        params = pipeline_parameters(args.profile, parse_param_overrides(args.param, args.profile))
        sub = validate_submission(
            args.host,
            args.profile,
            params,
            experiment=args.experiment,
            run_name=args.run_name,
            namespace=args.namespace,
            upload=args.upload,
            pipeline_name=args.pipeline_name,
            service_account=args.service_account,
            via_make=os.environ.get(VIA_MAKE_ENV) == "1",
        )
        opts = options_from_args(args)
        with tempfile.TemporaryDirectory() as tmp:
            package = compile_pipeline(args.package or Path(tmp) / "inventory_pipeline.yaml", params, opts)
            run_id = submit(sub, package, token=os.environ.get(TOKEN_ENV))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # the API's errors (connection refused, 401, 404) end the command cleanly
        print(f"error: submitting to {args.host} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"started run {sub.run_name!r} ({run_id}) in experiment {sub.experiment!r} at {sub.host}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
