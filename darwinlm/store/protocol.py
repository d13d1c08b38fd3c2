"""The artifact store: the single source of truth of a search, on a local disk or in S3.

Why it exists: every task (database shard, generation, post-train, export, evaluate) is idempotent and
the plan decides what to run next only from what is *completely* written in the store. So the store must
make a half-written artifact impossible to mistake for a finished one, and must catch bytes that changed
after they were written. Two backends give the same guarantees behind one ``Store`` protocol:

* ``file://`` (or a bare path): data is written to a temp file in the same directory, fsynced and
  ``os.replace``-d into place (atomic); then its sha256 goes into a sidecar ``<key>.sha256`` written the
  same way. An artifact exists only when both are there; an overwrite removes the sidecar first, so a
  crash at any point leaves an artifact that ``exists`` reports False and a re-write repairs.
* ``s3://bucket/prefix``: one PutObject (or a multipart upload, completed atomically) carries the sha256
  in user metadata (``x-amz-meta-sha256``). Endpoint, region and credentials come from the standard AWS
  chain (``AWS_ENDPOINT_URL[_S3]``, ``AWS_DEFAULT_REGION``, env keys, profiles, IRSA...), or
  ``endpoint_url=`` / ``region_name=`` arguments. boto3 is imported only when an S3 store is used.

Readers always verify the sha256 and raise ``ChecksumMismatch``; a missing artifact is
``ArtifactNotFound``; anything else is ``StoreError``. Error messages name the artifact's URI and never
contain credentials. Keys are ``/``-separated relative paths (see ``check_key``); ``list(prefix)`` and
``delete_prefix(prefix)`` treat the prefix as a *path* (``"gen"`` never matches ``"gen-2/x"``).

Layout of the package (``darwinlm.store`` re-exports the public names):

* ``protocol.py`` (this module): the ``Store`` protocol, ``parse_store_uri`` and ``open_store``;
* ``base.py``: ``check_key`` and the prefix helpers, sha256 verification, atomic local writes,
  and ``_StoreBase`` (JSON and directory operations shared by both backends);
* ``file.py``: ``FileStore`` (``file://``);
* ``s3.py``: ``S3Store`` and its boto3 connection ``_S3Conn`` (``s3://``);
* ``layout.py``: where every artifact lives (the keys), spelled once.

This module must not import torch: the Kubernetes operator imports it.
"""

from __future__ import annotations

import os
from typing import Any, Protocol, runtime_checkable

from darwinlm.errors import StoreError
from darwinlm.store.base import check_key
from darwinlm.store.file import FileStore
from darwinlm.store.s3 import S3Store

__all__ = ["Store", "FileStore", "S3Store", "open_store", "parse_store_uri", "check_key"]


@runtime_checkable
class Store(Protocol):
    """What every backend offers. Keys are relative to the store root (``uri``)."""

    uri: str

    def put_bytes(self, key: str, data: bytes) -> str: ...  # returns the sha256 hex; atomic
    def get_bytes(self, key: str) -> bytes: ...  # verified
    def exists(self, key: str) -> bool: ...  # True only for a completely written artifact
    def list(self, prefix: str = "") -> list[str]: ...  # recursive, sorted keys
    def delete(self, key: str) -> None: ...  # idempotent
    def delete_prefix(self, prefix: str) -> int: ...  # number of objects deleted
    def put_json(self, key: str, obj: Any) -> str: ...
    def get_json(self, key: str) -> Any: ...
    def put_file(self, key: str, path: str | os.PathLike) -> str: ...
    def get_file(self, key: str, path: str | os.PathLike) -> None: ...
    def put_dir(self, prefix: str, path: str | os.PathLike) -> None: ...
    def get_dir(self, prefix: str, path: str | os.PathLike) -> None: ...
    def sha256(self, key: str) -> str: ...  # recorded checksum, body not read
    def child(self, prefix: str) -> Store: ...


# ---------------------------------------------------------------------------------------------- URIs


def parse_store_uri(uri: str) -> tuple[str, str]:
    """Split a store URI into ``(scheme, location)``.

    ``file:///abs`` → ``("file", "/abs")``; ``file://./rel`` → ``("file", "./rel")``; a bare path →
    ``("file", path)``; ``s3://bucket/prefix/`` → ``("s3", "bucket/prefix")``.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise StoreError(f"invalid store URI {uri!r}: expected file://PATH, s3://BUCKET[/PREFIX] or a path")
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return "file", uri
    scheme = scheme.lower()
    if scheme == "file":
        if rest.startswith("localhost/"):
            rest = rest[len("localhost"):]
        if not rest:
            raise StoreError(f"invalid store URI {uri!r}: empty path")
        return "file", rest
    if scheme == "s3":
        location = rest.strip("/")
        bucket, _, prefix = location.partition("/")
        if not bucket:
            raise StoreError(f"invalid store URI {uri!r}: no bucket")
        if prefix:
            check_key(prefix, what=f"prefix of store URI {uri!r}")
        return "s3", location
    raise StoreError(f"unsupported store URI scheme {scheme!r} in {uri!r}; use file:// or s3://")


def open_store(
    uri: str,
    *,
    endpoint_url: str | None = None,
    region_name: str | None = None,
    multipart_threshold: int | None = None,
    multipart_chunksize: int | None = None,
    max_attempts: int | None = None,
    session: Any = None,
) -> Store:
    """Open the store at ``uri``. The keyword arguments apply to ``s3://`` only (see ``S3Store``).

    ``session``: a ``boto3.session.Session`` to make the client from (its credentials and region), e.g.
    one built from a Kubernetes Secret, so the process environment is neither read nor changed. Default:
    a fresh ``boto3.session.Session()`` (the standard credential chain)."""
    scheme, location = parse_store_uri(uri)
    s3_opts = {
        "endpoint_url": endpoint_url,
        "region_name": region_name,
        "multipart_threshold": multipart_threshold,
        "multipart_chunksize": multipart_chunksize,
        "max_attempts": max_attempts,
        "session": session,
    }
    s3_opts = {k: v for k, v in s3_opts.items() if v is not None}
    if scheme == "file":
        if s3_opts:
            raise StoreError(f"option(s) {sorted(s3_opts)} apply to s3:// stores only, not {uri!r}")
        return FileStore(location)
    bucket, _, prefix = location.partition("/")
    return S3Store(bucket, prefix, **s3_opts)

