"""Write the pipeline YAML for the KFP UI: ``python -m pipeline.compile --profile full --out FILE``.

The profile's values become the parameter defaults shown in the UI's "Create run" form; the image,
GPU requests and the Secrets are compile-time settings (flags below).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from components import __version__
from components.common import ConfigError, atomic_write_text, run_cli
from pipeline.profiles import BUILD_OPTIONS, pipeline_parameters, profile_names

IMAGE_ENV = "COMPONENTS_IMAGE"


def build_options(profile: str, **overrides: Any) -> Any:
    """The profile's :class:`~pipeline.pipeline.BuildOptions` with non-None ``overrides`` applied."""
    from pipeline.pipeline import BuildOptions

    if profile not in BUILD_OPTIONS:
        raise ConfigError(f"unknown profile {profile!r}: choose one of {profile_names()}")
    values = dict(BUILD_OPTIONS[profile])
    values.update({k: v for k, v in overrides.items() if v is not None})
    if values.get("tune_parallelism", 1) < 1:
        raise ConfigError(f"--tune-parallelism must be >= 1, got {values['tune_parallelism']}")
    if not values.get("image", "x"):
        raise ConfigError(
            "--image is empty: pass the components image, e.g. registry/inventory-monitor/components:TAG"
        )
    return BuildOptions(**values)


def compile_pipeline(out: str | os.PathLike[str], params: Mapping[str, Any], opts: Any) -> Path:
    """Compile to ``out`` (YAML) atomically, with ``params`` as the parameter defaults."""
    import tempfile

    from kfp import compiler

    from pipeline.pipeline import build_pipeline

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / out.name
        compiler.Compiler().compile(
            pipeline_func=build_pipeline(opts), package_path=str(staged), pipeline_parameters=dict(params)
        )
        atomic_write_text(out, staged.read_text(encoding="utf-8"))
    return out


def parse_bool(raw: str) -> bool:
    """``true/false``, ``1/0``, ``yes/no`` (any case) -> bool; anything else is a ValueError."""
    value = raw.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise ValueError(raw)


def add_build_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared with ``pipeline.submit``."""
    p.add_argument("--profile", default="quick", choices=profile_names(), help="parameter preset")
    p.add_argument(
        "--image",
        default=None,
        help=f"components image (default: ${IMAGE_ENV} or inventory-monitor/components:{__version__})",
    )
    gpu = p.add_mutually_exclusive_group()
    gpu.add_argument(
        "--gpu", dest="gpu", action="store_true", default=None, help="request a GPU for tune/train"
    )
    gpu.add_argument("--no-gpu", dest="gpu", action="store_false", help="no GPU request (CPU cluster)")
    p.add_argument("--tune-parallelism", type=int, default=None, help="tuning workers running at once")
    p.add_argument(
        "--trainjob",
        action="store_true",
        default=None,
        help="run the final fit as a Kubeflow Trainer TrainJob (trainjob_* parameters: nodes, GPUs per "
        "node; needs k8s/overlays/kubeflow-trainer: the runtime, the shared volume, the RBAC)",
    )
    p.add_argument("--optuna-secret", default=None, help="Secret with the Optuna DB URL (default optuna-db)")
    p.add_argument(
        "--s3-secret", default=None, help="optional Secret with AWS keys (default aws-credentials)"
    )
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a pipeline parameter default (repeatable), e.g. --param tune_trials=12",
    )


def parse_param_overrides(items: list[str], profile: str) -> dict[str, Any]:
    """``NAME=VALUE`` strings typed like the profile's value (int, float or str)."""
    from pipeline.profiles import PROFILES, unknown_parameter

    base = PROFILES[profile]
    out: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--param {item!r}: expected NAME=VALUE")
        if name not in base:
            raise unknown_parameter(name, base, f"--param {name}")
        kind = type(base[name])
        try:
            out[name] = parse_bool(raw) if kind is bool else kind(raw) if kind is not str else raw
        except ValueError as e:
            raise ConfigError(f"--param {name}: expected a {kind.__name__}, got {raw!r}") from e
    return out


def options_from_args(args: argparse.Namespace) -> Any:
    image = args.image or os.environ.get(IMAGE_ENV) or None
    return build_options(
        args.profile,
        image=image,
        gpu=args.gpu,
        tune_parallelism=args.tune_parallelism,
        trainjob=args.trainjob,
        optuna_secret=args.optuna_secret,
        s3_secret=args.s3_secret,
    )


def _run(args: argparse.Namespace) -> int:
    params = pipeline_parameters(args.profile, parse_param_overrides(args.param, args.profile))
    opts = options_from_args(args)
    out = compile_pipeline(args.out, params, opts)
    print(
        f"wrote {out} (profile {args.profile}, image {opts.image}, gpu {opts.gpu}); upload it in the KFP UI"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.compile", description=__doc__.split("\n")[0])
    add_build_flags(p)
    p.add_argument("--out", type=Path, default=Path("build/inventory_pipeline.yaml"), help="YAML to write")
    return run_cli(p, _run, argv, log_level="WARNING")


if __name__ == "__main__":
    raise SystemExit(main())
