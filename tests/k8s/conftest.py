"""Kubernetes-level fixtures (emulator, k8s clients, kubectl, namespace, s3, s3_process, pod_runner, run_operator),
plus the operator end-to-end fixtures: ``pod_assets``, ``cluster``, ``embedded_tiny``.

Importing tests.support.cluster sets KUBECONFIG before anything imports ``kubernetes``.
"""
import pytest

from tests.support.cluster import *


@pytest.fixture
def pod_assets(tiny_assets, pod_runner):
    """The tiny model and text, visible to the job pods at the same path (like a read-only hostPath mount).

    Without the mapping the pod runner would rewrite "/tmp/..." to the pod's own /tmp emptyDir, which in a
    real pod hides whatever the image or the node has there.
    """
    pod_runner.path_map[str(tiny_assets)] = str(tiny_assets)
    return tiny_assets


@pytest.fixture
def cluster(kubectl, k8s, namespace, s3, pod_runner, run_operator):
    """CRD + S3 Secret + the operator watching ``namespace``; yields (operator, metrics port)."""
    from tests.k8s._helpers import start_operator

    return start_operator(kubectl, k8s, namespace, s3, run_operator)


@pytest.fixture(scope="session")
def embedded_tiny(tiny_assets, tmp_path_factory):
    """The tiny search (3 generations) run embedded (``darwinlm.run.runner.run_search``) into a file store, once
    per session: ``(spec, result/config.json)``. The operator's runs must give the same result."""
    from darwinlm.run.runner import run_search
    from darwinlm.spec import load_spec
    from darwinlm.store import open_store
    from tests.conftest import tiny_spec_dict

    root = tmp_path_factory.mktemp("embedded")
    spec = load_spec(tiny_spec_dict(tiny_assets, f"file://{root}"))
    run_search(spec)
    return spec, open_store(f"file://{root}").child("searches/tiny").get_json("result/config.json")
