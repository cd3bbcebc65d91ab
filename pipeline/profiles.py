"""Presets of pipeline parameters: ``quick`` (a laptop CPU, minutes), ``full`` and ``scratch`` (GPU).

A profile is only a dict of pipeline parameter values; every value can be overridden on the command line
of ``run_local``/``compile``/``submit`` or in the KFP UI. :data:`PARAMETER_HELP` documents each parameter
(the README table and the descriptions in the KFP UI's run form are derived from it) and
:func:`pipeline_parameters` checks a profile plus overrides
against the pipeline's signature, so a typo fails before anything runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

from components import __version__
from components.common import ConfigError
from components.settings import choices_of, help_of
from components.training.config import TrainConfig


def _training(name: str, note: str = "") -> str:
    """A training setting's help, as declared on :class:`TrainConfig`, with what the pipeline adds."""
    return f"{help_of(TrainConfig, name)}{f'; {note}' if note else ''}"


#: What every pipeline parameter means (also the ``--help`` text and the README table). The training
#: settings' texts are :class:`TrainConfig`'s own.
PARAMETER_HELP: Mapping[str, str] = MappingProxyType(
    {
        "source": "where ABID is: s3://bucket[/prefix] (bin-images/, metadata/, file_list.json) or a local "
        "directory in the same layout",
        "endpoint_url": "S3 API endpoint for a non-AWS store (MinIO, moto), used by ingest and publish; "
        "empty = AWS",
        "per_class": "images per count class to ingest (0 = all: the ids of `<source>/file_list.json`, else "
        "for s3://aft-vbi-pds the shipped standard subset, else every labelled image of `classes`)",
        "ingest_shards": "ingest tasks the selection is split across (by id hash; each resumable on its own, "
        "then merged into one dataset): 1 for the standard subset, 16-64 for the whole bucket",
        "classes": _training("classes"),
        "split_ratios": "train,val,test fractions (stratified by count)",
        "seed": _training("seed", "also the split's and the tuning sampler's"),
        "head": _training("head"),
        "weights": _training("weights", "here imagenet or none"),
        "image_size": _training("image_size"),
        "batch_size": _training("batch_size"),
        "epochs": _training("epochs", "of the final fit with the best parameters; trials run tune_epochs"),
        "ema": _training("ema", "in the trials and the final fit"),
        "tta": _training("tta"),
        "pretrain_per_class": "images per count to ingest for the pretraining stage, with the counts of "
        "pretrain_classes (0 = none)",
        "pretrain_classes": "the counts outside `classes` those images have (empty bins, 6+ items); never "
        "in val or test",
        "pretrain_epochs": _training(
            "pretrain_epochs", "every tuning trial and the final fit start from it; needs pretrain_per_class"
        ),
        "tune_trials": "Optuna trials in the whole study (shared by all tuning workers)",
        "tune_epochs": "epochs per tuning trial (the pruner may stop a trial earlier)",
        "n_tune_workers": "parallel tuning workers (dsl.ParallelFor) sharing one Optuna study",
        "optuna_storage": "Optuna storage URL; empty = the OPTUNA_STORAGE env var (a Kubernetes Secret on a "
        "cluster, a SQLite file under the run directory locally)",
        "device": _training("device", "here auto, cpu or cuda"),
        "num_threads": _training("num_threads", "per training process; 0 = torch's default"),
        "accuracy_margin": "publish only when test accuracy >= the majority-class baseline + this margin "
        "(accuracy points as a fraction: 0.05 = 5 points; negative = a tolerated shortfall, -1 = no gate). "
        "The baseline is the test split's accuracy of always answering the training split's most frequent "
        "count (0.264 on the 876-image test split of the standard subset); 0.05 is above that split's "
        "noise (a 95-percent interval of about +-3 points), so a model that learnt nothing fails, and far "
        "below the 0.41-0.43 of a good model",
        "champion_gate": "compare with the store's latest published model on the same test images "
        "before publishing: interval (publish when the lower end of the paired accuracy gain's 95 % interval "
        ">= champion_min_gain: a win the test split can tell from noise), point (when the gain itself is, on "
        "at least 200 test images and with an RMSE no worse) or off",
        "champion_min_gain": "the accuracy gain over the published model needed to publish (0.01 = one "
        "point; negative = a tolerated loss)",
        "model_store": "where publish copies the model: s3://bucket/prefix or a local directory",
        "model_name": _training("model_name", "also the InferenceService's and the model store's name"),
        "int8": "also quantize to int8 (onnxruntime static, calibrated on train images); served and "
        "evaluated only if it loses at most 1 point of val accuracy",
        "trainjob_nodes": "with the pipeline compiled --trainjob: nodes (pods) of the final fit's Kubeflow "
        "Trainer TrainJob",
        "trainjob_gpus_per_node": "with --trainjob: GPUs and training processes per node (0 = CPU, one "
        "process); more than one process in all runs torchrun (DDP)",
        "trainjob_cpu": "with --trainjob: CPU per node (requests = limits)",
        "trainjob_memory": "with --trainjob: memory per node (requests = limits)",
        "trainjob_timeout_s": "with --trainjob: give up and stop the job after this many seconds",
        "trainjob_keep": "with --trainjob: which finished TrainJobs to keep: never, failed or always",
        "model_version": "published version; empty = UTC timestamp + content hash",
        "serving_image": "serving image written into the rendered InferenceService manifest",
    }
)

