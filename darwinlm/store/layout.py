"""Where everything lives in a store: every key darwinlm reads or writes, spelled once.

Why this module exists: the library writes these keys, the plan decides what to run from them, and the
Kubernetes operator reads them (progress, result URI, the spec a search started with) without the library's
heavy modules. One spelling keeps the three in step. Databases (and the sensitivity tables measured on them)
are content-addressed at the store root, so searches share them; everything else belongs to one search::

    <store>/databases/<db>/manifest.json                         written once every shard is complete
    <store>/databases/<db>/layers/<layer>.safetensors            removal order + compensated weights per level
    <store>/databases/<db>/shards/<k>-of-<K>.json                shard completion markers
    <store>/databases/<db>/sensitivity/<table>/blocks/<b>.json   the rows of block b's layers
    <store>/databases/<db>/sensitivity/<table>/shards/<k>-of-<K>.json
    <store>/databases/<db>/sensitivity/<table>/table.json        the whole table
    <store>/searches/<name>[-<uid>]/                              one search (the keys below are relative to it)
        spec.json                                                the resolved spec, written by the first task
        init.json                                                generation 0's parent and how it was chosen
        database/shard-<k>-of-<K>.json                           task markers (``plan.done_key``)
        sensitivity/shard-<k>-of-<K>.json
        generations/<g:05d>/state.json                           a generation's state (its marker)
        generations/<g:05d>/results/s<stage>-<genome>.json      one per evaluated candidate
        generations/stop.json                                    written by the generation that stops early
        posttrain/<variant>/checkpoint.{json,safetensors}        resumable post-training
        posttrain/<variant>/done.json
        result/{config.json,config.txt,model/}                   the export (marker: result/export.json)
        result/gguf/model-<type>.gguf                            the export for llama.cpp (export.formats: gguf)
        result/{report.md,fitness.png,summary.json}              the evaluation (marker: result/summary.json)

Keys are ``/``-separated and relative to the store they are used with (``Store.child`` makes a search's
store). Nothing here touches a store, except :func:`spec_drift`, which compares two ``spec.json`` documents.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

# ------------------------------------------------------------------------------ the store root


def search_prefix(name: str, uid: str | None = None) -> str:
    """``searches/<name>`` (embedded) or ``searches/<name>-<uid>`` (a PruningSearch: its metadata.uid)."""
    return f"searches/{name}" + (f"-{uid}" if uid else "")


def _database(db: str) -> str:
    return f"databases/{db}"


def database_manifest(db: str) -> str:
    return f"{_database(db)}/manifest.json"


def database_layer(db: str, layer: str) -> str:
    return f"{_database(db)}/layers/{layer}.safetensors"


def database_shard(db: str, shard: int, shards: int) -> str:
    return f"{_database(db)}/shards/{shard}-of-{shards}.json"


def _sensitivity(db: str, table: str) -> str:
    return f"{_database(db)}/sensitivity/{table}"


def sensitivity_block(db: str, table: str, block: int) -> str:
    return f"{_sensitivity(db, table)}/blocks/{block}.json"


def sensitivity_shard(db: str, table: str, shard: int, shards: int) -> str:
    return f"{_sensitivity(db, table)}/shards/{shard}-of-{shards}.json"


def sensitivity_table(db: str, table: str) -> str:
    return f"{_sensitivity(db, table)}/table.json"


# ------------------------------------------------------------------------------ one search

SPEC = "spec.json"
INIT = "init.json"


def shard_done(kind: str, shard: int, shards: int) -> str:
    """The marker of a sharded task (``database`` or ``sensitivity``) of a search."""
    return f"{kind}/shard-{shard}-of-{shards}.json"


_GENERATIONS = "generations"
STOP = f"{_GENERATIONS}/stop.json"


def _generation(g: int) -> str:
    return f"{_GENERATIONS}/{g:05d}"


def generation_state(g: int) -> str:
    return f"{_generation(g)}/state.json"


def generation_timing(g: int) -> str:
    """When generation ``g`` finished (wall clock) and what its process spent; written just before its
    state. Kept out of the state, which holds only deterministic results (plus its ``seconds``)."""
    return f"{_generation(g)}/timing.json"


def generation_results(g: int) -> str:
    """The prefix under which generation ``g`` stores one result per evaluated candidate."""
    return f"{_generation(g)}/results"


def candidate_result(g: int, stage: int, genome_id: str) -> str:
    return f"{generation_results(g)}/s{stage}-{genome_id}.json"


def posttrain_prefix(variant: str) -> str:
    return f"posttrain/{variant}"


def posttrain_done(variant: str) -> str:
    return f"{posttrain_prefix(variant)}/done.json"


def checkpoint_meta(prefix: str) -> str:
    """A training checkpoint's JSON half (step, tied weights, ...) under ``prefix``."""
    return f"{prefix}/checkpoint.json"


def checkpoint_weights(prefix: str) -> str:
    """A training checkpoint's tensors (model and optimiser state) under ``prefix``."""
    return f"{prefix}/checkpoint.safetensors"


RESULT = "result"
EXPORT_DONE = f"{RESULT}/export.json"
MODEL_DIR = f"{RESULT}/model"
GGUF_DIR = f"{RESULT}/gguf"


def gguf_file(gguf_type: str) -> str:
    """The GGUF export of one tensor type (``export.gguf_type``)."""
    return f"{GGUF_DIR}/model-{gguf_type}.gguf"


CONFIG_JSON = f"{RESULT}/config.json"
CONFIG_TXT = f"{RESULT}/config.txt"
SUMMARY = f"{RESULT}/summary.json"
REPORT = f"{RESULT}/report.md"
FITNESS_PLOT = f"{RESULT}/fitness.png"


OUTPUT_ONLY_FIELDS = {"export": ("formats", "gguf_type", "gguf_tokenizer")}
"""Fields that choose only which files the export writes, not what the search computes: they may change
between runs of one search (adding ``gguf`` to a finished search writes just the GGUF file)."""


def _comparable(doc: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(doc)
    for section, keys in OUTPUT_ONLY_FIELDS.items():
        if isinstance(out.get(section), Mapping):
            out[section] = {k: v for k, v in out[section].items() if k not in keys}
    return out


def spec_drift(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Top-level fields in which ``current`` (a spec as plain data) differs from the ``spec.json`` a search
    was started with, sorted. ``store`` may differ: the same search can be reached through another URI; so
    may the :data:`OUTPUT_ONLY_FIELDS`."""
    saved, current = _comparable(saved), _comparable(current)
    return sorted(k for k in set(saved) | set(current) if k != "store" and saved.get(k) != current.get(k))


# ------------------------------------------------------------------------------ recomputable artifacts
# The keys whose corruption run/repair.py can undo by deleting them (and what depends on them) so that
# the plan computes them again: a generation's state or a candidate result, a post-training checkpoint,
# a layer of a database.
GENERATION_ARTIFACT = re.compile(r"generations/\d{5}/(state\.json|results/[^/]+\.json)")
CHECKPOINT_FILE = re.compile(r"(posttrain/[^/]+)/checkpoint\.(json|safetensors)")
DATABASE_LAYER_FILE = re.compile(r"databases/([^/]+)/layers/[^/]+\.safetensors")
