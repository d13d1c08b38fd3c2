"""Training-aware multi-stage selection with last-stage elitism (ALGORITHM.md §3.4).

Why this module exists: the selection *policy* (who is in each stage's pool, who survives, who
wins) is pure and must be identical on every worker, while the expensive part (fine-tune each
candidate on the stage's token budget, then score its KL) is not. ``run_selection`` therefore takes
the expensive part as a callback, ``evaluate(stage_index, pool) -> scores``: an embedded caller
evaluates the pool in-process; a distributed caller evaluates its shard and all-gathers the scores
inside the callback, and every rank computes the same survivors from the same scores.

Scores are fitness values, lower is better (KL). A failed candidate scores NaN or inf and never
beats a finite score.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from darwinlm.core.genome import Genome

__all__ = ["Stage", "PAPER_STAGES", "select", "stage_pool", "run_selection", "Evaluate"]

log = logging.getLogger(__name__)

Evaluate = Callable[[int, list[Genome]], Sequence[float]]
"""``evaluate(stage_index, pool)`` fine-tunes and scores every genome of ``pool`` for that stage
and returns one fitness per genome, in pool order (lower is better; NaN/inf = failed)."""


@dataclass(frozen=True)
class Stage:
    """One selection stage: fine-tune every candidate of the pool, score it, keep the best."""

    survivors: int
    """Candidates kept after this stage (paper: 8, 4, 2, 1). The last stage must keep 1."""

    fitness_tokens: int
    """Tokens of the fitness (KL) minibatch shared by the whole pool (paper: 1024 .. 8192)."""

    finetune_tokens: int
    """Tokens each candidate is fine-tuned on before scoring (paper: 10K .. 200K); 0 = no training
    (plain EvoPress selection)."""

    def __post_init__(self) -> None:
        if self.survivors < 1:
            raise ValueError(f"stage: survivors must be >= 1, got {self.survivors}")
        if self.fitness_tokens < 1:
            raise ValueError(f"stage: fitness_tokens must be >= 1, got {self.fitness_tokens}")
        if self.finetune_tokens < 0:
            raise ValueError(f"stage: finetune_tokens must be >= 0, got {self.finetune_tokens}")


PAPER_STAGES: tuple[Stage, ...] = (
    Stage(survivors=8, fitness_tokens=1024, finetune_tokens=10_000),
    Stage(survivors=4, fitness_tokens=2048, finetune_tokens=50_000),
    Stage(survivors=2, fitness_tokens=4096, finetune_tokens=100_000),
    Stage(survivors=1, fitness_tokens=8192, finetune_tokens=200_000),
)
"""The schedule of the released DarwinLM script (``scripts/struct_prune_search.sh``)."""


def select(scores: Sequence[float], k: int) -> list[int]:
    """Indices of the ``k`` lowest scores, best first.

    Stable: equal scores keep index order. NaN and ±inf count as failures and sort after every
    finite score (then by index), so a failed candidate survives only when too few succeeded.
    """
    if not 0 <= k <= len(scores):
        raise ValueError(f"cannot keep {k} of {len(scores)} scores")

    def key(i: int) -> tuple[bool, float, int]:
        s = float(scores[i])
        finite = math.isfinite(s)
        return (not finite, s if finite else 0.0, i)

    return sorted(range(len(scores)), key=key)[:k]


def stage_pool(candidates: Sequence[Genome], parent: Genome, stage_index: int, stages: Sequence[Stage]) -> list[Genome]:
    """The pool evaluated at ``stage_index``: the candidates, plus the parent at the final stage only.

    Elitism (§3.4): the parent is fine-tuned and re-scored like everyone else on the final stage's
    fresh data and survives only if it wins; it is appended last (ties go to the offspring) and
    only if an equal genome is not already in the pool.
    """
    if not 0 <= stage_index < len(stages):
        raise ValueError(f"stage {stage_index} outside 0..{len(stages) - 1}")
    pool = list(candidates)
    if stage_index == len(stages) - 1 and parent not in pool:
        pool.append(parent)
    return pool


def _json_score(s: float) -> float | None:
    return float(s) if math.isfinite(s) else None


def run_selection(
    candidates: Sequence[Genome], parent: Genome, stages: Sequence[Stage], evaluate: Evaluate
) -> tuple[Genome, list[dict]]:
    """Run every stage and return ``(winner, history)``.

    For each stage: build the pool (``stage_pool``), call ``evaluate(stage_index, pool)``, keep
    ``min(survivors, len(pool))`` by ``select``. An empty pool (no offspring) is not evaluated. The
    winner is the sole survivor of the last stage; if every final score failed, ``ValueError``.

    ``history[s]`` (JSON-friendly) = {"stage", "pool": [genome dicts], "scores": [float | None
    (failed)], "kept": [pool indices, best first], "parent_index": index of the parent or None}.
    """
    if not stages or stages[-1].survivors != 1:
        raise ValueError("the last selection stage must keep exactly 1 survivor")
    survivors = list(candidates)
    history: list[dict] = []
    scores: list[float] = []
    for index, stage in enumerate(stages):
        pool = stage_pool(survivors, parent, index, stages)
        scores = [float(s) for s in evaluate(index, pool)] if pool else []
        if len(scores) != len(pool):
            raise ValueError(f"stage {index}: evaluate returned {len(scores)} scores for {len(pool)} genomes")
        kept = select(scores, min(stage.survivors, len(pool)))
        history.append({
            "stage": index,
            "pool": [g.to_dict() for g in pool],
            "scores": [_json_score(s) for s in scores],
            "kept": kept,
            "parent_index": pool.index(parent) if parent in pool else None,
        })
        log.debug("stage %d: %d evaluated, kept %s", index, len(pool), kept)
        survivors = [pool[i] for i in kept]
        scores = [scores[i] for i in kept]
    if not math.isfinite(scores[0]):
        raise ValueError("every candidate of the final selection stage failed (non-finite fitness)")
    return survivors[0], history
