"""Challenge the published model: promote a new model only when it does at least as well as the
store's latest version on the same test images.

Why: an absolute accuracy threshold cannot tell a retrain that lost two points from one that gained
two. Scoring the published model (the champion) and the new one (the challenger) on the same test
images can, and pairing them image by image makes the difference far more precise than the two
separate figures suggest (:func:`components.evaluate.paired_difference`).

``python -m components.champion --model NEW --store STORE --manifest test.csv --out DIR`` fetches the
latest version named in ``<store>/<model-name>/versions.json`` (a local directory or ``s3://…``),
evaluates both exported ONNX models through the serving preprocessing, writes ``challenge.json`` and
exits 0 (promote), 1 (keep the champion) or 2 (error), so a shell can chain it with
``components.publish``. The gate: the challenger's gain (accuracy difference, or RMSE reduction) must
reach ``--min-gain``; ``--gate interval`` (the default) asks that of the lower end of the gain's 95 %
interval (a clear win), ``--gate point`` of the gain itself, on at least ``--min-images`` test images and
with an RMSE no worse, so noise on a small split cannot promote a model.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from components.common import ConfigError, atomic_write_json, format_table, run_cli
from components.evaluate import (
    PREDICTIONS_CSV,
    difference_text,
    evaluate,
    load_predictions,
    paired_difference,
)
from components.modelspec import load_model_spec
from components.publish import DEFAULT_MODEL_NAME, fetch_published, latest_published, validate_model_name

log = logging.getLogger(__name__)

CHALLENGE_FILE = "challenge.json"
METRICS = ("accuracy", "rmse")
GATES = ("point", "interval")
EXIT_PROMOTE, EXIT_KEEP, EXIT_ERROR = 0, 1, 2


#: the fewest test images on which the point gate may promote: below it one or two images decide
MIN_POINT_IMAGES = 200


@dataclass(frozen=True)
class GateRule:
    """When the challenger wins.

    ``interval`` (the default): the lower end of the gain's 95 % paired interval reaches ``min_gain``,
    so a difference the test split cannot tell from noise never promotes. ``point``: the gain itself
    reaches ``min_gain``, and only on at least ``min_images`` test images and (``rmse_no_worse``) with an
    RMSE no worse than the champion's. The gain is in ``metric``: accuracy points as a fraction, or the
    RMSE reduction in items.
    """

    metric: str = "accuracy"
    min_gain: float = 0.0
    gate: str = "interval"
    min_images: int = MIN_POINT_IMAGES
    rmse_no_worse: bool = True

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ConfigError(f"--metric must be one of {list(METRICS)}, got {self.metric!r}")
        if self.gate not in GATES:
            raise ConfigError(f"--gate must be one of {list(GATES)}, got {self.gate!r}")
        if not -1.0 <= self.min_gain <= 1.0 and self.metric == "accuracy":
            raise ConfigError(
                f"--min-gain is an accuracy difference (0.01 = one point), in [-1, 1]; got {self.min_gain}"
            )
        if self.min_images < 0:
            raise ConfigError(f"--min-images must be >= 0, got {self.min_images}")


def gain(paired: dict[str, Any], metric: str) -> tuple[float, list[float]]:
    """The challenger's gain and its interval from a :func:`paired_difference` of champion (A) and
    challenger (B): the accuracy difference, or the RMSE reduction (so that larger is better)."""
    if metric == "accuracy":
        return float(paired["accuracy_diff"]), [float(v) for v in paired["accuracy_diff_interval"]]
    low, high = paired["rmse_diff_interval"]
    return -float(paired["rmse_diff"]), [-float(high), -float(low)]


def decide(paired: dict[str, Any], rule: GateRule) -> tuple[bool, str]:
    """``(promote, reason)`` for a paired comparison of champion (A) and challenger (B); the reason names
    the rule that decided and its figures."""
    value, interval = gain(paired, rule.metric)
    judged = value if rule.gate == "point" else interval[0]
    what = "gain" if rule.gate == "point" else "lower end of the gain's 95% interval"
    figures = f"{rule.metric} gain {difference_text(value, interval)}, McNemar p {paired['mcnemar_p']:.3g}"
    if judged < rule.min_gain:
        return False, f"{rule.gate} gate: {figures}: {what} < {rule.min_gain:+.4f}, keep the champion"
    if rule.gate == "point" and paired["n"] < rule.min_images:
        return False, (
            f"point gate: {figures}, but on {paired['n']} test images, fewer than the {rule.min_images} "
            "it needs to promote: keep the champion"
        )
    if rule.gate == "point" and rule.rmse_no_worse and paired["rmse_diff"] > 0:
        return False, (
            f"point gate: {figures}, but RMSE {paired['rmse_diff']:+.4f} worse than the champion's: "
            "keep the champion"
        )
    return True, f"{rule.gate} gate: {figures}: {what} >= {rule.min_gain:+.4f}, promote the challenger"


def _figures(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = ("n", "accuracy", "rmse", "mae", "within_one")
    return {k: metrics[k] for k in keys if k in metrics} | {"intervals": metrics.get("intervals", {})}


def challenge(
    model_dir: str | os.PathLike[str],
    store: str,
    manifest: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    data_root: str | os.PathLike[str] | None = None,
    model_name: str = DEFAULT_MODEL_NAME,
    endpoint_url: str | None = None,
    rule: GateRule | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score the challenger in ``model_dir`` against the store's latest ``model_name`` on ``manifest``;
    returns (and writes to ``out_dir/challenge.json``) the decision, both models' figures and their
    paired difference. With nothing published yet the challenger is promoted without evaluation."""
    rule = rule or GateRule()
    validate_model_name(model_name)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    spec = load_model_spec(model_dir)
    record: dict[str, Any] = {
        "model_name": model_name,
        "store": store,
        "manifest": str(manifest),
        "rule": asdict(rule),
        "champion": None,
    }
    entry = latest_published(store, model_name, endpoint_url)
    if entry is None:
        record |= {"promote": True, "reason": f"nothing published as {model_name} in {store} yet"}
        atomic_write_json(out_dir / CHALLENGE_FILE, record)
        return record

    with tempfile.TemporaryDirectory(prefix="champion-") as tmp:
        champion_dir = fetch_published(str(entry["uri"]), Path(tmp) / "model", endpoint_url)
        champion = load_model_spec(champion_dir)
        if champion.classes != spec.classes:
            raise ConfigError(
                f"the published {model_name} {entry['version']} counts {list(champion.classes)}, this model "
                f"{list(spec.classes)}: they answer different questions; publish under another --model-name"
            )
        root = Path(data_root) if data_root is not None else None
        scored = {}
        for role, folder in (("champion", champion_dir), ("challenger", model_dir)):
            m = evaluate(folder, Path(manifest), out_dir / role, data_root=root, progress=progress)
            scored[role] = (m, load_predictions(out_dir / role / PREDICTIONS_CSV))
    (m_a, (ids_a, true, pred_a)), (m_b, (ids_b, _, pred_b)) = scored["champion"], scored["challenger"]
    if ids_a != ids_b:  # one manifest, one order: anything else is a bug, not a result
        raise RuntimeError("the two evaluations scored different images")
    paired = paired_difference(true, pred_a, pred_b)
    promote, reason = decide(paired, rule)
    same_data = (
        None
        if champion.training_data_sha256 is None or spec.training_data_sha256 is None
        else champion.training_data_sha256 == spec.training_data_sha256
    )
    if same_data is False:
        reason += (
            "; the two were trained on different data (another split, or a refit on train + val): "
            "the comparison is fair only if neither saw these test images"
        )
        log.warning(
            "champion and challenger were trained on different data: check neither saw the test images"
        )
    record |= {
        "promote": promote,
        "reason": reason,
        "champion": {"version": entry["version"], "uri": entry["uri"], **_figures(m_a)},
        "challenger": {"model": str(model_dir), **_figures(m_b)},
        "paired": paired,
        "gain": dict(zip(("value", "interval"), gain(paired, rule.metric), strict=True)),
        "same_training_data": same_data,
    }
    atomic_write_json(out_dir / CHALLENGE_FILE, record)
    log.info("%s", reason)
    return record


