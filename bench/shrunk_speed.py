#!/usr/bin/env python
"""Forward throughput of a physically shrunk model vs the dense and the zero-masked dense-shaped model.

Three models, one process, side by side:

  dense    the dense source model;
  masked   dense-shaped, pruned o_proj/down_proj columns set to zero (same FLOPs as dense);
  shrunk   the physically shrunk ``darwinlm_llama`` model (heads and channels removed).

Which configuration:

* default: the uniform configuration of the quick example's target (50% of the prunable
  parameters), built with the library from the example's layer database (``Workspace`` +
  ``builder.shrunk`` / ``builder.masked`` on ``ws.uniform_genome()``); the database is built first if
  the store lacks it (about 40 s on 2 cores);
* ``--result DIR``: a finished search's ``result/`` (or ``result/model/``) directory. The dense model
  is the one named in its ``darwinlm.json`` provenance; the masked model is the dense one with the
  exported o_proj/down_proj written back at their dense positions (``shrink.expand_to_dense``).

Two measurements on the same ``batch x seq`` random token ids (default 4 x 256, compute bound):

* ``full``: ``model(input_ids).logits``; includes the LM head, a fixed 576 x 49152 matmul for SmolLM2
  that pruning does not touch;
* ``body``: ``model.model(input_ids).last_hidden_state``, the decoder stack only, which isolates the
  pruned layers.

Ideal speedups are parameter (= matmul FLOP) ratios dense/shrunk: ``linear`` over the pruned blocks'
q/k/v/o and gate/up/down weights (compare with ``body``); ``whole`` over all parameters with the tied
embedding/LM head counted once (= every matmul including the LM head; compare with ``full``). Both
ignore the attention-score matmuls (they shrink with the heads) and the element-wise work (norms,
RoPE, SiLU; it does not shrink with the heads), so ``body`` can land slightly on either side.
Repetitions are interleaved (dense, masked, shrunk, dense, ...) and medians reported; speeds only make
sense as same-process ratios on a shared machine.

    .venv/bin/python bench/shrunk_speed.py
    .venv/bin/python bench/shrunk_speed.py --result runs/searches/smollm2-quick/result --json
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch

import darwinlm  # noqa: F401  (registers darwinlm_llama)
from darwinlm.llm.adapter import adapter_for

log = logging.getLogger("bench.shrunk_speed")

MODELS = ("dense", "masked", "shrunk")
MODES = ("full", "body")
GOAL = 0.85


# ----------------------------------------------------------------------------------- models
def models_from_spec(spec_path: str, store: str | None):
    """(dense, masked, shrunk, description) for the uniform genome of the spec's target."""
    from darwinlm.core.plan import Task
    from darwinlm.spec import load_spec, with_overrides
    from darwinlm.run.tasks import run_task
    from darwinlm.run.workspace import Workspace

    spec = load_spec(spec_path)
    # a search name of our own: the database is shared by content key, nothing of the example is touched
    spec = with_overrides(spec, name="bench-shrunk-speed", **({"store": store} if store else {}))
    ws = Workspace(spec)
    for k in range(spec.database.shards):
        run_task(ws, Task("database", k, spec.database.shards))
    genome = ws.uniform_genome()
    shrunk = ws.builder.shrunk(genome)
    masked, mask = ws.builder.masked(genome)
    mask.remove()
    masked.requires_grad_(False)
    shrunk.requires_grad_(False)
    desc = (f"uniform genome of {spec_path} (target {spec.search.target}), database "
            f"{ws.store.uri.rsplit('/searches/', 1)[0]}/databases/{ws.db_key}")
    return ws.model, masked, shrunk, desc


