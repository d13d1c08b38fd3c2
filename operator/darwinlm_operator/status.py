"""The status ``reconcile.decide`` writes: phase transitions, conditions, progress and the merge patch.

Why this module exists: every rule of ``decide`` ends in a status change - Invalid or valid, terminal
(then ttlSecondsAfterFinished), Failed (DeadlineExceeded, a task failing), Suspended or resumed,
Succeeded, or Running with the stage as reason - and every call on a valid, live search refreshes the
progress fields from the store (generation i/N, progress %, stage, best fitness, ETA and its range from
the generations' timing.json via ``darwinlm.core.eta``, the token estimate via ``darwinlm.core.schedule``,
offspring, checkpoint) and posts GenerationComplete / NewBestParent events. These
writers work on the per-call context (``decision.Context``): they set metav1 conditions through
``conditions`` and post Events; a transition that stops the search deletes its active Jobs, recording
them in the retry ledger. :func:`status_patch` turns the decided status into the JSON merge patch the
handlers apply.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping
from typing import Any

from darwinlm.core.eta import estimate_eta, finish_times, format_duration, progress_percent
from darwinlm.core.plan import Task, all_tasks, done_key, generations_planned
from darwinlm.core.schedule import schedule
from darwinlm.store import layout

from . import conditions as C
from .decision import Context
from .jobstate import attempt_of, get, is_deleting, job_outcome, job_usage
from .render import LABEL_TASK

__all__ = ["format_duration", "status_patch"]

_STAGE_REASONS = {"database": C.BUILDING_DATABASE, "sensitivity": C.MEASURING_SENSITIVITY, "generation": C.SEARCHING, "posttrain": C.POST_TRAINING,
                  "export": C.EXPORTING, "evaluate": C.EVALUATING}


def _delete_active(ctx: Context, cause: str) -> None:
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


def _invalid(ctx: Context, errors: list[tuple[str, str]]) -> None:
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


_FIXABLE = (C.SPEC_INVALID, C.CREDENTIALS_INVALID)  # failures that end once the user fixes the cause


def credentials_invalid(old: Mapping | None, message: str, now: _dt.datetime, generation: int | None) -> dict:
    """The status of a search whose S3 credentials cannot be used (``message`` names the Secret and its
    keys, never a value): phase Failed, Invalid and Failed True with reason CredentialsInvalid. Not
    terminal: the next reconcile that reaches the store clears it (``_valid``). Running Jobs are left
    alone: they hold the credentials they started with."""
    conds = C.set_many((old or {}).get("conditions"), [
        (C.INVALID, True, C.CREDENTIALS_INVALID, message),
        (C.FAILED, True, C.CREDENTIALS_INVALID, message),
        (C.RUNNING, False, C.CREDENTIALS_INVALID, "no new Jobs while the store credentials are unusable"),
    ], now=now, observed_generation=generation)
    return {"phase": "Failed", "message": message, "conditions": conds}


def _valid(ctx: Context) -> None:
    ctx.cond(C.INVALID, False, C.SPEC_VALID, "the spec is valid")
    failed = C.get_condition(ctx.status.get("conditions"), C.FAILED)
    if failed is None or (failed.get("status") == "True" and failed.get("reason") in _FIXABLE):
        ctx.cond(C.FAILED, False, C.IN_PROGRESS, "the search has not failed")
        ctx.status["completionTime"] = None


def _ttl(ctx: Context) -> None:
    ttl = ctx.kspec.ttlSecondsAfterFinished if ctx.kspec is not None else None
    done = C.parse_timestamp(ctx.status.get("completionTime"))
    if ttl is not None and done is not None and (ctx.now - done).total_seconds() >= ttl:
        ctx.out.delete_self = True


def _terminal(ctx: Context) -> bool:
    """Succeeded stays; Failed stays until the spec changes (then the search is re-evaluated).
    A Failed caused by an invalid spec is not terminal: ``_valid`` clears it once the spec is fixed."""
    conds = ctx.old.get("conditions")
    failed = C.get_condition(conds, C.FAILED) or {}
    failed_now = failed.get("status") == "True" and failed.get("reason") not in _FIXABLE
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


def _fail(ctx: Context, reason: str, message: str) -> None:
    _delete_active(ctx, reason)
    ctx.status.update(phase="Failed", completionTime=C.timestamp(ctx.now), message=message, eta=None, etaRange=None)
    ctx.cond(C.FAILED, True, reason, message)
    ctx.cond(C.RUNNING, False, reason, "the search failed")
    ctx.cond(C.RETRYING, False, C.NO_RETRY, "the search failed")
    ctx.event("Warning", reason, message)


def _deadline_passed(ctx: Context) -> bool:
    limit = ctx.kspec.activeDeadlineSeconds
    start = C.parse_timestamp(ctx.status.get("startTime"))
    if limit is None or start is None or (ctx.now - start).total_seconds() < limit:
        return False
    _fail(ctx, C.DEADLINE_EXCEEDED, f"the search ran longer than activeDeadlineSeconds={limit} "
                                    f"(started {ctx.status['startTime']})")
    return True


def _suspend(ctx: Context) -> None:
    active = [j for j in ctx.jobs if job_outcome(j) is None and not is_deleting(j)]
    _delete_active(ctx, C.SUSPENDED_BY_USER)
    if ctx.status.get("phase") != "Suspended":
        ctx.event("Normal", C.SUSPENDED, f"suspended: {len(active)} Job(s) deleted, GPUs released; "
                                         f"set spec.suspend=false to resume from the store")
    ctx.status.update(phase="Suspended", message="suspended (spec.suspend is true)", eta=None, etaRange=None,
                      stage=C.SUSPENDED)
    ctx.cond(C.SUSPENDED, True, C.SUSPENDED_BY_USER, "spec.suspend is true: no Jobs run")
    ctx.cond(C.RUNNING, False, C.SUSPENDED_BY_USER, "the search is suspended")
    ctx.cond(C.RETRYING, False, C.NO_RETRY, "the search is suspended")


def _resume(ctx: Context) -> None:
    if C.is_true(ctx.old.get("conditions"), C.SUSPENDED):
        ctx.cond(C.SUSPENDED, False, C.RESUMED, "resumed from the store")
        ctx.event("Normal", C.RESUMED, "resumed: continuing from the last completed task in the store")
    elif C.get_condition(ctx.status.get("conditions"), C.SUSPENDED) is None:
        ctx.cond(C.SUSPENDED, False, C.NOT_SUSPENDED, "spec.suspend is false")
    ctx.status.setdefault("startTime", C.timestamp(ctx.now))


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and x == x and abs(x) != float("inf") else None


def _progress(ctx: Context, tasks: list[Task]) -> None:
    """Generation i/N, best fitness, ETA, offspring counts and the checkpoint, from the store."""
    spec, store, st = ctx.spec, ctx.store, ctx.status
    total_g = generations_planned(spec, store)
    states = []
    while len(states) < total_g and store.exists(done_key(Task("generation", len(states)))):
        states.append(store.get_json(done_key(Task("generation", len(states)))) or {})
    done_g = len(states)
    phases = all_tasks(spec)
    idx = next((i for i, ph in enumerate(phases) if tasks and tasks[0] in ph), len(phases))
    tasks_done = sum(len(ph) for ph in phases[:idx]) + (len(phases[idx]) - len(tasks) if tasks else 0)
    running_gen = bool(tasks) and tasks[0].kind == "generation"
    partial = len(store.list(layout.generation_results(done_g))) if running_gen else 0
    evaluated = sum(int(s.get("evaluations") or 0) for s in states) + partial
    st.update(generation=f"{done_g}/{total_g}", generationsDone=done_g, generationsTotal=total_g,
              offspringEvaluated=evaluated)
    # the winner's score on the fixed tracking batch (comparable across generations) when the search tracks
    last = states[-1] if states else {}
    st["bestFitness"] = _finite((last.get("tracking") or {}).get("fitness", last.get("best_fitness")))
    searching = bool(tasks) and tasks[0].kind in ("database", "sensitivity", "generation")
    sched = schedule(spec)
    per, tot = sched["per_generation"], sched["total"]
    st["estimate"] = {"evaluationsPerGeneration": per["evaluations"], "fitnessTokensPerGeneration":
                      per["fitness_tokens"], "finetuneTokensPerGeneration": per["finetune_tokens"],
                      "trainedTokensPerGeneration": per["trained_tokens"], "fitnessTokensTotal": tot["fitness_tokens"],
                      "trainedTokensTotal": tot["trained_tokens"]}
    st["progress"] = f"{progress_percent(done_g, total_g, after_search=not searching)}%"
    st["stage"] = _STAGE_REASONS[tasks[0].kind] if tasks else C.FINISHED
    _eta(ctx, states, total_g - done_g if searching else 0)
    st["checkpointURI"] = f"{store.uri}/{done_key(Task('generation', done_g - 1))}" if done_g else None
    ctx.out.metrics.update(progress=(tasks_done, evaluated), tasks=sum(len(ph) for ph in phases))
    if not tasks or tasks[0].kind != "database":
        shards = [store.get_json(done_key(t)) or {} for t in phases[0]]
        ctx.out.metrics["databaseSeconds"] = max((_finite(s.get("seconds")) or 0.0 for s in shards), default=0.0)
    before = int(ctx.old.get("generationsDone") or 0)
    if done_g > before and states:
        ctx.event("Normal", "GenerationComplete", f"generation {done_g}/{total_g} complete, best fitness "
                                                  f"{st['bestFitness']}")
        for s in states[before:]:
            if s.get("parent_survived") is False:
                ctx.event("Normal", C.NEW_BEST_PARENT,
                          f"generation {int(s.get('generation', 0)) + 1}/{total_g}: new best parent, fitness "
                          f"{_finite(s.get('best_fitness'))}")


def _eta(ctx: Context, states: list, remaining: int) -> None:
    """``eta`` (mean-based) and ``etaRange`` (25th..75th percentile) until the last generation finishes,
    from the measured wall-clock intervals between generation finishes (Job hand-off included), see
    ``darwinlm.core.eta``; None outside the search phases or before any generation finished."""
    st = ctx.status
    est = None
    if remaining > 0 and states:
        est = estimate_eta(finish_times(ctx.store, len(states)), remaining, ctx.now.timestamp(),
                           first_seconds=_finite(states[0].get("seconds")))
    st["eta"] = format_duration(est.seconds) if est is not None else None
    st["etaRange"] = f"{format_duration(est.low)}-{format_duration(est.high)}" if est is not None else None
    ctx.out.metrics["etaSeconds"] = est.seconds if est is not None else None


def _succeed(ctx: Context) -> None:
    result = f"{ctx.store.uri}/{layout.RESULT}"
    ctx.status.update(phase="Succeeded", resultURI=result, eta=None, etaRange=None, progress="100%",
                      stage=C.FINISHED, completionTime=C.timestamp(ctx.now),
                      message=f"result in {result}")
    ctx.status.setdefault("startTime", C.timestamp(ctx.now))
    ctx.cond(C.SUCCEEDED, True, C.ALL_TASKS_COMPLETE, f"every task is complete; result in {ctx.status['resultURI']}")
    ctx.cond(C.RUNNING, False, C.FINISHED, "the search is complete")
    ctx.cond(C.RETRYING, False, C.NO_RETRY, "the search is complete")
    ctx.event("Normal", C.SUCCEEDED, f"search complete: {ctx.status['resultURI']}")


def _why(rec: Mapping) -> str:
    return f"{rec.get('reason')}: {rec.get('message', '')}".rstrip(": ")


def _running(ctx: Context, tasks: list[Task]) -> None:
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
