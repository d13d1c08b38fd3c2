"""Explicit, derived randomness: one generator per (spec seed, purpose, generation, stage, ...).

Why this module exists: the search must give the same result for the same seed whether it runs
embedded on one GPU, on W workers, after a crash and resume, or on another platform (ARCHITECTURE.md
"Distributed execution"). So no code draws from the global ``random``/``np.random`` state; every
random choice gets its own generator derived from the spec seed and a *path* that names what the
randomness is for.

Path conventions (first element names the purpose, the rest index it):

* ``("init", i)``                          the i-th EvoPress initial genome (ALGORITHM.md §3.2)
* ``("mutation", generation)``             offspring sampling of a generation (§3.3)
* ``("fitness-batch", generation, stage)`` the fitness minibatch shared by a stage's pool (§3.4)
* ``("train-batch", generation, stage)``   the fine-tuning minibatch shared by a stage's pool (§3.4)
* ``("finetune", generation, stage, candidate)`` anything per candidate (dropout, torch seed)

Encoding (stable across processes, platforms and Python versions; never ``hash()``): the spec seed
is the ``SeedSequence`` entropy; every path part becomes fixed-width 32-bit words in the spawn key:
an int ``v`` (0 <= v < 2**64) → ``[0, low32(v), high32(v)]``; a str → ``[1, *sha256(utf-8)]`` as
eight little-endian words. The type tag keeps ``1`` and ``"1"`` apart, and the fixed widths keep
``("a", 1)`` and ``("a1",)`` (or ``(1, 2)`` and ``(2**32 + 1,)``) apart.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np

__all__ = ["derive_seed", "derive_rng", "PathPart"]

PathPart = int | str

_TAG_INT = 0
_TAG_STR = 1
_U64 = 1 << 64


def _as_u64(value: object, what: str) -> int:
    # bool is an int subclass; ("x", True) is almost certainly a bug, so reject it.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{what} must be an int, got {type(value).__name__}: {value!r}")
    v = int(value)
    if not 0 <= v < _U64:
        raise ValueError(f"{what} must be in [0, 2**64), got {v}")
    return v


def _words(part: PathPart, position: int) -> list[int]:
    if isinstance(part, str):
        digest = hashlib.sha256(part.encode("utf-8")).digest()
        return [_TAG_STR, *struct.unpack("<8I", digest)]
    v = _as_u64(part, f"path part {position}")
    return [_TAG_INT, v & 0xFFFFFFFF, v >> 32]


def derive_seed(seed: int, *path: PathPart) -> int:
    """A 63-bit seed derived from ``seed`` and ``path`` (fits a signed int64 and JSON).

    ``derive_seed(s, "mutation", 3)`` is the same number in every process and on every platform;
    different paths give independent seeds. ``seed`` must be in [0, 2**64).
    """
    entropy = _as_u64(seed, "seed")
    key: list[int] = []
    for position, part in enumerate(path):
        key.extend(_words(part, position))
    sequence = np.random.SeedSequence(entropy=entropy, spawn_key=tuple(key))
    low, high = (int(w) for w in sequence.generate_state(2, dtype=np.uint32))
    return ((high << 32) | low) >> 1


def derive_rng(seed: int, *path: PathPart) -> np.random.Generator:
    """A fresh ``numpy.random.Generator`` (PCG64) seeded with ``derive_seed(seed, *path)``."""
    return np.random.Generator(np.random.PCG64(derive_seed(seed, *path)))
