"""One generation of the training-aware evolutionary search (ALGORITHM.md §3), over the store.

Why this module exists: it joins the pure search core (mutation, selection) with the expensive parts
(building, fine-tuning and scoring candidates) and with persistence. A generation is an idempotent task:
every evaluated candidate writes ``generations/<g>/results/s<stage>-<genome>.json`` and the generation
ends by writing ``generations/<g>/state.json``. A re-run skips what exists, so a crash loses at most the
candidate being evaluated, and the final result is bit-identical to an uninterrupted run: every random
choice derives from (seed, generation, stage[, candidate]) and never from process state.

Evaluation keeps ONE resident dense base model; each candidate is built from it (physically shrunk, or
dense-shaped and masked) with the database weights of its levels, fine-tuned, scored against the cached
dense outputs, and dropped. Nothing is deep-copied or reloaded from disk per candidate.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .adapter import adapter_for
from .data import sample_at_least, sample_exact
from .fitness import TeacherCache, fitness
from .genome import Genome, SearchSpace, even_genome, level_sums_for_target, random_feasible_genome
from .mutation import sample_offspring
from .rng import derive_rng
from .selection import Stage, run_selection
from .shrink import LayerShrink, mask_model, shrink_model
from .train import ColumnMask, finetune

log = logging.getLogger(__name__)

__all__ = ["build_space", "target_sums", "initial_parent", "CandidateBuilder", "Evaluator",
           "run_generation", "genome_id", "state_key"]


def state_key(g: int) -> str:
    return f"generations/{g:05d}/state.json"


def genome_id(genome: Genome) -> str:
    return hashlib.sha256(json.dumps(genome.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def build_space(model, db) -> SearchSpace:
    """Layers in (block, path) order; groups by module kind; parameters removed per unit."""
    ad = adapter_for(model)
    names = sorted(db.layers, key=lambda n: (db.manifest["layers"][n]["block"], n))
    groups = {"mlp": tuple(n for n in names if db.manifest["layers"][n]["kind"] == "mlp"),
              "attn": tuple(n for n in names if db.manifest["layers"][n]["kind"] == "attn")}
    h, hd = ad.hidden_size, ad.head_dim
    unit = {}
    for n in names:
        unit[n] = 2 * h * hd if db.manifest["layers"][n]["kind"] == "attn" else 3 * h
    return SearchSpace(layers=tuple(names), groups={k: v for k, v in groups.items() if v},
                       ladders=dict(db.ladders), unit_params=unit)


def target_sums(space: SearchSpace, target) -> dict[str, int]:
    return level_sums_for_target(space, mean_level=target.mean_level, fraction=target.fraction)


class CandidateBuilder:
    """Builds a candidate model for a genome from the resident base model and the database."""

    def __init__(self, base, db, space: SearchSpace):
        self.base, self.db, self.space = base, db, space
        self.ad = adapter_for(base)

    def plan(self, genome: Genome) -> dict[int, LayerShrink]:
        plan: dict[int, LayerShrink] = {}
        for i in range(self.ad.num_layers):
            a, m = self.ad.attn_name(i), self.ad.mlp_name(i)
            kw = {}
            if a in genome:
                kw.update(heads=self.db.kept_units(a, genome[a]), o_proj=self.db.weight(a, genome[a]))
            if m in genome:
                kw.update(channels=self.db.kept_units(m, genome[m]), down_proj=self.db.weight(m, genome[m]))
            plan[i] = LayerShrink(**kw)
        return plan

    def shrunk(self, genome: Genome):
        return shrink_model(self.base, self.plan(genome), dtype=next(self.base.parameters()).dtype)

    def masked(self, genome: Genome):
        """Dense-shaped model with zeros in removed columns, plus the mask that keeps them zero."""
        model = mask_model(self.base, self.plan(genome))
        model.requires_grad_(True)  # the base is frozen; the candidate trains
        masks = {}
        for i in range(self.ad.num_layers):
            o, d = self.ad.o_proj(model, i), self.ad.down_proj(model, i)
            masks[o.weight] = (o.weight.detach() == 0).all(0)
            masks[d.weight] = (d.weight.detach() == 0).all(0)
        return model, ColumnMask(masks)


class Evaluator:
    """Fine-tune + score one candidate on given minibatches."""

    def __init__(self, builder: CandidateBuilder, teacher: TeacherCache | None, search_spec, compute_dtype: str):
        self.builder, self.teacher = builder, teacher
        self.spec, self.compute_dtype = search_spec, compute_dtype

    def __call__(self, genome: Genome, train_chunks, fit_chunks) -> float:
        ft = self.spec.finetune
        mask = None
        if ft.mode == "mask":
            model, mask = self.builder.masked(genome)
        elif ft.mode == "unmasked":  # the reference's behaviour: removed columns may revive
            model, unused = self.builder.masked(genome)
            unused.remove()
        else:
            model = self.builder.shrunk(genome)
        try:
            finetune(model, train_chunks, ft, self.compute_dtype, mask=mask)
            return fitness(self.spec.fitness.kind, model, fit_chunks, self.teacher, self.compute_dtype)
        finally:
            if mask is not None:
                mask.remove()
            del model


def initial_parent(space: SearchSpace, spec, evaluate: Callable | None, pools) -> Genome:
    """The generation-0 parent: the most even genome, or the best of ``initially_generated`` random ones."""
    sums = target_sums(space, spec.search.target)
    if spec.search.initially_generated <= 0 or evaluate is None:
        return even_genome(space, sums)
    cands = [random_feasible_genome(space, sums, derive_rng(spec.seed, "init", i))
             for i in range(spec.search.initially_generated)]
    fit = sample_exact(pools.calibration, spec.search.initial_tokens, derive_rng(spec.seed, "init-batch"))
    scores = [evaluate(c, [], fit) for c in cands]
    best = min(range(len(cands)), key=lambda i: (scores[i], i))
    return cands[best]


@dataclass
class GenerationResult:
    state: dict
    evaluated: int  # candidates evaluated in this call (not reused from the store)


def run_generation(g: int, parent: Genome, space: SearchSpace, spec, pools, evaluate: Callable,
                   store, *, shard: Callable[[list], list] | None = None, progress=None) -> GenerationResult:
    """Run generation ``g`` from ``parent`` and write its state. ``shard`` maps the list of a stage's
    (index, genome) work items to this worker's part and gathers everyone's scores (distributed case);
    by default every candidate is evaluated here."""
    key = state_key(g)
    if store.exists(key):
        return GenerationResult(store.get_json(key), 0)
    t0 = time.time()
    sp = spec.search
    kids = sample_offspring(parent, space, sp.offspring, derive_rng(spec.seed, "mutation", g), max_flips=sp.max_flips)
    stages = [Stage(survivors=s.survivors, fitness_tokens=s.fitness_tokens, finetune_tokens=s.finetune_tokens)
              for s in sp.selection]
    counter = {"evaluated": 0, "reused": 0}

    def evaluate_stage(si: int, pool: list[Genome]) -> list[float]:
        st = stages[si]
        fit = sample_exact(pools.calibration, st.fitness_tokens, derive_rng(spec.seed, "fitness-batch", g, si))
        train = sample_at_least(pools.finetune, st.finetune_tokens, derive_rng(spec.seed, "train-batch", g, si))

        def one(genome: Genome) -> float:
            rkey = f"generations/{g:05d}/results/s{si}-{genome_id(genome)}.json"
            if store.exists(rkey):
                counter["reused"] += 1
                return float(store.get_json(rkey)["fitness"])
            t = time.time()
            score = evaluate(genome, train, fit)
            store.put_json(rkey, {"genome": genome.to_dict(), "stage": si, "fitness": score,
                                  "seconds": round(time.time() - t, 3)})
            counter["evaluated"] += 1
            if progress is not None:
                progress(1)
            return score

        if shard is not None:
            return shard([(i, c) for i, c in enumerate(pool)], one)
        return [one(c) for c in pool]

    winner, history = run_selection(kids, parent, stages, evaluate_stage)
    final = history[-1]
    best = final["scores"][final["kept"][0]]
    state = {
        "generation": g,
        "parent": parent.to_dict(),
        "winner": winner.to_dict(),
        "parent_survived": winner == parent,
        "best_fitness": best,
        "stages": history,
        "offspring": len(kids),
        "evaluations": sum(len(h["scores"]) for h in history),
        "fitness_tokens": sum(s.fitness_tokens * len(h["scores"]) for s, h in zip(stages, history)),
        "finetune_tokens": sum(s.finetune_tokens * len(h["scores"]) for s, h in zip(stages, history)),
        "seconds": round(time.time() - t0, 3),
    }
    if shard is None or getattr(shard, "is_writer", True):
        store.put_json(key, state)
    log.info("generation %d: best fitness %s (%s), %d evaluated, %d reused, %.1fs", g, best,
             "parent kept" if winner == parent else "new parent", counter["evaluated"], counter["reused"],
             time.time() - t0)
    return GenerationResult(state, counter["evaluated"])
