"""Prometheus metrics of the operator (prometheus-client), low cardinality: namespace/name only.

Why this module exists: Grafana (charts/darwinlm/dashboards) and the alerting rules
(deploy/prometheus/rules.yml) read these exact names. Per-search values are *derived from the
PruningSearch status* (itself derived from the store and the Jobs) at scrape time by a custom
collector, so they survive operator restarts: a counter such as ``darwinlm_gpu_seconds_total`` is the
status' running total, not a sum this process happened to see. Only the job-duration histogram and
the reconcile-error counter are process-local (Prometheus handles their resets).

==========================================  =========  ======================================
name                                        type       labels
==========================================  =========  ======================================
darwinlm_searches                           gauge      namespace, phase
darwinlm_search_generation                  gauge      namespace, name (generations done)
darwinlm_search_generations_total_planned   gauge      namespace, name (spec.search.generations)
darwinlm_search_best_fitness                gauge      namespace, name
darwinlm_search_progress_ratio              gauge      namespace, name (status.progress / 100)
darwinlm_search_eta_seconds                 gauge      namespace, name (status.eta while set; 0 once Succeeded)
darwinlm_search_seconds_since_progress      gauge      namespace, name (only while Running)
darwinlm_offspring_evaluated_total          counter    namespace, name
darwinlm_generation_attempts_total          counter    namespace, name (finished generation Jobs)
darwinlm_generation_attempts_failed_total   counter    namespace, name, reason
darwinlm_gpu_seconds_total                  counter    namespace, name
darwinlm_database_build_seconds             gauge      namespace, name
darwinlm_job_duration_seconds               histogram  kind (task kind)
darwinlm_reconcile_errors_total             counter    namespace
==========================================  =========  ======================================

Failure accounting: one generation Job attempt evaluates one generation's offspring; when it fails,
they are all evaluated again by the next attempt. ``darwinlm_generation_attempts_total`` counts the
finished attempts (Succeeded or Failed; Jobs deleted by suspend or a spec change count in neither) and
``..._failed_total{reason}`` the failed ones, so failed / total is a ratio of the same unit (the
DarwinLMOffspringFailureRateHigh alert). ``darwinlm_offspring_evaluated_total`` counts offspring.

Zero series: ``rate()``/``increase()`` cannot see the first increment of a series that appears with
value 1, so counters are exported at 0 before anything happens: the failure reasons the operator
classifies (``FAILURE_REASONS``; other reasons appear when first seen), the task kinds of the
job-duration histogram (``TASK_KINDS``) and each watched namespace's reconcile-error counter.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from darwinlm.core.plan import KINDS

__all__ = ["FAILURE_REASONS", "PHASES", "TASK_KINDS", "Metrics"]

PHASES = ("Pending", "Running", "Suspended", "Succeeded", "Failed")
# what jobstate.classify_failure and the reconciler record for a failed Job (exported at 0 up front)
FAILURE_REASONS = ("Error", "RetriableError", "OOMKilled", "Killed", "Evicted", "Preempted", "PermanentError",
                   "MissingOutput", "DeadlineExceeded")
TASK_KINDS = KINDS  # darwinlm.core.plan: every task kind of the plan
# Job durations: seconds, from a tiny CPU task to a multi-hour post-training
_BUCKETS = (10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400)


@dataclasses.dataclass
class _Search:
    phase: str = "Pending"
    generation: int = 0
    generations: int = 0
    best: float | None = None
    evaluated: int = 0
    attempts: int = 0
    failed: dict[str, int] = dataclasses.field(default_factory=dict)
    gpu_seconds: float = 0.0
    database_seconds: float | None = None
    progress: tuple = ()
    progress_at: float = 0.0
    percent: float = 0.0
    eta_seconds: float | None = None


class _SearchCollector(Collector):
    def __init__(self, metrics: Metrics):
        self._m = metrics

    def collect(self) -> Iterator[Any]:
        snap = self._m.snapshot()
        now = self._m.clock()
        ns_name = ["namespace", "name"]
        by_phase = GaugeMetricFamily("darwinlm_searches", "PruningSearch resources by status.phase.",
                                     labels=["namespace", "phase"])
        gen = GaugeMetricFamily("darwinlm_search_generation", "Search generations completed.", labels=ns_name)
        planned = GaugeMetricFamily("darwinlm_search_generations_total_planned",
                                    "Generations the search runs in total (spec.search.generations).", labels=ns_name)
        best = GaugeMetricFamily("darwinlm_search_best_fitness",
                                 "Fitness of the best genome so far (lower is better).", labels=ns_name)
        ratio = GaugeMetricFamily("darwinlm_search_progress_ratio",
                                  "Fraction of the planned generations done (status.progress).", labels=ns_name)
        eta = GaugeMetricFamily("darwinlm_search_eta_seconds",
                                "Seconds until the last generation finishes (status.eta).", labels=ns_name)
        stall = GaugeMetricFamily("darwinlm_search_seconds_since_progress",
                                  "Seconds since a Running search last finished a task or evaluated an offspring.",
                                  labels=ns_name)
        evaluated = CounterMetricFamily("darwinlm_offspring_evaluated",
                                        "Offspring whose fitness was evaluated.", labels=ns_name)
        attempts = CounterMetricFamily("darwinlm_generation_attempts",
                                       "Finished attempts (Succeeded or Failed) of generation Jobs; each evaluates "
                                       "one generation's offspring.", labels=ns_name)
        failed = CounterMetricFamily("darwinlm_generation_attempts_failed",
                                     "Failed attempts of generation Jobs (their offspring are evaluated again by "
                                     "the next attempt), by reason.", labels=[*ns_name, "reason"])
        gpu = CounterMetricFamily("darwinlm_gpu_seconds",
                                  "GPU-seconds of the search's finished Jobs (GPUs per pod x pods x seconds).",
                                  labels=ns_name)
        db = GaugeMetricFamily("darwinlm_database_build_seconds",
                               "Wall-clock seconds of the slowest layer-database shard.", labels=ns_name)
        phases: dict[tuple[str, str], int] = {}
        for (ns, name), s in sorted(snap.items()):
            key = [ns, name]
            phases[(ns, s.phase)] = phases.get((ns, s.phase), 0) + 1
            gen.add_metric(key, s.generation)
            planned.add_metric(key, s.generations)
            if s.best is not None:
                best.add_metric(key, s.best)
            ratio.add_metric(key, s.percent / 100.0)
            if s.eta_seconds is not None:
                eta.add_metric(key, s.eta_seconds)
            if s.phase == "Running":
                stall.add_metric(key, max(0.0, now - s.progress_at))
            evaluated.add_metric(key, s.evaluated)
            attempts.add_metric(key, s.attempts)
            for reason in sorted({*FAILURE_REASONS, *s.failed}):
                failed.add_metric([*key, reason], s.failed.get(reason, 0))
            gpu.add_metric(key, s.gpu_seconds)
            if s.database_seconds is not None:
                db.add_metric(key, s.database_seconds)
        for ns in sorted({ns for ns, _ in snap}):
            for phase in PHASES:
                by_phase.add_metric([ns, phase], phases.get((ns, phase), 0))
        yield from (by_phase, gen, planned, best, ratio, eta, stall, evaluated, attempts, failed, gpu, db)


class Metrics:
    """The operator's metrics in their own registry (tests make as many as they like)."""

    def __init__(self, registry: CollectorRegistry | None = None, clock: Callable[[], float] = time.time):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.clock = clock
        self._lock = threading.Lock()
        self._searches: dict[tuple[str, str], _Search] = {}
        self.job_duration = Histogram("darwinlm_job_duration_seconds", "Run time of finished Jobs, by task kind.",
                                      ["kind"], buckets=_BUCKETS, registry=self.registry)
        self.reconcile_errors = Counter("darwinlm_reconcile_errors", "Reconciles that raised an error.",
                                        ["namespace"], registry=self.registry)
        for kind in TASK_KINDS:
            self.job_duration.labels(kind)
        self.registry.register(_SearchCollector(self))

    def snapshot(self) -> dict[tuple[str, str], _Search]:
        with self._lock:
            return {k: dataclasses.replace(v, failed=dict(v.failed)) for k, v in self._searches.items()}

    def observe(self, namespace: str, name: str, status: Mapping[str, Any], extra: Mapping[str, Any],
                accounted: list[Mapping[str, Any]] = ()) -> None:
        """Update a search from its (new) status, ``Decision.metrics`` and newly accounted Jobs."""
        failed: dict[str, int] = {}
        attempts = 0
        for rec in (status.get("attempts") or {}).values():
            if not str(rec.get("task", "")).startswith("generation-"):
                continue
            if rec.get("outcome") in ("Succeeded", "Failed"):
                attempts += 1
            if rec.get("outcome") == "Failed":
                reason = rec.get("reason") or "Error"
                failed[reason] = failed.get(reason, 0) + 1
        now = self.clock()
        self.reconcile_errors.labels(namespace)  # the series exists (at 0) before the first error
        with self._lock:
            s = self._searches.setdefault((namespace, name), _Search(progress_at=now))
            s.phase = status.get("phase") or "Pending"
            s.generation = int(status.get("generationsDone") or 0)
            s.generations = int(status.get("generationsTotal") or 0)
            s.best = status.get("bestFitness")
            s.percent = float(str(status.get("progress") or "0%").rstrip("%") or 0)
            s.eta_seconds = extra.get("etaSeconds") if status.get("eta") else (
                0.0 if s.phase == "Succeeded" else None)  # nothing left; unknown otherwise (no series)
            s.evaluated = max(s.evaluated, int(status.get("offspringEvaluated") or 0))
            s.attempts = max(s.attempts, attempts)
            s.failed = {r: max(n, s.failed.get(r, 0)) for r, n in {**s.failed, **failed}.items()}
            s.gpu_seconds = max(s.gpu_seconds, float(status.get("gpuSeconds") or 0.0))
            if extra.get("databaseSeconds") is not None:
                s.database_seconds = float(extra["databaseSeconds"])
            progress = tuple(extra.get("progress") or ())
            if progress and progress != s.progress:
                s.progress, s.progress_at = progress, now
        for rec in accounted:
            kind = str(rec.get("task", "")).split("-")[0] or "unknown"
            self.job_duration.labels(kind).observe(float(rec.get("seconds") or 0.0))

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._searches.pop((namespace, name), None)

    def error(self, namespace: str) -> None:
        self.reconcile_errors.labels(namespace).inc()

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Expose ``/metrics`` on ``addr:port`` (a daemon thread)."""
        start_http_server(port, addr=addr, registry=self.registry)
