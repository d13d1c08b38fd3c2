"""A Llama-family model whose layers each have their own head count, KV map and MLP width.

Why it exists: DarwinLM removes attention heads and MLP channels non-uniformly, so a physically
shrunk model has a different shape in every decoder layer. No built-in transformers config takes
per-layer sizes, and ``from_pretrained`` of a shrunk checkpoint with a stock Llama class fails on size
mismatches (``ignore_mismatched_sizes=True`` would silently re-initialise the weights). This module
defines the ``darwinlm_llama`` model type; :func:`register` adds it to the Auto classes, after which
``AutoModelForCausalLM.from_pretrained(export_dir)`` builds the per-layer shapes from config.json and
loads the safetensors, with no ``trust_remote_code``.

GQA decision. Query heads are pruned one by one. A KV head is kept while at least one of its query
heads remains, and is physically dropped once all of them are pruned (saving parameters and KV cache).
Groups therefore become uneven, so each layer stores an explicit ``kv_map``: for every remaining query
head, the index (into the layer's remaining KV heads) of the KV head it attends with. The attention
updates the KV cache with the kept KV heads only, then gathers K/V per query head through the map and
runs any standard attention kernel (eager, sdpa, flash, flex) with ``num_key_value_groups = 1``. When
a layer's map is still the uniform ``h // groups`` map, no gather happens and the kernel's native GQA
path is used. The result equals the zero-masked dense model exactly.

Empty layers. A layer with 0 heads has zero-sized q/k/v/o weights; its attention returns
``o_proj(empty)``, i.e. zeros (or the o_proj bias when ``attention_bias``), exactly what the masked
model computes. It writes a one-scalar-per-token zero marker (``[batch, 1, seq, 1]``) into the KV cache,
because transformers reads the cached sequence length from layer 0 and treats an empty tensor as "no
tokens". A layer with 0 MLP channels returns zeros (or the down_proj bias) through the ordinary
forward, since zero-sized linears compute exactly that.

Provenance. Every layer keeps persistent integer buffers ``self_attn.source_heads`` and
``mlp.source_channels``: the indices, in the original dense model, of the heads and channels it still
holds. They compose through repeated shrinking and let :func:`darwinlm.llm.shrink.expand_to_dense` put the
weights back into dense positions.

Not supported: sliding-window attention (the adapter rejects such sources). Caches are sized from
the real per-layer K/V tensors (dynamic and static caches initialise lazily), never from the global
``num_key_value_heads``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable


# darwinlm/__init__.py calls register() from a post-import hook on transformers. When this module is
# what imports transformers, that hook runs while this module is half-initialised, so register() is
# defined before the transformers imports and does nothing until the classes below exist; the call at
# the bottom of the module then registers.
def register() -> None:
    """Register ``darwinlm_llama`` with AutoConfig and AutoModelForCausalLM. Safe to call repeatedly."""
    if "DarwinLlamaForCausalLM" not in globals():
        return  # this module is still importing transformers; its last line registers
    AutoConfig.register(MODEL_TYPE, DarwinLlamaConfig, exist_ok=True)
    AutoModelForCausalLM.register(DarwinLlamaConfig, DarwinLlamaForCausalLM, exist_ok=True)


import torch  # noqa: E402
from huggingface_hub.dataclasses import strict  # noqa: E402
from torch import nn  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PreTrainedConfig  # noqa: E402
from transformers import initialization as init  # noqa: E402
from transformers.activations import ACT2FN  # noqa: E402
from transformers.cache_utils import Cache  # noqa: E402
from transformers.modeling_layers import GradientCheckpointingLayer  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402
from transformers.models.llama.modeling_llama import (  # noqa: E402
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.utils.deprecation import deprecate_kwarg  # noqa: E402

MODEL_TYPE = "darwinlm_llama"


def _linear(in_features: int, out_features: int, bias: bool) -> nn.Linear:
    """``nn.Linear`` that may be zero-sized (a fully pruned layer) without torch's init warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
        return nn.Linear(in_features, out_features, bias=bias)


