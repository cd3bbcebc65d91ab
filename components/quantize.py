"""Optional int8 model: onnxruntime static quantization, kept only if it costs <= 1 point of accuracy.

On a CPU without a GPU, int8 ResNet18 runs about twice as fast as fp32. Activation ranges are
calibrated on training images passed through the shared preprocessing; then fp32 and int8 are
scored on the same labelled images (the validation split), and ``model.int8.onnx`` is written and
listed in ``model.json`` only if int8 accuracy >= fp32 accuracy - ``max_drop``. The server's
``--int8 auto`` (the default) uses it when listed, so a model that failed the gate is never served.

``python -m components.quantize --model_dir DIR --calib train.csv --eval val.csv [--data_root ROOT]``
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from components.common import ConfigError, format_table, run_cli
from components.manifest import load_labelled
from components.modelspec import ONNX_INT8_FILE, ModelSpec, load_model_spec
from components.preprocess import preprocess_batch

logger = logging.getLogger("components.quantize")


@dataclass
class QuantizeResult:
    """Accuracies of both models and whether the int8 file was kept."""

    fp32_accuracy: float
    int8_accuracy: float
    max_drop: float
    accepted: bool
    n_calib: int
    n_eval: int
    int8_path: str | None


def _batches(paths: Sequence[Path], spec: ModelSpec, batch_size: int) -> Iterator[np.ndarray]:
    for i in range(0, len(paths), batch_size):
        yield preprocess_batch(list(paths[i : i + batch_size]), spec.preprocess)


def predict_counts(
    onnx_path: Path, spec: ModelSpec, paths: Sequence[Path], batch_size: int = 32
) -> np.ndarray:
    """Predicted counts of ``paths`` with the ONNX file at ``onnx_path``."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    out = [sess.run(["count"], {spec.input_name: x})[0] for x in _batches(paths, spec, batch_size)]
    return np.concatenate(out)


def quantize_model(
    model_dir: Path,
    calib_manifest: Path,
    eval_manifest: Path,
    *,
    data_root: Path | None = None,
    n_calib: int = 64,
    max_drop: float = 0.01,
    seed: int = 0,
) -> QuantizeResult:
    """Quantize ``model_dir``'s ONNX model; keep it (and list it in model.json) if it passes the gate."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not 0 <= max_drop < 1:
        raise ConfigError(f"--max_drop is a fraction of accuracy in [0, 1), got {max_drop}")
    if n_calib < 1:
        raise ConfigError(f"--n_calib must be >= 1, got {n_calib}")
    model_dir = Path(model_dir)
    spec = load_model_spec(model_dir)
    _, calib_paths = load_labelled(calib_manifest, data_root)
    eval_rows, eval_paths = load_labelled(eval_manifest, data_root)
    calib_paths = list(calib_paths)
    random.Random(seed).shuffle(calib_paths)
    calib_paths = calib_paths[:n_calib]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = _batches(calib_paths, spec, 16)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self._it, None)
            return None if x is None else {spec.input_name: x}

    fp32_path = model_dir / spec.onnx_file
    final = model_dir / ONNX_INT8_FILE
    with tempfile.TemporaryDirectory(dir=model_dir, prefix=".quantize-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        out = Path(tmp) / ONNX_INT8_FILE
        quant_pre_process(str(fp32_path), str(pre))
        quantize_static(
            str(pre),
            str(out),
            Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=True,  # 7-bit weights: no overflow in AVX2's u8*s8 pairwise adds
        )
        truth = np.asarray([r.count for r in eval_rows])
        fp32_acc = float((predict_counts(fp32_path, spec, eval_paths) == truth).mean())
        int8_acc = float((predict_counts(out, spec, eval_paths) == truth).mean())
        accepted = int8_acc >= fp32_acc - max_drop
        if accepted:
            os.replace(out, final)
    result = QuantizeResult(
        fp32_accuracy=fp32_acc,
        int8_accuracy=int8_acc,
        max_drop=max_drop,
        accepted=accepted,
        n_calib=len(calib_paths),
        n_eval=len(eval_paths),
        int8_path=str(final) if accepted else None,
    )
    spec.onnx_int8_file = ONNX_INT8_FILE if accepted else None
    spec.metrics = {
        **spec.metrics,
        "int8_gate": {k: v for k, v in asdict(result).items() if k != "int8_path"},
    }
    if not accepted:
        final.unlink(missing_ok=True)  # an older int8 file must not outlive a failed gate
    spec.save(model_dir)
    return result


def _run(args: argparse.Namespace) -> int:
    r = quantize_model(
        args.model_dir,
        args.calib,
        args.eval,
        data_root=args.data_root,
        n_calib=args.n_calib,
        max_drop=args.max_drop,
    )
    rows: list[list[Any]] = [["fp32 accuracy", r.fp32_accuracy], ["int8 accuracy", r.int8_accuracy]]
    rows.append(["int8 kept", r.accepted])
    print(format_table(rows, ["", "value"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m components.quantize", description=__doc__.split("\n")[0])
    p.add_argument("--model_dir", required=True, type=Path, help="exported model directory (model.json)")
    p.add_argument("--calib", required=True, type=Path, help="manifest of training images for calibration")
    p.add_argument("--eval", required=True, type=Path, help="labelled manifest for the accuracy gate (val)")
    p.add_argument("--data_root", type=Path, default=None, help="directory the manifest paths are under")
    p.add_argument("--n_calib", type=int, default=64, help="calibration images")
    p.add_argument("--max_drop", type=float, default=0.01, help="accuracy int8 may lose (0.01 = 1 point)")
    return run_cli(p, _run, argv)


if __name__ == "__main__":
    sys.exit(main())
