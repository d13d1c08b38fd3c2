"""The operator under faults, end to end on the emulator stack (kopf run + pod runner + moto), tiny model.

* The operator is SIGKILLed and restarted exactly 15 times, at seeded instants drawn uniformly over its
  lifetime (not tied to Job events), while two searches run at once: both succeed (the full one with the
  embedded run's result), and no task runs twice: every Job is adopted after a restart, none is created again.
* A worker that exits 1 is retried and the retry counts against backoffLimit; one killed from outside
  (exit code 137, SIGKILL) is retried without counting; S3 refusing connections for 30 s while a Job runs
  is ridden out by the jobs (retriable) and the operator (its reconcile loop backs off), and the search
  succeeds.
"""

from __future__ import annotations

import collections
import json
import random
import time

from tests.conftest import tiny_spec_dict
from tests.k8s._helpers import (
    PREFIX,
    P,
    all_job_names,
    apply_search,
    cond,
    finished,
    get_ps,
    manifest,
    s3_json,
    start_operator,
    wait_phase,
)
from tests.support.cluster import wait_for

from darwinlm.core.plan import KINDS  # noqa: E402


def _kind(job_name: str) -> str:
    return next(k for k in KINDS if f"-{k}-" in job_name)


KILLS = 15


def test_operator_sigkilled_at_random_points_adopts_its_jobs(cluster, kubectl, k8s, namespace, s3, pod_runner,
                                                             pod_assets, embedded_tiny):
    """Two searches at once; the operator SIGKILLed exactly KILLS times at random instants spread over its
    whole lifetime, whatever the Jobs are doing, then left to finish. Each delay is drawn uniformly from
    [0, 2 R / k], with k the kills left and R the remaining lifetime estimated from the fraction of Jobs
    finished so far (x 0.7, so that all KILLS land before the end): a kill is never keyed to a Job event."""
    from darwinlm.spec import load_spec

    op, _ = cluster
    rng = random.Random(4)
    small = {"search": {**tiny_spec_dict(pod_assets, "x")["search"], "generations": 1}}
    mini_spec = load_spec({**tiny_spec_dict(pod_assets, "s3://b/p"), **small, "name": "mini"})
    total_jobs = len(all_job_names(embedded_tiny[0], "tiny")) + len(all_job_names(mini_spec, "mini"))
    apply_search(kubectl, manifest("tiny", pod_assets, s3), namespace)
    apply_search(kubectl, manifest("mini", pod_assets, s3, **small), namespace)
    t0 = time.monotonic()

    def next_kill() -> float:
        done = sum(1 for j in k8s.jobs(namespace) if finished(j)) / total_jobs
        elapsed = time.monotonic() - t0
        remaining = 0.7 * elapsed * (1 - done) / done if done else max(30.0, 3 * elapsed)
        return time.monotonic() + rng.uniform(0.0, 2 * remaining / (KILLS - len(kills)))

    kills: list[tuple[float, list[str]]] = []  # (seconds into the run, Jobs running)
    due = next_kill()
    phases: dict[str, str] = {}
    while True:
        phases = {n: (get_ps(k8s, namespace, n).get("status") or {}).get("phase") for n in ("tiny", "mini")}
        if all(p in ("Succeeded", "Failed") for p in phases.values()):
            break
        assert time.monotonic() - t0 < 1200, f"no end after 1200 s; kills: {kills}\n{op.current_output[-3000:]}"
        if len(kills) < KILLS and time.monotonic() >= due:
            live = sorted(j["metadata"]["name"] for j in k8s.jobs(namespace) if not finished(j))
            kills.append((round(time.monotonic() - t0, 1), live))
            op.kill()
            op.start()
            op.wait_ready(P, timeout=60)
            if len(kills) < KILLS:
                due = next_kill()
        time.sleep(0.05)
    elapsed = time.monotonic() - t0
    print(f"\n[faults] {len(kills)} operator SIGKILLs in {elapsed:.1f} s: {kills}")

    assert phases == {"tiny": "Succeeded", "mini": "Succeeded"}, phases
    # exactly KILLS kills, all while a search was still running (each found live Jobs or a hand-off)
    assert len(kills) == KILLS and op.starts == KILLS + 1, kills
    hit = {_kind(n) for _, live in kills for n in live}
    print(f"[faults] Job kinds running at the kills: {sorted(hit)}")
    assert len(hit) >= 3, f"kills while these kinds of Job ran: {hit}"

    # the same result as the embedded run
    spec, want = embedded_tiny
    ps = get_ps(k8s, namespace, "tiny")
    got = s3_json(s3, f"{PREFIX}/searches/tiny-{ps['metadata']['uid']}/result/config.json")
    assert got == want

    # no task ran twice, in either search: one Job per task (attempt 0 only), one pod per Job, nothing retried
    names = sorted(j["metadata"]["name"] for j in k8s.jobs(namespace))
    assert names == sorted(all_job_names(spec, "tiny") + all_job_names(mini_spec, "mini")), names
    pods = collections.Counter(p.job for p in pod_runner.runs)
    assert sorted(pods) == names and set(pods.values()) == {1}, pods
    for name in ("tiny", "mini"):
        mine = sorted(n for n in names if n.startswith(f"{name}-"))
        # the last Job ends just after its completion marker made the search Succeeded: it is accounted then
        st = wait_for(lambda name=name, mine=mine: (lambda s: s if sorted(s.get("attempts") or {}) == mine
                                                    else None)(get_ps(k8s, namespace, name)["status"]),
                      30, f"every Job of {name} in status.attempts")
        assert st["retries"] == {} and {a["outcome"] for a in st["attempts"].values()} == {"Succeeded"}
    assert {p.exit_code for p in pod_runner.runs} == {0}, [(p.name, p.exit_code) for p in pod_runner.runs]