_COMMON: dict[str, Any] = {
    "source": "s3://aft-vbi-pds",
    "endpoint_url": "",
    "ingest_shards": 1,
    "classes": "1,2,3,4,5",
    "split_ratios": "0.7,0.15,0.15",
    "seed": 0,
    "head": "ordinal",
    "champion_gate": "interval",
    "champion_min_gain": 0.0,
    "optuna_storage": "",
    "model_name": "inventory-counter",
    "int8": True,
    "trainjob_nodes": 1,
    "trainjob_gpus_per_node": 0,
    "trainjob_cpu": "4",
    "trainjob_memory": "16Gi",
    "trainjob_timeout_s": 86400,
    "trainjob_keep": "failed",
    "model_version": "",
    "serving_image": f"inventory-monitor/serving:{__version__}",
}

PROFILES: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        # minutes on a 2-core laptop CPU: ~15 images per class at 40 px, 3 short trials, 2 epochs
        "quick": MappingProxyType(
            {
                **_COMMON,
                "per_class": 15,
                "weights": "none",
                "image_size": 40,
                "batch_size": 16,
                "epochs": 2,
                "ema": 0.0,
                "tta": False,
                "pretrain_per_class": 0,
                "pretrain_classes": "0,6,7,8,9,10",
                "pretrain_epochs": 0,
                "tune_trials": 3,
                "tune_epochs": 1,
                "n_tune_workers": 2,
                "device": "cpu",
                "num_threads": 1,
                # a smoke test: it publishes what it trained, so the rest of the path can be tried
                "accuracy_margin": -1.0,
                "model_store": "",
            }
        ),
        # the standard subset (file_list.json, 10,441 images), 224 px, ImageNet weights, a GPU
        "full": MappingProxyType(
            {
                **_COMMON,
                "per_class": 0,
                "weights": "imagenet",
                "image_size": 224,
                "batch_size": 64,
                "epochs": 25,
                "ema": 0.0,
                "tta": False,
                "pretrain_per_class": 0,
                "pretrain_classes": "0,6,7,8,9,10",
                "pretrain_epochs": 0,
                "tune_trials": 24,
                "tune_epochs": 6,
                "n_tune_workers": 4,
                "device": "auto",
                "num_threads": 0,
                "accuracy_margin": 0.05,
                "model_store": "s3://inventory-monitor-models",
            }
        ),
        # the benchmark's from-scratch recipe (no ImageNet weights needed), a GPU: 224 px, batch
        # 128, a backbone pretrained for 40 epochs on the training split plus 2,400 images of other
        # counts, from which a 20-trial tune of 15 epochs per trial and the 150-epoch fit (with a
        # weight average) start
        "scratch": MappingProxyType(
            {
                **_COMMON,
                "per_class": 0,
                "weights": "none",
                "image_size": 224,
                "batch_size": 128,
                "epochs": 150,
                "ema": 0.998,
                "tta": False,
                "pretrain_per_class": 400,
                "pretrain_classes": "0,6,7,8,9,10",
                "pretrain_epochs": 40,
                "tune_trials": 20,
                "tune_epochs": 15,
                "n_tune_workers": 4,
                "device": "auto",
                "num_threads": 0,
                "accuracy_margin": 0.05,
                "model_store": "s3://inventory-monitor-models",
            }
        ),
    }
)


