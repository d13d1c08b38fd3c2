"""What a search will cost before it runs: tokens, FLOPs, store bytes, memory per worker, wall-clock, GPU-hours.

Why this module exists: a user about to spend GPU-hours wants to know how many. ``darwinlm estimate SPEC``
answers from the spec alone (the model's config, built on the ``meta`` device: no weights are read):

* **Tokens**, exact from the schedule: per generation, stage ``s`` scores its pool (``offspring``, then
  the survivors of stage ``s-1``, plus the parent at the last stage) on ``fitness_tokens`` each and
  fine-tunes each on ``finetune_tokens``: the numbers every generation's ``state.json`` records
  (``fitness_tokens``, ``finetune_tokens``, ``evaluations``). With ``finetune.warm_start`` a survivor
  continues instead of starting over, so fewer tokens are *trained* than scheduled; both are shown.
  (The trainer rounds each batch up to whole chunks, so the tokens it really trains are at most one chunk
  per candidate and stage more.)
* **FLOPs**: 6·params·tokens for training and 2·params·tokens for scoring, with ``params`` the shrunk
  candidate's size (the target fraction of the prunable q/o-head and MLP parameters removed), plus the
  dense teacher's forward on every fitness batch (once per stage and worker); the database build
  (dense forward and Hessians of the calibration tokens, an O(d³) OBS per layer); post-training (6·P per
  token, plus 2·P_dense with distillation) and evaluation (2·P per held-out token per model).
  Attention's sequence-length term is left out (small at these sequence lengths).
* **Store bytes**: the layer database from the ladders (fp16 kept columns per level), generation
  states and results, post-training checkpoints (weights + AdamW state), the export.
* **Memory per worker**: the resident dense model, the candidate in training (weights, gradients,
  AdamW state), the warm-start states held between stages, the teacher cache and activations, with a
  warning when it exceeds the accelerator's memory.
* **Wall-clock and GPU-hours** per accelerator from :data:`ACCELERATORS` (peak dense FLOP/s × an
  assumed utilisation; ``--flops-per-second`` overrides), or, with ``--calibrate``, from a measured run
  of the whole pipeline with one generation on this machine (:func:`calibrate`): the fixed costs and every
  phase then come from the clock, and the search is that generation's wall-clock times the generations.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from darwinlm.core.plan import all_tasks, done_key
from darwinlm.core.schedule import schedule
from darwinlm.llm.adapter import adapter_for
from darwinlm.llm.database import layer_ladders
from darwinlm.spec import with_overrides
from darwinlm.store import layout, open_store

__all__ = ["ACCELERATORS", "Accelerator", "calibrate", "estimate", "format_estimate", "model_facts", "schedule"]


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """One worker's compute: ``flops`` peak dense FLOP/s at ``compute_dtype`` bf16, ``utilization`` the
    fraction a search reaches (batch-1 fine-tuning of small models reaches little), ``memory_gib``."""

    name: str
    flops: float
    utilization: float
    memory_gib: float

    @property
    def effective(self) -> float:
        return self.flops * self.utilization


ACCELERATORS: dict[str, Accelerator] = {
    # dense bf16 tensor-core peaks from the vendors' data sheets; utilisation: an assumption, replace it
    # with a measurement (--calibrate on that machine) or --flops-per-second
    "h100": Accelerator("NVIDIA H100 SXM 80GB", 989e12, 0.25, 80.0),
    "a100": Accelerator("NVIDIA A100 80GB", 312e12, 0.25, 80.0),
    "l40s": Accelerator("NVIDIA L40S 48GB", 362e12, 0.25, 48.0),
    # two cores of this project's CI machines, fp32 weights with bf16 autocast: measured order of magnitude
    "cpu": Accelerator("CPU (2 cores)", 2.0e10, 1.0, 16.0),
}

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
JOB_START_SECONDS = 15.0
"""A fresh process's start and imports (torch, transformers), without --calibrate: measured 14-16 s per
generation Job on the loaded 2-core CI machine (bench/README.md, warm generation Jobs)."""
MODEL_READ_BYTES_PER_SECOND = 200e6
"""Model weights read per second when a process loads the model, without --calibrate: ~180 MB/s was
measured for S3 GETs against the moto emulator here (TEST_INFRA.md §2a); a local page-cached read is faster
(SmolLM2's 0.54 GB loaded in 2.2 s), parallel multipart S3 reads on a cloud node faster still."""
CALIBRATION_POSTTRAIN_CHUNKS = 16
"""``--calibrate`` post-trains at most this many batches (then scales by the spec's tokens)."""


# ----------------------------------------------------------------------------------------- the model

def model_facts(spec) -> dict[str, Any]:
    """Shapes and parameter counts of the dense model, from its config on the meta device."""
    cfg = AutoConfig.from_pretrained(os.path.expanduser(spec.model.path), revision=spec.model.revision)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    ad = adapter_for(model)
    params = sum(p.numel() for p in model.parameters())
    ladders = layer_ladders(model, spec.database)
    h, hd = ad.hidden_size, ad.head_dim
    prunable = 0
    layers = []
    for name, (kind, _block, group, ladder) in ladders.items():
        per_unit = 2 * h * hd if kind == "attn" else 3 * h  # q and o rows/columns of a head; gate, up, down
        prunable += per_unit * ladder.units
        layers.append({"name": name, "kind": kind, "units": ladder.units, "group": group,
                       "kept": [ladder.kept(lv) for lv in range(ladder.num_levels)], "per_unit": per_unit})
    return {"params": params, "prunable": prunable, "hidden": h, "head_dim": hd, "layers": layers,
            "blocks": ad.num_layers, "vocab": int(cfg.vocab_size)}


def candidate_params(spec, facts: dict) -> int:
    """Parameters of a candidate at the target: the target fraction of the prunable ones removed."""
    t = spec.search.target
    if t.fraction is not None:
        frac = t.fraction
    else:  # mean level: the mean removed fraction of the ladders at that level (ladders are near-linear)
        fr = [ly["kept"] for ly in facts["layers"]]
        frac = sum(1 - k[min(len(k) - 1, round(t.mean_level))] / k[0] for k in fr) / max(1, len(fr))
    return int(facts["params"] - frac * facts["prunable"])


# ----------------------------------------------------------------------------------------- the schedule

# ----------------------------------------------------------------------------------------- the estimate

def _flops(spec, facts: dict, sched: dict, workers: int) -> dict[str, float]:
    P, Pc = facts["params"], candidate_params(spec, facts)
    per = sched["per_generation"]
    G = sched["generations"]
    gen = (6 * Pc * per["trained_tokens"] + 2 * Pc * per["fitness_tokens"]
           + 2 * P * per["teacher_tokens"] * workers + 2 * Pc * per["tracking_tokens"])
    db = spec.database
    T = db.calibration_tokens
    hess = sum(2 * (ly["units"] * ly["group"]) ** 2 * T for ly in facts["layers"])
    obs = sum(2 * (ly["units"] * ly["group"]) ** 3 for ly in facts["layers"])
    out = {"database": 2 * P * T + hess + obs, "generation": gen, "search": gen * G}
    if spec.search.init == "sensitivity":
        s = spec.search.sensitivity
        levels = sum(len(ly["kept"]) for ly in facts["layers"])
        out["sensitivity"] = 2 * (P / max(1, facts["blocks"])) * s.tokens * levels + 2 * P * s.tokens
    elif spec.search.init == "random":
        out["init"] = 2 * Pc * spec.search.initial_tokens * spec.search.initially_generated
    pt = spec.posttrain
    variants = (1 + ("uniform" in spec.evaluation.baselines)) if pt.enabled else 0
    out["posttrain"] = variants * pt.tokens * (6 * Pc + (2 * P if pt.distill > 0 else 0))
    ev = spec.evaluation
    held = ev.heldout_tokens or spec.data.heldout_tokens
    models = [Pc] * (1 + ("uniform" in ev.baselines)) + ([P] if "dense" in ev.baselines else [])
    out["evaluate"] = 2 * held * sum(models)
    return out


def _store_bytes(spec, facts: dict, sched: dict) -> dict[str, int]:
    h = facts["hidden"]
    db = 0
    for ly in facts["layers"]:
        for kept in ly["kept"][1:]:
            if kept:  # level 0 is the model's own weight; the all-removed level stores nothing
                db += h * kept * ly["group"] * 2 + kept * ly["group"] * 8
    Pc = candidate_params(spec, facts)
    w = _BYTES.get(spec.model.dtype, 4)
    per = sched["per_generation"]
    layers = len(facts["layers"])
    gens = sched["generations"] * (per["evaluations"] * (layers * 12 + 200) + 2 * per["evaluations"] * layers * 12)
    variants = (1 + ("uniform" in spec.evaluation.baselines)) if spec.posttrain.enabled else 0
    return {"database": db, "generations": gens, "checkpoints": variants * Pc * w * 3,
            "export": Pc * _BYTES.get(spec.export.dtype, 4)}


def _memory(spec, facts: dict) -> dict[str, int]:
    P, Pc, V = facts["params"], candidate_params(spec, facts), facts["vocab"]
    w = _BYTES.get(spec.model.dtype, 4)
    sp = spec.search
    L, h = facts["blocks"], facts["hidden"]
    seq, bs = spec.data.seq_len, sp.finetune.batch_size
    f = sp.fitness
    per_token = V * 2 if f.kind == "kl" else f.topk * 6
    teacher = min(2 << 30, spec.data.calibration_tokens * per_token)
    decoded = min(1 << 30, max(st.fitness_tokens for st in sp.selection) * V * 8)
    held = min(sp.selection[0].survivors, sp.offspring) if sp.finetune.warm_start else 0
    return {"model": P * w, "candidate": Pc * w * 4,  # weights, gradients, AdamW's two moments
            "warm_start": min(32 << 30, held * Pc * w * 3), "teacher_cache": teacher + decoded,
            "activations": bs * seq * (L * h * 34 + V * 12)}


def estimate(spec, *, accelerator: str = "cpu", workers: int = 1, generations_per_job: int | None = None,
             flops_per_second: float | None = None, memory_gib: float | None = None,
             calibration: dict | None = None) -> dict[str, Any]:
    """Everything :func:`format_estimate` prints, as JSON-ready data (see the module docstring)."""
    acc = ACCELERATORS[accelerator]
    facts = model_facts(spec)
    sched = schedule(spec)
    flops = _flops(spec, facts, sched, workers)
    thr = flops_per_second or (calibration or {}).get("flops_per_second") or acc.effective
    G = sched["generations"]
    wall = {k: v / thr for k, v in flops.items() if k not in ("search", "generation")}
    teacher = 2 * facts["params"] * sched["per_generation"]["teacher_tokens"] * workers
    gen_wall = (flops["generation"] - teacher) / thr / workers + teacher / workers / thr
    # what every process pays before its first task: start, imports, reading the model
    fixed = JOB_START_SECONDS + facts["params"] * _BYTES.get(spec.model.dtype, 4) / MODEL_READ_BYTES_PER_SECOND
    if calibration:  # measured on this machine: fixed costs, every phase, one generation
        gen_wall = calibration["generation_seconds"]
        fixed = calibration["fixed_seconds"]
        for kind, secs in calibration["phase_seconds"].items():
            if kind != "generation":
                wall[kind] = secs
    if generations_per_job is None:  # embedded (`darwinlm run`): one process pays the fixed cost once
        wall["search"] = gen_wall * G
        wall["fixed"] = fixed + (calibration["imports_seconds"] if calibration else 0.0)
    else:  # Kubernetes: every Job pays process start, imports, model load and pools
        fixed += calibration["imports_seconds"] if calibration else 0.0
        jobs = 1 if G == 0 or generations_per_job == 0 else -(-G // generations_per_job)
        wall["search"] = gen_wall * G + fixed * jobs
        wall["fixed (other Jobs)"] = fixed * (3 + bool(spec.posttrain.enabled))  # database, export, evaluate...
    total = sum(wall.values())
    mem = _memory(spec, facts)
    limit = memory_gib if memory_gib is not None else acc.memory_gib
    need = sum(mem.values())
    return {
        "accelerator": dataclasses.asdict(acc) | {"key": accelerator}, "flops_per_second": thr,
        "calibrated": calibration is not None, "calibration": calibration, "workers": workers,
        "generations_per_job": generations_per_job,
        "model": {"params": facts["params"], "candidate_params": candidate_params(spec, facts),
                  "prunable": facts["prunable"], "layers": len(facts["layers"])},
        "tokens": sched, "flops": flops, "store_bytes": _store_bytes(spec, facts, sched),
        "memory_bytes": mem, "memory_limit_gib": limit,
        "memory_warning": (f"a worker needs ~{need / 2**30:.1f} GiB, more than the {limit:g} GiB of "
                           f"{acc.name}" if need > limit * 2**30 else None),
        "wall_seconds": wall, "total_wall_seconds": total,
        "gpu_hours": 0.0 if accelerator == "cpu" else (
            (total - wall["search"]) + wall["search"] * workers) / 3600,
    }


# ----------------------------------------------------------------------------------------- calibration

def calibrate(spec, *, root: str | None = None) -> dict[str, Any]:
    """Run ``spec`` with ONE generation, end to end, in a scratch store on this machine and measure it: the
    fixed costs (model load, pools; interpreter start and imports in a fresh process), every phase's seconds
    (the task markers' ``seconds``) and the FLOP/s the generation reached. Post-training runs at most
    :data:`CALIBRATION_POSTTRAIN_CHUNKS` optimiser steps' worth of tokens and is scaled linearly to the spec's
    tokens. The scratch store is a temporary directory unless ``root`` is given."""
    from .runner import run_search

    tmp = None
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="darwinlm-calibrate-")
        root = tmp.name
    pt = spec.posttrain
    cap = CALIBRATION_POSTTRAIN_CHUNKS * pt.batch_size * spec.data.seq_len
    pt_tokens = min(pt.tokens, cap)
    try:
        scratch = with_overrides(spec, **{"store": f"file://{root}", "search.generations": min(1, spec.search.generations),
                                          "posttrain.tokens": pt_tokens})
        t0 = time.time()
        ws = run_search(scratch)
        total = time.time() - t0
        store = ws.store
        secs: dict[str, float] = {}
        for phase in all_tasks(scratch):
            for task in phase:
                kind = task.kind
                if store.exists(done_key(task)):
                    v = float(store.get_json(done_key(task)).get("seconds") or 0.0)
                    # shards of a phase run in parallel on K workers; here one after the other
                    secs[kind] = max(secs.get(kind, 0.0), v) if kind in ("database", "sensitivity") else \
                        secs.get(kind, 0.0) + v
        gen = store.get_json(layout.generation_timing(0)) if scratch.search.generations else None
        gen_s = float(gen["finished"] - gen["started"]) if gen else 0.0
        secs["posttrain"] = secs.get("posttrain", 0.0) * pt.tokens / pt_tokens
        fixed = sum(ws.timings.get(k, 0.0) for k in ("model_load", "pools", "database_open"))
        gen_flops = _flops(spec, model_facts(spec), schedule(spec), 1)["generation"]
        t1 = time.time()  # a fresh process: interpreter start and the torch/transformers imports of a Job
        subprocess.run([sys.executable, "-c", "import darwinlm.run.tasks"], check=True, capture_output=True)
        imports = time.time() - t1
        return {"fixed_seconds": fixed, "imports_seconds": imports, "generation_seconds": gen_s,
                "phase_seconds": secs, "flops_per_second": gen_flops / gen_s if gen_s > 0 else None,
                "measured_seconds": total}
    finally:
        if tmp is not None:
            tmp.cleanup()


# ----------------------------------------------------------------------------------------- the table

def _si(x: float, unit: str = "") -> str:
    for div, p in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g} {p}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def _bytes(n: float) -> str:
    for div, p in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:.3g} {p}"
    return f"{int(n)} B"


