"""``python -m bench.gpu --tiny``: every stage of the GPU check on CPU, so the check cannot rot between GPU runs.

The same command a GPU machine runs (bench/README.md, gpu), with the tiny model and budgets: the quick
example end to end, the evaluator's three paths, the fine-tune step, the shrunk model's speed, the layer
database's parts and W=2 ranks against W=1. The test requires each stage's result, not only exit code 0.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tarfile

ROOT = pathlib.Path(__file__).resolve().parents[2]


# Not on the GPU test machine (GPU.md): every process of the check (the stages' ``darwinlm task`` ranks
# included) sees them as missing, through a sitecustomize on PYTHONPATH.
ABSENT = ("datasets", "dill", "multiprocess", "boto3", "botocore", "kopf", "kubernetes", "gguf")


def test_gpu_check_tiny_on_cpu(tiny_assets, tmp_path):
    out, site = tmp_path / "out", tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(f"import sys\nsys.modules.update(dict.fromkeys({ABSENT!r}))\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=f"{site}{os.pathsep}{ROOT}")
    r = subprocess.run([sys.executable, "-m", "bench.gpu", "--tiny", "--tokenizer", str(tiny_assets / "model"),
                        "--text", str(tiny_assets / "text"), "--out", str(out), "--work", str(tmp_path / "work"),
                        "--shape", "smollm2-135m,llama-1b"],  # a second shape: the background prebuild path
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = (out / "gpu.log").read_text() if (out / "gpu.log").exists() else ""
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:] + log[-5000:]
    res = json.loads((out / "gpu.json").read_text())
    st = {k: v["status"] for k, v in res["stages"].items()}
    assert st == {k: "ok" for k in ("setup", "evaluator", "step", "shrunk", "database", "quick", "distributed",
                                    "prebuild-llama-1b", "evaluator-llama-1b")}
    assert set(res["stages"]["evaluator-llama-1b"]["result"]["rows"]) == {"baseline", "fast"}

    def result(name):
        return res["stages"][name]["result"]

    assert result("setup")["environment"]["device"] == "cpu"
    assert result("setup")["environment"]["datasets"] is None  # the sitecustomize took effect
    rows = result("evaluator")["rows"]
    assert set(rows) == {"baseline", "faithful", "fast"}
    assert rows["faithful"]["max_rel_diff_vs_baseline"] < 1e-4  # tolerances of bench/evaluator.py
    assert rows["fast"]["max_rel_diff_vs_baseline"] < 1e-2
    assert all(r["wall_s"] > 0 and r["gpu_hours_for_generations"] > 0 for r in rows.values())
    step = result("step")
    assert step["tokens_per_step"] > 0 and step["achieved_tflops"] > 0 and step["fused_adamw"]
    assert step["optimizer_state_device"] == "cpu"
    assert set(result("shrunk")["modes"]) == {"full", "body"} and result("shrunk")["dtype"] == "bfloat16"
    quick = result("quick")
    assert {"database", "generation", "posttrain", "export", "evaluate"} <= set(quick["phases_s"])
    assert quick["summary"] is not None
    db = result("database")
    assert set(db["kinds"]) == {"attn", "mlp"} and db["hessians_s"] > 0
    dist = result("distributed")
    assert dist["runs"]["w1"]["rc"] == 0 and dist["runs"]["w2"]["rc"] == 0 and dist["runs"]["w2"]["backend"] == "gloo"
    assert dist["identical"] is True
    md = (out / "gpu.md").read_text()
    assert "## evaluator" in md and "identical generation states" in md
    assert sorted(p.name for p in out.iterdir()) == ["gpu.json", "gpu.log", "gpu.md", "results.tgz"]  # ≤ 8 files
    with tarfile.open(out / "results.tgz") as tar:
        assert {"gpu.json", "gpu.md", "gpu.log", "stages/evaluator.json", "stages/distributed.json"} <= set(tar.getnames())
