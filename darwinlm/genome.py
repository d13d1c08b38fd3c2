"""The search space and its points: level ladders, the ``SearchSpace`` and immutable ``Genome``s.

Why this module exists: DarwinLM searches over one integer *level* per prunable layer (ALGORITHM.md
§3.1). A level indexes a per-layer *ladder* of nested prunings (§2.5): level 0 removes nothing, the
last level usually removes every unit (head or channel). Layers are split into groups by module type
("attn" = o_proj heads, "mlp" = down_proj channels), and the search keeps the sum of levels of each
group fixed (the level budget). Everything here is a pure function over immutable values; the
``SearchSpace`` is the precomputed table that says which levels are legal (HOUSE_STYLE.md 8).

Units: a ladder counts *units* (heads for attention, channels for the MLP), never columns; the
``unit_params`` of a layer is the number of parameters one unit carries (for parameter accounting).

Layout (``darwinlm.genome`` is the one import path; the parts are private):

* ``_genome_ladder.py``: ``Ladder`` and ``ladder_from`` (levels, fractions or "auto" → units);
* ``_genome_space.py``: ``SearchSpace`` (layers, groups, ladders, the legal-level table) and ``Genome``;
* ``_genome_budget.py``: ``level_sums_for_target``, ``even_genome``, ``random_feasible_genome`` and the
  parameter accounting (``prunable_params``, ``removed_params``, ``removed_fraction``).

Patch a private helper (e.g. ``_even_levels``) in the module that defines it; the copies re-exported
here are for imports only.
"""

from __future__ import annotations

# Everything importable from darwinlm.genome before the split still is; the private names are
# re-exported for imports only, not as public API.
from darwinlm._genome_budget import (  # noqa: F401
    _checked_sums,
    _even_levels,
    _group_params,
    cheapest_genome,
    even_genome,
    level_sums_for_target,
    prunable_params,
    random_feasible_genome,
    removed_fraction,
    removed_params,
)
from darwinlm._genome_ladder import Ladder, _round_half_up, _units_at, ladder_from  # noqa: F401
from darwinlm._genome_space import Genome, SearchSpace

__all__ = [
    "Ladder",
    "ladder_from",
    "SearchSpace",
    "Genome",
    "level_sums_for_target",
    "even_genome",
    "cheapest_genome",
    "random_feasible_genome",
    "removed_params",
    "removed_fraction",
    "prunable_params",
]
