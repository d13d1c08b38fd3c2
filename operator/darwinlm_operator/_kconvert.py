"""The generic machinery of the Kubernetes half of a spec: maps, quantities, free-form JSON.

Why it exists: the library's ``SpecNode``/``setting`` machinery (``darwinlm.spec.fields``) has no
maps or free-form objects; Kubernetes needs both (``nodeSelector``, ``resources.limits``,
``affinity``, ``volumes``). This module adds them and knows nothing about PruningSearch:
``dict[str, V]`` annotations (V = ``str``, ``int``, :data:`Quantity` or ``Any`` for free-form JSON)
are read into a hashable :class:`FrozenMap`; :func:`kfield` declares their extra bounds, which
:func:`from_mapping` enforces and ``darwinlm_operator.crd`` turns into the schema. It also holds
Kubernetes' grammars of names and quantities and :class:`Rule`, one CEL rule of the CRD. The
dataclasses built on it live in ``darwinlm_operator.kspec`` (which re-exports the public names).
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from collections.abc import Iterator, Mapping
from fractions import Fraction
from typing import Any, NewType

from darwinlm.spec import fields as sf
from darwinlm.spec import MISSING, Bounds, setting

from . import _kcore

__all__ = [
    "DNS_LABEL",
    "DNS_LABEL_MESSAGE",
    "DNS_SUBDOMAIN",
    "DNS_SUBDOMAIN_MESSAGE",
    "ENV_NAME",
    "HTTP_URL",
    "IMAGE_REFERENCE",
    "LABEL_VALUE",
    "QUALIFIED_NAME",
    "QUANTITY",
    "SECRET_KEY",
    "FrozenMap",
    "OpenKey",
    "Quantity",
    "Rule",
    "check_field",
    "convert",
    "from_mapping",
    "key_path",
    "kfield",
    "map_value_hint",
    "parse_quantity",
]

Quantity = NewType("Quantity", str)
"""A Kubernetes resource quantity (``"500m"``, ``"16Gi"``, ``"1"``); an integer is accepted too."""

# Kubernetes' grammars of names and values, as JSON Schema patterns (searched, hence anchored).
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
QUALIFIED_NAME = (r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                  r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
# Kubernetes' quantity grammar (resource.Quantity) without a sign (negative requests are invalid)
# and with whole exponents of at most two digits (Kubernetes cannot parse the others either).
QUANTITY = r"^(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE][-+]?[0-9]{1,2}))?$"
ENV_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
IMAGE_REFERENCE = r"^\S+$"
SECRET_KEY = r"^[-._a-zA-Z0-9]+$"
HTTP_URL = r"^https?://[^\s/?#]+(/\S*)?$"
DNS_LABEL_MESSAGE = "must be a DNS-1123 label (lowercase letters, digits and '-', alphanumeric at both ends)"
DNS_SUBDOMAIN_MESSAGE = "must be a DNS-1123 subdomain (lowercase letters, digits, '-' and '.')"
_QUANTITY_MSG = "must be a Kubernetes quantity such as '500m', '2', '16Gi' or '1e3'"


@dataclasses.dataclass(frozen=True)
class Rule:
    """One CEL validation rule of the CRD (``x-kubernetes-validations`` item)."""

    rule: str
    message: str
    field_path: str | None = None  # relative JSON path, no list indices (a Kubernetes restriction)
    reason: str | None = None  # FieldValueInvalid (Kubernetes' default) / Forbidden / Required / Duplicate

    def to_schema(self) -> dict[str, str]:
        out = {"rule": self.rule, "message": self.message}
        if self.field_path:
            out["fieldPath"] = self.field_path
        if self.reason:
            out["reason"] = self.reason
        return out


@dataclasses.dataclass(frozen=True)
class OpenKey:
    """A key a free-form object must have: its bounds and its description."""

    bounds: Bounds
    description: str


class FrozenMap(Mapping):
    """An immutable, hashable ``dict`` (maps and free-form objects of the spec tree)."""

    __slots__ = ("_d",)

    def __init__(self, data: Mapping | typing.Iterable = ()) -> None:
        self._d = dict(data)

    def __getitem__(self, key: str) -> Any:
        return self._d[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __hash__(self) -> int:
        return hash(frozenset(self._d.items()))

    def __repr__(self) -> str:
        return f"FrozenMap({self._d!r})"


def kfield(default: Any = MISSING, *, factory: Any = MISSING, items: Bounds | None = None,
           keys: Bounds | None = None, open_keys: Mapping[str, OpenKey] | None = None,
           list_map_keys: tuple[str, ...] | None = None, fmt: str | None = None,
           core: str | None = None, **bounds: Any) -> Any:
    """``setting()`` plus what Kubernetes types need.

    ``keys``: bounds of map keys; ``open_keys``: required keys of free-form objects (or of each
    free-form list item); ``list_map_keys``: ``x-kubernetes-list-type: map`` (items unique by those
    keys); ``fmt``: OpenAPI ``format``. ``max_items`` bounds map sizes too (``maxProperties``).
    ``core``: the free-form object (or each item) is a core/v1 type of ``_kcore.KINDS``, checked
    against its generated schema here and in the CRD.
    """
    f = setting(default, factory=factory, items=items, **bounds)
    meta = dict(f.metadata)
    for key, value in (("keys", keys), ("open_keys", open_keys), ("list_map_keys", list_map_keys),
                       ("format", fmt), ("core", core)):
        if value is not None:
            meta[key] = value
    return dataclasses.field(default=f.default, default_factory=f.default_factory, metadata=meta)


def map_value_hint(hint: Any) -> Any | None:
    """``dict[str, V]`` -> ``V``; anything else -> None."""
    if typing.get_origin(hint) is dict:
        return typing.get_args(hint)[1]
    return None


def convert(value: Any, hint: Any, meta: Mapping, path: str, errors: sf.Problems) -> Any:
    """``sf.convert`` extended with maps, quantities and free-form JSON; dataclasses built here."""
    inner = sf.strip_optional(hint)[0]
    if value is None:
        return sf.convert(value, hint, path, errors)
    if dataclasses.is_dataclass(inner):
        if not isinstance(value, Mapping):
            errors.append((path, f"expected an object, got {_kind(value)}"))
            return sf.INVALID
        return from_mapping(inner, value, path, errors)
    if typing.get_origin(inner) is tuple and typing.get_args(inner)[1:] == (Ellipsis,):
        return _convert_list(value, typing.get_args(inner)[0], meta, path, errors)
    if map_value_hint(inner) is not None:
        return _convert_map(value, map_value_hint(inner), meta, path, errors)
    if inner is Quantity:
        return _quantity(value, path, errors)
    if inner is Any:
        return _free(value, path, errors)
    return sf.convert(value, hint, path, errors)


def _convert_list(value: Any, item: Any, meta: Mapping, path: str, errors: sf.Problems) -> Any:
    if not isinstance(value, (list, tuple)):
        errors.append((path, f"expected an array, got {_kind(value)}"))
        return sf.INVALID
    out = tuple(convert(v, item, {}, f"{path}[{i}]", errors) for i, v in enumerate(value))
    if sf.INVALID in out:
        return sf.INVALID
    _check_items(out, item, meta, path, errors)
    return out


def _convert_map(value: Any, value_hint: Any, meta: Mapping, path: str, errors: sf.Problems) -> Any:
    if not isinstance(value, Mapping):
        errors.append((path, f"expected an object (a map), got {_kind(value)}"))
        return sf.INVALID
    out = {}
    for k, v in value.items():
        if not isinstance(k, str):
            errors.append((path, f"keys must be strings, got {k!r}"))
            continue
        p = key_path(path, k)
        out[k] = convert(v, value_hint, {}, p, errors)
        if meta.get("keys") is not None:
            errors.extend((p, f"key {m}") for m in sf.bound_problems(meta["keys"], k))
    if sf.INVALID in out.values():
        return sf.INVALID
    _check_open_keys(out, meta, path, errors)
    _check_core(out, meta, path, errors)
    return FrozenMap(out)


def key_path(path: str, key: str) -> str:
    """``limits.cpu`` for plain keys, ``limits['nvidia.com/gpu']`` for keys with other characters."""
    return sf.join(path, key) if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) else f"{path}[{key!r}]"


def _kind(value: Any) -> str:
    return sf.kind_of(value)  # the library's own type names, shared on purpose


def _quantity(value: Any, path: str, errors: sf.Problems) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        if value >= 0:
            return str(value)
        errors.append((path, f"must not be negative, got {value}"))
    elif isinstance(value, str):
        if re.search(QUANTITY, value):
            return value
        errors.append((path, f"{_QUANTITY_MSG}; got {value!r}"))
    else:
        errors.append((path, f"{_QUANTITY_MSG} (a string or an integer), got {_kind(value)}"
                             + (f" ({value!r}): quote it" if isinstance(value, float) else "")))
    return sf.INVALID


def _free(value: Any, path: str, errors: sf.Problems) -> Any:
    """Free-form JSON: mappings become FrozenMaps, arrays tuples; nothing else but JSON scalars."""
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                errors.append((path, f"keys must be strings, got {k!r}"))
                return sf.INVALID
            out[k] = _free(v, sf.join(path, k), errors)
        return sf.INVALID if sf.INVALID in out.values() else FrozenMap(out)
    if isinstance(value, (list, tuple)):
        out = tuple(_free(v, f"{path}[{i}]", errors) for i, v in enumerate(value))
        return sf.INVALID if sf.INVALID in out else out
    if isinstance(value, float) and not math.isfinite(value):
        errors.append((path, f"must be a finite number, got {value!r}"))
        return sf.INVALID
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    errors.append((path, f"not a JSON value: {type(value).__name__}"))
    return sf.INVALID


def _check_open_keys(obj: Mapping, meta: Mapping, path: str, errors: sf.Problems) -> None:
    for key, spec in (meta.get("open_keys") or {}).items():
        p = sf.join(path, key)
        if key not in obj or obj[key] is None:
            errors.append((p, "required field missing (expected string)"))
        elif not isinstance(obj[key], str):
            errors.append((p, f"expected string, got {_kind(obj[key])}"))
        else:
            errors.extend((p, m) for m in sf.bound_problems(spec.bounds, obj[key]))


def _check_core(obj: Mapping, meta: Mapping, path: str, errors: sf.Problems) -> None:
    """Type-check a free-form core/v1 object against its generated schema (``kfield(core=...)``);
    a problem the open-key check already reported is not repeated."""
    if meta.get("core") is None:
        return
    reported = {p for p, _ in errors}
    errors.extend(e for e in _kcore.problems(obj, _kcore.schema(meta["core"]), path) if e[0] not in reported)


def _check_items(items: tuple, item_hint: Any, meta: Mapping, path: str, errors: sf.Problems) -> None:
    """Required keys of free-form items and the uniqueness of list-type map items."""
    if map_value_hint(item_hint) is not None:
        for i, obj in enumerate(items):
            _check_open_keys(obj, meta, f"{path}[{i}]", errors)
            _check_core(obj, meta, f"{path}[{i}]", errors)
    keys = meta.get("list_map_keys") or ()
    seen: dict[Any, int] = {}
    for i, obj in enumerate(items if keys else ()):
        ident = tuple(obj.get(k) if isinstance(obj, Mapping) else getattr(obj, k) for k in keys)
        if ident in seen:
            shown = ident[0] if len(keys) == 1 else ident
            errors.append((sf.join(f"{path}[{i}]", keys[0]), f"duplicate {shown!r} (also item "
                                                            f"{seen[ident]}); items must be unique by "
                                                            f"{', '.join(keys)}"))
        seen.setdefault(ident, i)


def from_mapping(cls: type, data: Mapping, path: str, errors: sf.Problems,
           ignore: typing.Collection[str] = frozenset()) -> Any:
    """``sf.from_mapping`` with :func:`convert` (maps, free-form) and :func:`check_field` (map
    bounds) for every field; unlike it, a bad enum value blocks the node (no stand-in default)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = sf.type_hints(cls)
    sf.check_keys(data, fields, path, errors, ignore)
    kwargs, blocked = {}, False
    for name, f in fields.items():
        p = sf.join(path, name)
        if name in data:
            v = convert(data[name], hints[name], f.metadata, p, errors)
            blocked |= v is sf.INVALID
            check_field(f, v, p, errors)
            kwargs[name] = v
        elif f.default is MISSING and f.default_factory is MISSING:
            errors.append((p, f"required field missing (expected {sf.describe(hints[name])})"))
            blocked = True
    return sf.INVALID if blocked else sf.build_node(cls, kwargs, path, errors)


