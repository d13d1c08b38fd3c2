#!/usr/bin/env python3
"""Regenerate the files derived from the chart and its sources, or check that they are fresh.

    .venv/bin/python scripts/render_manifests.py           # write them
    .venv/bin/python scripts/render_manifests.py --check   # exit 1 and name the stale ones

Why it exists: Helm can read only files inside the chart, and `kubectl apply` users want plain YAML,
so three things are copies or renderings that must never drift from their source:

* ``charts/darwinlm/crds/pruningsearches.darwinlm.io.yaml``: a copy of ``manifests/crd.yaml``
  (generated from the spec dataclasses by ``python -m darwinlm_operator.crd --out manifests/crd.yaml``);
* ``charts/darwinlm/files/prometheus-rules.yml``: a copy of ``deploy/prometheus/rules.yml``
  (the chart's PrometheusRule embeds it);
* ``manifests/install.yaml``: the chart rendered in-process with helm-python-sdk (Helm's own Go
  code, no helm binary) with default values, release ``darwinlm`` in namespace ``darwinlm-system``,
  CRD included, preceded by that Namespace, objects in Helm's install order.

``tests/packaging/test_manifests.py`` runs :func:`stale` and fails when anything is out of date.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "darwinlm"
CRD_SOURCE = ROOT / "manifests" / "crd.yaml"
CRD_COPY = CHART / "crds" / "pruningsearches.darwinlm.io.yaml"
RULES_SOURCE = ROOT / "deploy" / "prometheus" / "rules.yml"
RULES_COPY = CHART / "files" / "prometheus-rules.yml"
INSTALL = ROOT / "manifests" / "install.yaml"

RELEASE, NAMESPACE = "darwinlm", "darwinlm-system"
COPY_HEADER = "# Copy of {src}, made by scripts/render_manifests.py. Do not edit: edit the source and rerun.\n"
INSTALL_HEADER = (
    "# darwinlm operator: the Helm chart charts/darwinlm rendered with its default values (release\n"
    f"# {RELEASE!r}, namespace {NAMESPACE!r}) by scripts/render_manifests.py. Do not edit: rerun the script.\n"
    "#   kubectl apply -f manifests/install.yaml\n"
    "# Options (single-namespace mode, ServiceMonitor, alerts, dashboard) need `helm install` instead.\n"
)

# Helm's install order (pkg/release/util/kind_sorter.go), the kinds this chart can render.
INSTALL_ORDER = ["Namespace", "NetworkPolicy", "ResourceQuota", "LimitRange", "PodDisruptionBudget",
                 "ServiceAccount", "Secret", "ConfigMap", "CustomResourceDefinition", "ClusterRole",
                 "ClusterRoleBinding", "Role", "RoleBinding", "Service", "Deployment"]


def _copy(src: pathlib.Path) -> str:
    return COPY_HEADER.format(src=src.relative_to(ROOT)) + src.read_text(encoding="utf-8")


def split_documents(text: str) -> list[dict]:
    """The non-empty YAML documents of ``text``."""
    return [d for d in yaml.safe_load_all(text) if d]


def render_chart(values: dict | None = None, *, release: str = RELEASE, namespace: str = NAMESPACE,
                 chart_dir: pathlib.Path = CHART) -> dict[str, str]:
    """``{template path: manifest}`` of the chart (templates only; CRDs come from :func:`chart_crds`)."""
    import helm_python as helm  # helm-python-sdk: imported late so --help works without it

    chart = helm.Chart.load(str(chart_dir))
    return chart.render(values or {}, name=release, namespace=namespace, is_install=True)


def chart_crds(chart_dir: pathlib.Path = CHART) -> list[dict]:
    """The CRD objects under the chart's crds/ folder, as Helm loads them."""
    import helm_python as helm

    chart = helm.Chart.load(str(chart_dir))
    return [d for c in chart.crds for d in split_documents(c["data"])]


def sort_objects(objects: list[dict]) -> list[dict]:
    """Helm's install order by kind, then by name (stable, so the output is deterministic)."""
    def key(o: dict) -> tuple:
        kind = o.get("kind", "")
        rank = INSTALL_ORDER.index(kind) if kind in INSTALL_ORDER else len(INSTALL_ORDER)
        return rank, kind, o["metadata"].get("namespace", ""), o["metadata"]["name"]
    return sorted(objects, key=key)


def render_install() -> str:
    """The text of manifests/install.yaml (needs the chart's crds/ copy to be current)."""
    objects = [{"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": NAMESPACE, "labels": {"app.kubernetes.io/part-of": "darwinlm"}}}]
    objects += chart_crds()
    for path, text in sorted(render_chart().items()):
        if path.endswith(".yaml") or path.endswith(".yml"):
            objects += split_documents(text)
    docs = [yaml.safe_dump(o, sort_keys=False, width=120) for o in sort_objects(objects)]
    return INSTALL_HEADER + "---\n" + "---\n".join(docs)


def expected() -> dict[pathlib.Path, str]:
    """Every derived file and the content it must have, in the order they are made."""
    if not CRD_SOURCE.exists():
        raise FileNotFoundError(f"{CRD_SOURCE.relative_to(ROOT)} is missing: generate it first with "
                                "`python -m darwinlm_operator.crd --out manifests/crd.yaml`")
    return {CRD_COPY: _copy(CRD_SOURCE), RULES_COPY: _copy(RULES_SOURCE)}


def stale() -> list[str]:
    """Paths (relative to the repository) whose content differs from what this script makes."""
    out = [str(p.relative_to(ROOT)) for p, text in expected().items()
           if not p.exists() or p.read_text(encoding="utf-8") != text]
    if out:  # install.yaml is rendered from the copies: it is stale too until they are fixed
        return out + [str(INSTALL.relative_to(ROOT))]
    if not INSTALL.exists() or INSTALL.read_text(encoding="utf-8") != render_install():
        out.append(str(INSTALL.relative_to(ROOT)))
    return out


def write() -> list[str]:
    """Write every derived file; returns the paths that changed."""
    changed = []
    for path, text in expected().items():
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            changed.append(str(path.relative_to(ROOT)))
    install = render_install()  # after the copies: the chart must see the new CRD
    if not INSTALL.exists() or INSTALL.read_text(encoding="utf-8") != install:
        INSTALL.write_text(install, encoding="utf-8")
        changed.append(str(INSTALL.relative_to(ROOT)))
    return changed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 when a file is stale")
    args = p.parse_args(argv)
    try:
        if args.check:
            bad = stale()
            for path in bad:
                print(f"stale: {path} (run: python scripts/render_manifests.py)", file=sys.stderr)
            return 1 if bad else 0
        for path in write():
            print(f"wrote {path}")
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
