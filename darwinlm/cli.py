"""The ``darwinlm`` command line: the edge where progress bars, logging and exit codes live.

    darwinlm run SPEC.yaml [--store URI]      everything; resumes when re-run
    darwinlm validate SPEC.yaml               exit 0, or 2 listing every error with its field path
    darwinlm schema                           the spec's JSON Schema
    darwinlm plan SPEC.yaml                   the tasks that would run next
    darwinlm database|sensitivity|search|posttrain|export|evaluate SPEC.yaml   run up to and including one phase
    darwinlm provision [model|text|all]       the example model and text into the cache dir
    darwinlm task SPEC.yaml TASK [TASK...]    exactly the named plan task(s) (a Kubernetes Job's command);
                                              torch.distributed from env (WORLD_SIZE, RANK...) when W > 1

Exit codes: 0 ok, 2 bad spec or usage (permanent), 3 store error or lost distributed peer (retriable),
1 anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .errors import InfeasibleTargetError, SpecError, StoreError
from .store import layout

log = logging.getLogger("darwinlm")

EXIT_OK, EXIT_ERROR, EXIT_PERMANENT, EXIT_RETRIABLE = 0, 1, 2, 3


def _tqdm_progress(desc: str, total: int):
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=None)

    def update(n: int) -> None:
        bar.update(n)
        if bar.n >= bar.total:
            bar.close()

    return update


def _load(args):
    from .spec import load_spec, with_overrides

    spec = load_spec(args.spec)
    if getattr(args, "store", None):
        spec = with_overrides(spec, store=args.store)
    return spec


def _cmd_validate(args) -> int:
    spec = _load(args)
    print(f"{args.spec}: valid (search {spec.name!r}, store {spec.store})")
    return EXIT_OK


def _cmd_schema(args) -> int:
    from .spec import json_schema

    if args.markdown:
        from .spec.docs import spec_reference_markdown

        print(spec_reference_markdown())
        return EXIT_OK
    print(json.dumps(json_schema(openapi=args.openapi), indent=1))
    return EXIT_OK


def _cmd_plan(args) -> int:
    from .core.plan import next_tasks, progress
    from .run.workspace import Workspace

    spec = _load(args)
    ws = Workspace(spec)
    todo = next_tasks(spec, ws.store)
    print(json.dumps({"store": ws.store.uri, "next": [t.name for t in todo], **progress(spec, ws.store)}, indent=1))
    return EXIT_OK


def _cmd_run(args) -> int:
    from .run.runner import run_search

    spec = _load(args)
    ws = run_search(spec, progress=_tqdm_progress)
    print(f"done: {ws.store.uri}/{layout.RESULT} (report.md, fitness.png, config.json, model/)")
    return EXIT_OK


def _cmd_phase(args) -> int:
    from .run.runner import run_phase

    spec = _load(args)
    kind = {"search": "generation"}.get(args.command, args.command)
    ws = run_phase(spec, kind, progress=_tqdm_progress)
    print(f"{args.command}: done ({ws.store.uri})")
    return EXIT_OK


def _plan_tasks(spec, names: list[str]):
    """The named tasks of ``spec``'s plan, or an error message."""
    from .core.plan import Task, all_tasks

    phases = all_tasks(spec)
    tasks = []
    for name in names:
        try:
            task = Task.parse(name)
        except ValueError as e:
            return str(e)
        if not any(task in phase for phase in phases):
            every = [t.name for phase in phases for t in phase]
            return f"{name!r} is not a task of this spec's plan ({every[0]} ... {every[-1]})"
        tasks.append(task)
    return tasks


def _not_ready(spec, store, todo) -> str | None:
    """Why ``todo`` cannot run in order (an earlier phase is incomplete), or None."""
    from .core.plan import all_tasks, done_key

    phases = all_tasks(spec)
    for n, task in enumerate(todo):
        first = next(i for i, phase in enumerate(phases) if task in phase)
        pending = [t.name for phase in phases[:first] for t in phase
                   if t not in todo[:n] and not store.exists(done_key(t))]
        if pending:
            return f"{task.name} cannot run yet: {', '.join(pending)} not complete"
    return None


def _cmd_task(args) -> int:
    """Run the named tasks of the plan, in order; with WORLD_SIZE > 1 as one rank of a process group.

    Complete tasks return at once, before any rendezvous (a lone restarted rank must not wait for peers
    that are gone). A task whose earlier phases are incomplete is a usage error (exit 2)."""
    return run_tasks(_load(args), args.tasks, uid=getattr(args, "uid", None))


