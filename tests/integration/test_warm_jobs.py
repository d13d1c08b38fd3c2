"""Warm generation Jobs (``generationsPerJob``): one process running many generations gives exactly the
one-process-per-generation result, and a warm process killed mid-generation loses only that generation.

The tiny model with ``model.threads: 1``, through the real job entrypoint (``darwinlm_jobs.generation``,
what a Kubernetes Job runs). Store A: one ``--index g`` call per generation (``generationsPerJob: 1``).
Store C: one ``--index 0 --count 0`` call (``generationsPerJob: 0``). Store B: ``--count 0`` in a child
process, SIGKILLed once generation 1 is done and generation 2 has stored a candidate, then the next Job the
operator would create (from ``next_tasks``: ``--index 2 --count 0``). The ETA check uses A's measured
generation finish times: at 50 % progress the estimate must be within ±30 % of the time that was left.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from darwinlm.core.eta import estimate_eta, finish_times
from darwinlm.core.plan import next_tasks
from darwinlm.spec import load_spec
from darwinlm.store import open_store
from darwinlm_jobs import generation as generation_job

from ..conftest import tiny_spec_dict

GENERATIONS = 6


def _state(store, g: int) -> dict:
    s = dict(store.get_json(f"generations/{g:05d}/state.json"))
    s.pop("seconds")
    return s


def _spec_file(tmp, assets, name: str):
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tiny_spec_dict(assets, f"file://{tmp / name}",
                                                  **{"model.threads": 1, "search.generations": GENERATIONS})))
    return path


def _job(spec_path, *args: str) -> int:
    threads = torch.get_num_threads()
    try:
        return generation_job.main(["--spec", str(spec_path), "--log-level", "WARNING", *args])
    finally:
        torch.set_num_threads(threads)  # load_model set the spec's thread count in this process


def _copy_database(tmp, src: str, dst: str) -> None:
    shutil.copytree(tmp / src / "databases", tmp / dst / "databases")
    for phase in ("database", "sensitivity"):
        shutil.copytree(tmp / src / "searches" / "tiny" / phase, tmp / dst / "searches" / "tiny" / phase)


@pytest.fixture(scope="module")
def runs(tiny_assets, tmp_path_factory):
    from darwinlm import cli

    tmp = tmp_path_factory.mktemp("warm")
    a_spec = _spec_file(tmp, tiny_assets, "A")
    threads = torch.get_num_threads()
    try:
        for name in ("database-0-of-1", "sensitivity-0-of-1"):
            assert cli.main(["--log-level", "WARNING", "task", str(a_spec), name]) == 0
    finally:
        torch.set_num_threads(threads)
    for g in range(GENERATIONS):  # generationsPerJob 1: a fresh workspace (model load, caches) per generation
        assert _job(a_spec, "--index", str(g)) == 0
    info = {}
    _copy_database(tmp, "A", "C")  # generationsPerJob 0: every generation in one call
    c_spec = _spec_file(tmp, tiny_assets, "C")
    t0 = time.time()
    assert _job(c_spec, "--index", "0", "--count", "0") == 0
    info["warm_seconds"] = time.time() - t0

    _copy_database(tmp, "A", "B")  # generationsPerJob 0, killed during generation 2
    b_spec = _spec_file(tmp, tiny_assets, "B")
    b = open_store(f"file://{tmp / 'B'}").child("searches/tiny")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "darwinlm_jobs.generation", "--spec", str(b_spec),
                             "--index", "0", "--count", "0", "--log-level", "WARNING"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not b.list("generations/00002/results"):
        assert proc.poll() is None, f"the warm Job ended before it could be killed: {proc.communicate()[1][-2000:]}"
        assert time.time() < deadline
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    info["code"] = proc.returncode
    assert not b.exists("generations/00002/state.json"), "killed too late to test a resume"
    info["before"] = {k: (b.get_json(k), os.stat(tmp / "B" / "searches" / "tiny" / k).st_mtime_ns)
                      for g in (0, 1) for k in [f"generations/{g:05d}/state.json"] + b.list(f"generations/{g:05d}")}
    info["partial"] = {k: os.stat(tmp / "B" / "searches" / "tiny" / k).st_mtime_ns
                       for k in b.list("generations/00002/results")}
    todo = next_tasks(load_spec(b_spec), b)  # what the operator creates the next Job from
    info["next"] = [t.name for t in todo]
    assert _job(b_spec, "--index", str(todo[0].index), "--count", "0") == 0
    return tmp, info


def test_generations_per_job_zero_and_one_give_identical_results(runs):
    tmp, _ = runs
    a = open_store(f"file://{tmp / 'A'}").child("searches/tiny")
    c = open_store(f"file://{tmp / 'C'}").child("searches/tiny")
    for g in range(GENERATIONS):
        assert _state(a, g) == _state(c, g), g  # parent, winner, every pool, score and token count
        ra, rc = sorted(a.list(f"generations/{g:05d}/results")), sorted(c.list(f"generations/{g:05d}/results"))
        assert ra == rc and [a.get_json(k)["fitness"] for k in ra] == [c.get_json(k)["fitness"] for k in rc]
    # one process: the model was loaded once (every generation's timing records the same process start)
    starts = {c.get_json(f"generations/{g:05d}/timing.json")["process_started"] for g in range(GENERATIONS)}
    assert len(starts) == 1
    starts_a = {a.get_json(f"generations/{g:05d}/timing.json")["process_started"] for g in range(GENERATIONS)}
    assert len(starts_a) == GENERATIONS


def test_a_warm_job_killed_mid_generation_resumes_without_redoing_finished_generations(runs):
    tmp, info = runs
    assert info["code"] == -signal.SIGKILL
    assert info["next"] == ["generation-2"]  # the next Job starts at the generation in flight
    b = open_store(f"file://{tmp / 'B'}").child("searches/tiny")
    for key, (value, mtime) in info["before"].items():  # generations 0 and 1: not one file rewritten
        assert b.get_json(key) == value
        assert os.stat(tmp / "B" / "searches" / "tiny" / key).st_mtime_ns == mtime, key
    # the candidates of generation 2 stored before the kill were reused, not evaluated again
    for key, mtime in info["partial"].items():
        assert os.stat(tmp / "B" / "searches" / "tiny" / key).st_mtime_ns == mtime, key
    a = open_store(f"file://{tmp / 'A'}").child("searches/tiny")
    for g in range(GENERATIONS):
        assert _state(a, g) == _state(b, g), g


def test_eta_at_half_progress_is_within_30_percent_of_the_time_left(runs):
    tmp, _ = runs
    a = open_store(f"file://{tmp / 'A'}").child("searches/tiny")
    finished = finish_times(a, GENERATIONS)
    assert len(finished) == GENERATIONS
    half = GENERATIONS // 2
    est = estimate_eta(finished[:half], GENERATIONS - half, now=finished[half - 1])
    actual = finished[-1] - finished[half - 1]
    print(f"\n[eta] at {half}/{GENERATIONS}: estimated {est.seconds:.2f} s ({est.low:.2f}..{est.high:.2f}), "
          f"actual {actual:.2f} s, ratio {est.seconds / actual:.3f}")
    assert 0.7 * actual <= est.seconds <= 1.3 * actual
