"""Drivers above the loss: one gradient at fixed parameters, and the accounting of a model.

- `gradient_estimate`: one estimate of the teacher gradient at the current parameters, as a flat
  float64 vector, leaving every ``.grad`` as it was. Every bench and pipeline measures variance
  through it.
- `measure`: ``V_b``, ``V_w`` and costs of a model's teacher term at the current parameters (an
  [`AccountingReport`][carv_pyro.accounting.AccountingReport]), leaving parameters, gradients and
  learning proposals unchanged.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence

import pyro
import torch
from pyro import poutine
from torch import Tensor

from . import _checks
from .accounting import Accountant, AccountingReport
from .infer.loss import CARVLoss, StepReport, as_timestep_guide
from .infer.primitives import TermRecord
from .timing import Stopwatch

__all__ = ["gradient_estimate", "measure"]


def gradient_estimate(
    loss: CARVLoss,
    model: Callable,
    guide: Callable,
    *args,
    params: Sequence[Tensor] | None = None,
    **kwargs,
) -> Tensor:
    """One estimate of the gradient at the current parameters, as a flat float64 vector.

    Runs ``loss.loss_and_grads(model, guide, *args, **kwargs)`` on zeroed gradients, reads them,
    and puts every ``.grad`` back as it was.

    Args:
        loss: the loss (e.g. a [`CARVLoss`][carv_pyro.CARVLoss]).
        model: the Pyro model.
        guide: its guide.
        *args: the model's arguments.
        params: the tensors whose gradient is wanted, in this order; default: the unconstrained
            parameters the step touches, ordered by their param-store names.
        **kwargs: the model's keyword arguments.

    Returns:
        ``(P,)`` float64, on the CPU (a parameter without a gradient counts as zeros).
    """
    store = pyro.get_param_store()
    saved = {id(p): (p, p.grad) for _, p in store.named_parameters()}
    if params is not None:
        params = list(params)
        for p in params:
            saved.setdefault(id(p), (p, p.grad))
    for p, _ in saved.values():
        p.grad = None
    with poutine.trace(param_only=True) as capture:
        loss.loss_and_grads(model, guide, *args, **kwargs)
    if params is None:
        sites = sorted(capture.trace.nodes.items())
        params = [site["value"].unconstrained() for _, site in sites]
    pieces = [
        (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to("cpu", torch.float64)
        for p in params
    ]
    for p, g in saved.values():
        p.grad = g
    for p in params:
        if id(p) not in saved:  # created by this step: it had no gradient before
            p.grad = None
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.float64)


class _Timer:
    """An observer that only collects step and teacher seconds (no components, no resizing)."""

    def __init__(self) -> None:
        self.reports: list[StepReport] = []

    def inner_size(self) -> int | None:
        return None

    def select(self, records: list[TermRecord]) -> TermRecord | None:
        return records[0] if len(records) == 1 else None

    def wants_components(self) -> bool:
        return False

    def observe(self, report: StepReport) -> None:
        self.reports.append(report)

    def end_step(self) -> None:
        pass


def measure(
    model: Callable,
    guide: Callable,
    *args,
    loss: CARVLoss | None = None,
    n_repeats: int = 50,
    costs: tuple[float, float] | None = None,
    candidate_ks: Sequence[int] | None = (1, 2, 4, 8, 16, 32),
    n_timing: int = 5,
    warmup: int = 2,
    progress: bool = False,
    **kwargs,
) -> AccountingReport:
    """Measure ``V_b``, ``V_w`` and costs of a model's teacher term at the current parameters.

    Parameters, their gradients and learning proposals (``"adaptive"``) are left unchanged.

    Args:
        model: the Pyro model.
        guide: its guide (e.g. a [`TimestepGuide`][carv_pyro.TimestepGuide]).
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
        An [`AccountingReport`][carv_pyro.accounting.AccountingReport].

    Raises:
        ValueError: naming the first invalid argument.
    """
    from tqdm.auto import tqdm

    n_repeats = _checks.positive_int("n_repeats", n_repeats)
    if n_repeats < 2:
        raise ValueError(f"n_repeats must be an integer >= 2, got {n_repeats!r}")
    _checks.positive_int("n_timing", n_timing)
    _checks.non_negative_int("warmup", warmup)
    if candidate_ks is not None:
        candidate_ks = [_checks.positive_int("candidate_ks", int(k)) for k in candidate_ks]
    loss = CARVLoss() if loss is None else loss
    tguide = as_timestep_guide(guide)
    accountant = Accountant(every=1, window=n_repeats, costs=costs)
    timer = _Timer()
    saved_observer = loss.accountant
    try:
        with tguide.frozen():
            loss.accountant = timer
            for i in range(warmup + n_timing):
                if i == warmup:
                    timer.reports.clear()
                gradient_estimate(loss, model, tguide, *args, **kwargs)
            loss.accountant = accountant
            estimates = []
            for _ in tqdm(range(n_repeats), desc="measure", disable=not progress):
                estimates.append(gradient_estimate(loss, model, tguide, *args, **kwargs))
    finally:
        loss.accountant = saved_observer
    record = loss.last_records[0] if len(loss.last_records) == 1 else None
    report = accountant.report()
    report.linear_cost = False
    if timer.reports and costs is None:
        rec = timer.reports[-1].record
        report.c_outer = statistics.median(
            max(r.step_seconds - r.teacher_seconds, 0.0) / rec.n_outer for r in timer.reports
        )
        report.c_inner = statistics.median(
            r.teacher_seconds / rec.layout.n_draws for r in timer.reports
        )
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
        for k, inp in inputs.items():
            watch = Stopwatch(device)
            objective.evaluate(*inp)
            times[k].append(watch.stop().seconds())
    return {k: statistics.median(v) for k, v in times.items()}
