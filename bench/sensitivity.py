#!/usr/bin/env python
"""The sensitivity table on SmolLM2-135M: what it costs next to the layer database, and how many tokens it needs.

For each ``--tokens`` count the table behind ``search.init: sensitivity`` is built with the library's own
task (or read from the store when an earlier run built it: its recorded build seconds are then shown, with
"cached"), its dynamic-programming genome is chosen exactly as a search does, and every genome is scored
one-shot on the whole held-out pool next to the uniform genome: perplexity, KL to the dense model, and the
paired-bootstrap 95% CI of genome / uniform and of genome / the genome from the largest table.

    .venv/bin/python bench/sensitivity.py --store file:///tmp/darwinlm-sens --tokens 128,256,512,2048
    .venv/bin/python bench/sensitivity.py --store file:///tmp/darwinlm-sens --tokens 128,512 --json

The database's own build seconds come from its manifest. For a side-by-side cost ratio on the same
machine state, use a fresh store (then both are built in this run, one after the other).
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

log = logging.getLogger("bench.sensitivity")


def run(args) -> dict:
    from darwinlm.run.report import evaluate_models, ppl_ratio_ci
    from darwinlm.run.runner import run_search

    base = load_spec(args.spec)
    if args.store:
        base = with_overrides(base, store=args.store)
    rows, genomes, ws = [], {}, None
    for t in args.tokens:
        spec = with_overrides(base, name=f"bench-sens-{t}", **{"search.generations": 0, "search.init": "sensitivity",
                                                               "search.sensitivity.tokens": t})
        t0 = time.time()
        ws = run_search(spec, until=lambda task: task.kind not in ("database", "sensitivity"))
        wall = time.time() - t0
        table = ws.sensitivity_table()
        genome = ws.initial_parent()
        genomes[t] = genome
        db_manifest = ws.root.get_json(layout.database_manifest(ws.db_key))
        rows.append({"tokens": t, "key": ws.sensitivity_key, "table_seconds": table["seconds"],
                     "cached": wall < 0.5 * table["seconds"], "database_seconds": db_manifest.get("build_seconds"),
                     "levels": genome.levels})
        log.info("%d tokens: table %.0f s (this call %.0f s)", t, table["seconds"], wall)
    models = {"uniform": ws.builder.shrunk(ws.uniform_genome())}
    models.update({str(t): ws.builder.shrunk(g) for t, g in genomes.items()})
    chunks = list(ws.pools.heldout.chunks)
    log.info("scoring %d genomes on %d held-out tokens", len(models), sum(int(c.numel()) for c in chunks))
    scores = evaluate_models(ws.model, models, chunks, ws.spec.model.compute_dtype)
    ref = str(max(args.tokens))
    u = scores["uniform"]
    for r in rows:
        s = scores[str(r["tokens"])]
        r.update({"ppl": s["ppl"], "kl": s["kl"],
                  "vs_uniform": ppl_ratio_ci(s["chunk_nll"], u["chunk_nll"], u["chunk_tokens"]),
                  f"vs_{ref}": ppl_ratio_ci(s["chunk_nll"], scores[ref]["chunk_nll"], u["chunk_tokens"]),
                  "genes_differing_from_largest": sum(a != b for a, b in zip(genomes[r["tokens"]].levels,
                                                                             genomes[int(ref)].levels))})
    return {"spec": str(args.spec), "store": ws.root.uri, "heldout_tokens": u["tokens"],
            "uniform_ppl": u["ppl"], "uniform_kl": u["kl"], "reference_tokens": int(ref), "rows": rows}


def _ci(r):
    return f"{r[0]:.3f}" if r[1] is None else f"{r[0]:.3f} [{r[1]:.3f}, {r[2]:.3f}]"


def table(res: dict) -> str:
    ref = res["reference_tokens"]
    lines = [f"Sensitivity tables on {res['spec']} (store {res['store']}); one-shot on {res['heldout_tokens']} "
             f"held-out tokens; uniform ppl {res['uniform_ppl']:.2f}, KL {res['uniform_kl']:.4f}", "",
             f"| tokens | table s | database s | table / database | ppl | KL | vs uniform | vs {ref}-token genome "
             f"| genes differing |", "|---:|---:|---:|---:|---:|---:|---|---|---:|"]
    for r in res["rows"]:
        db = r["database_seconds"]
        lines.append(f"| {r['tokens']} | {r['table_seconds']:.0f}{' (cached)' if r['cached'] else ''} | "
                     f"{db if db is None else format(db, '.0f')} | {'-' if not db else format(r['table_seconds'] / db, '.1f')}x | "
                     f"{r['ppl']:.2f} | {r['kl']:.4f} | {_ci(r['vs_uniform'])} | {_ci(r[f'vs_{ref}'])} | "
                     f"{r['genes_differing_from_largest']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default=str(REPO / "examples/smollm2-quick.yaml"), help="base spec (default: the quick example)")
    p.add_argument("--store", default=None, help="store URI (default: the spec's store)")
    p.add_argument("--tokens", default="128,256,512,2048", help="sensitivity token counts (default 128,256,512,2048)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for this process")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    args.tokens = sorted(int(x) for x in args.tokens.split(",") if x.strip())
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    res = run(args)
    print(json.dumps(res, indent=1) if args.json else table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
