"""``darwinlm estimate`` against measured runs of the tiny model: the schedule's token counts exactly, and the
wall-clock of the whole embedded search (``darwinlm run`` in a fresh process) within ±30 % of what
``darwinlm estimate --calibrate`` (a fresh process too: one generation, end to end) predicted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import yaml

from darwinlm import cli
from darwinlm.run.estimate import schedule
from darwinlm.spec import load_spec
from darwinlm.store import layout, open_store

from ..conftest import tiny_spec_dict


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "darwinlm.cli", "--log-level", "WARNING", *args], env=env,
                          capture_output=True, text=True, timeout=600, check=True)


def test_estimate_tokens_exact_and_calibrated_wall_within_30_percent(tiny_assets, tmp_path, capsys):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_spec_dict(tiny_assets, f"file://{tmp_path / 'store'}",
                                                  **{"model.threads": 1, "search.generations": 4})))
    est = json.loads(_cli("estimate", str(path), "--calibrate", "--json").stdout)
    t0 = time.time()
    _cli("run", str(path))
    wall = time.time() - t0
    spec = load_spec(path)
    store = open_store(spec.store).child(layout.search_prefix(spec.name))
    per = schedule(spec)["per_generation"]
    assert est["tokens"]["per_generation"] == per
    for g in range(4):
        state = store.get_json(layout.generation_state(g))
        assert {k: state[k] for k in ("evaluations", "fitness_tokens", "finetune_tokens")} == {
            k: per[k] for k in ("evaluations", "fitness_tokens", "finetune_tokens")}, g
    ratio = est["total_wall_seconds"] / wall
    with capsys.disabled():
        print(f"\n[estimate] calibrated {est['total_wall_seconds']:.1f} s vs measured {wall:.1f} s: ratio {ratio:.2f}; "
              f"phases {est['wall_seconds']}")
    assert 0.7 <= ratio <= 1.3, (est["wall_seconds"], wall)
    # the command prints the table
    assert cli.main(["estimate", str(path), "--gpu", "h100"]) == 0
    out = capsys.readouterr().out
    assert "trained_tokens" in out and "GPU-hours" in out and "memory per worker" in out
