#!/usr/bin/env python
"""Layer database: OBS speed against the reference-faithful loop, compact storage size, shard identity.

Everything runs in one process on the real SmolLM2-135M of ``examples/smollm2-quick.yaml``:

* **speed**: for ``--layers N`` evenly spaced blocks, the o_proj (heads) and down_proj (channels)
  Hessians are collected with ``darwinlm.llm.database.collect_hessians`` on the spec's calibration pool;
  then ``bench.baselines.obs_faithful`` (the reference code's loop) and ``darwinlm.llm.obs.obs_prune`` (what
  the database uses) run on the same W and H with the spec's ladders. Reported per kind: CPU seconds of
  each side (``time.process_time``; ``--threads`` torch threads, default 1, so other processes on a
  shared machine disturb the ratio as little as possible), their ratio, whether the greedy removal
  order is identical, and the worst ratio of reconstruction errors tr(D H Dᵀ) over all levels
  (ours / baseline; 1.0 = same quality). Layers whose baseline takes < 5 s are timed ``--repeat``
  times per side (minimum); the MLP baseline (~40 s a layer) runs once per side.
* **storage**: bytes of our layer files (kept columns per level, fp16 safetensors) against the
  reference's storage of the same ladders (one dense-shaped fp16 tensor per level, dense and all-zero
  levels included): for the timed layers, and for the whole model when the shard check ran.
* **shards**: the whole database built with ``build_shard`` as K=1 and as K=2 (both shards in this
  process, one after the other; tests/unit/test_database.py runs them as two processes on the tiny
  model) into two stores; every layer file's sha256 is compared. Uses ``--shard-tokens`` calibration
  tokens (default 1024) so the two builds take about a minute; ``--no-shard-check`` skips it.

    .venv/bin/python bench/database.py                  # 2 blocks, ~3 minutes on 2 cores
    .venv/bin/python bench/database.py --layers 1 --no-shard-check --json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.baselines import obs_faithful  # noqa: E402
from darwinlm.llm.adapter import adapter_for  # noqa: E402
from darwinlm.llm.database import (  # noqa: E402
    _calibration_chunks,
    build_shard,
    collect_hessians,
    database_key,
    layer_file,
    layer_ladders,
)
from darwinlm.llm.obs import obs_prune, prepare_hessian, reconstruction_error  # noqa: E402
from darwinlm.llm.runtime import torch_dtype  # noqa: E402
from darwinlm.run.workspace import Workspace  # noqa: E402
from darwinlm.spec import load_spec, with_overrides  # noqa: E402
from darwinlm.store import open_store  # noqa: E402

KINDS = {"attn": "attention", "mlp": "mlp"}


def _timed(fn, repeat: int):
    """(result of the last call, minimum CPU seconds over ``repeat`` calls)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.process_time()
        out = fn()
        best = min(best, time.process_time() - t)
    return out, best


def _compare_layer(W, H, group, ladder, damping, repeat):
    inner = [r for r in ladder.removed if 0 < r < ladder.units]
    base, t_base = _timed(lambda: obs_faithful(W, H, group, inner, damping), 1)
    if t_base < 5.0 and repeat > 1:
        base, t_more = _timed(lambda: obs_faithful(W, H, group, inner, damping), repeat - 1)
        t_base = min(t_base, t_more)
    ours, t_ours = _timed(lambda: obs_prune(W, H, group_size=group, boundaries=inner, damping=damping),
                          repeat if t_base < 5.0 else 1)
    Hd = prepare_hessian(H, damping)
    err = max(reconstruction_error(W, ours.snapshot(k), Hd) / reconstruction_error(W, base.snapshot(k), Hd)
              for k in inner)
    return ours, {"baseline_s": t_base, "ours_s": t_ours, "same_path": ours.order == base.order, "err_ratio": err}


def _speed(ws, blocks, repeat, log):
    spec, model = ws.spec, ws.model
    ad = adapter_for(model)
    ladders = layer_ladders(model, spec.database)
    chunks = _calibration_chunks(ws.pools.calibration, spec.database.calibration_tokens)
    dtype = torch_dtype(spec.database.dtype)
    rows, sizes = [], {"compact_bytes": 0, "dense_fp16_bytes": 0, "layers": 0}
    for b in blocks:
        H = collect_hessians(model, range(b, b + 1), chunks, spec.model.compute_dtype)
        for name in (ad.attn_name(b), ad.mlp_name(b)):
            kind, _, group, ladder = ladders[name]
            W = model.get_submodule(name).weight.detach().to(torch.float64)  # [d_row, d_col]
            res, row = _compare_layer(W, H[name], group, ladder, spec.database.damping, repeat)
            rows.append({"layer": name, "kind": KINDS[kind], **row})
            log(f"{name}: baseline {row['baseline_s']:.3f}s ours {row['ours_s']:.3f}s "
                f"same path {row['same_path']} err ratio {row['err_ratio']:.6f}")
            sizes["compact_bytes"] += len(layer_file(res, kind, b, ladder, dtype))
            sizes["dense_fp16_bytes"] += len(ladder.removed) * W.numel() * 2
            sizes["layers"] += 1
    return rows, sizes


