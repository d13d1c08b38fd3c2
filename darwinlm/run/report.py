"""Evaluation and the human-readable result: ``report.md``, ``fitness.png`` and ``summary.json``.

Why this module exists: a search is only worth its held-out numbers. Dense, the uniform baseline at the
same level budget (same parameter count) and the searched configuration are scored on the held-out pool
(perplexity and KL to dense), one-shot and after the same post-training, in one paired pass over the
same chunks, and on every ``evaluation.extra_heldout`` text. The comparison a user wants, searched vs
uniform at equal size, leads the report, with a 95% confidence interval from a paired bootstrap over the
held-out chunks (it captures held-out sampling, not the search's own randomness: one seed is one search).
"""

from __future__ import annotations

import io
import logging
import math

import numpy as np
import torch
import torch.nn.functional as F

from darwinlm.core.plan import generations_planned
from darwinlm.core.rng import derive_rng
from darwinlm.llm.adapter import adapter_for
from darwinlm.llm.data import TokenPool, build_heldout_set, sample_exact
from darwinlm.llm.runtime import autocast
from darwinlm.store import layout

from .export import target_params
from .workspace import load_posttrained

log = logging.getLogger(__name__)

__all__ = ["evaluate_models", "evaluate_and_report", "ppl_ratio_ci"]


@torch.no_grad()
def evaluate_models(dense, models: dict, chunks, compute_dtype: str, progress=None) -> dict[str, dict]:
    """Held-out ppl and KL(dense ‖ model) for every model, chunk by chunk (the dense pass is shared).

    Besides ``ppl``, ``kl`` and ``tokens``, each entry keeps ``chunk_nll`` and ``chunk_tokens`` (summed NLL
    and scored tokens per chunk) for paired comparisons (:func:`ppl_ratio_ci`)."""
    device = next(dense.parameters()).device
    acc = {name: {"nll": [], "kl": 0.0} for name in models}
    counts = []
    for c in chunks:
        ids = c.view(1, -1).to(device)
        with autocast(device, compute_dtype):
            t = F.log_softmax(dense(input_ids=ids, use_cache=False).logits[0, :-1].float(), -1)  # [T-1, V]
        target = ids[0, 1:]
        for name, m in models.items():
            with autocast(device, compute_dtype):
                s = F.log_softmax(m(input_ids=ids, use_cache=False).logits[0, :-1].float(), -1)
            acc[name]["nll"].append(float(F.nll_loss(s, target, reduction="sum")))
            acc[name]["kl"] += float((t.exp() * (t - s)).sum())
        counts.append(int(target.numel()))
        if progress is not None:
            progress(1)
    n = sum(counts)
    return {k: {"ppl": math.exp(sum(v["nll"]) / n), "kl": v["kl"] / n, "tokens": n,
                "chunk_nll": v["nll"], "chunk_tokens": counts} for k, v in acc.items()}


def ppl_ratio_ci(nll_a, nll_b, tokens, *, resamples: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float | None, float | None]:
    """ppl(a) / ppl(b) on the same chunks, and its percentile interval from a paired bootstrap over chunks.

    ``nll_*[i]`` is the summed NLL of chunk i and ``tokens[i]`` its scored tokens. ``resamples`` 0: no
    interval (None, None)."""
    a, b, n = (np.asarray(x, dtype=np.float64) for x in (nll_a, nll_b, tokens))
    ratio = math.exp((a.sum() - b.sum()) / n.sum())
    if resamples <= 0 or len(n) < 2:
        return ratio, None, None
    idx = np.random.default_rng(seed).integers(0, len(n), size=(resamples, len(n)))  # [resamples, chunks]
    log_ratios = (a[idx].sum(1) - b[idx].sum(1)) / n[idx].sum(1)
    lo, hi = np.quantile(log_ratios, [(1 - level) / 2, (1 + level) / 2])
    return ratio, math.exp(lo), math.exp(hi)


