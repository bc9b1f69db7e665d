"""``CARVLoss``: the importance-weighted, plate-averaged gradient estimator, as a Pyro loss.

The loss is a pure function of one particle's traces (`particle_estimate`): teacher terms
contribute their per-draw surrogates, weighted by ``p / q`` of every proposed site that encloses
them and by Pyro's effects (``poutine.scale`` multiplies a term, ``poutine.mask`` zeroes masked
draws), averaged over the draws; observed sites contribute ``-log p`` as in ``Trace_ELBO``.
Learning parts hang off one observer (`LossObserver`, e.g. the
[`Accountant`][carv_pyro.accounting.Accountant]): the loss asks it the inner size of the step
and which backward to run, and tells it what the step measured (`StepReport`).
"""

from __future__ import annotations

import abc
import numbers
import warnings
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, runtime_checkable

import pyro
import torch
from pyro import poutine
from pyro.distributions import Delta
from pyro.infer.elbo import ELBO
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from .. import _checks
from .._deferred import take_ready
from ..layout import TermLayout, halves
from ..timing import Stopwatch, is_ready, seconds_of
from .guide import EXACT_KEY, TimestepGuide
from .primitives import ROLE_KEY, TERM_KEY, TermRecord

__all__ = [
    "NONFINITE",
    "CARVLoss",
    "DeviceLoss",
    "LossObserver",
    "NonFiniteTeacherError",
    "Particle",
    "StepReport",
    "TermDiagnostics",
    "contrast_backward",
    "contrast_weights",
    "log_weights",
    "particle_estimate",
]

NONFINITE = ("raise", "zero")

#: The plate that vectorized particles run in (Pyro's name for it).
PARTICLE_PLATE = "num_particles_vectorized"


class NonFiniteTeacherError(FloatingPointError):
    """A teacher term produced NaN or infinite values (raised before any gradient is formed)."""


# -- the observer protocol ------------------------------------------------------------------


@dataclass
class StepReport:
    """What one particle of a step measured, for the observer.

    The timings are stopped [`Stopwatch`][carv_pyro.timing.Stopwatch] objects (or plain
    seconds): on a GPU reading them waits for the device to finish the step, so an observer
    that must not synchronise keeps them and reads them once `ready` (as the
    [`Accountant`][carv_pyro.accounting.Accountant] does).

    Attributes:
        record: the observed term's record.
        step_time: the whole particle (forward, weights and backward): a stopped stopwatch or
            seconds.
        teacher_time: the teacher call inside it: a stopped stopwatch, seconds, or ``None``
            (not timed: zero seconds).
        contrasts: ``(2, P)`` float64, the outer and the inner contrast of the term's per-draw
            gradients (`contrast_backward`), or ``None`` when the step ran the plain backward.
        contrast_sizes: ``((|a_1|, |a_2|), (|b_1|, |b_2|))``, the halves of ``contrasts``.
    """

    record: TermRecord
    step_time: Stopwatch | float
    teacher_time: Stopwatch | float | None
    contrasts: Tensor | None = None
    contrast_sizes: tuple[tuple[int, int], tuple[int, int]] | None = None

    @property
    def step_seconds(self) -> float:
        """Seconds of the whole particle (on a GPU: waits for the device unless `ready`)."""
        return seconds_of(self.step_time)

    @property
    def teacher_seconds(self) -> float:
        """Seconds of the teacher call (on a GPU: waits for the device unless `ready`)."""
        return seconds_of(self.teacher_time)

    def ready(self) -> bool:
        """Whether the timings can be read without waiting for the device."""
        return is_ready(self.step_time) and is_ready(self.teacher_time)


@runtime_checkable
class LossObserver(Protocol):
    """What [`CARVLoss`][carv_pyro.CARVLoss] asks of an observer (e.g. an
    [`Accountant`][carv_pyro.accounting.Accountant]), in the order it asks within a step.

    1. ``inner_size()``: the size of the reserved inner plates for this step (``None``: the
       guide's ``K`` or the model's own).
    2. ``select(records)``: the record of the term it observes (``None``: none this step).
    3. ``wants_components()``: whether this step runs the measuring backward, which also yields
       per-step estimates of the variance components (three vector-Jacobian products instead
       of one, the same accumulated gradient: `contrast_backward`).
    4. ``observe(report)``: the step's `StepReport`, once per particle.
    5. ``end_step()``: after the last particle of a step that ran a backward.
    """

    def inner_size(self) -> int | None: ...

    def select(self, records: list[TermRecord]) -> TermRecord | None: ...

    def wants_components(self) -> bool: ...

    def observe(self, report: StepReport) -> None: ...

    def end_step(self) -> None: ...


# -- the particle ---------------------------------------------------------------------------


@dataclass
class TermDiagnostics:
    """Diagnostics of one teacher term in the last step.

    Attributes:
        name: the term's site name.
        batch_shape: the draws' batch shape, e.g. ``(R, K)``.
        ess: effective sample size ``(sum w)^2 / sum w^2`` of the importance weights.
        max_weight: the largest importance weight.
        min_weight: the smallest importance weight.
        mean_weight: the average weight (about 1 under a valid proposal).
        n_nonfinite: draws with NaN/Inf teacher output (dropped under ``nonfinite="zero"``).
        value: the term's importance-weighted mean value.
    """

    name: str
    batch_shape: tuple[int, ...]
    ess: float
    max_weight: float
    min_weight: float
    mean_weight: float
    n_nonfinite: int
    value: float


