"""Spec documents as plain data: reading YAML/JSON files and manifests strictly, editing by path.

The CLI, the jobs and the operator read the same files, so the rules live here once:

* YAML is read as YAML 1.2 reads numbers, so ``lr: 1e-5`` is a float (PyYAML's YAML 1.1 resolver
  would make it the string ``"1e-5"`` and the user would get a confusing type error);
* a key written twice in one mapping is an error (PyYAML and ``json`` silently keep the last);
* a ``PruningSearch`` manifest is unwrapped to its ``spec``; ``metadata.name`` becomes the name;
* overrides (``search.selection.0.survivors``) edit the plain document, which is then re-validated; on the
  command line they are ``KEY=VALUE`` with a YAML value (:func:`parse_override`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import yaml

from darwinlm.errors import SpecError


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats and duplicate-key detection."""

    def construct_mapping(self, node, deep=False):  # noqa: ANN001 - PyYAML's signature
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# YAML 1.2 core schema floats: "1e-5" and "1E5" without a dot are numbers too.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"found duplicate key {key!r}")
        out[key] = value
    return out


def read_document(path: str | os.PathLike[str]) -> Any:
    """Parse one YAML (or, for ``*.json``, JSON) document; any failure is a ``SpecError``."""
    path = os.fspath(path)
    if "\n" in path or not os.path.isfile(path):
        what = "a YAML text" if "\n" in path else f"{path!r}"
        raise SpecError(f"spec source must be a path to an existing YAML/JSON file or a mapping; "
                        f"got {what}")
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as e:
        raise SpecError(f"cannot read {path}: {e}") from e
    try:
        if path.endswith(".json"):
            return json.loads(text, object_pairs_hook=_no_duplicates)
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except (yaml.YAMLError, ValueError) as e:
        raise SpecError(f"cannot parse {path}: {e}") from e


def unwrap_manifest(data: Mapping, *, api_version: str, kind: str
                    ) -> tuple[Any, str | None]:
    """``(spec_mapping, metadata.name)`` for a manifest; ``(data, None)`` for a bare spec.

    A mapping is a manifest when it has ``apiVersion`` or ``kind``. ``status`` (as printed by
    ``kubectl get -o yaml``) and metadata other than ``name`` are ignored.
    """
    if "apiVersion" not in data and "kind" not in data:
        return data, None
    errors = []
    if data.get("apiVersion") != api_version:
        errors.append(("apiVersion", f"must be {api_version!r}, got {data.get('apiVersion')!r}"))
    if data.get("kind") != kind:
        errors.append(("kind", f"must be {kind!r}, got {data.get('kind')!r}"))
    for key in data:
        if key not in ("apiVersion", "kind", "metadata", "spec", "status"):
            errors.append((str(key), f"unknown manifest field {key!r}"))
    metadata = data.get("metadata")
    name = metadata.get("name") if isinstance(metadata, Mapping) else None
    if not isinstance(name, str):
        errors.append(("metadata.name", "a PruningSearch manifest needs metadata.name (a string)"))
    spec = data.get("spec")
    if not isinstance(spec, Mapping):
        errors.append(("spec", "a PruningSearch manifest needs a 'spec' object"))
    if errors:
        raise SpecError(errors)
    return spec, name


def set_path(data: dict[str, Any], parts: list[str], value: Any) -> None:
    """Set ``data[p0][p1]...`` = value (int parts index lists); missing or null objects are created."""
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            key: Any = int(part)
        elif isinstance(node, dict):
            key = part
            if not last and node.get(part) is None:
                node[part] = {}
        else:
            raise SpecError([(".".join(parts[:i]), f"cannot set {'.'.join(parts)!r}: "
                                                   f"not an object or no such index")])
        if last:
            node[key] = value
        else:
            node = node[key]


def parse_override(text: str) -> tuple[str, Any]:
    """``"search.generations=3"`` -> ``("search.generations", 3)``: a dotted field path (indices as
    ``selection[0]``) and a value read as YAML, the way the spec file reads it: ``3`` is an int, ``1e-5`` a
    float, ``null`` None, ``[a, b]`` a list, a plain word a string. ``ValueError`` names what is wrong."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"expected KEY=VALUE with a dotted field path, e.g. search.generations=3; got {text!r}")
    try:
        value = yaml.load(raw, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as e:
        raise ValueError(f"{key}: cannot read {raw!r} as a YAML value: {e}") from None
    return key, value
