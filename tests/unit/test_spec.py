"""The spec: loading, strict errors with exact paths, round trips, hashing and the generated schema."""

from __future__ import annotations

import ast
import copy
import dataclasses
import json
import pathlib
import typing

import pytest
import yaml

from darwinlm import spec as spec_module
from darwinlm.errors import SpecError
from darwinlm.spec.fields import field_docs
from darwinlm.spec import (
    API_VERSION,
    KIND,
    LadderSpec,
    PruningSearchSpec,
    StageSpec,
    field_doc,
    json_schema,
    load_spec,
    spec_hash,
    spec_to_dict,
    with_overrides,
)

# Every field set, most of them away from their defaults.
FULL = {
    "name": "llama-half",
    "seed": 7,
    "store": "s3://bucket/darwinlm",
    "model": {"path": "~/models/SmolLM2-135M", "revision": "main", "dtype": "bfloat16",
              "compute_dtype": "float16", "device": "cpu"},
    "data": {
        "train": {"path": "data/train/*.jsonl", "format": "json", "text_field": "body",
                  "split": "train", "subset": None},
        "heldout": {"path": "HuggingFaceFW/fineweb-edu", "format": "hub", "text_field": "text",
                    "split": "train", "subset": "sample-10BT"},
        "seq_len": 256, "calibration_fraction": 0.4, "calibration_tokens": 40000,
        "finetune_tokens": 100000, "heldout_tokens": 8000,
    },
    "database": {
        "attention": {"levels": None, "fractions": [0.0, 0.25, 0.5, 0.75, 1.0], "granularity": 1},
        "mlp": {"levels": 6, "fractions": None, "granularity": 16},
        "damping": 0.02, "calibration_tokens": 20000, "dtype": "bfloat16", "shards": 2,
    },
    "search": {
        "target": {"mean_level": 2.5, "fraction": None},
        "generations": 10, "offspring": 8, "max_flips": 2,
        "selection": [
            {"survivors": 4, "fitness_tokens": 512, "finetune_tokens": 1000},
            {"survivors": 2, "fitness_tokens": 1024, "finetune_tokens": 4000},
            {"survivors": 1, "fitness_tokens": 2048, "finetune_tokens": 0},
        ],
        "fitness": {"kind": "topk_kl", "topk": 256, "exclude_database_tokens": False},
        "finetune": {"optimizer": "sgd", "lr": 1e-4, "weight_decay": 0.01, "betas": [0.8, 0.99],
                     "batch_size": 2, "mode": "mask"},
        "init": "random", "initially_generated": 4, "initial_tokens": 1024,
        "sensitivity": {"tokens": 256, "dtype": "bfloat16", "shards": 2}, "patience": 5, "tracking_tokens": 1024,
    },
    "posttrain": {"enabled": False, "tokens": 5000, "lr": 3e-4, "warmup_steps": 0,
                  "batch_size": 4, "distill": 0.5, "temperature": 2.0, "checkpoint_every": 10},
    "export": {"dtype": "bfloat16"},
    "evaluation": {"heldout_tokens": 4000, "baselines": ["uniform"], "bootstrap": 500,
                   "extra_heldout": [{"name": "docs", "source": {"path": "/data/docs", "format": "text"},
                                      "tokens": 2048}]},
}
MINIMAL = {"model": {"path": "m"}, "data": {"train": {"path": "d"}},
           "search": {"target": {"mean_level": 5}}}


def full(**changes) -> dict:
    """A deep copy of FULL with dotted-path changes (``'search.offspring': 2``)."""
    data = copy.deepcopy(FULL)
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node[int(leaf)] = value
        else:
            node[leaf] = value
    return data


def errors_of(data, **kwargs) -> list[tuple[str, str]]:
    with pytest.raises(SpecError) as info:
        load_spec(data, **kwargs)
    return info.value.errors


