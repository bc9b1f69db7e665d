"""TRAK-style attribution scores from features, and Spearman's rank correlation to compare them."""

from __future__ import annotations

import torch
from torch import Tensor

from ... import _checks

__all__ = ["SCORE_METHODS", "attribution_scores", "rank_correlation"]

#: Ways to turn features into attribution scores (see `attribution_scores`).
SCORE_METHODS = ("trak", "cosine")


def attribution_scores(
    train_features: Tensor,
    query_features: Tensor,
    *,
    damping: float = 1e-3,
    method: str = "trak",
) -> Tensor:
    """TRAK-style attribution scores of every training example for every query.

    ``"trak"``: ``S = Q (F^T F + lambda I)^{-1} F^T`` with ``lambda = damping * tr(F^T F) / k``
    (the damping is relative to the mean eigenvalue of ``F^T F``, so it does not depend on the
    gradients' scale); with ``damping = 0`` the pseudo-inverse ``S = Q F^+`` is used. The
    ``n x n`` form ``Q F^T (F F^T + lambda I)^{-1}`` is used when ``n < k``. ``"cosine"``: the
    normalized inner product ``S_ij = <q_i, f_j> / (||q_i|| ||f_j||)``.

    Args:
        train_features: ``(n, k)`` features ``F`` of the training examples.
        query_features: ``(m, k)`` features ``Q`` of the queries.
        damping: relative ridge ``>= 0`` (``"trak"`` only).
        method: ``"trak"`` or ``"cosine"``.

    Returns:
        ``(m, n)`` float64 scores; larger means more helpful.

    Raises:
        ValueError: naming the bad argument.
    """
    _checks.choice("method", method, SCORE_METHODS)
    for name, f in (("train_features", train_features), ("query_features", query_features)):
        if not isinstance(f, Tensor) or f.dim() != 2 or f.shape[0] < 1:
            shape = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
            raise ValueError(f"{name} must be a 2-D (rows, k) tensor, got {shape}")
    if train_features.shape[1] != query_features.shape[1]:
        raise ValueError(
            f"query_features has k = {query_features.shape[1]} but train_features has k = "
            f"{train_features.shape[1]}"
        )
    damping = _checks.non_negative_float("damping", damping)
    F = train_features.to(torch.float64)
    Q = query_features.to(torch.float64)
    if method == "cosine":
        Fn = F / F.norm(dim=1, keepdim=True).clamp_min(1e-300)
        Qn = Q / Q.norm(dim=1, keepdim=True).clamp_min(1e-300)
        return Qn @ Fn.T
    n, k = F.shape
    if damping == 0.0:
        return Q @ torch.linalg.pinv(F)
    lam = damping * float((F * F).sum()) / k
    if lam == 0.0:
        return Q.new_zeros((Q.shape[0], n))
    if n < k:
        gram = F @ F.T + lam * torch.eye(n, dtype=F.dtype, device=F.device)
        return torch.linalg.solve(gram, F @ Q.T).T
    gram = F.T @ F + lam * torch.eye(k, dtype=F.dtype, device=F.device)
    return torch.linalg.solve(gram, Q.T).T @ F.T


def _average_ranks(x: Tensor) -> Tensor:
    """Ranks ``0..n-1`` along the last dim, ties sharing their average rank."""
    less = (x.unsqueeze(-1) > x.unsqueeze(-2)).sum(-1).to(torch.float64)
    equal = (x.unsqueeze(-1) == x.unsqueeze(-2)).sum(-1).to(torch.float64)
    return less + 0.5 * (equal - 1.0)


def rank_correlation(a: Tensor, b: Tensor) -> Tensor:
    """Spearman's rank correlation along the last dimension (ties get average ranks).

    Args:
        a: ``(..., n)`` tensor, ``n >= 2``.
        b: a tensor of the same shape.

    Returns:
        ``(...)`` float64 correlations in ``[-1, 1]`` (NaN where a row is constant).

    Raises:
        ValueError: on mismatched shapes or ``n < 2``.
    """
    if a.shape != b.shape:
        raise ValueError(f"b must have a's shape {tuple(a.shape)}, got {tuple(b.shape)}")
    if a.dim() < 1 or a.shape[-1] < 2:
        raise ValueError(f"a must have at least 2 entries along its last dim, got {tuple(a.shape)}")
    ra = _average_ranks(a)
    rb = _average_ranks(b)
    ra = ra - ra.mean(-1, keepdim=True)
    rb = rb - rb.mean(-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1))