#: Compile-time settings per profile (see pipeline.pipeline.BuildOptions): GPU requests, tuning fan-out.
BUILD_OPTIONS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        "quick": MappingProxyType({"gpu": False, "tune_parallelism": 2}),
        "full": MappingProxyType({"gpu": True, "tune_parallelism": 4}),
        "scratch": MappingProxyType({"gpu": True, "tune_parallelism": 4}),
    }
)


def parameter_table() -> str:
    """The Markdown table of every parameter, its value in each profile and its meaning (README)."""

    def cell(value: Any) -> str:
        if value == "":
            return "(empty)"
        return f"`{str(value).lower() if isinstance(value, bool) else value}`"

    names = list(PROFILES)  # declared order: quick, full, scratch
    lines = [
        "| parameter | " + " | ".join(names) + " | meaning |",
        "|---|" + "---|" * len(names) + "---|",
    ]
    for key, meaning in PARAMETER_HELP.items():
        values = " | ".join(cell(PROFILES[n][key]) for n in names)
        lines.append(f"| `{key}` | {values} | {meaning} |")
    return "\n".join(lines)


def pipeline_docstring(summary: str) -> str:
    """A Google-style docstring: ``summary`` and an ``Args:`` entry per parameter from
    :data:`PARAMETER_HELP`, one line each. KFP parses it (docstring_parser) into the description of
    every pipeline input, which the KFP UI's run form shows next to the field."""
    args = [f"    {key}: {' '.join(meaning.split())}" for key, meaning in PARAMETER_HELP.items()]
    return "\n".join([" ".join(summary.split()), "", "Args:", *args]) + "\n"


def unknown_parameter(name: str, known: Iterable[str], said_as: str) -> ConfigError:
    """The error for a name that is not a pipeline parameter, in ``said_as`` words (``--param decision``),
    naming the close ones, or where a benchmark-only training lever is set instead."""
    import dataclasses
    import difflib

    from components.settings import flag_of
    from components.training.config import EXPERIMENTS

    levers = {f.name: f for f in dataclasses.fields(TrainConfig) if f.metadata.get("group") == EXPERIMENTS}
    lever = levers.get(name)
    if lever is not None:
        return ConfigError(
            f"{said_as} is a benchmark experiment, not a pipeline parameter: it has not measured a gain "
            f"beyond noise (docs/benchmarks.md); try it with python -m components.train {flag_of(lever)}"
        )
    close = difflib.get_close_matches(name, list(known), n=3)
    hint = f"did you mean {', '.join(close)}?" if close else f"known: {sorted(known)}"
    return ConfigError(f"{said_as} is not a pipeline parameter; {hint}")


def profile_names() -> list[str]:
    """The preset names, for argparse ``choices``."""
    return sorted(PROFILES)


