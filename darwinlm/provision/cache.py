"""The provisioning cache: where it lives, and directories that are written atomically and idempotently.

Part of :mod:`darwinlm.provision` (the public import path; its docstring is the overview).
Every provisioned directory is built in a temporary sibling and renamed into place, so a crash never
leaves a half-written directory; ``darwinlm-provenance.json`` is written last and
:func:`read_provenance` accepts a directory only when it is present and consistent.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from darwinlm.errors import DarwinLMError

# The public module's name, as before the split: log filters and the CLI's log lines keep reading it.
log = logging.getLogger("darwinlm.provision")

PROVENANCE_FILE = "darwinlm-provenance.json"


class ProvisionError(DarwinLMError):
    """Provisioning failed: a missing tool or package, or a source that is not what was pinned."""


def default_cache_dir() -> Path:
    """The cache root: ``$DARWINLM_CACHE``, else ``~/.cache/darwinlm``."""
    return Path(os.environ.get("DARWINLM_CACHE", "~/.cache/darwinlm")).expanduser()


# ---------------------------------------------------------------------------------------------------
# Atomic, idempotent directories
# ---------------------------------------------------------------------------------------------------


def read_provenance(directory: Path, kind: str, fmt: int) -> dict | None:
    """The provenance of ``directory`` if it is complete and consistent, else None.

    Consistent: the JSON parses, names ``kind`` and format ``fmt``, and every file it lists exists
    with the recorded size (sizes, not hashes: hashing 517 MB on every call would cost seconds).
    """
    try:
        prov = json.loads((directory / PROVENANCE_FILE).read_text())
        files = prov["files"]
        if prov.get("kind") != kind or prov.get("format") != fmt or not files:
            return None
        for rel, meta in files.items():
            if (directory / rel).stat().st_size != meta["bytes"]:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return prov


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _build_atomically(final: Path, kind: str, fmt: int, build: Callable[[Path], dict]) -> Path:
    """Run ``build(tmp)`` in a temporary sibling of ``final``, record provenance, rename into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_siblings(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    try:
        prov = {"kind": kind, "format": fmt, **build(tmp)}
        prov["files"] = {
            p.relative_to(tmp).as_posix(): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        }
        prov["darwinlm_version"] = _version("darwinlm")
        prov["created_unix"] = int(time.time())
        (tmp / PROVENANCE_FILE).write_text(json.dumps(prov, indent=2, sort_keys=True) + "\n")
        for p in [tmp, *tmp.rglob("*")]:  # mkdtemp and safetensors create owner-only modes
            p.chmod(0o755 if p.is_dir() else 0o644)
        _swap_into_place(tmp, final, kind, fmt)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _remove_stale_siblings(final: Path) -> None:
    """Delete temp/old dirs left by a provisioner that was killed (its pid no longer runs)."""
    pattern = re.compile(rf"\.{re.escape(final.name)}\.(?:tmp|old)-(\d+)-.*")
    for sibling in final.parent.iterdir():
        match = pattern.fullmatch(sibling.name)
        if match is None:
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            log.info("removing %s, left by a killed provisioner", sibling)
            shutil.rmtree(sibling, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's


def _swap_into_place(tmp: Path, final: Path, kind: str, fmt: int) -> None:
    # A directory cannot be renamed over a non-empty one: move the old one aside first.
    old = final.parent / f".{final.name}.old-{os.getpid()}-{time.monotonic_ns()}"
    if final.exists():
        final.rename(old)
    try:
        tmp.rename(final)
    except OSError:
        if read_provenance(final, kind, fmt) is None:  # not a concurrent provisioner's complete copy
            if old.exists() and not final.exists():
                old.rename(final)
            raise
        log.info("%s was provisioned concurrently; keeping that copy", final)
    shutil.rmtree(old, ignore_errors=True)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
