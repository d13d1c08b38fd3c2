#!/usr/bin/env python
"""The operator's reaction time and memory, against the API emulator with the real operator under ``kopf run``.

The stack is the one of tests/k8s: tests/support/kmock_server.py as a subprocess (the API server) and
``darwinlm_operator.handlers`` started by ``kopf run --standalone --namespace=NS`` (tests/support/cluster.py's
``EmulatorProcess`` / ``OperatorProcess``). The searches use a ``file://`` store under /var/tmp shared by this
process, the operator and (``--real``) the job pods.

Two measurements:

* **handoff**: the time from a Job's completion to the creation of the next Job of the same search (goal <= 1 s on
  the emulator). This process watches the search's Jobs (``GET .../jobs?watch=true``) and stamps every event with
  its local monotonic clock on arrival; a handoff is a Job's ``Complete`` event after which no Job of the search is
  active, up to the next Job's ``ADDED`` event. Both ends are seen through the same watch stream, so the
  emulator's and the watch's delays cancel out and what remains is the operator's reaction (kopf's event
  handling, the poke of the search's loop, one reconcile: read the search, its Jobs and the store, create the
  Job). The Jobs are completed one of two ways:

  - ``fake`` (default): this process plays the Job: on a Job's ``ADDED`` it waits ``--job-seconds``, writes the
    task's completion marker into the store (what the task's pod writes last), then patches the Job's status to
    ``Complete`` (what the Job controller does). No pods, so the machine's load is the operator's and the
    emulator's only. The search runs to Succeeded: database, ``--generations`` generations, post-training,
    export, evaluation.
  - ``--real``: the pod runner (tests/support/pod_runner.py) runs every Job's pod as a local process on the tiny
    model of the tests (tests/conftest.py ``make_tiny_assets``), as the end-to-end tests do, and writes the Job
    status when the pod exits. Slower (each Job starts a Python process with torch) and noisier.

  A next Job created *before* the previous Job's ``Complete`` event arrived is counted as "early": the operator's
  periodic reconcile saw the completion marker in the store before the Job object said so (real pods write the
  marker some 100 ms before they exit); it has no reaction time to measure.

* **memory**: ``--searches`` (100) PruningSearches created at once in a fresh namespace with a fresh operator;
  no pod runner, so each search gets its first Job (the layer database) and waits (``podStartTimeoutSeconds`` is
  set high so no search fails). Reported: the time until every search has its Job and a status phase, then the
  operator's VmRSS (sampled over ``--steady-seconds``, after the reconcile loops have settled), its peak VmHWM
  from /proc/<pid>/status, and its CPU use in that window (utime + stime). The idle operator's RSS before the
  searches is the baseline. Goal: < 200 MB.

The operator honours DARWINLM_RECONCILE_INTERVAL (seconds between reconciles of a search that nothing pokes,
default 2; ``--interval``), DARWINLM_METRICS_PORT (a free port is given) and DARWINLM_STALE_AFTER.

    .venv/bin/python bench/k8s_operator.py                      # fake Jobs, 12 generations + 100 searches: ~1-2 min
    .venv/bin/python bench/k8s_operator.py --real --generations 10 --skip-memory --json
    .venv/bin/python bench/k8s_operator.py --real --generations 8 --generations-per-job 1 4 0 --skip-memory

* **warm** (``--real --generations-per-job N ...``): one real search per N (``generationsPerJob``), the
  seconds per generation from the store's ``generations/<g>/timing.json`` (finish-to-finish: with N = 1 the
  Job hand-off is inside every interval), the generation's own compute, their difference (the overhead per
  generation), the fixed cost of each Job that starts mid-search broken down (pod start + imports + the
  operator's reaction, model load, pools, database open, the rest until the generation starts) and the
  status ETA when half the generations were done against the time that was actually left.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
# bench/ is not an import root: only the repository and operator/ are (as in the operator's image)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
for p in (REPO / "operator", REPO):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

# importing tests.support.cluster points KUBECONFIG at a temporary kubeconfig for 127.0.0.1:9 until the
# emulator starts (so nothing can reach a real cluster)
from tests.support.cluster import (
    KUBECONFIG_PATH,
    EmulatorProcess,
    K8s,
    OperatorProcess,
    wait_for,
)
from tests.support.procs import free_port

G, V, P = "darwinlm.io", "v1alpha1", "pruningsearches"
CRD = REPO / "manifests" / "crd.yaml"
LABEL_SEARCH, LABEL_TASK = "darwinlm.io/search", "darwinlm.io/task"
HANDOFF_GOAL_S = 1.0
RSS_GOAL_MB = 200.0


def _raise(op: OperatorProcess):
    raise RuntimeError(f"the operator exited ({op.returncode}):\n{op.current_output[-3000:]}")


def _proc_status(pid: int) -> dict[str, float]:
    """VmRSS / VmHWM (MB) of a process."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0]) / 1024.0
    return out


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _stats(xs: list[float]) -> dict:
    if not xs:
        return {"n": 0}
    s = sorted(xs)
    p95 = s[min(len(s) - 1, max(0, round(0.95 * (len(s) - 1))))]
    return {"n": len(s), "median": statistics.median(s), "p95": p95, "max": s[-1], "min": s[0],
            "mean": statistics.fmean(s)}


