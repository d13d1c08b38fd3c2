"""Observability end to end: a real Prometheus scrapes the operator while a tiny search runs, and every panel of
the shipped Grafana dashboard gets data through the Prometheus HTTP API; the shipped alert rules load and evaluate.

Stack: the API emulator, the pod runner, moto S3 and the real operator (the ``cluster`` fixture of
tests/k8s/conftest.py), plus Debian's ``prometheus`` (TEST_INFRA.md §3a) started with deploy/ci/prometheus.yml
(scrape_interval 1s, rule_files deploy/prometheus/rules.yml), its target pointed at the operator's metrics port.
The search exercises what the panels show: a generation Job attempt is OOMKilled once (pod_runner.fail_next) and
retried, the pods request a GPU (GPU-seconds), the layer database is built, every task kind runs to Succeeded.

Then each target ``expr`` of charts/darwinlm/dashboards/darwinlm.json is sent the way Grafana sends it: template
variables substituted (``$namespace``/``$search`` both as the values the variable queries return and as "All",
``$__interval``/``$__rate_interval``/``$__range`` as Grafana computes them for a data source whose scrape
interval is 1s), time-series targets through ``/api/v1/query_range`` over the run, instant targets through
``/api/v1/query``. Each must answer ``success`` with a non-empty result holding a finite value.

Needs /usr/bin/prometheus (apt-get install -y --no-install-recommends prometheus); skipped without it.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from tests.k8s._helpers import apply_search, manifest, wait_phase
from tests.support.cluster import REPO_ROOT, wait_for
from tests.support.procs import free_port, stop_group

DASHBOARD = REPO_ROOT / "charts" / "darwinlm" / "dashboards" / "darwinlm.json"
RULES = REPO_ROOT / "deploy" / "prometheus" / "rules.yml"
PROM_CONFIG = REPO_ROOT / "deploy" / "ci" / "prometheus.yml"
ALERTS = {"DarwinLMSearchStalled", "DarwinLMOffspringFailureRateHigh", "DarwinLMOperatorDown",
          "DarwinLMReconcileErrors"}
SCRAPE_S = 1  # deploy/ci/prometheus.yml; Grafana's data source "scrape interval" (timeInterval) set to match
MAX_DATA_POINTS = 1000  # about a panel's width in pixels, Grafana's default maxDataPoints


class Prometheus:
    """A ``prometheus`` process on a free loopback port with a temp config and TSDB."""

    def __init__(self, workdir, metrics_port: int) -> None:
        cfg = yaml.safe_load(PROM_CONFIG.read_text())
        cfg["rule_files"] = [str(RULES)]
        cfg["scrape_configs"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
        self.config = workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(cfg))
        self.log = workdir / "prometheus.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [shutil.which("prometheus") or "/usr/bin/prometheus", f"--config.file={self.config}",
                    f"--storage.tsdb.path={workdir / 'tsdb'}", f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn"]
        self.proc: subprocess.Popen | None = None

    def start(self) -> Prometheus:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        wait_for(self._ready, 30, "prometheus /-/ready", interval=0.1)
        return self

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        try:
            return urllib.request.urlopen(f"{self.url}/-/ready", timeout=2).status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)

    def api(self, path: str, **params) -> dict:
        query = urllib.parse.urlencode(params, doseq=True)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=30) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def target_up(self) -> dict | None:
        targets = self.api("targets")["activeTargets"]
        return next((t for t in targets if t["health"] == "up" and t["lastScrape"]), None)


@pytest.fixture
def prometheus(cluster, tmp_path):
    if not (shutil.which("prometheus") or os.path.exists("/usr/bin/prometheus")):
        pytest.skip("prometheus not installed: apt-get install -y --no-install-recommends prometheus")
    _, metrics_port = cluster
    prom = Prometheus(tmp_path, metrics_port).start()
    try:
        wait_for(prom.target_up, 30, "the operator target up", interval=0.2)
        yield prom
    finally:
        prom.stop()


# ------------------------------------------------------------------------------ Grafana's side

def _duration(seconds: float) -> str:
    return f"{max(1, math.ceil(seconds))}s"


def _regex_escape(value: str) -> str:
    """Grafana's prometheusSpecialRegexEscape for a selected value of a multi-value variable."""
    return re.sub(r"([\\^$*+?.()|{}\[\]])", r"\\\\\1", value)


