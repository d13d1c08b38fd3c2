"""The token schedule of a search, exact from its spec: what every generation scores and trains.

Why this module exists: ``darwinlm estimate`` (``darwinlm.run.estimate``) and the operator's
``status.estimate`` show the same numbers, and the operator imports no torch, so the arithmetic lives
here, pure. Stage ``s`` of a generation evaluates its pool: ``offspring`` at stage 0, then the survivors
of stage ``s-1``, plus the parent at the last stage (selection.stage_pool); each candidate is scored on the
stage's ``fitness_tokens`` and fine-tuned on its ``finetune_tokens``, which is what each generation's
``state.json`` records (``evaluations``, ``fitness_tokens``, ``finetune_tokens``). With
``finetune.warm_start`` a survivor continues training instead of starting over, so fewer tokens are
*trained* (``trained_tokens``) than scheduled. The dense teacher scores each stage's fitness batch once
(``teacher_tokens``, per worker).
"""

from __future__ import annotations

from typing import Any

__all__ = ["schedule"]


def schedule(spec) -> dict[str, Any]:
    """Per-generation token counts, exact from the selection schedule (what ``state.json`` records)."""
    sp = spec.search
    pools, n = [], sp.offspring
    for i, st in enumerate(sp.selection):
        size = n + (1 if i == len(sp.selection) - 1 else 0)  # the parent joins the last stage
        pools.append(size)
        n = min(st.survivors, n)
    stages = []
    trained = 0
    for i, (st, size) in enumerate(zip(sp.selection, pools)):
        if sp.finetune.warm_start and i > 0:  # survivors continue from the previous stage's prefix
            prev = sp.selection[i - 1].finetune_tokens
            cont = size - (1 if i == len(pools) - 1 else 0)
            t = cont * max(0, st.finetune_tokens - prev) + (size - cont) * st.finetune_tokens
        else:
            t = size * st.finetune_tokens
        trained += t
        stages.append({"pool": size, "fitness_tokens": size * st.fitness_tokens,
                       "finetune_tokens": size * st.finetune_tokens, "trained_tokens": t})
    per = {"evaluations": sum(pools), "fitness_tokens": sum(s["fitness_tokens"] for s in stages),
           "finetune_tokens": sum(s["finetune_tokens"] for s in stages), "trained_tokens": trained,
           "teacher_tokens": sum(st.fitness_tokens for st in sp.selection), "tracking_tokens": sp.tracking_tokens}
    G = sp.generations
    return {"generations": G, "stages": stages, "per_generation": per,
            "total": {k: v * G for k, v in per.items()}}
