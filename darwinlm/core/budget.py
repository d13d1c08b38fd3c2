"""Level budgets: most-even and random genomes with given per-group level sums, targets, parameters.

Part of the search core (:mod:`darwinlm.core`; its docstring is the overview). The
search keeps the sum of levels of each group fixed (the level budget); this module turns a target
(a mean level or a removed-parameter fraction) into those sums, builds the starting genomes that
meet them (ALGORITHM.md §3.2), and counts the parameters a genome removes (``unit_params`` per
unit removed).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from darwinlm.core.genome import Genome, SearchSpace
from darwinlm.errors import InfeasibleTargetError


def _even_levels(maxes: Sequence[int], total: int) -> list[int]:
    """The most even levels with the given sum: water-filling up to each layer's cap.

    Every uncapped level is b or b+1; the r extra +1s go to the midpoints of r equal slices of the
    uncapped layers (floor((k + 1/2) * n / r)), so they spread across depth instead of piling up
    at the start.
    """
    top = max(maxes)
    base = 0
    while base < top and sum(min(base + 1, m) for m in maxes) <= total:
        base += 1
    levels = [min(base, m) for m in maxes]
    rest = total - sum(levels)
    free = [i for i, m in enumerate(maxes) if m > base]
    assert 0 <= rest < max(len(free), 1), (rest, free)
    for k in range(rest):
        levels[free[(2 * k + 1) * len(free) // (2 * rest)]] += 1
    return levels


def _checked_sums(space: SearchSpace, sums: Mapping[str, int]) -> dict[str, int]:
    if set(sums) != set(space.groups):
        raise ValueError(f"level sums for groups {sorted(sums)}, the space has {sorted(space.groups)}")
    for group, total in sums.items():
        top = space.max_level_sum(group)
        if not 0 <= total <= top:
            raise InfeasibleTargetError(f"group {group!r}: level sum {total} outside 0..{top}")
    return {g: int(sums[g]) for g in space.groups}


def even_genome(space: SearchSpace, sums: Mapping[str, int]) -> Genome:
    """The deterministic most-even genome with these per-group level sums (the "uniform" baseline).

    Inside a group levels differ by at most 1 (layers whose ladder is shorter sit at their cap).
    """
    levels = [0] * len(space.layers)
    for group, total in _checked_sums(space, sums).items():
        idx = space.group_indices[group]
        for i, level in zip(idx, _even_levels([space.max_levels[i] for i in idx], total)):
            levels[i] = level
    return Genome(space, tuple(levels))


def random_feasible_genome(space: SearchSpace, sums: Mapping[str, int], rng: np.random.Generator) -> Genome:
    """A random genome with these level sums, by EvoPress initialisation (ALGORITHM.md §3.2).

    Every gene starts at ceil(sum / size) (capped by its ladder); then, while a group is off its
    sum, a group is chosen among those off target with probability ∝ its size and a uniformly
    chosen gene of it is decremented (or incremented, only when caps left the start too low).
    """
    sums = _checked_sums(space, sums)
    maxes = space.max_levels
    levels = [0] * len(maxes)
    current: dict[str, int] = {}
    for group, total in sums.items():
        idx = space.group_indices[group]
        start = math.ceil(total / len(idx))
        for i in idx:
            levels[i] = min(start, maxes[i])
        current[group] = sum(levels[i] for i in idx)
    while True:
        off = [g for g in sums if current[g] != sums[g]]
        if not off:
            return Genome(space, tuple(levels))
        sizes = np.array([len(space.group_indices[g]) for g in off], dtype=float)
        group = off[int(rng.choice(len(off), p=sizes / sizes.sum()))]
        delta = -1 if current[group] > sums[group] else 1
        movable = [i for i in space.group_indices[group] if 0 <= levels[i] + delta <= maxes[i]]
        i = movable[int(rng.integers(len(movable)))]
        levels[i] += delta
        current[group] += delta


def _group_params(space: SearchSpace, group: str, levels: Sequence[int]) -> tuple[int, int]:
    """(removed, prunable) parameters of ``group`` when its layers sit at ``levels``."""
    removed = prunable = 0
    for name, level in zip(space.groups[group], levels):
        ladder, per_unit = space.ladders[name], space.unit_params[name]
        removed += per_unit * ladder.removed[level]
        prunable += per_unit * ladder.units
    return removed, prunable


def level_sums_for_target(
    space: SearchSpace, *, mean_level: float | None = None, fraction: float | None = None
) -> dict[str, int]:
    """Per-group level sums for a target given as a mean level or a removed-parameter fraction.

    * ``mean_level``: round(mean_level * group size), halves up (the paper's target level 5).
    * ``fraction``: per group, the sum S whose most-even genome (``even_genome``) removes the
      fraction of the group's prunable parameters closest to ``fraction``; ties go to the smaller
      S (prune less). With uneven ladders the level sum is not a parameter budget (§3.9-3), which
      is why the conversion goes through the ladders.

    Raises ``InfeasibleTargetError`` naming the group when the target is outside what its ladders
    can reach.
    """
    if (mean_level is None) == (fraction is None):
        raise ValueError("give exactly one of mean_level and fraction")
    sums: dict[str, int] = {}
    for group, names in space.groups.items():
        top = space.max_level_sum(group)
        if mean_level is not None:
            total = math.floor(mean_level * len(names) + 0.5)
            if not (math.isfinite(mean_level) and 0 <= total <= top):
                raise InfeasibleTargetError(
                    f"group {group!r}: mean level {mean_level} outside 0..{top / len(names):g}"
                )
            sums[group] = total
            continue
        maxes = [space.max_levels[space.layer_index[n]] for n in names]
        curve = []
        for total in range(top + 1):
            removed, prunable = _group_params(space, group, _even_levels(maxes, total))
            curve.append(removed / prunable)
        if not (math.isfinite(fraction) and 0 <= fraction <= curve[-1] + 1e-12):
            raise InfeasibleTargetError(
                f"group {group!r}: parameter fraction {fraction} outside 0..{curve[-1]:.6g}"
            )
        sums[group] = min(range(top + 1), key=lambda s: (abs(curve[s] - fraction), s))
    return sums


def prunable_params(space: SearchSpace) -> int:
    """Parameters the ladders could remove if every unit of every layer went."""
    return sum(space.unit_params[n] * space.ladders[n].units for n in space.layers)


def removed_params(space: SearchSpace, genome: Genome) -> int:
    """Parameters the genome removes (sum of unit_params × removed units over layers)."""
    return sum(
        space.unit_params[n] * space.ladders[n].removed[level]
        for n, level in zip(space.layers, genome.levels)
    )


def removed_fraction(space: SearchSpace, genome: Genome) -> float:
    """Removed parameters as a fraction of the *prunable* parameters (not of the whole model)."""
    return removed_params(space, genome) / prunable_params(space)


def cheapest_genome(space: SearchSpace, sums: Mapping[str, int], cost: Mapping[str, Sequence[float]]) -> Genome:
    """The genome with these per-group level sums whose summed per-layer ``cost`` is lowest.

    ``cost[layer][level]`` is the cost of putting ``layer`` at ``level`` (e.g. its measured one-shot KL
    when only that layer is pruned). Exact dynamic programming over each group's layers (knapsack with
    an equality constraint): O(layers × sum × levels). Ties are broken by level order (the lower
    level wins), so the result is deterministic.
    """
    sums = _checked_sums(space, sums)
    for name in space.layers:
        if name not in cost or len(cost[name]) != space.ladders[name].num_levels:
            raise ValueError(f"cost of {name!r}: expected {space.ladders[name].num_levels} levels, "
                             f"got {len(cost.get(name, ()))}")
    levels = [0] * len(space.layers)
    for group, total in sums.items():
        idx = space.group_indices[group]
        # best[k][s]: lowest cost of the first k layers with level sum s; choice[k][s]: level of layer k-1
        inf = math.inf
        best = np.full((len(idx) + 1, total + 1), inf)
        best[0, 0] = 0.0
        choice = np.zeros((len(idx) + 1, total + 1), dtype=np.int64)
        for k, i in enumerate(idx, start=1):
            row = np.asarray(cost[space.layers[i]], dtype=float)
            for s in range(total + 1):
                top = min(space.max_levels[i], s)
                cands = best[k - 1, s - np.arange(top + 1)] + row[: top + 1]
                j = int(np.argmin(cands))  # first minimum: the lowest level on ties
                best[k, s], choice[k, s] = cands[j], j
        if not math.isfinite(best[len(idx), total]):
            raise InfeasibleTargetError(f"group {group!r}: no assignment reaches level sum {total}")
        s = total
        for k in range(len(idx), 0, -1):
            levels[idx[k - 1]] = int(choice[k, s])
            s -= int(choice[k, s])
    return Genome(space, tuple(levels))
