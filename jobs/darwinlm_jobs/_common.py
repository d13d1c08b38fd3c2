"""Shared plumbing of the job entrypoints: parse, load the spec, run one task, map errors to exit codes."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from darwinlm.errors import EXIT_OK, InfeasibleTargetError, PeerFailure, PlanError, SpecError, StoreError, exit_code
from darwinlm.run.runner import run_tasks
from darwinlm.spec import load_spec

log = logging.getLogger("darwinlm_jobs")


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--spec", help="spec file (YAML/JSON); default: the DARWINLM_SPEC environment variable (JSON)")
    p.add_argument("--uid", default=os.environ.get("DARWINLM_SEARCH_UID"),
                   help="search uid (store prefix searches/<name>-<uid>); default: DARWINLM_SEARCH_UID")
    p.add_argument("--log-level", default=os.environ.get("DARWINLM_LOG_LEVEL", "INFO"))
    return p


def load(args):
    if args.spec:
        return load_spec(args.spec, extra_allowed=_k8s_fields())
    raw = os.environ.get("DARWINLM_SPEC")
    if not raw:
        raise SpecError([("", "no spec: pass --spec FILE or set DARWINLM_SPEC")])
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise SpecError([("", f"DARWINLM_SPEC is not JSON: {e}")]) from e
    return load_spec(data, extra_allowed=_k8s_fields())


def _k8s_fields() -> frozenset[str]:
    """Top-level keys of a PruningSearch spec that only the operator reads (image, resources, ...)."""
    raw = os.environ.get("DARWINLM_EXTRA_FIELDS", "")
    return frozenset(f for f in raw.split(",") if f) | _KUBERNETES_FIELDS


_KUBERNETES_FIELDS = frozenset({
    "image", "imagePullPolicy", "workers", "resources", "podTemplate", "s3", "suspend",
    "activeDeadlineSeconds", "backoffLimit", "podStartTimeoutSeconds", "ttlSecondsAfterFinished",
    "artifactRetention", "queueName", "generationsPerJob",
})


def run(task, args) -> int:
    """Run ``task`` (a darwinlm.core.plan.Task) with the parsed ``args``; returns the exit code."""
    return load_and_run(lambda _spec: [task], args)


def load_and_run(tasks_of, args) -> int:
    """Run the tasks ``tasks_of(spec)`` (a list of darwinlm.core.plan.Task, in order) with the parsed
    ``args``; returns the exit code.

    The work is ``darwinlm.run.runner.run_tasks``, the same as ``darwinlm task``'s, including joining the
    torch.distributed process group for generation tasks when WORLD_SIZE > 1 (after checking the task is
    not already complete, so a lone restarted rank never waits for peers that are gone). Pods have no
    terminal, so no progress bars; the result is one JSON line on stdout."""
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        spec = load(args)
        names = [t.name for t in tasks_of(spec)]
        log.info("task(s) %s of search %s (uid %s)", " ".join(names), spec.name, args.uid)
        out = run_tasks(spec, names, uid=args.uid)
    except (PlanError, PeerFailure) as e:
        print(f"error: {e}", file=sys.stderr)
        return exit_code(e)
    except (SpecError, InfeasibleTargetError) as e:
        print(f"permanent error: {e}", file=sys.stderr)
        return exit_code(e)
    except StoreError as e:
        print(f"retriable store error: {e}", file=sys.stderr)
        return exit_code(e)
    except (ConnectionError, TimeoutError) as e:
        print(f"retriable error: {e}", file=sys.stderr)
        return exit_code(e)
    print(json.dumps(out))
    return EXIT_OK
