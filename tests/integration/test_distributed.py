"""Distributed generations (``darwinlm task`` with torch.distributed/Gloo): W=2 gives exactly the W=1 result.

The tiny model with ``model.threads: 1`` (a candidate's fitness must not depend on the worker that computes
it). Store A: the database and generations 0..2 with W=1, one ``darwinlm task`` call each, in this process.
Store B: the same generations with two ranks (two real processes, MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE),
one task per process group, then two tasks in one. Store C: a copy of B after generation 0, where rank 1 is
SIGKILLed during generation 1, and both ranks are rerun. All three must hold identical generation states.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from darwinlm import cli
from darwinlm.core.plan import progress
from darwinlm.llm.distributed import DistributedShard, PeerFailure, WorldConfigError, owner, world_env
from darwinlm.spec import load_spec, with_overrides
from darwinlm.store import open_store
from tests.support.procs import free_port

from ..conftest import tiny_spec_dict

GENERATIONS = 3


def _state(store, g: int) -> dict:
    s = store.get_json(f"generations/{g:05d}/state.json")
    s.pop("seconds")
    return s


def _ranks(spec_path, store_uri, tasks: list[str], *, world_size: int = 2) -> list[subprocess.Popen]:
    port = str(free_port())
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "WORLD_SIZE": str(world_size), "DARWINLM_DIST_TIMEOUT_S": "120"}
        env.pop("RANK", None)
        env.pop("JOB_COMPLETION_INDEX", None)
        if rank == 0:
            env["RANK"] = "0"
        else:  # the Kubernetes Indexed Job way
            env["JOB_COMPLETION_INDEX"] = str(rank)
        cmd = [sys.executable, "-m", "darwinlm.cli", "--log-level", "WARNING", "task", str(spec_path), *tasks,
               "--store", store_uri]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _wait(procs, timeout: float = 120) -> list[int]:
    codes = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        codes.append(p.returncode)
        if p.returncode not in (0, -signal.SIGKILL):
            print(err, file=sys.stderr)
    return codes


@pytest.fixture(scope="module")
def runs(tiny_assets, tmp_path_factory):
    """A: W=1, one task per call; B: W=2, generation-0 alone, then 1 and 2 in one process group with rank 1
    SIGKILLed during them, then both ranks rerun."""
    tmp = tmp_path_factory.mktemp("dist")
    spec_path = tmp / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(tiny_spec_dict(tiny_assets, f"file://{tmp / 'A'}",
                                                       **{"model.threads": 1, "search.generations": GENERATIONS})))
    threads = torch.get_num_threads()
    try:
        a = f"file://{tmp / 'A'}"
        for name in ["database-0-of-1", "sensitivity-0-of-1"] + [f"generation-{g}" for g in range(GENERATIONS)]:
            assert cli.main(["--log-level", "WARNING", "task", str(spec_path), name, "--store", a]) == 0
    finally:
        torch.set_num_threads(threads)  # load_model set the spec's thread count in this process
    # B starts from A's database and sensitivity table (content-addressed: the same keys) and none of its
    # generations
    shutil.copytree(tmp / "A" / "databases", tmp / "B" / "databases")
    for phase in ("database", "sensitivity"):
        shutil.copytree(tmp / "A" / "searches" / "tiny" / phase, tmp / "B" / "searches" / "tiny" / phase)
    b_uri = f"file://{tmp / 'B'}"
    b = open_store(b_uri).child("searches/tiny")
    assert _wait(_ranks(spec_path, b_uri, ["generation-0"])) == [0, 0]
    state0 = _state(b, 0)
    # generations 1 and 2 in one process group (the several-generations-per-Job mode); kill rank 1 as soon
    # as a candidate of generation 1 is stored
    procs = _ranks(spec_path, b_uri, ["generation-1", "generation-2"])
    deadline = time.time() + 90
    while not b.list("generations/00001/results"):
        assert all(p.poll() is None for p in procs), "a rank ended before rank 1 could be killed"
        assert time.time() < deadline
        time.sleep(0.002)
    procs[1].send_signal(signal.SIGKILL)
    codes = _wait(procs)
    assert not b.exists("generations/00002/state.json"), "killed too late to test a retry"
    done_before = set(b.list("generations/00001/results")) | set(b.list("generations/00002/results"))
    assert _wait(_ranks(spec_path, b_uri, ["generation-1", "generation-2"])) == [0, 0]
    return spec_path, tmp, {"state0": state0, "codes": codes, "done_before": done_before}


def test_two_ranks_equal_one(runs):
    spec_path, tmp, info = runs
    a = open_store(f"file://{tmp / 'A'}").child("searches/tiny")
    b = open_store(f"file://{tmp / 'B'}").child("searches/tiny")
    assert info["state0"] == _state(a, 0)  # a clean W=2 generation
    for g in range(GENERATIONS):
        sa, sb = _state(a, g), _state(b, g)
        assert sa == sb, g  # parent, winner, every stage's pool, scores and kept, token counts
        assert len(sa["stages"]) == 2 and all(len(s["scores"]) == len(s["pool"]) for s in sa["stages"])
        # every candidate result exists once, with W=1's fitness, whichever rank wrote it
        ra, rb = a.list(f"generations/{g:05d}/results"), b.list(f"generations/{g:05d}/results")
        assert sorted(ra) == sorted(rb) and ra
        assert [a.get_json(k)["fitness"] for k in sorted(ra)] == [b.get_json(k)["fitness"] for k in sorted(rb)]
    spec = with_overrides(load_spec(spec_path), store=f"file://{tmp / 'B'}")
    assert progress(spec, b)["generations_done"] == GENERATIONS


def test_killed_rank_makes_its_peer_exit_retriable_and_the_rerun_reuses_results(runs):
    spec_path, tmp, info = runs
    assert info["codes"][1] == -signal.SIGKILL
    assert info["codes"][0] == cli.EXIT_RETRIABLE  # rank 0 lost its peer in the fitness exchange
    assert info["done_before"]  # results stored before the crash ...
    b = open_store(f"file://{tmp / 'B'}").child("searches/tiny")
    after = set(b.list("generations/00001/results")) | set(b.list("generations/00002/results"))
    assert info["done_before"] < after  # ... are kept (and reused: the states equal W=1's, tested above)


def test_task_command_errors(runs, monkeypatch, capsys):
    spec_path, tmp, _ = runs
    b = f"file://{tmp / 'B'}"

    def run(*args, store=b):
        return cli.main(["--log-level", "WARNING", "task", str(spec_path), *args, "--store", store])

    assert run("generation-9") == cli.EXIT_PERMANENT  # not in the plan
    assert run("bogus") == cli.EXIT_PERMANENT
    assert run("export") == cli.EXIT_PERMANENT  # its phase's predecessors are not done
    assert "posttrain-searched" in capsys.readouterr().err
    for k, v in {"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(k, v)
    # complete: exits 0 at once, even as a lone rank whose peers are gone (no rendezvous)
    capsys.readouterr()
    assert run("generation-1") == cli.EXIT_OK
    assert json.loads(capsys.readouterr().out)["status"] == "complete"
    assert run("posttrain-searched") == cli.EXIT_PERMANENT
    assert "only generation" in capsys.readouterr().err
    monkeypatch.delenv("MASTER_PORT")
    assert run("generation-1") == cli.EXIT_OK  # complete tasks need no process group at all
    assert run("database-0-of-1", store=f"file://{tmp / 'empty'}") == cli.EXIT_PERMANENT
    assert "MASTER_PORT" in capsys.readouterr().err


def test_world_env():
    assert world_env({}) is None and world_env({"WORLD_SIZE": "1"}) is None
    base = {"WORLD_SIZE": "4", "MASTER_ADDR": "job-0.svc", "MASTER_PORT": "29500"}
    assert world_env({**base, "RANK": "3"})["rank"] == 3
    assert world_env({**base, "JOB_COMPLETION_INDEX": "2"})["rank"] == 2  # Kubernetes Indexed Job
    assert world_env({**base, "RANK": "1", "JOB_COMPLETION_INDEX": "2"})["rank"] == 1
    for bad in ({**base}, {**base, "RANK": "4"}, {**base, "RANK": "x"}, {"WORLD_SIZE": "2", "RANK": "0"},
                {**base, "RANK": "0", "DARWINLM_DIST_BACKEND": "mpi"}, {**base, "RANK": "0", "MASTER_PORT": "0"}):
        with pytest.raises(WorldConfigError):
            world_env(bad)
    assert [owner(i, 3) for i in range(7)] == [0, 1, 2, 0, 1, 2, 0]


class _FakeWorld:
    """W in-memory ranks: rank ``rank`` runs for real, the others' payloads come from ``others``."""

    def __init__(self, rank, size, others):
        self.rank, self.world_size, self.others = rank, size, others

    is_writer = property(lambda self: self.rank == 0)

    def all_gather(self, obj):
        return [obj if r == self.rank else self.others(r, obj) for r in range(self.world_size)]

    def barrier(self):
        pass