def pipeline_parameters(profile: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The profile's parameters with ``overrides`` applied (``None`` values mean "keep the preset")."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}: choose one of {profile_names()}")
    params = dict(PROFILES[profile])
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in params:
            raise unknown_parameter(key, params, f"pipeline parameter {key!r}")
        expected = type(params[key])
        if expected is float and isinstance(value, int):
            value = float(value)
        if type(value) is not expected:
            raise ConfigError(f"{key} must be a {expected.__name__}, got {value!r}")
        params[key] = value
    validate_parameters(params)
    return params


def validate_parameters(params: Mapping[str, Any]) -> None:
    """Cheap checks that would otherwise fail minutes into a run, with the fix in the message."""
    from components.common import parse_float_list, parse_int_list

    parse_int_list(params["classes"], name="classes")
    ratios = parse_float_list(params["split_ratios"], name="split_ratios")
    if len(ratios) != 3 or min(ratios) <= 0 or abs(sum(ratios) - 1) > 1e-6:
        raise ConfigError(f"split_ratios must be three positive fractions summing to 1, got {ratios}")
    for key in ("image_size", "batch_size", "epochs", "tune_epochs", "n_tune_workers", "ingest_shards"):
        if params[key] < 1:
            raise ConfigError(f"{key} must be >= 1, got {params[key]}")
    for key in ("per_class", "num_threads", "pretrain_per_class", "pretrain_epochs"):
        if params[key] < 0:
            raise ConfigError(f"{key} must be >= 0, got {params[key]}")
    if params["tune_trials"] < params["n_tune_workers"]:
        raise ConfigError(
            f"tune_trials ({params['tune_trials']}) must be >= n_tune_workers ({params['n_tune_workers']}): "
            "every worker needs at least one trial"
        )
    if not 0.0 <= params["ema"] < 1.0:
        raise ConfigError(f"ema must be in [0, 1) (0 = off, e.g. 0.998), got {params['ema']}")
    if not -1.0 <= params["accuracy_margin"] <= 1.0:
        raise ConfigError(
            f"accuracy_margin is accuracy points above the majority-class baseline, in [-1, 1] "
            f"(0.05 = 5 points), got {params['accuracy_margin']}"
        )
    from components.champion import GATES  # the gates the champion step knows, plus "off" (no step)

    if params["champion_gate"] not in (*GATES, "off"):
        raise ConfigError(f"champion_gate must be {', '.join(GATES)} or off, got {params['champion_gate']!r}")
    if not -1.0 <= params["champion_min_gain"] <= 1.0:
        raise ConfigError(
            f"champion_min_gain is an accuracy difference in [-1, 1] (0.01 = one point), "
            f"got {params['champion_min_gain']}"
        )
    heads = choices_of(TrainConfig, "head") or ()
    if params["head"] not in heads:
        raise ConfigError(f"head must be one of {', '.join(heads)}, got {params['head']!r}")
    if params["device"] not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, got {params['device']!r}")
    if params["weights"] not in ("none", "imagenet"):
        raise ConfigError(f"weights must be imagenet or none (random init), got {params['weights']!r}")
    _validate_pretraining(params)
    _validate_trainjob(params)
    if not params["source"]:
        raise ConfigError("source is empty: pass s3://bucket[/prefix] or a local ABID directory")


def _validate_pretraining(params: Mapping[str, Any]) -> None:
    from components.common import parse_int_list

    if params["pretrain_epochs"] and not params["pretrain_per_class"]:
        raise ConfigError(
            "pretrain_epochs needs images to pretrain on: set pretrain_per_class >= 1 (e.g. 400), "
            "or pretrain_epochs=0"
        )
    extra = parse_int_list(params["pretrain_classes"], name="pretrain_classes")
    if params["pretrain_per_class"] and not extra:
        raise ConfigError("pretrain_classes is empty: list the counts to ingest, e.g. 0,6,7,8,9,10")
    shared = sorted(set(extra) & set(parse_int_list(params["classes"], name="classes")))
    if shared:
        raise ConfigError(
            f"pretrain_classes {shared} are also in classes: those images could be val or test images; "
            "list only counts outside classes"
        )
    if min(extra, default=0) < 0:
        raise ConfigError(f"pretrain_classes must be counts >= 0, got {extra}")


def _validate_trainjob(params: Mapping[str, Any]) -> None:
    from components.trainjob import KEEP_CHOICES

    if params["trainjob_nodes"] < 1:
        raise ConfigError(f"trainjob_nodes must be >= 1, got {params['trainjob_nodes']}")
    if params["trainjob_gpus_per_node"] < 0:
        raise ConfigError(
            f"trainjob_gpus_per_node must be >= 0 (0 = CPU), got {params['trainjob_gpus_per_node']}"
        )
    if params["trainjob_timeout_s"] < 1:
        raise ConfigError(f"trainjob_timeout_s must be >= 1, got {params['trainjob_timeout_s']}")
    if params["trainjob_keep"] not in KEEP_CHOICES:
        raise ConfigError(
            f"trainjob_keep must be one of {', '.join(KEEP_CHOICES)}, got {params['trainjob_keep']!r}"
        )
