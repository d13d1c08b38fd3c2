"""The project's Kubernetes API emulator for tests: kmock 0.8's ``KubernetesEmulator`` plus a realism layer.

kmock (by the kopf author) gives an in-memory API over HTTP with discovery for the built-in groups. On its own it
breaks kopf, kubectl and the ``kubernetes`` client in many small ways (see /work/shared/design/TEST_INFRA.md §1).
This module keeps kmock's routing, discovery, request recording and user reactions, and replaces its object
store semantics (create / patch / replace / delete / list / watch) with ones closer to a real kube-apiserver.

Run it standalone (prints ``kmock listening on http://127.0.0.1:PORT``; ``KMOCK_PORT=0`` picks a free port)::

    KMOCK_PORT=18080 python tests/support/kmock_server.py [--kubeconfig PATH]

or in-process::

    with EmulatorThread() as emu:           # its own thread + event loop
        emu.write_kubeconfig(path); emu.objects(); emu.url

or as kmock's pytest fixture class: ``pytestmark = pytest.mark.kmock(cls=Emulator)`` in a test module (kmock's
``kmock_cls`` ini option only accepts a top-level ``module.Class``, i.e. ``kmock_server.Emulator`` with
``tests/support`` on the python path). The standard namespaces are pre-created and the bundled discovery loaded
(``Emulator(bootstrap=False)`` for a bare one).

Performance: kmock matches every request against its reactions by scanning all recorded requests (O(n) per
request). When no user reactions were added, requests for resources are routed directly (O(1)); the standalone
server and ``EmulatorThread`` also keep only the newest 50-100 recorded requests/errors.

What is emulated (on top of plain kmock):
  * paths: ``/api/v1/namespaces[/<name>[/status|/finalize]]``; ``/healthz``, ``/readyz``, ``/livez``
  * metadata: uid, resourceVersion (one global counter), creationTimestamp, generation (bumped when anything outside
    metadata/status changes), generateName, apiVersion/kind filled in; no-op updates keep the resourceVersion and
    emit no watch event (like the apiserver)
  * validation (422 Invalid, apiserver-style messages): object names (DNS-1123), label keys/values (63 chars),
    annotation types; Jobs (restartPolicy Never/OnFailure, containers with name+image, Indexed needs completions,
    immutable spec.template/completionMode/selector, name usable as a label value); Pods; CRD name ==
    <plural>.<group>; custom resources against the CRD's ``openAPIV3Schema`` (with ``jsonschema``), including
    pruning of unknown fields (``x-kubernetes-preserve-unknown-fields`` respected), dropping of non-nullable nulls,
    and ``default:`` values
  * defaulting: Jobs (parallelism, completions, backoffLimit 6, completionMode, suspend, selector +
    ``batch.kubernetes.io/controller-uid``/``job-name`` template labels, Job labels from the template),
    Pods (restartPolicy Always, status Pending), Secrets (``stringData`` -> base64 ``data``), Services (clusterIP),
    Namespaces (phase Active, ``kubernetes.io/metadata.name`` label), CRDs (status Established/NamesAccepted)
  * namespaces must exist for namespaced creates (404 like the apiserver); ``default``, ``kube-system``,
    ``kube-public`` and one Node (``emulator-node``, 8 ``nvidia.com/gpu``) are pre-created
  * status subresource: for resources that have one (built-ins per discovery, CRs per ``subresources.status``),
    writes to ``/status`` change only ``.status``, and writes to the main resource ignore ``.status``;
    ``status`` is reset on create
  * PATCH: JSON patch (failed ``test`` -> 422), JSON merge patch (RFC 7386), strategic merge patch for built-ins
    (merge keys for containers/env/volumes/ports/conditions/ownerReferences..., ``$patch``, ``$setElementOrder``,
    ``$deleteFromPrimitiveList``, ``$retainKeys``); strategic merge on custom resources -> 415 like the apiserver;
    server-side apply -> 415 (not emulated); ``metadata.resourceVersion`` in a merge patch is a precondition (409)
  * PUT / ``replace_*`` with optimistic concurrency (409 Conflict on a stale resourceVersion)
  * DELETE: finalizers (deletionTimestamp, removed when the last finalizer goes, no new finalizers while
    deleting), preconditions, ``dryRun``, ``propagationPolicy`` (body or query) / ``orphanDependents``;
    ownerReference garbage collection (Background/Foreground cascade; Orphan strips the ownerReferences). The
    default policy is Background, except **batch/v1 Jobs default to Orphan**, as in the real apiserver: deleting a
    Job through the API without ``propagationPolicy`` leaves its Pods behind. Deleting a Namespace deletes its
    content; deleting a CRD deletes its custom resources. DELETE on a collection (``deletecollection``)
  * list/watch: label selectors (``a=b``, ``a==b``, ``a!=b``, ``a``, ``!a``, ``a in (x,y)``, ``a notin (x)``,
    comma = AND) and field selectors (``=``, ``==``, ``!=`` on any dotted path: metadata.name, status.phase, ...);
    ``<Kind>List`` with a real resourceVersion; watch replays from an event history newer than the requested
    resourceVersion (so deletions between list and watch are delivered; 410 Gone when too old), ADDED for all
    objects when no resourceVersion is given, objects leaving/entering a label selector become DELETED/ADDED,
    ``timeoutSeconds`` ends the stream, ``sendInitialEvents`` + initial-events-end BOOKMARK, JSON content type
    (``kubectl get -w`` and ``kubectl delete --wait`` work); the bus is subscribed before the replay, so no event
    is lost between replay and live streaming (plain kmock could lose them)
  * server-side tables (what ``kubectl get`` prints): ``Accept: application/json;as=Table;v=v1|v1beta1;
    g=meta.k8s.io`` on get/list/watch answers a ``meta.k8s.io`` ``Table``. Custom resources: Name plus the CRD
    version's ``additionalPrinterColumns`` (default: Age), cells from each column's JSONPath (fields, ``['k']``,
    ``[i]``, ``[*]``, ``[?(@.type=="Ready")]``), typed like the apiextensions apiserver (``date`` -> an age such as
    ``5m3s``, ``number``/``integer``/``boolean`` typed, ``string`` printed, missing -> null); priority-1 columns
    included (kubectl shows them with ``-o wide``). Built-ins: Jobs, Pods, Namespaces and CRDs as the apiserver
    prints them, others Name/Age. Rows carry ``PartialObjectMetadata`` (``includeObject=Metadata``, the default),
    the object (``Object``) or nothing (``None``); watch events carry one-row Tables, the column definitions only in
    the first. ``as=PartialObjectMetadata[List]`` answers metadata only. Categories work (``kubectl get darwinlm``)
  * pod logs: ``GET .../pods/<name>/log`` serves the file named by the pod annotation
    ``kmock-emulator/log-path`` (set by tests/support/pod_runner.py), with ``tailLines``/``limitBytes``
  * Status error bodies with machine reasons (NotFound, AlreadyExists, Conflict, Invalid, BadRequest, Gone,
    UnsupportedMediaType, Forbidden) and the right HTTP codes; POST answers 201
  * the kmock ``/api/v1/namespaces`` parse crash, ``/v1`` groupVersion, subresource shortNames (kubectl) fixed;
    CRDs POSTed to the API are registered in discovery (and unregistered on delete)

Still NOT emulated: controllers (no Pods for Jobs: tests/support/pod_runner.py plays the Job controller and the
kubelet), the scheduler, server-side apply, protobuf bodies (kubectl's typed ``create job``/``create namespace``),
``/openapi/v2|v3`` (use ``kubectl --validate=false``), CEL rules (``x-kubernetes-validations``), admission
webhooks, RBAC/authn (any token works), pagination (``limit``/``continue`` ignored: everything in one page),
``resourceVersionMatch``, the Eviction API, exec/attach/port-forward, conversion webhooks (only the served versions
as stored), ``scale`` subresources, graceful Pod deletion (Pods go at once), Foreground deletion's
``foregroundDeletion`` finalizer (dependents are deleted first, synchronously), field-selector validation, 406 Not
Acceptable (an ``Accept`` offering only unknown ``as=`` targets gets the plain object), and the apiserver's printers
for built-ins other than Jobs, Pods, Namespaces and CRDs (the others get Name, Age).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import copy
import datetime
import json
import os
import pathlib
import random
import re
import signal
import sys
import threading
import uuid
from typing import Any

import aiohttp.web
import jsonpatch
import kmock
from kmock._internal import enums, rendering
from kmock._internal import k8s as _k8s
from kmock._internal import parsing as _parsing

__all__ = ["Emulator", "EmulatorThread", "ApiError", "parse_label_selector", "parse_field_selector",
           "match_labels", "write_kubeconfig", "LOG_PATH_ANNOTATION", "main", "negotiate_as", "jsonpath_first",
           "human_duration", "crd_cell", "crd_columns"]

LOG_PATH_ANNOTATION = "kmock-emulator/log-path"
_PROTOBUF_MSG = ("protobuf request bodies are not supported by the kmock emulator (kubectl's typed generators such as "
                 "`kubectl create job|namespace|secret` send them): use `kubectl apply -f` with YAML/JSON")
HISTORY_SIZE = 50_000           # watch-cache events kept for ?resourceVersion=N replays
NODE_NAME = "emulator-node"

# --------------------------------------------------------------------------------------------------------------
# kmock 0.8 mis-parses /api/v1/namespaces[/<name>] (crash or wrong resource). Patch the module-level parser once.

if not getattr(_parsing.parse_path, "_darwinlm_patched", False):
    _orig_parse = _parsing.parse_path

    def _parse_path(path: str):
        parts = path.strip("/").split("/")
        if (parts[:2] == ["api", "v1"] and len(parts) in (3, 4, 5) and parts[2] == "namespaces"
                and (len(parts) < 5 or parts[4] in ("status", "finalize"))):
            return _parsing.ParsedPath("", "v1", "namespaces", None,
                                       parts[3] if len(parts) > 3 else None, parts[4] if len(parts) > 4 else None)
        return _orig_parse(path)

    _parse_path._darwinlm_patched = True  # type: ignore[attr-defined]
    _parsing.parse_path = _parse_path

    # The kubernetes Python client sends ``?watch=True``; kmock only recognises ``watch=true`` (Go's ParseBool
    # accepts 1, t, T, TRUE, true, True).
    _orig_guess = _parsing.guess_k8s

    def _guess_k8s(k8s, method, query):
        if query.get("watch") in ("1", "t", "T", "TRUE", "True"):
            query = dict(query, watch="true")
        return _orig_guess(k8s, method, query)

    _parsing.guess_k8s = _guess_k8s


# --------------------------------------------------------------------------------------------------------------
# Errors

class ApiError(Exception):
    """An apiserver-style failure: rendered as a ``Status`` body with ``code``/``reason``/``message``."""

    def __init__(self, code: int, reason: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}


def _qual(resource) -> str:
    return f"{resource.plural}.{resource.group}" if resource.group else str(resource.plural)


def _not_found(resource, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{_qual(resource)} "{name}" not found',
                    {"name": name, "group": resource.group, "kind": resource.plural})


def _invalid(kind: str, group: str, name: str, causes: list[tuple[str, str]]) -> ApiError:
    qual = f"{kind}.{group}" if group else kind
    text = "; ".join(f"{f}: {m}" if f else m for f, m in causes)
    msg = f'{qual} "{name}" is invalid: ' + (f"[{text}]" if len(causes) > 1 else text)
    return ApiError(422, "Invalid", msg, {"name": name, "group": group, "kind": kind,
                                          "causes": [{"reason": "FieldValueInvalid", "message": m, "field": f}
                                                     for f, m in causes]})


def _conflict(resource, name: str, why: str = "the object has been modified; please apply your changes to "
                                               "the latest version and try again") -> ApiError:
    return ApiError(409, "Conflict", f'Operation cannot be fulfilled on {_qual(resource)} "{name}": {why}',
                    {"name": name, "group": resource.group, "kind": resource.plural})


# --------------------------------------------------------------------------------------------------------------
# Selectors

_SEL_IN = re.compile(r"^\s*(!?)\s*([^\s!=<>,()]+)\s*(?:(=|==|!=|\s+in\s+|\s+notin\s+)\s*(.*?))?\s*$")


def _split_selector(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def parse_label_selector(text: str | None) -> list[tuple[str, str, Any]]:
    """``"a=b,c!=d,e,!f,g in (x,y),h notin (z)"`` -> ``[(key, op, value)]``; op in =, !=, exists, !exists, in, notin."""
    reqs: list[tuple[str, str, Any]] = []
    for part in _split_selector(text or ""):
        m = re.match(r"^([^\s!=,()]+)\s+(in|notin)\s*\((.*)\)$", part)
        if m:
            vals = {v.strip() for v in m.group(3).split(",") if v.strip()}
            reqs.append((m.group(1), m.group(2), vals))
            continue
        m = re.match(r"^([^\s!=,()]+)\s*(==|=|!=)\s*([^\s,()]*)$", part)
        if m:
            reqs.append((m.group(1), "!=" if m.group(2) == "!=" else "=", m.group(3)))
            continue
        m = re.match(r"^(!?)\s*([^\s!=,()]+)$", part)
        if m:
            reqs.append((m.group(2), "!exists" if m.group(1) else "exists", None))
            continue
        raise ApiError(400, "BadRequest", f"unable to parse requirement: {part!r} in label selector {text!r}")
    return reqs


def match_labels(labels: dict | None, reqs: list[tuple[str, str, Any]]) -> bool:
    labels = labels or {}
    for key, op, val in reqs:
        have = key in labels
        cur = labels.get(key)
        if op == "=" and cur != val:
            return False
        if op == "!=" and have and cur == val:
            return False
        if op == "exists" and not have:
            return False
        if op == "!exists" and have:
            return False
        if op == "in" and (not have or cur not in val):
            return False
        if op == "notin" and have and cur in val:
            return False
    return True


def parse_field_selector(text: str | None) -> list[tuple[str, str, str]]:
    reqs = []
    for part in _split_selector(text or ""):
        m = re.match(r"^([^\s!=]+)\s*(==|=|!=)\s*(.*)$", part)
        if not m:
            raise ApiError(400, "BadRequest", f"invalid field selector: {part!r}")
        reqs.append((m.group(1), "!=" if m.group(2) == "!=" else "=", m.group(3)))
    return reqs


def _dig(obj: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


def _match_fields(obj: dict, reqs: list[tuple[str, str, str]]) -> bool:
    for path, op, val in reqs:
        cur = _dig(obj, path)
        cur = "" if cur is None else (str(cur).lower() if isinstance(cur, bool) else str(cur))
        if (op == "=") != (cur == val):
            return False
    return True


# --------------------------------------------------------------------------------------------------------------
# Patching

def json_merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            result.pop(k, None)
        else:
            result[k] = json_merge(result.get(k), v)
    return result


_SMP_KEYS = {"containers": "name", "initContainers": "name", "ephemeralContainers": "name", "env": "name",
             "volumes": "name", "volumeMounts": "mountPath", "volumeDevices": "devicePath", "conditions": "type",
             "ownerReferences": "uid", "imagePullSecrets": "name", "containerStatuses": "name",
             "initContainerStatuses": "name", "hostAliases": "ip", "resourceClaims": "name", "tolerations": None,
             "ports": "*ports*"}
_SMP_PRIMITIVE_MERGE = {"finalizers"}


def _smp_clean(item: Any) -> Any:
    if isinstance(item, dict):
        return {k: _smp_clean(v) for k, v in item.items() if not k.startswith("$")}
    if isinstance(item, list):
        return [_smp_clean(x) for x in item]
    return item


def _smp_list(cur: list, patch: list, key: str) -> list:
    out = [copy.deepcopy(x) for x in cur]
    for item in patch:
        if not isinstance(item, dict):
            out.append(item)
            continue
        k = key
        if key == "*ports*":
            k = "containerPort" if "containerPort" in item else "port"
        idx = next((i for i, x in enumerate(out) if isinstance(x, dict) and k in item and x.get(k) == item.get(k)),
                   None)
        if item.get("$patch") == "delete":
            if idx is not None:
                out.pop(idx)
            continue
        if idx is None:
            out.append(_smp_clean(item))
        else:
            out[idx] = strategic_merge(out[idx], item)
    return out


def strategic_merge(orig: Any, patch: Any) -> Any:
    """A practical subset of Kubernetes strategic merge patch (see the module docstring)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return _smp_clean(patch)
    result = dict(orig) if isinstance(orig, dict) else {}
    for k, v in patch.items():
        if k in ("$patch", "$retainKeys") or k.startswith("$setElementOrder/"):
            continue
        if k.startswith("$deleteFromPrimitiveList/"):
            field = k.split("/", 1)[1]
            result[field] = [x for x in result.get(field) or [] if x not in (v or [])]
            continue
        cur = result.get(k)
        if v is None:
            result.pop(k, None)
        elif isinstance(v, dict):
            if v.get("$patch") == "delete":
                result.pop(k, None)
            else:
                result[k] = strategic_merge(cur if isinstance(cur, dict) else {}, v)
        elif isinstance(v, list) and isinstance(cur, list) and _SMP_KEYS.get(k):
            result[k] = _smp_list(cur, v, _SMP_KEYS[k])
        elif isinstance(v, list) and isinstance(cur, list) and k in _SMP_PRIMITIVE_MERGE:
            result[k] = cur + [x for x in v if x not in cur]
        else:
            result[k] = _smp_clean(v)
    if isinstance(patch.get("$retainKeys"), list):
        keep = set(patch["$retainKeys"])
        result = {k: v for k, v in result.items() if k in keep}
    return result


