"""The PruningSearch CRD: up to date, accepted by Kubernetes' own schemas, and exactly as strict as
the operator's loader.

No API server runs here (none exists on this machine kind), so this module replays what one does
with a custom resource, in its order:

1. strict field validation (kubectl's default) rejects unknown fields; non-nullable nulls are pruned;
2. defaults are applied;
3. the OpenAPI schema is checked (with ``jsonschema``, after turning OpenAPI-isms into JSON Schema);
4. ``x-kubernetes-list-type`` map/set items must be unique;
5. the CEL rules run (with ``cel-python``), transition rules only when an old object is given.

Every manifest in ``good_manifests/`` must pass all of it AND ``load_psearch``; every one in
``bad_manifests/`` must be rejected, with an error naming the field, by the CRD layer (1-5) and by
``load_psearch`` (unless its ``# layers:`` line says only one of them; then the other must accept
it, which documents the gap). Header lines of a bad manifest::

    # expect: <field path from the object root> <substring of one error message>
    # layers: crd | python            (optional; default both)

A file with two YAML documents is an update: the first is the stored object, the second the new one.
"""

from __future__ import annotations

import copy
import pathlib
import re
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import pytest
import yaml
from celpy import celtypes

from darwinlm.errors import SpecError
from darwinlm_operator import crd as crd_module
from darwinlm_operator.crd import generate_crd, render
from darwinlm_operator.kspec import KUBERNETES_FIELDS, KubeSpec, load_psearch

HERE = pathlib.Path(__file__).parent
ROOT = HERE.parents[1]
GOOD = sorted((HERE / "good_manifests").glob("*.yaml"))
BAD = sorted((HERE / "bad_manifests").glob("*.yaml"))
CRD = generate_crd()
SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


# ----------------------------------------------------------------------------- paths

