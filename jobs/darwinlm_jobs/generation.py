"""Run one generation of the search, on W workers when WORLD_SIZE > 1 (torch.distributed).

    python -m darwinlm_jobs.generation --index G [--spec FILE] [--uid UID]

Distributed: MASTER_ADDR, MASTER_PORT, WORLD_SIZE and RANK (or JOB_COMPLETION_INDEX) from the env.
"""

import sys

from darwinlm.core.plan import Task

from ._common import parser, run


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--index", type=int, required=True, help="generation number, from 0")
    args = p.parse_args(argv)
    return run(Task("generation", args.index), args)


if __name__ == "__main__":
    sys.exit(main())
