"""Reading Jobs and Pods as the Job controller and the kubelet wrote them: outcome, failure cause, usage.

Why this module exists: ``reconcile.decide`` must tell a finished Job from a running one, an eviction from a
crash, a permanent error from a retriable one, and a pod that will never start from one that is slow - all from
plain API dicts (``kubectl get -o json`` shapes), with no client and no clock of its own.

Failure classes (``classify_failure``), first match wins:

* a pod with ``DisruptionTarget`` (preemption, eviction API, taint manager, node shutdown) or
  ``status.reason`` Evicted/Preempting/Shutdown/...: *not counted* (Preempted / Evicted);
* exit code 2 (darwinlm_jobs: bad spec, infeasible target), or the Job's PodFailurePolicy reason
  for it: *permanent* (PermanentError, with the first error line of the termination message);
* exit code 137 or 143 without OOMKilled (the container was killed by SIGKILL/SIGTERM from outside: node
  pressure, a runtime or node restart, preemption without a DisruptionTarget condition): *not counted* (Killed);
* OOMKilled; exit code 3 (RetriableError: store unreachable, peer lost); any other exit code (Error);
  no pod left: the Job condition's reason - all *counted* against backoffLimit.
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Mapping
from typing import Any

from darwinlm.errors import EXIT_PERMANENT, EXIT_RETRIABLE

from . import conditions as C
from .render import GPU, LABEL_ATTEMPT

__all__ = ["get", "job_outcome", "pods_of", "first_error_line", "classify_failure", "job_usage", "job_end",
           "attempt_of", "is_deleting", "pending_timeout"]

_IMAGE_PULL = frozenset({"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull"})
_DISRUPTED_POD_REASONS = {"Evicted": "Evicted", "Preempting": "Preempted", "Shutdown": "Evicted",
                          "NodeShutdown": "Evicted", "Terminated": "Evicted", "NodeLost": "Evicted"}
_KILLED = {137: "SIGKILL", 143: "SIGTERM"}  # 128 + signal number; OOMKilled is told apart by its reason
_AWS_KEY = re.compile(r"\b(?:AKIA|ASIA|AROA|AIDA)[A-Z0-9]{12,}\b")

def get(obj: Any, *path: str, default: Any = None) -> Any:
    for p in path:
        if not isinstance(obj, Mapping):
            return default
        obj = obj.get(p)
    return default if obj is None else obj


def _true(conds: Any, type_: str) -> Mapping | None:
    for c in conds or ():
        if c.get("type") == type_ and c.get("status") == "True":
            return c
    return None


def job_outcome(job: Mapping) -> str | None:
    """``"Succeeded"``, ``"Failed"`` or None (still running) from a Job's status."""
    st = get(job, "status", default={})
    conds = st.get("conditions")
    if _true(conds, "Complete") or _true(conds, "SuccessCriteriaMet"):
        return "Succeeded"
    if _true(conds, "Failed") or _true(conds, "FailureTarget"):
        return "Failed"
    if int(st.get("succeeded") or 0) >= int(get(job, "spec", "completions", default=1)):
        return "Succeeded"
    if int(st.get("failed") or 0) > int(get(job, "spec", "backoffLimit", default=0)):
        return "Failed"
    return None


def pods_of(job: Mapping, pods: list[Mapping]) -> list[Mapping]:
    name, uid = get(job, "metadata", "name"), get(job, "metadata", "uid")
    out = []
    for p in pods:
        labels = get(p, "metadata", "labels", default={})
        owners = get(p, "metadata", "ownerReferences", default=[])
        if (any(o.get("kind") == "Job" and (o.get("uid") == uid if uid else o.get("name") == name)
                for o in owners)
                or name in (labels.get("batch.kubernetes.io/job-name"), labels.get("job-name"),
                            labels.get("darwinlm.io/job"))):
            out.append(p)
    return out


def _terminated(pod: Mapping) -> list[Mapping]:
    return [s["state"]["terminated"] for s in get(pod, "status", "containerStatuses", default=[])
            if get(s, "state", "terminated")]


