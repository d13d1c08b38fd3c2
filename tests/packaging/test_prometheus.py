"""Alerting rules: promtool parses and unit-tests them; they use only metrics the operator exports."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml

from tests.packaging import (
    DASHBOARD,
    METRICS,
    PROM_CONFIG,
    RULES,
    RULES_TEST,
    operator_module,
    promtool,
    run_promtool,
)

ALERTS = {"DarwinLMSearchStalled", "DarwinLMOffspringFailureRateHigh", "DarwinLMOperatorDown",
          "DarwinLMReconcileErrors"}


def _rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def test_promtool_check_rules():
    r = run_promtool("check", "rules", str(RULES))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in r.stdout


def test_promtool_test_rules():
    """rules_test.yml: each alert fires on its bad series, at the right time, and not on healthy ones."""
    r = run_promtool("test", "rules", RULES_TEST.name, cwd=RULES_TEST.parent)
    assert r.returncode == 0, r.stdout + r.stderr


def test_rule_tests_cover_every_alert():
    tested = {t["alertname"] for case in yaml.safe_load(RULES_TEST.read_text())["tests"]
              for t in case.get("alert_rule_test", [])}
    assert tested == {r["alert"] for r in _rules()}


def test_promtool_check_ci_config():
    """deploy/ci/prometheus.yml (CI scrapes the operator with it) is valid and loads the same rules."""
    r = run_promtool("check", "config", str(PROM_CONFIG))
    assert r.returncode == 0, r.stdout + r.stderr
    cfg = yaml.safe_load(PROM_CONFIG.read_text())
    assert (PROM_CONFIG.parent / cfg["rule_files"][0]).resolve() == RULES.resolve()
    assert cfg["scrape_configs"][0]["job_name"] == "darwinlm-operator"


def test_alerts_are_documented_and_graded():
    rules = _rules()
    assert {r["alert"] for r in rules} == ALERTS
    for r in rules:
        assert r["labels"]["severity"] in ("warning", "critical"), r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]
        assert "for" in r, f"{r['alert']}: no `for:` (a single bad scrape would page)"


def test_operator_down_covers_missing_target():
    expr = next(r["expr"] for r in _rules() if r["alert"] == "DarwinLMOperatorDown")
    assert 'up{job=~".*darwinlm.*"} == 0' in expr and 'absent(up{job=~".*darwinlm.*"})' in expr


def test_failure_rate_compares_the_same_unit():
    """DarwinLMOffspringFailureRateHigh: failed generation-Job attempts over all finished generation-Job
    attempts (not failed attempts over evaluated offspring: one attempt evaluates a whole generation)."""
    expr = next(r["expr"] for r in _rules() if r["alert"] == "DarwinLMOffspringFailureRateHigh")
    ratio = re.search(r"\((.*?)\)\s*>\s*0\.25", " ".join(expr.split()))
    assert ratio, expr
    num, den = ratio.group(1).split(" / ")
    assert "darwinlm_generation_attempts_failed_total[" in num and "darwinlm_generation_attempts_total[" in den
    assert "offspring_evaluated" not in expr


def _used_metrics(exprs) -> set[str]:
    return {m for e in exprs for m in re.findall(r"\bdarwinlm_[a-z_]+\b", e)}


def test_rules_use_only_known_metrics():
    used = _used_metrics(r["expr"] for r in _rules())
    unknown = used - set(METRICS)
    assert not unknown, f"rules use metrics outside the agreed list: {sorted(unknown)}"


_SUFFIXES = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "summary": ["_sum", "_count", ""],
             "gauge": [""], "info": ["_info"], "stateset": [""], "gaugehistogram": ["_bucket"], "unknown": [""]}


def _registry(metrics_module):
    """The operator's registry: a fresh ``Metrics()`` when the module has that class, else the default one."""
    if hasattr(metrics_module, "Metrics"):
        return metrics_module.Metrics().registry
    from prometheus_client import REGISTRY
    return REGISTRY


def _exported_samples(registry) -> set[str]:
    """Sample names a registry exposes (a counter family `x` -> `x_total`, a histogram -> `x_bucket`...)."""
    return {family.name + s for family in registry.collect() for s in _SUFFIXES.get(family.type, [""])}


def test_metrics_module_exports_what_rules_and_dashboard_use():
    """Every darwinlm_* name the alerts and the dashboard query is one operator/darwinlm_operator/metrics.py exports."""
    metrics = operator_module("metrics")
    if metrics is None:
        pytest.skip("darwinlm_operator.metrics does not exist yet: checked against METRICS only")
    exported = _exported_samples(_registry(metrics))
    dashboard = json.loads(DASHBOARD.read_text())
    used = _used_metrics([r["expr"] for r in _rules()]
                         + [t["expr"] for p in dashboard["panels"] for t in p["targets"]])
    missing = used - exported
    assert not missing, f"rules/dashboard use metrics that metrics.py does not define: {sorted(missing)}"
    assert {m for m in exported if m.startswith("darwinlm_")} >= set(METRICS)


def test_promtool_check_metrics_on_operator_exposition():
    """promtool's metric lint (counter without _total, bad units, ...) on what the operator serves."""
    metrics = operator_module("metrics")
    if metrics is None:
        pytest.skip("darwinlm_operator.metrics does not exist yet")
    from prometheus_client import generate_latest

    text = generate_latest(_registry(metrics)).decode()
    r = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
