"""Running one task of the plan: ``(workspace, task) -> artifacts in the store``.

Why this module exists: it is the single implementation of every task kind, shared by the embedded
runner (many tasks in one process) and the Kubernetes jobs (one task per pod). Every task is idempotent:
it returns at once when its completion marker exists, and writes the marker last.
"""

from __future__ import annotations

import logging
import time

from darwinlm.core.eta import eta_line
from darwinlm.core.plan import Task, done_key, generations_planned, is_done
from darwinlm.core.rng import derive_rng
from darwinlm.llm import database, sensitivity
from darwinlm.llm.train import posttrain
from darwinlm.store import layout

from .export import export_model
from .progress import Progress, no_progress
from .report import evaluate_and_report
from .search import run_generation
from .workspace import load_posttrained

log = logging.getLogger(__name__)

__all__ = ["run_task"]


def run_task(ws, task: Task, *, progress: Progress = no_progress, shard=None) -> dict:
    """Run ``task`` unless it is complete; return its marker's content.

    ``shard`` (``distributed.DistributedShard``, generation tasks) splits the candidate evaluations over
    the ranks of a process group; only the rank whose ``shard.is_writer`` is true writes the marker."""
    key = done_key(task)
    if is_done(ws.spec, ws.store, task):
        return ws.store.get_json(key)
    t0 = time.time()
    ws.record_spec()
    fn = {"database": _database, "sensitivity": _sensitivity, "generation": _generation, "posttrain": _posttrain,
          "export": _export, "evaluate": _evaluate}[task.kind]
    out = fn(ws, task, progress, shard) or {}
    out.setdefault("seconds", round(time.time() - t0, 3))
    if shard is None or getattr(shard, "is_writer", True):
        ws.store.put_json(key, out)
    if getattr(shard, "barrier", None) is not None:
        # distributed: no rank returns before rank 0 wrote the marker, so a process that runs several
        # tasks (or its caller) may read this task's outputs next
        shard.barrier()
    return out


def _database(ws, task: Task, progress: Progress, _shard) -> dict:
    spec = ws.spec
    bar = progress(f"database {task.index + 1}/{task.count}: calibration", spec.database.calibration_tokens)
    t0 = time.time()
    layers = database.build_shard(ws.model, spec.database, spec.model.compute_dtype, ws.pools.calibration, ws.root,
                                  ws.db_key, task.index, task.count, progress=bar)
    database.finalize(ws.model, spec.database, ws.root, ws.db_key, ws.pools.calibration.digest(), task.count)
    return {"key": ws.db_key, "layers": len(layers), "seconds": round(time.time() - t0, 3)}


def _sensitivity(ws, task: Task, progress: Progress, _shard) -> dict:
    spec = ws.spec
    s = spec.search.sensitivity
    chunks = ws.sensitivity_chunks
    n_blocks = len(database.shard_blocks(ws.model.config.num_hidden_layers, task.index, task.count))
    bar = progress(f"sensitivity {task.index + 1}/{task.count}", n_blocks * len(chunks))
    out = sensitivity.build_shard(ws.model, ws.db, s, chunks, ws.root, ws.db_key, ws.sensitivity_key, task.index,
                                  task.count, progress=bar)
    return {"key": ws.sensitivity_key, "database": ws.db_key, "blocks": out["blocks"],
            "measured_blocks": len(out.get("measured", [])) if not out.get("reused") else 0,
            "seconds": out["seconds"] if not out.get("reused") else 0.0}


def _generation(ws, task: Task, progress: Progress, shard) -> dict:
    g = task.index
    sp = ws.spec.search
    total = sum(s.survivors for s in sp.selection[:-1]) + sp.offspring + 1
    writer = shard is None or getattr(shard, "is_writer", True)
    last = ws.last_tracking(g) if sp.tracking_tokens and writer else None
    shown = f" · tracking {last:.4f}" if last is not None else ""
    first = ws.store.get_json(layout.generation_state(0)).get("seconds") if g else None
    eta = eta_line(ws.store, g, generations_planned(ws.spec, ws.store), time.time(), first_seconds=first)
    bar = progress(f"generation {g + 1}/{sp.generations} · {eta}{shown}", total)
    started = time.time()
    res = run_generation(g, ws.parent_for(g), ws.space, ws.spec, ws.search_pools, ws.evaluator, ws.store,
                         shard=shard, progress=bar, stale_before=ws.stale_before(g),
                         track=ws.track if sp.tracking_tokens else None)
    if writer:
        # wall-clock facts for progress and ETA (darwinlm.core.eta), apart from the deterministic state;
        # written before the state, so a finished generation always has one
        ws.store.put_json(layout.generation_timing(g), {
            "generation": g, "started": started, "finished": time.time(), "seconds": res.state.get("seconds"),
            "process_started": ws.created, "process": dict(ws.timings)})
    return res.state  # the generation state is its own completion marker


def _posttrain(ws, task: Task, progress: Progress, _shard) -> dict:
    spec = ws.spec
    model = ws.builder.shrunk(ws.variant_genome(task.variant))
    total = [0]
    bar_holder = {}

    def on_step(step, steps, loss):
        if "bar" not in bar_holder:
            bar_holder["bar"] = progress(f"post-train {task.variant}", steps - step + 1)
        bar_holder["bar"](1)
        total[0] = steps

    # the same data order for every variant: a paired comparison
    losses = posttrain(model, ws.pools.finetune, spec.posttrain, spec.model.compute_dtype,
                       derive_rng(spec.seed, "posttrain"), store=ws.store, prefix=layout.posttrain_prefix(task.variant),
                       teacher=ws.model if spec.posttrain.distill > 0 else None, progress=on_step)
    # from the last checkpoint, so that a run resumed after it (zero steps left) records the same
    meta = layout.checkpoint_meta(layout.posttrain_prefix(task.variant))
    last = ws.store.get_json(meta) if ws.store.exists(meta) else {}
    return {"steps": last.get("total", total[0]), "final_loss": last.get("loss", losses[-1] if losses else None)}


def _export(ws, task: Task, progress: Progress, _shard) -> dict:
    model = load_posttrained(ws, "searched")
    return export_model(ws, model, ws.final_genome())


def _evaluate(ws, task: Task, progress: Progress, _shard) -> dict:
    return evaluate_and_report(ws, progress)