def _models(ws):
    """{key: model} and {key: (model name, stage)} of everything the report compares."""
    spec = ws.spec
    models = {"dense": ws.model}
    labels = {"dense": ("dense", "-")}
    if "uniform" in spec.evaluation.baselines:
        models["uniform"] = ws.builder.shrunk(ws.uniform_genome())
        labels["uniform"] = ("uniform", "one-shot")
    models["searched"] = ws.builder.shrunk(ws.final_genome())
    labels["searched"] = ("searched", "one-shot")
    if spec.posttrain.enabled:
        for v in ("uniform", "searched"):
            if v in models:
                models[f"{v}+pt"] = load_posttrained(ws, v)
                labels[f"{v}+pt"] = (v, "post-trained")
    return models, labels


def _heldout_sets(ws) -> dict[str, list]:
    """{set name: chunks}: the main held-out pool (or its ``evaluation.heldout_tokens`` sample) and the extras."""
    spec = ws.spec
    chunks = list(ws.pools.heldout.chunks)
    if spec.evaluation.heldout_tokens:
        chunks = sample_exact(TokenPool("heldout", tuple(chunks)), spec.evaluation.heldout_tokens, derive_rng(0, "eval"))
    sets = {"heldout": chunks}
    for i, hs in enumerate(spec.evaluation.extra_heldout):
        sets[hs.name] = list(build_heldout_set(hs, ws.tokenizer, spec.data.seq_len, i).chunks)
    return sets


def _evaluate(ws, progress) -> tuple[dict[str, list[dict]], list[dict]]:
    """Rows per held-out set, and the searched-vs-uniform comparisons with their intervals."""
    spec = ws.spec
    models, labels = _models(ws)
    sets = _heldout_sets(ws)
    bar = progress("evaluate (held-out)", sum(len(c) for c in sets.values()))
    rows: dict[str, list[dict]] = {}
    comparisons = []
    for set_name, chunks in sets.items():
        scores = evaluate_models(ws.model, models, chunks, spec.model.compute_dtype, bar)
        rows[set_name] = [{"model": labels[k][0], "stage": labels[k][1],
                           "nonembedding_params": adapter_for(m).nonembedding_param_count(m),
                           **{f: scores[k][f] for f in ("ppl", "kl", "tokens")},
                           # per chunk, so runs that share the held-out chunks can be compared pairwise later
                           "chunk_nll": [float(x) for x in scores[k]["chunk_nll"]],
                           "chunk_tokens": [int(x) for x in scores[k]["chunk_tokens"]]} for k, m in models.items()]
        for stage, (u, s) in (("one-shot", ("uniform", "searched")), ("post-trained", ("uniform+pt", "searched+pt"))):
            if u not in scores or s not in scores:
                continue
            ratio, lo, hi = ppl_ratio_ci(scores[s]["chunk_nll"], scores[u]["chunk_nll"], scores[s]["chunk_tokens"],
                                         resamples=spec.evaluation.bootstrap)
            comparisons.append({"set": set_name, "stage": stage, "uniform_ppl": scores[u]["ppl"],
                                "searched_ppl": scores[s]["ppl"], "ratio": ratio, "ci_low": lo, "ci_high": hi,
                                "uniform_kl": scores[u]["kl"], "searched_kl": scores[s]["kl"],
                                "tokens": scores[s]["tokens"]})
    return rows, comparisons