def paths_of(data, **kwargs) -> list[str]:
    return [p for p, _ in errors_of(data, **kwargs)]


def all_spec_classes() -> list[type]:
    seen, todo = [], [PruningSearchSpec]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.append(cls)
        for hint in typing.get_type_hints(cls).values():
            for t in [hint, *typing.get_args(hint)]:
                if dataclasses.is_dataclass(t):
                    todo.append(t)
    return seen


# ----------------------------------------------------------------------------- loading

def test_full_example_loads_with_every_value():
    s = load_spec(FULL)
    assert s.name == "llama-half" and s.store == "s3://bucket/darwinlm"
    assert s.data.heldout.subset == "sample-10BT"
    assert s.database.attention.fractions == (0.0, 0.25, 0.5, 0.75, 1.0)
    assert s.search.selection[1] == StageSpec(survivors=2, fitness_tokens=1024, finetune_tokens=4000)
    assert s.search.finetune.betas == (0.8, 0.99) and s.search.target.mean_level == 2.5
    assert s.evaluation.baselines == ("uniform",)


def test_minimal_spec_gets_paper_defaults():
    s = load_spec(MINIMAL)
    assert [(st.survivors, st.fitness_tokens, st.finetune_tokens) for st in s.search.selection] == [
        (8, 1024, 10_000), (4, 2048, 50_000), (2, 4096, 100_000), (1, 8192, 200_000)]
    assert s.database.mlp == LadderSpec(levels=11, granularity=32)
    assert s.database.attention == LadderSpec()  # auto: one level per head
    assert s.search.target.mean_level == 5.0 and isinstance(s.search.target.mean_level, float)
    assert s.name == "search" and s.store == "file://./runs"


def test_round_trip_through_dict_and_json():
    s = load_spec(FULL)
    plain = spec_to_dict(s)
    assert load_spec(json.loads(json.dumps(plain))) == s
    assert plain["search"]["selection"][0] == {"survivors": 4, "fitness_tokens": 512,
                                               "finetune_tokens": 1000}
    assert plain["model"]["revision"] == "main" and plain["data"]["train"]["subset"] is None


def test_spec_is_frozen_and_hashable():
    s = load_spec(FULL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.seed = 1  # type: ignore[misc]
    assert hash(s) == hash(load_spec(FULL))


def test_yaml_and_json_files(tmp_path: pathlib.Path):
    text = yaml.safe_dump(FULL).replace("lr: 0.0001", "lr: 1e-4")
    assert "lr: 1e-4" in text  # PyYAML alone would read this as the string '1e-4'
    (tmp_path / "s.yaml").write_text(text)
    (tmp_path / "s.json").write_text(json.dumps(FULL))
    assert load_spec(tmp_path / "s.yaml") == load_spec(str(tmp_path / "s.json")) == load_spec(FULL)


def test_duplicate_keys_and_non_paths_are_rejected(tmp_path: pathlib.Path):
    (tmp_path / "dup.yaml").write_text("seed: 1\nseed: 2\n")
    with pytest.raises(SpecError, match="duplicate key 'seed'"):
        load_spec(tmp_path / "dup.yaml")
    (tmp_path / "dup.json").write_text('{"seed": 1, "seed": 2}')
    with pytest.raises(SpecError, match="duplicate key 'seed'"):
        load_spec(tmp_path / "dup.json")
    with pytest.raises(SpecError, match="path to an existing"):
        load_spec("model:\n  path: m\n")  # YAML text is not a path
    with pytest.raises(SpecError, match="path to an existing"):
        load_spec(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(SpecError, match="must be a mapping"):
        load_spec(tmp_path / "list.yaml")


def test_manifest_form_takes_name_from_metadata():
    manifest = {"apiVersion": API_VERSION, "kind": KIND,
                "metadata": {"name": "from-meta", "namespace": "ml"}, "spec": MINIMAL,
                "status": {"phase": "Searching"}}
    assert load_spec(manifest) == dataclasses.replace(load_spec(MINIMAL), name="from-meta")


def test_manifest_errors():
    bad = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "Not_A_Label"},
           "spec": MINIMAL}
    assert paths_of(bad) == ["apiVersion", "kind"]
    wrong_name = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": "Not_A_Label"},
                  "spec": MINIMAL}
    assert paths_of(wrong_name) == ["metadata.name"]
    clash = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": "a"},
             "spec": {**MINIMAL, "name": "b"}}
    assert paths_of(clash) == ["name"]
    assert paths_of({"apiVersion": API_VERSION, "kind": KIND}) == ["metadata.name", "spec"]


