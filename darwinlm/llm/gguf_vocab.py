"""The tokenizer and chat template of an exported GGUF: carried over from a GGUF, or built from tokenizer.json.

Why it exists: a GGUF file carries its own tokenizer (``tokenizer.ggml.*``) and chat template; llama.cpp,
Ollama and LM Studio use nothing else. Pruning never changes the vocabulary, so the exact fields of the
GGUF the model came from are the right ones (SmolLM2 is provisioned from one); copying them keeps the
pre-tokenizer name and the special-token flags that llama.cpp's converter chose. Without a source GGUF,
a byte-level BPE ``tokenizer.json`` (Llama 3, Qwen2, SmolLM, GPT-2 style) is converted directly; its
pre-tokenizer is then llama.cpp's ``default`` and the result is logged as such.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

log = logging.getLogger(__name__)

__all__ = ["TokenizerFields", "from_gguf", "from_tokenizer_json"]

_T = gguf.GGUFValueType
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4  # llama.cpp token types


@dataclass(frozen=True)
class TokenizerFields:
    """GGUF key/value fields of a tokenizer: ``(key, value, type, element type of an array)``."""

    fields: tuple[tuple[str, Any, gguf.GGUFValueType, gguf.GGUFValueType | None], ...]
    source: str
    """Where they came from (a GGUF path or a tokenizer.json path), for the export marker."""
    meta: dict = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        for key, value, _, _ in self.fields:
            if key == gguf.Keys.Tokenizer.LIST:
                return len(value)
        return 0

    def add_to(self, writer: gguf.GGUFWriter) -> None:
        for key, value, vtype, sub in self.fields:
            writer.add_key_value(key, value, vtype, sub_type=sub)


def from_gguf(path: Path) -> TokenizerFields:
    """Every ``tokenizer.*`` field of the GGUF at ``path``, with its stored type."""
    reader = gguf.GGUFReader(path)
    out = []
    for key, f in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        main = f.types[0]
        out.append((key, f.contents(), main, f.types[-1] if main == _T.ARRAY else None))
    if not any(k == gguf.Keys.Tokenizer.LIST for k, *_ in out):
        raise ValueError(f"{path} holds no tokenizer (no {gguf.Keys.Tokenizer.LIST})")
    return TokenizerFields(tuple(out), str(path))


def _token_id(vocab: dict[str, int], cfg: dict, name: str) -> int | None:
    tok = cfg.get(name)
    if isinstance(tok, dict):
        tok = tok.get("content")
    return vocab.get(tok) if isinstance(tok, str) else None


def from_tokenizer_json(model_dir: Path) -> TokenizerFields:
    """Byte-level BPE fields from ``model_dir``'s tokenizer.json, tokenizer_config.json and chat template."""
    tj = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = tj.get("model") or {}
    pre = json.dumps(tj.get("pre_tokenizer") or {})
    if model.get("type") != "BPE" or "ByteLevel" not in pre:
        raise ValueError(f"{model_dir}/tokenizer.json is a {model.get('type')} tokenizer without byte-level "
                         "pre-tokenization; only byte-level BPE converts to GGUF (or give a GGUF to copy from)")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in tj.get("added_tokens", [])}
    for content, t in added.items():
        vocab[content] = t["id"]
    n = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [_USER_DEFINED] * n  # ids without a token: padding entries
    for tok, i in vocab.items():
        tokens[i] = tok
        types[i] = (_CONTROL if added[tok].get("special") else _USER_DEFINED) if tok in added else _NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    cfg_path = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}
    K = gguf.Keys.Tokenizer
    out: list[tuple[str, Any, gguf.GGUFValueType, gguf.GGUFValueType | None]] = [
        (K.MODEL, "gpt2", _T.STRING, None),
        (K.PRE, "default", _T.STRING, None),
        (K.LIST, tokens, _T.ARRAY, _T.STRING),
        (K.TOKEN_TYPE, types, _T.ARRAY, _T.INT32),
        (K.MERGES, merges, _T.ARRAY, _T.STRING),
    ]
    for key, name in ((K.BOS_ID, "bos_token"), (K.EOS_ID, "eos_token"), (K.UNK_ID, "unk_token"),
                      (K.PAD_ID, "pad_token")):
        i = _token_id(vocab, cfg, name)
        if i is not None:
            out.append((key, i, _T.UINT32, None))
    out.append((K.ADD_BOS, bool(cfg.get("add_bos_token", False)), _T.BOOL, None))
    template = model_dir / "chat_template.jinja"
    chat = template.read_text(encoding="utf-8") if template.exists() else cfg.get("chat_template")
    if isinstance(chat, str) and chat:
        out.append((K.CHAT_TEMPLATE, chat, _T.STRING, None))
    log.warning("tokenizer from %s/tokenizer.json with llama.cpp's 'default' pre-tokenizer: tokenization in "
                "llama.cpp may differ from transformers for some text; set export.gguf_tokenizer to the model's "
                "own GGUF to copy its exact tokenizer", model_dir)
    return TokenizerFields(tuple(out), str(model_dir / "tokenizer.json"))