def grafana_expr(expr: str, variables: dict[str, str], range_s: float) -> tuple[str, int]:
    """(``expr`` with the template and built-in variables replaced as Grafana does for a ``range_s`` dashboard
    time range: $__interval = range / maxDataPoints (at least the data source's scrape interval),
    $__rate_interval = max($__interval + scrape interval, 4 x scrape interval); $__interval in s)."""
    interval = max(SCRAPE_S, math.ceil(range_s / MAX_DATA_POINTS))
    builtins = {"__rate_interval": _duration(max(interval + SCRAPE_S, 4 * SCRAPE_S)),
                "__interval": _duration(interval), "__interval_ms": str(interval * 1000),
                "__range": _duration(range_s), "__range_s": str(math.ceil(range_s)),
                "__range_ms": str(math.ceil(range_s) * 1000)}
    values = {**builtins, **variables}

    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        assert name in values, f"unknown variable ${name} in {expr}"
        return values[name]
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", sub, expr), interval


def _targets(dashboard: dict):
    def walk(panels):
        for p in panels:
            yield p
            yield from walk(p.get("panels") or [])
    for p in walk(dashboard["panels"]):
        for t in p.get("targets") or []:
            yield p, t


def _values(data: dict) -> list[list[float]]:
    """Per series, its values as floats (instant vector: one value; matrix: all points)."""
    if data["resultType"] == "vector":
        return [[float(s["value"][1])] for s in data["result"]]
    if data["resultType"] == "matrix":
        return [[float(v) for _, v in s["values"]] for s in data["result"]]
    return [[float(data["result"][1])]]  # scalar


def run_panel_queries(prom: Prometheus, dashboard: dict, variables: dict[str, str], start: float, end: float):
    """Every target of every panel, as Grafana would send it: {(panel title, refId): (labels, values)}."""
    out = {}
    for panel, target in _targets(dashboard):
        expr, step = grafana_expr(target["expr"], variables, end - start)
        where = f"panel {panel['title']!r} {target['refId']}: {expr}"
        if target.get("instant") and not target.get("range"):
            data = prom.api("query", query=expr, time=f"{end:.3f}")
        else:
            aligned = math.floor(start / step) * step  # Grafana aligns the range to the step
            data = prom.api("query_range", query=expr, start=f"{aligned:.3f}", end=f"{end:.3f}", step=step)
        assert data["result"], f"no data for {where}"
        series = _values(data)
        assert any(math.isfinite(v) for vals in series for v in vals), f"only NaN/Inf for {where}: {data}"
        out[(panel["title"], target["refId"])] = ([s.get("metric", {}) for s in data["result"]], series)
    return out


# ------------------------------------------------------------------------------ the test

