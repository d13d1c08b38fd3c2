"""The ``s3://`` store backend: ``S3Store`` and its shared boto3 connection ``_S3Conn``.

Part of :mod:`darwinlm.store` (the public import path; its docstring is the overview). Each
object carries its sha256 in user metadata (``x-amz-meta-sha256``). boto3/botocore are imported
lazily, inside the methods that need them, so importing this module (as the operator does) does not
import them.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import secrets
from collections.abc import Iterator
from typing import Any

from darwinlm.errors import ArtifactNotFound, ChecksumMismatch, StoreError
from darwinlm.store.base import (
    _HEX64,
    _TMP_PREFIX,
    _check_prefix,
    _hash_local,
    _join,
    _key_ok,
    _StoreBase,
    _under,
    _verify,
    check_key,
)

_META = "sha256"  # S3 user-metadata name (x-amz-meta-sha256)
_DELETE_BATCH = 1000  # S3 DeleteObjects accepts at most 1000 keys per call
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AROA|AIDA|ABIA|ACCA)[A-Z0-9]{12,}\b")


class _S3Conn:
    """One boto3 client + transfer settings, shared by a store and its ``child`` views."""

    def __init__(self, bucket: str, endpoint_url: str | None, region_name: str | None,
                 multipart_threshold: int, multipart_chunksize: int, max_attempts: int, session: Any = None):
        self.bucket = bucket
        if session is not None:
            self.session = session  # fills the cached_property below
        self._opts = (endpoint_url, region_name, max_attempts)
        self._transfer_opts = dict(multipart_threshold=multipart_threshold,
                                   multipart_chunksize=multipart_chunksize, max_concurrency=8)
        self.bucket_ok = False

    @functools.cached_property
    def session(self):
        import boto3  # lazily: file-only users and the operator's import need no boto3

        return boto3.session.Session()

    @functools.cached_property
    def client(self):
        from botocore.config import Config

        endpoint_url, region_name, max_attempts = self._opts
        config = Config(
            retries={"mode": "standard", "max_attempts": max_attempts},
            connect_timeout=10,  # seconds
            read_timeout=60,  # seconds without a byte, per request
            max_pool_connections=16,  # >= transfer concurrency
            tcp_keepalive=True,
        )
        region = region_name or self.session.region_name or "us-east-1"
        # endpoint_url=None lets botocore apply AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL itself.
        return self.session.client("s3", region_name=region, endpoint_url=endpoint_url, config=config)

    @functools.cached_property
    def transfer(self):
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(**self._transfer_opts)

    def scrub(self, message: str) -> str:
        """Remove this client's credentials (and anything shaped like an AWS key id) from a message."""
        try:
            creds = self.session.get_credentials() if "client" in self.__dict__ else None
            frozen = creds.get_frozen_credentials() if creds is not None else None
        except Exception:  # scrubbing must never hide the real error
            frozen = None
        for value in (frozen.access_key, frozen.secret_key, frozen.token) if frozen else ():
            if value:
                message = message.replace(value, "***")
        return _AWS_KEY_ID.sub("***", message)


