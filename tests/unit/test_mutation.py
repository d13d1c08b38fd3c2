"""Level-switch mutation: budget kept, levels legal, offspring distinct, results reproducible."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from darwinlm.core.budget import even_genome
from darwinlm.core.genome import Genome, SearchSpace
from darwinlm.core.ladder import Ladder, ladder_from
from darwinlm.core.mutation import can_mutate, mutate, sample_offspring
from darwinlm.core.rng import derive_rng

FAST = settings(max_examples=60, deadline=None)


@st.composite
def space_and_genome(draw):
    """A random space (1-3 groups, 1-6 layers each, uneven ladders) and a random legal genome."""
    rows = []
    for g in range(draw(st.integers(1, 3))):
        for j in range(draw(st.integers(1, 6))):
            levels = draw(st.integers(1, 6))
            units = draw(st.integers(max(levels - 1, 1), 30))
            steps = draw(st.sets(st.integers(1, units), min_size=levels - 1, max_size=levels - 1))
            rows.append((f"b{j}.g{g}", f"group{g}", Ladder(units, (0, *sorted(steps))), 1))
    space = SearchSpace.from_layers(draw(st.permutations(rows)))
    levels = [draw(st.integers(0, space.ladders[n].max_level)) for n in space.layers]
    return space, Genome(space, levels)


def uniform_space(n_layers=16, groups=(("mlp", 1), ("attn", 1))) -> SearchSpace:
    rows = []
    for i in range(n_layers):
        for g, every in groups:
            if i % every == 0:
                rows.append((f"model.layers.{i}.{g}", g, ladder_from(10, levels=11), 1))
    return SearchSpace.from_layers(rows)


def mid_parent(space: SearchSpace) -> Genome:
    return even_genome(space, {g: 5 * len(ls) for g, ls in space.groups.items()})


@FAST
@given(space_and_genome(), st.integers(0, 2**32), st.integers(1, 5), st.integers(1, 3))
def test_mutation_keeps_group_sums_and_bounds(case, seed, max_flips, step):
    space, parent = case
    rng = np.random.default_rng(seed)
    for _ in range(5):
        child = mutate(parent, space, rng, max_flips=max_flips, step=step)  # Genome checks bounds
        assert child.level_sums() == parent.level_sums()
        moved = [abs(a - b) for a, b in zip(child.levels, parent.levels) if a != b]
        assert all(m % step == 0 for m in moved)
        assert len(moved) <= 2 * max_flips


@FAST
@given(space_and_genome(), st.integers(0, 2**32), st.integers(0, 12))
def test_offspring_distinct_legal_and_not_parent(case, seed, n):
    space, parent = case
    kids = sample_offspring(parent, space, n, np.random.default_rng(seed), max_tries=300)
    assert len(kids) <= n
    assert len(set(kids)) == len(kids)
    assert parent not in kids
    assert all(k.level_sums() == parent.level_sums() for k in kids)


def test_flip_count_distribution():
    # min(U{1,3}, U{1,3}): P(1)=5/9, P(2)=3/9, P(3)=1/9. In a large mid-level space flips rarely
    # overlap, so a single flip shows up as exactly two changed layers.
    space = uniform_space(64, groups=(("mlp", 1),))
    parent = mid_parent(space)
    rng = np.random.default_rng(0)
    changed = [len(mutate(parent, space, rng).changed_layers(parent)) for _ in range(3000)]
    assert np.mean([c == 2 for c in changed]) == pytest.approx(5 / 9, abs=0.04)
    assert np.mean([c >= 5 for c in changed]) == pytest.approx(1 / 9, abs=0.03)
    assert max(changed) <= 6


def test_group_chosen_in_proportion_to_size():
    space = uniform_space(16, groups=(("mlp", 1), ("attn", 8)))  # 16 mlp genes, 2 attn genes
    parent = mid_parent(space)
    rng = np.random.default_rng(1)
    hits = {"mlp": 0, "attn": 0}
    for _ in range(2000):
        for name in mutate(parent, space, rng, max_flips=1).changed_layers(parent):
            hits[space.group_of(name)] += 1
    # Expected changed genes per draw: mlp 16/18 · 15/16 · 2, attn 2/18 · 1/2 · 2 → ratio 15.
    assert 10 < hits["mlp"] / hits["attn"] < 22


def test_small_space_returns_what_exists_and_warns(caplog):
    lad = Ladder(1, (0, 1))
    space = SearchSpace.from_layers([("a", "mlp", lad, 1), ("b", "mlp", lad, 1)])
    parent = Genome(space, (0, 1))
    with caplog.at_level(logging.WARNING, logger="darwinlm.core.mutation"):
        kids = sample_offspring(parent, space, 16, np.random.default_rng(0), max_tries=200)
    assert kids == [Genome(space, (1, 0))]
    assert "only 1 of 16" in caplog.text


def test_no_neighbours_returns_at_once(caplog):
    space = SearchSpace.from_layers([("a", "attn", Ladder(2, (0, 1, 2)), 1), ("b", "mlp", Ladder(2, (0, 2)), 1)])
    parent = Genome(space, (1, 1))
    assert not can_mutate(parent, space)
    with caplog.at_level(logging.WARNING, logger="darwinlm.core.mutation"):
        assert sample_offspring(parent, space, 4, np.random.default_rng(0)) == []
    assert "no mutation" in caplog.text
    assert sample_offspring(parent, space, 0, np.random.default_rng(0)) == []


def test_same_seed_path_same_offspring_and_generations_differ():
    space = uniform_space(16)
    parent = mid_parent(space)

    def offspring(generation):
        return sample_offspring(parent, space, 16, derive_rng(42, "mutation", generation))

    first = offspring(3)
    assert len(first) == 16
    assert offspring(3) == first
    assert offspring(4) != first


def test_rejects_bad_arguments():
    space = uniform_space(2)
    parent = mid_parent(space)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        mutate(parent, space, rng, max_flips=0)
    with pytest.raises(ValueError):
        mutate(parent, space, rng, step=0)
    with pytest.raises(ValueError):
        mutate(parent, uniform_space(3), rng)
    with pytest.raises(ValueError):
        sample_offspring(parent, space, -1, rng)