def run_tasks(spec, names: list[str], *, uid: str | None = None) -> int:
    """Run the named plan tasks of ``spec`` (store prefix ``searches/<name>[-<uid>]``); an exit code.

    This is also what the Kubernetes job entrypoints (``darwinlm_jobs``) call."""
    from .core.plan import done_key
    from .llm.distributed import PeerFailure, WorldConfigError, world_env
    from .run.workspace import Workspace

    tasks = _plan_tasks(spec, names)
    ws = Workspace(spec, uid=uid)
    if isinstance(tasks, list):
        todo = [t for t in tasks if not ws.store.exists(done_key(t))]
        if not todo:
            print(json.dumps({"tasks": names, "store": ws.store.uri, "status": "complete"}))
            return EXIT_OK
    problem = tasks if isinstance(tasks, str) else _not_ready(spec, ws.store, todo)
    try:
        if problem is None and world_env() is not None and any(t.kind != "generation" for t in todo):
            problem = "only generation tasks run on several workers (WORLD_SIZE > 1)"
    except WorldConfigError as e:
        problem = str(e)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_PERMANENT
    try:
        rank, size = _run_ranked(spec, ws, tasks, todo)
    except PeerFailure as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_PERMANENT if e.permanent else EXIT_RETRIABLE
    print(json.dumps({"tasks": names, "store": ws.store.uri, "status": "done", "rank": rank,
                      "world_size": size}))
    return EXIT_OK


def _run_ranked(spec, ws, tasks, todo) -> tuple[int, int]:
    """Join the process group the environment describes (if any) and run ``tasks``; (rank, world size)."""
    from .llm.distributed import DistributedShard, PeerFailure, init_from_env
    from .llm.runtime import resolve_device
    from .run.tasks import no_progress, run_task

    try:
        world = init_from_env(device=resolve_device(spec.model.device))
    except RuntimeError as e:  # rendezvous timed out or failed: the peers may come later
        raise PeerFailure(f"cannot join the process group: {e}") from e
    if world is None:
        for task in tasks:
            run_task(ws, task, progress=_tqdm_progress)
        return 0, 1
    if spec.model.threads is None:
        log.warning("model.threads is not set: with several workers, fitness values (and the search) are "
                    "reproducible only when every worker uses the same torch thread count")
    shard = DistributedShard(world)
    try:
        if world.is_writer:  # rank 0 writes the shared files first; the others only read them
            ws.record_spec()
            ws.parent_for(todo[0].index)
        shard.barrier()
        for task in tasks:
            log.info("task %s (rank %d/%d)", task.name, world.rank, world.world_size)
            run_task(ws, task, progress=_tqdm_progress if world.is_writer else no_progress, shard=shard)
    finally:
        world.close()
    return world.rank, world.world_size


def _cmd_provision(args) -> int:
    from . import provision

    argv = [args.what] + (["--cache-dir", args.cache_dir] if args.cache_dir else [])
    argv += ["--debian-docs"] if args.debian_docs else []
    argv += ["--force"] if args.force else []
    return provision.main(argv)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="darwinlm", description="DarwinLM evolutionary structured pruning")
    p.add_argument("--log-level", default=os.environ.get("DARWINLM_LOG_LEVEL", "INFO"))
    sub = p.add_subparsers(dest="command", required=True)

    def with_spec(name, fn, help_):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("spec", help="spec YAML/JSON (a bare spec or a PruningSearch manifest)")
        sp.add_argument("--store", help="override the spec's store URI (file://DIR or s3://bucket/prefix)")
        sp.set_defaults(fn=fn)
        return sp

    with_spec("run", _cmd_run, "run everything (resumes when re-run)")
    with_spec("validate", _cmd_validate, "validate a spec")
    with_spec("plan", _cmd_plan, "print the next tasks")
    for phase in ("database", "sensitivity", "search", "posttrain", "export", "evaluate"):
        with_spec(phase, _cmd_phase, f"run up to and including the {phase} phase")
    sp = with_spec("task", _cmd_task, "run exactly the named plan task(s), e.g. generation-3 (Kubernetes Jobs); "
                                      "one rank of a process group when WORLD_SIZE > 1")
    sp.add_argument("tasks", nargs="+", metavar="TASK",
                    help="task name(s) as `darwinlm plan` prints them: database-K-of-N, sensitivity-K-of-N, "
                         "generation-G, "
                         "posttrain-VARIANT, export, evaluate; several run in order in one process")
    sp.add_argument("--uid", help="search uid: the store prefix becomes searches/<name>-<uid> (Kubernetes)")
    sp = sub.add_parser("schema", help="print the spec JSON Schema")
    sp.add_argument("--openapi", action="store_true", help="the Kubernetes structural-schema variant")
    sp.add_argument("--markdown", action="store_true", help="the spec reference table (as in the README)")
    sp.set_defaults(fn=_cmd_schema)
    sp = sub.add_parser("provision", help="provision the example model and text into the cache dir")
    sp.add_argument("what", nargs="?", default="all", choices=["model", "text", "all"])
    sp.add_argument("--cache-dir")
    sp.add_argument("--debian-docs", action="store_true")
    sp.add_argument("--force", action="store_true")
    sp.set_defaults(fn=_cmd_provision)
    return p


def _quiet_libraries() -> None:
    """Our own bars only: the libraries' per-file bars would drown them."""
    import importlib.util

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if importlib.util.find_spec("datasets"):
        import datasets

        datasets.disable_progress_bars()
        datasets.utils.logging.set_verbosity_error()
    if importlib.util.find_spec("transformers"):
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # hubs are unreachable on many machines; set HF_HUB_OFFLINE=0 to allow downloads
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _quiet_libraries()
    try:
        return args.fn(args)
    except (SpecError, InfeasibleTargetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_PERMANENT
    except StoreError as e:
        print(f"store error: {e}", file=sys.stderr)
        return EXIT_RETRIABLE
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
