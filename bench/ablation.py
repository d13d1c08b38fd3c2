#!/usr/bin/env python
"""Ablation on SmolLM2-135M: is training-aware selection worth it, at equal size and post-training?

Four variants at the same parameter budget (the quick example's target, 50% of the prunable
parameters) and the same post-training (tokens, lr, data order):

  (a) uniform     every layer at (nearly) the same level; no search. Its rows are the "uniform"
                  baseline rows of variant (c)'s summary (same database, genome and post-training).
  (b) evopress    the search without training-aware selection: every stage's finetune_tokens = 0
                  (multi-step selection on KL alone, as EvoPress does).
  (c) darwinlm    training-aware search: examples/smollm2-quick.yaml as is.
  (d) darwinlm-ref  (c) with the reference code's numerics: pure-bf16 weights (model.dtype and
                  compute_dtype bfloat16, so AdamW runs on bf16 weights) and the unmasked fine-tune
                  (search.finetune.mode: unmasked, pruned columns may revive). Post-training is then
                  also pure bf16. Its dense model is the bf16-rounded one, which differs slightly from
                  the fp32 dense, and its layer database is built from it (a different content key).
                  Its models are reported against its own dense (as its summary has them) and
                  re-evaluated here against the fp32 dense, on the same held-out chunks.

Each variant is its own search name in one store (built with ``with_overrides`` from the quick
example), so (b) and (c) share the layer database and everything resumes when re-run. Numbers are
read from each search's ``result/summary.json``.

    .venv/bin/python bench/ablation.py --generations 6 --store file:///tmp/darwinlm-ablation
    .venv/bin/python bench/ablation.py --generations 6 --store file:///tmp/darwinlm-ablation --json

Goal checks printed at the end: (c) beats (a) by >= 30% in held-out perplexity (ppl_c <= 0.7 ppl_a),
one-shot and after post-training; (c) is at least as good as (b) after post-training.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from darwinlm.spec import load_spec, with_overrides
from darwinlm.store import layout

log = logging.getLogger("bench.ablation")

ORDER = ("a", "b", "c", "d")
LABELS = {
    "a": "uniform (no search)",
    "b": "search, no training-aware selection (EvoPress)",
    "c": "DarwinLM training-aware search",
    "d": "DarwinLM, reference numerics (bf16 weights, unmasked fine-tune)",
}
GOAL_PPL_GAIN = 0.30


def variant_specs(base, *, store: str | None, generations: int | None, offspring: int | None) -> dict:
    """The search spec of variants b, c, d (a has none), all from ``base`` with the same budget."""
    common: dict = {}
    if store:
        common["store"] = store
    if generations is not None:
        common["search.generations"] = generations
    if offspring is not None:
        common["search.offspring"] = offspring
        # the first stage cannot keep more than there are offspring
        for i, st in enumerate(base.search.selection):
            if st.survivors > offspring:
                common[f"search.selection[{i}].survivors"] = offspring
    g = generations if generations is not None else base.search.generations
    o = offspring if offspring is not None else base.search.offspring
    tag = f"g{g}-o{o}"
    no_training = {f"search.selection[{i}].finetune_tokens": 0 for i in range(len(base.search.selection))}
    return {
        "c": with_overrides(base, name=f"abl-darwinlm-{tag}", **common),
        # (b)'s uniform baseline would be identical to (c)'s: skip its post-training
        "b": with_overrides(base, name=f"abl-evopress-{tag}", **common, **no_training,
                            **{"evaluation.baselines": ["dense"]}),
        "d": with_overrides(base, name=f"abl-darwinlm-ref-{tag}", **common,
                            **{"model.dtype": "bfloat16", "model.compute_dtype": "bfloat16",
                               "search.finetune.mode": "unmasked"}),
    }


def _rows(summary: dict) -> dict:
    """{(model, stage): row} of a summary.json."""
    return {(r["model"], r["stage"]): r for r in summary["rows"]}


def _search_cost(ws) -> dict:
    secs, ft, evals = 0.0, 0, 0
    for g in range(ws.spec.search.generations):
        st = ws.store.get_json(layout.generation_state(g))
        secs += st["seconds"]
        ft += st["finetune_tokens"]
        evals += st["evaluations"]
    return {"search_seconds": round(secs, 1), "search_finetune_tokens": ft, "evaluations": evals}


def _heldout_chunks(ws):
    """The held-out chunks ``report.evaluate_and_report`` scores on (the same for every variant)."""
    from darwinlm.llm.data import TokenPool, sample_exact
    from darwinlm.core.rng import derive_rng

    chunks = list(ws.pools.heldout.chunks)
    if ws.spec.evaluation.heldout_tokens:
        chunks = sample_exact(TokenPool("heldout", tuple(chunks)), ws.spec.evaluation.heldout_tokens,
                              derive_rng(0, "eval"))
    return chunks


def cross_evaluate(ws_ref, ws_d) -> dict:
    """Variant (d)'s models (one-shot and post-trained, searched and uniform) against the fp32 dense."""
    from darwinlm.run.report import evaluate_models
    from darwinlm.run.workspace import load_posttrained

    models = {("searched", "one-shot"): ws_d.builder.shrunk(ws_d.final_genome()),
              ("searched", "post-trained"): load_posttrained(ws_d, "searched")}
    if "uniform" in ws_d.spec.evaluation.baselines:
        models[("uniform", "one-shot")] = ws_d.builder.shrunk(ws_d.uniform_genome())
        models[("uniform", "post-trained")] = load_posttrained(ws_d, "uniform")
    keyed = {f"{m}|{s}": v for (m, s), v in models.items()}
    scores = evaluate_models(ws_ref.model, keyed, _heldout_chunks(ws_ref), ws_ref.spec.model.compute_dtype)
    return {k: {"ppl": v["ppl"], "kl": v["kl"], "tokens": v["tokens"]} for k, v in scores.items()}


