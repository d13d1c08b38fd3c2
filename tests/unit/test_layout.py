"""store.layout: the keys are the ones searches already in stores use, and nothing else spells one."""

from __future__ import annotations

import ast
import pathlib
import re

from darwinlm.core.plan import STOP_KEY, Task, done_key
from darwinlm.store import layout

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_the_keys_are_the_stored_ones():
    assert layout.search_prefix("tiny") == "searches/tiny"
    assert layout.search_prefix("tiny", "u-1") == "searches/tiny-u-1"
    assert layout.database_manifest("ab12") == "databases/ab12/manifest.json"
    assert layout.database_layer("ab12", "model.layers.0.mlp") == "databases/ab12/layers/model.layers.0.mlp.safetensors"
    assert layout.database_shard("ab12", 1, 2) == "databases/ab12/shards/1-of-2.json"
    assert layout.sensitivity_block("ab12", "cd", 3) == "databases/ab12/sensitivity/cd/blocks/3.json"
    assert layout.sensitivity_shard("ab12", "cd", 0, 2) == "databases/ab12/sensitivity/cd/shards/0-of-2.json"
    assert layout.sensitivity_table("ab12", "cd") == "databases/ab12/sensitivity/cd/table.json"
    assert (layout.SPEC, layout.INIT, layout.STOP) == ("spec.json", "init.json", "generations/stop.json")
    assert layout.generation_state(3) == "generations/00003/state.json"
    assert layout.generation_results(3) == "generations/00003/results"
    assert layout.candidate_result(3, 1, "0123abcd") == "generations/00003/results/s1-0123abcd.json"
    assert layout.posttrain_prefix("uniform") == "posttrain/uniform"
    assert layout.checkpoint_meta("posttrain/uniform") == "posttrain/uniform/checkpoint.json"
    assert layout.checkpoint_weights("posttrain/uniform") == "posttrain/uniform/checkpoint.safetensors"
    assert [layout.MODEL_DIR, layout.CONFIG_JSON, layout.CONFIG_TXT, layout.REPORT, layout.FITNESS_PLOT] == [
        "result/model", "result/config.json", "result/config.txt", "result/report.md", "result/fitness.png"]


def test_task_markers_come_from_the_layout():
    assert STOP_KEY == layout.STOP
    assert done_key(Task("database", 0, 2)) == "database/shard-0-of-2.json"
    assert done_key(Task("sensitivity", 1, 2)) == "sensitivity/shard-1-of-2.json"
    assert done_key(Task("generation", 12)) == layout.generation_state(12)
    assert done_key(Task("posttrain", variant="searched")) == "posttrain/searched/done.json"
    assert done_key(Task("export")) == "result/export.json" == layout.EXPORT_DONE
    assert done_key(Task("evaluate")) == "result/summary.json" == layout.SUMMARY


def test_spec_drift_names_the_changed_sections_but_not_the_store():
    saved = {"name": "a", "store": "file:///x", "seed": 1, "search": {"generations": 3}}
    assert layout.spec_drift(saved, {**saved, "store": "s3://b/p"}) == []
    assert layout.spec_drift(saved, {**saved, "seed": 2, "search": {"generations": 4}}) == ["search", "seed"]
    assert layout.spec_drift(saved, {k: v for k, v in saved.items() if k != "seed"}) == ["seed"]


# A string that looks like a store key: where a key starts, a part of one, or a marker's file name.
_KEY = re.compile(r"^(searches|databases|generations|posttrain|result|database|sensitivity)/"
                  r"|/(shards|layers|blocks|results|state\.json|manifest\.json|table\.json|done\.json|checkpoint\.)"
                  r"|^(spec|init|summary|export|stop)\.json$|shard-")


def _key_literals(path: pathlib.Path) -> list[tuple[int, str]]:
    """String constants (and f-string parts) of ``path`` that look like keys; docstrings and prose are skipped."""
    tree = ast.parse(path.read_text())
    docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if not re.search(r"\s", node.value) and _KEY.search(node.value):
                out.append((node.lineno, node.value))
    return out


def test_every_key_is_spelled_in_the_layout_only():
    spelled = []
    for root in ("darwinlm", "operator/darwinlm_operator", "jobs/darwinlm_jobs"):
        for path in sorted((ROOT / root).rglob("*.py")):
            if path != ROOT / "darwinlm" / "store" / "layout.py":
                spelled += [f"{path.relative_to(ROOT)}:{line}: {value!r}" for line, value in _key_literals(path)]
    assert not spelled, "spell store keys in darwinlm/store/layout.py:\n" + "\n".join(spelled)
    assert _key_literals(ROOT / "darwinlm" / "store" / "layout.py")  # the check sees keys where they are
