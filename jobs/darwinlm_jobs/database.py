"""Build one shard of the layer database.

    python -m darwinlm_jobs.database --shard K --shards N [--spec FILE] [--uid UID]

In an Indexed Job the shard defaults to ``JOB_COMPLETION_INDEX``.
"""

import os
import sys

from darwinlm.core.plan import Task

from ._common import parser, run


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--shard", type=int, default=int(os.environ.get("JOB_COMPLETION_INDEX", "0")))
    p.add_argument("--shards", type=int, required=True)
    args = p.parse_args(argv)
    return run(Task("database", args.shard, args.shards), args)


if __name__ == "__main__":
    sys.exit(main())
