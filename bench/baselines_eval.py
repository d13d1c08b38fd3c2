"""The reference's per-candidate evaluation (ALGORITHM.md §3.4, §3.8), as the baseline of bench/evaluator.py.

What the released DarwinLM code does for every candidate of every selection stage:

1. ``copy.deepcopy`` the whole model, which holds the dense weights with the *parent's* levels loaded;
2. load, from disk, the dense-shaped level weight of every layer whose level differs from the parent's
   (the reference stores one ``.pth`` per layer and level; here: one safetensors file per layer and level,
   written once to a temporary directory before the timed loop, no pickle);
3. fine-tune the copy from scratch on the stage's training chunks: AdamW (torch's default kernel), one
   chunk per step, constant learning rate;
4. score KL(dense ‖ candidate) against teacher log-probs cached once per chunk; free the copy.

It deliberately shares the *math* of darwinlm's faithful path (``mode: mask``, ``warm_start: false``), so
the two must give equal fitness values: fp32 master weights with autocast compute, gradients of the
removed o_proj/down_proj columns masked and the columns re-zeroed after each step (the reference lets them
revive, ALGORITHM.md §3.9.1), the spec's optimiser hyper-parameters, teacher log-probs stored in fp16,
and the same token-weighted KL. The code is independent of ``darwinlm.run.search``/``train``/``fitness``
(only the model, database and autocast helpers are shared), so agreement checks those modules.

``ReferenceEvaluator`` has the ``evaluate(genome, train_chunks, fit_chunks) -> float`` signature of
:func:`darwinlm.run.search.run_generation`, so the same selection loop, batches and offspring drive it.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from darwinlm.core.genome import Genome
from darwinlm.llm.adapter import adapter_for
from darwinlm.llm.runtime import autocast

__all__ = ["ReferenceEvaluator", "dense_level_weight"]


def dense_level_weight(base, db, name: str, level: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense-shaped weight of layer ``name`` at ``level``, bool mask of its removed columns)."""
    ad = adapter_for(base)
    meta = db.manifest["layers"][name]
    block, group = int(meta["block"]), int(meta["group_size"])
    lin = ad.o_proj(base, block) if meta["kind"] == "attn" else ad.down_proj(base, block)
    dense = lin.weight.detach()
    kept = db.kept_units(name, level)
    cols = torch.tensor([u * group + j for u in kept for j in range(group)], dtype=torch.long)
    removed = torch.ones(dense.shape[1], dtype=torch.bool)
    removed[cols] = False
    w = torch.zeros_like(dense)
    if len(kept):
        rep = db.weight(name, level)
        w[:, cols] = dense[:, cols] if rep is None else rep.to(dense.dtype)
    return w.contiguous(), removed


class ReferenceEvaluator:
    """The reference's evaluation of one candidate (deep copy, reload from disk, cold fine-tune, KL)."""

    def __init__(self, base, db, parent: Genome, genomes: Iterable[Genome], search_spec, compute_dtype: str,
                 workdir: str | None = None):
        ft = search_spec.finetune
        if ft.batch_size != 1 or ft.optimizer != "adamw":
            raise ValueError("the reference fine-tunes with AdamW, one document per step")
        self.base, self.db, self.parent = base, db, parent
        self.ft, self.compute_dtype = ft, compute_dtype
        self.ad = adapter_for(base)
        self.device = next(base.parameters()).device
        self._tmp = tempfile.TemporaryDirectory(prefix="darwinlm-refdb-", dir=workdir)
        self.dir = self._tmp.name
        # the per-level database on disk: every (layer, level) the generation can load
        self._module = {}
        for i in range(self.ad.num_layers):
            self._module[self.ad.attn_name(i)] = ("o", i)
            self._module[self.ad.mlp_name(i)] = ("down", i)
        needed = {(n, g[n]) for g in [parent, *genomes] for n in g}
        for name, level in sorted(needed):
            w, removed = dense_level_weight(base, db, name, level)
            save_file({"weight": w, "removed": removed}, self._path(name, level))
        # the resident model: dense weights with the parent's levels loaded
        self.model = copy.deepcopy(base)
        self.parent_masks = {name: self._load(self.model, name, parent[name]) for name in parent}
        self._teacher: dict[bytes, torch.Tensor] = {}
        self.stats = {"built": 0, "train_chunks": 0, "train_tokens": 0}

    def close(self) -> None:
        self._tmp.cleanup()

    def _path(self, name: str, level: int) -> str:
        return os.path.join(self.dir, f"{name}.level{level}.safetensors")

    def _linear(self, model, name: str):
        kind, i = self._module[name]
        return self.ad.o_proj(model, i) if kind == "o" else self.ad.down_proj(model, i)

    def _load(self, model, name: str, level: int) -> torch.Tensor:
        t = load_file(self._path(name, level))
        with torch.no_grad():
            self._linear(model, name).weight.copy_(t["weight"])
        return t["removed"]

    @torch.no_grad()
    def _teacher_logp(self, chunk: torch.Tensor) -> torch.Tensor:
        key = chunk.numpy().tobytes()
        if key not in self._teacher:
            with autocast(self.device, self.compute_dtype):
                logits = self.base(input_ids=chunk.view(1, -1).to(self.device), use_cache=False).logits[0, :-1]
            self._teacher[key] = F.log_softmax(logits.float(), dim=-1).to(torch.float16)
        return self._teacher[key]

    def __call__(self, genome: Genome, train_chunks, fit_chunks) -> float:
        model = copy.deepcopy(self.model)  # 1. the whole model
        self.stats["built"] += 1
        self.stats["train_chunks"] += len(train_chunks)
        self.stats["train_tokens"] += sum(int(c.numel()) for c in train_chunks)
        masks = dict(self.parent_masks)
        for name in genome.changed_layers(self.parent):  # 2. reload only what differs, from disk
            masks[name] = self._load(model, name, genome[name])
        col = [(self._linear(model, n).weight, m.to(self.device)) for n, m in masks.items()]
        try:
            if train_chunks:  # 3. fine-tune from scratch
                model.train()
                model.requires_grad_(True)
                opt = torch.optim.AdamW(model.parameters(), lr=self.ft.lr, betas=tuple(self.ft.betas),
                                        weight_decay=self.ft.weight_decay, eps=1e-8)
                for c in train_chunks:
                    ids = c.view(1, -1).to(self.device)
                    with autocast(self.device, self.compute_dtype):
                        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids,
                                     use_cache=False).loss
                    loss.backward()
                    for w, m in col:
                        w.grad[:, m] = 0.0
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    with torch.no_grad():
                        for w, m in col:
                            w[:, m] = 0.0
                model.eval()
                model.requires_grad_(False)
            return self._kl(model, fit_chunks)  # 4. score
        finally:
            del model, col

    @torch.no_grad()
    def _kl(self, model, fit_chunks) -> float:
        total, n = 0.0, 0
        for c in fit_chunks:
            with autocast(self.device, self.compute_dtype):
                s = model(input_ids=c.view(1, -1).to(self.device), use_cache=False).logits[0, :-1].float()
            t = self._teacher_logp(c).float().to(s.device)
            kl = (t.exp() * (t - F.log_softmax(s, dim=-1))).sum(-1)
            total += float(kl.sum())
            n += kl.numel()
        return total / max(n, 1)
