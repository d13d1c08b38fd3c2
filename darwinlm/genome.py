"""The search space and its points: level ladders, the ``SearchSpace`` and immutable ``Genome``s.

Why this module exists: DarwinLM searches over one integer *level* per prunable layer (ALGORITHM.md
§3.1). A level indexes a per-layer *ladder* of nested prunings (§2.5): level 0 removes nothing, the
last level usually removes every unit (head or channel). Layers are split into groups by module type
("attn" = o_proj heads, "mlp" = down_proj channels), and the search keeps the sum of levels of each
group fixed (the level budget). Everything here is a pure function over immutable values; the
``SearchSpace`` is the precomputed table that says which levels are legal (HOUSE_STYLE.md 8).

Units: a ladder counts *units* (heads for attention, channels for the MLP), never columns; the
``unit_params`` of a layer is the number of parameters one unit carries (for parameter accounting).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from darwinlm.errors import InfeasibleTargetError

__all__ = [
    "Ladder",
    "ladder_from",
    "SearchSpace",
    "Genome",
    "level_sums_for_target",
    "even_genome",
    "random_feasible_genome",
    "removed_params",
    "removed_fraction",
    "prunable_params",
]


def _round_half_up(numerator: int, denominator: int) -> int:
    """round(numerator / denominator) with halves rounded up, in exact integer arithmetic."""
    return (2 * numerator + denominator) // (2 * denominator)


@dataclass(frozen=True)
class Ladder:
    """The nested pruning levels of one layer."""

    units: int
    """Prunable units of the layer: attention heads (o_proj) or intermediate channels (down_proj)."""

    removed: tuple[int, ...]
    """Units removed at each level: ``removed[0] == 0``, strictly increasing, last <= ``units``."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "removed", tuple(int(r) for r in self.removed))
        if self.units < 1:
            raise ValueError(f"ladder: units must be >= 1, got {self.units}")
        r = self.removed
        if not r or r[0] != 0:
            raise ValueError(f"ladder: removed must start with 0 (level 0 = dense), got {r}")
        if any(b <= a for a, b in zip(r, r[1:])):
            raise ValueError(f"ladder: removed must be strictly increasing, got {r}")
        if r[-1] > self.units:
            raise ValueError(f"ladder: removes {r[-1]} units at the last level, only {self.units}")

    @property
    def num_levels(self) -> int:
        """Number of levels, level 0 included."""
        return len(self.removed)

    @property
    def max_level(self) -> int:
        return len(self.removed) - 1

    def kept(self, level: int) -> int:
        """Units that remain at ``level``."""
        return self.units - self.removed[self._check(level)]

    def fraction(self, level: int) -> float:
        """Fraction of the units removed at ``level`` (0.0 at level 0)."""
        return self.removed[self._check(level)] / self.units

    def _check(self, level: int) -> int:
        if not 0 <= level < len(self.removed):
            raise ValueError(f"level {level} outside the ladder's 0..{self.max_level}")
        return level

    def to_dict(self) -> dict:
        return {"units": self.units, "removed": list(self.removed)}

    @classmethod
    def from_dict(cls, d: Mapping) -> Ladder:
        return cls(units=int(d["units"]), removed=tuple(d["removed"]))


def _units_at(f: Fraction, units: int, granularity: int) -> int:
    """Units removed at fraction ``f``: all at 1, else the nearest multiple of ``granularity``."""
    if f == 1:
        return units
    return min(_round_half_up(f.numerator * units, f.denominator * granularity) * granularity, units)


