"""The Grafana dashboard: structure Grafana relies on, and every PromQL expr through promtool's parser.

No Grafana runs here (TEST_INFRA.md §3b), so the checks are: the JSON a Grafana 10/11 import needs
(uid, unique panel ids and refIds, datasource by variable uid, template variables), panels for what
operators ask (phases, progress, fitness, throughput, failures, durations, GPU-hours, database), and each
expr turned into a recording rule for `promtool check rules` (TEST_INFRA.md §3c).
"""

from __future__ import annotations

import json
import re

import pytest
import yaml

from tests.packaging import DASHBOARD, METRICS, run_promtool

BUILTIN_VARS = {"__rate_interval", "__interval", "__range", "__interval_ms", "__range_s"}
# search-scoped metrics: their panels must follow the namespace/search variables
SCOPED = {"darwinlm_search_generation", "darwinlm_search_generations_total_planned",
          "darwinlm_search_best_fitness", "darwinlm_offspring_evaluated_total",
          "darwinlm_generation_attempts_total", "darwinlm_generation_attempts_failed_total",
          "darwinlm_gpu_seconds_total",
          "darwinlm_database_build_seconds", "darwinlm_search_seconds_since_progress",
          "darwinlm_search_progress_ratio", "darwinlm_search_eta_seconds"}


@pytest.fixture(scope="module")
def dash() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def _targets(dash):
    return [(p, t) for p in dash["panels"] for t in p.get("targets", [])]


def test_identity(dash):
    assert dash["uid"] == "darwinlm-overview" and dash["title"] == "DarwinLM"
    assert isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 36
    assert "id" not in dash or dash["id"] is None, "an exported id would clash on import"


def test_panel_ids_unique_and_positions_disjoint(dash):
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    cells = {}
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]


def test_refids_unique_per_panel_and_targets_complete(dash):
    for p in dash["panels"]:
        refs = [t["refId"] for t in p["targets"]]
        assert refs and all(refs), f"{p['title']}: empty refId"
        assert len(refs) == len(set(refs)), f"{p['title']}: duplicate refIds {refs}"
        for t in p["targets"]:
            assert t["expr"].strip(), p["title"]


def test_datasource_is_the_uid_variable(dash):
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for p, t in _targets(dash):
        for ds in (p["datasource"], t["datasource"]):
            assert ds == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
    for name in ("namespace", "search"):
        assert variables[name]["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_template_variables(dash):
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert {"datasource", "namespace", "search"} <= set(variables)
    for name in ("namespace", "search"):
        v = variables[name]
        assert v["type"] == "query" and v["includeAll"] and v["multi"]
        assert v["allValue"] == ".*", "All must match searches created after the page loaded"
    assert "$namespace" in variables["search"]["query"]["query"], "search must depend on namespace"
    defined = set(variables) | BUILTIN_VARS
    for p, t in _targets(dash):
        for var in re.findall(r"\$\{?(\w+)", t["expr"]):
            assert var in defined, f"{p['title']}: undefined variable ${var}"


def test_required_panels(dash):
    titles = {p["title"] for p in dash["panels"]}
    for wanted in ("Searches by phase", "Generation progress", "ETA", "Best fitness over time",
                   "Offspring throughput", "Generation Job failures by reason", "Job duration p50 / p95",
                   "GPU-hours per search", "Database build time"):
        assert wanted in titles
    durations = next(p for p in dash["panels"] if p["title"] == "Job duration p50 / p95")
    quantiles = {re.search(r"histogram_quantile\((0\.\d+)", t["expr"]).group(1) for t in durations["targets"]}
    assert quantiles == {"0.5", "0.95"}
    failures = next(p for p in dash["panels"] if p["title"] == "Generation Job failures by reason")
    assert "by (reason)" in failures["targets"][0]["expr"]


def test_metrics_known_and_scoped_panels_filtered(dash):
    for p, t in _targets(dash):
        used = set(re.findall(r"\bdarwinlm_[a-z_]+\b", t["expr"]))
        assert used <= set(METRICS), f"{p['title']}: unknown metrics {used - set(METRICS)}"
        for m in used & SCOPED:
            for sel in re.findall(rf"{m}\{{([^}}]*)\}}", t["expr"]) or [""]:
                assert 'namespace=~"$namespace"' in sel and 'name=~"$search"' in sel, \
                    f"{p['title']}: {m} ignores the namespace/search variables"


def _as_promql(expr: str) -> str:
    """Grafana variables -> PromQL promtool can parse: intervals first (`$__rate_interval` is also `$\\w+`)."""
    expr = re.sub(r"\$\{?__(rate_interval|interval|range)\}?", "5m", expr)
    return re.sub(r"\$\{?(\w+)\}?", ".*", expr)


def test_every_expr_parses_with_promtool(dash, tmp_path):
    exprs = [t["expr"] for _, t in _targets(dash)]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr{i}", "expr": _as_promql(e)} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-exprs.yml"
    path.write_text(yaml.safe_dump(rules))
    r = run_promtool("check", "rules", str(path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in r.stdout


def test_promtool_catches_a_broken_expr(tmp_path):
    """The check above is not vacuous: a syntax error in an expr fails it."""
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "d", "rules": [
        {"record": "d:bad", "expr": _as_promql('sum by (phase (darwinlm_searches{namespace=~"$namespace"})')}]}]}))
    assert run_promtool("check", "rules", str(path)).returncode != 0
