"""core/v1 schemas of the podTemplate's pass-through objects (Volume, VolumeMount, Affinity), and
the check the operator's loader runs with them.

Why it exists: ``podTemplate.volumes``, ``.volumeMounts`` and ``.affinity`` are core/v1 objects the
operator merges into every job pod unchanged. With ``x-kubernetes-preserve-unknown-fields`` the API
server accepted any shape there (``claimName: 5``, ``readOnly: "yes"``) and the search failed only
later, when a Job was created. Their schemas are therefore GENERATED from the kubernetes client's
OpenAPI models (``openapi_types``/``attribute_map``; a field is required when its setter refuses
``None``), trimmed to what a search accepts (the volume sources of :data:`VOLUME_SOURCES`), and used
twice: the CRD embeds them (``crd._type_schema``), and :func:`problems` applies the same schema in
``load_psearch`` so that both layers reject the same manifests with the field path named.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Mapping
from typing import Any

from kubernetes.client import models

from darwinlm.spec import fields as sf

__all__ = ["KINDS", "VOLUME_SOURCES", "schema", "problems"]

KINDS = {"Volume": "V1Volume", "VolumeMount": "V1VolumeMount", "Affinity": "V1Affinity"}
VOLUME_SOURCES = ("persistentVolumeClaim", "emptyDir", "hostPath", "configMap", "secret", "nfs",
                  "csi", "projected", "downwardAPI", "image")
"""The volume sources a search may add: storage for models and data, configuration, projected
tokens. Cloud-provider in-tree sources (deprecated upstream) and ``ephemeral`` are not accepted."""
_TRIM = {"V1Volume": ("name", *VOLUME_SOURCES)}
_QUANTITY = r"^[+]?[0-9]+(\.[0-9]+)?([eE][0-9]+|[KMGTPE]i?|[munkMGTPE])?$"
_QUANTITY_FIELDS = {"sizeLimit", "divisor"}  # resource.Quantity in core/v1 (int or string)
_SCALARS = {"int": "integer", "bool": "boolean", "float": "number"}
_MAX_ITEMS, _MAX_LENGTH = 64, 4096


@functools.cache
def schema(kind: str) -> dict[str, Any]:
    """Structural OpenAPI v3 schema of the core/v1 ``kind`` (a key of :data:`KINDS`), trimmed.

    Callers get a shared object: copy it before changing it."""
    return _model(KINDS[kind])


def _model(name: str) -> dict[str, Any]:
    cls = getattr(models, name)
    keep = _TRIM.get(name)
    properties: dict[str, Any] = {}
    required = []
    for attr, type_name in cls.openapi_types.items():
        key = cls.attribute_map[attr]
        if keep is not None and key not in keep:
            continue
        properties[key] = {"description": _description(cls, attr), **_type(type_name, key)}
        if "must not be `None`" in inspect.getsource(getattr(cls, attr).fset):
            required.append(key)
    out: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        out["required"] = required
    return out


def _description(cls: type, attr: str) -> str:
    """The first sentence of the field's upstream description (the getter's docstring)."""
    doc = inspect.getdoc(getattr(cls, attr)) or ""
    paragraphs = [p for p in doc.split("\n\n") if p.strip()]
    text = paragraphs[1] if len(paragraphs) > 2 else ""
    text = " ".join(text.replace("# noqa: E501", "").split())
    first = re.split(r"(?<=[a-z0-9)])\. ", text, maxsplit=1)[0].rstrip(".")
    return f"{first}." if first else f"core/v1 {cls.__name__[2:]}.{cls.attribute_map[attr]}."


def _type(type_name: str, key: str) -> dict[str, Any]:
    # Sizes are bounded as everywhere in the spec (the API server estimates rule costs from them).
    if type_name.startswith("list["):
        return {"type": "array", "maxItems": _MAX_ITEMS, "items": _type(type_name[5:-1], key)}
    if type_name.startswith(("dict(", "dict[")):
        value = type_name[type_name.index(",") + 1:-1].strip()
        return {"type": "object", "maxProperties": _MAX_ITEMS, "additionalProperties": _type(value, key)}
    if key in _QUANTITY_FIELDS or type_name == "object":
        out: dict[str, Any] = {"anyOf": [{"type": "integer"}, {"type": "string"}],
                               "x-kubernetes-int-or-string": True}
        if key in _QUANTITY_FIELDS:
            out["pattern"] = _QUANTITY
        return out
    if type_name == "str":
        return {"type": "string", "maxLength": _MAX_LENGTH}
    if type_name in _SCALARS:
        return {"type": _SCALARS[type_name]}
    return _model(type_name)


# ----------------------------------------------------------------------------- the loader's check

def problems(value: Any, node: Mapping[str, Any], path: str) -> sf.Problems:
    """Every place where ``value`` does not fit the structural schema ``node``, as (path, message)."""
    if node.get("x-kubernetes-int-or-string"):
        return _int_or_string(value, node, path)
    expected = node.get("type")
    if not _is(value, expected):
        return [(path, f"expected {_name(expected)}, got {sf.kind_of(value)}")]
    out: sf.Problems = []
    size = len(value) if expected in ("array", "object", "string") else 0
    limit = node.get("maxItems", node.get("maxProperties", node.get("maxLength")))
    if limit is not None and size > limit:
        out.append((path, f"too long: {size} > {limit}"))
    if expected == "array":
        for i, item in enumerate(value):
            out += problems(item, node["items"], f"{path}[{i}]")
    elif expected == "object" and "properties" in node:
        sf.check_keys(value, node["properties"], path, out)
        for key in node.get("required", ()):
            if value.get(key) is None:
                out.append((sf.join(path, key), f"required field missing (expected "
                                                 f"{_name(node['properties'][key].get('type'))})"))
        for key, sub in node["properties"].items():
            if value.get(key) is not None:
                out += problems(value[key], sub, sf.join(path, key))
    elif expected == "object" and "additionalProperties" in node:
        for key, item in value.items():
            out += problems(item, node["additionalProperties"], f"{path}[{key!r}]")
    return out


def _int_or_string(value: Any, node: Mapping[str, Any], path: str) -> sf.Problems:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return [(path, f"expected an integer or a string, got {sf.kind_of(value)}")]
    if isinstance(value, str) and node.get("pattern") and not re.search(node["pattern"], value):
        return [(path, f"must be a quantity such as '10Gi' or '500m', got {value!r}")]
    return []


def _is(value: Any, expected: str | None) -> bool:
    if expected == "object":
        return isinstance(value, Mapping)
    if expected == "array":
        return isinstance(value, (list, tuple))
    if expected == "string":
        return isinstance(value, str)
    if expected == "boolean":
        return isinstance(value, bool)
    if expected == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if expected == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return True


def _name(expected: str | None) -> str:
    return {"object": "an object", "array": "an array", "integer": "an integer",
            "boolean": "a boolean", "number": "a number"}.get(expected or "", expected or "a value")
