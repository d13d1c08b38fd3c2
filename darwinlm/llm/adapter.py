"""The model-family adapter: the one place that knows where a Llama-family model keeps its weights.

Why it exists: the database, the search and the shrinking code all need the same facts (which
linears are pruned, how many heads and channels a layer has, which KV head serves which query head,
how many parameters a configuration will have). Llama, Mistral, Qwen2 and the shrunk
``darwinlm_llama`` type share one module layout (``model.layers[i].self_attn.{q,k,v,o}_proj``,
``model.layers[i].mlp.{gate,up,down}_proj``) and differ only in their biases and head-count sources,
so one adapter class covers them; :func:`adapter_for` picks it by ``config.model_type``.

Parameter counts. ``nonembedding_param_count`` counts every parameter except the input embedding and
the LM head, whether or not the two are tied, so tied and untied checkpoints of the same body count the
same and pruning (which never touches them) changes the count by exactly the pruned weights.
``layer_param_count`` gives one decoder layer's share in closed form, including its two RMSNorms;
the model total is the layer sum plus the final norm (``nonembedding_param_count_for``).

Sliding-window attention (Mistral-7B-v0.1, Qwen2 with ``use_sliding_window``) is rejected: the shrunk
model runs Llama's full causal attention, so it would not equal the source on sequences longer than
the window. A window at least as long as ``max_position_embeddings`` is full attention and accepted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from torch import nn

from darwinlm.errors import DarwinLMError
from darwinlm.llm.modeling import MODEL_TYPE, DarwinLlamaAttention, DarwinLlamaConfig, uniform_kv_map

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", MODEL_TYPE)

LayerKind = Literal["attn", "mlp"]

# Only DarwinLlamaConfig fields are carried over from the source config (so Qwen2's ``layer_types`` or
# Mistral's ``sliding_window`` cannot leak into the shrunk model), minus these, which describe the source.
_DROPPED_CONFIG_KEYS = {"transformers_version", "architectures", "model_type"}


@dataclass(frozen=True)
class LlamaFamilyAdapter:
    """Architecture facts of one Llama-family model, read once from its config."""

    model_type: str
    """``config.model_type`` of the model the adapter was made for."""
    num_layers: int
    """Number of decoder blocks."""
    hidden_size: int
    """Width of the residual stream."""
    head_dim: int
    """Width of one attention head (o_proj columns per head)."""
    qkv_bias: bool
    """Whether q/k/v projections carry a bias (Qwen2, or Llama with ``attention_bias``)."""
    o_bias: bool
    """Whether o_proj carries a bias (Llama with ``attention_bias`` only)."""
    mlp_bias: bool
    """Whether gate/up/down projections carry a bias (Llama with ``mlp_bias``)."""

    # --- names -------------------------------------------------------------------------------
    def attn_name(self, i: int) -> str:
        """Module name of block ``i``'s pruned attention linear (its input columns are heads)."""
        return f"model.layers.{i}.self_attn.o_proj"

    def mlp_name(self, i: int) -> str:
        """Module name of block ``i``'s pruned MLP linear (its input columns are channels)."""
        return f"model.layers.{i}.mlp.down_proj"

    def prunable_layers(self) -> list[tuple[str, LayerKind, int]]:
        """``(module name, kind, block index)`` sorted by (block, name): MLP before attention."""
        layers: list[tuple[str, LayerKind, int]] = []
        for i in range(self.num_layers):
            layers.append((self.mlp_name(i), "mlp", i))
            layers.append((self.attn_name(i), "attn", i))
        return layers

    # --- modules -----------------------------------------------------------------------------
    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The decoder blocks, in order."""
        return list(model.model.layers)

    def attention(self, model: nn.Module, i: int) -> nn.Module:
        return model.model.layers[i].self_attn

    def mlp(self, model: nn.Module, i: int) -> nn.Module:
        return model.model.layers[i].mlp

    def o_proj(self, model: nn.Module, i: int) -> nn.Linear:
        return self.attention(model, i).o_proj

    def down_proj(self, model: nn.Module, i: int) -> nn.Linear:
        return self.mlp(model, i).down_proj

    # --- per-layer sizes (read from the weights, so they hold for dense and shrunk models) ---
    def num_heads(self, model: nn.Module, i: int) -> int:
        return self.o_proj(model, i).in_features // self.head_dim

    def num_kv_heads(self, model: nn.Module, i: int) -> int:
        return self.attention(model, i).k_proj.out_features // self.head_dim

    def kv_map(self, model: nn.Module, i: int) -> list[int]:
        """For each current query head, the index of its KV head among the layer's current KV heads."""
        attn = self.attention(model, i)
        if isinstance(attn, DarwinLlamaAttention):
            return list(attn.kv_map)
        return uniform_kv_map(self.num_heads(model, i), self.num_kv_heads(model, i))

    def intermediate_size(self, model: nn.Module, i: int) -> int:
        return self.down_proj(model, i).in_features

    def source_heads(self, model: nn.Module, i: int) -> list[int]:
        """Indices, in the original dense model, of the query heads block ``i`` still has."""
        attn = self.attention(model, i)
        if isinstance(attn, DarwinLlamaAttention):
            return attn.source_heads.tolist()
        return list(range(self.num_heads(model, i)))

    def source_channels(self, model: nn.Module, i: int) -> list[int]:
        """Indices, in the original dense model, of the MLP channels block ``i`` still has."""
        mlp = self.mlp(model, i)
        if hasattr(mlp, "source_channels"):
            return mlp.source_channels.tolist()
        return list(range(self.intermediate_size(model, i)))

    def layer_sizes(self, model: nn.Module) -> list[tuple[int, int, int]]:
        """``(heads, kv heads, channels)`` of every block."""
        return [
            (self.num_heads(model, i), self.num_kv_heads(model, i), self.intermediate_size(model, i))
            for i in range(self.num_layers)
        ]

    # --- parameter counts ----------------------------------------------------------------------
    def nonembedding_param_count(self, model: nn.Module) -> int:
        """All parameters except the input embedding and the LM head (tied or not), each once."""
        skip = {id(p) for p in model.get_input_embeddings().parameters()}
        out = model.get_output_embeddings()
        if out is not None:
            skip |= {id(p) for p in out.parameters()}
        return sum(p.numel() for p in model.parameters() if id(p) not in skip)

    def layer_param_count(self, heads_kept: int, kv_kept: int, channels_kept: int) -> int:
        """Parameters of one decoder block with these sizes, norms and biases included."""
        h, d = self.hidden_size, self.head_dim
        attn = 2 * h * d * heads_kept + 2 * h * d * kv_kept  # q and o, k and v
        attn += d * (heads_kept + 2 * kv_kept) * self.qkv_bias + h * self.o_bias
        mlp = 3 * h * channels_kept + (2 * channels_kept + h) * self.mlp_bias
        return attn + mlp + 2 * h  # two RMSNorms

    def nonembedding_param_count_for(self, layer_sizes: Iterable[tuple[int, int, int]]) -> int:
        """Predicted ``nonembedding_param_count`` of a model with these ``(heads, kv, channels)``."""
        return sum(self.layer_param_count(*s) for s in layer_sizes) + self.hidden_size  # final norm

    # --- shrunk model config -------------------------------------------------------------------
    def shrunk_config(
        self,
        model: nn.Module,
        *,
        layer_num_heads: Sequence[int],
        layer_num_kv_heads: Sequence[int],
        layer_kv_map: Sequence[Sequence[int]],
        layer_intermediate_size: Sequence[int],
    ) -> DarwinLlamaConfig:
        """A ``darwinlm_llama`` config with the source's global settings (RoPE, norms, vocab, ids...)."""
        src = model.config.to_dict()
        names = set(DarwinLlamaConfig.__dataclass_fields__) - _DROPPED_CONFIG_KEYS
        kwargs = {k: v for k, v in src.items() if k in names}
        kwargs.update(
            head_dim=self.head_dim,
            attention_bias=self.o_bias,
            qkv_bias=self.qkv_bias,
            mlp_bias=self.mlp_bias,
            layer_num_heads=list(layer_num_heads),
            layer_num_kv_heads=list(layer_num_kv_heads),
            layer_kv_map=[list(m) for m in layer_kv_map],
            layer_intermediate_size=list(layer_intermediate_size),
        )
        return DarwinLlamaConfig(**kwargs)