def run(args) -> dict:
    from darwinlm.run.runner import run_search
    from darwinlm.run.workspace import Workspace

    base = load_spec(args.spec)
    specs = variant_specs(base, store=args.store, generations=args.generations, offspring=args.offspring)
    wanted = [v for v in ("c", "b", "d") if v in args.variants or (v == "c" and "a" in args.variants)]
    results: dict = {}
    workspaces: dict = {}
    for v in wanted:
        spec = specs[v]
        t0 = time.time()
        log.info("variant %s (%s): search %s in %s", v, LABELS[v], spec.name, spec.store)
        ws = run_search(spec) if not args.report_only else Workspace(spec)
        wall = time.time() - t0
        if not ws.store.exists(layout.SUMMARY):
            raise SystemExit(f"variant {v}: {ws.store.uri}/{layout.SUMMARY} missing (run without --report-only)")
        results[v] = {"search": spec.name, "uri": ws.store.uri, "wall_seconds_this_call": round(wall, 1),
                      "summary_rows": ws.store.get_json(layout.SUMMARY)["rows"], **_search_cost(ws)}
        workspaces[v] = ws
        log.info("variant %s done in %.0fs", v, wall)

    out_variants: dict = {}
    c_rows = _rows({"rows": results["c"]["summary_rows"]})
    dense = c_rows[("dense", "-")]

    def entry(rows, model, dense_row, extra=None):
        one, pt = rows.get((model, "one-shot")), rows.get((model, "post-trained"))
        return {"nonembedding_params": one["nonembedding_params"],
                "dense_params": dense_row["nonembedding_params"],
                "dense_ppl": dense_row["ppl"],
                "oneshot_ppl": one["ppl"], "oneshot_kl": one["kl"],
                "posttrained_ppl": pt["ppl"] if pt else None, "posttrained_kl": pt["kl"] if pt else None,
                **(extra or {})}

    if "a" in args.variants:
        out_variants["a"] = entry(c_rows, "uniform", dense, {"search": None, "source": results["c"]["search"]})
    for v in ("b", "c"):
        if v in args.variants:
            rows = _rows({"rows": results[v]["summary_rows"]})
            r = results[v]
            out_variants[v] = entry(rows, "searched", dense, {
                "search": r["search"], "search_seconds": r["search_seconds"],
                "search_finetune_tokens": r["search_finetune_tokens"], "evaluations": r["evaluations"]})
    if "d" in args.variants:
        r = results["d"]
        rows = _rows({"rows": r["summary_rows"]})
        own_dense = rows[("dense", "-")]
        d = entry(rows, "searched", own_dense, {
            "search": r["search"], "search_seconds": r["search_seconds"],
            "search_finetune_tokens": r["search_finetune_tokens"], "evaluations": r["evaluations"],
            "reference_dense": "own bf16 dense"})
        if ("uniform", "one-shot") in rows:
            d["own_uniform"] = entry(rows, "uniform", own_dense)
        out_variants["d"] = d
        if not args.no_cross_eval:
            log.info("re-evaluating variant d against the fp32 dense")
            x = cross_evaluate(workspaces["c"], workspaces["d"])
            out_variants["d_vs_fp32_dense"] = {
                "nonembedding_params": d["nonembedding_params"], "dense_params": dense["nonembedding_params"],
                "dense_ppl": dense["ppl"],
                "oneshot_ppl": x["searched|one-shot"]["ppl"], "oneshot_kl": x["searched|one-shot"]["kl"],
                "posttrained_ppl": x["searched|post-trained"]["ppl"],
                "posttrained_kl": x["searched|post-trained"]["kl"],
                "reference_dense": "fp32 dense (as a-c)",
                **({"uniform_oneshot_ppl": x["uniform|one-shot"]["ppl"],
                    "uniform_posttrained_ppl": x["uniform|post-trained"]["ppl"]} if "uniform|one-shot" in x else {})}

    goals = {}
    if "a" in out_variants and "c" in out_variants:
        a, c = out_variants["a"], out_variants["c"]
        for stage in ("oneshot", "posttrained"):
            pa, pc = a[f"{stage}_ppl"], c[f"{stage}_ppl"]
            if pa is None or pc is None:
                continue
            gain = (pa - pc) / pa
            goals[f"c_beats_a_by_30pct_{stage}"] = {"ppl_a": pa, "ppl_c": pc, "relative_gain": gain,
                                                    "pass": gain >= GOAL_PPL_GAIN}
    if "b" in out_variants and "c" in out_variants and out_variants["c"]["posttrained_ppl"] is not None:
        b, c = out_variants["b"], out_variants["c"]
        goals["c_at_least_b_posttrained"] = {"ppl_b": b["posttrained_ppl"], "ppl_c": c["posttrained_ppl"],
                                             "kl_b": b["posttrained_kl"], "kl_c": c["posttrained_kl"],
                                             "pass": c["posttrained_ppl"] <= b["posttrained_ppl"]}
    return {
        "spec": str(args.spec),
        "store": specs["c"].store,
        "generations": specs["c"].search.generations,
        "offspring": specs["c"].search.offspring,
        "selection": [{"survivors": s.survivors, "fitness_tokens": s.fitness_tokens,
                       "finetune_tokens": s.finetune_tokens} for s in specs["c"].search.selection],
        "posttrain_tokens": specs["c"].posttrain.tokens,
        "heldout_tokens": dense["tokens"],
        "dense_fp32_ppl": dense["ppl"],
        "variants": out_variants,
        "goals": goals,
        "wall_seconds_this_call": {v: results[v]["wall_seconds_this_call"] for v in results},
    }


