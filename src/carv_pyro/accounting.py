"""Compute-aware variance accounting: measure ``V_b``, ``V_w`` and costs, choose ``K``.

With ``V_b = Var_xi(E[g | xi])`` (between upstream samples) and ``V_w = E_xi[Var(g | xi)]``
(within, per single draw), both traces of covariances in parameter-gradient space, the
hierarchical estimator with ``R`` upstream samples and ``K`` inner draws each has

    Var(R, K) = (V_b + V_w / K) / R,        cost(R, K) = R (c_outer + K c_inner),

so the compute-optimal inner size is Cochran's ``K* = sqrt((c_outer / c_inner) (V_w / V_b))``
and the effective compute multiplier of ``K`` against ``K = 1`` is

    ECM(K) = (V_b + V_w)(c_outer + c_inner) / [(V_b + V_w / K)(c_outer + K c_inner)].

**How the components are estimated.** One step's draws are split into quadrants: two halves of
the upstream samples times two interleaved halves of the inner draws. Four vector-Jacobian
products (instead of one) give the quadrants' gradient sums ``Q_ab``, whose sum is the usual
gradient. Within an upstream half, the difference of the two inner halves' means has expected
squared norm ``V_w (1/|b_1| + 1/|b_2|) / |a|``; the difference of the two upstream halves' means
has ``(V_b + V_w / K)(1/|a_1| + 1/|a_2|)``. Both give unbiased per-step estimates that
`VarianceComponents` pools (Welford, mergeable across processes). The estimates treat the
inner draws as exchangeable: with stratified timesteps, draws within an upstream sample are
negatively correlated and ``V_w`` is over-estimated (conservatively).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyro
import torch
from einops import rearrange
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
from torch import Tensor

from .guides import _group, inner_dims
from .primitives import TermRecord
from .timing import Stopwatch

__all__ = [
    "optimal_inner_size",
    "effective_compute_multiplier",
    "VarianceComponents",
    "AccountingReport",
    "Accountant",
    "PlateResizer",
    "measure",
    "anova_estimates",
]


# -- formulas ---------------------------------------------------------------------------------


def _check_nonneg(**values: float) -> None:
    for name, v in values.items():
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")


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
    K: float, c_outer: float, c_inner: float, v_between: float, v_within: float
) -> float:
    """ECM of ``K`` inner draws against ``K = 1`` under the linear cost model.

    ``ECM(K) = (V_b + V_w)(c_outer + c_inner) / [(V_b + V_w / K)(c_outer + K c_inner)]``:
    how many times less compute the ``(R, K)`` estimator needs for the same variance.

    Raises:
        ValueError: on negative or non-finite input or ``K <= 0``.
    """
    _check_nonneg(c_outer=c_outer, c_inner=c_inner, v_between=v_between, v_within=v_within)
    if not (isinstance(K, (int, float)) and K > 0 and math.isfinite(K)):
        raise ValueError(f"K must be a finite number > 0, got {K!r}")
    den = (v_between + v_within / K) * (c_outer + K * c_inner)
    if den == 0:
        raise ValueError("variance and cost are both zero: the ECM is undefined")
    return (v_between + v_within) * (c_outer + c_inner) / den


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


def _halves(n: int, interleaved: bool) -> tuple[Tensor, Tensor]:
    idx = torch.arange(n)
    if interleaved:
        return idx[0::2], idx[1::2]
    return idx[: n // 2], idx[n // 2 :]


def anova_estimates(quadrants: Tensor, sizes: tuple[tuple[int, int], tuple[int, int]]):
    """Per-step unbiased estimates of ``V_w`` and ``V_b`` from quadrant gradient sums.

    Args:
        quadrants: ``(2, 2, P)`` sums of per-draw gradients over (upstream half ``a``) x (inner
            half ``b``); a zero-sized half is allowed (its estimate is then skipped).
        sizes: ``((|a_1|, |a_2|), (|b_1|, |b_2|))``.

    Returns:
        ``(v_within, v_between)``, each a float or ``None`` when the layout cannot estimate it
        (one upstream sample: no ``V_b``; one inner draw: no ``V_w``).
    """
    (a1, a2), (b1, b2) = sizes
    q = quadrants.to(torch.float64)
    v_within = None
    if b1 > 0 and b2 > 0:
        ests = []
        for a, na in ((0, a1), (1, a2)):
            if na == 0:
                continue
            diff = q[a, 0] / (na * b1) - q[a, 1] / (na * b2)
            ests.append(float(diff.dot(diff)) * na / (1.0 / b1 + 1.0 / b2))
        v_within = sum(ests) / len(ests)
    v_between = None
    if a1 > 0 and a2 > 0:
        k = b1 + b2
        o1 = (q[0, 0] + q[0, 1]) / (a1 * k)
        o2 = (q[1, 0] + q[1, 1]) / (a2 * k)
        diff = o1 - o2
        v_outer = float(diff.dot(diff)) / (1.0 / a1 + 1.0 / a2)
        v_between = v_outer - (v_within / k if v_within is not None else 0.0)
    return v_within, v_between


def _params_of(*traces) -> list[Tensor]:
    params: dict[int, Tensor] = {}
    for tr in traces:
        for site in tr.nodes.values():
            if site["type"] == "param":
                p = site["value"].unconstrained()
                if p.requires_grad:
                    params[id(p)] = p
    return list(params.values())


def quadrant_backward(
    record: TermRecord, weights: Tensor, rest: Tensor | None, params: list[Tensor], scale: float
) -> tuple[Tensor, tuple[tuple[int, int], tuple[int, int]]]:
    """Accumulate the step's gradient into ``.grad`` by quadrants; return their sums.

    Args:
        record: the measured teacher term.
        weights: its importance weights, ``batch_shape``.
        rest: the rest of the surrogate (other terms, observed sites) or ``None``.
        params: the unconstrained parameters to differentiate.
        scale: factor on the accumulated gradient (``1 / num_particles``).

    Returns:
        ``(quadrants (2, 2, P) float64 sums of per-draw gradients, sizes)``.
    """
    inner = inner_dims(record.batch_shape, record.outer_shape)
    src, dst, sizes = _group(record.batch_shape, inner)
    per_draw = weights.to(record.surrogate.dtype) * record.surrogate
    grouped = rearrange(per_draw, f"{src} -> {dst}", **sizes)
    n_outer, n_inner = grouped.shape
    rows = _halves(n_outer, interleaved=False)
    cols = _halves(n_inner, interleaved=True)
    n = record.t.numel()
    quadrant_sums = []
    total = [torch.zeros_like(p) for p in params]
    pieces = [(a, b) for a in range(2) for b in range(2) if len(rows[a]) and len(cols[b])]
    for i, (a, b) in enumerate(pieces):
        s = grouped[rows[a]][:, cols[b]].sum()
        last = i == len(pieces) - 1 and (rest is None or not rest.requires_grad)
        grads = torch.autograd.grad(s, params, retain_graph=not last, allow_unused=True)
        flat = []
        for j, (p, g) in enumerate(zip(params, grads)):
            g = torch.zeros_like(p) if g is None else g
            total[j] += g / n
            flat.append(g.reshape(-1))
        quadrant_sums.append(((a, b), torch.cat(flat).to(torch.float64)))
    if rest is not None and rest.requires_grad:
        grads = torch.autograd.grad(rest, params, allow_unused=True)
        for j, g in enumerate(grads):
            if g is not None:
                total[j] += g
    for p, g in zip(params, total):
        g = g * scale
        p.grad = g if p.grad is None else p.grad + g
    n_params = sum(p.numel() for p in params)
    q = torch.zeros(2, 2, n_params, dtype=torch.float64)
    for (a, b), g in quadrant_sums:
        q[a, b] = g
    return q, ((len(rows[0]), len(rows[1])), (len(cols[0]), len(cols[1])))


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


# -- plate resizing ---------------------------------------------------------------------------


class PlateResizer(Messenger):
    """Runs a model with some plates resized: ``{"noise": 16}`` makes ``pyro.plate("noise", 8)``
    hold 16 draws.

    The model stays plain Pyro: its plate declares a default size, and the accountant decides
    the size actually used. Teacher terms average over their plates, so their estimates keep
    their meaning at any size.
    """

    def __init__(self, sizes: dict[str, int]):
        super().__init__()
        self.sizes = dict(sizes)

    def _pyro_sample(self, msg) -> None:
        if isinstance(msg["fn"], _Subsample) and msg["name"] in self.sizes:
            fn = msg["fn"]
            size = self.sizes[msg["name"]]
            msg["value"] = torch.arange(size, device=getattr(fn, "device", None))


# -- the online accountant --------------------------------------------------------------------


@dataclass
class _Measurement:
    step: int
    v_within: float | None
    v_between: float | None


class Accountant:
    """Running variance components and costs during SVI; optionally sets ``K`` to ``K*``.

    Pass it to [`CARVLoss`][carv_pyro.CARVLoss] (``CARVLoss(accountant=Accountant(...))``). Every
    ``every``-th step it replaces the one backward pass by four (one per quadrant, see the module
    docstring) to estimate ``V_b`` and ``V_w``; every step it times the teacher and the rest.
    Overhead: three extra vector-Jacobian products through the upstream every ``every`` steps
    (about ``3 / every`` of one upstream backward per step), plus reading the timers.

    Args:
        plate: name of the inner plate to resize; default: detected from the term's plates.
        k_range: ``(min, max)`` clamp for ``K``.
        every: measure the variance components every this many steps.
        window: pool the last this many measurements (the parameters move, so old ones fade).
        adapt: set the inner plate to the clamped, rounded ``K*`` after each measurement.
        min_measurements: measurements needed before adapting.
        costs: a declared cost model ``(c_outer, c_inner)`` in seconds instead of measured ones.
        term: the teacher term to account for (default: the only one).

    Attributes:
        k: the inner size now in use (``None`` until adapted: the model's own size).
        components: pooled `VarianceComponents` over the window.
        history: per-measurement dicts (step, V_b, V_w, costs, K*, K, predicted ECM).
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
    ):
        lo, hi = k_range
        if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
            raise ValueError(f"k_range must be integers 1 <= min <= max, got {k_range!r}")
        if not (isinstance(every, int) and every >= 1):
            raise ValueError(f"every must be a positive integer, got {every!r}")
        if not (isinstance(window, int) and window >= 1):
            raise ValueError(f"window must be a positive integer, got {window!r}")
        if costs is not None:
            c_outer, c_inner = costs
            _check_nonneg(c_outer=c_outer, c_inner=c_inner)
            if c_inner <= 0:
                raise ValueError("costs: c_inner must be > 0")
        self.plate = plate
        self.k_range = (lo, hi)
        self.every = every
        self.window = window
        self.adapt = adapt
        self.min_measurements = min_measurements
        self.costs = costs
        self.term = term
        self.k: int | None = None
        self.step = 0
        self._measurements: deque[_Measurement] = deque(maxlen=window)
        self._outer_times: deque[float] = deque(maxlen=window)
        self._inner_times: deque[float] = deque(maxlen=window)
        self.components = VarianceComponents()
        self.history: list[dict] = []
        self.last_R: int | None = None
        self.last_K: int | None = None

    # hooks called by CARVLoss ------------------------------------------------------------
    def resizer(self) -> Messenger:
        """Handler applied around the model and guide for this step."""
        if self.k is None or self.plate is None:
            return PlateResizer({})
        # V_w needs two inner draws: a measuring step at K = 1 probes with K = 2 (any K is
        # unbiased), so that an accountant that chose K = 1 can still change its mind.
        k = max(self.k, 2) if self.measuring() else self.k
        return PlateResizer({self.plate: k})

    def measuring(self) -> bool:
        """Whether this step estimates the variance components."""
        return self.step % self.every == 0

    def select(self, records: list[TermRecord]) -> TermRecord | None:
        """The record of the accounted term (raises if ambiguous)."""
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

    def detect_plate(self, model_trace, record: TermRecord) -> None:
        if self.plate is not None:
            return
        inner = set(inner_dims(record.batch_shape, record.outer_shape))
        site = model_trace.nodes[record.name]
        names = [f.name for f in site["cond_indep_stack"] if f.dim in inner]
        if len(names) == 1:
            self.plate = names[0]
        elif self.adapt:
            raise ValueError(
                f"cannot tell which plate is the inner plate of term {record.name!r} "
                f"(candidates {names}); pass Accountant(plate=...)"
            )

    def observe_step(
        self,
        record: TermRecord,
        step_seconds: float,
        teacher_seconds: float,
        measured: bool = False,
    ) -> None:
        """Record one step's timing.

        Args:
            record: the accounted term's record.
            step_seconds: the whole step (forward, backward).
            teacher_seconds: the teacher call inside it.
            measured: whether the step estimated the variance components. Such a step runs
                four backward passes through the upstream (one per quadrant), so its time is
                not what a step costs: it is recorded only while no other timing is known.
        """
        self.last_R, self.last_K = record.n_outer, record.n_inner
        if measured and self._outer_times:
            return
        self._outer_times.append(max(step_seconds - teacher_seconds, 0.0) / record.n_outer)
        self._inner_times.append(teacher_seconds / record.t.numel())

    def observe_measurement(self, v_within: float | None, v_between: float | None) -> None:
        """Record one step's variance estimates and adapt ``K`` if asked."""
        self._measurements.append(_Measurement(self.step, v_within, v_between))
        vc = VarianceComponents()
        for m in self._measurements:
            vc.update(m.v_within, m.v_between)
        self.components = vc
        entry = {"step": self.step, "v_between": vc.v_between, "v_within": vc.v_within}
        c_outer, c_inner = self.cost_estimates()
        entry.update(c_outer=c_outer, c_inner=c_inner)
        ok = (
            vc.n_within >= 1
            and vc.n_outer >= 1
            and math.isfinite(c_outer)
            and c_inner > 0
            and vc.v_within >= 0
        )
        if ok:
            k_star = optimal_inner_size(c_outer, c_inner, vc.v_between, vc.v_within)
            entry["k_star"] = k_star
            if self.adapt and len(self._measurements) >= self.min_measurements:
                lo, hi = self.k_range
                self.k = int(min(max(round(k_star) if math.isfinite(k_star) else hi, lo), hi))
            k_now = self.k if self.k is not None else self.last_K
            if k_now:
                entry["ecm_predicted"] = effective_compute_multiplier(
                    k_now, c_outer, c_inner, vc.v_between, vc.v_within
                )
        entry["K"] = self.k if self.k is not None else self.last_K
        self.history.append(entry)

    def end_step(self) -> None:
        self.step += 1

    # reading -----------------------------------------------------------------------------
    def cost_estimates(self) -> tuple[float, float]:
        """``(c_outer, c_inner)``: declared, or medians of the recent measured steps."""
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