def test_worker_failures_and_an_s3_outage_are_retried_to_success(kubectl, k8s, namespace, s3_process, pod_runner,
                                                                  pod_assets, run_operator):
    s3 = s3_process
    op, _ = start_operator(kubectl, k8s, namespace, s3, run_operator)
    # (a) the database worker crashes (exit code 1): counted; (b) the generation worker is SIGKILLed from
    # outside (exit code 137, not OOMKilled): not counted
    pod_runner.fail_next("tiny-database-0-of-1-a0", exit_code=1,
                         message="RuntimeError: CUDA error: an illegal memory access was encountered")
    pod_runner.fail_next("tiny-generation-0-a0", exit_code=137)
    search = {**tiny_spec_dict(pod_assets, "x")["search"], "generations": 1}
    apply_search(kubectl, manifest("tiny", pod_assets, s3, backoffLimit=1, search=search), namespace)

    # (c) S3 refuses connections for 30 s, from about 1 s into the first post-training Job
    pod = wait_for(lambda: next((p for p in pod_runner.runs if p.job.startswith("tiny-posttrain-")
                                 and p.state == "running"), None), 300, "a post-training pod", interval=0.1)
    time.sleep(1.0)
    assert pod.state == "running"
    t_down = time.monotonic()
    outage = s3.outage_for(30, "refuse")
    ps = wait_phase(k8s, namespace, "tiny", ("Succeeded", "Failed"), op, pod_runner, timeout=600)
    outage.join()
    st = ps["status"]
    print(f"\n[faults] attempts: { {n: (a['reason'], a['counted'], a['seconds']) for n, a in st['attempts'].items()} }"
          f"; search done {time.monotonic() - t_down:.1f} s after the outage began")
    assert st["phase"] == "Succeeded", json.dumps(st, indent=1)

    at = st["attempts"]
    assert (at["tiny-database-0-of-1-a0"]["reason"], at["tiny-database-0-of-1-a0"]["counted"]) == ("Error", True)
    assert "CUDA error" in at["tiny-database-0-of-1-a0"]["message"]
    assert (at["tiny-generation-0-a0"]["reason"], at["tiny-generation-0-a0"]["counted"]) == ("Killed", False)
    assert at["tiny-database-0-of-1-a1"]["outcome"] == at["tiny-generation-0-a1"]["outcome"] == "Succeeded"
    # the status shows the counted retry, and only that one (plus any S3 failure, which is retriable)
    others = {n: a for n, a in at.items() if a["outcome"] == "Failed"
              and n not in ("tiny-database-0-of-1-a0", "tiny-generation-0-a0")}
    assert all(a["reason"] == "RetriableError" for a in others.values()), others
    assert st["retries"] == {"database-0-of-1": 1, **{a["task"]: 1 for a in others.values()}}, st["retries"]
    messages = [e["message"] for e in k8s.events(namespace, "tiny") if e["reason"] == "JobFailed"]
    assert any("tiny-database-0-of-1-a0" in m and "counts toward backoffLimit" in m for m in messages), messages
    assert any("tiny-generation-0-a0" in m and "does not count toward backoffLimit" in m for m in messages)

    # the outage really hit a running Job, and the operator rode it out without restarting
    job = next(j for j in k8s.jobs(namespace) if j["metadata"]["name"] == pod.job)
    assert (at[pod.job]["outcome"] == "Failed" or at[pod.job]["seconds"] >= 30), (pod.job, at[pod.job], job)
    assert op.alive and op.starts == 1
    uid = ps["metadata"]["uid"]
    assert s3.list_keys(s3.bucket, f"{PREFIX}/searches/tiny-{uid}/result/")
