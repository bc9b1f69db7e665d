"""Outer-plate designs: stratified, antithetic and scrambled-Sobol draws of the upstream latents.

The inner plate's designs (stratified timesteps, QMC noise) cannot touch ``V_b``, the spread of
the expected gradient between upstream samples (camera poses, generator latents, labels); no
inner-plate estimator cuts ``Var(R, 1)`` by more than ``(V_b + V_w) / V_b``. An outer design
draws the ``R`` upstream samples of one plate *together*, spread evenly over the prior, instead
of independently:

- ``"stratified"``: one draw per equal-probability stratum of every coordinate, the strata
  assigned by independent random permutations (a Latin hypercube over the plate: ``R`` cameras
  cover ``R`` azimuth strata and, independently permuted, ``R`` elevation strata);
- ``"lattice"``: per coordinate, ``R`` draws exactly ``1 / R`` apart under one random shift (a
  Cranley-Patterson rotation), the coordinates paired by random permutations. For a coordinate
  the gradient is periodic and smooth in (a camera's azimuth over the full circle) it cancels
  every harmonic below ``R`` exactly, which the hypercube's independent jitter does not; `auto`
  uses it;
- ``"antithetic"``: pairs ``(u, 1 - u)`` at neighbouring indices ``(2i, 2i + 1)``, the first of
  each pair drawn by a Latin hypercube over the ``R / 2`` pairs (for a Normal latent the pair is
  ``(z, 2 mu - z)``, for a Uniform one its mirror image). Needs an even plate;
- ``"sobol"``: scrambled Sobol points, all the sites of one plate sharing one sequence (each
  site takes the next columns), so ``(azimuth, elevation)`` or a latent vector is one
  low-discrepancy point set.

Every draw is pushed through its prior's inverse CDF (`prior_icdf`: any continuous prior with an
``icdf``, such as ``Normal``, ``Uniform``, ``LogNormal`` or ``Exponential``; ``Bernoulli``,
``Categorical`` and ``OneHotCategorical``; ``Independent`` of them; others, such as ``Gamma`` or
``Beta``, keep their prior draw, with a warning). **Each single draw
has exactly its prior's law**: each base uniform is uniform (a random stratum, a random offset
in it; a uniform's mirror is uniform; scrambling shifts each Sobol coordinate uniformly), and the
coordinates of one draw are independent. The estimator is an average of per-draw terms, so its
expectation only sees these marginals: it stays unbiased with importance weight one, whatever
the joint law of the design. That joint law is what lowers the variance: for a gradient that is
smooth in the latent, ``V_b`` falls like ``1 / R`` faster than under i.i.d. draws (stratified),
its odd part cancels (antithetic), or both (Sobol).

The designs compose with everything else: with the inner strata (a stratified outer design with
``stratify="global"`` at ``K = 1`` is a Latin hypercube over ``(camera, t)``: each of ``R``
views and each of ``R`` timestep strata is used once, paired at random), with importance
sampling, and with a user's upstream guide (the sites it proposes are left to it).

**Sharded plates.** Under [`DistributedCARVLoss`][carv_pyro.infer.distributed.DistributedCARVLoss]
(or any subsampled plate) the design is drawn for the plate's full size and each draw takes the
row of its global index, so when every rank draws the design from the same seed
(``outer_seed=``), each rank takes its own strata of one global design.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import pyro.distributions as dist
import torch
from einops import rearrange
from torch import Tensor

from ..layout import halves as split_halves
from ..layout import to_device
from .samplers import _SOBOL_BITS, RandomSource, scrambled_sobol_ints, sobol_directions

__all__ = [
    "OUTER",
    "AbstractOuterDesign",
    "AntitheticDesign",
    "LatticeDesign",
    "OuterDesigner",
    "SobolDesign",
    "StratifiedDesign",
    "outer_design",
    "draw_shape",
    "prior_icdf",
]

#: The names ``Estimator(outer=...)`` and ``TimestepGuide(outer=...)`` take.
OUTER = (None, "stratified", "lattice", "antithetic", "sobol")


# -- the designs: base uniforms of one plate ------------------------------------------------


class AbstractOuterDesign:
    """Base uniforms for the upstream draws of one plate.

    A design returns ``(n, d)`` float64 uniforms for ``n`` draws of ``d`` coordinates each; every
    row must be exactly ``U[0, 1)^d`` (so the draw pushed through the prior's inverse CDF has the
    prior's law); the rows may depend on each other in any way.

    Subclassing:
        ```python
        class Lattice(AbstractOuterDesign):     # a randomly shifted rank-1 lattice, d = 1
            def uniforms(self, n, columns, source, seed):
                shift = source.uniform((1, len(columns)))
                return (torch.arange(n, dtype=torch.float64)[:, None] / n + shift) % 1.0
        ```
    """

    #: the design pairs draws, so a plate must hold an even number of them
    needs_even = False

    def uniforms(self, n: int, columns: range, source: RandomSource, seed: int) -> Tensor:
        """``(n, len(columns))`` float64 uniforms on the CPU.

        Args:
            n: draws in the plate (its full size when sharded).
            columns: the coordinates this site takes of the plate's ``d`` (a design that spans
                sites, such as Sobol, gives each site its own columns of one point set).
            source: the base randomness.
            seed: a seed shared by every site of the plate in this run (for designs that span
                sites).
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _latin_hypercube(n: int, d: int, source: RandomSource) -> Tensor:
    """``(n, d)``: per column one uniform in each of ``n`` strata, randomly permuted."""
    strata = torch.argsort(source.permutation_keys((d, n)), dim=-1).to(torch.float64)
    u = (strata + source.uniform((d, n))) / n
    return rearrange(u, "d n -> n d")