@dataclass
class Particle:
    """One particle's estimate.

    Attributes:
        loss: the reported value (detached): observed sites' ``-log p`` plus every term's
            weighted mean value.
        surrogate: the differentiable surrogate whose gradient is the estimate.
        records: the teacher terms' records, in trace order.
        weights: per term, the ``batch_shape`` float64 importance weights.
        per_draw: per term, the ``batch_shape`` weighted, scaled and masked per-draw surrogates
            (their sum over draws divided by the number of draws is the term's surrogate).
    """

    loss: Tensor
    surrogate: Tensor
    records: list[TermRecord] = field(default_factory=list)
    weights: dict[str, Tensor] = field(default_factory=dict)
    per_draw: dict[str, Tensor] = field(default_factory=dict)
    deferred_nonfinite: dict[str, tuple[Tensor, int]] = field(default_factory=dict)


def _host_value(value: Tensor) -> Tensor:
    """A detached float64 value, on the host where host checks run, else left on its device
    (reading it back would synchronise: `DeviceLoss` reads it when it is used)."""
    value = value.detach().to(torch.float64)
    return value.cpu() if _checks.host_checks(value.device) else value


def _plate_names(frames) -> set[tuple[str, int | None]]:
    return {(f.name, f.dim) for f in frames if f.vectorized}


def _factorizing_plates(model_trace, guide_trace, upstream: list[str]) -> set[tuple[str, int]]:
    """Plates along which the upstream guide's importance weight factorizes over the indices.

    The weight of index ``i`` of a plate may use only the sites inside the plate at ``i`` (and
    the global ones) when the guide's density factorizes like the model's. It does not when a
    guide site outside the plate carries the density of model sites inside it: a site the model
    has inside the plate but the guide samples outside it (jointly, with ``to_event``), or an
    auxiliary site outside the plate while the guide proposes model sites inside it
    (``AutoDiagonalNormal``'s joint latent). Along such a plate the weight is the joint one.
    """
    plates: set[tuple[str, int]] = set()
    for name in upstream:
        plates |= _plate_names(guide_trace.nodes[name]["cond_indep_stack"])
        if name in model_trace.nodes:
            plates |= _plate_names(model_trace.nodes[name]["cond_indep_stack"])
    proposed_inside: dict[tuple[str, int], bool] = {}
    for plate in plates:
        proposed_inside[plate] = any(
            name in model_trace.nodes
            and not model_trace.nodes[name]["is_observed"]
            and plate in _plate_names(model_trace.nodes[name]["cond_indep_stack"])
            for name in upstream
        )
    ok = set()
    for plate in plates:
        coupled = False
        for name in upstream:
            if plate in _plate_names(guide_trace.nodes[name]["cond_indep_stack"]):
                continue
            msite = model_trace.nodes.get(name)
            if msite is not None and not msite["is_observed"]:
                coupled = plate in _plate_names(msite["cond_indep_stack"])
            else:  # an auxiliary site
                coupled = proposed_inside[plate]
            if coupled:
                break
        if not coupled:
            ok.add(plate)
    return ok


def _reduce_to(
    lp: Tensor, frames, layout: TermLayout, keep: set[tuple[str, int]], name: str, term: str
) -> Tensor:
    """Sum ``lp`` over every dim that is not a factorizing plate enclosing the term, then shape
    it to broadcast against the term's batch shape."""
    term_plates = {(f.name, f.dim) for f in layout.plates}
    by_dim = {f.dim: f for f in frames if f.vectorized}
    lp = lp.to(torch.float64)
    sum_dims = []
    for d in range(-lp.dim(), 0):
        f = by_dim.get(d)
        kept = f is not None and (f.name, f.dim) in term_plates and (f.name, f.dim) in keep
        if not kept and lp.shape[d] != 1:
            sum_dims.append(d)
    if sum_dims:
        lp = lp.sum(sum_dims, keepdim=True)
    n = len(layout.batch_shape)
    while lp.dim() > n:
        lp = lp.squeeze(0)
    try:
        return lp.expand(layout.batch_shape) if lp.dim() else lp
    except RuntimeError:
        raise ValueError(
            f"site {name!r} has batch shape {tuple(lp.shape)}, which does not line up with the "
            f"plates of teacher term {term!r} (batch shape {tuple(layout.batch_shape)}); its "
            f"importance weight cannot be applied"
        ) from None


def _weighted_sites(guide_trace) -> list[str]:
    """The guide's sites that carry an importance weight: every sampled one except those whose
    draw has exactly the prior's marginal."""
    weighted = []
    for name, gsite in guide_trace.nodes.items():
        if gsite["type"] != "sample" or gsite["is_observed"] or site_is_subsample(gsite):
            continue
        if gsite["infer"].get(EXACT_KEY):
            continue
        weighted.append(name)
    return weighted


