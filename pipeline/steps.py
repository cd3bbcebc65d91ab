"""What the pipeline's task bodies share: the error note a failed step leaves, the HTML reports, the
model store and Optuna storage checks, the configs of the tuning workers and of the fits, and the record
of the final fit. Plain functions, imported by the bodies in :mod:`pipeline.components` (inside each
body, as KFP runs it) and testable on their own.
"""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ERROR_NOTE = "step_error.json"


@contextmanager
def step_errors(step: str, output_path: str) -> Iterator[None]:
    """Record a failing step's message next to its output, then re-raise.

    KFP shows the traceback in the task's log; the note lets ``run_local`` print the step's own one-line
    message at the end of a failed run instead of only "inner task failed".
    """
    try:
        yield
    except Exception as e:
        note = Path(output_path).parent / ERROR_NOTE
        try:
            note.parent.mkdir(parents=True, exist_ok=True)
            note.write_text(json.dumps({"step": step, "type": type(e).__name__, "message": str(e)}) + "\n")
        except OSError:
            pass
        raise


def png_data_uri(path: Path) -> str:
    """Inline a PNG so an HTML artifact is self-contained (the KFP UI serves one file)."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def html_report(
    title: str, *, tables: dict[str, dict[str, Any]] | None = None, images: list[Path] = ()
) -> str:
    """A small self-contained HTML page: key/value tables and inlined PNG figures."""
    parts = [f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>"]
    parts.append(f"<h2>{html.escape(title)}</h2>")
    for caption, table in (tables or {}).items():
        rows = "".join(
            f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_fmt(v))}</td></tr>"
            for k, v in table.items()
        )
        parts.append(f"<h3>{html.escape(caption)}</h3><table border='1' cellpadding='4'>{rows}</table>")
    for img in images:
        if Path(img).is_file():
            parts.append(f"<p><img src='{png_data_uri(Path(img))}' alt='{html.escape(Path(img).stem)}'/></p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return value if isinstance(value, str) else json.dumps(value)


def require_model_store(model_store: str) -> None:
    """The gated steps need the ``model_store`` parameter: say which one is missing, before any work."""
    from components.common import ConfigError

    if not model_store:
        raise ConfigError("model_store is empty: set it to s3://bucket/prefix or a directory")


def optional_int(value: int) -> int | None:
    """Pipeline parameters cannot be None: 0 means "not set"."""
    return value if value > 0 else None


def study_name_for(run_id: str) -> str:
    """One Optuna study per pipeline run (workers and select_best derive the same name)."""
    return f"inventory-monitor-{run_id}"


def resolve_storage(storage: str) -> str:
    """The ``optuna_storage`` parameter, else ``$OPTUNA_STORAGE`` (a Kubernetes Secret on a cluster)."""
    from components.common import ConfigError

    url = storage or os.environ.get("OPTUNA_STORAGE", "")
    if not url:
        raise ConfigError(
            "no Optuna storage: set the optuna_storage pipeline parameter or the OPTUNA_STORAGE env var "
            "(on a cluster: the optuna-db Secret, key url)"
        )
    return url


def make_tune_config(
    out_dir: Path,
    worker_id: str,
    run_id: str,
    optuna_storage: str,
    n_trials: int,
    data_root: str,
    train_csv: str,
    val_csv: str,
    classes: str,
    head: str,
    weights: str,
    image_size: int,
    batch_size: int,
    epochs: int,
    ema: float,
    seed: int,
    device: str,
    num_threads: int,
) -> Any:
    """The :class:`components.tune.TuneConfig` every worker (and select_best) of a run shares.

    Tuning searches the optimizer and augmentation settings; head, image size and batch size are
    pipeline parameters, so they are fixed (a searched parameter in ``train_overrides`` is not searched).
    """
    from components.common import parse_int_list
    from components.tune import TuneConfig

    return TuneConfig(
        train_csv=Path(train_csv),
        val_csv=Path(val_csv),
        out_dir=Path(out_dir),
        n_trials=n_trials,
        data_root=Path(data_root),
        storage=resolve_storage(optuna_storage),
        study_name=study_name_for(run_id),
        epochs=epochs,
        seed=seed,
        worker_id=worker_id,
        progress=False,
        train_overrides={
            "classes": tuple(parse_int_list(classes, name="classes")),
            "head": head,
            "weights": weights,
            "image_size": image_size,
            "batch_size": batch_size,
            "ema": ema,
            "device": device,
            "num_threads": optional_int(num_threads),
            "seed": seed,
        },
    )


def backbone_weights(backbone_dir: str, weights: str) -> str:
    """What trials and the fit start from: the pretrain task's backbone when it made one, else ``weights``."""
    from components.modelspec import STATE_DICT_FILE
    from components.training.config import PRETRAIN_DIR

    stage = Path(backbone_dir) / PRETRAIN_DIR / STATE_DICT_FILE
    return str(stage) if stage.is_file() else weights


