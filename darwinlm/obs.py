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

__all__ = ["ObsResult", "prepare_hessian", "obs_prune", "obs_prune_reference", "obs_prune_columns",
           "reconstruction_error"]


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


def obs_prune(W: torch.Tensor, H: torch.Tensor, *, group_size: int, boundaries: list[int],
              damping: float = 0.01, block: int = 256) -> ObsResult:
    """Greedy structured OBS; single columns use the lazy-batch solver, groups the reference loop."""
    if group_size == 1:
        return obs_prune_columns(W, H, boundaries=boundaries, damping=damping, block=block)
    return obs_prune_reference(W, H, group_size=group_size, boundaries=boundaries, damping=damping)


def obs_prune_reference(
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
        if s == 1:
            # rank-1 case, in place: W ← W − w_j h_jᵀ / h_jj ; H⁻¹ ← H⁻¹ − h_j h_jᵀ / h_jj
            d = Hinv[g, g].clone()
            h = Hinv[g, :].clone()  # [d_col]
            W.addr_(W[:, g].clone(), h, alpha=-1.0 / float(d))
            Hinv.addr_(h, h, alpha=-1.0 / float(d))
        else:
            block_inv = torch.linalg.pinv(Hinv[cols, cols])  # [s, s]
            W -= (W[:, cols] @ block_inv) @ Hinv[cols, :]
            Hinv -= Hinv[:, cols] @ block_inv @ Hinv[cols, :]
        removed[g] = True
        # exact zeros for the removed structure; its H⁻¹ rows/cols are ~0 after the downdate: clear
        # them and set the diagonal to 1 so later block inversions stay well-posed (ALGORITHM.md §2.4)
        W[:, cols] = 0.0
        Hinv[cols, :] = 0.0
        Hinv[:, cols] = 0.0
        Hinv[cols, cols] += torch.eye(s, dtype=Hinv.dtype)
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


def obs_prune_columns(W: torch.Tensor, H: torch.Tensor, *, boundaries: list[int], damping: float = 0.01,
                      block: int = 256) -> ObsResult:
    """The same greedy single-column OBS path as ``obs_prune_reference(group_size=1)``, with lazy batches.

    The reference touches all of W [r, c] and H⁻¹ [c, c] at every removal (O(c²) memory traffic per
    step). Here the updates of the last ≤ ``block`` removals are kept in factored form,
    W = W₀ − A Uᵀ and H⁻¹ = H⁻¹₀ − U Uᵀ, and the greedy choice only needs diag(H⁻¹) and the column
    norms of W, which are updated in O(c·k) per step from the Gram matrix G = W₀ᵀW₀ (no pass over W).
    Every ``block`` steps (and at every snapshot) the factors are applied with matrix-matrix products
    and the norms/diagonal are recomputed exactly, so rounding does not accumulate.
    """
    d_row, n = W.shape
    wanted = sorted(set(boundaries))
    if wanted and (wanted[0] < 1 or wanted[-1] >= n):
        raise ValueError(f"boundaries must lie in 1..{n - 1}, got {wanted}")
    f64 = torch.float64
    W0 = W.to(f64).clone()  # [r, c]
    H0 = _inverse(prepare_hessian(H, damping))  # [c, c]
    removed = torch.zeros(n, dtype=torch.bool)
    order: list[int] = []
    errors: list[float] = []
    snapshots: dict[int, torch.Tensor] = {}
    total = 0.0
    last = wanted[-1] if wanted else 0

    def fresh():
        G = W0.T @ W0  # [c, c]
        return G, torch.diagonal(G).clone(), torch.diagonal(H0).clone()

    G, norms, diag = fresh()
    A = torch.zeros(d_row, block, dtype=f64)  # [r, B]  factors of the pending updates
    U = torch.zeros(n, block, dtype=f64)  # [c, B]
    WtA = torch.zeros(n, block, dtype=f64)  # [c, B] = W₀ᵀ A
    AtA = torch.zeros(block, block, dtype=f64)  # [B, B]
    k = 0
    inf = torch.tensor(float("inf"), dtype=f64)
    for step in range(1, last + 1):
        rho = torch.where(removed, inf, norms / diag)  # [c]
        p = int(torch.argmin(rho))
        up = U[p, :k]  # [k]
        h = H0[p] - U[:, :k] @ up  # [c]  current row p of H⁻¹
        sq = torch.sqrt(h[p])
        u = h / sq  # [c]
        a = (W0[:, p] - A[:, :k] @ up) / sq  # [r]  current column p of W, scaled
        W0ta = (G[:, p] - WtA[:, :k] @ up) / sq  # [c]  W₀ᵀ a
        Ata = (WtA[p, :k] - AtA[:k, :k] @ up) / sq  # [k]  Aᵀ a
        Wta = W0ta - U[:, :k] @ Ata  # [c]  (current W)ᵀ a
        aa = a @ a
        norms = norms - 2.0 * u * Wta + u * u * aa
        diag = diag - u * u
        A[:, k], U[:, k], WtA[:, k] = a, u, W0ta
        AtA[k, :k] = Ata
        AtA[:k, k] = Ata
        AtA[k, k] = aa
        k += 1
        removed[p] = True
        total += float(rho[p])
        order.append(p)
        errors.append(total)
        if step in wanted and k < block:
            snap = W0 - A[:, :k] @ U[:, :k].T
            snap[:, removed] = 0.0
            snapshots[step] = snap
        if k == block:
            W0 -= A @ U.T
            W0[:, removed] = 0.0
            H0 -= U @ U.T
            H0[removed, :] = 0.0
            H0[:, removed] = 0.0
            H0[removed, removed] = 1.0
            G, norms, diag = fresh()
            k = 0
            if step in wanted:
                snapshots[step] = W0.clone()
    return ObsResult(order=order, snapshots=snapshots, errors=errors)