def first_error_line(text: str | None) -> str:
    """The first line mentioning an error (else the last non-empty line), credentials scrubbed."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    pick = next((ln for ln in lines if "error" in ln.lower()), lines[-1] if lines else "")
    return _AWS_KEY.sub("***", pick)[:300]


def classify_failure(job: Mapping, pods: list[Mapping]) -> dict[str, Any]:
    """``{reason, counted, permanent, message}`` of a failed Job, from its pods (then the Job)."""
    mine = pods_of(job, pods)
    for p in mine:
        st = get(p, "status", default={})
        dt = _true(st.get("conditions"), "DisruptionTarget")
        if dt is not None:
            reason = "Preempted" if dt.get("reason") == "PreemptionByScheduler" else "Evicted"
            return _failure(reason, False, False, f"pod {get(p, 'metadata', 'name')}: {dt.get('reason', '')} "
                                                  f"{dt.get('message', '')}".strip())
        if st.get("reason") in _DISRUPTED_POD_REASONS:
            return _failure(_DISRUPTED_POD_REASONS[st["reason"]], False, False,
                            f"pod {get(p, 'metadata', 'name')}: {st.get('message') or st['reason']}")
    terms = [t for p in mine for t in _terminated(p) if t.get("exitCode") not in (None, 0)]
    for t in terms:
        if t.get("exitCode") == EXIT_PERMANENT:
            return _failure("PermanentError", False, True,
                            first_error_line(t.get("message")) or f"exit code {EXIT_PERMANENT}")
    for t in terms:
        if t.get("reason") == "OOMKilled":
            return _failure("OOMKilled", True, False, "out of memory: raise resources.limits.memory or "
                                                      "lower the stage's fine-tune tokens")
    for t in terms:
        if t.get("exitCode") in _KILLED:
            return _failure("Killed", False, False, f"exit code {t['exitCode']} ({_KILLED[t['exitCode']]} from "
                                                    f"outside the task): retried without counting")
    for t in terms:
        why = "RetriableError" if t.get("exitCode") == EXIT_RETRIABLE else "Error"
        return _failure(why, True, False, f"exit code {t.get('exitCode')}: "
                                          f"{first_error_line(t.get('message')) or t.get('reason', '')}")
    cond = _true(get(job, "status", "conditions"), "Failed") or {}
    if cond.get("reason") == "PodFailurePolicy" and f"exit code {EXIT_PERMANENT}" in str(cond.get("message", "")):
        return _failure("PermanentError", False, True, str(cond.get("message")))
    return _failure(cond.get("reason") or "JobFailed", True, False, str(cond.get("message") or "the Job failed"))


def _failure(reason: str, counted: bool, permanent: bool, message: str) -> dict[str, Any]:
    return {"reason": reason, "counted": counted, "permanent": permanent, "message": message}


def _seconds(start: str | None, end: _dt.datetime | None) -> float:
    t0 = C.parse_timestamp(start)
    return max(0.0, (end - t0).total_seconds()) if t0 and end else 0.0


def job_usage(job: Mapping, end: _dt.datetime | None) -> tuple[float, float]:
    """(wall seconds, GPU-seconds = seconds x GPUs per pod x pods) of a Job until ``end``."""
    secs = _seconds(get(job, "status", "startTime") or get(job, "metadata", "creationTimestamp"), end)
    ctrs = get(job, "spec", "template", "spec", "containers", default=[{}])
    res = get(ctrs[0], "resources", default={})
    try:
        gpus = int(str(get(res, "limits", GPU) or get(res, "requests", GPU) or 0))
    except ValueError:
        gpus = 0
    return round(secs, 3), round(secs * gpus * int(get(job, "spec", "parallelism", default=1)), 3)


def job_end(job: Mapping, now: _dt.datetime) -> _dt.datetime:
    st = get(job, "status", default={})
    for c in st.get("conditions") or ():
        if c.get("type") in ("Complete", "Failed") and c.get("status") == "True" and c.get("lastTransitionTime"):
            return C.parse_timestamp(c["lastTransitionTime"]) or now
    return C.parse_timestamp(st.get("completionTime")) or now


def attempt_of(job: Mapping) -> int:
    try:
        return int(get(job, "metadata", "labels", LABEL_ATTEMPT, default="0"))
    except ValueError:
        return 0


def is_deleting(job: Mapping) -> bool:
    return bool(get(job, "metadata", "deletionTimestamp"))


def pending_timeout(live: list[Mapping], pods: list[Mapping], now: _dt.datetime, limit: int,
                    image: str) -> tuple[str, str] | None:
    """``(reason, message)`` when a pod of a ``live`` Job stayed Pending ``limit`` seconds or more with an
    image pull error (ImagePullTimeout) or unschedulable (Unschedulable); None otherwise (a slow start,
    e.g. ContainerCreating, is no reason to fail)."""
    for job in live:
        for pod in pods_of(job, pods):
            born = C.parse_timestamp(get(pod, "metadata", "creationTimestamp"))
            if get(pod, "status", "phase") != "Pending" or born is None:
                continue
            age = int((now - born).total_seconds())
            if age < limit:
                continue
            name = get(pod, "metadata", "name")
            for cs in get(pod, "status", "containerStatuses", default=[]):
                waiting = get(cs, "state", "waiting", default={})
                if waiting.get("reason") in _IMAGE_PULL:
                    return C.IMAGE_PULL_TIMEOUT, (f"pod {name} could not pull image {image!r} for {age}s "
                                                  f"({waiting['reason']}: {waiting.get('message', '')})".strip())
            for cond in get(pod, "status", "conditions", default=[]):
                if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and \
                        cond.get("reason") == "Unschedulable":
                    return C.UNSCHEDULABLE, f"pod {name} unschedulable for {age}s: {cond.get('message', '')}"
    return None