def models_from_result(path: str):
    """(dense, masked, shrunk, description) for an exported ``result/model`` directory."""
    from transformers import AutoModelForCausalLM

    from darwinlm.llm.runtime import load_model
    from darwinlm.llm.shrink import expand_to_dense
    from darwinlm.spec import load_spec

    d = Path(path)
    if (d / "model" / "config.json").exists():
        d = d / "model"
    prov = json.loads((d / "darwinlm.json").read_text())
    spec = load_spec(prov["spec"])
    dense, _tok = load_model(spec.model, with_tokenizer=False)
    shrunk = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).to(dense.device).eval()
    shrunk.requires_grad_(False)
    if shrunk.config._attn_implementation != dense.config._attn_implementation:
        shrunk.set_attn_implementation(dense.config._attn_implementation)
    masked = copy.deepcopy(dense)
    with torch.no_grad():
        for name, w in expand_to_dense(shrunk, dense.config).items():
            masked.get_submodule(name).weight.copy_(w)
    return dense, masked, shrunk, f"exported model {d} (dense {spec.model.path})"


# ----------------------------------------------------------------------------------- params
def linear_params(model) -> int:
    """Weights (and biases) of every block's q/k/v/o and gate/up/down projections."""
    ad = adapter_for(model)
    total = 0
    for i in range(ad.num_layers):
        a, m = ad.attention(model, i), ad.mlp(model, i)
        for lin in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj):
            total += sum(p.numel() for p in lin.parameters())
    return total


def whole_params(model) -> int:
    """All parameters, shared ones (tied embedding / LM head) once."""
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------- timing
@torch.inference_mode()
def _forward(model, ids, mode: str):
    if mode == "full":
        return model(input_ids=ids, use_cache=False).logits
    return model.model(input_ids=ids, use_cache=False).last_hidden_state


def measure(models: dict, ids: torch.Tensor, reps: int, warmup: int, modes=MODES) -> dict:
    """{mode: {model: [seconds per forward]}}, repetitions interleaved across models."""
    times = {mode: {n: [] for n in models} for mode in modes}
    for r in range(warmup + reps):
        for mode in modes:
            for name, m in models.items():
                t0 = time.perf_counter()
                out = _forward(m, ids, mode)
                float(out[0, -1, 0])  # force completion (also on asynchronous devices)
                if ids.device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                del out
                if r >= warmup:
                    times[mode][name].append(dt)
        log.info("repetition %d/%d done", r + 1, warmup + reps)
    return times


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.result:
        dense, masked, shrunk, desc = models_from_result(args.result)
    else:
        dense, masked, shrunk, desc = models_from_spec(args.spec, args.store)
    models = {"dense": dense, "masked": masked, "shrunk": shrunk}
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    for m in models.values():
        m.to(dtype)
        m.eval()
    device = next(dense.parameters()).device
    vocab = dense.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(device)

    # default mode: masked and shrunk are the same function (a check that the masked model is the right
    # reference). An exported model may be post-trained, so its q/k/v, gate/up differ from the dense ones.
    diff = None
    if not args.result:
        with torch.inference_mode():
            probe = ids[:1, :64]
            diff = (_forward(masked, probe, "full").float() - _forward(shrunk, probe, "full").float()).abs().max().item()

    times = measure(models, ids, args.reps, args.warmup)
    tokens = args.batch * args.seq
    lin = {n: linear_params(m) for n, m in models.items()}
    whole = {n: whole_params(m) for n, m in models.items()}
    ideal = {"body": lin["dense"] / lin["shrunk"], "full": whole["dense"] / whole["shrunk"]}
    out_modes = {}
    for mode in MODES:
        med = {n: statistics.median(times[mode][n]) for n in models}
        res = {n: {"median_s": med[n], "tokens_per_s": tokens / med[n],
                   "min_s": min(times[mode][n]), "max_s": max(times[mode][n])} for n in models}
        sp_shrunk = med["dense"] / med["shrunk"]
        sp_masked = med["dense"] / med["masked"]
        t = times[mode]
        paired = {n: statistics.median(d / x for d, x in zip(t["dense"], t[n])) for n in ("masked", "shrunk")}
        out_modes[mode] = {
            "models": res,
            "speedup_shrunk": sp_shrunk,
            "speedup_masked": sp_masked,
            # median over repetitions of the within-round ratio: robust to load drifting between rounds
            "paired_speedup_shrunk": paired["shrunk"],
            "paired_speedup_masked": paired["masked"],
            "ideal_speedup": ideal[mode],
            "ideal_basis": "linear (q/k/v/o, gate/up/down) params" if mode == "body"
                           else "all params, tied embedding/LM head once",
            "measured_over_ideal": sp_shrunk / ideal[mode],
        }
    return {
        "configuration": desc,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "batch": args.batch, "seq": args.seq, "reps": args.reps, "warmup": args.warmup,
        "params": {"linear": lin, "whole": whole,
                   "nonembedding": {n: adapter_for(m).nonembedding_param_count(m) for n, m in models.items()}},
        "ideal_speedup_linear": ideal["body"],
        "ideal_speedup_whole": ideal["full"],
        "masked_vs_shrunk_max_abs_logit_diff": diff,
        "modes": out_modes,
        "goal": {"measured_over_ideal_min": GOAL,
                 "body_pass": out_modes["body"]["measured_over_ideal"] >= GOAL,
                 "full_pass": out_modes["full"]["measured_over_ideal"] >= GOAL},
    }


