"""The ``darwinlm`` command line: it parses arguments, shows progress and maps errors to exit codes.

    darwinlm run SPEC.yaml [--store URI] [--set KEY=VALUE ...]   everything; resumes when re-run
    darwinlm validate SPEC.yaml               exit 0, or 2 listing every error with its field path
    darwinlm schema                           the spec's JSON Schema
    darwinlm plan SPEC.yaml                   the tasks that would run next
    darwinlm database|sensitivity|search|posttrain|export|evaluate SPEC.yaml   run up to and including one phase
    darwinlm export SPEC.yaml --format gguf --gguf-type q8_0   also (or only) a GGUF file for llama.cpp
    darwinlm provision [model|text|all]       the example model and text into the cache dir
    darwinlm estimate SPEC.yaml [--gpu h100|a100|l40s|cpu] [--calibrate]   tokens, FLOPs, bytes, memory, hours
    darwinlm task SPEC.yaml TASK [TASK...]    exactly the named plan task(s) (``run.runner.run_tasks``);
                                              torch.distributed from env (WORLD_SIZE, RANK...) when W > 1

Every command that reads a spec takes ``--store URI`` and ``--set KEY=VALUE`` (repeatable, a dotted field
path and a YAML value, e.g. ``--set search.generations=3``): the overrides are validated like the file
and recorded in the search's spec.json like any field.

The commands that only read a spec (validate, plan, schema) never import torch: the runners import the
library's torch side when a run starts, and the libraries are quietened only for commands that run.

Exit codes (``darwinlm.errors``): 0 ok, 2 bad spec or usage (permanent), 3 store error or lost
distributed peer (retriable), 1 anything else.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys

from . import provision
from .core.plan import next_tasks, progress
from .errors import EXIT_ERROR, EXIT_OK, EXIT_PERMANENT, EXIT_RETRIABLE  # noqa: F401 - the command's exit codes
from .errors import InfeasibleTargetError, PeerFailure, PlanError, SpecError, StoreError, exit_code
from .run.runner import run_phase, run_search, run_tasks
from .spec import json_schema, load_spec, with_overrides
from .spec.docs import spec_reference_markdown
from .spec.io import parse_override, read_document
from .store import layout, open_store

def _tqdm_progress(desc: str, total: int):
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=None)

    def update(n: int) -> None:
        bar.update(n)
        if bar.n >= bar.total:
            bar.close()

    return update


def _load(args):
    """The spec of ``args.spec`` with ``--store`` and then every ``--set`` applied (validated once)."""
    spec = load_spec(args.spec)
    overrides = ([("store", args.store)] if getattr(args, "store", None) else []) + getattr(args, "overrides", [])
    if getattr(args, "formats", None):
        overrides.append(("export.formats", args.formats))
    if getattr(args, "gguf_type", None):
        overrides.append(("export.gguf_type", args.gguf_type))
    if overrides:
        spec = with_overrides(spec, **dict(overrides))
    return spec


def _cmd_validate(args) -> int:
    spec = _load(args)
    print(f"{args.spec}: valid (search {spec.name!r}, store {spec.store})")
    return EXIT_OK


def _cmd_schema(args) -> int:
    if args.markdown:
        print(spec_reference_markdown())
        return EXIT_OK
    print(json.dumps(json_schema(openapi=args.openapi), indent=1))
    return EXIT_OK


def _cmd_plan(args) -> int:
    spec = _load(args)
    store = open_store(spec.store).child(layout.search_prefix(spec.name))
    todo = next_tasks(spec, store)
    print(json.dumps({"store": store.uri, "next": [t.name for t in todo], **progress(spec, store)}, indent=1))
    return EXIT_OK


def _cmd_run(args) -> int:
    spec = _load(args)
    ws = run_search(spec, progress=_tqdm_progress)
    print(f"done: {ws.store.uri}/{layout.RESULT} (report.md, fitness.png, config.json, model/)")
    return EXIT_OK


def _cmd_phase(args) -> int:
    spec = _load(args)
    kind = {"search": "generation"}.get(args.command, args.command)
    ws = run_phase(spec, kind, progress=_tqdm_progress)
    print(f"{args.command}: done ({ws.store.uri})")
    return EXIT_OK


def _cmd_task(args) -> int:
    """Run the named tasks of the plan, in order; with WORLD_SIZE > 1 as one rank of a process group.

    Complete tasks return at once, before any rendezvous (a lone restarted rank must not wait for peers
    that are gone). A task whose earlier phases are incomplete is a usage error (exit 2)."""
    try:
        out = run_tasks(_load(args), args.tasks, uid=getattr(args, "uid", None), progress=_tqdm_progress)
    except (PlanError, PeerFailure) as e:
        print(f"error: {e}", file=sys.stderr)
        return exit_code(e)
    print(json.dumps(out))
    return EXIT_OK


# the Kubernetes fields `estimate` reads from a PruningSearch manifest (the others are ignored there)
_ESTIMATE_K8S = frozenset({"workers", "generationsPerJob", "resources", "image", "imagePullPolicy", "podTemplate",
                           "s3", "suspend", "activeDeadlineSeconds", "backoffLimit", "podStartTimeoutSeconds",
                           "ttlSecondsAfterFinished", "artifactRetention", "queueName"})


def _cmd_estimate(args) -> int:
    """Tokens, FLOPs, store bytes, memory per worker and wall-clock / GPU-hours of a spec (``run.estimate``)."""
    from .run.estimate import calibrate, estimate, format_estimate

    raw = read_document(args.spec)
    kube = (raw.get("spec") if isinstance(raw, dict) and "kind" in raw else raw) or {}
    spec = load_spec(raw, extra_allowed=_ESTIMATE_K8S)
    overrides = ([("store", args.store)] if args.store else []) + args.overrides
    if overrides:
        spec = with_overrides(spec, **dict(overrides))
    per_job = args.generations_per_job
    if per_job is None and "kind" in raw:  # unset: the Helm chart's operator default, 0
        per_job = int(kube["generationsPerJob"]) if kube.get("generationsPerJob") is not None else 0
    workers = args.workers or int(kube.get("workers", 1))
    try:
        cal = calibrate(spec) if args.calibrate else None
        est = estimate(spec, accelerator=args.gpu, workers=workers, generations_per_job=per_job,
                       flops_per_second=args.flops_per_second, memory_gib=args.memory_gib, calibration=cal)
    except OSError as e:  # the model's config.json is not readable here (e.g. a path inside the pods)
        print(f"error: model.path {spec.model.path!r}: cannot read the model's config here ({e}); point "
              f"--set model.path=DIR at a local copy (only config.json is read without --calibrate)", file=sys.stderr)
        return EXIT_PERMANENT
    print(json.dumps(est, indent=1, default=str) if args.json else format_estimate(est))
    return EXIT_OK


def _cmd_provision(args) -> int:
    argv = [args.what] + (["--cache-dir", args.cache_dir] if args.cache_dir else [])
    argv += ["--debian-docs"] if args.debian_docs else []
    argv += ["--force"] if args.force else []
    return provision.main(argv)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="darwinlm", description="DarwinLM evolutionary structured pruning")
    p.add_argument("--log-level", default=os.environ.get("DARWINLM_LOG_LEVEL", "INFO"))
    sub = p.add_subparsers(dest="command", required=True)

    def with_spec(name, fn, help_, *, runs=False):
        """A command that reads a spec; ``runs``: it runs tasks (so it loads torch and the models)."""
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("spec", help="spec YAML/JSON (a bare spec or a PruningSearch manifest)")
        sp.add_argument("--store", help="override the spec's store URI (file://DIR or s3://bucket/prefix)")
        sp.add_argument("--set", action="append", default=[], type=_override, dest="overrides", metavar="KEY=VALUE",
                        help="override a spec field by its dotted path, e.g. search.generations=3 or "
                             "search.selection[0].survivors=4 (the value is YAML; repeatable)")
        sp.set_defaults(fn=fn, runs=runs)
        return sp

    with_spec("run", _cmd_run, "run everything (resumes when re-run)", runs=True)
    with_spec("validate", _cmd_validate, "validate a spec")
    with_spec("plan", _cmd_plan, "print the next tasks")
    for phase in ("database", "sensitivity", "search", "posttrain", "export", "evaluate"):
        sp = with_spec(phase, _cmd_phase, f"run up to and including the {phase} phase", runs=True)
        if phase == "export":
            # validated by the spec like export.formats / export.gguf_type, so a bad value names its field
            sp.add_argument("--format", action="append", dest="formats", metavar="FORMAT",
                            help="hf or gguf (repeatable): sets export.formats; a finished search writes only "
                                 "the formats it does not have yet")
            sp.add_argument("--gguf-type", dest="gguf_type", metavar="TYPE",
                            help="f16, bf16, f32 or q8_0: sets export.gguf_type")
    sp = with_spec("task", _cmd_task, "run exactly the named plan task(s), e.g. generation-3 (Kubernetes Jobs); "
                                      "one rank of a process group when WORLD_SIZE > 1", runs=True)
    sp.add_argument("tasks", nargs="+", metavar="TASK",
                    help="task name(s) as `darwinlm plan` prints them: database-K-of-N, sensitivity-K-of-N, "
                         "generation-G, "
                         "posttrain-VARIANT, export, evaluate; several run in order in one process")
    sp.add_argument("--uid", help="search uid: the store prefix becomes searches/<name>-<uid> (Kubernetes)")
    sp = sub.add_parser("estimate", help="tokens, FLOPs, store bytes, memory and wall-clock / GPU-hours of a spec")
    sp.add_argument("spec", help="spec YAML/JSON (a bare spec or a PruningSearch manifest)")
    sp.add_argument("--store", help="override the spec's store URI")
    sp.add_argument("--set", action="append", default=[], type=_override, dest="overrides", metavar="KEY=VALUE")
    sp.add_argument("--gpu", default="cpu", choices=["h100", "a100", "l40s", "cpu"],
                    help="accelerator of each worker (throughput table in darwinlm/run/estimate.py)")
    sp.add_argument("--flops-per-second", type=float, help="override the accelerator's effective FLOP/s")
    sp.add_argument("--memory-gib", type=float, help="override the accelerator's memory (the warning's limit)")
    sp.add_argument("--workers", type=int, help="workers per generation (default: the manifest's, else 1)")
    sp.add_argument("--generations-per-job", type=int,
                    help="Kubernetes: generations per Job (each Job pays the fixed costs); default: the "
                         "manifest's, else embedded (one process)")
    sp.add_argument("--calibrate", action="store_true",
                    help="run the database and one generation here (scratch store) and scale by what they took")
    sp.add_argument("--json", action="store_true", help="print JSON instead of the table")
    sp.set_defaults(fn=_cmd_estimate, runs=True)
    sp = sub.add_parser("schema", help="print the spec JSON Schema")
    sp.add_argument("--openapi", action="store_true", help="the Kubernetes structural-schema variant")
    sp.add_argument("--markdown", action="store_true", help="the spec reference table (as in the README)")
    sp.set_defaults(fn=_cmd_schema)
    sp = sub.add_parser("provision", help="provision the example model and text into the cache dir")
    sp.add_argument("what", nargs="?", default="all", choices=["model", "text", "all"])
    sp.add_argument("--cache-dir")
    sp.add_argument("--debian-docs", action="store_true")
    sp.add_argument("--force", action="store_true")
    sp.set_defaults(fn=_cmd_provision, runs=True)
    return p


def _override(text: str) -> tuple[str, object]:
    """``--set KEY=VALUE`` as (dotted path, YAML value); argparse reports a malformed one (exit 2)."""
    try:
        return parse_override(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _quiet_libraries() -> None:
    """Our own bars only: the libraries' per-file bars would drown them (commands that run tasks)."""
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
    if getattr(args, "runs", False):
        _quiet_libraries()
    try:
        return args.fn(args)
    except (SpecError, InfeasibleTargetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return exit_code(e)
    except StoreError as e:
        print(f"store error: {e}", file=sys.stderr)
        return exit_code(e)
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
