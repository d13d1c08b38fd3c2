"""decide: every rule of the reconciler, on synthetic PruningSearches, Jobs, Pods and store views."""

from __future__ import annotations

import copy

import pytest

from darwinlm.core.plan import Task
from darwinlm_operator import conditions as C
from darwinlm_operator.kspec import JobDefaults, load_psearch
from darwinlm_operator.reconcile import (classify_failure, decide, first_error_line, format_duration, job_outcome,
                                         status_patch)
from darwinlm_operator.render import render_job

from . import FakeStore, applied, at, job_status, make_cr, make_pod, ts

DB = Task("database", 0, 1)
G0, G1, G2 = Task("generation", 0), Task("generation", 1), Task("generation", 2)


def _job(cr, task, attempt=0, outcome=None, **kw):
    spec, kspec = load_psearch(cr)
    return job_status(render_job(cr, kspec, spec, task, attempt), outcome, **kw)


def _cond(decision, type_):
    return C.get_condition(decision.status["conditions"], type_)


def _created(decision):
    return [o["metadata"]["name"] for o in decision.create if o["kind"] == "Job"]


def _reasons(decision):
    return [e.reason for e in decision.events]


def _run(cr, jobs=(), pods=(), store=None, t=0.0):
    return decide(cr, list(jobs), list(pods), store if store is not None else FakeStore(), at(t))


# ------------------------------------------------------------------------------ the happy path

def test_a_new_search_starts_building_the_database():
    d = _run(make_cr())
    assert _created(d) == ["tiny-database-0-of-1-a0"]
    st = d.status
    assert st["phase"] == "Running" and st["observedGeneration"] == 1 and st["startTime"] == ts(at(0))
    assert _cond(d, C.RUNNING)["status"] == "True" and _cond(d, C.RUNNING)["reason"] == C.BUILDING_DATABASE
    assert _cond(d, C.INVALID)["status"] == "False" and _cond(d, C.SUSPENDED)["status"] == "False"
    assert _cond(d, C.FAILED)["status"] == "False" and _cond(d, C.SUCCEEDED)["status"] == "False"
    assert st["generation"] == "0/3" and st["generationsDone"] == 0 and st["generationsTotal"] == 3
    assert st["gpuSeconds"] == 0 and st["retries"] == {} and st["attempts"] == {}
    assert "JobCreated" in _reasons(d) and C.BUILDING_DATABASE in _reasons(d)
    assert d.create[0]["metadata"]["labels"]["darwinlm.io/attempt"] == "0"


def test_a_live_job_is_waited_for_and_decisions_are_idempotent():
    cr = make_cr()
    first = _run(cr)
    cr = applied(cr, first)
    job = _job(cr, DB, 0, None, start=1)
    d = _run(cr, [job], t=5)
    assert d.create == [] and d.delete == []
    assert status_patch(cr["status"], d.status) == {}  # nothing to write: no status churn
    assert d.events == []


def test_next_task_comes_from_the_store_not_from_the_jobs():
    cr = make_cr()
    store = FakeStore().done(DB)
    d = _run(cr, [_job(cr, DB, 0, "Succeeded", start=0, end=30)], store=store, t=31)
    assert _created(d) == ["tiny-generation-0-a0"]
    assert _cond(d, C.RUNNING)["reason"] == C.SEARCHING
    rec = d.status["attempts"]["tiny-database-0-of-1-a0"]
    assert rec["outcome"] == "Succeeded" and rec["seconds"] == 30 and rec["generation"] == 1
    assert [r["job"] for r in d.accounted] == ["tiny-database-0-of-1-a0"]
    assert d.status["retries"] == {} and d.status["attempts"]["tiny-database-0-of-1-a0"]["counted"] is False
    # a marker without any Job (e.g. an earlier operator or the embedded runner) counts as done too
    d2 = _run(cr, [], store=FakeStore().done(DB).generation(0, best=0.5), t=40)
    assert _created(d2) == ["tiny-generation-1-a0"]


def test_parallel_shards_run_together():
    cr = make_cr(**{"database.shards": 3})
    d = _run(cr, store=FakeStore().done(Task("database", 1, 3)))
    assert _created(d) == ["tiny-database-0-of-3-a0", "tiny-database-2-of-3-a0"]