def log_weights(
    records: list[TermRecord], model_trace, guide_trace, weighted: list[str] | None = None
) -> dict[str, Tensor]:
    """``log p - log q`` of every proposed site, reduced to each term's draws.

    Every guide site enters (auxiliary sites included) except those whose draw has exactly the
    prior's marginal (teacher designs under the prior, prior-drawn latents). A site's log-density
    is kept per index along the plates that enclose the term and along which the weight
    factorizes, and summed over every other dim (the joint weight): unbiased in every case.

    Args:
        records: the particle's term records.
        model_trace: the model's trace.
        guide_trace: the guide's trace.
        weighted: the guide's weighted sites, if the caller has found them already.

    Returns:
        ``{term: batch_shape float64 log-weights}``.

    Raises:
        ValueError: if a proposed site's prior depends on parameters (its score-function term
            would be dropped), or a site's shape does not line up with a term's plates.
    """
    if weighted is None:
        weighted = _weighted_sites(guide_trace)
    out = {r.name: torch.zeros((), dtype=torch.float64, device=r.t.device) for r in records}
    if not weighted:
        return {r.name: w.expand(r.batch_shape) for r, w in zip(records, out.values())}
    upstream = [n for n in weighted if guide_trace.nodes[n]["infer"].get(ROLE_KEY) is None]
    if upstream and all(
        isinstance(getattr(guide_trace.nodes[n]["fn"], "base", guide_trace.nodes[n]["fn"]), Delta)
        for n in upstream
    ):
        raise ValueError(
            f"the guide proposes the upstream sites {upstream} by point masses only (Delta "
            f"sites, as AutoDelta does): a point mass has no density against the prior, so it "
            f"cannot be an importance proposal and the gradient would be biased. Leave these "
            f"sites to their prior (no upstream guide), or use a guide with a density such as "
            f"AutoNormal"
        )
    # The teacher sites' designs are per-draw marginals, independent of everything else: their
    # weights are kept per draw. The upstream guide's factorize only where its density does.
    keep_upstream = _factorizing_plates(model_trace, guide_trace, upstream)
    pieces = []
    for name in weighted:
        gsite = guide_trace.nodes[name]
        with torch.no_grad():
            lq = gsite["fn"].log_prob(gsite["value"])
        keep = None if gsite["infer"].get(ROLE_KEY) is not None else keep_upstream
        pieces.append((name, -lq, gsite["cond_indep_stack"], keep))
        msite = model_trace.nodes.get(name)
        if msite is not None and not msite["is_observed"]:
            lp = msite["fn"].log_prob(msite["value"])
            if lp.requires_grad:
                raise ValueError(
                    f"latent site {name!r} is proposed by the guide but its prior depends on "
                    f"parameters: the importance weight p/q would then depend on them, and "
                    f"CARVLoss has no score-function term for it. Draw the site from its prior "
                    f"(leave it out of the guide) or move the dependence into the upstream "
                    f"computation"
                )
            pieces.append((name, lp, msite["cond_indep_stack"], keep))
    for record in records:
        total = out[record.name]
        term_plates = {(f.name, f.dim) for f in record.layout.plates}
        for name, lp, frames, keep in pieces:
            total = total + _reduce_to(
                lp.to(record.t.device),
                frames,
                record.layout,
                term_plates if keep is None else keep,
                name,
                record.name,
            )
        out[record.name] = total.expand(record.batch_shape)
    return out


def _user_scale(site) -> Tensor | float:
    """The site's scale without the plates' subsampling factors (a term is a plate average)."""
    scale = site["scale"]
    for f in site["cond_indep_stack"]:
        if f.full_size is not None and f.size and f.full_size != f.size:
            scale = scale * (f.size / f.full_size)
    return scale


def _check_prior_site(name: str, site) -> None:
    """A latent site drawn from its prior must not depend on parameters except by rsample."""
    fn = site["fn"]
    if getattr(fn, "has_rsample", False):
        return
    with torch.enable_grad():
        lp = fn.log_prob(site["value"])
    if lp.requires_grad:
        raise ValueError(
            f"latent site {name!r} is not reparameterizable but its distribution depends on "
            f"parameters; CARVLoss has no score-function term for it, so its gradient would be "
            f"silently dropped. Make it reparameterizable, or move the dependence into the "
            f"upstream computation"
        )


