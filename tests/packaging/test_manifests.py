"""manifests/: install.yaml and the chart's copies are fresh; the examples are valid PruningSearches.

The examples are what users `kubectl apply`: each is checked by the operator's own loader
(``darwinlm_operator.kspec.load_psearch``: library spec + Kubernetes fields + the CEL rules' mirror),
against the CRD's openAPIV3Schema with jsonschema, and by rendering the Job of every task kind with
``darwinlm_operator.render`` and validating it against the Kubernetes API schemas.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest
import yaml

from tests.packaging import (
    CRD,
    EXAMPLES,
    INSTALL,
    KUBE_VERSION,
    ROOT,
    kubernetes_validate,
    operator_module,
)

QUICK, PAPER = EXAMPLES / "smollm2-quick.yaml", EXAMPLES / "smollm2-paper-gpu.yaml"
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))
examples = pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.stem)


def _script():
    spec = importlib.util.spec_from_file_location("render_manifests", ROOT / "scripts" / "render_manifests.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("render_manifests", module)
    spec.loader.exec_module(module)
    return module


def _docs(path: pathlib.Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


# ------------------------------------------------------------------------------------------ freshness

def test_derived_files_are_fresh():
    """charts/darwinlm/crds/ (= manifests/crd.yaml), the chart's rules copy and install.yaml."""
    pytest.importorskip("helm_python", reason="pip install helm-python-sdk")
    if not CRD.exists():
        pytest.fail("manifests/crd.yaml is missing: python -m darwinlm_operator.crd --out manifests/crd.yaml")
    stale = _script().stale()
    assert not stale, f"stale: {stale}; run: .venv/bin/python scripts/render_manifests.py"


def test_install_yaml_contents():
    objects = _docs(INSTALL)
    kinds = [o["kind"] for o in objects]
    assert kinds[0] == "Namespace" and objects[0]["metadata"]["name"] == "darwinlm-system"
    assert kinds.count("CustomResourceDefinition") == 1 and "Deployment" in kinds
    assert kinds.index("CustomResourceDefinition") < kinds.index("Deployment")
    crd = next(o for o in objects if o["kind"] == "CustomResourceDefinition")
    assert crd == _docs(CRD)[0], "install.yaml carries manifests/crd.yaml unchanged"
    for o in objects:
        if o["kind"] not in ("Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"):
            assert o["metadata"]["namespace"] == "darwinlm-system", o["kind"]


def test_install_yaml_passes_kubernetes_validate_strict():
    kv = kubernetes_validate()
    for obj in _docs(INSTALL):
        try:
            kv.validate(obj, KUBE_VERSION, strict=True)
        except kv.ValidationError as e:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {e.message} at {list(e.path)}")


# ------------------------------------------------------------------------------------------ examples

def test_examples_exist():
    assert {p.name for p in EXAMPLE_FILES} >= {"smollm2-quick.yaml", "smollm2-paper-gpu.yaml"}


@examples
def test_example_is_a_valid_pruningsearch(path):
    kspec = operator_module("kspec")
    if kspec is None:
        pytest.skip("darwinlm_operator.kspec does not exist yet")
    (doc,) = _docs(path)
    assert doc["apiVersion"] == "darwinlm.io/v1alpha1" and doc["kind"] == "PruningSearch"
    spec, kube = kspec.load_psearch(doc)
    assert spec.name == doc["metadata"]["name"]
    assert spec.store.startswith("s3://") and kube.s3 is not None and kube.s3.secretRef is not None
    mounts = {m["mountPath"] for m in kube.podTemplate.volumeMounts}
    assert any(spec.model.path.startswith(m + "/") for m in mounts), "model.path must be on a mounted volume"


@examples
def test_example_matches_crd_schema(path):
    jsonschema = pytest.importorskip("jsonschema")
    (crd,) = _docs(CRD)
    (version,) = [v for v in crd["spec"]["versions"] if v["storage"]]
    schema = version["schema"]["openAPIV3Schema"]
    (doc,) = _docs(path)
    # OpenAPI v3.0 schemas are draft-4 style (boolean exclusiveMaximum); x-kubernetes-* and CEL are not checked here
    jsonschema.Draft4Validator(schema["properties"]["spec"]).validate(doc["spec"])
    assert doc["apiVersion"] == f"{crd['spec']['group']}/{version['name']}"
    assert doc["kind"] == crd["spec"]["names"]["kind"]


ALGORITHM = ("seed", "database", "search", "posttrain", "evaluation")


@pytest.mark.parametrize("manifest,source", [(QUICK, "smollm2-quick.yaml"), (PAPER, "smollm2-paper.yaml")],
                         ids=["quick", "paper"])
def test_example_runs_the_same_algorithm_as_the_cli_example(manifest, source):
    (doc,) = _docs(manifest)
    cli = yaml.safe_load((ROOT / "examples" / source).read_text())
    spec = doc["spec"]
    for key in ALGORITHM:
        assert spec.get(key) == cli.get(key), key
    for key in ("dtype", "compute_dtype"):
        assert spec["model"][key] == cli["model"][key]
    strip = lambda data: {k: v for k, v in data.items() if k not in ("train", "heldout")}  # noqa: E731
    assert strip(spec["data"]) == strip(cli["data"])
    for part in ("train", "heldout"):
        assert spec["data"][part]["format"] == cli["data"][part]["format"]
        assert spec["data"][part]["path"].endswith(cli["data"][part]["path"].split("darwinlm/", 1)[1])
    assert spec["model"]["path"].endswith(cli["model"]["path"].split("darwinlm/", 1)[1])


def test_paper_example_requests_gpus_and_kueue():
    (doc,) = _docs(PAPER)
    spec = doc["spec"]
    assert spec["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert spec["workers"] == 4
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["podTemplate"]["tolerations"]
    assert spec["queueName"]
    assert spec["model"]["device"] == "cuda"


@examples
def test_example_jobs_render_and_validate(path):
    """The Job of every task kind, as the operator would create it for this example, passes strict validation."""
    kspec, render = operator_module("kspec"), operator_module("render")
    if kspec is None or render is None:
        pytest.skip("darwinlm_operator.kspec/render do not exist yet")
    kv = kubernetes_validate()
    from darwinlm.core.plan import KINDS, Task

    (doc,) = _docs(path)
    cr = {**doc, "metadata": {**doc["metadata"], "namespace": "ml", "uid": "0f0e0d0c-0000-4000-8000-000000000000"}}
    spec, kube = kspec.load_psearch(doc)
    tasks = {"database": Task("database", 0, 2), "sensitivity": Task("sensitivity", 1, 2),
             "generation": Task("generation", 3),
             "posttrain": Task("posttrain", variant="searched"), "export": Task("export"),
             "evaluate": Task("evaluate")}
    assert set(tasks) == set(KINDS)
    for kind, task in tasks.items():
        job = render.render_job(cr, kube, spec, task, 0)
        try:
            kv.validate(job, KUBE_VERSION, strict=True)
        except kv.ValidationError as e:
            pytest.fail(f"{kind} Job: {e.message} at {list(e.path)}")
        (container,) = job["spec"]["template"]["spec"]["containers"]
        assert container["image"] == doc["spec"]["image"]
        module = container["command"][container["command"].index("-m") + 1]
        assert module == f"darwinlm_jobs.{kind}"
