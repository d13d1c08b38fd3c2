"""A quick-example generation on a quiet machine vs next to one busy single-threaded process, per OpenMP wait policy.

    .venv/bin/python bench/busy_neighbour.py                          # 2 rounds, old and new default: ~15-30 min
    .venv/bin/python bench/busy_neighbour.py --offspring 4 --rounds 1 --policies old,new,spin10k --json out.json

Why: with torch's default of one OpenMP thread per core, the threads of a parallel region wait for each other
at its end. libgomp's default wait spins (GOMP_SPINCOUNT 300,000 iterations) before sleeping; when another
process takes one of the cores, the spinning thread burns the time slice its descheduled partner needs, and a
generation ran 4-8x slower (bench/README.md). darwinlm now sets ``OMP_WAIT_POLICY=PASSIVE`` (sleep at once)
when the environment says nothing about the wait policy (darwinlm/__init__.py).

Each measurement is ``darwinlm task SPEC generation-0`` in a fresh process (generation 0 of one search,
recomputed from scratch every time: its records are deleted first), with ``model.threads`` unset (torch's
default: one thread per core). The phases before it run once, untimed. Policies (the process environment):

- ``old``: ``GOMP_SPINCOUNT=300000``, libgomp's own default when the wait policy is unset and there are no
  more threads than cores, i.e. the behaviour before darwinlm set a policy;
- ``new``: nothing set: darwinlm's default (``OMP_WAIT_POLICY=PASSIVE``);
- ``spin10k``: ``GOMP_SPINCOUNT=10000`` (a short spin, then sleep), for comparison.

Conditions: ``quiet`` (nothing of ours running beside it) and ``busy`` (one ``while True: pass`` Python
process started just before and killed just after). Runs are interleaved (quiet/busy and the policy order
alternate by round) so a drift in the machine's load hits every cell alike; on a shared machine "quiet"
means "no extra process of ours", and the load average is recorded with every run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

POLICIES = {"old": {"GOMP_SPINCOUNT": "300000"}, "new": {}, "spin10k": {"GOMP_SPINCOUNT": "10000"}}
_CLEAN = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "RANK", "WORLD_SIZE")


def _task(spec_file: Path, tasks: list[str], policy: dict) -> float:
    env = {k: v for k, v in os.environ.items() if k not in _CLEAN}
    env.update(policy, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "darwinlm.cli", "--log-level", "WARNING", "task", str(spec_file), *tasks],
                       env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise SystemExit(f"darwinlm task {tasks} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def worker(spec_file: str) -> int:
    """``--worker``: load the quick example once, then time one candidate evaluation per line read from stdin.

    The evaluation is the library's (``search.Evaluator``, cold, the spec's fine-tune settings) of the uniform
    genome on the last stage's budget (fine-tune and fitness tokens), the unit a generation is made of."""
    from darwinlm.core.rng import derive_rng
    from darwinlm.llm.data import sample_at_least, sample_exact
    from darwinlm.run.search import Evaluator
    from darwinlm.run.workspace import Workspace
    from darwinlm.spec import load_spec

    import torch

    ws = Workspace(load_spec(spec_file))
    spec, last = ws.spec, ws.spec.search.selection[-1]
    genome = ws.uniform_genome()
    train = sample_at_least(ws.search_pools.finetune, last.finetune_tokens, derive_rng(spec.seed, "busy", 0))
    fit = sample_exact(ws.search_pools.calibration, last.fitness_tokens, derive_rng(spec.seed, "busy", 1))
    for c in fit:
        ws.teacher.get(c)  # the teacher cache is warm in a running search
    print(json.dumps({"ready": True, "threads": torch.get_num_threads()}), flush=True)
    for _ in sys.stdin:
        ev = Evaluator(ws.builder, ws.teacher, spec.search, spec.model.compute_dtype, warm_start=False)
        t0 = time.perf_counter()
        score = ev(genome, train, fit)
        print(json.dumps({"seconds": time.perf_counter() - t0, "fitness": score}), flush=True)
    return 0


def _start_worker(spec_file: Path, policy: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in _CLEAN}
    env.update(POLICIES[policy], HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    p = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_file)], env=env,
                         cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    if not line or not json.loads(line).get("ready"):
        raise SystemExit(f"worker {policy} did not start")
    return p


