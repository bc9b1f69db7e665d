"""The Pyro primitives of a teacher objective: `teacher_term` and the reserved inner plate `draws`.

Inside the model's plates, ``teacher_term`` samples the timestep and noise sites of one teacher
expectation, evaluates all draws in one batched teacher call, and records the per-draw surrogate
as an observed site that [`CARVLoss`][carv_pyro.CARVLoss] turns into an importance-weighted,
plate-averaged gradient estimate.

Sites it creates, for ``name="sds"`` inside plates of sizes ``(R, K)`` at dims ``(-2, -1)``:

| site | shape | meaning |
| --- | --- | --- |
| ``sds.t`` | ``(R, K)`` | timesteps, ``Categorical(p)`` under the prior |
| ``sds.eps`` | ``(R, K, *event)`` | noise, ``Normal(0, I)`` |
| ``sds`` | ``(R, K)`` | the term itself (observed; it carries the `TermRecord`) |

The inner plate, the ``K`` cheap draws that share one upstream sample, is best written as
``carv_pyro.draws(K)``: an ordinary ``pyro.plate`` that an [`Estimator`][carv_pyro.Estimator]
or an [`Accountant`][carv_pyro.accounting.Accountant] may resize. A plain ``pyro.plate`` works
too (see [`carv_pyro.layout`][carv_pyro.layout] for how the inner plate is found).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import _PYRO_STACK, _inspect
from pyro.poutine.subsample_messenger import _Subsample
from torch import Tensor

from .. import _checks
from ..layout import DRAWS_KEY, TermLayout
from ..objectives import TeacherObjective
from ..timing import Stopwatch

__all__ = [
    "DrawsPlate",
    "DrawsSizer",
    "LAYOUT_KEY",
    "NonEmptyPlates",
    "OBJECTIVE_KEY",
    "ROLE_KEY",
    "TERM_KEY",
    "TermRecord",
    "draws",
    "teacher_term",
]

#: ``infer`` key marking the timestep and noise sites of a teacher term, with their role.
ROLE_KEY = "carv_role"
#: ``infer`` key holding the `TermRecord` on a term's own site.
TERM_KEY = "carv_term"
#: ``infer`` key holding the term's [`TermLayout`][carv_pyro.layout.TermLayout] on its sites.
LAYOUT_KEY = "carv_layout"
#: ``infer`` key holding the term's objective on its timestep site.
OBJECTIVE_KEY = "carv_objective"


# -- the reserved inner plate -----------------------------------------------------------------


class DrawsSizer(Messenger):
    """Sets the size of the reserved inner plates (`draws`) created while it is active.

    Estimators and accountants run the model under one of these; the model itself keeps declaring
    its default size.

    Args:
        size: the number of inner draws, or ``None`` to keep each plate's own size.
    """

    def __init__(self, size: int | None):
        super().__init__()
        self.size = None if size is None else _checks.positive_int("size", size)


class NonEmptyPlates(Messenger):
    """Refuses a plate with no members (size, ``subsample_size`` or ``subsample`` empty) as the
    model enters it, with a ``ValueError`` naming the plate.

    Pyro's own check (``ZeroDivisionError: size cannot be zero``) names no plate, and an empty
    outer plate (``R = 0`` upstream samples) or inner plate (``K = 0`` draws) would leave a
    teacher term nothing to average. Every ``pyro.plate`` announces itself with a subsample
    site before Pyro's check runs; that site is where this handler sees it, so the error comes
    before the teacher runs and before any gradient exists.
    """

    def _pyro_sample(self, msg) -> None:
        fn = msg["fn"]
        if not isinstance(fn, _Subsample):
            return
        name, size, sub, value = msg["name"], fn.size, fn.subsample_size, msg["value"]
        if size == 0:
            what = f"has size 0 (pyro.plate({name!r}, 0))"
        elif sub == 0:
            what = f"has subsample_size 0 (of size {size})"
        elif value is not None and len(value) == 0:
            what = f"has an empty subsample (of size {size})"
        else:
            return
        raise ValueError(
            f"plate {name!r} {what}: a plate must have at least one member; around a teacher "
            f"term that is R >= 1 upstream samples in each outer plate and K >= 1 draws in the "
            f"inner one"
        )


class _SizedNonEmptyPlates(DrawsSizer, NonEmptyPlates):
    """`DrawsSizer` and `NonEmptyPlates` as one handler: what a guide runs the model under.

    One handler on the stack instead of two: every message of a step passes each handler
    twice (process and postprocess), and this pair does nothing for most of them.
    """


class DrawsPlate(pyro.plate):
    """The reserved inner plate: a ``pyro.plate`` whose size an active `DrawsSizer` may set.

    Every site inside it is marked (``infer["carv_draws"]``, the innermost such plate's name),
    so the layout of a teacher term is read from the frames, never guessed from shapes.
    """

    def __init__(self, name: str, size: int, dim: int | None = None, **kwargs: Any):
        _checks.positive_int(f"draws({name!r}) size", size)
        for frame in reversed(_PYRO_STACK):
            if isinstance(frame, DrawsSizer):
                if frame.size is not None:
                    size = frame.size
                break
        super().__init__(name, size, dim=dim, **kwargs)

    def _process_message(self, msg) -> None:
        super()._process_message(msg)
        infer = msg.get("infer")
        if infer is not None:
            infer.setdefault(DRAWS_KEY, self.name)


def draws(size: int, name: str = "draws", *, dim: int | None = None) -> DrawsPlate:
    """The reserved inner plate of ``size`` cheap ``(t, eps)`` draws per upstream sample.

    Use it like ``pyro.plate`` around [`teacher_term`][carv_pyro.teacher_term]:

    ```python
    with pyro.plate("views", R, dim=-2):
        x = render(...)                       # once per view
        with carv.draws(K):                   # K teacher draws per view
            carv.teacher_term("sds", sds, x)
    ```

    An [`Estimator`][carv_pyro.Estimator] with ``K`` set, or an adapting
    [`Accountant`][carv_pyro.accounting.Accountant], sets the size actually used.

    Args:
        size: the model's default number of inner draws.
        name: the plate's name (give distinct names to the inner plates of different terms).
        dim: the plate's dim, as for ``pyro.plate`` (default: allocated).

    Returns:
        A `DrawsPlate` context manager.
    """
    return DrawsPlate(name, size, dim=dim)


# -- the teacher term -------------------------------------------------------------------------


@dataclass
class TermRecord:
    """What a teacher term leaves in the trace for the loss and the accountant.

    Attributes:
        name: the term's site name.
        objective: its objective.
        layout: where its draws sit (batch shape, inner plate).
        t: ``batch_shape`` timesteps.
        value: ``batch_shape`` reported per-draw losses.
        surrogate: ``batch_shape`` differentiable per-draw surrogates.
        residual: ``(*batch_shape, *event)`` weighted residuals (detached) or ``None``.
        nonfinite: ``batch_shape`` bool, draws whose value or residual was NaN/Inf (zeroed).
        teacher_time: a stopped [`Stopwatch`][carv_pyro.timing.Stopwatch] around the teacher call.
    """

    name: str
    objective: TeacherObjective
    layout: TermLayout
    t: Tensor
    value: Tensor
    surrogate: Tensor
    residual: Tensor | None
    nonfinite: Tensor
    teacher_time: Stopwatch | None = None

    @property
    def batch_shape(self) -> torch.Size:
        """The draws' batch shape, e.g. ``(R, K)``."""
        return self.layout.batch_shape

    @property
    def n_inner(self) -> int:
        """Inner draws per upstream sample (``K`` in the usual layout)."""
        return self.layout.n_inner

    @property
    def n_outer(self) -> int:
        """Upstream samples (``R`` in the usual layout)."""
        return self.layout.n_outer


def _check_site_value(name: str, value: Tensor, layout: TermLayout, event_shape: tuple) -> None:
    want = tuple(layout.batch_shape) + tuple(event_shape)
    if tuple(value.shape) != want:
        raise ValueError(
            f"site {name!r} has shape {tuple(value.shape)}, expected {want} (the draws' batch "
            f"shape {tuple(layout.batch_shape)}); a value given by poutine.condition or a guide "
            f"must cover every draw"
        )


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
    enclosing plates and are 1 along the inner (resampling) plate. For the usual layout
    ``views`` at ``dim=-2`` and ``draws`` at ``dim=-1``, ``x`` has shape ``(R, 1, *event)`` and the
    sites have batch shape ``(R, K)``. All ``R * K`` draws go to the teacher in one call.

    Args:
        name: the term's name; the sites are ``{name}.t``, ``{name}.eps`` and ``{name}``.
        objective: a [`TeacherObjective`][carv_pyro.objectives.TeacherObjective] (e.g. ``SDS``).
        x: ``(*outer_batch, *event)`` floating-point upstream samples, differentiable w.r.t. the
            parameters.
        cond: teacher conditioning (e.g. a class label or prompt embeddings), broadcast against
            the draws.
        infer: extra ``infer`` entries for the term's site (for guides or handlers).

    Returns:
        ``(*batch, *event)`` weighted residuals (detached) for residual objectives, else ``None``.

    Raises:
        TypeError: if ``objective`` is not a teacher objective or ``x`` not a floating tensor.
        ValueError: if ``x``'s trailing shape is not the teacher's event shape, or its batch
            shape does not broadcast with the enclosing plates.
    """
    _checks.instance("name", name, str, "a string")
    _checks.instance(
        "objective", objective, TeacherObjective, "a TeacherObjective (e.g. carv_pyro.SDS)"
    )
    _checks.instance("x", x, Tensor, "a torch.Tensor")
    if not x.dtype.is_floating_point:
        raise TypeError(
            f"teacher_term {name!r}: x must be a floating-point tensor (the upstream output), got "
            f"dtype {x.dtype}; convert it with x.float()"
        )
    event_shape = tuple(objective.event_shape)
    event_ndim = len(event_shape)
    if x.dim() < event_ndim or tuple(x.shape[x.dim() - event_ndim :]) != event_shape:
        raise ValueError(
            f"teacher_term {name!r}: x must end with the teacher's event shape {event_shape}, "
            f"got x.shape = {tuple(x.shape)}"
        )
    outer_shape = x.shape[: x.dim() - event_ndim]
    here = _inspect()
    layout = TermLayout.from_frames(
        name, here["cond_indep_stack"], here["infer"].get(DRAWS_KEY), outer_shape
    )
    batch_shape = layout.batch_shape
    cache = _term_cache(objective)
    cond_flat = cache.cond(cond, batch_shape, x.device)

    t_prior, eps_prior = cache.priors(batch_shape, x.dtype, x.device)
    t = pyro.sample(
        f"{name}.t",
        t_prior,
        infer={ROLE_KEY: "timestep", OBJECTIVE_KEY: objective, LAYOUT_KEY: layout},
    )
    _check_site_value(f"{name}.t", t, layout, ())
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise TypeError(f"site {name + '.t'!r} must hold integer timesteps, got dtype {t.dtype}")
    eps = pyro.sample(f"{name}.eps", eps_prior, infer={ROLE_KEY: "noise", LAYOUT_KEY: layout})
    _check_site_value(f"{name}.eps", eps, layout, event_shape)

    # (*batch, *event) -> (N, *event): a plain reshape, the row order of every plate dim (what
    # einops' pack gives, without its per-call pattern parsing)
    flat_shape = (-1,) + event_shape
    x_flat = x.expand(batch_shape + event_shape).reshape(flat_shape)
    eps_flat = eps.to(x.dtype).reshape(flat_shape)
    watch = Stopwatch(x.device)
    out = objective.evaluate(x_flat, t.reshape(-1), eps_flat, cond_flat)
    watch.stop()

    value = out.value.reshape(batch_shape)
    surrogate = out.surrogate.reshape(batch_shape)
    residual = None
    if out.residual is not None:
        residual = out.residual.reshape(batch_shape + event_shape)
    record = TermRecord(
        name=name,
        objective=objective,
        layout=layout,
        t=t,
        value=value,
        surrogate=surrogate,
        residual=residual,
        nonfinite=out.nonfinite.reshape(batch_shape),
        teacher_time=watch,
    )
    log_factor = -(value + surrogate - surrogate.detach())
    site_infer = {TERM_KEY: record, LAYOUT_KEY: layout}
    site_infer.update(infer or {})
    pyro.sample(
        name,
        dist.Unit(log_factor, has_rsample=True, validate_args=False),
        obs=log_factor.new_empty(batch_shape + (0,)),
        infer=site_infer,
    )
    return residual


# -- per-objective work kept across steps --------------------------------------------------
#
# A training loop calls teacher_term with the same objective, shapes and conditioning every
# step. What depends on those alone (the timestep and noise priors at the draws' batch shape,
# the checked and broadcast conditioning) is built once and looked up after; every key holds
# all it depends on, so a changed shape, dtype, device, prior, teacher or conditioning tensor
# (in-place changes included: tensors carry a version counter) builds afresh. Caches hang off
# the objective through a weak mapping: they die with it and never enter its pickle.

_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

#: entries per cache before the oldest is dropped (a model has a few terms per objective)
_CACHE_SIZE = 8


class _TermCache:
    """`teacher_term`'s per-shape work for one objective (see the comment above)."""

    def __init__(self, objective: TeacherObjective):
        self._objective = weakref.ref(objective)
        self._priors: dict[tuple, tuple[Tensor, int, Any, Any]] = {}
        self._conds: dict[tuple, tuple[Any, Any, int, Tensor, int]] = {}

    def priors(self, batch_shape: torch.Size, dtype: torch.dtype, device: torch.device):
        """``(t_prior, eps_prior)`` at ``batch_shape``: the objective's ``p(t)`` as a
        ``Categorical`` and ``N(0, I)`` over the event, both unvalidated (ours by construction)."""
        objective = self._objective()
        # p(t) is the same when its table is the same tensor at the same version (Categorical
        # normalizes a copy, so an in-place change would otherwise go unseen)
        probs = objective.prior.probs_on(device)
        event_shape = tuple(objective.event_shape)
        key = (batch_shape, event_shape, dtype, device)
        hit = self._priors.get(key)
        if hit is not None and hit[0] is probs and hit[1] == probs._version:
            return hit[2], hit[3]
        t_prior = dist.Categorical(probs=probs, validate_args=False).expand(batch_shape)
        zeros = torch.zeros(event_shape, dtype=dtype, device=device)
        eps_prior = (
            dist.Normal(zeros, zeros.new_ones(()), validate_args=False)
            .to_event(len(event_shape))
            .expand(batch_shape)
        )
        _put(self._priors, key, (probs, probs._version, t_prior, eps_prior))
        return t_prior, eps_prior

    def cond(self, cond: Any, batch_shape: torch.Size, device: torch.device) -> Tensor | None:
        """`_broadcast_cond`'s result, cached for integer labels and for tensors that need no
        gradient (a tensor entry holds it weakly, with its version: an in-place change or a
        new tensor of the same id builds afresh)."""
        objective = self._objective()
        if cond is None:
            return None
        if isinstance(cond, Tensor):
            if cond.requires_grad:  # a learned embedding: its graph is new every step
                return _broadcast_cond(objective, cond, batch_shape, device)
            key = ("tensor", id(cond), batch_shape, device)
            ident: Any = weakref.ref(cond)
            version = cond._version
        elif type(cond) is int:  # not bool, not a numpy integer: those go the long way
            key = ("int", cond, batch_shape, device)
            ident, version = None, 0
        else:
            return _broadcast_cond(objective, cond, batch_shape, device)
        teacher = objective.teacher
        hit = self._conds.get(key)
        if (
            hit is not None
            and hit[0] is teacher
            and (ident is None or hit[1]() is cond)
            and hit[2] == version
            and hit[3]._version == hit[4]  # nobody wrote into the cached tensor
        ):
            return hit[3]
        out = _broadcast_cond(objective, cond, batch_shape, device)
        _put(self._conds, key, (teacher, ident, version, out, out._version))
        return out


def _put(cache: dict, key: tuple, value: tuple) -> None:
    if key not in cache and len(cache) >= _CACHE_SIZE:
        del cache[next(iter(cache))]
    cache[key] = value


def _term_cache(objective: TeacherObjective) -> _TermCache:
    cache = _CACHES.get(objective)
    if cache is None:
        cache = _CACHES[objective] = _TermCache(objective)
    return cache


def _broadcast_shape(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...] | None:
    """NumPy broadcasting of two shapes, ``None`` if they do not broadcast (in Python:
    ``torch.broadcast_shapes`` costs tens of microseconds a call)."""
    n = max(len(a), len(b))
    a = (1,) * (n - len(a)) + tuple(a)
    b = (1,) * (n - len(b)) + tuple(b)
    out = []
    for x, y in zip(a, b):
        if x != y and x != 1 and y != 1:
            return None
        out.append(y if x == 1 else x)
    return tuple(out)


def _broadcast_cond(
    objective: TeacherObjective, cond: Any, batch_shape: torch.Size, device: torch.device
) -> Tensor | None:
    """Check and encode ``cond``, then broadcast it to ``(N, *cond_event)`` over the draws.

    Checked before any draw is made, each failure naming ``cond``, what it got and what the
    teacher takes (its [`describe_cond`][carv_pyro.teachers.AbstractTeacher.describe_cond]):

    - a ``bool`` (or a bool tensor) is refused: ``True`` is not class 1 to a user;
    - everything else goes through the teacher's
      [`encode_cond`][carv_pyro.teachers.AbstractTeacher.encode_cond], which reads or refuses
      what is the teacher's business (a string: a prompt, refused by a class-label teacher
      without ``parse_prompt``, read by a pipeline teacher's text encoder);
    - for a class-label teacher (``cond_event_shape == ()``) the labels must be integers within
      its [`label_range`][carv_pyro.teachers.AbstractTeacher.label_range]; an out-of-range
      error names the labels given.

    Raises:
        TypeError: on a bool, text the teacher cannot read, or non-integer class labels.
        ValueError: on conditioning for an unconditional teacher, labels out of range, or a
            shape that does not broadcast with the draws.
    """
    if cond is None:
        return None
    teacher = objective.teacher
    cond_event = teacher.cond_event_shape
    if cond_event is None:
        raise ValueError(
            f"cond was given ({cond!r:.80}) but the teacher {type(teacher).__name__} is "
            f"unconditional (cond_event_shape None): pass cond=None"
        )
    if isinstance(cond, bool) or (isinstance(cond, Tensor) and cond.dtype == torch.bool):
        raise TypeError(f"cond must not be a bool (got {cond!r:.80}): {teacher.describe_cond()}")
    c = teacher.encode_cond(cond)
    if not isinstance(c, Tensor):
        c = torch.as_tensor(c)
    if c.dtype == torch.bool:
        raise TypeError(f"cond must not be a bool tensor: {teacher.describe_cond()}")
    if len(cond_event) == 0:
        _check_labels(teacher, c)
    c = c.to(device)
    ndim = len(cond_event)
    cond_batch = c.shape[: c.dim() - ndim]
    full = _broadcast_shape(tuple(batch_shape), tuple(cond_batch))
    item_shape = tuple(c.shape[c.dim() - ndim :])
    item_ok = len(item_shape) == ndim and all(
        e < 0 or s == e for s, e in zip(item_shape, cond_event)
    )
    if full != tuple(batch_shape) or not item_ok:
        raise ValueError(
            f"cond of shape {tuple(c.shape)} does not broadcast to the draws' batch shape "
            f"{tuple(batch_shape)} with per-draw conditioning shape {tuple(cond_event)}"
        )
    c = c.expand(batch_shape + item_shape)
    return c.reshape((-1,) + item_shape)


def _check_labels(teacher: Any, c: Tensor) -> None:
    """Integer class labels within the teacher's range (checked on the host only)."""
    if c.dtype.is_floating_point or c.dtype.is_complex:
        raise TypeError(
            f"cond must hold integer class labels, got dtype {c.dtype}: {teacher.describe_cond()}"
        )
    labels = teacher.label_range()
    if labels is None or c.numel() == 0 or c.device.type != "cpu":
        return
    low, high = labels
    bad = c[(c < low) | (c > high)]
    if bad.numel():
        given = int(c) if c.dim() == 0 else sorted(set(bad.reshape(-1).tolist()))[:5]
        raise ValueError(
            f"cond must hold class labels in [{low}, {high}] for {type(teacher).__name__}, got "
            f"{given!r}"
        )
