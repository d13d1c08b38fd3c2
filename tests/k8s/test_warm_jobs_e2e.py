"""Warm generation Jobs through the operator: ``generationsPerJob: 0`` runs the whole search part in ONE generation
Job (the real ``darwinlm_jobs.generation --count 0`` in a pod of the pod runner) and gives the embedded result; the
status carries the stage, 100 % progress and the token estimate, and the NewBestParent events match the states."""

from __future__ import annotations

import json

from tests.k8s._helpers import PREFIX, apply_search, manifest, s3_json, wait_phase


def test_one_warm_job_runs_every_generation_and_matches_the_embedded_run(cluster, kubectl, k8s, namespace, s3,
                                                                         pod_runner, pod_assets, embedded_tiny):
    op, _ = cluster
    apply_search(kubectl, manifest("warm", pod_assets, s3, generationsPerJob=0), namespace)
    ps = wait_phase(k8s, namespace, "warm", ("Succeeded", "Failed"), op, pod_runner)
    st = ps["status"]
    assert st["phase"] == "Succeeded", json.dumps(st, indent=1)
    assert st["generation"] == "3/3" and st["progress"] == "100%" and st["stage"] == "Finished"
    assert st["estimate"]["evaluationsPerGeneration"] == 7 and st["estimate"]["fitnessTokensTotal"] > 0
    gen_jobs = sorted(j["metadata"]["name"] for j in k8s.jobs(namespace)
                      if j["metadata"]["labels"]["darwinlm.io/task-kind"] == "generation"
                      and j["metadata"]["labels"]["darwinlm.io/search"] == "warm")
    assert gen_jobs == ["warm-generation-0-a0"]  # one Job, one model load, for the three generations
    uid = ps["metadata"]["uid"]
    _, want = embedded_tiny
    assert s3_json(s3, f"{PREFIX}/searches/warm-{uid}/result/config.json") == want
    states = [s3_json(s3, f"{PREFIX}/searches/warm-{uid}/generations/{g:05d}/state.json") for g in range(3)]
    timings = [s3_json(s3, f"{PREFIX}/searches/warm-{uid}/generations/{g:05d}/timing.json") for g in range(3)]
    assert len({t["process_started"] for t in timings}) == 1  # the same process ran them all
    new_parents = [e["message"] for e in k8s.events(namespace, "warm") if e["reason"] == "NewBestParent"]
    assert len(new_parents) == sum(1 for s in states if not s["parent_survived"]), new_parents
