"""Guides for the timestep and noise sites of teacher terms.

`TimestepGuide` proposes the ``{name}.t`` sites of every [`teacher_term`][carv_pyro.teacher_term]
by importance sampling (``q(t)`` instead of ``p(t)``) and/or stratified inverse CDF, and the
``{name}.eps`` sites i.i.d., antithetically or by scrambled-Sobol QMC. Every other latent site of
the model is drawn from its prior.

Why proposals are applied where the sites occur: the sizes of the plates around a teacher term
(``R`` upstream samples, ``K`` inner draws) are arguments of the model and may change from step
to step (the accountant adapts ``K``), so the guide cannot lay out the draws before the model
runs. [`CARVLoss`][carv_pyro.CARVLoss] therefore runs the model under `TimestepGuide.propose`,
a handler that draws each teacher site from the guide's proposal when the site is reached and
records ``log q`` next to the model's ``log p`` in the trace.

Every draw has marginal law ``q`` (stratum assignments are randomly permuted), so the
importance weight of a draw is ``p(t) / q(t)`` whatever the stratification.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from einops import rearrange
from pyro.poutine.messenger import Messenger
from torch import Tensor

from .objectives import TeacherObjective
from .primitives import ROLE_KEY, to_device
from .proposals import AbstractTimestepDistribution, PriorProposal, WeightedProposal, check_support

__all__ = [
    "TimestepGuide",
    "AbstractNoiseGuide",
    "IIDNoise",
    "AntitheticNoise",
    "SobolNoise",
    "ProposalMessenger",
    "stratified_uniforms",
    "inner_dims",
    "LOG_Q_KEY",
    "PROPOSALS",
    "STRATIFY",
    "NOISE",
]

#: ``infer`` key under which the guide records ``log q(t)`` (float64, site batch shape).
LOG_Q_KEY = "carv_log_q"

PROPOSALS = ("prior", "weighted", "adaptive")
STRATIFY = (None, "per_outer", "global")
NOISE = ("iid", "antithetic", "sobol")


def inner_dims(batch_shape: torch.Size, outer_shape: torch.Size) -> tuple[int, ...]:
    """Dims (negative) along which the draws share one upstream sample.

    These are the plate dims where the upstream ``x`` has size 1 (or no dim) while the draws
    have size > 1: the inner, cheap resampling plates.
    """
    n = len(batch_shape)
    padded = (1,) * (n - len(outer_shape)) + tuple(outer_shape)
    return tuple(d - n for d in range(n) if padded[d] == 1 and batch_shape[d] > 1)


def _group(batch_shape: torch.Size, inner: tuple[int, ...]) -> tuple[str, str, dict]:
    """einops patterns that move the inner dims last: ``(outer..., inner...)``."""
    n = len(batch_shape)
    names = [f"d{i}" for i in range(n)]
    inner_idx = {d + n for d in inner}
    outer = [names[i] for i in range(n) if i not in inner_idx]
    inn = [names[i] for i in range(n) if i in inner_idx]
    src = " ".join(names)
    dst = f"({' '.join(outer)}) ({' '.join(inn)})"
    sizes = {names[i]: batch_shape[i] for i in range(n)}
    return src, dst, sizes


def stratified_uniforms(
    batch_shape: torch.Size,
    inner: tuple[int, ...],
    stratify: str | None,
    uniform: Callable[[tuple[int, ...]], Tensor],
    permutation_keys: Callable[[tuple[int, ...]], Tensor],
) -> Tensor:
    """Uniforms in ``[0, 1)`` of ``batch_shape``, stratified as asked.

    Args:
        batch_shape: the draws' batch shape, e.g. ``(R, K)``.
        inner: the inner dims (see `inner_dims`).
        stratify: ``None`` (i.i.d.), ``"per_outer"`` (``B = K`` strata per upstream sample) or
            ``"global"`` (``B = R K`` strata across all draws).
        uniform: ``shape -> U[0, 1)`` float64 tensor (the base samples).
        permutation_keys: ``shape -> float`` tensor whose argsort along the last dim randomly
            assigns strata to draws.

    Returns:
        float64 ``batch_shape`` uniforms; each has marginal law ``U[0, 1)`` and, within a group,
        exactly one falls in each stratum ``[b / B, (b + 1) / B)``.
    """
    shape = tuple(batch_shape)
    if stratify is None:
        return uniform(shape)
    if stratify == "global":
        n = math.prod(shape)
        strata = torch.argsort(permutation_keys((1, n)), dim=-1)[0].to(torch.float64)
        u = (strata + uniform((n,))) / n
        return u.reshape(shape)
    if stratify == "per_outer":
        src, dst, sizes = _group(batch_shape, inner)
        grouped_shape = rearrange(torch.empty(shape), f"{src} -> {dst}").shape
        n_outer, n_inner = grouped_shape
        strata = torch.argsort(permutation_keys((n_outer, n_inner)), dim=-1).to(torch.float64)
        u = (strata + uniform((n_outer, n_inner))) / n_inner
        return rearrange(u, f"{dst} -> {src}", **sizes)
    raise ValueError(f"unknown stratify {stratify!r}; expected one of {STRATIFY}")


class AbstractNoiseGuide:
    """Draws the ``eps`` of all draws of a term. Every draw must have marginal law ``N(0, I)``.

    Subclasses implement `sample`; since the marginal is exact, noise guides carry no
    importance weight.
    """

    def sample(
        self,
        batch_shape: torch.Size,
        inner: tuple[int, ...],
        event_shape: torch.Size,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Return ``(*batch_shape, *event_shape)`` noise."""
        raise NotImplementedError


