"""ResNet18 item counter: model construction, head decoding and ONNX export (needs torch).

Three heads over the same backbone, because counts are ordered:

* ``classification``: ``C`` logits, softmax;
* ``ordinal``: ``C-1`` cumulative logits ``P(y > k)`` (CORAL-style), counts the thresholds passed;
* ``regression``: one output on the class-index scale, rounded and clipped.

:func:`decode_outputs` turns any head's raw output into the common ``(probabilities, index,
expected)`` triple; :class:`ExportWrapper` bakes that into the ONNX graph (see
:mod:`components.modelspec`).

Each head's count rule has one offset per decision it takes (:func:`decision_size`), zero for the
plain rule: argmax, "more than k" above one half, rounding. :func:`fit_decision_offsets` fits them
on validation outputs, and the export bakes them into the graph, so evaluation and serving count
with the rule that was fitted.

A temperature ``T`` (:mod:`components.training.calibration`) divides the raw output before the
probabilities (and so the expected count) only: the count is decided on the raw output, so it is the
same with or without calibration.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
import torchvision
from torch import nn

from components.common import ConfigError
from components.modelspec import HEADS, INPUT_NAME, OUTPUT_NAMES


def head_dim(head: str, num_classes: int) -> int:
    """Number of raw outputs the head needs."""
    if head == "classification":
        return num_classes
    if head == "ordinal":
        return num_classes - 1
    if head == "regression":
        return 1
    raise ConfigError(f"head must be one of {list(HEADS)}, got {head!r}")


def build_model(num_classes: int, head: str = "classification", weights: str | None = None) -> nn.Module:
    """torchvision ResNet18 with the head's output size.

    ``weights="imagenet"`` loads torchvision's ImageNet weights (from the local cache or a download)
    and replaces the final layer; any failure to get them is a :class:`ConfigError` that says how to
    proceed. ``None`` trains from scratch.
    """
    out = head_dim(head, num_classes)
    if weights in (None, "none"):
        return torchvision.models.resnet18(weights=None, num_classes=out)
    if weights == "imagenet":
        try:
            model = torchvision.models.resnet18(weights=torchvision.models.ResNet18_Weights.IMAGENET1K_V1)
        except Exception as e:  # network, proxy, corrupt cache: all mean "no weights"
            raise ConfigError(
                "could not get torchvision's ImageNet weights for resnet18 "
                f"({type(e).__name__}: {e}); put them in $TORCH_HOME/hub/checkpoints "
                "or use --weights none to train from scratch"
            ) from e
        model.fc = nn.Linear(model.fc.in_features, out)
        return model
    path = Path(str(weights))
    if not path.is_file():
        raise ConfigError(f"--weights {weights!r}: expected imagenet, none or a path to a state dict")
    model = torchvision.models.resnet18(weights=None, num_classes=out)
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("model", state)
    missing, _ = model.load_state_dict(
        {k: v for k, v in state.items() if not k.startswith("fc.")}, strict=False
    )
    if any(not k.startswith("fc.") for k in missing):
        raise ConfigError(f"{path} does not hold a resnet18 backbone (missing {missing[:3]}...)")
    return model


def decision_size(head: str, num_classes: int) -> int:
    """How many offsets the head's count rule has: one per class (classification), else one per
    boundary between neighbouring classes (ordinal, regression)."""
    return num_classes if head == "classification" else num_classes - 1


def decode_outputs(
    raw: torch.Tensor,
    head: str,
    num_classes: int,
    offsets: torch.Tensor | None = None,
    temperature: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw head output -> ``(probabilities [N,C], class index [N] int64, expected index [N] float)``.

    ``offsets`` (:func:`decision_size` values, zeros = the plain rule) move only the index, and a
    positive offset always favours the higher side: classification adds them to the
    log-probabilities before the argmax, ordinal counts the thresholds with ``logit_k + offset_k > 0``,
    regression those with ``value + offset_k > k + 0.5``. Probabilities and expected index do not
    change.

    ``temperature`` (None = 1) divides the logits before the probabilities: ``softmax(raw / T)``,
    ordinal ``sigmoid(raw / T)``. It moves the probabilities and expected index only, never the index;
    the regression head has no temperature (it is ignored there).
    """
    idx_values = torch.arange(num_classes, dtype=raw.dtype, device=raw.device)
    if offsets is not None:
        offsets = offsets.to(device=raw.device, dtype=raw.dtype)
    scaled = raw if temperature is None else raw / temperature
    if head == "classification":
        probs = torch.softmax(scaled, dim=1)
        score = raw if offsets is None else torch.log_softmax(raw, dim=1) + offsets[None, :]
        index = score.argmax(dim=1)
    elif head == "ordinal":
        gt = torch.sigmoid(raw)  # P(y > k), k = 0..C-2
        index = (gt > 0.5).sum(dim=1) if offsets is None else (raw + offsets[None, :] > 0).sum(dim=1)
        if temperature is not None:
            gt = torch.sigmoid(scaled)
        ones = torch.ones_like(gt[:, :1])
        zeros = torch.zeros_like(gt[:, :1])
        upper = torch.cat([ones, gt], dim=1)  # P(y >= k)
        lower = torch.cat([gt, zeros], dim=1)  # P(y > k)
        probs = (upper - lower).clamp_min(0)
        probs = probs / probs.sum(dim=1, keepdim=True).clamp_min(1e-12)
    elif head == "regression":
        r = raw[:, 0].clamp(0, num_classes - 1)
        probs = (1 - (r[:, None] - idx_values[None, :]).abs()).clamp_min(0)
        probs = probs / probs.sum(dim=1, keepdim=True).clamp_min(1e-12)
        if offsets is None:
            index = torch.round(r).long()
        else:
            index = (r[:, None] + offsets[None, :] > idx_values[None, :-1] + 0.5).sum(dim=1)
    else:
        raise ConfigError(f"head must be one of {list(HEADS)}, got {head!r}")
    expected = (probs * idx_values[None, :]).sum(dim=1)
    return probs, index.long(), expected