def test_extra_allowed_top_level_keys_are_ignored():
    data = {**MINIMAL, "image": "darwinlm:1", "resources": {"gpus": 1}}
    assert paths_of(data) == ["image", "resources"]
    s = load_spec(data, extra_allowed={"image", "resources"})
    assert s == load_spec(MINIMAL) and "image" not in spec_to_dict(s)
    nested = {**MINIMAL, "model": {"path": "m", "image": "x"}}
    assert paths_of(nested, extra_allowed={"image"}) == ["model.image"]  # top level only


# ----------------------------------------------------------------------------- errors and paths

def test_unknown_nested_key_with_suggestion():
    (path, msg), = errors_of(full(**{"data.train.fromat": "json"}))
    assert path == "data.train.fromat"
    assert "unknown field 'fromat'" in msg and "did you mean 'format'" in msg


def test_wrong_type_in_list_element():
    assert errors_of(full(**{"search.selection.1.survivors": "2"})) == [
        ("search.selection[1].survivors", "expected integer, got string ('2')")]


def test_type_strictness():
    assert paths_of(full(seed=True)) == ["seed"]  # bool is not an int
    assert paths_of(full(**{"posttrain.enabled": 1})) == ["posttrain.enabled"]
    assert paths_of(full(**{"search.finetune.lr": float("nan")})) == ["search.finetune.lr"]
    assert paths_of(full(**{"model.dtype": None})) == ["model.dtype"]  # not optional
    assert paths_of(full(**{"search.selection": {"survivors": 1}})) == ["search.selection"]
    assert paths_of(full(**{"search.finetune.betas": [0.9]})) == ["search.finetune.betas"]
    assert paths_of(full(model="m")) == ["model"]
    s = load_spec(full(**{"posttrain.lr": 1, "data.heldout": None}))  # int ok for float; Optional
    assert s.posttrain.lr == 1.0 and type(s.posttrain.lr) is float and s.data.heldout is None


def test_bad_enum():
    (path, msg), = errors_of(full(**{"search.fitness.kind": "KL"}))
    assert path == "search.fitness.kind"
    assert "must be one of 'kl', 'topk_kl', 'ppl'" in msg and "did you mean 'kl'" in msg
    assert paths_of(full(**{"evaluation.baselines": ["dense", "random"]})) == [
        "evaluation.baselines[1]"]


def test_missing_required():
    data = full()
    del data["model"]["path"]
    del data["search"]["selection"][2]["fitness_tokens"]
    assert paths_of(data) == ["model.path", "search.selection[2].fitness_tokens"]
    assert paths_of({}) == ["model", "data", "search"]


