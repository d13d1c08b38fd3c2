"""The one configuration tree of a DarwinLM search: ``PruningSearchSpec``.

Why it exists: the CLI's YAML, the ``spec`` of the ``PruningSearch`` custom resource and the input
of every job are the same document, so they must be parsed, validated, serialised and hashed by one
piece of code. Every setting is a field of a frozen dataclass with a docstring under it (units,
default, why); those docstrings become the ``description``s of the generated JSON Schema and CRD.

* :func:`load_spec` reads a YAML/JSON file or a mapping (bare spec or whole manifest) and reports
  *every* problem at once in one :class:`~darwinlm.errors.SpecError` (paths like
  ``search.selection[1].survivors``).
* A ``PruningSearchSpec`` instance is always valid: its ``__post_init__`` checks the whole tree, so
  ``dataclasses.replace`` and :func:`with_overrides` cannot produce a bad one either.
* :func:`spec_hash` content-addresses a spec or some of its sections (e.g. the database key).

No torch here: the operator imports this module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Collection, Iterable, Mapping
from typing import Any, Literal

from darwinlm.errors import SpecError
from darwinlm.spec import fields as sf
from darwinlm.spec.fields import SpecNode, setting
from darwinlm.spec.io import read_document, set_path, unwrap_manifest
from darwinlm.spec.rules import cross_section_problems
from darwinlm.spec.schema import schema_for

__all__ = [
    "API_VERSION", "KIND", "PruningSearchSpec", "ModelSpec", "DataSpec", "SourceSpec",
    "DatabaseSpec", "LadderSpec", "SearchSpec", "SensitivitySpec", "TargetSpec", "StageSpec", "FitnessSpec",
    "FinetuneSpec", "PosttrainSpec", "ExportSpec", "EvaluationSpec", "HeldoutSetSpec", "load_spec",
    "spec_to_dict", "spec_hash", "with_overrides", "field_doc", "json_schema",
]

API_VERSION = "darwinlm.io/v1alpha1"
KIND = "PruningSearch"

Dtype = Literal["float32", "bfloat16", "float16"]
_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_STORE_URI = r"^(file://.+|s3://[^/]+(/.*)?)$"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSpec(SpecNode):
    """The dense model to prune."""

    path: str = setting(min_length=1)
    """Local Hugging Face model directory or hub id (required). '~' is expanded by the loaders."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to pin; null = the default branch / the local files."""
    dtype: Dtype = "float32"
    """Dtype of the weights and optimiser master weights. float32 by default: a bf16 AdamW step at
    lr 1e-5 is below half an ulp of typical weights and rounds away (ALGORITHM.md §3.9)."""
    compute_dtype: Dtype = "bfloat16"
    """Autocast dtype of forward and backward passes (activations); weights stay in `dtype`."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to run: auto = cuda when available, else cpu."""
    threads: int | None = setting(None, ge=1)
    """CPU threads per worker for torch (null = torch's default). Fix it for bit-identical results
    across different worker counts: float reductions depend on the thread count."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SourceSpec(SpecNode):
    """Where documents come from."""

    path: str = setting(min_length=1)
    """Local file, directory or glob, or a hub dataset id (format 'hub', online only). Required."""
    format: Literal["text", "json", "parquet", "hub"] = "text"
    """text = one document per .txt/.md file; json = JSON or JSON-lines records; parquet = rows;
    hub = a Hugging Face hub dataset (online only)."""
    text_field: str = setting("text", min_length=1)
    """Column / key holding the document text (json, parquet, hub)."""
    split: str = setting("train", min_length=1)
    """Dataset split to read (hub only; local files are read whole)."""
    subset: str | None = None
    """Hub configuration name, e.g. 'sample-10BT' for FineWeb-Edu; null = the default one."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSpec(SpecNode):
    """Documents and the token budgets of the three disjoint pools cut from them."""

    train: SourceSpec
    """Documents split by content hash into the disjoint calibration and fine-tune pools (required)."""
    heldout: SourceSpec | None = None
    """Held-out evaluation documents; null = a third hash bucket of `train` is held out."""
    seq_len: int = setting(512, ge=2)
    """Tokens per sample. Longer documents are cut into seq_len chunks; no packing of short ones.
    Keep it within the model's context. At least 2: next-token loss needs two positions."""
    calibration_fraction: float = setting(0.5, gt=0.0, lt=1.0)
    """Share of train documents (by content hash) in the calibration pool; the rest fine-tunes."""
    calibration_tokens: int = setting(65536, ge=1)
    """Size of the calibration pool in tokens: Hessians of the database and fitness minibatches
    are drawn from it (paper script: 100,000)."""
    finetune_tokens: int = setting(262144, ge=1)
    """Size of the fine-tune pool in tokens: training minibatches of every selection stage are
    drawn from it (paper script: 500,000)."""
    heldout_tokens: int = setting(16384, ge=1)
    """Size of the held-out pool in tokens, used for evaluation only, never for selection."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class LadderSpec(SpecNode):
    """The levels of one module type: how much of it each database level removes (nested)."""

    levels: int | None = setting(None, ge=2)
    """Number of levels including level 0 (dense), with evenly spaced removed fractions from 0 to
    1. Set at most one of `levels` and `fractions`; neither = one level per `granularity` units
    ('auto', e.g. one level per attention head)."""
    fractions: tuple[float, ...] | None = setting(None, min_items=2, items=sf.Bounds(ge=0.0, le=1.0))
    """Explicit removed fraction per level: first 0.0, strictly increasing, at most 1.0."""
    granularity: int = setting(1, ge=1)
    """Removed units per level are rounded to multiples of this (attention: heads, mlp: channels;
    the paper uses 32 MLP channels)."""

    def _problems(self) -> sf.Problems:
        out = []
        if self.levels is not None and self.fractions is not None:
            out.append(("", "set at most one of 'levels' and 'fractions'"))
        fr = self.fractions or ()
        if fr and fr[0] != 0.0:
            out.append(("fractions[0]", f"must be 0.0 (level 0 is the dense layer), got {fr[0]!r}"))
        out += [(f"fractions[{i}]", f"must be greater than the previous fraction {fr[i - 1]!r}, "
                 f"got {fr[i]!r}") for i in range(1, len(fr)) if fr[i] <= fr[i - 1]]
        return out

    def last_level(self) -> int | None:
        """Index of the highest level, or None when it depends on the model ('auto')."""
        if self.levels is not None:
            return self.levels - 1
        return len(self.fractions) - 1 if self.fractions is not None else None


@dataclasses.dataclass(frozen=True, kw_only=True)
class DatabaseSpec(SpecNode):
    """The layer database: compensated weights of every layer at every level (ZipLM/OBS)."""

    attention: LadderSpec = setting(factory=LadderSpec)
    """Ladder of o_proj (attention heads, granularity in heads). Default: one level per head."""
    mlp: LadderSpec = setting(factory=lambda: LadderSpec(levels=11, granularity=32))
    """Ladder of down_proj (MLP channels). Default: 11 levels (0..10) in steps of 10%, rounded
    to 32 channels, as in the paper."""
    damping: float = setting(0.01, ge=0.0)
    """Relative dampening λ: λ·mean(diag H) is added to the Hessian diagonal before inversion."""
    calibration_tokens: int = setting(32768, ge=1)
    """Tokens of the calibration pool used to accumulate Hessians (<= data.calibration_tokens)."""
    dtype: Dtype = "float16"
    """Storage dtype of the compensated weights (Hessians are always accumulated in float32)."""
    shards: int = setting(1, ge=1)
    """The database is built in this many shards of contiguous block ranges (parallel jobs)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TargetSpec(SpecNode):
    """How much to prune; exactly one of the fields is set."""

    mean_level: float | None = setting(None, gt=0.0)
    """Mean database level per module group (the level budget is len(group)·mean_level; paper: 5
    on 0..10). A non-integer value rounds each group's level sum (halves up)."""
    fraction: float | None = setting(None, gt=0.0, lt=1.0)
    """Fraction of the prunable parameters (attention + MLP) to remove, in (0, 1)."""

    def _problems(self) -> sf.Problems:
        if (self.mean_level is None) == (self.fraction is None):
            return [("", "set exactly one of 'mean_level' and 'fraction'")]
        return []


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageSpec(SpecNode):
    """One step of training-aware selection: fine-tune every candidate, score, keep the best."""

    survivors: int = setting(ge=1)
    """Candidates kept after this stage (required). Non-increasing over stages; the last is 1."""
    fitness_tokens: int = setting(ge=1)
    """Calibration tokens each candidate is scored on (required; shared by all candidates)."""
    finetune_tokens: int = setting(ge=0)
    """Fine-tune tokens each candidate trains on before scoring (required; 0 = no training)."""


