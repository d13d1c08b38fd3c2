"""Behaviour of the artifact store, the same tests over both backends.

``file`` runs in ``tmp_path``; ``s3`` talks real HTTP S3 to moto's in-process server (TEST_INFRA.md §2a)
with a fresh bucket per test. Each backend also gets a way to damage an artifact behind the store's back
(``corrupt``) and to leave a write half-done (``incomplete``), as a crash or another tool would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from darwinlm.errors import ArtifactNotFound, ChecksumMismatch, StoreError
from darwinlm.store import FileStore, S3Store, Store, open_store, parse_store_uri

ACCESS_KEY = "AKIADARWINLMTESTKEY1"
SECRET_KEY = "darwinlm-TOP-SECRET-s3cr3t-do-not-leak-0123456789"


@pytest.fixture(scope="session")
def moto_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(autouse=True)
def aws_env(monkeypatch, tmp_path):
    """Dummy credentials only; never the developer's ~/.aws or a real endpoint."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def _s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def _new_bucket(endpoint: str) -> str:
    name = f"darwinlm-test-{uuid.uuid4().hex[:16]}"
    _s3_client(endpoint).create_bucket(Bucket=name)
    return name


@dataclasses.dataclass
class Backend:
    name: str
    store: Store
    corrupt: Callable[[str, bytes], None]  # replace an artifact's bytes behind the store's back
    incomplete: Callable[[str, bytes], None]  # data without a recorded checksum
    incomplete_error: type[StoreError]  # what get_bytes raises for such data