def particle_estimate(model_trace, guide_trace, nonfinite: str = "raise") -> Particle:
    """One particle's loss and surrogate from its traces (a pure function).

    Args:
        model_trace: the model's trace (run under a [`TimestepGuide`][carv_pyro.TimestepGuide]).
        guide_trace: the guide's trace.
        nonfinite: ``"raise"`` or ``"zero"`` (see [`CARVLoss`][carv_pyro.CARVLoss]).

    Returns:
        A `Particle`.

    Raises:
        NonFiniteTeacherError: under ``nonfinite="raise"``, if an unmasked draw is NaN/Inf.
        ValueError: on compositions the estimator cannot support (see `log_weights`).
    """
    records: list[TermRecord] = []
    term_sites = {}
    # the loss is a Python zero until a term adds to it (one tensor op fewer per step); the
    # surrogate starts as a float32 zero as it always has, which sets its dtype's floor
    loss: Tensor | float = 0.0
    surrogate = torch.zeros(())
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        infer = site["infer"]
        if TERM_KEY in infer:
            records.append(infer[TERM_KEY])
            term_sites[infer[TERM_KEY].name] = site
        elif infer.get(ROLE_KEY) is not None:
            continue  # a teacher site (a conditioned one is a fixed design: no -log p)
        elif site["is_observed"]:
            lp = site["fn"].log_prob(site["value"])
            scale, mask = site["scale"], site["mask"]
            if mask is not None and mask is not True:
                lp = torch.where(torch.as_tensor(mask, device=lp.device), lp, lp.new_zeros(()))
            term = -(lp * scale).sum()
            for f in site["cond_indep_stack"]:
                if f.name == PARTICLE_PLATE:
                    # vectorized particles: the sum runs over all of them, and the estimate is
                    # their average (as in Pyro's vectorized ELBOs; teacher terms average over
                    # this plate already); without this an observed site counted num_particles
                    # times, in the loss and its gradient
                    term = term / f.size
            loss = loss + _host_value(term)
            surrogate = surrogate + term
        elif guide_trace.nodes.get(name, {}).get("infer", {}).get(EXACT_KEY):
            _check_prior_site(name, site)

    # Without a weighted site every weight is exactly one: skip forming and multiplying by them
    # (multiplying by one is exact, so the estimate is bit for bit the same).
    weighted = _weighted_sites(guide_trace)
    all_log_w = log_weights(records, model_trace, guide_trace, weighted) if weighted else None
    weights: dict[str, Tensor] = {}
    per_draws: dict[str, Tensor] = {}
    deferred: dict[str, tuple[Tensor, int]] = {}
    for record in records:
        site = term_sites[record.name]
        scale = _user_scale(site)
        mask = site["mask"]
        bad = record.nonfinite
        plain = all_log_w is None and mask is None and isinstance(scale, float) and scale == 1.0
        if all_log_w is None:
            w = torch.ones((), dtype=torch.float64, device=record.t.device).expand(
                record.batch_shape
            )
        else:
            w = all_log_w[record.name].exp()
        if mask is not None and mask is not True:
            mask = torch.as_tensor(mask, device=w.device).expand(record.batch_shape)
            w = torch.where(mask, w, w.new_zeros(()))
            bad = bad & mask
        elif mask is False:
            w = torch.zeros_like(w)
            bad = torch.zeros_like(bad)
        if nonfinite == "raise" and not _checks.host_checks(bad.device):
            # no host read inside the step: CARVLoss reads the count when the device is done
            deferred[record.name] = (bad.sum(), bad.numel())
        elif nonfinite == "raise":
            if bad.any():
                bad_t = record.t[bad]
                raise NonFiniteTeacherError(
                    f"teacher term {record.name!r} produced NaN/Inf at {int(bad.sum())} of "
                    f"{bad.numel()} draws (timesteps {bad_t[:10].tolist()}); check the teacher's "
                    f"weights and the upstream x fed to it, or pass CARVLoss(nonfinite='zero') "
                    f"to drop such draws"
                )
        else:
            w = torch.where(record.nonfinite, w.new_zeros(()), w)
            plain = False
        n = record.layout.n_draws
        if plain:  # w = 1, scale 1, no mask: w * s is s
            per_draw = record.surrogate
            value = record.value.sum() / n
        else:
            wt = (w * scale) if not isinstance(scale, Tensor) else w * scale.to(w)
            per_draw = wt.to(record.surrogate.dtype) * record.surrogate
            value = (wt.to(record.value.dtype) * record.value).sum() / n
        per_draws[record.name] = per_draw
        weights[record.name] = w
        surrogate = surrogate + per_draw.sum() / n
        loss = loss + _host_value(value)
    if not isinstance(loss, Tensor):
        loss = torch.zeros((), dtype=torch.float64)
    return Particle(
        loss=loss,
        surrogate=surrogate,
        records=records,
        weights=weights,
        per_draw=per_draws,
        deferred_nonfinite=deferred,
    )


def _leaves_of(*outputs: Tensor) -> list[Tensor]:
    """The leaf tensors that ``outputs``' graph accumulates gradients into: the ones a plain
    ``backward()`` of them fills (Pyro params' unconstrained tensors, and any other tensor the
    model uses with ``requires_grad``, e.g. a module's weights not registered by
    ``pyro.module``), in a fixed order.

    The measuring step's contrast backward must fill the same ``.grad``s as a plain step: taking
    only the traces' Pyro params left every other leaf without its gradient on measuring steps,
    silently (an optimizer over those leaves then skipped or zeroed those steps)."""
    leaves: dict[int, Tensor] = {}
    seen: set = set()
    stack = [o.grad_fn for o in outputs if o is not None and o.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)  # an AccumulateGrad node: its leaf
        if variable is not None:
            leaves.setdefault(id(variable), variable)
        stack.extend(nxt for nxt, _ in fn.next_functions if nxt is not None)
    return list(leaves.values())


#: Devices on which the measuring step takes its gradients in one batched backward pass. Measured
#: on the text-to-3D step (`examples/measuring_step.py`, `benchmarks/measuring_step.md`): on an
#: H200 the batched pass costs 1.13-1.18x a plain step against 1.38-1.49x for one pass each; on a
#: 2-core CPU, where the work is FLOP-bound and vmap adds its own, 2.3-2.5x against 1.9x.
BATCHED_BACKWARD_DEVICES: frozenset[str] = frozenset({"cuda"})


def contrast_weights(
    n_outer: int, n_inner: int
) -> tuple[Tensor | None, Tensor | None, tuple[tuple[int, int], tuple[int, int]]]:
    """The cotangents of the measuring step's two contrasts, and the halves' sizes.

    The upstream samples are split into two contiguous halves ``a_1, a_2`` and the inner draws
    into two interleaved halves ``b_1, b_2``. The outer contrast is the difference of the two
    upstream halves' mean gradients, the inner contrast the mean over the upstream samples of
    the difference of each one's two inner halves' means (see
    [`anova_estimates`][carv_pyro.accounting.anova_estimates]).

    Returns:
        ``(outer, inner, sizes)``: ``(n_outer, n_inner)`` weights on the per-draw gradients
        (``None`` where a half is empty: one upstream sample, one inner draw) and
        ``((|a_1|, |a_2|), (|b_1|, |b_2|))``.
    """
    a1, a2 = halves(n_outer)
    b1, b2 = halves(n_inner, interleaved=True)
    sizes = ((len(a1), len(a2)), (len(b1), len(b2)))
    outer = inner = None
    if len(a1) and len(a2):
        outer = torch.zeros(n_outer, n_inner, dtype=torch.float64)
        outer[a1] = 1.0 / (len(a1) * n_inner)
        outer[a2] = -1.0 / (len(a2) * n_inner)
    if len(b1) and len(b2):
        inner = torch.zeros(n_outer, n_inner, dtype=torch.float64)
        inner[:, b1] = 1.0 / (n_outer * len(b1))
        inner[:, b2] = -1.0 / (n_outer * len(b2))
    return outer, inner, sizes


