"""Layering: the library never imports Kubernetes code; its control-plane modules never import torch."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_import_linter_contracts_hold():
    out = subprocess.run([str(pathlib.Path(sys.executable).parent / "lint-imports")], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_control_plane_modules_do_not_load_torch():
    code = ("import sys, darwinlm, darwinlm.core.plan, darwinlm.spec, darwinlm.store, darwinlm.run.runner;"
            "bad = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
