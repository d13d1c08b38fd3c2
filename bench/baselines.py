"""Reference-faithful slow implementations, for benchmarks only (the library never imports this).

Why this module exists: a speedup is only honest against an implementation that does what the
reference code does. ``obs_faithful`` follows ALGORITHM.md §2.3–2.4 the way the DarwinLM/ZipLM
reference (``src/fast_obc_struct.py``, ``FastOBCStruct.step``) computes it:

- one structure per step, with full-size updates of W [d_row, d_col] and H⁻¹ [d_col, d_col];
- every previously removed column of W re-zeroed at every step through a boolean mask;
- heads: every head's head_dim×head_dim block of H⁻¹ is gathered and inverted at every step
  (batched Cholesky, falling back to pinv), and the diagonal of all removed columns is reset to 1;
- Hessian preparation as in ``pruning_pre_step``/``_prepare``: dead inputs get diag 1 and a zeroed W
  column, relative damping, all-zero W columns get their H rows/cols cleared (diag 1), Cholesky inverse.

Deliberate differences from the reference, so that both sides compute the same thing: float64 instead of
float32 (SmolLM2's XᵀX is indefinite in float32, and the library works in float64), no device moves,
no prints; the output is a ``darwinlm.llm.obs.ObsResult`` (cumulative ρ, dense-shaped snapshots).
"""

from __future__ import annotations

import torch

from darwinlm.llm.obs import ObsResult

__all__ = ["obs_faithful"]


def _prepare(W: torch.Tensor, H: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``pruning_pre_step`` + ``_prepare``: (W with dead columns zeroed, H⁻¹)."""
    d_col = W.shape[1]
    H = H.to(torch.float64).clone()  # [d_col, d_col]
    W = W.to(torch.float64).clone()  # [d_row, d_col]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H[range(d_col), range(d_col)] += damping * torch.diag(H).mean()
    W[:, dead] = 0
    zero_cols = torch.nonzero(W.eq(0).all(dim=0))
    H[zero_cols, :] = 0
    H[:, zero_cols] = 0
    H[zero_cols, zero_cols] = 1
    return W, torch.cholesky_inverse(torch.linalg.cholesky(H))


def obs_faithful(W: torch.Tensor, H: torch.Tensor, group_size: int, boundaries: list[int],
                 damping: float = 0.01) -> ObsResult:
    """Greedy structured OBS exactly as the reference loop does it (see the module docstring)."""
    d_row, d_col = W.shape
    size = group_size
    count = d_col // size
    wanted = sorted(set(boundaries))
    if d_col % size or (wanted and (wanted[0] < 1 or wanted[-1] >= count)):
        raise ValueError(f"bad group_size {size} or boundaries {wanted} for {d_col} columns")
    W, Hinv = _prepare(W, H, damping)
    mask = torch.zeros(count, dtype=torch.bool)
    order: list[int] = []
    errors: list[float] = []
    snapshots: dict[int, torch.Tensor] = {}
    total = 0.0
    last = wanted[-1] if wanted else 0
    if size == 1:
        for dropped in range(last):
            diag = torch.diagonal(Hinv)  # [c]
            scores = torch.sum(W ** 2, 0) / diag  # [c]
            scores[mask] = float("inf")
            j = int(torch.argmin(scores))
            row = Hinv[j, :].clone()  # [c]
            d = diag[j].clone()
            W -= (W[:, j] / d).unsqueeze(1).matmul(row.unsqueeze(0))
            mask[j] = True
            W[:, mask] = 0
            total += float(scores[j])
            order.append(j)
            errors.append(total)
            if dropped + 1 in wanted:
                snapshots[dropped + 1] = W.clone()
            row /= torch.sqrt(d)
            Hinv -= row.unsqueeze(1).matmul(row.unsqueeze(0))
        return ObsResult.from_dense(order, snapshots, errors)
    mask1 = torch.zeros(d_col, dtype=torch.bool)
    rangecount = torch.arange(count)
    rangecolumns = torch.arange(d_col)
    for dropped in range(last):
        blocks = Hinv.reshape(count, size, count, size)[rangecount, :, rangecount, :]  # [n, s, s]
        try:
            invblocks = torch.cholesky_inverse(torch.linalg.cholesky(blocks))  # [n, s, s]
        except RuntimeError:  # torch.linalg.LinAlgError
            invblocks = torch.linalg.pinv(blocks, hermitian=True)
        W1 = W.reshape(d_row, count, size).transpose(0, 1)  # [n, r, s]
        lambd = torch.bmm(W1, invblocks)  # [n, r, s]
        scores = torch.sum(lambd * W1, (1, 2))  # [n]
        scores[mask] = float("inf")
        j = int(torch.argmin(scores))
        rows = Hinv[size * j:size * (j + 1), :].clone()  # [s, c]
        d = invblocks[j]  # [s, s]
        W -= lambd[j].matmul(rows)
        mask[j] = True
        mask1[size * j:size * (j + 1)] = True
        W[:, mask1] = 0
        total += float(scores[j])
        order.append(j)
        errors.append(total)
        if dropped + 1 in wanted:
            snapshots[dropped + 1] = W.clone()
        Hinv -= rows.t().matmul(d.matmul(rows))
        Hinv[rangecolumns[mask1], rangecolumns[mask1]] = 1
    return ObsResult.from_dense(order, snapshots, errors, size)
