"""Generic machinery behind ``darwinlm.spec``: typed conversion, bounds and field docstrings.

The spec is a tree of frozen dataclasses. This module knows nothing about pruning; it turns plain
mappings (parsed YAML/JSON) into such a tree, collecting every problem as ``(field_path, message)``
instead of stopping at the first, and it reads the docstring written under each field so that the
JSON Schema / CRD can carry the same text users read in the source. Bounds are declared once per
field with :func:`setting` and used both here (validation) and by ``_spec_schema`` (schema).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import math
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

from darwinlm.errors import SpecError

Problems = list[tuple[str, str]]
INVALID = object()  # returned by the converters for a value that produced an error
MISSING = dataclasses.MISSING

_JSON_NAMES = {bool: "boolean", int: "integer", float: "number", str: "string", type(None): "null"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Bounds:
    """Simple per-value constraints; each maps 1:1 onto a JSON Schema / OpenAPI keyword."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    pattern: str | None = None  # searched like JSON Schema does; anchor it with ^...$
    min_length: int | None = None
    max_length: int | None = None
    min_items: int | None = None
    max_items: int | None = None
    message: str | None = None  # replaces the generic pattern message, which users cannot read


def setting(default: Any = MISSING, *, factory: Any = MISSING, items: Bounds | None = None,
            **bounds: Any) -> Any:
    """A dataclass field with its bounds in ``metadata`` (the single place they are declared)."""
    meta = {"bounds": Bounds(**bounds)} if bounds else {}
    if items is not None:
        meta["items"] = items
    return dataclasses.field(default=default, default_factory=factory, metadata=meta)


class SpecNode:
    """Base of every spec dataclass: canonicalises values given from Python.

    Lists become tuples (the tree stays immutable and hashable) and ints given for float fields
    become floats (so ``lr=1`` and ``lr=1.0`` serialise, and hash, the same).
    """

    def __post_init__(self) -> None:
        hints = type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            fixed = _canonical(value, hints[f.name])
            if fixed is not value:
                object.__setattr__(self, f.name, fixed)

    def _problems(self) -> Problems:
        """Rules across fields of this node, as ``(relative_path, message)``; types already hold."""
        return []


def _canonical(value: Any, hint: Any) -> Any:
    hint = strip_optional(hint)[0]
    if hint is float and type(value) is int:
        return float(value)
    if typing.get_origin(hint) is tuple and isinstance(value, (list, tuple)):
        item_hints = _item_hints(hint, len(value))
        if item_hints is not None:
            out = tuple(_canonical(v, h) for v, h in zip(value, item_hints))
            same = type(value) is tuple and all(a is b for a, b in zip(out, value))
            return value if same else out
    return value


# ----------------------------------------------------------------------------- type introspection

@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def strip_optional(hint: Any) -> tuple[Any, bool]:
    """``X | None`` -> ``(X, True)``; anything else -> ``(hint, False)``."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != len(typing.get_args(hint)):
            assert len(args) == 1, f"only X | None unions are supported, got {hint}"
            return args[0], True
    return hint, False


def _item_hints(hint: Any, n: int) -> list[Any] | None:
    """Element hints of a tuple hint for ``n`` elements; None when the length is wrong."""
    args = typing.get_args(hint)
    if len(args) == 2 and args[1] is Ellipsis:
        return [args[0]] * n
    return list(args) if len(args) == n else None


def describe(hint: Any) -> str:
    """The type as users of the YAML see it, e.g. ``integer``, ``array of number``."""
    inner, optional = strip_optional(hint)
    if dataclasses.is_dataclass(inner):
        text = "object"
    elif typing.get_origin(inner) is Literal:
        text = "one of " + ", ".join(repr(a) for a in typing.get_args(inner))
    elif typing.get_origin(inner) is tuple:
        text = "array of " + describe(typing.get_args(inner)[0])
    else:
        text = _JSON_NAMES.get(inner, getattr(inner, "__name__", str(inner)))
    return text + " or null" if optional else text


def kind_of(value: Any) -> str:
    """The JSON name of ``value``'s type for error messages: object, array, string, integer, ..."""
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, (list, tuple)):
        return "array"
    return _JSON_NAMES.get(type(value), type(value).__name__)


# ----------------------------------------------------------------------------- paths and messages

def join(path: str, name: str) -> str:
    """``join("data", "train")`` -> ``data.train``; relative names may start with ``[i]``."""
    if not path:
        return name
    if not name:
        return path
    return path + name if name.startswith("[") else f"{path}.{name}"


def did_you_mean(word: str, choices: typing.Iterable[str]) -> str:
    choices = list(choices)
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if not close:
        close = [c for c in choices if c.lower() == str(word).lower()]
    return f" (did you mean {close[0]!r}?)" if close else ""


def _num(x: float) -> str:
    return f"{x:g}"


# ----------------------------------------------------------------------------- conversion