def test_shard_gathers_in_pool_order_and_forwards_errors():
    items = [(i, f"g{i}") for i in range(5)]

    def peer(r, mine):
        return {**mine, "rank": r, "error": None, "scores": {i: float(i) for i, _ in items if i % 2 == r}}

    seen = []
    shard = DistributedShard(_FakeWorld(1, 2, peer))
    assert shard([(i, g) for i, g in items], lambda g: seen.append(g) or float(g[1:])) == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert seen == ["g1", "g3"] and not shard.is_writer
    assert shard.stages[-1]["counts"] == [3, 2]

    def failing_peer(r, mine):
        return {**peer(r, mine), "error": {"rank": r, "index": 0, "type": "SpecError", "message": "x",
                                           "permanent": True}}

    with pytest.raises(PeerFailure) as e:
        DistributedShard(_FakeWorld(1, 2, failing_peer))(items, lambda g: 1.0)
    assert e.value.permanent and "rank 0 failed on candidate 0" in str(e.value)
    with pytest.raises(ZeroDivisionError):  # the failing rank re-raises its own error (after the gather)
        DistributedShard(_FakeWorld(1, 2, peer))(items, lambda g: 1 / 0)
    with pytest.raises(PeerFailure, match="disagree"):
        DistributedShard(_FakeWorld(1, 2, lambda r, m: {**peer(r, m), "digest": "other"}))(items, lambda g: 1.0)


