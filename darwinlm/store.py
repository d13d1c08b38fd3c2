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

This module must not import torch: the Kubernetes operator imports it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, runtime_checkable

from darwinlm.errors import ArtifactNotFound, ChecksumMismatch, StoreError

__all__ = ["Store", "FileStore", "S3Store", "open_store", "parse_store_uri", "check_key"]

SIDECAR_SUFFIX = ".sha256"  # file backend: the checksum of key K lives in K + ".sha256"
_TMP_PREFIX = ".~tmp."  # in-flight writes; hidden from list(), removed on failure
_META = "sha256"  # S3 user-metadata name (x-amz-meta-sha256)
_CHUNK = 1 << 20  # streaming read size, bytes
_DELETE_BATCH = 1000  # S3 DeleteObjects accepts at most 1000 keys per call
_HEX64 = re.compile(r"[0-9a-f]{64}")
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AROA|AIDA|ABIA|ACCA)[A-Z0-9]{12,}\b")


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


# ---------------------------------------------------------------------------------------------- keys


def check_key(key: str, what: str = "store key") -> str:
    """Return ``key`` if it is a valid relative ``/``-separated key, else raise ``StoreError``.

    Rejected: absolute keys, empty / ``.`` / ``..`` segments, backslashes, NUL, and names the file
    backend reserves (segments ending in ``.sha256`` or starting with ``.~tmp.``).
    """
    if not isinstance(key, str) or not key:
        raise StoreError(f"invalid {what} {key!r}: must be a non-empty string")
    if key.startswith("/"):
        raise StoreError(f"invalid {what} {key!r}: must be relative, not absolute")
    if "\\" in key or "\x00" in key:
        raise StoreError(f"invalid {what} {key!r}: backslashes and NUL are not allowed; use '/'")
    for seg in key.split("/"):
        if seg in ("", ".", ".."):
            raise StoreError(f"invalid {what} {key!r}: empty, '.' or '..' segment")
        if seg.endswith(SIDECAR_SUFFIX) or seg.startswith(_TMP_PREFIX):
            raise StoreError(f"invalid {what} {key!r}: '{SIDECAR_SUFFIX}' / '{_TMP_PREFIX}' names are reserved")
    return key


def _check_prefix(prefix: str) -> str:
    """A prefix is ``""`` (everything) or a key; one trailing ``/`` is allowed and dropped."""
    if prefix == "":
        return ""
    if isinstance(prefix, str) and prefix.endswith("/") and len(prefix) > 1:
        prefix = prefix[:-1]
    return check_key(prefix, what="store prefix")


def _key_ok(key: str) -> bool:
    try:
        check_key(key)
    except StoreError:
        return False
    return True


def _join(prefix: str, key: str) -> str:
    return f"{prefix}/{key}" if prefix else key


def _under(key: str, prefix: str) -> bool:
    """Path-prefix match: the key is the prefix itself or below it."""
    return not prefix or key == prefix or key.startswith(prefix + "/")


# ------------------------------------------------------------------------------------ shared helpers


def _verify(uri: str, expected: str | None, actual: str) -> None:
    if not isinstance(expected, str) or not _HEX64.fullmatch(expected):
        raise ChecksumMismatch(f"{uri}: no valid recorded sha256 (found {expected!r}): written outside the store, or corrupt")
    if expected != actual:
        raise ChecksumMismatch(f"{uri}: sha256 mismatch: recorded {expected}, read {actual}")


def _read_chunks(f) -> Iterator[bytes]:
    while chunk := f.read(_CHUNK):
        yield chunk


def _hash_local(path: str | os.PathLike, uri: str) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in _read_chunks(f):
                h.update(chunk)
    except OSError as exc:
        raise StoreError(f"{uri}: cannot read local file {os.fspath(path)!r}: {exc}") from exc
    return h.hexdigest()