# -- offline measurement ----------------------------------------------------------------------


def measure(
    model,
    guide,
    *args,
    loss=None,
    n_repeats: int = 50,
    costs: tuple[float, float] | None = None,
    candidate_ks: Sequence[int] | None = (1, 2, 4, 8, 16, 32),
    n_timing: int = 5,
    warmup: int = 2,
    progress: bool = False,
    **kwargs,
) -> AccountingReport:
    """Measure ``V_b``, ``V_w`` and costs of a model's teacher term at the current parameters.

    The parameters are not changed (gradients are restored afterwards).

    Args:
        model: the Pyro model.
        guide: its guide (e.g. a [`TimestepGuide`][carv_pyro.guides.TimestepGuide]).
        *args: the model's positional arguments.
        loss: a [`CARVLoss`][carv_pyro.CARVLoss] (default: a new one).
        n_repeats: independent steps pooled for the variance components.
        costs: a declared cost model ``(c_outer, c_inner)``; default: measured.
        candidate_ks: ``K`` values at which to time the teacher alone (batched ``R K``
            draws), so that `AccountingReport.cost` uses measured teacher costs;
            ``None`` to use the linear model only.
        n_timing: timed steps (after ``warmup``) for the costs.
        warmup: untimed steps first.
        progress: show a progress bar.
        **kwargs: the model's keyword arguments.

    Returns:
        An `AccountingReport`.
    """
    from tqdm.auto import tqdm

    from .loss import CARVLoss

    if not (isinstance(n_repeats, int) and n_repeats >= 2):
        raise ValueError(f"n_repeats must be an integer >= 2, got {n_repeats!r}")
    loss = CARVLoss() if loss is None else loss
    accountant = Accountant(every=1, window=n_repeats, costs=costs)
    saved_accountant, loss.accountant = loss.accountant, accountant
    store = pyro.get_param_store()
    saved_grads = {
        name: (p.grad.clone() if p.grad is not None else None)
        for name, p in store.named_parameters()
    }
    try:
        # timing: plain steps, no quadrant split
        accountant.every = 10**9
        accountant.step = 1
        for i in range(warmup + n_timing):
            if i == warmup:
                accountant._outer_times.clear()
                accountant._inner_times.clear()
            loss.loss_and_grads(model, guide, *args, **kwargs)
            accountant.step = 1
        accountant.every = 1
        accountant.step = 0
        bar = tqdm(range(n_repeats), desc="measure", disable=not progress)
        estimates = []
        for _ in bar:
            for _, p in store.named_parameters():
                p.grad = None
            loss.loss_and_grads(model, guide, *args, **kwargs)
            accountant.step = 0
            grads = [p.grad.reshape(-1) for _, p in store.named_parameters() if p.grad is not None]
            estimates.append(torch.cat(grads).to(torch.float64) if grads else torch.zeros(1))
        record = accountant.select(loss.last_records)
        report = accountant.report()
        report.linear_cost = False
        if record is not None:
            # The step-to-step spread of the estimates at fixed parameters is
            # Var(R, K) = (V_b + V_w / K) / R: a second unbiased estimate of V_b, the only one
            # when R = 1, averaged with the within-step one otherwise.
            total = float(torch.stack(estimates).var(0, unbiased=True).sum()) * record.n_outer
            v_w = report.v_within if math.isfinite(report.v_within) else 0.0
            across = total - v_w / record.n_inner
            if accountant.components.n_outer == 0:
                report.v_between = max(across, 0.0)
            else:
                report.v_between = max(0.5 * (accountant.components.mean_between + across), 0.0)
        if candidate_ks and costs is None and record is not None:
            report.teacher_seconds = _time_teacher(record, candidate_ks, n_timing)
        return report
    finally:
        loss.accountant = saved_accountant
        for name, p in store.named_parameters():
            p.grad = saved_grads.get(name)


