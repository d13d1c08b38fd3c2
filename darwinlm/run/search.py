"""One generation of the training-aware evolutionary search (ALGORITHM.md §3), over the store.

Why this module exists: it joins the pure search core (mutation, selection) with the expensive parts
(building, fine-tuning and scoring candidates) and with persistence. A generation is an idempotent task:
every evaluated candidate writes ``generations/<g>/results/s<stage>-<genome>.json`` and the generation
ends by writing ``generations/<g>/state.json``. A re-run skips what exists, so a crash loses at most the
candidate being evaluated, and the final result is bit-identical to an uninterrupted run: every random
choice derives from (seed, generation, stage[, candidate]) and never from process state.

Evaluation keeps ONE resident dense base model; each candidate is built from it (physically shrunk, or
dense-shaped and masked in a reused work model) with the database weights of its levels, fine-tuned,
scored against the cached dense outputs, and dropped. Nothing is deep-copied or reloaded from disk per
candidate.

Warm start (``search.finetune.warm_start``), an exact incremental form of "fine-tune from scratch every
stage": the training chunks of all stages of generation ``g`` are nested prefixes of ONE permutation of the
fine-tune pool (:func:`nested_train_batches`, generator ``("train-batch", g, 0)``, so stage 0 draws exactly
the chunks of the non-warm sampler). Stage ``s`` trains on the first ``n_s`` chunks. A cold candidate of
stage ``s`` therefore runs the same optimiser steps, in the same order, as a survivor that trained on
``n_{s-1}`` chunks at stage ``s-1`` and continues (same weights, same AdamW moments and step count) on
chunks ``n_{s-1}..n_s``. The evaluator keeps a survivor's (model, optimiser) between stages and continues
it; anything it does not hold (another worker evaluated the previous stage, a resume, an eviction) is
rebuilt by replaying the prefix from the pruned weights, which is the same computation, so the fitness
never depends on which process evaluates a candidate. The parent joins at the last stage and starts cold.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from darwinlm.core.budget import cheapest_genome, even_genome, level_sums_for_target, random_feasible_genome
from darwinlm.core.genome import Genome, SearchSpace
from darwinlm.core.mutation import sample_offspring
from darwinlm.core.rng import derive_rng
from darwinlm.core.selection import Stage, run_selection
from darwinlm.llm.adapter import adapter_for
from darwinlm.llm.data import sample_at_least, sample_exact
from darwinlm.llm.fitness import TeacherCache, fitness
from darwinlm.llm.shrink import LayerShrink, head_rows, mask_columns, mask_model, resolve_plan, shrink_model
from darwinlm.llm.train import ColumnMask, finetune, make_optimizer
from darwinlm.store import layout

log = logging.getLogger(__name__)

__all__ = [
    "CandidateBuilder",
    "Evaluator",
    "build_space",
    "genome_id",
    "initial_parent",
    "nested_train_batches",
    "run_generation",
    "stage_train_batches",
    "target_sums",
]


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

    def masked(self, genome: Genome, into=None):
        """Dense-shaped model with zeros in removed columns, plus the mask that keeps them zero.

        ``into``: a model returned by an earlier call, reused as storage (its weights are overwritten with
        the base's, then masked): the same values as a fresh deep copy, without allocating one."""
        plan = self.plan(genome)
        if into is None:
            model = mask_model(self.base, plan)
        else:
            model = into
            sel = resolve_plan(self.ad, self.base, plan)
            with torch.no_grad():
                for dst, src in zip(model.parameters(), self.base.parameters(), strict=True):
                    dst.copy_(src)
                for dst, src in zip(model.buffers(), self.base.buffers(), strict=True):
                    dst.copy_(src)
                for i, sl in enumerate(sel):
                    ls = plan.get(i, LayerShrink())
                    o, d = self.ad.o_proj(model, i).weight, self.ad.down_proj(model, i).weight
                    mask_columns(o, head_rows(sl.heads, self.ad.head_dim, o.device), ls.o_proj)
                    mask_columns(d, torch.tensor(sl.channels, dtype=torch.long, device=d.device), ls.down_proj)
        model.requires_grad_(True)  # the base is frozen; the candidate trains
        masks = {}
        for i in range(self.ad.num_layers):
            o, d = self.ad.o_proj(model, i), self.ad.down_proj(model, i)
            masks[o.weight] = (o.weight.detach() == 0).all(0)
            masks[d.weight] = (d.weight.detach() == 0).all(0)
        return model, ColumnMask(masks)


def _chunks_digest(chunks: Sequence[torch.Tensor]) -> str:
    """Content hash of a list of token chunks (identifies a training prefix)."""
    h = hashlib.sha256()
    for c in chunks:
        h.update(c.to(torch.int64).numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()


_NO_CHUNKS = _chunks_digest([])


def _unique_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if torch.is_tensor(t) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


@dataclass(eq=False)
class _Trained:
    """A candidate's fine-tuned model and optimiser after training on the first ``consumed`` chunks."""

    gid: str
    model: torch.nn.Module
    mask: ColumnMask | None
    opt: torch.optim.Optimizer | None = None
    consumed: int = 0
    digest: str = _NO_CHUNKS
    score: float = math.nan
    order: int = 0

    def rank_key(self) -> tuple:  # the order of selection.select: finite first, lower score, earlier
        finite = math.isfinite(self.score)
        return (not finite, self.score if finite else 0.0, self.order)

    def nbytes(self) -> int:
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        if self.opt is not None:
            tensors += [v for st in self.opt.state.values() for v in st.values()]
        return _unique_bytes(tensors)


class Evaluator:
    """Fine-tune + score one candidate on given minibatches: ``evaluator(genome, train_chunks, fit_chunks)``.

    Cold (``warm_start`` false): every call builds the candidate from the base model, trains it on all of
    ``train_chunks`` with a fresh optimiser, scores it and drops it (mask mode reuses one dense work model).

    Warm (``warm_start`` true): the evaluator may hold a candidate's trained (model, optimiser) from an
    earlier call. If the chunks it trained on are a prefix of ``train_chunks`` (same content; length a
    multiple of ``batch_size``) it continues on the rest, else it builds the candidate and trains on the
    whole list (the deterministic replay): both are the same optimiser steps in the same order, so the
    score does not depend on what was held. What is held is decided by :meth:`begin_stage`, which
    :func:`run_generation` calls before every stage: the states of genomes outside the new pool are
    dropped, and of the candidates evaluated in the stage only the ``keep`` best (the ones that can survive)
    are held, within ``warm_cache_bytes``. Without ``begin_stage`` calls nothing is held.

    ``fused``: use the fused AdamW kernel (default); ``False`` = torch's default kernel (the reference's).
    """

    def __init__(self, builder: CandidateBuilder, teacher: TeacherCache | None, search_spec, compute_dtype: str, *,
                 warm_start: bool | None = None, fused: bool = True, warm_cache_bytes: int | None = 32 << 30):
        self.builder, self.teacher = builder, teacher
        self.spec, self.compute_dtype = search_spec, compute_dtype
        self.warm_start = bool(search_spec.finetune.warm_start if warm_start is None else warm_start)
        self.fused = fused
        self.warm_cache_bytes = warm_cache_bytes
        self._pending: dict[str, _Trained] = {}  # held from earlier stages, for genomes of this stage's pool
        self._current: dict[str, _Trained] = {}  # evaluated in this stage and held (the best ``keep``)
        self._keep = 0
        self._order = 0
        self._spare = None  # mask mode: a dense work model to reuse
        # built: candidates built from the pruned weights (cold starts and replays); continued: held states
        # continued; train_chunks/tokens: what was actually trained
        self.stats = {"built": 0, "continued": 0, "train_chunks": 0, "train_tokens": 0}

    # -- the stage protocol (run_generation) ---------------------------------------------------------
    def begin_stage(self, pool: Sequence[Genome], keep: int) -> None:
        """A new stage evaluates ``pool`` and keeps ``keep`` survivors (0: the last stage, or the end)."""
        wanted = {genome_id(g) for g in pool} if self.warm_start else set()
        held = {**self._pending, **self._current}
        self._pending, self._current = {}, {}
        for gid, st in held.items():
            if gid in wanted:
                self._pending[gid] = st
            else:
                self._release(st)
        self._keep = keep if self.warm_start else 0

    def release_all(self) -> None:
        self.begin_stage([], 0)

    def held(self) -> dict[str, int]:
        """genome id -> training chunks consumed, of every held state (for tests and logs)."""
        return {gid: st.consumed for gid, st in {**self._pending, **self._current}.items()}

    # -- evaluation -----------------------------------------------------------------------------------
    def __call__(self, genome: Genome, train_chunks, fit_chunks) -> float:
        ft = self.spec.finetune
        train_chunks = list(train_chunks)
        st = self._resume_or_build(genome, train_chunks)
        try:
            new = train_chunks[st.consumed:]
            if new:
                if st.opt is None:
                    st.model.requires_grad_(True)
                    st.opt = make_optimizer(st.model.parameters(), ft, fused=self.fused)
                finetune(st.model, new, ft, self.compute_dtype, mask=st.mask, opt=st.opt)
                self.stats["train_chunks"] += len(new)
                self.stats["train_tokens"] += sum(int(c.numel()) for c in new)
            st.consumed, st.digest = len(train_chunks), _chunks_digest(train_chunks)
            score = float(fitness(self.spec.fitness.kind, st.model, fit_chunks, self.teacher, self.compute_dtype))
        except BaseException:
            self._release(st)
            raise
        self._offer(st, score)
        return score

    def _resume_or_build(self, genome: Genome, train_chunks: list) -> _Trained:
        gid = genome_id(genome)
        st = self._pending.pop(gid, None) or self._current.pop(gid, None)
        if st is not None:
            bs = self.spec.finetune.batch_size
            if (st.consumed <= len(train_chunks) and st.consumed % bs == 0
                    and _chunks_digest(train_chunks[: st.consumed]) == st.digest):
                self.stats["continued"] += 1
                return st
            self._release(st)
        return self._build(genome, gid)  # not held: trained from the pruned weights on the whole prefix

    def _build(self, genome: Genome, gid: str) -> _Trained:
        self.stats["built"] += 1
        mode = self.spec.finetune.mode
        if mode == "shrink":
            return _Trained(gid, self.builder.shrunk(genome), None)
        spare, self._spare = self._spare, None
        model, mask = self.builder.masked(genome, into=spare)
        if mode == "unmasked":  # the reference's behaviour: removed columns may revive
            mask.remove()
            mask = None
        return _Trained(gid, model, mask)

    def _release(self, st: _Trained) -> None:
        if st.mask is not None:
            st.mask.remove()
            st.mask = None
        st.opt = None
        if self.spec.finetune.mode != "shrink" and self._spare is None:
            st.model.requires_grad_(False)
            self._spare = st.model  # dense work model: reused by the next build
        st.model = None

    def _offer(self, st: _Trained, score: float) -> None:
        """Hold ``st`` if it can survive this stage (among the best ``keep`` so far) and fits the budget."""
        if self._keep <= 0:
            self._release(st)
            return
        st.score, st.order = score, self._order
        self._order += 1
        self._current[st.gid] = st
        ranked = sorted(self._current.values(), key=_Trained.rank_key)
        for worst in ranked[self._keep:]:
            self._release(self._current.pop(worst.gid))
        if self.warm_cache_bytes is not None:
            ranked = sorted(self._current.values(), key=_Trained.rank_key)
            total = sum(s.nbytes() for s in ranked) + sum(s.nbytes() for s in self._pending.values())
            while ranked and total > self.warm_cache_bytes:
                worst = ranked.pop()
                total -= worst.nbytes()
                log.info("warm start: over the %d-byte budget, dropping %s (replayed if it is needed)",
                         self.warm_cache_bytes, worst.gid)
                self._release(self._current.pop(worst.gid))


def initial_parent(space: SearchSpace, spec, evaluate: Callable | None, pools, *,
                   table: dict | None = None) -> tuple[Genome, dict]:
    """Generation 0's parent (``search.init``) and a JSON record of how it was chosen.

    sensitivity: the lowest summed cost of ``table["layers"]`` under the target's level sums; random: the
    best of ``initially_generated`` random feasible genomes scored on ``initial_tokens``; even: the most
    even genome (also the fallback when no evaluator is given)."""
    sums = target_sums(space, spec.search.target)
    init = spec.search.init
    if init == "sensitivity":
        if table is None:
            raise ValueError("search.init is sensitivity but no sensitivity table was given")
        cost = table["layers"]
        genome = cheapest_genome(space, sums, cost)
        even = even_genome(space, sums)
        return genome, {"sensitivity": {
            "key": table["key"], "tokens": table["tokens"], "dtype": table["dtype"],
            "additive_cost": sum(cost[n][genome[n]] for n in space.layers),
            "uniform_additive_cost": sum(cost[n][even[n]] for n in space.layers)}}
    if init != "random" or evaluate is None:
        return even_genome(space, sums), {}
    cands = [random_feasible_genome(space, sums, derive_rng(spec.seed, "init", i))
             for i in range(spec.search.initially_generated)]
    fit = sample_exact(pools.calibration, spec.search.initial_tokens, derive_rng(spec.seed, "init-batch"))
    scores = [evaluate(c, [], fit) for c in cands]
    best = min(range(len(cands)), key=lambda i: (scores[i], i))
    return cands[best], {"random": {"scores": scores, "chosen": best}}


def nested_train_batches(pool, tokens: Sequence[int], rng: np.random.Generator,
                         batch_size: int = 1) -> list[list[torch.Tensor]]:
    """Training batches of several stages as nested prefixes of ONE random permutation of ``pool``.

    Batch ``s`` is the shortest prefix with at least ``tokens[s]`` tokens (the last chunk not truncated,
    like :func:`~darwinlm.llm.data.sample_at_least`), rounded up to whole optimiser steps of ``batch_size``
    chunks (capped at the pool), or empty for 0 tokens. Each batch is a uniform sample without replacement,
    as in the reference; the batches of later stages extend those of earlier ones, which is what lets a
    warm-started survivor continue instead of starting over. Batch 0 equals
    ``sample_at_least(pool, tokens[0], rng)`` for the same generator state when ``batch_size`` is 1.
    """
    order = rng.permutation(len(pool.chunks))
    cum = np.cumsum([int(pool.chunks[int(i)].numel()) for i in order])
    out = []
    for t in tokens:
        if t <= 0:
            out.append([])
            continue
        n = int(np.searchsorted(cum, t, side="left")) + 1  # smallest n with cum[n-1] >= t
        if n > len(order):
            raise ValueError(f"pool {pool.name} has {pool.tokens} tokens, fewer than {t}")
        n = min(len(order), -(-n // batch_size) * batch_size)
        out.append([pool.chunks[int(i)] for i in order[:n]])
    return out


def stage_train_batches(spec, pools, g: int) -> list[list[torch.Tensor]]:
    """The training batch of every selection stage of generation ``g``.

    ``warm_start`` false: independent per stage (``("train-batch", g, s)``, the reference). True: nested
    prefixes of one permutation (``("train-batch", g, 0)``), see :func:`nested_train_batches`."""
    sp = spec.search
    if sp.finetune.warm_start:
        return nested_train_batches(pools.finetune, [s.finetune_tokens for s in sp.selection],
                                    derive_rng(spec.seed, "train-batch", g, 0), sp.finetune.batch_size)
    return [sample_at_least(pools.finetune, s.finetune_tokens, derive_rng(spec.seed, "train-batch", g, si))
            for si, s in enumerate(sp.selection)]


@dataclass
class GenerationResult:
    state: dict
    evaluated: int  # candidates evaluated in this call (not reused from the store)


def run_generation(g: int, parent: Genome, space: SearchSpace, spec, pools, evaluate: Callable,
                   store, *, shard: Callable[[list], list] | None = None, progress=None, stale_before: int = 0,
                   track: Callable[[Genome], float] | None = None) -> GenerationResult:
    """Run generation ``g`` from ``parent`` and write its state. ``shard`` maps the list of a stage's
    (index, genome) work items to this worker's part and gathers everyone's scores (distributed case);
    by default every candidate is evaluated here.

    ``stale_before``: consecutive generations before ``g`` in which the parent survived; the state records
    the new count as ``stale``, and when it reaches ``search.patience`` the search stops after ``g``
    (``layout.STOP`` is written before the state). ``track(winner)``: the winner's score on the fixed
    tracking batch, recorded as ``tracking`` (only by the worker that writes the state).

    If ``evaluate`` has ``begin_stage(pool, keep)`` (:class:`Evaluator`), it is called before each stage
    with the stage's pool and its survivor count (0 at the last stage) and with ``([], 0)`` at the end, so
    a warm-starting evaluator holds fine-tuned models only for candidates that can still survive."""
    key = layout.generation_state(g)
    if store.exists(key):
        return GenerationResult(store.get_json(key), 0)
    t0 = time.time()
    sp = spec.search
    kids = sample_offspring(parent, space, sp.offspring, derive_rng(spec.seed, "mutation", g), max_flips=sp.max_flips)
    stages = [Stage(survivors=s.survivors, fitness_tokens=s.fitness_tokens, finetune_tokens=s.finetune_tokens)
              for s in sp.selection]
    counter = {"evaluated": 0, "reused": 0}
    trains = stage_train_batches(spec, pools, g)
    begin_stage = getattr(evaluate, "begin_stage", None)

    def evaluate_stage(si: int, pool: list[Genome]) -> list[float]:
        st = stages[si]
        fit = sample_exact(pools.calibration, st.fitness_tokens, derive_rng(spec.seed, "fitness-batch", g, si))
        train = trains[si]
        if begin_stage is not None:
            begin_stage(pool, st.survivors if si < len(stages) - 1 else 0)

        def one(genome: Genome) -> float:
            rkey = layout.candidate_result(g, si, genome_id(genome))
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

    try:
        winner, history = run_selection(kids, parent, stages, evaluate_stage)
    finally:
        if begin_stage is not None:
            begin_stage([], 0)
    final = history[-1]
    best = final["scores"][final["kept"][0]]
    stale = stale_before + 1 if winner == parent else 0
    patience = sp.patience
    stop = "patience" if patience is not None and stale >= patience and g + 1 < sp.generations else None
    writer = shard is None or getattr(shard, "is_writer", True)
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
        "stale": stale,
        "stop": stop,
    }
    if track is not None and writer:
        state["tracking"] = {"tokens": sp.tracking_tokens, "fitness": track(winner)}
    state["seconds"] = round(time.time() - t0, 3)
    if writer:
        if stop is not None:
            store.put_json(layout.STOP, {"after": g, "reason": stop, "patience": patience,
                                         "message": f"the parent survived {stale} generations in a row "
                                                    f"(search.patience = {patience})"})
        store.put_json(key, state)
    log.info("generation %d: best fitness %s (%s), %d evaluated, %d reused, %.1fs%s%s", g, best,
             "parent kept" if winner == parent else "new parent", counter["evaluated"], counter["reused"],
             time.time() - t0,
             f", tracking {state['tracking']['fitness']:.5f}" if "tracking" in state else "",
             f"; stopping: {stop} ({stale} generations without a new parent)" if stop else "")
    return GenerationResult(state, counter["evaluated"])
