"""Ladders, the search space, genomes, targets and parameter accounting."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from darwinlm.core.budget import (
    even_genome,
    level_sums_for_target,
    prunable_params,
    random_feasible_genome,
    removed_fraction,
    removed_params,
)
from darwinlm.core.genome import Genome, SearchSpace
from darwinlm.core.ladder import Ladder, ladder_from
from darwinlm.errors import InfeasibleTargetError

FAST = settings(max_examples=60, deadline=None)


@st.composite
def ladders(draw, max_levels=6):
    levels = draw(st.integers(1, max_levels))
    units = draw(st.integers(max(levels - 1, 1), 40))
    steps = draw(st.sets(st.integers(1, units), min_size=levels - 1, max_size=levels - 1))
    return Ladder(units, (0, *sorted(steps)))


@st.composite
def spaces(draw, max_groups=3, max_layers=6):
    rows = []
    for g in range(draw(st.integers(1, max_groups))):
        for j in range(draw(st.integers(1, max_layers))):
            rows.append((f"b{j}.g{g}", f"group{g}", draw(ladders()), draw(st.integers(1, 100))))
    return SearchSpace.from_layers(draw(st.permutations(rows)))


@st.composite
def spaces_and_sums(draw):
    space = draw(spaces())
    sums = {g: draw(st.integers(0, space.max_level_sum(g))) for g in space.groups}
    return space, sums


def uniform_space(n_layers=8, levels=11, groups=("mlp", "attn")) -> SearchSpace:
    rows = []
    for i in range(n_layers):
        for g in groups:
            units = 32 if g == "attn" else 64
            rows.append((f"model.layers.{i}.{g}", g, ladder_from(units, levels=levels), 7 if g == "attn" else 3))
    return SearchSpace.from_layers(rows)


# ---------------------------------------------------------------- ladders


def test_ladder_accessors_and_validation():
    lad = Ladder(10, (0, 3, 10))
    assert (lad.num_levels, lad.max_level, lad.kept(1), lad.fraction(2)) == (3, 2, 7, 1.0)
    with pytest.raises(ValueError):
        lad.kept(3)
    for units, removed in [(10, (1, 2)), (10, (0, 5, 5)), (10, (0, 11)), (0, (0,)), (10, ())]:
        with pytest.raises(ValueError):
            Ladder(units, removed)


def test_ladder_from_reproduces_paper_lists():
    # ALGORITHM.md §2.5: 10% steps rounded to the granularity.
    assert ladder_from(14336, levels=11, granularity=32).removed == (
        0, 1440, 2880, 4288, 5728, 7168, 8608, 10048, 11456, 12896, 14336)
    assert ladder_from(13824, levels=11, granularity=32).removed == (
        0, 1376, 2752, 4160, 5536, 6912, 8288, 9664, 11072, 12448, 13824)
    # Llama-3.2-1B o_proj, in heads of 64 columns: 0 192 384 640 ... 2048 columns.
    heads = ladder_from(32, levels=11).removed
    assert tuple(64 * h for h in heads) == (0, 192, 384, 640, 832, 1024, 1216, 1408, 1664, 1856, 2048)


def test_ladder_from_fractions_and_auto():
    assert ladder_from(100, fractions=[0.0, 0.1, 0.5, 1.0], granularity=4).removed == (0, 12, 52, 100)
    assert ladder_from(100, granularity=32).removed == (0, 32, 64, 96, 100)
    assert ladder_from(8).removed == tuple(range(9))
    assert ladder_from(10, fractions=[0, 0.5]).removed == (0, 5)  # need not reach 1.0


@pytest.mark.parametrize(
    "kwargs",
    [dict(levels=11), dict(fractions=[0.0, 0.01, 1.0]), dict(fractions=[0.1, 1.0]),
     dict(fractions=[0.0, 0.5, 0.4]), dict(levels=3, fractions=[0, 1]), dict(levels=1)],
)
def test_ladder_from_rejects(kwargs):
    with pytest.raises(ValueError, match="mlp"):
        ladder_from(4, name="mlp", **kwargs)


# ---------------------------------------------------------------- space and genome


def test_space_validation():
    lad = Ladder(4, (0, 2, 4))
    ok = dict(layers=("a", "b"), groups={"x": ("a",), "y": ("b",)}, ladders={"a": lad, "b": lad},
              unit_params={"a": 1, "b": 1})
    SearchSpace(**ok)
    for bad in [
        dict(groups={"x": ("a", "b"), "y": ("b",)}),
        dict(groups={"x": ("a",)}),
        dict(groups={"x": ("a", "b"), "y": ()}),
        dict(ladders={"a": lad}),
        dict(unit_params={"a": 1, "b": 0}),
        dict(layers=("a", "a")),
    ]:
        with pytest.raises(ValueError):
            SearchSpace(**{**ok, **bad})


def test_space_json_round_trip():
    space = uniform_space(3)
    again = SearchSpace.from_dict(json.loads(json.dumps(space.to_dict())))
    assert again == space
    assert space.group_of("model.layers.2.attn") == "attn"
    assert space.num_levels("model.layers.0.mlp") == 11


def test_genome_is_an_immutable_hashable_mapping():
    space = uniform_space(2)
    g = Genome(space, (1, 2, 3, 4))
    assert dict(g) == g.to_dict() == {
        "model.layers.0.mlp": 1, "model.layers.0.attn": 2, "model.layers.1.mlp": 3, "model.layers.1.attn": 4}
    assert g["model.layers.1.mlp"] == 3 and len(g) == 4
    assert Genome.from_dict(space, json.loads(json.dumps(g.to_dict()))) == g
    assert {g, Genome(space, [1, 2, 3, 4])} == {g}
    assert (g.level_sum("mlp"), g.level_sum("attn"), g.level_sums()) == (4, 6, {"mlp": 4, "attn": 6})
    h = g.with_levels({"model.layers.0.mlp": 0})
    assert h.levels == (0, 2, 3, 4) and g.levels == (1, 2, 3, 4)
    assert h.changed_layers(g) == ["model.layers.0.mlp"]
    with pytest.raises(AttributeError):
        g.levels = (0, 0, 0, 0)
    for levels in [(1, 2, 3), (1, 2, 3, 11), (-1, 0, 0, 0)]:
        with pytest.raises(ValueError):
            Genome(space, levels)
    with pytest.raises(ValueError):
        Genome.from_dict(space, {"model.layers.0.mlp": 1})


# ---------------------------------------------------------------- even and random genomes


def test_even_genome_spreads_extras_across_depth():
    rows = [(f"l{i}", "mlp", ladder_from(10, levels=11), 1) for i in range(10)]
    space = SearchSpace.from_layers(rows)
    assert even_genome(space, {"mlp": 53}).levels == (5, 6, 5, 5, 5, 6, 5, 5, 6, 5)
    assert even_genome(space, {"mlp": 51}).levels == (5, 5, 5, 5, 5, 6, 5, 5, 5, 5)
    assert even_genome(space, {"mlp": 100}).levels == (10,) * 10


@FAST
@given(spaces_and_sums())
def test_even_genome_hits_sums_and_is_even(case):
    space, sums = case
    genome = even_genome(space, sums)
    assert genome.level_sums() == sums
    assert genome == even_genome(space, sums)
    for group, names in space.groups.items():
        levels = [genome[n] for n in names]
        caps = [space.ladders[n].max_level for n in names]
        uncapped = [lv for lv, cap in zip(levels, caps) if lv < cap]
        # Levels differ by at most 1, except layers held down by a shorter ladder.
        if uncapped:
            assert max(levels) - min(uncapped) <= 1
        if len(set(caps)) == 1:  # equal ladders: the +1s follow the ideal line within 1
            for j in range(len(levels) + 1):
                assert abs(sum(levels[:j]) - j * sums[group] / len(levels)) <= 1


@FAST
@given(spaces_and_sums(), st.integers(0, 2**32))
def test_random_feasible_genome_hits_sums(case, seed):
    space, sums = case
    genome = random_feasible_genome(space, sums, np.random.default_rng(seed))
    assert genome.level_sums() == sums  # bounds are checked by Genome itself
    assert genome == random_feasible_genome(space, sums, np.random.default_rng(seed))


def test_random_feasible_genome_varies_with_rng():
    space = uniform_space(8)
    sums = {"mlp": 41, "attn": 37}
    found = {random_feasible_genome(space, sums, np.random.default_rng(s)) for s in range(20)}
    assert len(found) > 10


def test_infeasible_sums_raise_naming_the_group():
    space = uniform_space(2)
    with pytest.raises(InfeasibleTargetError, match="attn"):
        even_genome(space, {"mlp": 3, "attn": 21})
    with pytest.raises(InfeasibleTargetError, match="mlp"):
        random_feasible_genome(space, {"mlp": -1, "attn": 0}, np.random.default_rng(0))
    with pytest.raises(ValueError):
        even_genome(space, {"mlp": 3})


# ---------------------------------------------------------------- targets and accounting


def test_level_sums_for_mean_level():
    space = uniform_space(8)
    assert level_sums_for_target(space, mean_level=5) == {"mlp": 40, "attn": 40}
    assert level_sums_for_target(space, mean_level=5.5) == {"mlp": 44, "attn": 44}
    assert level_sums_for_target(space, mean_level=0) == {"mlp": 0, "attn": 0}


def test_level_sums_for_fraction_on_equal_steps_matches_levels():
    space = uniform_space(8)  # 10% steps, attn 32 heads → exact multiples only at some levels
    sums = level_sums_for_target(space, fraction=0.5)
    assert sums == {"mlp": 40, "attn": 40}
    assert removed_fraction(space, even_genome(space, sums)) == pytest.approx(0.5)
    assert level_sums_for_target(space, fraction=1.0) == {"mlp": 80, "attn": 80}


@pytest.mark.parametrize("kwargs", [dict(mean_level=10.5), dict(mean_level=-1), dict(fraction=1.01),
                                    dict(fraction=-0.1), dict(fraction=float("nan"))])
def test_level_sums_for_target_out_of_range(kwargs):
    with pytest.raises(InfeasibleTargetError, match="mlp"):
        level_sums_for_target(uniform_space(2), **kwargs)


def test_fraction_beyond_a_short_ladder_is_infeasible():
    space = SearchSpace.from_layers([("a", "mlp", Ladder(10, (0, 2, 4)), 1), ("b", "mlp", Ladder(10, (0, 5)), 1)])
    assert level_sums_for_target(space, fraction=0.45) == {"mlp": 3}
    with pytest.raises(InfeasibleTargetError, match="mlp"):
        level_sums_for_target(space, fraction=0.5)
    with pytest.raises(ValueError):
        level_sums_for_target(space, fraction=0.1, mean_level=1)


def _group_fraction(space, group, total):
    """Removed fraction of ``group``'s prunable parameters at its most even genome with ``total``."""
    genome = even_genome(space, {**{k: 0 for k in space.groups}, group: total})
    prunable = sum(space.unit_params[n] * space.ladders[n].units for n in space.groups[group])
    return removed_params(space, genome) / prunable


