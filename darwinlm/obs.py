"""Structured Optimal Brain Surgeon (ZipLM-style) for one linear layer.

Why this module exists: the layer database (ALGORITHM.md §2) needs, for every pruned ``o_proj``
(structures = attention heads, ``head_dim`` input columns each) and every ``down_proj`` (structures =
single intermediate channels), a greedy removal order and the optimally compensated weight at each level
of a ladder. Everything here is pure tensor math on one matrix; it knows nothing about models or stores.

Notation (ALGORITHM.md §2.4): W is [d_row, d_col]; H = E[x xᵀ] is [d_col, d_col]; S is the set of columns
of one structure. Removing S costs ρ_S = tr(W_S (H⁻¹_SS)⁻¹ W_Sᵀ) (twice the loss increase); the remaining
columns are compensated with W ← W − W_S (H⁻¹_SS)⁻¹ H⁻¹_{S,:}; H⁻¹ is downdated by the Schur complement.
All math runs in float64: SmolLM2's XᵀX is indefinite in float32 (DATA_AND_MODELS.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ObsResult", "prepare_hessian", "obs_prune", "reconstruction_error"]


@dataclass(frozen=True)
class ObsResult:
    """The greedy removal path of one layer.

    ``order[i]`` is the structure removed at step i (a structure index, not a column index).
    ``snapshots[k]`` is the compensated weight [d_row, d_col] after k structures were removed
    (zeros in the removed columns), for every k in the requested boundaries.
    ``errors[i]`` is the cumulative error tr(D H Dᵀ) (D = dense − compensated weight, H damped) after
    i+1 removals; OBS with exact downdates makes it the optimum for that removed set.
    """

    order: list[int]
    snapshots: dict[int, torch.Tensor]
    errors: list[float]


def prepare_hessian(H: torch.Tensor, damping: float) -> torch.Tensor:
    """Return a damped float64 copy of H: dead inputs get diag 1, then λ·mean(diag) is added."""
    H = H.to(torch.float64).clone()  # [d_col, d_col]
    diag = torch.diagonal(H)
    dead = diag == 0
    diag[dead] = 1.0
    diag += damping * torch.mean(diag)
    return H


def _inverse(H: torch.Tensor) -> torch.Tensor:
    """H⁻¹ by Cholesky; the caller guarantees H is damped (SPD)."""
    L = torch.linalg.cholesky(H)
    return torch.cholesky_inverse(L)


def obs_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    *,
    group_size: int,
    boundaries: list[int],
    damping: float = 0.01,
) -> ObsResult:
    """Greedily remove structures of ``group_size`` contiguous input columns with OBS compensation.

    ``boundaries`` are the numbers of removed structures at which to snapshot W (each in 1..n-1; the
    dense level 0 and the all-removed level need no OBS work and are not produced here). The loop stops
    at the largest boundary.
    """
    d_row, d_col = W.shape
    if d_col % group_size:
        raise ValueError(f"{d_col} columns are not a multiple of group_size {group_size}")
    n = d_col // group_size
    wanted = sorted(set(boundaries))
    if wanted and (wanted[0] < 1 or wanted[-1] >= n):
        raise ValueError(f"boundaries must lie in 1..{n - 1}, got {wanted}")
    W = W.to(torch.float64).clone()  # [d_row, d_col]
    Hinv = _inverse(prepare_hessian(H, damping))  # [d_col, d_col]
    removed = torch.zeros(n, dtype=torch.bool)
    order: list[int] = []
    errors: list[float] = []
    snapshots: dict[int, torch.Tensor] = {}
    total = 0.0
    s = group_size
    last = wanted[-1] if wanted else 0
    for step in range(1, last + 1):
        rho = _saliency(W, Hinv, s, removed)  # [n]
        g = int(torch.argmin(rho))
        cols = slice(g * s, (g + 1) * s)
        block_inv = torch.linalg.pinv(Hinv[cols, cols]) if s > 1 else 1.0 / Hinv[cols, cols]  # [s, s]
        # W ← W − W_S (H⁻¹_SS)⁻¹ H⁻¹_{S,:}; H⁻¹ ← H⁻¹ − H⁻¹_{:,S} (H⁻¹_SS)⁻¹ H⁻¹_{S,:}
        W -= (W[:, cols] @ block_inv) @ Hinv[cols, :]
        Hinv -= Hinv[:, cols] @ block_inv @ Hinv[cols, :]
        removed[g] = True
        dead_cols = removed.repeat_interleave(s)  # [d_col]
        W[:, dead_cols] = 0.0
        # keep later per-structure block inversions well-posed (ALGORITHM.md §2.4)
        Hinv[dead_cols, :] = 0.0
        Hinv[:, dead_cols] = 0.0
        Hinv[dead_cols, dead_cols] = 1.0
        total += float(rho[g])
        order.append(g)
        errors.append(total)
        if step in wanted:
            snapshots[step] = W.clone()
    return ObsResult(order=order, snapshots=snapshots, errors=errors)


def _saliency(W: torch.Tensor, Hinv: torch.Tensor, s: int, removed: torch.Tensor) -> torch.Tensor:
    """ρ per structure; +inf for already removed ones."""
    n = removed.numel()
    if s == 1:
        rho = (W * W).sum(0) / torch.diagonal(Hinv)  # [n]
    else:
        idx = torch.arange(n * s).view(n, s)  # [n, s]
        blocks = Hinv[idx[:, :, None], idx[:, None, :]]  # [n, s, s]
        inv = torch.linalg.pinv(blocks)  # [n, s, s]
        Wg = W.view(W.shape[0], n, s)  # [d_row, n, s]
        rho = torch.einsum("rgi,gij,rgj->g", Wg, inv, Wg)  # [n]
    return rho.masked_fill(removed, float("inf"))


def reconstruction_error(W_ref: torch.Tensor, W_new: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W_ref − W_new) H (W_ref − W_new)ᵀ): the layer-output squared error under inputs with E[xxᵀ]=H."""
    D = (W_ref.to(torch.float64) - W_new.to(torch.float64))  # [d_row, d_col]
    return float(torch.einsum("ri,ij,rj->", D, H.to(torch.float64), D))
