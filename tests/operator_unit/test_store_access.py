"""creds: the Secret's key pair reaches only a dedicated boto3 Session, never logs or messages."""

from __future__ import annotations

import base64
import logging
import os
import types

import pytest

from darwinlm_operator import store_access as creds
from darwinlm_operator.kspec import load_psearch

from . import make_cr

KEY_ID, SECRET = "AKIAOPERATORTEST0001", "s3cr3t/Value+With=Chars"


class FakeCore:
    def __init__(self, data=None, status=None):
        self.data, self.status, self.reads = data, status, 0

    def read_namespaced_secret(self, name, namespace):
        from kubernetes.client.exceptions import ApiException

        self.reads += 1
        if self.status:
            raise ApiException(status=self.status, reason="nope")
        return types.SimpleNamespace(data=self.data)


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def _ref(**kw):
    return types.SimpleNamespace(name="s3-creds", accessKeyIdKey="AWS_ACCESS_KEY_ID",
                                 secretAccessKeyKey="AWS_SECRET_ACCESS_KEY", **kw)


def test_reads_the_pair_and_never_shows_it():
    core = FakeCore({"AWS_ACCESS_KEY_ID": _b64(KEY_ID), "AWS_SECRET_ACCESS_KEY": _b64(SECRET)})
    c = creds.read_credentials(core, "team-a", _ref())
    assert (c.access_key_id, c.secret_access_key) == (KEY_ID, SECRET)
    assert KEY_ID not in repr(c) and SECRET not in str(c) and SECRET not in c.fingerprint()


@pytest.mark.parametrize("core, match", [
    (FakeCore(status=404), "Secret team-a/s3-creds .* not found"),
    (FakeCore(status=403), "may not read"),
    (FakeCore({"AWS_ACCESS_KEY_ID": _b64(KEY_ID)}), "has no key 'AWS_SECRET_ACCESS_KEY'"),
])
def test_errors_name_the_secret_not_the_values(core, match):
    with pytest.raises(creds.CredentialsError, match=match) as e:
        creds.read_credentials(core, "team-a", _ref())
    assert KEY_ID not in str(e.value)


def test_s3_store_gets_its_own_session_and_the_env_is_untouched(monkeypatch, caplog):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var, raising=False)
    cr = make_cr(**{"s3.region": "eu-west-1"})
    spec, kspec = load_psearch(cr)
    core = FakeCore({"AWS_ACCESS_KEY_ID": _b64(KEY_ID), "AWS_SECRET_ACCESS_KEY": _b64(SECRET)})
    cache = creds.StoreCache(clock=lambda: 0.0)
    with caplog.at_level(logging.DEBUG):
        store = creds.open_search_store(cache, spec, kspec, "u-1", core, "team-a")
        again = creds.open_search_store(cache, spec, kspec, "u-1", core, "team-a")
    assert store.uri == "s3://bucket/prefix/searches/tiny-u-1"
    frozen = store._c.session.get_credentials().get_frozen_credentials()  # noqa: SLF001
    assert (frozen.access_key, frozen.secret_key) == (KEY_ID, SECRET)
    assert store._c.session.region_name == "eu-west-1"  # noqa: SLF001
    assert store._c is again._c and core.reads == 1  # one client, the Secret read once per TTL  # noqa: SLF001
    assert "AWS_ACCESS_KEY_ID" not in os.environ
    assert SECRET not in caplog.text and KEY_ID not in caplog.text


def test_file_stores_need_no_credentials(tmp_path):
    cr = make_cr(s3=None, store=f"file://{tmp_path}")
    spec, kspec = load_psearch(cr)
    store = creds.open_search_store(creds.StoreCache(), spec, kspec, "u-1", FakeCore(status=500), "team-a")
    assert store.uri.endswith("/searches/tiny-u-1")
