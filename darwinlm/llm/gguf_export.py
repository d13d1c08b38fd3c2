"""Write a (shrunk) Llama-family model as a GGUF file that llama.cpp runs: the ``deci`` architecture.

Why it exists: the search's result is a model whose layers each have their own head count, KV head
count and MLP width. Most runtimes cannot hold that, but llama.cpp's ``deci`` architecture (NVIDIA's
Nemotron-NAS family) reads those three as per-layer arrays and runs layers without attention or without
an MLP; so a darwinlm result runs in llama.cpp, Ollama and LM Studio. This module maps the model onto
what that architecture can express, exactly (the GGUF computes what the HF model computes, up to the
tensor type's rounding):

* **Uniform GQA groups.** llama.cpp attends query head ``h`` with KV head ``h // (n_head / n_head_kv)``;
  a darwinlm layer has an explicit, possibly uneven ``kv_map``. :func:`uniform_groups` reorders the query
  heads (o_proj's columns move with them, so the sum over heads is unchanged) into groups of one size
  ``g``; a KV head serving ``c`` query heads gets ``ceil(c / g)`` copies, and a group left short is filled
  with zero query heads (zero q rows, zero o_proj columns: they add exactly 0). ``g`` minimises the
  layer's attention weights; an even layer keeps its own groups and costs nothing. What the copies cost
  is returned by :func:`write_gguf` (``duplication``) and stated in the export marker.
* **Explicit head sizes.** ``attention.key_length``/``value_length`` and ``rope.dimension_count`` are
  written. llama.cpp reads them only when layer 0 has heads, so a layer 0 without heads gets one zero
  head (it adds exactly 0).
* **A layer with heads but no MLP** gets a one-channel zero MLP: llama.cpp's ``deci`` graph skips the
  whole residual update of a layer whose ``feed_forward_length`` is 0, attention included, which is
  right only when the layer has no attention either.
* **RoPE layout.** Hugging Face rotates the two halves of a head; llama.cpp's Llama-style ``deci``
  rotates adjacent pairs. q/k rows (and biases) are permuted per head, as llama.cpp's own converter does
  for Llama.

What cannot be expressed is refused before anything is written (:func:`gguf_problems`): an MLP
activation other than SiLU (``deci`` hard-codes it), RoPE scaling, partial rotary embeddings.
The tokenizer and chat template come from a GGUF (the one the model was provisioned from, or any other)
or from the model's byte-level BPE ``tokenizer.json`` (:mod:`darwinlm.llm.gguf_vocab`).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from darwinlm.llm.adapter import adapter_for
from darwinlm.llm.gguf_vocab import TokenizerFields

log = logging.getLogger(__name__)

__all__ = ["GGUF_TYPES", "UniformGroups", "uniform_groups", "gguf_problems", "write_gguf"]

ARCH = "deci"
_Q = gguf.GGMLQuantizationType
GGUF_TYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (_Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (_Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (_Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (_Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
"""``export.gguf_type`` -> (type of the 2-D tensors, the file type llama.cpp reports)."""


@dataclass(frozen=True)
class UniformGroups:
    """One layer's attention rearranged into uniform GQA groups (what llama.cpp can run)."""

    order: tuple[int, ...]
    """For every GGUF query head, the layer's query head it holds; -1 = a zero head (pads a group)."""
    kv_source: tuple[int, ...]
    """For every GGUF KV head, the layer's KV head it copies; -1 = a zero KV head (of a zero group)."""

    @property
    def group(self) -> int:
        """Query heads per KV head (0 for a layer without attention)."""
        return len(self.order) // len(self.kv_source) if self.kv_source else 0

    @property
    def duplicated_kv(self) -> int:
        """KV heads written beyond the layer's own."""
        return len(self.kv_source) - len({k for k in self.kv_source if k >= 0})

    @property
    def padding_heads(self) -> int:
        """Zero query heads written to fill groups."""
        return sum(1 for h in self.order if h < 0)


