"""The training losses: the count loss per head, and the distillation loss against a teacher."""

from __future__ import annotations

import torch
from torch import nn


def loss_fn(
    raw: torch.Tensor, target_index: torch.Tensor, head: str, num_classes: int, smoothing: float
) -> torch.Tensor:
    """Per head: CE with label smoothing; ordinal BCE over cumulative targets; smooth-L1 on the index."""
    raw = raw.float()
    if head == "classification":
        return nn.functional.cross_entropy(raw, target_index, label_smoothing=smoothing)
    if head == "ordinal":
        k = torch.arange(num_classes - 1, device=raw.device)
        target = (target_index[:, None] > k[None, :]).float()
        if smoothing:
            target = target * (1 - smoothing) + 0.5 * smoothing
        return nn.functional.binary_cross_entropy_with_logits(raw, target)
    return nn.functional.smooth_l1_loss(raw[:, 0], target_index.float())


def distill_loss(raw: torch.Tensor, teacher_raw: torch.Tensor, head: str, temperature: float) -> torch.Tensor:
    """How far the student's outputs are from the teacher's on the same augmented images.

    Classification: KL divergence of the softened class distributions; ordinal: BCE against the
    teacher's softened "more than k" probabilities; both scaled by T^2 so gradients keep their size.
    Regression: smooth-L1 to the teacher's predicted index.
    """
    raw, teacher_raw = raw.float(), teacher_raw.float()
    t = temperature
    if head == "classification":
        log_p = nn.functional.log_softmax(raw / t, dim=1)
        log_q = nn.functional.log_softmax(teacher_raw / t, dim=1)
        return nn.functional.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * t * t
    if head == "ordinal":
        target = torch.sigmoid(teacher_raw / t)
        return nn.functional.binary_cross_entropy_with_logits(raw / t, target) * t * t
    return nn.functional.smooth_l1_loss(raw[:, 0], teacher_raw[:, 0])