def decision_grid(head: str) -> torch.Tensor:
    """Offsets tried per coordinate: logit / log-probability units for classification and ordinal
    (an ordinal "more than k" threshold from 0.18 to 0.82), class-index units for regression."""
    if head == "regression":
        return torch.arange(-9, 10) / 20
    return torch.arange(-15, 16) / 10


@torch.no_grad()
def fit_decision_offsets(
    raw: torch.Tensor,
    target_index: torch.Tensor,
    head: str,
    num_classes: int,
    objective: str = "accuracy",
    min_gain: float = 0.005,
    max_rounds: int = 4,
) -> torch.Tensor:
    """Offsets that raise accuracy (or lower the squared error, ``objective="rmse"``) on
    ``(raw, target_index)``: validation outputs, never test.

    Why: a head trained for a smooth loss need not count best at its plain rule (the ordinal head's
    one-half thresholds under-predict the largest class, whose images look like the next one down).
    Coordinate ascent from zero over :func:`decision_grid`: per decision, the best value (objective,
    then the other metric, then the smaller offset) is kept only if it improves the objective by at
    least ``min_gain`` (accuracy: half a point by default, ~4 of 876 validation images; mean squared
    error: 0.005 items²), so sampling noise is not fitted.
    """
    raw = raw.detach().float().cpu()
    y = target_index.detach().long().cpu()
    if raw.shape[0] != y.shape[0] or raw.shape[0] == 0:
        raise ConfigError(f"need one target per output row, got {raw.shape[0]} rows and {y.shape[0]} targets")
    if min_gain < 0:
        raise ConfigError(f"min_gain must be >= 0, got {min_gain}")
    if objective not in ("accuracy", "rmse"):
        raise ConfigError(f"objective must be accuracy or rmse, got {objective!r}")
    offsets = torch.zeros(decision_size(head, num_classes))

    def score(o: torch.Tensor) -> tuple[float, float, float]:
        _, index, _ = decode_outputs(raw, head, num_classes, o)
        acc, neg_mse = float((index == y).float().mean()), -float(((index - y).float() ** 2).mean())
        return (
            (acc, neg_mse, -float(o.abs().sum()))
            if objective == "accuracy"
            else (neg_mse, acc, -float(o.abs().sum()))
        )

    best = score(offsets)
    grid = decision_grid(head)
    # classification: offsets are relative, so the first class stays at zero
    coords = range(1, len(offsets)) if head == "classification" else range(len(offsets))
    for _ in range(max_rounds):
        changed = False
        for k in coords:
            trials = []
            for value in grid:
                trial = offsets.clone()
                trial[k] = value
                trials.append((score(trial), trial))
            s, trial = max(trials, key=lambda t: t[0])
            if s[0] >= best[0] + min_gain:
                best, offsets, changed = s, trial, True
        if not changed:
            break
    return offsets


class ExportWrapper(nn.Module):
    """Model + head decoding (with the fitted decision offsets and temperature, if any), in count units.

    A temperature of None or 1 leaves the graph as it was without calibration."""

    def __init__(
        self,
        model: nn.Module,
        head: str,
        classes: tuple[int, ...] | list[int],
        offsets: Sequence[float] | None = None,
        *,
        temperature: float | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.head = head
        self.num_classes = len(classes)
        self.first_class = int(classes[0])
        self.offsets: torch.Tensor | None
        if offsets is None:
            self.offsets = None
        else:
            if len(offsets) != decision_size(head, self.num_classes):
                raise ConfigError(
                    f"the {head} head over {self.num_classes} classes takes "
                    f"{decision_size(head, self.num_classes)} decision offsets, got {len(offsets)}"
                )
            self.register_buffer("offsets", torch.tensor([float(o) for o in offsets]))
        if temperature is not None and not float(temperature) > 0:
            raise ConfigError(f"the temperature must be > 0, got {temperature}")
        if head == "regression" and temperature not in (None, 1.0):
            raise ConfigError(f"the regression head has no temperature, got {temperature}")
        self.temperature: torch.Tensor | None
        if temperature is None or float(temperature) == 1.0:
            self.temperature = None
        else:
            self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        probs, index, expected = decode_outputs(
            self.model(x), self.head, self.num_classes, self.offsets, self.temperature
        )
        return probs, index + self.first_class, expected + self.first_class


def export_onnx(
    model: nn.Module,
    head: str,
    classes: tuple[int, ...] | list[int],
    image_size: int,
    path: str | os.PathLike[str],
    opset: int = 17,
    offsets: Sequence[float] | None = None,
    temperature: float | None = None,
) -> Path:
    """Export to ONNX with a dynamic batch axis; written atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = ExportWrapper(model, head, classes, offsets, temperature=temperature).eval().to("cpu").float()
    dummy = torch.zeros(2, 3, image_size, image_size)
    # A unique temp name in the target directory: concurrent exports never share it, and the rename
    # stays on one filesystem (atomic).
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        # mkstemp makes 0600 files; the model must be readable by a server running under another UID.
        os.fchmod(fd, 0o644)
        os.close(fd)
        with torch.no_grad():
            torch.onnx.export(
                wrapper,
                (dummy,),
                str(tmp),
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_axes={INPUT_NAME: {0: "batch"}, **{n: {0: "batch"} for n in OUTPUT_NAMES}},
                opset_version=opset,
                dynamo=False,
            )
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
