"""The plan: a pure function from (spec, store state) to the tasks that can run now.

Why this module exists: the embedded runner and the Kubernetes operator drive the same work the same
way. Neither keeps state in memory: both call ``next_tasks`` again after anything happens (a task
finishing, a crash, an operator restart) and get the remaining work. It only checks completion markers
in the search's store (``darwinlm.store.layout`` spells them), so it needs neither torch nor the model
(the operator imports it).

Order: ``database`` shards (parallel) → ``sensitivity`` shards (parallel; only with ``search.init:
sensitivity``) → ``generation`` g = 0..G-1 (sequential; the generations after an early stop, recorded in
``generations/stop.json``, count as done) → ``posttrain`` of the searched model and of each trained
baseline (parallel) → ``export`` → ``evaluate``.
"""

from __future__ import annotations

from dataclasses import dataclass

from darwinlm.store import layout

__all__ = ["Task", "done_key", "is_done", "export_covers", "next_tasks", "all_tasks", "progress", "stopped_after",
           "generations_planned", "generation_block", "STOP_KEY"]

KINDS = ("database", "sensitivity", "generation", "posttrain", "export", "evaluate")

STOP_KEY = layout.STOP
"""Written by the generation that ends the search early (``search.patience``): ``{"after": g, ...}``."""


@dataclass(frozen=True, order=True)
class Task:
    kind: str
    index: int = 0
    count: int = 1
    variant: str = ""

    @property
    def name(self) -> str:
        """A DNS-1123-friendly name, stable across runs (used for Kubernetes Job names)."""
        if self.kind in ("database", "sensitivity"):
            return f"{self.kind}-{self.index}-of-{self.count}"
        if self.kind == "generation":
            return f"generation-{self.index}"
        if self.kind == "posttrain":
            return f"posttrain-{self.variant}"
        return self.kind

    @classmethod
    def parse(cls, name: str) -> "Task":
        parts = name.split("-")
        if parts[0] in ("database", "sensitivity") and len(parts) == 4 and parts[2] == "of" \
                and parts[1].isdigit() and parts[3].isdigit():
            return cls(parts[0], int(parts[1]), int(parts[3]))
        if parts[0] == "generation" and len(parts) == 2 and parts[1].isdigit():
            return cls("generation", int(parts[1]))
        if parts[0] == "posttrain" and len(parts) == 2:
            return cls("posttrain", variant=parts[1])
        if name in ("export", "evaluate"):
            return cls(name)
        raise ValueError(f"not a task name: {name!r}")


def done_key(task: Task) -> str:
    """The marker (relative to the search's store) whose existence means the task is complete."""
    if task.kind in ("database", "sensitivity"):
        return layout.shard_done(task.kind, task.index, task.count)
    if task.kind == "generation":
        return layout.generation_state(task.index)
    if task.kind == "posttrain":
        return layout.posttrain_done(task.variant)
    if task.kind == "export":
        return layout.EXPORT_DONE
    if task.kind == "evaluate":
        return layout.SUMMARY
    raise ValueError(task.kind)


def export_covers(marker: dict, export) -> bool:
    """Whether an export marker already holds every format ``export`` (``spec.export``) asks for.

    A marker without ``formats`` predates them and holds the Hugging Face directory only."""
    have = set(marker.get("formats", ["hf"]))
    if not set(export.formats) <= have:
        return False
    return "gguf" not in export.formats or export.gguf_type in marker.get("gguf", {})


def is_done(spec, store, task: Task) -> bool:
    """Whether ``task`` is complete: its marker exists (and, for the export, covers the spec's formats)."""
    key = done_key(task)
    if not store.exists(key):
        return False
    return task.kind != "export" or export_covers(store.get_json(key) or {}, spec.export)


def posttrain_variants(spec) -> list[str]:
    if not spec.posttrain.enabled:
        return []
    return ["searched"] + (["uniform"] if "uniform" in spec.evaluation.baselines else [])


def all_tasks(spec) -> list[list[Task]]:
    """Every task, as phases; tasks inside a phase may run in parallel."""
    K = spec.database.shards
    phases = [[Task("database", k, K) for k in range(K)]]
    if spec.search.init == "sensitivity":
        S = spec.search.sensitivity.shards
        phases.append([Task("sensitivity", k, S) for k in range(S)])
    phases += [[Task("generation", g)] for g in range(spec.search.generations)]
    pt = [Task("posttrain", variant=v) for v in posttrain_variants(spec)]
    if pt:
        phases.append(pt)
    phases += [[Task("export")], [Task("evaluate")]]
    return phases


def generation_block(spec, start: int, count: int) -> list[Task]:
    """The generation tasks one warm process (one Kubernetes Job) runs from generation ``start``:
    ``count`` of them (``generationsPerJob``), 0 = every one up to the last generation; never past
    ``search.generations``. An early stop (``STOP_KEY``) ends the block sooner; the runner checks it."""
    last = spec.search.generations if count == 0 else min(spec.search.generations, start + count)
    return [Task("generation", g) for g in range(start, max(last, start + 1))]


def stopped_after(store) -> int | None:
    """The last generation of a search that stopped early (``search.patience``), or None."""
    return int(store.get_json(STOP_KEY)["after"]) if store.exists(STOP_KEY) else None


def next_tasks(spec, store) -> list[Task]:
    """Tasks of the first unfinished phase that are not done; [] once everything is complete."""
    stop: list[int | None] = []  # read once, and only when the generations are reached

    def done(t: Task) -> bool:
        if is_done(spec, store, t):
            return True
        if t.kind != "generation":
            return False
        if not stop:
            stop.append(stopped_after(store))
        return stop[0] is not None and t.index > stop[0]

    for phase in all_tasks(spec):
        todo = [t for t in phase if not done(t)]
        if todo:
            return todo
    return []


def generations_planned(spec, store) -> int:
    """Generations the search runs: ``search.generations``, or fewer once it stopped early."""
    stop = stopped_after(store)
    return spec.search.generations if stop is None else min(spec.search.generations, stop + 1)


def progress(spec, store) -> dict:
    """Counts for status displays: generations done, total, and whether the search is complete."""
    total = generations_planned(spec, store)
    gens = sum(store.exists(done_key(Task("generation", g))) for g in range(total))
    return {"generations_done": gens, "generations": total,
            "stopped_early": total < spec.search.generations, "complete": not next_tasks(spec, store)}
