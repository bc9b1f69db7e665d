"""``carv-pyro bench``: the paper's variance/cost protocol, side by side with the baseline.

The paper's protocol, for one pipeline at a fixed checkpoint ``theta``:

1. a high-sample reference gradient ``g_ref`` (many independent high-``R K`` estimates, averaged);
2. for every configuration (method, ``R``, ``K``): ``n`` independent estimates ``g_i``;
   ``Var = mean_i ||g_i - g_ref||^2`` (the trace of the covariance against the reference) and
   ``cost_s`` = median wall-clock seconds per estimate, both measured in this run;
3. ``RE = Var(plain reuse at the same R, K) / Var(method)`` and
   ``ECM = Var_base cost_base / (Var_method cost_method)`` against the baseline
   (uniform ``t``, ``K = 1``, same ``R``);
4. next to the measured ECM, the accountant's prediction from ``V_b``, ``V_w`` and costs
   measured at the same checkpoint ([`carv_pyro.measure.measure`][carv_pyro.measure.measure]);
5. next to every row's measured cost, the cost predicted by the cost model the adapting
   accountant learns online ([`Accountant.cost_of`][carv_pyro.accounting.Accountant.cost_of],
   what ``"auto"`` chooses ``K`` by), learned at the checkpoint as an adapting estimator
   started at ``K = 1`` learns it: plain reuse at ``K = 1`` whose measuring steps probe
   ``K = 2`` (`cost_model_summary`). The table's ``model`` column and ``cost/model`` ratio
   show where that model is right (near 1) and where it is wrong: at the ``K`` it
   extrapolates to from the teacher's two timed sizes, and on rows whose options (IS,
   stratification, QMC, designs, control variates) cost what a model that knows only ``K``
   does not see.

A pipeline plugs in with a small adapter: ``configs()``, ``estimate(config) -> (P,)`` gradient,
``reference(n) -> (P,)``, ``extras() -> dict`` (end-to-end comparisons) and, optionally,
``accounting(R) -> AccountingReport`` and ``learn_cost_model(R, steps) -> Accountant``.

What the printed report and the JSON add for a reader: a legend of the columns (`LEGEND`), ONE
set of variance components with its source (`variance_components`), a line on how Cochran's
``K*`` relates to the best ``K`` (`k_star_note`), and a warning wherever measured costs fall
as ``K`` grows (`cost_warnings`).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import textwrap
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from .accounting import AccountingReport, DesignSplit, effective_compute_multiplier
from .timing import device_name

__all__ = [
    "LEGEND",
    "PIPELINES",
    "BenchPipeline",
    "BenchRow",
    "cost_model_summary",
    "cost_warnings",
    "design_splits",
    "k_star_note",
    "main",
    "modelled_costs",
    "run_protocol",
    "variance_components",
]

#: What each column of the bench table means (printed under it, and stored in the JSON).
LEGEND: dict[str, str] = {
    "Var": "E||g - g_ref||^2 over the repeats: the estimator's variance (trace of its "
    "covariance) against a high-sample reference gradient at the same fixed checkpoint",
    "cost": "median wall-clock seconds per estimate, timed round-robin across the rows",
    "model": "the seconds per estimate that the adapting accountant's learned cost model "
    "(Accountant.cost_of(K), what 'auto' chooses K by) predicts for the row: learned in its own "
    "phase before the rows, from plain reuse at K = 1 whose measuring steps probe K = 2 (as "
    "'auto:K=1' starts), it is the K = 1 step's cost without the teacher plus the teacher's cost "
    "line through the sizes it timed; it knows K only, so rows with other options get the "
    "plain step's prediction; '-' at another R, or where the estimates are no CARVLoss steps "
    "(attribution's per-example features)",
    "cost/model": "measured over modelled cost: near 1 where the model is right, above 1 where "
    "it under-predicts (e.g. a teacher whose cost grows faster than the line through K = 1, 2, "
    "or what IS, stratification or a design add), below 1 where it over-predicts (a batched "
    "teacher cheaper per draw at large K than the line)",
    "RE": "relative efficiency, Var(plain reuse at the same R, K) / Var(row): above 1 the "
    "row's IS, stratification or QMC lowers the variance at equal draws",
    "ECM": "effective compute multiplier, (Var x cost) of the baseline (uniform t, K = 1, "
    "same R; the plain row at the same K where there is no K = 1 row) / (Var x cost) of the "
    "row: above 1 the row reaches equal variance with that many times less compute",
    "ECM pred": "the ECM predicted before the rows were measured, from the accountant's "
    "V_b, V_w and its own cost measurements (the accounting table): "
    "(V_b + V_w) cost(R, 1) / ((V_b + V_w / K) cost(R, K)); plain reuse and adaptive rows "
    "only, '-' elsewhere and where the pipeline has no accountant",
}

#: The ``K`` values the accountant's table, best ``K`` and ``K*`` note are read at.
ACCOUNTING_KS: tuple[int, ...] = (1, 2, 4, 8, 16)

# The clock that times the estimates; a module attribute so that a test can inject costs.
_clock: Callable[[], float] = time.perf_counter


@dataclass
class BenchRow:
    """One configuration's measured numbers.

    Attributes:
        method: e.g. ``"baseline"``, ``"reuse"``, ``"IS+strat"``.
        R: upstream samples per estimate.
        K: inner draws per upstream sample.
        var: ``mean ||g - g_ref||^2`` over the repeats.
        cost_s: median seconds per estimate.
        re: relative efficiency against plain reuse at the same ``(R, K)``.
        ecm: effective compute multiplier against the baseline ``(R, 1)``.
        ecm_predicted: the accountant's predicted ECM (plain reuse rows and adaptive rows).
        var_se: standard error of ``var``.
        cost_mad_s: median absolute deviation of the timed repeats (seconds), their spread.
        proposal: the guide's timestep proposal.
        stratify: the guide's stratification.
        noise: the guide's noise sampler.
        outer: the guide's outer-plate design of the upstream latents (``None``: i.i.d.).
        cv: the control variates fitted and applied (``None``: none), e.g. ``"eps"``.
        cost_model_s: seconds per estimate predicted by the accountant's learned cost model
            (`modelled_costs`; ``None`` where it makes no prediction for the row).
    """

    method: str
    R: int
    K: int
    var: float
    cost_s: float
    re: float = math.nan
    ecm: float = math.nan
    ecm_predicted: float | None = None
    var_se: float = math.nan
    cost_mad_s: float = math.nan
    proposal: str = "prior"
    stratify: str | None = None
    noise: str = "iid"
    outer: str | None = None
    cv: str | None = None
    cost_model_s: float | None = None


class BenchPipeline(Protocol):
    """What a pipeline provides to the protocol."""

    name: str

    def configs(self) -> list[dict]: ...

    def estimate(self, config: dict) -> Tensor: ...

    def reference(self, n: int) -> Tensor: ...

    def extras(self) -> dict: ...


def _inner_plain(config: dict) -> bool:
    """Prior proposal, no stratification, i.i.d. noise (whatever the outer design)."""
    return (
        config.get("proposal", "prior") == "prior"
        and config.get("stratify") is None
        and config.get("noise", "iid") == "iid"
    )


def _design(config: dict) -> tuple[str | None, str | None]:
    """``(outer, cv)`` of a configuration: what it does beyond the inner plate."""
    return config.get("outer"), config.get("cv")


def _is_plain(config: dict) -> bool:
    return _inner_plain(config) and _design(config) == (None, None)


def run_protocol(
    pipeline: BenchPipeline,
    n_repeats: int,
    n_reference: int,
    progress: bool = True,
    predicted: Callable[[dict], float | None] | None = None,
) -> tuple[list[BenchRow], Tensor]:
    """Measure every configuration of ``pipeline`` against its reference.

    Args:
        pipeline: the adapter.
        n_repeats: independent estimates per configuration.
        n_reference: estimates averaged into the reference.
        progress: show progress bars.
        predicted: optional ``config -> predicted ECM``.

    Returns:
        ``(rows, reference)``.
    """
    from tqdm.auto import tqdm

    if n_repeats < 2:
        raise ValueError(f"n_repeats must be >= 2, got {n_repeats}")
    ref = pipeline.reference(n_reference).to(torch.float64)
    configs = pipeline.configs()
    sq: list[list[float]] = []
    for config in tqdm(configs, desc=f"bench {pipeline.name}: variance", disable=not progress):
        pipeline.estimate(config)  # warm-up (the first call builds and caches)
        sq.append(
            [
                float(((pipeline.estimate(config).to(torch.float64) - ref) ** 2).sum())
                for _ in range(n_repeats)
            ]
        )
    # Costs are timed round-robin across the configurations, so that a change of machine load
    # during the run hits every configuration alike; the median is kept.
    times: list[list[float]] = [[] for _ in configs]
    for _ in tqdm(
        range(_timing_rounds(n_repeats)), desc=f"bench {pipeline.name}: cost", disable=not progress
    ):
        for i, config in enumerate(configs):
            t0 = _clock()
            pipeline.estimate(config)
            times[i].append(_clock() - t0)
    rows: list[BenchRow] = []
    for config, s_i, t_i in zip(configs, sq, times):
        median = statistics.median(t_i)
        rows.append(
            BenchRow(
                method=config["method"],
                R=int(config["R"]),
                K=int(config["K"]),
                var=statistics.fmean(s_i),
                var_se=statistics.stdev(s_i) / math.sqrt(len(s_i)),
                cost_s=median,
                cost_mad_s=statistics.median(abs(t - median) for t in t_i),
                proposal=config.get("proposal", "prior"),
                stratify=config.get("stratify"),
                noise=config.get("noise", "iid"),
                outer=config.get("outer"),
                cv=config.get("cv"),
                ecm_predicted=predicted(config) if predicted else None,
            )
        )
    _relative(rows)
    return rows, ref


def _timing_rounds(n_repeats: int) -> int:
    """Round-robin timing rounds for ``n_repeats`` repeats: ``n_repeats``, between 2 and 15."""
    return max(2, min(n_repeats, 15))


def _relative(rows: list[BenchRow]) -> None:
    """Fill ``re`` and ``ecm`` from the baseline and plain-reuse rows."""
    plain = {(r.R, r.K): r for r in rows if _is_plain(asdict(r))}
    for r in rows:
        # against the K = 1 baseline where the pipeline runs one, else the plain estimator at
        # the same (R, K) (attribution compares estimators at equal evaluations per example)
        base = plain.get((r.R, 1)) or plain.get((r.R, r.K))
        same = plain.get((r.R, r.K))
        if same is not None and r.var > 0:
            r.re = same.var / r.var
        if base is not None and r.var > 0 and r.cost_s > 0:
            r.ecm = (base.var * base.cost_s) / (r.var * r.cost_s)


def components_from_rows(
    rows: list[BenchRow], design: tuple[str | None, str | None] = (None, None)
) -> dict[str, float] | None:
    """``V_b``, ``V_w`` and the ceiling on any inner-plate variance cut, from two plain rows.

    The plain estimator (prior proposal, no stratification, i.i.d. noise) has
    ``Var(R, K) = (V_b + V_w / K) / R``, so its rows at ``(R, 1)`` and ``(R, K)`` give both
    components. Nothing done on the inner plate (more draws, IS, stratification, QMC) can remove
    ``V_b``, so ``(V_b + V_w) / V_b`` bounds the cut of ``Var(R, 1)`` any such estimator at this
    ``R`` can reach. The reference's own variance is not subtracted: it sits in every row's
    ``var``, so ``V_b`` is slightly over-estimated and the ceiling slightly under-estimated.
    Where the pipeline has an accountant, `variance_components` prefers the accountant's.

    Args:
        rows: measured rows; the first ``R`` with a plain ``K = 1`` row and a plain ``K > 1``
            row is used (the largest such ``K``).
        design: ``(outer, cv)``: solve the rows of this design instead (plain inner plate,
            the given outer design and control variates), for `design_splits`.

    Returns:
        ``{"R", "K", "v_between", "v_within", "ceiling"}`` (``ceiling`` is ``inf`` when the
        measured ``V_b`` is not positive), or ``None`` without such a pair of rows.
    """
    plain = [r for r in rows if _inner_plain(asdict(r)) and _design(asdict(r)) == design]
    for one in (r for r in plain if r.K == 1):
        many = [r for r in plain if r.R == one.R and r.K > 1]
        if not many:
            continue
        big = max(many, key=lambda r: r.K)
        total, reduced = one.R * one.var, big.R * big.var  # V_b + V_w, V_b + V_w / K
        v_within = (total - reduced) / (1.0 - 1.0 / big.K)
        v_between = total - v_within
        ceiling = total / v_between if v_between > 0 else math.inf
        return {
            "R": one.R,
            "K": big.K,
            "v_between": v_between,
            "v_within": v_within,
            "ceiling": ceiling,
        }
    return None


def design_splits(rows: list[BenchRow]) -> list[DesignSplit]:
    """`V_b` split by each outer design (and control variates) that has its own pair of rows.

    For every design ``(outer, cv)`` with rows at ``(R, 1)`` and ``(R, K)`` whose inner plate
    is plain (as the plain rows are), `components_from_rows` gives its components ``V_b'`` and
    ``V_w'``; set beside the plain rows' ``V_b`` and ``V_w`` (both from rows, so the reference's
    variance sits alike in both), they say how much of ``V_b`` the design removes and the
    inner-plate ceiling before and after.

    Returns:
        One [`DesignSplit`][carv_pyro.accounting.DesignSplit] per such design.
    """
    plain = components_from_rows(rows)
    if plain is None:
        return []
    designs = sorted(
        {_design(asdict(r)) for r in rows} - {(None, None)}, key=lambda d: (str(d[0]), str(d[1]))
    )
    out = []
    for outer, cv in designs:
        c = components_from_rows(rows, (outer, cv))
        if c is None or c["R"] != plain["R"]:
            continue
        name = ", ".join(f"{k}={v}" for k, v in (("outer", outer), ("cv", cv)) if v)
        out.append(
            DesignSplit(
                design=name,
                v_between=plain["v_between"],
                v_within=plain["v_within"],
                v_between_left=c["v_between"],
                v_within_left=c["v_within"],
            )
        )
    return out


def format_table(rows: list[BenchRow]) -> str:
    """A readable table of the rows."""
    head = (
        f"{'method':<22}{'R':>3}{'K':>4}{'Var':>12}{'cost (ms)':>11}{'model (ms)':>11}"
        f"{'cost/model':>11}{'RE':>7}{'ECM':>7}{'ECM pred':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        pred = f"{r.ecm_predicted:.2f}" if r.ecm_predicted is not None else "-"
        model, ratio = "-", "-"
        if r.cost_model_s is not None and math.isfinite(r.cost_model_s):
            model = f"{r.cost_model_s * 1e3:.3g}"
            if r.cost_model_s > 0:
                ratio = f"{r.cost_s / r.cost_model_s:.2f}"
        lines.append(
            f"{r.method:<22}{r.R:>3}{r.K:>4}{r.var:>12.4g}{r.cost_s * 1e3:>11.3g}{model:>11}"
            f"{ratio:>11}{r.re:>7.2f}{r.ecm:>7.2f}{pred:>9}"
        )
    return "\n".join(lines)


# -- measured against modelled cost -----------------------------------------------------------


class CostModel(Protocol):
    """What `modelled_costs` reads of an accountant (an
    [`Accountant`][carv_pyro.accounting.Accountant] that has observed steps)."""

    last_R: int | None

    def cost_of(self, K: int) -> float: ...


def modelled_costs(rows: list[BenchRow], model: CostModel) -> None:
    """Fill every row's ``cost_model_s`` with ``model.cost_of(row.K)``, at the ``R`` the model
    learned at (``None`` at another ``R``: its step costs are costs of that ``R``)."""
    for r in rows:
        r.cost_model_s = float(model.cost_of(r.K)) if r.R == model.last_R else None


def cost_model_summary(rows: list[BenchRow], model: Any, steps: int) -> dict[str, Any]:
    """What the learned cost model knew, and how far it was from the measured costs.

    Args:
        rows: the rows, with ``cost_model_s`` filled (`modelled_costs`).
        model: the accountant that learned the model (its ``last_R``, ``step_costs`` and
            ``teacher_costs`` are read).
        steps: steps it learned from.

    Returns:
        ``{"R", "steps", "step_costs", "teacher_costs", "ratio_min", "ratio_max", "worst",
        "text"}``: ``*_costs`` the accountant's ``{K: median seconds}`` (of a plain step; of
        the teacher call), ``ratio_*`` the range of measured / modelled cost over the plain
        rows, ``worst`` the plain row furthest from its prediction on a log scale (``None``
        without plain rows with a prediction).
    """
    step_costs, teacher_costs = dict(model.step_costs), dict(model.teacher_costs)

    def ms(costs: dict[int, float]) -> str:
        return ", ".join(f"K = {k}: {v * 1e3:.3g} ms" for k, v in sorted(costs.items())) or "none"

    plain = [
        r
        for r in rows
        if _is_plain(asdict(r)) and r.cost_model_s is not None and r.cost_model_s > 0
    ]
    ratios = {id(r): r.cost_s / r.cost_model_s for r in plain}
    text = (
        f"cost model (the adapting accountant's cost_of(K), learned in {steps} steps of plain "
        f"reuse at R = {model.last_R}, K = 1, measuring steps probing K = 2): step "
        f"{ms(step_costs)}; teacher call {ms(teacher_costs)}"
    )
    worst = None
    if plain:
        w = max(plain, key=lambda r: abs(math.log(ratios[id(r)])))
        worst = {
            "method": w.method,
            "K": w.K,
            "cost_s": w.cost_s,
            "cost_model_s": w.cost_model_s,
            "ratio": ratios[id(w)],
        }
        lo, hi = min(ratios.values()), max(ratios.values())
        text += (
            f"; on the plain rows measured / modelled cost runs from {lo:.2f} to {hi:.2f}, "
            f"furthest at K = {w.K} ({w.cost_s * 1e3:.3g} ms measured, "
            f"{w.cost_model_s * 1e3:.3g} ms modelled)"
        )
    return {
        "R": model.last_R,
        "steps": steps,
        "step_costs": step_costs,
        "teacher_costs": teacher_costs,
        "ratio_min": min(ratios.values()) if plain else None,
        "ratio_max": max(ratios.values()) if plain else None,
        "worst": worst,
        "text": text,
    }


# -- reading aids: one set of components, K* against the best K, cost warnings ---------------


def variance_components(
    rows: list[BenchRow], report: AccountingReport | None = None
) -> dict[str, Any] | None:
    """The ONE set of variance components the bench reports, with its source.

    Two estimates are at hand. The accountant's (``report``, from
    [`measure`][carv_pyro.measure.measure]) pools unbiased per-step estimates (the contrast
    ANOVA of `carv_pyro.accounting`, and the step-to-step spread) over
    its own repeats, with standard errors, and involves no reference; it is also what ``K*``,
    the best ``K`` and ``ECM pred`` are computed from. `components_from_rows` solves two
    measured rows for ``V_b`` and ``V_w`` instead: a difference of two noisy variances, with the
    reference's own variance added to ``V_b``. So the accountant's is used wherever the
    pipeline has one, and the rows' only where it has none.

    Args:
        rows: the measured rows.
        report: the accountant's report at the checkpoint, if the pipeline has one.

    Returns:
        ``{"source", "how", "R", "K", "v_between", "v_within", "se_between", "se_within",
        "ceiling"}`` (standard errors ``nan`` for the rows' estimate; ``ceiling`` is
        ``(V_b + V_w) / V_b``, ``inf`` when ``V_b`` is not positive), or ``None`` when neither
        estimate exists.
    """
    if report is not None and math.isfinite(report.v_between) and math.isfinite(report.v_within):
        v_b, v_w = report.v_between, report.v_within
        se_w, se_b = report.stderr
        return {
            "source": "accountant",
            "how": f"measure(): contrast ANOVA and step-to-step spread of plain reuse at "
            f"R = {report.R}, K = {report.K}, at the bench's checkpoint; no reference involved",
            "R": report.R,
            "K": report.K,
            "v_between": v_b,
            "v_within": v_w,
            "se_between": se_b,
            "se_within": se_w,
            "ceiling": (v_b + v_w) / v_b if v_b > 0 else math.inf,
        }
    c = components_from_rows(rows)
    if c is None:
        return None
    return {
        "source": "plain rows",
        "how": f"solved from the plain rows (R, K) = ({c['R']}, 1) and ({c['R']}, {c['K']}); "
        f"V_b includes the reference's own variance",
        "se_between": math.nan,
        "se_within": math.nan,
        **c,
    }


def _nearest(candidates: list[int], k: float) -> int:
    """The candidate closest to ``k`` on a log scale (``K`` is chosen by ratios)."""
    if not math.isfinite(k):
        return max(candidates)
    return min(candidates, key=lambda c: abs(math.log(c) - math.log(max(k, 1e-12))))


def k_star_note(
    report: AccountingReport, rows: list[BenchRow], candidates: tuple[int, ...]
) -> dict[str, Any]:
    """How Cochran's ``K*`` relates to the best ``K``, as numbers and one line of text.

    ``K*`` is optimal under the linear cost model ``c_outer + K c_inner``; the best ``K``
    minimises the predicted ``Var(R, K) cost(R, K)`` with the teacher's cost measured at each
    ``K``. Under the linear model ``Var x cost`` is ``const + V_b c_inner (K + K*^2 / K)``,
    symmetric in ``log K`` about ``K*``, so the best candidate would be the one nearest ``K*``
    on a log scale: the two differ only because the measured costs are not that line (a batch
    is cheaper per draw than single draws), and the difference matters little where the ECM is
    flat between them.

    Args:
        report: the accountant's report.
        rows: the measured rows (for the plain row with the best measured ECM).
        candidates: the ``K`` values the best ``K`` is chosen from.

    Returns:
        ``{"k_star", "k_near_star", "best_k", "ecm_linear_at_k_star", "ecm_at_k_near_star",
        "ecm_at_best_k", "teacher_cost_growth", "best_row_k", "best_row_ecm", "text"}``:
        ``ecm_*`` predicted by the accountant (``ecm_linear_*`` under the linear model, the
        others under measured costs), ``teacher_cost_growth`` the measured teacher cost at the
        largest candidate over the smallest (``None`` without both), ``best_row_*`` the plain
        row with the highest measured ECM (``None`` without plain rows).
    """
    ks = sorted(candidates)
    k_star = report.k_star
    near, best = _nearest(ks, k_star), report.best_k(ks)
    ecm_near, ecm_best = report.ecm(near), report.ecm(best)
    ecm_linear = math.nan
    if math.isfinite(k_star) and k_star > 0:
        ecm_linear = effective_compute_multiplier(
            k_star,
            report.c_outer,
            report.c_inner,
            max(report.v_between, 0.0),
            max(report.v_within, 0.0),
        )
    lo, hi = ks[0], ks[-1]
    t = report.teacher_seconds
    growth = t[hi] / t[lo] if lo in t and hi in t and t[lo] > 0 else None
    plain = [r for r in rows if _is_plain(asdict(r)) and math.isfinite(r.ecm)]
    best_row = max(plain, key=lambda r: r.ecm) if plain else None

    head = f"K* = {k_star:.3g} (Cochran, linear cost c_outer + K c_inner)"
    if best == near:
        text = f"{head} and best K = {best} (measured costs) agree"
    elif ecm_best <= 1.1 * ecm_near:
        text = (
            f"{head} vs best K = {best} (measured costs, not that line): the ECM is flat "
            f"between them, {ecm_best:.2f} at K = {best} vs {ecm_near:.2f} at K = {near}, so "
            f"either serves"
        )
    else:
        shape = (
            f"the teacher's measured cost grows {growth:.2g}x from K = {lo} to K = {hi}, not "
            f"{hi // lo}x"
            if growth is not None
            else "the measured costs are not linear in K"
        )
        text = (
            f"{head} vs best K = {best} (measured costs): {shape}, so K = {best} wins, "
            f"predicted ECM {ecm_best:.2f} vs {ecm_near:.2f} at K = {near}"
        )
    if best_row is not None:
        text += f"; in the rows the best plain K is {best_row.K} (ECM {best_row.ecm:.2f})"
    return {
        "k_star": k_star,
        "k_near_star": near,
        "best_k": best,
        "ecm_linear_at_k_star": ecm_linear,
        "ecm_at_k_near_star": ecm_near,
        "ecm_at_best_k": ecm_best,
        "teacher_cost_growth": growth,
        "best_row_k": best_row.K if best_row is not None else None,
        "best_row_ecm": best_row.ecm if best_row is not None else None,
        "text": text,
    }


def _options(row: BenchRow) -> tuple:
    """What makes rows one series in ``K``: ``R`` and the estimator's options, not the name."""
    return (row.R, row.proposal, row.stratify, row.noise)


