"""The layer database: sharded builds are byte-identical to one shard; the compact files lose nothing."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load as st_load

from darwinlm.core.plan import Task
from darwinlm.errors import ChecksumMismatch
from darwinlm.llm.database import META_KEY, LayerDatabase, _calibration_chunks, collect_hessians, layer_key
from darwinlm.llm.obs import obs_prune
from darwinlm.run.tasks import run_task
from darwinlm.run.workspace import Workspace
from darwinlm.spec import load_spec
from darwinlm.store import open_store

from ..conftest import tiny_spec_dict

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _spec(assets, store_dir, shards):
    # Float reductions may split differently with another thread count: pin it to this process's value
    # so that the shard subprocesses compute exactly what the in-process K=1 build computes.
    return tiny_spec_dict(assets, f"file://{store_dir}", **{"database.shards": shards,
                                                            "model.threads": torch.get_num_threads()})


def _layer_files(store_dir: pathlib.Path) -> dict[str, bytes]:
    files = sorted((store_dir / "databases").glob("*/layers/*.safetensors"))
    return {f"{f.parent.parent.name}/{f.name}": f.read_bytes() for f in files}


@pytest.fixture(scope="module")
def one_shard(tiny_assets, tmp_path_factory):
    """Workspace of a K=1 database built in this process."""
    store_dir = tmp_path_factory.mktemp("db1")
    ws = Workspace(load_spec(_spec(tiny_assets, store_dir, 1)))
    run_task(ws, Task("database", 0, 1))
    return ws, store_dir


def test_two_shard_processes_write_the_same_bytes_as_one(one_shard, tiny_assets, tmp_path):
    _, dir1 = one_shard
    dir2 = tmp_path / "db2"
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(_spec(tiny_assets, dir2, 2)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "jobs"), str(ROOT)]), "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "darwinlm_jobs.database", "--shard", str(k), "--shards", "2",
                               "--spec", str(spec_file), "--log-level", "WARNING"], env=env, cwd=tmp_path,
                              stderr=subprocess.PIPE, text=True) for k in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    one, two = _layer_files(dir1), _layer_files(dir2)
    assert len(one) == 6 and sorted(one) == sorted(two)  # 3 blocks × (o_proj, down_proj), same key
    for name in one:
        assert hashlib.sha256(two[name]).hexdigest() == hashlib.sha256(one[name]).hexdigest(), name
    (key,) = {n.split("/")[0] for n in one}
    assert (dir2 / "databases" / key / "manifest.json").exists()  # the second shard to finish finalized


def _obs_results(ws):
    """Recompute every layer's OBS path from the same Hessians the build used."""
    spec, model = ws.spec, ws.model
    chunks = _calibration_chunks(ws.pools.calibration, spec.database.calibration_tokens)
    H = collect_hessians(model, range(3), chunks, spec.model.compute_dtype)
    out = {}
    for name, meta in ws.db.manifest["layers"].items():
        mod = model.get_submodule(name)
        inner = [r for r in meta["removed"] if 0 < r < meta["units"]]
        out[name] = obs_prune(mod.weight.detach().double(), H[name], group_size=meta["group_size"],
                              boundaries=inner, damping=spec.database.damping)
    return out


def test_compact_round_trip_is_lossless(one_shard):
    ws, _ = one_shard
    db, dtype = ws.db, torch.float16
    assert ws.spec.database.dtype == "float16"
    for name, res in _obs_results(ws).items():
        meta = db.manifest["layers"][name]
        group, ladder = meta["group_size"], db.ladders[name]
        for level, r in enumerate(ladder.removed):
            kept = db.kept_units(name, level)
            w = db.weight(name, level)
            if r == 0 or r == ladder.units:
                assert w is None and len(kept) == ladder.units - r
                continue
            assert set(kept) == set(range(ladder.units)) - set(res.order[:r])
            assert torch.equal(w, res.kept[r].to(dtype)), (name, level)  # the stored kept columns
            cols = [u * group + j for u in kept for j in range(group)]
            dense = torch.zeros(w.shape[0], ladder.units * group, dtype=dtype)
            dense[:, cols] = w
            assert torch.equal(dense, res.snapshot(r).to(dtype)), (name, level)  # zeros elsewhere


def test_compact_files_are_less_than_half_of_dense_fp16(one_shard):
    ws, store_dir = one_shard
    ours = dense = 0
    for name, meta in ws.db.manifest["layers"].items():
        ours += (store_dir / layer_key(ws.db_key, name)).stat().st_size
        d_row, d_col = ws.model.get_submodule(name).weight.shape
        dense += len(meta["removed"]) * d_row * d_col * 2  # the reference: one dense fp16 tensor per level
    assert ours * 2 < dense, (ours, dense)


def test_layer_file_metadata_is_one_sorted_json_key(one_shard):
    ws, store_dir = one_shard
    name = ws.db.layers[0]
    data = (store_dir / layer_key(ws.db_key, name)).read_bytes()
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    meta = header["__metadata__"]
    assert list(meta) == [META_KEY]
    assert json.dumps(json.loads(meta[META_KEY]), sort_keys=True) == meta[META_KEY]
    assert json.loads(meta[META_KEY])["kind"] in ("attn", "mlp")


class _NoLocalPath:
    """A store without ``local_path`` (like S3): the reader must fetch whole files through get_bytes."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        if name == "local_path":
            raise AttributeError(name)
        return getattr(self._inner, name)


def test_lazy_file_reads_equal_whole_file_reads(one_shard):
    ws, store_dir = one_shard
    lazy = LayerDatabase(ws.root, ws.db_key)
    whole = LayerDatabase(_NoLocalPath(open_store(f"file://{store_dir}")), ws.db_key)
    for name in lazy.layers:
        t = st_load(ws.root.get_bytes(layer_key(ws.db_key, name)))
        for level in range(len(lazy.ladders[name].removed)):
            a, b = lazy.weight(name, level), whole.weight(name, level)
            assert (a is None and b is None) or (torch.equal(a, b) and torch.equal(a, t[f"level.{level}"]))
            assert lazy.kept_units(name, level) == whole.kept_units(name, level)
        assert lazy._entry(name).path is not None and whole._entry(name).path is None


def test_lazy_reader_verifies_the_checksum(one_shard, tmp_path):
    import shutil

    ws, store_dir = one_shard
    shutil.copytree(store_dir / "databases", tmp_path / "databases")
    name = ws.db.layers[-1]
    f = tmp_path / layer_key(ws.db_key, name)
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF  # flip bits in the last weight
    f.write_bytes(bytes(data))
    db = LayerDatabase(open_store(f"file://{tmp_path}"), ws.db_key)
    with pytest.raises(ChecksumMismatch):
        db.weight(name, 1)