def _check_sliding_window(config) -> None:
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or []
    uses_window = window is not None and window < config.max_position_embeddings
    if config.model_type == "qwen2":
        uses_window = uses_window and "sliding_attention" in layer_types
    if uses_window:
        raise DarwinLMError(
            f"model_type {config.model_type!r} uses sliding-window attention (window {window} < "
            f"max_position_embeddings {config.max_position_embeddings}); darwinlm's shrunk model runs full "
            "causal attention and would not match it. Set config.sliding_window = None only if every "
            "sequence you use is no longer than the window."
        )


def adapter_for(model: nn.Module) -> LlamaFamilyAdapter:
    """The adapter for ``model``, chosen by ``model.config.model_type``.

    Raises ``DarwinLMError`` naming the model type if it is not one of ``SUPPORTED_MODEL_TYPES`` or it
    uses sliding-window attention.
    """
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise DarwinLMError(
            f"unsupported model_type {model_type!r}; darwinlm supports {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    _check_sliding_window(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if model_type == "qwen2":
        qkv_bias, o_bias, mlp_bias = True, False, False
    elif model_type == "mistral":
        qkv_bias, o_bias, mlp_bias = False, False, False
    else:  # llama and darwinlm_llama
        o_bias = bool(config.attention_bias)
        qkv_bias = o_bias or bool(getattr(config, "qkv_bias", False))
        mlp_bias = bool(config.mlp_bias)
    return LlamaFamilyAdapter(
        model_type=model_type,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        head_dim=head_dim,
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=mlp_bias,
    )