def _flat(grads, leaves) -> Tensor:
    """One float64 host vector of ``grads`` (``None``: zeros of the leaf's size)."""
    return torch.cat(
        [
            torch.zeros(p.numel(), dtype=torch.float64)
            if g is None
            else g.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
            for p, g in zip(leaves, grads)
        ]
    )


def _batched_contrasts(grouped, weights, surrogate, leaves):
    """The contrasts and the step's gradient from ONE batched backward pass
    (``is_grads_batched``: the cotangents are vmapped through the graph), with the gradient
    accumulated into the leaves' ``.grad``; ``None`` if an op on the path has no batching
    rule (then nothing is accumulated)."""
    n = len(weights)
    # the surrogate's own cotangent gives the plain gradient (every term, every site) in the
    # same pass; the contrasts weight the per-draw surrogates only
    cot_grouped = torch.stack(
        [torch.zeros_like(grouped)] + [w.to(grouped.device, grouped.dtype) for w in weights]
    )
    cot_surrogate = torch.zeros(n + 1, dtype=surrogate.dtype, device=surrogate.device)
    cot_surrogate[0] = 1.0
    try:
        with warnings.catch_warnings():
            # vmap's per-sample fallback warns of its speed; it is still one pass of Python
            warnings.simplefilter("ignore", UserWarning)
            batched = torch.autograd.grad(
                [grouped, surrogate],
                leaves,
                grad_outputs=[cot_grouped, cot_surrogate.reshape(-1, *surrogate.shape)],
                # kept so that a failure part-way leaves the graph for the looped fallback
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
    except (RuntimeError, NotImplementedError):
        return None
    for p, g in zip(leaves, batched):
        if g is not None:
            p.grad = g[0] if p.grad is None else p.grad + g[0]
    return [_flat([None if g is None else g[i + 1] for g in batched], leaves) for i in range(n)]


def _looped_contrasts(grouped, weights, surrogate, leaves):
    """As `_batched_contrasts`, one backward pass per contrast, then the plain backward."""
    out = []
    for w in weights:
        s = (grouped * w.to(grouped.device, grouped.dtype)).sum()
        out.append(
            _flat(torch.autograd.grad(s, leaves, retain_graph=True, allow_unused=True), leaves)
        )
    # exactly what a plain step runs (and the graph is freed after it)
    surrogate.backward()
    return out


def contrast_backward(
    per_draw: Tensor,
    layout: TermLayout,
    surrogate: Tensor,
) -> tuple[Tensor, tuple[tuple[int, int], tuple[int, int]]]:
    """Accumulate a step's gradient into ``.grad`` and return the two contrasts of the term's
    per-draw gradients that estimate its variance components.

    Three vector-Jacobian products instead of one: the surrogate's (the step's gradient) and
    the outer and inner contrasts of `contrast_weights`. On a CPU they run as one backward pass
    each (the plain one last, as a plain step runs it), elsewhere as one batched pass where the
    graph's ops allow it. Three is the fewest that estimate both components from one step: the
    gradient and one contrast each for ``V_b + V_w / K`` and ``V_w`` (the quadrant split this
    replaced ran four, five with another term in the surrogate).

    Args:
        per_draw: the observed term's ``batch_shape`` per-draw surrogates.
        layout: its layout.
        surrogate: the particle's share of the step's surrogate (``1 / num_particles`` of its
            whole surrogate): its gradient is accumulated, as a plain step's backward does.

    Returns:
        ``(contrasts, sizes)``: ``(2, P)`` float64 on the host, the outer contrast then the
        inner (a row of zeros where its halves are empty), over the leaves of the surrogate's
        graph; and ``((|a_1|, |a_2|), (|b_1|, |b_2|))``.
    """
    grouped = layout.group(per_draw)  # (n_outer, n_inner)
    outer, inner, sizes = contrast_weights(*grouped.shape)
    weights = [w for w in (outer, inner) if w is not None]
    # every leaf a plain backward fills (a module not registered with Pyro, a site of another
    # term): the contrasts are zero on those outside the term's graph
    leaves = _leaves_of(surrogate)
    contrasts = None
    if weights and grouped.device.type in BATCHED_BACKWARD_DEVICES:
        contrasts = _batched_contrasts(grouped, weights, surrogate, leaves)
    if contrasts is None:  # a CPU, or an op without a batching rule
        contrasts = _looped_contrasts(grouped, weights, surrogate, leaves)
    P = sum(p.numel() for p in leaves)
    out = torch.zeros(2, P, dtype=torch.float64)
    it = iter(contrasts)
    for row, w in enumerate((outer, inner)):
        if w is not None:
            out[row] = next(it)
    return out, sizes


# -- the loss -------------------------------------------------------------------------------

_WRAPPED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def as_timestep_guide(guide: Callable) -> TimestepGuide:
    """``guide`` itself if it is a [`TimestepGuide`][carv_pyro.TimestepGuide], else a
    prior-proposal `TimestepGuide` with ``guide`` as its upstream guide (cached per guide)."""
    if isinstance(guide, TimestepGuide):
        return guide
    try:
        hit = _WRAPPED.get(guide)
    except TypeError:
        hit = None
    if hit is None:
        hit = TimestepGuide(upstream=guide)
        try:
            _WRAPPED[guide] = hit
        except TypeError:
            pass
    return hit


#: The most NaN counts (one per term and step) a loss keeps pending before it waits for the
#: oldest.
_MAX_PENDING_COUNTS = 64


class _PendingCount(NamedTuple):
    """A term's count of non-finite draws in an earlier step, on its way to the host."""

    name: str
    numel: int
    count: Tensor  # 0-d, on the host (a pinned copy when counted on a GPU)
    event: torch.cuda.Event | None  # the copy's end (None: counted on the host)

    @classmethod
    def of(cls, name: str, numel: int, count: Tensor) -> _PendingCount:
        """Start copying ``count`` to the host without waiting for the device."""
        if count.device.type != "cuda":
            return cls(name, numel, count, None)
        host = torch.empty((), dtype=count.dtype, pin_memory=True)
        host.copy_(count, non_blocking=True)
        event = torch.cuda.Event()
        # on the stream the copy ran on: the count's device, which need not be the current one
        event.record(torch.cuda.current_stream(count.device))
        return cls(name, numel, host, event)

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def read(self) -> int:
        """The count (waits for the copy unless `ready`)."""
        if not self.ready():
            self.event.synchronize()
        return int(self.count)


class CARVLoss(ELBO):
    """The CARV gradient estimator as a Pyro loss for ``SVI``.

    For every [`teacher_term`][carv_pyro.teacher_term] in the model it forms

        surrogate = (1 / N) sum over the term's N draws of  scale * mask * w * s,

    where ``s`` is the term's per-draw surrogate (``<x, h.detach()>`` for residual objectives)
    and ``w = p / q`` the importance weight of the proposed sites enclosing the draw, so that
    after `loss_and_grads` every parameter's ``.grad`` holds an unbiased estimate of ``E[J^T h]``
    (threestudio's sign: the direction SGD descends), averaged over the plates that enclose the
    term. ``poutine.scale`` multiplies a term; ``poutine.mask`` zeroes masked draws, and the
    average stays over all ``N`` draws; a subsampled plate's average estimates the full plate's.
    The returned value is the real quantity (the weighted mean of the terms' values plus the
    observed sites' ``-log p``); the gradient comes from the surrogate.

    The guide may be a [`TimestepGuide`][carv_pyro.TimestepGuide] (e.g. ``estimator.guide()``)
    or any Pyro guide for the upstream latent sites, which is then used as the upstream guide of a
    prior-proposal `TimestepGuide`. Its values reach the model detached and its full
    log-density enters the weights, so its parameters get no gradient from teacher terms.

    Args:
        num_particles: independent estimates averaged per step.
        vectorize_particles: draw the particles in one vectorized run (an outer plate).
        nonfinite: ``"raise"`` (default) raises `NonFiniteTeacherError` naming the term and the
            timesteps before any gradient exists; ``"zero"`` drops such draws (biased, so
            opt-in) and reports how many in `diagnostics`.
        accountant: a `LossObserver` such as an
            [`Accountant`][carv_pyro.accounting.Accountant] (measures variance components and
            costs; may resize the reserved inner plate).
        max_plate_nesting: as in Pyro's ELBOs (guessed when vectorizing particles).
        checks: the checks that read a value back from the device (class labels in range,
            timesteps in range, ``nonfinite="raise"``'s NaN test). ``None`` (default): on the
            host for CPU tensors; on a GPU none inside a step, so that a step never waits for
            the device: ranges become device-side asserts, and ``nonfinite="raise"`` raises at
            a later step, once the device has finished the step that produced the NaN (that
            step's gradient was then applied, the NaN draws' residuals zeroed, so the
            parameters stay finite). ``True``: every check on the host, everywhere
            (the CPU's errors, before any gradient exists; each costs a host synchronisation
            on a GPU). ``False``: no host checks on the CPU either.

    Attributes:
        last_records: the [`TermRecord`][carv_pyro.infer.primitives.TermRecord] objects of the
            last particle.
        hooks: callables ``hook(loss, records, model_trace, guide_trace)`` run after each
            particle (e.g. to record the draws of a step).

    Note:
        Host synchronisations. With ``checks=True`` checking teacher outputs for NaN reads one
        boolean back from the device per term and step, and the loss value is read in the
        step. Otherwise, on a GPU, `loss_and_grads` (and ``SVI.step``) returns a `DeviceLoss`:
        a number whose value stays on the device until it is used (``float(loss)``,
        printing, arithmetic), so a loop that does not look at every step's loss never waits.
        An accountant keeps its stopwatches' CUDA events and reads them at a later step, once
        the device has passed them (``Event.query``, no wait); it waits only on a measuring
        step (which reads the variance estimates anyway) or when asked for its costs.
    """

    def __init__(
        self,
        num_particles: int = 1,
        *,
        vectorize_particles: bool = False,
        nonfinite: str = "raise",
        accountant: LossObserver | None = None,
        max_plate_nesting: float = float("inf"),
        checks: bool | None = None,
    ):
        _checks.positive_int("num_particles", num_particles)
        if checks is not None and not isinstance(checks, bool):
            raise ValueError(f"checks must be True, False or None, got {checks!r:.80}")
        _checks.instance("vectorize_particles", vectorize_particles, bool, "True or False")
        _checks.choice("nonfinite", nonfinite, NONFINITE)
        if accountant is not None and not isinstance(accountant, LossObserver):
            raise TypeError(
                f"accountant must be a LossObserver such as carv_pyro.Accountant(...), got "
                f"{type(accountant).__name__} ({accountant!r:.60})"
            )
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
        )
        self.nonfinite = nonfinite
        self.checks = checks
        self._pending_nonfinite: deque[_PendingCount] = deque()
        self.accountant = accountant
        self.last_records: list[TermRecord] = []
        self.hooks: list = []
        self._last: Particle | None = None
        self._diagnostics: dict[str, TermDiagnostics] | None = None

    @property
    def last_particle(self) -> Particle | None:
        """The last particle of the last step (its records, importance weights and per-draw
        surrogates), or ``None`` before the first step."""
        return self._last

    # -- traces ----------------------------------------------------------------------------
    def _get_trace(self, model, guide, args, kwargs):
        """One particle's ``(model_trace, guide_trace)`` (Pyro's ELBO hook)."""
        guide = as_timestep_guide(guide)
        acc = self.accountant
        inner = acc.inner_size() if acc is not None else None
        return guide.run(model, args, kwargs, inner_size=inner)

    def _outer_halves(self, guide: TimestepGuide) -> bool:
        """Whether the guide draws this step's outer design in two independent halves: on a
        measuring step under an outer design, so that the step's outer contrast measures the
        ``V_b`` the design leaves rather than the spread of single draws. (A function of the
        accountant's state alone, which a checkpoint holds: a resumed run splits the same
        steps.)"""
        acc = self.accountant
        return acc is not None and guide.outer is not None and acc.wants_components()

    def _particle_traces(self, model, guide, args, kwargs):
        guide = as_timestep_guide(guide)
        acc = self.accountant
        inner = acc.inner_size() if acc is not None else None
        halves = self._outer_halves(guide)
        if self.vectorize_particles and self.num_particles > 1:
            if self.max_plate_nesting == float("inf"):
                with poutine.block():
                    mt, gt = guide.run(model, args, kwargs, inner_size=inner)
                dims = [
                    f.dim
                    for tr in (mt, gt)
                    for s in tr.nodes.values()
                    if s["type"] == "sample"
                    for f in s["cond_indep_stack"]
                    if f.vectorized
                ]
                self.max_plate_nesting = (-min(dims) if dims else 0) + 1
            particles = pyro.plate(PARTICLE_PLATE, self.num_particles, dim=-self.max_plate_nesting)
            yield guide, guide.run(model, args, kwargs, inner_size=inner, wrap=particles), 1
            return
        for _ in range(self.num_particles):
            run = guide.run(model, args, kwargs, inner_size=inner, outer_halves=halves)
            yield guide, run, self.num_particles

    # -- the estimator ---------------------------------------------------------------------
    def _run(self, model, guide, args, kwargs, backward: bool):
        with _checks.device_checks(self.checks):
            self._raise_pending_nonfinite()
            loss, surrogate = self._run_checked(model, guide, args, kwargs, backward)
        return loss, surrogate

    def _defer_nonfinite(self, particle: Particle) -> None:
        """Queue each term's NaN count for a read once the device is done (no sync now)."""
        for name, (count, numel) in particle.deferred_nonfinite.items():
            self._pending_nonfinite.append(_PendingCount.of(name, numel, count))

    def _raise_pending_nonfinite(self) -> None:
        """Raise for an earlier step's NaN draws whose count the device has delivered (past
        `_MAX_PENDING_COUNTS` pending, the oldest counts are waited for)."""
        for pending in take_ready(self._pending_nonfinite, _MAX_PENDING_COUNTS):
            n_bad = pending.read()
            if n_bad:
                self._pending_nonfinite.clear()
                raise NonFiniteTeacherError(
                    f"teacher term {pending.name!r} produced NaN/Inf at {n_bad} of "
                    f"{pending.numel} draws in an earlier step (found without a host "
                    f"synchronisation, after that step's gradient was applied with those draws' "
                    f"residuals zeroed); check the teacher's weights and the upstream x fed to "
                    f"it, pass CARVLoss(checks=True) to stop before any gradient exists, or "
                    f"CARVLoss(nonfinite='zero') to drop such draws"
                )

    def _run_checked(self, model, guide, args, kwargs, backward: bool):
        loss = 0.0
        surrogate = 0.0
        acc = self.accountant
        traces = self._particle_traces(model, guide, args, kwargs)
        while True:
            # timing is for the observer: no CUDA events or clock reads without one
            watch = Stopwatch(_default_device()) if acc is not None else None
            host = Stopwatch() if acc is not None else None
            try:
                tguide, (model_trace, guide_trace), n_particles = next(traces)
            except StopIteration:
                break
            particle = particle_estimate(model_trace, guide_trace, self.nonfinite)
            if particle.deferred_nonfinite:
                self._defer_nonfinite(particle)
            if not particle.records and isinstance(guide, TimestepGuide):
                raise ValueError(
                    "the guide is a TimestepGuide but the model has no teacher_term it could "
                    "propose for; add carv_pyro.teacher_term(...) to the model"
                )
            self._last = particle
            self._diagnostics = None
            self.last_records = particle.records
            if backward:
                tguide.update(particle.records)
            for hook in self.hooks:
                hook(self, particle.records, model_trace, guide_trace)
            part = particle.surrogate / n_particles
            record = acc.select(particle.records) if acc is not None else None
            report_q = None
            if backward and part.requires_grad:
                if record is not None and acc.wants_components():
                    report_q = contrast_backward(
                        particle.per_draw[record.name], record.layout, part
                    )
                else:
                    part.backward()
            elif not backward:
                surrogate = surrogate + part
            on_host = particle.loss.device.type == "cpu"
            loss = loss + (float(particle.loss) if on_host else particle.loss) / n_particles
            if record is not None:
                # stopped, not read: reading a CUDA stopwatch waits for the device
                on_device = record.t.device.type == "cuda"
                acc.observe(
                    StepReport(
                        record=record,
                        step_time=(watch if on_device else host).stop(),
                        teacher_time=record.teacher_time,
                        contrasts=None if report_q is None else report_q[0],
                        contrast_sizes=None if report_q is None else report_q[1],
                    )
                )
        if acc is not None and backward:
            acc.end_step()
        return loss, surrogate

    @property
    def diagnostics(self) -> dict[str, TermDiagnostics]:
        """Per-term `TermDiagnostics` of the last particle (computed when first read)."""
        if self._diagnostics is None:
            self._diagnostics = {}
            particle = self._last
            for record in particle.records if particle is not None else []:
                self._diagnostics[record.name] = _diagnose(record, particle.weights[record.name])
        return self._diagnostics

    def summary(self) -> dict[str, float]:
        """A flat, loggable dict of the last step's diagnostics.

        Keys: ``{term}/ess``, ``{term}/max_weight``, ``{term}/n_nonfinite``, ``{term}/value``,
        ``{term}/K`` (inner draws per upstream sample), plus the observer's own ``summary()``
        if it has one (the accountant adds ``K``, ``k_star``, ``ecm_predicted``, ``v_between``,
        ``v_within``, ``c_outer``, ``c_inner``).
        """
        out: dict[str, float] = {}
        for record in self.last_records:
            d = self.diagnostics[record.name]
            out[f"{d.name}/ess"] = d.ess
            out[f"{d.name}/max_weight"] = d.max_weight
            out[f"{d.name}/n_nonfinite"] = float(d.n_nonfinite)
            out[f"{d.name}/value"] = d.value
            out[f"{d.name}/K"] = float(record.n_inner)
        extra = getattr(self.accountant, "summary", None)
        if callable(extra):
            out.update(extra())
        return out

    def loss(self, model, guide, *args, **kwargs) -> float:
        """The importance-weighted mean of the teacher terms' values (no gradients).

        Returns:
            float: the loss estimate.
        """
        with torch.no_grad():
            loss, _ = self._run(model, guide, args, kwargs, backward=False)
        return DeviceLoss(loss) if isinstance(loss, Tensor) else loss

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """Estimate the loss and accumulate the CARV gradient estimate into ``.grad``.

        Returns:
            float: the loss estimate.
        """
        loss, _ = self._run(model, guide, args, kwargs, backward=True)
        return DeviceLoss(loss) if isinstance(loss, Tensor) else loss

    def differentiable_loss(self, model, guide, *args, **kwargs) -> Tensor:
        """``loss + (surrogate - surrogate.detach())``: the value is the loss, the gradient CARV's."""
        loss, surrogate = self._run(model, guide, args, kwargs, backward=False)
        if not isinstance(surrogate, Tensor):
            surrogate = torch.zeros(())
        if isinstance(loss, Tensor):  # left on the device: keep the surrogate's dtype
            loss = loss.to(surrogate.dtype)
        return loss + (surrogate - surrogate.detach())


