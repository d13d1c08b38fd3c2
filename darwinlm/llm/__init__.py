"""The model side: everything that needs torch and transformers.

The ``darwinlm_llama`` model type (``modeling.py``) and the Llama-family adapter (``adapter.py``); physical
shrinking and masking (``shrink.py``); structured OBS (``obs.py``) and the layer database built with it
(``database.py``); the per-layer sensitivity table (``sensitivity.py``); fitness (``fitness.py``) and
training (``train.py``); token pools (``data.py``); loading models and devices (``runtime.py``); the
process group of a distributed generation (``distributed.py``).

They import the search core (``darwinlm.core``), never ``darwinlm.run``.
"""
