"""Fitness functions (ALGORITHM.md §3.6) and the dense-teacher cache. Lower is better for all.

Why this module exists: selection compares candidates on the *same* minibatch against the *dense*
model's outputs. The dense outputs are computed once per chunk with the resident base model and kept in a
bounded LRU cache (full log-probs in fp16, or only the top-k for ``topk_kl``), so a stage evaluating N
candidates runs the teacher once, not N times.

- ``kl``: forward KL(dense ‖ candidate) per position, last position dropped, token-weighted mean.
- ``topk_kl``: the teacher's top-k entries, both distributions renormalised over them (k ≥ 512 matches
  full KL in rank per EvoPress).
- ``ppl``: exp(mean next-token NLL).
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict

import torch
import torch.nn.functional as F

from .runtime import autocast

__all__ = ["TeacherCache", "fitness", "kl_to_teacher", "perplexity"]


class TeacherCache:
    """Dense log-probs per chunk (positions 0..T-2), bounded by bytes. Keyed by the chunk's content.

    Two levels: ``get`` holds the compact form (fp16 log-probs, or top-k values and indices) of up to
    ``max_bytes``, across generations (SmolLM2's whole 16K-token calibration pool fits in the default);
    ``decoded`` holds, for the most recent chunks (``decoded_bytes``), the fp32 log-probs and probabilities
    the KL reads, on the student's device, so the candidates of a stage, which all score the same chunks,
    do not each re-convert and re-exponentiate them (the same values, computed once)."""

    def __init__(self, model, compute_dtype: str, *, kind: str = "kl", topk: int = 512,
                 max_bytes: int = 2 << 30, decoded_bytes: int = 1 << 30):
        self.model, self.compute_dtype, self.kind, self.topk = model, compute_dtype, kind, topk
        self.device = next(model.parameters()).device
        self.max_bytes = max_bytes
        self.decoded_bytes = decoded_bytes
        self._lru: OrderedDict[bytes, tuple] = OrderedDict()
        self._bytes = 0
        self._hot: OrderedDict[tuple, tuple] = OrderedDict()
        self._hot_bytes = 0

    @staticmethod
    def _key(chunk: torch.Tensor) -> bytes:
        return chunk.numpy().tobytes()

    @torch.no_grad()
    def get(self, chunk: torch.Tensor):
        key = self._key(chunk)
        if key in self._lru:
            self._lru.move_to_end(key)
            return self._lru[key]
        with autocast(self.device, self.compute_dtype):
            logits = self.model(input_ids=chunk.view(1, -1).to(self.device), use_cache=False).logits[0, :-1]
        logp = F.log_softmax(logits.float(), dim=-1)  # [T-1, V]
        if self.kind == "topk_kl":
            vals, idx = logp.topk(min(self.topk, logp.shape[-1]), dim=-1)  # [T-1, k]
            item = (vals.to(torch.float16), idx.to(torch.int32))
        else:
            item = (logp.to(torch.float16),)
        size = sum(t.numel() * t.element_size() for t in item)
        self._lru[key] = item
        self._bytes += size
        while self._bytes > self.max_bytes and len(self._lru) > 1:
            _, old = self._lru.popitem(last=False)
            self._bytes -= sum(t.numel() * t.element_size() for t in old)
        return item

    @torch.no_grad()
    def decoded(self, chunk: torch.Tensor, device) -> tuple:
        """fp32 ``(log p, p)`` ([T-1, V]), or for ``topk_kl`` ``(log p, p, indices)`` renormalised over the
        top-k ([T-1, k]), on ``device``."""
        key = (self._key(chunk), str(device))
        if key in self._hot:
            self._hot.move_to_end(key)
            return self._hot[key]
        item = self.get(chunk)
        if self.kind == "topk_kl":
            logp = F.log_softmax(item[0].float().to(device), dim=-1)  # renormalised over top-k
            out = (logp, logp.exp(), item[1].long().to(device))
        else:
            logp = item[0].float().to(device)
            out = (logp, logp.exp())
        size = sum(t.numel() * t.element_size() for t in out)
        if size <= self.decoded_bytes:
            self._hot[key] = out
            self._hot_bytes += size
            while self._hot_bytes > self.decoded_bytes:
                _, old = self._hot.popitem(last=False)
                self._hot_bytes -= sum(t.numel() * t.element_size() for t in old)
        return out


def _student_logits(model, chunk, compute_dtype):
    device = next(model.parameters()).device
    with autocast(device, compute_dtype):
        return model(input_ids=chunk.view(1, -1).to(device), use_cache=False).logits[0, :-1].float()  # [T-1, V]


@contextlib.contextmanager
def _scoring(model, compute_dtype: str):
    """One autocast region around all chunks of a score, with the weights' low-precision casts cached.

    Autocast re-casts every fp32 weight at every forward unless the weight is a leaf that requires grad
    (then the cast is cached until the region ends). Under ``no_grad`` that flag builds no graph, so the
    weights are marked for the duration: each is cast once per score instead of once per chunk, with
    bit-identical results."""
    frozen = [p for p in model.parameters() if not p.requires_grad and p.is_floating_point()]
    for p in frozen:
        p.requires_grad_(True)
    try:
        with autocast(next(model.parameters()).device, compute_dtype):
            yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


@torch.no_grad()
def kl_to_teacher(model, chunks, teacher: TeacherCache, compute_dtype: str) -> float:
    """Token-weighted mean KL(teacher ‖ model) over the chunks (full or top-k by the cache's kind).

    The per-chunk sums (fp32) are added in float64 on the model's device and read once at the end: the same
    numbers as adding them as Python floats, without waiting for the device after every chunk."""
    total, n = 0.0, 0
    with _scoring(model, compute_dtype):
        for c in chunks:
            s_logits = _student_logits(model, c, compute_dtype)
            if teacher.kind == "topk_kl":
                t_logp, t_p, t_idx = teacher.decoded(c, s_logits.device)  # [T-1, k] each
                s_logp = F.log_softmax(s_logits.gather(-1, t_idx), dim=-1)  # renormalised over top-k
            else:
                t_logp, t_p = teacher.decoded(c, s_logits.device)  # [T-1, V] each
                s_logp = F.log_softmax(s_logits, dim=-1)
            kl = (t_p * (t_logp - s_logp)).sum(-1)  # [T-1]
            total = total + kl.sum().double()
            n += kl.numel()
    return float(total) / max(n, 1)


@torch.no_grad()
def perplexity(model, chunks, compute_dtype: str) -> float:
    """exp(mean next-token NLL) over the chunks."""
    total, n = 0.0, 0
    with _scoring(model, compute_dtype):
        for c in chunks:
            logits = _student_logits(model, c, compute_dtype)
            target = c[1:].to(logits.device)
            total = total + F.cross_entropy(logits, target, reduction="sum").double()
            n += target.numel()
    return math.exp(float(total) / max(n, 1))


def fitness(kind: str, model, chunks, teacher: TeacherCache | None, compute_dtype: str) -> float:
    if kind == "ppl":
        return perplexity(model, chunks, compute_dtype)
    return kl_to_teacher(model, chunks, teacher, compute_dtype)
