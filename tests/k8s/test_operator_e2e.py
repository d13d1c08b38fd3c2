"""The operator end to end: CRD + PruningSearch applied with kubectl, Jobs run by the pod runner, S3 by moto.

The real operator (``darwinlm_operator.handlers`` under ``kopf run``) drives the tiny search to Succeeded; every
Job runs the real ``darwinlm_jobs`` entrypoint on the tiny model. The result must equal an embedded ``darwinlm
run`` of the same spec (only the store prefix differs: ``searches/<name>-<uid>`` vs ``searches/<name>``).
On the same stack: an evicted Job is retried without counting, a permanent error (exit code 2) fails the
search naming the task, ``suspend`` deletes the running Job and resuming continues; a SIGKILLed operator adopts
the running Job after its restart; ``artifactRetention: Delete`` cleans the store prefix through the finalizer;
``workers: 2`` runs a generation as an Indexed Job whose state equals a one-process run's; ``kubectl get``
shows the CRD's printer columns (server-side Tables, answered by the API emulator as by a real API server).
"""

from __future__ import annotations

import json
import time
import urllib.request

from tests.conftest import tiny_spec_dict
from tests.k8s._helpers import (
    PREFIX,
    G,
    P,
    apply_search,
    cond,
    finished,
    get_ps,
    start_operator,
    manifest,
    s3_json,
    variants,
    wait_phase,
)
from tests.support.cluster import wait_for