class IIDNoise(AbstractNoiseGuide):
    """Independent standard normal noise (the default)."""

    def sample(self, batch_shape, inner, event_shape, dtype, device, generator=None):
        return torch.randn(
            tuple(batch_shape) + tuple(event_shape),
            dtype=dtype,
            device=device,
            generator=generator,
        )


class AntitheticNoise(AbstractNoiseGuide):
    """Antithetic pairs ``(eps, -eps)`` within each upstream sample's inner draws.

    Needs an even number of inner draws per upstream sample.
    """

    def sample(self, batch_shape, inner, event_shape, dtype, device, generator=None):
        src, dst, sizes = _group(batch_shape, inner)
        n_outer = math.prod(batch_shape) // max(1, math.prod(batch_shape[d] for d in inner))
        n_inner = math.prod(batch_shape) // n_outer
        if n_inner % 2:
            raise ValueError(
                f"noise='antithetic' needs an even number of inner draws per upstream sample; "
                f"the inner plates hold {n_inner} (batch shape {tuple(batch_shape)})"
            )
        half = torch.randn(
            (n_outer, n_inner // 2) + tuple(event_shape),
            dtype=dtype,
            device=device,
            generator=generator,
        )
        eps = torch.cat([half, -half], dim=1)
        ev = " ".join(f"e{i}" for i in range(len(event_shape)))
        return rearrange(eps, f"{dst} {ev} -> {src} {ev}", **sizes)


class SobolNoise(AbstractNoiseGuide):
    """Randomized QMC normals: scrambled Sobol points through the inverse normal CDF.

    Each upstream sample gets a consecutive block of ``K`` points of one scrambled sequence in
    ``d = prod(event_shape)`` dimensions (a net when ``K`` is a power of two). The scrambling's
    random digital shift makes every point's marginal exactly uniform, so every ``eps`` is
    exactly ``N(0, I)``. The inverse CDF is guarded so it never returns infinity.
    """

    MAX_DIM = torch.quasirandom.SobolEngine.MAXDIM

    def __init__(self):
        self._warned = False

    def sample(self, batch_shape, inner, event_shape, dtype, device, generator=None):
        d = math.prod(event_shape)
        if d > self.MAX_DIM:
            raise ValueError(
                f"noise='sobol' supports at most {self.MAX_DIM} dimensions per draw, the event "
                f"shape {tuple(event_shape)} has {d}; use noise='iid' or 'antithetic'"
            )
        src, dst, sizes = _group(batch_shape, inner)
        n_inner = max(1, math.prod(batch_shape[i] for i in inner))
        n_outer = math.prod(batch_shape) // n_inner
        if n_inner & (n_inner - 1) and not self._warned:
            warnings.warn(
                f"noise='sobol' works best with a power-of-two number of inner draws; got "
                f"{n_inner}",
                stacklevel=2,
            )
            self._warned = True
        seed = int(torch.randint(0, 2**62, (), generator=generator))
        engine = torch.quasirandom.SobolEngine(d, scramble=True, seed=seed)
        u = engine.draw(n_outer * n_inner, dtype=torch.float64)
        # BoTorch's guard: keep u strictly inside (0, 1) so erfinv stays finite.
        eps64 = torch.finfo(torch.float64).eps
        u = 0.5 + (1.0 - eps64) * (u - 0.5)
        z = math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0)
        z = to_device(z.reshape((n_outer, n_inner) + tuple(event_shape)).to(dtype), device)
        ev = " ".join(f"e{i}" for i in range(len(event_shape)))
        return rearrange(z, f"{dst} {ev} -> {src} {ev}", **sizes)


