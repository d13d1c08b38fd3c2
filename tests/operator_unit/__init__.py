"""Unit tests of the operator's pure parts (render, conditions, decide) and its thin I/O helpers.

No cluster, no network: PruningSearch bodies, Jobs and Pods are plain dicts built here, and the
store is a dict (:class:`FakeStore`). The builders live in this ``__init__`` so every test module
shares them.
"""

from __future__ import annotations

import copy
import datetime as dt
import pathlib
from typing import Any

from darwinlm.core.plan import Task, done_key
from darwinlm.spec.io import set_path
from tests.conftest import tiny_spec_dict

T0 = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
UID = "0b5c1d2e-aaaa-bbbb-cccc-000000000001"


def ts(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def cr_spec(**over: Any) -> dict:
    """A PruningSearch spec: the tiny test spec + image + S3 secretRef (Kubernetes fields).

    ``search.init: even`` unless overridden: the stories here go database -> generations; the sensitivity
    phase between them has tests of its own."""
    spec = tiny_spec_dict(pathlib.Path("/assets"), "s3://bucket/prefix")
    spec.pop("name")
    spec["search"]["init"] = "even"
    spec.update(image="registry.example/darwinlm-job:0.1.0",
                s3={"secretRef": {"name": "s3-creds"}, "endpoint": "http://s3.example:9000"})
    for key, value in over.items():
        set_path(spec, key.split("."), value)
    return spec


def make_cr(*, name: str = "tiny", generation: int = 1, status: dict | None = None, **spec_over: Any) -> dict:
    return {"apiVersion": "darwinlm.io/v1alpha1", "kind": "PruningSearch",
            "metadata": {"name": name, "namespace": "team-a", "uid": UID, "generation": generation,
                         "creationTimestamp": ts(T0)},
            "spec": cr_spec(**spec_over), "status": copy.deepcopy(status) if status else {}}


class FakeStore:
    """A search prefix in memory: ``keys`` maps store keys to JSON values."""

    def __init__(self, uri: str = f"s3://bucket/prefix/searches/tiny-{UID}"):
        self.uri = uri
        self.keys: dict[str, Any] = {}

    def exists(self, key: str) -> bool:
        return key in self.keys

    def get_json(self, key: str) -> Any:
        return self.keys.get(key)

    def list(self, prefix: str) -> list[str]:
        return sorted(k for k in self.keys if k.startswith(prefix.rstrip("/") + "/"))

    def done(self, *tasks: Task, **payload: Any) -> "FakeStore":
        for t in tasks:
            self.keys[done_key(t)] = {"seconds": 10.0, **payload}
        return self

    def generation(self, g: int, *, best: float, seconds: float = 100.0, evaluations: int = 7,
                   finished: float | None = None, new_parent: bool = False) -> "FakeStore":
        """Generation ``g``'s state; ``finished`` (seconds after T0) also writes its timing.json."""
        self.keys[done_key(Task("generation", g))] = {"generation": g, "best_fitness": best,
                                                      "seconds": seconds, "evaluations": evaluations,
                                                      "parent_survived": not new_parent}
        if finished is not None:
            self.keys[f"generations/{g:05d}/timing.json"] = {"generation": g, "seconds": seconds,
                                                             "finished": at(finished).timestamp()}
        return self


def job_status(job: dict, outcome: str | None, *, start: float = 0.0, end: float | None = None,
               reason: str | None = None, message: str = "") -> dict:
    """Give a rendered Job the status the Job controller would (Complete / Failed / running)."""
    job = copy.deepcopy(job)
    job["metadata"].update(uid=f"job-uid-{job['metadata']['name']}", creationTimestamp=ts(at(start)))
    st: dict[str, Any] = {"startTime": ts(at(start)), "active": 0 if outcome else 1}
    if outcome == "Succeeded":
        st.update(succeeded=job["spec"]["completions"], completionTime=ts(at(end or start)),
                  conditions=[{"type": "Complete", "status": "True", "lastTransitionTime": ts(at(end or start))}])
    elif outcome == "Failed":
        st.update(failed=1, conditions=[{"type": "Failed", "status": "True", "reason": reason or "BackoffLimitExceeded",
                                         "message": message, "lastTransitionTime": ts(at(end or start))}])
    job["status"] = st
    return job


def make_pod(job: dict, *, phase: str = "Failed", exit_code: int | None = None, reason: str | None = None,
             term_reason: str = "Error", message: str = "", created: float = 0.0,
             conditions: list | None = None, waiting: str | None = None, index: int = 0) -> dict:
    name = job["metadata"]["name"]
    status: dict[str, Any] = {"phase": phase, "conditions": conditions or []}
    if reason:
        status["reason"] = reason
    if exit_code is not None:
        status["containerStatuses"] = [{"name": "task", "state": {"terminated": {
            "exitCode": exit_code, "reason": term_reason, "message": message}}}]
    if waiting:
        status["containerStatuses"] = [{"name": "task", "state": {"waiting": {"reason": waiting,
                                                                              "message": "back-off pulling"}}}]
    labels = {"batch.kubernetes.io/job-name": name, **job["spec"]["template"]["metadata"]["labels"]}
    return {"metadata": {"name": f"{name}-{index}-abcde", "namespace": "team-a", "creationTimestamp": ts(at(created)),
                         "labels": labels,
                         "ownerReferences": [{"kind": "Job", "name": name, "uid": job["metadata"].get("uid")}]},
            "status": status}


def applied(cr: dict, decision) -> dict:
    """The PruningSearch after the handler applied ``decision``'s status (a merge of owned fields)."""
    out = copy.deepcopy(cr)
    out["status"] = {**(out.get("status") or {}), **copy.deepcopy(decision.status)}
    out["status"] = {k: v for k, v in out["status"].items() if v is not None}
    return out
