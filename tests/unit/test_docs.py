"""Docs that match the code: the README's spec reference is generated; .ci/run calls the README's test command."""

import pathlib
import re

from darwinlm.spec.docs import BEGIN, END, spec_reference_markdown

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_readme_spec_reference_is_current():
    readme = (ROOT / "README.md").read_text()
    current = readme[readme.index(BEGIN): readme.index(END) + len(END)]
    assert current == spec_reference_markdown(), "run: darwinlm schema --markdown, paste into README.md"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    test_cmd = next(b.strip() for b in blocks if "pytest" in b)
    setup_cmd = next(b.strip() for b in blocks if "setup" in b)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci and setup_cmd in ci


def test_examples_are_valid_specs():
    from darwinlm.spec import load_spec

    for path in sorted((ROOT / "examples").glob("*.yaml")):
        load_spec(path)
