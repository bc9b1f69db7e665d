"""``CARVLoss``: the importance-weighted, plate-averaged gradient estimator for ``SVI``."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer.elbo import ELBO
from pyro.infer.util import torch_item
from torch import Tensor

from .guides import LOG_Q_KEY, TimestepGuide
from .primitives import ROLE_KEY, TERM_KEY, TermRecord
from .timing import Stopwatch

__all__ = ["CARVLoss", "TermDiagnostics", "NonFiniteTeacherError", "NONFINITE"]

NONFINITE = ("raise", "zero")


class NonFiniteTeacherError(FloatingPointError):
    """A teacher term produced NaN or infinite values (raised before any gradient is formed)."""


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
class _Particle:
    loss: Tensor
    surrogate: Tensor
    records: list[TermRecord] = field(default_factory=list)
    weights: dict[str, Tensor] = field(default_factory=dict)
    term_surrogates: dict[str, Tensor] = field(default_factory=dict)


class CARVLoss(ELBO):
    """The CARV gradient estimator as a Pyro loss for ``SVI``.

    For every [`teacher_term`][carv_pyro.teacher_term] in the model it forms

        surrogate = mean over the enclosing plates of  w * s,    w = p(t) / q(t)

    where ``s`` is the term's per-draw surrogate (``<x, h.detach()>`` for residual objectives),
    so that after `loss_and_grads` every parameter's ``.grad`` holds an unbiased estimate of
    ``E[J^T h]`` (threestudio's sign: the direction SGD descends). The returned value is the real
    quantity (the weighted mean of the terms' values); the gradient comes from the surrogate.

    Other sites of the model follow Pyro's conventions: observed sites and ``pyro.factor``
    contribute ``-log p`` (as in ``Trace_ELBO``); latent sites are upstream randomness drawn from
    the prior, or from the user's guide with importance weight ``p / q`` on every term they
    enclose. Timesteps proposed by a [`TimestepGuide`][carv_pyro.guides.TimestepGuide] carry weight
    ``p(t) / q(t)``; its noise proposals keep ``N(0, I)`` marginals and carry none.

    Args:
        num_particles: independent estimates averaged per step.
        nonfinite: ``"raise"`` (default) raises `NonFiniteTeacherError` naming the term and
            the timesteps before any gradient exists; ``"zero"`` drops such draws (biased, so
            opt-in) and reports how many in `diagnostics`.
        accountant: an [`Accountant`][carv_pyro.accounting.Accountant] that keeps running variance
            components and costs, and can set the inner plate's size to ``K*``.
        max_plate_nesting: as in Pyro's ELBOs.

    Attributes:
        diagnostics: per-term `TermDiagnostics` of the last call.
        last_records: the [`TermRecord`][carv_pyro.primitives.TermRecord] objects of the last particle.

    Note:
        Checking teacher outputs for NaN reads one boolean back from the device per term and
        step; that is the only host synchronisation inside a step.
    """

    def __init__(
        self,
        num_particles: int = 1,
        *,
        nonfinite: str = "raise",
        accountant=None,
        max_plate_nesting: float = float("inf"),
    ):
        if not isinstance(num_particles, int) or num_particles < 1:
            raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
        if nonfinite not in NONFINITE:
            raise ValueError(f"unknown nonfinite {nonfinite!r}; expected one of {NONFINITE}")
        super().__init__(num_particles=num_particles, max_plate_nesting=max_plate_nesting)
        self.nonfinite = nonfinite
        self.accountant = accountant
        self._trace_watch: Stopwatch | None = None
        self.diagnostics: dict[str, TermDiagnostics] = {}
        self.last_records: list[TermRecord] = []
        #: callables ``hook(loss, records, model_trace, guide_trace)`` run after each particle
        #: (e.g. to record the draws of a step)
        self.hooks: list = []

    # -- traces ----------------------------------------------------------------------------
    def _get_trace(self, model, guide, args, kwargs):
        resize = self.accountant.resizer() if self.accountant is not None else None
        with resize if resize is not None else contextlib.nullcontext():
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            propose = getattr(guide, "propose", None)
            proposer = propose() if callable(propose) else contextlib.nullcontext()
            with proposer:
                model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
                    *args, **kwargs
                )
        if isinstance(guide, TimestepGuide) and not proposer.proposed:
            raise ValueError(
                "the guide is a TimestepGuide but the model has no teacher_term it could propose "
                f"for (sites={guide.sites}); add carv_pyro.teacher_term(...) to the model"
            )
        return model_trace, guide_trace

    def _get_traces(self, model, guide, args, kwargs):
        for _ in range(self.num_particles):
            # The model's forward (upstream + teacher) counts towards the step's cost. On a GPU
            # the host returns before the forward has run, so time it with CUDA events (read
            # only when the accountant asks), and with the host clock on CPUs.
            gpu = torch.cuda.is_available() and torch.cuda.is_initialized()
            device_watch = Stopwatch("cuda") if gpu else None
            host_watch = Stopwatch()
            traces = self._get_trace(model, guide, args, kwargs)
            host_watch.stop()
            if device_watch is not None and _device_of(traces[0]).type == "cuda":
                self._trace_watch = device_watch.stop()
            else:
                self._trace_watch = host_watch
            yield traces

    # -- the estimator ---------------------------------------------------------------------
    def _particle(self, model_trace, guide_trace) -> _Particle:
        records: list[TermRecord] = []
        loss = torch.zeros(())
        surrogate = torch.zeros(())
        guide_log_w: list[tuple[str, Tensor]] = []
        for name, site in guide_trace.nodes.items():
            if site["type"] != "sample" or site["is_observed"] or name not in model_trace:
                continue
            msite = model_trace.nodes[name]
            with torch.no_grad():
                lw = msite["fn"].log_prob(msite["value"]) - site["fn"].log_prob(site["value"])
            guide_log_w.append((name, lw.to(torch.float64)))

        for name, site in model_trace.nodes.items():
            if site["type"] != "sample":
                continue
            if TERM_KEY in site["infer"]:
                records.append(site["infer"][TERM_KEY])
            elif site["is_observed"]:
                lp = site["fn"].log_prob(site["value"])
                lp = scale_and_mask(lp, site["scale"], site["mask"])
                term = -lp.sum()
                loss = loss + term.detach()
                surrogate = surrogate + term
            elif site["infer"].get(ROLE_KEY) is None and name not in guide_trace:
                _check_prior_site(name, site)

        particle = _Particle(loss=loss, surrogate=surrogate, records=records)
        for record in records:
            log_w = self._log_weight(record, model_trace, guide_log_w)
            w = log_w.exp()
            if record.nonfinite.any():
                if self.nonfinite == "raise":
                    bad_t = record.t[record.nonfinite]
                    raise NonFiniteTeacherError(
                        f"teacher term {record.name!r} produced NaN/Inf at "
                        f"{int(record.nonfinite.sum())} of {record.nonfinite.numel()} draws "
                        f"(timesteps {bad_t[:10].tolist()}); fix the teacher or its input, or pass "
                        f"CARVLoss(nonfinite='zero') to drop such draws"
                    )
                w = torch.where(record.nonfinite, w.new_zeros(()), w)
            n = record.t.numel()
            wt = w.to(record.surrogate.dtype)
            particle.term_surrogates[record.name] = (wt * record.surrogate).sum() / n
            particle.surrogate = particle.surrogate + particle.term_surrogates[record.name]
            particle.loss = particle.loss + ((wt * record.value).sum() / n).detach()
            particle.weights[record.name] = w
        return particle

    def _log_weight(self, record: TermRecord, model_trace, guide_log_w) -> Tensor:
        """``log p - log q`` of every proposed site enclosing the term, ``batch_shape`` float64."""
        t_site = model_trace.nodes[f"{record.name}.t"]
        log_w = torch.zeros(record.batch_shape, dtype=torch.float64, device=record.t.device)
        log_q = t_site["infer"].get(LOG_Q_KEY)
        if log_q is not None:
            log_p = t_site["fn"].log_prob(t_site["value"]).to(torch.float64)
            log_w = log_w + (log_p - log_q.to(log_p.device))
        for name, lw in guide_log_w:
            try:
                log_w = log_w + lw.to(log_w.device)
            except RuntimeError:
                raise ValueError(
                    f"guide site {name!r} has batch shape {tuple(lw.shape)}, which does not "
                    f"enclose teacher term {record.name!r} (batch shape "
                    f"{tuple(record.batch_shape)}); its importance weight cannot be applied"
                ) from None
            if log_w.shape != record.batch_shape:
                raise ValueError(
                    f"guide site {name!r} with batch shape {tuple(lw.shape)} is not inside the "
                    f"plates of teacher term {record.name!r} ({tuple(record.batch_shape)})"
                )
        return log_w

    def _diagnose(self, particle: _Particle) -> None:
        self.last_records = particle.records
        self.diagnostics = {}
        for record in particle.records:
            w = particle.weights[record.name].detach()
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
            self.diagnostics[record.name] = TermDiagnostics(
                name=record.name,
                batch_shape=tuple(record.batch_shape),
                ess=(s1 * s1 / s2) if s2 > 0 else 0.0,
                max_weight=w_max,
                min_weight=w_min,
                mean_weight=s1 / n,
                n_nonfinite=int(n_bad),
                value=value,
            )

    def _run(self, model, guide, args, kwargs, backward: bool):
        loss = 0.0
        surrogate = 0.0
        acc = self.accountant
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            watch = Stopwatch(_device_of(model_trace))
            particle = self._particle(model_trace, guide_trace)
            self._diagnose(particle)
            if hasattr(guide, "update"):
                guide.update(particle.records)
            for hook in self.hooks:
                hook(self, particle.records, model_trace, guide_trace)
            part = particle.surrogate / self.num_particles
            record = acc.select(particle.records) if acc is not None else None
            measured = False
            if backward and part.requires_grad:
                if record is not None and acc.measuring():
                    self._measured_backward(particle, record, model_trace, guide_trace)
                    measured = True
                else:
                    part.backward()
            elif not backward:
                surrogate = surrogate + part
            loss = loss + torch_item(particle.loss) / self.num_particles
            if record is not None:
                acc.detect_plate(model_trace, record)
                watch.stop()
                teacher = record.teacher_time.seconds() if record.teacher_time else 0.0
                step_seconds = self._trace_watch.seconds() + watch.seconds()
                acc.observe_step(record, step_seconds, teacher, measured=measured)
        if acc is not None and backward:
            acc.end_step()
        return loss, surrogate

    def _measured_backward(self, particle, record, model_trace, guide_trace) -> None:
        from .accounting import _params_of, anova_estimates, quadrant_backward

        rest = particle.surrogate - particle.term_surrogates[record.name]
        quadrants, sizes = quadrant_backward(
            record,
            particle.weights[record.name],
            rest,
            _params_of(model_trace, guide_trace),
            1.0 / self.num_particles,
        )
        self.accountant.observe_measurement(*anova_estimates(quadrants, sizes))

    def summary(self) -> dict[str, float]:
        """A flat, loggable dict of the last step's diagnostics.

        Keys: ``{term}/ess``, ``{term}/max_weight``, ``{term}/n_nonfinite``, ``{term}/value``,
        ``{term}/K`` (inner draws per upstream sample), and with an accountant ``K``,
        ``k_star``, ``ecm_predicted``, ``v_between``, ``v_within``, ``c_outer``, ``c_inner``.
        """
        out: dict[str, float] = {}
        for record in self.last_records:
            d = self.diagnostics[record.name]
            out[f"{d.name}/ess"] = d.ess
            out[f"{d.name}/max_weight"] = d.max_weight
            out[f"{d.name}/n_nonfinite"] = float(d.n_nonfinite)
            out[f"{d.name}/value"] = d.value
            out[f"{d.name}/K"] = float(record.n_inner)
        acc = self.accountant
        if acc is not None:
            c_outer, c_inner = acc.cost_estimates()
            out.update(
                K=float(acc.k if acc.k is not None else (acc.last_K or math.nan)),
                k_star=acc.k_star,
                ecm_predicted=acc.predicted_ecm,
                v_between=acc.components.v_between,
                v_within=acc.components.v_within,
                c_outer=c_outer,
                c_inner=c_inner,
            )
        return out

    def loss(self, model, guide, *args, **kwargs) -> float:
        """The importance-weighted mean of the teacher terms' values (no gradients).

        Returns:
            float: the loss estimate.
        """
        with torch.no_grad():
            loss, _ = self._run(model, guide, args, kwargs, backward=False)
        return loss

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """Estimate the loss and accumulate the CARV gradient estimate into ``.grad``.

        Returns:
            float: the loss estimate.
        """
        loss, _ = self._run(model, guide, args, kwargs, backward=True)
        return loss

    def differentiable_loss(self, model, guide, *args, **kwargs) -> Tensor:
        """``loss + (surrogate - surrogate.detach())``: the value is the loss, the gradient CARV's."""
        loss, surrogate = self._run(model, guide, args, kwargs, backward=False)
        if not isinstance(surrogate, Tensor):
            surrogate = torch.zeros(())
        return loss + (surrogate - surrogate.detach())


def _device_of(trace) -> torch.device:
    for site in trace.nodes.values():
        if TERM_KEY in site.get("infer", {}):
            return site["infer"][TERM_KEY].t.device
    return torch.device("cpu")


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