def convert(value: Any, hint: Any, path: str, errors: Problems) -> Any:
    """Check ``value`` against ``hint`` strictly and return its canonical form, or ``INVALID``.

    bool is not an int; an int is accepted for a float; arrays become tuples; mappings become the
    dataclass of the hint (instances of it are accepted as they are and checked by the caller).
    """
    inner, optional = strip_optional(hint)
    if value is None:
        if optional:
            return None
        errors.append((path, f"must not be null; expected {describe(inner)}"))
        return INVALID
    if dataclasses.is_dataclass(inner):
        if isinstance(value, inner):
            return value
        if not isinstance(value, Mapping):
            errors.append((path, f"expected an object, got {kind_of(value)}"))
            return INVALID
        return from_mapping(inner, value, path, errors)
    if typing.get_origin(inner) is Literal:
        options = typing.get_args(inner)
        if any(value == o and type(value) is type(o) for o in options):
            return value
        hint_text = did_you_mean(value, options) if isinstance(value, str) else ""
        allowed = ", ".join(repr(o) for o in options)
        errors.append((path, f"must be one of {allowed}; got {value!r}{hint_text}"))
        return INVALID
    if typing.get_origin(inner) is tuple:
        return _convert_array(value, inner, path, errors)
    return _convert_scalar(value, inner, path, errors)


def _convert_array(value: Any, hint: Any, path: str, errors: Problems) -> Any:
    if not isinstance(value, (list, tuple)):
        errors.append((path, f"expected {describe(hint)}, got {kind_of(value)}"))
        return INVALID
    item_hints = _item_hints(hint, len(value))
    if item_hints is None:
        n = len(typing.get_args(hint))
        errors.append((path, f"expected exactly {n} items, got {len(value)}"))
        return INVALID
    out = [convert(v, h, f"{path}[{i}]", errors) for i, (v, h) in enumerate(zip(value, item_hints))]
    return INVALID if any(v is INVALID for v in out) else tuple(out)


def _convert_scalar(value: Any, hint: Any, path: str, errors: Problems) -> Any:
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if math.isfinite(value):
            return float(value)
        errors.append((path, f"must be a finite number, got {value!r}"))
        return INVALID
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint in (bool, str) and isinstance(value, hint):
        return value
    shown = f" ({value!r})" if isinstance(value, (str, int, float)) else ""
    errors.append((path, f"expected {describe(hint)}, got {kind_of(value)}{shown}"))
    return INVALID


