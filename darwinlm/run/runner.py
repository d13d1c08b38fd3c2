"""The embedded runner: loop over the plan in one process until the search is complete.

Why this module exists: ``darwinlm run`` must do everything on one machine, and resume after any crash
by simply being run again. It holds no state of its own: each turn asks the plan what is left.
"""

from __future__ import annotations

import logging

from darwinlm.core.plan import next_tasks
from .tasks import Progress, no_progress, run_task
from .workspace import Workspace

log = logging.getLogger(__name__)

__all__ = ["run_search", "run_phase"]


def run_search(spec, *, progress: Progress = no_progress, root=None, until=None) -> Workspace:
    """Run every remaining task. ``until(task) -> bool`` stops before a task (tests, partial runs)."""
    ws = Workspace(spec, root=root)
    ws.record_spec()
    while True:
        todo = next_tasks(spec, ws.store)
        if not todo:
            break
        for task in todo:
            if until is not None and until(task):
                return ws
            log.info("task %s", task.name)
            run_task(ws, task, progress=progress)
    log.info("search %s complete: %s/result", spec.name, ws.store.uri)
    return ws


def run_phase(spec, kind: str, *, progress: Progress = no_progress, root=None) -> Workspace:
    """Run remaining tasks until none of kind ``kind`` is left (the per-phase CLI subcommands)."""
    ws = Workspace(spec, root=root)
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
    from darwinlm.core.plan import KINDS

    return KINDS[: KINDS.index(kind)]
