"""Recomputing a corrupt artifact instead of reusing it or giving up.

Why it exists: every read verifies the sha256 recorded at write time (``ChecksumMismatch``), so a
flipped or truncated artifact is never used. What the plan can produce again is deleted here (with
the markers that say it is complete) and the runner plans again; what it cannot (the spec record,
inputs written by other searches...) stays an error that names the object.

Recomputable, by store key:

=====================================================  ===========================================
artifact                                               deleted so the plan redoes it
=====================================================  ===========================================
``searches/<s>/generations/<g>/state.json``            the state (generation g runs again; its
                                                       valid candidate results are reused)
``searches/<s>/generations/<g>/results/<c>.json``      the result (that candidate is scored again)
``searches/<s>/posttrain/<v>/checkpoint.{json,safetensors}``  both and post-training v's marker
                                                       (it trains again from the start)
``databases/<db>/layers/<layer>.safetensors``          the layer, the database's shard markers and
                                                       manifest, the search's database markers
=====================================================  ===========================================
"""

from __future__ import annotations

import logging

from darwinlm.errors import ChecksumMismatch
from darwinlm.store import layout

log = logging.getLogger(__name__)

__all__ = ["recompute"]

_GENERATION = layout.GENERATION_ARTIFACT
_CHECKPOINT = layout.CHECKPOINT_FILE
_LAYER = layout.DATABASE_LAYER_FILE


def recompute(ws, exc: ChecksumMismatch, done: set[str]) -> bool:
    """Delete what ``exc`` found corrupt (and what depends on it being complete) when the plan can
    produce it again; True if it did. ``done``: URIs already repaired in this run (never twice)."""
    uri = exc.uri
    if uri is None or uri in done:
        return False
    for store, keys in ((ws.store, _search_keys), (ws.root, _root_keys)):
        prefix = store.uri.rstrip("/") + "/"
        if uri.startswith(prefix):
            todo = keys(ws, uri[len(prefix):])
            if todo:
                log.warning("%s is corrupt (%s): deleting %s to compute it again", uri, exc, ", ".join(todo))
                for key in todo:
                    store.delete(key)
                done.add(uri)
                if store is ws.root:
                    for name in ("db", "builder"):  # the cached layer database read the bad file
                        ws.__dict__.pop(name, None)
                return True
    return False


def _search_keys(ws, key: str) -> list[str]:
    if _GENERATION.fullmatch(key):
        return [key]
    m = _CHECKPOINT.fullmatch(key)
    if m:  # the last checkpoint is also the post-trained weights export reads: train again from the start
        variant = m.group(1).split("/", 1)[1]
        return [layout.posttrain_done(variant), layout.checkpoint_meta(m.group(1)), layout.checkpoint_weights(m.group(1))]
    return []


def _root_keys(ws, key: str) -> list[str]:
    m = _LAYER.fullmatch(key)
    if not m:
        return []
    db, shards = m.group(1), ws.spec.database.shards
    markers = [layout.database_shard(db, k, shards) for k in range(shards)] + [layout.database_manifest(db)]
    for k in range(shards):  # the search's own "database shard k done" markers
        ws.store.delete(layout.shard_done("database", k, shards))
    return [key, *markers]
