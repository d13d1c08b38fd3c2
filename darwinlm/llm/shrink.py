"""Physical shrinking: build a smaller model that keeps only some heads and channels of each layer.

Why it exists: the search keeps ONE resident base model and turns every candidate configuration into a
model of its own (to fine-tune and score it); the export writes the winner. :func:`shrink_model` does
that without touching the base model: it builds a :class:`~darwinlm.llm.modeling.DarwinLlamaForCausalLM`
on the meta device (no allocation, no random init) and assigns freshly gathered tensors to it, so the
cost is one copy of the kept weights.

What is removed (see ALGORITHM.md §2.1, §2.7 and the GQA decision in :mod:`darwinlm.llm.modeling`):
q_proj rows and o_proj columns of removed query heads; k_proj/v_proj rows of KV heads none of whose
query heads remain (the layer's ``kv_map`` is rebuilt); gate_proj/up_proj rows and down_proj columns of
removed MLP channels; the matching bias entries (Qwen2's q/k/v bias). o_proj and down_proj biases stay.
A plan may also replace the kept o_proj/down_proj columns (the compensated weights of the layer
database), which is how a stitched configuration is built.

:func:`mask_model` is the dense-shaped reference (pruned columns zeroed in place of removal) and the
model used by a "mask" fine-tuning mode; :func:`expand_to_dense` maps a shrunk model's o_proj/down_proj
back to dense shapes, using the provenance buffers the shrunk layers carry.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedConfig

from darwinlm.llm.adapter import LlamaFamilyAdapter, adapter_for
from darwinlm.llm.modeling import DarwinLlamaForCausalLM


@dataclass(frozen=True, eq=False)
class LayerShrink:
    """What one decoder layer keeps. Indices refer to the given model's current heads/channels.

    ``eq=False``: the optional tensors make field-wise equality ambiguous; compare by identity.
    """

    heads: tuple[int, ...] | None = None
    """Kept query-head indices, strictly increasing; ``None`` keeps all, ``()`` removes attention."""
    o_proj: torch.Tensor | None = None
    """Replacement for the kept o_proj columns, ``[hidden, len(heads) * head_dim]``; ``None`` keeps them."""
    channels: tuple[int, ...] | None = None
    """Kept MLP channel indices, strictly increasing; ``None`` keeps all, ``()`` removes the MLP."""
    down_proj: torch.Tensor | None = None
    """Replacement for the kept down_proj columns, ``[hidden, len(channels)]``; ``None`` keeps them."""


Plan = Mapping[int, LayerShrink]


@dataclass(frozen=True)
class _Selection:
    """One layer's plan resolved against the model: what to gather and the new layer's metadata."""

    heads: list[int]  # kept query heads (current indices)
    kv_kept: list[int]  # kept KV heads (current indices)
    kv_map: list[int]  # new map: query head -> position in kv_kept
    channels: list[int]  # kept MLP channels (current indices)
    source_heads: list[int]  # kept heads as indices of the original dense model
    source_channels: list[int]  # kept channels as indices of the original dense model
    full_heads: bool  # every current head kept (copy instead of gather)
    full_kv: bool
    full_channels: bool


def _check_indices(name: str, idx: Sequence[int] | None, n: int) -> list[int]:
    if idx is None:
        return list(range(n))
    idx = [int(v) for v in idx]
    if any(b <= a for a, b in zip(idx, idx[1:])) or (idx and (idx[0] < 0 or idx[-1] >= n)):
        raise ValueError(f"{name} must be strictly increasing indices in [0, {n}), got {idx}")
    return idx


def _check_replacement(name: str, w: torch.Tensor | None, shape: tuple[int, int]) -> None:
    if w is not None and tuple(w.shape) != shape:
        raise ValueError(f"{name} replacement must have shape {list(shape)}, got {list(w.shape)}")


def _resolve(ad: LlamaFamilyAdapter, model: nn.Module, i: int, ls: LayerShrink) -> _Selection:
    n_heads, n_ch = ad.num_heads(model, i), ad.intermediate_size(model, i)
    heads = _check_indices(f"plan[{i}].heads", ls.heads, n_heads)
    channels = _check_indices(f"plan[{i}].channels", ls.channels, n_ch)
    _check_replacement(f"plan[{i}].o_proj", ls.o_proj, (ad.hidden_size, len(heads) * ad.head_dim))
    _check_replacement(f"plan[{i}].down_proj", ls.down_proj, (ad.hidden_size, len(channels)))
    old_map = ad.kv_map(model, i)
    kv_kept = sorted({old_map[h] for h in heads})
    position = {kv: p for p, kv in enumerate(kv_kept)}
    src_heads, src_channels = ad.source_heads(model, i), ad.source_channels(model, i)
    return _Selection(
        heads=heads,
        kv_kept=kv_kept,
        kv_map=[position[old_map[h]] for h in heads],
        channels=channels,
        source_heads=[src_heads[h] for h in heads],
        source_channels=[src_channels[c] for c in channels],
        full_heads=len(heads) == n_heads,
        full_kv=len(kv_kept) == ad.num_kv_heads(model, i),
        full_channels=len(channels) == n_ch,
    )


def resolve_plan(ad: LlamaFamilyAdapter, model: nn.Module, plan: Plan) -> list[_Selection]:
    """The kept heads, KV heads and channels of every layer of ``model`` under ``plan`` (validated)."""
    bad = [k for k in plan if not (isinstance(k, int) and 0 <= k < ad.num_layers)]
    if bad:
        raise ValueError(f"plan keys must be layer indices in [0, {ad.num_layers}), got {bad}")
    return [_resolve(ad, model, i, plan.get(i, LayerShrink())) for i in range(ad.num_layers)]


def head_rows(heads: list[int], head_dim: int, device: torch.device) -> torch.Tensor:
    """Row (or column) indices of whole heads: ``[len(heads) * head_dim]``."""
    h = torch.tensor(heads, dtype=torch.long, device=device)
    return (h[:, None] * head_dim + torch.arange(head_dim, device=device)).reshape(-1)


def _take(w: torch.Tensor | None, dim: int, idx: torch.Tensor | None, dtype: torch.dtype | None):
    """A new tensor holding ``w`` (or its slices ``idx`` along ``dim``), cast to ``dtype``."""
    if w is None:
        return None
    if idx is None:
        return w.detach().to(dtype=dtype or w.dtype, copy=True)
    return w.detach().index_select(dim, idx.to(w.device)).to(dtype=dtype or w.dtype)


def _replacement(w: torch.Tensor, like: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return w.detach().to(device=like.device, dtype=dtype or like.dtype, copy=True)


def _layer_state(ad, model, i: int, s: _Selection, ls: LayerShrink, dtype) -> dict[str, torch.Tensor | None]:
    """State-dict entries (relative to block ``i``) of the shrunk block."""
    attn, mlp = ad.attention(model, i), ad.mlp(model, i)
    dev = attn.o_proj.weight.device
    q_idx = None if s.full_heads else head_rows(s.heads, ad.head_dim, dev)
    kv_idx = None if s.full_kv else head_rows(s.kv_kept, ad.head_dim, dev)
    ch_idx = None if s.full_channels else torch.tensor(s.channels, dtype=torch.long, device=dev)
    o_w = attn.o_proj.weight
    d_w = mlp.down_proj.weight
    state = {
        "self_attn.q_proj.weight": _take(attn.q_proj.weight, 0, q_idx, dtype),  # [heads*hd, hidden]
        "self_attn.q_proj.bias": _take(attn.q_proj.bias, 0, q_idx, dtype),
        "self_attn.k_proj.weight": _take(attn.k_proj.weight, 0, kv_idx, dtype),  # [kv*hd, hidden]
        "self_attn.k_proj.bias": _take(attn.k_proj.bias, 0, kv_idx, dtype),
        "self_attn.v_proj.weight": _take(attn.v_proj.weight, 0, kv_idx, dtype),
        "self_attn.v_proj.bias": _take(attn.v_proj.bias, 0, kv_idx, dtype),
        "self_attn.o_proj.weight": (  # [hidden, heads*hd]
            _replacement(ls.o_proj, o_w, dtype) if ls.o_proj is not None else _take(o_w, 1, q_idx, dtype)
        ),
        "self_attn.o_proj.bias": _take(attn.o_proj.bias, 0, None, dtype),
        "self_attn.source_heads": torch.tensor(s.source_heads, dtype=torch.long, device=dev),
        "mlp.gate_proj.weight": _take(mlp.gate_proj.weight, 0, ch_idx, dtype),  # [channels, hidden]
        "mlp.gate_proj.bias": _take(mlp.gate_proj.bias, 0, ch_idx, dtype),
        "mlp.up_proj.weight": _take(mlp.up_proj.weight, 0, ch_idx, dtype),
        "mlp.up_proj.bias": _take(mlp.up_proj.bias, 0, ch_idx, dtype),
        "mlp.down_proj.weight": (  # [hidden, channels]
            _replacement(ls.down_proj, d_w, dtype) if ls.down_proj is not None else _take(d_w, 1, ch_idx, dtype)
        ),
        "mlp.down_proj.bias": _take(mlp.down_proj.bias, 0, None, dtype),
        "mlp.source_channels": torch.tensor(s.source_channels, dtype=torch.long, device=dev),
    }
    return {k: v for k, v in state.items() if v is not None}


def _shrunk_state(ad, model, new_keys, sel, plan, dtype) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for i, s in enumerate(sel):
        prefix = f"model.layers.{i}."
        for key, value in _layer_state(ad, model, i, s, plan.get(i, LayerShrink()), dtype).items():
            state[prefix + key] = value
    source = model.state_dict()
    for key in new_keys:
        if key not in state:
            state[key] = _take(source[key], 0, None, dtype if source[key].is_floating_point() else None)
    if model.config.tie_word_embeddings:
        # One Parameter under both names: load_state_dict(assign=True) then ties them again.
        shared = nn.Parameter(state["model.embed_tokens.weight"])
        state["model.embed_tokens.weight"] = state["lm_head.weight"] = shared
    return state


def _device_of(model: nn.Module, name: str, default: torch.device) -> torch.device:
    """Device of module ``name`` of ``model`` (its first parameter or buffer), else ``default``."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return default
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    return tensor.device if tensor is not None else default