def check_field(f: dataclasses.Field, value: Any, path: str, errors: sf.Problems) -> None:
    """Bounds of a converted value; for maps: entry count and value bounds."""
    if value is sf.INVALID:
        return
    sf.check_bounds(f, value, path, errors)
    if not isinstance(value, Mapping):
        return
    b: Bounds | None = f.metadata.get("bounds")
    if b is not None and b.max_items is not None and len(value) > b.max_items:
        errors.append((path, f"must have at most {b.max_items} entries, got {len(value)}"))
    items: Bounds | None = f.metadata.get("items")
    if items is not None:
        for k, v in value.items():
            errors.extend((key_path(path, k), m) for m in sf.bound_problems(items, v))


_SUFFIX = {"": 1, "n": Fraction(1, 10**9), "u": Fraction(1, 10**6), "m": Fraction(1, 1000),
           "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def parse_quantity(text: str) -> Fraction:
    """``"1500m"`` -> ``Fraction(3, 2)``; ``"1Gi"`` -> ``2**30``. ValueError when not a quantity."""
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]{1,2}|[KMGTPE]i|[numkMGTPE])?", text)
    if not m:
        raise ValueError(f"not a quantity: {text!r}")
    number, suffix = Fraction(m.group(1)), m.group(2) or ""
    if suffix[:1] in ("e", "E") and len(suffix) > 1:  # "1E" alone is exa
        return number * Fraction(10) ** int(suffix[1:])
    return number * _SUFFIX[suffix]