def test_many_errors_reported_together():
    data = full(**{"seed": -1, "store": "http://x", "name": "Big_Name",
                   "data.calibration_fraction": 1.0, "search.target.fraction": 0.5,
                   "database.mlp.fractions": [0.0, 0.5], "search.selection.0.finetune_tokens": -1,
                   "posttrain.distill": 2, "search.offspring": 3})
    data["search"]["bogus"] = 1
    with pytest.raises(SpecError) as info:
        load_spec(data)
    assert [p for p, _ in info.value.errors] == [
        "name", "seed", "store", "data.calibration_fraction", "database.mlp",
        "search.bogus", "search.target", "search.selection[0].finetune_tokens",
        "posttrain.distill", "search.selection[0].survivors"]  # cross-section rules come last
    assert "10 error(s)" in str(info.value) and "search.bogus" in str(info.value)
    # A bad enum value does not stop the rules across sections: everything is reported at once.
    data["model"]["device"] = "tpu"
    paths = paths_of(data)
    assert "model.device" in paths and "search.selection[0].survivors" in paths
    assert len(paths) == 11
    # A value of the wrong type does stop them (they need typed values); the rest is still reported.
    data["seed"] = "zero"
    paths = paths_of(data)
    assert "seed" in paths and "search.selection[0].survivors" not in paths


def test_value_messages():
    errs = dict(errors_of(full(seed=-1, store="ftp://x", **{"data.calibration_fraction": 0})))
    assert errs["seed"] == "must be >= 0, got -1"
    assert errs["store"].startswith("must be a file://PATH or s3://BUCKET[/PREFIX] URI")
    assert errs["data.calibration_fraction"] == "must be > 0, got 0.0"


@pytest.mark.parametrize("changes, expected", [
    ({"search.selection.1.survivors": 5},  # 4 -> 5 increases
     [("search.selection[1].survivors", "must not exceed the previous stage's survivors (4), got 5")]),
    ({"search.selection.2.survivors": 2},
     [("search.selection[2].survivors", "the last stage must keep exactly 1 survivor, got 2")]),
    ({"search.selection.2.fitness_tokens": 50000},
     [("search.selection[2].fitness_tokens",
       "50000 exceeds the calibration pool (data.calibration_tokens = 40000)")]),
    ({"search.selection.0.finetune_tokens": 200000}, [("search.selection[0].finetune_tokens",
      "200000 exceeds the fine-tune pool (data.finetune_tokens = 100000)")]),
    ({"search.offspring": 3},
     [("search.selection[0].survivors", "must be <= search.offspring (3), got 4")]),
    ({"database.calibration_tokens": 50000},
     [("database.calibration_tokens", "50000 exceeds data.calibration_tokens (40000)")]),
    ({"evaluation.heldout_tokens": 9000},
     [("evaluation.heldout_tokens", "9000 exceeds data.heldout_tokens (8000)")]),
    ({"search.target.mean_level": 5},
     [("search.target.mean_level", "5 exceeds the last level of database.attention (4)")]),
    ({"search.fitness.exclude_database_tokens": True, "search.selection.2.fitness_tokens": 30000},
     [("search.selection[2].fitness_tokens", "30000 exceeds the calibration tokens the database does not use "
       "(data.calibration_tokens - database.calibration_tokens = 20000); raise data.calibration_tokens or set "
       "search.fitness.exclude_database_tokens: false")]),
    ({"search.init": "even"},
     [("search.initially_generated", "is only used with search.init: random, but init is 'even'; set init: "
       "random or remove it")]),
    ({"search.initially_generated": 0},
     [("search.initially_generated", "must be >= 1 with search.init: random (how many random genomes to score), "
       "got 0")]),
    ({"evaluation.extra_heldout.0.name": "heldout"},
     [("evaluation.extra_heldout[0].name", "'heldout' names data.heldout; choose another name")]),
])
def test_inconsistent_sections(changes, expected):
    assert errors_of(full(**changes)) == expected


def test_stage_rules_are_all_collected():
    data = full(**{"search.selection": [
        {"survivors": 2, "fitness_tokens": 99999, "finetune_tokens": 0},
        {"survivors": 3, "fitness_tokens": 1, "finetune_tokens": 0}]})
    assert paths_of(data) == ["search.selection[0].fitness_tokens", "search.selection[1].survivors",
                              "search.selection[1].survivors"]
    assert paths_of(full(**{"search.selection": []})) == ["search.selection"]


