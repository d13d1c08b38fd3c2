"""SIGKILL ``darwinlm run`` at chosen instants of every phase, then compare every artifact.

Why it exists: "kill the run at any point and run the same command again: identical result" is only
proven by killing it in every phase (database, sensitivity, generation, post-training, export,
evaluation) and comparing everything it wrote with an uninterrupted run.

How: the run is the real CLI (``darwinlm.cli.main(["run", SPEC])``) in a child process started as
``python -m tests.support.crash PLAN.json -- run SPEC``. Before calling the CLI the child wraps the file
store's one write primitive (``darwinlm.store.file._atomic_write``): every write is appended to a
journal (key, phase, time), and when the plan's kill point is reached the process SIGKILLs itself.
Nothing in the library changes; the signal is a real SIGKILL (no cleanup, no ``finally``). A kill
point names one artifact write of the reference run (key and content) and a mode:

* ``mid-write``: half of the artifact's bytes are in the temp file (a torn write);
* ``sidecar``:   the artifact is renamed into place but its checksum sidecar is not (a torn commit);
* ``after``:     the write completed; the kill comes ``delay`` seconds later (mid-computation: between
                 two database layers, two candidates of a stage, two post-training checkpoints).

:func:`plan_kills` draws the points from the reference run's journal with a seeded generator;
:func:`run_chain` runs the CLI once per point (each run resumes where the last was killed) and then to
the end; :func:`store_diff` compares two stores artifact by artifact (JSON without its wall-clock
``seconds``/``wait`` fields, every other file byte for byte).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import threading
import time
from typing import Any

PHASES = ("database", "sensitivity", "generation", "posttrain", "export", "evaluate")
MODES = ("mid-write", "sidecar", "after")
# Fields of JSON artifacts that describe the process that wrote them, not the result: wall-clock
# durations, and which blocks the writing process itself measured (a resumed shard reuses the blocks a
# killed one measured, and says so: "measured": [] instead of [0, 1, 2]).
_VOLATILE = {"seconds", "wait", "build_seconds", "hessian_seconds", "measured", "measured_blocks"}


def phase_of(key: str) -> str | None:
    """The pipeline phase that writes ``key`` (a path relative to the store root)."""
    if key.startswith("databases/"):
        return "sensitivity" if "/sensitivity/" in key else "database"
    if "/generations/" in key or key.startswith("generations/"):
        return "generation"
    if "/posttrain/" in key:
        return "posttrain"
    if "/result/model/" in key or key.endswith("/result/export.json"):
        return "export"
    if "/result/" in key:
        return "evaluate"
    return None


def content_digest(key: str, data: bytes) -> str:
    """Which write of ``key`` this is: the sha256 of its bytes (without wall-clock fields), so a
    key written several times (checkpoints, a generation state) names one of its writes, in any run."""
    if key.endswith(".json"):
        with contextlib.suppress(ValueError):
            data = json.dumps(_strip(json.loads(data)), sort_keys=True).encode()
    elif key.endswith(".md"):
        data = _mask_seconds(data)
    return hashlib.sha256(data).hexdigest()


@dataclasses.dataclass(frozen=True)
class KillPoint:
    phase: str
    key: str         # the artifact (relative to the store root) whose write triggers the kill...
    digest: str      # ...and which of its writes (content_digest)
    mode: str        # mid-write | sidecar | after
    delay: float = 0.0

    def describe(self) -> str:
        return f"{self.phase}: {self.mode} {self.key}" + (f" +{self.delay:.2f}s" if self.mode == "after" else "")


# ----------------------------------------------------------------------------- the child

def _install(plan: dict[str, Any]) -> None:
    from darwinlm.store import base, file

    root = os.path.abspath(plan["root"])
    journal = open(plan["journal"], "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the process
    kill = plan.get("kill")
    original = base._atomic_write

    def die() -> None:
        journal.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    armed = []  # the kill point's data write happened: its sidecar write is the trigger

    def write(path: str, chunks, check=None):
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        sidecar = rel.endswith(".sha256")
        key = rel[: -len(".sha256")] if sidecar else rel
        data = b"".join(chunks)
        entry = {"key": key, "sidecar": sidecar, "phase": phase_of(key), "t": time.monotonic()}
        if not sidecar:
            entry["digest"] = content_digest(key, data.replace(root.encode(), b"<store>"))
        journal.write(json.dumps(entry) + "\n")
        journal.flush()
        hit = kill is not None and key == kill["key"]
        if hit and not sidecar and entry["digest"] == kill["digest"]:
            if kill["mode"] == "mid-write":
                def torn():
                    yield data[: len(data) // 2]
                    die()
                return original(path, torn(), check)
            armed.append(key)
        if hit and sidecar and armed:
            if kill["mode"] == "sidecar":
                die()
            digest = original(path, [data], check)
            threading.Timer(kill["delay"], die).start()
            return digest
        return original(path, [data], check)

    file._atomic_write = write


def _child(argv: list[str]) -> int:
    plan = json.loads(pathlib.Path(argv[0]).read_text(encoding="utf-8"))
    _install(plan)
    from darwinlm.cli import main

    return main(argv[argv.index("--") + 1:])


# ----------------------------------------------------------------------------- the driver

def run_cli(spec_path: pathlib.Path, root: pathlib.Path, journal: pathlib.Path, kill: KillPoint | None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """One ``darwinlm run SPEC`` in a fresh interpreter, killed at ``kill`` (None: runs to the end)."""
    plan = {"root": str(root), "journal": str(journal), "kill": dataclasses.asdict(kill) if kill else None}
    plan_path = journal.with_suffix(".plan.json")
    plan_path.write_text(json.dumps(plan), encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(_REPO))
    return subprocess.run([sys.executable, "-m", "tests.support.crash", str(plan_path), "--", "--log-level",
                           "warning", "run", str(spec_path)],
                          cwd=_REPO, env=env, capture_output=True, text=True, timeout=timeout)


_REPO = pathlib.Path(__file__).resolve().parents[2]


def read_journal(path: pathlib.Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plan_kills(journal: list[dict[str, Any]], seed: int, per_phase: dict[str, int]) -> list[KillPoint]:
    """Seeded kill points, ``per_phase[p]`` in phase p, in the order the reference run reached them.

    Every write qualifies, rewrites included (each checkpoint, each version of a generation state): a
    point names the key and the content of that write. A point in mode ``after`` waits a random fraction
    of the reference's gap to the next write, so the kill lands in the computation between two writes
    of the same phase."""
    rng = random.Random(seed)
    data = [e for e in journal if not e["sidecar"]]
    counts = collections.Counter((e["key"], e["digest"]) for e in data)
    chosen: list[tuple[int, KillPoint]] = []
    for phase, n in per_phase.items():
        idx = [i for i, e in enumerate(data) if e["phase"] == phase and counts[e["key"], e["digest"]] == 1]
        assert len(idx) >= n, f"the reference run wrote {len(idx)} artifacts in phase {phase}; {n} wanted"
        for i in sorted(rng.sample(idx, n)):
            mode = rng.choice(MODES)
            nxt = next((e for e in data[i + 1:] if e["phase"] == phase), None)
            if mode == "after" and nxt is None:
                mode = "mid-write"  # the phase's last write: nothing of the phase left to interrupt
            gap = (nxt["t"] - data[i]["t"]) if nxt else 0.0
            delay = round(rng.uniform(0.1, 0.8) * gap, 3) if mode == "after" else 0.0
            chosen.append((i, KillPoint(phase, data[i]["key"], data[i]["digest"], mode, delay)))
    chosen.sort(key=lambda c: c[0])
    return [k for _, k in chosen]


@dataclasses.dataclass
class Kill:
    point: KillPoint
    returncode: int
    landed: str | None  # the phase of the last write the killed process journaled
    seconds: float


def run_chain(spec_path: pathlib.Path, root: pathlib.Path, work: pathlib.Path,
              points: list[KillPoint]) -> tuple[list[Kill], subprocess.CompletedProcess]:
    """Run the CLI once per kill point (each run resumes the last), then once more to the end."""
    kills = []
    for i, point in enumerate(points):
        journal = work / f"kill-{i:02d}.jsonl"
        t0 = time.monotonic()
        proc = run_cli(spec_path, root, journal, point)
        entries = read_journal(journal)
        kills.append(Kill(point, proc.returncode, entries[-1]["phase"] if entries else None,
                          time.monotonic() - t0))
        if proc.returncode != -signal.SIGKILL:
            raise AssertionError(f"kill point {point.describe()} was not reached (rc {proc.returncode}):\n"
                                 f"{proc.stderr[-3000:]}")
    final = run_cli(spec_path, root, work / "final.jsonl", None)
    return kills, final


# ----------------------------------------------------------------------------- comparing stores

def artifacts(root: pathlib.Path) -> dict[str, pathlib.Path]:
    """Every complete artifact under a file store root: data files whose sidecar exists."""
    out = {}
    for p in root.rglob("*"):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not rel.endswith(".sha256") and not p.name.startswith(".~tmp."):
            if p.with_name(p.name + ".sha256").exists():
                out[rel] = p
    return out


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in _VOLATILE}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _mask_seconds(text: bytes) -> bytes:
    """The report's tables whose last column is ``seconds`` (wall clock), with that column masked."""
    out, masking = [], False
    for line in text.decode().splitlines():
        if line.rstrip().endswith("| seconds |"):
            masking = True
        elif masking and line.startswith("|") and not line.startswith("|--") and not line.startswith("|:"):
            line = line[: line.rstrip().rstrip("|").rstrip().rfind("|")] + "| <seconds> |"
        elif not line.startswith("|"):
            masking = False
        out.append(line)
    return "\n".join(out).encode()