def _file_backend(tmp_path: Path) -> Backend:
    store = FileStore(tmp_path / "store")

    def corrupt(key: str, data: bytes) -> None:
        Path(store.local_path(key)).write_bytes(data)

    def incomplete(key: str, data: bytes) -> None:  # a crash between the data and the sidecar
        path = Path(store.root, *key.split("/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    return Backend("file", store, corrupt, incomplete, ArtifactNotFound)


def _s3_backend(endpoint: str) -> Backend:
    bucket = _new_bucket(endpoint)
    store = open_store(f"s3://{bucket}/root", endpoint_url=endpoint)
    client = _s3_client(endpoint)

    def overwrite(key: str, data: bytes) -> None:  # another tool's PUT: no sha256 metadata
        client.put_object(Bucket=bucket, Key=f"root/{key}", Body=data)

    return Backend("s3", store, overwrite, overwrite, ChecksumMismatch)


@pytest.fixture(params=["file", "s3"])
def backend(request, tmp_path) -> Backend:
    if request.param == "file":
        return _file_backend(tmp_path)
    return _s3_backend(request.getfixturevalue("moto_endpoint"))


@pytest.fixture
def store(backend) -> Store:
    return backend.store


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------- round trips


def test_bytes_round_trip(store):
    assert isinstance(store, Store)
    data = b"\x00weights\xff" * 100
    assert not store.exists("a/b/c.bin")
    assert store.put_bytes("a/b/c.bin", data) == _sha(data)
    assert store.exists("a/b/c.bin")
    assert store.get_bytes("a/b/c.bin") == data
    assert store.sha256("a/b/c.bin") == _sha(data)
    store.put_bytes("a/b/c.bin", b"v2")  # overwrite
    assert store.get_bytes("a/b/c.bin") == b"v2"
    assert store.put_bytes("empty", b"") == _sha(b"") and store.get_bytes("empty") == b""


def test_json_is_canonical(store):
    obj = {"b": [1, 2.5, None], "a": {"z": "é", "y": True}}
    store.put_json("state.json", obj)
    assert store.get_json("state.json") == obj
    expected = json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False) + "\n"
    assert store.get_bytes("state.json") == expected.encode("utf-8")
    store.put_bytes("bad.json", b"{not json")
    with pytest.raises(StoreError, match="bad.json"):
        store.get_json("bad.json")


def test_file_round_trip(store, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(300_000))
    assert store.put_file("model/w.bin", src) == _sha(src.read_bytes())
    dest = tmp_path / "out" / "deep" / "w.bin"
    store.get_file("model/w.bin", dest)
    assert dest.read_bytes() == src.read_bytes()
    assert os.listdir(dest.parent) == ["w.bin"]  # no temp file left behind
    with pytest.raises(StoreError, match="missing.bin"):
        store.put_file("x", tmp_path / "missing.bin")


def test_dir_round_trip(store, tmp_path):
    src = tmp_path / "hf"
    (src / "sub").mkdir(parents=True)
    files = {"config.json": b"{}", "model.safetensors": os.urandom(5000), "sub/tokenizer.json": b"tok"}
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    store.put_dir("result/model", src)
    assert store.list("result/model") == sorted(f"result/model/{rel}" for rel in files)
    out = tmp_path / "copy"
    store.get_dir("result/model/", out)
    got = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert got == files
    with pytest.raises(ArtifactNotFound, match="nothing-here"):
        store.get_dir("nothing-here", tmp_path / "x")


# ------------------------------------------------------------------------- missing, incomplete, corrupt


def test_missing_artifact(store, tmp_path):
    assert not store.exists("nope/x")
    for call in (lambda: store.get_bytes("nope/x"), lambda: store.sha256("nope/x"),
                 lambda: store.get_file("nope/x", tmp_path / "x"), lambda: store.get_json("nope/x")):
        with pytest.raises(ArtifactNotFound, match="nope/x"):
            call()
    assert not (tmp_path / "x").exists()


def test_incomplete_artifact_is_not_complete_and_rewrite_fixes_it(backend):
    store = backend.store
    backend.incomplete("gen/0/state.json", b"half")
    assert not store.exists("gen/0/state.json")
    with pytest.raises(backend.incomplete_error, match="gen/0/state.json"):
        store.get_bytes("gen/0/state.json")
    if backend.name == "file":
        assert store.list() == []  # the file backend lists complete artifacts only
    store.put_bytes("gen/0/state.json", b"whole")
    assert store.exists("gen/0/state.json") and store.get_bytes("gen/0/state.json") == b"whole"


def test_corruption_detected(backend, tmp_path):
    store = backend.store
    store.put_bytes("db/layer0.safetensors", b"original bytes")
    backend.corrupt("db/layer0.safetensors", b"flipped bytes!")
    with pytest.raises(ChecksumMismatch, match="db/layer0.safetensors"):
        store.get_bytes("db/layer0.safetensors")
    dest = tmp_path / "dl" / "layer0.safetensors"
    with pytest.raises(ChecksumMismatch, match="db/layer0.safetensors"):
        store.get_file("db/layer0.safetensors", dest)
    assert not dest.exists() and os.listdir(dest.parent) == []


def test_file_backend_crash_leftovers_are_hidden(tmp_path):
    store = FileStore(tmp_path / "s")
    store.put_bytes("k/a.bin", b"a")
    (tmp_path / "s" / "k" / ".~tmp.b.bin.0123").write_bytes(b"partial")  # a crash mid-write
    assert store.list() == ["k/a.bin"]
    assert sorted(os.listdir(tmp_path / "s" / "k")) == [".~tmp.b.bin.0123", "a.bin", "a.bin.sha256"]
    assert store.local_path("k/a.bin") == str(tmp_path / "s" / "k" / "a.bin")
    with pytest.raises(ArtifactNotFound):
        store.local_path("k/b.bin")
    (tmp_path / "s" / "k" / "a.bin.sha256").write_text("not-a-digest\n")
    with pytest.raises(ChecksumMismatch, match="k/a.bin"):
        store.get_bytes("k/a.bin")


# ------------------------------------------------------------------------------- list and delete


KEYS = ["gen/0/results/c1.json", "gen/0/state.json", "gen/1/state.json", "gen-extra/x", "top.json"]


def test_list_is_sorted_recursive_and_path_prefixed(store):
    for key in reversed(KEYS):
        store.put_bytes(key, key.encode())
    assert store.list() == sorted(KEYS)
    assert store.list("gen") == ["gen/0/results/c1.json", "gen/0/state.json", "gen/1/state.json"]
    assert store.list("gen/0/") == ["gen/0/results/c1.json", "gen/0/state.json"]
    assert store.list("top.json") == ["top.json"]
    assert store.list("ge") == [] and store.list("absent") == []


def test_delete_and_delete_prefix_are_idempotent(store):
    for key in KEYS:
        store.put_bytes(key, b"x")
    store.delete("top.json")
    store.delete("top.json")
    store.delete("never/written")
    assert not store.exists("top.json")
    assert store.delete_prefix("gen") == 3
    assert store.delete_prefix("gen") == 0
    assert store.list() == ["gen-extra/x"]
    assert store.delete_prefix("") == 1 and store.list() == []


def test_delete_prefix_batches(moto_endpoint, monkeypatch):
    monkeypatch.setattr("darwinlm.store.s3._DELETE_BATCH", 4)  # 1000 in production; same code path
    store = open_store(f"s3://{_new_bucket(moto_endpoint)}", endpoint_url=moto_endpoint)
    for i in range(10):
        store.put_bytes(f"many/{i:02d}", b"")
    calls = []
    store._c.client.meta.events.register("before-call.s3.DeleteObjects", lambda **kw: calls.append(1))
    assert store.delete_prefix("many") == 10 and store.list() == []
    assert len(calls) == 3


# ------------------------------------------------------------------------------------ keys and URIs


BAD_KEYS = ["", "/abs/key", "a/../b", "..", "a//b", "a/", "./a", "a\\b", "x.sha256", "d/.~tmp.f.0"]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_keys_rejected(store, key, tmp_path):
    calls = [lambda: store.put_bytes(key, b"x"), lambda: store.get_bytes(key), lambda: store.exists(key),
             lambda: store.delete(key), lambda: store.sha256(key), lambda: store.get_file(key, tmp_path / "f")]
    for call in calls:
        with pytest.raises(StoreError) as info:
            call()
        assert repr(key) in str(info.value)
        assert not isinstance(info.value, ArtifactNotFound)


@pytest.mark.parametrize("prefix", ["/abs", "a/../b", "a//b", "a\\b"])
def test_bad_prefixes_rejected(store, prefix):
    for call in (store.list, store.delete_prefix, store.child):
        with pytest.raises(StoreError, match="prefix"):
            call(prefix)


def test_child_views(store):
    child = store.child("searches/s1")
    assert child.uri == store.uri + "/searches/s1"
    child.put_json("spec.json", {"seed": 1})
    assert store.get_json("searches/s1/spec.json") == {"seed": 1}
    assert child.list() == ["spec.json"]
    grandchild = child.child("generations/")
    grandchild.put_bytes("0/state.json", b"s")
    assert store.list("searches") == ["searches/s1/generations/0/state.json", "searches/s1/spec.json"]
    assert grandchild.uri == store.uri + "/searches/s1/generations"
    assert child.delete_prefix("") == 2 and store.list() == []


def test_uri_reopens_the_same_store(backend, moto_endpoint):
    backend.store.put_bytes("k", b"v")
    kwargs = {"endpoint_url": moto_endpoint} if backend.name == "s3" else {}
    assert open_store(backend.store.uri, **kwargs).get_bytes("k") == b"v"


def test_parse_store_uri():
    assert parse_store_uri("file:///abs/dir") == ("file", "/abs/dir")
    assert parse_store_uri("file://./rel/dir") == ("file", "./rel/dir")
    assert parse_store_uri("rel/dir") == ("file", "rel/dir")
    assert parse_store_uri("s3://bucket/a/b/") == ("s3", "bucket/a/b")
    assert parse_store_uri("s3://bucket") == ("s3", "bucket")
    for bad in ("", "gs://b/p", "s3://", "s3://b/../x", "file://"):
        with pytest.raises(StoreError):
            parse_store_uri(bad)


def test_open_store_file_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for uri in (f"file://{tmp_path}/st", "file://./st", "st", str(tmp_path / "st")):
        store = open_store(uri)
        assert isinstance(store, FileStore) and store.uri == f"file://{tmp_path}/st"
    with pytest.raises(StoreError, match="endpoint_url"):
        open_store("st", endpoint_url="http://x")


def test_s3_endpoint_from_environment(moto_endpoint, monkeypatch):
    bucket = _new_bucket(moto_endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_endpoint)
    store = open_store(f"s3://{bucket}/p")
    store.put_bytes("k", b"v")
    assert store.get_bytes("k") == b"v"


# ------------------------------------------------------------------------------------------- S3 only


def test_s3_multipart_put_file(tmp_path, moto_endpoint):
    bucket = _new_bucket(moto_endpoint)
    store = open_store(f"s3://{bucket}/big", endpoint_url=moto_endpoint,
                       multipart_threshold=5 << 20, multipart_chunksize=5 << 20)
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(12 << 20))
    digest = store.put_file("w.bin", src)
    head = _s3_client(moto_endpoint).head_object(Bucket=bucket, Key="big/w.bin")
    assert head["ETag"].strip('"').endswith("-3")  # 5 + 5 + 2 MiB parts
    assert head["Metadata"] == {"sha256": digest} and store.sha256("w.bin") == digest
    store.get_file("w.bin", tmp_path / "back.bin")
    assert _sha((tmp_path / "back.bin").read_bytes()) == digest