_NOISE_GUIDES = {"iid": IIDNoise, "antithetic": AntitheticNoise, "sobol": SobolNoise}


class TimestepGuide:
    """A guide for the teacher sites of a model: IS and/or stratified timesteps, QMC noise.

    Use it with [`CARVLoss`][carv_pyro.CARVLoss]; every other latent site is drawn from its prior.

    Args:
        model: the Pyro model holding one or more [`teacher_term`][carv_pyro.teacher_term] calls.
        proposal: ``"prior"`` (``q = p``), ``"weighted"`` (``q ∝ p w alpha``), ``"adaptive"``
            (learned online, see `carv_pyro.adaptive`), or an
            [`AbstractTimestepDistribution`][carv_pyro.proposals.AbstractTimestepDistribution], or a callable
            ``objective -> AbstractTimestepDistribution``.
        stratify: ``None``, ``"per_outer"`` (one draw per stratum of ``q`` for each upstream
            sample, ``B = K``) or ``"global"`` (across all ``R K`` draws; use it when ``K = 1``).
        noise: ``"iid"``, ``"antithetic"``, ``"sobol"`` or an `AbstractNoiseGuide`.
        sites: names of the terms to propose for (default: all teacher terms).
        generator: optional ``torch.Generator`` for the guide's own draws.

    Raises:
        ValueError: on unknown option strings.
    """

    def __init__(
        self,
        model: Callable | None = None,
        proposal: str | AbstractTimestepDistribution | Callable = "prior",
        stratify: str | None = None,
        noise: str | AbstractNoiseGuide = "iid",
        *,
        sites: tuple[str, ...] | None = None,
        generator: torch.Generator | None = None,
    ):
        if isinstance(proposal, str) and proposal not in PROPOSALS:
            raise ValueError(
                f"unknown proposal {proposal!r}; expected one of {PROPOSALS}, a "
                f"AbstractTimestepDistribution or a callable objective -> proposal"
            )
        if not isinstance(proposal, (str, AbstractTimestepDistribution)) and not callable(proposal):
            raise ValueError(f"proposal must be a name, a distribution or a callable: {proposal!r}")
        if stratify not in STRATIFY:
            raise ValueError(f"unknown stratify {stratify!r}; expected one of {STRATIFY}")
        if isinstance(noise, str):
            if noise not in NOISE:
                raise ValueError(f"unknown noise {noise!r}; expected one of {NOISE}")
            noise = _NOISE_GUIDES[noise]()
        elif not isinstance(noise, AbstractNoiseGuide):
            raise ValueError(f"noise must be one of {NOISE} or an AbstractNoiseGuide: {noise!r}")
        self.model = model
        self.proposal = proposal
        self.stratify = stratify
        self.noise = noise
        self.sites = None if sites is None else tuple(sites)
        self.generator = generator
        self._proposals: dict[str, AbstractTimestepDistribution] = {}

    # -- Pyro guide protocol -------------------------------------------------------------
    def __call__(self, *args, **kwargs) -> None:
        """As a Pyro guide this draws nothing up front: see `propose`."""
        return None

    def propose(self) -> ProposalMessenger:
        """The handler that draws the teacher sites while the model runs."""
        return ProposalMessenger(self)

    # -- proposals -----------------------------------------------------------------------
    def proposal_for(self, name: str, objective: TeacherObjective) -> AbstractTimestepDistribution:
        """The proposal ``q`` used for term ``name`` (built once per term and validated)."""
        q = self._proposals.get(name)
        if q is None:
            q = self._build_proposal(name, objective)
            check_support(q, objective.prior, f"proposal for term {name!r}")
            self._proposals[name] = q
        return q

    def _build_proposal(
        self, name: str, objective: TeacherObjective
    ) -> AbstractTimestepDistribution:
        if isinstance(self.proposal, AbstractTimestepDistribution):
            return self.proposal
        if callable(self.proposal) and not isinstance(self.proposal, str):
            return self.proposal(objective)
        if self.proposal == "prior":
            return PriorProposal(objective.prior)
        if self.proposal == "weighted":
            return WeightedProposal(objective.prior, objective.schedule, objective.weight)
        if self.proposal == "adaptive":
            from .adaptive import AdaptiveProposal

            return AdaptiveProposal(objective, name=name)
        raise AssertionError(self.proposal)

    def _uniform(self, shape: tuple[int, ...]) -> Tensor:
        """Base uniforms ``U[0, 1)`` (float64, CPU); tests override this to integrate over u."""
        return torch.rand(shape, dtype=torch.float64, generator=self.generator)

    def _permutation_keys(self, shape: tuple[int, ...]) -> Tensor:
        return torch.rand(shape, generator=self.generator)

    def sample_timesteps(
        self,
        name: str,
        objective: TeacherObjective,
        batch_shape: torch.Size,
        outer_shape: torch.Size,
        device: torch.device,
    ) -> tuple[Tensor, Tensor]:
        """Draw ``t`` for a term and return ``(t, log q(t))``, both of ``batch_shape``."""
        q = self.proposal_for(name, objective)
        inner = inner_dims(batch_shape, outer_shape)
        u = stratified_uniforms(
            batch_shape, inner, self.stratify, self._uniform, self._permutation_keys
        )
        t = to_device(q.icdf(u), torch.device(device))
        return t, q.log_prob(t)

    def sample_noise(self, batch_shape, outer_shape, event_shape, dtype, device) -> Tensor:
        """Draw ``eps`` for a term: ``(*batch_shape, *event_shape)``."""
        inner = inner_dims(batch_shape, outer_shape)
        return self.noise.sample(
            batch_shape, inner, event_shape, dtype, device, generator=self.generator
        )

    def update(self, records: list) -> None:
        """Feed the last step's term records to adaptive proposals (called by the loss)."""
        for record in records:
            q = self._proposals.get(record.name)
            if q is not None and hasattr(q, "update"):
                q.update(record)

    def __repr__(self) -> str:
        return (
            f"TimestepGuide(proposal={self.proposal!r}, stratify={self.stratify!r}, "
            f"noise={type(self.noise).__name__})"
        )