def uniform_groups(kv_map: Sequence[int], *, min_heads: int = 0) -> UniformGroups:
    """Uniform groups for a layer whose query head ``h`` uses KV head ``kv_map[h]``.

    Tries every group size ``g`` and keeps the one with the fewest attention weights, counted in head
    units: 2 per query head (q rows, o_proj columns, padding included) and 2 per KV head (k, v rows);
    ties go to the larger ``g`` (a smaller KV cache). ``min_heads``: a layer without heads still gets
    that many zero heads (one zero KV head for them).
    """
    if not kv_map:
        return UniformGroups((-1,) * min_heads, (-1,) if min_heads else ())
    heads_of: dict[int, list[int]] = {}
    for h, k in enumerate(kv_map):
        heads_of.setdefault(k, []).append(h)
    counts = Counter(kv_map)

    def cost(g: int) -> int:
        n_groups = sum(math.ceil(c / g) for c in counts.values())
        return 2 * n_groups * g + 2 * n_groups

    g = min(range(1, max(counts.values()) + 1), key=lambda size: (cost(size), -size))
    order: list[int] = []
    kv_source: list[int] = []
    for k in sorted(heads_of):
        heads = heads_of[k]
        for start in range(0, len(heads), g):
            chunk = heads[start:start + g]
            order += chunk + [-1] * (g - len(chunk))
            kv_source.append(k)
    return UniformGroups(tuple(order), tuple(kv_source))


def gguf_problems(config) -> list[str]:
    """Why ``deci`` cannot express a model with this config (empty: it can)."""
    out = []
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        out.append(f"llama.cpp's deci architecture computes the MLP with SiLU; this model's hidden_act is {act!r}")
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in (None, "default"):
        out.append(f"RoPE scaling {rope_type!r} is not exported (only unscaled RoPE)")
    if getattr(config, "partial_rotary_factor", 1.0) not in (None, 1.0):
        out.append("partial rotary embeddings cannot be expressed (deci rotates the whole head)")
    if getattr(config, "use_sliding_window", False):
        out.append("sliding-window attention cannot be expressed")
    return out


def _rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's half-split RoPE rows -> llama.cpp's interleaved pairs, per head (rows = heads * head_dim)."""
    if n_head == 0:
        return w
    shape = w.shape
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().to(torch.float32).cpu().numpy()


def _pick(rows: np.ndarray, index: Sequence[int], head_dim: int) -> np.ndarray:
    """Rows of the heads in ``index`` (-1: zero rows); ``rows`` is ``[heads * head_dim, ...]``."""
    heads = rows.reshape(-1, head_dim, *rows.shape[1:])  # [heads, head_dim, ...]
    out = np.zeros((len(index), head_dim, *rows.shape[1:]), dtype=np.float32)
    for j, h in enumerate(index):
        if h >= 0:
            out[j] = heads[h]
    return out.reshape(len(index) * head_dim, *rows.shape[1:])


class _Tensors:
    """Collects the GGUF tensors, converting 2-D ones to the file's type."""

    def __init__(self, qtype: gguf.GGMLQuantizationType):
        self.qtype = qtype
        self.items: list[tuple[str, np.ndarray, gguf.GGMLQuantizationType]] = []

    def add(self, name: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, dtype=np.float32)
        qtype = self.qtype if array.ndim == 2 else _Q.F32  # norms and biases stay f32, as llama.cpp's converter
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if array.ndim == 2 and array.shape[1] % block:
            qtype = _Q.F16  # rows that do not fill whole blocks of 32
        self.items.append((name, array, qtype))

    def write(self, writer: gguf.GGUFWriter) -> None:
        for name, array, qtype in self.items:
            data = gguf.quants.quantize(array, qtype)
            # f32/f16 arrays carry their type; quantised ones are bytes whose shape the writer converts
            writer.add_tensor(name, data, raw_dtype=None if qtype in (_Q.F32, _Q.F16) else qtype)


def _name(tensor: gguf.MODEL_TENSOR, layer: int | None = None, suffix: str = "weight") -> str:
    base = gguf.TENSOR_NAMES[tensor]
    return (base.format(bid=layer) if layer is not None else base) + f".{suffix}"


