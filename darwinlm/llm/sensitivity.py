"""Per-layer sensitivity: the one-shot KL to the dense model when only one layer is pruned to one level.

Why this module exists: the even starting genome is far from where a good configuration lies (DarwinLM
keeps the first and last blocks nearly dense and prunes the middle hard), and small level-switch flips
need many generations to walk there. Measuring, for every prunable layer and every level of its ladder,
how much the model's output moves when *only that layer* is pruned gives an additive cost table; the
starting genome is then the cheapest assignment under each group's fixed level sum
(:func:`darwinlm.core.budget.cheapest_genome`, dynamic programming).

Cost. A naive table is one full forward per (layer, level): 570 for SmolLM2. Here:

* the dense forward runs once per chunk and caches the input of every block (the *prefix*);
* for block ``b``, the attention output and the MLP input are recomputed once from the cached input, and
  every level of both of ``b``'s layers is applied to them directly (a kept-column matmul with the
  database's compensated weight), so no block before ``b + 1`` is ever run again;
* all levels of both layers of a block (19 for SmolLM2) run through blocks ``b+1 .. L-1`` as one batch;
* the LM head and the KL are computed level by level, against the dense log-probs of the same pass.

The numerics are those of a candidate model: the same autocast, the database weights cast to the model's
dtype, the same KL definition as :func:`darwinlm.llm.fitness.kl_to_teacher` (token-weighted mean over
positions 0..T-2).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from darwinlm.store import layout

from .adapter import adapter_for
from .database import shard_blocks
from .runtime import autocast

log = logging.getLogger(__name__)

__all__ = ["ALGORITHM_VERSION", "measure_blocks", "sensitivity_chunks", "table_key", "build_shard", "finalize",
           "load_table"]

ALGORITHM_VERSION = "sensitivity-kl-v1"


class _Capture:
    """Forward hooks that record the inputs of every decoder block and the keyword arguments the
    decoder passes to them (attention mask, rotary position embeddings, position ids), whatever the
    transformers version calls them."""

    def __init__(self, model, blocks: Iterable[int]):
        ad = adapter_for(model)
        self.inputs: dict[int, torch.Tensor] = {}
        self.kwargs: dict = {}
        self._hooks = []
        layers = ad.blocks(model)
        for b in blocks:
            self._hooks.append(layers[b].register_forward_pre_hook(self._make(b), with_kwargs=True))

    def _make(self, b: int):
        def hook(_mod, args, kwargs):
            self.inputs[b] = (args[0] if args else kwargs["hidden_states"]).detach()
            if not self.kwargs:
                self.kwargs = {k: v for k, v in kwargs.items() if k in ("attention_mask", "position_embeddings",
                                                                       "position_ids")}
        return hook

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def _linear_in(x: torch.Tensor, lin: torch.nn.Linear, cols: torch.Tensor | None, w: torch.Tensor | None,
               dtype: torch.dtype) -> torch.Tensor:
    """``lin`` applied to ``x`` with only the input columns ``cols`` kept and weight ``w`` (kept columns)."""
    if cols is None:  # nothing kept: the layer outputs its bias (or zeros)
        out = x.new_zeros(*x.shape[:-1], lin.out_features)
        return out + lin.bias if lin.bias is not None else out
    return F.linear(x.index_select(-1, cols), w.to(dtype), lin.bias)


def _level_inputs(db, name: str, group: int, device, dtype) -> list[tuple[int, torch.Tensor | None, torch.Tensor | None]]:
    """``(level, kept input columns, kept-column weight)`` of every level > 0 of ``name``."""
    ladder = db.ladders[name]
    out = []
    for level in range(1, ladder.num_levels):
        units = db.kept_units(name, level)
        if not units:
            out.append((level, None, None))
            continue
        cols = torch.tensor([u * group + j for u in units for j in range(group)], dtype=torch.long, device=device)
        out.append((level, cols, db.weight(name, level).to(device=device, dtype=dtype)))
    return out


class _Teacher:
    """What the KL to the dense model needs of one chunk, without keeping its [T-1, V] log-probs.

    Per position t, KL(p ‖ softmax(z)) = Σ_v p_v log p_v − Σ_v p_v z_v + logsumexp(z), and with
    z = W h (the LM head) the middle term is h · (Wᵀ p): so only the negative entropy (a scalar per
    position) and Wᵀ p ([T-1, H]) are kept, and a candidate's KL costs its logits and one logsumexp."""

    def __init__(self, logits: torch.Tensor, head: torch.nn.Linear):
        logp = F.log_softmax(logits.float(), dim=-1)  # [T-1, V]
        p = logp.exp()
        self.neg_entropy = (p * logp).sum(-1)  # [T-1]
        self.pw = p @ head.weight.float()  # [T-1, H]
        self.pb = p @ head.bias.float() if head.bias is not None else None  # [T-1]
        self.positions = logp.shape[0]


