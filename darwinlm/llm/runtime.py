"""Loading the model and choosing device / precision, in one place.

Why this module exists: every task (database shard, generation, post-train, export, evaluate) loads the
same dense model the same way, and must do so safely (no ``trust_remote_code``; safetensors only) and
deterministically. Master weights stay in ``model.dtype`` (fp32 by default); forward/backward run under
autocast in ``model.compute_dtype``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from darwinlm.errors import SpecError

from . import modeling

log = logging.getLogger(__name__)

__all__ = ["resolve_device", "load_model", "autocast", "model_fingerprint", "torch_dtype"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SpecError([("model.device", "cuda requested but no CUDA device is available")])
    return torch.device(name)


def load_model(model_spec, *, with_tokenizer: bool = True):
    """Load (model, tokenizer) from a local HF directory or a hub id; never runs remote code."""
    modeling.register()
    if model_spec.threads is not None:
        torch.set_num_threads(model_spec.threads)
    path = os.path.expanduser(model_spec.path)
    kwargs = dict(revision=model_spec.revision, trust_remote_code=False)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype(model_spec.dtype), use_safetensors=True, **kwargs
        )
        tok = AutoTokenizer.from_pretrained(path, **kwargs) if with_tokenizer else None
    except (OSError, ValueError) as e:
        raise SpecError([("model.path", f"cannot load model from {model_spec.path!r}: {e}")]) from e
    model.to(resolve_device(model_spec.device))
    model.eval()
    model.requires_grad_(False)
    return model, tok


def autocast(device: torch.device, compute_dtype: str):
    """Autocast context for ``compute_dtype`` (a no-op for float32)."""
    if compute_dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch_dtype(compute_dtype))


def model_fingerprint(model) -> str:
    """A cheap, machine-independent fingerprint of the weights and config (for database keys)."""
    h = hashlib.sha256()
    cfg = model.config.to_dict()
    for k in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "_commit_hash"):
        cfg.pop(k, None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        steps = min(64, flat.numel())
        idx = torch.arange(steps, dtype=torch.int64) * (flat.numel() - 1) // max(steps - 1, 1)
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(flat[idx].to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()
