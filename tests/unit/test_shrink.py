"""Physical shrinking equals zero-masking, on tiny random Llama and Qwen2 (q/k/v bias) models."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from darwinlm.llm.adapter import adapter_for
from darwinlm.llm.modeling import DarwinLlamaForCausalLM, register
from darwinlm.llm.shrink import LayerShrink, expand_to_dense, mask_model, shrink_model

# 6 query heads in 2 KV groups of 3, head_dim 16 (hidden = heads * head_dim, as Llama's config demands).
TINY = dict(
    hidden_size=96, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2, head_dim=16,
    intermediate_size=96, vocab_size=256, max_position_embeddings=128,
)
HIDDEN, HEADS, HEAD_DIM, CHANNELS = 96, 6, 16, 96
ATOL = 1e-5


def _model(kind: str, seed: int = 0, **over) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**TINY, **over)).eval()
    if kind == "mistral":
        return MistralForCausalLM(MistralConfig(**TINY, sliding_window=None, **over)).eval()
    model = Qwen2ForCausalLM(Qwen2Config(**TINY, **over)).eval()
    with torch.no_grad():  # the default init zeroes biases; make Qwen2's q/k/v biases matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return model


def _subset(g: torch.Generator, n: int, k: int) -> tuple[int, ...]:
    return tuple(sorted(torch.randperm(n, generator=g)[:k].tolist()))


def _edge_plan(g: torch.Generator) -> dict[int, LayerShrink]:
    """All heads gone; a whole KV group gone (heads 3..5); no MLP; replacement weights."""
    return {
        0: LayerShrink(heads=(), channels=_subset(g, CHANNELS, 40)),
        1: LayerShrink(heads=(0, 2), o_proj=torch.randn(HIDDEN, 2 * HEAD_DIM, generator=g), channels=()),
        3: LayerShrink(
            heads=(1, 3, 4, 5),
            channels=_subset(g, CHANNELS, 17),
            down_proj=torch.randn(HIDDEN, 17, generator=g) * 0.1,
        ),
    }


def _random_plan(g: torch.Generator, n_layers: int = 4) -> dict[int, LayerShrink]:
    plan = {}
    for i in range(n_layers):
        if torch.rand(1, generator=g).item() < 0.2:
            continue  # layer left whole
        heads = _subset(g, HEADS, int(torch.randint(0, HEADS + 1, (1,), generator=g)))
        channels = _subset(g, CHANNELS, int(torch.randint(0, CHANNELS + 1, (1,), generator=g)))
        plan[i] = LayerShrink(heads=heads, channels=channels)
    return plan


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TINY["vocab_size"], (2, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding in the second row
    return ids, mask


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    ids, mask = _inputs()
    with torch.no_grad():
        return (a(ids, attention_mask=mask).logits - b(ids, attention_mask=mask).logits).abs().max().item()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("plan_seed", ["edge", 1, 2, 3])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shrunk_logits_equal_masked(kind, plan_seed, attn):
    model = _model(kind, attn_implementation=attn)
    g = torch.Generator().manual_seed(0 if plan_seed == "edge" else plan_seed)
    plan = _edge_plan(g) if plan_seed == "edge" else _random_plan(g)
    shrunk, masked = shrink_model(model, plan), mask_model(model, plan)
    assert type(shrunk) is DarwinLlamaForCausalLM and type(masked) is type(model)
    assert shrunk.config._attn_implementation == attn
    assert _max_diff(shrunk, masked) < ATOL
    assert _max_diff(masked, model) > 1e-3  # the plan really changed the model


def test_edge_plan_shapes():
    shrunk = shrink_model(_model("qwen2"), _edge_plan(torch.Generator().manual_seed(0)))
    cfg = shrunk.config
    assert cfg.layer_num_heads == [0, 2, 6, 4]
    assert cfg.layer_num_kv_heads == [0, 1, 2, 2]  # layer 1 kept heads 0 and 2: KV head 1 is gone
    assert cfg.layer_kv_map == [[], [0, 0], [0, 0, 0, 1, 1, 1], [0, 1, 1, 1]]
    assert cfg.layer_intermediate_size == [40, 0, 96, 17]
    layer1 = shrunk.model.layers[1].self_attn
    assert layer1.k_proj.weight.shape == (HEAD_DIM, HIDDEN) and layer1.k_proj.bias.shape == (HEAD_DIM,)
    assert shrunk.model.layers[0].self_attn.q_proj.weight.shape == (0, HIDDEN)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_generate_with_cache_equals_masked(kind):
    model = _model(kind)
    plan = _edge_plan(torch.Generator().manual_seed(0))
    shrunk, masked = shrink_model(model, plan), mask_model(model, plan)
    ids, mask = _inputs()
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    kw.update(output_logits=True, return_dict_in_generate=True)
    out, ref = shrunk.generate(ids, **kw), masked.generate(ids, **kw)
    assert out.sequences.shape[1] == ids.shape[1] + 8
    assert torch.equal(out.sequences, ref.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits)) < ATOL


def test_save_and_auto_load(tmp_path):
    register()
    model = _model("qwen2", tie_word_embeddings=True)
    shrunk = shrink_model(model, _edge_plan(torch.Generator().manual_seed(0)))
    shrunk.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # no trust_remote_code
    assert type(loaded) is DarwinLlamaForCausalLM
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert loaded.model.layers[3].self_attn.source_heads.tolist() == [1, 3, 4, 5]
    assert loaded.model.layers[3].self_attn.kv_index.tolist() == [0, 1, 1, 1]
    assert _max_diff(loaded, shrunk) == 0.0


def test_shrinking_a_shrunk_model_composes():
    model = _model("llama")
    first = {0: LayerShrink(heads=(0, 1, 3, 5), channels=tuple(range(0, 96, 2))), 2: LayerShrink(heads=(2, 3, 4))}
    second = {0: LayerShrink(heads=(1, 2), channels=(0, 5, 9)), 2: LayerShrink(heads=(0,)), 3: LayerShrink(heads=())}
    direct = {
        0: LayerShrink(heads=(1, 3), channels=(0, 10, 18)),
        2: LayerShrink(heads=(2,)),
        3: LayerShrink(heads=()),
    }
    once = shrink_model(model, first)
    twice = shrink_model(once, second)
    assert twice.model.layers[0].self_attn.source_heads.tolist() == [1, 3]
    assert twice.model.layers[0].mlp.source_channels.tolist() == [0, 10, 18]
    assert _max_diff(twice, shrink_model(model, direct)) == 0.0
    assert _max_diff(twice, mask_model(once, second)) < ATOL


def test_source_untouched_and_storage_fresh():
    model = _model("qwen2", tie_word_embeddings=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shrunk = shrink_model(model, _edge_plan(torch.Generator().manual_seed(0)))
    mask_model(model, _edge_plan(torch.Generator().manual_seed(0)))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    source_ptrs = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    tensors = [*shrunk.parameters(), *shrunk.buffers()]
    assert not any(t.is_meta for t in tensors)
    assert not {t.untyped_storage().data_ptr() for t in tensors if t.numel()} & source_ptrs


def test_dtype_cast_and_param_count():
    model = _model("llama", attention_bias=True, mlp_bias=True)
    shrunk = shrink_model(model, _edge_plan(torch.Generator().manual_seed(0)), dtype=torch.bfloat16)
    assert {p.dtype for p in shrunk.parameters()} == {torch.bfloat16}
    assert shrunk.model.rotary_emb.inv_freq.dtype == torch.float32
    ad = adapter_for(shrunk)
    assert ad.nonembedding_param_count_for(ad.layer_sizes(shrunk)) == ad.nonembedding_param_count(shrunk)
    assert adapter_for(model).nonembedding_param_count(model) > ad.nonembedding_param_count(shrunk)


def test_expand_to_dense_matches_mask():
    model = _model("llama")
    plan = _edge_plan(torch.Generator().manual_seed(0))
    masked = mask_model(model, plan)
    dense = expand_to_dense(shrink_model(model, plan), model.config)
    ad = adapter_for(model)
    for i in range(ad.num_layers):
        assert torch.equal(dense[ad.attn_name(i)], ad.o_proj(masked, i).weight)
        assert torch.equal(dense[ad.mlp_name(i)], ad.down_proj(masked, i).weight)


@pytest.mark.parametrize(
    "plan, match",
    [
        ({0: LayerShrink(heads=(2, 1))}, "strictly increasing"),
        ({0: LayerShrink(channels=(0, 96))}, "strictly increasing"),
        ({0: LayerShrink(heads=(0,), o_proj=torch.zeros(HIDDEN, 32))}, "shape"),
        ({7: LayerShrink()}, "layer indices"),
    ],
)
def test_invalid_plans_are_rejected(plan, match):
    with pytest.raises(ValueError, match=match):
        shrink_model(_model("llama"), plan)
