"""Validation rules that relate different sections of a ``PruningSearchSpec``.

Bounds of single fields are declared on the fields themselves (``setting(ge=...)``) and rules within
one node (ladders, target) are methods of that node; what is left here are the rules that need two
sections at once: the selection schedule against the search and the token pools, and the target
against the level ladders. ``PruningSearchSpec.__post_init__`` runs them after the types are
known to be right, so every value here has its declared type.
"""

from __future__ import annotations

from typing import Any

from darwinlm.spec.fields import Problems


def cross_section_problems(s: Any) -> Problems:
    """Rules that relate sections; field-local bounds are declared on the fields."""
    out: Problems = []
    d, stages = s.data, s.search.selection
    for i, st in enumerate(stages):
        p = f"search.selection[{i}]"
        if i > 0 and st.survivors > stages[i - 1].survivors:
            out.append((f"{p}.survivors", f"must not exceed the previous stage's survivors "
                                          f"({stages[i - 1].survivors}), got {st.survivors}"))
        if st.fitness_tokens > d.calibration_tokens:
            out.append((f"{p}.fitness_tokens", f"{st.fitness_tokens} exceeds the calibration pool "
                                               f"(data.calibration_tokens = {d.calibration_tokens})"))
        if st.finetune_tokens > d.finetune_tokens:
            out.append((f"{p}.finetune_tokens", f"{st.finetune_tokens} exceeds the fine-tune pool "
                                                f"(data.finetune_tokens = {d.finetune_tokens})"))
    if stages and stages[0].survivors > s.search.offspring:
        out.append(("search.selection[0].survivors", f"must be <= search.offspring "
                    f"({s.search.offspring}), got {stages[0].survivors}"))
    if stages and stages[-1].survivors != 1:
        out.append((f"search.selection[{len(stages) - 1}].survivors",
                    f"the last stage must keep exactly 1 survivor, got {stages[-1].survivors}"))
    for path, n, pool, pool_name in (
            ("database.calibration_tokens", s.database.calibration_tokens, d.calibration_tokens,
             "data.calibration_tokens"),
            ("search.initial_tokens", s.search.initial_tokens, d.calibration_tokens,
             "data.calibration_tokens"),
            ("search.sensitivity.tokens", s.search.sensitivity.tokens, d.calibration_tokens,
             "data.calibration_tokens"),
            ("search.tracking_tokens", s.search.tracking_tokens, d.calibration_tokens,
             "data.calibration_tokens"),
            ("evaluation.heldout_tokens", s.evaluation.heldout_tokens, d.heldout_tokens,
             "data.heldout_tokens")):
        if n is not None and n > pool:
            out.append((path, f"{n} exceeds {pool_name} ({pool})"))
    if s.search.fitness.exclude_database_tokens:
        spare = d.calibration_tokens - s.database.calibration_tokens
        needs = [(f"search.selection[{i}].fitness_tokens", st.fitness_tokens) for i, st in enumerate(stages)]
        needs += [("search.tracking_tokens", s.search.tracking_tokens)]
        if s.search.init == "random":
            needs.append(("search.initial_tokens", s.search.initial_tokens))
        for path, n in needs:
            if n > spare:
                out.append((path, f"{n} exceeds the calibration tokens the database does not use "
                                  f"(data.calibration_tokens - database.calibration_tokens = {spare}); raise "
                                  "data.calibration_tokens or set search.fitness.exclude_database_tokens: false"))
    if s.search.init == "random" and s.search.initially_generated < 1:
        out.append(("search.initially_generated", "must be >= 1 with search.init: random (how many random "
                                                  "genomes to score), got 0"))
    if s.search.init != "random" and s.search.initially_generated > 0:
        out.append(("search.initially_generated", f"is only used with search.init: random, but init is "
                                                  f"{s.search.init!r}; set init: random or remove it"))
    level = s.search.target.mean_level
    for ladder_name in ("attention", "mlp"):
        last = getattr(s.database, ladder_name).last_level()
        if level is not None and last is not None and level > last:
            out.append(("search.target.mean_level", f"{level:g} exceeds the last level of "
                                                    f"database.{ladder_name} ({last})"))
    return out
