"""``python -m darwinlm_jobs TASK_NAME`` runs any task by its plan name (e.g. generation-3)."""

import sys

from darwinlm.core.plan import Task

from ._common import parser, run


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("task", help="task name from the plan: database-K-of-N, sensitivity-K-of-N, generation-G, posttrain-V, export, evaluate")
    args = p.parse_args(argv)
    return run(Task.parse(args.task), args)


if __name__ == "__main__":
    sys.exit(main())