def _f(x, fmt):
    return "-" if x is None else format(x, fmt)


def table(res: dict) -> str:
    lines = [(f"SmolLM2-135M ablation: {res['generations']} generations x {res['offspring']} offspring, "
             f"stages {[(s['survivors'], s['fitness_tokens'], s['finetune_tokens']) for s in res['selection']]} "
             f"(survivors, fitness tokens, fine-tune tokens); post-training {res['posttrain_tokens']} tokens; "
             f"held-out {res['heldout_tokens']} tokens; store {res['store']}"), "",
             ("| variant | vs dense | non-emb params | one-shot ppl | one-shot KL | post-trained ppl | post-trained KL "
             "| search s | search fine-tune tokens |"),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    v = res["variants"]
    names = {"a": "(a) uniform", "b": "(b) EvoPress-style (no training)", "c": "(c) DarwinLM",
             "d": "(d) DarwinLM bf16 + unmasked", "d_vs_fp32_dense": "(d) DarwinLM bf16 + unmasked"}
    lines.append(f"| dense (fp32) | - | {v[next(iter(v))]['dense_params']:,} | {res['dense_fp32_ppl']:.3f} | 0 | - | - | - | - |")
    if "d" in v:
        lines.append(f"| dense (bf16 weights) | - | {v['d']['dense_params']:,} | {v['d']['dense_ppl']:.3f} | 0 | - | - | - | - |")
    for key in ("a", "b", "c", "d", "d_vs_fp32_dense"):
        if key not in v:
            continue
        e = v[key]
        ref = "own bf16 dense" if key == "d" else "fp32 dense"
        lines.append(f"| {names[key]} | {ref} | {e['nonembedding_params']:,} | {_f(e['oneshot_ppl'], '.2f')} | "
                     f"{_f(e['oneshot_kl'], '.4f')} | {_f(e['posttrained_ppl'], '.2f')} | {_f(e['posttrained_kl'], '.4f')} | "
                     f"{_f(e.get('search_seconds'), '.0f')} | {_f(e.get('search_finetune_tokens'), ',')} |")
    if "d" in v and "own_uniform" in v["d"]:
        u = v["d"]["own_uniform"]
        lines.append(f"| (d)'s own uniform (bf16) | own bf16 dense | {u['nonembedding_params']:,} | "
                     f"{u['oneshot_ppl']:.2f} | {u['oneshot_kl']:.4f} | {_f(u['posttrained_ppl'], '.2f')} | "
                     f"{_f(u['posttrained_kl'], '.4f')} | - | - |")
    lines.append("")
    for name, g in res["goals"].items():
        if name.startswith("c_beats_a"):
            stage = name.rsplit("_", 1)[-1]
            lines.append(f"goal (c) beats (a) by >=30% in ppl, {stage}: ppl {g['ppl_a']:.2f} -> {g['ppl_c']:.2f} "
                         f"({100 * g['relative_gain']:+.1f}% better): {'PASS' if g['pass'] else 'FAIL'}")
        else:
            lines.append(f"goal (c) at least as good as (b) after post-training: ppl (b) {g['ppl_b']:.2f} vs "
                         f"(c) {g['ppl_c']:.2f}, KL (b) {g['kl_b']:.4f} vs (c) {g['kl_c']:.4f}: "
                         f"{'PASS' if g['pass'] else 'FAIL'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default=str(REPO / "examples/smollm2-quick.yaml"), help="base spec (default: the quick example)")
    p.add_argument("--store", default=None, help="store URI for all variants (default: the spec's store)")
    p.add_argument("--generations", type=int, default=None, help="search generations (default: the spec's, 12)")
    p.add_argument("--offspring", type=int, default=None, help="offspring per generation (default: the spec's, 8)")
    p.add_argument("--variants", default="abcd", help="which of a, b, c, d to run/report (default: abcd)")
    p.add_argument("--report-only", action="store_true", help="only read finished searches, run nothing")
    p.add_argument("--no-cross-eval", action="store_true", help="skip re-evaluating (d) against the fp32 dense")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for this process (not part of the specs, so the searches keep their "
                        "names; 1 is much faster than 2 on an oversubscribed machine)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    args.variants = [v for v in args.variants if v in ORDER]
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    res = run(args)
    print(json.dumps(res, indent=1) if args.json else table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
