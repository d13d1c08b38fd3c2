# syntax=docker/dockerfile:1
#
# Two images from one source tree: the same `darwinlm` package with different extras.
#
#   docker build --target operator -t darwinlm-operator:0.1.0 .   # kopf operator: slim, no torch
#   docker build --target job      -t darwinlm-job:0.1.0 .        # Job pods: CUDA PyTorch + darwinlm[ml,s3]
#
# Both run as the non-root user 1000:1000 (numeric, so Kubernetes' runAsNonRoot can verify it), the uid
# the chart's securityContext and the operator's rendered Job pods (render.RUN_AS) use. The root
# filesystem may be read-only: the chart and the Jobs mount writable /tmp (and /cache) volumes.
# tests/packaging/test_dockerfile.py checks the extras, entrypoints, users and pinned bases; hadolint lints it.

# Base images, pinned by version (override with --build-arg, e.g. to pin a digest: python:3.11.11-slim-bookworm@sha256:...).
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
# The job image's torch comes from this base (CUDA 12.8, cuDNN 9); the pip install below keeps it.
ARG TORCH_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime

# ------------------------------------------------------------------------------------------ source
# Only what the package build reads (see .dockerignore): pyproject.toml, README.md and the three packages.
FROM ${PYTHON_IMAGE} AS source
WORKDIR /src
COPY pyproject.toml README.md ./
COPY darwinlm/ darwinlm/
COPY jobs/ jobs/
COPY operator/ operator/

# ------------------------------------------------------------------------------------------ operator
# The operator's virtual environment is built in a throw-away stage, then copied into a clean base.
FROM ${PYTHON_IMAGE} AS operator-build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
COPY --from=source /src /src
# the [operator] extra: kopf, kubernetes, prometheus-client, boto3 (the store), pyyaml; never torch
RUN /opt/venv/bin/pip install "/src[operator]"

FROM ${PYTHON_IMAGE} AS operator
LABEL org.opencontainers.image.title="darwinlm-operator" \
      org.opencontainers.image.description="kopf operator for DarwinLM PruningSearch resources" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    DARWINLM_METRICS_PORT=9090
RUN groupadd --gid 1000 darwinlm \
    && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin darwinlm
COPY --from=operator-build /opt/venv /opt/venv
WORKDIR /tmp
USER 1000:1000
# kopf's liveness endpoint (/healthz, --liveness) and the Prometheus metrics (DARWINLM_METRICS_PORT),
# the chart's defaults (healthPort, metrics.port)
EXPOSE 8080 9090
ENTRYPOINT ["python", "-m", "darwinlm_operator"]
# defaults for `docker run`; the chart passes its own (--namespace=NS per namespace in single-namespace mode)
CMD ["--all-namespaces", "--liveness=http://0.0.0.0:8080/healthz"]

# ------------------------------------------------------------------------------------------ job
FROM ${TORCH_IMAGE} AS job
LABEL org.opencontainers.image.title="darwinlm-job" \
      org.opencontainers.image.description="DarwinLM task entrypoints (database, generation, posttrain, export, evaluate)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    HF_HUB_OFFLINE=1
COPY --from=source /src /src
# the [ml,s3] extras: transformers, datasets, safetensors, ... and boto3. The constraint keeps the base
# image's CUDA torch: without it pip could replace it with a different wheel from PyPI.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN python -c 'import torch; print(f"torch=={torch.__version__}")' > /tmp/constraints.txt \
    && pip install --constraint /tmp/constraints.txt "/src[ml,s3]" \
    && rm -rf /src /tmp/constraints.txt
# (some bases already have a uid 1000 user, e.g. `ubuntu` on Ubuntu 24.04: then it is reused)
RUN if ! getent passwd 1000 >/dev/null; then \
        groupadd --gid 1000 darwinlm \
        && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin darwinlm; \
    fi \
    && mkdir -p /workspace /cache \
    && chown 1000:1000 /workspace /cache
WORKDIR /workspace
USER 1000:1000
# `python -m darwinlm_jobs TASK` (e.g. generation-3); the operator's Jobs call the per-kind modules
# directly: python -m darwinlm_jobs.<database|generation|posttrain|export|evaluate> ...
ENTRYPOINT ["python", "-m", "darwinlm_jobs"]
