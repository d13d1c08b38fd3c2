"""The whole pipeline on the tiny model: artifacts, export fidelity, determinism, resume (SIGKILL in every
phase: test_crash_matrix.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from darwinlm.run.runner import run_search
from darwinlm.spec import load_spec
from darwinlm.store import open_store

from ..conftest import tiny_spec_dict


def _spec(assets, tmp_path, name="store", **over):
    return load_spec(tiny_spec_dict(assets, f"file://{tmp_path / name}", **over))


@pytest.fixture(scope="module")
def finished(tiny_assets, tmp_path_factory):
    """One complete run, shared by the read-only checks below."""
    tmp = tmp_path_factory.mktemp("run")
    spec = _spec(tiny_assets, tmp, **{"search.generations": 4})
    ws = run_search(spec)
    return spec, ws


def test_artifacts_written(finished):
    spec, ws = finished
    for key in ("result/config.json", "result/config.txt", "result/report.md", "result/fitness.png",
                "result/summary.json", "result/model/config.json", "result/model/model.safetensors",
                "result/model/darwinlm.json", "spec.json"):
        assert ws.store.exists(key), key
    config = ws.store.get_json("result/config.json")
    assert set(config) == set(ws.space.layers)
    assert ws.store.get_bytes("result/fitness.png")[:8] == b"\x89PNG\r\n\x1a\n"
    report = ws.store.get_bytes("result/report.md").decode()
    assert "| searched | post-trained |" in report and "| uniform | one-shot |" in report
    # the search keeps the level budget of every group
    genome = ws.final_genome()
    assert genome.level_sums() == ws.uniform_genome().level_sums()


def test_report_leads_with_the_comparison_and_tracks_every_winner(finished):
    spec, ws = finished
    summary = ws.store.get_json("result/summary.json")
    report = ws.store.get_bytes("result/report.md").decode()
    assert report.index("## Searched vs uniform at the same size") < report.index("## All models")
    comps = {(c["set"], c["stage"]): c for c in summary["comparisons"]}
    assert set(comps) == {("heldout", "one-shot"), ("heldout", "post-trained")}
    for c in comps.values():
        assert c["ci_low"] <= c["ratio"] <= c["ci_high"] and c["ci_low"] < c["ci_high"]
        assert c["ratio"] == pytest.approx(c["searched_ppl"] / c["uniform_ppl"])
    rows = {(r["model"], r["stage"]): r for r in summary["rows"]}
    assert comps[("heldout", "one-shot")]["searched_ppl"] == rows[("searched", "one-shot")]["ppl"]
    search = summary["search"]
    assert search["init"] == "sensitivity" and search["generations_run"] == 4 and "ran all 4" in search["stopped"]
    # the curve is the tracking score of each generation's winner: re-scoring the winner gives it again
    for g, point in enumerate(search["curve"]):
        state = ws.store.get_json(f"generations/{g:05d}/state.json")
        assert point["tracking"] == state["tracking"]["fitness"]
    last = ws.store.get_json("generations/00003/state.json")
    assert ws.track(ws.final_genome()) == pytest.approx(last["tracking"]["fitness"], rel=1e-6)
    assert search["uniform_tracking"] == pytest.approx(ws.track(ws.uniform_genome()), rel=1e-6)


def test_patience_stops_where_the_parent_first_survives_long_enough(finished, tiny_assets, tmp_path):
    """search.patience stops the search exactly where the uninterrupted run's parent first survived that
    many generations in a row; the generations up to there are identical, the plan skips the rest."""
    spec, ws = finished
    survived = [ws.store.get_json(f"generations/{g:05d}/state.json")["parent_survived"] for g in range(4)]
    assert any(survived[:3]), f"no generation kept its parent in the reference run: {survived}"
    stop_at = survived.index(True)  # patience 1: the first parent-kept generation ends the search
    s = _spec(tiny_assets, tmp_path, **{"search.generations": 4, "search.patience": 1})
    again = run_search(s)
    assert again.store.get_json("generations/stop.json")["after"] == stop_at
    for g in range(4):
        key = f"generations/{g:05d}/state.json"
        if g <= stop_at:
            assert again.store.get_json(key)["winner"] == ws.store.get_json(key)["winner"]
        else:
            assert not again.store.exists(key)
    assert again.store.get_json("result/config.json") == \
        ws.store.get_json(f"generations/{stop_at:05d}/state.json")["winner"]
    summary = again.store.get_json("result/summary.json")
    assert summary["search"]["generations_run"] == stop_at + 1 and "stopped early" in summary["search"]["stopped"]
    assert "stopped early" in again.store.get_bytes("result/report.md").decode()


def test_export_loads_with_stock_transformers_and_matches(finished, tmp_path):
    from transformers import AutoModelForCausalLM

    from darwinlm.run.workspace import load_posttrained

    spec, ws = finished
    ws.store.get_dir("result/model", tmp_path / "model")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")  # no trust_remote_code
    assert type(loaded).__name__ == "DarwinLlamaForCausalLM"
    ref = load_posttrained(ws, "searched")
    ids = torch.cat(list(ws.pools.heldout.chunks[:2]))[None, :64]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5, rtol=0)
    summary = ws.store.get_json("result/summary.json")
    searched = [r for r in summary["rows"] if r["model"] == "searched"]
    from darwinlm.llm.adapter import adapter_for

    assert len(searched) == 2, summary["rows"]  # one-shot and post-trained
    assert {r["nonembedding_params"] for r in searched} == {adapter_for(loaded).nonembedding_param_count(loaded)}


def test_readme_load_snippet_in_a_fresh_interpreter(finished, tmp_path):
    """The README's snippet, as a user runs it: a new Python process, only ``import darwinlm`` and stock
    transformers (no trust_remote_code), pointed at the exported model; it loads and gives the logits of
    the in-process model."""
    import pathlib
    import re

    from transformers import AutoModelForCausalLM

    readme = (pathlib.Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    snippet = next(b for b in blocks if "import darwinlm" in b and "from_pretrained" in b)
    spec, ws = finished
    model_dir = tmp_path / "model"
    ws.store.get_dir("result/model", model_dir)
    code = snippet.replace('"runs/searches/smollm2-quick/result/model"', repr(str(model_dir)))
    assert code != snippet, "the snippet no longer loads runs/searches/smollm2-quick/result/model"
    ids = torch.cat(list(ws.pools.heldout.chunks[:1]))[None, :32]
    code += ("import torch, json\n"
             f"ids = torch.tensor({ids.tolist()})\n"
             "with torch.no_grad():\n"
             "    out = model(input_ids=ids).logits\n"
             "print(json.dumps({'type': type(model).__name__, 'logits': out[0, -1, :8].tolist()}))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    loaded = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        want = loaded(input_ids=ids).logits[0, -1, :8]
    assert got["type"] == type(loaded).__name__
    torch.testing.assert_close(torch.tensor(got["logits"]), want, atol=1e-5, rtol=0)


def test_shrunk_equals_masked_one_shot(finished):
    spec, ws = finished
    genome = ws.final_genome()
    shrunk = ws.builder.shrunk(genome)
    masked, mask = ws.builder.masked(genome)
    mask.remove()
    ids = ws.pools.heldout.chunks[0][None, :]
    with torch.no_grad():
        torch.testing.assert_close(shrunk(input_ids=ids).logits, masked(input_ids=ids).logits, atol=1e-4, rtol=0)


def test_same_seed_same_result_and_rerun_is_noop(finished, tiny_assets, tmp_path):
    spec, ws = finished
    again = run_search(_spec(tiny_assets, tmp_path, **{"search.generations": 4}))
    assert again.store.get_json("result/config.json") == ws.store.get_json("result/config.json")
    for g in range(4):
        a = ws.store.get_json(f"generations/{g:05d}/state.json")
        b = again.store.get_json(f"generations/{g:05d}/state.json")
        assert [s["scores"] for s in a["stages"]] == [s["scores"] for s in b["stages"]]
    before = sorted(again.store.list())
    run_search(_spec(tiny_assets, tmp_path, **{"search.generations": 4}))  # complete: nothing to do
    assert sorted(again.store.list()) == before


def test_resume_mid_generation_reuses_results(finished, tiny_assets, tmp_path):
    """A crash after some candidates of a generation were scored: the re-run reuses them."""
    spec, ws = finished
    s = _spec(tiny_assets, tmp_path, **{"search.generations": 4})
    run_search(s, until=lambda t: t.kind == "generation" and t.index == 3)
    # simulate the crash inside generation 2: drop its state and half of its candidate results
    store = open_store(s.store).child("searches/tiny")
    store.delete("generations/00002/state.json")
    results = store.list("generations/00002/results")
    for k in results[::2]:
        store.delete(k)
    run_search(s)
    assert store.get_json("result/config.json") == ws.store.get_json("result/config.json")
    assert store.get_json("generations/00002/state.json")["stages"] == \
        ws.store.get_json("generations/00002/state.json")["stages"]


def test_spec_change_is_refused(finished, tiny_assets, tmp_path):
    from darwinlm.errors import SpecError

    s = _spec(tiny_assets, tmp_path, **{"search.generations": 1})
    run_search(s, until=lambda t: t.kind == "generation")
    with pytest.raises(SpecError) as e:
        run_search(_spec(tiny_assets, tmp_path, **{"search.generations": 1, "seed": 7}))
    assert e.value.first_path == "seed"


def test_cli_validate_reports_every_field(tmp_path, tiny_assets):
    bad = tiny_spec_dict(tiny_assets, "file:///tmp/x")
    bad["search"]["selection"][1]["survivors"] = 3
    bad["search"]["fitness"]["kind"] = "klx"
    bad["model"]["dtipe"] = "float32"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    out = subprocess.run([sys.executable, "-m", "darwinlm.cli", "validate", str(path)], capture_output=True, text=True)
    assert out.returncode == 2
    for field in ("search.selection[1].survivors", "search.fitness.kind", "model.dtipe"):
        assert field in out.stderr, out.stderr
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(tiny_spec_dict(tiny_assets, "file:///tmp/x")))
    assert subprocess.run([sys.executable, "-m", "darwinlm.cli", "validate", str(good)]).returncode == 0
    schema = subprocess.run([sys.executable, "-m", "darwinlm.cli", "schema"], capture_output=True, text=True)
    assert json.loads(schema.stdout)["properties"]["search"]["type"] == "object"
