"""The layer database (ALGORITHM.md §2): every o_proj / down_proj OBS-pruned to a ladder of levels.

Why this module exists: the search only ever combines per-layer pruned weights that were computed once,
here. Hessians come from the *dense* model's activations on the calibration pool (float64); each layer is
pruned along one greedy OBS path, so levels are nested.

Storage (compact, safetensors, checksummed by the store), under ``databases/<key>/``:
- ``layers/<layer>.safetensors``: ``order`` (int64 structure removal order) and, for every level strictly
  between dense and all-removed, ``level.<k>``: the compensated weight of the *kept* columns only
  ([d_row, kept·group], columns in increasing order) in ``database.dtype``. Level 0 is the model's own
  weight; the all-removed level has no weight. For SmolLM2 this is 2.4–2.5× smaller than the reference's
  dense-shaped fp16 tensor per level (``bench/database.py``), and loses nothing: the kept columns are the
  snapshot, the removed ones are exact zeros. Metadata: one key, ``darwinlm.layer``, a JSON object with
  sorted keys (kind, block, group size, units, ladder, OBS errors). One key because safetensors writes
  several metadata keys in a per-process random (hash map) order, and a layer file must be byte-identical
  whichever shard layout and process wrote it.
- ``shards/<k>-of-<K>.json``: shard completion markers.
- ``manifest.json``: written once all shards exist: model fingerprint, calibration digest, ladders,
  algorithm version, layers. A database is complete iff its manifest exists.
The key is a hash of everything that determines the content, so searches share databases.

Determinism: a layer's bytes depend only on the model, the calibration chunks, the ladder and the
torch thread count (float reductions in the Hessian matmuls and OBS may be split differently across
threads). With equal ``model.threads`` (pin it when shards run on different machines), K shards write
exactly the files one shard writes: each block's Hessian comes from the same dense forward whatever
block range a shard covers (tests/unit/test_database.py checks K=1 against K=2 in two processes).

Reading (``LayerDatabase``): on a file store the layer file is verified against its recorded sha256
once, then each level is read on demand from the file (``safetensors.safe_open``), so a search holds
only the levels its genomes use; on S3 the layer file is fetched (verified) once and parsed whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from darwinlm.core.ladder import Ladder, ladder_from
from darwinlm.errors import ChecksumMismatch
from darwinlm.store import layout

from .adapter import adapter_for
from .obs import obs_prune
from .runtime import autocast, model_fingerprint, torch_dtype

log = logging.getLogger(__name__)

# v2: shrinking/lazy OBS solvers (same greedy path, different rounding) and deterministic file metadata
ALGORITHM_VERSION = "obs-greedy-v2"

__all__ = ["ALGORITHM_VERSION", "database_key", "layer_ladders", "shard_blocks", "build_shard",
           "finalize", "LayerDatabase", "collect_hessians", "layer_file", "layer_key"]

META_KEY = "darwinlm.layer"


def layer_ladders(model, db_spec) -> dict[str, tuple[str, int, int, Ladder]]:
    """name -> (kind, block, group_size, ladder) for every prunable layer."""
    ad = adapter_for(model)
    out = {}
    for name, kind, block in ad.prunable_layers():
        if kind == "attn":
            units, group, ls = ad.num_heads(model, block), ad.head_dim, db_spec.attention
        else:
            units, group, ls = ad.intermediate_size(model, block), 1, db_spec.mlp
        out[name] = (kind, block, group, ladder_from(units, levels=ls.levels, fractions=ls.fractions,
                                                      granularity=ls.granularity))
    return out


def database_key(model, db_spec, calibration_digest: str) -> str:
    ladders = {n: list(l.removed) for n, (_, _, _, l) in layer_ladders(model, db_spec).items()}
    payload = {
        "algorithm": ALGORITHM_VERSION,
        "model": model_fingerprint(model),
        "calibration": calibration_digest,
        "ladders": ladders,
        "damping": db_spec.damping,
        "calibration_tokens": db_spec.calibration_tokens,
        "dtype": db_spec.dtype,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def shard_blocks(num_blocks: int, shard: int, shards: int) -> range:
    """Contiguous block range of shard ``shard`` out of ``shards`` (sizes differ by at most one)."""
    lo = num_blocks * shard // shards
    hi = num_blocks * (shard + 1) // shards
    return range(lo, hi)


class _Stop(Exception):
    pass


@torch.no_grad()
def collect_hessians(model, blocks: range, chunks, compute_dtype: str, progress=None) -> dict[str, torch.Tensor]:
    """E[x xᵀ] (float64) of the inputs of every prunable layer in ``blocks``, from dense forwards.

    The forward stops after the last needed block, so a shard of early blocks is cheap.
    """
    ad = adapter_for(model)
    device = next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    count = [0]
    hooks = []

    def make_hook(name):
        def hook(_mod, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float64)  # [tokens, d_col]
            acc = sums.get(name)
            sums[name] = x.T @ x if acc is None else acc.addmm_(x.T, x)
        return hook

    for i in blocks:
        hooks.append(ad.o_proj(model, i).register_forward_pre_hook(make_hook(ad.attn_name(i))))
        hooks.append(ad.down_proj(model, i).register_forward_pre_hook(make_hook(ad.mlp_name(i))))

    def stop(*_):
        raise _Stop

    hooks.append(ad.blocks(model)[blocks[-1]].register_forward_hook(stop))
    try:
        for c in chunks:
            try:
                with autocast(device, compute_dtype):
                    model(input_ids=c.view(1, -1).to(device), use_cache=False)
            except _Stop:
                pass
            count[0] += int(c.numel())
            if progress is not None:
                progress(int(c.numel()))
    finally:
        for h in hooks:
            h.remove()
    return {k: (v / count[0]).cpu() for k, v in sums.items()}


def _calibration_chunks(pool, tokens: int):
    out, total = [], 0
    for c in pool.chunks:
        c = c[: tokens - total]
        out.append(c)
        total += int(c.numel())
        if total >= tokens:
            break
    return out


def build_shard(model, db_spec, compute_dtype: str, calibration_pool, store, key: str, shard: int,
                shards: int, progress=None) -> list[str]:
    """Build (or skip, if present) the layers of one shard and write its marker. Returns its layers."""
    marker = layout.database_shard(key, shard, shards)
    ladders = layer_ladders(model, db_spec)
    ad = adapter_for(model)
    blocks = shard_blocks(ad.num_layers, shard, shards)
    names = [n for n, (_, b, _, _) in ladders.items() if b in blocks]
    if store.exists(marker):
        return names
    t0 = time.time()
    chunks = _calibration_chunks(calibration_pool, db_spec.calibration_tokens)
    H = collect_hessians(model, blocks, chunks, compute_dtype, progress)
    t_h = time.time() - t0
    dtype = torch_dtype(db_spec.dtype)
    for name in names:
        kind, block, group, ladder = ladders[name]
        lin = ad.o_proj(model, block) if kind == "attn" else ad.down_proj(model, block)
        W = lin.weight.detach().to(torch.float64).cpu()  # [d_row, d_col]
        inner = [r for r in ladder.removed if 0 < r < ladder.units]
        res = obs_prune(W, H[name], group_size=group, boundaries=inner, damping=db_spec.damping)
        store.put_bytes(layer_key(key, name), layer_file(res, kind, block, ladder, dtype))
        if progress is not None:
            progress(0)
    store.put_json(marker, {"layers": names, "hessian_seconds": round(t_h, 3),
                            "seconds": round(time.time() - t0, 3)})
    log.info("database shard %d/%d: %d layers in %.1fs", shard, shards, len(names), time.time() - t0)
    return names


layer_key = layout.database_layer  # (database key, layer name) -> the key of its layer file


def layer_file(res, kind: str, block: int, ladder: Ladder, dtype: torch.dtype) -> bytes:
    """The bytes of one layer file (see the module docstring) from its OBS result; deterministic."""
    tensors = {"order": torch.tensor(res.order, dtype=torch.int64)}
    for lvl, r in enumerate(ladder.removed):
        if 0 < r < ladder.units:
            tensors[f"level.{lvl}"] = res.kept[r].to(dtype).contiguous()  # [d_row, kept columns]
    meta = {
        "kind": kind, "block": block, "group_size": res.group_size, "units": ladder.units,
        "removed": list(ladder.removed),
        "errors": [res.errors[r - 1] for r in ladder.removed if 0 < r <= len(res.errors)],
    }
    return st_save(tensors, metadata={META_KEY: json.dumps(meta, sort_keys=True)})


def finalize(model, db_spec, store, key: str, calibration_digest: str, shards: int) -> dict | None:
    """Write the manifest once every shard is complete (idempotent). Returns it, or None if incomplete."""
    mkey = layout.database_manifest(key)
    if store.exists(mkey):
        return store.get_json(mkey)
    if not all(store.exists(layout.database_shard(key, k, shards)) for k in range(shards)):
        return None
    ladders = layer_ladders(model, db_spec)
    seconds = sum(store.get_json(layout.database_shard(key, k, shards))["seconds"] for k in range(shards))
    manifest = {
        "algorithm": ALGORITHM_VERSION,
        "model_fingerprint": model_fingerprint(model),
        "model_type": model.config.model_type,
        "calibration_digest": calibration_digest,
        "calibration_tokens": db_spec.calibration_tokens,
        "damping": db_spec.damping,
        "dtype": db_spec.dtype,
        "shards": shards,
        "build_seconds": seconds,
        "layers": {n: {"kind": k, "block": b, "group_size": g, "units": l.units, "removed": list(l.removed)}
                   for n, (k, b, g, l) in ladders.items()},
    }
    store.put_json(mkey, manifest)
    return manifest


@dataclass
class _Entry:
    order: list[int]
    weights: dict[int, torch.Tensor] = field(default_factory=dict)  # the levels read so far
    path: str | None = None  # local file to read further levels from (file store); None: all loaded


class LayerDatabase:
    """Read side: kept structures and compensated weights per (layer, level), loaded lazily (LRU)."""

    def __init__(self, store, key: str, *, cache_layers: int = 128):
        self.store, self.key = store, key
        self.manifest = store.get_json(layout.database_manifest(key))
        self.layers = list(self.manifest["layers"])
        self.ladders = {n: Ladder(units=m["units"], removed=tuple(m["removed"])) for n, m in self.manifest["layers"].items()}
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._cap = cache_layers

    def _entry(self, name: str) -> _Entry:
        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        e = self._open(layer_key(self.key, name))
        self._cache[name] = e
        if len(self._cache) > self._cap:
            self._cache.popitem(last=False)
        return e

    def _open(self, key: str) -> _Entry:
        local_path = getattr(self.store, "local_path", None)
        if local_path is None:  # object store: one verified download, parsed whole
            t = st_load(self.store.get_bytes(key))
            return _Entry(order=t["order"].tolist(),
                          weights={int(k.split(".")[1]): v for k, v in t.items() if k.startswith("level.")})
        path = local_path(key)
        _verify_file(self.store, key, path)
        with safe_open(path, framework="pt") as f:
            return _Entry(order=f.get_tensor("order").tolist(), path=path)

    def kept_units(self, name: str, level: int) -> tuple[int, ...]:
        ladder = self.ladders[name]
        r = ladder.removed[level]
        if r == 0:
            return tuple(range(ladder.units))
        if r >= ladder.units:
            return ()
        return tuple(sorted(set(range(ladder.units)) - set(self._entry(name).order[:r])))

    def weight(self, name: str, level: int) -> torch.Tensor | None:
        """Compensated kept-column weight, or None at level 0 (use the model's own) / all-removed."""
        ladder = self.ladders[name]
        r = ladder.removed[level]
        if r == 0 or r >= ladder.units:
            return None
        e = self._entry(name)
        if level not in e.weights:
            with safe_open(e.path, framework="pt") as f:
                e.weights[level] = f.get_tensor(f"level.{level}")
        return e.weights[level]


def _verify_file(store, key: str, path: str) -> None:
    """Hash the local file once (streamed) against the sha256 the store recorded when writing it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    recorded = store.sha256(key)
    if h.hexdigest() != recorded:
        raise ChecksumMismatch(f"{store.uri}/{key}: sha256 mismatch: recorded {recorded}, read {h.hexdigest()}",
                               uri=f"{store.uri}/{key}")