# ----------------------------------------------------------------------------------------------- the stack

class Stack:
    """The emulator, API clients, the CRD; operators started on demand."""

    def __init__(self, workdir: Path, interval: float | None) -> None:
        self.workdir = workdir
        self.interval = interval
        self.emulator = EmulatorProcess(workdir / "kubeconfig", log_path=workdir / "kmock.log").start()
        self.k8s = K8s(self.emulator.kubeconfig)
        self.operators: list[OperatorProcess] = []
        import yaml

        self.k8s.raw("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
                     yaml.safe_load(CRD.read_text()))

    def namespace(self, name: str) -> str:
        self.k8s.create_namespace(name)
        return name

    def operator(self, namespace: str, probe_spec: dict) -> OperatorProcess:
        env = {"DARWINLM_METRICS_PORT": str(free_port())}
        if self.interval is not None:
            env["DARWINLM_RECONCILE_INTERVAL"] = str(self.interval)
        op = OperatorProcess("darwinlm_operator.handlers", namespace=namespace, kubeconfig=self.emulator.kubeconfig,
                             env=env, log_path=self.workdir / f"operator-{namespace}.log", verbose=False)
        op.start()
        self.operators.append(op)
        # Not --verbose (its DEBUG log of every event would cost the operator CPU): ready = it reconciled a
        # suspended probe search, which is then deleted.
        self.create_search(namespace, "ready-probe", {**probe_spec, "suspend": True})
        wait_for(lambda: ((self.k8s.custom_object(G, V, P, "ready-probe", namespace) or {}).get("status") or {})
                 .get("phase") == "Suspended" or (not op.alive and _raise(op)), 120, "the operator to reconcile")
        self.k8s.raw("DELETE", f"/apis/{G}/{V}/namespaces/{namespace}/{P}/ready-probe")
        wait_for(lambda: self.k8s.custom_object(G, V, P, "ready-probe", namespace) is None, 30, "the probe to go")
        return op

    def create_search(self, namespace: str, name: str, spec: dict) -> dict:
        return self.k8s.raw("POST", f"/apis/{G}/{V}/namespaces/{namespace}/{P}",
                            {"apiVersion": f"{G}/{V}", "kind": "PruningSearch", "metadata": {"name": name},
                             "spec": spec})

    def close(self) -> None:
        for op in self.operators:
            op.stop()
        self.emulator.stop()


class JobWatch:
    """``GET /apis/batch/v1/namespaces/NS/jobs?watch=true`` in a thread; every event stamped on arrival."""

    def __init__(self, url: str, namespace: str, on_event=None) -> None:
        self.url, self.namespace, self.on_event = urlparse(url), namespace, on_event
        self.events: list[tuple[float, float, str, dict]] = []    # (monotonic, wall, type, job)
        self.lock = threading.Lock()
        self._stop = False
        self._conn: http.client.HTTPConnection | None = None
        self._thread = threading.Thread(target=self._run, name="job-watch", daemon=True)

    def start(self) -> JobWatch:
        self._conn = http.client.HTTPConnection(self.url.hostname, self.url.port, timeout=3600)
        self._conn.request("GET", f"/apis/batch/v1/namespaces/{self.namespace}/jobs?watch=true&timeoutSeconds=3600",
                           headers={"Accept": "application/json"})
        resp = self._conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"job watch: HTTP {resp.status}")
        self._resp = resp
        self._thread.start()
        return self

    def _run(self) -> None:
        buf = b""
        while not self._stop:
            try:
                chunk = self._resp.read1(65536)
            except (OSError, ValueError, AttributeError, http.client.HTTPException):
                return                                  # stopped (the socket was shut down under the read)
            if not chunk:
                return
            now, wall = time.monotonic(), time.time()
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if not line.strip():
                    continue
                ev = json.loads(line)
                job = ev.get("object") or {}
                with self.lock:
                    self.events.append((now, wall, ev.get("type", ""), job))
                if self.on_event is not None:
                    self.on_event(now, ev.get("type", ""), job)

    def stop(self) -> None:
        self._stop = True
        if self._conn is not None:
            try:
                self._conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._conn.close()


