#!/usr/bin/env python
"""Ablation on SmolLM2-135M: what makes the searched model better than uniform, at equal size and post-training?

Variants at the same parameter budget (the quick example's target, 50% of the prunable parameters), the
same layer database and the same post-training (tokens, lr, data order):

  (a) uniform      every layer at (nearly) the same level; no search. Its rows are the "uniform" baseline
                   rows of variant (f)'s summary (same database, genome and post-training).
  (b) evopress     the search from the even start without training-aware selection: every stage's
                   finetune_tokens = 0 (multi-step selection on KL alone, as EvoPress does).
  (c) darwinlm     training-aware search from the even start (search.init: even), otherwise the quick example.
  (d) darwinlm-ref (c) with the reference code's numerics: pure-bf16 weights and the unmasked fine-tune
                   (search.finetune.mode: unmasked). Not in the default set; see --variants.
  (e) sensitivity  the sensitivity genome alone: search.generations = 0 (no search, no fine-tuning).
  (f) darwinlm     the quick example as it ships: training-aware search from the sensitivity start.

Searches (b), (c), (f) run at each --scales multiple of the quick example's generations (default 1x and
3x; search.patience is lifted so the multiple is what runs). Each variant is its own search name in one
store (built with ``with_overrides`` from the quick example), so they share the layer database and the
sensitivity table, and everything resumes when re-run. Numbers are read from each search's
``result/summary.json``: held-out perplexity and KL, one-shot and post-trained, and the paired bootstrap
95% CI of searched / uniform perplexity on every held-out set (Brown, and the Python docs when provisioned:
``darwinlm provision text --debian-docs``).

    .venv/bin/python bench/ablation.py --store file:///tmp/darwinlm-ablation --threads 2
    .venv/bin/python bench/ablation.py --store file:///tmp/darwinlm-ablation --scales 1 --variants abcef
    .venv/bin/python bench/ablation.py --store file:///tmp/darwinlm-ablation --report-only --json
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

ORDER = ("a", "b", "c", "d", "e", "f")
SEARCHED = ("b", "c", "d", "f")  # variants that run a search (at every scale)
LABELS = {
    "a": "uniform (no search)",
    "b": "EvoPress-style: even start, no training-aware selection",
    "c": "DarwinLM from the even start",
    "d": "DarwinLM from the even start, reference numerics (bf16 weights, unmasked fine-tune)",
    "e": "sensitivity genome alone (no search)",
    "f": "DarwinLM from the sensitivity start (the quick example)",
}
PYTHON_DOCS = Path(os.environ.get("DARWINLM_CACHE", "~/.cache/darwinlm")).expanduser() / "text" / "python-docs"


def variant_specs(base, *, store: str | None, scale: int, python_docs: Path | None) -> dict:
    """The spec of every variant but (a) at ``scale`` x the base generations, all with the same budget."""
    common: dict = {"search.patience": None}
    if store:
        common["store"] = store
    if python_docs is not None:
        common["evaluation.extra_heldout"] = [{"name": "python-docs", "tokens": 8192,
                                               "source": {"path": str(python_docs), "format": "text"}}]
    g = base.search.generations * scale
    tag = f"g{g}"
    no_training = {f"search.selection[{i}].finetune_tokens": 0 for i in range(len(base.search.selection))}
    dense_only = {"evaluation.baselines": ["dense"]}
    return {
        "f": with_overrides(base, name=f"abl-sens-darwinlm-{tag}", **common, **{"search.generations": g,
                                                                                "search.init": "sensitivity"}),
        # (b), (c), (d): the uniform baseline would be (f)'s again (same database, genome, post-training), so
        # they skip it and are compared with (f)'s uniform rows chunk by chunk (summary.json keeps chunk NLLs)
        "c": with_overrides(base, name=f"abl-even-darwinlm-{tag}", **common, **dense_only,
                            **{"search.generations": g, "search.init": "even"}),
        "b": with_overrides(base, name=f"abl-even-evopress-{tag}", **common, **no_training, **dense_only,
                            **{"search.generations": g, "search.init": "even"}),
        "d": with_overrides(base, name=f"abl-even-darwinlm-ref-{tag}", **common, **dense_only,
                            **{"search.generations": g, "search.init": "even",
                               "model.dtype": "bfloat16", "model.compute_dtype": "bfloat16",
                               "search.finetune.mode": "unmasked"}),
        "e": with_overrides(base, name="abl-sens-only", **common, **{"search.generations": 0,
                                                                     "search.init": "sensitivity"}),
    }


def _rows(summary: dict) -> dict:
    """{(model, stage): row} of a summary.json."""
    return {(r["model"], r["stage"]): r for r in summary["rows"]}


def _search_cost(ws) -> dict:
    secs, ft, evals, ran = 0.0, 0, 0, 0
    for g in range(ws.spec.search.generations):
        if not ws.store.exists(layout.generation_state(g)):
            break  # stopped early (patience)
        st = ws.store.get_json(layout.generation_state(g))
        secs += st["seconds"]
        ft += st["finetune_tokens"]
        evals += st["evaluations"]
        ran += 1
    return {"search_seconds": round(secs, 1), "search_finetune_tokens": ft, "evaluations": evals,
            "generations_run": ran}


def _heldout_chunks(ws):
    """The held-out chunks ``report.evaluate_and_report`` scores on (the same for every variant)."""
    from darwinlm.core.rng import derive_rng
    from darwinlm.llm.data import TokenPool, sample_exact

    chunks = list(ws.pools.heldout.chunks)
    if ws.spec.evaluation.heldout_tokens:
        chunks = sample_exact(TokenPool("heldout", tuple(chunks)), ws.spec.evaluation.heldout_tokens,
                              derive_rng(0, "eval"))
    return chunks


def cross_evaluate(ws_ref, ws_d) -> dict:
    """Variant (d)'s searched models (one-shot and post-trained) against the fp32 dense."""
    from darwinlm.run.report import evaluate_models
    from darwinlm.run.workspace import load_posttrained

    models = {"searched|one-shot": ws_d.builder.shrunk(ws_d.final_genome()),
              "searched|post-trained": load_posttrained(ws_d, "searched")}
    scores = evaluate_models(ws_ref.model, models, _heldout_chunks(ws_ref), ws_ref.spec.model.compute_dtype)
    return {k: {"ppl": v["ppl"], "kl": v["kl"], "tokens": v["tokens"]} for k, v in scores.items()}


