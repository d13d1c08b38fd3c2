"""The artifact store: the single source of truth of a search, on a local disk (``file://``) or in S3.

``open_store(uri)`` returns a ``Store``; every backend writes atomically, records a sha256 per artifact
and verifies it on read (``protocol.py`` explains the guarantees). No torch and no boto3 at import: the
Kubernetes operator imports this package.
"""

from darwinlm.errors import ArtifactNotFound, ChecksumMismatch, StoreError

from .base import SIDECAR_SUFFIX, check_key
from .file import FileStore
from .protocol import Store, open_store, parse_store_uri
from .s3 import S3Store

__all__ = ["Store", "FileStore", "S3Store", "open_store", "parse_store_uri", "check_key", "SIDECAR_SUFFIX",
           "ArtifactNotFound", "ChecksumMismatch", "StoreError"]
