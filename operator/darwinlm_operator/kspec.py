"""The Kubernetes-only half of a ``PruningSearch`` spec, and loading both halves at once.

Why it exists: a ``PruningSearch`` manifest's ``spec`` is the library's ``PruningSearchSpec`` plus a
few top-level fields only the operator reads: the job image, how many pods per generation, their
resources and pod overrides, S3 credentials and lifecycle knobs. They are typed, documented frozen
dataclasses on the same ``SpecNode``/``setting`` machinery as the library (a docstring under every
field becomes the CRD description), named as Katib/Trainer/KubeRay/JobSet/Kueue users know them.

The library machinery has no maps or free-form objects; Kubernetes needs both (``nodeSelector``,
``resources.limits``, ``affinity``, ``volumes``), so this module adds them: ``dict[str, V]``
annotations (V = ``str``, ``int``, :data:`Quantity` or ``Any`` for free-form JSON) are read into a
hashable :class:`FrozenMap`. ``darwinlm_operator.crd`` turns the same dataclasses into the CRD schema.

:func:`load_psearch` validates a whole manifest (or bare spec): the library half with
``darwinlm.spec.load_spec`` and this half here, plus the Kubernetes-only limits the CRD puts on
library fields (:data:`LIBRARY_LIMITS`), and raises ONE ``SpecError`` with every problem. Paths are
relative to ``spec`` (``podTemplate.env[0].name``), as the library's are; ``metadata.name``,
``apiVersion`` and ``kind`` are the manifest's own.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import types
import typing
from collections.abc import Iterator, Mapping
from fractions import Fraction
from typing import Any, Literal, NewType

from darwinlm import _spec_fields as sf
from darwinlm._spec_fields import MISSING, Bounds, SpecNode, setting
from darwinlm._spec_io import read_document
from darwinlm.errors import SpecError
from darwinlm.spec import PruningSearchSpec, load_spec

__all__ = [
    "KUBERNETES_FIELDS", "LIBRARY_LIMITS", "KubeSpec", "ResourceRequirements", "PodTemplateOverrides",
    "Toleration", "LocalObjectReference", "EnvVar", "S3Spec", "S3SecretRef", "FrozenMap",
    "Quantity", "Rule", "NODE_RULES", "load_psearch", "load_kube_spec", "kube_spec_to_dict", "parse_quantity",
    "JobDefaults", "job_image", "PULL_POLICIES", "DEFAULT_PULL_POLICY",
]

Quantity = NewType("Quantity", str)
"""A Kubernetes resource quantity (``"500m"``, ``"16Gi"``, ``"1"``); an integer is accepted too."""

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
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
DEFAULT_PULL_POLICY = "IfNotPresent"  # when neither the spec nor the operator names a pull policy
SECRET_KEY = r"^[-._a-zA-Z0-9]+$"
HTTP_URL = r"^https?://[^\s/?#]+(/\S*)?$"
MAX_STRING = 4096  # CRD maxLength of library strings that declare none (keeps CEL cost estimable)
MAX_STAGES = 8  # CRD maxItems of search.selection: the pairwise survivor rules are unrolled to it
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")

_DNS_MSG = "must be a DNS-1123 label (lowercase letters, digits and '-', alphanumeric at both ends)"
_SUBDOMAIN_MSG = "must be a DNS-1123 subdomain (lowercase letters, digits, '-' and '.')"
_QUANTITY_MSG = "must be a Kubernetes quantity such as '500m', '2', '16Gi' or '1e3'"
_ESCAPE_SECRETS = "secrets go only through s3.secretRef, never as plain env values"


# ----------------------------------------------------------------------------- machinery

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
           list_map_keys: tuple[str, ...] | None = None, fmt: str | None = None, **bounds: Any) -> Any:
    """``setting()`` plus what Kubernetes types need.

    ``keys``: bounds of map keys; ``open_keys``: required keys of free-form objects (or of each
    free-form list item); ``list_map_keys``: ``x-kubernetes-list-type: map`` (items unique by those
    keys); ``fmt``: OpenAPI ``format``. ``max_items`` bounds map sizes too (``maxProperties``).
    """
    f = setting(default, factory=factory, items=items, **bounds)
    meta = dict(f.metadata)
    for key, value in (("keys", keys), ("open_keys", open_keys), ("list_map_keys", list_map_keys),
                       ("format", fmt)):
        if value is not None:
            meta[key] = value
    return dataclasses.field(default=f.default, default_factory=f.default_factory, metadata=meta)


def map_value_hint(hint: Any) -> Any | None:
    """``dict[str, V]`` -> ``V``; anything else -> None."""
    if typing.get_origin(hint) is dict:
        return typing.get_args(hint)[1]
    return None


def _convert(value: Any, hint: Any, meta: Mapping, path: str, errors: sf.Problems) -> Any:
    """``sf.convert`` extended with maps, quantities and free-form JSON; dataclasses built here."""
    inner = sf.strip_optional(hint)[0]
    if value is None:
        return sf.convert(value, hint, path, errors)
    if dataclasses.is_dataclass(inner):
        if not isinstance(value, Mapping):
            errors.append((path, f"expected an object, got {_kind(value)}"))
            return sf.INVALID
        return _build(inner, value, path, errors)
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
    out = tuple(_convert(v, item, {}, f"{path}[{i}]", errors) for i, v in enumerate(value))
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
        out[k] = _convert(v, value_hint, {}, p, errors)
        if meta.get("keys") is not None:
            errors.extend((p, f"key {m}") for m in sf.bound_problems(meta["keys"], k))
    if sf.INVALID in out.values():
        return sf.INVALID
    _check_open_keys(out, meta, path, errors)
    return FrozenMap(out)


def key_path(path: str, key: str) -> str:
    """``limits.cpu`` for plain keys, ``limits['nvidia.com/gpu']`` for keys with other characters."""
    return sf.join(path, key) if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) else f"{path}[{key!r}]"


def _kind(value: Any) -> str:
    return sf._kind(value)  # noqa: SLF001 - the library's own type names, shared on purpose


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


def _check_items(items: tuple, item_hint: Any, meta: Mapping, path: str, errors: sf.Problems) -> None:
    """Required keys of free-form items and the uniqueness of list-type map items."""
    if map_value_hint(item_hint) is not None:
        for i, obj in enumerate(items):
            _check_open_keys(obj, meta, f"{path}[{i}]", errors)
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


def _build(cls: type, data: Mapping, path: str, errors: sf.Problems,
           ignore: typing.Collection[str] = frozenset()) -> Any:
    """Like ``sf.from_mapping`` but with :func:`_convert` (maps, free-form) for every field."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = sf.type_hints(cls)
    for key in data:
        if not isinstance(key, str):
            errors.append((path, f"field names must be strings, got {key!r}"))
        elif key not in fields and key not in ignore:
            hint = sf.did_you_mean(key, fields) or f"; allowed: {', '.join(fields)}"
            errors.append((sf.join(path, key), f"unknown field {key!r}{hint}"))
    kwargs, blocked = {}, False
    for name, f in fields.items():
        p = sf.join(path, name)
        if name in data:
            v = _convert(data[name], hints[name], f.metadata, p, errors)
            blocked |= v is sf.INVALID
            _field_checks(f, v, p, errors)
            kwargs[name] = v
        elif f.default is MISSING and f.default_factory is MISSING:
            errors.append((p, f"required field missing (expected {sf.describe(hints[name])})"))
            blocked = True
    if blocked:
        return sf.INVALID
    try:
        node = cls(**kwargs)
    except SpecError as e:  # the root re-validates itself; keep what was not seen on the way
        errors.extend((sf.join(path, p), m) for p, m in e.errors if (sf.join(path, p), m) not in errors)
        return sf.INVALID
    errors.extend((sf.join(path, rel), msg) for rel, msg in node._problems())
    return node


