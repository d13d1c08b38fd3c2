"""Export the winner: a physically shrunk HF-format directory plus the chosen configuration.

Why this module exists: the product of a search is a model users load with stock transformers
(``import darwinlm`` registers the ``darwinlm_llama`` type; no ``trust_remote_code``), and artifacts that
describe themselves: the spec, seed and library version next to the weights, and the configuration as
JSON and as plain ``layer: level`` text (HOUSE_STYLE.md 12).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from darwinlm.core.budget import prunable_params, removed_params
from darwinlm.llm.adapter import adapter_for
from darwinlm.llm.runtime import torch_dtype
from darwinlm.spec import spec_to_dict
from darwinlm.store import layout
from darwinlm.version import __version__

log = logging.getLogger(__name__)

__all__ = ["export_model", "config_text"]


def config_text(genome) -> str:
    return "".join(f"{name}: {level}\n" for name, level in genome.to_dict().items())


def target_params(ws) -> int:
    """Non-embedding parameters the spec's target asks for: dense minus the target share of the prunable
    (query/output head and MLP channel) parameters. KV heads dropped because all their query heads are
    gone (see modeling.py) come on top, so a result can be slightly smaller."""
    dense = adapter_for(ws.model).nonembedding_param_count(ws.model)
    t = ws.spec.search.target
    if t.fraction is not None:
        return dense - round(t.fraction * prunable_params(ws.space))
    return dense - removed_params(ws.space, ws.uniform_genome())


def export_model(ws, model, genome) -> dict:
    """Write ``result/model/`` (HF dir), ``result/config.json`` and ``result/config.txt``."""
    spec = ws.spec
    model = model.to(torch_dtype(spec.export.dtype))
    params = adapter_for(model).nonembedding_param_count(model)
    dense = adapter_for(ws.model).nonembedding_param_count(ws.model)
    target = target_params(ws)
    provenance = {
        "darwinlm_version": __version__,
        "seed": spec.seed,
        "spec": spec_to_dict(spec),
        "configuration": genome.to_dict(),
        "nonembedding_params": params,
        "dense_nonembedding_params": dense,
        "target_nonembedding_params": target,
        "database": ws.db_key,
    }
    with tempfile.TemporaryDirectory(prefix="darwinlm-export-") as tmp:
        out = Path(tmp) / "model"
        model.save_pretrained(out, safe_serialization=True)
        if ws.tokenizer is not None:
            ws.tokenizer.save_pretrained(out)
        (out / "darwinlm.json").write_text(json.dumps(provenance, indent=1, sort_keys=True))
        ws.store.delete_prefix(f"{layout.MODEL_DIR}/")
        ws.store.put_dir(layout.MODEL_DIR, out)
    ws.store.put_json(layout.CONFIG_JSON, genome.to_dict())
    ws.store.put_bytes(layout.CONFIG_TXT, config_text(genome).encode())
    log.info("exported %d non-embedding parameters (%.1f%% of dense) to %s/%s", params,
             100.0 * params / dense, ws.store.uri, layout.MODEL_DIR)
    return {"nonembedding_params": params, "dense_nonembedding_params": dense, "target_nonembedding_params": target,
            "model_uri": f"{ws.store.uri}/{layout.MODEL_DIR}"}
