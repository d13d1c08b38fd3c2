"""metav1.Condition bookkeeping for ``PruningSearch.status.conditions``: pure setters that take ``now``.

Why this module exists: conditions are how users (and tools such as ``kubectl wait``) learn *why* a
search is where it is. Kubernetes conventions (metav1.Condition) are followed exactly: ``type``,
``status`` ("True"/"False"/"Unknown"), a CamelCase ``reason`` from the constants below, a human
``message``, ``observedGeneration`` and ``lastTransitionTime``, which changes only when ``status``
changes. Everything here is a pure function of its arguments (the time is passed in), so the
reconciler stays testable and level-triggered.

Condition types (at most one of Succeeded/Failed is ever True; both are terminal):

* ``Invalid``    True when the spec fails validation; the message names the field path(s).
* ``Running``    True while Jobs work through the plan; the reason names the stage.
* ``Suspended``  True while ``spec.suspend`` holds the search (no Jobs, no GPUs held).
* ``Retrying``   True while a retry of a failed Job is under way; the message names task and cause.
* ``Succeeded``  True once every task of the plan is complete (``status.resultURI`` is set).
* ``Failed``     True once the search cannot go on; the reason says why (see the constants).
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "INVALID", "RUNNING", "SUSPENDED", "RETRYING", "SUCCEEDED", "FAILED", "TYPES",
    "set_condition", "set_many", "get_condition", "is_true", "timestamp", "parse_timestamp",
]

# ---- condition types
INVALID = "Invalid"
RUNNING = "Running"
SUSPENDED = "Suspended"
RETRYING = "Retrying"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
TYPES = (INVALID, RUNNING, SUSPENDED, RETRYING, SUCCEEDED, FAILED)

# ---- reasons (CamelCase, stable: alerting rules and users match on them)
SPEC_INVALID = "SpecInvalid"
SPEC_VALID = "SpecValid"
CREDENTIALS_INVALID = "CredentialsInvalid"  # spec.s3.secretRef: Secret or key missing, or S3 refused it
BUILDING_DATABASE = "BuildingDatabase"
MEASURING_SENSITIVITY = "MeasuringSensitivity"
SEARCHING = "Searching"
POST_TRAINING = "PostTraining"
EXPORTING = "Exporting"
EVALUATING = "Evaluating"
WAITING = "Waiting"
SUSPENDED_BY_USER = "SuspendedByUser"
RESUMED = "Resumed"
NOT_SUSPENDED = "NotSuspended"
RETRYING_AFTER_DISRUPTION = "RetryingAfterDisruption"
RETRYING_AFTER_FAILURE = "RetryingAfterFailure"
NO_RETRY = "NoRetry"
ALL_TASKS_COMPLETE = "AllTasksComplete"
IN_PROGRESS = "InProgress"
TASK_FAILED_PERMANENTLY = "TaskFailedPermanently"
BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
DEADLINE_EXCEEDED = "DeadlineExceeded"
IMAGE_PULL_TIMEOUT = "ImagePullTimeout"
UNSCHEDULABLE = "Unschedulable"
FINISHED = "Finished"
NEW_BEST_PARENT = "NewBestParent"  # Event reason: a generation's winner replaced the parent

_STATUSES = ("True", "False", "Unknown")


def timestamp(now: _dt.datetime) -> str:
    """RFC 3339 UTC with second precision, as the API server writes metav1.Time."""
    if now.tzinfo is None:
        now = now.replace(tzinfo=_dt.timezone.utc)
    return now.astimezone(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_timestamp(value: str | None) -> _dt.datetime | None:
    """The inverse of :func:`timestamp` (also accepts fractions and offsets); None for None/garbage."""
    if not value or not isinstance(value, str):
        return None
    try:
        parsed = _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=_dt.timezone.utc)


def get_condition(conditions: Iterable[Mapping[str, Any]] | None, type_: str) -> Mapping[str, Any] | None:
    for cond in conditions or ():
        if cond.get("type") == type_:
            return cond
    return None


def is_true(conditions: Iterable[Mapping[str, Any]] | None, type_: str) -> bool:
    cond = get_condition(conditions, type_)
    return bool(cond) and cond.get("status") == "True"


def set_condition(conditions: Iterable[Mapping[str, Any]] | None, type_: str, status: bool | str,
                  reason: str, message: str, *, now: _dt.datetime, observed_generation: int | None
                  ) -> list[dict[str, Any]]:
    """A new list with condition ``type_`` set; the others are kept as they are (copied).

    ``lastTransitionTime`` keeps its old value when ``status`` is unchanged (only reason/message/
    observedGeneration are refreshed); new conditions are appended, so the order is stable.
    """
    if isinstance(status, bool):
        status = "True" if status else "False"
    if status not in _STATUSES:
        raise ValueError(f"condition status must be one of {_STATUSES}, got {status!r}")
    if not reason or not reason[0].isupper() or not reason.isalnum():
        raise ValueError(f"condition reason must be CamelCase, got {reason!r}")
    out = [dict(c) for c in conditions or ()]
    new = {"type": type_, "status": status, "reason": reason, "message": message[:32768],
           "lastTransitionTime": timestamp(now)}
    if observed_generation is not None:
        new["observedGeneration"] = int(observed_generation)
    for i, old in enumerate(out):
        if old.get("type") == type_:
            if old.get("status") == status and old.get("lastTransitionTime"):
                new["lastTransitionTime"] = old["lastTransitionTime"]
            out[i] = new
            return out
    out.append(new)
    return out


def set_many(conditions: Iterable[Mapping[str, Any]] | None,
             updates: Iterable[tuple[str, bool | str, str, str]], *, now: _dt.datetime,
             observed_generation: int | None) -> list[dict[str, Any]]:
    """Apply several ``(type, status, reason, message)`` updates in order."""
    out = [dict(c) for c in conditions or ()]
    for type_, status, reason, message in updates:
        out = set_condition(out, type_, status, reason, message, now=now,
                            observed_generation=observed_generation)
    return out
