"""Plate roles of a teacher term's draws, read from Pyro's frames; moving draws between layouts.

A teacher term's draws fill the plates that enclose it. One of them may be the *inner* plate: the
cheap ``(t, eps)`` resamples that share one upstream sample. The rule, from the frames alone:

1. the innermost enclosing reserved plate ([`carv_pyro.draws`][carv_pyro.draws]) if there is one;
2. else the innermost enclosing ``pyro.plate`` (the one that encloses the term most closely),
   provided the upstream ``x`` does not vary along it;
3. else none: every draw has its own upstream sample (``K = 1``).

Every other enclosing plate is an *outer* plate. The draws group as ``(n_outer, n_inner)``:
`TermLayout.group` moves the inner dim last with einops, so per-upstream-sample operations
(stratification, antithetic pairs, the accountant's contrasts) read as what they are.

This module is on the ground floor: it imports nothing of ours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import pack, rearrange, unpack
from pyro.poutine.indep_messenger import CondIndepStackFrame
from torch import Tensor

__all__ = [
    "DRAWS_KEY",
    "TermLayout",
    "flatten_draws",
    "halves",
    "to_device",
    "unflatten_draws",
]

#: ``infer`` key set by a reserved inner plate on every site inside it (the innermost one's name).
DRAWS_KEY = "carv_draws"

_EVENT_LETTERS = "abcdefgh"


def to_device(tensor: Tensor, device: torch.device | str) -> Tensor:
    """Move a (small) host tensor to ``device`` without synchronising the host with the GPU.

    A plain ``.to("cuda")`` from pageable memory waits for all queued GPU work; copying from
    pinned memory with ``non_blocking=True`` is queued on the current stream instead.
    """
    device = torch.device(device)
    if tensor.device == device or device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def halves(n: int, interleaved: bool = False) -> tuple[Tensor, Tensor]:
    """The two halves of ``n`` draws that the accountant's measuring step contrasts: the first
    ``n // 2`` and the rest (upstream samples, which an outer design then draws as two
    independent designs), or, ``interleaved``, the even and the odd indices (inner draws).

    Returns:
        Two index tensors, ``(n // 2,)`` and ``(n - n // 2,)`` (interleaved: ``(n - n // 2,)``
        and ``(n // 2,)``).
    """
    idx = torch.arange(n)
    if interleaved:
        return idx[0::2], idx[1::2]
    return idx[: n // 2], idx[n // 2 :]


def _event_pattern(event_ndim: int) -> str:
    return " ".join(_EVENT_LETTERS[:event_ndim])


def flatten_draws(tensor: Tensor, event_ndim: int) -> tuple[Tensor, list]:
    """``(*batch, *event) -> (N, *event)`` across all plate dims (einops ``pack``)."""
    return pack([tensor], "* " + _event_pattern(event_ndim))


def unflatten_draws(tensor: Tensor, packed_shapes: list, event_ndim: int) -> Tensor:
    """Inverse of `flatten_draws`: ``(N, *event) -> (*batch, *event)``."""
    return unpack(tensor, packed_shapes, "* " + _event_pattern(event_ndim))[0]


@dataclass(frozen=True)
class TermLayout:
    """Where a teacher term's draws sit: its plates, and which of them is the inner one.

    Attributes:
        batch_shape: the draws' batch shape, e.g. ``(R, K)``.
        plates: the enclosing vectorized plates' frames, outermost first.
        inner_plate: the inner plate's name, or ``None`` (one draw per upstream sample).
        inner_dim: its (negative) dim in ``batch_shape``, or ``None``.
        reserved: whether the inner plate is a reserved [`carv_pyro.draws`][carv_pyro.draws]
            plate (which estimators and accountants may resize).
    """

    batch_shape: torch.Size
    plates: tuple[CondIndepStackFrame, ...]
    inner_plate: str | None
    inner_dim: int | None
    reserved: bool

    @classmethod
    def from_frames(
        cls,
        term: str,
        frames: tuple[CondIndepStackFrame, ...],
        draws_plate: str | None,
        outer_shape: torch.Size,
    ) -> TermLayout:
        """Read the layout of term ``term`` from its enclosing frames.

        Args:
            term: the term's name (for error messages).
            frames: the enclosing plates' frames, outermost first (``cond_indep_stack``).
            draws_plate: the innermost enclosing reserved plate's name, or ``None``.
            outer_shape: the batch shape of the upstream ``x``.

        Raises:
            ValueError: if ``x`` has batch dims no plate declares, or varies along the reserved
                inner plate.
        """
        vectorized = tuple(f for f in frames if f.vectorized)
        n = max([-f.dim for f in vectorized] + [len(outer_shape), 0])
        sizes = [1] * n
        for f in vectorized:
            sizes[n + f.dim] = f.size
        batch_shape = torch.Size(sizes)
        padded = (1,) * (n - len(outer_shape)) + tuple(outer_shape)
        if any(o != 1 and o != b for o, b in zip(padded, batch_shape)):
            summary = ", ".join(f"{f.name!r} (dim {f.dim}, size {f.size})" for f in vectorized)
            raise ValueError(
                f"teacher_term {term!r}: x has batch shape {tuple(outer_shape)}, which does not "
                f"broadcast with the enclosing plates [{summary or 'none'}] (batch shape "
                f"{tuple(batch_shape)}). Declare every batch dim of x with a pyro.plate, and give "
                f"x size 1 along the inner plate."
            )
        inner = None
        if draws_plate is not None:
            inner = next(f for f in reversed(vectorized) if f.name == draws_plate)
            if padded[n + inner.dim] != 1:
                raise ValueError(
                    f"teacher_term {term!r}: x varies along the reserved inner plate "
                    f"{draws_plate!r} (dim {inner.dim}); the inner draws must share their "
                    f"upstream sample, so compute x outside carv_pyro.draws(...) and give it size "
                    f"1 along dim {inner.dim}"
                )
        elif vectorized and padded[n + vectorized[-1].dim] == 1:
            inner = vectorized[-1]
        return cls(
            batch_shape=batch_shape,
            plates=vectorized,
            inner_plate=None if inner is None else inner.name,
            inner_dim=None if inner is None else inner.dim,
            reserved=draws_plate is not None,
        )

    @property
    def n_draws(self) -> int:
        """All draws of the term, ``R K`` in the usual layout."""
        return math.prod(self.batch_shape)

    @property
    def n_inner(self) -> int:
        """Inner draws per upstream sample (``K``)."""
        return 1 if self.inner_dim is None else self.batch_shape[self.inner_dim]

    @property
    def n_outer(self) -> int:
        """Groups of inner draws (``R``): one per upstream sample."""
        return self.n_draws // max(self.n_inner, 1)

    def _patterns(self) -> tuple[str, str, dict[str, int]]:
        n = len(self.batch_shape)
        names = [f"d{i}" for i in range(n)]
        inner = None if self.inner_dim is None else n + self.inner_dim
        outer = [names[i] for i in range(n) if i != inner]
        inn = [names[inner]] if inner is not None else []
        src = " ".join(names)
        dst = f"({' '.join(outer)}) ({' '.join(inn)})"
        return src, dst, {names[i]: self.batch_shape[i] for i in range(n)}

    def group(self, tensor: Tensor, event_ndim: int = 0) -> Tensor:
        """``(*batch_shape, *event) -> (n_outer, n_inner, *event)`` (inner draws last)."""
        src, dst, sizes = self._patterns()
        ev = _event_pattern(event_ndim)
        return rearrange(tensor, f"{src} {ev} -> {dst} {ev}", **sizes)

    def ungroup(self, tensor: Tensor, event_ndim: int = 0) -> Tensor:
        """Inverse of `group`: ``(n_outer, n_inner, *event) -> (*batch_shape, *event)``."""
        src, dst, sizes = self._patterns()
        ev = _event_pattern(event_ndim)
        return rearrange(tensor, f"{dst} {ev} -> {src} {ev}", **sizes)
