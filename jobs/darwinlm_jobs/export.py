"""The export task of a search.

    python -m darwinlm_jobs.export [--spec FILE] [--uid UID]
"""

import sys

from darwinlm.core.plan import Task

from ._common import parser, run


def main(argv=None) -> int:
    args = parser(__doc__).parse_args(argv)
    return run(Task("export"), args)


if __name__ == "__main__":
    sys.exit(main())
