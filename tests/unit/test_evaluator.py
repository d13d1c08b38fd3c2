"""The evaluator: equal to the reference loop, exact warm start (held or replayed), deterministic generations."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

from darwinlm.core.mutation import sample_offspring
from darwinlm.core.rng import derive_rng
from darwinlm.llm.data import sample_at_least, sample_exact
from darwinlm.llm.fitness import TeacherCache
from darwinlm.run.runner import run_search
from darwinlm.run.search import Evaluator, nested_train_batches, run_generation
from darwinlm.spec import load_spec, with_overrides
from darwinlm.store import open_store

from ..conftest import tiny_spec_dict

_ROOT = pathlib.Path(__file__).resolve().parents[2]

STAGES = [{"survivors": 3, "fitness_tokens": 96, "finetune_tokens": 64},
          {"survivors": 2, "fitness_tokens": 128, "finetune_tokens": 160},
          {"survivors": 1, "fitness_tokens": 192, "finetune_tokens": 320}]


def _reference_module():
    spec = importlib.util.spec_from_file_location("bench_baselines_eval", _ROOT / "bench" / "baselines_eval.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def ws(tiny_assets, tmp_path_factory):
    spec = load_spec(tiny_spec_dict(tiny_assets, f"file://{tmp_path_factory.mktemp('ev')}",
                                    **{"search.generations": 1, "search.selection": STAGES,
                                       "search.finetune.lr": 1e-3}))
    return run_search(spec, until=lambda t: t.kind == "generation")  # database only


def _spec(ws, **over):
    return with_overrides(ws.spec, **{f"search.finetune.{k}": v for k, v in over.items()})


def _evaluator(ws, spec, **kw):
    teacher = TeacherCache(ws.model, spec.model.compute_dtype, kind=spec.search.fitness.kind)
    return Evaluator(ws.builder, teacher, spec.search, spec.model.compute_dtype, **kw)


def _kids(ws, n=4):
    parent = ws.uniform_genome()
    return parent, sample_offspring(parent, ws.space, n, derive_rng(0, "test-kids"), max_flips=3)


def test_nested_train_batches_are_prefixes(ws):
    pool = ws.pools.finetune
    b = nested_train_batches(pool, [64, 0, 160, 320, 100], derive_rng(0, "x"))
    assert b[1] == []
    for short, long in ((b[0], b[2]), (b[2], b[3]), (b[4], b[3])):
        assert len(short) <= len(long) and all(x is y for x, y in zip(short, long))
    for batch, t in zip(b, [64, 0, 160, 320, 100]):
        if t:
            assert sum(int(c.numel()) for c in batch) >= t > sum(int(c.numel()) for c in batch[:-1])
    # stage 0 draws what the non-warm sampler draws
    assert [id(c) for c in b[0]] == [id(c) for c in sample_at_least(pool, 64, derive_rng(0, "x"))]
    # whole optimiser steps
    b3 = nested_train_batches(pool, [64, 160], derive_rng(0, "x"), batch_size=3)
    assert all(len(x) % 3 == 0 for x in b3) and all(x is y for x, y in zip(b3[0], b3[1]))


@pytest.mark.parametrize("fused", [False, True])
def test_evaluator_equals_the_reference_loop(ws, fused):
    """mask mode, cold: the same fitness as deep copy + reload from disk + fine-tune + KL."""
    ref_mod = _reference_module()
    spec = _spec(ws, mode="mask", warm_start=False)
    parent, kids = _kids(ws)
    train = sample_at_least(ws.pools.finetune, 160, derive_rng(0, "t"))
    fit = sample_exact(ws.pools.calibration, 128, derive_rng(0, "f"))
    ref = ref_mod.ReferenceEvaluator(ws.model, ws.db, parent, kids, spec.search, "float32")
    try:
        expected = [ref(g, train, fit) for g in [*kids, parent]]
    finally:
        ref.close()
    ev = _evaluator(ws, spec, fused=fused)
    got = [ev(g, train, fit) for g in [*kids, parent]]  # the work model is reused after the first
    assert ev.stats["built"] == len(got)
    assert got == pytest.approx(expected, rel=1e-5, abs=0.0)
    if not fused:
        assert got == pytest.approx(expected, rel=1e-6, abs=0.0)
    assert len(set(expected)) == len(expected)  # the candidates are told apart


@pytest.mark.parametrize("mode", ["shrink", "mask"])
def test_warm_start_replay_equals_held(ws, mode):
    """A survivor continued in memory and one rebuilt by replaying the prefix score the same."""
    spec = _spec(ws, mode=mode, warm_start=True)
    _, kids = _kids(ws, 2)
    trains = nested_train_batches(ws.pools.finetune, [s["finetune_tokens"] for s in STAGES], derive_rng(0, "n"))
    fits = [sample_exact(ws.pools.calibration, s["fitness_tokens"], derive_rng(0, "f", i)) for i, s in
            enumerate(STAGES)]
    held = _evaluator(ws, spec)
    scores_held = []
    for si in range(3):
        held.begin_stage(kids, 2 if si < 2 else 0)
        scores_held.append([held(g, trains[si], fits[si]) for g in kids])
    assert held.stats["built"] == 2 and held.stats["continued"] == 4
    assert held.held() == {}  # the last stage holds nothing
    for si in (1, 2):  # fresh evaluators: nothing held, every stage is a replay from the pruned weights
        fresh = _evaluator(ws, spec)
        fresh.begin_stage(kids, 2)
        replayed = [fresh(g, trains[si], fits[si]) for g in kids]
        assert fresh.stats["built"] == 2 and fresh.stats["continued"] == 0
        assert replayed == pytest.approx(scores_held[si], rel=1e-6, abs=0.0)
    # and equal to cold fine-tuning on the same (nested) batch: warm start is exact
    cold = _evaluator(ws, spec, warm_start=False)
    assert [cold(g, trains[2], fits[2]) for g in kids] == pytest.approx(scores_held[2], rel=1e-6, abs=0.0)


def test_held_state_is_not_reused_for_other_data(ws):
    spec = _spec(ws, warm_start=True)
    _, kids = _kids(ws, 1)
    g = kids[0]
    fit = sample_exact(ws.pools.calibration, 96, derive_rng(0, "f"))
    a = sample_at_least(ws.pools.finetune, 64, derive_rng(1, "a"))
    b = sample_at_least(ws.pools.finetune, 160, derive_rng(2, "b"))  # not an extension of a
    ev = _evaluator(ws, spec)
    ev.begin_stage([g], 1)
    ev(g, a, fit)
    assert list(ev.held().values()) == [len(a)]
    ev.begin_stage([g], 1)
    score = ev(g, b, fit)
    assert ev.stats["continued"] == 0 and ev.stats["built"] == 2
    assert score == pytest.approx(_evaluator(ws, spec, warm_start=False)(g, b, fit), rel=1e-6, abs=0.0)


def test_only_the_best_keep_are_held(ws):
    spec = _spec(ws, warm_start=True)
    _, kids = _kids(ws, 4)
    train = sample_at_least(ws.pools.finetune, 64, derive_rng(0, "t"))
    fit = sample_exact(ws.pools.calibration, 96, derive_rng(0, "f"))
    ev = _evaluator(ws, spec)
    ev.begin_stage(kids, 2)
    scores = [ev(g, train, fit) for g in kids]
    from darwinlm.run.search import genome_id
    from darwinlm.core.selection import select

    assert set(ev.held()) == {genome_id(kids[i]) for i in select(scores, 2)}
    ev.begin_stage([kids[select(scores, 2)[0]]], 1)
    assert set(ev.held()) == {genome_id(kids[select(scores, 2)[0]])}
    ev.release_all()
    assert ev.held() == {}


def _generation(ws, spec, ev, tmp_path, name, shard=None):
    store = open_store(f"file://{tmp_path / name}")
    res = run_generation(0, ws.uniform_genome(), ws.space, spec, ws.pools, ev, store, shard=shard)
    state = dict(res.state)
    state.pop("seconds")
    return state


def test_warm_and_cold_agree_without_finetune_tokens(ws, tmp_path):
    stages = [dict(s, finetune_tokens=0) for s in STAGES]
    scores = {}
    for warm in (False, True):
        spec = with_overrides(ws.spec, **{"search.selection": stages, "search.finetune.warm_start": warm})
        ev = _evaluator(ws, spec)
        scores[warm] = _generation(ws, spec, ev, tmp_path, f"w{warm}")
        assert ev.stats["train_chunks"] == 0
    assert scores[True] == scores[False]


def test_run_generation_warm_start_is_exact_and_deterministic(ws, tmp_path):
    spec = _spec(ws, warm_start=True)
    warm = _evaluator(ws, spec)
    a = _generation(ws, spec, warm, tmp_path, "a")
    assert warm.stats["continued"] > 0 and warm.held() == {}
    # cold fine-tuning on the same nested batches selects the same and scores the same
    cold = _generation(ws, spec, _evaluator(ws, spec, warm_start=False), tmp_path, "cold")
    assert [h["kept"] for h in cold["stages"]] == [h["kept"] for h in a["stages"]]
    for hc, ha in zip(cold["stages"], a["stages"]):
        assert hc["scores"] == pytest.approx(ha["scores"], rel=1e-6, abs=0.0)

    # two workers, round-robin by pool index (survivors usually change worker: replayed, same result)
    two = _TwoWorkers([_evaluator(ws, spec), _evaluator(ws, spec)])
    d = _generation(ws, spec, two, tmp_path, "d", shard=two.shard)
    assert d["winner"] == a["winner"] and [h["kept"] for h in d["stages"]] == [h["kept"] for h in a["stages"]]
    for hd, ha in zip(d["stages"], a["stages"]):
        assert hd["scores"] == pytest.approx(ha["scores"], rel=1e-6, abs=0.0)
    built = sum(w.stats["built"] for w in two.workers)
    assert built > warm.stats["built"]  # some survivors changed worker and were replayed


class _TwoWorkers:
    """A simulated 2-worker run in one process: ``shard`` gives pool item ``i`` to worker ``i % 2`` (as
    darwinlm.llm.distributed does); ``begin_stage`` reaches both workers' evaluators."""

    def __init__(self, workers):
        self.workers = workers
        self.current = None
        outer = self

        class Shard:
            is_writer = True

            def __call__(self, items, one):
                out = []
                for i, g in items:
                    outer.current = outer.workers[i % 2]
                    out.append(one(g))
                return out

        self.shard = Shard()

    def begin_stage(self, pool, keep):
        for w in self.workers:
            w.begin_stage(pool, keep)

    def __call__(self, genome, train, fit):
        return self.current(genome, train, fit)


