"""Store faults: corrupt and truncated artifacts, S3 throttling, a stale multipart upload.

The table (object x fault -> detected by -> outcome):

================================  ==========  ==================================  =========================
object                            fault       detected by                         outcome
================================  ==========  ==================================  =========================
generations/00000/state.json      flip/trunc  sha256 on read (get_json), gen 1    generation 0 computed again
databases/<db>/layers/<l>         flip/trunc  sha256 of the file (LayerDatabase)  database shard rebuilt
posttrain/searched/checkpoint.*   flip/trunc  sha256 on read (export)             post-training redone
generations/00000/state.json      flip        sha256 on read, a Job (run_tasks)   deleted, retriable failure,
                                                                                  next plan redoes generation 0
spec.json                         flip        sha256 on read (record_spec)        run fails naming the object
S3 object, 503 SlowDown x3        throttle    botocore standard retry             write and read succeed
S3 stale multipart upload         abandoned   -                                   put succeeds, object intact
================================  ==========  ==================================  =========================

In each recomputed case the finished store equals the uninterrupted reference run artifact by artifact
(``tests.support.crash.store_diff``): no bad artifact was reused.
"""

from __future__ import annotations

import io
import logging
import pathlib

import pytest

from darwinlm.cli import main as cli_main
from darwinlm.errors import ChecksumMismatch
from darwinlm.run.runner import run_search
from darwinlm.spec import load_spec
from tests.support.crash import store_diff


@pytest.fixture(autouse=True)
def _one_thread():
    """The reference run is a child with OMP_NUM_THREADS=1; the repaired runs here run in this process, and
    must use the same thread count to give the same bits (the database's reductions depend on it)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _flip(path: pathlib.Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: pathlib.Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _one(root: pathlib.Path, pattern: str) -> pathlib.Path:
    found = sorted(p for p in root.glob(pattern) if not p.name.endswith(".sha256"))
    assert found, f"nothing matches {pattern} under {root}"
    return found[0]


@pytest.mark.parametrize("fault", [_flip, _truncate], ids=["flip", "truncate"])
def test_corrupt_state_layer_and_checkpoint_are_detected_and_computed_again(reference, tmp_path, fault, caplog):
    spec_dict, ref_root, _ = reference
    root = tmp_path / "store"
    spec = load_spec({**spec_dict, "store": f"file://{root}"})
    caplog.set_level(logging.WARNING, logger="darwinlm.run.repair")

    # database, sensitivity and generation 0 done; then a generation state and a layer go bad
    run_search(spec, until=lambda t: t.kind == "generation" and t.index == 1)
    bad = [_one(root, "searches/tiny/generations/00000/state.json"), _one(root, "databases/*/layers/*.safetensors")]
    for path in bad:
        fault(path)
    run_search(spec, until=lambda t: t.kind == "export")
    # post-training done; its last checkpoint (the weights export reads) goes bad
    bad.append(_one(root, "searches/tiny/posttrain/searched/checkpoint.safetensors"))
    fault(bad[-1])
    run_search(spec)

    repaired = [r.getMessage() for r in caplog.records if "is corrupt" in r.getMessage()]
    for path in bad:
        assert [m for m in repaired if str(path) in m and "sha256 mismatch" in m], (path, repaired)
    assert len(repaired) == 3, repaired
    compared, diffs = store_diff(ref_root, root)
    assert not diffs, "\n".join(diffs)
    assert compared >= 50


def test_corrupt_spec_record_fails_naming_it(reference, tmp_path, capsys):
    spec_dict, _, _ = reference
    root = tmp_path / "store"
    spec = load_spec({**spec_dict, "store": f"file://{root}", "search": {**spec_dict["search"], "generations": 1}})
    run_search(spec, until=lambda t: t.kind == "sensitivity")
    _flip(root / "searches/tiny/spec.json")
    with pytest.raises(ChecksumMismatch) as info:
        run_search(spec)
    assert info.value.uri == f"file://{root}/searches/tiny/spec.json"
    # the CLI: a store error naming the object, and nothing written after it
    import yaml

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**spec_dict, "store": f"file://{root}",
                                    "search": {**spec_dict["search"], "generations": 1}}), encoding="utf-8")
    before = sorted(p for p in root.rglob("*"))
    assert cli_main(["run", str(path)]) != 0
    err = capsys.readouterr().err
    assert f"store error: file://{root}/searches/tiny/spec.json: sha256 mismatch" in err, err
    assert sorted(p for p in root.rglob("*")) == before


def test_s3_slowdown_is_retried_and_a_stale_multipart_upload_is_harmless(tmp_path):
    from darwinlm.store import open_store
    from tests.support.s3 import MotoS3Process

    with MotoS3Process(log_path=tmp_path / "moto.log") as srv:
        srv.create_bucket("darwinlm-test")
        store = open_store("s3://darwinlm-test/runs", endpoint_url=srv.endpoint_url, region_name=srv.region,
                           session=_session(srv))
        # an upload of the same key started by a process that died: never completed nor aborted
        c = srv.client()
        up = c.create_multipart_upload(Bucket="darwinlm-test", Key="runs/result/model/model.safetensors")
        c.upload_part(Bucket="darwinlm-test", Key="runs/result/model/model.safetensors", PartNumber=1,
                      UploadId=up["UploadId"], Body=b"s" * (5 << 20))
        srv.gate.throttle(3)  # the next 3 requests: 503 SlowDown
        data = bytes(range(256)) * (40 << 10)  # 10 MiB
        src = tmp_path / "model.safetensors"
        src.write_bytes(data)
        store.put_file("result/model/model.safetensors", src)
        assert srv.gate.throttled == 3
        srv.gate.throttle(2)
        assert store.get_bytes("result/model/model.safetensors") == data
        assert srv.gate.throttled == 5
        body = c.get_object(Bucket="darwinlm-test", Key="runs/result/model/model.safetensors")["Body"].read()
        assert body == data and len(c.list_multipart_uploads(Bucket="darwinlm-test").get("Uploads", [])) == 1


def _session(srv):
    import boto3

    return boto3.session.Session(aws_access_key_id=srv.access_key, aws_secret_access_key=srv.secret_key,
                                 region_name=srv.region)


def test_a_job_that_meets_a_corrupt_state_deletes_it_and_fails_retriably(reference, tmp_path):
    """The Kubernetes path (one task per process, ``run_tasks``): generation 1 finds generation 0's state
    corrupt, deletes it and fails with a retriable StoreError; the next plan redoes generation 0."""
    from darwinlm.core.plan import next_tasks
    from darwinlm.errors import StoreError
    from darwinlm.run.runner import run_tasks
    from darwinlm.store import open_store

    spec_dict, _, _ = reference
    root = tmp_path / "store"
    spec = load_spec({**spec_dict, "store": f"file://{root}"})
    run_search(spec, until=lambda t: t.kind == "generation" and t.index == 1)
    state = root / "searches/tiny/generations/00000/state.json"
    _flip(state)
    with pytest.raises(StoreError, match="generations/00000/state.json: sha256 mismatch.*computed again: retry"):
        run_tasks(spec, ["generation-1"])
    assert not state.exists()
    store = open_store(f"file://{root}").child("searches/tiny")
    assert [t.name for t in next_tasks(spec, store)] == ["generation-0"]
    run_tasks(spec, ["generation-0"])
    assert store.exists("generations/00000/state.json")