def _fsync_dir(dirname: str) -> None:
    with contextlib.suppress(OSError):  # not supported everywhere (e.g. Windows); best effort
        fd = os.open(dirname, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(path: str, chunks: Iterable[bytes], check: Callable[[str], None] | None = None) -> str:
    """Write ``chunks`` to ``path`` via a same-directory temp file + fsync + ``os.replace``.

    ``check(digest)`` runs before the rename and may raise to abandon the write. Returns the sha256 hex.
    The temp file is created 0666 & ~umask (not mkstemp's 0600) so shared volumes stay readable.
    """
    dirname, base = os.path.split(path)
    tmp = os.path.join(dirname, f"{_TMP_PREFIX}{base}.{secrets.token_hex(6)}")
    h = hashlib.sha256()
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            for chunk in chunks:
                h.update(chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(h.hexdigest())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(dirname)
    return h.hexdigest()


class _StoreBase:
    """Operations built on the backend primitives; shared by both backends."""

    uri: str

    def _uri(self, key: str) -> str:
        return f"{self.uri}/{key}" if key else self.uri

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

    def put_json(self, key: str, obj: Any) -> str:
        """Canonical JSON (sorted keys, indent=1, UTF-8, trailing newline): same object, same bytes."""
        text = json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False) + "\n"
        return self.put_bytes(key, text.encode("utf-8"))

    def get_json(self, key: str) -> Any:
        data = self.get_bytes(key)
        try:
            return json.loads(data.decode("utf-8"))
        except ValueError as exc:
            raise StoreError(f"{self._uri(key)}: not valid UTF-8 JSON: {exc}") from exc

    def put_dir(self, prefix: str, path: str | os.PathLike) -> None:
        """Upload every file below local ``path`` (symlinked files are read through) as ``prefix/rel``.

        Keys already under ``prefix`` that are not in ``path`` are left alone; callers that need the
        directory as one unit should write a marker/manifest artifact after this returns.
        """
        prefix = _check_prefix(prefix)
        root = os.fspath(path)
        if not os.path.isdir(root):
            raise StoreError(f"{self._uri(prefix)}: put_dir source {root!r} is not a directory")
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                rel = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
                self.put_file(_join(prefix, rel), os.path.join(dirpath, name))

    def get_dir(self, prefix: str, path: str | os.PathLike) -> None:
        """Download every artifact below ``prefix`` into local ``path`` (verified, file by file)."""
        prefix = _check_prefix(prefix)
        keys = [k for k in self.list(prefix) if k != prefix]
        if not keys:
            raise ArtifactNotFound(f"{self._uri(prefix)}: no artifacts under this prefix")
        for key in keys:
            rel = key[len(prefix) + 1:] if prefix else key
            self.get_file(key, os.path.join(os.fspath(path), *rel.split("/")))


# --------------------------------------------------------------------------------------- file backend


class FileStore(_StoreBase):
    """A directory on a local or shared file system (the embedded default)."""

    def __init__(self, root: str | os.PathLike):
        self.root = os.path.abspath(os.fspath(root))
        self.uri = "file://" + self.root.replace(os.sep, "/")

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *key.split("/")) if key else self.root

    @contextlib.contextmanager
    def _os_errors(self, op: str, key: str) -> Iterator[None]:
        try:
            yield
        except FileNotFoundError as exc:
            raise ArtifactNotFound(f"{op} {self._uri(key)}: not found") from exc
        except OSError as exc:
            raise StoreError(f"{op} {self._uri(key)}: {exc}") from exc

    def local_path(self, key: str) -> str:
        """FILE BACKEND ONLY: the path of a complete artifact's data, e.g. to memory-map it.

        The bytes are not verified here; call ``sha256``/``get_file`` when that matters.
        """
        if not self.exists(key):
            raise ArtifactNotFound(f"{self._uri(key)}: not found (or incomplete)")
        return self._path(key)

    def _write(self, key: str, chunks: Iterable[bytes]) -> str:
        path = self._path(check_key(key))
        with self._os_errors("write", key):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with contextlib.suppress(FileNotFoundError):  # an overwrite is incomplete until the
                os.remove(path + SIDECAR_SUFFIX)  # new sidecar lands
            digest = _atomic_write(path, chunks)
            _atomic_write(path + SIDECAR_SUFFIX, [f"{digest}\n".encode()])
        return digest

    def put_bytes(self, key: str, data: bytes) -> str:
        return self._write(key, [bytes(data)])

    def put_file(self, key: str, path: str | os.PathLike) -> str:
        check_key(key)
        try:
            src = open(path, "rb")
        except OSError as exc:
            raise StoreError(f"{self._uri(key)}: cannot read local file {os.fspath(path)!r}: {exc}") from exc
        with src:
            return self._write(key, _read_chunks(src))

    def exists(self, key: str) -> bool:
        path = self._path(check_key(key))
        return os.path.isfile(path + SIDECAR_SUFFIX) and os.path.isfile(path)

    def sha256(self, key: str) -> str:
        path = self._path(check_key(key))
        if not os.path.isfile(path):
            raise ArtifactNotFound(f"{self._uri(key)}: not found")
        with self._os_errors("sha256", key):
            with open(path + SIDECAR_SUFFIX, encoding="ascii", errors="replace") as f:
                return f.read().strip()

    def _read_verified(self, key: str, read: Callable[[str], Any]) -> Any:
        """Run ``read(expected_sha)``; retry once if a concurrent re-write changed the checksum."""
        for attempt in (0, 1):
            expected = self.sha256(key)
            try:
                return read(expected)
            except ChecksumMismatch:
                if attempt or self._sidecar_now(key) == expected:
                    raise
        raise AssertionError("unreachable")

    def _sidecar_now(self, key: str) -> str | None:
        try:
            return self.sha256(key)
        except StoreError:
            return None

    def get_bytes(self, key: str) -> bytes:
        def read(expected: str) -> bytes:
            with self._os_errors("get", key):
                with open(self._path(key), "rb") as f:
                    data = f.read()
            _verify(self._uri(key), expected, hashlib.sha256(data).hexdigest())
            return data

        return self._read_verified(key, read)

    def get_file(self, key: str, path: str | os.PathLike) -> None:
        dest = os.path.abspath(os.fspath(path))

        def read(expected: str) -> None:
            with self._os_errors("get_file", key):
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                with open(self._path(key), "rb") as src:
                    _atomic_write(dest, _read_chunks(src), lambda d: _verify(self._uri(key), expected, d))

        self._read_verified(key, read)

    def list(self, prefix: str = "") -> list[str]:
        prefix = _check_prefix(prefix)
        base = self._path(prefix)
        if prefix and os.path.isfile(base):
            return [prefix] if self.exists(prefix) else []
        keys = []
        for dirpath, _dirs, filenames in os.walk(base, onerror=_raise_unless_missing):
            names = set(filenames)
            rel = os.path.relpath(dirpath, self.root).replace(os.sep, "/")
            for name in filenames:
                if _is_internal(name) or name + SIDECAR_SUFFIX not in names:
                    continue  # sidecar, temp file, or an incomplete artifact
                keys.append(name if rel == "." else f"{rel}/{name}")
        return sorted(keys)

    def delete(self, key: str) -> None:
        path = self._path(check_key(key))
        with self._os_errors("delete", key):
            for p in (path + SIDECAR_SUFFIX, path):  # sidecar first: never a complete-looking leftover
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                    os.remove(p)

    def delete_prefix(self, prefix: str) -> int:
        """Delete every artifact (complete or not) at or below ``prefix``; returns how many."""
        prefix = _check_prefix(prefix)
        base = self._path(prefix)
        if prefix and os.path.isfile(base):
            self.delete(prefix)
            return 1
        count = 0
        for _dirpath, _dirs, filenames in os.walk(base, onerror=_raise_unless_missing):
            count += sum(not _is_internal(n) for n in filenames)
        with self._os_errors("delete_prefix", prefix):
            entries = [base] if prefix else [os.path.join(base, n) for n in _listdir(base)]
            for entry in entries:
                if os.path.isdir(entry) and not os.path.islink(entry):
                    shutil.rmtree(entry, onerror=_rmtree_ignore_missing)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(entry)
        return count

    def child(self, prefix: str) -> FileStore:
        return FileStore(self._path(_check_prefix(prefix)))


def _is_internal(name: str) -> bool:
    return name.endswith(SIDECAR_SUFFIX) or name.startswith(_TMP_PREFIX)


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def _raise_unless_missing(exc: OSError) -> None:
    if not isinstance(exc, FileNotFoundError):
        raise exc


def _rmtree_ignore_missing(func, path, exc_info) -> None:
    if not issubclass(exc_info[0], FileNotFoundError):
        raise exc_info[1]


# ----------------------------------------------------------------------------------------- S3 backend


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
