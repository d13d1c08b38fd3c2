"""The runners: loop over the plan in one process, or run named tasks of it (one rank of a process group).

Why this module exists: ``darwinlm run`` must do everything on one machine, and resume after any crash
by simply being run again. It holds no state of its own: each turn asks the plan what is left.
``run_tasks`` is what a Kubernetes Job (``darwinlm_jobs``) and ``darwinlm task`` execute: the named tasks,
as one rank of a torch.distributed group when the environment describes one.

Importing this module loads no torch (``import darwinlm`` re-exports ``run_search``): the workspace and
the task implementations are imported when a run starts, and a run whose tasks are complete never
imports them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from darwinlm.core.plan import KINDS, Task, all_tasks, is_done, next_tasks, stopped_after
from darwinlm.errors import ChecksumMismatch, PeerFailure, PlanError, StoreError, WorldConfigError
from darwinlm.store import layout, open_store

from .progress import Progress, no_progress
from .repair import recompute

if TYPE_CHECKING:
    from .workspace import Workspace

log = logging.getLogger(__name__)

__all__ = ["run_search", "run_phase", "run_tasks"]


def _start(spec, **where):
    """The search's ``Workspace`` and ``run_task``: the torch side of the library, imported when a run starts."""
    from .tasks import run_task
    from .workspace import Workspace

    return Workspace(spec, **where), run_task


def run_search(spec, *, progress: Progress = no_progress, root=None, until=None) -> Workspace:
    """Run every remaining task. ``until(task) -> bool`` stops before a task (tests, partial runs)."""
    ws, run_task = _start(spec, root=root)
    ws.record_spec()
    repaired: set[str] = set()
    while True:
        todo = next_tasks(spec, ws.store)
        if not todo:
            break
        for task in todo:
            if until is not None and until(task):
                return ws
            log.info("task %s", task.name)
            try:
                run_task(ws, task, progress=progress)
            except ChecksumMismatch as e:  # a corrupt artifact: computed again if the plan can, else fatal
                if not recompute(ws, e, repaired):
                    raise
                break  # plan again: the deleted artifacts are tasks (or parts of tasks) to do
    log.info("search %s complete: %s/%s", spec.name, ws.store.uri, layout.RESULT)
    return ws


def run_phase(spec, kind: str, *, progress: Progress = no_progress, root=None) -> Workspace:
    """Run remaining tasks until none of kind ``kind`` is left (the per-phase CLI subcommands)."""
    ws, run_task = _start(spec, root=root)
    ws.record_spec()
    while True:
        todo = next_tasks(spec, ws.store)
        if not todo or todo[0].kind != kind:
            if todo and todo[0].kind in _before(kind):
                for task in todo:
                    run_task(ws, task, progress=progress)
                continue
            return ws
        for task in todo:
            run_task(ws, task, progress=progress)


def _before(kind: str) -> tuple[str, ...]:
    return KINDS[: KINDS.index(kind)]


def run_tasks(spec, names: list[str], *, uid: str | None = None, progress: Progress = no_progress) -> dict:
    """Run the named plan tasks of ``spec`` in order (store prefix ``searches/<name>[-<uid>]``).

    With WORLD_SIZE > 1 in the environment this process is one rank of a torch.distributed group (generation
    tasks only); ``progress`` is shown by rank 0. Complete tasks return at once, before any rendezvous (a
    lone restarted rank must not wait for peers that are gone). Raises ``PlanError`` when a name is not a
    task of the plan, an earlier phase is incomplete or several workers would run a task that runs on one,
    ``PeerFailure`` when a peer is lost. Returns what happened: ``{"tasks", "store", "status"}`` and, once
    tasks ran, ``"rank"`` and ``"world_size"`` (the line the CLI and the jobs print)."""
    from darwinlm.llm.distributed import world_env

    tasks = _plan_tasks(spec, names)
    store = open_store(spec.store).child(layout.search_prefix(spec.name, uid))
    if isinstance(tasks, list):
        todo = [t for t in tasks if not is_done(spec, store, t)]
        if not todo:
            return {"tasks": names, "store": store.uri, "status": "complete"}
    problem = tasks if isinstance(tasks, str) else _not_ready(spec, store, todo)
    try:
        if problem is None and world_env() is not None and any(t.kind != "generation" for t in todo):
            problem = "only generation tasks run on several workers (WORLD_SIZE > 1)"
    except WorldConfigError as e:
        problem = str(e)
    if problem is not None:
        raise PlanError(problem)
    rank, size = _run_ranked(spec, uid, tasks, todo, progress)
    return {"tasks": names, "store": store.uri, "status": "done", "rank": rank, "world_size": size}


def _plan_tasks(spec, names: list[str]):
    """The named tasks of ``spec``'s plan, or an error message."""
    phases = all_tasks(spec)
    tasks = []
    for name in names:
        try:
            task = Task.parse(name)
        except ValueError as e:
            return str(e)
        if not any(task in phase for phase in phases):
            every = [t.name for phase in phases for t in phase]
            return f"{name!r} is not a task of this spec's plan ({every[0]} ... {every[-1]})"
        tasks.append(task)
    return tasks


def _not_ready(spec, store, todo) -> str | None:
    """Why ``todo`` cannot run in order (an earlier phase is incomplete), or None."""
    phases = all_tasks(spec)
    for n, task in enumerate(todo):
        first = next(i for i, phase in enumerate(phases) if task in phase)
        pending = [t.name for phase in phases[:first] for t in phase
                   if t not in todo[:n] and not is_done(spec, store, t)]
        if pending:
            return f"{task.name} cannot run yet: {', '.join(pending)} not complete"
    return None


def _stopped_before(store, task: Task) -> bool:
    """True for a generation after the one that ended the search early (``search.patience``): a warm
    process running several generations stops there, as the plan does."""
    if task.kind != "generation":
        return False
    stop = stopped_after(store)
    return stop is not None and task.index > stop


def _run_ranked(spec, uid, tasks, todo, progress: Progress) -> tuple[int, int]:
    """Join the process group the environment describes (if any) and run ``tasks``; (rank, world size)."""
    from darwinlm.llm.distributed import DistributedShard, init_from_env
    from darwinlm.llm.runtime import resolve_device

    ws, run_task = _start(spec, uid=uid)
    try:
        world = init_from_env(device=resolve_device(spec.model.device))
    except RuntimeError as e:  # rendezvous timed out or failed: the peers may come later
        raise PeerFailure(f"cannot join the process group: {e}") from e
    if world is None:
        for task in tasks:
            if _stopped_before(ws.store, task):
                break
            try:
                run_task(ws, task, progress=progress)
            except ChecksumMismatch as e:  # one task per process (a Job): delete what can be redone, then
                if not recompute(ws, e, set()):  # fail retriably; the next plan has the task that redoes it
                    raise
                raise StoreError(f"{e}; deleted to be computed again: retry") from e
        return 0, 1
    if spec.model.threads is None:
        log.warning("model.threads is not set: with several workers, fitness values (and the search) are "
                    "reproducible only when every worker uses the same torch thread count")
    shard = DistributedShard(world)
    try:
        if world.is_writer:  # rank 0 writes the shared files first; the others only read them
            ws.record_spec()
            ws.parent_for(todo[0].index)
        shard.barrier()
        for task in tasks:
            if _stopped_before(ws.store, task):  # every rank reads the same marker after the barrier
                break
            log.info("task %s (rank %d/%d)", task.name, world.rank, world.world_size)
            run_task(ws, task, progress=progress if world.is_writer else no_progress, shard=shard)
    finally:
        world.close()
    return world.rank, world.world_size