def uniform_kv_map(num_heads: int, num_kv_heads: int) -> list[int]:
    """The dense GQA map: query head ``h`` uses KV head ``h // (num_heads // num_kv_heads)``."""
    if num_heads == 0:
        return []
    groups = num_heads // num_kv_heads
    return [h // groups for h in range(num_heads)]


@strict
class DarwinLlamaConfig(LlamaConfig):
    r"""Llama config with per-layer attention and MLP sizes.

    The global ``num_attention_heads``, ``num_key_value_heads`` and ``intermediate_size`` keep the
    values of the dense source model; the ``layer_*`` lists are authoritative for the shapes. Every
    list left as ``None`` is filled with the dense value, so a config without them is a plain Llama.
    q/k/v carry a bias when ``attention_bias or qkv_bias``; o_proj when ``attention_bias``; the MLP
    when ``mlp_bias``.
    """

    model_type = MODEL_TYPE

    layer_num_heads: list[int] | None = None
    """Query heads kept in each layer (length ``num_hidden_layers``); 0 disables attention."""
    layer_num_kv_heads: list[int] | None = None
    """KV heads kept in each layer; 0 exactly when the layer has 0 query heads."""
    layer_kv_map: list[list[int]] | None = None
    """Per layer, for each query head, the index of its KV head among the layer's kept KV heads."""
    layer_intermediate_size: list[int] | None = None
    """MLP channels kept in each layer; 0 disables the MLP."""
    qkv_bias: bool = False
    """Bias on q/k/v only (Qwen2). ``attention_bias`` puts a bias on q/k/v and o, as in Llama."""

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        n = self.num_hidden_layers
        if self.layer_num_heads is None:
            self.layer_num_heads = [self.num_attention_heads] * n
        if self.layer_num_kv_heads is None:
            self.layer_num_kv_heads = [self.num_key_value_heads] * n
        if self.layer_kv_map is None and len(self.layer_num_heads) == len(self.layer_num_kv_heads):
            self.layer_kv_map = [
                uniform_kv_map(h, kv) for h, kv in zip(self.layer_num_heads, self.layer_num_kv_heads)
            ]
        if self.layer_intermediate_size is None:
            self.layer_intermediate_size = [self.intermediate_size] * n
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Reject per-layer lists of the wrong length and KV maps that do not fit their layer.

        Replaces Llama's ``hidden_size % num_attention_heads`` check: ``head_dim`` is explicit here.
        """
        PreTrainedConfig.validate_architecture(self)
        n = self.num_hidden_layers
        lists = {
            "layer_num_heads": self.layer_num_heads,
            "layer_num_kv_heads": self.layer_num_kv_heads,
            "layer_kv_map": self.layer_kv_map,
            "layer_intermediate_size": self.layer_intermediate_size,
        }
        for name, values in lists.items():
            if values is None or len(values) != n:
                raise ValueError(f"{name} must have num_hidden_layers={n} entries, got {values!r}")
        for i, (h, kv, kv_map) in enumerate(zip(self.layer_num_heads, self.layer_num_kv_heads, self.layer_kv_map)):
            if len(kv_map) != h:
                raise ValueError(f"layer_kv_map[{i}] has {len(kv_map)} entries for {h} query heads")
            if sorted(set(kv_map)) != list(range(kv)):
                raise ValueError(f"layer_kv_map[{i}]={kv_map} must use each of the {kv} KV heads (0..{kv - 1})")


class DarwinLlamaAttention(nn.Module):
    """Llama attention with a per-layer head count and an explicit query-head → KV-head map."""

    def __init__(self, config: DarwinLlamaConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.layer_num_heads[layer_idx]
        self.num_key_value_heads = config.layer_num_kv_heads[layer_idx]
        self.kv_map = tuple(config.layer_kv_map[layer_idx])
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True

        # A uniform map is plain GQA: let the kernel repeat K/V. Otherwise gather K/V per query head.
        uniform = self.num_heads > 0 and self.num_heads % self.num_key_value_heads == 0
        uniform = uniform and list(self.kv_map) == uniform_kv_map(self.num_heads, self.num_key_value_heads)
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads if uniform else 1
        kv_index = None if uniform or self.num_heads == 0 else torch.tensor(self.kv_map, dtype=torch.long)
        self.register_buffer("kv_index", kv_index, persistent=False)  # [num_heads] or None
        self.register_buffer("source_heads", torch.arange(self.num_heads), persistent=True)  # [num_heads]

        qkv_bias = config.attention_bias or config.qkv_bias
        q_out, kv_out = self.num_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        self.q_proj = _linear(config.hidden_size, q_out, bias=qkv_bias)
        self.k_proj = _linear(config.hidden_size, kv_out, bias=qkv_bias)
        self.v_proj = _linear(config.hidden_size, kv_out, bias=qkv_bias)
        self.o_proj = _linear(q_out, config.hidden_size, bias=config.attention_bias)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,  # [batch, seq, hidden]
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        if self.num_heads == 0:
            return self._forward_empty(hidden_states, cache, **kwargs)
        hidden_shape = (*input_shape, -1, self.head_dim)

        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [b, heads, seq, hd]
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [b, kv, seq, hd]
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [b, kv, seq, hd]

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

        if cache is not None:
            # The cache holds only the kept KV heads; the gather below happens after the update.
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)

        if self.kv_index is not None:
            key_states = key_states.index_select(1, self.kv_index)  # [b, heads, kv_len, hd]
            value_states = value_states.index_select(1, self.kv_index)  # [b, heads, kv_len, hd]

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )

        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )

        attn_output = attn_output.reshape(*input_shape, -1).contiguous()  # [b, seq, heads*hd]
        attn_output = self.o_proj(attn_output)  # [b, seq, hidden]
        return attn_output, attn_weights

    def _forward_empty(self, hidden_states: torch.Tensor, cache: Cache | None, **kwargs):
        """Attention of a layer without heads: zeros (plus the o_proj bias, if any), no weights."""
        batch, seq = hidden_states.shape[:2]
        kv_len = seq
        if cache is not None:
            # One zero per token keeps the cache's sequence length right (it is read from layer 0 and
            # an empty tensor counts as "no tokens"); it costs a scalar per token.
            marker = hidden_states.new_zeros(batch, 1, seq, 1)  # [b, 1, seq, 1]
            kv_len = cache.update(marker, marker, self.layer_idx, kwargs=kwargs)[0].shape[-2]
        attn_weights = hidden_states.new_zeros(batch, 0, seq, kv_len)  # [b, 0, seq, kv_len]
        attn_output = self.o_proj(hidden_states.new_zeros(batch, seq, 0))  # [b, seq, hidden]
        return attn_output, attn_weights


class DarwinLlamaMLP(nn.Module):
    """SwiGLU MLP with a per-layer width. Width 0 yields zeros (or the down_proj bias) naturally."""

    def __init__(self, config: DarwinLlamaConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.layer_intermediate_size[layer_idx]
        self.register_buffer("source_channels", torch.arange(self.intermediate_size), persistent=True)
        self.gate_proj = _linear(self.hidden_size, self.intermediate_size, bias=config.mlp_bias)
        self.up_proj = _linear(self.hidden_size, self.intermediate_size, bias=config.mlp_bias)
        self.down_proj = _linear(self.intermediate_size, self.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [b, seq, hidden] -> [b, seq, hidden]
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DarwinLlamaDecoderLayer(LlamaDecoderLayer):
    """A Llama decoder layer built with per-layer attention and MLP sizes.

    It reuses ``LlamaDecoderLayer.forward`` unchanged and skips ``LlamaDecoderLayer.__init__``, which
    would allocate dense modules only to replace them.
    """

    def __init__(self, config: DarwinLlamaConfig, layer_idx: int):
        GradientCheckpointingLayer.__init__(self)
        self.hidden_size = config.hidden_size
        self.self_attn = DarwinLlamaAttention(config=config, layer_idx=layer_idx)
        self.mlp = DarwinLlamaMLP(config, layer_idx)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class DarwinLlamaPreTrainedModel(LlamaPreTrainedModel):
    """Shared settings: config class, init of the non-learned buffers, output recording."""

    config: DarwinLlamaConfig
    config_class = DarwinLlamaConfig
    _no_split_modules = ["DarwinLlamaDecoderLayer"]
    _can_record_outputs = {
        "hidden_states": DarwinLlamaDecoderLayer,
        "attentions": DarwinLlamaAttention,
    }

    def _init_weights(self, module: nn.Module) -> None:
        # Also runs for buffers left on the meta device by from_pretrained or shrink_model.
        super()._init_weights(module)
        if isinstance(module, DarwinLlamaAttention):
            if module.kv_index is not None:
                init.copy_(module.kv_index, torch.tensor(module.kv_map, dtype=torch.long))
            init.copy_(module.source_heads, torch.arange(module.num_heads))
        elif isinstance(module, DarwinLlamaMLP):
            init.copy_(module.source_channels, torch.arange(module.intermediate_size))


class DarwinLlamaModel(DarwinLlamaPreTrainedModel, LlamaModel):
    """The decoder stack. Reuses ``LlamaModel.forward``; builds per-layer decoder layers."""

    def __init__(self, config: DarwinLlamaConfig):
        # Skip LlamaModel.__init__: it would allocate dense decoder layers.
        DarwinLlamaPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [DarwinLlamaDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class DarwinLlamaForCausalLM(DarwinLlamaPreTrainedModel, LlamaForCausalLM):
    """Causal LM head over :class:`DarwinLlamaModel`. Reuses ``LlamaForCausalLM.forward``."""

    def __init__(self, config: DarwinLlamaConfig):
        # Skip LlamaForCausalLM.__init__: it would build a dense LlamaModel.
        DarwinLlamaPreTrainedModel.__init__(self, config)
        self.model = DarwinLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _get_static_cache_init_shape(self):
        """``None``: let a static cache initialise lazily from the real per-layer K/V shapes.

        The base method would pre-allocate every layer with the global (dense) KV head count.
        """
        return None


# Importing this module registers the model type (darwinlm/__init__.py does so when transformers is
# imported); the early-defined register() above waits until the classes exist.
register()