def test_the_sensitivity_phase_runs_between_the_database_and_the_search():
    cr = make_cr(**{"search.init": "sensitivity", "search.sensitivity.shards": 2})
    d = _run(cr, store=FakeStore().done(DB))
    assert _created(d) == ["tiny-sensitivity-0-of-2-a0", "tiny-sensitivity-1-of-2-a0"]
    assert _cond(d, C.RUNNING)["reason"] == C.MEASURING_SENSITIVITY
    (container,) = d.create[1]["spec"]["template"]["spec"]["containers"]
    assert container["command"][-5:] == ["darwinlm_jobs.sensitivity", "--shard", "1", "--shards", "2"]
    d = _run(cr, store=FakeStore().done(DB, Task("sensitivity", 0, 2), Task("sensitivity", 1, 2)))
    assert _created(d) == ["tiny-generation-0-a0"] and _cond(d, C.RUNNING)["reason"] == C.SEARCHING


def test_an_early_stop_shortens_the_search_and_best_fitness_is_the_tracking_score():
    cr = make_cr(**{"search.generations": 10, "search.patience": 1})
    store = FakeStore().done(DB).generation(0, best=0.9).generation(1, best=0.8)
    store.keys["generations/00001/state.json"]["tracking"] = {"tokens": 256, "fitness": 0.75}
    store.keys["generations/stop.json"] = {"after": 1, "reason": "patience"}
    d = _run(cr, store=store, t=5)
    assert _created(d) == ["tiny-posttrain-searched-a0", "tiny-posttrain-uniform-a0"]
    assert d.status["generation"] == "2/2" and d.status["generationsTotal"] == 2
    assert d.status["bestFitness"] == 0.75  # the fixed tracking batch, not the fresh selection batch


def test_progress_fields_from_the_store():
    cr = make_cr()
    store = FakeStore().done(DB).generation(0, best=0.9, seconds=100, evaluations=7)
    store.generation(1, best=0.7, seconds=300, evaluations=7)
    store.keys["generations/00002/results/s0-abc.json"] = {}
    store.keys["generations/00002/results/s0-def.json"] = {}
    d = _run(cr, [_job(cr, G2, 0, None, start=1)], store=store, t=2)
    st = d.status
    assert st["generation"] == "2/3" and st["generationsDone"] == 2
    assert st["progress"] == "66%" and st["stage"] == C.SEARCHING
    # the tiny spec: 4 offspring -> stage 0 pool 4, stage 1 pool 2 + the parent; 128 / 256 fitness tokens
    assert st["estimate"] == {"evaluationsPerGeneration": 7, "fitnessTokensPerGeneration": 4 * 128 + 3 * 256,
                              "finetuneTokensPerGeneration": 4 * 64 + 3 * 128,
                              "trainedTokensPerGeneration": 4 * 64 + 3 * 128,
                              "fitnessTokensTotal": 3 * (4 * 128 + 3 * 256), "trainedTokensTotal": 3 * (4 * 64 + 3 * 128)}
    assert st["bestFitness"] == 0.7
    # no timing.json (a store of an older version): generation 0's compute seconds stand in
    assert st["eta"] == format_duration(100) == "1m40s"
    assert st["offspringEvaluated"] == 7 + 7 + 2  # two states + results of the running generation
    assert st["checkpointURI"] == f"{store.uri}/generations/00001/state.json"
    assert d.metrics["databaseSeconds"] == 10.0 and d.metrics["progress"] == (3, 16)
    assert "GenerationComplete" in _reasons(d)


def test_all_tasks_done_is_success_with_the_result_uri():
    cr = make_cr(**{"posttrain.enabled": False})
    store = FakeStore().done(DB, Task("export"), Task("evaluate"))
    for g in range(3):
        store.generation(g, best=1.0 - g / 10)
    d = _run(cr, store=store, t=100)
    assert d.create == []
    st = d.status
    assert st["phase"] == "Succeeded" and st["resultURI"] == f"{store.uri}/result"
    assert st["completionTime"] == ts(at(100)) and st["eta"] is None and st["generation"] == "3/3"
    assert _cond(d, C.SUCCEEDED)["status"] == "True" and _cond(d, C.SUCCEEDED)["reason"] == C.ALL_TASKS_COMPLETE
    assert _cond(d, C.RUNNING)["status"] == "False"
    assert C.SUCCEEDED in _reasons(d)
    again = _run(applied(cr, d), store=store, t=200)
    assert again.events == [] and status_patch(applied(cr, d)["status"], again.status) == {}


