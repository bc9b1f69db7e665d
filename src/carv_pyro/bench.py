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
   measured at the same checkpoint ([`carv_pyro.measure.measure`][carv_pyro.measure.measure]).

A pipeline plugs in with a small adapter: ``configs()``, ``estimate(config) -> (P,)`` gradient,
``reference(n) -> (P,)``, ``extras() -> dict`` (end-to-end comparisons) and, optionally,
``accounting(R) -> AccountingReport``.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from .timing import device_name

__all__ = ["BenchRow", "BenchPipeline", "run_protocol", "PIPELINES", "main"]


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
        proposal: the guide's timestep proposal.
        stratify: the guide's stratification.
        noise: the guide's noise sampler.
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
    proposal: str = "prior"
    stratify: str | None = None
    noise: str = "iid"


class BenchPipeline(Protocol):
    """What a pipeline provides to the protocol."""

    name: str

    def configs(self) -> list[dict]: ...

    def estimate(self, config: dict) -> Tensor: ...

    def reference(self, n: int) -> Tensor: ...

    def extras(self) -> dict: ...


def _is_plain(config: dict) -> bool:
    return (
        config.get("proposal", "prior") == "prior"
        and config.get("stratify") is None
        and config.get("noise", "iid") == "iid"
    )


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
    n_timing = max(2, min(n_repeats, 15))
    for _ in tqdm(range(n_timing), desc=f"bench {pipeline.name}: cost", disable=not progress):
        for i, config in enumerate(configs):
            t0 = time.perf_counter()
            pipeline.estimate(config)
            times[i].append(time.perf_counter() - t0)
    rows: list[BenchRow] = []
    for config, s_i, t_i in zip(configs, sq, times):
        rows.append(
            BenchRow(
                method=config["method"],
                R=int(config["R"]),
                K=int(config["K"]),
                var=statistics.fmean(s_i),
                var_se=statistics.stdev(s_i) / math.sqrt(len(s_i)),
                cost_s=statistics.median(t_i),
                proposal=config.get("proposal", "prior"),
                stratify=config.get("stratify"),
                noise=config.get("noise", "iid"),
                ecm_predicted=predicted(config) if predicted else None,
            )
        )
    _relative(rows)
    return rows, ref


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


def components_from_rows(rows: list[BenchRow]) -> dict[str, float] | None:
    """``V_b``, ``V_w`` and the ceiling on any inner-plate variance cut, from two plain rows.

    The plain estimator (prior proposal, no stratification, i.i.d. noise) has
    ``Var(R, K) = (V_b + V_w / K) / R``, so its rows at ``(R, 1)`` and ``(R, K)`` give both
    components. Nothing done on the inner plate (more draws, IS, stratification, QMC) can remove
    ``V_b``, so ``(V_b + V_w) / V_b`` bounds the cut of ``Var(R, 1)`` any such estimator at this
    ``R`` can reach. The reference's own variance is not subtracted: it sits in every row's
    ``var``, so ``V_b`` is slightly over-estimated and the ceiling slightly under-estimated.

    Args:
        rows: measured rows; the first ``R`` with a plain ``K = 1`` row and a plain ``K > 1``
            row is used (the largest such ``K``).

    Returns:
        ``{"R", "K", "v_between", "v_within", "ceiling"}`` (``ceiling`` is ``inf`` when the
        measured ``V_b`` is not positive), or ``None`` without such a pair of rows.
    """
    plain = [r for r in rows if _is_plain(asdict(r))]
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


def format_table(rows: list[BenchRow]) -> str:
    """A readable table of the rows."""
    head = f"{'method':<22}{'R':>3}{'K':>4}{'Var':>12}{'cost (ms)':>11}{'RE':>7}{'ECM':>7}{'ECM pred':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        pred = f"{r.ecm_predicted:.2f}" if r.ecm_predicted is not None else "-"
        lines.append(
            f"{r.method:<22}{r.R:>3}{r.K:>4}{r.var:>12.4g}{r.cost_s * 1e3:>11.3g}"
            f"{r.re:>7.2f}{r.ecm:>7.2f}{pred:>9}"
        )
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
    bench = PIPELINES[args.pipeline](quick=quick, seed=args.seed, device=args.device, **kwargs)
    if smoke:
        repeats, n_reference = 2, 2

    report = None
    predicted = None
    if hasattr(bench, "accounting"):
        report = bench.accounting(bench.R, n_repeats=2 if smoke else 20 if quick else 60)
        bench.k_adaptive = max(1, min(32, report.best_k((1, 2, 4, 8, 16))))

        def predicted(config: dict) -> float | None:
            if _is_plain(config) or config.get("proposal") == "adaptive":
                return report.ecm(int(config["K"]))
            return None

    rows, _ = run_protocol(bench, repeats, n_reference, progress=progress, predicted=predicted)
    bench.rows = rows
    extras = bench.extras()
    result = {
        "pipeline": args.pipeline,
        "device": device_name(args.device),
        "quick": quick,
        "repeats": repeats,
        "seed": args.seed,
        "date": time.strftime("%Y-%m-%d"),
        "wall_s": None,
        "rows": [asdict(r) for r in rows],
        "components": components_from_rows(rows),
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
        }
    result["wall_s"] = time.perf_counter() - t0
    print(format_table(rows))
    if result["components"] is not None:
        c = result["components"]
        print(
            f"\nfrom the plain rows at R={c['R']}: V_b = {c['v_between']:.4g}, "
            f"V_w = {c['v_within']:.4g}; no inner-plate estimator can cut Var(R, 1) by more "
            f"than (V_b + V_w) / V_b = {c['ceiling']:.3g}x"
        )
    if report is not None:
        print()
        print(report.table((1, 2, 4, 8, 16)))
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
