#!/usr/bin/env python
"""Per-generation wall time of a generation task run by W=1 vs W=2 ``torch.distributed`` workers.

Every configuration runs the same generation tasks the same way a Kubernetes generation Job does: W
processes of ``darwinlm task SPEC generation-G`` (Gloo on CPU; ``MASTER_ADDR``/``MASTER_PORT``/``RANK``/
``WORLD_SIZE`` set for W > 1, nothing for W = 1), started together, for each generation in turn. So the
wall time of a generation includes process start, model load, token pools and the teacher cache, which
every worker pays; ``compute`` is the generation's own time measured inside ``run_generation`` (the
state's ``seconds``), i.e. the part that W divides.

Threads per worker = cores / W (``model.threads``), so every configuration uses all cores. Because
float reductions depend on the thread count, W=2 (1 thread each on 2 cores) is bit-identical to W=1
only at the same thread count: the bench adds a W=1 run at cores/2 threads (``--no-identity`` skips it)
and checks that its generation states equal W=2's (parent, winner, every stage's scores). Against W=1 at
cores threads it reports whether they happen to be equal too (they usually are not, and need not be).

All configurations share one store root (the spec's, default ``./runs`` of the quick example) so the
layer database (content-addressed) is built once, or reused; each configuration is a search of its own
named ``bench-dist-w<W>t<T>``, cleared first. ``--offspring``/``--generations`` shrink the schedule.

    .venv/bin/python bench/distributed.py                          # 2 generations of smollm2-quick
    .venv/bin/python bench/distributed.py --generations 1 --offspring 4 --json
    .venv/bin/python bench/distributed.py --one-job                # all generations in one process group
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from darwinlm.spec import load_spec, spec_to_dict, with_overrides  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(spec_file: Path, tasks: list[str], world: int, pin: bool, threads: int) -> float:
    """Run ``darwinlm task`` as ``world`` ranks; return the wall seconds until the last one exits."""
    port = str(_free_port())
    cores = sorted(os.sched_getaffinity(0))
    procs = []
    t0 = time.perf_counter()
    for rank in range(world):
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "JOB_COMPLETION_INDEX", "MASTER_ADDR", "MASTER_PORT")}
        if world > 1:
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE=str(world))
        mine = cores[rank * threads:(rank + 1) * threads] if pin else None
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "darwinlm.cli", "--log-level", "WARNING", "task", str(spec_file), *tasks],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            preexec_fn=(lambda m=mine: os.sched_setaffinity(0, m)) if mine else None))
    errors = []
    for rank, p in enumerate(procs):
        _, err = p.communicate()
        if p.returncode != 0:
            errors.append(f"rank {rank} exited {p.returncode}:\n{err[-3000:]}")
    if errors:
        raise SystemExit("\n".join(errors))
    return time.perf_counter() - t0


def _comparable(state: dict) -> dict:
    return {k: v for k, v in state.items() if k != "seconds"}


def run_config(base, root: str, world: int, threads: int, generations: int, one_job: bool, pin: bool,
               workdir: Path) -> dict:
    from darwinlm.core.plan import all_tasks
    from darwinlm.run.workspace import Workspace

    name = f"bench-dist-w{world}t{threads}"
    spec = with_overrides(base, name=name, store=root, model__threads=threads)
    ws = Workspace(spec)
    for key in ws.store.list():  # a fresh search every time (the database under <root>/databases stays)
        ws.store.delete(key)
    spec_file = workdir / f"{name}.json"
    spec_file.write_text(json.dumps(spec_to_dict(spec), indent=1))
    db_tasks = [t.name for t in all_tasks(spec)[0]]
    t0 = time.perf_counter()
    _launch(spec_file, db_tasks, 1, False, threads)  # builds the database once, or finds it (untimed)
    db_seconds = time.perf_counter() - t0
    gens = [f"generation-{g}" for g in range(generations)]
    rows = []
    if one_job:
        wall = _launch(spec_file, gens, world, pin, threads)
    for g, task in enumerate(gens):
        if not one_job:
            wall = _launch(spec_file, [task], world, pin, threads)
        state = ws.store.get_json(f"generations/{g:05d}/state.json")
        rows.append({"generation": g, "wall_s": round(wall, 2) if not one_job else None,
                     "compute_s": state["seconds"], "evaluations": state["evaluations"], "state": state})
    out = {"name": name, "workers": world, "threads": threads, "database_s": round(db_seconds, 1), "rows": rows}
    if one_job:
        out["job_wall_s"] = round(wall, 2)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--spec", default=str(REPO / "examples" / "smollm2-quick.yaml"))
    p.add_argument("--store", help="store root (default: the spec's store)")
    p.add_argument("--generations", type=int, default=2)
    p.add_argument("--offspring", type=int, help="offspring per generation (default: the spec's)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)),
                   help="cores to share: threads per worker = cores // W")
    p.add_argument("--no-identity", action="store_true", help="skip the W=1 run at the W>1 thread count")
    p.add_argument("--one-job", action="store_true", help="all generations in one process group per config")
    p.add_argument("--pin", action="store_true", help="pin rank r to its own cores (sched_setaffinity)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    base = load_spec(args.spec)
    over = {"search__generations": args.generations}
    if args.offspring:
        over["search__offspring"] = args.offspring
    base = with_overrides(base, **over)
    root = args.store or base.store
    configs = [(w, max(1, args.cores // w)) for w in args.workers]
    if not args.no_identity:
        configs += [(1, t) for w, t in list(configs) if w > 1 and (1, t) not in configs]
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"darwinlm-bench-dist-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    results = []
    for w, t in configs:
        print(f"running W={w} threads={t} ...", file=sys.stderr, flush=True)
        results.append(run_config(base, root, w, t, args.generations, args.one_job, args.pin, workdir))

    def by(w, t):
        return next((r for r in results if r["workers"] == w and r["threads"] == t), None)

    def mean(r, k):
        if k == "wall_s" and args.one_job:  # one wall time for all generations
            return r["job_wall_s"] / len(r["rows"])
        return statistics.mean(row[k] for row in r["rows"])

    def same(a, b):
        return all(_comparable(x["state"]) == _comparable(y["state"]) for x, y in zip(a["rows"], b["rows"]))

    summary = {"speedup": {}, "identical": {}}
    ref = by(1, max(1, args.cores))
    for r in results:
        if r["workers"] == 1:
            continue
        key = f"W={r['workers']} vs W=1"
        if ref is not None:
            summary["speedup"][key] = {
                "wall": round(mean(ref, "wall_s") / mean(r, "wall_s"), 3),
                "compute": round(mean(ref, "compute_s") / mean(r, "compute_s"), 3)}
            summary["identical"][f"W={r['workers']}t{r['threads']} == W=1t{ref['threads']}"] = same(r, ref)
        same_t = by(1, r["threads"])
        if same_t is not None and same_t is not ref:
            summary["identical"][f"W={r['workers']}t{r['threads']} == W=1t{r['threads']}"] = same(r, same_t)
            summary["speedup"][f"W={r['workers']} vs W=1 at {r['threads']} thread(s)"] = {
                "wall": round(mean(same_t, "wall_s") / mean(r, "wall_s"), 3),
                "compute": round(mean(same_t, "compute_s") / mean(r, "compute_s"), 3)}
    report = {"spec": args.spec, "generations": args.generations, "offspring": base.search.offspring,
              "selection": spec_to_dict(base)["search"]["selection"], "cores": args.cores,
              "one_job": args.one_job, "pin": args.pin, "loadavg_before": load0, "loadavg_after": os.getloadavg(),
              "configs": [{**r, "rows": [{k: v for k, v in row.items() if k != "state"} for row in r["rows"]]}
                          for r in results], **summary}
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"{args.spec}: {args.generations} generation(s), {base.search.offspring} offspring, "
          f"{report['configs'][0]['rows'][0]['evaluations']} evaluations/generation, {args.cores} cores, "
          f"{'one process group for all generations' if args.one_job else 'one process group per generation'}")
    print(f"{'W':>2} {'threads':>7} {'gen':>4} {'wall s':>8} {'compute s':>10}")
    for r in results:
        for row in r["rows"]:
            wall = f"{row['wall_s']:.1f}" if row["wall_s"] is not None else "-"
            print(f"{r['workers']:>2} {r['threads']:>7} {row['generation']:>4} {wall:>8} {row['compute_s']:>10.1f}")
        if args.one_job:
            print(f"{r['workers']:>2} {r['threads']:>7} {'all':>4} {r['job_wall_s']:>8.1f}")
    for k, v in summary["speedup"].items():
        print(f"speedup {k}: wall x{v['wall']}, compute x{v['compute']}")
    for k, v in summary["identical"].items():
        print(f"identical {k}: {v}")
    print(f"load average before/after: {load0[0]:.2f} / {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