def from_mapping(cls: type, data: Mapping, path: str, errors: Problems,
                 ignore: typing.Collection[str] = frozenset()) -> Any:
    """Build ``cls`` from ``data``, appending every problem to ``errors``.

    Returns ``INVALID`` only when the node cannot be built (a wrong type, a missing field). Unknown
    keys and bad values are recorded but the node is still built, so that the rules of this node
    and of its ancestors run too and one pass reports everything.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = type_hints(cls)
    check_keys(data, fields, path, errors, ignore)
    kwargs, blocked = {}, False
    for name, f in fields.items():
        p = join(path, name)
        if name in data:
            v = convert(data[name], hints[name], p, errors)
            if v is INVALID and _is_enum(hints[name]) and f.default is not MISSING:
                v = f.default  # error recorded; keep building so the cross-field rules report too
            blocked |= v is INVALID
            check_bounds(f, v, p, errors)
            kwargs[name] = v
        elif f.default is MISSING and f.default_factory is MISSING:
            errors.append((p, f"required field missing (expected {describe(hints[name])})"))
            blocked = True
    return INVALID if blocked else build_node(cls, kwargs, path, errors)


def check_keys(data: Mapping, fields: typing.Collection[str], path: str, errors: Problems,
               ignore: typing.Collection[str] = frozenset()) -> None:
    """Record keys of ``data`` that are not strings or not among ``fields`` (nor ``ignore``)."""
    for key in data:
        if not isinstance(key, str):
            errors.append((path, f"field names must be strings, got {key!r}"))
        elif key not in fields and key not in ignore:
            hint = did_you_mean(key, fields) or f"; allowed: {', '.join(fields)}"
            errors.append((join(path, key), f"unknown field {key!r}{hint}"))


def build_node(cls: type, kwargs: Mapping[str, Any], path: str, errors: Problems) -> Any:
    """``cls(**kwargs)`` of converted values plus its node rules; ``INVALID`` when it refuses."""
    try:
        node = cls(**kwargs)
    except SpecError as e:  # a validating node (the root) has checked its whole subtree itself
        for p, m in e.errors:
            if (join(path, p), m) not in errors:  # bounds and node rules were seen on the way
                errors.append((join(path, p), m))
        return INVALID
    errors.extend((join(path, rel), msg) for rel, msg in node._problems())
    return node


def _is_enum(hint: Any) -> bool:
    return typing.get_origin(strip_optional(hint)[0]) is typing.Literal


def check_tree(node: Any, path: str, errors: Problems) -> bool:
    """Check types, bounds and node rules of an already built tree. False when a type is wrong."""
    ok = True
    hints = type_hints(type(node))
    for f in dataclasses.fields(node):
        p = join(path, f.name)
        value = convert(getattr(node, f.name), hints[f.name], p, errors)
        if value is INVALID:
            ok = False
            continue
        check_bounds(f, value, p, errors)
        children = value if isinstance(value, tuple) else (value,)
        for i, child in enumerate(children):
            if dataclasses.is_dataclass(child):
                ok &= check_tree(child, f"{p}[{i}]" if isinstance(value, tuple) else p, errors)
    if ok:
        errors.extend((join(path, rel), msg) for rel, msg in node._problems())
    return ok


# ----------------------------------------------------------------------------- bounds

def check_bounds(f: dataclasses.Field, value: Any, path: str, errors: Problems) -> None:
    if value is None or value is INVALID:
        return
    bounds: Bounds | None = f.metadata.get("bounds")
    if bounds is not None:
        errors.extend((path, m) for m in bound_problems(bounds, value))
    items: Bounds | None = f.metadata.get("items")
    if items is not None and isinstance(value, tuple):
        for i, v in enumerate(value):
            errors.extend((f"{path}[{i}]", m) for m in bound_problems(items, v))


def bound_problems(b: Bounds, value: Any) -> list[str]:
    out = []
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        for limit, ok, op in ((b.ge, lambda x, y: x >= y, ">="), (b.gt, lambda x, y: x > y, ">"),
                              (b.le, lambda x, y: x <= y, "<="), (b.lt, lambda x, y: x < y, "<")):
            if limit is not None and not ok(value, limit):
                out.append(f"must be {op} {_num(limit)}, got {value!r}")
    if isinstance(value, str):
        if b.min_length is not None and len(value) < b.min_length:
            out.append("must not be empty" if b.min_length == 1
                       else f"must be at least {b.min_length} characters long")
        if b.max_length is not None and len(value) > b.max_length:
            out.append(f"must be at most {b.max_length} characters long, got {len(value)}")
        if b.pattern is not None and not re.search(b.pattern, value):
            out.append(f"{b.message or 'must match ' + b.pattern}; got {value!r}")
    if isinstance(value, tuple):
        if b.min_items is not None and len(value) < b.min_items:
            out.append(f"must have at least {b.min_items} item(s), got {len(value)}")
        if b.max_items is not None and len(value) > b.max_items:
            out.append(f"must have at most {b.max_items} item(s), got {len(value)}")
    return out


# ----------------------------------------------------------------------------- plain data

def to_plain(value: Any) -> Any:
    """Dataclass tree -> JSON-ready dicts/lists/scalars, fields in declaration order."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    return value


def default_of(f: dataclasses.Field) -> Any:
    """The field's default value (calling its factory), or ``MISSING`` for a required field."""
    if f.default_factory is not MISSING:
        return f.default_factory()
    return f.default


# ----------------------------------------------------------------------------- field docstrings

@functools.cache
def _parsed(filename: str) -> ast.Module:
    with open(filename, encoding="utf-8") as fh:
        return ast.parse(fh.read(), filename)


@functools.cache
def field_docs(cls: type) -> Mapping[str, str]:
    """``{field_name: docstring}`` for the string literals written right under each field."""
    try:
        tree = _parsed(inspect.getsourcefile(cls) or "")
    except (OSError, TypeError):  # no source shipped: the schema just lacks descriptions
        return types.MappingProxyType({})
    body: list[ast.stmt] = tree.body
    for part in cls.__qualname__.split("."):
        found = [n for n in body if isinstance(n, ast.ClassDef) and n.name == part]
        if not found:
            return types.MappingProxyType({})
        body = found[0].body
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            # One paragraph per blank-line block: descriptions read well in kubectl explain.
            text = inspect.cleandoc(nxt.value.value)
            docs[stmt.target.id] = re.sub(r"(?<!\n)\n(?!\n)", " ", text)
    return types.MappingProxyType(docs)


def resolve(root: type, path: str) -> tuple[type, str]:
    """``"search.selection[0].survivors"`` -> ``(StageSpec, "survivors")``; KeyError if unknown."""
    names = re.sub(r"\[\d*\]", "", path).split(".")
    cls: Any = root
    for i, name in enumerate(names):
        fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
        if name not in fields:
            where = ".".join(names[:i]) or "the spec root"
            raise KeyError(f"no field {name!r} in {where}{did_you_mean(name, fields)}")
        if i == len(names) - 1:
            return cls, name
        cls = strip_optional(type_hints(cls)[name])[0]
        if typing.get_origin(cls) is tuple:
            cls = typing.get_args(cls)[0]
    raise KeyError("empty field path")