class ProposalMessenger(Messenger):
    """Draws the teacher sites of a model from a `TimestepGuide` as they are reached.

    It sets the value of each ``{name}.t`` site (recording ``log q`` in its ``infer`` under
    `LOG_Q_KEY`) and of each ``{name}.eps`` site; all other sites are left to the model.
    """

    def __init__(self, guide: TimestepGuide):
        super().__init__()
        self.guide = guide
        self.proposed: list[str] = []

    def _selected(self, msg) -> bool:
        role = msg["infer"].get(ROLE_KEY)
        if role is None or msg["is_observed"] or msg["value"] is not None:
            return False
        term = msg["name"].rsplit(".", 1)[0]
        return self.guide.sites is None or term in self.guide.sites

    def _pyro_sample(self, msg) -> None:
        if not self._selected(msg):
            return
        role = msg["infer"][ROLE_KEY]
        fn = msg["fn"]
        batch_shape = fn.batch_shape
        outer_shape = msg["infer"]["carv_outer_shape"]
        term = msg["name"].rsplit(".", 1)[0]
        if role == "timestep":
            objective = msg["infer"]["carv_objective"]
            device = fn.probs.device
            t, log_q = self.guide.sample_timesteps(
                term, objective, batch_shape, outer_shape, device
            )
            msg["value"] = t
            msg["infer"][LOG_Q_KEY] = log_q
            self.proposed.append(term)
        elif role == "noise":
            loc = fn.base_dist.loc if hasattr(fn, "base_dist") else fn.loc
            msg["value"] = self.guide.sample_noise(
                batch_shape, outer_shape, fn.event_shape, loc.dtype, loc.device
            )
