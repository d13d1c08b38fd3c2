"""The GGUF writer's pure parts: uniform GQA groups, what deci cannot express, the file's metadata, and the
spec/plan rules of an incremental export. llama.cpp itself runs in tests/integration/test_gguf.py."""

from __future__ import annotations

import gguf
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from darwinlm.core.plan import export_covers
from darwinlm.errors import SpecError
from darwinlm.llm.gguf_export import gguf_problems, uniform_groups, write_gguf
from darwinlm.llm.gguf_vocab import TokenizerFields
from darwinlm.spec import load_spec, with_overrides
from darwinlm.store import layout


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=24))
def test_uniform_groups_hold_every_head_once_with_its_own_kv_head(raw):
    kv_map = [sorted(set(raw)).index(k) for k in raw]  # every KV head 0..n-1 used
    g = uniform_groups(kv_map)
    size = g.group
    assert size >= 1 and len(g.order) == size * len(g.kv_source)
    assert sorted(h for h in g.order if h >= 0) == list(range(len(kv_map)))
    for j, h in enumerate(g.order):
        if h >= 0:
            assert kv_map[h] == g.kv_source[j // size]  # the head attends with the KV head it had
    # never worse than giving every query head its own KV head copy
    assert 2 * len(g.order) + 2 * len(g.kv_source) <= 4 * len(kv_map)


def test_an_even_layer_costs_nothing_and_an_uneven_one_is_priced():
    dense = uniform_groups([0, 0, 0, 1, 1, 1, 2, 2, 2])
    assert dense.order == tuple(range(9)) and dense.kv_source == (0, 1, 2)
    assert (dense.duplicated_kv, dense.padding_heads) == (0, 0)
    g = uniform_groups([0, 0, 0, 1, 2])  # 3/1/1: one KV head per query head
    assert (g.group, g.duplicated_kv, g.padding_heads) == (1, 2, 0)
    g = uniform_groups([0, 0, 1, 1, 1, 2])  # 2/3/1: groups of 3, padded
    assert (g.group, g.duplicated_kv, g.padding_heads) == (3, 0, 3)
    assert uniform_groups([], min_heads=1).order == (-1,)


def test_what_deci_cannot_express_is_named():
    from transformers import LlamaConfig

    assert gguf_problems(LlamaConfig()) == []
    assert "SiLU" in gguf_problems(LlamaConfig(hidden_act="gelu"))[0]
    scaled = LlamaConfig(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    assert "RoPE scaling" in gguf_problems(scaled)[0]


def _tiny(**kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, **kw)
    return LlamaForCausalLM(cfg).eval()


def _vocab(n):
    T = gguf.GGUFValueType
    return TokenizerFields(((gguf.Keys.Tokenizer.MODEL, "gpt2", T.STRING, None),
                            (gguf.Keys.Tokenizer.LIST, [f"t{i}" for i in range(n)], T.ARRAY, T.STRING),
                            (gguf.Keys.Tokenizer.MERGES, ["t 1"], T.ARRAY, T.STRING)), "test")


def test_the_file_carries_per_layer_arrays_and_explicit_head_sizes(tmp_path):
    from darwinlm.llm.shrink import LayerShrink, shrink_model

    model = shrink_model(_tiny(), {0: LayerShrink(heads=(0, 1, 2), channels=tuple(range(64))),
                                   1: LayerShrink(heads=(), channels=())})
    info = write_gguf(model, tmp_path / "m.gguf", gguf_type="f16", tokenizer=_vocab(64), name="t")
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    f = {k: v.contents() for k, v in r.fields.items()}
    assert f["general.architecture"] == "deci"
    # 2/1 query heads per KV head: a group of 2 padded with a zero head (as cheap as 3 KV heads, smaller cache)
    assert f["deci.attention.head_count"] == [4, 0] and f["deci.attention.head_count_kv"] == [2, 0]
    assert f["deci.feed_forward_length"] == [64, 0]
    assert f["deci.attention.key_length"] == f["deci.attention.value_length"] == 16
    assert f["deci.rope.dimension_count"] == 16
    names = {t.name for t in r.tensors}
    assert "output.weight" not in names  # tied: llama.cpp reuses token_embd
    assert not any(n.startswith("blk.1.") for n in names)  # an empty layer has no tensors
    assert info["duplication"]["padding_heads"] == 1 and info["duplication"]["kv_heads_written"] == 2


def test_a_model_or_tokenizer_that_does_not_fit_writes_no_file(tmp_path):
    with pytest.raises(ValueError, match="SiLU"):
        write_gguf(_tiny(hidden_act="gelu"), tmp_path / "a.gguf", gguf_type="f16", tokenizer=_vocab(64), name="t")
    with pytest.raises(ValueError, match="32 tokens"):
        write_gguf(_tiny(), tmp_path / "b.gguf", gguf_type="q8_0", tokenizer=_vocab(32), name="t")
    assert not list(tmp_path.iterdir())


def _spec(**over):
    spec = load_spec({"model": {"path": "m"}, "data": {"train": {"path": "t"}}, "search": {"target": {"fraction": 0.5}}})
    return with_overrides(spec, **over) if over else spec


def test_bad_export_requests_name_their_field():
    with pytest.raises(SpecError) as e:
        _spec(**{"export.gguf_type": "q4_k"})
    assert e.value.first_path == "export.gguf_type"
    with pytest.raises(SpecError) as e:
        _spec(**{"export.formats": ["gguf", "onnx"]})
    assert e.value.first_path == "export.formats[1]"


def test_export_formats_are_not_a_changed_spec_but_dtype_is():
    from darwinlm.spec import spec_to_dict

    base = spec_to_dict(_spec())
    assert layout.spec_drift(base, spec_to_dict(_spec(**{"export.formats": ["hf", "gguf"],
                                                          "export.gguf_type": "q8_0"}))) == []
    assert layout.spec_drift(base, spec_to_dict(_spec(**{"export.dtype": "bfloat16"}))) == ["export"]


def test_the_export_is_done_when_its_marker_covers_the_requested_formats():
    old = {"nonembedding_params": 1}  # a marker from before export.formats: the HF directory
    assert export_covers(old, _spec().export)
    assert not export_covers(old, _spec(**{"export.formats": ["gguf"]}).export)
    both = {"formats": ["gguf", "hf"], "gguf": {"f16": {}}}
    assert export_covers(both, _spec(**{"export.formats": ["gguf"]}).export)
    assert not export_covers(both, _spec(**{"export.formats": ["gguf"], "export.gguf_type": "q8_0"}).export)
