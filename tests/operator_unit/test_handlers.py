"""handlers.reconcile_once: read -> decide -> apply against a fake API; the import stays torch-free."""

from __future__ import annotations

import copy
import subprocess
import sys
import types

from darwinlm.core.plan import Task
from darwinlm_operator import handlers
from darwinlm_operator.store_access import StoreView
from darwinlm_operator.kspec import JobDefaults

from . import FakeStore, at, job_status, make_cr, ts


class FakeKube:
    """The handful of calls ``handlers.Kube`` makes, over dicts; records every write."""

    def __init__(self, cr: dict | None, jobs: list[dict] = ()):
        self.cr = copy.deepcopy(cr)
        self.jobs = {j["metadata"]["name"]: copy.deepcopy(j) for j in jobs}
        self.services: dict[str, dict] = {}
        self.writes: list[tuple] = []
        self.core = object()

    def get_search(self, ns, name):
        return copy.deepcopy(self.cr)

    def list_jobs(self, ns, name):
        return [copy.deepcopy(j) for j in self.jobs.values()]

    def list_pods(self, ns, uid):
        self.writes.append(("list_pods",))
        return []

    def create(self, obj):
        where = self.jobs if obj["kind"] == "Job" else self.services
        self.writes.append(("create", obj["kind"], obj["metadata"]["name"]))
        if obj["metadata"]["name"] in where:
            return False
        obj = copy.deepcopy(obj)
        obj["metadata"]["creationTimestamp"] = ts(at(0))  # as the API server does
        where[obj["metadata"]["name"]] = obj
        return True

    def delete_job(self, ns, name):
        self.writes.append(("delete", name))
        self.jobs.pop(name, None)

    def patch_status(self, ns, name, patch):
        self.writes.append(("patch", patch))
        status = self.cr.setdefault("status", {})
        for k, v in patch["status"].items():
            if v is None:
                status.pop(k, None)
            elif isinstance(v, dict) and isinstance(status.get(k), dict):
                status[k] = {**status[k], **v}
            else:
                status[k] = v

    def delete_search(self, ns, name):
        self.writes.append(("delete_search", name))


def _reconcile(kube, store, monkeypatch, t=0.0, op=None):
    monkeypatch.setattr(handlers, "_store_view", lambda kube, cr, memo, stores: store)
    return handlers.reconcile_once(kube, "team-a", "tiny", {}, now=at(t), op=op or handlers.Operator())


def test_first_reconcile_creates_a_job_and_writes_status(monkeypatch):
    kube = FakeKube(make_cr())
    cr, decision = _reconcile(kube, FakeStore(), monkeypatch)
    assert list(kube.jobs) == ["tiny-database-0-of-1-a0"]
    assert kube.cr["status"]["phase"] == "Running"
    assert [w[0] for w in kube.writes] == ["create", "patch"]
    # level-triggered and idempotent: a second pass writes nothing
    kube.writes.clear()
    _reconcile(kube, FakeStore(), monkeypatch, t=1)
    assert kube.writes == []


def test_a_finished_job_leads_to_the_next_one_and_pods_are_read_only_when_needed(monkeypatch):
    kube = FakeKube(make_cr())
    _reconcile(kube, FakeStore(), monkeypatch)
    name = "tiny-database-0-of-1-a0"
    kube.jobs[name] = job_status(kube.jobs[name], "Succeeded", start=0, end=5)
    kube.writes.clear()
    _reconcile(kube, FakeStore().done(Task("database", 0, 1)), monkeypatch, t=6)
    assert ("create", "Job", "tiny-generation-0-a0") in kube.writes
    assert ("list_pods",) not in kube.writes  # a succeeded Job needs no pods
    assert kube.cr["status"]["attempts"][name]["outcome"] == "Succeeded"


def test_gone_search_returns_none():
    assert handlers.reconcile_once(FakeKube(None), "team-a", "tiny", {}, op=handlers.Operator()) is None


