"""The ``SearchSpace`` (the precomputed table of legal levels) and the immutable ``Genome``.

Part of the search core (:mod:`darwinlm.core`; its docstring is the overview).
Layers are split into groups by module type ("attn" = o_proj heads, "mlp" = down_proj channels);
a genome assigns one level per layer, legal when it lies on that layer's ladder (HOUSE_STYLE.md 8).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from darwinlm.core.ladder import Ladder


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
