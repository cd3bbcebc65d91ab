"""The exported model's contract (``model.json`` + ``model.onnx``), readable without torch.

Every head (classification, ordinal, regression) is exported with the same three ONNX outputs, so
evaluation and serving never need to know which head was trained:

* ``probabilities``: float32 ``[N, C]``, a distribution over ``classes``;
* ``count``: int64 ``[N]``, the predicted count (a value from ``classes``);
* ``expected``: float32 ``[N]``, the expected count (useful for RMSE and for monitoring drift).

The input is ``input``: float32 ``[N, 3, S, S]`` from :func:`components.preprocess.normalize`.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from components.answers import AnswerSpec
from components.common import ConfigError, atomic_write_json, read_json
from components.preprocess import PreprocessSpec

MODEL_JSON = "model.json"
ONNX_FILE = "model.onnx"
ONNX_INT8_FILE = "model.int8.onnx"
STATE_DICT_FILE = "model.pt"
#: the answer plots beside a model (and an evaluation): reliability diagram, accuracy against coverage
CALIBRATION_PNG = "calibration.png"
RISK_COVERAGE_PNG = "risk_coverage.png"
INPUT_NAME = "input"
OUTPUT_NAMES: tuple[str, str, str] = ("probabilities", "count", "expected")
HEADS: tuple[str, ...] = ("classification", "ordinal", "regression")
DEFAULT_CLASSES: tuple[int, ...] = (1, 2, 3, 4, 5)
SCHEMA_VERSION = 1
#: Which ONNX file to run: ``auto`` takes the int8 model when model.json lists it (it passed the
#: accuracy gate), ``on`` requires it, ``off`` always uses fp32. Serving and evaluation share this.
INT8_CHOICES: tuple[str, ...] = ("auto", "on", "off")


def validate_classes(classes: list[int] | tuple[int, ...]) -> tuple[int, ...]:
    """Classes must be at least two distinct, increasing, consecutive integers (counts are ordinal)."""
    cls = tuple(int(c) for c in classes)
    if len(cls) < 2:
        raise ConfigError(f"need at least two classes, got {list(cls)}")
    if any(b - a != 1 for a, b in itertools.pairwise(cls)):
        raise ConfigError(f"classes must be consecutive increasing counts like 1,2,3,4,5; got {list(cls)}")
    if cls[0] < 0:
        raise ConfigError(f"counts cannot be negative, got {list(cls)}")
    return cls


@dataclass
class ModelSpec:
    """What a consumer needs to run the exported model and explain where it came from."""

    classes: tuple[int, ...] = DEFAULT_CLASSES
    head: str = "classification"
    preprocess: PreprocessSpec = field(default_factory=PreprocessSpec)
    name: str = "inventory-counter"
    version: str = "0"
    onnx_file: str = ONNX_FILE
    onnx_int8_file: str | None = None
    input_name: str = INPUT_NAME
    output_names: tuple[str, ...] = OUTPUT_NAMES
    architecture: str = "resnet18"
    training_data_sha256: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    #: the count rule's offsets fitted on validation, already in the ONNX graph (None = plain rule)
    decision_offsets: tuple[float, ...] | None = None
    #: calibration, count sets and the review threshold (:mod:`components.answers`)
    answers: AnswerSpec = field(default_factory=AnswerSpec)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        self.classes = validate_classes(self.classes)
        if self.head not in HEADS:
            raise ConfigError(f"head must be one of {list(HEADS)}, got {self.head!r}")
        if self.head == "regression" and self.answers.distribution:
            # its "probabilities" are a kernel around one number: no confidence can be read from them
            self.answers = replace(self.answers, distribution=False)
        if self.decision_offsets is not None:
            self.decision_offsets = tuple(float(o) for o in self.decision_offsets)
            want = len(self.classes) - (self.head != "classification")
            if len(self.decision_offsets) != want:
                raise ConfigError(
                    f"decision_offsets: the {self.head} head over {len(self.classes)} classes has "
                    f"{want} offsets, got {len(self.decision_offsets)}"
                )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict for ``model.json``."""
        return {
            "schema_version": self.schema_version,
            "name": self.name,
            "version": self.version,
            "architecture": self.architecture,
            "classes": list(self.classes),
            "head": self.head,
            "preprocess": self.preprocess.to_dict(),
            "onnx_file": self.onnx_file,
            "onnx_int8_file": self.onnx_int8_file,
            "input_name": self.input_name,
            "output_names": list(self.output_names),
            "training_data_sha256": self.training_data_sha256,
            "metrics": self.metrics,
            "params": self.params,
            "decision_offsets": None if self.decision_offsets is None else list(self.decision_offsets),
            "answers": self.answers.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        """Parse ``model.json`` content, with errors that name the bad field."""
        try:
            return cls(
                classes=tuple(d["classes"]),
                head=d["head"],
                preprocess=PreprocessSpec.from_dict(d["preprocess"]),
                name=d.get("name", "inventory-counter"),
                version=str(d.get("version", "0")),
                onnx_file=d.get("onnx_file", ONNX_FILE),
                onnx_int8_file=d.get("onnx_int8_file"),
                input_name=d.get("input_name", INPUT_NAME),
                output_names=tuple(d.get("output_names", OUTPUT_NAMES)),
                architecture=d.get("architecture", "resnet18"),
                training_data_sha256=d.get("training_data_sha256"),
                metrics=dict(d.get("metrics", {})),
                params=dict(d.get("params", {})),
                decision_offsets=(
                    None if d.get("decision_offsets") is None else tuple(d["decision_offsets"])
                ),
                answers=AnswerSpec.from_dict(d.get("answers")),
                schema_version=int(d.get("schema_version", SCHEMA_VERSION)),
            )
        except KeyError as e:
            raise ConfigError(f"model.json is missing the field {e.args[0]!r}") from e
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model.json is invalid: {e}") from e

    def save(self, model_dir: str | os.PathLike[str]) -> Path:
        """Write ``model.json`` atomically into ``model_dir``."""
        return atomic_write_json(Path(model_dir) / MODEL_JSON, self.to_dict())


def load_model_spec(model_dir: str | os.PathLike[str]) -> ModelSpec:
    """Read and validate ``model_dir/model.json``; also checks the ONNX file is there."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ConfigError(f"model directory {model_dir} does not exist: train a model first")
    spec = ModelSpec.from_dict(read_json(model_dir / MODEL_JSON))
    if not (model_dir / spec.onnx_file).is_file():
        raise ConfigError(f"{model_dir / spec.onnx_file} is missing: the model directory is incomplete")
    return spec


def choose_onnx_file(model_dir: str | os.PathLike[str], spec: ModelSpec, int8: str = "auto") -> Path:
    """The ONNX file a consumer runs (see :data:`INT8_CHOICES`), so evaluation scores what is served."""
    model_dir = Path(model_dir)
    if int8 not in INT8_CHOICES:
        raise ConfigError(f"int8 must be one of {list(INT8_CHOICES)}, got {int8!r}")
    int8_path = model_dir / spec.onnx_int8_file if spec.onnx_int8_file else None
    if int8 == "on":
        if int8_path is None or not int8_path.is_file():
            raise ConfigError(
                f"--int8 on but {model_dir}/model.json lists no int8 model (or it is missing); "
                "run python -m components.quantize first or use --int8 auto"
            )
        return int8_path
    if int8 == "auto" and int8_path is not None and int8_path.is_file():
        return int8_path
    return model_dir / spec.onnx_file
