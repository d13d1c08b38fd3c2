"""Selection: ordering, ties, failures, last-stage elitism, and the pure stage driver."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from darwinlm.core.budget import even_genome
from darwinlm.core.genome import Genome, SearchSpace
from darwinlm.core.ladder import ladder_from
from darwinlm.core.mutation import sample_offspring
from darwinlm.core.rng import derive_rng
from darwinlm.core.selection import PAPER_STAGES, Stage, run_selection, select, stage_pool

FAST = settings(max_examples=80, deadline=None)
NAN, INF = float("nan"), float("inf")


def make_space(n_layers=8) -> SearchSpace:
    rows = [(f"model.layers.{i}.{g}", g, ladder_from(10, levels=11), 1) for i in range(n_layers) for g in ("mlp", "attn")]
    return SearchSpace.from_layers(rows)


def make_generation(seed=0, n=16):
    space = make_space()
    parent = even_genome(space, {"mlp": 40, "attn": 40})
    return parent, sample_offspring(parent, space, n, derive_rng(seed, "mutation", 0))


# ---------------------------------------------------------------- select


def test_select_orders_and_breaks_ties_by_index():
    assert select([3.0, 1.0, 2.0, 1.0], 3) == [1, 3, 2]
    assert select([0.5, 0.5, 0.5], 2) == [0, 1]
    assert select([1.0], 0) == []


def test_failures_sort_last():
    assert select([NAN, 2.0, INF, -INF, 1.0], 5) == [4, 1, 0, 2, 3]
    assert select([NAN, 5.0], 1) == [1]
    with pytest.raises(ValueError):
        select([1.0], 2)


scores_st = st.lists(st.one_of(st.floats(-1e6, 1e6), st.sampled_from([NAN, INF, -INF, 0.0, 1.0])), max_size=20)


@FAST
@given(scores_st, st.data())
def test_select_matches_a_stable_sort(scores, data):
    k = data.draw(st.integers(0, len(scores)))
    kept = select(scores, k)
    finite = [i for i, s in enumerate(scores) if math.isfinite(s)]
    failed = [i for i, s in enumerate(scores) if not math.isfinite(s)]
    assert kept == (sorted(finite, key=lambda i: scores[i]) + failed)[:k]


# ---------------------------------------------------------------- stages and elitism


def test_stage_validation_and_paper_schedule():
    assert [s.survivors for s in PAPER_STAGES] == [8, 4, 2, 1]
    for bad in [dict(survivors=0), dict(fitness_tokens=0), dict(finetune_tokens=-1)]:
        with pytest.raises(ValueError):
            Stage(**{"survivors": 1, "fitness_tokens": 1, "finetune_tokens": 0, **bad})


def test_parent_joins_only_the_last_stage_pool():
    parent, kids = make_generation()
    for s in range(len(PAPER_STAGES)):
        pool = stage_pool(kids[:4], parent, s, PAPER_STAGES)
        assert (parent in pool) == (s == len(PAPER_STAGES) - 1)
    assert stage_pool([parent, *kids[:2]], parent, 3, PAPER_STAGES) == [parent, *kids[:2]]  # no duplicate


class ScoreTable:
    """A deterministic evaluate(): a fixed fitness per genome, plus a record of every call."""

    def __init__(self, table: dict[Genome, float]):
        self.table, self.calls = table, []

    def __call__(self, stage: int, pool: list[Genome]) -> list[float]:
        self.calls.append((stage, list(pool)))
        return [self.table[g] for g in pool]


@FAST
@given(st.integers(0, 2**16), st.permutations(range(17)))
def test_elitism_parent_wins_iff_it_is_best(seed, ranks):
    parent, kids = make_generation(seed)
    table = dict(zip([parent, *kids], map(float, ranks)))  # distinct scores
    evaluate = ScoreTable(table)
    winner, history = run_selection(kids, parent, PAPER_STAGES, evaluate)

    # The parent is evaluated exactly once, in the last stage, and the pools shrink 16 → 8 → 4 → 2+1.
    assert [len(pool) for _, pool in evaluate.calls] == [16, 8, 4, 3]
    assert [parent in pool for _, pool in evaluate.calls] == [False, False, False, True]
    assert [h["parent_index"] for h in history] == [None, None, None, 2]
    best_kid = min(kids, key=table.get)
    assert winner == (parent if table[parent] < table[best_kid] else best_kid)


def test_failed_candidates_and_failed_final_stage():
    parent, kids = make_generation(n=4)
    stages = [Stage(2, 8, 0), Stage(1, 8, 0)]
    table = {parent: 1.0, kids[0]: NAN, kids[1]: 0.5, kids[2]: INF, kids[3]: 2.0}
    winner, history = run_selection(kids, parent, stages, ScoreTable(table))
    assert winner == kids[1]
    assert history[0]["scores"] == [None, 0.5, None, 2.0]
    json.dumps(history, allow_nan=False)

    with pytest.raises(ValueError, match="failed"):
        run_selection(kids, parent, stages, lambda s, pool: [NAN] * len(pool))


def test_no_offspring_keeps_the_parent():
    parent, _ = make_generation()
    evaluate = ScoreTable({parent: 3.0})
    winner, history = run_selection([], parent, PAPER_STAGES, evaluate)
    assert winner == parent
    assert [s for s, _ in evaluate.calls] == [3]  # empty pools are not evaluated
    assert [len(h["pool"]) for h in history] == [0, 0, 0, 1]


def test_history_is_json_and_complete():
    parent, kids = make_generation()
    table = {g: float(i) for i, g in enumerate([parent, *kids])}
    winner, history = run_selection(kids, parent, PAPER_STAGES, ScoreTable(table))
    assert winner == parent  # score 0.0: the elitist parent survives
    again = json.loads(json.dumps(history, allow_nan=False))
    assert [h["stage"] for h in again] == [0, 1, 2, 3]
    assert again[-1]["kept"] == [2]
    assert Genome.from_dict(parent.space, again[-1]["pool"][2]) == parent
    for h in again:
        kept_scores = [h["scores"][i] for i in h["kept"]]
        assert kept_scores == sorted(h["scores"])[: len(h["kept"])]


def test_driver_rejects_bad_schedules_and_callbacks():
    parent, kids = make_generation(n=4)
    with pytest.raises(ValueError):
        run_selection(kids, parent, [Stage(2, 8, 0)], lambda s, p: [0.0] * len(p))
    with pytest.raises(ValueError):
        run_selection(kids, parent, [], lambda s, p: [])
    with pytest.raises(ValueError, match="scores"):
        run_selection(kids, parent, [Stage(1, 8, 0)], lambda s, p: [0.0])


def test_same_seed_same_winner():
    def generation(seed):
        parent, kids = make_generation(seed)
        scorer = derive_rng(seed, "fake-fitness")  # a stand-in fitness drawn once per genome
        table = {g: float(scorer.random()) for g in [parent, *kids]}
        return run_selection(kids, parent, PAPER_STAGES, ScoreTable(table))

    assert generation(7) == generation(7)
    assert generation(7)[1] != generation(8)[1]