def _entry(summary: dict, model: str) -> dict:
    """One variant's numbers from its summary: every held-out set, one-shot and post-trained, with the
    searched / uniform CI where the summary has the uniform baseline."""
    sets = {"heldout": summary["rows"], **summary.get("extra_rows", {})}
    out: dict = {}
    for set_name, rows in sets.items():
        r = {(x["model"], x["stage"]): x for x in rows}
        e: dict = {"dense_ppl": r[("dense", "-")]["ppl"]}
        for stage, key in (("one-shot", "oneshot"), ("post-trained", "posttrained")):
            row = r.get((model, stage))
            e[f"{key}_ppl"] = row["ppl"] if row else None
            e[f"{key}_kl"] = row["kl"] if row else None
            e["nonembedding_params"] = r[(model, "one-shot")]["nonembedding_params"]
            if model == "searched":
                c = next((c for c in summary.get("comparisons", []) if c["set"] == set_name and c["stage"] == stage),
                         None)
                if c is not None:
                    e[f"{key}_vs_uniform"] = [c["ratio"], c["ci_low"], c["ci_high"]]
        out[set_name] = e
    return out


def _paired(summary: dict, model: str, ref: dict, ref_model: str, set_name: str, stage: str, resamples: int):
    """ppl(model in summary) / ppl(ref_model in ref) with the paired-bootstrap CI, on the same held-out chunks."""
    from darwinlm.run.report import ppl_ratio_ci

    def row(sm, m):
        rows = sm["rows"] if set_name == "heldout" else sm.get("extra_rows", {}).get(set_name, [])
        return next((r for r in rows if r["model"] == m and r["stage"] == stage and "chunk_nll" in r), None)

    a, b = row(summary, model), row(ref, ref_model)
    if a is None or b is None:
        return None
    if a["chunk_tokens"] != b["chunk_tokens"]:
        raise SystemExit(f"{set_name}: the variants were evaluated on different held-out chunks")
    return list(ppl_ratio_ci(a["chunk_nll"], b["chunk_nll"], a["chunk_tokens"], resamples=resamples))


