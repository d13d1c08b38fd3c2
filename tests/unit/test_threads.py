"""CPU thread defaults: OpenMP threads sleep when they wait (``import darwinlm`` before torch), as libgomp sees it.

torch's OpenMP runtime (libgomp) reads its settings once, when torch loads it, and ``OMP_DISPLAY_ENV`` makes it
print what it read: the spin count is the setting that made a generation several times slower next to one busy
process (bench/README.md, busy-neighbour)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


def _libgomp_spincount(code: str, **env) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    r = subprocess.run([sys.executable, "-c", code], env={**clean, **env, "OMP_DISPLAY_ENV": "verbose"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r"GOMP_SPINCOUNT = '(\d+)'", r.stderr)
    if m is None:
        pytest.skip("torch's OpenMP runtime is not libgomp (no OMP_DISPLAY_ENV report)")
    return m.group(1)


def test_import_darwinlm_makes_waiting_threads_sleep():
    assert _libgomp_spincount("import darwinlm, torch; torch.ones(4).sum()") == "0"


def test_torch_alone_spins_and_the_environment_wins():
    assert _libgomp_spincount("import torch") == "300000"  # libgomp's default: the old behaviour
    assert _libgomp_spincount("import darwinlm, torch", GOMP_SPINCOUNT="300000") == "300000"
    assert _libgomp_spincount("import darwinlm, torch", OMP_WAIT_POLICY="ACTIVE") != "0"
