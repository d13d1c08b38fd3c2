"""metrics: the names the dashboard and alerts use, low-cardinality labels, valid exposition format."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from darwinlm_operator.metrics import Metrics

STATUS = {"phase": "Running", "generationsDone": 2, "generationsTotal": 10, "bestFitness": 0.25,
          "offspringEvaluated": 40, "gpuSeconds": 1234.5,
          "attempts": {"a": {"task": "generation-1", "outcome": "Failed", "reason": "OOMKilled", "seconds": 5},
                       "b": {"task": "generation-1", "outcome": "Failed", "reason": "Evicted"},
                       "c": {"task": "database-0-of-1", "outcome": "Failed", "reason": "Error"},
                       "d": {"task": "generation-1", "outcome": "Succeeded", "reason": "Completed"}}}


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def _samples(m: Metrics) -> dict:
    out = {}
    for fam in text_string_to_metric_families(generate_latest(m.registry).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_names_labels_and_values():
    clock = Clock()
    m = Metrics(clock=clock)
    m.observe("team-a", "s1", STATUS, {"progress": (3, 40), "databaseSeconds": 77.0},
              [{"task": "generation-1", "seconds": 42.0}])
    m.error("team-a")
    clock.t += 30
    s = _samples(m)
    key = (("name", "s1"), ("namespace", "team-a"))
    assert s[("darwinlm_search_generation", key)] == 2
    assert s[("darwinlm_search_generations_total_planned", key)] == 10
    assert s[("darwinlm_search_best_fitness", key)] == 0.25
    assert s[("darwinlm_offspring_evaluated_total", key)] == 40
    assert s[("darwinlm_gpu_seconds_total", key)] == 1234.5
    assert s[("darwinlm_database_build_seconds", key)] == 77.0
    assert s[("darwinlm_search_seconds_since_progress", key)] == 30
    # generation-Job attempts: 3 finished (2 failed), the failed database Job counts in neither
    assert s[("darwinlm_generation_attempts_total", key)] == 3
    failed = {dict(lbls)["reason"]: v for (n, lbls), v in s.items() if n == "darwinlm_generation_attempts_failed_total"}
    assert failed["OOMKilled"] == failed["Evicted"] == 1
    assert failed["Error"] == 0  # exported at 0 up front, so rate() sees the first failure
    assert sum(failed.values()) == 2
    assert s[("darwinlm_searches", (("namespace", "team-a"), ("phase", "Running")))] == 1
    assert s[("darwinlm_searches", (("namespace", "team-a"), ("phase", "Failed")))] == 0
    assert s[("darwinlm_job_duration_seconds_count", (("kind", "generation"),))] == 1
    assert s[("darwinlm_reconcile_errors_total", (("namespace", "team-a"),))] == 1
    for kind in ("database", "posttrain", "export", "evaluate"):  # zero histograms before their first Job
        assert s[("darwinlm_job_duration_seconds_count", (("kind", kind),))] == 0
    labels = {k for (_, lbls) in s for k, _ in lbls}
    assert labels <= {"namespace", "name", "phase", "reason", "kind", "le"}  # low cardinality


def test_progress_resets_the_stall_clock_and_finished_searches_do_not_stall():
    clock = Clock()
    m = Metrics(clock=clock)
    m.observe("ns", "s", STATUS, {"progress": (3, 40)})
    clock.t += 100
    m.observe("ns", "s", STATUS, {"progress": (3, 41)})
    clock.t += 5
    assert _samples(m)[("darwinlm_search_seconds_since_progress", (("name", "s"), ("namespace", "ns")))] == 5
    m.observe("ns", "s", {**STATUS, "phase": "Succeeded"}, {"progress": (9, 50)})
    assert not [k for k in _samples(m) if k[0] == "darwinlm_search_seconds_since_progress"]
    m.forget("ns", "s")
    assert not [k for k in _samples(m) if k[0] == "darwinlm_search_generation"]


def test_counters_start_at_zero():
    """A search's counters (and its namespace's reconcile errors) are exported at 0 before anything happened:
    rate() and increase() miss the first increment of a series that appears with value 1."""
    m = Metrics()
    m.observe("ns", "s", {"phase": "Pending"}, {})
    s = _samples(m)
    key = (("name", "s"), ("namespace", "ns"))
    assert s[("darwinlm_generation_attempts_total", key)] == 0
    assert s[("darwinlm_generation_attempts_failed_total", (*key, ("reason", "OOMKilled")))] == 0
    assert s[("darwinlm_offspring_evaluated_total", key)] == 0
    assert s[("darwinlm_reconcile_errors_total", (("namespace", "ns"),))] == 0


def test_counters_never_go_backwards_within_a_process():
    m = Metrics()
    m.observe("ns", "s", STATUS, {})
    m.observe("ns", "s", {**STATUS, "offspringEvaluated": 3, "gpuSeconds": 1.0}, {})
    s = _samples(m)
    assert s[("darwinlm_offspring_evaluated_total", (("name", "s"), ("namespace", "ns")))] == 40


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed")
def test_promtool_check_metrics():
    m = Metrics()
    m.observe("ns", "s", STATUS, {"progress": (1, 2), "databaseSeconds": 1.0}, [{"task": "export", "seconds": 3}])
    m.error("ns")
    r = subprocess.run(["promtool", "check", "metrics"], input=generate_latest(m.registry), capture_output=True)
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()


def test_progress_and_eta_gauges_follow_the_status():
    m = Metrics(clock=Clock())
    key = (("name", "s1"), ("namespace", "team-a"))
    m.observe("team-a", "s1", {**STATUS, "progress": "20%", "eta": "4m0s"}, {"etaSeconds": 240.0})
    s = _samples(m)
    assert s[("darwinlm_search_progress_ratio", key)] == 0.2 and s[("darwinlm_search_eta_seconds", key)] == 240.0
    m.observe("team-a", "s1", {**STATUS, "progress": "20%", "eta": None}, {"etaSeconds": None})
    assert ("darwinlm_search_eta_seconds", key) not in _samples(m)  # unknown: no series
    m.observe("team-a", "s1", {**STATUS, "phase": "Succeeded", "progress": "100%"}, {})
    s = _samples(m)
    assert s[("darwinlm_search_progress_ratio", key)] == 1.0 and s[("darwinlm_search_eta_seconds", key)] == 0.0