def search_summary(ws) -> dict:
    """The search as the report shows it: the curve (tracking score of every generation's winner), how the
    first parent was chosen, and why the search stopped."""
    spec = ws.spec
    init = ws.init_record()
    tracking = init.get("tracking", {})
    curve = []
    for g in range(generations_planned(spec, ws.store)):
        st = ws.store.get_json(layout.generation_state(g))
        curve.append({"generation": g, "best_fitness": st["best_fitness"], "parent_survived": st["parent_survived"],
                      "tracking": st.get("tracking", {}).get("fitness"), "seconds": st.get("seconds")})
    G = spec.search.generations
    if ws.store.exists(layout.STOP):
        stop = ws.store.get_json(layout.STOP)
        why = f"stopped early after generation {stop['after']} of {G}: {stop['message']}"
    else:
        why = f"ran all {G} generations" + (f" (search.patience = {spec.search.patience} was not reached)"
                                            if spec.search.patience else "")
    return {"init": spec.search.init, "start_tracking": tracking.get("parent"), "uniform_tracking": tracking.get("uniform"),
            "tracking_tokens": tracking.get("tokens"), "sensitivity": init.get("sensitivity"), "curve": curve,
            "generations_run": len(curve), "stopped": why}


def _plot(search: dict, genome, space) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    curve = search["curve"]
    tracked = search["start_tracking"] is not None and all(c["tracking"] is not None for c in curve)
    if tracked:
        a.plot([-1] + [c["generation"] for c in curve], [search["start_tracking"]] + [c["tracking"] for c in curve],
               marker="o", label=f"winner ({search['init']} start at -1)")
        if search["uniform_tracking"] is not None:
            a.axhline(search["uniform_tracking"], color="gray", linestyle="--", label="uniform")
        a.set_ylabel(f"one-shot fitness on a fixed {search['tracking_tokens']}-token batch")
        a.legend()
    elif curve:
        a.plot([c["generation"] for c in curve], [c["best_fitness"] for c in curve], marker="o")
        a.set_ylabel("fitness of the survivor (fresh batch each generation)")
    a.set_xlabel("generation")
    a.set_title("search progress (lower is better)")
    a.grid(alpha=0.3)
    for group, marker in (("attn", "s"), ("mlp", "o")):
        names = space.groups.get(group, ())
        b.plot(range(len(names)), [space.ladders[n].fraction(genome[n]) for n in names], marker=marker, label=group)
    b.set_xlabel("block")
    b.set_ylabel("fraction removed")
    b.set_title("searched configuration")
    b.legend()
    b.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _ci(c: dict) -> str:
    if c["ci_low"] is None:
        return f"{c['ratio']:.3f}"
    return f"{c['ratio']:.3f} [{c['ci_low']:.3f}, {c['ci_high']:.3f}]"


