"""The pod-level types of a search's Kubernetes fields: resources, tolerations, env, pod overrides.

Why it exists: ``KubeSpec.resources`` and ``KubeSpec.podTemplate`` (``darwinlm_operator.kspec``)
carry core/v1 look-alikes (ResourceRequirements, Toleration, EnvVar, LocalObjectReference, extra
Volumes and VolumeMounts) that the operator merges into every job pod. They are frozen dataclasses
on the ``_kconvert`` machinery, a docstring under every field (the CRD description), each with the
rules of its ``_problems()`` mirrored as CEL rules in :data:`NODE_RULES`. Import them from
``darwinlm_operator.kspec``.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from typing import Any, Literal

from darwinlm.spec import fields as sf
from darwinlm.spec import Bounds, SpecNode, setting

from ._kconvert import (
    DNS_LABEL,
    DNS_LABEL_MESSAGE,
    DNS_SUBDOMAIN,
    DNS_SUBDOMAIN_MESSAGE,
    ENV_NAME,
    LABEL_VALUE,
    QUALIFIED_NAME,
    FrozenMap,
    OpenKey,
    Quantity,
    Rule,
    key_path,
    kfield,
    parse_quantity,
)

__all__ = [
    "CREDENTIAL_ENV",
    "NODE_RULES",
    "EnvVar",
    "LocalObjectReference",
    "PodTemplateOverrides",
    "ResourceRequirements",
    "Toleration",
]

CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_ESCAPE_SECRETS = "secrets go only through s3.secretRef, never as plain env values"

_NAME_KEY = OpenKey(Bounds(pattern=DNS_LABEL, max_length=63, message=DNS_LABEL_MESSAGE),
                    "Name of the volume (DNS-1123 label), unique in the pod; volumeMounts refer to it.")
_MOUNT_NAME = OpenKey(Bounds(pattern=DNS_LABEL, max_length=63, message=DNS_LABEL_MESSAGE),
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

    name: str = setting(pattern=DNS_SUBDOMAIN, max_length=253, message=DNS_SUBDOMAIN_MESSAGE)
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
    affinity: dict[str, Any] | None = kfield(None, core="Affinity")
    """A core/v1 Affinity object (nodeAffinity, podAffinity, podAntiAffinity), merged into every
    job pod; checked against the core/v1 schema (unknown fields and wrong types are refused)."""
    priorityClassName: str | None = setting(None, pattern=DNS_SUBDOMAIN, max_length=253,
                                            message=DNS_SUBDOMAIN_MESSAGE)
    """PriorityClass of the job pods (preemption order); null = the cluster default."""
    serviceAccountName: str | None = setting(None, pattern=DNS_SUBDOMAIN, max_length=253,
                                             message=DNS_SUBDOMAIN_MESSAGE)
    """ServiceAccount the job pods run as (e.g. one bound to an IAM role for S3 via IRSA/workload
    identity); null = the namespace's default."""
    imagePullSecrets: tuple[LocalObjectReference, ...] = kfield((), max_items=16,
                                                                list_map_keys=("name",))
    """docker-registry Secrets used to pull `image` from a private registry."""
    env: tuple[EnvVar, ...] = kfield((), max_items=128, list_map_keys=("name",))
    """Extra environment variables of the job container (plain values only)."""
    volumes: tuple[dict[str, Any], ...] = kfield((), max_items=64, open_keys={"name": _NAME_KEY},
                                                 list_map_keys=("name",), core="Volume")
    """Extra core/v1 Volumes of the job pods (e.g. a PVC with the model), checked against the
    core/v1 schema; sources: persistentVolumeClaim, emptyDir, hostPath, configMap, secret, nfs, csi,
    projected, downwardAPI, image. The operator's own scratch volumes win on a name clash."""
    volumeMounts: tuple[dict[str, Any], ...] = kfield(
        (), max_items=64, open_keys={"name": _MOUNT_NAME, "mountPath": _MOUNT_PATH},
        list_map_keys=("mountPath",), core="VolumeMount")
    """Extra core/v1 VolumeMounts of the job container (name, mountPath, readOnly, subPath...),
    checked against the core/v1 schema. The operator's own scratch mounts win on a mountPath
    clash."""
