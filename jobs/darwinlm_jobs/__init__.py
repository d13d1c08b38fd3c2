"""Job entrypoints: one module per task kind, run inside Kubernetes pods (or by hand).

Each reads its task from arguments and the environment, calls the library (``darwinlm.run.runner.run_tasks``)
and writes to the store. The spec comes from ``DARWINLM_SPEC`` (JSON, the PruningSearch ``spec`` as the
operator rendered it) or ``--spec FILE``; the search's store prefix is ``searches/<name>-<uid>`` with
the uid from ``DARWINLM_SEARCH_UID`` / ``--uid``. S3 credentials come only from the environment
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` injected from a Secret; ``AWS_ENDPOINT_URL``).

Exit codes (``darwinlm.errors``; the operator's retry policy reads them):
  0 done; 2 permanent (bad spec, infeasible target: retrying cannot help);
  3 retriable (store unreachable, peer lost); anything else = a crash, retried and counted.
"""

from darwinlm.errors import EXIT_OK, EXIT_PERMANENT, EXIT_RETRIABLE  # noqa: F401 - the codes named above
