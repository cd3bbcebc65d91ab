"""Train the ResNet18 item counter and export it in the serving contract.

``python -m components.train --help`` lists the flags (:mod:`components.training.cli`). The code lives
in :mod:`components.training`; the names below are the Python API documented for this module.
"""

from __future__ import annotations

import sys

from components.training.cli import main
from components.training.config import CHECKPOINT_FILE, DONE_FILE, PRETRAIN_DIR, TrainConfig, TrainResult
from components.training.stages import backbone_info, pretrain_backbone, refit_train_val, train
from components.training.throughput import benchmark_throughput

__all__ = [
    "CHECKPOINT_FILE",
    "DONE_FILE",
    "PRETRAIN_DIR",
    "TrainConfig",
    "TrainResult",
    "backbone_info",
    "benchmark_throughput",
    "main",
    "pretrain_backbone",
    "refit_train_val",
    "train",
]

if __name__ == "__main__":
    sys.exit(main())