def _dur(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


def format_estimate(e: dict) -> str:
    """The human-readable table ``darwinlm estimate`` prints."""
    t, per, tot = e["tokens"], e["tokens"]["per_generation"], e["tokens"]["total"]
    m = e["model"]
    lines = [f"model: {_si(m['params'])} parameters, {_si(m['prunable'])} prunable in {m['layers']} layers; "
             f"candidates ~{_si(m['candidate_params'])}",
             f"accelerator: {e['accelerator']['name']} at {_si(e['flops_per_second'], 'FLOP/s')}"
             + (" (measured by --calibrate)" if e["calibrated"] else
                f" ({e['accelerator']['utilization']:.0%} of peak, assumed)")
             + (f"; workers {e['workers']}, generationsPerJob {e['generations_per_job']}"
                if e["generations_per_job"] is not None else "; embedded (one process)"),
             "",
             f"{'tokens':<22}{'per generation':>16}{'total (' + str(t['generations']) + ' gen)':>20}"]
    for k in ("evaluations", "fitness_tokens", "finetune_tokens", "trained_tokens", "teacher_tokens"):
        lines.append(f"{k:<22}{per[k]:>16,}{tot[k]:>20,}")
    lines += ["", f"{'phase':<22}{'FLOPs':>16}{'wall-clock':>20}"]
    for k, w in e["wall_seconds"].items():
        f = e["flops"].get(k)
        lines.append(f"{k:<22}{(_si(f) if f is not None else '-'):>16}{_dur(w):>20}")
    lines.append(f"{'total':<22}{'':>16}{_dur(e['total_wall_seconds']):>20}")
    if e["accelerator"]["key"] != "cpu":
        lines.append(f"GPU-hours: {e['gpu_hours']:.2f}")
    lines += ["", "store: " + ", ".join(f"{k} {_bytes(v)}" for k, v in e["store_bytes"].items())
              + f"; total {_bytes(sum(e['store_bytes'].values()))}",
              "memory per worker: " + ", ".join(f"{k} {_bytes(v)}" for k, v in e["memory_bytes"].items())
              + f"; total {_bytes(sum(e['memory_bytes'].values()))} of {e['memory_limit_gib']:g} GiB"]
    if e["memory_warning"]:
        lines.append(f"WARNING: {e['memory_warning']}")
    return "\n".join(lines)