def test_ladder_and_target_rules():
    assert paths_of(full(**{"database.attention.fractions": [0.1, 0.6, 0.6, 1.5]})) == [
        "database.attention.fractions[3]", "database.attention.fractions[0]",
        "database.attention.fractions[2]"]
    # A bad value does not hide the rules that depend on it: level 2.5 is beyond a 1-level ladder.
    assert paths_of(full(**{"database.mlp.levels": 1})) == ["database.mlp.levels",
                                                           "search.target.mean_level"]
    assert paths_of(full(**{"search.target": {}})) == ["search.target"]
    ok = load_spec(full(**{"search.target": {"fraction": 0.3}}))
    assert ok.search.target.fraction == 0.3 and ok.search.target.mean_level is None


def test_python_construction_is_validated_and_canonical():
    s = load_spec(FULL)
    with pytest.raises(SpecError) as info:
        dataclasses.replace(s, seed=-1)
    assert info.value.errors == [("seed", "must be >= 0, got -1")]
    with pytest.raises(SpecError, match="search.selection"):
        dataclasses.replace(s, search=dataclasses.replace(s.search, selection=[]))
    ladder = LadderSpec(fractions=[0, 0.5, 1])  # list of ints/floats from Python
    assert ladder.fractions == (0.0, 0.5, 1.0) and all(type(f) is float for f in ladder.fractions)


# ----------------------------------------------------------------------------- helpers

def test_with_overrides():
    s = load_spec(FULL)
    t = with_overrides(s, store="file:///tmp/x", search__generations=3,
                       **{"search.finetune.lr": 2, "search.selection[0].survivors": 3})
    assert (t.store, t.search.generations, t.search.finetune.lr) == ("file:///tmp/x", 3, 2.0)
    assert t.search.selection[0].survivors == 3 and s.search.selection[0].survivors == 4
    u = with_overrides(load_spec(MINIMAL), **{"data.heldout.path": "h"})
    assert u.data.heldout.path == "h"
    v = with_overrides(s, model=dataclasses.replace(s.model, path="other"))
    assert v.model.path == "other"
    with pytest.raises(SpecError) as info:
        with_overrides(s, search__generatons=3, seed=-2)
    assert [p for p, _ in info.value.errors] == ["seed", "search.generatons"]


def test_field_doc():
    assert "DNS-1123" in field_doc("name")
    assert field_doc("search.selection[2].survivors") == field_doc("search.selection.survivors")
    assert "calibration" in field_doc("data.calibration_tokens")
    with pytest.raises(KeyError, match="did you mean 'selection'"):
        field_doc("search.selction")


def test_every_field_has_a_docstring():
    for cls in all_spec_classes():
        for f in dataclasses.fields(cls):
            assert len(field_docs(cls).get(f.name, "")) > 10, f"{cls.__name__}.{f.name}"
        assert cls.__doc__, cls.__name__
    assert "why it exists" in spec_module.__doc__.lower()


def test_spec_hash_stable_and_subset_sensitive():
    s = load_spec(FULL)
    h = spec_hash(s)
    assert len(h) == 64 and h == spec_hash(load_spec(json.loads(json.dumps(FULL))))
    reordered = dict(reversed(list(FULL.items())))
    assert spec_hash(load_spec(reordered)) == h
    assert spec_hash(load_spec(full(**{"posttrain.lr": 1}))) == spec_hash(
        load_spec(full(**{"posttrain.lr": 1.0})))
    db = ("model", "data", "database")
    other_search = with_overrides(s, search__generations=99)
    assert spec_hash(other_search) != h
    assert spec_hash(other_search, fields=db) == spec_hash(s, fields=db)
    assert spec_hash(with_overrides(s, model__revision="v2"), fields=db) != spec_hash(s, fields=db)
    assert spec_hash(s, fields=("model",)) != spec_hash(s, fields=("data",))
    assert spec_hash(s, fields=("database", "model", "data")) == spec_hash(s, fields=db)
    with pytest.raises(ValueError, match="unknown spec section"):
        spec_hash(s, fields=("modle",))


