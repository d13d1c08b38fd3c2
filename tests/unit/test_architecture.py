"""The architecture a newcomer reads: packages keep their private names, and the commands that only read
a spec never load torch.

A leading underscore means private to its *package* (a folder): ``darwinlm.spec.schema._x`` may be imported
by ``darwinlm.spec.tree`` but not by ``darwinlm.run`` or the operator. What another package needs is public.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = {"darwinlm": ROOT / "darwinlm", "darwinlm_jobs": ROOT / "jobs" / "darwinlm_jobs",
            "darwinlm_operator": ROOT / "operator" / "darwinlm_operator"}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for top, root in PACKAGES.items():
        for path in sorted(root.rglob("*.py")):
            out[".".join([top, *path.relative_to(root).with_suffix("").parts]).removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _package(module: str) -> str:
    """The package (folder) a module belongs to; a package's ``__init__`` belongs to the package itself."""
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def _imports(module: str) -> list[tuple[int, str]]:
    """(line, dotted name) of everything ``module`` imports (function-local imports included) and of every
    attribute it reads through an imported module (``sf._kind`` after ``from darwinlm.spec import fields as sf``)."""
    tree = ast.parse(MODULES[module].read_text())
    base = _package(module)
    out, aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
            aliases.update({a.asname: a.name for a in node.names if a.asname})
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split(".")
                mod = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out += [(node.lineno, f"{mod}.{a.name}") for a in node.names if a.name != "*"]
            aliases.update({a.asname or a.name: f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in MODULES})
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            out.append((node.lineno, f"{aliases[node.value.id]}.{node.attr}"))
    return out


def _private_owner(dotted: str) -> str | None:
    """The package whose private name (or private module) ``dotted`` reaches, or None if it is public."""
    parts = dotted.split(".")
    if parts[0] not in PACKAGES:
        return None
    for i, part in enumerate(parts):
        if part.startswith("_") and not (part.startswith("__") and part.endswith("__")):
            owner = ".".join(parts[:i])
            return owner if owner in MODULES and _package(owner) == owner else owner.rpartition(".")[0]
    return None


def private_imports() -> list[str]:
    bad = []
    for module in MODULES:
        for line, dotted in _imports(module):
            owner = _private_owner(dotted)
            if owner is not None and owner != _package(module):
                bad.append(f"{MODULES[module].relative_to(ROOT)}:{line} imports {dotted} (private to {owner})")
    return bad


def test_no_package_imports_another_packages_private_names():
    bad = private_imports()
    assert not bad, "make the name public where it lives, or keep the user inside its package:\n" + "\n".join(bad)


def test_the_private_import_check_sees_one():
    assert _private_owner("darwinlm.spec.schema._apply") == "darwinlm.spec"
    assert _private_owner("darwinlm.store._hidden.x") == "darwinlm.store"
    assert _private_owner("darwinlm.spec.schema.schema_for") is None
    assert _private_owner("darwinlm.__version__") is None and _private_owner("os._exit") is None
