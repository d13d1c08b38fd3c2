"""Token pools: deterministic, disjoint calibration / fine-tune / held-out documents.

Why this module exists: every phase samples from fixed token pools (ALGORITHM.md §2.2, §3.4): the
calibration pool feeds the database Hessians and the fitness minibatches, the fine-tune pool feeds the
in-fitness training and post-training, the held-out pool is only ever evaluated. Plain-text corpora
(``format: text``, one document per file) are read directly; json/parquet files and hub ids come through
``datasets``, imported only for them, so a machine without ``datasets`` (the GPU test machine) runs every
text spec, the examples included, with the same documents.

Determinism and disjointness: a document goes to a pool by the sha256 of its text (not by its position),
so pools never overlap and do not change when files are reordered. Pools do not depend on the search
seed, which lets searches with different seeds share one layer database. Documents longer than
``seq_len`` are cut into ``seq_len`` chunks; the remainder and short documents stay shorter (no packing).
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from darwinlm.errors import SpecError

log = logging.getLogger(__name__)

__all__ = ["TokenPool", "Pools", "load_documents", "build_pools", "build_heldout_set", "after_prefix", "sample_exact",
           "sample_at_least"]

_DATA_SEED = 0  # fixed on purpose: pools are part of the database key, independent of the search seed


@dataclass(frozen=True)
class TokenPool:
    """A list of token chunks (1-D int64 tensors, each ≤ seq_len) with a content hash."""

    name: str
    chunks: tuple[torch.Tensor, ...]

    @property
    def tokens(self) -> int:
        return sum(int(c.numel()) for c in self.chunks)

    def digest(self) -> str:
        h = hashlib.sha256()
        for c in self.chunks:
            h.update(c.to(torch.int64).numpy().tobytes())
            h.update(b"|")
        return h.hexdigest()


@dataclass(frozen=True)
class Pools:
    calibration: TokenPool
    finetune: TokenPool
    heldout: TokenPool


def _files(path: str, exts: Sequence[str]) -> list[str]:
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        out = [os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs if f.endswith(tuple(exts))]
    else:
        out = glob.glob(path)
    return sorted(out)


def load_documents(source, field_path: str = "data.train") -> list[str]:
    """Load the documents of one ``SourceSpec`` in a stable order (``datasets`` for json, parquet and hub)."""
    fmt = source.format
    if fmt == "text":
        return _text_documents(source, field_path)
    import datasets  # only here: plain-text corpora do not need it

    if fmt == "hub":
        ds = datasets.load_dataset(source.path, source.subset, split=source.split)
    else:
        exts = {"json": (".json", ".jsonl"), "parquet": (".parquet",)}[fmt]
        files = _files(source.path, exts)
        if not files:
            raise SpecError([(f"{field_path}.path", f"no {fmt} files found at {source.path!r}")])
        ds = datasets.load_dataset(fmt, data_files=files, split="train")
    if source.text_field not in ds.column_names:
        raise SpecError([(f"{field_path}.text_field", f"column {source.text_field!r} not in {ds.column_names}")])
    docs = [t for t in ds[source.text_field] if isinstance(t, str) and t.strip()]
    log.info("loaded %d documents from %s", len(docs), source.path)
    return docs


def _text_documents(source, field_path: str) -> list[str]:
    """One document per file, the whole file as UTF-8 text with universal newlines: exactly what
    ``datasets.load_dataset("text", sample_by="document")`` returns (tests/unit/test_data.py compares them)."""
    files = _files(source.path, (".txt", ".text", ".md", ".rst"))
    if not files:
        raise SpecError([(f"{field_path}.path", f"no text files found at {source.path!r}")])
    if source.text_field != "text":
        raise SpecError([(f"{field_path}.text_field", f"column {source.text_field!r} not in ['text']")])
    docs = []
    for f in files:
        with open(f, encoding="utf-8") as fh:
            docs.append(fh.read())
    docs = [t for t in docs if t.strip()]
    log.info("loaded %d documents from %s", len(docs), source.path)
    return docs


def _bucket(text: str) -> float:
    """A stable uniform number in [0, 1) from the document's content."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2.0**64


