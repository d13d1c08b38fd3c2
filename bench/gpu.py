"""The GPU check: darwinlm's whole pipeline and its benchmarks on one CUDA device, in one timed run.

    PYTHONPATH=. python -m bench.gpu --out $OUT                       # SmolLM2-135M shape (+ Llama-1B if time is left)
    PYTHONPATH=. python -m bench.gpu --shape llama-1b --budget 300 --out /tmp/gpu
    .venv/bin/python -m bench.gpu --tiny --out /tmp/gpu-tiny             # CPU smoke test (tests/unit/test_gpu_check.py)

Why this exists: on Kubernetes every generation runs in a GPU pod, and the performance claims a user cares
about (seconds per generation at the paper's schedule, GPU-hours for a 200-generation search, the fast
evaluator's ratio over the reference loop, the shrunk model's speed) only mean something measured on a GPU.
GPU time is scarce (GPU.md: minutes, start-up included), so everything runs from one command that is
tested on CPU (``--tiny``: same stages, tiny model and budgets) and cannot rot.

What runs, each stage in its own subprocess with a time limit taken from ``--budget`` (a stage that runs
over is killed, the others still run; a stage's failure is recorded, not fatal):

1. ``setup``: a random-initialised model of ``--shape`` built from a config (``LlamaConfig`` of the
   provisioned SmolLM2 ``config.json`` with the shape's sizes), saved next to the provisioned tokenizer:
   no weights travel, the same shapes cost the same time. Quality numbers come from CPU runs on real weights.
2. ``evaluator``: ``bench/evaluator.py`` at the paper's schedule (examples/smollm2-paper.yaml: 16 offspring,
   10K/50K/100K/200K fine-tune tokens): baseline (the reference loop), faithful, fast: seconds per generation,
   the ratios, the fitness agreement, and GPU-hours for 200 generations (seconds/gen × 200 / 3600).
3. ``step``: one fast-path fine-tune step (the shrunk uniform candidate, batch 1 × seq_len, autocast,
   fused AdamW) timed alone: tokens/s, achieved TFLOP/s, MFU against the device's bf16 peak, and from the
   torch profiler the share of the step the GPU is busy (1 − that share is launch/CPU overhead).
4. ``shrunk``: ``bench/shrunk_speed.py`` in bf16 at batch 8 × 2048 (compute bound): shrunk vs dense vs ideal.
5. ``database``: the layer database's parts: Hessians (one dense pass over all blocks, on the device) and
   OBS per layer kind.
6. ``quick``: examples/smollm2-quick.yaml end to end on the device (database → sensitivity → search →
   post-train → export → evaluate), the wall time of every phase.
7. ``distributed``: generation 0 of the quick spec as W=1 and as W=2 ranks (``darwinlm task``, torch.distributed;
   NCCL as the library picks on CUDA, Gloo if NCCL cannot start two ranks on one GPU): the states must be identical.

Further shapes of ``--shape a,b`` (default: llama-1b after smollm2-135m): their model and paper-spec layer
database are built in the background (``prebuild``, half the CPU cores: OBS runs on the CPU) from the end of
stage 5, so that work overlaps only stages 6-7; then the evaluator's baseline and fast paths run on them, with
at most ``CAPS["extra"]`` seconds each.

Output (``--out``, default ``$OUT`` or bench/results/gpu-<shape>-<time>): four files, ``gpu.json``
(everything), ``gpu.md`` (the tables), ``gpu.log`` (every stage's output) and ``results.tgz`` (those and
every stage's JSON and spec), all rewritten after every stage, so a run cut at its time limit still returns
what it finished. Models, specs and stores go to ``--work`` (a temporary folder), never to ``--out``.

On a machine without the provisioned cache (the GPU test machine), pack what it needs first (~9 MiB: the
SmolLM2 config and tokenizer, the Brown text; no weights) into a git-ignored folder that travels with the
tree, and point the run at it::

    .venv/bin/python -m bench.gpu --pack .gpu-assets
    PYTHONPATH=. python -m bench.gpu --tokenizer .gpu-assets/model --text .gpu-assets/text --out $OUT

The machine may lack ``datasets`` (GPU.md): darwinlm reads ``format: text`` corpora without it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("DARWINLM_CACHE", "~/.cache/darwinlm")).expanduser()

# Sizes over the SmolLM2-135M config (vocabulary and tokenizer stay SmolLM2's).
SHAPES: dict[str, dict] = {
    "smollm2-135m": {},
    "llama-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64},
    "llama-8b-2layers": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 2,
                         "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                         "tie_word_embeddings": False},
}
TINY_SHAPE = {"hidden_size": 48, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 6,
              "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 256}

# Stage time caps (seconds) on the GPU; the budget left caps them further. Order = priority (further shapes'
# evaluator runs after the first three).
STAGES = ("evaluator", "step", "shrunk", "database", "quick", "distributed")
CAPS = {"evaluator": 170, "step": 45, "shrunk": 50, "quick": 110, "distributed": 80, "database": 50, "extra": 170}
TINY_CAPS = {k: 240 for k in CAPS}

# Dense bf16 tensor-core peak (FLOP/s) by device name, for MFU.
PEAKS = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("A10", 125e12))

# Budgets of --tiny (a CPU smoke test of every stage; seconds on 2 cores).
TINY_QUICK = {"data.seq_len": 64, "data.calibration_tokens": 2048, "data.finetune_tokens": 2048,
              "data.heldout_tokens": 512, "database.calibration_tokens": 1024,
              "database.mlp": {"levels": 5, "granularity": 4}, "search.generations": 2, "search.offspring": 4,
              "search.selection": [{"survivors": 2, "fitness_tokens": 128, "finetune_tokens": 64},
                                   {"survivors": 1, "fitness_tokens": 256, "finetune_tokens": 128}],
              "posttrain.tokens": 256, "posttrain.checkpoint_every": 2, "evaluation.heldout_tokens": 256,
              "search.tracking_tokens": 256,
              "model.threads": 1}
TINY_PAPER = {**TINY_QUICK, "search.offspring": 4,
              "search.selection": [{"survivors": 2, "fitness_tokens": 128, "finetune_tokens": 128},
                                   {"survivors": 1, "fitness_tokens": 256, "finetune_tokens": 256}],
              "posttrain.tokens": 256, "posttrain.distill": 0.0}


# -- the driver --------------------------------------------------------------------------------------------
class Run:
    """The output folder, the budget and the results; rewrites gpu.json/gpu.md/results.tgz after each stage."""

    def __init__(self, out: Path, work: Path, budget: float, tiny: bool, *, in_process: bool = False):
        self.out, self.work, self.budget, self.tiny, self.in_process = out, work, budget, tiny, in_process
        self.t0 = time.monotonic()
        self.results: dict = {"budget_s": budget, "tiny": tiny, "work": str(work), "stages": {}}
        (work / "stages").mkdir(parents=True, exist_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu.log").write_text("")

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def log(self, text: str) -> None:
        line = f"[t+{time.monotonic() - self.t0:6.1f}s] {text}"
        print(line, flush=True)
        with open(self.out / "gpu.log", "a") as f:
            f.write(line + "\n")

    def stage(self, name: str, argv: list[str], cap: float) -> dict | None:
        """Run ``python -m bench.gpu --stage ...`` (or any module) with a time limit; its JSON result."""
        timeout = min(cap, self.left())
        if timeout < 10:
            self.results["stages"][name] = {"status": "skipped", "reason": "no time left"}
            self.log(f"{name}: skipped (budget spent)")
            return None
        res_file = self.work / "stages" / f"{name}.json"
        res_file.unlink(missing_ok=True)
        t0 = time.monotonic()
        self.log(f"{name}: start (limit {timeout:.0f}s)")
        if self.in_process:
            output, status = _in_process(argv[2:] + ["--result-json", str(res_file)])
        else:
            output, status = self._subprocess(argv + ["--result-json", str(res_file)], timeout)
        wall = time.monotonic() - t0
        with open(self.out / "gpu.log", "a") as f:
            f.write(f"----- {name} output -----\n{output}\n")
        result = json.loads(res_file.read_text()) if res_file.exists() else None
        self.results["stages"][name] = {"status": status, "wall_s": round(wall, 1), "result": result}
        if status != "ok":
            self.results["stages"][name]["output_tail"] = output[-4000:]
            if result is None and name.startswith("evaluator"):
                self.results["stages"][name]["partial"] = _partial_evaluator(output)
        self.log(f"{name}: {status} in {wall:.1f}s")
        self.save()
        return result

    @staticmethod
    def _subprocess(argv: list[str], timeout: float) -> tuple[str, str]:
        proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            output, _ = proc.communicate(timeout=timeout)
            return output, "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.communicate()[0], f"timed out after {timeout:.0f}s"

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        (self.out / "gpu.json").write_text(json.dumps(self.results, indent=1, default=str))
        (self.out / "gpu.md").write_text(render(self.results))
        # four files in --out (a GPU machine returns at most 8); the tar adds every stage's JSON and the specs
        tmp = self.work / "results.tgz"
        with tarfile.open(tmp, "w:gz") as tar:
            for name in ("gpu.json", "gpu.md", "gpu.log"):
                tar.add(self.out / name, arcname=name)
            for p in sorted([*self.work.glob("stages/*.json"), *self.work.glob("*.json")]):
                tar.add(p, arcname=str(p.relative_to(self.work)))
        shutil.copyfile(tmp, self.out / "results.tgz")


def _in_process(argv: list[str]) -> tuple[str, str]:
    """A stage in this process (``--tiny``: saves an interpreter start per stage; no time limit)."""
    import contextlib
    import io
    import traceback

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            run_stage(_parser().parse_args(argv))
            status = "ok"
        except Exception:  # noqa: BLE001 - recorded as the stage's failure, like a subprocess's exit code
            traceback.print_exc(file=buf)
            status = "failed (exception)"
    return buf.getvalue(), status


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def environment() -> dict:
    import torch
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cuda_available": torch.cuda.is_available(),
            "cpu_count": os.cpu_count(), "host": platform.node()}
    try:
        import datasets

        info["datasets"] = datasets.__version__
    except ImportError:
        info["datasets"] = None  # not needed: darwinlm reads text corpora itself
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, device_memory_gib=round(p.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, capability=f"{p.major}.{p.minor}")
    else:
        info["device"] = "cpu"
    return info


def peak_flops(device_name: str) -> float | None:
    return next((v for k, v in PEAKS if k in device_name), None)


# -- assets: model, specs ------------------------------------------------------------------------------------
def make_model(dst: Path, shape: str, tokenizer_dir: Path, tiny: bool) -> dict:
    """A random-initialised Llama of ``shape`` (or the tiny one) with the tokenizer of ``tokenizer_dir``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if (tokenizer_dir / "config.json").exists():
        cfg = LlamaConfig.from_pretrained(tokenizer_dir)
    else:
        cfg = LlamaConfig(tie_word_embeddings=True)
    for k, v in (TINY_SHAPE if tiny else SHAPES[shape]).items():
        setattr(cfg, k, v)
    cfg.vocab_size = max(len(tok), cfg.vocab_size if not tiny else 0)
    cfg.dtype = "float32"
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst, safe_serialization=True)
    tok.save_pretrained(dst)
    return {"shape": "tiny" if tiny else shape, "params": sum(p.numel() for p in model.parameters()),
            "config": {k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                    "num_attention_heads", "num_key_value_heads", "head_dim",
                                                    "vocab_size", "tie_word_embeddings")}}