def _finished(job: dict) -> str | None:
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") in ("Complete", "Failed") and c.get("status") == "True":
            return c["type"]
    return None


def _phase(job: dict) -> tuple:
    """Jobs of one phase run together (database shards, post-training variants); phases run in order."""
    from darwinlm.core.plan import Task

    task = Task.parse(job["metadata"]["labels"][LABEL_TASK])
    return (task.kind, task.index if task.kind == "generation" else 0)


def handoffs(events: list[tuple[float, float, str, dict]], marker_time) -> list[dict]:
    """One search's phase-to-phase handoffs from its Job events ``(monotonic, wall, type, job)``.

    For each phase after the first: ``prev`` = the Job of the previous phase whose Complete event came last,
    ``next`` = the first Job of the phase. ``from_complete`` = next's ADDED - prev's Complete (both event
    arrivals, monotonic; negative = the Job was created before the Complete event arrived: "early");
    ``from_marker`` = next's ADDED (wall clock) - the time prev's completion marker was complete in the store
    (``marker_time(job)``, the file store's mtime), i.e. the whole reaction to the task's completion."""
    jobs: dict[str, dict] = {}
    for mono, wall, etype, job in sorted(events, key=lambda e: e[0]):
        name = job["metadata"]["name"]
        rec = jobs.setdefault(name, {"name": name, "phase": _phase(job), "added": None, "complete": None,
                                     "job": job})
        if etype == "ADDED" and rec["added"] is None:
            rec["added"] = (mono, wall)
        if etype in ("ADDED", "MODIFIED") and _finished(job) == "Complete" and rec["complete"] is None:
            rec["complete"] = (mono, wall)
            rec["job"] = job
    phases: dict[tuple, list[dict]] = {}
    for rec in sorted((r for r in jobs.values() if r["added"]), key=lambda r: r["added"][0]):
        phases.setdefault(rec["phase"], []).append(rec)
    order = list(phases)
    out = []
    for a, b in itertools.pairwise(order):
        done = [r for r in phases[a] if r["complete"]]
        if not done:
            continue
        prev = max(done, key=lambda r: r["complete"][0])
        nxt = phases[b][0]
        markers = [m for m in (marker_time(r["job"]) for r in done) if m is not None]
        out.append({"prev": prev["name"], "next": nxt["name"],
                    "from_complete": nxt["added"][0] - prev["complete"][0],
                    "from_marker": nxt["added"][1] - max(markers) if markers else None})
    return out


def _marker_time(store_root: Path):
    """``job -> wall time`` its task's completion marker became complete in the file store (None: absent)."""
    from darwinlm.core.plan import Task, done_key
    from darwinlm.store import SIDECAR_SUFFIX

    def get(job: dict) -> float | None:
        md = job["metadata"]
        owner = next((r for r in md.get("ownerReferences") or [] if r.get("kind") == "PruningSearch"), None)
        if owner is None:
            return None
        path = store_root / "searches" / f"{md['labels'][LABEL_SEARCH]}-{owner['uid']}" / done_key(
            Task.parse(md["labels"][LABEL_TASK]))
        try:
            return max(os.stat(path).st_mtime, os.stat(str(path) + SIDECAR_SUFFIX).st_mtime)
        except OSError:
            return None
    return get


# ----------------------------------------------------------------------------------------------- handoff

