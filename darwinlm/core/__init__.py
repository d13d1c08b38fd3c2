"""The search core: pure functions over immutable values, numpy only (never torch).

Why this package exists: DarwinLM searches over one integer *level* per prunable layer (ALGORITHM.md
§3.1). A level indexes a per-layer *ladder* of nested prunings (§2.5): level 0 removes nothing, the
last level usually removes every unit (head or channel). Layers are split into groups by module type
("attn" = o_proj heads, "mlp" = down_proj channels), and the search keeps the sum of levels of each
group fixed (the level budget). Everything here is a pure function over immutable values; the
``SearchSpace`` is the precomputed table that says which levels are legal (HOUSE_STYLE.md 8).

Units: a ladder counts *units* (heads for attention, channels for the MLP), never columns; the
``unit_params`` of a layer is the number of parameters one unit carries (for parameter accounting).

Modules:

* ``ladder.py``: ``Ladder`` and ``ladder_from`` (levels, fractions or "auto" → units);
* ``genome.py``: ``SearchSpace`` (layers, groups, ladders, the legal-level table) and ``Genome``;
* ``budget.py``: ``level_sums_for_target``, ``even_genome``, ``cheapest_genome``,
  ``random_feasible_genome`` and the parameter accounting (``prunable_params``, ``removed_params``,
  ``removed_fraction``);
* ``mutation.py``: level-switch mutation; ``selection.py``: staged selection with elitism;
* ``rng.py``: generators derived from (seed, purpose, generation, stage, ...);
* ``plan.py``: ``next_tasks(spec, store)``, the pure plan the runner and the operator both follow;
* ``eta.py``: progress and ETA from the generations' finish times; ``schedule.py``: the token schedule.

Nothing is re-exported here, so importing ``darwinlm.core.plan`` (the operator does) loads no numpy
module it does not need. import-linter forbids torch in this package.
"""
