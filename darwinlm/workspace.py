"""Lazily loaded shared state of one search (model, pools, database, evaluator) for running tasks.

Why this module exists: a task needs some of the model, the token pools, the layer database and the
evaluator; the embedded runner runs many tasks in one process and should load each once, while a
Kubernetes job runs one task and should load only what it needs. Everything is derived from the spec and
the store, so two workspaces on two machines compute the same things.
"""

from __future__ import annotations

import logging
from functools import cached_property

from .errors import SpecError
from .spec import spec_to_dict
from .store import open_store

log = logging.getLogger(__name__)

__all__ = ["Workspace", "search_prefix"]


def search_prefix(spec, uid: str | None = None) -> str:
    return f"searches/{spec.name}" + (f"-{uid}" if uid else "")


class Workspace:
    def __init__(self, spec, *, root=None, uid: str | None = None):
        self.spec = spec
        self.root = root if root is not None else open_store(spec.store)
        self.store = self.root.child(search_prefix(spec, uid))

    # -- spec bookkeeping -------------------------------------------------------------------------
    def record_spec(self) -> None:
        """Save the resolved spec next to the artifacts; refuse to resume a search whose spec changed."""
        mine = {k: v for k, v in spec_to_dict(self.spec).items() if k != "store"}
        if self.store.exists("spec.json"):
            old = {k: v for k, v in self.store.get_json("spec.json").items() if k != "store"}
            if old != mine:
                diff = sorted(k for k in set(old) | set(mine) if old.get(k) != mine.get(k))
                raise SpecError([(k, "differs from the spec this search was started with "
                                     f"({self.store.uri}/spec.json); use a new name or store") for k in diff])
            return
        self.store.put_json("spec.json", spec_to_dict(self.spec))

    # -- heavy state, loaded on first use -----------------------------------------------------------
    @cached_property
    def _model_tok(self):
        from .runtime import load_model

        return load_model(self.spec.model)

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
        from .data import build_pools

        return build_pools(self.spec.data, self.tokenizer)

    @cached_property
    def search_pools(self):
        """The pools the search draws from: the calibration pool without the database's Hessian tokens when
        ``search.fitness.exclude_database_tokens`` (fitness, tracking and initial-genome batches)."""
        import dataclasses

        from .data import after_prefix

        if not self.spec.search.fitness.exclude_database_tokens:
            return self.pools
        rest = after_prefix(self.pools.calibration, self.spec.database.calibration_tokens, "selection")
        return dataclasses.replace(self.pools, calibration=rest)

    @cached_property
    def db_key(self) -> str:
        from .database import database_key

        return database_key(self.model, self.spec.database, self.pools.calibration.digest())

    @cached_property
    def db(self):
        from .database import LayerDatabase, finalize

        marker = "database/shard-0-of-%d.json" % self.spec.database.shards
        if self.store.exists(marker) and self.store.get_json(marker).get("key") != self.db_key:
            raise SpecError([("database", f"this search was built on layer database "
                                          f"{self.store.get_json(marker).get('key')}, but this library version "
                                          f"computes {self.db_key} (algorithm or data changed); "
                                          "start a new search name or store")])
        if finalize(self.model, self.spec.database, self.root, self.db_key, self.pools.calibration.digest(),
                    self.spec.database.shards) is None:
            raise RuntimeError("the layer database is incomplete: run the database tasks first")
        return LayerDatabase(self.root, self.db_key)

    @cached_property
    def sensitivity_chunks(self):
        from .sensitivity import sensitivity_chunks

        return sensitivity_chunks(self.pools.calibration, self.spec.search.sensitivity.tokens)

    @cached_property
    def sensitivity_key(self) -> str:
        from .sensitivity import table_key

        return table_key(self.db_key, self.sensitivity_chunks, self.spec.search.sensitivity)

    def sensitivity_table(self) -> dict:
        """The sensitivity table (``search.init: sensitivity``), assembled once all its shards are complete."""
        from .adapter import adapter_for
        from .sensitivity import finalize

        s = self.spec.search.sensitivity
        meta = {"tokens": sum(int(c.numel()) for c in self.sensitivity_chunks), "dtype": s.dtype}
        table = finalize(self.root, self.db_key, self.sensitivity_key, s.shards, adapter_for(self.model).num_layers,
                         meta)
        if table is None:
            raise RuntimeError("the sensitivity table is incomplete: run the sensitivity tasks first")
        return table

    @cached_property
    def space(self):
        from .search import build_space

        return build_space(self.model, self.db)

    @cached_property
    def builder(self):
        from .search import CandidateBuilder

        return CandidateBuilder(self.model, self.db, self.space)

    @cached_property
    def teacher(self):
        from .fitness import TeacherCache

        f = self.spec.search.fitness
        if f.kind == "ppl":
            return None
        return TeacherCache(self.model, self.spec.model.compute_dtype, kind=f.kind, topk=f.topk)

    @cached_property
    def evaluator(self):
        from .search import Evaluator

        return Evaluator(self.builder, self.teacher, self.spec.search, self.spec.model.compute_dtype)

    # -- search state ---------------------------------------------------------------------------------
    def initial_parent(self):
        from .genome import Genome
        from .search import initial_parent

        if self.store.exists("init.json"):
            return Genome.from_dict(self.space, self.store.get_json("init.json")["parent"])
        table = self.sensitivity_table() if self.spec.search.init == "sensitivity" else None
        parent, info = initial_parent(self.space, self.spec, self.evaluator, self.search_pools, table=table)
        uniform = self.uniform_genome()
        record = {"parent": parent.to_dict(), "init": self.spec.search.init, **info}
        if self.spec.search.tracking_tokens:
            record["tracking"] = {"tokens": self.spec.search.tracking_tokens, "parent": self.track(parent),
                                  "uniform": self.track(uniform)}
        self.store.put_json("init.json", record)
        return parent

    def init_record(self) -> dict:
        """``init.json``: generation 0's parent, how it was chosen, its and the uniform genome's tracking score."""
        self.initial_parent()
        return self.store.get_json("init.json")

    @cached_property
    def tracking_chunks(self):
        from .data import sample_exact
        from .rng import derive_rng

        # seed 0, not the spec's: searches with different seeds are tracked on the same batch
        return sample_exact(self.search_pools.calibration, self.spec.search.tracking_tokens, derive_rng(0, "tracking"))

    def track(self, genome) -> float:
        """The genome's one-shot fitness (no fine-tuning) on the fixed tracking batch."""
        from .fitness import fitness

        model = self.builder.shrunk(genome)
        return float(fitness(self.spec.search.fitness.kind, model, self.tracking_chunks, self.teacher,
                             self.spec.model.compute_dtype))

    def parent_for(self, g: int):
        """The parent generation ``g`` starts from (the winner of g-1)."""
        from .genome import Genome
        from .search import state_key

        if g == 0:
            return self.initial_parent()
        return Genome.from_dict(self.space, self.store.get_json(state_key(g - 1))["winner"])

    def stale_before(self, g: int) -> int:
        """Consecutive generations before ``g`` in which the parent survived (for ``search.patience``)."""
        from .search import state_key

        return int(self.store.get_json(state_key(g - 1)).get("stale", 0)) if g > 0 else 0

    def last_tracking(self, g: int) -> float | None:
        """The tracking score of generation ``g``'s parent (the winner of g-1, or the initial parent)."""
        from .search import state_key

        if g == 0:
            return self.init_record().get("tracking", {}).get("parent")
        return self.store.get_json(state_key(g - 1)).get("tracking", {}).get("fitness")

    def final_genome(self):
        from .plan import generations_planned

        return self.parent_for(generations_planned(self.spec, self.store))

    def uniform_genome(self):
        from .genome import even_genome
        from .search import target_sums

        return even_genome(self.space, target_sums(self.space, self.spec.search.target))