def _paper_schedule() -> tuple[StageSpec, ...]:
    return tuple(StageSpec(survivors=s, fitness_tokens=f, finetune_tokens=t) for s, f, t in
                 ((8, 1024, 10_000), (4, 2048, 50_000), (2, 4096, 100_000), (1, 8192, 200_000)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class FitnessSpec(SpecNode):
    """How a candidate is scored (lower is better)."""

    kind: Literal["kl", "topk_kl", "ppl"] = "kl"
    """kl = KL(dense ‖ candidate) over the full vocabulary; topk_kl = over the dense model's top-k
    tokens (less memory for cached teacher logits); ppl = perplexity of the candidate."""
    topk: int = setting(512, ge=1)
    """k of topk_kl. EvoPress found top-k KL to track full KL only for k >= 512."""
    exclude_database_tokens: bool = True
    """Draw fitness, tracking and initial-genome batches only from calibration tokens the layer database
    did not use for its Hessians (the pool after the first database.calibration_tokens). The OBS
    compensation is fitted to those tokens, so a pruned model looks better on them than on new text, by
    how much differs per layer, and selection on them favours what generalises worst (on SmolLM2 the
    uniform model's KL is about half on Hessian tokens of what it is on held-out text). false = the whole
    calibration pool, as the reference code does (there the database's 8M tokens dwarf the fitness ones)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneSpec(SpecNode):
    """The short fine-tuning of each candidate inside a selection stage (from scratch per stage)."""

    optimizer: Literal["adamw", "sgd"] = "adamw"
    """Optimiser; the paper uses AdamW with constant learning rate, no warmup, no clipping."""
    lr: float = setting(1e-5, gt=0.0)
    """Learning rate (constant)."""
    weight_decay: float = setting(0.0, ge=0.0)
    """Decoupled weight decay (AdamW) or L2 (SGD)."""
    betas: tuple[float, float] = setting((0.9, 0.999), items=sf.Bounds(ge=0.0, lt=1.0))
    """AdamW (beta1, beta2); beta1 is SGD's momentum."""
    batch_size: int = setting(1, ge=1)
    """Documents per optimiser step (paper: 1, variable length)."""
    mode: Literal["shrink", "mask", "unmasked"] = "shrink"
    """shrink = physically remove pruned heads/channels before fine-tuning (faster, faithful);
    mask = keep dense shapes and mask gradients so pruned structures stay exactly zero;
    unmasked = the reference code's behaviour (zeroed columns receive updates and revive), for
    ablations only."""
    warm_start: bool = False
    """false = every stage fine-tunes each candidate from its pruned weights on that stage's tokens
    (the reference). true = incremental: a survivor continues from its previous stage's fine-tuned
    weights and trains only on the new tokens (finetune_tokens of this stage minus the previous
    stage's), so the model scored has seen the same token count for less compute."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SensitivitySpec(SpecNode):
    """The per-layer sensitivity table behind ``search.init: sensitivity``."""

    tokens: int = setting(512, ge=2)
    """Calibration tokens every (layer, level) is scored on: the one-shot KL to the dense model when only
    that layer is pruned to that level. Taken from the end of the calibration pool, so they are disjoint
    from the database's Hessian tokens when the pool holds both."""
    dtype: Dtype = "float32"
    """Compute dtype of the measurement. float32 by default: in bfloat16 every entry carries a rounding
    floor of ~0.003 KL with a spread of ~0.001, as large as the differences between the cheap levels
    that the starting genome is chosen from (on SmolLM2 the bf16 table's genome was 9% worse)."""
    shards: int = setting(1, ge=1)
    """The table is measured in this many shards of contiguous block ranges (parallel jobs)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SearchSpec(SpecNode):
    """The (1+λ) evolutionary search with training-aware multi-stage selection."""

    target: TargetSpec
    """The compression target (required)."""
    generations: int = setting(50, ge=0)
    """Number of generations (paper: 200). 0 = keep the initial genome."""
    offspring: int = setting(16, ge=1)
    """Offspring mutated from the parent per generation (λ; paper: 16)."""
    max_flips: int = setting(3, ge=1)
    """Level switches per mutation are min(U{1..max_flips}, U{1..max_flips}): small moves are likely."""
    selection: tuple[StageSpec, ...] = setting(factory=_paper_schedule, min_items=1)
    """Selection stages, in order. Default: the paper's 8/4/2/1 survivors on 1024/2048/4096/8192
    fitness tokens after 10K/50K/100K/200K fine-tune tokens. The parent joins the last stage."""
    fitness: FitnessSpec = setting(factory=FitnessSpec)
    """How candidates are scored."""
    finetune: FinetuneSpec = setting(factory=FinetuneSpec)
    """How candidates are fine-tuned inside the stages."""
    init: Literal["even", "random", "sensitivity"] = "sensitivity"
    """Generation 0's parent. sensitivity = the genome whose summed per-layer sensitivity (one-shot KL
    to the dense model with only that layer pruned, see `sensitivity`) is lowest under each group's
    level sum, by dynamic programming; even = the most even spread of levels (the paper, the uniform
    baseline); random = the best of `initially_generated` random feasible genomes (EvoPress)."""
    sensitivity: SensitivitySpec = setting(factory=SensitivitySpec)
    """How the sensitivity table is measured (init: sensitivity). It is stored next to the layer
    database and shared by every search on that database with the same settings."""
    initially_generated: int = setting(0, ge=0)
    """init: random: how many random feasible genomes are scored before generation 0; the best
    becomes the first parent (EvoPress initialisation). Must be >= 1 with init: random."""
    initial_tokens: int = setting(2048, ge=1)
    """Calibration tokens each initial genome is scored on (init: random)."""
    patience: int | None = setting(None, ge=1)
    """Stop after this many consecutive generations in which the parent survived (no better genome
    found); null = always run all `generations`, which then is a ceiling rather than a cost. The
    decision is recorded in the store, so a resumed search stops at the same generation."""
    tracking_tokens: int = setting(2048, ge=0)
    """Tokens of one fixed batch of the calibration pool on which every generation's winner is scored
    one-shot (no fine-tuning), and the uniform genome once: the search curve of the report, the
    progress bar and the best-fitness metric, on one comparable scale. Selection still uses fresh
    batches. 0 = no tracking."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PosttrainSpec(SpecNode):
    """Training of the chosen pruned model after the search (recovers quality)."""

    enabled: bool = True
    """Run post-training; false = export the searched model as is."""
    tokens: int = setting(65536, ge=1)
    """Training tokens (paper: 10B for 7-8B models; set what your budget allows)."""
    lr: float = setting(1e-4, gt=0.0)
    """Peak learning rate: linear warm-up over warmup_steps, then cosine decay to 10% of the peak."""
    warmup_steps: int = setting(2, ge=0)
    """Optimiser steps of linear learning-rate warmup."""
    batch_size: int = setting(1, ge=1)
    """Documents per optimiser step."""
    distill: float = setting(0.0, ge=0.0, le=1.0)
    """Weight of KL to the dense model in the loss: 0 = pure LM loss, 1 = pure distillation."""
    temperature: float = setting(1.0, gt=0.0)
    """Softmax temperature of the distillation term."""
    checkpoint_every: int = setting(50, ge=1)
    """Optimiser steps between resumable checkpoints written to the store."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExportSpec(SpecNode):
    """The exported, physically shrunk model: a Hugging Face directory and/or a GGUF file for llama.cpp."""

    dtype: Dtype = "float32"
    """Dtype of the exported Hugging Face weights (the GGUF file has its own `gguf_type`)."""
    formats: tuple[Literal["hf", "gguf"], ...] = setting(("hf",), min_items=1, max_items=2)
    """What the export writes: hf = result/model/ (safetensors, loads with stock transformers after
    `import darwinlm`); gguf = result/gguf/model-<gguf_type>.gguf, llama.cpp's `deci` architecture
    (per-layer head counts and MLP widths; runs in llama.cpp, Ollama, LM Studio). Adding a format to a
    finished search writes only the missing one: these fields never count as a changed spec."""
    gguf_type: Literal["f32", "f16", "bf16", "q8_0"] = "f16"
    """Tensor type of the GGUF file's matrices (norms stay f32): f16 or bf16 (lossless for the search's
    result up to rounding), q8_0 (8-bit blocks of 32, about half of f16's size), f32. A matrix whose rows
    are not a multiple of 32 values is stored f16 in a q8_0 file."""
    gguf_tokenizer: str | None = None
    """GGUF file whose tokenizer and chat template the export carries over; null = the GGUF the model
    was provisioned from (darwinlm provision), else a `*.gguf` in model.path, else the model's
    tokenizer.json (byte-level BPE). '~' is expanded."""

    def _problems(self) -> sf.Problems:
        return [(f"formats[{i}]", f"duplicate format {f!r}")
                for i, f in enumerate(self.formats) if f in self.formats[:i]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class HeldoutSetSpec(SpecNode):
    """A further held-out text the result is evaluated on (never used for selection or training)."""

    name: str = setting(pattern=_DNS_LABEL, max_length=63, message=(
        "must be a DNS-1123 label (lowercase letters, digits and '-', alphanumeric at both ends)"))
    """Its name in the report (required), e.g. python-docs."""
    source: SourceSpec
    """Where its documents come from (required)."""
    tokens: int = setting(8192, ge=2)
    """Tokens evaluated (whole documents in a fixed order, cut into data.seq_len chunks)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvaluationSpec(SpecNode):
    """Final evaluation of the result on held-out documents."""

    heldout_tokens: int | None = setting(None, ge=1)
    """Held-out tokens to evaluate on; null = all of data.heldout_tokens."""
    extra_heldout: tuple[HeldoutSetSpec, ...] = ()
    """Further held-out texts, e.g. another domain, so a gain over uniform is not an artefact of one
    corpus. Each is reported like the main held-out set, with its own confidence intervals."""
    bootstrap: int = setting(2000, ge=0)
    """Resamples of the paired bootstrap over held-out chunks behind the confidence intervals of
    searched / uniform perplexity ratios (95%); 0 = no intervals."""
    baselines: tuple[Literal["dense", "uniform"], ...] = ("dense", "uniform")
    """Models evaluated next to the result: the dense model and the uniform level assignment."""

    def _problems(self) -> sf.Problems:
        out = [(f"baselines[{i}]", f"duplicate baseline {b!r}")
               for i, b in enumerate(self.baselines) if b in self.baselines[:i]]
        names = [h.name for h in self.extra_heldout]
        out += [(f"extra_heldout[{i}].name", "'heldout' names data.heldout; choose another name" if n == "heldout"
                 else f"duplicate name {n!r}") for i, n in enumerate(names) if n in names[:i] or n == "heldout"]
        return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class PruningSearchSpec(SpecNode):
    """A DarwinLM search: model, data, layer database, evolutionary search, post-training, export."""

    name: str = setting("search", pattern=_DNS_LABEL, max_length=63, message=(
        "must be a DNS-1123 label (lowercase letters, digits and '-', alphanumeric at both ends)"))
    """Name of the search (DNS-1123 label, at most 63 characters); it names the artifacts and
    the Kubernetes Jobs. Taken from metadata.name when a PruningSearch manifest is loaded."""
    seed: int = setting(0, ge=0)
    """Root seed: every random choice derives from (seed, generation, stage, candidate)."""
    store: str = setting("file://./runs", pattern=_STORE_URI,
                         message="must be a file://PATH or s3://BUCKET[/PREFIX] URI")
    """Root URI of the artifact store (file://PATH or s3://bucket/prefix); databases are shared
    below it by content hash, searches are kept by name."""
    model: ModelSpec
    """The dense model (required)."""
    data: DataSpec
    """Documents and pool sizes (required)."""
    database: DatabaseSpec = setting(factory=DatabaseSpec)
    """Level ladders and how the layer database is built."""
    search: SearchSpec
    """The evolutionary search (required: at least search.target)."""
    posttrain: PosttrainSpec = setting(factory=PosttrainSpec)
    """Post-training of the chosen model."""
    export: ExportSpec = setting(factory=ExportSpec)
    """Export of the result: a Hugging Face model directory and/or a GGUF file for llama.cpp."""
    evaluation: EvaluationSpec = setting(factory=EvaluationSpec)
    """Final evaluation."""

    def __post_init__(self) -> None:
        super().__post_init__()
        errors: sf.Problems = []
        sf.check_tree(self, "", errors)
        if errors:
            raise SpecError(errors)

    def _problems(self) -> sf.Problems:
        return cross_section_problems(self)


# ----------------------------------------------------------------------------- public helpers

def load_spec(source: str | os.PathLike[str] | Mapping[str, Any], *,
              extra_allowed: Collection[str] = frozenset()) -> PruningSearchSpec:
    """Read and validate a spec from a YAML/JSON file path or a mapping.

    Accepts a bare spec or a whole ``PruningSearch`` manifest (then ``metadata.name`` is the name).
    Top-level spec keys in ``extra_allowed`` (fields the operator adds, e.g. ``image``) are
    ignored. Raises one ``SpecError`` listing every problem.
    """
    data = source if isinstance(source, Mapping) else read_document(source)
    if not isinstance(data, Mapping):
        raise SpecError(f"a spec must be a mapping, got {type(data).__name__}")
    data, manifest_name = unwrap_manifest(data, api_version=API_VERSION, kind=KIND)
    if manifest_name is not None:
        if "name" in data and data["name"] != manifest_name:
            raise SpecError([("name", f"{data['name']!r} differs from metadata.name "
                                      f"{manifest_name!r}; leave it out")])
        data = {**data, "name": manifest_name}
    errors: sf.Problems = []
    spec = sf.from_mapping(PruningSearchSpec, data, "", errors, ignore=frozenset(extra_allowed))
    if errors:
        if manifest_name is not None:
            errors = [("metadata.name" if p == "name" else p, m) for p, m in errors]
        raise SpecError(errors)
    return spec


def spec_to_dict(spec: PruningSearchSpec) -> dict[str, Any]:
    """The spec as JSON-ready plain data (every field, nulls included); ``load_spec`` reads it back."""
    return sf.to_plain(spec)


def spec_hash(spec: PruningSearchSpec, *, fields: Iterable[str] | None = None) -> str:
    """sha256 (hex) of the canonical JSON of the spec, or of some top-level sections only.

    ``spec_hash(s, fields=("model", "data", "database"))`` keys a layer database: two searches
    that differ only in their search settings share it.
    """
    plain = spec_to_dict(spec)
    if fields is not None:
        fields = (fields,) if isinstance(fields, str) else tuple(fields)
        unknown = [f for f in fields if f not in plain]
        if unknown:
            raise ValueError(f"unknown spec section(s) {unknown}; known: {list(plain)}")
        plain = {f: plain[f] for f in fields}
    text = json.dumps(plain, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def with_overrides(spec: PruningSearchSpec, /, **dotted: Any) -> PruningSearchSpec:
    """A new, validated spec with fields replaced by dotted path.

    ``with_overrides(s, store="s3://b/x", search__generations=3)`` or
    ``with_overrides(s, **{"search.selection[0].survivors": 4})``; ``__`` stands for ``.``.
    """
    data = spec_to_dict(spec)
    for key, value in dotted.items():
        parts = re.sub(r"\[(\d+)\]", r".\1", key.replace("__", ".")).split(".")
        set_path(data, parts, sf.to_plain(value))
    return load_spec(data)


def field_doc(path: str) -> str:
    """The docstring under the field at ``path`` (indices are ignored), e.g. ``data.seq_len``."""
    cls, name = sf.resolve(PruningSearchSpec, path)
    return sf.field_docs(cls).get(name, "")


def json_schema(*, openapi: bool = False) -> dict[str, Any]:
    """The schema of the spec, generated from the dataclasses.

    Default: JSON Schema (draft 2020-12) of a bare spec, as the CLI reads it. ``openapi=True``: the
    OpenAPI v3 structural schema of a ``PruningSearch`` manifest's ``spec`` (a CRD's
    ``openAPIV3Schema.properties.spec``); it leaves out ``name``, which is ``metadata.name`` there
    (a defaulted ``spec.name`` would contradict it).
    """
    return schema_for(PruningSearchSpec, openapi=openapi, exclude=("name",) if openapi else ())
