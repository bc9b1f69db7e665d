"""Compute-aware variance accounting: measure ``V_b``, ``V_w`` and costs, choose ``K``.

With ``V_b = Var_xi(E[g | xi])`` (between upstream samples) and ``V_w = E_xi[Var(g | xi)]``
(within, per single draw), both traces of covariances in parameter-gradient space, the
hierarchical estimator with ``R`` upstream samples and ``K`` inner draws each has

    Var(R, K) = (V_b + V_w / K) / R,        cost(R, K) = R (c_outer + K c_inner),

so the compute-optimal inner size is Cochran's ``K* = sqrt((c_outer / c_inner) (V_w / V_b))``
and the effective compute multiplier of ``K`` against ``K = 1`` is

    ECM(K) = (V_b + V_w)(c_outer + c_inner) / [(V_b + V_w / K)(c_outer + K c_inner)].

On a GPU the teacher's cost per draw falls with the batch, so the `Accountant` also learns the
teacher's cost curve (its measured call at every ``K`` it has run) and picks ``K`` from the
predicted ``Var(R, K) * cost(R, K)``, where ``cost`` is the recent steps' cost without their
teacher call, pooled over every ``K`` (the rest of a step does not depend on ``K``), plus the
teacher's curve at ``K``.

**How the components are estimated.** On a measuring step the upstream samples are split into
two halves ``a_1, a_2`` and each one's inner draws into two interleaved halves ``b_1, b_2``.
Three vector-Jacobian products instead of one ([`carv_pyro.CARVLoss`][carv_pyro.CARVLoss] runs
them when its observer asks, as one batched backward pass where every op on the path has a
batching rule, else one pass each) give the step's gradient and two contrasts: the difference
of the two upstream halves' mean gradients, with expected squared norm
``(V_b + V_w / K)(1/|a_1| + 1/|a_2|)``, and the mean over the upstream samples of the
difference of each one's two inner halves' means, with ``V_w (1/|b_1| + 1/|b_2|) / R``
(`anova_estimates`). Both give unbiased per-step estimates that
`VarianceComponents` pools (Welford, mergeable across processes). The estimates treat the inner
draws as exchangeable: with stratified timesteps, draws within an upstream sample are negatively
correlated and ``V_w`` is over-estimated (conservatively). They treat the two upstream halves as
independent: under an outer design (`carv_pyro.infer.outer`) the loss therefore asks the guide
to draw each site of one plate on a measuring step as two independent designs, one per half of
the plate, so the outer contrast measures the ``V_b`` a design of ``R / 2`` leaves (at least
what the whole design leaves, for a design whose leftover falls with its size; 0 under the
lattice for a latent a lattice of ``R / 2`` cancels), and ``K`` is chosen for the design, not
for i.i.d. draws. Where the halves are not one plate's (a term with several outer plates, a
sharded or subsampled plate, vectorized particles) the design is drawn whole and the estimate is
about the i.i.d. ``V_b`` (the spread of single upstream samples); a design that leaves a
fraction ``f`` of ``V_b`` then has a ``K*`` ``1 / sqrt(f)`` times the one chosen. `DesignSplit`
measures ``f`` offline.

This module is statistics only: it imports nothing of the estimator. The `Accountant` meets
the loss through the [`LossObserver`][carv_pyro.infer.loss.LossObserver] protocol.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import _checks
from ._deferred import take_ready
from .timing import is_ready, seconds_of

__all__ = [
    "Accountant",
    "AccountingReport",
    "DesignSplit",
    "VarianceComponents",
    "anova_estimates",
    "effective_compute_multiplier",
    "fit_cost_curve",
    "inner_plate_ceiling",
    "optimal_inner_size",
]


# -- formulas ---------------------------------------------------------------------------------


def _check_nonneg(**values: float) -> None:
    for name, v in values.items():
        _checks.non_negative_float(name, v)


def optimal_inner_size(c_outer: float, c_inner: float, v_between: float, v_within: float) -> float:
    """Cochran's two-stage optimum ``K* = sqrt((c_outer / c_inner) (V_w / V_b))``.

    Args:
        c_outer: cost of one upstream sample (seconds, or any unit shared with ``c_inner``).
        c_inner: cost of one teacher draw.
        v_between: ``V_b``, variance between upstream samples of the per-sample mean gradient.
        v_within: ``V_w``, per-draw variance within an upstream sample.

    Returns:
        The (real-valued, unclamped) optimal number of inner draws; ``inf`` if ``V_b = 0`` and
        ``0`` if ``V_w = 0``.

    Raises:
        ValueError: on negative or non-finite input, or ``c_inner = 0``.
    """
    _check_nonneg(c_outer=c_outer, c_inner=c_inner, v_between=v_between, v_within=v_within)
    if c_inner == 0:
        raise ValueError("c_inner must be > 0")
    if v_within == 0:
        return 0.0
    if v_between == 0:
        return math.inf
    return math.sqrt((c_outer / c_inner) * (v_within / v_between))


def effective_compute_multiplier(
    K: float,
    c_outer: float,
    c_inner: float,
    v_between: float,
    v_within: float,
    *,
    v_between_left: float | None = None,
    v_within_left: float | None = None,
) -> float:
    """ECM of ``K`` inner draws against ``K = 1`` under the linear cost model.

    ``ECM(K) = (V_b + V_w)(c_outer + c_inner) / [(V_b + V_w / K)(c_outer + K c_inner)]``:
    how many times less compute the ``(R, K)`` estimator needs for the same variance.

    With an outer design or control variates, the estimator's own components are what they
    leave, ``V_b'`` (``v_between_left``) and ``V_w'`` (``v_within_left``), against the plain
    ``K = 1`` baseline's ``V_b + V_w``:
    ``(V_b + V_w)(c_outer + c_inner) / [(V_b' + V_w' / K)(c_outer + K c_inner)]``.

    Raises:
        ValueError: on negative or non-finite input or ``K <= 0``.
    """
    _check_nonneg(c_outer=c_outer, c_inner=c_inner, v_between=v_between, v_within=v_within)
    if not (isinstance(K, (int, float)) and K > 0 and math.isfinite(K)):
        raise ValueError(f"K must be a finite number > 0, got {K!r}")
    vb = v_between if v_between_left is None else v_between_left
    vw = v_within if v_within_left is None else v_within_left
    _check_nonneg(v_between_left=vb, v_within_left=vw)
    den = (vb + vw / K) * (c_outer + K * c_inner)
    if den == 0:
        raise ValueError("variance and cost are both zero: the ECM is undefined")
    return (v_between + v_within) * (c_outer + c_inner) / den


def inner_plate_ceiling(
    v_between: float, v_within: float, v_between_left: float | None = None
) -> float:
    """The most any inner-plate estimator can cut the plain ``Var(R, 1)``: ``(V_b + V_w) / V_b``.

    Nothing done on the inner plate (more draws, IS, stratification, QMC, control variates)
    removes ``V_b``. An outer design leaves ``V_b' = v_between_left`` of it, which raises the
    ceiling of everything on top of it to ``(V_b + V_w) / V_b'``.

    Returns:
        The ceiling (``inf`` when the remaining ``V_b`` is not positive).

    Raises:
        ValueError: on negative or non-finite ``v_within``.
    """
    _check_nonneg(v_within=v_within)
    left = v_between if v_between_left is None else v_between_left
    return (v_between + v_within) / left if left > 0 else math.inf


@dataclass
class DesignSplit:
    """Variance components of the plain estimator and of a design, side by side.

    ``V_b`` splits into what the design removes and what remains; control variates lower
    ``V_w``. ``K*``, the predicted ECM and the ceiling follow from what remains.

    Attributes:
        design: the design's name (e.g. ``"outer=stratified"``).
        v_between: plain ``V_b`` (i.i.d. upstream draws).
        v_within: plain ``V_w``.
        v_between_left: ``V_b'`` under the design.
        v_within_left: ``V_w'`` under the design.
    """

    design: str
    v_between: float
    v_within: float
    v_between_left: float
    v_within_left: float

    @property
    def v_between_removed(self) -> float:
        """``V_b - V_b'``: what the design removes of ``V_b``."""
        return self.v_between - self.v_between_left

    @property
    def ceiling_before(self) -> float:
        """``(V_b + V_w) / V_b``: the inner plate's ceiling with i.i.d. upstream draws."""
        return inner_plate_ceiling(self.v_between, self.v_within)

    @property
    def ceiling_after(self) -> float:
        """``(V_b + V_w) / V_b'``: the ceiling of inner-plate estimators on top of the design."""
        return inner_plate_ceiling(self.v_between, self.v_within, max(self.v_between_left, 0.0))

    def k_star(self, c_outer: float, c_inner: float) -> float:
        """Cochran's ``K*`` with the design's components."""
        return optimal_inner_size(
            c_outer, c_inner, max(self.v_between_left, 0.0), max(self.v_within_left, 0.0)
        )

    def ecm(self, K: float, c_outer: float, c_inner: float) -> float:
        """Predicted ECM of the design at ``K`` against the plain ``K = 1`` baseline."""
        return effective_compute_multiplier(
            K,
            c_outer,
            c_inner,
            max(self.v_between, 0.0),
            max(self.v_within, 0.0),
            v_between_left=max(self.v_between_left, 0.0),
            v_within_left=max(self.v_within_left, 0.0),
        )

    def text(self, c_outer: float | None = None, c_inner: float | None = None, K: int = 8) -> str:
        """One readable line (with ``K*`` and the ECM at ``K`` when costs are given)."""
        share = self.v_between_removed / self.v_between if self.v_between > 0 else math.nan
        out = (
            f"{self.design}: V_b {self.v_between:.4g} -> {self.v_between_left:.4g} (removes "
            f"{share:.0%}), V_w {self.v_within:.4g} -> {self.v_within_left:.4g}; inner-plate "
            f"ceiling {self.ceiling_before:.3g}x before, {self.ceiling_after:.3g}x with it"
        )
        if c_outer is not None and c_inner is not None and c_inner > 0:
            out += (
                f"; K* {self.k_star(c_outer, c_inner):.3g}, predicted ECM at K = {K} "
                f"{self.ecm(K, c_outer, c_inner):.3g}"
            )
        return out


