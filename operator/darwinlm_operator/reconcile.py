"""The reconciler's brain: ``decide(cr, jobs, pods, store, now) -> Decision``, a pure function.

Why this module exists: kopf is level-triggered and sees only the latest state (nolar/kopf#698), and
the operator may restart at any moment. So nothing is remembered between calls: every decision is
recomputed from the PruningSearch (spec + status), its Jobs and their Pods (API objects) and the
search's store (the plan's completion markers, via ``darwinlm.core.plan.next_tasks``). ``decide`` does no
I/O of its own: the store is read through a small read-only view (:class:`StoreView`), and the
handlers apply the returned Decision idempotently (create-if-absent by deterministic name).

Rules, in order:

1. A spec that fails validation (or differs from the spec the store's search was started with, or
   names no image while the operator has no default job image): phase Failed, condition Invalid
   naming the field(s), no Jobs. Fixing the spec continues the search.
2. Finished Jobs are accounted once in ``status.attempts`` (job name -> outcome, reason, whether the
   failure counts, GPU-seconds, spec generation). Eviction, a DisruptionTarget condition or
   preemption do not count; exit code 2 is permanent; anything else counts against backoffLimit.
   The ledger lives in the object's status, so retries survive operator restarts and Job deletion.
3. Terminal phases (Succeeded, Failed) stay until the spec changes (a new metadata.generation
   re-evaluates a Failed search with a fresh retry budget); ttlSecondsAfterFinished then deletes it.
4. activeDeadlineSeconds (from status.startTime, time suspended included) -> Failed DeadlineExceeded.
5. suspend -> active Jobs deleted, phase Suspended; resuming continues from the store.
6. All tasks done -> Succeeded with resultURI. Otherwise, per task of ``next_tasks``: wait for its
   live Job (for a generation: also a warm Job, ``generationsPerJob`` != 1, whose generations include it) (failing the search when its pods stay Pending past podStartTimeoutSeconds with an image
   pull error / unschedulable), else fail permanently / on exhausted retries, else create the next
   attempt ``<search>-<task>-a<n>`` (n = highest attempt seen in the ledger and the Jobs, plus one).

``status.phase`` is Running, Suspended, Succeeded or Failed; while Running, the reason of the Running
condition (and ``status.message``) names the stage: BuildingDatabase, MeasuringSensitivity, Searching, PostTraining, Exporting,
Evaluating. Job/Pod reading (outcome, failure class, stuck pods, GPU-seconds) lives in ``jobstate``;
the status each rule writes (phase, conditions, progress, the merge patch) in ``status``; the Decision,
StoreView and per-call context types in ``decision``. Every name stays importable from here.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping

from darwinlm.errors import SpecError
from darwinlm.core.plan import Task, done_key, next_tasks
from darwinlm.spec import spec_to_dict
from darwinlm.store import layout

from . import conditions as C
from .decision import Context, Decision, Event, StoreView  # noqa: F401 - Event is re-exported
from .jobstate import (attempt_of, classify_failure, first_error_line, get, is_deleting, job_end,  # noqa: F401
                       job_outcome, job_usage, pending_timeout)
from .kspec import JobDefaults, job_image, load_psearch
from .render import LABEL_SEARCH_UID, LABEL_TASK, job_generations, render_job, render_service
from .status import (_STAGE_REASONS, _deadline_passed, _delete_active, _fail, _finite, _invalid,  # noqa: F401
                     _progress, _resume, _running, _succeed, _suspend, _terminal, _ttl, _valid, _why,
                     format_duration, status_patch)

__all__ = ["Decision", "Event", "StoreView", "decide", "as_manifest", "job_outcome", "classify_failure",
           "status_patch", "format_duration"]


# ------------------------------------------------------------------------------ the decision

# the status fields the operator owns (declared in the CRD's status schema, kstatus.PruningSearchStatus)
_OWNED = ("phase", "conditions", "observedGeneration", "generation", "generationsDone", "generationsTotal",
          "bestFitness", "progress", "stage", "eta", "etaRange", "estimate", "gpuSeconds", "offspringEvaluated", "offspringFailed", "checkpointURI",
          "resultURI", "startTime", "completionTime", "retries", "message", "attempts")


def decide(cr: Mapping, jobs: list[Mapping], pods: list[Mapping], store: StoreView | None,
           now: _dt.datetime, defaults: JobDefaults | None = None) -> Decision:
    """The next step for PruningSearch ``cr`` (see the module docstring for the rules).

    ``jobs``/``pods``: the Jobs and Pods of its namespace (others' are ignored, by owner uid);
    ``store``: a view of its store prefix, or None when the spec is invalid (nothing is read);
    ``defaults``: the operator's job image and pull policy, for a spec that sets none.
    """
    old = dict(get(cr, "status", default={}))
    uid = get(cr, "metadata", "uid")
    owned = [j for j in jobs if _owned(j, uid)]
    ctx = Context(cr, owned, pods, store, now, old, {k: old[k] for k in _OWNED if k in old}, Decision(),
               defaults=defaults)
    ctx.status["attempts"] = dict(old.get("attempts") or {})
    if get(cr, "metadata", "deletionTimestamp"):
        return ctx.finish()  # being deleted: garbage collection and the finalizer do the rest
    _account(ctx)
    try:
        ctx.spec, ctx.kspec = load_psearch(as_manifest(cr))
    except SpecError as e:
        if not C.is_true(old.get("conditions"), C.SUCCEEDED):
            _invalid(ctx, e.errors)
        return ctx.finish()
    if _terminal(ctx):
        return ctx.finish()
    conflict = _spec_conflict(ctx.spec, store)
    try:  # checked after _terminal: a finished search needs no image (and its TTL still runs)
        ctx.image, _ = job_image(ctx.kspec, defaults)
    except SpecError as e:  # neither spec.image nor the operator's default job image
        conflict += e.errors
    if conflict:
        _invalid(ctx, conflict)
        return ctx.finish()
    _valid(ctx)
    if _deadline_passed(ctx):
        return ctx.finish()
    tasks = next_tasks(ctx.spec, store)
    _progress(ctx, tasks)
    if ctx.kspec.suspend:
        _suspend(ctx)
        return ctx.finish()
    _resume(ctx)
    if not tasks:
        _succeed(ctx)
        return ctx.finish()
    for task in tasks:
        if _drive(ctx, task):
            return ctx.finish()
    _running(ctx, tasks)
    return ctx.finish()


def _owned(job: Mapping, uid: str | None) -> bool:
    owners = get(job, "metadata", "ownerReferences", default=[])
    return bool(uid) and (any(o.get("uid") == uid for o in owners)
                          or get(job, "metadata", "labels", LABEL_SEARCH_UID) == uid)


def as_manifest(cr: Mapping) -> dict:
    """What ``load_psearch`` validates: the manifest without status and server-set metadata."""
    return {"apiVersion": cr.get("apiVersion"), "kind": cr.get("kind"),
            "metadata": {"name": get(cr, "metadata", "name")}, "spec": cr.get("spec") or {}}


def _account(ctx: Context) -> None:
    """Record every finished Job once in ``status.attempts`` (the retry ledger)."""
    for job in ctx.jobs:
        name = get(job, "metadata", "name")
        outcome = job_outcome(job)
        if name in ctx.ledger or outcome is None:
            continue
        secs, gpus = job_usage(job, job_end(job, ctx.now))
        rec = {"task": get(job, "metadata", "labels", LABEL_TASK, default=""), "attempt": attempt_of(job),
               "outcome": outcome, "reason": "Completed", "counted": False, "permanent": False,
               "generation": ctx.gen, "seconds": secs, "gpuSeconds": gpus}
        if outcome == "Failed":
            rec.update(classify_failure(job, ctx.pods))
            counts = "permanent" if rec["permanent"] else ("counts toward backoffLimit" if rec["counted"]
                                                            else "does not count toward backoffLimit")
            ctx.event("Warning", "JobFailed", f"Job {name} ({rec['task']}) failed: {rec['reason']} ({counts}): "
                                              f"{rec['message']}")
        ctx.ledger[name] = rec
        ctx.out.accounted.append({**rec, "job": name})


def _spec_conflict(spec, store: StoreView | None) -> list[tuple[str, str]]:
    """Top-level fields that differ from the spec.json the search's first task saved (the jobs would
    refuse them with exit code 2; this says so before any Job is created)."""
    saved = store.get_json(layout.SPEC) if store is not None else None
    if not isinstance(saved, Mapping):
        return []
    return [(k, f"differs from the spec this search was started with ({store.uri}/{layout.SPEC}); revert it "
                f"or create a new PruningSearch") for k in layout.spec_drift(saved, spec_to_dict(spec))]


def _task_jobs(ctx: Context, task: Task) -> list:
    """The Jobs that run ``task``: its own, and for a generation the warm generation Jobs
    (``generationsPerJob`` != 1) started at an earlier generation whose range includes it."""
    if task.kind != "generation":
        return [j for j in ctx.jobs if get(j, "metadata", "labels", LABEL_TASK) == task.name]
    return [j for j in ctx.jobs if task.index in (job_generations(j) or ())]


def _drive(ctx: Context, task: Task) -> bool:
    """Wait for, retry or start ``task``; True when the search failed (stop)."""
    tjobs = [j for j in ctx.jobs if get(j, "metadata", "labels", LABEL_TASK) == task.name]
    running = _task_jobs(ctx, task)
    live = [j for j in running if job_outcome(j) is None and not is_deleting(j)]
    if live:
        stuck = pending_timeout(live, ctx.pods, ctx.now, ctx.kspec.podStartTimeoutSeconds, ctx.image)
        if stuck:
            _fail(ctx, *stuck)
        return bool(stuck)
    if any(is_deleting(j) for j in running):
        return False  # the previous attempt is still going away
    for name, r in list(ctx.ledger.items()):
        if r.get("task") == task.name and r.get("outcome") == "Succeeded":  # ...but the task is not done
            ctx.ledger[name] = {**r, "outcome": "Failed", "reason": "MissingOutput", "counted": True,
                                "message": f"the Job succeeded but {done_key(task)} is missing from the store"}
    recs = sorted((r for r in ctx.ledger.values() if r.get("task") == task.name), key=lambda r: r["attempt"])
    current = [r for r in recs if r.get("generation") == ctx.gen]
    permanent = [r for r in current if r.get("permanent")]
    if permanent:
        _fail(ctx, C.TASK_FAILED_PERMANENTLY, f"task {task.name} failed permanently: {permanent[-1]['message']}")
        return True
    failures = [r for r in current if r.get("counted")]
    if len(failures) > ctx.kspec.backoffLimit:
        last = failures[-1]
        _fail(ctx, C.BACKOFF_LIMIT_EXCEEDED, f"task {task.name} failed {len(failures)} time(s), backoffLimit "
                                             f"{ctx.kspec.backoffLimit}; last: {_why(last)}")
        return True
    attempt = 1 + max([r["attempt"] for r in recs] + [attempt_of(j) for j in tjobs], default=-1)
    start = C.parse_timestamp(ctx.status.get("startTime")) or ctx.now
    limit = ctx.kspec.activeDeadlineSeconds
    left = None if limit is None else int(limit - (ctx.now - start).total_seconds())
    job = render_job(ctx.cr, ctx.kspec, ctx.spec, task, attempt, active_deadline_seconds=left,
                     defaults=ctx.defaults)
    if job["spec"]["parallelism"] > 1 and not any(o["kind"] == "Service" for o in ctx.out.create):
        ctx.out.create.append(render_service(ctx.cr))
    ctx.out.create.append(job)
    retry = f" (retry after {_why(recs[-1])})" if recs else ""
    ctx.event("Normal", "JobCreated", f"created Job {job['metadata']['name']} for task {task.name}{retry}")
    return False
