"""Structured Optimal Brain Surgeon (ZipLM-style) for one linear layer.

Why this module exists: the layer database (ALGORITHM.md §2) needs, for every pruned ``o_proj``
(structures = attention heads, ``head_dim`` input columns each) and every ``down_proj`` (structures =
single intermediate channels), a greedy removal order and the optimally compensated weight at each level
of a ladder. Everything here is pure tensor math on one matrix; it knows nothing about models or stores.

Notation (ALGORITHM.md §2.4): W is [d_row, d_col]; H = E[x xᵀ] is [d_col, d_col]; S is the set of columns
of one structure. Removing S costs ρ_S = tr(W_S (H⁻¹_SS)⁻¹ W_Sᵀ) (twice the loss increase); the remaining
columns are compensated with W ← W − W_S (H⁻¹_SS)⁻¹ H⁻¹_{S,:}; H⁻¹ is downdated by the Schur complement.
All math runs in float64: SmolLM2's XᵀX is indefinite in float32 (DATA_AND_MODELS.md).

Three solvers compute the same greedy path: ``obs_prune_reference`` is the readable one-structure-per-step
loop on full-size matrices (the test oracle); ``obs_prune_columns`` (single columns: lazy batches) and
``obs_prune_groups`` (heads) are the fast ones ``obs_prune`` uses. Both fast solvers drop the removed
columns from W and H⁻¹ instead of zeroing and masking them (the removed rows/cols of the downdated H⁻¹
are zero in exact arithmetic, so the kept entries see the same arithmetic), so the work shrinks as the
layer is pruned. ``bench/database.py`` measures them against the reference code's loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

__all__ = ["ObsResult", "kept_columns", "prepare_hessian", "obs_prune", "obs_prune_reference", "obs_prune_columns",
           "obs_prune_groups", "reconstruction_error"]

_F64 = torch.float64


@dataclass(frozen=True)
class ObsResult:
    """The greedy removal path of one layer.

    ``order[i]`` is the structure removed at step i (a structure index, not a column index).
    ``kept[k]`` is the compensated weight after k structures were removed, restricted to the kept
    columns in increasing column order ([d_row, d_col − k·group_size]), for every k in the requested
    boundaries; ``snapshot(k)`` / ``snapshots`` expand it to the dense shape with zeros in the removed
    columns.
    ``errors[i]`` is the cumulative error tr(D H Dᵀ) (D = dense − compensated weight, H damped) after
    i+1 removals; OBS with exact downdates makes it the optimum for that removed set.
    """

    order: list[int]
    kept: dict[int, torch.Tensor]
    errors: list[float]
    group_size: int = 1

    def kept_columns(self, k: int) -> torch.Tensor:
        """The original column indices of ``kept[k]`` (increasing)."""
        return kept_columns(self.order[:k], self.kept[k].shape[1] + k * self.group_size, self.group_size)

    def snapshot(self, k: int) -> torch.Tensor:
        """Dense-shaped [d_row, d_col] weight after k removals (exact zeros in the removed columns)."""
        w = self.kept[k]  # [d_row, kept]
        out = w.new_zeros(w.shape[0], w.shape[1] + k * self.group_size)
        out[:, self.kept_columns(k)] = w
        return out

    @cached_property
    def snapshots(self) -> dict[int, torch.Tensor]:
        return {k: self.snapshot(k) for k in self.kept}

    @classmethod
    def from_dense(cls, order: list[int], snapshots: dict[int, torch.Tensor], errors: list[float],
                   group_size: int = 1) -> ObsResult:
        """Build from dense-shaped snapshots (as a full-matrix solver produces them)."""
        kept = {k: w[:, kept_columns(order[:k], w.shape[1], group_size)] for k, w in snapshots.items()}
        return cls(order=order, kept=kept, errors=errors, group_size=group_size)


def kept_columns(removed: list[int], d_col: int, group_size: int = 1) -> torch.Tensor:
    """Increasing column indices [d_col − len(removed)·group_size] left after removing ``removed``."""
    alive = torch.ones(d_col // group_size, dtype=torch.bool)
    alive[list(removed)] = False
    units = torch.nonzero(alive).squeeze(1)  # [kept units]
    return (units[:, None] * group_size + torch.arange(group_size)).reshape(-1)


def prepare_hessian(H: torch.Tensor, damping: float) -> torch.Tensor:
    """Return a damped float64 copy of H: dead inputs get diag 1, then λ·mean(diag) is added."""
    H = H.to(_F64).clone()  # [d_col, d_col]
    diag = torch.diagonal(H)
    dead = diag == 0
    diag[dead] = 1.0
    diag += damping * torch.mean(diag)
    return H


def _inverse(H: torch.Tensor) -> torch.Tensor:
    """H⁻¹ by Cholesky; the caller guarantees H is damped (SPD)."""
    L = torch.linalg.cholesky(H)
    return torch.cholesky_inverse(L)


def _check(n: int, boundaries: list[int]) -> list[int]:
    wanted = sorted(set(boundaries))
    if wanted and (wanted[0] < 1 or wanted[-1] >= n):
        raise ValueError(f"boundaries must lie in 1..{n - 1}, got {wanted}")
    return wanted


def obs_prune(W: torch.Tensor, H: torch.Tensor, *, group_size: int, boundaries: list[int],
              damping: float = 0.01, block: int = 256) -> ObsResult:
    """Greedy structured OBS: single columns use the lazy-batch solver, groups the shrinking one."""
    if group_size == 1:
        return obs_prune_columns(W, H, boundaries=boundaries, damping=damping, block=block)
    return obs_prune_groups(W, H, group_size=group_size, boundaries=boundaries, damping=damping)


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
    wanted = _check(n, boundaries)
    W = W.to(_F64).clone()  # [d_row, d_col]
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
    return ObsResult.from_dense(order, snapshots, errors, group_size)


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
    D = (W_ref.to(_F64) - W_new.to(_F64))  # [d_row, d_col]
    return float(torch.einsum("ri,ij,rj->", D, H.to(_F64), D))


# ------------------------------------------------------------------------------ groups (attention heads)


def _block_factors(P: torch.Tensor, s: int) -> torch.Tensor:
    """F [g, s, s] with Fᵀ F = (P_hh)⁻¹ for every diagonal s×s block of P [g·s, g·s].

    F = L⁻¹ for the Cholesky factor L of the block; blocks that are not numerically SPD fall back to
    the pseudo-inverse (F = Λ⁺^½ Vᵀ from the eigendecomposition), as the reference falls back to pinv.
    """
    g = P.shape[0] // s
    blocks = P.view(g, s, g, s).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [g, s, s]
    L, info = torch.linalg.cholesky_ex(blocks)
    if bool((info == 0).all()):
        eye = torch.eye(s, dtype=P.dtype).expand(g, s, s)
        return torch.linalg.solve_triangular(L, eye, upper=False)
    lam, V = torch.linalg.eigh(blocks)  # [g, s], [g, s, s]
    tol = lam.amax(-1, keepdim=True) * s * torch.finfo(P.dtype).eps
    root = torch.where(lam > tol, lam.clamp_min(tol).rsqrt(), torch.zeros_like(lam))  # [g, s]
    return root[:, :, None] * V.transpose(1, 2)


def _drop_cols(X: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """A new [rows, cols − (hi − lo)] tensor: X without columns lo..hi−1."""
    return torch.cat((X[:, :lo], X[:, hi:]), 1)


def obs_prune_groups(W: torch.Tensor, H: torch.Tensor, *, group_size: int, boundaries: list[int],
                     damping: float = 0.01) -> ObsResult:
    """The greedy path of ``obs_prune_reference`` for groups, on a problem that shrinks with every step.

    Per step: one batched Cholesky of the kept heads' H⁻¹ blocks gives factors F_h (F_hᵀF_h = (H⁻¹_hh)⁻¹);
    ρ_h = ‖F_h W_hᵀ‖²; the removal of head g is the rank-s downdate W ← W − a u, H⁻¹ ← H⁻¹ − uᵀu with
    a = W_g F_gᵀ and u = F_g H⁻¹_{g,:}, applied to the kept columns only (the removed ones are dropped).
    """
    d_row, d_col = W.shape
    s = group_size
    if d_col % s:
        raise ValueError(f"{d_col} columns are not a multiple of group_size {s}")
    n = d_col // s
    wanted = _check(n, boundaries)
    W = W.to(_F64).clone()  # [r, m]  m = s · len(alive): the kept columns
    P = _inverse(prepare_hessian(H, damping))  # [m, m]  H⁻¹ restricted to the kept columns
    alive = torch.arange(n)  # [g]  structure id of each kept group
    order: list[int] = []
    errors: list[float] = []
    kept: dict[int, torch.Tensor] = {}
    total = 0.0
    for step in range(1, (wanted[-1] if wanted else 0) + 1):
        g = alive.numel()
        F = _block_factors(P, s)  # [g, s, s]
        Y = torch.bmm(F, W.view(d_row, g, s).permute(1, 2, 0))  # [g, s, r]  F_h W_hᵀ
        rho = (Y * Y).sum((1, 2))  # [g]
        j = int(torch.argmin(rho))
        a = Y[j].T  # [r, s]
        lo, hi = j * s, (j + 1) * s  # the removed columns; slices, not index gathers, drop them
        u = F[j] @ _drop_cols(P[lo:hi], lo, hi)  # [s, m - s]
        W = _drop_cols(W, lo, hi).addmm_(a, u, alpha=-1.0)
        P = _drop_cols(torch.cat((P[:lo], P[hi:])), lo, hi).addmm_(u.T, u, alpha=-1.0)
        total += float(rho[j])
        order.append(int(alive[j]))
        errors.append(total)
        alive = torch.cat([alive[:j], alive[j + 1:]])
        if step in wanted:
            kept[step] = W  # a fresh tensor every step, never modified afterwards
    return ObsResult(order=order, kept=kept, errors=errors, group_size=s)


# ------------------------------------------------------------------------------ single columns (MLP)


class _LazyColumns:
    """State of ``obs_prune_columns``: the kept columns' W and H⁻¹ as of the last flush, plus up to
    ``block`` pending rank-1 removals in factored form (W = W₀ − A Uᵀ, H⁻¹ = H⁻¹₀ − U Uᵀ).

    Factors are stored as rows (``At`` [B, r], ``Ut``/``WtAt`` [B, m]) so each step writes contiguous rows.
    ``norms`` and ``diag`` are the current ‖W_j‖² and H⁻¹_jj, updated in O(m·k) per step from the Gram
    matrix G = W₀ᵀW₀; a flush applies the factors with matrix products, drops the removed columns,
    updates G by the same factors (G ← G − X Uᵀ − U Xᵀ, X = W₀ᵀA − ½ U AᵀA) and recomputes the norms
    exactly, so rounding does not accumulate in the selection.
    """

    def __init__(self, W: torch.Tensor, Hinv: torch.Tensor, block: int):
        r, m = W.shape
        self.W0, self.H0, self.G = W, Hinv, W.T @ W  # [r, m], [m, m], [m, m]
        self.cols = torch.arange(m)  # [m]  original column of each kept column
        self.At = torch.empty(block, r, dtype=_F64)
        self.Ut = torch.empty(block, m, dtype=_F64)
        self.WtAt = torch.empty(block, m, dtype=_F64)  # rows of W₀ᵀA
        self.AtA = torch.empty(block, block, dtype=_F64)
        self.k = 0
        self._refresh()

    def _refresh(self) -> None:
        self.norms = (self.W0 * self.W0).sum(0)  # [m]
        self.diag = torch.diagonal(self.H0).clone()  # [m]
        self.removed = torch.zeros(self.W0.shape[1], dtype=torch.bool)

    def step(self) -> tuple[int, float]:
        """Remove the column of least ρ = ‖W_j‖²/H⁻¹_jj; return (original column, ρ)."""
        k = self.k
        rho = torch.where(self.removed, math.inf, self.norms / self.diag)  # [m]
        p = int(torch.argmin(rho))
        WtAk, Ak = self.WtAt[:k].T, self.At[:k].T  # [m, k], [r, k]
        up = self.Ut[:k, p]  # [k]
        ata = torch.addmv(self.WtAt[:k, p], self.AtA[:k, :k], up, alpha=-1.0)  # [k]  √h_pp · Aᵀa
        V = torch.stack((up, ata)) @ self.Ut[:k]  # [2, m]  (U up, U ata) in one pass over U
        h = self.H0[p] - V[0]  # [m]  current row p of H⁻¹
        inv = 1.0 / math.sqrt(float(h[p]))
        u = torch.mul(h, inv, out=self.Ut[k])  # [m]
        a = torch.addmv(self.W0[:, p], Ak, up, alpha=-1.0, out=self.At[k]).mul_(inv)  # [r]  W_p/√h_pp
        w0ta = torch.addmv(self.G[:, p], WtAk, up, alpha=-1.0, out=self.WtAt[k]).mul_(inv)  # [m]  W₀ᵀa
        wta = torch.add(w0ta, V[1], alpha=-inv)  # [m]  (current W)ᵀ a
        aa = float(a @ a)
        self.norms.addcmul_(u, wta.add_(u, alpha=-0.5 * aa), value=-2.0)  # ‖W_j − a u_j‖²
        self.diag.addcmul_(u, u, value=-1.0)
        ata.mul_(inv)
        self.AtA[k, :k] = ata
        self.AtA[:k, k] = ata
        self.AtA[k, k] = aa
        self.k = k + 1
        self.removed[p] = True
        return int(self.cols[p]), float(rho[p])

    def flush(self) -> None:
        """Apply the pending removals and drop the removed columns."""
        k, keep = self.k, ~self.removed  # [m] bool
        Ur = self.Ut[:k, keep]  # [k, m']
        Xr = torch.addmm(self.WtAt[:k, keep], self.AtA[:k, :k], Ur, alpha=-0.5)  # [k, m']
        self.W0 = self.W0[:, keep].addmm_(self.At[:k].T, Ur, alpha=-1.0)
        self.H0 = self.H0[keep][:, keep].addmm_(Ur.T, Ur, alpha=-1.0)
        self.G = self.G[keep][:, keep].addmm_(torch.cat((Xr, Ur)).T, torch.cat((Ur, Xr)), alpha=-1.0)
        self.cols = self.cols[keep]
        self.Ut, self.WtAt = self.Ut[:, : Ur.shape[1]], self.WtAt[:, : Ur.shape[1]]
        self.k = 0
        self._refresh()


def obs_prune_columns(W: torch.Tensor, H: torch.Tensor, *, boundaries: list[int], damping: float = 0.01,
                      block: int = 256) -> ObsResult:
    """The same greedy single-column OBS path as ``obs_prune_reference(group_size=1)``, with lazy batches.

    The reference touches all of W [r, c] and H⁻¹ [c, c] at every removal (O(c²) memory traffic per
    step). Here a step costs O(m·k) for m kept columns and k ≤ ``block`` pending removals (see
    ``_LazyColumns``); every ``block`` steps and at every snapshot the pending removals are applied with
    matrix products and the removed columns are dropped, so later flushes work on smaller matrices.
    """
    d_col = W.shape[1]
    wanted = _check(d_col, boundaries)
    state = _LazyColumns(W.to(_F64).clone(), _inverse(prepare_hessian(H, damping)), block)
    order: list[int] = []
    errors: list[float] = []
    kept: dict[int, torch.Tensor] = {}
    total = 0.0
    for step in range(1, (wanted[-1] if wanted else 0) + 1):
        col, rho = state.step()
        total += rho
        order.append(col)
        errors.append(total)
        if state.k == block or step in wanted:
            state.flush()
        if step in wanted:
            kept[step] = state.W0  # a flush replaces W0 by a fresh tensor
    return ObsResult(order=order, kept=kept, errors=errors)
