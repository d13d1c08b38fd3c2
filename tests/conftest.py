"""Shared fixtures: a tiny random Llama-family model with a real (small) tokenizer and real English text.

The text is the module docstrings of Python's standard library (real prose, no download, deterministic
for a given Python). The tokenizer is a word-level tokenizer trained on it with ``tokenizers``. The model
is a randomly initialised GQA Llama small enough that a whole search runs in seconds.
"""

from __future__ import annotations

import ast
import os
import pathlib
import sysconfig

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _stdlib_docs(limit: int = 400) -> list[str]:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for f in sorted(root.glob("*.py")):
        try:
            doc = ast.get_docstring(ast.parse(f.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        if doc and len(doc.split()) >= 20:
            docs.append(doc)
        if len(docs) >= limit:
            break
    return docs


def _pretrain(model, tok, docs, *, steps: int, seq: int = 64, batch: int = 8) -> None:
    """A few hundred AdamW steps so the tiny model has real structure (a random one is ~uniform)."""
    import torch

    ids = torch.tensor([t for d in docs for t in tok(d)["input_ids"]], dtype=torch.int64)
    n = (ids.numel() // seq) * seq
    data = ids[:n].view(-1, seq)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        rows = data[torch.randint(0, data.shape[0], (batch,), generator=g)]
        model(input_ids=rows, labels=rows).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def make_tiny_assets(root: pathlib.Path, *, model_type: str = "llama", seed: int = 0,
                     pretrain_steps: int = 150) -> pathlib.Path:
    """Write ``root/model`` (HF dir) and ``root/text/{train,heldout}/*.txt``; returns root."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    docs = _stdlib_docs()
    for i, d in enumerate(docs):
        sub = "heldout" if i % 10 == 0 else "train"
        (root / "text" / sub).mkdir(parents=True, exist_ok=True)
        (root / "text" / sub / f"doc{i:04d}.txt").write_text(d + "\n", encoding="utf-8")
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(docs, trainers.WordLevelTrainer(vocab_size=384, special_tokens=["[UNK]", "[PAD]"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    cfg_kwargs = dict(vocab_size=384, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                      tie_word_embeddings=True)
    cfg = AutoConfig.for_model(model_type, **cfg_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    _pretrain(model, fast, [d for i, d in enumerate(docs) if i % 10], steps=pretrain_steps)
    model.save_pretrained(root / "model", safe_serialization=True)
    fast.save_pretrained(root / "model")
    return root


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> pathlib.Path:
    return make_tiny_assets(tmp_path_factory.mktemp("tiny"))


def tiny_spec_dict(assets: pathlib.Path, store: str, **over) -> dict:
    """A complete spec for the tiny assets: seconds per run on 2 cores."""
    spec = {
        "name": "tiny",
        "seed": 0,
        "store": store,
        "model": {"path": str(assets / "model"), "compute_dtype": "float32"},
        "data": {"train": {"path": str(assets / "text" / "train")},
                 "heldout": {"path": str(assets / "text" / "heldout")},
                 "seq_len": 64, "calibration_tokens": 2048, "finetune_tokens": 2048, "heldout_tokens": 512},
        "database": {"attention": {}, "mlp": {"levels": 5, "granularity": 4}, "calibration_tokens": 1024},
        "search": {"target": {"fraction": 0.5}, "generations": 3, "offspring": 4, "tracking_tokens": 256,
                   "selection": [{"survivors": 2, "fitness_tokens": 128, "finetune_tokens": 64},
                                 {"survivors": 1, "fitness_tokens": 256, "finetune_tokens": 128}],
                   "fitness": {"kind": "kl"}, "finetune": {"lr": 1e-4}},
        "posttrain": {"tokens": 256, "lr": 1e-4, "checkpoint_every": 2},
        "evaluation": {"heldout_tokens": 256},
    }
    from darwinlm.spec.io import set_path

    for k, v in over.items():
        set_path(spec, k.split("."), v)
    return spec
