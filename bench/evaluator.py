"""Evaluator benchmark: generations through the reference loop, darwinlm's faithful path and its fast path.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/evaluator.py                 # SmolLM2 quick schedule, 8 offspring
    HF_HUB_OFFLINE=1 .venv/bin/python bench/evaluator.py --offspring 6 --json out.json
    HF_HUB_OFFLINE=1 .venv/bin/python bench/evaluator.py --generations 3 --repeat 2 \
        --paths baseline,faithful,fast,faithful-torchadam,faithful-ref

Every path runs generation ``g`` (``--generation``, ``--generations`` of them, each from the even parent)
with the same offspring, fitness batches and training batches, in one process, through the same
``search.run_generation`` (the same selection loop). Paths:

- ``baseline``: bench/baselines_eval.py, the reference's evaluation (deep copy of the parent-level model,
  reload of the changed layers from disk, cold fine-tune with torch's default AdamW kernel, KL against a
  teacher cache). Its one-time set-up (writing the dense-shaped per-level database) is not timed.
- ``faithful``: ``Evaluator`` as the library builds it, with ``mode: mask`` and cold fine-tuning every
  stage (the reference's math; fused AdamW kernel, the library default).
- ``fast``: ``mode: shrink`` + ``warm_start`` (+ the fused AdamW kernel).
- ``faithful-torchadam`` (optional): faithful with torch's default AdamW kernel, i.e. the baseline's
  kernel too, so equality with the baseline does not rest on the two kernels rounding alike.
- ``faithful-ref`` (optional): faithful with the reference's independent per-stage training batches
  (``warm_start: false`` sampling); its rank agreement with ``faithful`` shows how much the ranking moves
  with the training sample alone (the scale against which fast's agreement is judged).

The training batches of baseline/faithful/fast are the nested ones of ``warm_start`` (stage ``s`` = a prefix
of one permutation); each is still a uniform sample without replacement, as the reference draws per stage.
The teacher's logits are computed before each timed generation (the reference computes them once for the
whole calibration pool before the search; darwinlm's cache keeps them across generations).
Reports wall and CPU seconds per generation, ratios vs the baseline, the largest fitness difference vs the
baseline, Spearman/Kendall rank correlations of fitness vs faithful over the candidates both evaluated in a
stage, and whether the survivors and the winner are the same.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import pathlib
import sys
import tempfile
import time

_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PATHS = ("baseline", "faithful", "fast", "faithful-torchadam", "faithful-ref")


# -- rank statistics (no scipy) ----------------------------------------------------------------------------
def rankdata(xs: list[float]) -> list[float]:
    """Ranks 1..n, ties get their average rank."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def _pearson(a: list[float], b: list[float]) -> float:
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    va = sum((x - ma) ** 2 for x in a)
    vb = sum((y - mb) ** 2 for y in b)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else float("nan")


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rho: the Pearson correlation of the (average) ranks."""
    return _pearson(rankdata(a), rankdata(b)) if len(a) >= 2 else float("nan")


def kendall_tau_b(a: list[float], b: list[float]) -> float:
    """Kendall's tau-b (tie-corrected), O(n^2)."""
    conc = disc = ties_a = ties_b = 0
    n = len(a)
    for i in range(n):
        for j in range(i + 1, n):
            da, db = a[i] - a[j], b[i] - b[j]
            if da == 0 and db == 0:
                continue
            if da == 0:
                ties_a += 1
            elif db == 0:
                ties_b += 1
            elif (da > 0) == (db > 0):
                conc += 1
            else:
                disc += 1
    den = math.sqrt((conc + disc + ties_a) * (conc + disc + ties_b))
    return (conc - disc) / den if den > 0 else float("nan")


# -- set-up ------------------------------------------------------------------------------------------------
def ensure_database(ws) -> None:
    from darwinlm.llm.database import build_shard, finalize

    spec = ws.spec
    digest = ws.pools.calibration.digest()
    if finalize(ws.model, spec.database, ws.root, ws.db_key, digest, spec.database.shards) is None:
        print(f"building the layer database into {ws.root.uri} (once) ...", flush=True)
        for k in range(spec.database.shards):
            build_shard(ws.model, spec.database, spec.model.compute_dtype, ws.pools.calibration, ws.root,
                        ws.db_key, k, spec.database.shards)
        finalize(ws.model, spec.database, ws.root, ws.db_key, digest, spec.database.shards)