def table(res: dict) -> str:
    p = res["params"]
    lines = [f"{res['configuration']}", f"device {res['device']}, {res['threads']} threads, {res['dtype']}, "
             f"batch {res['batch']} x seq {res['seq']}, median of {res['reps']} interleaved reps "
             f"(+{res['warmup']} warm-up)" + ("" if res['masked_vs_shrunk_max_abs_logit_diff'] is None else
             f"; masked vs shrunk max |logit diff| {res['masked_vs_shrunk_max_abs_logit_diff']:.2e}"),
             "",
             "| params | dense | shrunk | ideal speedup dense/shrunk |", "|---|---:|---:|---:|",
             (f"| pruned linears (q/k/v/o, gate/up/down) | {p['linear']['dense']:,} | {p['linear']['shrunk']:,} | "
             f"{res['ideal_speedup_linear']:.3f} |"),
             (f"| whole model (tied embedding/LM head once) | {p['whole']['dense']:,} | {p['whole']['shrunk']:,} | "
             f"{res['ideal_speedup_whole']:.3f} |"),
             "",
             "| forward | model | median s | tokens/s | speedup vs dense | paired speedup | ideal | measured/ideal |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for mode in MODES:
        r = res["modes"][mode]
        label = "full (logits)" if mode == "full" else "body (no LM head)"
        for n in MODELS:
            m = r["models"][n]
            sp = {"dense": 1.0, "masked": r["speedup_masked"], "shrunk": r["speedup_shrunk"]}[n]
            ps = {"dense": 1.0, "masked": r["paired_speedup_masked"], "shrunk": r["paired_speedup_shrunk"]}[n]
            extra = (f"{r['ideal_speedup']:.3f} | {r['measured_over_ideal']:.3f}" if n == "shrunk" else "- | -")
            lines.append(f"| {label} | {n} | {m['median_s']:.3f} | {m['tokens_per_s']:,.0f} | {sp:.3f} | {ps:.3f} | "
                         f"{extra} |")
    g = res["goal"]
    lines += ["", (f"goal measured/ideal >= {GOAL}: body {'PASS' if g['body_pass'] else 'FAIL'} "
              f"({res['modes']['body']['measured_over_ideal']:.3f}), full {'PASS' if g['full_pass'] else 'FAIL'} "
              f"({res['modes']['full']['measured_over_ideal']:.3f})")]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--result", help="a finished search's result/ or result/model/ directory (default: the "
                                    "uniform configuration of --spec)")
    p.add_argument("--spec", default=str(REPO / "examples/smollm2-quick.yaml"), help="spec for the default mode")
    p.add_argument("--store", default=None, help="store holding (or to build) the layer database "
                                                 "(default: the spec's store)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per model and mode")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the least disturbed by "
                                                        "other jobs on a shared machine; 0 = torch's default)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="weights and compute dtype of all three models (default float32, as exported)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    res = run(args)
    print(json.dumps(res, indent=1) if args.json else table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