def _materialize_non_persistent_buffers(new: DarwinLlamaForCausalLM, source: nn.Module, default) -> None:
    """Give the meta-device non-persistent buffers (RoPE, KV index) real values via ``_init_weights``.

    Each lands on the device of the same-named module of the source (models spread over devices).
    Runs before the state is assigned, so ``_init_weights`` cannot overwrite loaded buffers.
    """
    owners = {name.rpartition(".")[0] for name, buf in new.named_non_persistent_buffers() if buf.is_meta}
    for owner in sorted(owners):
        module = new.get_submodule(owner)
        device = _device_of(source, owner, default)
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and buf.is_meta:
                setattr(module, name, torch.empty_like(buf, device=device))
        new._init_weights(module)


def shrink_model(model: nn.Module, plan: Plan, *, dtype: torch.dtype | None = None) -> DarwinLlamaForCausalLM:
    """A new, physically smaller model keeping what ``plan`` says; ``model`` is left untouched.

    ``model`` is a dense Llama/Mistral/Qwen2 or an already shrunk ``DarwinLlamaForCausalLM`` (indices
    then refer to its current heads/channels). Layers missing from ``plan`` are kept whole. Every
    tensor of the result is fresh storage on the source tensor's device, cast to ``dtype`` if given.
    The result has the source's attention implementation, training mode and generation config.
    """
    ad = adapter_for(model)
    sel = resolve_plan(ad, model, plan)
    config = ad.shrunk_config(
        model,
        layer_num_heads=[len(s.heads) for s in sel],
        layer_num_kv_heads=[len(s.kv_kept) for s in sel],
        layer_kv_map=[s.kv_map for s in sel],
        layer_intermediate_size=[len(s.channels) for s in sel],
    )
    embed = model.get_input_embeddings().weight
    config.dtype = dtype or embed.dtype
    with torch.device("meta"):
        new = DarwinLlamaForCausalLM(config)
    if new.config._attn_implementation != model.config._attn_implementation:
        new.set_attn_implementation(model.config._attn_implementation)
    _materialize_non_persistent_buffers(new, model, embed.device)
    state = _shrunk_state(ad, model, new.state_dict().keys(), sel, plan, dtype)
    with torch.no_grad():
        new.load_state_dict(state, strict=True, assign=True)
    new.train(model.training)
    new.generation_config = copy.deepcopy(model.generation_config)
    return new


