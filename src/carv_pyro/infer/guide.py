"""`TimestepGuide`: the estimator's proposals for teacher sites, as an effect-based Pyro guide.

`TimestepGuide` is a [`pyro.poutine.GuideMessenger`](https://docs.pyro.ai/en/stable/poutine.html):
it runs the model once, and at each sample site returns the distribution the site is drawn from
(``get_posterior(name, prior)``). For the ``{name}.t`` site of every
[`teacher_term`][carv_pyro.teacher_term] that distribution is the proposal ``q(t)``, drawn by
stratified inverse CDF when asked; for ``{name}.eps`` it is a noise design (i.i.d., antithetic
or scrambled Sobol) with exact ``N(0, I)`` marginals. The importance weight of a draw is then
``p / q`` from the ordinary model and guide traces, as for any Pyro guide.

Every other latent site is drawn from its prior (jointly by an outer-plate design with
``outer=``, see [`carv_pyro.infer.outer`][carv_pyro.infer.outer]: every draw still has exactly
the prior's law, so weight one), or, with ``upstream=``, from a user's guide for the upstream
sites (an ``AutoNormal`` over camera latents, a hand-written guide). That guide is an
importance proposal: its full log-density, auxiliary sites included, enters ``p / q``; its values
reach the model detached, so its parameters get no gradient from teacher terms (the expected
teacher gradient does not depend on them).

Every draw of a design has marginal law ``q`` (stratum assignments are randomly permuted), so the
weight of a draw is ``p(t) / q(t)`` whatever the stratification, and the estimator, linear in
per-draw terms, stays unbiased.

Proposals are built for the objective they serve (checked against its prior) and rebuilt when a
term's objective changes: a guide can be reused across models and objectives.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from pyro import poutine
from pyro.distributions import TorchDistribution
from pyro.poutine.guide import GuideMessenger
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from .. import _checks
from ..layout import TermLayout
from ..timesteps import AbstractTimestepDistribution
from .control_variates import ControlVariateFit
from .outer import AbstractOuterDesign, OuterDesigner, outer_design
from .primitives import (
    LAYOUT_KEY,
    OBJECTIVE_KEY,
    ROLE_KEY,
    TermRecord,
    _SizedNonEmptyPlates,
)
from .proposals import PROPOSALS, PriorProposal, build_proposal
from .samplers import STRATIFY, AbstractNoiseSampler, RandomSource, noise_sampler
from .samplers import stratified_uniforms as _stratified_uniforms

__all__ = ["EXACT_KEY", "TimestepGuide"]

#: ``infer`` key on sites whose guide draw has exactly the prior's marginal (weight one).
EXACT_KEY = "carv_exact_marginal"


class _Designed(TorchDistribution):
    """A site's posterior whose value is drawn up front (by a design) and whose density is
    ``log_prob_fn``: the proposal's for timesteps, ``N(0, I)``'s for noise, a user guide's for
    upstream sites."""

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(
        self, value: Tensor, log_prob_fn: Callable[[Tensor], Tensor], like, base=None
    ) -> None:
        #: the user guide's own distribution of the site, if it proposed the site
        self.base = base
        self._value = value
        self._log_prob_fn = log_prob_fn
        self._support = like.support
        event_shape = like.event_shape
        batch_shape = value.shape[: value.dim() - len(event_shape)]
        super().__init__(batch_shape, event_shape, validate_args=False)

    @property
    def support(self):
        return self._support

    def sample(self, sample_shape: tuple[int, ...] = ()) -> Tensor:
        if tuple(sample_shape):
            return self._value.expand(torch.Size(sample_shape) + self._value.shape)
        return self._value

    def log_prob(self, value: Tensor) -> Tensor:
        return self._log_prob_fn(value)


class TimestepGuide(GuideMessenger):
    """The guide for the teacher sites of a model: IS and/or stratified timesteps, QMC noise.

    Use it with [`CARVLoss`][carv_pyro.CARVLoss] in ``SVI``, or build it from an
    [`Estimator`][carv_pyro.Estimator] with ``estimator.guide(model)``.

    Args:
        model: the Pyro model holding one or more [`teacher_term`][carv_pyro.teacher_term] calls
            (needed for Pyro's ``guide(*args)`` protocol; `CARVLoss` runs whatever model it is
            given, so one guide may serve several models).
        proposal: ``"prior"`` (``q = p``), ``"weighted"`` (``q ∝ p w alpha``), ``"adaptive"``
            (learned online), an
            [`AbstractTimestepDistribution`][carv_pyro.timesteps.AbstractTimestepDistribution],
            or a callable ``objective -> AbstractTimestepDistribution``.
        stratify: ``None``, ``"per_outer"`` (one draw per stratum of ``q`` for each upstream
            sample, ``B = K``), ``"global"`` (across all ``R K`` draws; use it when ``K = 1``)
            or ``"auto"`` (per upstream sample when ``K > 1``, else global).
        noise: ``"iid"``, ``"antithetic"``, ``"sobol"`` or an
            [`AbstractNoiseSampler`][carv_pyro.infer.samplers.AbstractNoiseSampler].
        K: inner draws per upstream sample for every reserved inner plate
            ([`carv_pyro.draws`][carv_pyro.draws]); ``None`` keeps the model's size.
        sites: names of the terms to propose for (default: all teacher terms; others are drawn
            from the prior).
        upstream: a guide for the non-teacher latent sites: a callable Pyro guide such as
            ``AutoNormal(poutine.block(model, hide=[teacher sites]))``. Default: the prior.
        outer: an outer-plate design for the upstream sites drawn from their priors:
            ``None``, ``"stratified"``, ``"antithetic"``, ``"sobol"`` or an
            [`AbstractOuterDesign`][carv_pyro.infer.outer.AbstractOuterDesign] (see
            [`carv_pyro.infer.outer`][carv_pyro.infer.outer]).
        outer_sites: the upstream sites the design draws (default: all it can).
        outer_seed: seeds the outer design apart from the rest (give every rank the same
            one to shard one global design); default: the guide's own randomness.
        control_variates: fit and apply the control variates the objectives declare
            (``True``, or a [`ControlVariateFit`][carv_pyro.infer.control_variates.ControlVariateFit]
            with its own settings); see
            [`carv_pyro.infer.control_variates`][carv_pyro.infer.control_variates].
        seed: seeds the guide's own draws (reproducible per device).
        generator: a ``torch.Generator`` for the guide's draws instead of ``seed``.
        source: a [`RandomSource`][carv_pyro.infer.samplers.RandomSource] instead of ``seed``
            and ``generator``.

    Raises:
        ValueError: on unknown option strings, or an effect-based upstream guide.
        TypeError: on arguments of the wrong type.
    """

    def __init__(
        self,
        model: Callable | None = None,
        proposal: str | AbstractTimestepDistribution | Callable = "prior",
        stratify: str | None = None,
        noise: str | AbstractNoiseSampler = "iid",
        *,
        K: int | None = None,
        sites: tuple[str, ...] | None = None,
        upstream: Callable | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        source: RandomSource | None = None,
        outer: str | AbstractOuterDesign | None = None,
        outer_sites: tuple[str, ...] | None = None,
        outer_seed: int | None = None,
        control_variates: bool | ControlVariateFit = False,
    ):
        if model is not None and not callable(model):
            raise TypeError(f"model must be a callable Pyro model, got {type(model).__name__}")
        if isinstance(proposal, str):
            _checks.choice("proposal", proposal, PROPOSALS)
        elif not isinstance(proposal, AbstractTimestepDistribution) and not callable(proposal):
            raise ValueError(
                f"proposal must be one of {tuple(PROPOSALS)}, an AbstractTimestepDistribution or "
                f"a callable objective -> proposal, got {proposal!r}"
            )
        _checks.choice("stratify", stratify, STRATIFY)
        noise_obj = noise_sampler(noise)
        if K is not None:
            _checks.positive_int("K", K)
            if noise_obj.needs_even_inner and K % 2:
                raise ValueError(f"noise={noise!r} needs an even K, got K={K}")
        if sites is not None:
            if isinstance(sites, str) or not isinstance(sites, (tuple, list, set, frozenset)):
                raise TypeError(f"sites must be a tuple of term names or None, got {sites!r:.60}")
            sites = tuple(sites)
            for s in sites:
                _checks.instance("sites", s, str, "a tuple of term names")
        if upstream is not None:
            if isinstance(poutine.unwrap(upstream), GuideMessenger):
                raise ValueError(
                    "upstream must be a callable guide (e.g. AutoNormal over "
                    "poutine.block(model, hide=[teacher sites]), or a hand-written guide); "
                    f"effect-based guides such as {type(upstream).__name__} cannot be composed"
                )
            if not callable(upstream):
                raise TypeError(f"upstream must be a callable guide, got {upstream!r}")
        design = outer_design(outer)
        if outer_sites is not None:
            if isinstance(outer_sites, str) or not isinstance(outer_sites, (tuple, list)):
                raise TypeError(
                    f"outer_sites must be a tuple of site names, got {outer_sites!r:.60}"
                )
            outer_sites = tuple(outer_sites)
            for s in outer_sites:
                _checks.instance("outer_sites", s, str, "a tuple of site names")
        outer_source = RandomSource(seed=outer_seed) if outer_seed is not None else None
        if control_variates is True:
            control_variates = ControlVariateFit()
        elif control_variates is False:
            control_variates = None
        elif not isinstance(control_variates, ControlVariateFit):
            raise TypeError(
                f"control_variates must be True, False or a ControlVariateFit, got "
                f"{control_variates!r:.60}"
            )
        if source is None:
            source = RandomSource(seed=seed, generator=generator)
        elif seed is not None or generator is not None:
            raise ValueError("give source, or seed/generator, not both")
        super().__init__(model)
        self.proposal = proposal
        self.stratify = stratify
        self.noise = noise_obj
        self.K = K
        self.sites = sites
        self.upstream = upstream
        self.source = source
        #: the outer-plate design's runtime (``None`` without ``outer``)
        self.outer = (
            None if design is None else OuterDesigner(design, outer_source or source, outer_sites)
        )
        #: the online fit of the objectives' control variates (``None``: not applied)
        self.control_variates = control_variates
        self.learning = True
        self._proposals: dict[str, tuple[weakref.ref, AbstractTimestepDistribution]] = {}
        #: control-variate fits of a restored state, by term, until the term is met
        self._restored_fits: dict[str, dict | None] = {}
        self._upstream_trace = None
        self._msg = None
        self._size: int | None = None
        #: whether the last noise site was given (conditioned) rather than drawn
        self._fixed_noise = False

    # -- running ---------------------------------------------------------------------------
    def __call__(self, *args, **kwargs) -> dict[str, Tensor]:  # type: ignore[override]
        """Pyro's guide protocol: run ``self.model`` and return its sample values by name."""
        if self.model is None:
            raise ValueError("this TimestepGuide has no model; pass TimestepGuide(model, ...)")
        model_trace, _ = self.run(self.model, args, kwargs)
        return {
            name: site["value"]
            for name, site in model_trace.nodes.items()
            if site["type"] == "sample"
        }

    def run(
        self,
        model: Callable,
        args: tuple = (),
        kwargs: dict | None = None,
        *,
        inner_size: int | None = None,
        wrap: Callable[[Callable], Callable] | None = None,
        outer_halves: bool = False,
    ):
        """Run ``model`` under the guide and return ``(model_trace, guide_trace)``.

        Args:
            model: the model to run (need not be ``self.model``).
            args: its positional arguments.
            kwargs: its keyword arguments.
            inner_size: size of the reserved inner plates for this run (default `K`).
            wrap: applied to the model and to the upstream guide before they run (e.g. a
                vectorized particle plate).
            outer_halves: with an outer design, draw each site of one plate as two independent
                designs, one for each contiguous half of the plate (see
                [`OuterDesigner.begin`][carv_pyro.infer.outer.OuterDesigner.begin]); the loss
                asks for it on a measuring step.

        Returns:
            The two traces, as ``GuideMessenger.get_traces`` gives them, with the upstream
            guide's auxiliary sites in the guide trace.
        """
        kwargs = kwargs or {}
        wrap = wrap or (lambda fn: fn)
        size = inner_size if inner_size is not None else self.K
        self._upstream_trace = None
        if self.upstream is not None:
            with _SizedNonEmptyPlates(size):
                trace = poutine.trace(wrap(self.upstream)).get_trace(*args, **kwargs)
            self._upstream_trace = self._checked_upstream(trace)
        self.args_kwargs = args, kwargs
        self._size = size
        if self.outer is not None:
            self.outer.begin(halves=outer_halves)
        self._fixed_noise = False
        try:
            fit = self.control_variates
            with self, _SizedNonEmptyPlates(size):
                applying = (
                    fit.applying(fixed_noise=lambda: self._fixed_noise)
                    if fit is not None
                    else contextlib.nullcontext()
                )
                with applying:
                    wrap(model)(*args, **kwargs)
        finally:
            del self.args_kwargs
            self._msg = None
        model_trace, guide_trace = self.get_traces()
        if self._upstream_trace is not None:
            for name, site in self._upstream_trace.nodes.items():
                if site["type"] != "sample" or site["is_observed"]:
                    continue
                if name in guide_trace:
                    # the upstream guide's own plates, not the model's: its density may be
                    # joint over a plate the model declares (AutoDiagonalNormal, to_event)
                    guide_trace.nodes[name]["cond_indep_stack"] = site["cond_indep_stack"]
                else:
                    guide_trace.add_node(name, **site)
        self._upstream_trace = None
        return model_trace, guide_trace

    def _checked_upstream(self, trace):
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
                continue
            if site["infer"].get(ROLE_KEY) is not None:
                raise ValueError(
                    f"the upstream guide samples the teacher site {name!r}; the estimator "
                    f"proposes teacher sites itself: block them from the upstream guide, e.g. "
                    f"AutoNormal(poutine.block(model, hide_fn=lambda site: site['name'] in "
                    f"teacher_sites))"
                )
            site["value"] = site["value"].detach()
        return trace

    # -- GuideMessenger ----------------------------------------------------------------------
    def _pyro_sample(self, msg) -> None:
        self._msg = msg
        super()._pyro_sample(msg)

    def _pyro_post_sample(self, msg) -> None:
        if msg["infer"].get(ROLE_KEY) == "noise":
            # a term evaluates its residual right after its eps site; a conditioned eps (by a
            # handler inside or around the model) is a fixed point, where the control variates'
            # zero mean over the noise does not hold (so `run` leaves its residual alone)
            self._fixed_noise = bool(msg["is_observed"])
        if self.outer is not None and site_is_subsample(msg):
            # a sharded or subsampled plate's indices place its draws in the global design
            self.outer.record_subsample(msg["name"], msg["value"])
        if self.outer is not None and msg["is_observed"]:
            # a condition handler around the run replaced the designed draw by its data
            self.outer.forget(msg["name"])
        super()._pyro_post_sample(msg)

    def get_posterior(self, name: str, prior) -> Any:
        """The distribution a site is drawn from (see the module docstring)."""
        msg = self._msg
        role = msg["infer"].get(ROLE_KEY)
        term = name.rsplit(".", 1)[0]
        up = self._upstream_trace
        if role is not None and up is not None and name in up.nodes:
            raise ValueError(
                f"the upstream guide samples the teacher site {name!r}; the estimator proposes "
                f"teacher sites itself: block them from the upstream guide, e.g. "
                f"AutoNormal(poutine.block(model, hide=['{term}.t', '{term}.eps', '{term}']))"
            )
        if role is not None and (self.sites is None or term in self.sites):
            layout = msg["infer"][LAYOUT_KEY]
            if role == "timestep":
                return self._timesteps(term, msg["infer"][OBJECTIVE_KEY], layout, prior, msg)
            return self._noise(layout, prior, msg)
        if up is not None and name in up and up.nodes[name]["type"] == "sample":
            site = up.nodes[name]
            if not site["is_observed"]:
                return _Designed(site["value"], site["fn"].log_prob, prior, base=site["fn"])
        msg["infer"][EXACT_KEY] = True
        if self.outer is not None and role is None and not msg["infer"].get("enumerate"):
            value = self.outer.draw(name, prior, msg["cond_indep_stack"])
            if value is not None:  # every draw has the prior's law: weight one
                return _Designed(value, prior.log_prob, prior)
        return prior

    def _timesteps(self, term, objective, layout: TermLayout, prior, msg) -> _Designed:
        size = getattr(self, "_size", None)
        if size is not None and not layout.reserved and layout.n_inner != size:
            where = (
                f"the plain pyro.plate {layout.inner_plate!r}, which holds {layout.n_inner}"
                if layout.inner_plate
                else f"no inner plate ({layout.n_inner} draw per upstream sample)"
            )
            raise ValueError(
                f"the estimator asks for K={size} inner draws, but teacher term {term!r} has "
                f"{where} and cannot be resized; write its inner plate as "
                f"carv_pyro.draws(K, ...) or use an estimator with K=None (the model's own size)"
            )
        q = self.proposal_for(term, objective)
        device = prior.probs.device
        u = _stratified_uniforms(layout, self.stratify, self.source, device)
        t = q.icdf(u).to(device)
        if isinstance(q, PriorProposal):
            msg["infer"][EXACT_KEY] = True
        return _Designed(t, q.log_prob, prior)

    def _noise(self, layout: TermLayout, prior, msg) -> _Designed:
        base = prior.base_dist if hasattr(prior, "base_dist") else prior
        eps = self.noise.sample(
            layout, prior.event_shape, base.loc.dtype, base.loc.device, self.source
        )
        msg["infer"][EXACT_KEY] = True
        return _Designed(eps, prior.log_prob, prior)

    # -- proposals -----------------------------------------------------------------------
    def proposal_for(self, term: str, objective) -> AbstractTimestepDistribution:
        """The proposal ``q`` for term ``term`` with ``objective``: built for that objective
        (support-checked against its prior) and rebuilt whenever the term's objective changes."""
        hit = self._proposals.get(term)
        if hit is not None and hit[0]() is objective:
            return hit[1]
        q = build_proposal(self.proposal, objective, term)
        self._proposals[term] = (weakref.ref(objective), q)
        if self.control_variates is not None and term in self._restored_fits:
            self.control_variates.restore(objective, self._restored_fits.pop(term))
        return q

    def update(self, records: list[TermRecord]) -> None:
        """Feed a step's term records to learning proposals and the control-variate fit
        (called by the loss after a backward)."""
        if not self.learning:
            return
        if self.control_variates is not None:
            self.control_variates.commit()
        for record in records:
            hit = self._proposals.get(record.name)
            if hit is not None and hit[0]() is record.objective:
                update = getattr(hit[1], "update", None)
                if update is not None:
                    update(record)

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Within this context, learning proposals do not learn (measurements leave no trace)."""
        saved, self.learning = self.learning, False
        try:
            yield
        finally:
            self.learning = saved

    # -- state -----------------------------------------------------------------------------
    def get_state(self) -> dict:
        """The guide's state for exact resume: its random streams and, with control variates,
        each term's fit (by term name); a learning proposal's state is in the param store."""
        state: dict = {"source": self.source.get_state()}
        if self.outer is not None and self.outer.source is not self.source:
            state["outer_source"] = self.outer.source.get_state()
        if self.control_variates is not None:
            fits = dict(self._restored_fits)  # restored but not yet met again
            for term, (ref, _) in self._proposals.items():
                objective = ref()
                if objective is not None:
                    fits[term] = self.control_variates.state_of(objective)
            state["control_variates"] = fits
        return state

    def set_state(self, state: dict) -> None:
        """Restore `get_state`'s result (a term's control-variate fit is handed to its
        objective when the guide next meets the term)."""
        self.source.set_state(state["source"])
        if "outer_source" in state and self.outer is not None:
            self.outer.source.set_state(state["outer_source"])
        self._restored_fits = dict(state.get("control_variates") or {})
        self._proposals = {}  # meet every term afresh, so that its fit is restored

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        if self.control_variates is not None:
            # the fit is keyed by objective (weakly: it cannot be pickled as it is); carried by
            # term, as `get_state` does, and handed back when the unpickled guide meets a term
            state["_restored_fits"] = self.get_state()["control_variates"]
        state["_proposals"] = {}
        state["_msg"] = None
        return state

    def __repr__(self) -> str:
        outer = f", outer={self.outer.design!r}" if self.outer is not None else ""
        return (
            f"TimestepGuide(proposal={self.proposal!r}, stratify={self.stratify!r}, "
            f"noise={self.noise!r}, K={self.K}{outer}, {self.source!r})"
        )
