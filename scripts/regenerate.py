#!/usr/bin/env python
"""Regenerate everything derived from the spec dataclasses, in order: the README's spec reference table,
the CRD (``manifests/crd.yaml``), then the chart copies and ``manifests/install.yaml``.

    .venv/bin/python scripts/regenerate.py

Tests fail when any of them is stale (tests/unit/test_docs.py, tests/k8s_schema/test_crd.py,
tests/packaging/test_manifests.py).
"""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from darwinlm.spec.docs import BEGIN, END, spec_reference_markdown  # noqa: E402


def main() -> int:
    path = ROOT / "README.md"
    text = path.read_text()
    new = text[: text.index(BEGIN)] + spec_reference_markdown() + text[text.index(END) + len(END):]
    if new != text:
        path.write_text(new)
        print("README.md: spec reference updated")
    subprocess.run([sys.executable, "-m", "darwinlm_operator.crd", "--out", str(ROOT / "manifests" / "crd.yaml")],
                   check=True, cwd=ROOT)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "render_manifests.py")], check=True, cwd=ROOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