def make_spec(example: str, dst: Path, *, model: Path, text: Path, store: Path, name: str, over: dict) -> Path:
    """examples/<example>.yaml with the model, text, store and ``over`` replaced; validated, written as JSON."""
    from darwinlm.spec import load_spec, spec_to_dict
    from darwinlm.spec.io import read_document, set_path

    d = read_document(REPO / "examples" / f"{example}.yaml")
    fields = {"name": name, "store": f"file://{store}", "model.path": str(model),
              "data.train": {"path": str(text / "train"), "format": "text"},
              "data.heldout": {"path": str(text / "heldout"), "format": "text"}, **over}
    for k, v in fields.items():
        set_path(d, k.split("."), v)
    dst.write_text(json.dumps(d, indent=1))
    dst.write_text(json.dumps(spec_to_dict(load_spec(dst)), indent=1))  # validated, defaults resolved
    return dst


# -- stages (each runs in its own process: ``python -m bench.gpu --stage NAME ...``) -----------------------
def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _workspace(spec_file: str):
    from darwinlm.run.workspace import Workspace
    from darwinlm.spec import load_spec

    return Workspace(load_spec(spec_file))


def stage_setup(a) -> dict:
    work = Path(a.work)
    model = make_model(work / f"model-{a.shape}", a.shape, Path(a.tokenizer).expanduser(), a.tiny)
    text, store = Path(a.text).expanduser(), work / "store"
    name = "tiny" if a.tiny else a.shape
    common = dict(model=work / f"model-{a.shape}", text=text, store=store)
    quick = make_spec("smollm2-quick", work / f"quick-{a.shape}.json", name=f"gpu-quick-{name}",
                      over=TINY_QUICK if a.tiny else {}, **common)
    paper = make_spec("smollm2-paper", work / f"paper-{a.shape}.json", name=f"gpu-paper-{name}",
                      over=TINY_PAPER if a.tiny else {}, **common)
    return {"environment": environment(), "model": model, "specs": {"quick": str(quick), "paper": str(paper)}}


