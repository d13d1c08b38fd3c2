"""The Kubernetes-only half of a ``PruningSearch`` spec, and loading both halves at once.

Why it exists: a ``PruningSearch`` manifest's ``spec`` is the library's ``PruningSearchSpec`` plus a
few top-level fields only the operator reads: the job image, how many pods per generation, their
resources and pod overrides, S3 credentials and lifecycle knobs. They are typed, documented frozen
dataclasses on the same ``SpecNode``/``setting`` machinery as the library (a docstring under every
field becomes the CRD description), named as Katib/Trainer/KubeRay/JobSet/Kueue users know them.

The library machinery has no maps or free-form objects; Kubernetes needs both (``nodeSelector``,
``resources.limits``, ``affinity``, ``volumes``), so ``_kconvert`` adds them: ``dict[str, V]``
annotations (V = ``str``, ``int``, :data:`Quantity` or ``Any`` for free-form JSON) are read into a
hashable :class:`FrozenMap`. The pod-level types (resources, tolerations, env, pod overrides) live
in ``_kpod``; this module holds the root :class:`KubeSpec` and is the public face of all three:
import every name from here. ``darwinlm_operator.crd`` turns the same dataclasses into the CRD schema.

:func:`load_psearch` validates a whole manifest (or bare spec): the library half with
``darwinlm.spec.load_spec`` and this half here, plus the Kubernetes-only limits the CRD puts on
library fields (:data:`LIBRARY_LIMITS`), and raises ONE ``SpecError`` with every problem. Paths are
relative to ``spec`` (``podTemplate.env[0].name``), as the library's are; ``metadata.name``,
``apiVersion`` and ``kind`` are the manifest's own.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import types
import typing
from collections.abc import Iterator, Mapping
from typing import Any, Literal

from darwinlm.errors import SpecError
from darwinlm.spec import Bounds, PruningSearchSpec, SpecNode, load_spec, read_document, setting
from darwinlm.spec import fields as sf

from ._kconvert import (  # noqa: F401 - the names not used here are re-exported (crd, callers)
    DNS_LABEL,
    DNS_SUBDOMAIN,
    DNS_SUBDOMAIN_MESSAGE,
    ENV_NAME,
    HTTP_URL,
    IMAGE_REFERENCE,
    LABEL_VALUE,
    QUALIFIED_NAME,
    QUANTITY,
    SECRET_KEY,
    FrozenMap,
    OpenKey,
    Quantity,
    Rule,
    check_field,
    convert,
    from_mapping,
    key_path,
    kfield,
    map_value_hint,
    parse_quantity,
)
from ._kpod import (  # noqa: F401 - re-exported
    CREDENTIAL_ENV,
    NODE_RULES,
    EnvVar,
    LocalObjectReference,
    PodTemplateOverrides,
    ResourceRequirements,
    Toleration,
)

__all__ = [
    "KUBERNETES_FIELDS", "LIBRARY_LIMITS", "KubeSpec", "ResourceRequirements", "PodTemplateOverrides",
    "Toleration", "LocalObjectReference", "EnvVar", "S3Spec", "S3SecretRef", "FrozenMap",
    "Quantity", "Rule", "NODE_RULES", "load_psearch", "load_kube_spec", "kube_spec_to_dict", "parse_quantity",
    "JobDefaults", "job_image", "PULL_POLICIES", "DEFAULT_PULL_POLICY",
]

PULL_POLICIES = ("Always", "IfNotPresent", "Never")
DEFAULT_PULL_POLICY = "IfNotPresent"  # when neither the spec nor the operator names a pull policy
MAX_STRING = 4096  # CRD maxLength of library strings that declare none (keeps CEL cost estimable)
MAX_STAGES = 8  # CRD maxItems of search.selection: the pairwise survivor rules are unrolled to it


# ----------------------------------------------------------------------------- the Kubernetes fields

@dataclasses.dataclass(frozen=True, kw_only=True)
class S3SecretRef(SpecNode):
    """A Secret in the PruningSearch's namespace with the S3 access key pair."""

    name: str = setting(pattern=DNS_SUBDOMAIN, max_length=253, message=DNS_SUBDOMAIN_MESSAGE)
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
    generationsPerJob: int | None = setting(None, ge=0, le=100000)
    """Generations each generation Job runs in one process group before it exits: 1 = one Job per
    generation; N = generations g..g+N-1; 0 = every generation up to the end of the search. A warm Job
    keeps the model, the database and the teacher cache resident, so pod start, imports, model load and
    cache builds are paid once per Job instead of once per generation (bench/README.md measures it). Each
    generation still writes its state to the store when it finishes: a Job killed or preempted mid-way
    loses at most the generation in flight, and the next Job starts from the store. The result does not
    depend on it. null = the operator's default (DARWINLM_GENERATIONS_PER_JOB, set by the Helm chart
    from generationsPerJob: 0), else 1."""
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
    queueName: str | None = setting(None, pattern=DNS_SUBDOMAIN, max_length=63, message=DNS_SUBDOMAIN_MESSAGE)
    """Kueue LocalQueue for the job pods: set as label kueue.x-k8s.io/queue-name on every Job, so
    Kueue admits them against its quotas. null = not queued by Kueue."""

    def __post_init__(self) -> None:
        # The whole tree is checked here, as PruningSearchSpec does: an instance is always valid.
        errors: sf.Problems = []
        hints = sf.type_hints(type(self))
        for f in dataclasses.fields(self):
            value = convert(sf.to_plain(getattr(self, f.name)), hints[f.name], f.metadata, f.name,
                             errors)
            check_field(f, value, f.name, errors)
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
    generations_per_job: int | None = None
    """``generationsPerJob`` of searches that set none (DARWINLM_GENERATIONS_PER_JOB, the chart's
    ``generationsPerJob``); None = 1."""

    def __post_init__(self) -> None:
        if self.image is not None and (len(self.image) > 1024 or not re.search(IMAGE_REFERENCE, self.image)):
            raise ValueError(f"the default job image must be an image reference without spaces "
                             f"(at most 1024 characters), got {self.image!r}")
        if self.generations_per_job is not None and not (isinstance(self.generations_per_job, int)
                                                         and self.generations_per_job >= 0):
            raise ValueError(f"the default generationsPerJob must be an integer >= 0, got {self.generations_per_job!r}")
        if self.image_pull_policy is not None and self.image_pull_policy not in PULL_POLICIES:
            raise ValueError(f"the default job image pull policy must be one of {', '.join(PULL_POLICIES)}, "
                             f"got {self.image_pull_policy!r}")


def generations_per_job(kube: KubeSpec, defaults: JobDefaults | None = None) -> int:
    """A search's ``generationsPerJob``: the spec's, else the operator's default, else 1."""
    if kube.generationsPerJob is not None:
        return kube.generationsPerJob
    if defaults is not None and defaults.generations_per_job is not None:
        return defaults.generations_per_job
    return 1


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
              "evaluation.baselines": Bounds(max_items=2),
              "evaluation.extra_heldout": Bounds(max_items=16)}
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
    kube = from_mapping(KubeSpec, {k: v for k, v in spec_data.items() if k in KUBERNETES_FIELDS}, "", errors)
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
        kube = from_mapping(KubeSpec, {k: v for k, v in spec_data.items() if k in KUBERNETES_FIELDS}, "",
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