def mask_model(model: nn.Module, plan: Plan) -> nn.Module:
    """A dense-shaped copy of ``model`` (same class) with the plan's pruned columns set to zero.

    o_proj columns of removed heads and down_proj columns of removed channels become exact zeros;
    replacement weights are written into the kept columns. q/k/v and gate/up stay (they are dead).
    """
    ad = adapter_for(model)
    sel = resolve_plan(ad, model, plan)
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for i, s in enumerate(sel):
            ls = plan.get(i, LayerShrink())
            mask_columns(ad.o_proj(masked, i).weight, head_rows(s.heads, ad.head_dim, "cpu"), ls.o_proj)
            mask_columns(ad.down_proj(masked, i).weight, torch.tensor(s.channels, dtype=torch.long), ls.down_proj)
    return masked


def mask_columns(w: torch.Tensor, keep: torch.Tensor, replacement: torch.Tensor | None) -> None:
    """Zero every column of ``w`` ([out, in]) not in ``keep``; write ``replacement`` into ``keep``."""
    keep = keep.to(w.device)
    kept = replacement.to(device=w.device, dtype=w.dtype) if replacement is not None else w[:, keep]
    w.zero_()
    w[:, keep] = kept


def expand_to_dense(shrunk: nn.Module, source_config: PreTrainedConfig | None = None) -> dict[str, torch.Tensor]:
    """Dense-shaped o_proj/down_proj weights of a shrunk model, zeros in the removed columns.

    Keys are module names (``adapter.attn_name(i)``, ``adapter.mlp_name(i)``), as in the layer database.
    Columns go back to their positions in the original dense model, read from the layers' provenance
    buffers; ``source_config`` (default: ``shrunk.config``, whose global sizes are the dense ones)
    gives the dense head count and MLP width.
    """
    ad = adapter_for(shrunk)
    cfg = source_config if source_config is not None else shrunk.config
    dense_heads, dense_channels = cfg.num_attention_heads, cfg.intermediate_size
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for i in range(ad.num_layers):
            o = ad.o_proj(shrunk, i).weight  # [hidden, heads*hd]
            dense_o = o.new_zeros(ad.hidden_size, dense_heads * ad.head_dim)
            dense_o[:, head_rows(ad.source_heads(shrunk, i), ad.head_dim, o.device)] = o
            out[ad.attn_name(i)] = dense_o
            d = ad.down_proj(shrunk, i).weight  # [hidden, channels]
            dense_d = d.new_zeros(ad.hidden_size, dense_channels)
            dense_d[:, torch.tensor(ad.source_channels(shrunk, i), dtype=torch.long, device=d.device)] = d
            out[ad.mlp_name(i)] = dense_d
    return out