def _spec(assets: Path, store: str, generations: int, **over) -> dict:
    from tests.conftest import tiny_spec_dict

    spec = tiny_spec_dict(assets, store, **{"search.generations": generations})
    spec.pop("name")
    spec.update(image="darwinlm-job:dev", backoffLimit=1, podStartTimeoutSeconds=600)
    spec.update(over)
    return spec


class FakeJobs:
    """Plays every Job of a search: after ``job_seconds`` the task's completion marker goes into the store,
    then the Job status becomes Complete (startTime, completionTime, succeeded, conditions)."""

    def __init__(self, stack: Stack, namespace: str, store_root: str, job_seconds: float) -> None:
        self.stack, self.namespace, self.store_root, self.job_seconds = stack, namespace, store_root, job_seconds
        self.errors: list[str] = []
        self.completed: dict[str, float] = {}       # job -> monotonic time its status patch returned
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def on_event(self, t: float, etype: str, job: dict) -> None:
        name = job["metadata"]["name"]
        with self._lock:
            if etype != "ADDED" or name in self._seen or _finished(job):
                return
            self._seen.add(name)
        threading.Thread(target=self._complete, args=(job,), daemon=True).start()

    def _complete(self, job: dict) -> None:
        from darwinlm.core.plan import Task, done_key
        from darwinlm.store import open_store

        try:
            time.sleep(self.job_seconds)
            md = job["metadata"]
            task = Task.parse(md["labels"][LABEL_TASK])
            owner = next(r for r in md.get("ownerReferences") or [] if r.get("kind") == "PruningSearch")
            store = open_store(self.store_root).child(f"searches/{md['labels'][LABEL_SEARCH]}-{owner['uid']}")
            marker: dict = {"seconds": self.job_seconds}
            if task.kind == "generation":
                marker.update(best_fitness=1.0 / (task.index + 2), evaluations=4, generation=task.index)
            store.put_json(done_key(task), marker)
            start = job.get("metadata", {}).get("creationTimestamp")
            now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            self.stack.k8s.raw("PATCH", f"/apis/batch/v1/namespaces/{self.namespace}/jobs/{md['name']}/status",
                               {"status": {"startTime": start, "completionTime": now, "succeeded": 1, "active": 0,
                                           "conditions": [
                                               {"type": "SuccessCriteriaMet", "status": "True",
                                                "lastTransitionTime": now},
                                               {"type": "Complete", "status": "True", "lastTransitionTime": now}]}},
                               content_type="application/merge-patch+json")
            self.completed[md["name"]] = time.monotonic()
        except Exception as e:  # noqa: BLE001 - reported in the result
            self.errors.append(f"{job['metadata']['name']}: {e!r}")


def bench_handoff(stack: Stack, args, workdir: Path) -> dict:
    ns = stack.namespace("bench-handoff-real" if args.real else "bench-handoff")
    store_root = f"file://{workdir / 'store'}"
    runner = None
    fake = None
    if args.real:
        from tests.conftest import make_tiny_assets
        from tests.support.pod_runner import PodRunner

        t = time.monotonic()
        assets = make_tiny_assets(workdir / "tiny")
        print(f"[handoff] tiny assets built in {time.monotonic() - t:.1f} s", file=sys.stderr)
        runner = PodRunner(stack.emulator.kubeconfig, namespace=ns, log_dir=workdir / "pods").start()
        watch = JobWatch(stack.emulator.url, ns).start()
    else:
        assets = workdir / "no-assets"                     # nothing reads them: no pod runs
        fake = FakeJobs(stack, ns, store_root, args.job_seconds)
        watch = JobWatch(stack.emulator.url, ns, on_event=fake.on_event).start()
    op = stack.operator(ns, _spec(assets, store_root, args.generations))
    name = "handoff"
    try:
        t0 = time.monotonic()
        stack.create_search(ns, name, _spec(assets, store_root, args.generations))

        def phase():
            st = (stack.k8s.custom_object(G, V, P, name, ns) or {}).get("status") or {}
            return st.get("phase") if st.get("phase") in ("Succeeded", "Failed") else None
        try:
            final = wait_for(phase, args.timeout, "the search to finish", interval=0.2)
        except TimeoutError:
            final = "Timeout"
        wall = time.monotonic() - t0
        time.sleep(0.3)
    finally:
        watch.stop()
        if runner is not None:
            runner.stop()
    with watch.lock:
        events = list(watch.events)
    hs = handoffs(events, _marker_time(workdir / "store"))
    comp = [h["from_complete"] for h in hs]
    mark = [h["from_marker"] for h in hs if h["from_marker"] is not None]
    gen = [h for h in hs if "-generation-" in h["prev"] and "-generation-" in h["next"]]
    ps = stack.k8s.custom_object(G, V, P, name, ns) or {}
    return {
        "mode": "real" if args.real else "fake",
        "generations": args.generations,
        "job_seconds": None if args.real else args.job_seconds,
        "final_phase": final,
        "status_message": (ps.get("status") or {}).get("message"),
        "wall_seconds": wall,
        "jobs": len({e[3]["metadata"]["name"] for e in events}),
        "handoffs": hs,
        "from_complete": _stats(comp),
        "from_complete_generations": _stats([h["from_complete"] for h in gen]),
        "early": sum(1 for x in comp if x < 0),
        "from_marker": _stats(mark),
        "from_marker_generations": _stats([h["from_marker"] for h in gen if h["from_marker"] is not None]),
        "goal_s": HANDOFF_GOAL_S,
        "pass": len(comp) >= 10 and max(comp) <= HANDOFF_GOAL_S and final == "Succeeded",
        "errors": (fake.errors if fake else []) + (runner.errors[-3:] if runner else []),
        "operator_log": str(op.log_path),
    }


