"""OBS against brute force on small matrices: chosen structure, compensation and error."""

import itertools

import pytest
import torch

from darwinlm.obs import obs_prune, prepare_hessian, reconstruction_error


def _problem(d_row, d_col, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_row, d_col, generator=g, dtype=torch.float64)
    X = torch.randn(4 * d_col, d_col, generator=g, dtype=torch.float64) @ torch.randn(
        d_col, d_col, generator=g, dtype=torch.float64
    )
    H = X.T @ X / X.shape[0]
    return W, H


def _best_reconstruction(W, H, removed_cols):
    """Least-squares optimum with the given columns forced to zero: W_R = W H[:,R] H[R,R]⁻¹."""
    keep = [c for c in range(W.shape[1]) if c not in set(removed_cols)]
    out = torch.zeros_like(W)
    if keep:
        out[:, keep] = W @ H[:, keep] @ torch.linalg.inv(H[keep][:, keep])
    return out


@pytest.mark.parametrize("group_size", [1, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_obs_matches_brute_force_greedy(group_size, seed):
    n = 5
    W, H = _problem(4, n * group_size, seed)
    Hd = prepare_hessian(H, 0.01)
    res = obs_prune(W, H, group_size=group_size, boundaries=list(range(1, n)), damping=0.01)
    removed: list[int] = []
    for step in range(1, n):
        # brute force: the structure whose joint removal (with optimal compensation) costs least
        costs = {}
        for g in range(n):
            if g in removed:
                continue
            cols = [c for s in removed + [g] for c in range(s * group_size, (s + 1) * group_size)]
            costs[g] = reconstruction_error(W, _best_reconstruction(W, Hd, cols), Hd)
        best = min(costs, key=costs.get)
        assert res.order[step - 1] == best
        removed.append(best)
        cols = [c for s in removed for c in range(s * group_size, (s + 1) * group_size)]
        expected = _best_reconstruction(W, Hd, cols)
        torch.testing.assert_close(res.snapshots[step], expected, atol=1e-8, rtol=1e-7)
        assert res.errors[step - 1] == pytest.approx(costs[best], rel=1e-7)


def test_obs_nested_levels_and_exact_zeros():
    W, H = _problem(6, 12, 3)
    res = obs_prune(W, H, group_size=2, boundaries=[2, 4], damping=0.01)
    assert len(res.order) == 4 and len(set(res.order)) == 4
    for k in (2, 4):
        dead = [c for g in res.order[:k] for c in (2 * g, 2 * g + 1)]
        assert torch.count_nonzero(res.snapshots[k][:, dead]) == 0
    # nested: level 4 removes a superset of level 2
    assert set(res.order[:2]) <= set(res.order[:4])
    # more removal never lowers the error
    assert all(a <= b + 1e-12 for a, b in itertools.pairwise(res.errors))


def test_dead_inputs_and_bad_boundaries():
    W, H = _problem(3, 4, 4)
    H[1, :] = 0
    H[:, 1] = 0  # an input that never fires
    res = obs_prune(W, H, group_size=1, boundaries=[1], damping=0.01)
    assert res.order[0] in range(4)
    with pytest.raises(ValueError):
        obs_prune(W, H, group_size=1, boundaries=[4])
    with pytest.raises(ValueError):
        obs_prune(W, H, group_size=3, boundaries=[1])


@pytest.mark.parametrize("block", [1, 3, 64])
def test_lazy_batch_columns_match_reference(block):
    from darwinlm.obs import obs_prune_columns, obs_prune_reference

    W, H = _problem(7, 40, 5)
    bounds = [4, 10, 25, 39]
    ref = obs_prune_reference(W, H, group_size=1, boundaries=bounds, damping=0.01)
    fast = obs_prune_columns(W, H, boundaries=bounds, damping=0.01, block=block)
    assert fast.order == ref.order
    for k in bounds:
        torch.testing.assert_close(fast.snapshots[k], ref.snapshots[k], atol=1e-9, rtol=1e-7)
    assert fast.errors == pytest.approx(ref.errors, rel=1e-8)
