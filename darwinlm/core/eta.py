"""Progress and ETA of a search from its store: what ``kubectl get``, the metrics and ``darwinlm run`` show.

Why this module exists: the operator's status, its Prometheus gauges and the CLI's progress bar must show
the same numbers, so they are computed once, here, from the store alone (no torch, no clock of its own:
``now`` is an argument). Each finished generation writes ``generations/<g>/timing.json`` with the wall-clock
time it finished (``layout.generation_timing``). The time a generation really costs is the interval between
two consecutive finishes: it includes the Job hand-off (pod start, imports, model load, cache builds) when
each generation runs in its own Job (``generationsPerJob: 1``), once per N generations with
``generationsPerJob: N``, and not at all when one warm Job runs them all. The ETA multiplies the
generations left by the MEAN interval (a median would drop the hand-off of every N-th generation), minus
the time the generation in flight has already run; its spread uses the 25th and 75th percentiles of the
intervals (widened to include the mean).

Progress is the fraction of planned generations done (``generationsDone / generationsTotal``); the database
and sensitivity phases count as 0 %, and the phases after the search as 100 % (the stage says which).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from darwinlm.store import layout

__all__ = ["Eta", "finish_times", "estimate_eta", "progress_percent", "format_duration", "eta_line"]


@dataclass(frozen=True)
class Eta:
    """Seconds left until the last generation finishes: ``seconds`` (from the mean interval) within
    [``low``, ``high``] (25th..75th percentile of the generation intervals, widened to include the mean);
    ``per_generation``: the mean interval; ``samples``: how many intervals it rests on."""

    seconds: float
    low: float
    high: float
    per_generation: float
    samples: int


def finish_times(store, done: int) -> list[float]:
    """Wall-clock finish times (unix seconds) of generations 0..done-1 that recorded one (in order)."""
    out = []
    for g in range(done):
        t = store.get_json(layout.generation_timing(g)) if store.exists(layout.generation_timing(g)) else None
        if isinstance(t, dict) and isinstance(t.get("finished"), (int, float)):
            out.append(float(t["finished"]))
    return out


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def estimate_eta(finished: list[float], remaining: int, now: float, *,
                 first_seconds: float | None = None) -> Eta | None:
    """The ETA of ``remaining`` generations from the finish times of the done ones.

    Intervals are the differences of consecutive ``finished`` times. With one finished generation and no
    interval yet, ``first_seconds`` (that generation's own compute seconds) stands in, without hand-off;
    with nothing at all there is no estimate (None). The generation in flight started at the last finish:
    the time it has run is subtracted, but never below the cost of the generations after it."""
    if remaining <= 0:
        return Eta(0.0, 0.0, 0.0, 0.0, 0)
    steps = [b - a for a, b in zip(finished, finished[1:]) if b >= a]
    if not steps and first_seconds is not None and first_seconds > 0:
        steps = [float(first_seconds)]
    if not steps:
        return None
    med = statistics.fmean(steps)
    lo, hi = min(med, _quantile(steps, 0.25)), max(med, _quantile(steps, 0.75))
    running = max(0.0, now - finished[-1]) if finished else 0.0

    def left(per: float) -> float:
        return max(per * remaining - running, per * (remaining - 1))

    return Eta(left(med), left(lo), left(hi), med, len(steps))


def progress_percent(done: int, total: int, *, after_search: bool = False) -> int:
    """Whole percent of the planned generations done (100 once the search part is over)."""
    if after_search or total <= 0:
        return 100
    return max(0, min(100, int(100 * done // total)))


def format_duration(seconds: float) -> str:
    """``8000`` -> ``"2h13m"``; ``63`` -> ``"1m3s"`` (the ETA column and the progress bar)."""
    s = max(0, int(round(seconds)))
    h, m, sec = s // 3600, s % 3600 // 60, s % 60
    return f"{h}h{m}m" if h else (f"{m}m{sec}s" if m else f"{sec}s")


def eta_line(store, done: int, total: int, now: float, *, first_seconds: float | None = None) -> str:
    """``"40% · ETA 2m10s (1m50s-2m40s)"``: what ``darwinlm run`` shows next to generation ``done + 1``,
    the same numbers as the PruningSearch's PROGRESS and ETA columns."""
    pct = progress_percent(done, total)
    est = estimate_eta(finish_times(store, done), total - done, now, first_seconds=first_seconds)
    if est is None:
        return f"{pct}%"
    return f"{pct}% · ETA {format_duration(est.seconds)} ({format_duration(est.low)}-{format_duration(est.high)})"
