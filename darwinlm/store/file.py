"""The ``file://`` store backend: ``FileStore``, a directory on a local or shared file system.

Part of :mod:`darwinlm.store` (the public import path; its docstring is the overview). Data is
written atomically (``store.base._atomic_write``), then its sha256 sidecar ``<key>.sha256``; an
artifact exists only when both are there.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from darwinlm.errors import ArtifactNotFound, ChecksumMismatch, StoreError
from darwinlm.store.base import (
    _TMP_PREFIX,
    SIDECAR_SUFFIX,
    _atomic_write,
    _check_prefix,
    _read_chunks,
    _StoreBase,
    _verify,
    check_key,
)


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

