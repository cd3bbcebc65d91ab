"""Checks that ``model.json`` and the ONNX graph describe the same model, before the server is ready.

A model.json that disagrees with its graph (other classes, another image size, renamed outputs)
would otherwise load and then fail every request with a 500, or crash in warm-up with a
traceback. Each check raises :class:`ModelContractError` saying what disagrees and how to fix it,
so ``python -m serving`` exits 2 with one ``error:`` line instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components.common import ConfigError
from components.modelspec import OUTPUT_NAMES, ModelSpec

#: Channels of the model input (RGB, as :func:`components.preprocess.normalize` produces).
CHANNELS = 3
FIX = "re-export the model (model.json and the ONNX file are written together) or restore its model.json"


class ModelContractError(ConfigError):
    """model.json and the ONNX graph disagree; the model must not be served."""


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape (ints, or names/None for dynamic axes) and element type of a graph input/output."""

    name: str
    shape: tuple[int | str | None, ...]
    type: str


def tensor_infos(args: Sequence[object]) -> list[TensorInfo]:
    """onnxruntime's ``NodeArg`` list (``session.get_inputs()``/``get_outputs()``) -> :class:`TensorInfo`."""
    return [
        TensorInfo(str(a.name), tuple(a.shape or ()), str(a.type))  # type: ignore[attr-defined]
        for a in args
    ]


def _fail(onnx_path: Path, what: str) -> ModelContractError:
    model_json = onnx_path.parent / "model.json"
    return ModelContractError(f"{model_json} does not match {onnx_path.name}: {what}; {FIX}")


def _static(dim: int | str | None) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


def check_graph(
    spec: ModelSpec, inputs: Sequence[TensorInfo], outputs: Sequence[TensorInfo], onnx_path: Path
) -> None:
    """Input name, channels and image size, output names and the class count, from the graph alone."""
    by_name = {t.name: t for t in inputs}
    if spec.input_name not in by_name:
        raise _fail(
            onnx_path, f"input_name {spec.input_name!r} is not a graph input (inputs: {sorted(by_name)})"
        )
    if len(inputs) != 1:
        raise _fail(
            onnx_path, f"the graph takes {len(inputs)} inputs {sorted(by_name)}, the server feeds one"
        )
    inp = by_name[spec.input_name]
    if inp.type != "tensor(float)":
        raise _fail(onnx_path, f"input {inp.name!r} is {inp.type}, the server feeds tensor(float)")
    if len(inp.shape) != 4:
        raise _fail(onnx_path, f"input {inp.name!r} has shape {list(inp.shape)}, expected [N, 3, H, W]")
    size = spec.preprocess.image_size
    channels, height, width = (_static(d) for d in inp.shape[1:])
    if channels is not None and channels != CHANNELS:
        raise _fail(onnx_path, f"input {inp.name!r} has {channels} channels, expected {CHANNELS} (RGB)")
    if (height is not None and height != size) or (width is not None and width != size):
        raise _fail(
            onnx_path,
            f"preprocess.image_size is {size} but the graph's input {inp.name!r} is "
            f"{inp.shape[2]}x{inp.shape[3]} pixels",
        )

    missing_required = [n for n in OUTPUT_NAMES if n not in spec.output_names]
    if missing_required:
        raise _fail(onnx_path, f"output_names {list(spec.output_names)} lacks {missing_required}")
    graph_outputs = {t.name: t for t in outputs}
    missing = [n for n in spec.output_names if n not in graph_outputs]
    if missing:
        raise _fail(
            onnx_path, f"outputs {missing} are not in the graph (graph outputs: {sorted(graph_outputs)})"
        )
    probs, count, expected = (graph_outputs[n] for n in OUTPUT_NAMES)
    if len(probs.shape) != 2:
        raise _fail(onnx_path, f"output 'probabilities' has shape {list(probs.shape)}, expected [N, C]")
    columns = _static(probs.shape[1])
    if columns is not None and columns != len(spec.classes):
        raise _fail(
            onnx_path,
            f"classes {list(spec.classes)} are {len(spec.classes)} classes but the graph's "
            f"'probabilities' output has {columns}",
        )
    for t in (count, expected):
        if len(t.shape) != 1:
            raise _fail(onnx_path, f"output {t.name!r} has shape {list(t.shape)}, expected [N]")


def check_outputs(spec: ModelSpec, outputs: Mapping[str, np.ndarray], batch: int, onnx_path: Path) -> None:
    """What one real inference returned: one row per image, a column per class, counts from ``classes``."""
    probs, count, expected = (np.asarray(outputs[n]) for n in OUTPUT_NAMES)
    n_classes = len(spec.classes)
    if probs.shape != (batch, n_classes):
        raise _fail(
            onnx_path,
            f"classes {list(spec.classes)} are {n_classes} classes but a batch of {batch} gave "
            f"'probabilities' of shape {list(probs.shape)}",
        )
    for name, arr in (("count", count), ("expected", expected)):
        if arr.shape != (batch,):
            raise _fail(onnx_path, f"a batch of {batch} gave {name!r} of shape {list(arr.shape)}")
    if not np.all(np.isfinite(probs)):
        raise _fail(onnx_path, "the graph returns non-finite probabilities")
    stray = sorted({int(c) for c in count.reshape(-1)} - set(spec.classes))
    if stray:
        raise _fail(
            onnx_path, f"the graph predicts counts {stray}, which are not in classes {list(spec.classes)}"
        )
