"""Run generations of the search, on W workers when WORLD_SIZE > 1 (torch.distributed).

    python -m darwinlm_jobs.generation --index G [--count N] [--spec FILE] [--uid UID]

``--count N`` (the PruningSearch's ``generationsPerJob``): run generations G..G+N-1 in this one process
(group), keeping the model, the database and the teacher cache resident; 0 = every generation up to the
end of the search (or its early stop). Each generation writes its state to the store as it finishes, so
a Job killed mid-way loses at most the generation in flight. Default 1.

Distributed: MASTER_ADDR, MASTER_PORT, WORLD_SIZE and RANK (or JOB_COMPLETION_INDEX) from the env.
"""

import sys

from darwinlm.core.plan import generation_block

from ._common import load_and_run, parser


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--index", type=int, required=True, help="first generation, from 0")
    p.add_argument("--count", type=int, default=1,
                   help="generations to run in this process (generationsPerJob); 0 = until the search ends")
    args = p.parse_args(argv)
    if args.count < 0:
        p.error("--count must be >= 0")
    return load_and_run(lambda spec: generation_block(spec, args.index, args.count), args)


if __name__ == "__main__":
    sys.exit(main())
