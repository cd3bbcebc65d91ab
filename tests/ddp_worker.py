"""One rank of a distributed fit, run by tests/test_ddp.py under torchrun:

``python -m torch.distributed.run --nproc_per_node 2 -m tests.ddp_worker RECORD_DIR [--stop-after-epoch N]
-- TRAIN_FLAGS...``

trains with ``components.train``'s flags (its CLI, or ``train()`` when stopped) and records, in
``RECORD_DIR/rank<RANK>.json``, every path under ``--out`` this process created, wrote, renamed or removed
(Python's audit events: ``open`` for writing, ``os.rename``/``os.replace``, ``os.mkdir``, ``os.remove``).
``--stop-after-epoch N`` interrupts the run after epoch N (its checkpoint written), as a killed job would
leave it, and exits 0.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


class _InterruptedError(Exception):
    pass


def _recorder(out_dir: Path, written: set[str]) -> Any:
    root = str(out_dir.resolve())

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "open":
            path, mode, flags = args
            if not (mode and any(c in str(mode) for c in "wax+")) and not (flags or 0) & _WRITE_FLAGS:
                return
            paths = [path]
        elif event in ("os.rename", "os.replace"):
            paths = [args[0], args[1]]
        elif event in ("os.mkdir", "os.remove", "os.rmdir"):
            paths = [args[0]]
        else:
            return
        for p in paths:
            if isinstance(p, (str, os.PathLike)):
                full = os.path.abspath(os.fspath(p))
                if full == root or full.startswith(root + os.sep):
                    written.add(os.path.relpath(full, root))

    return hook


def main(argv: list[str]) -> int:
    record_dir, rest = Path(argv[0]), argv[1:]
    stop_after = 0
    if rest[0] == "--stop-after-epoch":
        stop_after, rest = int(rest[1]), rest[2:]
    assert rest[0] == "--", rest
    flags = rest[1:]
    out_dir = Path(flags[flags.index("--out") + 1])
    written: set[str] = set()
    sys.addaudithook(_recorder(out_dir, written))
    rc = 0
    try:
        if stop_after:
            from components.training import distributed
            from components.training.cli import build_parser, config_from_args
            from components.training.stages import train

            def stop(epoch: int, metrics: dict[str, float]) -> None:
                if epoch >= stop_after:
                    raise _InterruptedError

            try:
                train(config_from_args(build_parser().parse_args(flags)), on_epoch=stop)
                rc = 1  # it should have been interrupted
            except _InterruptedError:
                pass
            finally:
                distributed.cleanup()
        else:
            from components.train import main as train_main

            rc = train_main(flags)
    finally:
        rank = os.environ.get("RANK", "0")
        record = {
            "rank": int(rank),
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "wrote": sorted(written),
        }
        (record_dir / f"rank{rank}.json").write_text(json.dumps(record))
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
