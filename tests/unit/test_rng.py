"""derive_seed/derive_rng: stable, path-sensitive, never the global state."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from darwinlm.core.rng import derive_rng, derive_seed

# Pinned: a change here silently changes every search result for a given spec seed.
PINNED = [
    ((0,), 7896617691693857887),
    ((0, "mutation", 0), 2763937505687591010),
    ((1234, "fitness-batch", 3, 2), 4509035608359216342),
    ((0, 1), 1268317919887565386),
    ((0, "1"), 8577650490637021701),
]


@pytest.mark.parametrize(("args", "expected"), PINNED)
def test_pinned_values(args, expected):
    assert derive_seed(*args) == expected


def test_stable_across_processes():
    # A fresh interpreter with a different hash seed must agree (str parts never go through hash()).
    code = "from darwinlm.core.rng import derive_seed; print(derive_seed(1234, 'fitness-batch', 3, 2))"
    env = {"PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert int(out.stdout) == 4509035608359216342


path_parts = st.one_of(st.integers(0, 2**64 - 1), st.text(max_size=8))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**64 - 1), path=st.lists(path_parts, max_size=4))
def test_range_and_determinism(seed, path):
    s = derive_seed(seed, *path)
    assert 0 <= s < 2**63
    assert s == derive_seed(seed, *path)
    assert derive_rng(seed, *path).integers(2**62) == derive_rng(seed, *path).integers(2**62)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ((0, 1), (0, "1")),  # type tag
        ((0, "a", 1), (0, "a1")),  # fixed-width encoding
        ((0, 1, 2), (0, 2**32 + 1)),
        ((0, 2**32), (0, 0, 1)),
        ((0, "mutation", 0), (0, "mutation", 1)),  # generation
        ((0, "mutation", 0), (1, "mutation", 0)),  # spec seed
        ((0, "fitness-batch", 1, 0), (0, "train-batch", 1, 0)),  # purpose
        ((0,), (0, 0)),
    ],
)
def test_distinct_paths_distinct_seeds(a, b):
    assert derive_seed(*a) != derive_seed(*b)


def test_numpy_ints_equal_python_ints():
    assert derive_seed(np.uint64(7), np.int32(3)) == derive_seed(7, 3)


@pytest.mark.parametrize("bad", [-1, 2**64, True, 1.0, None])
def test_rejects_bad_parts(bad):
    with pytest.raises((TypeError, ValueError)):
        derive_seed(0, bad)
    with pytest.raises((TypeError, ValueError)):
        derive_seed(bad)


def test_does_not_touch_global_state():
    np.random.seed(0)
    expected = np.random.random()
    np.random.seed(0)
    derive_rng(5, "init", 0).random(10)
    assert np.random.random() == expected
