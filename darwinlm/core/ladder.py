"""Level ladders: the nested prunings of one layer, and how a spec's levels or fractions become one.

Part of the search core (:mod:`darwinlm.core`; its docstring is the overview). A
level indexes a per-layer *ladder* of nested prunings (ALGORITHM.md §2.5): level 0 removes nothing,
the last level usually removes every unit. A ladder counts *units* (heads for attention, channels
for the MLP), never columns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction


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