# ----------------------------------------------------------------------------------------------- warm Jobs

def _seconds(text: str | None) -> float | None:
    """``"1h2m"``, ``"3m20s"``, ``"45s"`` (status.eta) -> seconds."""
    import re

    if not text:
        return None
    parts = dict((u, int(n)) for n, u in re.findall(r"(\d+)([hms])", text))
    return 3600.0 * parts.get("h", 0) + 60.0 * parts.get("m", 0) + parts.get("s", 0)


def bench_warm(stack: Stack, args, workdir: Path, assets: Path, per_job: int) -> dict:
    """One real search (pod runner, tiny model) with ``generationsPerJob: per_job``: wall-clock per generation
    from the store's ``timing.json`` (finish-to-finish intervals, Job hand-off included), the generation's own
    compute seconds, the fixed cost of each Job that started a generation, and the status ETA at 50 %."""
    from tests.support.pod_runner import PodRunner

    ns = stack.namespace(f"bench-warm-{per_job}")
    store_root = workdir / f"store-{per_job}"
    spec = _spec(assets, f"file://{store_root}", args.generations, generationsPerJob=per_job)
    op = stack.operator(ns, spec)
    runner = PodRunner(stack.emulator.kubeconfig, namespace=ns, log_dir=workdir / f"pods-{per_job}").start()
    name = "warm"
    half = {}
    try:
        t0 = time.time()
        stack.create_search(ns, name, spec)

        def phase():
            st = (stack.k8s.custom_object(G, V, P, name, ns) or {}).get("status") or {}
            if not half and int(st.get("generationsDone") or 0) >= args.generations // 2 and st.get("eta"):
                half.update(t=time.time(), eta=st["eta"], eta_range=st.get("etaRange"), progress=st.get("progress"),
                            stage=st.get("stage"))
            return st.get("phase") if st.get("phase") in ("Succeeded", "Failed") else None
        try:
            final = wait_for(phase, args.timeout, "the search to finish", interval=0.2)
        except TimeoutError:
            final = "Timeout"
        wall = time.time() - t0
    finally:
        runner.stop()
        op.stop()
    ps = stack.k8s.custom_object(G, V, P, name, ns) or {}
    prefix = store_root / "searches" / f"{name}-{ps['metadata']['uid']}" / "generations"
    timings = [json.loads((prefix / f"{g:05d}" / "timing.json").read_text()) for g in range(args.generations)
               if (prefix / f"{g:05d}" / "timing.json").exists()]
    fin = [t["finished"] for t in timings]
    intervals = [b - a for a, b in zip(fin, fin[1:])]
    # a Job's first generation: its process started after the previous generation finished; its model and
    # pools load inside the generation (lazily), so they are taken out of its compute
    first = [g > 0 and t["process_started"] > timings[g - 1]["finished"] for g, t in enumerate(timings)]
    loads = [sum(t["process"].values()) if f else 0.0 for t, f in zip(timings, first)]
    compute = [t["finished"] - t["started"] - ld for t, ld in zip(timings, loads)]
    firsts = [(timings[g - 1], t) for g, t in enumerate(timings) if first[g]]
    fixed = {"pod start + imports + operator reaction": [t["process_started"] - p["finished"] for p, t in firsts],
             "model load": [t["process"].get("model_load", 0.0) for _, t in firsts],
             "pools": [t["process"].get("pools", 0.0) for _, t in firsts],
             "database open": [t["process"].get("database_open", 0.0) for _, t in firsts]}
    out = {"generations_per_job": per_job, "final_phase": final, "wall_seconds": wall,
           "search_seconds": fin[-1] - timings[0]["started"] if fin else None,
           "interval": _stats(intervals), "compute": _stats(compute[1:]),
           # paired: each interval minus the compute of the generation that ended it (the machine's load
           # moves both alike); the mean is the hand-off cost spread over every generation
           "overhead_per_generation": statistics.fmean(i - c for i, c in zip(intervals, compute[1:]))
           if intervals else None,
           "jobs_started_mid_search": len(firsts),
           "fixed_cost_per_job": {k: _stats(v) for k, v in fixed.items()},
           "errors": runner.errors[-3:]}
    if half and fin:
        actual = fin[-1] - half["t"]
        est = _seconds(half["eta"])
        out["eta_at_half"] = {**half, "eta_seconds": est, "actual_seconds": actual,
                              "ratio": est / actual if est is not None and actual > 0 else None}
        out["eta_at_half"].pop("t")
    return out