# ----------------------------------------------------------------------------- schema

def _walk(schema: dict, path: str = ""):
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}" if path else name)
    if "items" in schema:
        yield from _walk(schema["items"], f"{path}[]")


def test_json_schema_describes_every_field():
    schema = json_schema()
    props = {p: s for p, s in _walk(schema) if p and not p.endswith("[]")}
    for path, sub in props.items():
        assert sub.get("description") == field_doc(path), path
    assert schema["required"] == ["model", "data", "search"]
    assert schema["additionalProperties"] is False
    model = schema["properties"]["model"]
    assert model["properties"]["dtype"]["enum"] == ["float32", "bfloat16", "float16"]
    assert model["properties"]["revision"]["type"] == ["string", "null"]
    search = schema["properties"]["search"]["properties"]
    assert search["offspring"] == {**search["offspring"], "minimum": 1, "default": 16}
    assert search["selection"]["minItems"] == 1 and len(search["selection"]["default"]) == 4
    target = search["target"]["properties"]["fraction"]
    assert (target["exclusiveMinimum"], target["exclusiveMaximum"]) == (0.0, 1.0)
    betas = search["finetune"]["properties"]["betas"]
    assert betas["minItems"] == betas["maxItems"] == 2 and betas["items"]["exclusiveMaximum"] == 1
    mlp = schema["properties"]["database"]["properties"]["mlp"]
    assert mlp["default"] == {"levels": 11, "granularity": 32}  # nulls dropped from defaults


def test_json_schema_validates_examples():
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(json_schema())
    validator.check_schema(json_schema())
    for example in (FULL, MINIMAL, spec_to_dict(load_spec(MINIMAL))):
        validator.validate(example)
    for bad in (full(**{"data.train.fromat": "x"}), full(seed=-1), full(store="http://x"),
                full(**{"search.fitness.kind": "KL"}), full(**{"search.selection": []})):
        assert not validator.is_valid(bad)


OPENAPI_KEYWORDS = {"type", "properties", "required", "items", "enum", "minimum", "maximum",
                    "exclusiveMinimum", "exclusiveMaximum", "default", "description", "nullable",
                    "minItems", "maxItems", "minLength", "maxLength", "pattern", "format"}


def test_openapi_variant_is_structural():
    schema = json_schema(openapi=True)
    text = json.dumps(schema)
    assert "$ref" not in text and "additionalProperties" not in text and "$schema" not in text
    for path, sub in _walk(schema):
        assert set(sub) <= OPENAPI_KEYWORDS, (path, set(sub) - OPENAPI_KEYWORDS)
        assert isinstance(sub["type"], str), path
        for key in ("exclusiveMinimum", "exclusiveMaximum"):
            assert sub.get(key, True) is True, path  # OpenAPI v3.0: booleans next to the bound
    props = schema["properties"]
    assert "name" not in props  # metadata.name in a manifest
    assert props["model"]["properties"]["revision"] == {**props["model"]["properties"]["revision"],
                                                        "type": "string", "nullable": True}
    assert props["data"]["properties"]["heldout"]["nullable"] is True
    fraction = props["search"]["properties"]["target"]["properties"]["fraction"]
    assert (fraction["minimum"], fraction["maximum"]) == (0.0, 1.0)


def test_spec_modules_import_no_torch():
    """The operator imports the spec: its modules may import only the stdlib, yaml and each other."""
    import sys

    allowed = set(sys.stdlib_module_names) | {"yaml", "darwinlm"}
    for name in ("tree", "fields", "schema", "io", "rules"):
        tree = ast.parse(pathlib.Path(spec_module.__file__).with_name(f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                roots = [(node.module or "").split(".")[0]]
            else:
                continue
            assert set(roots) <= allowed, (name, roots)