class S3Store(_StoreBase):
    """Objects under ``s3://bucket/prefix``; each carries its sha256 in user metadata."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 region_name: str | None = None, multipart_threshold: int = 64 << 20,
                 multipart_chunksize: int = 64 << 20, max_attempts: int = 10, session: Any = None,
                 _conn: _S3Conn | None = None):
        """``multipart_threshold``/``multipart_chunksize`` are bytes (S3 parts are >= 5 MiB);
        ``max_attempts`` counts the first try (botocore "standard" retry mode); ``session``: the
        ``boto3.session.Session`` whose credentials to use (default: the standard chain)."""
        if not bucket or "/" in bucket:
            raise StoreError(f"invalid S3 bucket name {bucket!r}")
        self.bucket = bucket
        self.prefix = _check_prefix(prefix)
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._c = _conn or _S3Conn(bucket, endpoint_url, region_name, multipart_threshold,
                                   multipart_chunksize, max_attempts, session)

    def _obj(self, key: str) -> str:
        return _join(self.prefix, key)

    @contextlib.contextmanager
    def _errors(self, op: str, key: str) -> Iterator[None]:
        """Map boto errors to store errors; ``from None`` keeps raw responses out of tracebacks."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            raise self._client_error(exc, op, key) from None
        except Boto3Error as exc:  # e.g. S3UploadFailedError, which wraps a ClientError
            if isinstance(exc.__context__, ClientError):
                raise self._client_error(exc.__context__, op, key) from None
            raise StoreError(self._c.scrub(f"{op} {self._uri(key)}: {type(exc).__name__}: {exc}")) from None
        except BotoCoreError as exc:
            raise StoreError(self._c.scrub(f"{op} {self._uri(key)}: {type(exc).__name__}: {exc}")) from None

    def _client_error(self, exc, op: str, key: str) -> StoreError:
        err = exc.response.get("Error", {})
        code = str(err.get("Code", "Unknown"))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        where = f"{op} {self._uri(key)}"
        if code == "NoSuchBucket":
            return StoreError(f"{where}: S3 bucket {self.bucket!r} does not exist (NoSuchBucket)")
        if code in ("404", "NotFound", "NoSuchKey"):
            if code != "NoSuchKey":  # a HEAD 404 does not say whether the key or the bucket is missing
                self._check_bucket(where)
            return ArtifactNotFound(f"{where}: not found (S3 {code})")
        message = str(err.get("Message", ""))
        return StoreError(self._c.scrub(f"{where}: S3 error {code} (HTTP {status}): {message}"))

    def _check_bucket(self, where: str) -> None:
        """Raise ``StoreError`` if the bucket is missing; checked once per connection."""
        if self._c.bucket_ok:
            return
        from botocore.exceptions import ClientError

        try:
            self._c.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchBucket", "NotFound"):
                raise StoreError(f"{where}: S3 bucket {self.bucket!r} does not exist") from None
            return  # e.g. 403 without s3:ListBucket: cannot tell, assume it exists
        self._c.bucket_ok = True

    def _head(self, key: str, op: str) -> dict:
        with self._errors(op, check_key(key)):
            return self._c.client.head_object(Bucket=self.bucket, Key=self._obj(key))

    def put_bytes(self, key: str, data: bytes) -> str:
        data = bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        with self._errors("put", check_key(key)):
            self._c.client.put_object(Bucket=self.bucket, Key=self._obj(key), Body=data,
                                      Metadata={_META: digest})
        return digest

    def put_file(self, key: str, path: str | os.PathLike) -> str:
        """Hash first, then ``upload_file`` (multipart above ``multipart_threshold``, completed atomically)."""
        digest = _hash_local(path, self._uri(check_key(key)))
        with self._errors("put_file", key):
            self._c.client.upload_file(os.fspath(path), self.bucket, self._obj(key),
                                       ExtraArgs={"Metadata": {_META: digest}}, Config=self._c.transfer)
        return digest

    def get_bytes(self, key: str) -> bytes:
        """One GetObject: body and metadata come from the same object version."""
        with self._errors("get", check_key(key)):
            resp = self._c.client.get_object(Bucket=self.bucket, Key=self._obj(key))
            data = resp["Body"].read()
        _verify(self._uri(key), resp.get("Metadata", {}).get(_META), hashlib.sha256(data).hexdigest())
        return data

    def get_file(self, key: str, path: str | os.PathLike) -> None:
        """Parallel ranged download to a temp file beside ``path``; verified, then renamed."""
        dest = os.path.abspath(os.fspath(path))
        try:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
        except OSError as exc:
            raise StoreError(f"get_file {self._uri(key)}: cannot create {os.path.dirname(dest)!r}: {exc}") from exc
        for attempt in (0, 1, 2):
            head = self._head(key, "get_file")
            expected = head.get("Metadata", {}).get(_META)
            tmp = os.path.join(os.path.dirname(dest), f"{_TMP_PREFIX}{os.path.basename(dest)}.{secrets.token_hex(6)}")
            try:
                with self._errors("get_file", key):
                    self._c.client.download_file(self.bucket, self._obj(key), tmp, Config=self._c.transfer)
                try:
                    _verify(self._uri(key), expected, _hash_local(tmp, self._uri(key)))
                except ChecksumMismatch:  # replaced while we read? then try again
                    if attempt == 2 or self._head(key, "get_file").get("ETag") == head.get("ETag"):
                        raise
                    continue
                os.replace(tmp, dest)
                return
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)

    def exists(self, key: str) -> bool:
        try:
            head = self._head(key, "exists")
        except ArtifactNotFound:
            return False
        return bool(_HEX64.fullmatch(str(head.get("Metadata", {}).get(_META, ""))))

    def sha256(self, key: str) -> str:
        digest = str(self._head(key, "sha256").get("Metadata", {}).get(_META, ""))
        if not _HEX64.fullmatch(digest):
            raise ArtifactNotFound(f"sha256 {self._uri(key)}: object has no recorded sha256 (not a complete artifact)")
        return digest

    def _raw_keys(self, prefix: str) -> list[str]:
        """Object keys (relative to the store root) at or below ``prefix``, unfiltered."""
        query = self._obj(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        cut = len(self.prefix) + 1 if self.prefix else 0
        out = []
        with self._errors("list", prefix):
            for page in self._c.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=query):
                out.extend(obj["Key"][cut:] for obj in page.get("Contents", []))
        return [k for k in out if _under(k, prefix)]

    def list(self, prefix: str = "") -> list[str]:
        """Keys at or below ``prefix``, sorted. Objects written by other tools without checksum
        metadata are listed too (``exists`` is False for them); folder markers are skipped."""
        return sorted(k for k in self._raw_keys(_check_prefix(prefix)) if _key_ok(k))

    def delete(self, key: str) -> None:
        with self._errors("delete", check_key(key)):
            self._c.client.delete_object(Bucket=self.bucket, Key=self._obj(key))

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object at or below ``prefix`` in DeleteObjects batches of 1000; returns how many."""
        prefix = _check_prefix(prefix)
        keys = self._raw_keys(prefix)
        for i in range(0, len(keys), _DELETE_BATCH):
            batch = [{"Key": self._obj(k)} for k in keys[i:i + _DELETE_BATCH]]
            with self._errors("delete_prefix", prefix):
                resp = self._c.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            if resp.get("Errors"):
                first = resp["Errors"][0]
                raise StoreError(self._c.scrub(
                    f"delete_prefix {self._uri(prefix)}: {len(resp['Errors'])} object(s) not deleted, "
                    f"e.g. {first.get('Key')!r}: {first.get('Code')} {first.get('Message', '')}"))
        return len(keys)

    def child(self, prefix: str) -> S3Store:
        return S3Store(self.bucket, _join(self.prefix, _check_prefix(prefix)), _conn=self._c)
