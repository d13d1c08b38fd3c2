"""Every bench script starts in a clean interpreter without the editable install (as on the GPU test machine).

Where darwinlm is not installed (the GPU test machine: a copy of the working tree, PYTHONPATH at its root),
``python bench/X.py`` puts ``bench/`` first on sys.path, so a bench file named like a standard-library
module shadows it: ``bench/operator.py`` broke every script there with ``ImportError: cannot import name
'StrEnum' from partially initialized module 'enum'`` (it is now ``bench/k8s_operator.py``).

The clean interpreter is this virtual environment's Python with ``-S`` (no ``site``: no ``.pth`` files, so no
editable-install finder and none of the modules those files import early, which would otherwise hide the
shadowing) and an environment holding only ``PYTHONPATH`` = repository root + the environment's
site-packages (torch, transformers, ... as installed packages, darwinlm only from the tree).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p.name for p in (ROOT / "bench").glob("*.py") if 'if __name__ == "__main__"' in p.read_text())


def _clean_run(argv: list[str], *, pythonpath: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    paths = sysconfig.get_paths()
    site = [paths["purelib"]] + ([paths["platlib"]] if paths["platlib"] != paths["purelib"] else [])
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(pythonpath + site)}
    return subprocess.run([sys.executable, "-S", *argv], env=env, cwd="/", capture_output=True, text=True,
                          timeout=timeout)


def test_the_clean_interpreter_has_no_editable_install():
    r = _clean_run(["-c", "import darwinlm"], pythonpath=[])
    assert r.returncode != 0 and "No module named 'darwinlm'" in r.stderr, r.stderr[-500:]


def test_bench_scripts_found():
    assert {"evaluator.py", "gpu.py", "shrunk_speed.py", "k8s_operator.py"} <= set(SCRIPTS)
    assert "operator.py" not in SCRIPTS  # would shadow the standard library's operator (see the docstring)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_runs_without_the_install(script):
    r = _clean_run([str(ROOT / "bench" / script), "--help"], pythonpath=[str(ROOT)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage:" in r.stdout


def test_gpu_check_help_as_a_module():
    r = subprocess.run([sys.executable, "-S", "-m", "bench.gpu", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": os.pathsep.join(
                           [str(ROOT), sysconfig.get_paths()["purelib"]])})
    assert r.returncode == 0 and "--tiny" in r.stdout, r.stderr[-2000:]


def test_a_shadowing_file_is_caught(tmp_path):
    """The failure mode itself: a bench/operator.py breaks a script run this way (so the tests above can fail)."""
    shutil.copytree(ROOT / "bench", tmp_path / "bench")
    shutil.copy(ROOT / "bench" / "k8s_operator.py", tmp_path / "bench" / "operator.py")
    r = _clean_run([str(tmp_path / "bench" / "evaluator.py"), "--help"], pythonpath=[str(ROOT)])
    assert r.returncode != 0
    assert "partially initialized module" in r.stderr and "operator.py" in r.stderr, r.stderr[-2000:]