def test_a_distributed_generation_gets_its_headless_service():
    cr = make_cr(workers=3)
    d = _run(cr, store=FakeStore().done(DB))
    kinds = [(o["kind"], o["metadata"]["name"]) for o in d.create]
    assert ("Service", "tiny-workers") in kinds and ("Job", "tiny-generation-0-a0") in kinds
    job = next(o for o in d.create if o["kind"] == "Job")
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["parallelism"] == 3


def test_foreign_jobs_are_ignored():
    cr = make_cr()
    other = _job(make_cr(), DB, 0, "Failed", start=0, end=5)
    other["metadata"]["ownerReferences"][0]["uid"] = "someone-else"
    other["metadata"]["labels"]["darwinlm.io/search-uid"] = "someone-else"
    d = _run(cr, [other])
    assert _created(d) == ["tiny-database-0-of-1-a0"] and d.status["attempts"] == {}


def test_gpu_seconds_count_gpus_pods_and_time():
    cr = make_cr(workers=2, resources={"limits": {"nvidia.com/gpu": 4}})
    store = FakeStore().done(DB).generation(0, best=0.5)
    jobs = [_job(cr, DB, 0, "Succeeded", start=0, end=100), _job(cr, G0, 0, "Succeeded", start=100, end=160)]
    d = _run(cr, jobs, store=store, t=200)
    assert d.status["attempts"]["tiny-database-0-of-1-a0"]["gpuSeconds"] == 100 * 4 * 1
    assert d.status["attempts"]["tiny-generation-0-a0"]["gpuSeconds"] == 60 * 4 * 2
    assert d.status["gpuSeconds"] == 400 + 480


# ------------------------------------------------------------------------------ failures and retries

def _failed_gen0(cr, attempt=0, **pod):
    job = _job(cr, G0, attempt, "Failed", start=10, end=20)
    return job, make_pod(job, **pod)


def test_a_crash_is_retried_and_counted():
    cr = make_cr(backoffLimit=2)
    job, pod = _failed_gen0(cr, exit_code=1, message="Traceback...\nRuntimeError: CUDA error: device-side assert")
    d = _run(cr, [job], [pod], store=FakeStore().done(DB), t=21)
    assert _created(d) == ["tiny-generation-0-a1"]
    rec = d.status["attempts"]["tiny-generation-0-a0"]
    assert (rec["reason"], rec["counted"], rec["permanent"]) == ("Error", True, False)
    assert "RuntimeError: CUDA error" in rec["message"]
    assert d.status["retries"] == {"generation-0": 1} and d.status["offspringFailed"] == 1
    retrying = _cond(d, C.RETRYING)
    assert retrying["status"] == "True" and retrying["reason"] == C.RETRYING_AFTER_FAILURE
    assert "JobFailed" in _reasons(d)
    assert "retry after Error" in next(e.message for e in d.events if e.reason == "JobCreated")