def test_s3_missing_bucket_is_named(moto_endpoint):
    store = open_store("s3://darwinlm-no-such-bucket/p", endpoint_url=moto_endpoint)
    for call in (lambda: store.put_bytes("k", b"v"), lambda: store.get_bytes("k"), lambda: store.list(),
                 lambda: store.exists("k"), lambda: store.sha256("k")):
        with pytest.raises(StoreError, match="darwinlm-no-such-bucket") as info:
            call()
        assert not isinstance(info.value, ArtifactNotFound)


def _failures(moto_endpoint, tmp_path) -> list[BaseException]:
    ok = _s3_backend(moto_endpoint)
    ok.store.put_bytes("k", b"v")
    ok.corrupt("k", b"w")
    unreachable = open_store("s3://bucket-x/p", endpoint_url="http://127.0.0.1:9", max_attempts=1)
    missing = open_store("s3://darwinlm-no-such-bucket", endpoint_url=moto_endpoint)
    calls = [lambda: ok.store.get_bytes("k"), lambda: ok.store.get_bytes("absent"),
             lambda: missing.put_bytes("k", b"v"), lambda: missing.put_file("k", __file__),
             lambda: missing.get_file("k", tmp_path / "f"), lambda: missing.delete_prefix(""),
             lambda: unreachable.put_bytes("k", b"v"), lambda: unreachable.exists("k")]
    errors = []
    for call in calls:
        with pytest.raises(StoreError) as info:
            call()
        errors.append(info.value)
    return errors


