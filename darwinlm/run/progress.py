"""How long work reports progress without the library knowing about progress bars.

``progress(description, total) -> update(n)``: a task announces ``total`` units of work under a description
and calls ``update(n)`` as ``n`` more are done. The CLI passes tqdm-backed bars (``darwinlm.cli``); the
library's default, and the jobs', is :func:`no_progress`.
"""

from __future__ import annotations

from typing import Callable

__all__ = ["Progress", "no_progress"]

Progress = Callable[[str, int], Callable[[int], None]]


def no_progress(_desc: str, _total: int) -> Callable[[int], None]:
    return lambda _n: None