_FIXED_SCRIPT = """
import json, sys, time
t0 = time.time()
from darwinlm.run.workspace import Workspace
from darwinlm.spec import load_spec
t1 = time.time()
ws = Workspace(load_spec(sys.argv[1], extra_allowed=frozenset(sys.argv[2:])))
ws.model
ws.pools
t2 = time.time()
print(json.dumps({"imports": t1 - t0, **ws.timings, "total_in_process": t2 - t0}))
"""


def fixed_cost(spec_path: str, repeat: int = 2) -> dict:
    """What a fresh generation Job of ``spec_path`` pays before its first generation, measured in fresh
    processes: interpreter start, imports (torch, transformers), model load and token pools (``Workspace``;
    the layer database is opened lazily and costs little). Median of ``repeat`` runs."""
    import subprocess

    runs = []
    for _ in range(repeat):
        t = time.time()
        out = subprocess.run([sys.executable, "-c", _FIXED_SCRIPT, spec_path, "image", "workers", "resources",
                              "podTemplate", "s3", "generationsPerJob", "imagePullPolicy", "queueName"],
                             capture_output=True, text=True, check=True, cwd=REPO,
                             env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
        rec = json.loads(out.stdout.strip().splitlines()[-1])
        rec["process_wall"] = time.time() - t
        runs.append(rec)
    return {k: statistics.median(r.get(k, 0.0) for r in runs) for k in runs[0]}


def warm_table(rows: list[dict]) -> str:
    lines = ["", "warm generation Jobs (real pods, tiny model): seconds per generation, finish to finish",
             "", "| generationsPerJob | generations | median s/gen | median compute s | overhead s/gen (mean, paired) "
             "| Jobs started mid-search | search s | ETA at 50% (actual, ratio) |", "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        e = r.get("eta_at_half") or {}
        eta = f"{e.get('eta')} ({e.get('actual_seconds', 0):.0f}s, x{e.get('ratio') or 0:.2f})" if e else "-"
        lines.append(f"| {r['generations_per_job']} | {r['interval']['n'] + 1} | {r['interval']['median']:.2f} | "
                     f"{r['compute']['median']:.2f} | {r['overhead_per_generation']:.2f} | "
                     f"{r['jobs_started_mid_search']} | {r['search_seconds']:.1f} | {eta} |")
    for r in rows:
        if r["jobs_started_mid_search"]:
            lines += ["", f"fixed cost of a generation Job (generationsPerJob {r['generations_per_job']}, median s):"]
            lines += [f"- {k}: {v['median']:.2f}" for k, v in r["fixed_cost_per_job"].items() if v["n"]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- memory

def bench_memory(stack: Stack, args, workdir: Path) -> dict:
    ns = stack.namespace("bench-memory")
    store_root = f"file://{workdir / 'store-memory'}"
    watch = JobWatch(stack.emulator.url, ns).start()
    spec = _spec(workdir / "no-assets", store_root, 3, podStartTimeoutSeconds=86400)
    op = stack.operator(ns, spec)
    pid = op.pid
    time.sleep(args.idle_seconds)
    idle = _proc_status(pid)
    names = [f"s{i:03d}" for i in range(args.searches)]
    t0 = time.monotonic()
    for n in names:
        stack.create_search(ns, n, spec)
    created = time.monotonic() - t0

    def jobs_for_all():
        with watch.lock:
            got = {e[3]["metadata"]["labels"].get(LABEL_SEARCH) for e in watch.events if e[2] == "ADDED"}
        return len(got) >= len(names)
    try:
        wait_for(jobs_for_all, args.timeout, "a Job for every search", interval=0.05)
    except TimeoutError:
        pass
    t_jobs = time.monotonic() - t0
    with watch.lock:
        n_jobs = len({e[3]["metadata"]["labels"].get(LABEL_SEARCH) for e in watch.events if e[2] == "ADDED"})

    def phases():
        items = stack.k8s.raw("GET", f"/apis/{G}/{V}/namespaces/{ns}/{P}")["items"]
        n = sum(1 for i in items if (i.get("status") or {}).get("phase") == "Running")
        return n if n >= len(names) else None
    try:
        wait_for(phases, args.timeout, "every search Running", interval=0.25)
    except TimeoutError:
        pass
    t_running = time.monotonic() - t0
    items = stack.k8s.raw("GET", f"/apis/{G}/{V}/namespaces/{ns}/{P}")["items"]
    running = sum(1 for i in items if (i.get("status") or {}).get("phase") == "Running")
    # steady state: the loops keep reconciling every interval; sample RSS and CPU over the window
    samples = []
    cpu0, w0 = _cpu_seconds(pid), time.monotonic()
    end = w0 + args.steady_seconds
    while time.monotonic() < end:
        samples.append(_proc_status(pid)["VmRSS"])
        time.sleep(0.5)
    cpu = (_cpu_seconds(pid) - cpu0) / (time.monotonic() - w0)
    final = _proc_status(pid)
    watch.stop()
    op.stop()
    return {
        "searches": len(names),
        "create_seconds": created,
        "all_jobs_seconds": t_jobs,
        "jobs_created": n_jobs,
        "all_running_seconds": t_running,
        "running": running,
        "idle_rss_mb": idle["VmRSS"],
        "steady_rss_mb": {"median": statistics.median(samples), "max": max(samples), "last": samples[-1]},
        "peak_hwm_mb": final["VmHWM"],
        "per_search_kb": (statistics.median(samples) - idle["VmRSS"]) * 1024 / len(names),
        "steady_cpu_fraction": cpu,
        "steady_seconds": args.steady_seconds,
        "goal_mb": RSS_GOAL_MB,
        "pass": final["VmHWM"] < RSS_GOAL_MB and running == len(names),
        "operator_log": str(op.log_path),
    }


# ----------------------------------------------------------------------------------------------- output

def table(res: dict) -> str:
    interval = res["interval"] if res["interval"] is not None else "2 (default)"
    lines = [f"operator under kopf run against the API emulator; reconcile interval {interval} s"]
    h = res.get("handoff")
    if h:
        what = f"{h['mode']} Jobs" + ("" if h["job_seconds"] is None else f" of {h['job_seconds']:.2f} s")
        lines += ["", (f"handoff ({what}, {h['generations']} generations): search {h['final_phase']} in "
                       f"{h['wall_seconds']:.1f} s, {h['jobs']} Jobs, {len(h['handoffs'])} handoffs, {h['early']} "
                       f"early (next Job created before the previous Job's Complete event arrived)"),
                  "", "| next Job ADDED minus | handoffs | n | median s | p95 s | max s |",
                  "|---|---|---:|---:|---:|---:|"]
        for label, key in (("previous Job's Complete event", "from_complete"),
                           ("previous task's marker in the store", "from_marker")):
            for which, suffix in (("all", ""), ("generation -> generation", "_generations")):
                st = h[key + suffix]
                cells = (f"{st['n']} | {st['median']:.3f} | {st['p95']:.3f} | {st['max']:.3f}" if st["n"]
                         else "0 | - | - | -")
                lines.append(f"| {label} | {which} | {cells} |")
        lines.append(f"goal: >= 10 handoffs, max (from the Complete event) <= {h['goal_s']} s: "
                     f"{'PASS' if h['pass'] else 'FAIL'}")
        if h["errors"]:
            lines.append(f"errors: {h['errors'][:3]}")
    m = res.get("memory")
    if m:
        lines += ["", (f"memory: {m['searches']} PruningSearches created in {m['create_seconds']:.2f} s; a Job for "
                       f"{m['jobs_created']} of them after {m['all_jobs_seconds']:.2f} s, {m['running']} Running "
                       f"after {m['all_running_seconds']:.2f} s"),
                  "", "| operator | MB |", "|---|---:|",
                  f"| VmRSS idle (no searches) | {m['idle_rss_mb']:.1f} |",
                  f"| VmRSS steady, median over {m['steady_seconds']:.0f} s | {m['steady_rss_mb']['median']:.1f} |",
                  f"| VmRSS steady, max | {m['steady_rss_mb']['max']:.1f} |",
                  f"| VmHWM (peak) | {m['peak_hwm_mb']:.1f} |",
                  "", (f"per search: {m['per_search_kb']:.0f} kB; operator CPU in the steady window: "
                       f"{100 * m['steady_cpu_fraction']:.0f}% of one core"),
                  f"goal peak < {m['goal_mb']:.0f} MB: {'PASS' if m['pass'] else 'FAIL'}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", action="store_true", help="run the Jobs' pods for real (pod runner, tiny model) "
                                                       "instead of completing them from this process")
    p.add_argument("--generations", type=int, default=12, help="generations of the handoff search (default 12: "
                                                               "11 generation-to-generation handoffs)")
    p.add_argument("--job-seconds", type=float, default=0.3, help="fake Jobs: seconds from ADDED to Complete")
    p.add_argument("--searches", type=int, default=100, help="PruningSearches of the memory measurement")
    p.add_argument("--steady-seconds", type=float, default=20.0, help="memory: RSS/CPU sampling window")
    p.add_argument("--idle-seconds", type=float, default=3.0, help="memory: wait before the idle RSS sample")
    p.add_argument("--interval", type=float, default=None,
                   help="DARWINLM_RECONCILE_INTERVAL for the operator (default: its own, 2 s)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for each phase")
    p.add_argument("--skip-handoff", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, store)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--generations-per-job", type=int, nargs="+", default=None, metavar="N",
                   help="with --real: one real search per N (generationsPerJob; 0 = one Job for the whole search), "
                        "seconds per generation including the Job hand-off, instead of the handoff bench")
    p.add_argument("--fixed-cost", metavar="SPEC", help="only measure a Job's fixed cost for SPEC (fresh processes: "
                                                         "start, imports, model load, pools) and print it")
    args = p.parse_args(argv)
    if args.fixed_cost:
        print(json.dumps(fixed_cost(args.fixed_cost), indent=1))
        return 0

    # not under /tmp: the pod runner maps a pod's /tmp to its own directory
    workdir = Path(tempfile.mkdtemp(prefix="darwinlm-bench-operator-", dir="/var/tmp"))
    res: dict = {"interval": args.interval, "workdir": str(workdir) if args.keep else None}
    stack = Stack(workdir, args.interval)
    try:
        if args.generations_per_job is not None:
            from tests.conftest import make_tiny_assets

            assets = make_tiny_assets(workdir / "tiny")
            res["warm"] = [bench_warm(stack, args, workdir, assets, n) for n in args.generations_per_job]
        elif not args.skip_handoff:
            res["handoff"] = bench_handoff(stack, args, workdir)
        if not args.skip_memory:
            res["memory"] = bench_memory(stack, args, workdir)
    finally:
        stack.close()
        shutil.rmtree(KUBECONFIG_PATH.parent, ignore_errors=True)  # the temporary kubeconfig of tests.support.cluster
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    for part in ("handoff", "memory"):
        if part in res and not args.keep:
            res[part].pop("operator_log", None)
    print(json.dumps(res, indent=1) if args.json else table(res) + (warm_table(res["warm"]) if res.get("warm") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