# -- pooled estimates -------------------------------------------------------------------------


class VarianceComponents:
    """Welford accumulator of per-step estimates of ``V_w`` and of ``V_b + V_w / K``.

    Mergeable (Chan et al.'s parallel update), so statistics from several processes combine:
    ``a.merge(b)`` equals the accumulator that saw both streams.

    Attributes:
        n_within: number of within estimates pooled.
        n_outer: number of between estimates pooled.
    """

    def __init__(self) -> None:
        self.n_within = 0
        self.mean_within = 0.0
        self.m2_within = 0.0
        self.n_outer = 0
        self.mean_between = 0.0
        self.m2_between = 0.0

    @staticmethod
    def _welford(n: int, mean: float, m2: float, x: float) -> tuple[int, float, float]:
        n += 1
        delta = x - mean
        mean += delta / n
        m2 += delta * (x - mean)
        return n, mean, m2

    @staticmethod
    def _chan(a: tuple[int, float, float], b: tuple[int, float, float]) -> tuple[int, float, float]:
        (na, ma, sa), (nb, mb, sb) = a, b
        n = na + nb
        if n == 0:
            return 0, 0.0, 0.0
        delta = mb - ma
        return n, ma + delta * nb / n, sa + sb + delta * delta * na * nb / n

    def update(self, v_within: float | None = None, v_between: float | None = None) -> None:
        """Add one step's estimates (``None`` where the step's layout cannot estimate it).

        Args:
            v_within: an unbiased estimate of ``V_w``.
            v_between: an unbiased estimate of ``V_b`` (may be negative: it is a difference).
        """
        if v_within is not None:
            self.n_within, self.mean_within, self.m2_within = self._welford(
                self.n_within, self.mean_within, self.m2_within, float(v_within)
            )
        if v_between is not None:
            self.n_outer, self.mean_between, self.m2_between = self._welford(
                self.n_outer, self.mean_between, self.m2_between, float(v_between)
            )

    def merge(self, other: VarianceComponents) -> VarianceComponents:
        """Combine with another accumulator in place and return ``self``."""
        self.n_within, self.mean_within, self.m2_within = self._chan(
            (self.n_within, self.mean_within, self.m2_within),
            (other.n_within, other.mean_within, other.m2_within),
        )
        self.n_outer, self.mean_between, self.m2_between = self._chan(
            (self.n_outer, self.mean_between, self.m2_between),
            (other.n_outer, other.mean_between, other.m2_between),
        )
        return self

    def state(self) -> list[float]:
        """The six numbers of the accumulator (for all-reduce / all-gather across ranks)."""
        return [
            self.n_within,
            self.mean_within,
            self.m2_within,
            self.n_outer,
            self.mean_between,
            self.m2_between,
        ]

    @classmethod
    def from_state(cls, state: Sequence[float]) -> VarianceComponents:
        """Inverse of `state`."""
        vc = cls()
        vc.n_within, vc.mean_within, vc.m2_within = int(state[0]), float(state[1]), float(state[2])
        vc.n_outer, vc.mean_between, vc.m2_between = int(state[3]), float(state[4]), float(state[5])
        return vc

    @property
    def v_within(self) -> float:
        """Pooled ``V_w`` (nan before any estimate)."""
        return self.mean_within if self.n_within else math.nan

    @property
    def v_between(self) -> float:
        """Pooled ``V_b``, clipped at 0 (nan before any estimate)."""
        return max(self.mean_between, 0.0) if self.n_outer else math.nan

    def stderr(self) -> tuple[float, float]:
        """Standard errors of the pooled ``(V_w, V_b)``."""

        def se(n: int, m2: float) -> float:
            return math.sqrt(m2 / (n - 1) / n) if n > 1 else math.nan

        return se(self.n_within, self.m2_within), se(self.n_outer, self.m2_between)

    def __repr__(self) -> str:
        return (
            f"VarianceComponents(v_between={self.v_between:.4g}, v_within={self.v_within:.4g}, "
            f"n={self.n_outer}/{self.n_within})"
        )


