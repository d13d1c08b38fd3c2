"""Fine-tuning: the short in-fitness fine-tune (ALGORITHM.md §3.5) and resumable post-training (§4.1).

Why this module exists: both loops share the same step (causal-LM loss, optional distillation from the
dense model, fp32 master weights with autocast compute). Deviations from the reference, on purpose
(ALGORITHM.md §3.9): master weights stay fp32 (pure-bf16 AdamW at lr 1e-5 rounds most updates away),
and pruned structures cannot revive: candidates are physically shrunk before training (``mode: shrink``)
or, in ``mode: mask``, the removed columns get zero gradients and are re-zeroed after every step.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from darwinlm.store import layout

from .runtime import autocast

log = logging.getLogger(__name__)

__all__ = ["ColumnMask", "finetune", "make_optimizer", "posttrain", "train_step"]


class ColumnMask:
    """Zero gradients and values of removed input columns (``mode: mask``). {param: bool[d_col]}.

    The masks live on their parameter's device, and ``apply`` is a masked fill (no boolean indexing, which
    would wait for the GPU to count the columns at every step)."""

    def __init__(self, masks: dict[torch.nn.Parameter, torch.Tensor]):
        self.masks = {p: m.to(p.device) for p, m in masks.items()}
        self._hooks = [p.register_hook(lambda g, m=m: g.masked_fill(m, 0.0)) for p, m in self.masks.items()]

    @torch.no_grad()
    def apply(self) -> None:
        for p, m in self.masks.items():
            p.masked_fill_(m, 0.0)  # [d_row, d_col] with m [d_col] broadcast over the rows

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def make_optimizer(params, ft, *, fused: bool = False) -> torch.optim.Optimizer:
    """The optimiser of a ``FinetuneSpec`` (or AdamW with torch defaults for specs without those fields).

    ``fused=True`` asks for torch's fused AdamW kernel (one pass over the parameters instead of ~10
    elementwise passes; the same update rule, rounding may differ in the last bit). It falls back to the
    default implementation where the kernel is unavailable (device, dtype or torch version).
    """
    params = [p for p in params if p.requires_grad]
    kind = getattr(ft, "optimizer", "adamw")
    wd = getattr(ft, "weight_decay", 0.0)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=ft.lr, weight_decay=wd)
    betas = tuple(getattr(ft, "betas", (0.9, 0.999)))
    if fused:
        try:
            return torch.optim.AdamW(params, lr=ft.lr, betas=betas, weight_decay=wd, eps=1e-8, fused=True)
        except (RuntimeError, ValueError, TypeError) as e:  # unsupported device/dtype: the default kernel
            log.debug("fused AdamW unavailable (%s); using the default implementation", e)
    return torch.optim.AdamW(params, lr=ft.lr, betas=betas, weight_decay=wd, eps=1e-8)


def _batch(chunks: list[torch.Tensor], device):
    """Right-padded batch; labels -100 on padding. On CUDA the batch is staged in pinned memory and copied
    asynchronously (the copy is ordered before the step's kernels on the same stream)."""
    L = max(int(c.numel()) for c in chunks)
    pin = device.type == "cuda"
    ids = torch.zeros(len(chunks), L, dtype=torch.int64, pin_memory=pin)  # [batch, L]
    labels = torch.full((len(chunks), L), -100, dtype=torch.int64, pin_memory=pin)  # [batch, L]
    att = torch.zeros(len(chunks), L, dtype=torch.int64, pin_memory=pin)  # [batch, L]
    for i, c in enumerate(chunks):
        ids[i, : c.numel()] = c
        labels[i, : c.numel()] = c
        att[i, : c.numel()] = 1
    return tuple(t.to(device, non_blocking=pin) for t in (ids, labels, att))


def train_step(model, chunks, opt, compute_dtype: str, *, teacher=None, distill: float = 0.0,
               temperature: float = 1.0, mask: ColumnMask | None = None) -> float:
    """One optimiser step on a list of chunks; returns the loss."""
    return float(_step(model, chunks, opt, compute_dtype, teacher=teacher, distill=distill, temperature=temperature,
                       mask=mask))


def _step(model, chunks, opt, compute_dtype: str, *, teacher=None, distill: float = 0.0, temperature: float = 1.0,
          mask: ColumnMask | None = None) -> torch.Tensor:
    """``train_step`` returning the loss as a 0-d tensor on the model's device: no wait for the device, so
    on a GPU the next step's kernels are queued while this one runs."""
    device = next(model.parameters()).device
    ids, labels, att = _batch(chunks, device)
    with autocast(device, compute_dtype):
        out = model(input_ids=ids, attention_mask=att, labels=labels, use_cache=False)
        loss = out.loss
        if distill > 0.0 and teacher is not None:
            with torch.no_grad():
                t_logits = teacher(input_ids=ids, attention_mask=att, use_cache=False).logits
            valid = att.bool()
            t = F.log_softmax(t_logits[valid].float() / temperature, -1)  # [n, V]
            s = F.log_softmax(out.logits[valid].float() / temperature, -1)  # [n, V]
            kd = (t.exp() * (t - s)).sum(-1).mean() * temperature**2
            loss = (1.0 - distill) * loss + distill * kd
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if mask is not None:
        mask.apply()
    return loss.detach()


def finetune(model, chunks: list[torch.Tensor], ft, compute_dtype: str, *, mask: ColumnMask | None = None,
             opt: torch.optim.Optimizer | None = None) -> list[float]:
    """The in-fitness fine-tune: one pass over ``chunks``, ``ft.batch_size`` chunks per step.

    ``opt``: continue with this optimiser (and its state) instead of a fresh one. Training on chunks
    ``a`` and then, with the same optimiser, on ``b`` is the same computation as training on ``a + b``
    when ``len(a)`` is a multiple of ``ft.batch_size``: that is what makes warm-started selection stages
    exact (see :class:`darwinlm.run.search.Evaluator`). The learning rate is constant (no scheduler state).
    """
    if not chunks:
        return []
    model.train()
    model.requires_grad_(True)
    if opt is None:
        opt = make_optimizer(model.parameters(), ft)
    losses = [_step(model, chunks[i : i + ft.batch_size], opt, compute_dtype, mask=mask)
              for i in range(0, len(chunks), ft.batch_size)]
    model.eval()
    model.requires_grad_(False)
    return [float(x) for x in losses]  # one wait for the device, at the end


def _schedule(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def plan_posttrain_batches(pool, tokens: int, batch_size: int, rng: np.random.Generator) -> list[list[int]]:
    """Chunk indices per step: epochs of fresh permutations until ``tokens`` tokens are consumed."""
    steps, seen, cur = [], 0, []
    while seen < tokens:
        for i in rng.permutation(len(pool.chunks)):
            cur.append(int(i))
            seen += int(pool.chunks[int(i)].numel())
            if len(cur) == batch_size:
                steps.append(cur)
                cur = []
            if seen >= tokens:
                break
    if cur:
        steps.append(cur)
    return steps


def posttrain(model, pool, pt, compute_dtype: str, rng: np.random.Generator, *, store=None, prefix: str = "",
              teacher=None, progress=None) -> list[float]:
    """Post-train ``model`` in place; checkpoints to ``store`` under ``prefix`` every ``pt.checkpoint_every``
    steps and resumes from the last checkpoint. Returns the losses of the steps run in this call."""
    batches = plan_posttrain_batches(pool, pt.tokens, pt.batch_size, rng)
    model.train()
    model.requires_grad_(True)
    opt = make_optimizer(model.parameters(), pt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, len(batches), pt.warmup_steps))
    start = _resume(model, opt, sched, store, prefix) if store is not None else 0
    losses = []
    for step in range(start, len(batches)):
        chunks = [pool.chunks[i] for i in batches[step]]
        losses.append(train_step(model, chunks, opt, compute_dtype, teacher=teacher, distill=pt.distill,
                                 temperature=pt.temperature))
        sched.step()
        if progress is not None:
            progress(step + 1, len(batches), losses[-1])
        done = step + 1
        if store is not None and (done % pt.checkpoint_every == 0 or done == len(batches)):
            _checkpoint(model, opt, sched, store, prefix, done, len(batches), losses[-1])
    model.eval()
    model.requires_grad_(False)
    return losses


def _checkpoint(model, opt, sched, store, prefix, step, total, loss: float) -> None:
    """Weights + optimizer state, then the meta (step, total, the step's loss, scheduler) that makes it valid."""
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for p, st in opt.state.items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{names[id(p)]}.{k}"] = v.detach().contiguous()
    tied = _dedupe(tensors)
    digest = store.put_bytes(layout.checkpoint_weights(prefix), st_save(tensors))
    # the meta names the weights it belongs to: a crash between the two writes leaves a pair that says so
    store.put_json(layout.checkpoint_meta(prefix), {"step": step, "total": total, "loss": loss, "tied": tied,
                                                    "weights_sha256": digest, "scheduler": sched.state_dict()})


def _dedupe(tensors: dict) -> dict:
    """safetensors refuses shared storage (tied embeddings): keep one copy, record the aliases."""
    seen, tied = {}, {}
    for k in list(tensors):
        ptr = (tensors[k].data_ptr(), tensors[k].shape)
        if ptr in seen:
            tied[k] = seen[ptr]
            del tensors[k]
        else:
            seen[ptr] = k
    return tied


def _resume(model, opt, sched, store, prefix) -> int:
    if not store.exists(layout.checkpoint_meta(prefix)):
        return 0
    meta = store.get_json(layout.checkpoint_meta(prefix))
    weights = layout.checkpoint_weights(prefix)
    recorded = meta.get("weights_sha256")  # absent in checkpoints written before it was recorded
    if not store.exists(weights) or (recorded is not None and store.sha256(weights) != recorded):
        # killed between the weights and the meta of a checkpoint: they are of different steps (or the
        # weights are incomplete); deterministic training from the start gives the same result
        log.warning("%s: torn checkpoint (weights and meta of different steps): training from the start", prefix)
        return 0
    t = st_load(store.get_bytes(layout.checkpoint_weights(prefix)))
    for alias, src in meta["tied"].items():
        t[alias] = t[src]
    model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
    params = dict(model.named_parameters())
    index = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    sd = opt.state_dict()
    for key, v in t.items():
        if key.startswith("opt."):
            pname, _, field = key[4:].rpartition(".")
            sd["state"].setdefault(index[id(params[pname])], {})[field] = v
    # through load_state_dict, not into opt.state: the checkpoint's tensors are CPU tensors, and it moves each
    # moment to its parameter's device (``step`` too where the fused kernel wants it there)
    opt.load_state_dict(sd)
    sched.load_state_dict(meta["scheduler"])
    for group, lr in zip(opt.param_groups, sched.get_last_lr()):
        group["lr"] = lr  # LambdaLR.load_state_dict does not touch the optimiser's current lr
    log.info("post-training resumed at step %d/%d", meta["step"], meta["total"])
    return int(meta["step"])
