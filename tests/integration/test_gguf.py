"""The GGUF export in a real llama.cpp (llama-cpp-python, built from its sdist by scripts/setup.sh).

SmolLM2-135M is shrunk to a fixed, deliberately awkward shape: layer 0 without heads (llama.cpp reads the
head size from layer 0), uneven KV groups that need duplicated KV heads and zero padding heads, a layer
with heads but no MLP (llama.cpp would drop its attention), a layer with neither, an MLP width that is
not a multiple of 32 (stored f16 in a q8_0 file), random head and channel subsets in a few more layers. The HF
export of that model (save_pretrained, reloaded through the registered ``darwinlm_llama`` type) and its
GGUF must give the same next-token logits on held-out Brown text, the same perplexity, and the same
tokens from the carried-over tokenizer.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import torch

from ..support import llamacpp

SEQ = 128
CHUNKS = 8


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from darwinlm.provision import find_gguf, model_dir

    if not (model_dir() / "config.json").exists():
        pytest.skip("SmolLM2 not provisioned: run scripts/setup.sh")
    model = AutoModelForCausalLM.from_pretrained(model_dir(), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir()), find_gguf()


def _plan(model):
    """Awkward shapes where SmolLM2 tolerates them (held-out ppl stays within ~10x of dense's), so that
    top-1 agreement measures the export rather than ties between near-uniform predictions."""
    from darwinlm.llm.shrink import LayerShrink

    g = np.random.default_rng(13)
    plan = {
        0: LayerShrink(heads=()),  # no attention in layer 0
        4: LayerShrink(heads=(), channels=()),  # nothing left
        5: LayerShrink(channels=tuple(sorted(g.choice(1536, 1000, replace=False).tolist()))),  # 1000 % 32 != 0
        20: LayerShrink(heads=(0, 1, 2, 3, 6)),  # KV use 3/1/1: duplicated KV heads
        21: LayerShrink(heads=(0, 1, 3, 4, 5, 8), channels=tuple(range(0, 1536, 2))),  # KV use 2/3/1: zero heads
        26: LayerShrink(channels=()),  # heads but no MLP
    }
    for i in (8, 12, 16, 24):  # a few more irregular layers
        heads = tuple(sorted(g.choice(9, 7, replace=False).tolist()))
        plan[i] = LayerShrink(heads=heads, channels=tuple(sorted(g.choice(1536, 1280, replace=False).tolist())))
    return plan


@pytest.fixture(scope="module")
def exported(smollm2, tmp_path_factory):
    """The shrunk model's HF export (reloaded) and its GGUF files, with logits on held-out chunks."""
    from transformers import AutoModelForCausalLM

    from darwinlm.llm.gguf_export import write_gguf
    from darwinlm.llm.gguf_vocab import from_gguf
    from darwinlm.llm.shrink import shrink_model
    from darwinlm.provision import text_dir

    model, tok, source = smollm2
    tmp = tmp_path_factory.mktemp("gguf")
    shrunk = shrink_model(model, _plan(model))
    shrunk.save_pretrained(tmp / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp / "hf", dtype=torch.float32).eval()
    assert hf.config.model_type == "darwinlm_llama"
    texts = [p.read_text(encoding="utf-8") for p in sorted((text_dir() / "brown" / "heldout").glob("*.txt"))[:6]]
    ids = [t for text in texts for t in tok(text, add_special_tokens=False)["input_ids"]]
    chunks = [torch.tensor(ids[i * SEQ:(i + 1) * SEQ]) for i in range(CHUNKS)]
    files, info = {}, {}
    for kind in ("f16", "q8_0"):
        files[kind] = tmp / f"model-{kind}.gguf"
        info[kind] = write_gguf(hf, files[kind], gguf_type=kind, tokenizer=from_gguf(source), name="test")
    return {"hf": hf, "tok": tok, "texts": texts, "chunks": chunks, "files": files, "info": info,
            "hf_logits": llamacpp.hf_logits(hf, chunks)}


def test_the_layout_llamacpp_is_given(exported):
    info = exported["info"]["f16"]
    heads, kv, ff = info["head_count"], info["head_count_kv"], info["feed_forward_length"]
    assert (heads[0], kv[0]) == (1, 1)  # one zero head keeps the head size readable
    assert (heads[20], kv[20]) == (5, 5)  # 3/1/1 query heads per KV head: cheapest as one KV head each
    assert (heads[21], kv[21]) == (9, 3)  # 2/3/1: groups of 3 with 3 zero heads
    assert ff[26] == 1 and heads[26] == 9  # a zero channel keeps layer 26's attention
    assert (heads[4], kv[4], ff[4]) == (0, 0, 0)  # an empty layer stays empty
    assert ff[5] == 1000
    dup = info["duplication"]
    assert dup["kv_heads_written"] - dup["kv_heads"] >= 2 and dup["padding_heads"] >= 4
    assert dup["extra_params"] > 0


# f16 measured: top-1 99.6%, max |dlogit| 2.3 (mean 0.012), ppl +0.07%. q8_0 (8-bit weights, and llama.cpp
# quantises the activations to 8 bits as well): top-1 92.7%, max 28 (mean 0.26), ppl +1.8% on this
# deliberately damaged model (ppl ~830); +0.2% on the quick example's result (tests/integration/test_smollm2.py).
@pytest.mark.parametrize("kind,top1,max_abs,ppl_tol", [("f16", 0.99, 4.0, 0.01), ("q8_0", 0.90, 80.0, 0.03)])
def test_llamacpp_logits_and_perplexity_match_the_hf_export(exported, kind, top1, max_abs, ppl_tol):
    llm = llamacpp.llama(exported["files"][kind], n_ctx=SEQ)
    got = llamacpp.llama_logits(llm, exported["chunks"])
    cmp = llamacpp.agreement(exported["hf_logits"], got)
    ppl_hf = llamacpp.perplexity(exported["hf_logits"], exported["chunks"])
    ppl_cpp = llamacpp.perplexity(got, exported["chunks"])
    print(json.dumps({"kind": kind, **cmp, "ppl_hf": ppl_hf, "ppl_llamacpp": ppl_cpp}))
    assert cmp["positions"] == SEQ * CHUNKS
    assert cmp["top1"] >= top1, cmp
    assert cmp["max_abs"] <= max_abs, cmp
    assert abs(ppl_cpp / ppl_hf - 1) < ppl_tol, (ppl_cpp, ppl_hf)


def test_darwinlm_perplexity_agrees_with_llamacpp(exported):
    """darwinlm's own evaluation (fitness.perplexity, float32) against llama.cpp on the f16 file."""
    from darwinlm.llm.fitness import perplexity

    ours = perplexity(exported["hf"], exported["chunks"], "float32")
    llm = llamacpp.llama(exported["files"]["f16"], n_ctx=SEQ)
    theirs = llamacpp.perplexity(llamacpp.llama_logits(llm, exported["chunks"]), exported["chunks"])
    assert abs(theirs / ours - 1) < 0.01, (theirs, ours)


def test_tokenizer_and_chat_template_are_carried_over(exported):
    llm = llamacpp.llama(exported["files"]["q8_0"], n_ctx=SEQ)
    tok = exported["tok"]
    for text in exported["texts"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == \
            tok(text, add_special_tokens=False)["input_ids"]
    assert llm.metadata["tokenizer.chat_template"] == tok.chat_template
    assert llm.metadata["general.architecture"] == "deci"
    assert llm.token_eos() == tok.eos_token_id


def test_q8_0_stores_rows_that_do_not_fill_blocks_as_f16(exported):
    import gguf

    reader = gguf.GGUFReader(exported["files"]["q8_0"])
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.5.ffn_down.weight"] == "F16"  # 1000 channels
    assert types["blk.6.ffn_down.weight"] == "Q8_0"
    assert types["blk.6.attn_norm.weight"] == "F32"
    assert pathlib.Path(exported["files"]["q8_0"]).stat().st_size < 0.6 * exported["info"]["f16"]["bytes"]
