"""The slow tier: the README's run command on the real SmolLM2-135M (minutes). `pytest -m slow`."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import torch

from darwinlm.spec import load_spec, with_overrides

ROOT = pathlib.Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    from darwinlm.provision import model_dir

    if not (model_dir() / "config.json").exists():
        pytest.skip("SmolLM2 not provisioned: run scripts/setup.sh")
    store = f"file://{tmp_path_factory.mktemp('quick')}"
    cmd = [sys.executable, "-m", "darwinlm.cli", "run", str(ROOT / "examples" / "smollm2-quick.yaml"), "--store", store]
    subprocess.run(cmd, check=True, timeout=20 * 60)
    from darwinlm.run.workspace import Workspace

    spec = with_overrides(load_spec(ROOT / "examples" / "smollm2-quick.yaml"), store=store)
    return Workspace(spec)


def test_quick_example_meets_the_bar(quick_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from darwinlm.llm.adapter import adapter_for

    ws = quick_run
    summary = ws.store.get_json("result/summary.json")
    rows = {(r["model"], r["stage"]): r for r in summary["rows"]}
    # searched beats uniform at the same parameter count
    assert rows[("searched", "one-shot")]["ppl"] < rows[("uniform", "one-shot")]["ppl"]
    assert rows[("searched", "post-trained")]["ppl"] < rows[("uniform", "post-trained")]["ppl"]
    # the exported model loads with stock transformers, has the target size, and equals the masked model
    ws.store.get_dir("result/model", tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    export = ws.store.get_json("result/export.json")
    params = adapter_for(model).nonembedding_param_count(model)
    assert abs(params - export["target_nonembedding_params"]) / export["target_nonembedding_params"] < 0.02
    genome = ws.final_genome()
    shrunk = ws.builder.shrunk(genome)
    masked, mask = ws.builder.masked(genome)
    mask.remove()
    ids = ws.pools.heldout.chunks[0][None, :128]
    with torch.no_grad():
        torch.testing.assert_close(shrunk(input_ids=ids).logits, masked(input_ids=ids).logits, atol=1e-4, rtol=0)
