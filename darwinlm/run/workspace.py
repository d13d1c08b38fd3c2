"""Lazily loaded shared state of one search (model, pools, database, evaluator) for running tasks.

Why this module exists: a task needs some of the model, the token pools, the layer database and the
evaluator; the embedded runner runs many tasks in one process and should load each once, while a
Kubernetes job runs one task and should load only what it needs. Everything is derived from the spec and
the store, so two workspaces on two machines compute the same things.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from functools import cached_property

from safetensors.torch import load as st_load

from darwinlm.core.budget import even_genome
from darwinlm.core.genome import Genome
from darwinlm.core.plan import generations_planned
from darwinlm.core.rng import derive_rng
from darwinlm.errors import SpecError
from darwinlm.llm import database, sensitivity
from darwinlm.llm.adapter import adapter_for
from darwinlm.llm.data import after_prefix, build_pools, sample_exact
from darwinlm.llm.fitness import TeacherCache, fitness
from darwinlm.llm.runtime import load_model
from darwinlm.spec import spec_to_dict
from darwinlm.store import layout, open_store

from . import search

log = logging.getLogger(__name__)

__all__ = ["Workspace", "load_posttrained"]


class Workspace:
    def __init__(self, spec, *, root=None, uid: str | None = None):
        self.spec = spec
        self.root = root if root is not None else open_store(spec.store)
        self.store = self.root.child(layout.search_prefix(spec.name, uid))
        self.created = time.time()
        self.timings: dict[str, float] = {}
        """Seconds this process spent loading shared state (model, pools, database): the fixed cost a
        Job pays once, recorded in every generation's timing.json."""

    def _timed(self, what: str, fn):
        t0 = time.time()
        out = fn()
        self.timings[what] = round(time.time() - t0, 3)
        return out

    # -- spec bookkeeping -------------------------------------------------------------------------
    def record_spec(self) -> None:
        """Save the resolved spec next to the artifacts; refuse to resume a search whose spec changed."""
        mine = spec_to_dict(self.spec)
        if self.store.exists(layout.SPEC):
            diff = layout.spec_drift(self.store.get_json(layout.SPEC), mine)
            if diff:
                raise SpecError([(k, "differs from the spec this search was started with "
                                     f"({self.store.uri}/{layout.SPEC}); use a new name or store") for k in diff])
            return
        self.store.put_json(layout.SPEC, mine)

    # -- heavy state, loaded on first use -----------------------------------------------------------
    @cached_property
    def _model_tok(self):
        return self._timed("model_load", lambda: load_model(self.spec.model))

    @property
    def model(self):
        return self._model_tok[0]

    @property
    def tokenizer(self):
        return self._model_tok[1]

    @cached_property
    def device(self):
        return next(self.model.parameters()).device

    @cached_property
    def pools(self):
        return self._timed("pools", lambda: build_pools(self.spec.data, self.tokenizer))

    @cached_property
    def search_pools(self):
        """The pools the search draws from: the calibration pool without the database's Hessian tokens when
        ``search.fitness.exclude_database_tokens`` (fitness, tracking and initial-genome batches)."""
        if not self.spec.search.fitness.exclude_database_tokens:
            return self.pools
        rest = after_prefix(self.pools.calibration, self.spec.database.calibration_tokens, "selection")
        return dataclasses.replace(self.pools, calibration=rest)

    @cached_property
    def db_key(self) -> str:
        return database.database_key(self.model, self.spec.database, self.pools.calibration.digest())

    @cached_property
    def db(self):
        marker = layout.shard_done("database", 0, self.spec.database.shards)
        if self.store.exists(marker) and self.store.get_json(marker).get("key") != self.db_key:
            raise SpecError([("database", f"this search was built on layer database "
                                          f"{self.store.get_json(marker).get('key')}, but this library version "
                                          f"computes {self.db_key} (algorithm or data changed); "
                                          "start a new search name or store")])
        if database.finalize(self.model, self.spec.database, self.root, self.db_key, self.pools.calibration.digest(),
                             self.spec.database.shards) is None:
            raise RuntimeError("the layer database is incomplete: run the database tasks first")
        t0 = time.time()
        db = database.LayerDatabase(self.root, self.db_key)
        self.timings["database_open"] = round(time.time() - t0, 3)
        return db

    @cached_property
    def sensitivity_chunks(self):
        return sensitivity.sensitivity_chunks(self.pools.calibration, self.spec.search.sensitivity.tokens)

    @cached_property
    def sensitivity_key(self) -> str:
        return sensitivity.table_key(self.db_key, self.sensitivity_chunks, self.spec.search.sensitivity)

    def sensitivity_table(self) -> dict:
        """The sensitivity table (``search.init: sensitivity``), assembled once all its shards are complete."""
        s = self.spec.search.sensitivity
        meta = {"tokens": sum(int(c.numel()) for c in self.sensitivity_chunks), "dtype": s.dtype}
        table = sensitivity.finalize(self.root, self.db_key, self.sensitivity_key, s.shards,
                                     adapter_for(self.model).num_layers, meta)
        if table is None:
            raise RuntimeError("the sensitivity table is incomplete: run the sensitivity tasks first")
        return table

    @cached_property
    def space(self):
        return search.build_space(self.model, self.db)

    @cached_property
    def builder(self):
        return search.CandidateBuilder(self.model, self.db, self.space)

    @cached_property
    def teacher(self):
        f = self.spec.search.fitness
        if f.kind == "ppl":
            return None
        return TeacherCache(self.model, self.spec.model.compute_dtype, kind=f.kind, topk=f.topk)

    @cached_property
    def evaluator(self):
        return search.Evaluator(self.builder, self.teacher, self.spec.search, self.spec.model.compute_dtype)

    # -- search state ---------------------------------------------------------------------------------
    def initial_parent(self):
        if self.store.exists(layout.INIT):
            return Genome.from_dict(self.space, self.store.get_json(layout.INIT)["parent"])
        table = self.sensitivity_table() if self.spec.search.init == "sensitivity" else None
        parent, info = search.initial_parent(self.space, self.spec, self.evaluator, self.search_pools, table=table)
        uniform = self.uniform_genome()
        record = {"parent": parent.to_dict(), "init": self.spec.search.init, **info}
        if self.spec.search.tracking_tokens:
            record["tracking"] = {"tokens": self.spec.search.tracking_tokens, "parent": self.track(parent),
                                  "uniform": self.track(uniform)}
        self.store.put_json(layout.INIT, record)
        return parent

    def init_record(self) -> dict:
        """``init.json``: generation 0's parent, how it was chosen, its and the uniform genome's tracking score."""
        self.initial_parent()
        return self.store.get_json(layout.INIT)

    @cached_property
    def tracking_chunks(self):
        # seed 0, not the spec's: searches with different seeds are tracked on the same batch
        return sample_exact(self.search_pools.calibration, self.spec.search.tracking_tokens, derive_rng(0, "tracking"))

    def track(self, genome) -> float:
        """The genome's one-shot fitness (no fine-tuning) on the fixed tracking batch."""
        model = self.builder.shrunk(genome)
        return float(fitness(self.spec.search.fitness.kind, model, self.tracking_chunks, self.teacher,
                             self.spec.model.compute_dtype))

    def parent_for(self, g: int):
        """The parent generation ``g`` starts from (the winner of g-1)."""
        if g == 0:
            return self.initial_parent()
        return Genome.from_dict(self.space, self.store.get_json(layout.generation_state(g - 1))["winner"])

    def stale_before(self, g: int) -> int:
        """Consecutive generations before ``g`` in which the parent survived (for ``search.patience``)."""
        return int(self.store.get_json(layout.generation_state(g - 1)).get("stale", 0)) if g > 0 else 0

    def last_tracking(self, g: int) -> float | None:
        """The tracking score of generation ``g``'s parent (the winner of g-1, or the initial parent)."""
        if g == 0:
            return self.init_record().get("tracking", {}).get("parent")
        return self.store.get_json(layout.generation_state(g - 1)).get("tracking", {}).get("fitness")

    def final_genome(self):
        return self.parent_for(generations_planned(self.spec, self.store))

    def uniform_genome(self):
        return even_genome(self.space, search.target_sums(self.space, self.spec.search.target))

    def variant_genome(self, variant: str):
        """The genome of a post-training variant: ``searched`` (the search's result) or ``uniform``."""
        return self.final_genome() if variant == "searched" else self.uniform_genome()


def load_posttrained(ws, variant: str):
    """The shrunk model of ``variant`` with its post-trained weights (if post-training ran)."""
    model = ws.builder.shrunk(ws.variant_genome(variant))
    prefix = layout.posttrain_prefix(variant)
    if ws.store.exists(layout.checkpoint_meta(prefix)):
        meta = ws.store.get_json(layout.checkpoint_meta(prefix))
        t = st_load(ws.store.get_bytes(layout.checkpoint_weights(prefix)))
        for alias, src in meta["tied"].items():
            t[alias] = t[src]
        model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
    return model