def _tail_kl(model, tail, x: torch.Tensor, kw: dict, t: _Teacher, compute_dtype: str,
             head_dtype: str | None = None) -> torch.Tensor:
    """Σ over positions of KL(dense ‖ variant) for a batch of block outputs ``x`` [n, T, H] -> [n]."""
    device = x.device
    with autocast(device, compute_dtype):
        for layer in tail:
            x = layer(x, **kw)
    with autocast(device, head_dtype or compute_dtype):
        h = model.model.norm(x.float() if head_dtype == "float32" else x)[:, :-1]  # [n, T-1, H]
        # one variant at a time: a [T-1, V] block of logits stays in cache for the logsumexp
        lse = torch.stack([torch.logsumexp(model.lm_head(h[i]).float(), dim=-1) for i in range(h.shape[0])])  # [n, T-1]
    pz = (h.float() * t.pw).sum(-1)  # [n, T-1]
    if t.pb is not None:
        pz = pz + t.pb
    return (t.neg_entropy - pz + lse).sum(-1)


def _mlp_input(layer, d_lin: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The input of the block's down_proj (the MLP's channels) for residual stream ``x``."""
    seen = {}
    hook = d_lin.register_forward_pre_hook(lambda _m, a: seen.__setitem__("d_in", a[0]))
    try:
        layer.mlp(layer.post_attention_layernorm(x))
    finally:
        hook.remove()
    return seen["d_in"]


_DENSE = object()  # the ``cols`` of level 0: the layer's own dense weight


def _at_level(lin: torch.nn.Linear, x: torch.Tensor, cols, w, dtype) -> torch.Tensor:
    """``lin`` at one level: dense (``cols is _DENSE``), nothing kept (None), or kept columns ``cols``."""
    return lin(x) if cols is _DENSE else _linear_in(x, lin, cols, w, dtype)


@torch.no_grad()
def measure_blocks(model, db, chunks: Sequence[torch.Tensor], compute_dtype: str, blocks: Iterable[int], *,
                   base=None, on_block: Callable[[int, dict[str, list[float]]], None] | None = None,
                   progress: Callable[[int], None] | None = None, batch: int = 8,
                   head_dtype: str | None = None) -> dict[str, list[float]]:
    """``{layer: [KL at level 0, 1, ...]}`` for the attention and MLP layers of ``blocks``.

    ``model`` is the dense model (the teacher, and the source of every layer's dense inputs). ``base``:
    ``(base_model, levels)``, a pruned model and its ``{layer: level}``: then every entry is the KL of
    the base configuration with only that one layer moved to that level (the operating point), and the
    entry at the layer's base level is the base model's own KL. Default: the dense model (levels 0).

    ``on_block(b, rows)`` is called after each block with that block's rows (persist them there: a crash
    then loses at most one block). ``progress(1)`` ticks once per (block, chunk). ``batch``: variants
    run through the later blocks together (larger batches use the CPU caches worse)."""
    ad = adapter_for(model)
    device = next(model.parameters()).device
    wdtype = next(model.parameters()).dtype
    blocks = sorted(blocks)
    layers = ad.blocks(model)
    base_model, base_levels = base if base is not None else (model, {})
    tail_layers = adapter_for(base_model).blocks(base_model)
    # the prefix: every block's input for every chunk (in the base model), and the dense log-probs
    prefix: list[dict[int, torch.Tensor]] = []
    kwargs: list[dict] = []
    teacher: list[_Teacher] = []
    for c in chunks:
        ids = c.view(1, -1).to(device)
        cap = _Capture(base_model, blocks)
        try:
            with autocast(device, compute_dtype):
                logits = base_model(input_ids=ids, use_cache=False).logits[0, :-1]  # [T-1, V]
        finally:
            cap.remove()
        if base is not None:
            with autocast(device, compute_dtype):
                logits = model(input_ids=ids, use_cache=False).logits[0, :-1]  # [T-1, V]
        teacher.append(_Teacher(logits, model.lm_head))
        prefix.append(cap.inputs)
        kwargs.append(cap.kwargs)
    out: dict[str, list[float]] = {}
    for b in blocks:
        layer = layers[b]
        attn, mlp = ad.attn_name(b), ad.mlp_name(b)
        o_lin, d_lin = ad.o_proj(model, b), ad.down_proj(model, b)
        variants, at_base = {}, {}
        for name, group in ((attn, ad.head_dim), (mlp, 1)):
            if name in db.ladders:
                variants[name] = [(0, _DENSE, None)] + _level_inputs(db, name, group, device, wdtype)
                at_base[name] = variants[name][base_levels.get(name, 0)]
        totals = {n: [0.0] * len(v) for n, v in variants.items()}
        count = 0
        for ci, c in enumerate(chunks):
            h = prefix[ci][b]  # [1, T, H]
            kw = kwargs[ci]
            seen = {}
            hooks = [o_lin.register_forward_pre_hook(lambda _m, a: seen.__setitem__("o_in", a[0])),
                     o_lin.register_forward_hook(lambda _m, _a, o: seen.__setitem__("o_out", o))]
            try:
                with autocast(device, compute_dtype):
                    layer.self_attn(hidden_states=layer.input_layernorm(h), **kw)  # the dense attention
            finally:
                for hk in hooks:
                    hk.remove()
            xs, owners = [], []
            with autocast(device, compute_dtype):
                _, mcols, mw = at_base.get(mlp, (0, _DENSE, None))
                for level, cols, w in variants.get(attn, ()):
                    if base is None and level == 0:
                        continue  # the dense model itself: KL 0
                    x = h + (seen["o_out"] if cols is _DENSE else _linear_in(seen["o_in"], o_lin, cols, w, wdtype))
                    xs.append(x + _at_level(d_lin, _mlp_input(layer, d_lin, x), mcols, mw, wdtype))
                    owners.append((attn, level))
                _, acols, aw = at_base.get(attn, (0, _DENSE, None))
                resid = h + (seen["o_out"] if acols is _DENSE else _linear_in(seen["o_in"], o_lin, acols, aw, wdtype))
                d_in = _mlp_input(layer, d_lin, resid)  # the same channels for every MLP level
                for level, cols, w in variants.get(mlp, ()):
                    if base is None and level == 0:
                        continue
                    xs.append(resid + _at_level(d_lin, d_in, cols, w, wdtype))
                    owners.append((mlp, level))
            t = teacher[ci]
            for lo in range(0, len(xs), batch):
                kl = _tail_kl(base_model, tail_layers[b + 1:], torch.cat(xs[lo:lo + batch]), kw, t, compute_dtype,
                              head_dtype)
                for (name, level), v in zip(owners[lo:lo + batch], kl.tolist()):
                    totals[name][level] += v
            count += t.positions
            if progress is not None:
                progress(1)
        # KL >= 0; the entropy/logsumexp form can land a rounding error below 0 for a harmless level
        rows = {n: [max(v / max(count, 1), 0.0) for v in t] for n, t in totals.items()}
        out.update(rows)
        if on_block is not None:
            on_block(b, rows)
    return out


# ------------------------------------------------------------------------------------------ the stored table
#
# Under the layer database it was measured on (content-addressed, shared by every search on that database;
# darwinlm.store.layout spells the keys):
#   databases/<db>/sensitivity/<key>/blocks/<b>.json       the rows of block b's layers (resume unit)
#   databases/<db>/sensitivity/<key>/shards/<k>-of-<K>.json  shard completion markers
#   databases/<db>/sensitivity/<key>/table.json              the whole table, once every shard is complete


def sensitivity_chunks(pool, tokens: int) -> list[torch.Tensor]:
    """The last ``tokens`` tokens of the calibration pool (whole chunks from the end, the earliest one cut):
    independent of the search seed, and disjoint from the database's Hessian tokens (taken from the start)
    when the pool holds both."""
    out, total = [], 0
    for c in reversed(pool.chunks):
        c = c[: tokens - total]
        if c.numel() < 2:
            break
        out.append(c)
        total += int(c.numel())
        if total >= tokens:
            return out
    raise ValueError(f"pool {pool.name} has {pool.tokens} tokens, fewer than {tokens}")


def table_key(db_key: str, chunks: Sequence[torch.Tensor], sens_spec) -> str:
    """Content address of a table: database, the exact token chunks, the measurement settings."""
    h = hashlib.sha256()
    for c in chunks:
        h.update(c.to(torch.int64).numpy().tobytes())
        h.update(b"|")
    payload = {"algorithm": ALGORITHM_VERSION, "database": db_key, "tokens": h.hexdigest(), "dtype": sens_spec.dtype}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def build_shard(model, db, sens_spec, chunks: Sequence[torch.Tensor], store, db_key: str, key: str, shard: int,
                shards: int, progress: Callable[[int], None] | None = None) -> dict:
    """Measure (or skip, if present) the blocks of one shard, one stored block at a time; returns the shard
    marker. A crash loses at most the block being measured."""
    marker = layout.sensitivity_shard(db_key, key, shard, shards)
    if store.exists(marker):
        return {**store.get_json(marker), "reused": True}
    t0 = time.time()
    blocks = list(shard_blocks(adapter_for(model).num_layers, shard, shards))
    todo = [b for b in blocks if not store.exists(layout.sensitivity_block(db_key, key, b))]
    if progress is not None and len(todo) < len(blocks):
        progress(len(chunks) * (len(blocks) - len(todo)))

    def save(b: int, rows: dict) -> None:
        store.put_json(layout.sensitivity_block(db_key, key, b), {"block": b, "rows": rows})

    if todo:
        measure_blocks(model, db, chunks, sens_spec.dtype, todo, on_block=save, progress=progress)
    out = {"blocks": blocks, "measured": todo, "seconds": round(time.time() - t0, 3)}
    store.put_json(marker, out)
    log.info("sensitivity shard %d/%d: %d blocks measured in %.1fs", shard, shards, len(todo), time.time() - t0)
    return out


def finalize(store, db_key: str, key: str, shards: int, num_blocks: int, meta: dict) -> dict | None:
    """Assemble ``table.json`` once every shard is complete (idempotent); the table, or None if incomplete."""
    if store.exists(layout.sensitivity_table(db_key, key)):
        return store.get_json(layout.sensitivity_table(db_key, key))
    if not all(store.exists(layout.sensitivity_shard(db_key, key, k, shards)) for k in range(shards)):
        return None
    layers: dict[str, list[float]] = {}
    for b in range(num_blocks):
        layers.update(store.get_json(layout.sensitivity_block(db_key, key, b))["rows"])
    seconds = sum(store.get_json(layout.sensitivity_shard(db_key, key, k, shards))["seconds"] for k in range(shards))
    table = {**meta, "algorithm": ALGORITHM_VERSION, "database": db_key, "key": key, "shards": shards,
             "seconds": round(seconds, 3), "layers": layers}
    store.put_json(layout.sensitivity_table(db_key, key), table)
    return table


def load_table(store, db_key: str, key: str) -> dict:
    return store.get_json(layout.sensitivity_table(db_key, key))
