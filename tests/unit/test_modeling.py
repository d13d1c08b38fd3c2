"""The ``darwinlm_llama`` model type and the Llama-family adapter, on tiny random models."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from darwinlm.errors import DarwinLMError
from darwinlm.llm.adapter import adapter_for
from darwinlm.llm.modeling import DarwinLlamaConfig, DarwinLlamaForCausalLM, register, uniform_kv_map

# hidden = heads * head_dim: Llama's config validation insists on it for the dense source.
TINY = dict(
    hidden_size=96, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2, head_dim=16,
    intermediate_size=96, vocab_size=256, max_position_embeddings=128,
)


def _uneven_config(**over) -> DarwinLlamaConfig:
    """Layer 0 without heads, an uneven KV map, an empty MLP and a narrow one."""
    kw = dict(
        TINY,
        layer_num_heads=[0, 5, 3, 6],
        layer_num_kv_heads=[0, 2, 1, 2],
        layer_kv_map=[[], [0, 1, 1, 1, 1], [0, 0, 0], [0, 0, 0, 1, 1, 1]],
        layer_intermediate_size=[96, 0, 10, 50],
        qkv_bias=True,
    )
    kw.update(over)
    return DarwinLlamaConfig(**kw)


def _tokens(seed: int = 0, shape=(2, 9)) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], shape, generator=torch.Generator().manual_seed(seed))


_DENSE_MAP = [0, 0, 0, 1, 1, 1]


def test_default_lists_are_dense():
    cfg = DarwinLlamaConfig(**TINY)
    assert cfg.layer_num_heads == [6] * 4
    assert cfg.layer_num_kv_heads == [2] * 4
    assert cfg.layer_kv_map == [_DENSE_MAP] * 4
    assert cfg.layer_intermediate_size == [96] * 4
    assert cfg.head_dim == 16


def test_dense_darwin_model_is_a_llama():
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    darwin = DarwinLlamaForCausalLM(DarwinLlamaConfig(**TINY)).eval()
    missing, unexpected = darwin.load_state_dict(llama.state_dict(), strict=False)
    assert not unexpected and all(k.endswith(("source_heads", "source_channels")) for k in missing)
    x = _tokens()
    with torch.no_grad():
        assert torch.equal(darwin(x).logits, llama(x).logits)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("layer_num_heads", [6, 6], "num_hidden_layers=4"),
        ("layer_kv_map", [_DENSE_MAP] * 3 + [[0, 0, 0, 2, 2, 2]], "layer_kv_map\\[3\\]"),
        ("layer_kv_map", [_DENSE_MAP] * 3 + [[0, 1]], "2 entries for 6"),
    ],
)
def test_config_rejects_inconsistent_layers(field, value, match):
    with pytest.raises(Exception, match=match):
        DarwinLlamaConfig(**{**TINY, field: value})


def test_save_and_auto_load_roundtrip(tmp_path):
    register()
    register()  # idempotent
    torch.manual_seed(0)
    model = DarwinLlamaForCausalLM(_uneven_config(tie_word_embeddings=True)).eval()
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "darwinlm_llama"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")
    assert type(loaded) is DarwinLlamaForCausalLM
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert loaded.model.layers[1].self_attn.kv_index.tolist() == [0, 1, 1, 1, 1]
    x = _tokens()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_empty_layers_with_cache_and_attention_outputs():
    torch.manual_seed(0)
    model = DarwinLlamaForCausalLM(_uneven_config(attn_implementation="eager")).eval()
    x = _tokens()
    out = model(x, output_attentions=True, output_hidden_states=True)
    assert [tuple(a.shape[:2]) for a in out.attentions] == [(2, 0), (2, 5), (2, 3), (2, 6)]
    assert len(out.hidden_states) == 5
    # Layer 0 has no heads: the cache must still count tokens, so incremental decoding matches.
    with torch.no_grad():
        full = model(x).logits[:, -1]
        cache = model(x[:, :-1], use_cache=True).cache
        assert cache.get_seq_length() == x.shape[1] - 1
        step = model(x[:, -1:], cache=cache).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=0)


def test_backward_through_empty_and_uneven_layers():
    torch.manual_seed(0)
    model = DarwinLlamaForCausalLM(_uneven_config())
    x = _tokens()
    model(x, labels=x).loss.backward()
    assert model.model.layers[1].self_attn.q_proj.weight.grad.shape == (5 * 16, 96)
    assert model.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0


# --- adapter ----------------------------------------------------------------------------------


def test_adapter_rejects_unsupported_model_type():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8))
    with pytest.raises(DarwinLMError, match="'gpt2'"):
        adapter_for(gpt2)


def test_adapter_rejects_sliding_window_mistral_only_when_active():
    kw = dict(TINY)
    with pytest.raises(DarwinLMError, match="sliding-window"):
        adapter_for(MistralForCausalLM(MistralConfig(**kw, sliding_window=32)))
    assert adapter_for(MistralForCausalLM(MistralConfig(**kw, sliding_window=None))).model_type == "mistral"
    assert adapter_for(MistralForCausalLM(MistralConfig(**kw, sliding_window=128))).head_dim == 16


def test_adapter_names_and_sizes():
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    ad = adapter_for(model)
    assert ad.prunable_layers()[:2] == [
        ("model.layers.0.mlp.down_proj", "mlp", 0),
        ("model.layers.0.self_attn.o_proj", "attn", 0),
    ]
    assert [n for n, _, _ in ad.prunable_layers()] == sorted(
        (n for n, _, _ in ad.prunable_layers()), key=lambda n: (int(n.split(".")[2]), n)
    )
    assert ad.o_proj(model, 2) is model.get_submodule(ad.attn_name(2))
    assert ad.down_proj(model, 2) is model.get_submodule(ad.mlp_name(2))
    assert (ad.num_heads(model, 1), ad.num_kv_heads(model, 1), ad.intermediate_size(model, 1)) == (6, 2, 96)
    assert ad.kv_map(model, 1) == uniform_kv_map(6, 2) == [0, 0, 0, 1, 1, 1]
    assert len(ad.blocks(model)) == ad.num_layers == 4


@pytest.mark.parametrize(
    "model",
    [
        lambda: LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=True)),
        lambda: LlamaForCausalLM(LlamaConfig(**TINY, attention_bias=True, mlp_bias=True)),
        lambda: Qwen2ForCausalLM(Qwen2Config(**TINY)),
        lambda: DarwinLlamaForCausalLM(_uneven_config()),
        lambda: DarwinLlamaForCausalLM(_uneven_config(qkv_bias=False, attention_bias=True, mlp_bias=True)),
    ],
    ids=["llama-tied", "llama-bias", "qwen2", "darwin-qkv-bias", "darwin-all-bias"],
)
def test_layer_param_count_predicts_nonembedding_count(model):
    model = model()
    ad = adapter_for(model)
    total = sum(p.numel() for p in model.parameters())
    body = ad.nonembedding_param_count(model)
    embeddings = model.get_input_embeddings().weight.numel()
    assert body == total - embeddings * (1 if model.config.tie_word_embeddings else 2)
    assert ad.nonembedding_param_count_for(ad.layer_sizes(model)) == body