def cost_warnings(
    rows: list[BenchRow],
    teacher_seconds: dict[int, float] | None = None,
    *,
    n_timing: int,
    device: str | torch.device = "cpu",
) -> list[dict[str, Any]]:
    """A warning for every place where a measured cost falls as ``K`` grows.

    More draws cannot cost less, so a fall says the costs are not resolved: timing noise
    (the fall is within the repeats' spread), too few timing rounds, or a launch-bound device
    (on a GPU at small batches a call costs its fixed overhead whatever ``K``, and noise
    orders the rows). Checked: each series of rows that differ only in ``K`` (same ``R``,
    proposal, stratification, noise; the baseline starts the plain series), and the teacher's
    cost per call by ``K`` as the accountant measured it.

    Args:
        rows: the measured rows.
        teacher_seconds: the accountant's ``{K: seconds per teacher call}``, if any.
        n_timing: round-robin timing rounds behind each row's cost.
        device: where the costs were measured.

    Returns:
        One dict per fall between neighbouring ``K``: ``{"kind": "non_monotone_cost",
        "where", "method", "R", "K_low", "K_high", "cost_low_s", "cost_high_s",
        "within_noise", "likely_cause", "advice", "text"}`` (``within_noise`` is ``None``
        where no spread is known).
    """
    gpu = torch.device(device).type == "cuda"
    series: dict[tuple, list[BenchRow]] = {}
    for r in rows:
        series.setdefault(_options(r), []).append(r)
    falls: list[tuple[str, str, int, int, int, float, float, float | None]] = []
    for group in series.values():
        group = sorted(group, key=lambda r: r.K)
        for a, b in zip(group, group[1:]):
            if b.K > a.K and b.cost_s < a.cost_s:
                spread = a.cost_mad_s + b.cost_mad_s
                name = a.method if a.method == b.method else f"{a.method} -> {b.method}"
                falls.append(("rows", name, a.R, a.K, b.K, a.cost_s, b.cost_s, spread))
    ts = sorted((teacher_seconds or {}).items())
    for (ka, ta), (kb, tb) in zip(ts, ts[1:]):
        if tb < ta:
            falls.append(("accountant teacher calls", "teacher", 0, ka, kb, ta, tb, None))
    out = []
    for where, method, R, k_lo, k_hi, c_lo, c_hi, spread in falls:
        within = None if spread is None or not math.isfinite(spread) else c_lo - c_hi <= spread
        causes = []
        if within:
            causes.append(
                f"timing noise (the fall, {(c_lo - c_hi) * 1e3:.3g} ms, is within the repeats' "
                f"spread, {spread * 1e3:.3g} ms)"
            )
        if where == "rows" and n_timing < 5:
            causes.append(f"too few timing rounds ({n_timing})")
        if gpu:
            causes.append(
                "a launch-bound device (at small batches a call costs its fixed overhead, "
                "whatever K)"
            )
        if not causes:
            causes.append("timing noise or a change of machine load while timing")
        advice = (
            "rerun on an otherwise idle machine"
            + (
                " with --repeats 15 (costs are medians over up to 15 rounds)"
                if n_timing < 15
                else ""
            )
            + (", and a larger R so that the teacher's batch is compute-bound" if gpu else "")
            + "; until then read these K as costing the same, and their ECMs as uncertain"
        )
        at = f"R = {R}, " if where == "rows" else ""
        text = (
            f"measured cost falls as K grows ({where}, {method}, {at}K = {k_lo} -> {k_hi}: "
            f"{c_lo * 1e3:.3g} -> {c_hi * 1e3:.3g} ms); likely cause: {'; '.join(causes)}; "
            f"{advice}"
        )
        out.append(
            {
                "kind": "non_monotone_cost",
                "where": where,
                "method": method,
                "R": R if where == "rows" else None,
                "K_low": k_lo,
                "K_high": k_hi,
                "cost_low_s": c_lo,
                "cost_high_s": c_hi,
                "within_noise": within,
                "likely_cause": "; ".join(causes),
                "advice": advice,
                "text": text,
            }
        )
    return out