def ladder_from(
    units: int,
    *,
    levels: int | None = None,
    fractions: Sequence[float] | None = None,
    granularity: int = 1,
    name: str = "",
) -> Ladder:
    """Build a ladder from a level count, explicit fractions, or "auto" (both None).

    * ``levels=N``: fractions i/(N-1), i = 0..N-1 (equal steps, e.g. N=11 → 10% steps).
    * ``fractions``: explicit removed fractions, starting at 0.0, increasing, in [0, 1].
    * auto: one level per ``granularity`` units: removed = 0, g, 2g, ..., units.

    A fraction f removes ``round(f * units / g) * g`` units (halves up, exact decimal arithmetic),
    clipped to ``units``; f == 1.0 removes every unit even when ``units`` is not a multiple of g.
    Two levels that round to the same count raise ``ValueError`` naming ``name`` (the layer or
    module type), because a duplicate level would make the level budget meaningless.
    """
    where = f"ladder {name!r}" if name else "ladder"
    if units < 1 or granularity < 1:
        raise ValueError(f"{where}: units and granularity must be >= 1, got {units}, {granularity}")
    if levels is not None and fractions is not None:
        raise ValueError(f"{where}: give levels or fractions, not both")
    if levels is None and fractions is None:
        removed = list(range(0, units, granularity)) + [units]
        return Ladder(units=units, removed=tuple(removed))
    if levels is not None:
        if levels < 2:
            raise ValueError(f"{where}: levels must be >= 2, got {levels}")
        exact = [Fraction(i, levels - 1) for i in range(levels)]
    else:
        # str() first: 0.1 means one tenth, not the binary double closest to it.
        exact = [Fraction(f) if isinstance(f, int) else Fraction(str(float(f))) for f in fractions]
        if not exact or exact[0] != 0:
            raise ValueError(f"{where}: fractions must start with 0.0, got {list(fractions)}")
        if any(not 0 <= f <= 1 for f in exact) or any(b <= a for a, b in zip(exact, exact[1:])):
            raise ValueError(f"{where}: fractions must increase within [0, 1], got {list(fractions)}")
    removed = [_units_at(f, units, granularity) for f in exact]
    for i in range(1, len(removed)):
        if removed[i] <= removed[i - 1]:
            raise ValueError(
                f"{where}: levels {i - 1} and {i} both remove {removed[i]} of {units} units at "
                f"granularity {granularity}; use fewer levels or a finer granularity"
            )
    return Ladder(units=units, removed=tuple(removed))