def _join(path: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        return f"{path}.{key}" if path else key
    return f"{path}[{key!r}]"


def _leaf(path: str) -> str:
    names = re.findall(r"[A-Za-z_][A-Za-z0-9_]*|'[^']*'", path)
    return names[-1].strip("'") if names else path


def _names(err_path: str, message: str, expected: str) -> bool:
    """The error is about ``expected``: same path, a descendant, or an ancestor naming its leaf."""
    if err_path == expected or re.match(re.escape(expected) + r"[.\[]", err_path):
        return True
    ancestor = err_path == "" or re.match(re.escape(err_path) + r"[.\[]", expected)
    return bool(ancestor) and _leaf(expected) in message


# ----------------------------------------------------------------------------- the API server, replayed

def _to_jsonschema(node: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI v3 (structural) -> JSON Schema 2020-12; ``x-kubernetes-*`` are handled elsewhere."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in ("nullable", "default", "description"):
            continue
        if key == "properties":
            out[key] = {name: _to_jsonschema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _to_jsonschema(value)
        elif key == "anyOf":
            out[key] = [_to_jsonschema(sub) for sub in value]
        else:
            out[key] = value
    for bound, limit in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if out.get(bound) is True:
            out[bound] = out.pop(limit)
        elif out.get(bound) is False:
            del out[bound]
    if node.get("nullable"):
        out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    if (node.get("type") == "object" and "additionalProperties" not in out
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False  # strict field validation (kubectl's default)
    return out


JSON_SCHEMA = _to_jsonschema(SCHEMA)
del JSON_SCHEMA["properties"]["metadata"]["additionalProperties"]  # the rest of ObjectMeta
VALIDATOR = jsonschema.Draft202012Validator(JSON_SCHEMA)


def _default(schema: dict[str, Any], value: Any) -> None:
    """Prune non-nullable nulls, then apply defaults, recursively (structural defaulting)."""
    if isinstance(value, dict) and "properties" in schema:
        for name, sub in schema["properties"].items():
            if name in value and value[name] is None and not sub.get("nullable"):
                del value[name]
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                _default(sub, value[name])
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for item in value.values():
            _default(schema["additionalProperties"], item)
    elif isinstance(value, list) and "items" in schema:
        for item in value:
            _default(schema["items"], item)


def _list_type_errors(schema: dict[str, Any], value: Any, path: str) -> list[tuple[str, str]]:
    out = []
    if isinstance(value, list):
        seen: list[Any] = []
        for i, item in enumerate(value):
            if schema.get("x-kubernetes-list-type") == "map" and isinstance(item, dict):
                ident = [item.get(k) for k in schema["x-kubernetes-list-map-keys"]]
            elif schema.get("x-kubernetes-list-type") == "set":
                ident = item
            else:
                break
            if ident in seen:
                out.append((_join(path, i), f"Duplicate value: {ident!r}"))
            seen.append(ident)
        for i, item in enumerate(value):
            out += _list_type_errors(schema.get("items", {}), item, _join(path, i))
    elif isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                out += _list_type_errors(sub, value[name], _join(path, name))
        if isinstance(schema.get("additionalProperties"), dict):
            for k, item in value.items():
                out += _list_type_errors(schema["additionalProperties"], item, _join(path, k))
    return out


def _cel(schema: dict[str, Any], value: Any) -> Any:
    """JSON -> CEL value by the schema's types; nulls and undeclared fields are not visible."""
    kind = schema.get("type")
    if schema.get("x-kubernetes-int-or-string"):
        return celtypes.IntType(value) if isinstance(value, int) else celtypes.StringType(value)
    if kind == "integer":
        return celtypes.IntType(value)
    if kind == "number":
        return celtypes.DoubleType(value)
    if kind == "string":
        return celtypes.StringType(value)
    if kind == "boolean":
        return celtypes.BoolType(value)
    if kind == "array":
        return celtypes.ListType([_cel(schema["items"], v) for v in value])
    if isinstance(schema.get("additionalProperties"), dict):
        sub = schema["additionalProperties"]
        return celtypes.MapType({celtypes.StringType(k): _cel(sub, v) for k, v in value.items()})
    props = schema.get("properties", {})
    return celtypes.MapType({celtypes.StringType(k): _cel(props[k], v)
                             for k, v in value.items() if k in props and v is not None})


CEL_ENV = celpy.Environment()
_PROGRAMS: dict[str, Any] = {}


def _run_rule(rule: str, activation: dict[str, Any]) -> bool:
    if rule not in _PROGRAMS:
        _PROGRAMS[rule] = CEL_ENV.program(CEL_ENV.compile(rule))
    result = _PROGRAMS[rule].evaluate(activation)
    if isinstance(result, celpy.CELEvalError):
        raise result
    return bool(result)


def _cel_errors(schema: dict[str, Any], value: Any, old: Any, path: str) -> list[tuple[str, str]]:
    if value is None:
        return []
    out = []
    for rule in schema.get("x-kubernetes-validations", ()):
        transition = "oldSelf" in rule["rule"]
        if transition and old is None:
            continue  # Kubernetes runs transition rules on updates only
        activation = {"self": _cel(schema, value)}
        if transition:
            activation["oldSelf"] = _cel(schema, old)
        try:
            ok = _run_rule(rule["rule"], activation)
        except celpy.CELEvalError as e:  # e.g. a required field is missing: reported, as Kubernetes does
            ok, out = True, [*out, (path, f"rule {rule['rule']!r} could not be evaluated: {e}")]
        if not ok:
            out.append((path + rule.get("fieldPath", ""), rule["message"]))
    if isinstance(value, dict):
        olds = old if isinstance(old, dict) else {}
        for name, sub in schema.get("properties", {}).items():
            out += _cel_errors(sub, value.get(name), olds.get(name), _join(path, name))
        if isinstance(schema.get("additionalProperties"), dict):
            for k, item in value.items():
                out += _cel_errors(schema["additionalProperties"], item, olds.get(k), _join(path, k))
    elif isinstance(value, list) and "items" in schema:
        keys = schema.get("x-kubernetes-list-map-keys")
        for i, item in enumerate(value):
            match = None
            if keys and isinstance(old, list):  # Kubernetes correlates list-type map items by key
                match = next((o for o in old if all(o.get(k) == item.get(k) for k in keys)), None)
            out += _cel_errors(schema["items"], item, match, _join(path, i))
    return out


def crd_errors(obj: dict[str, Any], old: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """What an API server with this CRD would answer to creating ``obj`` (or updating ``old``)."""
    obj, old = copy.deepcopy(obj), copy.deepcopy(old)
    for o in (obj, old):
        if o is not None:
            _default(SCHEMA, o)
    schema_errors = list(VALIDATOR.iter_errors(obj))
    errors = [(_path_of(e), e.message) for e in schema_errors]
    errors += _list_type_errors(SCHEMA, obj, "")
    # As the API server: CEL does not run when a value has the wrong type ("blocking" errors).
    if not any(e.validator in ("type", "anyOf") for e in schema_errors):
        errors += _cel_errors(SCHEMA, obj, old, "")
    return errors


def _path_of(error: jsonschema.ValidationError) -> str:
    path = ""
    for part in error.absolute_path:
        path = _join(path, part)
    return path


def python_errors(obj: dict[str, Any]) -> list[tuple[str, str]]:
    try:
        load_psearch(obj)
    except SpecError as e:
        top = ("apiVersion", "kind", "metadata")
        return [(p if p.split(".")[0] in top else f"spec.{p}" if p else "spec", m)
                for p, m in e.errors]
    return []


def _documents(path: pathlib.Path) -> tuple[dict | None, dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    assert len(docs) in (1, 2), f"{path.name}: one object, or an old and a new one"
    return (docs[0], docs[1]) if len(docs) == 2 else (None, docs[0])


# ----------------------------------------------------------------------------- the tests

def test_committed_crd_is_up_to_date():
    committed = (ROOT / "manifests" / "crd.yaml").read_text(encoding="utf-8")
    assert committed == render(), ("manifests/crd.yaml is stale: run "
                                   "`python -m darwinlm_operator.crd --out manifests/crd.yaml`")


def test_cli_writes_the_same_text(tmp_path, capsys):
    assert crd_module.main(["--out", str(tmp_path / "crd.yaml")]) == 0
    assert (tmp_path / "crd.yaml").read_text(encoding="utf-8") == render()
    assert crd_module.main([]) == 0
    assert capsys.readouterr().out == render()


@pytest.mark.parametrize("version", ["1.28.0", "1.30.0", kubernetes_validate.latest_version()])
def test_kubernetes_validate_strict_accepts_the_crd(version):
    # fieldPath/reason of CEL rules exist since 1.28: the CRD needs Kubernetes >= 1.28.
    kubernetes_validate.validate(yaml.safe_load(render()), version, strict=True)


def test_names_and_shape():
    spec = CRD["spec"]
    assert CRD["metadata"]["name"] == "pruningsearches.darwinlm.io"
    assert spec["names"]["shortNames"] == ["psearch", "ps"] and spec["scope"] == "Namespaced"
    version = spec["versions"][0]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Phase", "Generation", "Best", "Stage", "Progress", "ETA", "Age"]
    shown = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert "priority" not in shown["Progress"] and "priority" not in shown["ETA"]  # both in plain `kubectl get`
    status = SCHEMA["properties"]["status"]["properties"]
    assert status["phase"]["enum"] == ["Pending", "Running", "Suspended", "Succeeded", "Failed"]
    assert status["conditions"]["x-kubernetes-list-map-keys"] == ["type"]
    assert status["kopf"]["x-kubernetes-preserve-unknown-fields"] is True
    spec_props = SCHEMA["properties"]["spec"]["properties"]
    assert set(KUBERNETES_FIELDS) <= set(spec_props) and "name" not in spec_props
    # image and imagePullPolicy are optional (the operator's job image fills them in) and the API
    # server must not default the pull policy: a stored IfNotPresent would hide the operator's.
    assert "image" not in SCHEMA["properties"]["spec"]["required"]
    assert spec_props["image"]["nullable"] is True and "default" not in spec_props["image"]
    assert spec_props["imagePullPolicy"]["enum"] == ["Always", "IfNotPresent", "Never"]
    assert "default" not in spec_props["imagePullPolicy"]


def _walk(schema: dict[str, Any], path: str):
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from _walk(sub, _join(path, name))
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            yield from _walk(schema[key], f"{path}[]")


@pytest.mark.parametrize("part", ["spec", "status"])
def test_every_field_has_a_description(part):
    missing = [p for p, s in _walk(SCHEMA["properties"][part], part)
               for name, sub in s.get("properties", {}).items()
               if not sub.get("description", "").strip()]
    assert not missing, f"fields without a description: {missing}"


def test_status_declares_what_the_operator_writes():
    # Undeclared status fields would be pruned by the API server (the retry ledger with them).
    reconcile = pytest.importorskip("darwinlm_operator.reconcile")
    owned = getattr(reconcile, "_OWNED", None)
    if owned is None:
        pytest.skip("the reconciler no longer lists the status fields it owns")
    assert set(owned) <= set(SCHEMA["properties"]["status"]["properties"])


def test_spec_sizes_are_bounded_so_cel_cost_is_estimable():
    # The status has no rules, and limits there would only make the operator's updates fail.
    loose = []
    for path, s in _walk(SCHEMA["properties"]["spec"], "spec"):
        if s.get("type") == "array" and "maxItems" not in s:
            loose.append(path)
        if isinstance(s.get("additionalProperties"), dict) and "maxProperties" not in s:
            loose.append(path)
        if s.get("type") == "string" and "maxLength" not in s and "enum" not in s:
            loose.append(path)
    assert not loose, f"unbounded: {loose}"


def test_every_rule_compiles_and_has_a_message():
    rules = [r for _, s in _walk(SCHEMA, "") for r in s.get("x-kubernetes-validations", ())]
    assert len(rules) >= 25
    for r in rules:
        CEL_ENV.compile(r["rule"])
        assert r["message"] and "\n" not in r["message"]
        assert "[" not in r.get("fieldPath", ""), "Kubernetes fieldPaths take no list index"


def _resolve(schema: dict[str, Any], field_path: str) -> bool:
    node = schema
    for name in re.findall(r"\.([A-Za-z_][A-Za-z0-9_]*)|\['([^']+)'\]", field_path):
        node = node.get("properties", {}).get(name[0] or name[1])
        if node is None:
            return False
    return True


def test_structural_schema_invariants():
    """What the API server checks when the CRD is created and kubernetes-validate cannot."""
    for path, s in _walk(SCHEMA, ""):
        free = s.get("x-kubernetes-preserve-unknown-fields") or s.get("x-kubernetes-int-or-string")
        assert "type" in s or free or path == "", f"{path}: a structural schema types every node"
        assert not ("properties" in s and "additionalProperties" in s), path
        if s.get("x-kubernetes-list-type") == "map":
            item = s["items"]
            for key in s["x-kubernetes-list-map-keys"]:
                assert key in item.get("required", ()) or "default" in item["properties"][key], path
        if "default" in s:  # defaults must validate (and be pruned) against their own schema
            errors = list(jsonschema.Draft202012Validator(_to_jsonschema(s)).iter_errors(s["default"]))
            assert not errors, f"{path}: default {s['default']!r}: {errors[0].message}"
        for rule in s.get("x-kubernetes-validations", ()):
            assert _resolve(s, rule.get("fieldPath", "")), f"{path}: no field {rule['fieldPath']}"
    metadata = SCHEMA["properties"]["metadata"]
    assert set(metadata) == {"type", "properties"} and set(metadata["properties"]) == {"name"}


def test_load_psearch_reports_both_halves_at_once(tmp_path):
    manifest = yaml.safe_load((HERE / "good_manifests" / "minimal.yaml").read_text(encoding="utf-8"))
    manifest["spec"].update(workers=0, s3={"region": "eu-west-1"}, imagePullPolcy="Always")
    manifest["spec"]["search"]["selection"] = [
        {"survivors": 1, "fitness_tokens": 1, "finetune_tokens": 0}] * 8 + [
        {"survivors": 2, "fitness_tokens": 1, "finetune_tokens": 0}]
    with pytest.raises(SpecError) as info:
        load_psearch(manifest)
    paths = [p for p, _ in info.value.errors]
    assert paths == ["imagePullPolcy", "search.selection[8].survivors", "search.selection[8].survivors",
                     "workers", "search.selection", "store"], info.value
    assert "did you mean 'imagePullPolicy'" in str(info.value)
    # A bare spec (the CLI's shape) read from a file loads the same way.
    bare = yaml.safe_load((HERE / "good_manifests" / "minimal.yaml").read_text(encoding="utf-8"))
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**bare["spec"], "name": "x", "workers": 2}), encoding="utf-8")
    spec, kube = load_psearch(path)
    assert (spec.name, kube.workers, kube.s3) == ("x", 2, None)


def test_quantities_parse_as_kubernetes_does():
    from fractions import Fraction

    from darwinlm_operator.kspec import parse_quantity

    assert parse_quantity("500m") == Fraction(1, 2) and parse_quantity("1.5Gi") == 3 * 2**29
    assert parse_quantity("2e3") == 2000 and parse_quantity("1E") == 10**18
    with pytest.raises(ValueError):
        parse_quantity("-1")


def test_kube_spec_validates_itself():
    with pytest.raises(SpecError, match="workers: must be >= 1"):
        KubeSpec(image="img:1", workers=0)
    kube = KubeSpec(image="img:1", resources={"limits": {"nvidia.com/gpu": 1}})
    assert kube.resources.limits["nvidia.com/gpu"] == "1" and hash(kube)


def test_there_are_enough_bad_manifests():
    assert len(BAD) >= 30 and len(GOOD) >= 4


@pytest.mark.parametrize("path", GOOD, ids=lambda p: p.stem)
def test_good_manifest(path):
    old, new = _documents(path)
    assert crd_errors(new, old) == []
    assert python_errors(new) == []
    # The CRD's defaults are the library's: the defaulted object loads to the same specs.
    defaulted = copy.deepcopy(new)
    _default(SCHEMA, defaulted)
    assert load_psearch(defaulted) == load_psearch(new)


def _expectation(path: pathlib.Path) -> tuple[str, str, set[str]]:
    text = path.read_text(encoding="utf-8")
    m = re.search(r"^# expect: (\S+) (.+)$", text, re.M)
    assert m, f"{path.name} needs a '# expect: <field path> <message substring>' line"
    layers = re.search(r"^# layers: (.+)$", text, re.M)
    chosen = {x.strip() for x in layers.group(1).split(",")} if layers else {"crd", "python"}
    assert chosen <= {"crd", "python"} and chosen
    return m.group(1), m.group(2).strip(), chosen


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.stem)
def test_bad_manifest(path):
    field, substring, layers = _expectation(path)
    old, new = _documents(path)
    found = {"crd": crd_errors(new, old), "python": python_errors(new)}
    report = "\n".join(f"  {layer}: {p}: {m}" for layer, errs in found.items() for p, m in errs)
    for layer in ("crd", "python"):
        naming = [(p, m) for p, m in found[layer] if _names(p, m, field)]
        if layer in layers:
            assert naming, f"{layer} did not reject {field}:\n{report}"
        else:
            assert not found[layer], f"{layer} now rejects it too: update '# layers:'\n{report}"
    assert any(substring in m for errs in found.values() for p, m in errs if _names(p, m, field)), (
        f"no error at {field} mentions {substring!r}:\n{report}")


# ----------------------------------------------------------------------------- type confusion

def _leaves(value: Any, path: str):
    """Every node under ``value`` (objects, arrays and scalars), with its path from the root."""
    yield path, value
    if isinstance(value, dict):
        for key, sub in value.items():
            yield from _leaves(sub, _join(path, key))
    elif isinstance(value, list):
        for i, sub in enumerate(value):
            yield from _leaves(sub, _join(path, i))


def _confused(value: Any) -> Any:
    """A value of another JSON type that no field typed like ``value`` accepts (quantities take
    integers and strings, so strings become booleans)."""
    if isinstance(value, bool):
        return "yes"
    if isinstance(value, (int, float)):
        return [value]
    if isinstance(value, str):
        return True
    return "x"  # objects and arrays


def _replace(obj: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    node, keys = out, re.findall(r"\[(\d+)\]|\['([^']+)'\]|\.?([A-Za-z_][A-Za-z0-9_]*)", path)
    keys = [int(i) if i else (q or n) for i, q, n in keys]
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
    return out


def test_every_spec_field_refuses_a_value_of_the_wrong_type():
    """The type-confusion fuzz: each node of the richest good manifest's spec, in turn, gets a value
    of another JSON type; the CRD (as the API server) and the loader must both refuse it and name
    that field. This caught podTemplate.volumes[].persistentVolumeClaim.claimName/.readOnly and
    volumeMounts[].readOnly, once preserved as unknown fields and refused only at Job creation."""
    _, good = _documents(HERE / "good_manifests" / "gpu-s3-everything.yaml")
    good.pop("status", None)
    cases = [(p, v) for p, v in _leaves(good["spec"], "spec") if p != "spec"]
    assert len(cases) >= 100, len(cases)  # the manifest really sets the podTemplate's nested fields
    missed = []
    for path, value in cases:
        bad = _replace(good, path, _confused(value))
        for layer, errors in (("crd", crd_errors(bad)), ("python", python_errors(bad))):
            if not any(_names(p, m, path) for p, m in errors):
                missed.append(f"{layer} accepts {_confused(value)!r} at {path}: {errors}")
    assert not missed, "\n".join(missed)


def test_pod_template_core_types_are_generated_from_the_kubernetes_client():
    from darwinlm_operator import _kcore

    vol = _kcore.schema("Volume")
    assert set(vol["properties"]) == {"name", *_kcore.VOLUME_SOURCES}
    pvc = vol["properties"]["persistentVolumeClaim"]
    assert pvc["required"] == ["claimName"] and pvc["properties"]["readOnly"]["type"] == "boolean"
    assert set(_kcore.schema("VolumeMount")["required"]) == {"name", "mountPath"}
    template = SCHEMA["properties"]["spec"]["properties"]["podTemplate"]
    assert template["properties"]["volumes"]["items"]["properties"]["persistentVolumeClaim"] == pvc
    assert template["properties"]["affinity"]["properties"]["nodeAffinity"] == \
        _kcore.schema("Affinity")["properties"]["nodeAffinity"]
    # nothing under podTemplate keeps unknown fields any more: every shape is checked by the API server
    loose = [p for p, s in _walk(template, "podTemplate") if s.get("x-kubernetes-preserve-unknown-fields")]
    assert not loose, loose
