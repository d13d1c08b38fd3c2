"""A bad GGUF export request fails with a message naming the field and writes nothing to the store.

On the tiny pipeline (seconds): an unknown GGUF type is a spec error before anything runs; a model
llama.cpp's ``deci`` cannot express (a GELU MLP) and a tokenizer that cannot become a GGUF tokenizer
(the tiny model's word-level one) are refused by the export task before it writes anything, the HF
directory included, and the search before it stays intact.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from darwinlm.run.runner import run_search
from darwinlm.spec import load_spec
from darwinlm.store import open_store

from ..conftest import tiny_spec_dict

FAST = {"search.generations": 1, "posttrain.enabled": False, "evaluation.baselines": ["dense"]}


def _export(spec_path, *args):
    return subprocess.run([sys.executable, "-m", "darwinlm.cli", "export", str(spec_path), *args],
                          capture_output=True, text=True, timeout=600)


def _searched(assets, tmp_path, name):
    """A finished search (everything before the export) and its spec file."""
    d = tiny_spec_dict(assets, f"file://{tmp_path / 'store'}", name=name, **FAST)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d))
    ws = run_search(load_spec(d), until=lambda t: t.kind == "export")
    return path, ws.store


def _result_keys(store):
    return [k for k in store.list("result/")]


def test_unknown_gguf_type_is_refused_before_anything_runs(tiny_assets, tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(tiny_spec_dict(tiny_assets, f"file://{tmp_path / 'store'}")))
    out = _export(path, "--format", "gguf", "--gguf-type", "q4_k")
    assert out.returncode == 2, out.stderr
    assert "export.gguf_type" in out.stderr and "q8_0" in out.stderr
    assert not (tmp_path / "store").exists()


def test_a_tokenizer_that_cannot_be_a_gguf_tokenizer_is_refused_and_nothing_is_written(tiny_assets, tmp_path):
    path, store = _searched(tiny_assets, tmp_path, "wordlevel")
    out = _export(path, "--format", "hf", "--format", "gguf")
    assert out.returncode == 2, out.stderr
    assert "export.gguf_tokenizer" in out.stderr and "byte-level" in out.stderr
    assert _result_keys(store) == []  # not even the HF directory
    # the same search still exports what it can express
    assert _export(path, "--format", "hf").returncode == 0
    marker = store.get_json("result/export.json")
    assert marker["formats"] == ["hf"] and "gguf" not in marker
    assert store.exists("result/model/config.json")


def test_a_family_deci_cannot_express_is_refused_naming_export_formats(tiny_assets, tmp_path):
    assets = tmp_path / "assets"
    shutil.copytree(tiny_assets, assets)
    cfg = json.loads((assets / "model" / "config.json").read_text())
    cfg["hidden_act"] = "gelu"  # llama.cpp's deci computes every MLP with SiLU
    (assets / "model" / "config.json").write_text(json.dumps(cfg))
    path, store = _searched(assets, tmp_path, "gelu")
    out = _export(path, "--format", "gguf", "--gguf-type", "q8_0")
    assert out.returncode == 2, out.stderr
    assert "export.formats" in out.stderr and "SiLU" in out.stderr and "gelu" in out.stderr
    assert _result_keys(store) == []
    assert open_store(f"file://{tmp_path / 'store'}").exists("searches/gelu/spec.json")
