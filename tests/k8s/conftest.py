"""Kubernetes-level fixtures (emulator, k8s clients, kubectl, namespace, s3, s3_process, pod_runner, run_operator).

Importing tests.support.cluster sets KUBECONFIG before anything imports ``kubernetes``.
"""
from tests.support.cluster import *  # noqa: F401,F403