# --------------------------------------------------------------------------------------------------------------
# Validation helpers

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_QNAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_GEN_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


def _check_name(name: Any, *, label: bool = False, max_len: int | None = None) -> str | None:
    if not isinstance(name, str) or not name:
        return "Required value: name or generateName is required"
    limit = max_len or (63 if label else 253)
    if len(name) > limit:
        return f'Invalid value: "{name}": must be no more than {limit} characters'
    rx = _DNS_LABEL if label else _DNS_SUBDOMAIN
    if not rx.match(name):
        what = "RFC 1123 label" if label else "RFC 1123 subdomain"
        return (f'Invalid value: "{name}": a lowercase {what} must consist of lower case alphanumeric characters, '
                f"'-'{'' if label else ' or ' + repr('.')}, and must start and end with an alphanumeric character")
    return None


def _check_qualified_key(key: str) -> str | None:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return f'Invalid value: "{key}": prefix part must be a lowercase RFC 1123 subdomain'
    if not name or len(name) > 63 or not _QNAME.match(name):
        return (f'Invalid value: "{key}": name part must consist of alphanumeric characters, \'-\', \'_\' or '
                f"'.', must start and end with an alphanumeric character, and be no more than 63 characters")
    return None


def _check_labels(labels: Any, field: str) -> list[tuple[str, str]]:
    errs: list[tuple[str, str]] = []
    if labels is None:
        return errs
    if not isinstance(labels, dict):
        raise ApiError(400, "BadRequest", f"json: cannot unmarshal {type(labels).__name__} into Go struct field "
                                          f"{field} of type map[string]string")
    for k, v in labels.items():
        if not isinstance(v, str):
            raise ApiError(400, "BadRequest", f"json: cannot unmarshal {type(v).__name__} into Go struct field "
                                              f"{field} of type string (key {k!r})")
        e = _check_qualified_key(k)
        if e:
            errs.append((field, e))
        if v and (len(v) > 63 or not _QNAME.match(v)):
            errs.append((field, f'Invalid value: "{v}": a valid label must be an empty string or consist of '
                                f"alphanumeric characters, '-', '_' or '.', and must start and end with an "
                                f"alphanumeric character, and must be no more than 63 characters"))
    return errs


def _check_annotations(ann: Any) -> list[tuple[str, str]]:
    errs: list[tuple[str, str]] = []
    if ann is None:
        return errs
    if not isinstance(ann, dict):
        raise ApiError(400, "BadRequest", "metadata.annotations must be a map of strings")
    size = 0
    for k, v in ann.items():
        if not isinstance(v, str):
            raise ApiError(400, "BadRequest", f"json: cannot unmarshal {type(v).__name__} into Go struct field "
                                              f"ObjectMeta.metadata.annotations of type string (key {k!r})")
        e = _check_qualified_key(k)
        if e:
            errs.append(("metadata.annotations", e))
        size += len(k) + len(v)
    if size > 256 * 1024:
        errs.append(("metadata.annotations", "Too long: must have at most 262144 bytes"))
    return errs


# ---- CRD structural schemas: pruning, defaulting, validation ----

def _prune(obj: Any, schema: dict | None, *, root: bool = False) -> Any:
    if not isinstance(schema, dict):
        return obj
    if isinstance(obj, dict):
        props = schema.get("properties") or {}
        addl = schema.get("additionalProperties")
        preserve = schema.get("x-kubernetes-preserve-unknown-fields") is True
        embedded = schema.get("x-kubernetes-embedded-resource") is True
        out = {}
        for k, v in obj.items():
            if root and k in ("apiVersion", "kind", "metadata"):
                out[k] = v
                continue
            if embedded and k in ("apiVersion", "kind", "metadata"):
                out[k] = v
                continue
            sub = props.get(k) if k in props else (addl if isinstance(addl, dict) else None)
            if sub is None and not (k in props or preserve or addl is True):
                continue                                    # unknown field: pruned
            if v is None and not (sub or {}).get("nullable") and not (sub is None and preserve):
                continue                                    # null for a non-nullable field: dropped
            out[k] = _prune(v, sub) if sub is not None else v
        return out
    if isinstance(obj, list):
        return [_prune(x, schema.get("items")) for x in obj]
    return obj


def _apply_defaults(obj: Any, schema: dict | None) -> Any:
    if not isinstance(schema, dict):
        return obj
    if isinstance(obj, dict):
        props = schema.get("properties") or {}
        for k, sub in props.items():
            if k not in obj and isinstance(sub, dict) and "default" in sub:
                obj[k] = copy.deepcopy(sub["default"])
        for k, v in list(obj.items()):
            sub = props.get(k)
            if sub is None and isinstance(schema.get("additionalProperties"), dict):
                sub = schema["additionalProperties"]
            if sub is not None:
                obj[k] = _apply_defaults(v, sub)
        return obj
    if isinstance(obj, list):
        return [_apply_defaults(x, schema.get("items")) for x in obj]
    return obj


