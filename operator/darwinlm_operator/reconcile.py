"""The reconciler's brain: ``decide(cr, jobs, pods, store, now) -> Decision``, a pure function.

Why this module exists: kopf is level-triggered and sees only the latest state (nolar/kopf#698), and
the operator may restart at any moment. So nothing is remembered between calls: every decision is
recomputed from the PruningSearch (spec + status), its Jobs and their Pods (API objects) and the
search's store (the plan's completion markers, via ``darwinlm.plan.next_tasks``). ``decide`` does no
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
   live Job (failing the search when its pods stay Pending past podStartTimeoutSeconds with an image
   pull error / unschedulable), else fail permanently / on exhausted retries, else create the next
   attempt ``<search>-<task>-a<n>`` (n = highest attempt seen in the ledger and the Jobs, plus one).

``status.phase`` is Running, Suspended, Succeeded or Failed; while Running, the reason of the Running
condition (and ``status.message``) names the stage: BuildingDatabase, Searching, PostTraining, Exporting,
Evaluating. Job/Pod reading (outcome, failure class, stuck pods, GPU-seconds) lives in ``jobstate``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from collections.abc import Mapping
from typing import Any, Protocol

from darwinlm.errors import SpecError
from darwinlm.plan import Task, done_key, next_tasks
from darwinlm.spec import spec_to_dict

from . import conditions as C
from .jobstate import (attempt_of, classify_failure, first_error_line, get, is_deleting, job_end,  # noqa: F401
                       job_outcome, job_usage, pending_timeout)
from .kspec import JobDefaults, job_image, load_psearch
from .render import LABEL_SEARCH_UID, LABEL_TASK, render_job, render_service

__all__ = ["Decision", "Event", "StoreView", "decide", "as_manifest", "job_outcome", "classify_failure",
           "status_patch", "format_duration"]

_STAGE_REASONS = {"database": C.BUILDING_DATABASE, "generation": C.SEARCHING, "posttrain": C.POST_TRAINING,
                  "export": C.EXPORTING, "evaluate": C.EVALUATING}


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


# ------------------------------------------------------------------------------ the decision

# the status fields the operator owns (declared in the CRD's status schema, crd.PruningSearchStatus)
_OWNED = ("phase", "conditions", "observedGeneration", "generation", "generationsDone", "generationsTotal",
          "bestFitness", "eta", "gpuSeconds", "offspringEvaluated", "offspringFailed", "checkpointURI",
          "resultURI", "startTime", "completionTime", "retries", "message", "attempts")


@dataclasses.dataclass
class _Ctx:
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
    ctx = _Ctx(cr, owned, pods, store, now, old, {k: old[k] for k in _OWNED if k in old}, Decision(),
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


def _account(ctx: _Ctx) -> None:
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


def _delete_active(ctx: _Ctx, cause: str) -> None:
    for job in ctx.jobs:
        name = get(job, "metadata", "name")
        if job_outcome(job) is not None or is_deleting(job):
            continue
        ctx.out.delete.append(name)
        if name not in ctx.ledger:
            secs, gpus = job_usage(job, ctx.now)
            ctx.ledger[name] = {"task": get(job, "metadata", "labels", LABEL_TASK, default=""),
                                "attempt": attempt_of(job), "outcome": "Deleted", "reason": cause, "counted": False,
                                "permanent": False, "generation": ctx.gen, "seconds": secs, "gpuSeconds": gpus}


def _invalid(ctx: _Ctx, errors: list[tuple[str, str]]) -> None:
    shown = [(p if p.startswith("metadata.") else ("spec." + p if p else "spec"), m) for p, m in errors]
    message = "; ".join(f"{p}: {m}" for p, m in shown)
    was = C.get_condition(ctx.old.get("conditions"), C.INVALID)
    if not (was and was.get("status") == "True" and was.get("message") == message):
        ctx.event("Warning", C.SPEC_INVALID, message)
    _delete_active(ctx, C.SPEC_INVALID)
    ctx.status.update(phase="Failed", message=message)
    ctx.cond(C.INVALID, True, C.SPEC_INVALID, message)
    ctx.cond(C.FAILED, True, C.SPEC_INVALID, f"invalid spec: {shown[0][0]}" + (
        f" (and {len(shown) - 1} more)" if len(shown) > 1 else ""))
    ctx.cond(C.RUNNING, False, C.SPEC_INVALID, "no Jobs run while the spec is invalid")


def _valid(ctx: _Ctx) -> None:
    ctx.cond(C.INVALID, False, C.SPEC_VALID, "the spec is valid")
    failed = C.get_condition(ctx.status.get("conditions"), C.FAILED)
    if failed is None or (failed.get("status") == "True" and failed.get("reason") == C.SPEC_INVALID):
        ctx.cond(C.FAILED, False, C.IN_PROGRESS, "the search has not failed")
        ctx.status["completionTime"] = None


def _spec_conflict(spec, store: StoreView | None) -> list[tuple[str, str]]:
    """Top-level fields that differ from the spec.json the search's first task saved (the jobs would
    refuse them with exit code 2; this says so before any Job is created)."""
    saved = store.get_json("spec.json") if store is not None else None
    if not isinstance(saved, Mapping):
        return []
    mine = spec_to_dict(spec)
    keys = sorted(k for k in set(saved) | set(mine) if k != "store" and saved.get(k) != mine.get(k))
    return [(k, f"differs from the spec this search was started with ({store.uri}/spec.json); revert it "
                f"or create a new PruningSearch") for k in keys]


def _ttl(ctx: _Ctx) -> None:
    ttl = ctx.kspec.ttlSecondsAfterFinished if ctx.kspec is not None else None
    done = C.parse_timestamp(ctx.status.get("completionTime"))
    if ttl is not None and done is not None and (ctx.now - done).total_seconds() >= ttl:
        ctx.out.delete_self = True


def _terminal(ctx: _Ctx) -> bool:
    """Succeeded stays; Failed stays until the spec changes (then the search is re-evaluated).
    A Failed caused by an invalid spec is not terminal: ``_valid`` clears it once the spec is fixed."""
    conds = ctx.old.get("conditions")
    failed = C.get_condition(conds, C.FAILED) or {}
    failed_now = failed.get("status") == "True" and failed.get("reason") != C.SPEC_INVALID
    if C.is_true(conds, C.SUCCEEDED):
        _ttl(ctx)  # a Job still finishing (its marker is written, its pod exiting) is left alone
        return True
    if failed_now and failed.get("observedGeneration") == ctx.gen:
        _delete_active(ctx, "Finished")
        _ttl(ctx)
        return True
    if failed_now:
        ctx.cond(C.FAILED, False, C.IN_PROGRESS, "the spec changed: continuing from the store with a fresh "
                                                 "retry budget")
        ctx.status["completionTime"] = None
        ctx.event("Normal", C.RESUMED, "the spec changed after the failure: continuing from the store")
    return False


def _fail(ctx: _Ctx, reason: str, message: str) -> None:
    _delete_active(ctx, reason)
    ctx.status.update(phase="Failed", completionTime=C.timestamp(ctx.now), message=message, eta=None)
    ctx.cond(C.FAILED, True, reason, message)
    ctx.cond(C.RUNNING, False, reason, "the search failed")
    ctx.cond(C.RETRYING, False, C.NO_RETRY, "the search failed")
    ctx.event("Warning", reason, message)


def _deadline_passed(ctx: _Ctx) -> bool:
    limit = ctx.kspec.activeDeadlineSeconds
    start = C.parse_timestamp(ctx.status.get("startTime"))
    if limit is None or start is None or (ctx.now - start).total_seconds() < limit:
        return False
    _fail(ctx, C.DEADLINE_EXCEEDED, f"the search ran longer than activeDeadlineSeconds={limit} "
                                    f"(started {ctx.status['startTime']})")
    return True


def _suspend(ctx: _Ctx) -> None:
    active = [j for j in ctx.jobs if job_outcome(j) is None and not is_deleting(j)]
    _delete_active(ctx, C.SUSPENDED_BY_USER)
    if ctx.status.get("phase") != "Suspended":
        ctx.event("Normal", C.SUSPENDED, f"suspended: {len(active)} Job(s) deleted, GPUs released; "
                                         f"set spec.suspend=false to resume from the store")
    ctx.status.update(phase="Suspended", message="suspended (spec.suspend is true)", eta=None)
    ctx.cond(C.SUSPENDED, True, C.SUSPENDED_BY_USER, "spec.suspend is true: no Jobs run")
    ctx.cond(C.RUNNING, False, C.SUSPENDED_BY_USER, "the search is suspended")
    ctx.cond(C.RETRYING, False, C.NO_RETRY, "the search is suspended")


def _resume(ctx: _Ctx) -> None:
    if C.is_true(ctx.old.get("conditions"), C.SUSPENDED):
        ctx.cond(C.SUSPENDED, False, C.RESUMED, "resumed from the store")
        ctx.event("Normal", C.RESUMED, "resumed: continuing from the last completed task in the store")
    elif C.get_condition(ctx.status.get("conditions"), C.SUSPENDED) is None:
        ctx.cond(C.SUSPENDED, False, C.NOT_SUSPENDED, "spec.suspend is false")
    ctx.status.setdefault("startTime", C.timestamp(ctx.now))


def format_duration(seconds: float) -> str:
    """``8000`` -> ``"2h13m"``; ``63`` -> ``"1m3s"`` (the ETA column)."""
    s = max(0, int(round(seconds)))
    h, m, sec = s // 3600, s % 3600 // 60, s % 60
    return f"{h}h{m}m" if h else (f"{m}m{sec}s" if m else f"{sec}s")


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and x == x and abs(x) != float("inf") else None


def _progress(ctx: _Ctx, tasks: list[Task]) -> None:
    """Generation i/N, best fitness, ETA, offspring counts and the checkpoint, from the store."""
    from darwinlm.plan import all_tasks

    spec, store, st = ctx.spec, ctx.store, ctx.status
    total_g = spec.search.generations
    states = []
    while len(states) < total_g and store.exists(done_key(Task("generation", len(states)))):
        states.append(store.get_json(done_key(Task("generation", len(states)))) or {})
    done_g = len(states)
    phases = all_tasks(spec)
    idx = next((i for i, ph in enumerate(phases) if tasks and tasks[0] in ph), len(phases))
    tasks_done = sum(len(ph) for ph in phases[:idx]) + (len(phases[idx]) - len(tasks) if tasks else 0)
    running_gen = bool(tasks) and tasks[0].kind == "generation"
    partial = len(store.list(f"generations/{done_g:05d}/results")) if running_gen else 0
    evaluated = sum(int(s.get("evaluations") or 0) for s in states) + partial
    st.update(generation=f"{done_g}/{total_g}", generationsDone=done_g, generationsTotal=total_g,
              offspringEvaluated=evaluated)
    st["bestFitness"] = _finite(states[-1].get("best_fitness")) if states else None
    secs = [float(s["seconds"]) for s in states if _finite(s.get("seconds")) is not None]
    searching = bool(tasks) and tasks[0].kind in ("database", "generation")
    st["eta"] = format_duration(sum(secs) / len(secs) * (total_g - done_g)) if secs and searching else None
    st["checkpointURI"] = f"{store.uri}/{done_key(Task('generation', done_g - 1))}" if done_g else None
    ctx.out.metrics.update(progress=(tasks_done, evaluated), tasks=sum(len(ph) for ph in phases))
    if not tasks or tasks[0].kind != "database":
        shards = [store.get_json(done_key(t)) or {} for t in phases[0]]
        ctx.out.metrics["databaseSeconds"] = max((_finite(s.get("seconds")) or 0.0 for s in shards), default=0.0)
    if done_g > int(ctx.old.get("generationsDone") or 0) and states:
        ctx.event("Normal", "GenerationComplete", f"generation {done_g}/{total_g} complete, best fitness "
                                                  f"{st['bestFitness']}")


def _succeed(ctx: _Ctx) -> None:
    ctx.status.update(phase="Succeeded", resultURI=f"{ctx.store.uri}/result", eta=None,
                      completionTime=C.timestamp(ctx.now), message=f"result in {ctx.store.uri}/result")
    ctx.status.setdefault("startTime", C.timestamp(ctx.now))
    ctx.cond(C.SUCCEEDED, True, C.ALL_TASKS_COMPLETE, f"every task is complete; result in {ctx.status['resultURI']}")
    ctx.cond(C.RUNNING, False, C.FINISHED, "the search is complete")
    ctx.cond(C.RETRYING, False, C.NO_RETRY, "the search is complete")
    ctx.event("Normal", C.SUCCEEDED, f"search complete: {ctx.status['resultURI']}")


def _drive(ctx: _Ctx, task: Task) -> bool:
    """Wait for, retry or start ``task``; True when the search failed (stop)."""
    tjobs = [j for j in ctx.jobs if get(j, "metadata", "labels", LABEL_TASK) == task.name]
    live = [j for j in tjobs if job_outcome(j) is None and not is_deleting(j)]
    if live:
        stuck = pending_timeout(live, ctx.pods, ctx.now, ctx.kspec.podStartTimeoutSeconds, ctx.image)
        if stuck:
            _fail(ctx, *stuck)
        return bool(stuck)
    if any(is_deleting(j) for j in tjobs):
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


def _why(rec: Mapping) -> str:
    return f"{rec.get('reason')}: {rec.get('message', '')}".rstrip(": ")


def _running(ctx: _Ctx, tasks: list[Task]) -> None:
    names = {t.name for t in tasks}
    stage = _STAGE_REASONS[tasks[0].kind]
    message = f"{stage}: " + ", ".join(sorted(names))
    if C.get_condition(ctx.old.get("conditions"), C.RUNNING) is None or \
            C.get_condition(ctx.old.get("conditions"), C.RUNNING).get("reason") != stage:
        ctx.event("Normal", stage, f"stage {stage}: {', '.join(sorted(names))}")
    ctx.status.update(phase="Running", message=message)
    ctx.out.metrics["stage"] = stage
    ctx.cond(C.RUNNING, True, stage, message)
    ctx.cond(C.SUCCEEDED, False, C.IN_PROGRESS, "the search is not complete")
    retried = [r for r in ctx.ledger.values() if r.get("task") in names and r.get("generation") == ctx.gen
               and r.get("outcome") != "Deleted"]
    if retried:
        last = max(retried, key=lambda r: r["attempt"])
        reason = C.RETRYING_AFTER_FAILURE if last.get("counted") else C.RETRYING_AFTER_DISRUPTION
        ctx.cond(C.RETRYING, True, reason, f"{last['task']} attempt {last['attempt'] + 1} after {_why(last)}")
    else:
        ctx.cond(C.RETRYING, False, C.NO_RETRY, "no task is being retried")


def status_patch(old: Mapping | None, new: Mapping) -> dict:
    """A JSON merge patch turning ``old`` into ``new`` for the keys of ``new`` (nested dicts
    recursively; None deletes). Empty when nothing changed: the handler then patches nothing."""
    old = old or {}
    out: dict[str, Any] = {}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            sub = status_patch(before, value)
            if sub:
                out[key] = sub
        elif value is None:
            if key in old:
                out[key] = None
        elif before != value:
            out[key] = value
    return out