@dataclass(frozen=True)
class SearchSpace:
    """The legal genomes: layers, their groups, ladders and parameter cost per unit."""

    layers: tuple[str, ...]
    """Prunable layer names in canonical order (block index, then module path)."""

    groups: dict[str, tuple[str, ...]]
    """Group name ("attn", "mlp") → its layers, in depth order. Each layer is in exactly one group.
    The level sum of each group is the budget the mutation keeps fixed."""

    ladders: dict[str, Ladder]
    """Layer name → its level ladder."""

    unit_params: dict[str, int]
    """Layer name → parameters removed per unit (e.g. a head: (q + o [+ k + v]) rows/cols)."""

    # Derived in __post_init__: the precomputed table of what is legal (read-only).
    layer_index: dict[str, int] = field(init=False, repr=False, compare=False)
    """Layer name → its position in ``layers`` (and in ``Genome.levels``)."""

    group_indices: dict[str, tuple[int, ...]] = field(init=False, repr=False, compare=False)
    """Group name → positions of its layers in ``layers``, in the group's depth order."""

    max_levels: tuple[int, ...] = field(init=False, repr=False, compare=False)
    """Highest legal level of each layer, aligned with ``layers`` (the lowest is always 0)."""

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "layers", tuple(self.layers))
        set_(self, "groups", {g: tuple(ls) for g, ls in self.groups.items()})
        set_(self, "ladders", dict(self.ladders))
        set_(self, "unit_params", {k: int(v) for k, v in self.unit_params.items()})
        if len(set(self.layers)) != len(self.layers):
            raise ValueError("search space: duplicate layer names")
        index = {name: i for i, name in enumerate(self.layers)}
        seen: dict[str, str] = {}
        for group, names in self.groups.items():
            if not names:
                raise ValueError(f"search space: group {group!r} is empty")
            for name in names:
                if name not in index:
                    raise ValueError(f"search space: group {group!r} lists unknown layer {name!r}")
                if name in seen:
                    raise ValueError(f"search space: layer {name!r} in groups {seen[name]!r} and {group!r}")
                seen[name] = group
        for what, table in (("groups", seen), ("ladders", self.ladders), ("unit_params", self.unit_params)):
            missing = [n for n in self.layers if n not in table]
            extra = [n for n in table if n not in index]
            if missing or extra:
                raise ValueError(f"search space: {what} missing {missing[:3]} / unknown {extra[:3]}")
        bad = [n for n, p in self.unit_params.items() if p < 1]
        if bad:
            raise ValueError(f"search space: unit_params must be >= 1, not for {bad[:3]}")
        set_(self, "layer_index", index)
        set_(self, "group_indices", {g: tuple(index[n] for n in ls) for g, ls in self.groups.items()})
        set_(self, "max_levels", tuple(self.ladders[n].max_level for n in self.layers))

    @classmethod
    def from_layers(cls, entries: Iterable[tuple[str, str, Ladder, int]]) -> SearchSpace:
        """Build from ``(layer, group, ladder, unit_params)`` rows in canonical layer order."""
        rows = list(entries)
        groups: dict[str, list[str]] = {}
        for name, group, _, _ in rows:
            groups.setdefault(group, []).append(name)
        return cls(
            layers=tuple(r[0] for r in rows),
            groups={g: tuple(ls) for g, ls in groups.items()},
            ladders={r[0]: r[2] for r in rows},
            unit_params={r[0]: r[3] for r in rows},
        )

    def group_of(self, layer: str) -> str:
        for group, names in self.groups.items():
            if layer in names:
                return group
        raise KeyError(layer)

    def num_levels(self, layer: str) -> int:
        return self.ladders[layer].num_levels

    def max_level_sum(self, group: str) -> int:
        """The largest level sum of ``group`` (every layer at its last level)."""
        return sum(self.max_levels[i] for i in self.group_indices[group])

    def to_dict(self) -> dict:
        return {
            "layers": list(self.layers),
            "groups": {g: list(ls) for g, ls in self.groups.items()},
            "ladders": {n: lad.to_dict() for n, lad in self.ladders.items()},
            "unit_params": dict(self.unit_params),
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> SearchSpace:
        return cls(
            layers=tuple(d["layers"]),
            groups={g: tuple(ls) for g, ls in d["groups"].items()},
            ladders={n: Ladder.from_dict(x) for n, x in d["ladders"].items()},
            unit_params=dict(d["unit_params"]),
        )


@dataclass(frozen=True, eq=False)
class Genome(Mapping[str, int]):
    """An immutable assignment layer → level; a read-only mapping, hashable, JSON via ``to_dict``.

    Equality and hash use the levels and the layer names (not the ladders), so genomes work as
    set members and dict keys for duplicate avoidance.
    """

    space: SearchSpace = field(repr=False)
    """The space the levels are legal in."""

    levels: tuple[int, ...]
    """One level per layer, aligned with ``space.layers``."""

    def __post_init__(self) -> None:
        levels = tuple(int(v) for v in self.levels)
        object.__setattr__(self, "levels", levels)
        maxes = self.space.max_levels
        if len(levels) != len(maxes):
            raise ValueError(f"genome: {len(levels)} levels for {len(maxes)} layers")
        for name, level, top in zip(self.space.layers, levels, maxes):
            if not 0 <= level <= top:
                raise ValueError(f"genome: level {level} of {name!r} outside 0..{top}")

    def __getitem__(self, layer: str) -> int:
        return self.levels[self.space.layer_index[layer]]

    def __iter__(self) -> Iterator[str]:
        return iter(self.space.layers)

    def __len__(self) -> int:
        return len(self.levels)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Genome):
            return NotImplemented
        return self.levels == other.levels and self.space.layers == other.space.layers

    def __hash__(self) -> int:
        return hash(self.levels)

    def level_sum(self, group: str) -> int:
        return sum(self.levels[i] for i in self.space.group_indices[group])

    def level_sums(self) -> dict[str, int]:
        return {g: self.level_sum(g) for g in self.space.groups}

    def with_levels(self, changes: Mapping[str, int]) -> Genome:
        """A copy with the levels of the named layers replaced."""
        levels = list(self.levels)
        for name, level in changes.items():
            levels[self.space.layer_index[name]] = level
        return Genome(self.space, tuple(levels))

    def changed_layers(self, other: Genome) -> list[str]:
        """Layers whose level differs from ``other`` (what a worker must reload), in layer order."""
        return [n for n, a, b in zip(self.space.layers, self.levels, other.levels) if a != b]

    def to_dict(self) -> dict[str, int]:
        return dict(zip(self.space.layers, self.levels))

    @classmethod
    def from_dict(cls, space: SearchSpace, d: Mapping[str, int]) -> Genome:
        missing = [n for n in space.layers if n not in d]
        extra = [n for n in d if n not in space.layer_index]
        if missing or extra:
            raise ValueError(f"genome: missing layers {missing[:3]}, unknown layers {extra[:3]}")
        return cls(space, tuple(d[n] for n in space.layers))


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