@pytest.mark.parametrize("pod_kw, reason", [
    ({"reason": "Evicted", "phase": "Failed"}, "Evicted"),
    ({"conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}]},
     "Preempted"),
    ({"conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}],
      "exit_code": 137}, "Evicted"),
    ({"exit_code": 137}, "Killed"),  # SIGKILL from outside (not OOMKilled): the task is not at fault
    ({"exit_code": 143}, "Killed"),
])
def test_disruptions_are_retried_without_counting(pod_kw, reason):
    cr = make_cr(backoffLimit=0)
    job, pod = _failed_gen0(cr, **pod_kw)
    d = _run(cr, [job], [pod], store=FakeStore().done(DB), t=21)
    assert _created(d) == ["tiny-generation-0-a1"]
    rec = d.status["attempts"]["tiny-generation-0-a0"]
    assert rec["reason"] == reason and rec["counted"] is False
    assert d.status["retries"] == {} and d.status["phase"] == "Running"
    assert _cond(d, C.RETRYING)["reason"] == C.RETRYING_AFTER_DISRUPTION


def test_exit_code_2_is_permanent_and_names_task_and_error():
    cr = make_cr(backoffLimit=5)
    msg = "INFO loading\npermanent error: invalid spec:\n  search.target.fraction: must be < 1"
    job, pod = _failed_gen0(cr, exit_code=2, message=msg)
    d = _run(cr, [job], [pod], store=FakeStore().done(DB), t=21)
    assert d.create == []
    failed = _cond(d, C.FAILED)
    assert failed["status"] == "True" and failed["reason"] == C.TASK_FAILED_PERMANENTLY
    assert "generation-0" in failed["message"] and "permanent error: invalid spec:" in failed["message"]
    assert d.status["phase"] == "Failed" and d.status["completionTime"] == ts(at(21))
    assert C.TASK_FAILED_PERMANENTLY in _reasons(d)


def test_pod_failure_policy_without_pods_is_permanent_too():
    cr = make_cr()
    job = _job(cr, G0, 0, "Failed", start=0, end=5, reason="PodFailurePolicy",
               message="Container task for pod x failed with exit code 2 matching FailJob rule at index 0")
    d = _run(cr, [job], [], store=FakeStore().done(DB), t=6)
    assert _cond(d, C.FAILED)["reason"] == C.TASK_FAILED_PERMANENTLY


def test_backoff_limit_exceeded():
    cr = make_cr(backoffLimit=1)
    a0, p0 = _failed_gen0(cr, 0, exit_code=1, message="boom error")
    a1, p1 = _failed_gen0(cr, 1, exit_code=137, term_reason="OOMKilled")
    d = _run(cr, [a0, a1], [p0, p1], store=FakeStore().done(DB), t=30)
    assert d.create == []
    failed = _cond(d, C.FAILED)
    assert failed["reason"] == C.BACKOFF_LIMIT_EXCEEDED and "generation-0 failed 2 time(s)" in failed["message"]
    assert "OOMKilled" in failed["message"]
    assert d.status["attempts"]["tiny-generation-0-a1"]["reason"] == "OOMKilled"


def test_retry_numbers_survive_deleted_jobs():
    """The ledger in the status, not the Jobs, remembers attempts (Jobs may be deleted by hand or GC)."""
    cr = make_cr(backoffLimit=1)
    a0, p0 = _failed_gen0(cr, 0, exit_code=1)
    d = _run(cr, [a0], [p0], store=FakeStore().done(DB), t=21)
    cr = applied(cr, d)
    d2 = _run(cr, [], [], store=FakeStore().done(DB), t=40)  # a0 and a1 gone
    assert _created(d2) == ["tiny-generation-0-a1"]
    a1, p1 = _failed_gen0(cr, 1, exit_code=3)
    d3 = _run(cr, [a1], [p1], store=FakeStore().done(DB), t=50)
    assert _cond(d3, C.FAILED)["reason"] == C.BACKOFF_LIMIT_EXCEEDED
    assert d3.status["attempts"]["tiny-generation-0-a1"]["reason"] == "RetriableError"


def test_success_without_marker_counts_as_a_failure():
    cr = make_cr(backoffLimit=0)
    job = _job(cr, G0, 0, "Succeeded", start=0, end=9)
    d = _run(cr, [job], store=FakeStore().done(DB), t=10)
    assert _cond(d, C.FAILED)["reason"] == C.BACKOFF_LIMIT_EXCEEDED
    assert "MissingOutput" in _cond(d, C.FAILED)["message"]
    rec = d.status["attempts"]["tiny-generation-0-a0"]
    assert (rec["outcome"], rec["reason"], rec["counted"]) == ("Failed", "MissingOutput", True)
    assert d.status["retries"] == {"generation-0": 1}


def test_a_deleting_job_is_waited_for():
    cr = make_cr()
    job = _job(cr, DB, 0, None, start=0)
    job["metadata"]["deletionTimestamp"] = ts(at(1))
    d = _run(cr, [job], t=2)
    assert d.create == [] and d.delete == []


@pytest.mark.parametrize("pod_kw, reason", [
    ({"phase": "Pending", "waiting": "ImagePullBackOff"}, C.IMAGE_PULL_TIMEOUT),
    ({"phase": "Pending", "waiting": "ErrImagePull"}, C.IMAGE_PULL_TIMEOUT),
    ({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                          "message": "0/3 nodes: insufficient nvidia.com/gpu"}]}, C.UNSCHEDULABLE),
])
def test_pods_stuck_pending_fail_the_search_after_the_timeout(pod_kw, reason):
    cr = make_cr(podStartTimeoutSeconds=60)
    job = _job(cr, DB, 0, None, start=0)
    pod = make_pod(job, created=0, **pod_kw)
    early = _run(cr, [job], [pod], t=59)
    assert early.delete == [] and early.status["phase"] == "Running"
    late = _run(cr, [job], [pod], t=61)
    assert late.delete == ["tiny-database-0-of-1-a0"]
    assert late.status["phase"] == "Failed" and _cond(late, C.FAILED)["reason"] == reason
    assert late.status["attempts"]["tiny-database-0-of-1-a0"]["outcome"] == "Deleted"


