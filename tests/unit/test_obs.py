"""OBS against brute force on small matrices: chosen structure, compensation and error."""

import itertools

import pytest
import torch

from darwinlm.llm.obs import obs_prune, prepare_hessian, reconstruction_error


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
    from darwinlm.llm.obs import obs_prune_columns, obs_prune_reference

    W, H = _problem(7, 40, 5)
    bounds = [4, 10, 25, 39]
    ref = obs_prune_reference(W, H, group_size=1, boundaries=bounds, damping=0.01)
    fast = obs_prune_columns(W, H, boundaries=bounds, damping=0.01, block=block)
    assert fast.order == ref.order
    for k in bounds:
        torch.testing.assert_close(fast.snapshots[k], ref.snapshots[k], atol=1e-9, rtol=1e-7)
    assert fast.errors == pytest.approx(ref.errors, rel=1e-8)


@pytest.mark.parametrize("group_size", [2, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_shrinking_groups_match_reference(group_size, seed):
    from darwinlm.llm.obs import obs_prune_groups, obs_prune_reference

    n = 7
    W, H = _problem(5, n * group_size, seed)
    bounds = [1, 3, 6]
    ref = obs_prune_reference(W, H, group_size=group_size, boundaries=bounds, damping=0.01)
    fast = obs_prune_groups(W, H, group_size=group_size, boundaries=bounds, damping=0.01)
    assert fast.order == ref.order
    for k in bounds:
        torch.testing.assert_close(fast.snapshot(k), ref.snapshots[k], atol=1e-9, rtol=1e-7)
    assert fast.errors == pytest.approx(ref.errors, rel=1e-8)


def test_lazy_columns_flush_on_a_boundary():
    from darwinlm.llm.obs import obs_prune_columns, obs_prune_reference

    W, H = _problem(6, 30, 7)
    bounds = [4, 8, 9, 20, 24]  # 4, 8, 20, 24 coincide with full blocks of 4
    ref = obs_prune_reference(W, H, group_size=1, boundaries=bounds, damping=0.01)
    fast = obs_prune_columns(W, H, boundaries=bounds, damping=0.01, block=4)
    assert fast.order == ref.order
    for k in bounds:
        torch.testing.assert_close(fast.snapshot(k), ref.snapshots[k], atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("group_size", [1, 3])
def test_kept_columns_contract(group_size):
    from darwinlm.llm.obs import ObsResult, kept_columns

    W, H = _problem(4, 6 * group_size, 8)
    res = obs_prune(W, H, group_size=group_size, boundaries=[2, 5], damping=0.01)
    for k in (2, 5):
        cols = res.kept_columns(k)
        removed = {c for g in res.order[:k] for c in range(g * group_size, (g + 1) * group_size)}
        assert cols.tolist() == [c for c in range(6 * group_size) if c not in removed]
        assert res.kept[k].shape == (4, (6 - k) * group_size)
        dense = res.snapshot(k)
        assert torch.equal(dense[:, cols], res.kept[k])
        assert torch.count_nonzero(dense[:, sorted(removed)]) == 0
        assert torch.equal(kept_columns(res.order[:k], 6 * group_size, group_size), cols)
    again = ObsResult.from_dense(res.order, res.snapshots, res.errors, group_size)
    assert all(torch.equal(again.kept[k], res.kept[k]) for k in (2, 5))


def test_block_factors_fall_back_to_pinv():
    from darwinlm.llm.obs import _block_factors

    g = torch.Generator().manual_seed(9)
    A = torch.randn(3, 2, generator=g, dtype=torch.float64)
    spd = torch.randn(6, 6, generator=g, dtype=torch.float64)
    P = spd @ spd.T + torch.eye(6, dtype=torch.float64)
    P[3:, 3:] = A @ A.T  # a rank-2 (singular) 3×3 diagonal block: Cholesky fails
    F = _block_factors(P, 3)
    torch.testing.assert_close(F[0].T @ F[0], torch.linalg.inv(P[:3, :3]))
    torch.testing.assert_close(F[1].T @ F[1], torch.linalg.pinv(P[3:, 3:], hermitian=True), atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("group_size", [1, 4])
def test_reference_faithful_baseline_takes_the_same_path(group_size):
    """bench.baselines.obs_faithful (the reference code's loop) and obs_prune agree: the bench compares
    the same computation."""
    from bench.baselines import obs_faithful

    n = 12
    W, H = _problem(8, n * group_size, 10)
    bounds = [2, 5, 11]
    base = obs_faithful(W, H, group_size, bounds, 0.01)
    ours = obs_prune(W, H, group_size=group_size, boundaries=bounds, damping=0.01, block=4)
    assert ours.order == base.order
    for k in bounds:
        torch.testing.assert_close(ours.snapshot(k), base.snapshot(k), atol=1e-9, rtol=1e-7)
    assert ours.errors == pytest.approx(base.errors, rel=1e-8)