def test_tiny_search_succeeds_and_matches_the_embedded_run(kubectl, k8s, namespace, s3, pod_runner, run_operator,
                                                            pod_assets, embedded_tiny):
    # The reconcile timer is 60 s: every hand-off within 2 s below is the Job watch's doing.
    op, port = start_operator(kubectl, k8s, namespace, s3, run_operator, interval=60)
    t0 = time.monotonic()
    apply_search(kubectl, manifest("tiny", pod_assets, s3), namespace)
    ps = wait_phase(k8s, namespace, "tiny", ("Succeeded", "Failed"), op, pod_runner)
    elapsed = time.monotonic() - t0
    st = ps["status"]
    print(f"\n[e2e] operator run: {elapsed:.1f} s; Job seconds: "
          f"{ {a['task']: a['seconds'] for a in (st.get('attempts') or {}).values()} }")
    assert st["phase"] == "Succeeded", json.dumps(st, indent=1)
    uid = ps["metadata"]["uid"]
    root = f"s3://{s3.bucket}/{PREFIX}/searches/tiny-{uid}"
    assert st["resultURI"] == f"{root}/result"
    assert st["generation"] == "3/3" and st["generationsDone"] == st["generationsTotal"] == 3
    assert isinstance(st["bestFitness"], float) and st["offspringEvaluated"] > 0
    assert st["checkpointURI"] == f"{root}/generations/00002/state.json"
    assert cond(ps, "Succeeded")["status"] == "True" and cond(ps, "Failed")["status"] == "False"
    assert st["observedGeneration"] == ps["metadata"]["generation"] and st["retries"] == {}

    # the same spec run embedded gives the same model configuration
    embedded, want = embedded_tiny
    got = s3_json(s3, f"{PREFIX}/searches/tiny-{uid}/result/config.json")
    assert got == want

    # Jobs: deterministic names, labels, owner; one attempt each
    jobs = k8s.jobs(namespace)
    names = sorted(j["metadata"]["name"] for j in jobs)
    assert names == sorted(["tiny-database-0-of-1-a0", "tiny-sensitivity-0-of-1-a0", "tiny-generation-0-a0",
                            "tiny-generation-1-a0",
                            "tiny-generation-2-a0", *[f"tiny-posttrain-{v}-a0" for v in variants(embedded)],
                            "tiny-export-a0", "tiny-evaluate-a0"])
    for j in jobs:
        assert j["metadata"]["ownerReferences"][0]["uid"] == uid
        assert j["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "darwinlm-operator"
    # every Job is in status.attempts, each one Succeeded (the last is accounted just after Succeeded)
    st = wait_for(lambda: (lambda s: s if sorted(s.get("attempts") or {}) == names else None)(
        get_ps(k8s, namespace, "tiny")["status"]), 30, "every Job in status.attempts")
    assert {a["outcome"] for a in st["attempts"].values()} == {"Succeeded"}, st["attempts"]
    gaps = _handoff_gaps(jobs)
    print(f"[e2e] {len(jobs)} Jobs; Job-to-next-Job gaps (s, 1 s timestamp resolution): {gaps}")
    # Job watch -> reconcile: each hand-off is far quicker than the 60 s timer (all sequential hand-offs
    # measured: the Jobs without a predecessor in the same second)
    assert len(gaps) >= 5 and max(gaps) <= 2, gaps

    # events tell the story; no credential anywhere the operator writes
    reasons = {e["reason"] for e in k8s.events(namespace, "tiny")}
    assert {"JobCreated", "GenerationComplete", "Succeeded"} <= reasons, reasons
    leaks = [op.output, json.dumps(ps), json.dumps(k8s.events(namespace))]
    assert not [t for t in leaks if s3.secret_key in t]

    # metrics
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    label = f'name="tiny",namespace="{namespace}"'
    assert f"darwinlm_search_generation{{{label}}} 3.0" in text
    assert f'darwinlm_searches{{namespace="{namespace}",phase="Succeeded"}} 1.0' in text
    assert "darwinlm_job_duration_seconds_count{kind=\"generation\"} 3.0" in text


def test_kubectl_get_shows_the_printer_columns(cluster, kubectl, k8s, namespace, s3, pod_assets):
    """A suspended search (no Jobs): the operator still fills in phase, generation i/N and the best fitness (from
    a generation marker put in its store), and ``kubectl get`` prints them in the CRD's printer columns from the
    API server's Table (the emulator answers ``Accept: ...;as=Table`` like a real API server does)."""
    import hashlib
    import re

    op, _ = cluster
    apply_search(kubectl, manifest("shown", pod_assets, s3, suspend=True), namespace)
    ps = wait_for(lambda: (lambda p: p if (p.get("status") or {}).get("phase") == "Suspended" else None)(
        get_ps(k8s, namespace, "shown")), 30, "phase Suspended")
    assert not ps["metadata"].get("finalizers")  # Retain: nothing blocks deletion
    # generation 0 done, as its Job would have left it (a complete artifact: canonical JSON + its sha256 in the
    # object metadata); the operator reports it even while suspended
    body = (json.dumps({"best_fitness": 0.4375, "evaluations": 4, "seconds": 12.5}, sort_keys=True, indent=1)
            + "\n").encode()
    s3.client().put_object(Bucket=s3.bucket, Key=f"{PREFIX}/searches/shown-{ps['metadata']['uid']}/generations/"
                                                 f"00000/state.json",
                           Body=body, Metadata={"sha256": hashlib.sha256(body).hexdigest()})
    st = wait_for(lambda: (lambda s: s if s.get("generation") == "1/3" and s.get("bestFitness") is not None else None)(
        get_ps(k8s, namespace, "shown").get("status") or {}), 30, "generation 1/3 with a best fitness")
    assert st["phase"] == "Suspended" and st["bestFitness"] == 0.4375, st

    crd = kubectl.json("get", "crd", f"{P}.{G}")
    columns = crd["spec"]["versions"][0]["additionalPrinterColumns"]
    assert [c["name"] for c in columns] == ["Phase", "Generation", "Best", "Stage", "Progress", "ETA", "Age"], columns
    # kubectl's own JSONPath engine on the whole object (client side)
    spec = ",".join(f"{c['name'].upper()}:{c['jsonPath']}" for c in columns if c["name"] != "Age")
    rows = kubectl("get", "psearch", "shown", "-n", namespace, "-o", f"custom-columns={spec}").stdout.splitlines()
    assert rows[0].split()[:3] == ["PHASE", "GENERATION", "BEST"], rows
    assert rows[1].split()[:3] == ["Suspended", "1/3", "0.4375"], rows

    def table(*args: str) -> tuple[list[str], list[dict[str, str]]]:
        """``kubectl get ARGS`` as (header, rows as {HEADER: cell}); cells cut at the header's column starts
        (empty cells print as blanks)."""
        lines = kubectl("get", *args, "-n", namespace).stdout.splitlines()
        assert lines, args
        starts = [m.start() for m in re.finditer(r"(?<!\S)\S+(?: \S+)*", lines[0])]
        header = [lines[0][a:b].strip() for a, b in zip(starts, starts[1:] + [None])]
        body = [{h: line[a:b].strip() for h, a, b in zip(header, starts, starts[1:] + [None])} for line in lines[1:]]
        return header, body

    # the server-side Table: NAME, the priority-0 columns in order, AGE computed by the server from the timestamp
    normal = ["NAME"] + [c["name"].upper() for c in columns if not c.get("priority")]
    want = {"NAME": "shown", "PHASE": "Suspended", "GENERATION": "1/3", "BEST": "0.4375", "STAGE": "Suspended",
            "PROGRESS": "33%"}
    for args in (("psearch",), ("pruningsearches.darwinlm.io",), ("ps", "shown"), ("darwinlm",)):
        header, body = table(*args)
        assert header == normal, (args, header)
        assert len(body) == 1 and {k: body[0][k] for k in want} == want, (args, body)
        assert re.fullmatch(r"(\d+[smhdy])+", body[0]["AGE"]), (args, body)
        # PROGRESS next to ETA in plain `kubectl get` (ETA: none while suspended)
        assert header.index("ETA") == header.index("PROGRESS") + 1 and body[0]["ETA"] == "", (args, body)
    # -o wide: every column is priority 0
    header, body = table("psearch", "-o", "wide")
    assert header == ["NAME"] + [c["name"].upper() for c in columns], header
    assert {k: body[0][k] for k in want} == want and body[0]["ETA"] == "", body
    # all namespaces: kubectl adds NAMESPACE from the rows' object metadata
    header, body = table("psearch", "-A")
    assert header[:2] == ["NAMESPACE", "NAME"] and {"NAMESPACE": namespace, **want}.items() <= next(
        r for r in body if r["NAMESPACE"] == namespace).items(), body


def _handoff_gaps(jobs: list[dict]) -> list[int]:
    """Seconds from the completion of the last Job created before each Job's creation second (the last
    of its prerequisites: both post-training variants before export) to that Job's creation. A Job may
    even start before its predecessor's Job object is Complete: the completion marker comes first."""
    from darwinlm_operator.conditions import parse_timestamp

    created = sorted({j["metadata"]["creationTimestamp"] for j in jobs})
    gaps = []
    for before, at in zip(created, created[1:], strict=False):
        ends = [(j.get("status") or {}).get("completionTime") for j in jobs
                if j["metadata"]["creationTimestamp"] <= before]
        if ends and all(ends):
            gaps.append(int((parse_timestamp(at) - max(parse_timestamp(e) for e in ends)).total_seconds()))
    return gaps


def test_failures_retries_and_suspend(cluster, kubectl, k8s, namespace, s3, pod_runner, pod_assets):
    """Eviction: retried, not counted. Exit code 2: Failed naming the task and the error. Suspend: Jobs deleted."""
    op, _ = cluster
    small = {"search": {**tiny_spec_dict(pod_assets, "x")["search"], "generations": 1}}

    # 1. the database Job is evicted once: a new attempt, no retry counted (backoffLimit would allow 1 anyway)
    pod_runner.evict_next("evict-database-0-of-1-a0", after=0.5)
    apply_search(kubectl, manifest("evict", pod_assets, s3, backoffLimit=0, **small), namespace)
    ps = wait_for(lambda: (lambda p: p if (p.get("status") or {}).get("generationsDone") == 0 and any(
        j["metadata"]["name"].startswith("evict-generation-0") for j in k8s.jobs(namespace)) else None)(
        get_ps(k8s, namespace, "evict")), 300, "the search past its database", interval=0.2)
    attempts = ps["status"]["attempts"]
    # the eviction happened: exactly one pod of the database Job was evicted
    evicted_pods = [p.name for p in pod_runner.runs if p.job == "evict-database-0-of-1-a0" and p.reason == "Evicted"]
    assert len(evicted_pods) == 1, [(p.name, p.reason) for p in pod_runner.runs]
    # The Job's podFailurePolicy (Ignore on DisruptionTarget) replaces the pod within the same Job, or the
    # operator sees an Evicted attempt and starts a1: either way the retry is not counted.
    evicted = {n: a for n, a in attempts.items() if a["reason"] == "Evicted"}
    replaced = [p for p in pod_runner.runs if p.job == "evict-database-0-of-1-a0" and p.name not in evicted_pods]
    assert (evicted and {a["counted"] for a in evicted.values()} == {False}) or len(replaced) == 1, (
        attempts, [(p.name, p.reason, p.exit_code) for p in pod_runner.runs])
    assert ps["status"]["retries"] == {}
    assert ps["status"]["phase"] == "Running"

    # 2. suspend: the running Job goes, the phase says so; resume continues
    kubectl("patch", "psearch", "evict", "--type=merge", "-p", '{"spec":{"suspend":true}}', "-n", namespace)
    ps = wait_phase(k8s, namespace, "evict", ("Suspended",), op, pod_runner, timeout=60)
    wait_for(lambda: not [j for j in k8s.jobs(namespace) if j["metadata"]["name"].startswith("evict-")
                          and not finished(j)], 30, "active Jobs deleted")
    assert cond(ps, "Suspended")["status"] == "True"
    kubectl("patch", "psearch", "evict", "--type=merge", "-p", '{"spec":{"suspend":false}}', "-n", namespace)
    ps = wait_phase(k8s, namespace, "evict", ("Running", "Succeeded"), op, pod_runner, timeout=60)
    assert cond(ps, "Suspended")["reason"] == "Resumed"
    wait_for(lambda: [j for j in k8s.jobs(namespace) if j["metadata"]["name"].startswith("evict-")
                      and not finished(j)], 30, "a new Job after resuming")
    kubectl("patch", "psearch", "evict", "--type=merge", "-p", '{"spec":{"suspend":true}}', "-n", namespace)

    # 3. a permanent error (exit code 2) in a generation fails the search at once, naming task and error
    pod_runner.fail_next("perm-generation-0", exit_code=2, message="permanent error: invalid spec:\n  x: bad")
    apply_search(kubectl, manifest("perm", pod_assets, s3, backoffLimit=3, **small), namespace)
    ps = wait_phase(k8s, namespace, "perm", ("Failed", "Succeeded"), op, pod_runner)
    failed = cond(ps, "Failed")
    assert ps["status"]["phase"] == "Failed" and failed["reason"] == "TaskFailedPermanently", ps["status"]
    assert "generation-0" in failed["message"] and "permanent error" in failed["message"]
    assert not [j for j in k8s.jobs(namespace) if j["metadata"]["name"].startswith("perm-generation-0-a1")]


def test_operator_restart_resumes_and_delete_policy_cleans_s3(cluster, kubectl, k8s, namespace, s3, pod_runner,
                                                               pod_assets):
    """SIGKILL the operator while a Job runs: after the restart it adopts the running Job (no duplicate
    attempt) and carries on. artifactRetention: Delete puts the finalizer on, and deleting the search then
    removes its store prefix but keeps the shared layer database."""
    op, _ = cluster
    small = {"search": {**tiny_spec_dict(pod_assets, "x")["search"], "generations": 1}}
    apply_search(kubectl, manifest("keep", pod_assets, s3, artifactRetention="Delete", **small), namespace)
    wait_for(lambda: any(j["metadata"]["name"] == "keep-generation-0-a0" for j in k8s.jobs(namespace)), 180,
             "the generation Job")
    ps = get_ps(k8s, namespace, "keep")
    assert "darwinlm.io/s3-cleanup" in ps["metadata"].get("finalizers", [])
    op.kill()
    op.start()
    op.wait_ready(P)
    ps = wait_for(lambda: (lambda p: p if (p.get("status") or {}).get("generationsDone") == 1 and any(
        j["metadata"]["name"].startswith("keep-posttrain") for j in k8s.jobs(namespace)) else None)(
        get_ps(k8s, namespace, "keep")), 180, "generation 0 done after the restart", interval=0.2)
    names = [j["metadata"]["name"] for j in k8s.jobs(namespace)]
    assert not [n for n in names if n.endswith("-a1")], names  # the running Job was adopted, not repeated
    assert ps["status"]["retries"] == {} and ps["status"]["phase"] == "Running"

    uid = ps["metadata"]["uid"]
    prefix = f"{PREFIX}/searches/keep-{uid}/"
    assert s3.list_keys(s3.bucket, prefix)
    kubectl("delete", "psearch", "keep", "-n", namespace, "--wait=false")
    wait_for(lambda: get_ps(k8s, namespace, "keep") == {}, 60, "the PruningSearch to go")
    assert s3.list_keys(s3.bucket, prefix) == []
    assert s3.list_keys(s3.bucket, f"{PREFIX}/databases/")  # shared by other searches: kept
    assert "ArtifactsDeleted" in {e["reason"] for e in k8s.events(namespace, "keep")}


def test_distributed_generation_matches_a_single_process(cluster, kubectl, k8s, namespace, s3, pod_runner,
                                                         tiny_assets, pod_assets, tmp_path):
    """workers: 2 -> the generation runs as an Indexed Job of 2 ranks (torch.distributed, gloo) that find
    rank 0 through the headless Service name; its generation state equals a one-process run's."""
    op, _ = cluster
    search = {**tiny_spec_dict(pod_assets, "x")["search"], "generations": 1}
    apply_search(kubectl, manifest("dist", pod_assets, s3, workers=2, search=search), namespace)
    ps = wait_for(lambda: (lambda p: p if (p.get("status") or {}).get("generationsDone") == 1 else None)(
        get_ps(k8s, namespace, "dist")), 300, "generation 0 on 2 workers", interval=0.2)
    kubectl("patch", "psearch", "dist", "--type=merge", "-p", '{"spec":{"suspend":true}}', "-n", namespace)
    job = next(j for j in k8s.jobs(namespace) if j["metadata"]["name"] == "dist-generation-0-a0")
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 2
    assert len([p for p in pod_runner.runs if p.job == "dist-generation-0-a0"]) == 2
    svc = k8s.core.read_namespaced_service("dist-workers", namespace)
    assert svc.spec.cluster_ip == "None"
    got = s3_json(s3, f"{PREFIX}/searches/dist-{ps['metadata']['uid']}/generations/00000/state.json")

    from darwinlm.run.runner import run_search
    from darwinlm.spec import load_spec

    spec = load_spec(tiny_spec_dict(tiny_assets, f"file://{tmp_path / 'one'}", **{"search.generations": 1}))
    ws = run_search(spec, until=lambda t: t.kind not in ("database", "sensitivity", "generation"))
    want = ws.store.get_json("generations/00000/state.json")
    assert got["winner"] == want["winner"] and got["best_fitness"] == want["best_fitness"]