def test_suspend_deletes_and_ttl_deletes_the_search(monkeypatch):
    kube = FakeKube(make_cr())
    _reconcile(kube, FakeStore(), monkeypatch)
    kube.cr["spec"]["suspend"] = True
    kube.cr["metadata"]["generation"] = 2
    _reconcile(kube, FakeStore(), monkeypatch, t=3)
    assert ("delete", "tiny-database-0-of-1-a0") in kube.writes and kube.cr["status"]["phase"] == "Suspended"


def test_store_view_caches_positive_answers_only(tmp_path):
    from darwinlm.store import open_store

    store = open_store(str(tmp_path))
    memo: dict = {}
    view = StoreView(store, memo)
    assert not view.exists("a.json") and view.get_json("a.json") is None and memo == {}
    store.put_json("a.json", {"x": 1})
    assert view.exists("a.json") and view.get_json("a.json") == {"x": 1}
    store.delete("a.json")
    assert StoreView(store, memo).get_json("a.json") == {"x": 1}  # immutable markers: cached
    assert view.list("") == []


def test_the_operator_never_imports_torch():
    code = ("import sys, darwinlm_operator.handlers, darwinlm_operator.__main__; "
            "bad = [m for m in ('torch', 'transformers', 'datasets', 'darwinlm_jobs') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": ":".join(sys.path)})


def test_liveness_probe_fails_only_when_searches_go_unreconciled(monkeypatch):
    import time

    import pytest

    class Loops:
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

    op = handlers.Operator()  # the operator's state, which kopf hands every handler in its memo
    memo = types.SimpleNamespace(operator=op)
    monkeypatch.setattr(op.health, "last_reconcile", time.monotonic() - 1000)
    monkeypatch.setattr(op, "loops", Loops(0))
    assert handlers.probe(memo)["searches"] == 0  # idle operator: healthy however long ago
    monkeypatch.setattr(op, "loops", Loops(2))
    with pytest.raises(RuntimeError, match="no reconcile for"):
        handlers.probe(memo)
    monkeypatch.setattr(op.health, "last_reconcile", time.monotonic())
    assert handlers.probe(memo)["searches"] == 2