def store_diff(want_root: pathlib.Path, got_root: pathlib.Path) -> tuple[int, list[str]]:
    """(artifacts compared, differences). JSON artifacts are compared without their wall-clock fields
    (a generation's ``timing.json`` is nothing but wall clock: only its sidecar is checked),
    every other artifact byte for byte (in text artifacts each store's own root path reads ``<store>``);
    every sidecar of ``got`` must hold its artifact's sha256."""
    want, got = artifacts(want_root), artifacts(got_root)
    diffs = [f"missing: {k}" for k in sorted(set(want) - set(got))]
    diffs += [f"extra: {k}" for k in sorted(set(got) - set(want))]
    for key in sorted(set(want) & set(got)):
        a, b = want[key].read_bytes(), got[key].read_bytes()
        sidecar = got[key].with_name(got[key].name + ".sha256").read_text().strip()
        if sidecar != hashlib.sha256(b).hexdigest():
            diffs.append(f"bad sidecar: {key}")
        if key.endswith("/timing.json"):  # wall-clock only (start/finish/load times of a generation)
            continue
        if key.endswith((".json", ".md", ".txt")):  # the two stores' own paths are where they differ
            a = a.replace(str(want_root).encode(), b"<store>")
            b = b.replace(str(got_root).encode(), b"<store>")
        if key.endswith(".md"):
            a, b = _mask_seconds(a), _mask_seconds(b)
        if key.endswith(".json"):
            same = _strip(json.loads(a)) == _strip(json.loads(b))
        else:
            same = a == b
        if not same:
            diffs.append(f"differs: {key}")
    return len(set(want) & set(got)), diffs


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