def _fill(name: str, docs: list[str], tokenizer, seq_len: int, budget: int, field_path: str | None = None) -> TokenPool:
    """Shuffle documents (fixed seed), tokenise lazily, chunk, stop at exactly ``budget`` tokens."""
    order = np.random.default_rng(_DATA_SEED).permutation(len(docs))
    chunks: list[torch.Tensor] = []
    total = 0
    for i in order:
        ids = tokenizer(docs[int(i)], add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), seq_len):
            piece = ids[start : start + seq_len][: budget - total]
            if len(piece) < 2:
                continue
            chunks.append(torch.tensor(piece, dtype=torch.int64))
            total += len(piece)
            if total >= budget:
                return TokenPool(name, tuple(chunks))
    raise SpecError([(field_path or f"data.{name}_tokens", f"asked for {budget} tokens but the source has only {total}")])


def build_pools(data_spec, tokenizer) -> Pools:
    """Split the documents of ``data_spec`` into the three disjoint pools."""
    train_docs = load_documents(data_spec.train, "data.train")
    held_docs: list[str]
    if data_spec.heldout is not None:
        held_docs = load_documents(data_spec.heldout, "data.heldout")
        held_set = set(held_docs)
        train_docs = [d for d in train_docs if d not in held_set]
    else:  # a third hash bucket of the train source: the top 10%
        held_docs = [d for d in train_docs if _bucket(d) >= 0.9]
        train_docs = [d for d in train_docs if _bucket(d) < 0.9]
    frac = data_spec.calibration_fraction
    scale = 1.0 if data_spec.heldout is not None else 0.9
    calib = [d for d in train_docs if _bucket(d) < frac * scale]
    tune = [d for d in train_docs if _bucket(d) >= frac * scale]
    L = data_spec.seq_len
    pools = Pools(
        calibration=_fill("calibration", calib, tokenizer, L, data_spec.calibration_tokens),
        finetune=_fill("finetune", tune, tokenizer, L, data_spec.finetune_tokens),
        heldout=_fill("heldout", held_docs, tokenizer, L, data_spec.heldout_tokens),
    )
    log.info(
        "pools: calibration %d tokens / %d chunks, fine-tune %d / %d, held-out %d / %d",
        pools.calibration.tokens, len(pools.calibration.chunks), pools.finetune.tokens,
        len(pools.finetune.chunks), pools.heldout.tokens, len(pools.heldout.chunks),
    )
    return pools


def after_prefix(pool: TokenPool, tokens: int, name: str) -> TokenPool:
    """The chunks of ``pool`` after its first ``tokens`` tokens (the chunk that reaches ``tokens`` counts as
    used, as the database's Hessians use it): what is left of the calibration pool for selection."""
    total = 0
    for i, c in enumerate(pool.chunks):
        total += int(c.numel())
        if total >= tokens:
            return TokenPool(name, pool.chunks[i + 1:])
    return TokenPool(name, ())


def build_heldout_set(hs, tokenizer, seq_len: int, index: int) -> TokenPool:
    """The token pool of one ``evaluation.extra_heldout`` entry (its documents in the fixed shuffled order)."""
    path = f"evaluation.extra_heldout[{index}]"
    docs = load_documents(hs.source, f"{path}.source")
    return _fill(hs.name, docs, tokenizer, seq_len, hs.tokens, f"{path}.tokens")


def sample_exact(pool: TokenPool, tokens: int, rng: np.random.Generator) -> list[torch.Tensor]:
    """Random chunks without replacement until exactly ``tokens`` (the last one truncated): fitness batches."""
    out, total = [], 0
    for i in rng.permutation(len(pool.chunks)):
        c = pool.chunks[int(i)][: tokens - total]
        if c.numel() < 2:
            continue
        out.append(c)
        total += int(c.numel())
        if total >= tokens:
            return out
    raise ValueError(f"pool {pool.name} has {pool.tokens} tokens, fewer than {tokens}")


def sample_at_least(pool: TokenPool, tokens: int, rng: np.random.Generator) -> list[torch.Tensor]:
    """Random chunks without replacement until ≥ ``tokens`` (the last one not truncated): training batches."""
    if tokens <= 0:
        return []
    out, total = [], 0
    for i in rng.permutation(len(pool.chunks)):
        out.append(pool.chunks[int(i)])
        total += int(pool.chunks[int(i)].numel())
        if total >= tokens:
            return out
    raise ValueError(f"pool {pool.name} has {pool.tokens} tokens, fewer than {tokens}")
