"""The command line: ``--set`` overrides, and the commands that only read a spec never load torch."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from darwinlm import cli
from darwinlm.spec.io import parse_override

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLE = str(ROOT / "examples" / "smollm2-quick.yaml")


def test_spec_commands_never_import_torch(tmp_path):
    store = f"file://{tmp_path}"
    code = f"""
import contextlib, io, sys
from darwinlm.cli import main
for argv in (["validate", {EXAMPLE!r}, "--set", "search.generations=2"], ["plan", {EXAMPLE!r}, "--store", {store!r}],
             ["schema"], ["schema", "--openapi"], ["schema", "--markdown"]):
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(argv) == 0, argv
heavy = [m for m in ("torch", "transformers", "datasets", "safetensors") if m in sys.modules]
assert not heavy, heavy
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def test_parse_override_reads_yaml_values():
    assert parse_override("search.generations=3") == ("search.generations", 3)
    assert parse_override("search.finetune.lr=1e-5") == ("search.finetune.lr", 1e-5)
    assert parse_override("model.revision=null") == ("model.revision", None)
    assert parse_override("store=s3://bucket/a=b") == ("store", "s3://bucket/a=b")
    assert parse_override("evaluation.baselines=[uniform]") == ("evaluation.baselines", ["uniform"])
    for bad in ("search.generations", "=3", "x=[1"):
        with pytest.raises(ValueError):
            parse_override(bad)


def test_set_overrides_fields_and_names_a_bad_one(capsys):
    argv = ["validate", EXAMPLE, "--set", "name=quick-3", "--set", "search.generations=3",
            "--set", "search.selection[0].survivors=4"]
    assert cli.main(argv) == cli.EXIT_OK
    assert "search 'quick-3'" in capsys.readouterr().out
    assert cli.main(["validate", EXAMPLE, "--set", "search.nope=1"]) == cli.EXIT_PERMANENT
    assert "search.nope" in capsys.readouterr().err
    assert cli.main(["validate", EXAMPLE, "--set", "search.generations=many"]) == cli.EXIT_PERMANENT
    assert "search.generations" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["validate", EXAMPLE, "--set", "search.generations"])
    assert e.value.code == 2 and "KEY=VALUE" in capsys.readouterr().err


def test_set_applies_after_store_and_to_plan(tmp_path, capsys):
    args = cli.build_parser().parse_args(["plan", EXAMPLE, "--store", f"file://{tmp_path}/a",
                                          "--set", "store=file://" + str(tmp_path / "b"), "--set", "search.generations=2"])
    spec = cli._load(args)  # noqa: SLF001
    assert spec.store == f"file://{tmp_path / 'b'}" and spec.search.generations == 2
    assert cli.main(["plan", EXAMPLE, "--store", f"file://{tmp_path}", "--set", "search.generations=2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["store"] == f"file://{tmp_path}/searches/smollm2-quick"
    assert out["generations"] == 2 and out["next"] == ["database-0-of-1"]


def test_an_override_is_recorded_in_spec_json_like_any_field(tmp_path):
    from darwinlm.run.workspace import Workspace

    args = cli.build_parser().parse_args(["run", EXAMPLE, "--store", f"file://{tmp_path}",
                                          "--set", "search.generations=2", "--set", "seed=7"])
    ws = Workspace(cli._load(args))  # noqa: SLF001
    ws.record_spec()
    saved = ws.store.get_json("spec.json")
    assert saved["search"]["generations"] == 2 and saved["seed"] == 7
    changed = cli.build_parser().parse_args(["run", EXAMPLE, "--store", f"file://{tmp_path}", "--set", "seed=7"])
    with pytest.raises(cli.SpecError, match="search"):  # resuming with another override is refused
        Workspace(cli._load(changed)).record_spec()  # noqa: SLF001
