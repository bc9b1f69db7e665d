"""The Pyro primitive `teacher_term`.

Inside the model's plates, ``teacher_term`` samples the timestep and noise sites of one teacher
expectation, evaluates all draws in one batched teacher call, and records the per-draw surrogate
as an observed site that [`CARVLoss`][carv_pyro.CARVLoss] turns into an importance-weighted,
plate-averaged gradient estimate.

Sites it creates, for ``name="sds"`` inside plates of sizes ``(R, K)`` at dims ``(-2, -1)``:

| site | shape | meaning |
| --- | --- | --- |
| ``sds.t`` | ``(R, K)`` | timesteps, ``Categorical(p)`` under the prior |
| ``sds.eps`` | ``(R, K, *event)`` | noise, ``Normal(0, I)`` |
| ``sds`` | ``(R, K)`` | the term itself (observed; ``log_prob = -(value + surrogate - surrogate.detach())``) |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from einops import pack, unpack
from torch import Tensor

from .objectives import TeacherObjective
from .timing import Stopwatch

__all__ = ["teacher_term", "TermRecord", "ROLE_KEY", "TERM_KEY", "to_device"]

#: ``infer`` key marking the timestep and noise sites of a teacher term, with their role.
ROLE_KEY = "carv_role"
#: ``infer`` key holding the `TermRecord` on a term's own site.
TERM_KEY = "carv_term"

_EVENT_LETTERS = "abcdefgh"


@dataclass
class TermRecord:
    """What a teacher term leaves in the trace for the loss and the accountant.

    Attributes:
        name: the term's site name.
        objective: its objective.
        batch_shape: the plates' batch shape of the draws, e.g. ``(R, K)``.
        outer_shape: the batch shape of the upstream ``x`` (size 1 along inner plates),
            e.g. ``(R, 1)``.
        t: ``batch_shape`` timesteps.
        value: ``batch_shape`` reported per-draw losses.
        surrogate: ``batch_shape`` differentiable per-draw surrogates.
        residual: ``(*batch_shape, *event)`` weighted residuals (detached) or ``None``.
        nonfinite: ``batch_shape`` bool, draws whose value or residual was NaN/Inf (zeroed).
        teacher_time: a stopped [`Stopwatch`][carv_pyro.timing.Stopwatch] around the teacher call.
    """

    name: str
    objective: TeacherObjective
    batch_shape: torch.Size
    outer_shape: torch.Size
    t: Tensor
    value: Tensor
    surrogate: Tensor
    residual: Tensor | None
    nonfinite: Tensor
    teacher_time: Stopwatch | None = None

    @property
    def n_inner(self) -> int:
        """Inner draws per upstream sample (``K`` in the usual layout)."""
        return self.t.numel() // self.n_outer

    @property
    def n_outer(self) -> int:
        """Upstream samples (``R`` in the usual layout)."""
        full = torch.Size((1,) * (len(self.batch_shape) - len(self.outer_shape))) + self.outer_shape
        n = 1
        for b, o in zip(self.batch_shape, full):
            n *= b if o != 1 else 1
        return n


def to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """Move a (small) host tensor to ``device`` without synchronising the host with the GPU.

    A plain ``.to("cuda")`` from pageable memory waits for all queued GPU work; copying from
    pinned memory with ``non_blocking=True`` is queued on the current stream instead.
    """
    if tensor.device == device or device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _event_pattern(event_ndim: int) -> str:
    return " ".join(_EVENT_LETTERS[:event_ndim])


def flatten_draws(tensor: Tensor, event_ndim: int) -> tuple[Tensor, list]:
    """``(*batch, *event) -> (N, *event)`` across all plate dims (einops ``pack``)."""
    return pack([tensor], "* " + _event_pattern(event_ndim))


def unflatten_draws(tensor: Tensor, packed_shapes: list, event_ndim: int) -> Tensor:
    """Inverse of `flatten_draws`: ``(N, *event) -> (*batch, *event)``."""
    return unpack(tensor, packed_shapes, "* " + _event_pattern(event_ndim))[0]


def _plate_summary() -> str:
    frames = [f for f in pyro.poutine.runtime._PYRO_STACK if isinstance(f, pyro.plate)]
    if not frames:
        return "no enclosing plates"
    return ", ".join(f"{f.name!r} (dim {f.dim}, size {f.subsample_size})" for f in frames)


def teacher_term(
    name: str,
    objective: TeacherObjective,
    x: Tensor,
    cond: Any = None,
    *,
    infer: dict | None = None,
) -> Tensor | None:
    """Record one teacher expectation ``E_{t, eps}[f(x, t, eps)]`` inside the current plates.

    ``x`` follows Pyro's batching convention: its batch dims are aligned to the right with the
    enclosing plates and are 1 along the inner (resampling) plates. For the usual layout
    ``views`` at ``dim=-2`` and ``noise`` at ``dim=-1``, ``x`` has shape ``(R, 1, *event)`` and the
    sites have batch shape ``(R, K)``. All ``R * K`` draws go to the teacher in one call.

    Args:
        name: the term's name; the sites are ``{name}.t``, ``{name}.eps`` and ``{name}``.
        objective: a [`TeacherObjective`][carv_pyro.objectives.TeacherObjective] (e.g. ``SDS``).
        x: ``(*outer_batch, *event)`` upstream samples, differentiable w.r.t. the parameters.
        cond: teacher conditioning (e.g. a digit label or prompt embeddings), broadcast
            against the draws.
        infer: extra ``infer`` entries for the term's site (for guides or handlers).

    Returns:
        ``(*batch, *event)`` weighted residuals (detached) for residual objectives, else ``None``.

    Raises:
        ValueError: if ``x``'s trailing shape is not the teacher's event shape, or its batch
            shape does not broadcast with the enclosing plates.
    """
    if not isinstance(objective, TeacherObjective):
        raise TypeError(
            f"objective must be a TeacherObjective (e.g. carv_pyro.objectives.SDS), "
            f"got {type(objective).__name__}"
        )
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    event_shape = objective.event_shape
    event_ndim = len(event_shape)
    if x.dim() < event_ndim or tuple(x.shape[x.dim() - event_ndim :]) != tuple(event_shape):
        raise ValueError(
            f"teacher_term {name!r}: x must end with the teacher's event shape "
            f"{tuple(event_shape)}, got x.shape = {tuple(x.shape)}"
        )
    outer_shape = x.shape[: x.dim() - event_ndim]

    prior_probs = to_device(objective.prior.probs(), x.device)
    t = pyro.sample(
        f"{name}.t",
        # our own draws are valid by construction: skip torch's argument validation (hot path)
        dist.Categorical(probs=prior_probs, validate_args=False),
        infer={ROLE_KEY: "timestep", "carv_outer_shape": outer_shape, "carv_objective": objective},
    )
    batch_shape = t.shape
    try:
        full = torch.broadcast_shapes(batch_shape, outer_shape)
    except RuntimeError:
        full = None
    if full != batch_shape:
        raise ValueError(
            f"teacher_term {name!r}: x has batch shape {tuple(outer_shape)} (x.shape = "
            f"{tuple(x.shape)}), which does not broadcast with the enclosing plates "
            f"[{_plate_summary()}] whose batch shape is {tuple(batch_shape)}. Align x's batch "
            f"dims to the right with the plates and give it size 1 along the inner plates, "
            f"e.g. x.shape = {tuple(batch_shape[:-1]) + (1,) + tuple(event_shape)}."
        )
    zeros = torch.zeros(event_shape, dtype=x.dtype, device=x.device)
    eps = pyro.sample(
        f"{name}.eps",
        dist.Normal(zeros, zeros.new_ones(()), validate_args=False).to_event(event_ndim),
        infer={ROLE_KEY: "noise", "carv_outer_shape": outer_shape},
    )
    if eps.shape != batch_shape + event_shape:
        raise ValueError(
            f"teacher_term {name!r}: noise site has shape {tuple(eps.shape)}, expected "
            f"{tuple(batch_shape + event_shape)}"
        )

    x_flat, packed = flatten_draws(x.expand(batch_shape + event_shape), event_ndim)
    eps_flat, _ = flatten_draws(eps, event_ndim)
    t_flat = t.reshape(-1)
    cond_flat = _broadcast_cond(objective, cond, batch_shape, x.device)
    watch = Stopwatch(x.device)
    out = objective.evaluate(x_flat, t_flat, eps_flat, cond_flat)
    watch.stop()

    value = out.value.reshape(batch_shape)
    surrogate = out.surrogate.reshape(batch_shape)
    residual = None
    if out.residual is not None:
        residual = unflatten_draws(out.residual, packed, event_ndim)
    record = TermRecord(
        name=name,
        objective=objective,
        batch_shape=batch_shape,
        outer_shape=outer_shape,
        t=t,
        value=value,
        surrogate=surrogate,
        residual=residual,
        nonfinite=out.nonfinite.reshape(batch_shape),
        teacher_time=watch,
    )
    log_factor = -(value + surrogate - surrogate.detach())
    site_infer = {TERM_KEY: record}
    site_infer.update(infer or {})
    pyro.sample(
        name,
        dist.Unit(log_factor, has_rsample=True, validate_args=False),
        obs=log_factor.new_empty(batch_shape + (0,)),
        infer=site_infer,
    )
    return residual


def _broadcast_cond(
    objective: TeacherObjective, cond: Any, batch_shape: torch.Size, device: torch.device
) -> Tensor | None:
    """Encode ``cond`` and broadcast it to ``(N, *cond_event)`` over the draws."""
    if cond is None:
        return None
    teacher = objective.teacher
    cond_event = teacher.cond_event_shape
    if cond_event is None:
        raise ValueError("cond was given but the teacher is unconditional (cond_event_shape None)")
    c = teacher.encode_cond(cond)
    if not isinstance(c, Tensor):
        c = torch.as_tensor(c)
    c = c.to(device)
    ndim = len(cond_event)
    cond_batch = c.shape[: c.dim() - ndim]
    try:
        full = torch.broadcast_shapes(batch_shape, cond_batch)
    except RuntimeError:
        full = None
    item_shape = tuple(c.shape[c.dim() - ndim :])
    item_ok = len(item_shape) == ndim and all(
        e < 0 or s == e for s, e in zip(item_shape, cond_event)
    )
    if full != batch_shape or not item_ok:
        raise ValueError(
            f"cond of shape {tuple(c.shape)} does not broadcast to the draws' batch shape "
            f"{tuple(batch_shape)} with per-draw conditioning shape {tuple(cond_event)}"
        )
    c = c.expand(batch_shape + item_shape)
    return c.reshape((-1,) + item_shape)
