"""The crash matrix: ``darwinlm run`` SIGKILLed in every phase, re-run, every artifact identical.

One uninterrupted run of the tiny search is the reference (its write journal says which artifacts each
phase writes, and when). Kill points are drawn from it with a seeded generator (tests.support.crash):
a torn write, a torn commit (data without checksum sidecar) or a kill in the computation between two
writes, in each phase. The same command is then run once per kill point, each run resuming the store
the last one left, and once more to the end; the two stores must hold the same artifacts: every
generation state, every candidate result, the database layers, the checkpoints, the exported
safetensors bytes, summary.json and the report (JSON without wall-clock seconds, the rest byte for byte).
"""

from __future__ import annotations

import collections
import signal
import time

import pytest
import yaml

from tests.support.crash import PHASES, plan_kills, run_chain, store_diff

DEFAULT_POINTS = dict.fromkeys(PHASES, 1)  # 6 kills + the final run: ~1 min on 2 idle cores
SLOW_POINTS = {"database": 3, "sensitivity": 3, "generation": 8, "posttrain": 5, "export": 3, "evaluate": 3}


def _matrix(reference, tmp_path, seed: int, per_phase: dict[str, int]) -> None:
    spec, ref_root, journal = reference
    root = tmp_path / "store"
    spec = {**spec, "store": f"file://{root}"}
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    points = plan_kills(journal, seed, per_phase)
    assert collections.Counter(p.phase for p in points) == collections.Counter(per_phase), points

    t0 = time.monotonic()
    kills, final = run_chain(spec_path, root, tmp_path, points)
    elapsed = time.monotonic() - t0
    assert final.returncode == 0, final.stderr[-3000:]
    print(f"\n[crash] seed {seed}: {len(kills)} SIGKILLs + the final run in {elapsed:.1f} s")
    for k in kills:
        print(f"[crash]   {k.point.describe():90s} landed in {k.landed} ({k.seconds:.1f} s)")

    # every kill is a SIGKILL, landed where it was aimed (a delayed kill may drift into the next phase)
    assert [k.returncode for k in kills] == [-signal.SIGKILL] * len(points)
    for k in kills:
        if k.point.mode == "after":
            assert PHASES.index(k.landed) >= PHASES.index(k.point.phase), k
        else:
            assert k.landed == k.point.phase, k
    assert {k.landed for k in kills} >= set(per_phase), "a phase was never interrupted"

    compared, diffs = store_diff(ref_root, root)
    kinds = collections.Counter(k.split("/")[-1].rsplit(".", 1)[-1] for k in _keys(ref_root))
    print(f"[crash]   {compared} artifacts compared ({dict(kinds)})")
    assert not diffs, "\n".join(diffs)
    assert compared == len(_keys(ref_root)) and compared >= 30


def _keys(root):
    from tests.support.crash import artifacts

    return list(artifacts(root))


def test_sigkill_in_every_phase_then_rerun_gives_identical_artifacts(reference, tmp_path):
    _matrix(reference, tmp_path, seed=11, per_phase=DEFAULT_POINTS)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_crash_matrix_more_points(reference, tmp_path, seed):
    _matrix(reference, tmp_path, seed=seed, per_phase=SLOW_POINTS)
