"""The model side: everything that needs torch and transformers.

The ``darwinlm_llama`` model type (``modeling.py``) and the Llama-family adapter (``adapter.py``); physical
shrinking and masking (``shrink.py``); structured OBS (``obs.py``) and the layer database built with it
(``database.py``); the per-layer sensitivity table (``sensitivity.py``); fitness (``fitness.py``) and
training (``train.py``); token pools (``data.py``); loading models and devices (``runtime.py``); the
process group of a distributed generation (``distributed.py``).

These modules import torch, transformers and safetensors at the top (``datasets`` only where a spec's corpus
is json, parquet or a hub id: ``data.py`` reads plain text itself): the torch line of the
library is this folder's floor (``core/``, ``spec/`` and ``store/`` below it never import torch). Only
``distributed.py`` defers torch.distributed to the functions that join a process group, so the runner can
parse the environment of a task that is already complete without loading torch. They import the search
core (``darwinlm.core``) and the store layout, never ``darwinlm.run``.
"""