def _field_checks(f: dataclasses.Field, value: Any, path: str, errors: sf.Problems) -> None:
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


# ----------------------------------------------------------------------------- the Kubernetes fields

_NAME_KEY = OpenKey(Bounds(pattern=DNS_LABEL, max_length=63, message=_DNS_MSG),
                    "Name of the volume (DNS-1123 label), unique in the pod; volumeMounts refer to it.")
_MOUNT_NAME = OpenKey(Bounds(pattern=DNS_LABEL, max_length=63, message=_DNS_MSG),
                      "Name of the volume to mount (a podTemplate.volumes name or one the operator adds).")
_MOUNT_PATH = OpenKey(Bounds(pattern=r"^/", max_length=4096, message="must be an absolute path"),
                      "Absolute path in the job container where the volume is mounted (unique).")
_RESOURCE_KEY = Bounds(pattern=QUALIFIED_NAME, max_length=316,
                       message="must be a resource name such as cpu, memory or nvidia.com/gpu")
_LABEL_KEY = Bounds(pattern=QUALIFIED_NAME, max_length=316,
                    message="must be a label key such as 'kubernetes.io/arch' or 'pool'")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResourceRequirements(SpecNode):
    """Compute resources of each job pod (one container), as in a Pod's ``resources``."""

    requests: dict[str, Quantity] = kfield(factory=FrozenMap, max_items=16, keys=_RESOURCE_KEY)
    """Minimum resources the scheduler reserves per pod, e.g. {cpu: "4", memory: 32Gi}. Values
    are Kubernetes quantities (strings like "500m", "16Gi"; plain integers are accepted)."""
    limits: dict[str, Quantity] = kfield(factory=FrozenMap, max_items=16, keys=_RESOURCE_KEY)
    """Maximum resources per pod, e.g. {"nvidia.com/gpu": "1", memory: 40Gi}. GPUs are requested
    here (extended resources: requests default to limits and must equal them when both are set)."""

    def _problems(self) -> sf.Problems:
        out = []
        for name, req in self.requests.items():
            lim = self.limits.get(name)
            if lim is not None and parse_quantity(req) > parse_quantity(lim):
                out.append((key_path("requests", name),
                            f"{req} exceeds limits {name} ({lim}); a request may not exceed its limit"))
            elif lim is not None and _extended(name) and parse_quantity(req) != parse_quantity(lim):
                out.append((key_path("requests", name), f"{req} differs from limits ({lim}); extended "
                                                        f"resources such as GPUs cannot be overcommitted"))
        for where, values in (("requests", self.requests), ("limits", self.limits)):
            for name, q in values.items():
                if _extended(name) and parse_quantity(q).denominator != 1:
                    out.append((key_path(where, name), f"{name} must be a whole number, got {q!r}"))
        return out


