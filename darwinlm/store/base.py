"""Keys, checksums, atomic local writes and the operations both store backends share.

Part of :mod:`darwinlm.store` (the public import path; its docstring is the overview):
``check_key`` and the prefix helpers, sha256 verification, the same-directory temp file + fsync +
``os.replace`` write, and ``_StoreBase`` (JSON and directory operations built on a backend's
primitives). Used by ``store.file`` (``FileStore``) and ``store.s3`` (``S3Store``).

This module must not import torch or boto3: the Kubernetes operator imports it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from darwinlm.errors import ArtifactNotFound, ChecksumMismatch, StoreError

SIDECAR_SUFFIX = ".sha256"  # file backend: the checksum of key K lives in K + ".sha256"
_TMP_PREFIX = ".~tmp."  # in-flight writes; hidden from list(), removed on failure
_CHUNK = 1 << 20  # streaming read size, bytes
_HEX64 = re.compile(r"[0-9a-f]{64}")


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
        raise ChecksumMismatch(f"{uri}: no valid recorded sha256 (found {expected!r}): written outside the store, "
                               f"or corrupt", uri=uri)
    if expected != actual:
        raise ChecksumMismatch(f"{uri}: sha256 mismatch: recorded {expected}, read {actual}", uri=uri)


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
