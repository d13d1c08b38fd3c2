"""The operator's own read access to a search's store: S3 credentials from the referenced Secret.

Why this module exists: the plan is computed from the store, so the operator must read the same
bucket the job pods write, with the same credentials (``spec.s3.secretRef``), without putting them
into its process environment (one operator serves many searches with different Secrets) and without
ever logging them. The Secret is read with CoreV1 ``read_namespaced_secret``; its values go straight
into a dedicated boto3 Session behind the store and are never part of an exception message, a log
line, an Event or the status (errors name the Secret and the key, never a value).

:class:`StoreView` is the read-only view ``reconcile.decide`` consumes. Completion markers are
immutable once written (a task never rewrites them, see ``darwinlm.run.tasks``), so positive answers are
cached for the life of the operator process; negative answers are always asked again.
"""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from collections.abc import Callable
from typing import Any

from darwinlm.errors import ArtifactNotFound
from darwinlm.store import Store, layout, open_store

__all__ = ["CredentialsError", "Credentials", "read_credentials", "open_search_store", "StoreView", "StoreCache"]

CREDENTIALS_TTL = 60.0  # seconds a Secret's values are reused before it is read again (rotation)


class CredentialsError(Exception):
    """The referenced Secret or one of its keys is missing. The message never holds a value."""


class Credentials:
    """An access key pair; ``repr``/``str`` never show it."""

    __slots__ = ("access_key_id", "secret_access_key")

    def __init__(self, access_key_id: str, secret_access_key: str):
        self.access_key_id = access_key_id
        self.secret_access_key = secret_access_key

    def fingerprint(self) -> str:
        """A one-way id of the pair (cache key), safe to keep in memory next to other keys."""
        return hashlib.sha256(f"{self.access_key_id}\0{self.secret_access_key}".encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return "Credentials(***)"

    __str__ = __repr__


def read_credentials(core_v1, namespace: str, ref) -> Credentials:
    """The key pair named by ``ref`` (kspec.S3SecretRef) in Secret ``namespace/ref.name``."""
    from kubernetes.client.exceptions import ApiException

    try:
        secret = core_v1.read_namespaced_secret(ref.name, namespace)
    except ApiException as e:
        if e.status == 404:
            raise CredentialsError(f"Secret {namespace}/{ref.name} (spec.s3.secretRef) not found") from None
        if e.status == 403:
            raise CredentialsError(f"the operator may not read Secret {namespace}/{ref.name} (RBAC)") from None
        raise CredentialsError(f"reading Secret {namespace}/{ref.name} failed: HTTP {e.status}") from None
    data = (secret.data if hasattr(secret, "data") else secret.get("data")) or {}
    values = []
    for key in (ref.accessKeyIdKey, ref.secretAccessKeyKey):
        if key not in data:
            raise CredentialsError(f"Secret {namespace}/{ref.name} has no key {key!r} (spec.s3.secretRef)")
        try:
            values.append(base64.b64decode(data[key]).decode("utf-8").strip())
        except (ValueError, UnicodeDecodeError):
            raise CredentialsError(f"Secret {namespace}/{ref.name} key {key!r} is not base64 UTF-8") from None
    return Credentials(*values)


def _session(creds: Credentials, region: str | None):
    """A boto3 Session holding ``creds`` only (the process environment is neither read nor changed)."""
    import boto3

    return boto3.session.Session(aws_access_key_id=creds.access_key_id,
                                 aws_secret_access_key=creds.secret_access_key, region_name=region)


class StoreCache:
    """Per-process cache of opened stores (one boto3 client per bucket/endpoint/credentials) and of
    Secret reads (``CREDENTIALS_TTL``). Thread-safe: reconciles run in worker threads."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._creds: dict[tuple, tuple[float, Credentials]] = {}
        self._stores: dict[tuple, Store] = {}

    def credentials(self, core_v1, namespace: str, ref) -> Credentials:
        key = (namespace, ref.name, ref.accessKeyIdKey, ref.secretAccessKeyKey)
        with self._lock:
            hit = self._creds.get(key)
        if hit is not None and self._clock() - hit[0] < CREDENTIALS_TTL:
            return hit[1]
        creds = read_credentials(core_v1, namespace, ref)
        with self._lock:
            self._creds[key] = (self._clock(), creds)
        return creds

    def forget_credentials(self) -> None:
        """Read every Secret again on next use (S3 refused a cached key pair: it may have been rotated)."""
        with self._lock:
            self._creds.clear()

    def root(self, uri: str, kspec, core_v1, namespace: str) -> Store:
        """The store at ``uri`` as the search's pods see it (endpoint, region, Secret of ``kspec.s3``)."""
        s3 = kspec.s3
        endpoint = s3.endpoint if s3 is not None else None
        region = s3.region if s3 is not None else None
        creds = self.credentials(core_v1, namespace, s3.secretRef) if s3 is not None and s3.secretRef else None
        key = (uri, endpoint, region, creds.fingerprint() if creds else None)
        with self._lock:
            if key in self._stores:
                return self._stores[key]
        opts: dict[str, Any] = {}
        if uri.startswith("s3://"):
            opts = {"endpoint_url": endpoint, "region_name": region,
                    "session": _session(creds, region) if creds is not None else None}
        store = open_store(uri, **{k: v for k, v in opts.items() if v is not None})
        with self._lock:
            return self._stores.setdefault(key, store)


def open_search_store(cache: StoreCache, spec, kspec, uid: str, core_v1, namespace: str) -> Store:
    """The prefix ``searches/<name>-<uid>`` of the search's store, with the operator's access."""
    return cache.root(spec.store, kspec, core_v1, namespace).child(layout.search_prefix(spec.name, uid))


class StoreView:
    """``exists`` / ``get_json`` / ``list`` for ``reconcile.decide``, caching positive answers.

    ``memo`` is shared across reconciles of one search (the caller keeps it, e.g. per search loop).
    """

    def __init__(self, store: Store, memo: dict[str, Any] | None = None):
        self.store = store
        self.uri = store.uri
        self._memo = memo if memo is not None else {}  # key -> parsed JSON, or True (exists)

    def exists(self, key: str) -> bool:
        if key in self._memo:
            return True
        if self.store.exists(key):
            self._memo[key] = True
            return True
        return False

    def get_json(self, key: str) -> Any:
        value = self._memo.get(key)
        if value is not None and value is not True:
            return value
        try:
            value = self.store.get_json(key)
        except ArtifactNotFound:
            return None
        self._memo[key] = value if value is not None else True
        return value

    def list(self, prefix: str) -> list[str]:
        return self.store.list(prefix)