def test_deleting_search_reads_no_store():
    cr = make_cr()
    cr["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert handlers._store_view(None, cr, {}, None) is None


def test_the_job_image_settings_come_from_the_environment(monkeypatch):
    import pytest

    for var in ("DARWINLM_JOB_IMAGE", "DARWINLM_JOB_IMAGE_PULL_POLICY"):
        monkeypatch.delenv(var, raising=False)
    assert handlers.OperatorConfig.from_env().job_defaults == JobDefaults()
    monkeypatch.setenv("DARWINLM_JOB_IMAGE", "ghcr.io/darwinlm/darwinlm-job:0.2.0")
    monkeypatch.setenv("DARWINLM_JOB_IMAGE_PULL_POLICY", "Always")
    assert handlers.OperatorConfig.from_env().job_defaults == JobDefaults(
        image="ghcr.io/darwinlm/darwinlm-job:0.2.0", image_pull_policy="Always")
    monkeypatch.setenv("DARWINLM_JOB_IMAGE", "  ")  # empty = no default job image
    monkeypatch.setenv("DARWINLM_JOB_IMAGE_PULL_POLICY", "")
    assert handlers.OperatorConfig.from_env().job_defaults == JobDefaults()
    monkeypatch.setenv("DARWINLM_JOB_IMAGE_PULL_POLICY", "sometimes")
    with pytest.raises(ValueError, match="pull policy"):
        handlers.OperatorConfig.from_env()  # refused at startup, not per search


def test_reconcile_uses_the_operators_job_image(monkeypatch):
    cr = make_cr()
    del cr["spec"]["image"]
    op = handlers.Operator(config=handlers.OperatorConfig())  # no default job image
    kube = FakeKube(cr)
    _reconcile(kube, FakeStore(), monkeypatch, op=op)
    assert kube.jobs == {} and kube.cr["status"]["phase"] == "Failed"
    invalid = next(c for c in kube.cr["status"]["conditions"] if c["type"] == "Invalid")
    assert invalid["status"] == "True" and invalid["message"].startswith("spec.image: ")
    op.config = handlers.OperatorConfig(
        job_defaults=JobDefaults(image="ghcr.io/darwinlm/darwinlm-job:0.2.0", image_pull_policy="Always"))
    _reconcile(kube, FakeStore(), monkeypatch, t=2, op=op)
    (job,) = kube.jobs.values()
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert (container["image"], container["imagePullPolicy"]) == ("ghcr.io/darwinlm/darwinlm-job:0.2.0", "Always")
    assert kube.cr["status"]["phase"] == "Running"


def test_the_default_generations_per_job_comes_from_the_environment(monkeypatch):
    import pytest

    monkeypatch.delenv("DARWINLM_GENERATIONS_PER_JOB", raising=False)
    assert handlers.OperatorConfig.from_env().job_defaults.generations_per_job is None
    monkeypatch.setenv("DARWINLM_GENERATIONS_PER_JOB", "0")  # the chart's default
    assert handlers.OperatorConfig.from_env().job_defaults.generations_per_job == 0
    monkeypatch.setenv("DARWINLM_GENERATIONS_PER_JOB", "-1")
    with pytest.raises(ValueError, match="generationsPerJob"):
        handlers.OperatorConfig.from_env()


def test_unusable_credentials_fail_the_search_by_name_then_a_fix_clears_it(monkeypatch):
    import pytest

    from darwinlm.errors import StoreError
    from darwinlm_operator.store_access import CredentialsError

    kube = FakeKube(make_cr(s3={"secretRef": {"name": "s3-creds"}}, store="s3://bucket/prefix"))

    def missing(kube, cr, memo, stores):
        raise CredentialsError("Secret team-a/s3-creds has no key 'AWS_ACCESS_KEY_ID' (spec.s3.secretRef)")

    monkeypatch.setattr(handlers, "_store_view", missing)
    with pytest.raises(CredentialsError):  # re-raised: the search loop backs off and posts one Event
        handlers.reconcile_once(kube, "team-a", "tiny", {}, now=at(0), op=handlers.Operator())
    st = kube.cr["status"]
    conds = {c["type"]: c for c in st["conditions"]}
    assert st["phase"] == "Failed" and conds["Invalid"]["reason"] == conds["Failed"]["reason"] == "CredentialsInvalid"
    assert "Secret team-a/s3-creds has no key 'AWS_ACCESS_KEY_ID'" in conds["Invalid"]["message"]
    assert not kube.jobs

    # S3 refuses the pair twice (the Secret is read again in between): named by Secret and keys
    calls = []

    class Refusing(FakeStore):
        def exists(self, key):
            calls.append(key)
            raise StoreError("exists s3://bucket/k: ClientError: An error occurred (InvalidAccessKeyId) when ...")

    op = handlers.Operator()
    forgot = []
    monkeypatch.setattr(op.stores, "forget_credentials", lambda: forgot.append(1))
    monkeypatch.setattr(handlers, "_store_view", lambda kube, cr, memo, stores: Refusing())
    with pytest.raises(StoreError):
        handlers.reconcile_once(kube, "team-a", "tiny", {}, now=at(1), op=op)
    assert forgot == [1] and len(calls) == 2
    assert kube.cr["status"]["message"] == ("S3 refused the credentials of Secret team-a/s3-creds (keys "
                                            "'AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY'; spec.s3.secretRef): "
                                            "InvalidAccessKeyId")

    # an outage is not about credentials: no status change
    kube.writes.clear()
    monkeypatch.setattr(handlers, "_store_view", lambda kube, cr, memo, stores: (_ for _ in ()).throw(
        StoreError("exists s3://bucket/k: EndpointConnectionError: Could not connect")))
    with pytest.raises(StoreError):
        handlers.reconcile_once(kube, "team-a", "tiny", {}, now=at(2), op=handlers.Operator())
    assert kube.writes == []

    # the Secret is fixed: the next reconcile clears the failure and creates the first Job
    _reconcile(kube, FakeStore(), monkeypatch, t=3)
    conds = {c["type"]: c for c in kube.cr["status"]["conditions"]}
    assert kube.cr["status"]["phase"] == "Running" and conds["Invalid"]["status"] == "False"
    assert conds["Failed"]["status"] == "False" and list(kube.jobs) == ["tiny-database-0-of-1-a0"]