class StratifiedDesign(AbstractOuterDesign):
    """A Latin hypercube: per coordinate, one draw in each of ``n`` equal strata."""

    def uniforms(self, n, columns, source, seed):
        return _latin_hypercube(n, len(columns), source)


class LatticeDesign(AbstractOuterDesign):
    """A randomly shifted lattice per coordinate: the ``n`` draws of a coordinate sit exactly
    ``1 / n`` apart, one random shift for all of them (a Cranley-Patterson rotation), the
    coordinates paired by independent random permutations.

    Each single draw is uniform (the shift is), so the design is unbiased like the others. Against
    the Latin hypercube it trades the independent jitter inside each stratum for one shared shift:
    for a coordinate the integrand is periodic and smooth in, such as a camera's azimuth over the
    full circle, the ``n`` evenly spaced draws cancel every harmonic of the integrand except the
    multiples of ``n`` (the trapezoidal rule on a circle), where the hypercube's jitter leaves a
    share of every harmonic.
    """

    def uniforms(self, n, columns, source, seed):
        d = len(columns)
        slots = torch.argsort(source.permutation_keys((d, n)), dim=-1).to(torch.float64)
        u = (slots / n + source.uniform((d, 1))) % 1.0
        return rearrange(u, "d n -> n d")


class AntitheticDesign(AbstractOuterDesign):
    """Pairs ``(u, 1 - u)`` at indices ``(2i, 2i + 1)``; the pairs' first halves form a Latin
    hypercube over ``n / 2`` strata. Needs an even ``n``."""

    needs_even = True

    def uniforms(self, n, columns, source, seed):
        if n % 2:
            raise ValueError(f"outer='antithetic' needs an even plate, got {n} draws")
        half = _latin_hypercube(n // 2, len(columns), source)
        pairs = torch.stack([half, 1.0 - half])  # (2, n/2, d)
        return rearrange(pairs, "two m d -> (m two) d")


class SobolDesign(AbstractOuterDesign):
    """Scrambled Sobol points (a random linear matrix scramble plus a random digital shift, as
    ``SobolEngine(scramble=True)`` does: every point is exactly uniform on the ``2^-30`` grid,
    taken at the grid's midpoints); the sites of one plate take consecutive columns of one
    point set.

    The scramble's words of the columns ``[0, columns.stop)`` are drawn from a generator seeded
    with the plate's ``seed``, so every site of the plate sees the same words for the same
    columns, and a site's columns are exactly those columns of one sequence spanning the plate.
    The points come from `scrambled_sobol_ints`, a few tensor ops per call (as `SobolNoise`).
    Cost on one CPU core for ``n <= 64``: 0.05-0.07 ms a call at ``d <= 8``, 0.15 ms at
    ``d = 128``; the ``SobolEngine`` built per call before (same law, other draws) took 0.06 ms
    at ``d = 2``, 0.12 ms at ``d = 8`` and 3 ms at ``d = 128``, in its host scramble loop.
    """

    MAX_DIM = torch.quasirandom.SobolEngine.MAXDIM

    def __init__(self) -> None:
        self._warned = False

    def uniforms(self, n, columns, source, seed):
        if columns.stop > self.MAX_DIM:
            raise ValueError(
                f"outer='sobol' supports at most {self.MAX_DIM} coordinates per plate, this plate "
                f"needs {columns.stop}; use outer='stratified'"
            )
        if n & (n - 1) and not self._warned:
            warnings.warn(
                f"outer='sobol' works best with a power-of-two plate; got {n} draws",
                stacklevel=2,
            )
            self._warned = True
        cpu = torch.device("cpu")
        # the whole prefix [0, stop) is drawn so a column's words do not depend on which site
        # asks for it (a CPU generator draws its stream in order: rows of a prefix agree)
        gen = torch.Generator(device=cpu).manual_seed(seed)
        words = torch.randint(0, 1 << _SOBOL_BITS, (columns.stop, _SOBOL_BITS + 1), generator=gen)
        x = scrambled_sobol_ints(
            n, sobol_directions(columns.stop, cpu)[columns.start :], words[columns.start :]
        )
        return x.to(torch.float64).add_(0.5).mul_(2.0**-_SOBOL_BITS)


_DESIGNS = {
    "stratified": StratifiedDesign,
    "lattice": LatticeDesign,
    "antithetic": AntitheticDesign,
    "sobol": SobolDesign,
}


def outer_design(outer: str | AbstractOuterDesign | None) -> AbstractOuterDesign | None:
    """The design of an ``outer`` option: a name in `OUTER`, a design instance, or ``None``.

    Raises:
        ValueError: on an unknown name or another type.
    """
    if outer is None or isinstance(outer, AbstractOuterDesign):
        return outer
    if isinstance(outer, str) and outer in _DESIGNS:
        return _DESIGNS[outer]()
    raise ValueError(f"outer must be one of {OUTER} or an AbstractOuterDesign, got {outer!r:.80}")


# -- from uniforms to draws of a prior -------------------------------------------------------


def _guard(u: Tensor) -> Tensor:
    """BoTorch's guard: ``u`` strictly inside ``(0, 1)``, so an inverse CDF stays finite."""
    return 0.5 + (1.0 - torch.finfo(torch.float64).eps) * (u - 0.5)


def _unwrapped(prior, *wrappers: type) -> Any:
    """``prior`` without its ``Independent`` (and ``wrappers``) layers."""
    while isinstance(prior, (dist.Independent, *wrappers)):
        prior = prior.base_dist
    return prior


def draw_shape(prior) -> tuple[int, ...]:
    """The shape of the uniforms one draw of ``prior`` takes: ``batch_shape + event_shape``, less
    a ``OneHotCategorical``'s class dim (one uniform picks the class)."""
    shape = tuple(prior.batch_shape) + tuple(prior.event_shape)
    return shape[:-1] if isinstance(_unwrapped(prior), dist.OneHotCategorical) else shape


def _parameter(d) -> Tensor | None:
    """A parameter tensor of ``d`` (its dtype and device are the draws'), unwrapping
    ``Independent`` and transformed distributions to their base."""
    d = _unwrapped(d, torch.distributions.TransformedDistribution)
    for name in d.arg_constraints:
        value = getattr(d, name, None)
        if isinstance(value, Tensor):
            return value
    return None


def _categorical_index(probs: Tensor, u: Tensor) -> Tensor:
    """The first class whose cumulative probability exceeds ``u`` (``probs``: ``(..., C)``)."""
    cdf = probs.cumsum(-1)
    cdf = cdf.expand(tuple(u.shape) + cdf.shape[-1:]).contiguous()
    target = (to_device(u.to(cdf.dtype), cdf.device) * cdf[..., -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return idx.clamp_max(probs.shape[-1] - 1)


def prior_icdf(prior, u: Tensor) -> Tensor | None:
    """``prior``'s inverse CDF at ``u`` (the shape `draw_shape` gives), or ``None`` if it has none.

    A continuous prior with an ``icdf`` (``Normal``, ``Uniform``, ``LogNormal``, ``Exponential``,
    ``Laplace``, ``Cauchy``, ``Gumbel``, half-normal and half-Cauchy, ``Weibull``, ``Pareto``, a
    ``TransformedDistribution`` of one, ...) uses it, differentiable in its parameters (a
    reparameterized draw), evaluated in float64 and rounded to the prior's dtype (finite for
    every ``u``, whatever that dtype). A ``Bernoulli`` returns ``1`` where ``u > 1 - p``; a
    ``Categorical`` the first class whose cumulative probability exceeds ``u``; a
    ``OneHotCategorical`` that class one-hot. ``Independent`` unwraps to its base. Others
    (``Gamma``, ``Beta``, ``StudentT``, ...: no inverse CDF in torch): ``None``.

    Args:
        prior: the site's distribution, already broadcast to its plates.
        u: float64 uniforms of shape ``draw_shape(prior)``.
    """
    base = _unwrapped(prior)
    if isinstance(base, dist.OneHotCategorical):
        probs = base.probs
        idx = _categorical_index(probs, u)
        return torch.nn.functional.one_hot(idx, probs.shape[-1]).to(probs.dtype)
    if isinstance(base, dist.Categorical):
        return _categorical_index(base.probs, u)
    if isinstance(base, dist.Bernoulli):
        p = base.probs
        # the inverse CDF of a Bernoulli: 0 up to F(0) = 1 - p, then 1 (P(u > 1 - p) = p)
        return (to_device(u, p.device) > 1.0 - p.to(torch.float64)).to(p.dtype)
    like = _parameter(base)
    if like is None or not like.is_floating_point():
        return None
    # in float64, then rounded to the prior's dtype: a float32 u within 2^-25 of 0 or 1
    # rounds to the end, where (say) the normal's inverse CDF is infinite
    try:
        value = base.icdf(to_device(_guard(u).to(torch.float64), like.device))
    except NotImplementedError:
        return None
    return value.to(like.dtype)


# -- the runtime: one per guide -------------------------------------------------------------


class OuterDesigner:
    """Draws the upstream sites of a guide's runs by an outer design (used by `TimestepGuide`).

    Per run (`begin`), the sites of one plate share a seed and a running count of the
    coordinates used (their Sobol columns); subsample indices seen in the run place a sharded
    plate's draws in its global design.

    Args:
        design: the design.
        source: the randomness of the design (give every rank the same seed to shard one global
            design).
        sites: the upstream site names to design (default: every eligible site).

    Attributes:
        designed: the names of the sites whose values in the last run are the design's (a draw
            that a handler then replaced by data is not one of them).
        halved: the names of the sites the last run drew as two independent half-designs.
    """

    def __init__(
        self,
        design: AbstractOuterDesign,
        source: RandomSource,
        sites: tuple[str, ...] | None = None,
    ):
        self.design = design
        self.source = source
        self.sites = sites
        self.designed: list[str] = []
        self.halved: list[str] = []
        self.halves = False
        self._columns: dict[tuple, int] = {}
        self._seeds: dict[tuple, int] = {}
        self._indices: dict[str, Tensor] = {}
        self._warned: set[str] = set()

    def begin(self, halves: bool = False) -> None:
        """Start a run: fresh seeds and columns for every plate.

        Args:
            halves: draw each site that spans exactly one plate as two independent designs,
                one for each half of [`halves`][carv_pyro.layout.halves]: the plate's first
                ``n // 2`` rows and the rest (each draw still has its prior's law). The
                accountant's measuring step contrasts the same two halves of a term's upstream
                samples, and only between independent halves does the contrast measure the
                ``V_b`` a design leaves (of a design of ``n / 2``: for a design whose leftover
                falls with its size, at least what the whole design leaves). A site over several
                plates, over a sharded or subsampled plate, or whose halves the design cannot
                fill (odd halves for ``"antithetic"``) is drawn whole.
        """
        self._columns.clear()
        self._seeds.clear()
        self._indices.clear()
        self.designed = []
        self.halved = []
        self.halves = halves

    def record_subsample(self, name: str, indices: Tensor) -> None:
        """Remember the indices a (sharded or subsampled) plate yielded in this run."""
        self._indices[name] = indices

    def forget(self, name: str) -> None:
        """Drop ``name`` from `designed` (its draw was replaced, e.g. by a condition handler)."""
        if name in self.designed:
            self.designed.remove(name)

    def draw(self, name: str, prior, frames) -> Tensor | None:
        """A designed draw of site ``name`` (``batch_shape + event_shape``), or ``None`` when the
        site is left to its prior (not selected, outside every plate, or no inverse CDF).

        Args:
            name: the site's name.
            prior: its distribution, broadcast to its plates.
            frames: its ``cond_indep_stack``.

        Raises:
            ValueError: if the design pairs draws and the plate is odd.
        """
        if self.sites is not None and name not in self.sites:
            return None
        batch_shape = tuple(prior.batch_shape)
        shape = draw_shape(prior)
        nb = len(batch_shape)
        # the plates the value spans (a rank's shard of one draw still spans its plate)
        plates = sorted(
            (
                f
                for f in frames
                if f.vectorized
                and -nb <= f.dim
                and batch_shape[f.dim] == f.size
                and (f.full_size or f.size) > 1
            ),
            key=lambda f: f.dim,
        )
        if not plates:
            return None
        full = {f.dim: f.full_size or f.size for f in plates}
        n = math.prod(full.values())
        if self.design.needs_even and n % 2:
            names = [f.name for f in plates]
            raise ValueError(
                f"outer={self.design!r} pairs draws, but site {name!r} has {n} draws in the "
                f"plates {names}; use an even plate size or outer='stratified'"
            )
        # the draw's coordinates: every dim of the value that is not one of these plates
        letters = [f"a{i}" for i in range(len(shape))]
        plate_pos = [nb + f.dim for f in plates]  # a plate's dim counts from the batch's right
        rest_pos = [i for i in range(len(shape)) if i not in plate_pos]
        d = math.prod(shape[i] for i in rest_pos)
        key = tuple((f.name, f.dim, full[f.dim]) for f in plates)
        start = self._columns.get(key, 0)
        self._columns[key] = start + d
        if key not in self._seeds:
            self._seeds[key] = self.source.integer_seed()
        columns = range(start, start + d)
        if self._splits(plates, full, shape, plate_pos):
            # two independent designs, each of its own seed: the measuring step's halves
            half = key + ("second half",)
            if half not in self._seeds:
                self._seeds[half] = self.source.integer_seed()
            first, second = (len(h) for h in split_halves(n))  # the accountant's outer halves
            u = torch.cat(
                [
                    self.design.uniforms(first, columns, self.source, self._seeds[key]),
                    self.design.uniforms(second, columns, self.source, self._seeds[half]),
                ]
            )
            self.halved.append(name)
        else:
            u = self.design.uniforms(n, columns, self.source, self._seeds[key])
        sizes = {letters[p]: full[f.dim] for p, f in zip(plate_pos, plates)}
        sizes.update({letters[p]: shape[p] for p in rest_pos})
        pattern = "({}) ({}) -> {}".format(
            " ".join(letters[p] for p in plate_pos),
            " ".join(letters[p] for p in rest_pos),
            " ".join(letters),
        )
        u = rearrange(u, pattern, **sizes)
        for p, f in zip(plate_pos, plates):
            if full[f.dim] != shape[p]:  # a shard or subsample of the plate: its global rows
                idx = self._indices.get(f.name)
                if idx is None or idx.numel() != shape[p]:
                    idx = torch.arange(shape[p])
                if u.device.type == "cpu" and idx.device.type != "cpu":
                    # index where the indices live: sending the design up once is a queued
                    # copy, bringing the indices down would wait for the device's queued work
                    u = to_device(u, idx.device)
                u = u.index_select(p, to_device(idx.reshape(-1).long(), u.device))
        value = prior_icdf(prior, u)
        if value is None:
            if name not in self._warned:
                warnings.warn(
                    f"outer design: site {name!r} has a {type(prior).__name__} prior without an "
                    f"inverse CDF here; it is drawn from its prior",
                    stacklevel=2,
                )
                self._warned.add(name)
            return None
        self.designed.append(name)
        return value

    def _splits(self, plates, full, shape, plate_pos) -> bool:
        """Whether this site is drawn as two half-designs (see `begin`)."""
        if not self.halves or len(plates) != 1:
            return False
        n = full[plates[0].dim]
        if n < 2 or shape[plate_pos[0]] != n:  # one draw, or a shard of the plate
            return False
        return not self.design.needs_even or all(len(h) % 2 == 0 for h in split_halves(n))

    def __repr__(self) -> str:
        return f"OuterDesigner({self.design!r}, sites={self.sites})"