def fit_config(
    out_dir: str,
    data_root: str,
    train_csv: str,
    val_csv: str,
    classes: str,
    weights: str,
    image_size: int,
    batch_size: int,
    ema: float,
    seed: int,
    device: str,
    num_threads: int,
    **fields: Any,
) -> Any:
    """The :class:`components.training.config.TrainConfig` of a pipeline fit (pretrain stage, final fit): the
    run parameters both share, plus the ``fields`` of the one."""
    from components.common import parse_int_list
    from components.training.config import TrainConfig

    return TrainConfig(
        train_csv=Path(train_csv),
        val_csv=Path(val_csv),
        out_dir=Path(out_dir),
        data_root=Path(data_root),
        classes=tuple(parse_int_list(classes, name="classes")),
        weights=weights,
        image_size=image_size,
        batch_size=batch_size,
        ema=ema,
        seed=seed,
        device=device,
        num_threads=optional_int(num_threads),
        progress=False,
        **fields,
    )


def keep_tune_reports(result: Any, dest: Path) -> Path:
    """Copy a worker's study reports (not the per-trial model dirs) into its output artifact."""
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    for src in (
        result.best_params_path,
        result.trials_csv,
        result.history_png,
        result.intermediate_png,
        result.importances_png,
    ):
        if src is not None and Path(src).is_file():
            shutil.copy2(src, dest / Path(src).name)
    return dest


def final_fit_config(
    best_params: str,
    out_dir: str,
    dataset: str,
    train: str,
    val: str,
    backbone: str,
    classes: str,
    head: str,
    weights: str,
    image_size: int,
    batch_size: int,
    epochs: int,
    ema: float,
    tta: bool,
    seed: int,
    device: str,
    num_threads: int,
    model_name: str,
) -> Any:
    """The final fit's TrainConfig: the run's settings with the tuned parameters, started from the
    pretrain task's backbone when it made one (as the trials were)."""
    from components.tune import apply_params

    cfg = fit_config(
        out_dir,
        dataset,
        train,
        val,
        classes,
        backbone_weights(backbone, weights),
        image_size,
        batch_size,
        ema,
        seed,
        device,
        num_threads,
        head=head,
        epochs=epochs,
        tta=tta,
        model_name=model_name,
    )
    return apply_params(json.loads(best_params or "{}"), cfg)


def record_final_fit(
    result: Any,
    cfg: Any,
    best_params: str,
    int8: bool,
    model: Any,
    metrics: Any,
    curves: Any,
    model_card: Any,
) -> None:
    """After the final fit, wherever it ran: the int8 model and its gate, the metrics, the training
    report and the card; the resumable checkpoint leaves the exported model."""
    import shutil

    out = Path(model.path)
    if int8:
        from components.quantize import quantize_model

        gate = quantize_model(out, cfg.train_csv, cfg.val_csv, data_root=cfg.data_root, seed=cfg.seed)
        metrics.log_metric("int8_accepted", float(gate.accepted))
        metrics.log_metric("int8_val_accuracy", gate.int8_accuracy)
    val_metrics = result.metrics["val"]
    for key in ("accuracy", "rmse", "mae"):
        metrics.log_metric(f"val_{key}", float(val_metrics[key]))
    metrics.log_metric("best_epoch", float(result.best_epoch))
    model.metadata.update(
        {
            "framework": "onnx",
            "image_size": cfg.image_size,
            "head": cfg.head,
            "classes": ",".join(map(str, cfg.classes)),
        }
    )
    with open(curves.path, "w", encoding="utf-8") as fh:
        fh.write(
            html_report(
                "Training",
                tables={
                    "validation": {k: val_metrics[k] for k in ("accuracy", "rmse", "mae", "n")},
                    "parameters": json.loads(best_params or "{}"),
                },
                images=[out / "training_curves.png", out / "confusion_matrix.png"],
            )
        )
    card = out / "MODEL_CARD.md"
    if card.is_file():
        shutil.copyfile(card, model_card.path)
    else:
        Path(model_card.path).write_text(
            f"# {cfg.model_name}\n\nNo model card was written.\n", encoding="utf-8"
        )
    (out / "checkpoint.pt").unlink(missing_ok=True)