def test_prometheus_scrapes_the_operator_and_every_panel_has_data(cluster, prometheus, kubectl, k8s,
                                                                  namespace, s3, pod_runner, pod_assets):
    op, _ = cluster
    prom = prometheus
    t_start = time.time()
    dashboard = json.loads(DASHBOARD.read_text())

    # one OOMKilled generation attempt (retried: backoffLimit 1), the pods request a GPU, two generations
    pod_runner.fail_next("obs-generation-0", exit_code=137, reason="OOMKilled")
    search = {**manifest("obs", pod_assets, s3)["spec"]["search"], "generations": 2}
    apply_search(kubectl, manifest("obs", pod_assets, s3, search=search,
                                   resources={"limits": {"nvidia.com/gpu": "1"}}), namespace)
    ps = wait_phase(k8s, namespace, "obs", ("Succeeded", "Failed"), op, pod_runner)
    st = ps["status"]
    assert st["phase"] == "Succeeded", json.dumps(st, indent=1)[-3000:]
    failed = [a for a in st["attempts"].values() if a["outcome"] == "Failed"]
    assert [(a["task"], a["reason"]) for a in failed] == [("generation-0", "OOMKilled")], failed
    assert st["gpuSeconds"] > 0

    # Prometheus has scraped the final state
    sel = f'namespace="{namespace}"'
    wait_for(lambda: prom.api("query", query=f'darwinlm_searches{{{sel},phase="Succeeded"}} == 1')["result"],
             30, "the Succeeded search scraped", interval=0.5)
    # The phase can turn Succeeded from the evaluate task's marker in the store before its pod has exited
    # and its Job is Complete; the Job's duration is recorded when the operator accounts the finished Job.
    wait_for(lambda: prom.api("query", query='darwinlm_job_duration_seconds_count{kind="evaluate"} >= 1')["result"],
             30, "the evaluate Job's duration scraped", interval=0.5)
    time.sleep(2 * SCRAPE_S)  # ...and a range query's last step (<= its end) is past that scrape
    t_end = time.time()
    print(f"\n[observability] search + scrapes: {t_end - t_start:.1f} s")

    # the dashboard's template variables: what their queries return is what a user picks from
    namespaces = prom.api("label/namespace/values", **{"match[]": "darwinlm_search_generation"},
                          start=f"{t_start:.3f}", end=f"{t_end:.3f}")
    assert namespace in namespaces
    names = prom.api("label/name/values", **{"match[]": f'darwinlm_search_generation{{namespace=~"{namespace}"}}'},
                     start=f"{t_start:.3f}", end=f"{t_end:.3f}")
    assert names == ["obs"]

    for variables in ({"namespace": _regex_escape(namespace), "search": "obs"},  # the search selected
                      {"namespace": ".*", "search": ".*"}):                      # "All" (allValue .*)
        got = run_panel_queries(prom, dashboard, variables, t_start, t_end)
        assert len(got) == sum(1 for _ in _targets(dashboard))

        def peak(title, ref="A", got=got):
            return max(v for vals in got[(title, ref)][1] for v in vals if math.isfinite(v))

        phases = {lbl["phase"]: vals[-1] for lbl, vals in zip(*got[("Searches by phase", "A")], strict=True)}
        assert phases["Succeeded"] == 1 and phases["Running"] == 0, phases
        assert peak("Operator up") == 1
        assert peak("Generation progress") == 1  # 2 of 2 generations
        assert peak("GPU-hours in range") > 0 and peak("GPU-hours per search") > 0
        assert peak("Offspring throughput") > 0
        assert peak("Database build time") > 0
        assert peak("Time since last progress") > 0  # the search finished: time passes since its last step
        # the OOMKilled attempt shows as a rate: its counter was exported at 0 before the failure
        reasons = {lbl["reason"]: max(vals) for lbl, vals in zip(*got[("Generation Job failures by reason", "A")],
                                                                    strict=True)}
        assert reasons["OOMKilled"] > 0 and reasons.get("Error", 0) == 0, reasons
        p50 = {lbl["kind"]: vals for lbl, vals in zip(*got[("Job duration p50 / p95", "A")], strict=True)}
        for kind in ("database", "generation", "posttrain", "export", "evaluate"):
            assert any(math.isfinite(v) and v > 0 for v in p50.get(kind, [])), (kind, p50)

    # the alert ratio counts one unit on both sides: 1 failed of 3 finished generation-Job attempts
    ratio = prom.api("query", query=f"sum(darwinlm_generation_attempts_failed_total{{{sel}}}) / "
                                    f"sum(darwinlm_generation_attempts_total{{{sel}}})")["result"]
    assert float(ratio[0]["value"][1]) == pytest.approx(1 / 3)

    # the shipped alert rules loaded and evaluate without errors; none fires on this healthy run
    groups = prom.api("rules")["groups"]
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(rules) == ALERTS, sorted(rules)
    for r in rules.values():
        assert r["type"] == "alerting" and r["health"] == "ok" and not r.get("lastError"), r
        assert r["lastEvaluation"] and not r["lastEvaluation"].startswith("0001"), r
    assert not prom.api("alerts")["alerts"], prom.api("alerts")