def _extended(resource: str) -> bool:
    """Extended resources (``vendor.com/thing``) outside the kubernetes.io namespace, e.g. GPUs."""
    return "/" in resource and not resource.split("/")[0].endswith("kubernetes.io")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Toleration(SpecNode):
    """A Pod toleration (core/v1 Toleration): lets the job pods onto tainted nodes, e.g. GPU pools."""

    key: str | None = setting(None, pattern=QUALIFIED_NAME, max_length=316,
                              message="must be a taint key such as 'nvidia.com/gpu'")
    """Taint key to tolerate; empty/null with operator Exists tolerates every taint."""
    operator: Literal["Exists", "Equal"] = "Equal"
    """Equal = the taint's value must equal `value`; Exists = any value (leave `value` empty)."""
    value: str | None = setting(None, max_length=63)
    """Taint value to match (operator Equal)."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to tolerate; null = all effects."""
    tolerationSeconds: int | None = None
    """With effect NoExecute: seconds the pod stays bound after the taint appears (then it is
    evicted; eviction does not count toward backoffLimit); null = forever."""

    def _problems(self) -> sf.Problems:
        out = []
        if self.operator == "Exists" and self.value:
            out.append(("value", "value must be empty when operator is Exists"))
        if not self.key and self.operator != "Exists":
            out.append(("operator", "an empty key (tolerate every taint) needs operator Exists"))
        if self.tolerationSeconds is not None and self.effect != "NoExecute":
            out.append(("tolerationSeconds", "tolerationSeconds needs effect NoExecute"))
        return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class LocalObjectReference(SpecNode):
    """A reference to an object in the PruningSearch's namespace, by name."""

    name: str = setting(pattern=DNS_SUBDOMAIN, max_length=253, message=_SUBDOMAIN_MSG)
    """Name of the object (required), e.g. a docker-registry Secret for imagePullSecrets."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class EnvVar(SpecNode):
    """An environment variable of the job container, with a plain value."""

    name: str = setting(pattern=ENV_NAME, max_length=253,
                        message="must be an environment variable name (letters, digits, '_', '-', '.')")
    """Variable name (required), e.g. HF_HUB_OFFLINE."""
    value: str = setting("", max_length=32768)
    """Plain value (a string: quote numbers). No valueFrom: secrets go only through
    s3.secretRef, never as plain env values."""

    def _problems(self) -> sf.Problems:
        if self.name in CREDENTIAL_ENV:
            return [("name", f"S3 credentials must not be plain env values; {_ESCAPE_SECRETS}")]
        return []


NODE_RULES: Mapping[type, tuple[Rule, ...]] = types.MappingProxyType({
    # CEL rules the CRD puts on these nodes; each mirrors a check of the node's _problems().
    Toleration: (
        Rule("self.operator != 'Exists' || !has(self.value) || self.value == ''",
             "value must be empty when operator is Exists", ".value"),
        Rule("(has(self.key) && self.key != '') || self.operator == 'Exists'",
             "an empty key (tolerate every taint) needs operator Exists", ".operator"),
        Rule("!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
             "tolerationSeconds needs effect NoExecute", ".tolerationSeconds"),
    ),
    EnvVar: (
        Rule("!(self.name in " + repr(list(CREDENTIAL_ENV)) + ")",
             f"S3 credentials must not be plain env values; {_ESCAPE_SECRETS}", ".name",
             "FieldValueForbidden"),
    ),
})


@dataclasses.dataclass(frozen=True, kw_only=True)
class PodTemplateOverrides(SpecNode):
    """Settings merged into the pod template of every Job the operator creates (as Trainer v2's
    podSpecOverrides): scheduling, identity, environment and extra volumes."""

    nodeSelector: dict[str, str] = kfield(factory=FrozenMap, max_items=32, keys=_LABEL_KEY,
                                          items=Bounds(pattern=LABEL_VALUE, max_length=63,
                                                       message="must be a label value"))
    """Node labels the job pods require, e.g. {"nvidia.com/gpu.product": NVIDIA-H100-80GB-HBM3}."""
    tolerations: tuple[Toleration, ...] = kfield((), max_items=32)
    """Taints the job pods tolerate (e.g. the nvidia.com/gpu taint of GPU node pools)."""
    affinity: dict[str, Any] | None = None
    """A core/v1 Affinity object (nodeAffinity, podAffinity, podAntiAffinity), passed through
    unchanged; Kubernetes validates it when the Job is created."""
    priorityClassName: str | None = setting(None, pattern=DNS_SUBDOMAIN, max_length=253,
                                            message=_SUBDOMAIN_MSG)
    """PriorityClass of the job pods (preemption order); null = the cluster default."""
    serviceAccountName: str | None = setting(None, pattern=DNS_SUBDOMAIN, max_length=253,
                                             message=_SUBDOMAIN_MSG)
    """ServiceAccount the job pods run as (e.g. one bound to an IAM role for S3 via IRSA/workload
    identity); null = the namespace's default."""
    imagePullSecrets: tuple[LocalObjectReference, ...] = kfield((), max_items=16,
                                                                list_map_keys=("name",))
    """docker-registry Secrets used to pull `image` from a private registry."""
    env: tuple[EnvVar, ...] = kfield((), max_items=128, list_map_keys=("name",))
    """Extra environment variables of the job container (plain values only)."""
    volumes: tuple[dict[str, Any], ...] = kfield((), max_items=64, open_keys={"name": _NAME_KEY},
                                                 list_map_keys=("name",))
    """Extra core/v1 Volumes of the job pods (e.g. a PVC with the model); passed through, only
    `name` is checked here. The operator's own scratch volumes win on a name clash."""
    volumeMounts: tuple[dict[str, Any], ...] = kfield(
        (), max_items=64, open_keys={"name": _MOUNT_NAME, "mountPath": _MOUNT_PATH},
        list_map_keys=("mountPath",))
    """Extra core/v1 VolumeMounts of the job container (name, mountPath, readOnly, subPath...);
    passed through, only `name` and `mountPath` are checked here. The operator's own scratch
    mounts win on a mountPath clash."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class S3SecretRef(SpecNode):
    """A Secret in the PruningSearch's namespace with the S3 access key pair."""

    name: str = setting(pattern=DNS_SUBDOMAIN, max_length=253, message=_SUBDOMAIN_MSG)
    """Name of the Secret (required)."""
    accessKeyIdKey: str = setting("AWS_ACCESS_KEY_ID", pattern=SECRET_KEY, max_length=253,
                                  message="must be a Secret key (letters, digits, '-', '_', '.')")
    """Key in the Secret holding the access key id."""
    secretAccessKeyKey: str = setting("AWS_SECRET_ACCESS_KEY", pattern=SECRET_KEY, max_length=253,
                                      message="must be a Secret key (letters, digits, '-', '_', '.')")
    """Key in the Secret holding the secret access key."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class S3Spec(SpecNode):
    """How the job pods and the operator reach the S3 store (`store` must then be an s3:// URI)."""

    secretRef: S3SecretRef | None = None
    """Secret with the access key pair, injected as AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY;
    null = the pods' ambient credentials (IRSA, workload identity, instance profile)."""
    endpoint: str | None = setting(None, pattern=HTTP_URL, max_length=2048,
                                   message="must be an http(s)://HOST[:PORT][/PATH] URL")
    """S3 endpoint URL for S3-compatible stores (MinIO, SeaweedFS, Ceph, R2), e.g.
    http://minio.minio:9000; null = AWS S3."""
    region: str | None = setting(None, pattern=DNS_LABEL, max_length=63,
                                 message="must be a region name such as 'us-east-1'")
    """Region of the bucket, e.g. eu-west-1; null = the SDK's default chain (then us-east-1)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class KubeSpec(SpecNode):
    """The Kubernetes-only top-level fields of a PruningSearch spec (how the search runs)."""

    image: str | None = setting(None, pattern=IMAGE_REFERENCE, max_length=1024,
                                message="must be an image reference without spaces")
    """Container image of the job pods, e.g. ghcr.io/org/darwinlm-job:0.1.0 or a digest; null = the
    operator's job image (DARWINLM_JOB_IMAGE, set by the Helm chart from jobImage: the job image of
    the operator's version). It must contain the same darwinlm version as the operator (same
    algorithm). When neither is set, the search fails with condition Invalid naming spec.image."""
    imagePullPolicy: Literal["Always", "IfNotPresent", "Never"] | None = None
    """When the kubelet pulls `image`: Always, IfNotPresent (pin tags or digests) or Never; null =
    the operator's default (DARWINLM_JOB_IMAGE_PULL_POLICY, the chart's jobImage.pullPolicy), else
    IfNotPresent."""
    workers: int = setting(1, ge=1, le=1024)
    """Pods per generation Job: the torch.distributed world size (one rank per pod). Each rank
    evaluates its share of the offspring; the result does not depend on it. Default 1."""
    resources: ResourceRequirements = setting(factory=ResourceRequirements)
    """Requests and limits of each job pod, e.g. limits: {"nvidia.com/gpu": "1"}."""
    podTemplate: PodTemplateOverrides = setting(factory=PodTemplateOverrides)
    """Overrides merged into every job pod: nodeSelector, tolerations, affinity,
    priorityClassName, serviceAccountName, imagePullSecrets, env, volumes, volumeMounts."""
    s3: S3Spec | None = None
    """S3 endpoint, region and credentials of the store; null = no S3 settings (a file:// store
    on a shared volume, or S3 through ambient credentials and the AWS defaults)."""
    suspend: bool = False
    """true = stop at the next generation boundary: running Jobs are deleted and GPUs released;
    false again resumes from the last completed generation (the store keeps every result)."""
    activeDeadlineSeconds: int | None = setting(None, ge=1)
    """Wall-clock limit of the whole search in seconds, counted from its start (time suspended
    included); when exceeded the search fails with reason DeadlineExceeded. null = no limit."""
    backoffLimit: int = setting(3, ge=0)
    """Retries per task for retriable failures (exit codes of transient errors, OOM-kills,
    lost nodes). Evictions and preemptions (pod condition DisruptionTarget) do not count.
    Permanent failures (a bad spec, an infeasible target) are never retried. Default 3."""
    podStartTimeoutSeconds: int = setting(600, ge=1)
    """Seconds a job pod may stay unstarted (image pull errors, unschedulable: no GPU fits)
    before its task fails with reason ImagePullTimeout/Unschedulable. Default 600."""
    ttlSecondsAfterFinished: int | None = setting(None, ge=0)
    """Seconds after the search succeeds or fails before the PruningSearch object (and its Jobs)
    is deleted; the artifacts follow artifactRetention. null = keep forever."""
    artifactRetention: Literal["Retain", "Delete"] = "Retain"
    """What happens to the search's store prefix when the PruningSearch is deleted: Retain (default)
    keeps it; Delete makes a finalizer delete searches/<name>-<uid>/ from S3 first (shared layer
    databases are kept). If the operator is down, remove the finalizer by hand to delete."""
    queueName: str | None = setting(None, pattern=DNS_SUBDOMAIN, max_length=63, message=_SUBDOMAIN_MSG)
    """Kueue LocalQueue for the job pods: set as label kueue.x-k8s.io/queue-name on every Job, so
    Kueue admits them against its quotas. null = not queued by Kueue."""

    def __post_init__(self) -> None:
        # The whole tree is checked here, as PruningSearchSpec does: an instance is always valid.
        errors: sf.Problems = []
        hints = sf.type_hints(type(self))
        for f in dataclasses.fields(self):
            value = _convert(sf.to_plain(getattr(self, f.name)), hints[f.name], f.metadata, f.name,
                             errors)
            _field_checks(f, value, f.name, errors)
            if value is not sf.INVALID:
                object.__setattr__(self, f.name, value)
        if errors:
            raise SpecError(errors)


KUBERNETES_FIELDS: frozenset[str] = frozenset(f.name for f in dataclasses.fields(KubeSpec))
"""The top-level ``spec`` keys that belong to :class:`KubeSpec` (the library ignores them)."""


# ----------------------------------------------------------------------------- the operator's defaults

@dataclasses.dataclass(frozen=True)
class JobDefaults:
    """What the operator fills in where a search leaves ``image``/``imagePullPolicy`` unset.

    The operator reads them once from its environment (``handlers.OperatorConfig.from_env``:
    DARWINLM_JOB_IMAGE and DARWINLM_JOB_IMAGE_PULL_POLICY, which the Helm chart sets from
    ``jobImage``: the job image of the operator's version). ``ValueError`` when a value is malformed.
    """

    image: str | None = None
    """Job image for searches without ``spec.image``; None = such searches are Invalid."""
    image_pull_policy: str | None = None
    """Pull policy for searches without ``spec.imagePullPolicy``; None = IfNotPresent."""

    def __post_init__(self) -> None:
        if self.image is not None and (len(self.image) > 1024 or not re.search(IMAGE_REFERENCE, self.image)):
            raise ValueError(f"the default job image must be an image reference without spaces "
                             f"(at most 1024 characters), got {self.image!r}")
        if self.image_pull_policy is not None and self.image_pull_policy not in PULL_POLICIES:
            raise ValueError(f"the default job image pull policy must be one of {', '.join(PULL_POLICIES)}, "
                             f"got {self.image_pull_policy!r}")


def job_image(kube: KubeSpec, defaults: JobDefaults | None = None) -> tuple[str, str]:
    """``(image, imagePullPolicy)`` of a search's job pods: the spec's own values win, then the
    operator's ``defaults``, then IfNotPresent for the policy. ``SpecError`` at ``image`` when
    neither the spec nor the operator names an image."""
    defaults = defaults or JobDefaults()
    image = kube.image or defaults.image
    if not image:
        raise SpecError([("image", ("required: the search sets no image and the operator has no default "
                                    "job image (DARWINLM_JOB_IMAGE, set by the Helm chart from jobImage)"))])
    return image, kube.imagePullPolicy or defaults.image_pull_policy or DEFAULT_PULL_POLICY


# ----------------------------------------------------------------------------- library limits

def _library_strings(cls: type = PruningSearchSpec, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(path, field)`` of every free-text string field of the library spec (list items as ``[]``)."""
    hints = sf.type_hints(cls)
    for f in dataclasses.fields(cls):
        inner = sf.strip_optional(hints[f.name])[0]
        path = sf.join(prefix, f.name)
        if typing.get_origin(inner) is tuple:
            inner, path = typing.get_args(inner)[0], path + "[]"
        if dataclasses.is_dataclass(inner):
            yield from _library_strings(inner, path)
        elif inner is str:
            yield path, f


@functools.cache
def _library_limits() -> Mapping[str, Bounds]:
    limits = {"search.selection": Bounds(max_items=MAX_STAGES),
              "database.attention.fractions": Bounds(max_items=256),
              "database.mlp.fractions": Bounds(max_items=256),
              "evaluation.baselines": Bounds(max_items=2)}
    for path, f in _library_strings():
        b = f.metadata.get("bounds")
        if path != "name" and (b is None or b.max_length is None):
            limits[path] = Bounds(max_length=MAX_STRING)
    return types.MappingProxyType(limits)


LIBRARY_LIMITS: Mapping[str, Bounds] = _library_limits()
"""Bounds the CRD adds to library fields (paths from the spec root; ``[]`` = every item): every
list a CEL rule reads and every free-text string get a size limit, so that the API server can
estimate the cost of the rules. :func:`load_psearch` enforces the same limits."""


def _values_at(data: Any, parts: list[str], path: str) -> Iterator[tuple[str, Any]]:
    if not parts:
        yield path, data
        return
    head, rest = parts[0], parts[1:]
    many = head.endswith("[]")
    key = head[:-2] if many else head
    if not isinstance(data, Mapping) or data.get(key) is None:
        return
    value, p = data[key], sf.join(path, key)
    if many:
        for i, item in enumerate(value if isinstance(value, list) else ()):
            yield from _values_at(item, rest, f"{p}[{i}]")
    else:
        yield from _values_at(value, rest, p)


def _limit_problems(spec_data: Mapping) -> sf.Problems:
    out = []
    for where, bounds in LIBRARY_LIMITS.items():
        for path, value in _values_at(spec_data, where.split("."), ""):
            value = tuple(value) if isinstance(value, list) else value
            extra = " (a Kubernetes limit of the PruningSearch CRD)"
            out.extend((path, m + extra) for m in sf.bound_problems(bounds, value))
    return out


# ----------------------------------------------------------------------------- loading

def load_kube_spec(spec_data: Mapping[str, Any]) -> KubeSpec:
    """The :class:`KubeSpec` of a bare ``spec`` mapping (library keys are ignored)."""
    errors: sf.Problems = []
    kube = _build(KubeSpec, {k: v for k, v in spec_data.items() if k in KUBERNETES_FIELDS}, "", errors)
    if errors or kube is sf.INVALID:
        raise SpecError(errors or [("", "invalid Kubernetes fields")])
    return kube


def load_psearch(source: str | os.PathLike[str] | Mapping[str, Any]
                 ) -> tuple[PruningSearchSpec, KubeSpec]:
    """Validate a PruningSearch manifest (or a bare spec) as a whole: ``(library spec, KubeSpec)``.

    Reads a YAML/JSON path or a mapping. Every problem of both halves, of the Kubernetes limits
    and of the rules across them is reported in one ``SpecError`` with paths relative to ``spec``.
    """
    data = source if isinstance(source, Mapping) else read_document(source)
    if not isinstance(data, Mapping):
        raise SpecError(f"a PruningSearch must be a mapping, got {type(data).__name__}")
    errors: sf.Problems = []
    spec = None
    try:
        spec = load_spec(data, extra_allowed=KUBERNETES_FIELDS)
    except SpecError as e:
        errors.extend(_with_all_field_names(e.errors))
    is_manifest = "apiVersion" in data or "kind" in data
    spec_data = data.get("spec") if is_manifest else data
    kube = sf.INVALID
    if isinstance(spec_data, Mapping):
        if is_manifest and "name" in spec_data and not any(p == "name" for p, _ in errors):
            errors.append(("name", "unknown field 'name': a PruningSearch is named by metadata.name"))
        kube = _build(KubeSpec, {k: v for k, v in spec_data.items() if k in KUBERNETES_FIELDS}, "",
                      errors)
        errors.extend(_limit_problems(spec_data))
        errors.extend(_cross_problems(spec_data))
    unique = list(dict.fromkeys(errors))
    if unique or spec is None or kube is sf.INVALID:
        raise SpecError(unique or [("", "invalid PruningSearch")])
    return spec, kube


def _with_all_field_names(errors: sf.Problems) -> sf.Problems:
    """The library's unknown-field errors at the top level suggest Kubernetes fields too."""
    names = [f.name for f in dataclasses.fields(PruningSearchSpec) if f.name != "name"]
    names += [f.name for f in dataclasses.fields(KubeSpec)]
    out = []
    for path, message in errors:
        if "." not in path and message.startswith(f"unknown field {path!r}"):
            message = (f"unknown field {path!r}"
                       + (sf.did_you_mean(path, names) or f"; allowed: {', '.join(names)}"))
        out.append((path, message))
    return out


def _cross_problems(spec_data: Mapping) -> sf.Problems:
    """Rules relating the two halves (mirrored by CEL rules on the CRD's spec)."""
    if spec_data.get("s3") is None:
        return []
    store = spec_data.get("store", "file://./runs")
    if isinstance(store, str) and not store.startswith("s3://"):
        shown = "" if "store" in spec_data else " (the default)"
        return [("store", f"must be an s3:// URI when s3 is set, got {store!r}{shown}")]
    return []


def kube_spec_to_dict(kube: KubeSpec) -> dict[str, Any]:
    """Plain JSON-ready data (FrozenMaps -> dicts, tuples -> lists), fields in declaration order."""
    return sf.to_plain(kube)
