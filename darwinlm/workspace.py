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
        parent = initial_parent(self.space, self.spec, self.evaluator, self.pools)
        self.store.put_json("init.json", {"parent": parent.to_dict()})
        return parent

    def parent_for(self, g: int):
        """The parent generation ``g`` starts from (the winner of g-1)."""
        from .genome import Genome
        from .search import state_key

        if g == 0:
            return self.initial_parent()
        return Genome.from_dict(self.space, self.store.get_json(state_key(g - 1))["winner"])

    def final_genome(self):
        return self.parent_for(self.spec.search.generations)

    def uniform_genome(self):
        from .genome import even_genome
        from .search import target_sums

        return even_genome(self.space, target_sums(self.space, self.spec.search.target))
