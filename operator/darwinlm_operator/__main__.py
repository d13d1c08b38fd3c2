"""``python -m darwinlm_operator``: run the operator (``kopf run --standalone`` with our handlers).

    python -m darwinlm_operator -A                      # every namespace (ClusterRole RBAC)
    python -m darwinlm_operator -n team-a -n team-b     # only these namespaces (Role RBAC)
    python -m darwinlm_operator -A --metrics-port 8000 --liveness http://0.0.0.0:8080/healthz

Standalone: one replica (Deployment strategy Recreate), no kopf peering; kopf's peering is not
leader election (nolar/kopf#1266). Flags override the DARWINLM_* environment variables that
``handlers.OperatorConfig.from_env`` reads (the chart sets those).
"""

from __future__ import annotations

import argparse
import os
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m darwinlm_operator", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    scope = p.add_mutually_exclusive_group(required=True)
    scope.add_argument("-n", "--namespace", action="append", dest="namespaces",
                       help="watch this namespace (repeatable; kopf globs such as 'team-*' work)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="port of the Prometheus /metrics endpoint, 0 = off (default 8000 or DARWINLM_METRICS_PORT)")
    p.add_argument("--interval", type=float, default=None,
                   help="seconds between reconciles of an idle search (default 2 or DARWINLM_RECONCILE_INTERVAL)")
    p.add_argument("--liveness", default=None, metavar="URL",
                   help="kopf liveness endpoint, e.g. http://0.0.0.0:8080/healthz (default: none)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # handlers.configure (the startup handler) reads these; flags win over the inherited environment
    if args.metrics_port is not None:
        os.environ["DARWINLM_METRICS_PORT"] = str(args.metrics_port)
    if args.interval is not None:
        os.environ["DARWINLM_RECONCILE_INTERVAL"] = str(args.interval)

    import kopf

    from . import handlers  # noqa: F401 - registers the handlers

    kopf.configure(verbose=args.verbose, quiet=args.quiet)
    kopf.run(standalone=True, clusterwide=args.all_namespaces, namespaces=args.namespaces or (),
             liveness_endpoint=args.liveness)
    return 0


if __name__ == "__main__":
    sys.exit(main())