def _to_jsonschema(s: Any) -> Any:
    if not isinstance(s, dict):
        return s
    out: dict[str, Any] = {}
    for k, v in s.items():
        if k in ("properties", "patternProperties", "definitions") and isinstance(v, dict):
            out[k] = {pk: _to_jsonschema(pv) for pk, pv in v.items()}
        elif k in ("items", "additionalProperties", "not") and isinstance(v, dict):
            out[k] = _to_jsonschema(v)
        elif k in ("allOf", "anyOf", "oneOf") and isinstance(v, list):
            out[k] = [_to_jsonschema(x) for x in v]
        elif k.startswith("x-kubernetes-") or k in ("nullable", "default", "example", "externalDocs", "format",
                                                      "description", "title"):
            continue
        else:
            out[k] = v
    for bound, excl in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if isinstance(out.get(excl), bool):  # OpenAPI 3.0 boolean form -> the draft-7 number form
            if out.pop(excl) and bound in out:
                out[excl] = out.pop(bound)
    if s.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if s.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out = {"allOf": [out, {"type": ["integer", "string"]}]}
    return out


def _schema_errors(obj: dict, schema: dict) -> list[tuple[str, str]]:
    try:
        import jsonschema
    except ImportError:                                   # validation is best-effort
        return []
    validator = jsonschema.Draft7Validator(_to_jsonschema(schema))
    errs = []
    for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
        path = ".".join(str(p) for p in e.absolute_path)
        if e.validator == "required":
            missing = e.message.split("'")[1] if "'" in e.message else e.message
            errs.append(((path + "." if path else "") + missing, "Required value"))
        else:
            val = json.dumps(e.instance) if not isinstance(e.instance, (dict, list)) else type(e.instance).__name__
            errs.append((path, f"Invalid value: {val}: {path or '<root>'} in body {e.message}"))
    return errs


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _strip_for_generation(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


def _strip_for_noop(obj: dict) -> dict:
    o = dict(obj)
    md = dict(o.get("metadata") or {})
    md.pop("resourceVersion", None)
    md.pop("managedFields", None)
    o["metadata"] = md
    return o


# --------------------------------------------------------------------------------------------------------------
# Server-side tables (``kubectl get``): ``Accept: application/json;as=Table;v=v1;g=meta.k8s.io``

_NAME_DESC = ("Name must be unique within a namespace. Is required when creating resources, although some resources "
              "may allow a client to request the generation of an appropriate name automatically. Name is primarily "
              "intended for creation idempotence and configuration definition. Cannot be updated. More info: "
              "https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names")
_CREATED_DESC = ("CreationTimestamp is a timestamp representing the server time when this object was created. It is "
                 "not guaranteed to be set in happens-before order across separate operations. Clients may not set "
                 "this value. It is represented in RFC3339 form and is in UTC.\n\nPopulated by the system.\nRead-only."
                 "\nNull for lists. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/"
                 "api-conventions.md#metadata")


def negotiate_as(accept: str | None) -> tuple[str, str] | None:
    """The transformation an ``Accept`` header asks for, as the apiserver negotiates it: ``("Table", "v1")``,
    ``("PartialObjectMetadata", "v1beta1")``, ... or None for the plain object. Media types are tried in order;
    ``as=`` targets the emulator does not know are skipped (a real apiserver answers 406 if none fits)."""
    for part in (accept or "").split(","):
        fields = [f.strip() for f in part.split(";")]
        mtype = fields[0].lower()
        if mtype not in ("application/json", "application/*", "*/*", "application/yaml"):
            continue
        params = dict(f.split("=", 1) for f in fields[1:] if "=" in f)
        target = params.get("as")
        if not target:
            return None
        if params.get("g") == "meta.k8s.io" and params.get("v") in ("v1", "v1beta1") and target in (
                "Table", "PartialObjectMetadata", "PartialObjectMetadataList"):
            return target, params["v"]
    return None


def _parse_time(text: Any) -> datetime.datetime | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        t = datetime.datetime.fromisoformat(text)             # RFC 3339, "Z" included (Python 3.11)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=datetime.UTC)


def human_duration(seconds: float) -> str:
    """k8s.io/apimachinery/pkg/util/duration.HumanDuration: what ``kubectl get`` shows as AGE."""
    s = int(seconds)
    if s < -1:
        return "<invalid>"
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        return f"{minutes}m" if s % 60 == 0 else f"{minutes}m{s % 60}s"
    if minutes < 180:
        return f"{minutes}m"
    hours = s // 3600
    if hours < 8:
        return f"{hours}h" if minutes % 60 == 0 else f"{hours}h{minutes % 60}m"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{hours // 24}d" if hours % 24 == 0 else f"{hours // 24}d{hours % 24}h"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        dy = (hours // 24) % 365
        return f"{hours // 24 // 365}y" if dy == 0 else f"{hours // 24 // 365}y{dy}d"
    return f"{hours // 24 // 365}y"


def _since(text: Any, now: datetime.datetime | None = None) -> str:
    """``translateTimestampSince`` / ``ConvertToHumanReadableDateType``: "<unknown>" for a missing timestamp."""
    t = _parse_time(text)
    if t is None:
        return "<unknown>"
    now = now or datetime.datetime.now(datetime.UTC)
    return human_duration((now - t).total_seconds())


# ---- a JSONPath subset, as CRD printer columns use it (k8s.io/client-go/util/jsonpath, AllowMissingKeys) ----

_JP_TOKEN = re.compile(r"""
    \.\.(?P<recursive>)                                  # .. (recursive descent: unsupported, no results)
  | \.(?P<field>(?:\\.|[^.\[\\])+|\*)                   # .name  .na\.me  .*
  | \[\s*(?P<index>-?\d+)\s*\]                           # [0]  [-1]
  | \[\s*(?P<slice>-?\d*\s*:\s*-?\d*)\s*\]               # [1:3]
  | \[\s*\*\s*\](?P<star>)                               # [*]
  | \[\s*(?P<q>['"])(?P<key>.*?)(?P=q)\s*\]              # ['key']  ["key"]
  | \[\s*\?\(\s*(?P<filter>.*?)\s*\)\s*\]                # [?(@.type=="Ready")]
""", re.VERBOSE)
_JP_FILTER = re.compile(r"""^@(?P<path>(?:\.(?:\\.|[^.\s=!<>\\])+)*)\s*(?:(?P<op>==|!=|<=|>=|<|>)\s*(?P<lit>.+))?$""")


def _jp_steps(path: str) -> list[tuple[str, Any]] | None:
    path = path.strip()
    if path.startswith("{") and path.endswith("}"):
        path = path[1:-1].strip()
    path = path.removeprefix("$")
    steps, pos = [], 0
    while pos < len(path):
        m = _JP_TOKEN.match(path, pos)
        if m is None:
            return None
        pos = m.end()
        if m.group("recursive") is not None:
            return None
        if m.group("field") is not None:
            f = m.group("field")
            steps.append(("wild", None) if f == "*" else ("field", re.sub(r"\\(.)", r"\1", f)))
        elif m.group("index") is not None:
            steps.append(("index", int(m.group("index"))))
        elif m.group("slice") is not None:
            a, b = (x.strip() for x in m.group("slice").split(":"))
            steps.append(("slice", (int(a) if a else None, int(b) if b else None)))
        elif m.group("star") is not None:
            steps.append(("wild", None))
        elif m.group("key") is not None:
            steps.append(("field", m.group("key")))
        else:
            fm = _JP_FILTER.match(m.group("filter"))
            if fm is None:
                return None
            sub = _jp_steps(fm.group("path") or "")
            lit: Any = None
            if fm.group("op"):
                raw = fm.group("lit").strip()
                if raw[:1] in "'\"" and raw[-1:] == raw[:1]:
                    lit = raw[1:-1]
                else:
                    try:
                        lit = json.loads(raw)
                    except ValueError:
                        lit = raw
            steps.append(("filter", (sub or [], fm.group("op"), lit)))
    return steps


def _jp_eval(steps: list[tuple[str, Any]], root: Any) -> list[Any]:
    cur = [root]
    for kind, arg in steps:
        nxt: list[Any] = []
        for v in cur:
            if kind == "field" and isinstance(v, dict) and arg in v:
                nxt.append(v[arg])
            elif kind == "wild":
                nxt.extend([v[k] for k in sorted(v)] if isinstance(v, dict) else v if isinstance(v, list) else [])
            elif kind == "index" and isinstance(v, list) and -len(v) <= arg < len(v):
                nxt.append(v[arg])
            elif kind == "slice" and isinstance(v, list):
                nxt.extend(v[arg[0]:arg[1]])
            elif kind == "filter" and isinstance(v, list):
                sub, op, lit = arg
                for item in v:
                    found = _jp_eval(sub, item)
                    if not found:
                        continue
                    x = found[0]
                    if op is None:
                        nxt.append(item)
                        continue
                    try:
                        ok = {"==": x == lit, "!=": x != lit, "<": x < lit, ">": x > lit, "<=": x <= lit,
                              ">=": x >= lit}[op]
                    except TypeError:
                        ok = False
                    if ok:
                        nxt.append(item)
        cur = nxt
    return cur


def jsonpath_first(obj: Any, path: str) -> tuple[bool, Any]:
    """(found, value) of the first result of a (simple) JSONPath such as ``.status.phase`` or
    ``.status.conditions[?(@.type=="Ready")].status``; (False, None) when missing or unsupported."""
    steps = _jp_steps(path)
    if steps is None:
        return False, None
    found = _jp_eval(steps, obj)
    return (True, found[0]) if found else (False, None)


def _go_text(value: Any) -> str:
    """jsonpath PrintResults of one value (Go ``fmt.Fprint``; maps and lists as compact JSON)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e21:
            return str(int(value))
        return repr(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    if value is None:
        return "<nil>"
    return str(value)


def crd_cell(ctype: str, found: bool, value: Any, now: datetime.datetime | None = None) -> Any:
    """A custom resource column cell (apiextensions-apiserver's tableconvertor): strings printed, numbers and
    booleans typed, dates turned into an age ("5m3s") like the apiserver does; None (kubectl: <none>) if absent."""
    if not found or value is None:
        return None
    if ctype == "string":
        return _go_text(value)
    if ctype == "integer":
        if isinstance(value, bool):
            return None
        if isinstance(value, int):
            return value
        if isinstance(value, float):
            return int(value)
        return None
    if ctype == "number":
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if ctype == "boolean":
        return value if isinstance(value, bool) else None
    if ctype == "date":
        if isinstance(value, str):
            t = _parse_time(value)
            return "<invalid>" if t is None else _since(value, now)
        return None
    return None


def _column(name: str, ctype: str = "string", description: str = "", *, fmt: str = "", priority: int = 0) -> dict:
    return {"name": name, "type": ctype, "format": fmt, "description": description, "priority": priority}


_NAME_COL = _column("Name", "string", _NAME_DESC, fmt="name")
_AGE_COL = _column("Age", "string", _CREATED_DESC)


def crd_columns(printer_columns: list[dict] | None) -> list[dict]:
    """Table columns of a CRD version: Name, then ``additionalPrinterColumns`` (default: Age, type date)."""
    cols = printer_columns or [{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp",
                                "description": _CREATED_DESC}]
    out = [dict(_NAME_COL)]
    for c in cols:
        out.append(_column(c.get("name", ""), c.get("type", "string"),
                           c.get("description") or f"Custom resource definition column (in JSONPath format): "
                                                    f"{c.get('jsonPath', '')}",
                           fmt=c.get("format", ""), priority=int(c.get("priority") or 0)))
    return out


def _crd_row(obj: dict, printer_columns: list[dict] | None, now: datetime.datetime) -> list[Any]:
    cols = printer_columns or [{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]
    cells: list[Any] = [(obj.get("metadata") or {}).get("name", "")]
    for c in cols:
        found, value = jsonpath_first(obj, c.get("jsonPath", ""))
        cells.append(crd_cell(c.get("type", "string"), found, value, now))
    return cells


# Built-in printers (a few, as in k8s.io/kubernetes/pkg/printers/internalversion; the apiserver always
# sends the wide columns, kubectl hides priority > 0 unless ``-o wide``). Everything else: Name, Age.

def _containers_cells(containers: list[dict]) -> tuple[str, str]:
    return (",".join(c.get("name", "") for c in containers), ",".join(c.get("image", "") for c in containers))


def _selector_text(sel: dict | None) -> str:
    if not sel:
        return "<none>"
    parts = [f"{k}={v}" for k, v in sorted((sel.get("matchLabels") or {}).items())]
    for e in sel.get("matchExpressions") or []:
        op = e.get("operator", "")
        vals = ",".join(sorted(e.get("values") or []))
        parts.append({"In": f"{e.get('key')} in ({vals})", "NotIn": f"{e.get('key')} notin ({vals})",
                      "Exists": f"{e.get('key')}", "DoesNotExist": f"!{e.get('key')}"}.get(op, f"{e.get('key')}"))
    return ",".join(parts) or "<none>"


def _has_cond(obj: dict, ctype: str) -> bool:
    return any(c.get("type") == ctype and c.get("status") == "True"
               for c in (obj.get("status") or {}).get("conditions") or [] if isinstance(c, dict))


def _job_cells(job: dict, now: datetime.datetime) -> list[Any]:
    spec, st, md = job.get("spec") or {}, job.get("status") or {}, job.get("metadata") or {}
    succeeded = int(st.get("succeeded") or 0)
    if spec.get("completions") is not None:
        completions = f"{succeeded}/{spec['completions']}"
    elif int(spec.get("parallelism") or 0) > 1:
        completions = f"{succeeded}/1 of {spec['parallelism']}"
    else:
        completions = f"{succeeded}/1"
    start, end = _parse_time(st.get("startTime")), _parse_time(st.get("completionTime"))
    duration = "" if start is None else human_duration(((end or now) - start).total_seconds())
    if _has_cond(job, "Complete"):
        status = "Complete"
    elif _has_cond(job, "Failed"):
        status = "Failed"
    elif md.get("deletionTimestamp"):
        status = "Terminating"
    elif _has_cond(job, "Suspended"):
        status = "Suspended"
    elif _has_cond(job, "FailureTarget"):
        status = "FailureTarget"
    elif _has_cond(job, "SuccessCriteriaMet"):
        status = "SuccessCriteriaMet"
    else:
        status = "Running"
    names, images = _containers_cells(((spec.get("template") or {}).get("spec") or {}).get("containers") or [])
    return [md.get("name", ""), status, completions, duration, _since(md.get("creationTimestamp"), now),
            names, images, _selector_text(spec.get("selector"))]


def _pod_cells(pod: dict, now: datetime.datetime) -> list[Any]:
    spec, st, md = pod.get("spec") or {}, pod.get("status") or {}, pod.get("metadata") or {}
    phase = st.get("phase") or ""
    reason = st.get("reason") or phase
    total, ready, restarts, running = len(spec.get("containers") or []), 0, 0, False
    for cs in reversed(st.get("containerStatuses") or []):
        restarts += int(cs.get("restartCount") or 0)
        state = cs.get("state") or {}
        waiting, term = state.get("waiting"), state.get("terminated")
        if waiting and waiting.get("reason"):
            reason = waiting["reason"]
        elif term and term.get("reason"):
            reason = term["reason"]
        elif term is not None:
            reason = f"Signal:{term['signal']}" if term.get("signal") else f"ExitCode:{term.get('exitCode', 0)}"
        elif cs.get("ready") and state.get("running") is not None:
            running = True
            ready += 1
    if reason == "Completed" and running:
        reason = "Running" if _has_cond(pod, "Ready") else "NotReady"
    if md.get("deletionTimestamp") and phase not in ("Succeeded", "Failed"):
        reason = "Terminating"
    ips = st.get("podIPs") or []
    ip = (ips[0].get("ip") if ips else st.get("podIP")) or "<none>"
    return [md.get("name", ""), f"{ready}/{total}", reason, str(restarts), _since(md.get("creationTimestamp"), now),
            ip, spec.get("nodeName") or "<none>", st.get("nominatedNodeName") or "<none>", "<none>"]


_BUILTIN_TABLES: dict[tuple[str, str], tuple[list[dict], Any]] = {
    ("batch", "jobs"): ([_NAME_COL, _column("Status", description="Status of the job."),
                        _column("Completions", description="The number of pods which reached phase Succeeded."),
                        _column("Duration", description="Time required to complete the job."), _AGE_COL,
                        _column("Containers", description="Names of each container in the template.", priority=1),
                        _column("Images", description="Images referenced by each container in the template.",
                                priority=1),
                        _column("Selector", description="A label query over pods that should match the pod "
                                                        "count.", priority=1)], _job_cells),
    ("", "pods"): ([_NAME_COL, _column("Ready", description="The aggregate readiness state of this pod for "
                                                            "accepting traffic."),
                    _column("Status", description="The aggregate status of the containers in this pod."),
                    _column("Restarts", description="The number of times the containers in this pod have been "
                                                    "restarted and when the last container in this pod has "
                                                    "restarted."), _AGE_COL,
                    _column("IP", description="IP address allocated to the pod.", priority=1),
                    _column("Node", description="NodeName is a request to schedule this pod onto a specific node.",
                            priority=1),
                    _column("Nominated Node", description="nominatedNodeName is set only when this pod preempts "
                                                          "other pods on the node.", priority=1),
                    _column("Readiness Gates", description="If specified, all readiness gates will be evaluated "
                                                           "for pod readiness.", priority=1)], _pod_cells),
    ("", "namespaces"): ([_NAME_COL, _column("Status", description="The status of the namespace"), _AGE_COL],
                         lambda o, now: [o["metadata"].get("name", ""), (o.get("status") or {}).get("phase", ""),
                                         _since(o["metadata"].get("creationTimestamp"), now)]),
    # no printer in the apiserver: its default table convertor
    ("apiextensions.k8s.io", "customresourcedefinitions"): (
        [_NAME_COL, _column("Created At", "date", _CREATED_DESC)],
        lambda o, now: [o["metadata"].get("name", ""), o["metadata"].get("creationTimestamp")]),
}
_DEFAULT_TABLE = ([_NAME_COL, _AGE_COL],
                  lambda o, now: [(o.get("metadata") or {}).get("name", ""),
                                  _since((o.get("metadata") or {}).get("creationTimestamp"), now)])


def _partial(obj: dict, version: str) -> dict:
    return {"kind": "PartialObjectMetadata", "apiVersion": f"meta.k8s.io/{version}",
            "metadata": copy.deepcopy(obj.get("metadata") or {})}


# --------------------------------------------------------------------------------------------------------------
# The emulator

class Emulator(kmock.KubernetesEmulator):
    """kmock's ``KubernetesEmulator`` with apiserver-like object semantics (see the module docstring)."""

    def __init__(self, *args: Any, bootstrap: bool = True, max_requests_kept: int | None = None,
                 node_gpus: int = 8, **kwargs: Any) -> None:
        self._dk_rv = 0
        self._dk_history: collections.deque = collections.deque(maxlen=HISTORY_SIZE)
        self._dk_oldest_rv = 0                    # oldest resourceVersion still replayable
        self._dk_results: dict[int, Any] = {}
        self._dk_crds: dict[Any, dict] = {}       # resource -> {kind, group, schema, status, crd}
        self._dk_policies: dict[str, str] = {}    # uid -> propagation policy of a pending (finalizer) deletion
        self._dk_max_requests = max_requests_kept
        self._dk_node_gpus = node_gpus
        super().__init__(*args, **kwargs)
        if bootstrap:
            self.bootstrap()

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.fallback[enums.method.PUT] << self._serve_result
        self.fallback[enums.method.DELETE] << self._serve_result
        self.fallback[enums.method.POST] << self._serve_result
        for probe in ("/healthz", "/readyz", "/livez"):
            self.fallback[f"get {probe}"] << b"ok"
        self._dk_own_payloads = len(self._payloads)   # more than this = user reactions: route through kmock's DSL

    # ---- bootstrap ----

    def next_rv(self) -> str:
        self._dk_rv += 1
        return str(self._dk_rv)

    def bootstrap(self) -> None:
        """Load the bundled discovery data and create the standard namespaces and one Node."""
        self.resources.load_bundled()
        for ns in ("default", "kube-system", "kube-public", "kube-node-lease"):
            self.objects["v1/namespaces", None, ns] = {
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": ns, "uid": str(uuid.uuid4()), "resourceVersion": self.next_rv(),
                             "creationTimestamp": _now(), "labels": {"kubernetes.io/metadata.name": ns}},
                "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}
        gpus = str(self._dk_node_gpus)
        self.objects["v1/nodes", None, NODE_NAME] = {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": NODE_NAME, "uid": str(uuid.uuid4()), "resourceVersion": self.next_rv(),
                         "creationTimestamp": _now(),
                         "labels": {"kubernetes.io/hostname": NODE_NAME, "kubernetes.io/os": "linux",
                                    "nvidia.com/gpu.present": "true"}},
            "spec": {},
            "status": {"capacity": {"cpu": "16", "memory": "128Gi", "nvidia.com/gpu": gpus, "pods": "110"},
                       "allocatable": {"cpu": "16", "memory": "128Gi", "nvidia.com/gpu": gpus, "pods": "110"},
                       "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
                       "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                                     {"type": "Hostname", "address": NODE_NAME}]}}

    # ---- resource info ----

    def _info(self, res):
        return self.resources[res] if res in self.resources else None

    def _namespaced(self, res, request_ns: str | None) -> bool:
        info = self._info(res)
        if info is not None and info.namespaced is not None:
            return bool(info.namespaced)
        return request_ns is not None

    def _has_status(self, res) -> bool:
        if res in self._dk_crds:
            return self._dk_crds[res]["status"]
        info = self._info(res)
        return bool(info and "status" in info.subresources)

    def _kind(self, res) -> str:
        info = self._info(res)
        if info is not None and info.kind:
            return info.kind
        return str(res.plural).capitalize()

    def _api_version(self, res) -> str:
        return f"{res.group}/{res.version}" if res.group else str(res.version)

    def _known(self, res) -> bool:
        return res in self.resources or any(r == res for r in self._get_resources())

    def _live(self, key) -> dict | None:
        if key in self._objects and not self._objects[key].deleted:
            return copy.deepcopy(self._objects[key].raw)
        return None

    def _iter_live(self, res=None, namespace: str | None = None):
        for (r, ns, name), obj in list(self._objects.items()):
            if (res is None or r == res) and (namespace is None or ns == namespace) and not obj.deleted:
                yield (r, ns, name), obj.raw

    # ---- publishing ----

    async def _publish(self, res, etype: str, obj: dict, old: dict | None = None) -> None:
        # "_old" (the previous state) lets selector watches turn transitions into ADDED/DELETED; never sent.
        event = {"type": etype, "object": copy.deepcopy(obj), "_old": old}
        rv = int((obj.get("metadata") or {}).get("resourceVersion") or 0)
        if len(self._dk_history) == self._dk_history.maxlen:
            self._dk_oldest_rv = self._dk_history[0][0]
        self._dk_history.append((rv, res, event))
        await self._buses[res].put(event)

    async def _store(self, key, obj: dict, etype: str) -> None:
        old = self._objects[key].raw if key in self._objects and not self._objects[key].deleted else None
        if key in self._objects:
            self._objects[key].create(obj)     # appends a new version (also after a soft-deletion)
        else:
            self._objects[key] = obj
        await self._publish(key[0], etype, obj, old)

    # ---- request dispatch ----

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        if request.resource is not None and request.resource.plural is not None:
            mutate = None
            m = request.method
            if m == enums.method.POST and request.name is None:
                mutate = self._do_create
            elif m == enums.method.PATCH and request.name is not None:
                mutate = self._do_patch
            elif m == enums.method.PUT and request.name is not None:
                mutate = self._do_replace
            elif m == enums.method.DELETE and request.name is not None:
                mutate = self._do_delete
            elif m == enums.method.DELETE and request.name is None:
                mutate = self._do_delete_collection
            elif m == enums.method.POST and request.name is not None:
                raise ApiError(404, "NotFound", f"the server could not find the requested resource "
                                                f"({request.subresource} is not emulated)")
            if mutate is not None:
                if not self._known(request.resource):
                    raise ApiError(404, "NotFound", "the server could not find the requested resource")
                async with self._lock:
                    self._dk_results[id(request)] = await mutate(request)
        # kmock matches a request to a reaction by scanning ALL recorded requests (O(n) per request), so a
        # long-lived server slows down linearly; keep only the newest ones (this request is among them).
        if self._dk_max_requests and len(self._requests) > self._dk_max_requests:
            del self._requests[: len(self._requests) - self._dk_max_requests // 2]
            for errs in self._errors:                   # kmock keeps every served error too
                del errs[: max(0, len(errs) - self._dk_max_requests // 2)]
        try:
            direct = self._direct_route(request)
            if direct is not None:                      # no user reactions: skip the O(n) DSL matching
                return await rendering.Response(payload=direct)(request)
            # Skip KubernetesEmulator._handle (its own object store logic); keep routing + user reactions.
            return await _k8s.KubernetesScaffold._handle(self, request)
        finally:
            self._dk_results.pop(id(request), None)

    def _direct_route(self, request: rendering.Request):
        if len(self._payloads) != getattr(self, "_dk_own_payloads", -1):
            return None
        if request.resource is None or request.resource.plural is None:
            return None
        if id(request) in self._dk_results:
            if request.action == enums.action.CREATE:
                return self._serve_create
            return self._serve_result
        return {enums.action.LIST: self._serve_list, enums.action.WATCH: self._serve_watch,
                enums.action.FETCH: self._serve_fetch}.get(request.action)

    async def _serve_result(self, request: rendering.Request):
        if id(request) not in self._dk_results:
            raise NotImplementedError
        return self._dk_results[id(request)]

    async def _serve_create(self, request: rendering.Request):
        return rendering.Response(status=201, payload=self._dk_results[id(request)])

    async def _serve_update(self, request: rendering.Request):
        return self._dk_results[id(request)]

    async def _serve_delete(self, request: rendering.Request):
        return self._dk_results[id(request)]

    # ---- create ----

    async def _do_create(self, request: rendering.Request) -> dict:
        res = request.resource
        body = request.data
        if not isinstance(body, dict):
            if "protobuf" in (request.headers.get("Content-Type") or "") or request.body[:4] == b"k8s\x00":
                raise ApiError(415, "UnsupportedMediaType", _PROTOBUF_MSG)
            raise ApiError(400, "BadRequest", "the body of the request was in an unknown format - accepted media "
                                              "types include: application/json, application/yaml")
        body = copy.deepcopy(body)
        md = body.setdefault("metadata", {})
        if not isinstance(md, dict):
            raise ApiError(400, "BadRequest", "metadata must be an object")
        kind = self._kind(res)
        body.setdefault("apiVersion", self._api_version(res))
        body.setdefault("kind", kind)
        namespaced = self._namespaced(res, request.namespace)
        ns = None
        if namespaced:
            if md.get("namespace") and request.namespace and md["namespace"] != request.namespace:
                raise ApiError(400, "BadRequest", "the namespace of the provided object does not match the "
                                                  "namespace sent on the request")
            ns = request.namespace or md.get("namespace")
            if not ns:
                raise ApiError(400, "BadRequest", f"{kind} is namespaced: POST it under /namespaces/<ns>/")
            md["namespace"] = ns
            nsobj = self._live((kmock.resource("v1/namespaces"), None, ns))
            if nsobj is None:
                raise ApiError(404, "NotFound", f'namespaces "{ns}" not found',
                               {"name": ns, "kind": "namespaces"})
            if (nsobj.get("metadata") or {}).get("deletionTimestamp"):
                raise ApiError(403, "Forbidden", f"{res.plural} \"{md.get('name', '')}\" is forbidden: unable to "
                                                 f"create new content in namespace {ns} because it is being "
                                                 f"terminated")
        else:
            md.pop("namespace", None)
        if not md.get("name") and md.get("generateName"):
            md["name"] = md["generateName"] + "".join(random.choice(_GEN_ALPHABET) for _ in range(5))
        name = md.get("name")
        label_name = res.plural in ("namespaces", "services")
        err = _check_name(name, label=label_name)
        if err:
            raise _invalid(kind, res.group, str(name or ""), [("metadata.name", err)])
        for f in ("uid", "resourceVersion", "creationTimestamp", "deletionTimestamp", "generation"):
            md.pop(f, None)
        uid = str(uuid.uuid4())
        md["uid"] = uid
        key = (res, ns, name)
        if self._live(key) is not None:
            raise ApiError(409, "AlreadyExists", f'{_qual(res)} "{name}" already exists',
                           {"name": name, "group": res.group, "kind": res.plural})

        if self._has_status(res):
            body.pop("status", None)
        body = self._default_and_validate(res, body, None, creating=True)
        md = body["metadata"]
        md["resourceVersion"] = self.next_rv()
        md["creationTimestamp"] = _now()
        md["generation"] = 1
        if request.params.get("dryRun"):
            return body
        if res.plural == "customresourcedefinitions" and res.group == "apiextensions.k8s.io":
            self._register_crd(body)
        await self._store(key, body, "ADDED")
        return copy.deepcopy(body)

    # ---- kind-specific defaulting & validation (create and update) ----

    def _default_and_validate(self, res, obj: dict, old: dict | None, *, creating: bool,
                              status_only: bool = False) -> dict:
        kind = self._kind(res)
        md = obj["metadata"]
        name = md.get("name", "")
        errs: list[tuple[str, str]] = []
        errs += _check_labels(md.get("labels"), "metadata.labels")
        errs += _check_annotations(md.get("annotations"))
        fins = md.get("finalizers")
        if fins is not None and (not isinstance(fins, list) or not all(isinstance(f, str) for f in fins)):
            raise ApiError(400, "BadRequest", "metadata.finalizers must be a list of strings")
        plural, group = res.plural, res.group
        if group == "" and plural == "namespaces":
            md.setdefault("labels", {})["kubernetes.io/metadata.name"] = name
            if creating:
                obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
                obj["status"] = {"phase": "Active"}
        elif group == "" and plural == "secrets":
            obj.setdefault("type", "Opaque")
            sd = obj.pop("stringData", None) or {}
            data = dict(obj.get("data") or {})
            for k, v in sd.items():
                data[k] = base64.b64encode(str(v).encode()).decode()
            for k, v in data.items():
                try:
                    base64.b64decode(v, validate=True)
                except Exception:
                    errs.append((f"data[{k}]", "Invalid value: <secret contents redacted>: illegal base64 data"))
            obj["data"] = data
        elif group == "" and plural == "configmaps":
            for section in ("data",):
                for k, v in (obj.get(section) or {}).items():
                    if not isinstance(v, str):
                        raise ApiError(400, "BadRequest", f"json: cannot unmarshal {type(v).__name__} into Go "
                                                          f"struct field ConfigMap.data of type string")
        elif group == "" and plural == "services":
            spec = obj.setdefault("spec", {})
            if creating and not spec.get("clusterIP"):
                spec["clusterIP"] = f"10.96.{random.randint(0, 254)}.{random.randint(1, 254)}"
            spec.setdefault("type", "ClusterIP")
            if creating:
                obj["status"] = {"loadBalancer": {}}
        elif group == "" and plural == "pods":
            spec = obj.setdefault("spec", {})
            if creating:
                spec.setdefault("restartPolicy", "Always")
                spec.setdefault("terminationGracePeriodSeconds", 30)
                obj["status"] = {"phase": "Pending", "qosClass": "BestEffort"}
            errs += self._check_pod_spec(spec, "spec")
            if old is not None and not status_only:
                for f in ("containers", "restartPolicy", "volumes", "nodeName"):
                    if f == "nodeName" and not (old.get("spec") or {}).get("nodeName"):
                        continue
                    if (old.get("spec") or {}).get(f) != spec.get(f) and f != "containers":
                        errs.append((f"spec.{f}", "Forbidden: pod updates may not change fields other than "
                                                  "`spec.containers[*].image`, `spec.activeDeadlineSeconds`, "
                                                  "`spec.tolerations`"))
        elif group == "batch" and plural == "jobs":
            errs += self._job_defaults_and_checks(obj, old, creating)
        elif group == "apiextensions.k8s.io" and plural == "customresourcedefinitions":
            spec = obj.get("spec") or {}
            names = spec.get("names") or {}
            if not spec.get("group") or not names.get("plural") or not spec.get("versions"):
                errs.append(("spec", "Required value: group, names.plural and versions are required"))
            elif name != f"{names['plural']}.{spec['group']}":
                errs.append(("metadata.name", f'Invalid value: "{name}": must be spec.names.plural+"."+spec.group'))
            if creating:
                obj["status"] = {
                    "conditions": [
                        {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
                         "message": "no conflicts found", "lastTransitionTime": _now()},
                        {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
                         "message": "the initial names have been accepted", "lastTransitionTime": _now()}],
                    "acceptedNames": dict(names, singular=names.get("singular", "")),
                    "storedVersions": [v["name"] for v in spec.get("versions") or [] if v.get("storage")]}
        elif res in self._dk_crds:
            crd = self._dk_crds[res]
            schema = crd.get("schema")
            if schema:
                pruned = _prune(obj, schema, root=True)
                obj.clear()
                obj.update(pruned)
                _apply_defaults(obj, schema)
                errs += _schema_errors({k: v for k, v in obj.items() if k != "metadata"},
                                       {**schema, "properties": {k: v for k, v in (schema.get("properties") or
                                                                                      {}).items()
                                                                 if k != "metadata"}})
            kind = crd["kind"]
        if errs:
            raise _invalid(kind, group, name, errs)
        return obj

    @staticmethod
    def _check_pod_spec(spec: dict, path: str) -> list[tuple[str, str]]:
        errs = []
        containers = spec.get("containers")
        if not isinstance(containers, list) or not containers:
            return [(f"{path}.containers", "Required value")]
        seen = set()
        for i, c in enumerate(containers):
            if not isinstance(c, dict):
                errs.append((f"{path}.containers[{i}]", "Invalid value: must be an object"))
                continue
            if not c.get("name"):
                errs.append((f"{path}.containers[{i}].name", "Required value"))
            elif c["name"] in seen:
                errs.append((f"{path}.containers[{i}].name", f'Duplicate value: "{c["name"]}"'))
            seen.add(c.get("name"))
            if not c.get("image"):
                errs.append((f"{path}.containers[{i}].image", "Required value"))
            for j, e in enumerate(c.get("env") or []):
                if not isinstance(e, dict) or not e.get("name"):
                    errs.append((f"{path}.containers[{i}].env[{j}].name", "Required value"))
                elif "value" in e and not isinstance(e["value"], str):
                    raise ApiError(400, "BadRequest", f"json: cannot unmarshal {type(e['value']).__name__} into Go "
                                                      f"struct field EnvVar.value of type string "
                                                      f"({path}.containers[{i}].env[{j}] {e['name']})")
            for f in ("command", "args"):
                if c.get(f) is not None and (not isinstance(c[f], list) or
                                             not all(isinstance(a, str) for a in c[f])):
                    raise ApiError(400, "BadRequest", f"json: cannot unmarshal into Go struct field "
                                                      f"Container.{f} of type []string "
                                                      f"({path}.containers[{i}].{f} must be strings)")
        rp = spec.get("restartPolicy")
        if rp is not None and rp not in ("Always", "OnFailure", "Never"):
            errs.append((f"{path}.restartPolicy", f'Unsupported value: "{rp}": supported values: "Always", '
                                                  f'"OnFailure", "Never"'))
        return errs

    def _job_defaults_and_checks(self, obj: dict, old: dict | None, creating: bool) -> list[tuple[str, str]]:
        md = obj["metadata"]
        name = md.get("name", "")
        spec = obj.setdefault("spec", {})
        errs: list[tuple[str, str]] = []
        tmpl = spec.get("template")
        if not isinstance(tmpl, dict) or not isinstance(tmpl.get("spec"), dict):
            return [("spec.template", "Required value")]
        tspec = tmpl["spec"]
        tmd = tmpl.setdefault("metadata", {})
        if creating:
            if "completions" not in spec and "parallelism" not in spec:
                spec["completions"] = 1
            spec.setdefault("parallelism", 1)
            spec.setdefault("backoffLimit", 2147483647 if spec.get("backoffLimitPerIndex") is not None else 6)
            spec.setdefault("completionMode", "NonIndexed")
            spec.setdefault("suspend", False)
            spec.setdefault("manualSelector", False)
            spec.setdefault("podReplacementPolicy", "Failed" if spec.get("podFailurePolicy") else
                            "TerminatingOrFailed")
            tspec.setdefault("terminationGracePeriodSeconds", 30)
            tspec.setdefault("dnsPolicy", "ClusterFirst")
            if not md.get("labels") and tmd.get("labels"):
                md["labels"] = dict(tmd["labels"])
            if not spec.get("manualSelector"):
                uid = md["uid"]
                labels = tmd.setdefault("labels", {})
                labels.update({"batch.kubernetes.io/controller-uid": uid, "batch.kubernetes.io/job-name": name,
                               "controller-uid": uid, "job-name": name})
                spec["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
            obj["status"] = {}
        errs += _check_labels(tmd.get("labels"), "spec.template.metadata.labels")
        errs += self._check_pod_spec(tspec, "spec.template.spec")
        rp = tspec.get("restartPolicy")
        if rp not in ("Never", "OnFailure"):
            errs.append(("spec.template.spec.restartPolicy",
                         'Required value: valid values: "OnFailure", "Never"' if rp is None else
                         f'Unsupported value: "{rp}": supported values: "OnFailure", "Never"'))
        for f in ("parallelism", "completions", "backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished",
                  "backoffLimitPerIndex", "maxFailedIndexes"):
            v = spec.get(f)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                errs.append((f"spec.{f}", f"Invalid value: {json.dumps(v)}: must be greater than or equal to 0"))
        if spec.get("activeDeadlineSeconds") == 0:
            errs.append(("spec.activeDeadlineSeconds", "Invalid value: 0: must be greater than 0"))
        mode = spec.get("completionMode")
        if mode not in (None, "NonIndexed", "Indexed"):
            errs.append(("spec.completionMode", f'Unsupported value: "{mode}": supported values: "NonIndexed", '
                                                f'"Indexed"'))
        if mode == "Indexed" and spec.get("completions") is None:
            errs.append(("spec.completions", "Required value: when completion mode is Indexed"))
        if spec.get("backoffLimitPerIndex") is not None and mode != "Indexed":
            errs.append(("spec.backoffLimitPerIndex", "Forbidden: requires indexed completion mode"))
        pfp = spec.get("podFailurePolicy")
        if pfp is not None:
            if rp != "Never":
                errs.append(("spec.podFailurePolicy", "Invalid value: only supported when restartPolicy is Never"))
            for i, rule in enumerate(pfp.get("rules") or []):
                if rule.get("action") not in ("FailJob", "Ignore", "Count", "FailIndex"):
                    errs.append((f"spec.podFailurePolicy.rules[{i}].action",
                                 f'Unsupported value: "{rule.get("action")}": supported values: "Count", '
                                 f'"FailIndex", "FailJob", "Ignore"'))
                if bool(rule.get("onExitCodes")) == bool(rule.get("onPodConditions")):
                    errs.append((f"spec.podFailurePolicy.rules[{i}]",
                                 "Invalid value: specifying one of OnExitCodes and OnPodConditions is required"))
        if len(name) > 63:
            errs.append(("metadata.name", f'Invalid value: "{name}": must be no more than 63 characters '
                                          f"(it is used as the batch.kubernetes.io/job-name label value)"))
        if old is not None:
            ospec = old.get("spec") or {}
            for f in ("template", "completionMode", "selector", "podFailurePolicy", "backoffLimitPerIndex",
                      "manualSelector"):
                if json.dumps(ospec.get(f), sort_keys=True) != json.dumps(spec.get(f), sort_keys=True):
                    if f == "template" and ospec.get("suspend") and not (old.get("status") or {}).get("startTime"):
                        continue                          # a never-started suspended Job may change its template
                    errs.append((f"spec.{f}", "Invalid value: field is immutable"))
            if ospec.get("completions") != spec.get("completions") and \
                    not (mode == "Indexed" and spec.get("completions") == spec.get("parallelism")):
                errs.append(("spec.completions", "Invalid value: field is immutable"))
        return errs

    # ---- patch / replace ----

    def _check_subresource(self, request: rendering.Request) -> bool:
        sub = request.subresource
        if sub is None:
            return False
        if sub == "status":
            if not self._has_status(request.resource):
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            return True
        if sub == "finalize" and request.resource.plural == "namespaces":
            return False
        raise ApiError(404, "NotFound", f"the server could not find the requested resource "
                                        f"(subresource {sub!r} is not emulated)")

    async def _do_patch(self, request: rendering.Request) -> dict:
        res = request.resource
        is_status = self._check_subresource(request)
        key = (res, request.namespace, request.name)
        cur = self._live(key)
        if cur is None:
            raise _not_found(res, request.name)
        ctype = (request.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        data = request.data
        if data is None and request.body:
            raise ApiError(400, "BadRequest", "the body of the request was in an unknown format")
        builtin = res not in self._dk_crds
        if ctype == "application/json-patch+json":
            if not isinstance(data, list):
                raise ApiError(400, "BadRequest", "json: cannot unmarshal object into Go value of type "
                                                  "[]handlers.jsonPatchOp")
            new = jsonpatch.apply_patch(copy.deepcopy(cur), data, in_place=False)
        elif ctype == "application/merge-patch+json":
            if not isinstance(data, dict):
                raise ApiError(400, "BadRequest", "merge patch body must be a JSON object")
            self._precondition(res, cur, data)
            new = json_merge(copy.deepcopy(cur), data)
        elif ctype == "application/strategic-merge-patch+json":
            if not builtin:
                raise ApiError(415, "UnsupportedMediaType",
                               "the body of the request was in an unknown format - accepted media types include: "
                               "application/json-patch+json, application/merge-patch+json, "
                               "application/apply-patch+yaml")
            if not isinstance(data, dict):
                raise ApiError(400, "BadRequest", "strategic merge patch body must be a JSON object")
            self._precondition(res, cur, data)
            new = strategic_merge(copy.deepcopy(cur), data)
        elif ctype in ("application/apply-patch+yaml", "application/apply-patch+cbor"):
            raise ApiError(415, "UnsupportedMediaType", "server-side apply is not emulated by kmock_server; "
                                                        "use a merge or JSON patch")
        else:
            raise ApiError(415, "UnsupportedMediaType",
                           f"the body of the request was in an unknown format ({ctype or 'no Content-Type'}) - "
                           f"accepted media types include: application/json-patch+json, "
                           f"application/merge-patch+json, application/apply-patch+yaml")
        if not isinstance(new, dict):
            raise ApiError(422, "Invalid", "the patch must produce an object")
        return await self._commit_update(request, key, cur, new, is_status)

    def _precondition(self, res, cur: dict, data: dict) -> None:
        want = (data.get("metadata") or {}).get("resourceVersion") if isinstance(data.get("metadata"), dict) else None
        if want and str(want) != str(cur["metadata"].get("resourceVersion")):
            raise _conflict(res, cur["metadata"]["name"])

    async def _do_replace(self, request: rendering.Request) -> dict:
        res = request.resource
        is_status = self._check_subresource(request)
        key = (res, request.namespace, request.name)
        body = request.data
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body of the request was in an unknown format")
        cur = self._live(key)
        if cur is None:
            raise _not_found(res, request.name)
        new = copy.deepcopy(body)
        md = new.setdefault("metadata", {})
        if md.get("name") and md["name"] != request.name:
            raise ApiError(400, "BadRequest", "the name of the object does not match the name on the URL")
        want = md.get("resourceVersion")
        if want and str(want) != str(cur["metadata"].get("resourceVersion")):
            raise _conflict(res, request.name)
        if request.subresource == "finalize":           # PUT namespaces/<n>/finalize: only spec.finalizers
            merged = copy.deepcopy(cur)
            merged.setdefault("spec", {})["finalizers"] = (new.get("spec") or {}).get("finalizers") or []
            new = merged
        return await self._commit_update(request, key, cur, new, is_status)

    async def _commit_update(self, request, key, cur: dict, new: dict, is_status: bool) -> dict:
        res = key[0]
        cmd = cur["metadata"]
        if self._has_status(res):
            if is_status:
                merged = copy.deepcopy(cur)
                if "status" in new:
                    merged["status"] = new["status"]
                else:
                    merged.pop("status", None)
                new = merged
            else:
                if "status" in cur:
                    new["status"] = copy.deepcopy(cur["status"])
                else:
                    new.pop("status", None)
        md = new.setdefault("metadata", {})
        if not isinstance(md, dict):
            raise ApiError(400, "BadRequest", "metadata must be an object")
        for f in ("uid", "creationTimestamp", "name", "namespace", "generation", "deletionTimestamp",
                  "deletionGracePeriodSeconds"):
            if f in cmd:
                md[f] = cmd[f]
            else:
                md.pop(f, None)
        new.setdefault("apiVersion", cur.get("apiVersion"))
        new.setdefault("kind", cur.get("kind"))
        if cmd.get("deletionTimestamp"):
            added = set(md.get("finalizers") or []) - set(cmd.get("finalizers") or [])
            if added:
                raise _invalid(self._kind(res), res.group, cmd["name"],
                               [("metadata.finalizers", f"Forbidden: no new finalizers can be added if the object "
                                                        f"is being deleted, found new finalizers "
                                                        f"{sorted(added)!r}")])
        new = self._default_and_validate(res, new, cur, creating=False, status_only=is_status)
        md = new["metadata"]
        if _strip_for_generation(new) != _strip_for_generation(cur):
            md["generation"] = int(cmd.get("generation") or 1) + 1
        md["resourceVersion"] = cmd.get("resourceVersion")
        if _strip_for_noop(new) == _strip_for_noop(cur):
            return cur                                   # no-op: no new resourceVersion, no watch event
        if request is not None and request.params.get("dryRun"):
            return new
        md["resourceVersion"] = self.next_rv()
        if not md.get("finalizers"):
            md.pop("finalizers", None)
        if res.plural == "customresourcedefinitions" and res.group == "apiextensions.k8s.io" and not is_status:
            self._register_crd(new)                     # a changed schema / served versions apply at once
        await self._store(key, new, "MODIFIED")
        if md.get("deletionTimestamp") and not md.get("finalizers"):
            policy = self._dk_policies.pop(md.get("uid", ""), "Background")
            await self._remove(key, policy)
        return copy.deepcopy(new)

    # ---- delete & garbage collection ----

    def _policy(self, request: rendering.Request) -> str:
        res = request.resource
        opts = request.data if isinstance(request.data, dict) else {}
        p = request.params.get("propagationPolicy") or opts.get("propagationPolicy")
        if request.params.get("orphanDependents") == "true" or opts.get("orphanDependents") is True:
            p = "Orphan"
        if request.params.get("orphanDependents") == "false" or opts.get("orphanDependents") is False:
            p = p or "Background"
        if p is None:
            # The real apiserver keeps batch/v1 Jobs' Pods on an API delete without a policy (legacy default).
            p = "Orphan" if (res.group, res.version, res.plural) == ("batch", "v1", "jobs") else "Background"
        if p not in ("Orphan", "Background", "Foreground"):
            raise ApiError(400, "BadRequest", f'propagationPolicy: Unsupported value: "{p}": supported values: '
                                              f'"Orphan", "Background", "Foreground"')
        return p

    async def _do_delete(self, request: rendering.Request) -> dict:
        res = request.resource
        if request.subresource is not None:
            raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested "
                                                    "resource")
        key = (res, request.namespace, request.name)
        cur = self._live(key)
        if cur is None:
            raise _not_found(res, request.name)
        opts = request.data if isinstance(request.data, dict) else {}
        pre = opts.get("preconditions") or {}
        if pre.get("uid") and pre["uid"] != cur["metadata"].get("uid"):
            raise _conflict(res, request.name, f"Precondition failed: UID in precondition: {pre['uid']}, "
                                               f"UID in object meta: {cur['metadata'].get('uid')}")
        if pre.get("resourceVersion") and str(pre["resourceVersion"]) != cur["metadata"].get("resourceVersion"):
            raise _conflict(res, request.name, "Precondition failed: resourceVersion mismatch")
        policy = self._policy(request)
        if request.params.get("dryRun") or opts.get("dryRun"):
            return cur
        return await self._delete_obj(key, policy)

    async def _do_delete_collection(self, request: rendering.Request) -> dict:
        res = request.resource
        lsel = parse_label_selector(request.params.get("labelSelector"))
        fsel = parse_field_selector(request.params.get("fieldSelector"))
        policy = self._policy(request)
        items = []
        for key, raw in list(self._iter_live(res, request.namespace)):
            if match_labels((raw.get("metadata") or {}).get("labels"), lsel) and _match_fields(raw, fsel):
                items.append(await self._delete_obj(key, policy))
        return {"apiVersion": self._api_version(res), "kind": f"{self._kind(res)}List",
                "metadata": {"resourceVersion": str(self._dk_rv)}, "items": items}

    async def _delete_obj(self, key, policy: str) -> dict:
        cur = self._live(key)
        if cur is None:
            return {}
        md = cur["metadata"]
        if md.get("deletionTimestamp"):
            return cur
        if policy == "Foreground":
            await self._cascade(cur, "Foreground")
        if md.get("finalizers"):
            md["deletionTimestamp"] = _now()
            md["deletionGracePeriodSeconds"] = 0
            md["resourceVersion"] = self.next_rv()
            self._dk_policies[md.get("uid", "")] = policy
            await self._store(key, cur, "MODIFIED")
            return copy.deepcopy(cur)
        return await self._remove(key, policy)

    async def _remove(self, key, policy: str) -> dict:
        res, ns, name = key
        final = self._live(key)
        if final is None:
            return {}
        final["metadata"]["resourceVersion"] = self.next_rv()
        self._objects[key].create(final)
        self._objects[key].delete()
        await self._publish(res, "DELETED", final)
        if policy in ("Background", "Foreground"):
            await self._cascade(final, "Background")
        else:
            await self._orphan(final)
        if res.group == "" and res.plural == "namespaces":
            for k, _ in list(self._iter_live(namespace=name)):
                if k[1] == name:
                    await self._delete_obj(k, "Background")
        if res.group == "apiextensions.k8s.io" and res.plural == "customresourcedefinitions":
            await self._unregister_crd(final)
        return final

    def _dependents(self, owner: dict):
        uid = owner["metadata"].get("uid")
        owner_ns = owner["metadata"].get("namespace")
        for key, raw in list(self._iter_live()):
            if owner_ns is not None and key[1] != owner_ns:
                continue
            refs = (raw.get("metadata") or {}).get("ownerReferences") or []
            if any(isinstance(r, dict) and r.get("uid") == uid for r in refs):
                yield key, raw

    async def _cascade(self, owner: dict, policy: str) -> None:
        for key, _ in list(self._dependents(owner)):
            await self._delete_obj(key, policy)

    async def _orphan(self, owner: dict) -> None:
        uid = owner["metadata"].get("uid")
        for key, raw in list(self._dependents(owner)):
            new = copy.deepcopy(raw)
            refs = [r for r in new["metadata"].get("ownerReferences") or [] if r.get("uid") != uid]
            if refs:
                new["metadata"]["ownerReferences"] = refs
            else:
                new["metadata"].pop("ownerReferences", None)
            new["metadata"]["resourceVersion"] = self.next_rv()
            await self._store(key, new, "MODIFIED")

    # ---- CRDs ----

    def _register_crd(self, crd: dict) -> None:
        for res in [r for r, info in self._dk_crds.items() if info["crd"] == crd["metadata"]["name"]]:
            self._dk_crds.pop(res, None)               # re-registration (an updated CRD); objects are kept
            if res in self.resources:
                del self.resources[res]
        spec = crd.get("spec", {})
        names = spec.get("names", {})
        for v in spec.get("versions", []):
            if not v.get("served", True):
                continue
            res = kmock.resource(f"{spec['group']}/{v['name']}/{names['plural']}")
            subs = set((v.get("subresources") or {}).keys())
            self.resources[res] = kmock.ResourceInfo(
                kind=names.get("kind"), singular=names.get("singular") or names.get("kind", "").lower(),
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                verbs={"get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"},
                shortnames=set(names.get("shortNames", [])), categories=set(names.get("categories", [])),
                subresources=subs)
            self._dk_crds[res] = {"kind": names.get("kind"), "group": spec["group"], "status": "status" in subs,
                                  "schema": (v.get("schema") or {}).get("openAPIV3Schema"), "crd": crd["metadata"]["name"],
                                  "columns": list(v.get("additionalPrinterColumns") or [])}

    async def _unregister_crd(self, crd: dict) -> None:
        for res in [r for r, info in self._dk_crds.items() if info["crd"] == crd["metadata"]["name"]]:
            for key, _ in list(self._iter_live(res)):
                await self._remove(key, "Background")
            self._dk_crds.pop(res, None)
            if res in self.resources:
                del self.resources[res]

    # ---- discovery fixes ----

    async def _serve_version(self, request):     # core groupVersion '/v1' -> 'v1'; no shortNames/categories
                                                 # on subresources
        result = await super()._serve_version(request)
        if isinstance(result, dict):
            if result.get("groupVersion", "").startswith("/"):
                result["groupVersion"] = result["groupVersion"][1:]
            for r in result.get("resources", []):
                if "/" in r.get("name", ""):           # kubectl expands categories: none on subresources
                    r.pop("shortNames", None)
                    r.pop("categories", None)
                    r["singularName"] = ""
        return result

    # ---- reads ----

    def _selected(self, request) -> list[dict]:
        lsel = parse_label_selector(request.params.get("labelSelector"))
        fsel = parse_field_selector(request.params.get("fieldSelector"))
        out = []
        for (r, ns, name), raw in self._iter_live(request.resource):
            if request.namespace is not None and ns != request.namespace:
                continue
            if request.name is not None and name != request.name:
                continue
            if match_labels((raw.get("metadata") or {}).get("labels"), lsel) and _match_fields(raw, fsel):
                out.append(raw)
        return out

    # ---- server-side tables and metadata-only answers (content negotiation through Accept) ----

    def _table_columns(self, res) -> tuple[list[dict], Any]:
        """(columnDefinitions, row function(obj, now) -> cells) for a resource."""
        crd = self._dk_crds.get(res)
        if crd is not None:
            cols = crd.get("columns") or []
            return crd_columns(cols), lambda obj, now: _crd_row(obj, cols, now)
        return _BUILTIN_TABLES.get((res.group or "", str(res.plural)), _DEFAULT_TABLE)

    @staticmethod
    def _include_object(request) -> str:
        inc = request.params.get("includeObject") or "Metadata"
        if inc not in ("None", "Metadata", "Object"):
            raise ApiError(400, "BadRequest", f'unrecognized includeObject value: "{inc}"')
        return inc

    def _table(self, request, objs: list[dict], rv: str, version: str, *, headers: bool = True) -> dict:
        columns, cells = self._table_columns(request.resource)
        include = self._include_object(request)
        now = datetime.datetime.now(datetime.UTC)
        rows = []
        for obj in objs:
            row: dict[str, Any] = {"cells": cells(obj, now)}
            if include == "Object":
                row["object"] = obj
            elif include == "Metadata":
                row["object"] = _partial(obj, version)
            rows.append(row)
        if request.params.get("noHeaders") == "true" or request.params.get("noHeaders") == "1":
            headers = False
        return {"kind": "Table", "apiVersion": f"meta.k8s.io/{version}", "metadata": {"resourceVersion": rv},
                "columnDefinitions": copy.deepcopy(columns) if headers else [], "rows": rows}

    def _transform(self, request, obj: dict, *, headers: bool = True) -> dict:
        """One object as the request's Accept asks: the object, a one-row Table, or PartialObjectMetadata."""
        target = negotiate_as(request.headers.get("Accept"))
        if target is None:
            return obj
        kind, version = target
        if kind == "Table":
            return self._table(request, [obj], str((obj.get("metadata") or {}).get("resourceVersion") or ""),
                               version, headers=headers)
        return _partial(obj, version)

    async def _serve_list(self, request):
        if not self._known(request.resource):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        target = negotiate_as(request.headers.get("Accept"))
        if target is not None and target[0] == "Table":
            self._include_object(request)                  # 400 on a bad value, before any work
        async with self._lock:
            items = copy.deepcopy(self._selected(request))
            rv = str(self._dk_rv)
        items.sort(key=lambda o: ((o.get("metadata") or {}).get("namespace") or "",
                                  (o.get("metadata") or {}).get("name") or ""))
        if target is not None:
            kind, version = target
            if kind == "Table":
                return self._table(request, items, rv, version)
            return {"kind": "PartialObjectMetadataList", "apiVersion": f"meta.k8s.io/{version}",
                    "metadata": {"resourceVersion": rv}, "items": [_partial(o, version) for o in items]}
        return {"apiVersion": self._api_version(request.resource), "kind": f"{self._kind(request.resource)}List",
                "metadata": {"resourceVersion": rv}, "items": items}

    async def _serve_fetch(self, request):
        res = request.resource
        if request.subresource == "log" and res.group == "" and res.plural == "pods":
            return await self._serve_log(request)
        if request.subresource not in (None, "status"):
            raise ApiError(404, "NotFound", f"the server could not find the requested resource "
                                            f"(subresource {request.subresource!r} is not emulated)")
        async with self._lock:
            obj = self._live((res, request.namespace, request.name))
        if obj is None:
            raise _not_found(res, request.name or "")
        return self._transform(request, obj)

    async def _serve_log(self, request):
        async with self._lock:
            pod = self._live((request.resource, request.namespace, request.name))
        if pod is None:
            raise _not_found(request.resource, request.name or "")
        path = ((pod.get("metadata") or {}).get("annotations") or {}).get(LOG_PATH_ANNOTATION)
        data = b""
        if path and os.path.exists(path):
            data = pathlib.Path(path).read_bytes()
        tail = request.params.get("tailLines")
        if tail and tail.isdigit():
            lines = data.splitlines(keepends=True)
            data = b"".join(lines[-int(tail):]) if int(tail) else b""
        limit = request.params.get("limitBytes")
        if limit and limit.isdigit():
            data = data[: int(limit)]
        # Raw bytes, no Content-Type override: a reaction's headers stick to it for later requests in kmock.
        return data

    def _serve_watch(self, request):
        # Not a generator itself: returns a Response so that the stream gets a JSON content type (kubectl -w).
        target = negotiate_as(request.headers.get("Accept"))
        if target is not None and target[0] == "Table":
            self._include_object(request)                  # a bad value: 400 before the stream starts
        return rendering.Response(headers={"Content-Type": "application/json"}, payload=self._watch_stream(request))

    async def _watch_stream(self, request):
        res = request.resource
        lsel = parse_label_selector(request.params.get("labelSelector"))
        fsel = parse_field_selector(request.params.get("fieldSelector"))
        raw_since = request.params.get("resourceVersion", "")
        since = int(raw_since) if raw_since.isdigit() else 0
        initial = request.params.get("sendInitialEvents") == "true"
        timeout = request.params.get("timeoutSeconds")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(timeout) if timeout and timeout.replace(".", "", 1).isdigit() else None
        yield b""                                    # send the headers now, even if nothing happens
        bus = self._buses[res]

        def matches(obj: dict) -> bool:
            md = obj.get("metadata") or {}
            if request.namespace is not None and md.get("namespace") != request.namespace:
                return False
            if request.name is not None and md.get("name") != request.name:
                return False
            return match_labels(md.get("labels"), lsel) and _match_fields(obj, fsel)

        def translate(event: dict) -> dict | None:
            obj = event.get("object") or {}
            old = event.get("_old")
            etype = event["type"]
            ok = matches(obj)
            if etype == "MODIFIED" and (lsel or fsel):
                was = old is not None and matches(old)
                if ok and not was:
                    etype = "ADDED"
                elif was and not ok:
                    return {"type": "DELETED", "object": obj}
            return {"type": etype, "object": obj} if ok else None

        # kubectl get -w asks for Tables: one row per event, the column definitions only in the first one
        # (kubectl reuses the last columns for events without them).
        target = negotiate_as(request.headers.get("Accept"))
        headers_sent = [False]

        def shape(event: dict) -> dict:
            if target is None:
                return event
            obj = self._transform(request, event["object"], headers=not headers_sent[0])
            headers_sent[0] = True
            return {"type": event["type"], "object": obj}

        async with self._lock:
            marker = await bus.mark()
            replay: list[dict] = []
            gone = False
            if since == 0 or initial:
                for raw in sorted(self._selected(request), key=lambda o: int(o["metadata"].get("resourceVersion")
                                                                             or 0)):
                    replay.append({"type": "ADDED", "object": copy.deepcopy(raw)})
                if initial:
                    replay.append({"type": "BOOKMARK", "object": {
                        "apiVersion": self._api_version(res), "kind": self._kind(res),
                        "metadata": {"resourceVersion": str(self._dk_rv),
                                     "annotations": {"k8s.io/initial-events-end": "true"}}}})
            elif since < self._dk_oldest_rv:
                gone = True
            else:
                replay = [copy.deepcopy(e) for rv, r, e in self._dk_history if r == res and rv > since]
        try:
            if gone:
                yield {"type": "ERROR", "object": {"apiVersion": "v1", "kind": "Status", "metadata": {},
                                                   "status": "Failure", "reason": "Expired", "code": 410,
                                                   "message": f"too old resource version: {since} "
                                                              f"({self._dk_oldest_rv})"}}
                return
            for e in replay:
                if e["type"] == "BOOKMARK":
                    yield e
                    continue
                out = translate(e)
                if out is not None:
                    yield shape(out)
            stream = bus.stream(since=marker).__aiter__()
            while True:
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    break
                try:
                    event = await asyncio.wait_for(stream.__anext__(), remaining)
                except (asyncio.TimeoutError, StopAsyncIteration):
                    break
                out = translate(event)
                if out is not None:
                    yield shape(out)
        finally:
            try:
                await bus.unmark(marker)
            except (ValueError, RuntimeError):
                pass

    # ---- errors ----

    async def _render_error(self, exc: Exception) -> aiohttp.web.StreamResponse:
        if isinstance(exc, ApiError):
            code, reason, message, details = exc.code, exc.reason, exc.message, exc.details
        elif isinstance(exc, jsonpatch.JsonPatchTestFailed):
            code, reason, message, details = 422, "Invalid", f"the server rejected our request due to an error in " \
                                                             f"our request: {exc}", {}
        elif isinstance(exc, (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException)):
            code, reason, message, details = 422, "Invalid", f"jsonpatch: {exc}", {}
        elif isinstance(exc, _k8s.KubernetesError):
            code = exc.status
            reason = {404: "NotFound", 409: "AlreadyExists", 422: "Invalid"}.get(code, "InternalError")
            message, details = exc.message or reason, {}
        elif isinstance(exc, UnicodeDecodeError):         # kmock parses bodies as text: protobuf breaks it
            code, reason, message, details = 415, "UnsupportedMediaType", _PROTOBUF_MSG, {}
        elif isinstance(exc, NotImplementedError):
            code, reason, message, details = 404, "NotFound", "the server could not find the requested resource", {}
        else:
            code, reason, message, details = 500, "InternalError", f"kmock_server: {exc!r}", {}
        return aiohttp.web.json_response({"apiVersion": "v1", "kind": "Status", "metadata": {},
                                          "status": "Failure", "message": message, "reason": reason,
                                          "details": details, "code": code}, status=code)

    # ---- inspection helpers (call from the emulator's event loop) ----

    def snapshot(self) -> dict[str, dict]:
        """All live objects as ``{"group/version/plural/namespace/name": object}`` (deep copies)."""
        return {f"{r.group}/{r.version}/{r.plural}/{ns}/{n}": copy.deepcopy(o.raw)
                for (r, ns, n), o in list(self._objects.items()) if not o.deleted}


# --------------------------------------------------------------------------------------------------------------
# Kubeconfig, in-process server, standalone entry point

def write_kubeconfig(path: str | os.PathLike, url: str, namespace: str = "default") -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters:\n- name: kmock\n  cluster:\n    server: {url.rstrip('/')}\n"
        "users:\n- name: dev\n  user:\n    token: dummy\n"
        f"contexts:\n- name: kmock\n  context: {{cluster: kmock, user: dev, namespace: {namespace}}}\n"
        "current-context: kmock\n")
    return path


class EmulatorThread:
    """The emulator in a background thread of this process (its own event loop), e.g. for quick in-process tests.

    ``objects()`` / ``call(fn)`` run on the emulator's loop and return snapshots, so tests can inspect state.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **emulator_kwargs: Any) -> None:
        self.host, self.port = host, port
        emulator_kwargs.setdefault("max_requests_kept", 100)
        self._kw = emulator_kwargs
        self.url: str | None = None
        self.emulator: Emulator | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self) -> "EmulatorThread":
        self._thread = threading.Thread(target=self._run, name="kmock-emulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("kmock emulator did not start in 30 s")
        if self._error:
            raise self._error
        return self

    def _run(self) -> None:
        async def amain():
            self._stop = asyncio.Event()
            try:
                async with Emulator(**self._kw) as emu, kmock.Server(emu, host=self.host, port=self.port) as srv:
                    self.emulator = emu
                    self.url = str(srv.url).rstrip("/")
                    self.port = srv.port
                    self._ready.set()
                    await self._stop.wait()
            except BaseException as e:                  # noqa: BLE001 - surfaced in start()
                self._error = e
                self._ready.set()
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(amain())
        finally:
            self._loop.close()

    def call(self, fn, *args: Any) -> Any:
        """Run ``fn(emulator, *args)`` (sync or async) on the emulator's loop and return its result."""
        async def wrapper():
            r = fn(self.emulator, *args)
            return await r if asyncio.iscoroutine(r) else r
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop).result(30)

    def objects(self) -> dict[str, dict]:
        return self.call(lambda emu: emu.snapshot())

    def write_kubeconfig(self, path: str | os.PathLike, namespace: str = "default") -> pathlib.Path:
        assert self.url
        return write_kubeconfig(path, self.url, namespace)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(15)

    def __enter__(self) -> "EmulatorThread":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


async def serve(host: str, port: int, kubeconfig: str | None = None, dump: str | None = None,
                exit_with_parent: bool = False) -> None:
    async with Emulator(max_requests_kept=100) as emu, kmock.Server(emu, host=host, port=port) as srv:
        url = str(srv.url).rstrip("/")
        if kubeconfig:
            write_kubeconfig(kubeconfig, url)
        print(f"kmock listening on {url}", flush=True)
        stop = asyncio.Event()
        for s in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(s, stop.set)
        if exit_with_parent:                            # don't outlive a test run that was killed
            parent = os.getppid()

            async def watch_parent():
                while os.getppid() == parent:
                    await asyncio.sleep(1)
                stop.set()
            watcher = asyncio.ensure_future(watch_parent())
        await stop.wait()
        if exit_with_parent:
            watcher.cancel()
        if dump:
            with open(dump, "w") as f:
                json.dump(emu.snapshot(), f, indent=1, default=str)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default=os.environ.get("KMOCK_HOST", "127.0.0.1"))
    ap.add_argument("--port", type=int, default=int(os.environ.get("KMOCK_PORT", "18080")),
                    help="0 = a free port (the URL is printed)")
    ap.add_argument("--kubeconfig", default=os.environ.get("KMOCK_KUBECONFIG"),
                    help="write a kubeconfig for the server here")
    ap.add_argument("--dump", default=os.environ.get("KMOCK_DUMP"), help="dump all objects here on SIGTERM")
    ap.add_argument("--exit-with-parent", action="store_true", help="exit when the parent process dies")
    args = ap.parse_args(argv)
    asyncio.run(serve(args.host, args.port, args.kubeconfig, args.dump, args.exit_with_parent))


if __name__ == "__main__":
    sys.exit(main())