def _attention(t: _Tensors, block: nn.Module, i: int, kv_map: list[int], head_dim: int, hidden: int,
               groups: UniformGroups) -> None:
    attn = block.self_attn
    n_head, n_kv = len(groups.order), len(groups.kv_source)
    t.add(_name(gguf.MODEL_TENSOR.ATTN_NORM, i), _np(block.input_layernorm.weight))
    q = _pick(_np(attn.q_proj.weight), groups.order, head_dim)  # [n_head*hd, hidden]
    k = _pick(_np(attn.k_proj.weight), groups.kv_source, head_dim)  # [n_kv*hd, hidden]
    v = _pick(_np(attn.v_proj.weight), groups.kv_source, head_dim)  # [n_kv*hd, hidden]
    o = _pick(_np(attn.o_proj.weight).T, groups.order, head_dim).T  # [hidden, n_head*hd]
    t.add(_name(gguf.MODEL_TENSOR.ATTN_Q, i), _rope_permute(q, n_head))
    t.add(_name(gguf.MODEL_TENSOR.ATTN_K, i), _rope_permute(k, n_kv))
    t.add(_name(gguf.MODEL_TENSOR.ATTN_V, i), v)
    t.add(_name(gguf.MODEL_TENSOR.ATTN_OUT, i), o)
    if attn.q_proj.bias is not None:
        t.add(_name(gguf.MODEL_TENSOR.ATTN_Q, i, "bias"),
              _rope_permute(_pick(_np(attn.q_proj.bias), groups.order, head_dim), n_head))
        t.add(_name(gguf.MODEL_TENSOR.ATTN_K, i, "bias"),
              _rope_permute(_pick(_np(attn.k_proj.bias), groups.kv_source, head_dim), n_kv))
        t.add(_name(gguf.MODEL_TENSOR.ATTN_V, i, "bias"), _pick(_np(attn.v_proj.bias), groups.kv_source, head_dim))
    if attn.o_proj.bias is not None:
        t.add(_name(gguf.MODEL_TENSOR.ATTN_OUT, i, "bias"), _np(attn.o_proj.bias))


def _mlp(t: _Tensors, block: nn.Module, i: int, width: int, hidden: int) -> None:
    """The layer's MLP at ``width`` channels (more than it has: zero channels, adding exactly 0)."""
    mlp = block.mlp
    own = mlp.down_proj.in_features
    gate = np.zeros((width, hidden), np.float32)
    up = np.zeros((width, hidden), np.float32)
    down = np.zeros((hidden, width), np.float32)
    gate[:own], up[:own], down[:, :own] = _np(mlp.gate_proj.weight), _np(mlp.up_proj.weight), _np(mlp.down_proj.weight)
    t.add(_name(gguf.MODEL_TENSOR.FFN_NORM, i), _np(block.post_attention_layernorm.weight))
    t.add(_name(gguf.MODEL_TENSOR.FFN_GATE, i), gate)
    t.add(_name(gguf.MODEL_TENSOR.FFN_UP, i), up)
    t.add(_name(gguf.MODEL_TENSOR.FFN_DOWN, i), down)
    if mlp.down_proj.bias is not None:
        for tensor, lin in ((gguf.MODEL_TENSOR.FFN_GATE, mlp.gate_proj), (gguf.MODEL_TENSOR.FFN_UP, mlp.up_proj)):
            b = np.zeros(width, np.float32)
            b[:own] = _np(lin.bias)
            t.add(_name(tensor, i, "bias"), b)
        t.add(_name(gguf.MODEL_TENSOR.FFN_DOWN, i, "bias"), _np(mlp.down_proj.bias))