def _time_teacher(
    record: TermRecord, candidate_ks: Sequence[int], n_timing: int
) -> dict[int, float]:
    """Median seconds of one teacher call at ``R * K`` draws, for each candidate ``K``.

    The inputs are synthetic (the values do not change the cost); the conditioning is the
    teacher's null conditioning, so guidance doubles the batch as in training.
    """
    objective = record.objective
    event = tuple(objective.event_shape)
    device = record.t.device
    dtype = record.surrogate.dtype
    inputs = {}
    for K in candidate_ks:
        n = record.n_outer * int(K)
        x = torch.zeros((n,) + event, dtype=dtype, device=device)
        t = objective.prior.sample((n,)).to(device)
        cond = (
            objective.teacher.null_cond(n)
            if objective.teacher.cond_event_shape is not None
            else None
        )
        inputs[int(K)] = (x, t, torch.randn_like(x), cond)
        objective.evaluate(*inputs[int(K)])  # warm-up
    # round-robin over K, so that load changes during the timing hit every K alike
    times: dict[int, list[float]] = {k: [] for k in inputs}
    for _ in range(n_timing):
        for k, args in inputs.items():
            watch = Stopwatch(device)
            objective.evaluate(*args)
            times[k].append(watch.stop().seconds())
    return {k: statistics.median(v) for k, v in times.items()}
