"""Run a GGUF file in llama.cpp (llama-cpp-python) and compare it with a Hugging Face model, per token.

Shared by the default-tier GGUF test (SmolLM2 shrunk to a fixed irregular shape) and the slow tier (the
quick example's result). Each chunk is evaluated from an empty KV cache, exactly like darwinlm's
evaluation, which scores every chunk on its own.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def llama(path, n_ctx: int, threads: int = 1):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                 n_threads=threads, n_threads_batch=threads, verbose=False, seed=0)


def llama_logits(llm, chunks: list[torch.Tensor]) -> list[np.ndarray]:
    """Next-token logits of every position of every chunk: ``[len(chunk), vocab]`` each, float32."""
    out = []
    for c in chunks:
        ids = [int(t) for t in c]
        llm.reset()
        llm.eval(ids)
        out.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
    return out


@torch.no_grad()
def hf_logits(model, chunks: list[torch.Tensor]) -> list[np.ndarray]:
    """The same from a transformers model in float32 (no autocast)."""
    return [model(input_ids=c.view(1, -1), use_cache=False).logits[0].float().numpy() for c in chunks]


def perplexity(logits: list[np.ndarray], chunks: list[torch.Tensor]) -> float:
    """exp(mean next-token NLL), scored like ``darwinlm.llm.fitness.perplexity`` (position t predicts t+1)."""
    total, n = 0.0, 0
    for lg, c in zip(logits, chunks):
        lg = torch.from_numpy(lg[:-1]).double()
        target = c[1:]
        total += float(torch.nn.functional.cross_entropy(lg, target, reduction="sum"))
        n += target.numel()
    return math.exp(total / n)


def agreement(a: list[np.ndarray], b: list[np.ndarray]) -> dict:
    """Top-1 agreement and the largest |logit difference| between two runs over all positions."""
    a_all, b_all = np.concatenate(a), np.concatenate(b)
    top1 = float((a_all.argmax(-1) == b_all.argmax(-1)).mean())
    diff = np.abs(a_all - b_all)
    return {"positions": int(a_all.shape[0]), "top1": top1, "max_abs": float(diff.max()),
            "mean_abs": float(diff.mean())}
