"""Shared by the crash-matrix and store-fault tests: one uninterrupted run of the tiny search."""

from __future__ import annotations

import collections
import time

import pytest
import yaml

from tests.conftest import tiny_spec_dict
from tests.support.crash import read_journal, run_cli


@pytest.fixture(scope="session")
def reference(tiny_assets, tmp_path_factory):
    """The uninterrupted run, through the same child as the killed ones: (spec dict, store root, journal)."""
    work = tmp_path_factory.mktemp("crash-ref")
    root = work / "store"
    spec = tiny_spec_dict(tiny_assets, f"file://{root}")
    spec_path = work / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    t0 = time.monotonic()
    proc = run_cli(spec_path, root, work / "reference.jsonl", None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    journal = read_journal(work / "reference.jsonl")
    print(f"\n[crash] reference run: {time.monotonic() - t0:.1f} s, "
          f"writes per phase: {dict(collections.Counter(e['phase'] for e in journal if not e['sidecar']))}")
    return spec, root, journal