def _designs_json(rows: list[BenchRow], report: AccountingReport | None) -> list[dict]:
    """`design_splits` as JSON-ready dicts, each with its printed line (``K*`` and the
    predicted ECM from the accountant's costs where the pipeline has one)."""
    costs = (report.c_outer, report.c_inner) if report is not None else (None, None)
    if not all(c is not None and math.isfinite(c) for c in costs):
        costs = (None, None)
    out = []
    for d in design_splits(rows):
        entry = asdict(d)
        entry.update(
            v_between_removed=d.v_between_removed,
            ceiling_before=d.ceiling_before,
            ceiling_after=d.ceiling_after,
            text=d.text(*costs),
        )
        out.append(entry)
    return out


def format_report(result: dict[str, Any], report: AccountingReport | None = None) -> str:
    """The bench's printed report from its JSON-ready ``result`` (see `main`), prose wrapped at
    100 columns."""

    def prose(text: str, first: str = "", rest: str = "  ") -> list[str]:
        return textwrap.wrap(text, width=100, initial_indent=first, subsequent_indent=rest)

    rows = [BenchRow(**r) for r in result["rows"]]
    lines = [format_table(rows), "", "legend:"]
    for key, text in result["legend"].items():
        lines += prose(text, first=f"  {key:<10} ", rest=" " * 13)
    if report is not None:
        lines += [
            "",
            f"accountant at the checkpoint (plain reuse, R = {report.R}, K = {report.K}):",
        ]
        lines.append(report.table(ACCOUNTING_KS))
    c = result["components"]
    if c is not None:
        said = (
            "V_b and V_w above are"
            if c["source"] == "accountant"
            else f"V_b = {c['v_between']:.4g} and V_w = {c['v_within']:.4g} are"
        )
        lines.append("")
        lines += prose(
            f"{said} this bench's variance components ({c['how']}); no inner-plate estimator "
            f"can cut Var(R, 1) by more than (V_b + V_w) / V_b, {c['ceiling']:.3g}x"
        )
    cost_model = result.get("cost_model")
    if cost_model is not None:
        lines.append("")
        lines += prose(cost_model["text"])
    designs = result.get("designs") or []
    if designs:
        lines += ["", "outer designs and control variates (plain and design rows solved alike):"]
    for d in designs:
        lines += prose(d["text"], first="  ", rest="    ")
    note = (result.get("accounting") or {}).get("k_star_note")
    if note is not None:
        lines += prose(note["text"])
    for w in result["warnings"]:
        lines += prose(w["text"], first="warning: ")
    return "\n".join(lines)