def run(args) -> dict:
    from darwinlm.run.runner import run_search
    from darwinlm.run.workspace import Workspace

    base = load_spec(args.spec)
    docs = None if args.no_python_docs or not PYTHON_DOCS.is_dir() else PYTHON_DOCS
    runs: list[tuple[str, int]] = []  # (variant, scale) in run order: the cheap ones first
    if "e" in args.variants:
        runs.append(("e", 1))
    for scale in args.scales:
        runs += [(v, scale) for v in ("f", "c", "b", "d") if v in args.variants or (v == "f" and "a" in args.variants)]
    results: dict = {}
    summaries: dict = {}
    for v, scale in runs:
        specs = variant_specs(base, store=args.store, scale=scale, python_docs=docs)
        spec = specs[v]
        t0 = time.time()
        log.info("variant %s x%d (%s): search %s in %s", v, scale, LABELS[v], spec.name, spec.store)
        ws = run_search(spec) if not args.report_only else Workspace(spec)
        wall = time.time() - t0
        if not ws.store.exists(layout.SUMMARY):
            log.warning("variant %s x%d: %s/%s missing (run without --report-only)", v, scale, ws.store.uri,
                        layout.SUMMARY)
            continue
        summary = ws.store.get_json(layout.SUMMARY)
        key = v if v == "e" else f"{v}x{scale}"
        summaries[key] = summary
        results[key] = {"variant": v, "scale": scale, "search": spec.name,
                        "generations": spec.search.generations, "wall_seconds_this_call": round(wall, 1),
                        "sets": _entry(summary, "searched"), **_search_cost(ws)}
        if v == "f" and scale == args.scales[0] and "a" in args.variants:
            results["a"] = {"variant": "a", "scale": None, "search": None, "source": spec.name,
                            "sets": _entry(summary, "uniform")}
        if v == "d" and not args.no_cross_eval:
            ref = specs["f"]
            log.info("re-evaluating variant d against the fp32 dense")
            results[key]["vs_fp32_dense"] = cross_evaluate(Workspace(ref), ws)
        log.info("variant %s x%d done in %.0fs", v, scale, wall)

    # the uniform model is (f)'s baseline at the first scale: compare every variant with it chunk by chunk
    ref = summaries.get(f"fx{args.scales[0]}")
    if ref is not None:
        resamples = base.evaluation.bootstrap
        for key, r in results.items():
            if key == "a":
                continue
            for set_name, e in r["sets"].items():
                for stage, k in (("one-shot", "oneshot"), ("post-trained", "posttrained")):
                    if e.get(f"{k}_vs_uniform") is None:
                        e[f"{k}_vs_uniform"] = _paired(summaries[key], "searched", ref, "uniform", set_name, stage,
                                                       resamples)
        if "e" in summaries:
            for key, r in results.items():
                if r["variant"] == "f":
                    r["sets"]["heldout"]["oneshot_vs_e"] = _paired(summaries[key], "searched", summaries["e"],
                                                                   "searched", "heldout", "one-shot", resamples)
    goals: dict = {}
    if "e" in results and "a" in results:
        e, a = results["e"]["sets"]["heldout"], results["a"]["sets"]["heldout"]
        goals["e_le_0.75_uniform_oneshot"] = {"ratio": e["oneshot_vs_uniform"], "pass": e["oneshot_vs_uniform"][0] <= 0.75}
    f1 = results.get(f"fx{args.scales[0]}")
    if f1 is not None:
        for set_name, e in f1["sets"].items():
            for stage, bound in (("oneshot", 0.65), ("posttrained", 0.85)):
                r = e.get(f"{stage}_vs_uniform")
                if r is not None:
                    goals[f"f_{set_name}_{stage}_le_{bound}_uniform"] = {
                        "ratio": r, "pass": r[0] <= bound and (r[2] is None or r[2] < 1)}
        if "e" in results:
            pe, pf = results["e"]["sets"]["heldout"]["oneshot_ppl"], f1["sets"]["heldout"]["oneshot_ppl"]
            goals["f_beats_e_by_5pct_oneshot"] = {"ppl_e": pe, "ppl_f": pf,
                                                  "ratio": f1["sets"]["heldout"].get("oneshot_vs_e") or pf / pe,
                                                  "pass": pf <= 0.95 * pe}
    return {"spec": str(args.spec), "store": args.store or base.store, "base_generations": base.search.generations,
            "scales": args.scales, "offspring": base.search.offspring,
            "selection": [{"survivors": s.survivors, "fitness_tokens": s.fitness_tokens,
                           "finetune_tokens": s.finetune_tokens} for s in base.search.selection],
            "sensitivity_tokens": base.search.sensitivity.tokens, "posttrain_tokens": base.posttrain.tokens,
            "python_docs": str(docs) if docs else None, "variants": results, "goals": goals}