def test_a_pending_pod_for_other_reasons_is_not_a_timeout():
    cr = make_cr(podStartTimeoutSeconds=60)
    job = _job(cr, DB, 0, None, start=0)
    pod = make_pod(job, phase="Pending", waiting="ContainerCreating", created=0)
    assert _run(cr, [job], [pod], t=600).status["phase"] == "Running"


# ------------------------------------------------------------------------------ lifecycle

def test_active_deadline_fails_the_search_and_stops_its_jobs():
    cr = make_cr(activeDeadlineSeconds=100)
    d0 = _run(cr, t=0)
    assert d0.create[0]["spec"]["activeDeadlineSeconds"] == 100
    cr = applied(cr, d0)
    job = _job(cr, DB, 0, None, start=1)
    mid = _run(cr, [job], t=50)
    assert mid.delete == []
    d = _run(cr, [job], t=100)
    assert d.delete == ["tiny-database-0-of-1-a0"]
    assert _cond(d, C.FAILED)["reason"] == C.DEADLINE_EXCEEDED and d.status["phase"] == "Failed"
    # the retry created later in the search gets only the time left
    store = FakeStore().done(DB)
    late = _run(cr, [], store=store, t=70)
    assert late.create[0]["spec"]["activeDeadlineSeconds"] == 30


def test_suspend_deletes_jobs_and_resume_continues_from_the_store():
    cr = make_cr()
    store = FakeStore().done(DB)
    cr = applied(cr, _run(cr, store=store, t=0))
    job = _job(cr, G0, 0, None, start=1)
    cr["spec"]["suspend"], cr["metadata"]["generation"] = True, 2
    d = _run(cr, [job], store=store, t=10)
    assert d.delete == ["tiny-generation-0-a0"] and d.create == []
    assert d.status["phase"] == "Suspended" and d.status["generation"] == "0/3"  # progress is still shown
    assert _cond(d, C.SUSPENDED)["status"] == "True" and _cond(d, C.RUNNING)["status"] == "False"
    assert d.status["attempts"]["tiny-generation-0-a0"]["outcome"] == "Deleted"
    assert C.SUSPENDED in _reasons(d)
    cr = applied(cr, d)
    still = _run(cr, [], store=store, t=20)
    assert still.events == [] and still.create == []
    cr["spec"]["suspend"], cr["metadata"]["generation"] = False, 3
    store.generation(0, best=0.4)  # finished before the suspension took effect
    r = _run(cr, [], store=store, t=30)
    assert _created(r) == ["tiny-generation-1-a0"]
    assert _cond(r, C.SUSPENDED)["reason"] == C.RESUMED and r.status["phase"] == "Running"
    assert C.RESUMED in _reasons(r)
    assert r.status["retries"] == {}  # suspension is not a failure


def test_invalid_spec_fails_naming_the_field_and_runs_nothing():
    cr = make_cr(**{"search.generations": -1})
    cr["spec"]["workers"] = "many"
    job = _job(make_cr(), DB, 0, None, start=0)
    d = decide(cr, [job], [], None, at(5))
    assert d.create == [] and d.delete == ["tiny-database-0-of-1-a0"]
    inv = _cond(d, C.INVALID)
    assert inv["status"] == "True" and inv["reason"] == C.SPEC_INVALID
    assert "spec.search.generations" in inv["message"] and "spec.workers" in inv["message"]
    assert d.status["phase"] == "Failed" and _cond(d, C.FAILED)["reason"] == C.SPEC_INVALID
    assert C.SPEC_INVALID in _reasons(d)
    # the same invalid spec again: no new event
    assert decide(applied(cr, d), [], [], None, at(6)).events == []
    # fixed: the search continues
    fixed = applied(cr, d)
    fixed["spec"] = make_cr()["spec"]
    fixed["metadata"]["generation"] = 2
    ok = _run(fixed, t=10)
    assert _created(ok) == ["tiny-database-0-of-1-a1"]  # a0 was deleted: a new attempt number
    assert _cond(ok, C.INVALID)["status"] == "False" and _cond(ok, C.FAILED)["status"] == "False"
    assert ok.status["phase"] == "Running"


