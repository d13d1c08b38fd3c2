"""Level-switch mutation and duplicate-free offspring sampling (ALGORITHM.md §3.3).

Why this module exists: the mutation is what keeps every offspring inside the budget. A flip moves
one level *down* on one layer and one level *up* on another layer of the same group, so the level sum
of every group stays fixed and every level stays on its ladder. This is the EvoPress/DarwinLM
operator, kept faithful: flips = min(U{1..3}, U{1..3}) (P(1)=5/9, P(2)=3/9, P(3)=1/9), group chosen
∝ its size, the two genes chosen independently (they may coincide: a no-op flip).

Randomness comes only from the ``rng`` argument; callers derive it with
``darwinlm.core.rng.derive_rng(seed, "mutation", generation)`` so offspring are reproducible.
"""

from __future__ import annotations

import logging

import numpy as np

from darwinlm.core.genome import Genome, SearchSpace

__all__ = ["mutate", "sample_offspring", "can_mutate"]

log = logging.getLogger(__name__)


def _check(parent: Genome, space: SearchSpace, max_flips: int, step: int) -> None:
    if parent.space.layers != space.layers:
        raise ValueError("parent genome belongs to a different search space")
    if max_flips < 1:
        raise ValueError(f"max_flips must be >= 1, got {max_flips}")
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")


def mutate(
    parent: Genome, space: SearchSpace, rng: np.random.Generator, *, max_flips: int = 3, step: int = 1
) -> Genome:
    """One offspring of ``parent``: min(U{1..max_flips}, U{1..max_flips}) level-switch flips.

    Each flip: choose a group with probability ∝ its size, then, independently and uniformly, one
    of its genes that can go down by ``step`` and one that can go up by ``step``; apply -step and
    +step. A flip with no legal pair, or whose two picks coincide, changes nothing. The result may
    therefore equal the parent; ``sample_offspring`` filters those.
    """
    _check(parent, space, max_flips, step)
    groups = [space.group_indices[g] for g in space.groups]
    sizes = np.array([len(idx) for idx in groups], dtype=float)
    weights = sizes / sizes.sum()
    maxes = space.max_levels
    levels = list(parent.levels)
    flips = min(int(rng.integers(1, max_flips + 1)), int(rng.integers(1, max_flips + 1)))
    for _ in range(flips):
        idx = groups[int(rng.choice(len(groups), p=weights))]
        down = [i for i in idx if levels[i] - step >= 0]
        up = [i for i in idx if levels[i] + step <= maxes[i]]
        if not down or not up:
            continue
        i = down[int(rng.integers(len(down)))]
        k = up[int(rng.integers(len(up)))]
        if i != k:
            levels[i] -= step
            levels[k] += step
    return Genome(space, tuple(levels))


def can_mutate(parent: Genome, space: SearchSpace, *, step: int = 1) -> bool:
    """Whether any single flip changes ``parent`` (some group has two distinct movable genes)."""
    maxes = space.max_levels
    for idx in space.group_indices.values():
        down = {i for i in idx if parent.levels[i] - step >= 0}
        up = {i for i in idx if parent.levels[i] + step <= maxes[i]}
        if down and up and (len(down) > 1 or len(up) > 1 or down != up):
            return True
    return False


def sample_offspring(
    parent: Genome,
    space: SearchSpace,
    n: int,
    rng: np.random.Generator,
    *,
    max_flips: int = 3,
    step: int = 1,
    max_tries: int = 10_000,
) -> list[Genome]:
    """``n`` distinct offspring of ``parent``, none equal to it, in the order they were drawn.

    Duplicates of the parent or of an earlier offspring are dropped and drawn again (§3.3). A small
    space may hold fewer than ``n`` distinct neighbours: after ``max_tries`` draws (or at once when
    no flip can change the parent) the function returns the ones it found and logs a warning,
    instead of looping forever. The selection then runs on a smaller pool.
    """
    if n < 0 or max_tries < 0:
        raise ValueError(f"n and max_tries must be >= 0, got {n}, {max_tries}")
    _check(parent, space, max_flips, step)
    if n and not can_mutate(parent, space, step=step):
        log.warning("no mutation can change the parent: the search space has no neighbours")
        return []
    kids: list[Genome] = []
    seen = {parent}
    tries = 0
    while len(kids) < n and tries < max_tries:
        tries += 1
        child = mutate(parent, space, rng, max_flips=max_flips, step=step)
        if child not in seen:
            seen.add(child)
            kids.append(child)
    if len(kids) < n:
        log.warning("found only %d of %d distinct offspring after %d draws", len(kids), n, tries)
    return kids