def _f(x, fmt):
    return "-" if x is None else format(x, fmt)


def _ci(r):
    if r is None:
        return "-"
    return f"{r[0]:.3f}" if r[1] is None else f"{r[0]:.3f} [{r[1]:.3f}, {r[2]:.3f}]"


def table(res: dict) -> str:
    lines = [(f"SmolLM2-135M ablation: quick example x {res['scales']} generations ({res['base_generations']} at 1x), "
              f"{res['offspring']} offspring, stages "
              f"{[(s['survivors'], s['fitness_tokens'], s['finetune_tokens']) for s in res['selection']]} "
              f"(survivors, fitness tokens, fine-tune tokens); sensitivity table {res['sensitivity_tokens']} tokens; "
              f"post-training {res['posttrain_tokens']} tokens; store {res['store']}")]
    v = res["variants"]
    sets = sorted({s for e in v.values() for s in e["sets"]}, key=lambda s: (s != "heldout", s))
    for set_name in sets:
        title = "Brown held-out" if set_name == "heldout" else set_name
        lines += ["", f"{title}: perplexity (lower is better) and searched / uniform with its paired-bootstrap 95% CI",
                  "", ("| variant | generations run | non-emb params | one-shot ppl | one-shot KL | vs uniform | "
                       "post-trained ppl | vs uniform | search s |"),
                  "|---|---:|---:|---:|---:|---|---:|---|---:|"]
        for key, e in v.items():
            s = e["sets"].get(set_name)
            if s is None:
                continue
            name = f"({e['variant']}) {LABELS[e['variant']]}" + (f", {e['scale']}x" if e.get("scale") and e["variant"] != "e" else "")
            lines.append(f"| {name} | {_f(e.get('generations_run'), 'd')} | {s['nonembedding_params']:,} | "
                         f"{_f(s['oneshot_ppl'], '.2f')} | {_f(s['oneshot_kl'], '.4f')} | {_ci(s.get('oneshot_vs_uniform'))} | "
                         f"{_f(s['posttrained_ppl'], '.2f')} | {_ci(s.get('posttrained_vs_uniform'))} | "
                         f"{_f(e.get('search_seconds'), '.0f')} |")
    lines.append("")
    for name, g in res["goals"].items():
        shown = {k: (round(x, 4) if isinstance(x, float) else x) for k, x in g.items() if k != "pass"}
        lines.append(f"goal {name}: {shown}: {'PASS' if g['pass'] else 'FAIL'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default=str(REPO / "examples/smollm2-quick.yaml"), help="base spec (default: the quick example)")
    p.add_argument("--store", default=None, help="store URI for all variants (default: the spec's store)")
    p.add_argument("--scales", default="1,3", help="multiples of the spec's generations to run the searches at (default 1,3)")
    p.add_argument("--variants", default="abcef", help="which of a-f to run/report (default: abcef; d = reference numerics)")
    p.add_argument("--no-python-docs", action="store_true", help="evaluate on Brown only")
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
    args.scales = [int(x) for x in args.scales.split(",") if x.strip()]
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    res = run(args)
    print(json.dumps(res, indent=1) if args.json else table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