def measure_evaluation(workers: dict, policy: str, busy: bool, repeat: int) -> dict:
    """``repeat`` evaluations by ``policy``'s worker (the others wait on stdin, idle), with or without the hog."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    load0 = os.getloadavg()[0]
    times, scores = [], []
    try:
        for _ in range(repeat):
            w = workers[policy]
            w.stdin.write("go\n")
            w.stdin.flush()
            r = json.loads(w.stdout.readline())
            times.append(r["seconds"])
            scores.append(r["fitness"])
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    return {"policy": policy, "busy": busy, "generation_s": round(sum(times), 3), "evaluations_s": times,
            "load_before": round(load0, 2), "load_after": round(os.getloadavg()[0], 2), "state": scores}


def measure(spec_file: Path, store, policy: str, busy: bool) -> dict:
    from darwinlm.store import layout

    store.delete_prefix(layout.generation_state(0).rpartition("/")[0] + "/")  # recompute from scratch
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    load0 = os.getloadavg()[0]
    try:
        wall = _task(spec_file, ["generation-0"], POLICIES[policy])
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    state = store.get_json(layout.generation_state(0))
    return {"policy": policy, "busy": busy, "wall_s": round(wall, 2), "generation_s": state["seconds"],
            "load_before": round(load0, 2), "load_after": round(os.getloadavg()[0], 2),
            "state": {k: v for k, v in state.items() if k != "seconds"}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", default=str(REPO / "examples" / "smollm2-quick.yaml"))
    ap.add_argument("--store", default=None, help="store URI (default: the spec's; its layer database is reused)")
    ap.add_argument("--offspring", type=int, default=None, help="offspring (default: the spec's 8)")
    ap.add_argument("--rounds", type=int, default=2, help="measurements per cell (interleaved)")
    ap.add_argument("--policies", default="old,new", help=f"comma-separated, of {', '.join(POLICIES)}")
    ap.add_argument("--mode", choices=("generation", "evaluation"), default="generation",
                    help="generation: generation 0 in a fresh process per run; evaluation: one loaded process per "
                         "policy times --repeat candidate evaluations per run (seconds instead of minutes on a "
                         "loaded machine)")
    ap.add_argument("--repeat", type=int, default=2, help="evaluations per run (--mode evaluation)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker)

    from darwinlm.core.plan import all_tasks
    from darwinlm.spec import load_spec, spec_to_dict, with_overrides
    from darwinlm.store import layout, open_store

    policies = [p for p in args.policies.split(",") if p]
    over = {"name": "bench-busy-neighbour", "search.generations": 1}
    over.update({"store": args.store} if args.store else {})
    over.update({"search.offspring": args.offspring} if args.offspring else {})
    os.chdir(REPO)  # the example's store is relative (./runs)
    spec = with_overrides(load_spec(args.spec), **over)
    spec_file = Path(os.environ.get("TMPDIR", "/tmp")) / f"darwinlm-busy-{os.getpid()}.json"
    spec_file.write_text(json.dumps(spec_to_dict(spec)))
    store = open_store(spec.store).child(layout.search_prefix(spec.name))
    pre = [t.name for phase in all_tasks(spec) for t in phase if t.kind in ("database", "sensitivity")]
    print(f"phases before the search (untimed): {pre}", flush=True)
    _task(spec_file, pre, {})
    workers = {p: _start_worker(spec_file, p) for p in policies} if args.mode == "evaluation" else {}
    runs = []
    for r in range(args.rounds):
        for busy in ((False, True) if r % 2 == 0 else (True, False)):
            for policy in (policies if (r + busy) % 2 == 0 else policies[::-1]):
                if workers:
                    m = measure_evaluation(workers, policy, busy, args.repeat)
                else:
                    m = measure(spec_file, store, policy, busy)
                runs.append(m)
                if args.json:  # after every run: a cut run keeps what it measured
                    Path(args.json).write_text(json.dumps({"runs": runs}, indent=1))
                print(f"round {r + 1} {policy:>8} {'busy' if busy else 'quiet':>5}: {m['generation_s']:.1f}s "
                      f"(load {m['load_before']}->{m['load_after']})", flush=True)
    for w in workers.values():
        w.stdin.close()
        w.wait()
    spec_file.unlink()
    out = summarise(runs, policies)
    out.update(spec=spec.name, mode=args.mode, offspring=spec.search.offspring, cpus=os.cpu_count(),
               rounds=args.rounds, runs=runs)
    print(table(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


def summarise(runs: list[dict], policies: list[str]) -> dict:
    cells = {}
    for p in policies:
        for busy in (False, True):
            xs = [m["generation_s"] for m in runs if m["policy"] == p and m["busy"] == busy]
            cells[f"{p}/{'busy' if busy else 'quiet'}"] = {"mean_s": statistics.mean(xs), "runs_s": xs}
    first = runs[0]["state"]
    return {"cells": cells, "identical_states": all(m["state"] == first for m in runs),
            "load_range": [min(m["load_before"] for m in runs), max(m["load_after"] for m in runs)]}


def table(out: dict) -> str:
    c = out["cells"]
    pols = sorted({k.split("/")[0] for k in c}, key=list(POLICIES).index)
    lines = ["| policy | quiet s | busy s | busy ÷ quiet | quiet ÷ old quiet | busy ÷ old busy |",
             "|---|---:|---:|---:|---:|---:|"]
    for p in pols:
        q, b = c[f"{p}/quiet"]["mean_s"], c[f"{p}/busy"]["mean_s"]
        oq, ob = (c[f"old/quiet"]["mean_s"], c[f"old/busy"]["mean_s"]) if "old/quiet" in c else (q, b)
        lines.append(f"| {p} | {q:.1f} | {b:.1f} | {b / q:.2f} | {q / oq:.3f} | {b / ob:.3f} |")
    lines.append(f"results identical across all runs: {out['identical_states']}; "
                 f"load average {out['load_range'][0]}-{out['load_range'][1]} on {out['cpus']} CPUs")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