@FAST
@given(spaces(), st.floats(0, 1))
def test_level_sums_for_fraction_is_closest(space, fraction):
    reach = {g: _group_fraction(space, g, space.max_level_sum(g)) for g in space.groups}
    if any(fraction > r + 1e-12 for r in reach.values()):
        with pytest.raises(InfeasibleTargetError):
            level_sums_for_target(space, fraction=fraction)
        return
    sums = level_sums_for_target(space, fraction=fraction)
    for group, total in sums.items():
        errors = [abs(_group_fraction(space, group, s) - fraction) for s in range(space.max_level_sum(group) + 1)]
        assert errors[total] == min(errors)
        assert errors.index(min(errors)) == total  # ties go to the smaller sum


def test_parameter_accounting():
    space = SearchSpace.from_layers([
        ("a", "attn", Ladder(4, (0, 1, 4)), 100),
        ("m", "mlp", Ladder(10, (0, 5, 10)), 3),
    ])
    g = Genome(space, (1, 2))
    assert prunable_params(space) == 4 * 100 + 10 * 3
    assert removed_params(space, g) == 1 * 100 + 10 * 3
    assert removed_fraction(space, g) == pytest.approx(130 / 430)


# ---------------------------------------------------------------- cheapest genome (sensitivity start)


def _brute_force(space, sums, cost):
    import itertools

    best = None
    for levels in itertools.product(*[range(m + 1) for m in space.max_levels]):
        g = Genome(space, levels)
        if g.level_sums() != sums:
            continue
        c = sum(cost[n][g[n]] for n in space.layers)
        if best is None or c < best[0] - 1e-12:
            best = (c, g)
    return best


