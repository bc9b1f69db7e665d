"""`RandomProjection`: a seeded Johnson-Lindenstrauss map from gradients to features."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ... import _checks

__all__ = ["PROJECTIONS", "RandomProjection"]

#: Kinds of random projection.
PROJECTIONS = ("gaussian", "rademacher")

_MASK64 = (1 << 63) - 1


def _mix_seed(*parts: int) -> int:
    """A deterministic 63-bit seed from integers (splitmix64-style mixing)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & ((1 << 64) - 1))) * 0xBF58476D1CE4E5B9 & ((1 << 64) - 1)
        h ^= h >> 31
    return h & _MASK64


class RandomProjection:
    """A seeded random projection ``R^d -> R^k``, ``f = P g`` with ``E[P^T P] = I``.

    ``P`` has i.i.d. entries ``N(0, 1/k)`` (``"gaussian"``) or ``±1/sqrt(k)``
    (``"rademacher"``), so ``E||P g||^2 = ||g||^2`` (Johnson-Lindenstrauss). It is never held
    whole unless it is small: column block ``j`` (``chunk_size`` input coordinates) is drawn
    from its own generator seeded by ``(seed, j)``, so the same seed always gives the same
    ``P``, block by block, on any device. Blocks are cached while ``k d`` floats fit in
    ``max_cache_bytes``, otherwise they are regenerated at every call.

    Args:
        dim_in: ``d``, the gradient's dimension.
        dim_out: ``k``, the feature's dimension.
        seed: the projection's seed (a non-negative integer).
        kind: ``"gaussian"`` or ``"rademacher"``.
        chunk_size: input coordinates per block.
        max_cache_bytes: cache the blocks (float32) when ``4 k d`` is at most this.

    Raises:
        ValueError: naming the bad argument.

    Examples:
        >>> proj = RandomProjection(1000, 16, seed=0)
        >>> proj(torch.randn(3, 1000)).shape
        torch.Size([3, 16])
    """

    def __init__(
        self,
        dim_in: int,
        dim_out: int,
        *,
        seed: int = 0,
        kind: str = "gaussian",
        chunk_size: int = 1 << 16,
        max_cache_bytes: int = 1 << 28,
    ):
        self.dim_in = _checks.positive_int("dim_in", dim_in)
        self.dim_out = _checks.positive_int("dim_out", dim_out)
        self.seed = _checks.non_negative_int("seed", seed)
        self.kind = _checks.choice("kind", kind, PROJECTIONS)
        self.chunk_size = _checks.positive_int("chunk_size", chunk_size)
        _checks.non_negative_int("max_cache_bytes", max_cache_bytes)
        self.cached = 4 * self.dim_in * self.dim_out <= max_cache_bytes
        self._cache: dict[tuple[int, torch.device, torch.dtype], Tensor] = {}

    @property
    def n_blocks(self) -> int:
        """Number of column blocks."""
        return -(-self.dim_in // self.chunk_size)

    def block(self, j: int, device: torch.device | str = "cpu", dtype=torch.float32) -> Tensor:
        """Column block ``j`` of ``P``: ``(k, width)``, the same for the same seed.

        Args:
            j: block index in ``[0, n_blocks)``.
            device: where to return it.
            dtype: its dtype.

        Returns:
            ``(k, width)`` block, ``width = min(chunk_size, d - j chunk_size)``.
        """
        device = torch.device(device)
        key = (j, device, dtype)
        if key in self._cache:
            return self._cache[key]
        lo = j * self.chunk_size
        width = min(self.chunk_size, self.dim_in - lo)
        gen = torch.Generator().manual_seed(_mix_seed(self.seed, j, self.dim_out))
        if self.kind == "gaussian":
            b = torch.randn((self.dim_out, width), generator=gen)
        else:
            b = torch.randint(0, 2, (self.dim_out, width), generator=gen).float().mul_(2).sub_(1)
        b = b.mul_(1.0 / math.sqrt(self.dim_out)).to(device=device, dtype=dtype)
        if self.cached:
            self._cache[key] = b
        return b

    def matrix(self) -> Tensor:
        """The whole ``(k, d)`` float32 matrix (for tests and small ``d``)."""
        return torch.cat([self.block(j) for j in range(self.n_blocks)], dim=1)

    def __call__(self, g: Tensor) -> Tensor:
        """Project gradients.

        Args:
            g: ``(n, d)`` or ``(d,)`` gradients.

        Returns:
            ``(n, k)`` (or ``(k,)``) projections ``g P^T``, in ``g``'s dtype and device.

        Raises:
            ValueError: if ``g``'s last dimension is not ``d``.
        """
        if not isinstance(g, Tensor) or g.dim() not in (1, 2) or g.shape[-1] != self.dim_in:
            shape = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
            raise ValueError(
                f"g must have shape (n, {self.dim_in}) or ({self.dim_in},), got {shape}"
            )
        flat = g.reshape(-1, self.dim_in)
        out = flat.new_zeros((flat.shape[0], self.dim_out))
        for j in range(self.n_blocks):
            lo = j * self.chunk_size
            b = self.block(j, flat.device, flat.dtype)
            out += flat[:, lo : lo + b.shape[1]] @ b.T
        return out if g.dim() == 2 else out[0]

    def __repr__(self) -> str:
        return (
            f"RandomProjection(dim_in={self.dim_in}, dim_out={self.dim_out}, seed={self.seed}, "
            f"kind={self.kind!r})"
        )