def stage_evaluator(a) -> dict:
    """bench/evaluator.py on the paper spec; seconds per generation and GPU-hours for the spec's generations."""
    from bench import evaluator
    from darwinlm.spec import load_spec

    spec = load_spec(a.spec)
    argv = ["--spec", a.spec, "--paths", a.paths, "--threads", "1" if a.tiny else "0"]
    out = evaluator.main(argv + (["--offspring", str(a.offspring)] if a.offspring else []))
    rows = {}
    for r in out["rows"]:
        rows[r["path"]] = {k: r.get(k) for k in ("wall_s", "cpu_s", "speedup_wall", "trained_tokens",
                                                 "max_abs_diff_vs_baseline", "max_rel_diff_vs_baseline",
                                                 "spearman_by_stage", "same_survivors", "same_winner")}
        rows[r["path"]]["gpu_hours_for_generations"] = r["wall_s"] * spec.search.generations / 3600
    return {"offspring": out["offspring"], "stages": out["stages"], "generations_projected": spec.search.generations,
            "rows": rows}


def _full_chunks(pool, seq_len: int, n: int) -> list:
    full = [c for c in pool.chunks if int(c.numel()) == seq_len] or list(pool.chunks)
    return [full[i % len(full)] for i in range(n)]


def _matmul_flops_per_token(model) -> tuple[int, int]:
    """(parameters in nn.Linear weights, the LM head included; summed attention width over layers)."""
    import torch

    lin = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    attn = sum(m.q_proj.out_features for n, m in model.named_modules() if n.endswith("self_attn"))
    return lin, attn