def _layout(model: nn.Module) -> tuple[list[UniformGroups], list[int]]:
    """Per layer: the uniform groups and the MLP width written (see the module docstring)."""
    ad = adapter_for(model)
    groups, widths = [], []
    for i, block in enumerate(ad.blocks(model)):
        has_o_bias = block.self_attn.o_proj.bias is not None
        # a zero head keeps layer 0's head size readable, and carries an o_proj bias llama.cpp would drop
        min_heads = 1 if i == 0 or has_o_bias else 0
        g = uniform_groups(ad.kv_map(model, i), min_heads=min_heads)
        ff = ad.intermediate_size(model, i)
        if ff == 0 and (g.order or block.mlp.down_proj.bias is not None):
            ff = 1  # llama.cpp skips a layer's whole residual update when its MLP width is 0
        groups.append(g)
        widths.append(ff)
    return groups, widths


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def write_gguf(model: nn.Module, path: Path, *, gguf_type: str, tokenizer: TokenizerFields, name: str,
               metadata: dict[str, str] | None = None) -> dict:
    """Write ``model`` (Llama / Mistral / Qwen2 / darwinlm_llama) to ``path``; return what was written.

    Raises ``ValueError`` naming the reason when the model cannot be expressed (:func:`gguf_problems`)
    or the tokenizer does not fit its vocabulary; nothing is written then.
    """
    config = model.config
    problems = gguf_problems(config)
    if problems:
        raise ValueError("; ".join(problems))
    ad = adapter_for(model)
    embed = model.get_input_embeddings().weight
    if tokenizer.vocab_size != embed.shape[0]:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model's embedding "
                         f"{embed.shape[0]} rows")
    qtype, ftype = GGUF_TYPES[gguf_type]
    head_dim, hidden = ad.head_dim, ad.hidden_size
    groups, widths = _layout(model)

    t = _Tensors(qtype)
    t.add(_name(gguf.MODEL_TENSOR.TOKEN_EMBD), _np(embed))
    for i, block in enumerate(ad.blocks(model)):
        kv_map = ad.kv_map(model, i)
        if groups[i].order:
            _attention(t, block, i, kv_map, head_dim, hidden, groups[i])
        if widths[i]:
            _mlp(t, block, i, widths[i], hidden)
    t.add(_name(gguf.MODEL_TENSOR.OUTPUT_NORM), _np(model.model.norm.weight))
    head = model.get_output_embeddings().weight
    tied = head.data_ptr() == embed.data_ptr() or bool(getattr(config, "tie_word_embeddings", False))
    if not tied:
        t.add(_name(gguf.MODEL_TENSOR.OUTPUT), _np(head))

    writer = gguf.GGUFWriter(path, ARCH)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_block_count(ad.num_layers)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(widths)
    writer.add_head_count([len(g.order) for g in groups])
    writer.add_head_count_kv([len(g.kv_source) for g in groups])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(embed.shape[0]))
    for key, value in (metadata or {}).items():
        writer.add_string(key, value)
    tokenizer.add_to(writer)
    t.write(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    own_kv = sum(ad.num_kv_heads(model, i) for i in range(ad.num_layers))
    written_kv = sum(len(g.kv_source) for g in groups)
    kv_params = 2 * head_dim * hidden  # k and v rows of one KV head
    q_params = 2 * head_dim * hidden  # q rows and o_proj columns of one query head
    dup = {
        "kv_heads": own_kv, "kv_heads_written": written_kv,
        "padding_heads": sum(g.padding_heads for g in groups),
        "layers_duplicated": sum(1 for g in groups if g.duplicated_kv or g.padding_heads),
        "extra_params": (written_kv - own_kv) * kv_params + sum(g.padding_heads for g in groups) * q_params
                        + sum(w - ad.intermediate_size(model, i) for i, w in enumerate(widths)) * 3 * hidden,
        "kv_cache_per_token": 2 * written_kv * head_dim,
        "kv_cache_per_token_own": 2 * own_kv * head_dim,
    }
    log.info("wrote %s (%s, %.1f MB): %d KV heads for the model's %d, %d zero heads, %d extra parameters",
             path, gguf_type, path.stat().st_size / 1e6, written_kv, own_kv, dup["padding_heads"], dup["extra_params"])
    return {"gguf_type": gguf_type, "bytes": path.stat().st_size, "architecture": ARCH,
            "head_count": [len(g.order) for g in groups], "head_count_kv": [len(g.kv_source) for g in groups],
            "feed_forward_length": widths, "duplication": dup}