def _scores(state: dict) -> list[dict]:
    """Per stage: {genome id: fitness}."""
    from darwinlm.run.search import genome_id

    class _G:  # genome_id only needs to_dict()
        def __init__(self, d):
            self.d = d

        def to_dict(self):
            return self.d

    return [{genome_id(_G(g)): s for g, s in zip(h["pool"], h["scores"])} for h in state["stages"]]


def compare(a: dict, b: dict) -> dict:
    """Fitness differences and rank agreement of two generation states (same generation)."""
    sa, sb = _scores(a), _scores(b)
    diffs, rel, stages = [], [], []
    for si, (x, y) in enumerate(zip(sa, sb)):
        common = sorted(set(x) & set(y))
        xs = [x[k] for k in common]
        ys = [y[k] for k in common]
        diffs += [abs(p - q) for p, q in zip(xs, ys)]
        rel += [abs(p - q) / max(abs(q), 1e-30) for p, q in zip(xs, ys)]
        kept_a = [a["stages"][si]["pool"][i] for i in a["stages"][si]["kept"]]
        kept_b = [b["stages"][si]["pool"][i] for i in b["stages"][si]["kept"]]
        stages.append({"stage": si, "common": len(common), "spearman": spearman(xs, ys),
                       "kendall": kendall_tau_b(xs, ys), "same_survivors": kept_a == kept_b})
    return {"max_abs_diff": max(diffs, default=float("nan")), "max_rel_diff": max(rel, default=float("nan")),
            "stages": stages, "same_winner": a["winner"] == b["winner"]}


def _strip(state: dict) -> dict:
    return {k: v for k, v in state.items() if k != "seconds"}


def run_path(name: str, ws, spec, parent, kids, g: int, workdir: str) -> dict:
    from bench.baselines_eval import ReferenceEvaluator
    from darwinlm.llm.data import sample_exact
    from darwinlm.llm.fitness import TeacherCache
    from darwinlm.core.rng import derive_rng
    from darwinlm.run.search import Evaluator, run_generation
    from darwinlm.spec import with_overrides
    from darwinlm.store import open_store

    cd = spec.model.compute_dtype
    ft = {"baseline": {"mode": "mask", "warm_start": True},  # warm_start: only the nested batches
          "faithful": {"mode": "mask", "warm_start": True},
          "faithful-torchadam": {"mode": "mask", "warm_start": True},
          "faithful-ref": {"mode": "mask", "warm_start": False},
          "fast": {"mode": "shrink", "warm_start": True}}[name]
    pspec = with_overrides(spec, **{f"search.finetune.{k}": v for k, v in ft.items()})
    gc.collect()
    if name == "baseline":
        evaluate = ReferenceEvaluator(ws.model, ws.db, parent, kids, pspec.search, cd, workdir=workdir)
        teacher_get = evaluate._teacher_logp
    else:
        teacher = TeacherCache(ws.model, cd, kind=pspec.search.fitness.kind, topk=pspec.search.fitness.topk)
        evaluate = Evaluator(ws.builder, teacher, pspec.search, cd, warm_start=name == "fast",
                             fused=name != "faithful-torchadam")
        teacher_get = teacher.get
    # The reference computes the teacher logits of the whole calibration pool once, before the search
    # (ALGORITHM.md §3.6); darwinlm's LRU cache holds them across generations (SmolLM2's whole 16K-token
    # pool fits). So the teacher is not part of a generation's time: computed here, untimed, per path.
    t0 = time.process_time()
    for si, st in enumerate(pspec.search.selection):
        for c in sample_exact(ws.search_pools.calibration, st.fitness_tokens,
                              derive_rng(pspec.seed, "fitness-batch", g, si)):
            teacher_get(c)
    teacher_cpu = time.process_time() - t0
    store = open_store(f"file://{tempfile.mkdtemp(prefix=f'gen-{name}-', dir=workdir)}")
    t0, c0 = time.perf_counter(), time.process_time()
    res = run_generation(g, parent, ws.space, pspec, ws.search_pools, evaluate, store)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    stats = getattr(evaluate, "stats", {})
    if hasattr(evaluate, "close"):
        evaluate.close()
    del evaluate
    gc.collect()
    return {"path": name, "wall_s": wall, "cpu_s": cpu, "teacher_cpu_s": teacher_cpu, "state": res.state,
            "stats": dict(stats)}