def test_no_credentials_in_error_messages(moto_endpoint, tmp_path):
    for exc in _failures(moto_endpoint, tmp_path):
        text = "".join(traceback.format_exception(exc)) + repr(exc)
        assert SECRET_KEY not in text and ACCESS_KEY not in text, text
        assert "s3://" in str(exc)


def test_store_module_imports_neither_torch_nor_boto3():
    code = ("import sys, darwinlm.store; bad = {'torch', 'boto3', 'botocore'} & set(sys.modules); "
            "sys.exit(f'imported: {sorted(bad)}' if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_s3_store_construction_is_lazy():
    store = S3Store("some-bucket", "p/q", endpoint_url="http://127.0.0.1:9")
    assert store.uri == "s3://some-bucket/p/q" and "client" not in store._c.__dict__


def test_s3_wrong_recorded_checksum_detected(moto_endpoint):
    backend = _s3_backend(moto_endpoint)
    _s3_client(moto_endpoint).put_object(Bucket=backend.store.bucket, Key="root/k", Body=b"v",
                                         Metadata={"sha256": _sha(b"other")})
    assert backend.store.exists("k")  # looks complete; the read still catches it
    with pytest.raises(ChecksumMismatch, match="mismatch"):
        backend.store.get_bytes("k")


def test_file_crash_during_overwrite_leaves_incomplete_artifact(tmp_path, monkeypatch):
    import darwinlm.store.file as store_mod  # FileStore looks _atomic_write up here

    store = FileStore(tmp_path / "s")
    store.put_bytes("k", b"v1")
    real = store_mod._atomic_write

    def crash_on_sidecar(path, chunks, check=None):
        if path.endswith(".sha256"):
            raise OSError("simulated crash")
        return real(path, chunks, check)

    monkeypatch.setattr(store_mod, "_atomic_write", crash_on_sidecar)
    with pytest.raises(StoreError, match="simulated crash"):
        store.put_bytes("k", b"v2")
    assert not store.exists("k") and store.list() == []
    monkeypatch.setattr(store_mod, "_atomic_write", real)
    store.put_bytes("k", b"v2")
    assert store.get_bytes("k") == b"v2"


def test_credentials_echoed_by_the_server_are_scrubbed():
    from botocore.stub import Stubber

    store = open_store("s3://bucket-x/p", endpoint_url="http://127.0.0.1:9")
    with Stubber(store._c.client) as stub:
        stub.add_client_error("get_object", service_error_code="SignatureDoesNotMatch", http_status_code=403,
                              service_message=f"key {ACCESS_KEY} secret {SECRET_KEY}")
        with pytest.raises(StoreError) as info:
            store.get_bytes("k")
    text = "".join(traceback.format_exception(info.value))
    assert "SignatureDoesNotMatch" in text and "s3://bucket-x/p/k" in text
    assert SECRET_KEY not in text and ACCESS_KEY not in text, text
