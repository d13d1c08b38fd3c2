"""Post-train the searched model (or a baseline) from the store; resumes from its last checkpoint.

    python -m darwinlm_jobs.posttrain --variant searched|uniform [--spec FILE] [--uid UID]
"""

import sys

from darwinlm.core.plan import Task

from ._common import parser, run


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--variant", choices=["searched", "uniform"], required=True)
    args = p.parse_args(argv)
    return run(Task("posttrain", variant=args.variant), args)


if __name__ == "__main__":
    sys.exit(main())