class DeviceLoss(numbers.Real):
    """A loss value left on its device: read back (one host synchronisation) when first used.

    `CARVLoss` returns one on a GPU unless ``checks=True``, so that ``SVI.step`` (whose value
    Pyro passes through as a number) does not wait for the device. It behaves as the ``float``
    it holds: ``float(loss)``, formatting, comparisons and arithmetic read it (once). JSON and
    other serialisers want a real ``float``: write ``float(loss)``.

    Attributes:
        tensor: the 0-d float64 value on its device, until it has been read.
    """

    __slots__ = ("_value", "tensor")

    def __init__(self, tensor: Tensor):
        self.tensor: Tensor | None = tensor.detach()
        self._value: float | None = None

    def __float__(self) -> float:
        if self._value is None:
            self._value = float(self.tensor)
            self.tensor = None
        return self._value

    def __repr__(self) -> str:
        return repr(float(self))

    def __format__(self, spec: str) -> str:
        return format(float(self), spec)

    def __hash__(self) -> int:
        return hash(float(self))

    def __bool__(self) -> bool:
        return bool(float(self))

    def __round__(self, ndigits: int | None = None):
        return round(float(self), ndigits)


def _delegate(name: str):
    def method(self, *args):
        args = tuple(float(a) if isinstance(a, DeviceLoss) else a for a in args)
        return getattr(float(self), name)(*args)

    method.__name__ = name
    return method