def _mean(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else float("nan")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", default=str(_ROOT / "examples" / "smollm2-quick.yaml"))
    ap.add_argument("--store", default=None, help="store URI holding (or receiving) the layer database; "
                                                  "default: the spec's")
    ap.add_argument("--offspring", type=int, default=None, help="offspring per generation (default: the spec's)")
    ap.add_argument("--generation", type=int, default=0, help="first generation index (offspring and batches)")
    ap.add_argument("--generations", type=int, default=1,
                    help="independent generations (each from the even parent, own offspring and batches)")
    ap.add_argument("--paths", default="baseline,faithful,fast", help=f"comma-separated, of {', '.join(PATHS)}")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: the least disturbed by other jobs; 0 = torch's default)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per path and generation, in ABC/CBA order; times are means (default 1)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    import torch

    from darwinlm.core.mutation import sample_offspring
    from darwinlm.core.rng import derive_rng
    from darwinlm.spec import load_spec, with_overrides
    from darwinlm.run.workspace import Workspace

    if args.threads:
        torch.set_num_threads(args.threads)
    paths = [p for p in args.paths.split(",") if p]
    bad = [p for p in paths if p not in PATHS]
    if bad:
        ap.error(f"unknown paths {bad}; choose from {PATHS}")
    os.chdir(_ROOT)  # the example spec's store is relative (./runs)
    spec = load_spec(args.spec)
    over = {"name": "bench-evaluator"}  # never a real search's records (only the shared layer database)
    if args.offspring:
        over["search.offspring"] = args.offspring
    if args.store:
        over["store"] = args.store
    spec = with_overrides(spec, **over)
    ws = Workspace(spec)
    ensure_database(ws)
    ws.model.requires_grad_(False)
    parent = ws.uniform_genome()
    gens = list(range(args.generation, args.generation + args.generations))

    per_gen: dict[int, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="darwinlm-bench-eval-") as workdir:
        k = 0
        for g in gens:
            kids = sample_offspring(parent, ws.space, spec.search.offspring, derive_rng(spec.seed, "mutation", g),
                                    max_flips=spec.search.max_flips)
            for x in [parent, *kids]:  # warm the database's in-memory cache: steady state for every path
                ws.builder.plan(x)
            runs: dict[str, list] = {p: [] for p in paths}
            for rep in range(args.repeat):
                # ABC, CBA, ...: a drift in the machine's load over the run hits every path alike
                for name in (paths if k % 2 == 0 else paths[::-1]):
                    print(f"[gen {g} {name}] run {rep + 1}/{args.repeat} ...", flush=True)
                    r = run_path(name, ws, spec, parent, kids, g, workdir)
                    runs[name].append(r)
                    print(f"[gen {g} {name}] {r['wall_s']:.1f}s wall, {r['cpu_s']:.1f}s cpu, winner fitness "
                          f"{r['state']['best_fitness']:.5f} {r['stats']}", flush=True)
                k += 1
            per_gen[g] = {}
            for name, rs in runs.items():
                per_gen[g][name] = {
                    "state": rs[0]["state"], "stats": rs[0]["stats"], "teacher_cpu_s": rs[0]["teacher_cpu_s"],
                    "wall_s": _mean([x["wall_s"] for x in rs]), "cpu_s": _mean([x["cpu_s"] for x in rs]),
                    "runs": [{"wall_s": round(x["wall_s"], 2), "cpu_s": round(x["cpu_s"], 2)} for x in rs],
                    "repeat_identical": all(_strip(x["state"]) == _strip(rs[0]["state"]) for x in rs)}

    rows = []
    for name in paths:
        row = {"path": name, "generations": []}
        for g in gens:
            r = per_gen[g][name]
            gr = {"generation": g, "wall_s": round(r["wall_s"], 2), "cpu_s": round(r["cpu_s"], 2),
                  "runs": r["runs"], "repeat_identical": r["repeat_identical"],
                  "teacher_cpu_s_untimed": round(r["teacher_cpu_s"], 2), "evaluations": r["state"]["evaluations"],
                  "best_fitness": r["state"]["best_fitness"], "trained_tokens": r["stats"].get("train_tokens"),
                  "stats": r["stats"]}
            if "baseline" in per_gen[g]:
                gr["vs_baseline"] = compare(r["state"], per_gen[g]["baseline"]["state"])
            if "faithful" in per_gen[g] and name != "faithful":
                gr["vs_faithful"] = compare(r["state"], per_gen[g]["faithful"]["state"])
            row["generations"].append(gr)
        G = row["generations"]
        row["wall_s"] = _mean([x["wall_s"] for x in G])
        row["cpu_s"] = _mean([x["cpu_s"] for x in G])
        row["trained_tokens"] = _mean([x["trained_tokens"] for x in G])
        if "baseline" in paths:
            base = next(r for r in rows if r["path"] == "baseline") if name != "baseline" else row
            row["speedup_wall"] = base["wall_s"] / row["wall_s"]
            row["speedup_cpu"] = base["cpu_s"] / row["cpu_s"]
            row["max_abs_diff_vs_baseline"] = max(x["vs_baseline"]["max_abs_diff"] for x in G)
            row["max_rel_diff_vs_baseline"] = max(x["vs_baseline"]["max_rel_diff"] for x in G)
        if G and "vs_faithful" in G[0]:
            vf = [x["vs_faithful"] for x in G]
            row["spearman_stage0"] = _mean([v["stages"][0]["spearman"] for v in vf])
            row["kendall_stage0"] = _mean([v["stages"][0]["kendall"] for v in vf])
            row["spearman_by_stage"] = [_mean([v["stages"][s]["spearman"] for v in vf if len(v["stages"]) > s])
                                        for s in range(len(spec.search.selection))]
            row["same_survivors"] = sum(all(st["same_survivors"] for st in v["stages"]) for v in vf)
            row["same_winner"] = sum(v["same_winner"] for v in vf)
        rows.append(row)

    print()
    print(f"SmolLM2 evaluator benchmark: {spec.name}, generations {gens}, {spec.search.offspring} offspring, "
          f"{args.repeat} run(s) per path, "
          f"stages {[(s.survivors, s.fitness_tokens, s.finetune_tokens) for s in spec.search.selection]}, "
          f"{torch.get_num_threads()} thread(s), load avg {os.getloadavg()[0]:.1f}")
    hdr = (f"{'path':<19}{'s/gen wall':>11}{'s/gen cpu':>10}{'x wall':>8}{'x cpu':>7}{'tokens':>8}"
           f"{'max|dfit| base':>16}{'rho s0':>8}{'tau s0':>8}  {'rho by stage':<16}{'same surv/winner':>17}")
    print(hdr)
    print("-" * len(hdr))
    n = len(gens)
    for row in rows:
        rho = tau = by = win = "-"
        if "spearman_stage0" in row:
            rho, tau = f"{row['spearman_stage0']:.3f}", f"{row['kendall_stage0']:.3f}"
            by = "/".join("n/a" if math.isnan(x) else f"{x:.2f}" for x in row["spearman_by_stage"])
            win = f"{row['same_survivors']}/{n}, {row['same_winner']}/{n}"
        print(f"{row['path']:<19}{row['wall_s']:>11.1f}{row['cpu_s']:>10.1f}"
              f"{row.get('speedup_wall', float('nan')):>8.2f}{row.get('speedup_cpu', float('nan')):>7.2f}"
              f"{row['trained_tokens']:>8.0f}{row.get('max_abs_diff_vs_baseline', float('nan')):>16.2e}"
              f"{rho:>8}{tau:>8}  {by:<16}{win:>17}")
    print("x = baseline time / path time; rho/tau: Spearman/Kendall of fitness vs faithful over the candidates "
          "both scored in a stage (mean over generations); same surv/winner: generations with identical "
          "survivors in every stage / the same winner. Teacher logits precomputed untimed (as the reference).")
    out = {"spec": spec.name, "generations": gens, "offspring": spec.search.offspring, "repeat": args.repeat,
           "stages": [[s.survivors, s.fitness_tokens, s.finetune_tokens] for s in spec.search.selection],
           "threads": torch.get_num_threads(), "rows": rows,
           "states": {g: {k: v["state"] for k, v in d.items()} for g, d in per_gen.items()}}
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=1, default=str))
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
