"""Evaluation and the human-readable result: ``report.md``, ``fitness.png`` and ``summary.json``.

Why this module exists: a search is only worth its held-out numbers. Dense, the uniform baseline at the
same level budget (same parameter count) and the searched configuration are scored on the held-out pool
(perplexity and KL to dense), one-shot and after the same post-training, in one paired pass over the
same chunks.
"""

from __future__ import annotations

import io
import logging
import math

import torch
import torch.nn.functional as F

from .adapter import adapter_for
from .runtime import autocast
from .search import state_key

log = logging.getLogger(__name__)

__all__ = ["evaluate_models", "evaluate_and_report"]


@torch.no_grad()
def evaluate_models(dense, models: dict, chunks, compute_dtype: str, progress=None) -> dict[str, dict]:
    """Held-out ppl and KL(dense ‖ model) for every model, chunk by chunk (the dense pass is shared)."""
    device = next(dense.parameters()).device
    acc = {name: {"nll": 0.0, "kl": 0.0} for name in models}
    n = 0
    for c in chunks:
        ids = c.view(1, -1).to(device)
        with autocast(device, compute_dtype):
            t = F.log_softmax(dense(input_ids=ids, use_cache=False).logits[0, :-1].float(), -1)  # [T-1, V]
        target = ids[0, 1:]
        for name, m in models.items():
            with autocast(device, compute_dtype):
                s = F.log_softmax(m(input_ids=ids, use_cache=False).logits[0, :-1].float(), -1)
            acc[name]["nll"] += float(F.nll_loss(s, target, reduction="sum"))
            acc[name]["kl"] += float((t.exp() * (t - s)).sum())
        n += target.numel()
        if progress is not None:
            progress(1)
    return {k: {"ppl": math.exp(v["nll"] / n), "kl": v["kl"] / n, "tokens": n} for k, v in acc.items()}


def _rows(ws, progress):
    from .tasks import load_posttrained

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
    chunks = list(ws.pools.heldout.chunks)
    if spec.evaluation.heldout_tokens:
        from .data import TokenPool, sample_exact
        from .rng import derive_rng

        chunks = sample_exact(TokenPool("heldout", tuple(chunks)), spec.evaluation.heldout_tokens, derive_rng(0, "eval"))
    bar = progress("evaluate (held-out)", len(chunks))
    scores = evaluate_models(ws.model, models, chunks, spec.model.compute_dtype, bar)
    rows = []
    for key, m in models.items():
        name, stage = labels[key]
        rows.append({"model": name, "stage": stage, "nonembedding_params": adapter_for(m).nonembedding_param_count(m),
                     **scores[key]})
    return rows


def _fitness_curve(ws) -> list[dict]:
    out = []
    for g in range(ws.spec.search.generations):
        st = ws.store.get_json(state_key(g))
        out.append({"generation": g, "best_fitness": st["best_fitness"], "parent_survived": st["parent_survived"]})
    return out


def _plot(curve, genome, space) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    if curve:
        a.plot([c["generation"] for c in curve], [c["best_fitness"] for c in curve], marker="o")
    a.set_xlabel("generation")
    a.set_ylabel("fitness of the survivor (lower is better)")
    a.set_title("search progress")
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


def _markdown(ws, rows, curve, genome) -> str:
    spec = ws.spec
    dense = next(r for r in rows if r["model"] == "dense")
    lines = [f"# DarwinLM result: {spec.name}", "",
             f"Model `{spec.model.path}`, seed {spec.seed}, target {_target(spec)}, "
             f"{spec.search.generations} generations × {spec.search.offspring} offspring.", "",
             "| model | stage | non-embedding params | % of dense | held-out ppl | KL to dense |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['stage']} | {r['nonembedding_params']:,} | "
                     f"{100 * r['nonembedding_params'] / dense['nonembedding_params']:.1f} | {r['ppl']:.2f} | {r['kl']:.4f} |")
    from .export import target_params

    lines += ["", f"Target: {target_params(ws):,} non-embedding parameters. Held-out tokens: {dense['tokens']:,}. Uniform = every layer at (nearly) the same level, "
              "the same level sums as the search.", "", "![fitness](fitness.png)", "", "## Search", "",
              "| generation | survivor fitness | parent kept |", "|---:|---:|---|"]
    lines += [f"| {c['generation']} | {c['best_fitness']:.5f} | {c['parent_survived']} |" for c in curve]
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
    rows = _rows(ws, progress)
    curve = _fitness_curve(ws)
    genome = ws.final_genome()
    ws.store.put_bytes("result/fitness.png", _plot(curve, genome, ws.space))
    ws.store.put_bytes("result/report.md", _markdown(ws, rows, curve, genome).encode())
    summary = {"rows": rows, "fitness_curve": curve, "configuration": genome.to_dict()}
    for r in rows:
        log.info("%-8s %-12s params %11d  ppl %8.2f  KL %.4f", r["model"], r["stage"], r["nonembedding_params"],
                 r["ppl"], r["kl"])
    return summary