_GLOO_SCRIPT = """
import json, sys
from darwinlm.errors import SpecError
from darwinlm.llm.distributed import DistributedShard, PeerFailure, init_from_env
world = init_from_env()
shard = DistributedShard(world)
out = {"rank": world.rank, "writer": shard.is_writer}
out["scores"] = shard([(i, str(i)) for i in range(5)], lambda g: float(g) * 10 + world.rank)
def bad(g):
    if g == "3":
        raise SpecError("search.x", "bad")
    return 0.0
try:
    shard([(i, str(i)) for i in range(5)], bad)
except PeerFailure as e:
    out["error"] = ["PeerFailure", e.permanent]
except SpecError as e:
    out["error"] = ["SpecError", True]
shard.barrier()
world.close()
print(json.dumps(out))
"""


def test_real_gloo_exchange_and_error_forwarding():
    """Two real ranks over Gloo: pool-order scores from both, and a spec error on rank 1 reaches rank 0."""
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "JOB_COMPLETION_INDEX")}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", JOB_COMPLETION_INDEX=str(rank),
                   DARWINLM_DIST_TIMEOUT_S="60")
        procs.append(subprocess.Popen([sys.executable, "-c", _GLOO_SCRIPT], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        outs.append(json.loads(out))
    assert [o["writer"] for o in outs] == [True, False]
    # item i scored by rank i % 2 (the score's last digit says which)
    assert outs[0]["scores"] == outs[1]["scores"] == [0.0, 11.0, 20.0, 31.0, 40.0]
    assert outs[0]["error"] == ["PeerFailure", True] and outs[1]["error"] == ["SpecError", True]