def stage_step(a) -> dict:
    """One fast-path fine-tune step (shrunk uniform candidate, batch 1 x seq_len): speed, MFU, GPU busy share."""
    import torch

    from bench.evaluator import ensure_database
    from darwinlm.llm.train import finetune, make_optimizer

    ws = _workspace(a.spec)
    spec = ws.spec
    ensure_database(ws)
    model = ws.builder.shrunk(ws.uniform_genome())
    model.requires_grad_(True)
    model.train()
    opt = make_optimizer(model.parameters(), spec.search.finetune, fused=True)
    T = spec.data.seq_len
    warm, steps = (2, 3) if a.tiny else (5, 20)
    chunks = _full_chunks(ws.search_pools.finetune, T, warm + steps)
    cd, ft = spec.model.compute_dtype, spec.search.finetune
    finetune(model, chunks[:warm], ft, cd, opt=opt)  # the evaluator's call: batch_size chunks per step
    _sync()
    t0 = time.perf_counter()
    finetune(model, chunks[warm:], ft, cd, opt=opt)
    _sync()
    n_steps = -(-steps // ft.batch_size)
    dt = (time.perf_counter() - t0) / n_steps
    tokens = sum(int(c.numel()) for c in chunks[warm:]) / n_steps
    lin, attn = _matmul_flops_per_token(model)
    # matmuls (6 FLOPs per weight and token: forward 2, backward 4) + causal QK^T and AV (forward 2·T²·d per
    # chunk, x3 with backward); per step
    flops = (6 * lin * tokens * n_steps + 6 * attn * sum(int(c.numel()) ** 2 for c in chunks[warm:])) / n_steps
    out = {"device": str(next(model.parameters()).device), "seq_len": T, "batch_size": ft.batch_size,
           "tokens_per_step": tokens,
           "step_s": dt, "tokens_per_s": tokens / dt, "linear_params": lin, "flops_per_step": flops,
           "achieved_tflops": flops / dt / 1e12, "fused_adamw": bool(opt.defaults.get("fused")),
           "optimizer_state_device": _state_device(opt)}
    if torch.cuda.is_available():
        peak = peak_flops(torch.cuda.get_device_name(0))
        out.update(peak_tflops=peak and peak / 1e12, mfu=peak and flops / dt / peak)
        try:  # the timing above stands even if the profiler cannot run here
            out.update(_profile(lambda cs: finetune(model, cs, ft, cd, opt=opt), chunks[warm:warm + 3]))
        except Exception as e:  # noqa: BLE001 - recorded in the result
            out["profile_error"] = f"{type(e).__name__}: {e}"
    return out


def _state_device(opt) -> str | None:
    for st in opt.state.values():
        for v in st.values():
            if hasattr(v, "device") and v.dim() > 0:
                return str(v.device)
    return None


def _profile(steps, chunks) -> dict:
    """torch.profiler over ``steps(chunks)`` (one step per chunk): GPU kernel time / wall, kernels per step."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    _sync()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        steps(chunks)
        _sync()
    wall = time.perf_counter() - t0
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_us = sum(e.time_range.elapsed_us() for e in kernels)  # one stream: kernels and copies do not overlap
    return {"profiled_steps": len(chunks), "profiled_wall_s": wall, "gpu_kernel_s": busy_us / 1e6,
            "gpu_busy_share": busy_us / 1e6 / wall if wall else None, "kernels_per_step": len(kernels) / len(chunks)}


def stage_shrunk(a) -> dict:
    """bench/shrunk_speed.py (uniform 50% of the spec's target) in bf16 at a compute-bound shape."""
    from bench import shrunk_speed

    ns = argparse.Namespace(result=None, spec=a.spec, store=None, batch=2 if a.tiny else 8,
                            seq=64 if a.tiny else 2048, reps=2 if a.tiny else 10, warmup=1,
                            threads=1 if a.tiny else 0, dtype="bfloat16", json=True, log_level="WARNING")
    res = shrunk_speed.run(ns)
    print(shrunk_speed.table(res))
    return res


def stage_quick(a) -> dict:
    """The quick example end to end; wall seconds per phase (task kind)."""
    from darwinlm.core.plan import next_tasks
    from darwinlm.run.tasks import run_task
    from darwinlm.store import layout

    ws = _workspace(a.spec)
    ws.record_spec()
    t0 = time.perf_counter()
    ws.model, ws.pools  # noqa: B018 - load the model and the token pools first (timed apart)
    phases: dict[str, float] = {"load": time.perf_counter() - t0}
    while todo := next_tasks(ws.spec, ws.store):
        for task in todo:
            t1 = time.perf_counter()
            run_task(ws, task)
            _sync()
            phases[task.kind] = phases.get(task.kind, 0.0) + time.perf_counter() - t1
            print(f"{task.name}: {time.perf_counter() - t1:.1f}s", flush=True)
    summary = ws.store.get_json(layout.SUMMARY) if ws.store.exists(layout.SUMMARY) else None
    return {"phases_s": phases, "total_s": time.perf_counter() - t0, "generations": ws.spec.search.generations,
            "seconds_per_generation": phases.get("generation", 0.0) / ws.spec.search.generations,
            "device": str(ws.device), "summary": summary}


def stage_database(a) -> dict:
    """The layer database's parts: Hessians of every block (one dense pass) and OBS per layer kind."""
    import torch

    from darwinlm.llm import database as db
    from darwinlm.llm.adapter import adapter_for
    from darwinlm.llm.obs import obs_prune

    ws = _workspace(a.spec)
    spec, model = ws.spec, ws.model
    ad = adapter_for(model)
    chunks = db._calibration_chunks(ws.pools.calibration, spec.database.calibration_tokens)
    _sync()
    t0 = time.perf_counter()
    H = db.collect_hessians(model, range(ad.num_layers), chunks, spec.model.compute_dtype)
    _sync()
    kinds: dict[str, dict] = {}
    hess_s = time.perf_counter() - t0
    for name, (kind, block, group, ladder) in db.layer_ladders(model, spec.database).items():
        lin = ad.o_proj(model, block) if kind == "attn" else ad.down_proj(model, block)
        W = lin.weight.detach().to(torch.float64).cpu()  # [d_row, d_col], as database.build_shard
        t1 = time.perf_counter()
        obs_prune(W, H[name], group_size=group, boundaries=[r for r in ladder.removed if 0 < r < ladder.units],
                  damping=spec.database.damping)
        k = kinds.setdefault(kind, {"layers": 0, "obs_s": 0.0, "columns": int(W.shape[1])})
        k["layers"] += 1
        k["obs_s"] += time.perf_counter() - t1
    for k in kinds.values():
        k["obs_s_per_layer"] = k["obs_s"] / k["layers"]
    return {"calibration_tokens": sum(int(c.numel()) for c in chunks), "hessians_s": hess_s,
            "hessian_device": str(ws.device), "obs_device": "cpu", "obs_threads": torch.get_num_threads(),
            "kinds": kinds}


def _launch(spec_file: str, tasks: list[str], world: int, backend: str | None, timeout: float) -> tuple[int, str]:
    """``darwinlm task`` as ``world`` ranks on this machine (one GPU shared); (worst exit code, stderr tail)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = []
    for rank in range(world):
        env = {k: v for k, v in _env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        if world > 1:
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE=str(world),
                       DARWINLM_DIST_TIMEOUT_S=str(int(timeout)))
            if backend:
                env["DARWINLM_DIST_BACKEND"] = backend
        procs.append(subprocess.Popen([sys.executable, "-m", "darwinlm.cli", "--log-level", "WARNING", "task",
                                       spec_file, *tasks], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    rc, err = 0, ""
    for p in procs:
        try:
            _, e = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            _, e = p.communicate()
        rc = max(rc, p.returncode if p.returncode is not None else 124, key=abs)
        err += (e or "")[-1500:]
    return rc, err


def stage_distributed(a) -> dict:
    """Generation 0 as W=1 ranks, then recomputed from scratch as W=2 ranks on the same device: same state.

    One search: W=1 runs the phases before the search and generation 0 in one process; generation 0's
    records are then deleted (state and every candidate's result, so nothing is reused) and W=2 ranks
    compute it again. The library's backend first (NCCL on CUDA); Gloo if that fails to run two ranks."""
    from darwinlm.core.plan import all_tasks
    from darwinlm.spec import load_spec, spec_to_dict, with_overrides
    from darwinlm.store import layout, open_store

    base = load_spec(a.spec)
    over = {"name": f"{base.name}-dist", "search.generations": 1, "model.threads": base.model.threads or 4}
    spec = with_overrides(base, **over)
    f = Path(a.work) / f"{spec.name}.json"
    f.write_text(json.dumps(spec_to_dict(spec)))
    store = open_store(spec.store).child(layout.search_prefix(spec.name))
    pre = [t.name for phase in all_tasks(spec) for t in phase if t.kind in ("database", "sensitivity")]
    out: dict = {"runs": {}}
    states = {}
    for key, world, backend in (("w1", 1, None), ("w2", 2, None), ("w2-gloo", 2, "gloo")):
        if key == "w2-gloo" and "w2" in states:
            break  # the library's default backend ran two ranks
        store.delete_prefix(layout.generation_state(0).rpartition("/")[0] + "/")  # recompute from scratch
        t0 = time.perf_counter()
        rc, err = _launch(str(f), (pre if world == 1 else []) + ["generation-0"], world, backend, 600)
        default = "nccl" if _device_type() == "cuda" else "gloo"
        run = out["runs"][key] = {"rc": rc, "wall_s": time.perf_counter() - t0, "backend": backend or default}
        if rc != 0 or not store.exists(layout.generation_state(0)):
            run["stderr_tail"] = err[-2000:]
            continue
        st = store.get_json(layout.generation_state(0))
        run["compute_s"] = st.get("seconds")
        states[key] = {k: v for k, v in st.items() if k != "seconds"}
    w2 = next((k for k in ("w2", "w2-gloo") if k in states), None)
    out["identical"] = bool(w2 and "w1" in states and states[w2] == states["w1"])
    out["compared"] = ["w1", w2] if w2 else None
    return out


def _device_type() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def stage_prebuild(a) -> dict:
    """A shape's model, specs and paper-spec layer database (for its evaluator stage later)."""
    from bench.evaluator import ensure_database

    res = stage_setup(a)
    t0 = time.perf_counter()
    ensure_database(_workspace(res["specs"]["paper"]))
    res["database_s"] = time.perf_counter() - t0
    return res


STAGE_FNS = {"setup": stage_setup, "prebuild": stage_prebuild, "evaluator": stage_evaluator, "step": stage_step,
             "shrunk": stage_shrunk, "quick": stage_quick, "database": stage_database, "distributed": stage_distributed}


# -- the report ------------------------------------------------------------------------------------------------
def _f(x, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def _result(res: dict, name: str) -> dict:
    return (res["stages"].get(name) or {}).get("result") or {}


def render(res: dict) -> str:
    """gpu.md: one table per stage that produced a result."""
    lines = ["# GPU check", ""]
    env = _result(res, "setup").get("environment", {})
    if env:
        lines += [f"device {env.get('device')}, torch {env.get('torch')}, transformers {env.get('transformers')}, "
                  f"CUDA {env.get('cuda')}, datasets {env.get('datasets')}, python {env.get('python')}", ""]
    lines += ["| stage | status | wall s |", "|---|---|---:|"]
    lines += [f"| {k} | {v['status']} | {_f(v.get('wall_s'), '.1f')} |" for k, v in res["stages"].items()]
    for name in [k for k in res["stages"] if k == "evaluator" or k.startswith("evaluator-")]:
        ev = _result(res, name) or {"rows": res["stages"][name].get("partial", {})}
        lines += ["", f"## {name}: one generation at the paper schedule "
                      f"({ev.get('offspring', '?')} offspring, stages {ev.get('stages', '?')})", "",
                  "| path | s/gen | × vs baseline | GPU-h / 200 gen | max abs Δfitness vs baseline | same survivors, winner |",
                  "|---|---:|---:|---:|---:|---|"]
        for path, r in ev.get("rows", {}).items():
            lines.append(f"| {path} | {_f(r.get('wall_s'))} | {_f(r.get('speedup_wall'))} | "
                         f"{_f(r.get('gpu_hours_for_generations', (r.get('wall_s') or 0) * 200 / 3600))} | "
                         f"{_f(r.get('max_abs_diff_vs_baseline'), '.1e')} | "
                         f"{r.get('same_survivors', '-')}, {r.get('same_winner', '-')} |")
    st = _result(res, "step")
    if st:
        lines += ["", "## fast fine-tune step (shrunk uniform candidate, batch 1)", "",
                  "| seq | step ms | tokens/s | TFLOP/s | MFU | GPU busy share | kernels/step |", "|---:|---:|---:|---:|---:|---:|---:|",
                  f"| {st['seq_len']} | {st['step_s'] * 1e3:.1f} | {st['tokens_per_s']:,.0f} | "
                  f"{st['achieved_tflops']:.2f} | {_f(st.get('mfu'), '.3f')} | {_f(st.get('gpu_busy_share'), '.2f')} | "
                  f"{_f(st.get('kernels_per_step'), '.0f')} |"]
    sh = _result(res, "shrunk")
    if sh:
        lines += ["", f"## shrunk vs dense forward ({sh['dtype']}, batch {sh['batch']} × {sh['seq']})", "",
                  "| forward | dense tok/s | shrunk tok/s | speedup | ideal | measured/ideal |", "|---|---:|---:|---:|---:|---:|"]
        for mode, m in sh["modes"].items():
            lines.append(f"| {mode} | {m['models']['dense']['tokens_per_s']:,.0f} | "
                         f"{m['models']['shrunk']['tokens_per_s']:,.0f} | {m['speedup_shrunk']:.3f} | "
                         f"{m['ideal_speedup']:.3f} | {m['measured_over_ideal']:.3f} |")
    q = _result(res, "quick")
    if q:
        lines += ["", f"## quick example end to end on {q['device']} ({q['generations']} generations)", "",
                  "| " + " | ".join(q["phases_s"]) + " | total |", "|" + "---:|" * (len(q["phases_s"]) + 1),
                  "| " + " | ".join(f"{v:.1f}" for v in q["phases_s"].values()) + f" | {q['total_s']:.1f} |"]
    db = _result(res, "database")
    if db:
        lines += ["", f"## layer database ({db['calibration_tokens']} calibration tokens; Hessians on "
                      f"{db['hessian_device']}, OBS on {db['obs_device']} with {db['obs_threads']} threads)", "",
                  "| part | layers | columns | s | s/layer |", "|---|---:|---:|---:|---:|",
                  f"| Hessians (all blocks, one pass) | - | - | {db['hessians_s']:.2f} | - |"]
        lines += [f"| OBS {k} | {v['layers']} | {v['columns']} | {v['obs_s']:.2f} | {v['obs_s_per_layer']:.3f} |"
                  for k, v in db["kinds"].items()]
    dist = _result(res, "distributed")
    if dist:
        lines += ["", "## W=2 ranks on one device vs W=1 (generation 0 of the quick spec)", "",
                  "| run | backend | rc | wall s | compute s |", "|---|---|---:|---:|---:|"]
        lines += [f"| {k} | {v['backend']} | {v['rc']} | {v['wall_s']:.1f} | {_f(v.get('compute_s'), '.1f')} |"
                  for k, v in dist["runs"].items()]
        lines += ["", f"identical generation states ({dist['compared']}): {dist['identical']}"]
    return "\n".join(lines) + "\n"


def _partial_evaluator(output: str) -> dict:
    """Per-path seconds from the evaluator's progress lines (a stage cut by its time limit)."""
    import re

    rows = {}
    for m in re.finditer(r"\[gen \d+ (\S+)\] ([\d.]+)s wall", output):
        rows[m.group(1)] = {"wall_s": float(m.group(2))}
    return rows


# -- entry point ---------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m bench.gpu",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default=None,
                    help=f"comma-separated, of {', '.join(SHAPES)}: the first gets every stage, the others the "
                         "evaluator (baseline, fast) with the time left (default: smollm2-135m,llama-1b; "
                         "with --tiny: one)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model and budgets, every stage; "
                                                        "stages run in this process unless --isolate")
    ap.add_argument("--isolate", action="store_true", help="with --tiny: every stage in its own process, as on a GPU")
    ap.add_argument("--out", default=None, help="output folder (default $OUT, else bench/results/gpu-<shape>-<time>)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole check (default 450 on a GPU: ≤ 8 min with start-up; 900 with --tiny)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {', '.join(STAGES)}")
    ap.add_argument("--tokenizer", default=str(CACHE / "models" / "smollm2-135m-instruct"),
                    help="HF folder with the tokenizer (and the config the shapes start from)")
    ap.add_argument("--text", default=str(CACHE / "text" / "brown"), help="text corpus with train/ and heldout/")
    ap.add_argument("--offspring", type=int, default=None, help="evaluator offspring (default: the paper's 16)")
    ap.add_argument("--pack", metavar="DIR", default=None,
                    help="copy the tokenizer/config files of --tokenizer and the --text corpus into DIR/model and "
                         "DIR/text (a few MB, for a machine without the provisioned cache), then exit")
    ap.add_argument("--stage", choices=sorted(STAGE_FNS), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help="folder for the models, specs and stores (default: a new temporary "
                                                 "folder; never inside --out: weights must not come back)")
    ap.add_argument("--paths", default="baseline,faithful,fast", help=argparse.SUPPRESS)
    ap.add_argument("--result-json", help=argparse.SUPPRESS)
    return ap


def run_stage(a) -> int:
    """One stage in this process; its result as JSON in ``--result-json``."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    res = STAGE_FNS[a.stage](a)
    Path(a.result_json).write_text(json.dumps(res, indent=1, default=str))
    return 0


def pack(dst: Path, tokenizer: Path, text: Path) -> int:
    """The few MB a GPU machine needs instead of the provisioned cache: config, tokenizer, text (no weights)."""
    (dst / "model").mkdir(parents=True, exist_ok=True)
    keep = [f for f in tokenizer.iterdir() if f.is_file() and f.suffix != ".safetensors"
            and (f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges"))
                 or f.name in ("config.json", "generation_config.json"))]
    for f in keep:
        shutil.copy2(f, dst / "model" / f.name)
    for sub in ("train", "heldout"):
        shutil.copytree(text / sub, dst / "text" / sub, dirs_exist_ok=True)
    size = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())
    print(f"packed {len(keep)} model files and {text} into {dst} ({size / 2**20:.1f} MiB)")
    return 0


def _prebuild(run: Run, common: list[str], shape: str) -> tuple[subprocess.Popen, Path]:
    """Start building another shape's model and layer database in the background (CPU-bound OBS on half the
    cores) while the first shape's later stages run; ``_extra_shape`` waits for it."""
    res = run.work / "stages" / f"prebuild-{shape}.json"
    env = _env()
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // 2)))
    log = open(run.work / f"prebuild-{shape}.log", "w")
    run.log(f"prebuild-{shape}: started in the background")
    proc = subprocess.Popen([sys.executable, *common, "--stage", "prebuild", "--shape", shape, "--result-json", str(res)],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, res


def _extra_shape(run: Run, common: list[str], shape: str, job: tuple[subprocess.Popen, Path], cap: float) -> None:
    """Another shape: wait for its prebuild, then the evaluator's baseline and fast paths at the paper schedule."""
    proc, res = job
    t0 = time.monotonic()
    try:
        proc.wait(timeout=max(1.0, run.left() - 30))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    ok = proc.returncode == 0 and res.exists()
    log = (run.work / f"prebuild-{shape}.log").read_text()
    run.results["stages"][f"prebuild-{shape}"] = {
        "status": "ok" if ok else f"failed (exit {proc.returncode})", "waited_s": round(time.monotonic() - t0, 1),
        "result": json.loads(res.read_text()) if ok else None, **({} if ok else {"output_tail": log[-4000:]})}
    run.log(f"prebuild-{shape}: {'ok' if ok else 'failed'} (waited {time.monotonic() - t0:.1f}s)")
    run.save()
    if ok:
        spec = json.loads(res.read_text())["specs"]["paper"]
        run.stage(f"evaluator-{shape}", common + ["--stage", "evaluator", "--shape", shape, "--paths", "baseline,fast",
                                                  "--spec", spec], cap)


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    shapes = [s for s in (a.shape or ("smollm2-135m" if a.tiny else "smollm2-135m,llama-1b")).split(",") if s]
    bad = [s for s in shapes if s not in SHAPES] + [s for s in a.stages.split(",") if s and s not in STAGES]
    if bad:
        _parser().error(f"unknown shape(s)/stage(s) {bad}")
    a.shape = shapes[0]
    a.tokenizer, a.text = (str(Path(x).expanduser().resolve()) for x in (a.tokenizer, a.text))
    if a.stage:
        return run_stage(a)
    if a.pack:
        return pack(Path(a.pack), Path(a.tokenizer).expanduser(), Path(a.text).expanduser())
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(a.out or os.environ.get("OUT") or REPO / "bench" / "results" / f"gpu-{a.shape}-{stamp}").resolve()
    work = Path(a.work or tempfile.mkdtemp(prefix="darwinlm-gpu-")).resolve()  # models and stores: not in --out
    run = Run(out, work, a.budget or (900.0 if a.tiny else 450.0), a.tiny, in_process=a.tiny and not a.isolate)
    caps = TINY_CAPS if a.tiny else CAPS
    common = ["-m", "bench.gpu", "--tokenizer", a.tokenizer, "--text", a.text, "--work", str(run.work)]
    common += ["--tiny"] if a.tiny else []
    common += ["--offspring", str(a.offspring)] if a.offspring else []
    setup = run.stage("setup", common + ["--stage", "setup", "--shape", a.shape], 300)
    if setup is None:
        run.log("setup failed: nothing else can run")
        return 1
    specs = setup["specs"]
    chosen = [s for s in STAGES if s in a.stages.split(",")]
    jobs = {}
    for name in chosen:
        spec = specs["quick"] if name in ("quick", "database", "distributed") else specs["paper"]
        run.stage(name, common + ["--stage", name, "--shape", a.shape, "--spec", spec], caps[name])
        if name == "database" or (name == chosen[-1] and not jobs):
            # after the timed database stage: the other shapes' OBS (CPU) overlaps only quick and distributed
            jobs = {shape: _prebuild(run, common, shape) for shape in shapes[1:]}
    for shape, job in jobs.items():
        _extra_shape(run, common, shape, job, caps["extra"])
    run.log(f"done: {out}/gpu.json, gpu.md, gpu.log, results.tgz")
    run.save()
    print(render(run.results))
    ok = all(v["status"] in ("ok", "skipped") for v in run.results["stages"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