@pytest.mark.parametrize("kind", ["kl", "topk_kl", "ppl"])
def test_fitness_matches_the_naive_formula(ws, kind):
    """The scoring shortcuts (one autocast region, decoded teacher cache) change nothing."""
    import math

    import torch
    import torch.nn.functional as F

    from darwinlm.llm.fitness import fitness

    _, kids = _kids(ws, 1)
    model = ws.builder.shrunk(kids[0])
    model.requires_grad_(False)
    chunks = sample_exact(ws.pools.calibration, 160, derive_rng(0, "naive"))
    teacher = TeacherCache(ws.model, "float32", kind=kind, topk=16)
    got = [fitness(kind, model, chunks, teacher, "float32") for _ in range(2)]  # 2nd: decoded cache hits
    assert got[0] == got[1]
    assert not any(p.requires_grad for p in model.parameters())
    total, n = 0.0, 0
    with torch.no_grad():
        for c in chunks:
            s = model(input_ids=c.view(1, -1)).logits[0, :-1].float()
            if kind == "ppl":
                total += float(F.cross_entropy(s, c[1:], reduction="sum"))
                n += c.numel() - 1
                continue
            t = F.log_softmax(ws.model(input_ids=c.view(1, -1)).logits[0, :-1].float(), -1).half().float()
            if kind == "topk_kl":
                vals, idx = t.topk(16, dim=-1)
                t, s = F.log_softmax(vals, -1), F.log_softmax(s.gather(-1, idx), -1)
            else:
                s = F.log_softmax(s, -1)
            kl = (t.exp() * (t - s)).sum(-1)
            total += float(kl.sum())
            n += kl.numel()
    naive = math.exp(total / n) if kind == "ppl" else total / n
    assert got[0] == pytest.approx(naive, rel=1e-5, abs=1e-7)
