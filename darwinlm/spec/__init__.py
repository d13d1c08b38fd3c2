"""The spec: ``PruningSearchSpec``, one tree of frozen, typed dataclasses.

Why it exists: the CLI's YAML, the ``spec`` of the ``PruningSearch`` custom resource and the input of
every job are the same document, so one package parses, validates, serialises, hashes and documents it.

Modules (``darwinlm.spec`` re-exports the public names; the operator builds its own Kubernetes fields,
``darwinlm_operator.kspec``, on the same machinery):

* ``tree.py``: ``PruningSearchSpec`` and its sections, ``load_spec``, ``spec_to_dict``, ``spec_hash``,
  ``with_overrides``, ``field_doc`` and ``json_schema``;
* ``fields.py``: the generic machinery: ``SpecNode``, ``setting``/``Bounds`` metadata, conversion of plain
  data to dataclasses with every problem collected, validation, field docstrings;
* ``io.py``: YAML/JSON documents read strictly, manifests unwrapped, plain data edited by path;
* ``rules.py``: the rules that relate sections to each other;
* ``schema.py``: JSON Schema / OpenAPI v3 generated from the dataclasses;
* ``docs.py``: the README's spec reference table, generated from the schema.

No torch here (import-linter forbids it): the operator imports this package.
"""

from .fields import MISSING, Bounds, SpecNode, setting
from .io import read_document, set_path
from .tree import (
    API_VERSION,
    KIND,
    DatabaseSpec,
    DataSpec,
    EvaluationSpec,
    ExportSpec,
    FinetuneSpec,
    FitnessSpec,
    HeldoutSetSpec,
    LadderSpec,
    ModelSpec,
    PosttrainSpec,
    PruningSearchSpec,
    SearchSpec,
    SensitivitySpec,
    SourceSpec,
    StageSpec,
    TargetSpec,
    field_doc,
    json_schema,
    load_spec,
    spec_hash,
    spec_to_dict,
    with_overrides,
)

__all__ = [
    "API_VERSION", "KIND", "PruningSearchSpec", "ModelSpec", "DataSpec", "SourceSpec",
    "DatabaseSpec", "LadderSpec", "SearchSpec", "SensitivitySpec", "TargetSpec", "StageSpec", "FitnessSpec",
    "FinetuneSpec", "PosttrainSpec", "ExportSpec", "EvaluationSpec", "HeldoutSetSpec", "load_spec",
    "spec_to_dict", "spec_hash", "with_overrides", "field_doc", "json_schema",
    "SpecNode", "setting", "Bounds", "MISSING", "read_document", "set_path",
]