for _name in (
    "__abs__ __add__ __ceil__ __eq__ __floor__ __floordiv__ __le__ __lt__ __ge__ __gt__ __mod__ "
    "__mul__ __neg__ __pos__ __pow__ __radd__ __rfloordiv__ __rmod__ __rmul__ __rpow__ "
    "__rtruediv__ __truediv__ __trunc__ __sub__ __rsub__ __divmod__ __rdivmod__ __int__ "
    "__ne__ __complex__"
).split():
    if _name == "__complex__":
        DeviceLoss.__complex__ = lambda self: complex(float(self))  # type: ignore[method-assign]
    else:
        setattr(DeviceLoss, _name, _delegate(_name))
abc.update_abstractmethods(DeviceLoss)  # the numbers.Real methods are all defined now


def _default_device() -> torch.device:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.device("cuda")
    return torch.device("cpu")


def _diagnose(record: TermRecord, w: Tensor) -> TermDiagnostics:
    w = w.detach()
    n = w.numel()
    # one device-to-host read for all of a term's diagnostics
    s1, s2, w_max, w_min, n_bad, value = torch.stack(
        [
            w.sum(),
            (w * w).sum(),
            w.max(),
            w.min(),
            record.nonfinite.sum().to(w.dtype),
            (w.to(record.value.dtype) * record.value).sum().to(w.dtype) / n,
        ]
    ).tolist()
    return TermDiagnostics(
        name=record.name,
        batch_shape=tuple(record.batch_shape),
        ess=(s1 * s1 / s2) if s2 > 0 else 0.0,
        max_weight=w_max,
        min_weight=w_min,
        mean_weight=s1 / n,
        n_nonfinite=int(n_bad),
        value=value,
    )
