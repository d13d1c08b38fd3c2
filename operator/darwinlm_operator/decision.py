"""What ``reconcile.decide`` reads and returns, and the per-call context its rules share.

Why this module exists: the rules of ``decide`` (in ``reconcile``) and the status writers they call (in
``status``) all work on one context, :class:`Context`: the PruningSearch as read, the status as decided so
far, the retry ledger and the :class:`Decision` being built. Holding these types apart lets both modules
import them without importing each other. :class:`StoreView` is the read-only store boundary
(``store_access.StoreView`` implements it); :class:`Decision` is what the handlers apply.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from collections.abc import Mapping
from typing import Any, Protocol

from . import conditions as C
from .jobstate import get
from .kspec import JobDefaults

__all__ = ["Context", "Decision", "Event", "StoreView"]


class StoreView(Protocol):
    """Read-only access to one search's store prefix (``searches/<name>-<uid>``)."""

    uri: str

    def exists(self, key: str) -> bool: ...
    def get_json(self, key: str) -> Any: ...  # None when absent
    def list(self, prefix: str) -> list[str]: ...


@dataclasses.dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str  # CamelCase
    message: str


@dataclasses.dataclass
class Decision:
    """What the handlers do: create (if absent), delete Jobs by name, patch status, post events."""

    create: list[dict] = dataclasses.field(default_factory=list)
    delete: list[str] = dataclasses.field(default_factory=list)
    status: dict = dataclasses.field(default_factory=dict)  # the status fields the operator owns
    events: list[Event] = dataclasses.field(default_factory=list)
    accounted: list[dict] = dataclasses.field(default_factory=list)  # attempt records new this call
    metrics: dict = dataclasses.field(default_factory=dict)  # values for metrics only (not status)
    delete_self: bool = False  # ttlSecondsAfterFinished expired: delete the PruningSearch



@dataclasses.dataclass
class Context:
    """One call of ``decide``: what was read, the status decided so far and the Decision being built."""

    cr: Mapping
    jobs: list  # the Jobs this PruningSearch owns
    pods: list
    store: StoreView | None
    now: _dt.datetime
    old: dict  # status as read
    status: dict  # status as decided (owned fields only)
    out: Decision
    spec: Any = None
    kspec: Any = None
    defaults: JobDefaults | None = None  # the operator's job image / pull policy (spec values win)
    image: str | None = None  # the job image in effect (spec.image, else the operator's default)

    @property
    def gen(self) -> int | None:
        return get(self.cr, "metadata", "generation")

    @property
    def ledger(self) -> dict:
        return self.status.setdefault("attempts", {})

    def cond(self, type_: str, status: bool, reason: str, message: str) -> None:
        self.status["conditions"] = C.set_condition(self.status.get("conditions"), type_, status, reason,
                                                    message, now=self.now, observed_generation=self.gen)

    def event(self, type_: str, reason: str, message: str) -> None:
        self.out.events.append(Event(type_, reason, message))

    def finish(self) -> Decision:
        self.status["observedGeneration"] = self.gen
        retries: dict[str, int] = {}
        for r in self.ledger.values():
            if r.get("generation") == self.gen and r.get("counted"):
                retries[r["task"]] = retries.get(r["task"], 0) + 1
        self.status["retries"] = retries
        self.status["gpuSeconds"] = round(sum(float(r.get("gpuSeconds") or 0) for r in self.ledger.values()), 3)
        self.status["offspringFailed"] = sum(r.get("outcome") == "Failed" and r.get("task", "").startswith(
            "generation-") for r in self.ledger.values())
        self.out.status = self.status
        return self.out