def _no_image(**over):
    cr = make_cr(**over)
    del cr["spec"]["image"]
    return cr


def test_without_spec_image_the_operators_job_image_runs():
    cr = _no_image()
    d = decide(cr, [], [], FakeStore(), at(0), defaults=JobDefaults(image="ghcr.io/x/job:0.2.0"))
    assert _created(d) == ["tiny-database-0-of-1-a0"] and d.status["phase"] == "Running"
    (container,) = d.create[0]["spec"]["template"]["spec"]["containers"]
    assert (container["image"], container["imagePullPolicy"]) == ("ghcr.io/x/job:0.2.0", "IfNotPresent")
    assert _cond(d, C.INVALID)["status"] == "False"
    # spec.image wins over the operator's default
    d = decide(make_cr(), [], [], FakeStore(), at(0), defaults=JobDefaults(image="ghcr.io/x/job:0.2.0"))
    assert d.create[0]["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example/darwinlm-job:0.1.0"


def test_without_any_image_the_search_is_invalid_at_spec_image():
    cr = _no_image()
    for defaults in (None, JobDefaults(image_pull_policy="Always")):
        d = decide(cr, [], [], FakeStore(), at(0), defaults=defaults)
        assert d.create == []
        inv = _cond(d, C.INVALID)
        assert inv["status"] == "True" and inv["reason"] == C.SPEC_INVALID
        assert inv["message"].startswith("spec.image: required") and "DARWINLM_JOB_IMAGE" in inv["message"]
        assert d.status["phase"] == "Failed" and _cond(d, C.FAILED)["message"] == "invalid spec: spec.image"
        assert C.SPEC_INVALID in _reasons(d)
    # the operator restarted with a job image: the same spec continues (no spec change needed)
    ok = decide(applied(cr, d), [], [], FakeStore(), at(10), defaults=JobDefaults(image="job:1"))
    assert _created(ok) == ["tiny-database-0-of-1-a0"] and ok.status["phase"] == "Running"
    assert _cond(ok, C.INVALID)["status"] == "False" and _cond(ok, C.FAILED)["status"] == "False"


def test_a_finished_search_needs_no_image():
    cr = _no_image(ttlSecondsAfterFinished=60, **{"posttrain.enabled": False})
    store = FakeStore().done(DB, Task("export"), Task("evaluate"))
    for g in range(3):
        store.generation(g, best=0.1)
    done = applied(cr, decide(cr, [], [], store, at(0), defaults=JobDefaults(image="job:1")))
    assert done["status"]["phase"] == "Succeeded"
    later = decide(done, [], [], store, at(60))  # an operator without a job image
    assert later.delete_self and later.events == [] and _cond(later, C.INVALID)["status"] == "False"


def test_a_changed_library_spec_is_refused_before_any_job():
    cr = make_cr()
    store = FakeStore()
    spec, _ = load_psearch(cr)
    from darwinlm.spec import spec_to_dict

    saved = spec_to_dict(spec)
    saved["seed"] = 7
    store.keys["spec.json"] = saved
    d = _run(cr, store=store)
    assert d.create == [] and _cond(d, C.INVALID)["status"] == "True"
    assert "spec.seed: differs from the spec this search was started with" in _cond(d, C.INVALID)["message"]


def test_failed_is_terminal_until_the_spec_changes():
    cr = make_cr(backoffLimit=0)
    job, pod = _failed_gen0(cr, exit_code=1)
    store = FakeStore().done(DB)
    d = _run(cr, [job], [pod], store=store, t=21)
    assert _cond(d, C.FAILED)["reason"] == C.BACKOFF_LIMIT_EXCEEDED
    cr = applied(cr, d)
    stay = _run(cr, [job], [pod], store=store, t=30)
    assert stay.create == [] and stay.events == [] and status_patch(cr["status"], stay.status) == {}
    cr["spec"]["backoffLimit"], cr["metadata"]["generation"] = 1, 2
    again = _run(cr, [job], [pod], store=store, t=40)
    assert _created(again) == ["tiny-generation-0-a1"]  # a fresh retry budget for the new spec
    assert _cond(again, C.FAILED)["status"] == "False" and again.status.get("completionTime") is None


def test_ttl_after_finished_deletes_the_search():
    cr = make_cr(ttlSecondsAfterFinished=60, **{"posttrain.enabled": False})
    store = FakeStore().done(DB, Task("export"), Task("evaluate"))
    for g in range(3):
        store.generation(g, best=0.1)
    done = applied(cr, _run(cr, store=store, t=0))
    assert not _run(done, store=store, t=59).delete_self
    assert _run(done, store=store, t=60).delete_self


def test_a_deleted_search_is_left_to_the_garbage_collector():
    cr = make_cr()
    cr["metadata"]["deletionTimestamp"] = ts(at(1))
    d = _run(cr, [_job(cr, DB, 0, None)], t=2)
    assert d.create == [] and d.delete == [] and d.events == []


def test_condition_transition_times_are_stable():
    cr = make_cr()
    store = FakeStore()
    d1 = _run(cr, store=store, t=0)
    cr = applied(cr, d1)
    d2 = _run(cr, [_job(cr, DB, 0, None)], store=store, t=50)
    assert _cond(d2, C.RUNNING)["lastTransitionTime"] == ts(at(0))


# ------------------------------------------------------------------------------ helpers

def test_job_outcome_reads_conditions_and_counters():
    assert job_outcome({"status": {}}) is None
    assert job_outcome({"status": {"conditions": [{"type": "Complete", "status": "True"}]}}) == "Succeeded"
    assert job_outcome({"status": {"conditions": [{"type": "FailureTarget", "status": "True"}]}}) == "Failed"
    assert job_outcome({"spec": {"completions": 2}, "status": {"succeeded": 2}}) == "Succeeded"
    assert job_outcome({"spec": {"completions": 2}, "status": {"succeeded": 1}}) is None
    assert job_outcome({"spec": {"backoffLimit": 0}, "status": {"failed": 1}}) == "Failed"


def test_first_error_line_scrubs_key_ids():
    assert first_error_line("a\nStoreError: denied for AKIAABCDEFGHIJKLMNOP\nb") == "StoreError: denied for ***"
    assert first_error_line("just\nlast line") == "last line"
    assert first_error_line(None) == ""


def test_unknown_failures_fall_back_to_the_job_condition():
    cr = make_cr()
    job = _job(cr, G0, 0, "Failed", reason="DeadlineExceeded", message="Job was active longer than specified")
    out = classify_failure(job, [])
    assert out["reason"] == "DeadlineExceeded" and out["counted"] and not out["permanent"]


def test_format_duration():
    assert [format_duration(s) for s in (0, 42, 63, 3600, 8000)] == ["0s", "42s", "1m3s", "1h0m", "2h13m"]


def test_status_patch_is_minimal():
    old = {"phase": "Running", "attempts": {"a": {"x": 1}}, "eta": "1m", "kopf": {"k": 1}}
    new = {"phase": "Running", "attempts": {"a": {"x": 1}, "b": {"x": 2}}, "eta": None}
    assert status_patch(old, new) == {"attempts": {"b": {"x": 2}}, "eta": None}
    assert status_patch(old, copy.deepcopy({k: v for k, v in old.items() if k != "kopf"})) == {}
    assert status_patch(None, {"phase": "Running", "eta": None}) == {"phase": "Running"}


def test_a_job_still_finishing_after_success_is_left_alone():
    """The marker is written before the pod exits: the Job may look active when the search succeeds."""
    cr = make_cr(**{"posttrain.enabled": False})
    store = FakeStore().done(DB, Task("export"), Task("evaluate"))
    for g in range(3):
        store.generation(g, best=0.1)
    evaluate = _job(cr, Task("evaluate"), 0, None, start=0)
    d = _run(cr, [evaluate], store=store, t=10)
    assert d.status["phase"] == "Succeeded" and d.delete == []
    d2 = _run(applied(cr, d), [evaluate], store=store, t=11)
    assert d2.delete == []
    finished = job_status(evaluate, "Succeeded", start=0, end=11)
    d3 = _run(applied(cr, d2), [finished], store=store, t=12)
    assert d3.status["attempts"]["tiny-evaluate-a0"]["outcome"] == "Succeeded"


# ------------------------------------------------------------------------------ progress, ETA, best parents

def test_eta_is_the_mean_measured_interval_hand_off_included_minus_the_generation_in_flight():
    cr = make_cr(**{"search.generations": 6})
    # compute seconds 100 each, but finishes 150 s apart (50 s of Job hand-off), one slow hand-off (400 s)
    store = FakeStore().done(DB)
    for g, t in enumerate([1000, 1150, 1300, 1700]):
        store.generation(g, best=0.9, seconds=100, finished=t)
    d = _run(cr, [_job(cr, Task("generation", 4), 0, None, start=1700)], store=store, t=1760)
    st = d.status
    assert st["generation"] == "4/6" and st["progress"] == "66%" and st["stage"] == C.SEARCHING
    # intervals 150, 150, 400: mean 233.3 (the slow hand-off counts); 2 generations left; the one in flight
    # has run 60 s
    assert st["eta"] == format_duration(2 * 700 / 3 - 60) == "6m47s"
    assert st["etaRange"] == f"{format_duration(2 * 150 - 60)}-{format_duration(2 * 275 - 60)}"
    assert d.metrics["etaSeconds"] == pytest.approx(2 * 700 / 3 - 60)
    # past the mean, never below the generations after the one in flight
    st = _run(cr, [_job(cr, Task("generation", 4), 0, None, start=1700)], store=store, t=2300).status
    assert st["eta"] == format_duration(700 / 3)


def test_an_event_for_each_new_best_parent_and_progress_after_the_search():
    cr = make_cr(**{"search.generations": 3})
    store = FakeStore().done(DB).generation(0, best=0.9, new_parent=True).generation(1, best=0.9)
    d = _run(cr, store=store, t=5)
    best = [e for e in d.events if e.reason == C.NEW_BEST_PARENT]
    assert [e.message for e in best] == ["generation 1/3: new best parent, fitness 0.9"]
    # already reported: the next call (status generationsDone 2) posts none
    again = _run(make_cr(**{"search.generations": 3}, status=d.status), store=store, t=6)
    assert C.NEW_BEST_PARENT not in _reasons(again)
    store.generation(2, best=0.5, new_parent=True)
    d = _run(make_cr(**{"search.generations": 3}, status=d.status), store=store, t=7)
    assert [e.message for e in d.events if e.reason == C.NEW_BEST_PARENT] == [
        "generation 3/3: new best parent, fitness 0.5"]
    assert d.status["progress"] == "100%" and d.status["stage"] == C.POST_TRAINING and d.status["eta"] is None


# ------------------------------------------------------------------------------ warm generation Jobs

def test_a_warm_job_runs_several_generations_and_is_waited_for_while_it_does():
    cr = make_cr(generationsPerJob=0, **{"search.generations": 5})
    store = FakeStore().done(DB)
    d = _run(cr, store=store)
    assert _created(d) == ["tiny-generation-0-a0"]
    job = d.create[0]
    assert job["spec"]["template"]["spec"]["containers"][0]["command"][-4:] == ["--index", "0", "--count", "0"]
    assert job["metadata"]["labels"]["darwinlm.io/last-generation"] == "4"
    live = job_status(job, None, start=1)
    store.generation(0, best=0.9).generation(1, best=0.8)  # the Job is in generation 2
    d = _run(cr, [live], store=store, t=5)
    assert _created(d) == [] and d.status["generation"] == "2/5"


def test_a_warm_job_killed_mid_way_is_followed_by_one_from_the_first_unfinished_generation():
    cr = make_cr(generationsPerJob=3, **{"search.generations": 5})
    store = FakeStore().done(DB).generation(0, best=0.9)
    first = _job(cr, G0, 0, None, start=1)
    assert first["metadata"]["labels"]["darwinlm.io/last-generation"] == "2"
    assert first["spec"]["template"]["spec"]["containers"][0]["command"][-2:] == ["--count", "3"]
    killed = job_status(first, "Failed", start=1, end=9, reason="Evicted")
    store.generation(1, best=0.8)  # generations 0 and 1 finished before the eviction
    d = _run(cr, [killed], store=store, t=10)
    assert _created(d) == ["tiny-generation-2-a0"]  # not generation 0 or 1 again
    nxt = d.create[0]
    assert nxt["spec"]["template"]["spec"]["containers"][0]["command"][-4:] == ["--index", "2", "--count", "3"]
    assert nxt["metadata"]["labels"]["darwinlm.io/last-generation"] == "4"  # capped at the last generation


def test_generations_per_job_one_renders_todays_job():
    cr = make_cr(**{"search.generations": 5})
    job = _job(cr, G1)
    assert job["spec"]["template"]["spec"]["containers"][0]["command"][-2:] == ["--index", "1"]
    assert job["metadata"]["labels"]["darwinlm.io/last-generation"] == "1"
