"""JSON Schema / OpenAPI v3 generation from the spec dataclasses.

The schema is derived, never written by hand: types from the annotations, ``enum`` from
``Literal``, ``default`` from the field defaults, bounds from ``setting(...)`` metadata (the same
objects the validator uses) and ``description`` from the docstring under each field. Two dialects:

* plain JSON Schema (draft 2020-12): ``"type": [T, "null"]`` for optional fields, numeric
  ``exclusiveMinimum``, ``additionalProperties: false``;
* OpenAPI v3 as Kubernetes CRDs want it (structural schema): one ``type`` per node plus
  ``nullable: true``, boolean ``exclusiveMinimum``/``exclusiveMaximum`` next to ``minimum``/``maximum``,
  no ``$ref``, no ``additionalProperties`` (the API server prunes unknown fields instead).

Cross-field rules (stage schedule, pool sizes) are not expressible with these keywords; the
validator in ``darwinlm.spec`` enforces them.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Collection
from typing import Any, Literal

from darwinlm.spec.fields import (
    MISSING,
    Bounds,
    default_of,
    field_docs,
    strip_optional,
    to_plain,
    type_hints,
)

_SCALARS = {bool: "boolean", int: "integer", float: "number", str: "string"}
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def schema_for(cls: type, *, openapi: bool, exclude: Collection[str] = ()) -> dict[str, Any]:
    """The schema of dataclass ``cls``; the class docstring becomes the top-level description.

    ``exclude`` leaves top-level fields out (they must have defaults).
    """
    out = _object(cls, openapi, exclude)
    doc = inspect.getdoc(cls)
    if doc:
        out = {"description": doc, **out}
    if not openapi:
        out = {"$schema": JSON_SCHEMA_DIALECT, "title": cls.__name__, **out}
    return out


def _object(cls: type, openapi: bool, exclude: Collection[str] = ()) -> dict[str, Any]:
    docs, hints = field_docs(cls), type_hints(cls)
    properties, required = {}, []
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            assert default_of(f) is not MISSING, f"cannot leave out required field {f.name}"
            continue
        prop: dict[str, Any] = {}
        if docs.get(f.name):
            prop["description"] = docs[f.name]
        prop.update(_typed(hints[f.name], openapi))
        apply_bounds(prop, f.metadata.get("bounds"), openapi)
        if "items" in f.metadata:
            apply_bounds(prop["items"], f.metadata["items"], openapi)
        default = default_of(f)
        if default is MISSING:
            required.append(f.name)
        else:
            plain = _without_nulls(to_plain(default))
            if plain is not None:
                prop["default"] = plain
        properties[f.name] = prop
    out: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        out["required"] = required
    if not openapi:
        out["additionalProperties"] = False
    return out


def _typed(hint: Any, openapi: bool) -> dict[str, Any]:
    inner, optional = strip_optional(hint)
    out = plain_type(inner, openapi)
    if optional:
        if openapi:
            out["nullable"] = True
        else:
            out["type"] = [out["type"], "null"]
            if "enum" in out:
                out["enum"] = [*out["enum"], None]
    return out


def plain_type(hint: Any, openapi: bool) -> dict[str, Any]:
    if dataclasses.is_dataclass(hint):
        return _object(hint, openapi)
    origin = typing.get_origin(hint)
    if origin is Literal:
        options = list(typing.get_args(hint))
        kinds = {_SCALARS[type(o)] for o in options}
        assert len(kinds) == 1, f"mixed-type Literal not supported: {hint}"
        return {"type": kinds.pop(), "enum": options}
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return {"type": "array", "items": _typed(args[0], openapi)}
        assert len(set(args)) == 1, f"only homogeneous fixed tuples are supported: {hint}"
        return {"type": "array", "items": _typed(args[0], openapi),
                "minItems": len(args), "maxItems": len(args)}
    if hint in _SCALARS:
        return {"type": _SCALARS[hint]}
    raise TypeError(f"no schema for type {hint!r}")


def apply_bounds(out: dict[str, Any], b: Bounds | None, openapi: bool) -> None:
    if b is None:
        return
    assert b.ge is None or b.gt is None, "declare at most one lower bound"
    assert b.le is None or b.lt is None, "declare at most one upper bound"
    if b.ge is not None:
        out["minimum"] = b.ge
    if b.gt is not None:
        out.update({"minimum": b.gt, "exclusiveMinimum": True} if openapi
                   else {"exclusiveMinimum": b.gt})
    if b.le is not None:
        out["maximum"] = b.le
    if b.lt is not None:
        out.update({"maximum": b.lt, "exclusiveMaximum": True} if openapi
                   else {"exclusiveMaximum": b.lt})
    for attr, key in (("pattern", "pattern"), ("min_length", "minLength"),
                      ("max_length", "maxLength"), ("min_items", "minItems"),
                      ("max_items", "maxItems")):
        if getattr(b, attr) is not None:
            out[key] = getattr(b, attr)


def _without_nulls(value: Any) -> Any:
    """Defaults without null members: Kubernetes prunes nulls before defaulting anyway."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value