@FAST
@given(st.data())
def test_cheapest_genome_is_the_exact_optimum(data):
    from darwinlm.core.budget import cheapest_genome

    space = data.draw(spaces(max_groups=2, max_layers=3))
    sums = {g: data.draw(st.integers(0, space.max_level_sum(g))) for g in space.groups}
    cost = {n: [0.0] + data.draw(st.lists(st.floats(0, 10, allow_nan=False), min_size=space.ladders[n].max_level,
                                          max_size=space.ladders[n].max_level)) for n in space.layers}
    g = cheapest_genome(space, sums, cost)
    assert g.level_sums() == sums
    best_cost, _ = _brute_force(space, sums, cost)
    assert sum(cost[n][g[n]] for n in space.layers) == pytest.approx(best_cost, abs=1e-9)


def test_cheapest_genome_prunes_the_cheap_layers_and_rejects_bad_tables():
    from darwinlm.core.budget import cheapest_genome

    space = uniform_space(n_layers=4, levels=5)
    # layer i costs (i + 1) per level in both groups: the cheapest spread puts the budget on layer 0 first
    cost = {n: [float((int(n.split(".")[2]) + 1) * lvl) for lvl in range(5)] for n in space.layers}
    g = cheapest_genome(space, {"mlp": 6, "attn": 4}, cost)
    assert [g[f"model.layers.{i}.mlp"] for i in range(4)] == [4, 2, 0, 0]
    assert [g[f"model.layers.{i}.attn"] for i in range(4)] == [4, 0, 0, 0]
    bad = dict(cost)
    bad["model.layers.0.mlp"] = [0.0, 1.0]
    with pytest.raises(ValueError, match="model.layers.0.mlp"):
        cheapest_genome(space, {"mlp": 6, "attn": 4}, bad)
    with pytest.raises(InfeasibleTargetError, match="mlp"):
        cheapest_genome(space, {"mlp": 17, "attn": 4}, cost)