def _summary(rows):
    out = {}
    for kind in ("attention", "mlp", "total"):
        sel = [r for r in rows if kind == "total" or r["kind"] == kind]
        base, ours = sum(r["baseline_s"] for r in sel), sum(r["ours_s"] for r in sel)
        out[kind] = {"layers": len(sel), "baseline_s": round(base, 4), "ours_s": round(ours, 4),
                     "ratio": round(base / ours, 2), "same_path": all(r["same_path"] for r in sel),
                     "err_ratio_max": max(r["err_ratio"] for r in sel)}
    return out


def _shard_check(ws, tokens, tmp):
    """Build the whole database as K=1 and as K=2 into two stores; compare every layer file."""
    spec = with_overrides(ws.spec, **{"database.calibration_tokens": tokens})
    model, pool = ws.model, ws.pools.calibration
    key = database_key(model, spec.database, pool.digest())
    stores, seconds = {}, {}
    for K in (1, 2):
        stores[K] = open_store(f"file://{tmp}/shards-{K}")
        t = time.perf_counter()
        for k in range(K):
            build_shard(model, spec.database, spec.model.compute_dtype, pool, stores[K], key, k, K)
        seconds[K] = round(time.perf_counter() - t, 1)
    prefix = f"databases/{key}/layers/"
    files = stores[1].list(prefix)
    digests = {K: {f: hashlib.sha256(stores[K].get_bytes(f)).hexdigest() for f in stores[K].list(prefix)} for K in (1, 2)}
    ladders = layer_ladders(model, spec.database)
    dense = sum(len(lad.removed) * model.get_submodule(n).weight.numel() * 2 for n, (_, _, _, lad) in ladders.items())
    compact = sum(os.path.getsize(stores[1].local_path(f)) for f in files)
    return {"identical": digests[1] == digests[2], "files": len(files), "build_seconds": seconds,
            "calibration_tokens": tokens}, {"layers": len(files), "compact_bytes": compact, "dense_fp16_bytes": dense}


def _table(res) -> str:
    lines = [f"layer database bench: {res['spec']}, blocks {res['blocks']}, {res['threads']} torch thread(s), "
             "CPU seconds",
             f"{'kind':<10} {'layers':>6} {'baseline s':>11} {'ours s':>8} {'ratio':>8} {'same path':>10} "
             f"{'err ratio (max)':>16}"]
    for kind, s in res["speed"].items():
        lines.append(f"{kind:<10} {s['layers']:>6} {s['baseline_s']:>11.3f} {s['ours_s']:>8.3f} "
                     f"{s['ratio']:>7.1f}x {('yes' if s['same_path'] else 'NO'):>10} {s['err_ratio_max']:>16.6f}")
    for what, d in res["storage"].items():
        lines.append(f"storage ({what}, {d['layers']} layers): compact {d['compact_bytes'] / 1e6:.1f} MB vs "
                     f"dense-shaped fp16 {d['dense_fp16_bytes'] / 1e6:.1f} MB -> {d['ratio']:.2f}x smaller")
    if res.get("shards"):
        s = res["shards"]
        lines.append(f"shards: K=1 vs K=2 layer files byte-identical: {'yes' if s['identical'] else 'NO'} "
                     f"({s['files']} files; builds {s['build_seconds']['1']}s / {s['build_seconds']['2']}s wall "
                     f"with {s['calibration_tokens']} calibration tokens)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--spec", default=str(REPO / "examples" / "smollm2-quick.yaml"))
    p.add_argument("--layers", type=int, default=2, help="number of blocks timed (evenly spaced)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for both sides")
    p.add_argument("--repeat", type=int, default=3, help="timing repeats for layers whose baseline takes < 5 s")
    p.add_argument("--shard-tokens", type=int, default=1024, help="calibration tokens of the shard-check builds")
    p.add_argument("--no-shard-check", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    log = (lambda m: print(m, file=sys.stderr)) if args.json else print
    spec = load_spec(args.spec)
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(spec, root=open_store(f"file://{tmp}/root"))
        n = adapter_for(ws.model).num_layers
        blocks = sorted({i * n // args.layers for i in range(args.layers)})
        rows, timed = _speed(ws, blocks, args.repeat, log)
        res = {"spec": os.path.relpath(args.spec, REPO), "blocks": blocks, "threads": args.threads,
               "speed": _summary(rows), "layers": rows, "storage": {"timed layers": timed}}
        if not args.no_shard_check:
            res["shards"], res["storage"]["whole model"] = _shard_check(ws, args.shard_tokens, tmp)
    for d in res["storage"].values():
        d["ratio"] = round(d["dense_fp16_bytes"] / d["compact_bytes"], 3)
    if res.get("shards"):
        res["shards"]["build_seconds"] = {str(k): v for k, v in res["shards"]["build_seconds"].items()}
    print(json.dumps(res, indent=1) if args.json else _table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