def _markdown(ws, rows: dict[str, list[dict]], comparisons: list[dict], search: dict, genome) -> str:
    spec = ws.spec
    main = rows["heldout"]
    dense = next(r for r in main if r["model"] == "dense")
    searched = next(r for r in main if r["model"] == "searched")
    lines = [f"# DarwinLM result: {spec.name}", "",
             f"Model `{spec.model.path}`, seed {spec.seed}, target {_target(spec)}: "
             f"{searched['nonembedding_params']:,} non-embedding parameters "
             f"({100 * searched['nonembedding_params'] / dense['nonembedding_params']:.1f}% of dense). "
             f"Search: {search['init']} start, {search['generations_run']} generations × {spec.search.offspring} "
             f"offspring ({search['stopped']}).", ""]
    if comparisons:
        lines += ["## Searched vs uniform at the same size", "",
                  "Held-out perplexity (lower is better); ratio < 1 means the searched model is better. "
                  f"95% interval: paired bootstrap over held-out chunks ({spec.evaluation.bootstrap} resamples).", "",
                  "| held-out text | stage | uniform ppl | searched ppl | searched / uniform [95% CI] | uniform KL | searched KL |",
                  "|---|---|---:|---:|---|---:|---:|"]
        lines += [f"| {c['set']} | {c['stage']} | {c['uniform_ppl']:.2f} | {c['searched_ppl']:.2f} | {_ci(c)} | "
                  f"{c['uniform_kl']:.4f} | {c['searched_kl']:.4f} |" for c in comparisons]
        lines.append("")
    for set_name, set_rows in rows.items():
        d = next(r for r in set_rows if r["model"] == "dense")
        lines += [f"## All models: {set_name} ({d['tokens']:,} tokens)", "",
                  "| model | stage | non-embedding params | % of dense | held-out ppl | KL to dense |",
                  "|---|---|---:|---:|---:|---:|"]
        lines += [f"| {r['model']} | {r['stage']} | {r['nonembedding_params']:,} | "
                  f"{100 * r['nonembedding_params'] / d['nonembedding_params']:.1f} | {r['ppl']:.2f} | {r['kl']:.4f} |"
                  for r in set_rows]
        lines.append("")
    lines += [f"Target: {target_params(ws):,} non-embedding parameters. Uniform = every layer at (nearly) the "
              "same level, the same level sums as the search.", "", "![fitness](fitness.png)", "", "## Search", "",
              f"First parent: `{search['init']}`."]
    if search["sensitivity"]:
        s = search["sensitivity"]
        lines[-1] += (f" Sensitivity table: {s['tokens']} calibration tokens ({s['dtype']}); summed single-layer "
                      f"KL {s['additive_cost']:.4f} vs {s['uniform_additive_cost']:.4f} for uniform.")
    if search["start_tracking"] is not None:
        lines += ["", f"Tracking: every winner's one-shot fitness on one fixed {search['tracking_tokens']}-token "
                      f"calibration batch: start {search['start_tracking']:.5f}, uniform {search['uniform_tracking']:.5f}."]
    lines += ["", f"Stop: {search['stopped']}.", "",
              "| generation | tracking (fixed batch) | survivor fitness (fresh batch) | parent kept | seconds |",
              "|---:|---:|---:|---|---:|"]
    for c in search["curve"]:
        tr = "-" if c["tracking"] is None else f"{c['tracking']:.5f}"
        lines.append(f"| {c['generation']} | {tr} | {c['best_fitness']:.5f} | {c['parent_survived']} | "
                     f"{c['seconds'] if c['seconds'] is not None else '-'} |")
    lines += ["", "## Configuration (level per layer)", "", "| block | attention level | MLP level |", "|---:|---:|---:|"]
    space = ws.space
    attn, mlp = space.groups.get("attn", ()), space.groups.get("mlp", ())
    for i in range(max(len(attn), len(mlp))):
        a = genome[attn[i]] if i < len(attn) else "-"
        m = genome[mlp[i]] if i < len(mlp) else "-"
        lines.append(f"| {i} | {a} | {m} |")
    return "\n".join(lines) + "\n"


def _target(spec) -> str:
    t = spec.search.target
    return f"mean level {t.mean_level}" if t.mean_level is not None else f"remove {t.fraction:.0%} of prunable parameters"


def evaluate_and_report(ws, progress) -> dict:
    rows, comparisons = _evaluate(ws, progress)
    search = search_summary(ws)
    genome = ws.final_genome()
    ws.store.put_bytes(layout.FITNESS_PLOT, _plot(search, genome, ws.space))
    ws.store.put_bytes(layout.REPORT, _markdown(ws, rows, comparisons, search, genome).encode())
    summary = {"rows": rows["heldout"], "extra_rows": {k: v for k, v in rows.items() if k != "heldout"},
               "comparisons": comparisons, "search": search,
               "fitness_curve": [{k: c[k] for k in ("generation", "best_fitness", "parent_survived")}
                                 for c in search["curve"]],
               "configuration": genome.to_dict()}
    for set_name, set_rows in rows.items():
        for r in set_rows:
            log.info("%-10s %-8s %-12s params %11d  ppl %8.2f  KL %.4f", set_name, r["model"], r["stage"],
                     r["nonembedding_params"], r["ppl"], r["kl"])
    for c in comparisons:
        log.info("%s %s: searched / uniform ppl %s", c["set"], c["stage"], _ci(c))
    return summary