def plot_rows(rows: list[BenchRow], path: str, title: str) -> str:
    """PNG of variance against cost per estimate, one point per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    groups: dict[str, list[BenchRow]] = {}
    for r in rows:
        groups.setdefault(r.method, []).append(r)
    for name, rs in groups.items():
        rs = sorted(rs, key=lambda r: r.cost_s)
        ax.plot([r.cost_s * 1e3 for r in rs], [r.var for r in rs], "o-", label=name)
        for r in rs:
            ax.annotate(
                f"K={r.K}",
                (r.cost_s * 1e3, r.var),
                textcoords="offset points",
                xytext=(3, 3),
                fontsize=7,
            )
    base = next((r for r in rows if r.method == "baseline"), None)
    if base is not None:
        xs = torch.logspace(
            math.log10(min(r.cost_s for r in rows) * 1e3),
            math.log10(max(r.cost_s for r in rows) * 1e3),
            50,
        )
        ax.plot(xs, base.var * base.cost_s * 1e3 / xs, ":", color="gray", label="ECM = 1")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("cost per estimate (ms, measured)")
    ax.set_ylabel("Var = E||g - g_ref||^2")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- text-to-3D ---------------------------------------------------------------------------------


def _lazy(module: str, cls: str) -> Callable[..., Any]:
    def build(*args, **kwargs):
        import importlib

        return getattr(importlib.import_module(module, __package__), cls)(*args, **kwargs)

    return build


#: The pipelines ``carv-pyro bench --pipeline`` knows.
PIPELINES: dict[str, Callable[..., Any]] = {
    "text-to-3d": _lazy(".pipelines.text_to_3d", "TextTo3DBench"),
    "distillation": _lazy(".pipelines.distillation", "DistillationBench"),
    "attribution": _lazy(".pipelines.attribution", "AttributionBench"),
}


def _check_bench_device(device: Any) -> None:
    """``device`` names a CPU or an available CUDA device, else ``ValueError`` naming it."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device must be a torch device such as 'cpu' or 'cuda', got {device!r}"
        ) from None
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={device!r}, but torch {torch.__version__} sees no CUDA device here; use "
            f"device='cpu'"
        )