def anova_estimates(contrasts: Tensor, sizes: tuple[tuple[int, int], tuple[int, int]]):
    """Per-step unbiased estimates of ``V_w`` and ``V_b`` from the measuring step's contrasts.

    With the upstream samples in halves ``a_1, a_2`` and each one's inner draws in halves
    ``b_1, b_2`` (``R = |a_1| + |a_2|``, ``K = |b_1| + |b_2|``), the outer contrast
    ``D = mean_{a_1} - mean_{a_2}`` of the upstream samples' mean gradients has
    ``E|D|^2 = (V_b + V_w / K)(1/|a_1| + 1/|a_2|)``, and the inner contrast
    ``C = mean_r (mean_{b_1} g_r - mean_{b_2} g_r)`` has ``E|C|^2 = V_w (1/|b_1| + 1/|b_2|) / R``.

    Args:
        contrasts: ``(2, P)``: ``D`` then ``C`` (see
            [`contrast_weights`][carv_pyro.infer.loss.contrast_weights]).
        sizes: ``((|a_1|, |a_2|), (|b_1|, |b_2|))``; a zero-sized half is allowed (that
            contrast is then skipped).

    Returns:
        ``(v_within, v_between)``, each a float or ``None`` when the layout cannot estimate it
        (one upstream sample: no ``V_b``; one inner draw: no ``V_w``).
    """
    (a1, a2), (b1, b2) = sizes
    c = contrasts.to(torch.float64)
    R, K = a1 + a2, b1 + b2
    v_within = None
    if b1 > 0 and b2 > 0:
        v_within = float(c[1].dot(c[1])) * R / (1.0 / b1 + 1.0 / b2)
    v_between = None
    if a1 > 0 and a2 > 0:
        v_outer = float(c[0].dot(c[0])) / (1.0 / a1 + 1.0 / a2)
        v_between = v_outer - (v_within / K if v_within is not None else 0.0)
    return v_within, v_between


# -- report -----------------------------------------------------------------------------------


