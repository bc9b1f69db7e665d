"""`pick_examples`: a deterministic, class-balanced choice of digits to attribute."""

from __future__ import annotations

import torch
from torch import Tensor

from ... import _checks

__all__ = ["pick_examples"]


def pick_examples(labels: Tensor, n: int, offset: int = 0) -> Tensor:
    """``n`` indices into ``labels`` cycling through the digits ``offset, offset + 1, ...``.

    Args:
        labels: ``(N,)`` digit labels.
        n: how many to pick.
        offset: the first digit.

    Returns:
        ``(n,)`` long indices (deterministic: the first unused example of each digit in turn).

    Raises:
        ValueError: if ``n`` is not an integer in ``[0, N]``.
    """
    per_class = {c: torch.nonzero(labels == c).flatten().tolist() for c in range(10)}
    total = sum(len(v) for v in per_class.values())
    _checks.non_negative_int("n", n)
    if n > total:
        raise ValueError(f"n must be an integer in [0, {total}], got {n!r}")
    picked = []
    i = 0
    while len(picked) < n:
        c = (i + offset) % 10
        j = i // 10
        if j < len(per_class[c]):
            picked.append(per_class[c][j])
        i += 1
    return torch.tensor(picked, dtype=torch.long)