def main(args: Any) -> int:
    """Run the bench for ``args.pipeline`` (an argparse namespace from `carv_pyro.cli`).

    Expected attributes: ``pipeline``, ``quick``, ``json``, ``plot``, ``device``, ``seed``,
    ``repeats`` (``None``: 20 quick, 100 full); optional ``pretrain_steps`` (distillation's
    checkpoint), ``smoke`` and ``quiet``.

    Prints the rows (each with its measured cost and the learned cost model's prediction), the
    `LEGEND`, the accountant's table where the pipeline has one, the variance components
    (`variance_components`), what the cost model learned and how far it was
    (`cost_model_summary`), the ``K*`` note (`k_star_note`) and the cost warnings
    (`cost_warnings`). The JSON (``--json``) holds the same: ``rows`` (``cost_model_s``
    beside ``cost_s``), ``legend``, ``components`` (with its ``source``), ``cost_model``,
    ``warnings``, ``timing_rounds``, ``accounting`` (with ``k_star_note``) and ``extras``.

    Returns:
        ``0``.

    Raises:
        ValueError: on an unknown pipeline, or a ``device`` that is not ``cpu`` or an available
            CUDA device (checked before any work).
    """
    if args.pipeline not in PIPELINES:
        raise ValueError(f"unknown pipeline {args.pipeline!r}; expected one of {sorted(PIPELINES)}")
    _check_bench_device(args.device)
    quick = bool(args.quick)
    repeats = args.repeats or (20 if quick else 100)
    n_reference = 10 if quick else 50
    progress = not getattr(args, "quiet", False)
    t0 = time.perf_counter()
    smoke = bool(getattr(args, "smoke", False))
    kwargs: dict[str, Any] = {"smoke": True} if smoke else {}
    if getattr(args, "pretrain_steps", None) is not None:
        if args.pipeline != "distillation":
            raise ValueError(
                f"pretrain_steps applies to the distillation pipeline, not {args.pipeline!r}"
            )
        kwargs["pretrain_steps"] = args.pretrain_steps
    if getattr(args, "compile", None) is not None:
        if args.pipeline != "text-to-3d":
            raise ValueError(f"compile applies to the text-to-3d pipeline, not {args.pipeline!r}")
        kwargs["compile"] = args.compile
    bench = PIPELINES[args.pipeline](quick=quick, seed=args.seed, device=args.device, **kwargs)
    if smoke:
        repeats, n_reference = 2, 2

    report = None
    predicted = None
    if hasattr(bench, "accounting"):
        report = bench.accounting(bench.R, n_repeats=2 if smoke else 20 if quick else 60)
        bench.k_adaptive = max(1, min(32, report.best_k(ACCOUNTING_KS)))

        def predicted(config: dict) -> float | None:
            if _is_plain(config) or config.get("proposal") == "adaptive":
                return report.ecm(int(config["K"]))
            return None

    cost_model, cost_model_steps = None, 4 if smoke else 2 * _timing_rounds(repeats)
    if getattr(bench, "has_cost_model", False):
        cost_model = bench.learn_cost_model(bench.R, cost_model_steps)

    rows, _ = run_protocol(bench, repeats, n_reference, progress=progress, predicted=predicted)
    if cost_model is not None:
        modelled_costs(rows, cost_model)
    bench.rows = rows
    extras = bench.extras()
    result = {
        "pipeline": args.pipeline,
        "device": device_name(args.device),
        "quick": quick,
        "repeats": repeats,
        "timing_rounds": _timing_rounds(repeats),
        "seed": args.seed,
        "date": time.strftime("%Y-%m-%d"),
        "wall_s": None,
        "legend": dict(LEGEND),
        "rows": [asdict(r) for r in rows],
        "components": variance_components(rows, report),
        "designs": _designs_json(rows, report),
        "cost_model": (
            cost_model_summary(rows, cost_model, cost_model_steps)
            if cost_model is not None
            else None
        ),
        "warnings": cost_warnings(
            rows,
            report.teacher_seconds if report is not None else None,
            n_timing=_timing_rounds(repeats),
            device=args.device,
        ),
        "extras": extras,
    }
    if report is not None:
        result["accounting"] = {
            "v_between": report.v_between,
            "v_within": report.v_within,
            "c_outer": report.c_outer,
            "c_inner": report.c_inner,
            "k_star": report.k_star,
            "best_k": bench.k_adaptive,
            "teacher_seconds": report.teacher_seconds,
            "k_star_note": k_star_note(report, rows, ACCOUNTING_KS),
        }
    result["wall_s"] = time.perf_counter() - t0
    print(format_report(result, report))
    for key, value in extras.items():
        if key != "end_to_end":
            print(f"{key}: {value}")
    if "end_to_end" in extras:
        for name, e in extras["end_to_end"].items():
            print(
                f"end-to-end {name}: {e['steps']} steps in {e['wall_s']:.1f} s -> quality "
                f"{e['quality']:.2f}"
            )
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=_jsonable)
    if args.plot:
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        plot_rows(rows, args.plot, f"{args.pipeline}: variance against cost ({result['device']})")
    return 0


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return str(obj)