@dataclass
class AccountingReport:
    """Measured variance components and costs, with the predictions they imply.

    Attributes:
        v_between: ``V_b`` (parameter-gradient space).
        v_within: ``V_w`` per single draw.
        c_outer: seconds per upstream sample (forward and backward, teacher excluded).
        c_inner: seconds per teacher draw at the measured batch (``R K`` draws per call).
        R: outer samples of the layout the statistics were measured at.
        K: inner draws of that layout.
        teacher_seconds: measured seconds per teacher call at ``R * K`` draws, by ``K``.
        stderr: standard errors of ``(v_within, v_between)``.
        linear_cost: use ``c_outer + K c_inner`` even where ``teacher_seconds`` has a value.
    """

    v_between: float
    v_within: float
    c_outer: float
    c_inner: float
    R: int
    K: int
    teacher_seconds: dict[int, float] = field(default_factory=dict)
    stderr: tuple[float, float] = (math.nan, math.nan)
    linear_cost: bool = False

    @property
    def k_star(self) -> float:
        """Cochran's ``K*`` from the linear cost model."""
        return optimal_inner_size(self.c_outer, self.c_inner, self.v_between, self.v_within)

    def variance(self, R: int, K: int) -> float:
        """Predicted ``Var(R, K) = (V_b + V_w / K) / R``."""
        return (self.v_between + self.v_within / K) / R

    def cost(self, R: int, K: int) -> float:
        """Seconds per estimate: ``R c_outer`` plus the measured teacher time at ``R K`` draws
        when known (unless ``linear_cost``), else ``R (c_outer + K c_inner)``."""
        if not self.linear_cost and K in self.teacher_seconds and R == self.R:
            return R * self.c_outer + self.teacher_seconds[K]
        return R * (self.c_outer + K * self.c_inner)

    def ecm(self, K: int, R: int | None = None) -> float:
        """Effective compute multiplier of ``(R, K)`` against ``(R, 1)``:
        ``Var(R, 1) cost(R, 1) / (Var(R, K) cost(R, K))``."""
        R = self.R if R is None else R
        return (self.variance(R, 1) * self.cost(R, 1)) / (self.variance(R, K) * self.cost(R, K))

    def best_k(self, candidates: Sequence[int] | None = None) -> int:
        """The candidate ``K`` minimising ``Var(R, K) * cost(R, K)`` (measured costs first)."""
        ks = sorted(candidates or (self.teacher_seconds or {1, 2, 4, 8, 16, 32}))
        return min(ks, key=lambda k: self.variance(self.R, k) * self.cost(self.R, k))

    def table(self, candidates: Sequence[int] | None = None) -> str:
        """A readable table of predicted variance, cost and ECM by ``K``."""
        ks = sorted(candidates or (self.teacher_seconds or {1, 2, 4, 8, 16, 32}))
        se_w, se_b = self.stderr
        lines = [
            f"V_b = {self.v_between:.4g} (se {se_b:.2g})   V_w = {self.v_within:.4g} (se {se_w:.2g})",
            f"c_outer = {self.c_outer * 1e3:.3g} ms   c_inner = {self.c_inner * 1e3:.3g} ms"
            f"   K* = {self.k_star:.3g}   best K = {self.best_k(ks)}   (R = {self.R})",
            f"{'K':>5} {'Var(R,K)':>12} {'cost (ms)':>10} {'ECM':>7}",
        ]
        for k in ks:
            lines.append(
                f"{k:>5} {self.variance(self.R, k):>12.4g} {self.cost(self.R, k) * 1e3:>10.3g} "
                f"{self.ecm(k):>7.3g}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def plot(self, path: str, candidates: Sequence[int] | None = None) -> str:
        """Write a PNG of predicted variance against cost for a range of ``K``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ks = sorted(candidates or (self.teacher_seconds or {1, 2, 4, 8, 16, 32, 64}))
        cost = [self.cost(self.R, k) * 1e3 for k in ks]
        var = [self.variance(self.R, k) for k in ks]
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.plot(cost, var, "o-")
        for k, c, v in zip(ks, cost, var):
            ax.annotate(f"K={k}", (c, v), textcoords="offset points", xytext=(4, 4), fontsize=8)
        # equal-efficiency reference through K = 1: Var * cost = const
        c1, v1 = cost[0], var[0]
        xs = torch.linspace(min(cost), max(cost), 50)
        ax.plot(xs, v1 * c1 / xs, "--", color="gray", label="ECM = 1 (same Var x cost as K=1)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("cost per estimate (ms)")
        ax.set_ylabel("predicted Var(R, K)")
        ax.set_title(f"variance against cost, R = {self.R} (K* = {self.k_star:.2g})")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


# -- the measured cost curve ------------------------------------------------------------------


def fit_cost_curve(costs: dict[int, float]) -> tuple[float, float]:
    """Least-squares line ``cost(K) = a + b K`` through measured step costs, with ``b >= 0``.

    Args:
        costs: ``{K: seconds}`` at two or more distinct ``K``.

    Returns:
        ``(a, b)``; with one point the line is flat through it (``b = 0``).
    """
    ks = sorted(costs)
    if not ks:
        raise ValueError("fit_cost_curve needs at least one measured cost")
    if len(ks) == 1:
        return costs[ks[0]], 0.0
    x = torch.tensor(ks, dtype=torch.float64)
    y = torch.tensor([costs[k] for k in ks], dtype=torch.float64)
    xm, ym = x.mean(), y.mean()
    b = float(((x - xm) * (y - ym)).sum() / ((x - xm) ** 2).sum())
    b = max(b, 0.0)
    return float(ym - b * xm), b


# -- the online accountant --------------------------------------------------------------------


@dataclass
class _Measurement:
    step: int
    v_within: float | None
    v_between: float | None


#: The most timings an accountant keeps pending before it waits for the oldest.
_MAX_PENDING = 32


@dataclass
class _Timing:
    """One particle's timings, kept until its stopwatches can be read without waiting."""

    R: int
    K: int
    n_draws: int
    measured: bool
    step: Any  # a stopped Stopwatch, or seconds
    teacher: Any  # a stopped Stopwatch, seconds, or None (no teacher time)

    def ready(self) -> bool:
        return is_ready(self.step) and is_ready(self.teacher)

    def seconds(self) -> tuple[float, float]:
        return seconds_of(self.step), seconds_of(self.teacher)


class Accountant:
    """Running variance components and costs during SVI; optionally sets ``K`` online.

    Pass it to [`CARVLoss`][carv_pyro.CARVLoss] (``CARVLoss(accountant=Accountant(...))``); it is
    the loss's [`LossObserver`][carv_pyro.infer.loss.LossObserver]. Every ``every``-th step the
    loss runs three backward passes instead of one (the gradient and two contrasts, see the
    module docstring) so that the step also estimates ``V_b`` and ``V_w``; every other step it
    times the step and its teacher call. Overhead: two extra vector-Jacobian products through
    the upstream every ``every`` steps. An adapting accountant measures less often while its
    choice holds: each measurement that leaves ``K`` where it was multiplies the interval by
    ``backoff`` (up to ``max_every``), and a change of ``K`` resets it to ``every``, so that a
    short run pays for the measurements that decide ``K`` and a long one does not keep paying
    for a settled choice. With ``max_overhead`` the interval is also long enough that the
    measuring steps' extra seconds (the recent measuring steps' median time minus a plain
    step's) stay below that fraction of the plain steps' time after them: where the
    upstream's backward is dear (about 0.9 plain steps' worth extra on the 2-core CPU's
    text-to-3D step) it measures less often than ``every`` would; where a measuring step is
    nearly free, as often.

    With ``adapt=True`` it sets the size of the term's reserved inner plate
    ([`carv_pyro.draws`][carv_pyro.draws]) after each measurement to the ``K`` that minimises
    the predicted ``Var(R, K) * cost(R, K)``, where ``cost`` is `cost_of`'s: the recent steps
    without their teacher call plus the teacher's measured cost curve at ``K``. The
    first measurement of an adapting accountant is on its second step (the first tells it the
    plate's size, so that a measuring step at K = 1 can probe K = 2). The update is robust: the components
    are pooled over the last ``window`` measurements, a ``V_b`` estimate at or below zero counts
    as one standard error (a small measurement, not zero), and ``K`` changes by at most a factor
    ``max_change`` per update.

    Args:
        plate: the name of the term's inner plate, checked against the model (an error if the
            term's inner plate has another name); default: whatever the term's layout says.
        k_range: ``(min, max)`` clamp for ``K``.
        every: measure the variance components every this many steps.
        window: pool the last this many measurements (the parameters move, so old ones fade).
        adapt: set ``K`` online (needs a reserved inner plate).
        min_measurements: measurements needed before adapting.
        costs: a declared cost model ``(c_outer, c_inner)`` in seconds instead of measured ones.
        term: the teacher term to account for (default: the only one).
        max_change: the largest factor by which one update may change ``K``.
        backoff: with ``adapt``, the factor by which the interval between measurements grows
            after a measurement that leaves ``K`` unchanged (``1``: a fixed cadence).
        max_every: the longest interval between measurements (default ``8 * every``).
        history_size: the most recent measurements kept in ``history`` (a long run's memory
            stays bounded).
        tolerance: with ``adapt``, keep the current ``K`` unless another candidate's predicted
            ``Var * cost`` is lower by more than this fraction (``0``: always move to the
            minimum).
        max_overhead: the largest fraction of the plain steps' time that measuring may add
            (``None``: no bound, the cadence is ``every`` and ``backoff``'s alone); never past
            ``max_every``. The ``auto`` preset uses ``0.1``.

    Attributes:
        k: the inner size now in use (``None`` until adapted: the guide's or the model's).
        components: pooled `VarianceComponents` over the window.
        history: the last ``history_size`` per-measurement dicts (step, V_b, V_w, costs, K*, K,
            predicted ECM, and ``measuring_extra``: the recent measuring steps' median extra
            seconds as a fraction of a plain step's), oldest first. ``k_star`` is Cochran's
            closed form under the linear cost ``c_outer + K c_inner``; ``ecm_predicted`` (of
            the ``K`` in use against ``K = 1``) uses the cost model ``K`` is chosen by
            (`cost_of`: the steps' cost without the teacher plus the teacher's cost curve), so
            on a launch-bound GPU, where a larger ``K`` is nearly free, ``k_star`` can sit
            below the ``K`` chosen while ``ecm_predicted`` is above one.
        step_costs: ``{K: median seconds of a step}`` at the sizes run so far.

    Raises:
        ValueError: naming the first invalid argument.
    """

    def __init__(
        self,
        *,
        plate: str | None = None,
        k_range: tuple[int, int] = (1, 64),
        every: int = 10,
        window: int = 20,
        adapt: bool = False,
        min_measurements: int = 3,
        costs: tuple[float, float] | None = None,
        term: str | None = None,
        max_change: float = 2.0,
        backoff: float = 2.0,
        max_every: int | None = None,
        history_size: int = 1000,
        tolerance: float = 0.05,
        max_overhead: float | None = None,
    ):
        if plate is not None:
            _checks.instance("plate", plate, str, "a plate name or None")
        try:
            lo, hi = k_range
        except (TypeError, ValueError):
            raise ValueError(
                f"k_range must be a pair (min, max) of integers, got {k_range!r}"
            ) from None
        _checks.positive_int("k_range[0]", lo)
        _checks.positive_int("k_range[1]", hi)
        if lo > hi:
            raise ValueError(f"k_range must satisfy 1 <= min <= max, got {k_range!r}")
        _checks.positive_int("every", every)
        _checks.positive_int("window", window, maximum=10**9)
        _checks.instance("adapt", adapt, bool, "True or False")
        _checks.positive_int("min_measurements", min_measurements)
        if costs is not None:
            if not isinstance(costs, (tuple, list)) or len(costs) != 2:
                raise ValueError(
                    f"costs must be a pair (c_outer, c_inner) of seconds, got {costs!r}"
                )
            c_outer = _checks.non_negative_float("costs[0] (c_outer)", costs[0])
            c_inner = _checks.positive_float("costs[1] (c_inner)", costs[1])
            costs = (c_outer, c_inner)
        if term is not None:
            _checks.instance("term", term, str, "a term name or None")
        max_change = _checks.positive_float("max_change", max_change)
        if max_change < 1.0:
            raise ValueError(f"max_change must be >= 1, got {max_change!r}")
        backoff = _checks.positive_float("backoff", backoff)
        if backoff < 1.0:
            raise ValueError(f"backoff must be >= 1 (1: a fixed cadence), got {backoff!r}")
        if max_every is None:
            max_every = 8 * every
        _checks.positive_int("max_every", max_every)
        if max_every < every:
            raise ValueError(f"max_every must be >= every={every}, got {max_every!r}")
        _checks.positive_int("history_size", history_size, maximum=10**9)
        tolerance = _checks.non_negative_float("tolerance", tolerance)
        if tolerance >= 1.0:
            raise ValueError(f"tolerance must be in [0, 1), got {tolerance!r}")
        if max_overhead is not None:
            max_overhead = _checks.positive_float("max_overhead", max_overhead)
        self.plate = plate
        self.k_range = (lo, hi)
        self.every = every
        self.window = window
        self.adapt = adapt
        self.min_measurements = min_measurements
        self.costs = costs
        self.term = term
        self.max_change = max_change
        self.backoff = backoff
        self.max_every = max_every
        self.tolerance = tolerance
        self.max_overhead = max_overhead
        self.k: int | None = None
        self.step = 0
        self._measurements: deque[_Measurement] = deque(maxlen=window)
        self._outer_times: deque[float] = deque(maxlen=window)
        self._inner_times: deque[float] = deque(maxlen=window)
        self._step_times: dict[int, deque[float]] = {}
        self._teacher_times: dict[int, deque[float]] = {}
        self.components = VarianceComponents()
        self.history: deque[dict[str, Any]] = deque(maxlen=history_size)
        self._interval = float(every)
        self._next_measure = 0
        self.last_R: int | None = None
        self.last_K: int | None = None
        self._checked = False
        self._pending: deque[_Timing] = deque()
        # the recent measuring steps' seconds (a single one is noisy on a GPU: 0-4 plain
        # steps' worth extra in one race, where the median was 0.3)
        self._measuring_times: deque[float] = deque(maxlen=5)

    # -- the observer protocol ----------------------------------------------------------------
    def inner_size(self) -> int | None:
        """The reserved inner plate's size for this step (``None``: not adapted yet)."""
        # V_w needs two inner draws: a measuring step at K = 1 probes with K = 2 (any K is
        # unbiased), so that an accountant that chose K = 1, or an adapting one that starts
        # there (the "auto" preset), can still measure V_w and change its mind.
        k = self.k if self.k is not None else (self.last_K if self.adapt else None)
        return 2 if k == 1 and self.wants_components() else self.k

    def wants_components(self) -> bool:
        """Whether this step estimates the variance components."""
        if self.adapt and self.k is None and self.last_K is None:
            # the very first step of an adapting accountant: the plate's size is not known yet,
            # so it could not probe K = 2 and would measure V_b alone; measure on the next step
            return False
        return self.step >= self._next_measure

    def select(self, records: list) -> Any:
        """The record of the accounted term (raises if ambiguous or absent)."""
        if not records:
            return None
        if self.term is None:
            if len(records) > 1:
                names = [r.name for r in records]
                raise ValueError(
                    f"the model has several teacher terms {names}; pass Accountant(term=...)"
                )
            return records[0]
        for r in records:
            if r.name == self.term:
                return r
        raise ValueError(
            f"Accountant(term={self.term!r}) not found among {[r.name for r in records]}"
        )

    def _check_layout(self, record) -> None:
        layout = record.layout
        if self.plate is not None and layout.inner_plate != self.plate:
            plates = [f.name for f in layout.plates]
            raise ValueError(
                f"Accountant(plate={self.plate!r}) does not name the inner plate of term "
                f"{record.name!r}: its inner plate is {layout.inner_plate!r} (enclosing plates "
                f"{plates})"
            )
        if self.adapt and not layout.reserved:
            raise ValueError(
                f"Accountant(adapt=True) resizes the reserved inner plate, but term "
                f"{record.name!r} has its inner draws in "
                + (
                    f"the plain pyro.plate {layout.inner_plate!r}"
                    if layout.inner_plate
                    else "no inner plate at all"
                )
                + "; write them as `with carv_pyro.draws(K): teacher_term(...)`"
            )
        self._checked = True

    def observe(self, report) -> None:
        """Record one particle's `StepReport`: its costs, and its components if measured.

        The step's timings are kept pending while the device has not finished the step (CUDA
        events, see [`Stopwatch.ready`][carv_pyro.timing.Stopwatch.ready]): a later step folds
        them in once they are ready, without waiting; anything that needs the numbers (a
        measuring step, `cost_of`, `cost_estimates`, `step_costs`, `teacher_costs`, `report`,
        pickling) reads them all first, in order, so every decision is the one made had they
        been read at once. CPU stopwatches are always ready: folded in here.
        """
        record = report.record
        if not self._checked:
            self._check_layout(record)
        R, K = record.n_outer, record.n_inner
        self.last_R, self.last_K = R, K
        measured = report.contrasts is not None
        pending = self._timings()
        pending.append(
            _Timing(R, K, record.layout.n_draws, measured, report.step_time, report.teacher_time)
        )
        if measured:
            # a measuring step reads its contrasts (a synchronisation) anyway
            self._resolve_timings(force=True)
            v_within, v_between = anova_estimates(report.contrasts, report.contrast_sizes)
            self.observe_measurement(v_within, v_between)
        else:
            self._resolve_timings(force=False)

    def _timings(self) -> deque[_Timing]:
        """The pending timings (an accountant restored from an older state has none)."""
        pending = self.__dict__.get("_pending")
        if pending is None:
            pending = self._pending = deque()
        return pending

    def _resolve_timings(self, force: bool = True) -> None:
        """Fold pending timings into the cost statistics, oldest first: all of them with
        ``force`` (waits for the device), else those ready now (and, past `_MAX_PENDING`, the
        oldest, so that the queue stays bounded when the device is far behind)."""
        for timing in take_ready(self._timings(), _MAX_PENDING, force=force):
            self._fold_timing(timing)

    def _fold_timing(self, timing: _Timing) -> None:
        step_seconds, teacher_seconds = timing.seconds()
        K = timing.K
        # a measuring step runs three backward passes: its time is not what a step costs, so it
        # is kept only while no other timing is known
        if not timing.measured or not self._outer_times:
            rest = max(step_seconds - teacher_seconds, 0.0)
            self._outer_times.append(rest / timing.R)
            self._inner_times.append(teacher_seconds / timing.n_draws)
        if not timing.measured:
            self._step_times.setdefault(K, deque(maxlen=self.window)).append(step_seconds)
        else:  # (an accountant restored from an older state has no such deque yet)
            self.__dict__.setdefault("_measuring_times", deque(maxlen=5)).append(step_seconds)
        if teacher_seconds > 0:
            # the teacher call costs the same on a measuring step (only the backward differs),
            # and a measuring step at K = 1 runs K = 2: this is how the batch-dependent cost of
            # the teacher is learned before any plain step has run at another K
            times = self._teacher_times.setdefault(K, deque(maxlen=self.window))
            times.append(teacher_seconds)

    def __getstate__(self) -> dict[str, Any]:
        """The state to pickle, with every pending timing read first (nothing of the device
        in it, and a resumed run starts from the numbers the running one goes on with)."""
        self._resolve_timings(force=True)
        return dict(self.__dict__)

    def end_step(self) -> None:
        """Count a step (called by the loss after each step with a backward)."""
        self.step += 1

    # -- updates ------------------------------------------------------------------------------
    def observe_measurement(self, v_within: float | None, v_between: float | None) -> None:
        """Record one step's variance estimates and adapt ``K`` if asked."""
        # the measuring step's price against the plain steps around it (at the K they ran)
        overhead = self._overhead_ratio()
        self._measurements.append(_Measurement(self.step, v_within, v_between))
        vc = VarianceComponents()
        for m in self._measurements:
            vc.update(m.v_within, m.v_between)
        self.components = vc
        c_outer, c_inner = self.cost_estimates()
        entry: dict[str, Any] = {
            "step": self.step,
            "v_between": vc.v_between,
            "v_within": vc.v_within,
            "c_outer": c_outer,
            "c_inner": c_inner,
        }
        if overhead is not None:
            entry["measuring_extra"] = overhead
        ok = vc.n_within >= 1 and vc.n_outer >= 1 and math.isfinite(c_outer) and c_inner > 0
        k_before = self.k
        adapted = False
        v_b = self._robust_between(vc) if ok else math.nan
        # one measurement with V_b <= 0 has no standard error to floor it: no K* from it
        ok = ok and math.isfinite(v_b)
        if ok:
            v_w = max(vc.v_within, 0.0)
            entry["k_star"] = optimal_inner_size(c_outer, c_inner, v_b, v_w)
            if self.adapt and len(self._measurements) >= self.min_measurements:
                self.k = self._choose_k(v_b, v_w)
                adapted = True
            k_now = self.k if self.k is not None else self.last_K
            if k_now:
                # by the cost model the choice is made with (the measured cost curve), not the
                # linear c_outer + K c_inner of k_star: on a launch-bound GPU the linear model
                # calls a free K dear, and the record contradicted the choice it sits beside
                entry["ecm_predicted"] = self._work(1, v_b, v_w) / self._work(k_now, v_b, v_w)
        entry["K"] = self.k if self.k is not None else self.last_K
        self.history.append(entry)
        # a settled choice is measured less and less often; a change is watched closely again
        if adapted and self.k == k_before:
            self._interval = min(self._interval * self.backoff, float(self.max_every))
        elif adapted:
            self._interval = float(self.every)
        gap = max(int(round(self._interval)), 1, self._overhead_gap(overhead))
        self._next_measure = self.step + min(gap, self.max_every)

    def _overhead_ratio(self) -> float | None:
        """The recent measuring steps' median extra seconds over a plain step's, as a fraction
        of the plain step's (at the ``K`` in use); ``None`` where either is unknown or the
        costs are declared."""
        times = self.__dict__.get("_measuring_times")  # (an older pickle has none)
        k = self.k if self.k is not None else self.last_K
        if not times or k is None or self.costs is not None:
            return None
        seconds = statistics.median(times)
        if not any(self.step_costs.values()):  # no plain step timed: nothing to compare with
            return None
        plain = self.cost_of(k)
        if not (math.isfinite(plain) and plain > 0):
            return None
        return max(seconds - plain, 0.0) / plain

    def _overhead_gap(self, ratio: float | None) -> int:
        """The fewest steps until the next measurement that keep its extra seconds below
        ``max_overhead`` of the plain steps' time (0: no bound, or nothing timed)."""
        bound = self.__dict__.get("max_overhead")  # (an older pickle has none)
        if bound is None or ratio is None:
            return 0
        # this measuring step, then enough plain steps to pay for its extra
        return 1 + math.ceil(ratio / bound - 1e-9)

    @staticmethod
    def _robust_between(vc: VarianceComponents) -> float:
        """``V_b`` for decisions: the pooled mean, but never below one standard error (a
        non-positive estimate says ``V_b`` is small, not that it is zero); ``nan`` when the
        estimate is not positive and has no standard error yet (one measurement)."""
        _, se_b = vc.stderr()
        if vc.mean_between > 0:
            return vc.mean_between if not math.isfinite(se_b) else max(vc.mean_between, se_b)
        if not math.isfinite(se_b) or se_b <= 0:
            return math.nan  # a single non-positive estimate: no scale to floor it at
        return se_b

    def cost_of(self, K: int) -> float:
        """The predicted seconds of a step at ``K``: from the declared costs if given; else,
        once the teacher has been timed at two sizes, the recent plain steps' cost without
        their teacher call (pooled over every ``K``) plus the teacher's measured cost curve at
        ``K``; before that, the step measured at ``K`` (or a line through the measured steps,
        or the per-draw costs)."""
        if self.costs is not None:
            c_outer, c_inner = self.costs
            return (self.last_R or 1) * (c_outer + K * c_inner)
        teacher = self.teacher_costs  # (reads the pending timings first)
        c_outer, c_inner = self.cost_estimates()  # (pooled over ranks where there are ranks)
        if math.isfinite(c_outer) and len(teacher) >= 2:
            # only the teacher's share of a step depends on K. Whole-step medians per K compare
            # steps taken at different times (K = 1 in the first, slower steps of a run, K = 2
            # later): on the CPU race they made K = 2 look 5-16% cheaper than K = 1, whose
            # teacher call it doubles; the rest of a step, pooled over the recent steps, is
            # the same for every K, and the teacher's curve carries what K changes (flat on a
            # launch-bound GPU, where K is then nearly free)
            a, b = fit_cost_curve(teacher)
            return (self.last_R or 1) * c_outer + a + b * K
        measured = self.step_costs
        if K in measured:
            return measured[K]
        if len(measured) >= 2:
            a, b = fit_cost_curve(measured)
            return a + b * K
        R = self.last_R or 1
        return R * (c_outer + K * c_inner)

    def _work(self, k: int, v_between: float, v_within: float) -> float:
        """The predicted ``Var(R, k) * cost(R, k)``, up to the factor ``1 / R``."""
        return (v_between + v_within / k) * self.cost_of(k)

    def _choose_k(self, v_between: float, v_within: float) -> int:
        lo, hi = self.k_range
        k_now = self.k if self.k is not None else (self.last_K or lo)
        low = max(lo, math.ceil(k_now / self.max_change))
        high = min(hi, max(low, math.floor(k_now * self.max_change)))

        def work(k: int) -> float:
            return self._work(k, v_between, v_within)

        best = min(range(low, high + 1), key=work)
        # where Var * cost is flat in K, measurement noise would flip K back and forth (and
        # every change brings the measuring cadence back to `every`): move only for a real gain
        if low <= k_now <= high and work(best) > (1.0 - self.tolerance) * work(k_now):
            return k_now
        return best

    # -- reading ------------------------------------------------------------------------------
    @property
    def step_costs(self) -> dict[int, float]:
        """``{K: median seconds of a (non-measuring) step}`` at the sizes run so far."""
        self._resolve_timings()
        return {k: statistics.median(v) for k, v in sorted(self._step_times.items()) if v}

    @property
    def teacher_costs(self) -> dict[int, float]:
        """``{K: median seconds of the teacher call}`` at the sizes run so far (measuring steps
        included)."""
        self._resolve_timings()
        return {k: statistics.median(v) for k, v in sorted(self._teacher_times.items()) if v}

    def cost_estimates(self) -> tuple[float, float]:
        """``(c_outer, c_inner)``: declared, or medians of the recent measured steps."""
        if self.costs is None:
            self._resolve_timings()
        return self._cost_medians()

    def _cost_medians(self) -> tuple[float, float]:
        """`cost_estimates` from the timings folded in so far (no wait for the device)."""
        if self.costs is not None:
            return self.costs
        if not self._outer_times:
            return math.nan, math.nan
        return statistics.median(self._outer_times), statistics.median(self._inner_times)

    @property
    def k_star(self) -> float:
        """The current ``K*`` estimate (nan until measured)."""
        return self.history[-1].get("k_star", math.nan) if self.history else math.nan

    @property
    def predicted_ecm(self) -> float:
        """Predicted ECM of the current ``K`` (nan until measured)."""
        return self.history[-1].get("ecm_predicted", math.nan) if self.history else math.nan

    def summary(self) -> dict[str, float]:
        """A flat, loggable dict: ``K``, ``k_star``, ``ecm_predicted``, ``v_between``,
        ``v_within``, ``c_outer``, ``c_inner``.

        For logging every step: it never waits for the device, so on a GPU its costs are
        those of the steps the device has finished (`cost_estimates` waits for all)."""
        self._resolve_timings(force=False)
        c_outer, c_inner = self._cost_medians()
        k = self.k if self.k is not None else self.last_K
        return {
            "K": float(k) if k is not None else math.nan,
            "k_star": self.k_star,
            "ecm_predicted": self.predicted_ecm,
            "v_between": self.components.v_between,
            "v_within": self.components.v_within,
            "c_outer": c_outer,
            "c_inner": c_inner,
        }

    def report(self) -> AccountingReport:
        """The current estimates as an `AccountingReport`."""
        c_outer, c_inner = self.cost_estimates()
        return AccountingReport(
            v_between=self.components.v_between,
            v_within=self.components.v_within,
            c_outer=c_outer,
            c_inner=c_inner,
            R=self.last_R or 1,
            K=self.last_K or 1,
            stderr=self.components.stderr(),
            linear_cost=True,
        )
