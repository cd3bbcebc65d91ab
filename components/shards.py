"""Shard assignment for a fanned-out ingest: which of N shards an image id belongs to.

The assignment is a pure function of the id, the same on every machine and Python version (no
``hash()``, whose salt changes per process): the first 8 bytes of the id's SHA-256, big-endian, mod N.
Every shard computes the same selection, then keeps the ids of its own shard, so N pods can each ingest
``--shard K --num-shards N`` into their own directory and :mod:`components.ingest_merge` joins them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from components.common import ConfigError


def shard_of(id_: str, n_shards: int) -> int:
    """The shard (in ``[0, n_shards)``) of image id ``id_``: ``int(sha256(id)[:8], big-endian) % n``.

    Ids are taken exactly as written (S3 stems: ``00001`` and ``1`` are different ids), UTF-8 encoded.
    """
    if n_shards < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")
    digest = hashlib.sha256(id_.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % n_shards


def check_shard(shard: int | None, num_shards: int | None) -> tuple[int, int]:
    """Validate ``--shard K --num-shards N`` (both or neither) and return ``(K, N)``; ``(0, 1)`` unsharded."""
    if shard is None and num_shards is None:
        return 0, 1
    if num_shards is None:
        raise ConfigError(f"--shard {shard} needs --num-shards N (the number of shards the ingest is cut in)")
    if shard is None:
        raise ConfigError(f"--num-shards {num_shards} needs --shard K (which shard this run ingests, 0..N-1)")
    if num_shards < 1:
        raise ConfigError(f"--num-shards must be >= 1, got {num_shards}")
    if not 0 <= shard < num_shards:
        raise ConfigError(
            f"--shard must be in [0, {num_shards}) for --num-shards {num_shards}, got {shard} "
            "(shards are numbered from 0)"
        )
    return shard, num_shards


class Fingerprint:
    """SHA-256 over a sequence of text lines: every shard of one selection computes the same value."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def add(self, *fields: object) -> None:
        self._h.update(("\t".join(str(f) for f in fields) + "\n").encode("utf-8"))

    def extend(self, lines: Iterable[tuple[object, ...]]) -> Fingerprint:
        for fields in lines:
            self.add(*fields)
        return self

    def hexdigest(self) -> str:
        return self._h.hexdigest()


__all__ = ["Fingerprint", "check_shard", "shard_of"]