def summary_rows(record: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(figure, champion, challenger)`` rows for a table of a :func:`challenge` record."""
    a, b = record.get("champion"), record.get("challenger")
    if not a or not b:
        return []
    rows = [("model", f"{a['version']} (published)", str(b["model"]))]
    for k in ("accuracy", "rmse", "mae"):
        if k in a and k in b:
            rows.append((k, f"{a[k]:.4f}", f"{b[k]:.4f}"))
    p = record["paired"]
    rows.append(("right only here (images)", str(p["only_a_right"]), str(p["only_b_right"])))
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m components.champion",
        description="Score a new model against the store's latest published version on the same test "
        "images; exit 0 to promote it, 1 to keep the published one, 2 on error.",
    )
    p.add_argument("--model", required=True, type=Path, help="the challenger (components.train output)")
    p.add_argument(
        "--store", required=True, help="the model store publish writes: s3://bucket/prefix or a dir"
    )
    p.add_argument("--manifest", required=True, type=Path, help="the test manifest both are scored on")
    p.add_argument("--out", required=True, type=Path, help="writes challenge.json and both evaluations")
    p.add_argument("--data-root", type=Path, default=None, help="where the manifest's images are")
    p.add_argument("--model-name", default=DEFAULT_MODEL_NAME, help="the published model to challenge")
    p.add_argument("--endpoint-url", default=None, help="S3 API endpoint for MinIO/moto (default: AWS)")
    p.add_argument("--metric", default="accuracy", choices=METRICS, help="what the gain is measured in")
    p.add_argument(
        "--min-gain",
        type=float,
        default=0.0,
        help="the gain the challenger needs (accuracy: 0.01 = one point; negative: a tolerated loss)",
    )
    p.add_argument(
        "--gate",
        default="interval",
        choices=GATES,
        help="interval: the lower end of the gain's 95%% interval (a clear win); point: the gain itself, "
        "on at least --min-images test images and with an RMSE no worse",
    )
    p.add_argument(
        "--min-images",
        type=int,
        default=MIN_POINT_IMAGES,
        help="the point gate promotes only on at least this many test images",
    )
    p.add_argument(
        "--allow-worse-rmse",
        dest="rmse_no_worse",
        action="store_false",
        help="let the point gate promote a challenger whose RMSE is worse",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _run(args: argparse.Namespace) -> int:
    rule = GateRule(
        metric=args.metric,
        min_gain=args.min_gain,
        gate=args.gate,
        min_images=args.min_images,
        rmse_no_worse=args.rmse_no_worse,
    )
    record = challenge(
        args.model,
        args.store,
        args.manifest,
        args.out,
        data_root=args.data_root,
        model_name=args.model_name,
        endpoint_url=args.endpoint_url,
        rule=rule,
        progress=not args.no_progress,
    )
    rows = summary_rows(record)
    if rows:
        print(format_table(rows, headers=("figure", "champion", "challenger")))
    print(("promote: " if record["promote"] else "keep: ") + record["reason"])
    return EXIT_PROMOTE if record["promote"] else EXIT_KEEP


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
