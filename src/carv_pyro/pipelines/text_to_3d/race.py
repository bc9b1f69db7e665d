"""The race: estimators against the clock, to the same quality (``carv-pyro race``).

The product's promise is the same quality in less wall-clock. The race runs each estimator for
several seeds under one wall-clock budget of training (evaluation excluded), interleaved (for
each seed, every estimator in turn, the order rotating from seed to seed) so that changes of
machine load hit all alike, and reports the time each needs to reach the target quality: the
baseline's median final quality (3D IoU against the true shape for the shapes teacher, which
cannot be gamed by a simpler image and does not saturate).

For every estimator the time to target of a seed is where its quality curve first crosses the
target (linear between the two evaluations around the crossing; ``None`` if never within the
budget). The ratio to the baseline is ``median_s t(s) / median_s t_baseline(s)``, a run that
never reaches the target counting as infinitely slow, with a 95% interval from a paired
bootstrap over seeds (the same resampled seeds for both medians).

Every run is a [`dream`][carv_pyro.pipelines.text_to_3d.dream] run in its own folder, so a
race stopped by a signal resumes with ``resume=True``: finished runs are kept, the interrupted
one continues from its checkpoint.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ... import _checks
from ...infer.estimator import Estimator, resolve_estimator
from ...timing import device_name
from ..base import RunFolder
from .config import TextTo3DConfig
from .dream import dream
from .scene import make_scene

__all__ = ["lr_sweep", "race", "save_race_json", "save_race_plot", "time_to_target"]

RACE_FILE = "race.json"


def time_to_target(
    curve: Sequence[Sequence[float]], target: float, column: int = 2
) -> float | None:
    """The first wall-clock second at which a quality curve reaches ``target``.

    Args:
        curve: rows ``[wall_s, step, iou, p]`` in time order.
        target: the quality to reach.
        column: which quality (2: IoU, 3: p).

    Returns:
        Seconds (linear between the evaluation before the crossing and the one at it), or
        ``None`` if the curve never reaches the target.
    """
    prev = None
    for row in curve:
        value = row[column]
        if value is not None and value >= target:
            if prev is None or prev[column] is None:
                return float(row[0])
            t0, v0, t1, v1 = prev[0], prev[column], row[0], value
            return float(t0 + (t1 - t0) * (target - v0) / (v1 - v0)) if v1 > v0 else float(t1)
        prev = row
    return None


def _median_time(times: Sequence[float | None]) -> float:
    """The time by which half of the runs have reached the target: the ordinary median for an
    odd number of runs, the lower of the middle two for an even number (a run that never reaches
    it counts as infinitely slow, so the average of the middle two would be infinite whenever one
    of them is censored, as the baseline's own median seed often is)."""
    return statistics.median_low(math.inf if t is None else t for t in times)


def _ratio(times: Sequence[float | None], base: Sequence[float | None]) -> float:
    num, den = _median_time(times), _median_time(base)
    if math.isinf(num) and math.isinf(den):
        return math.nan
    return num / den if den > 0 else math.nan


def _bootstrap(times, base, n: int = 4000, seed: int = 0) -> tuple[float, float]:
    g = torch.Generator().manual_seed(seed)
    k = len(times)
    ratios = []
    for _ in range(n):
        idx = torch.randint(0, k, (k,), generator=g).tolist()
        r = _ratio([times[i] for i in idx], [base[i] for i in idx])
        if not math.isnan(r):
            ratios.append(r)
    if not ratios:
        return math.nan, math.nan
    ratios.sort()
    lo = ratios[int(0.025 * (len(ratios) - 1))]
    hi = ratios[int(math.ceil(0.975 * (len(ratios) - 1)))]
    return lo, hi


def _curve(summary: dict[str, Any]) -> list[list[float | None]]:
    return [[e["seconds"], e["step"], e.get("iou"), e.get("p")] for e in summary["history"]]


def race(
    prompt: str,
    out_dir: str | Path,
    *,
    estimators: Sequence[str | Estimator] = ("baseline", "reuse", "carv", "auto"),
    seeds: int = 7,
    first_seed: int = 100,
    budget_s: float = 120.0,
    lr: dict[str, float] | float | None = None,
    base: TextTo3DConfig | None = None,
    eval_every_s: float | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Race estimators on one prompt under one wall-clock budget.

    Args:
        prompt: the object to carve.
        out_dir: the race's folder (one sub-folder per run, and ``race.json``).
        estimators: preset names or estimators; the first is the baseline of the ratios.
        seeds: seeds per estimator (``first_seed, first_seed + 1, ...``).
        first_seed: the first seed (keep the seeds of a learning-rate sweep apart from these).
        budget_s: seconds of training per run.
        lr: the Adam learning rate: one for all, or ``{estimator name: lr}`` (others get the
            base config's), each picked beforehand on other seeds.
        base: the settings every run starts from (default `TextTo3DConfig`).
        eval_every_s: seconds of training between evaluations (default ``budget_s / 24``).
        resume: continue a stopped race in ``out_dir``.
        overwrite: replace a race in ``out_dir``.
        progress: show progress bars.

    Returns:
        The race's results (also written to ``race.json``): ``device``, ``target``
        (``metric``, ``value``), and per estimator ``lr``, ``seeds`` (each ``seed``,
        ``curve`` rows ``[wall_s, step, iou, p]``, ``steps`` run and ``K``: the first and last
        inner size and the steps run at each), ``time_to_target_s`` per seed and
        ``ratio_to_baseline`` (``median``, ``ci95``; infinite where the median seed never
        reached the target, ``null`` in the JSON, see `save_race_json`).

    Raises:
        ValueError: naming a bad argument (before any run starts).
    """
    from tqdm.auto import tqdm

    ests = [resolve_estimator(e) for e in estimators]
    names = [e.name for e in ests]
    if len(ests) < 1 or len(set(names)) != len(names):
        raise ValueError(f"estimators must be distinct presets or named estimators, got {names}")
    _checks.positive_int("seeds", seeds)
    _checks.non_negative_int("first_seed", first_seed)
    budget_s = _checks.positive_float("budget_s", budget_s)
    base = base if base is not None else TextTo3DConfig()
    _checks.instance("base", base, TextTo3DConfig, "a TextTo3DConfig")
    lrs: dict[str, float] = {}
    for name in names:
        value = lr.get(name, base.lr) if isinstance(lr, dict) else (base.lr if lr is None else lr)
        lrs[name] = _checks.positive_float(f"lr[{name!r}]", value)
    if isinstance(lr, dict):
        unknown = sorted(set(lr) - set(names))
        if unknown:
            raise ValueError(f"lr names estimators that do not race: {unknown}; racing {names}")
    every = eval_every_s if eval_every_s is not None else budget_s / 24
    _checks.positive_float("eval_every_s", every)
    big_steps = 10**7  # the budget ends the runs
    configs = {
        (name, s): base.replace(
            prompt=prompt,
            estimator=est,
            seed=s,
            lr=lrs[name],
            steps=big_steps,
            budget_s=budget_s,
            eval_every=big_steps,
            eval_every_s=every,
        )
        for name, est in zip(names, ests)
        for s in range(first_seed, first_seed + seeds)
    }
    out = Path(out_dir)
    folder = RunFolder(out, "race", RACE_FILE)
    folder.check(resume=resume, overwrite=overwrite)
    scene = make_scene(
        base.teacher,
        prompt,
        device=base.device,
        dtype=base.torch_dtype,
        compile=base.teacher_compile,
    )
    metric = "iou" if scene.true_occupancy(2) is not None else "p"
    if not resume or not folder.checkpoint.exists():
        folder.prepare(resume=False, overwrite=overwrite)
    results: dict[str, Any] = {
        "prompt": prompt,
        "device": device_name(base.device),
        "teacher": base.teacher,
        "budget_s": budget_s,
        "seeds": list(range(first_seed, first_seed + seeds)),
        "config": base.to_dict(),
        "estimators": {
            name: {"settings": est.settings(), "lr": lrs[name], "seeds": []}
            for name, est in zip(names, ests)
        },
    }
    order = []
    for i, s in enumerate(range(first_seed, first_seed + seeds)):
        rot = i % len(names)
        order += [(name, s) for name in names[rot:] + names[:rot]]
    bar = tqdm(order, desc=f"race {prompt!r}", unit="run", disable=not progress)
    for name, s in bar:
        bar.set_postfix(estimator=name, seed=s)
        run_dir = out / f"{_folder_name(name)}_seed{s}"
        run_folder = RunFolder(run_dir, "dream", "checkpoint.pt")
        marker = run_folder._marker()
        if marker is not None and marker.get("state") == "finished" and resume:
            summary = json.loads((run_dir / "summary.json").read_text())
        else:
            again = resume and marker is not None and run_folder.checkpoint.exists()
            summary = dream(
                configs[(name, s)],
                run_dir,
                progress=False,
                resume=again,
                overwrite=not again,
                scene=scene,
                pictures=False,
            )
        results["estimators"][name]["seeds"].append(
            {
                "seed": s,
                "curve": _curve(summary),
                "steps": summary["steps"],
                "K": summary["K"],
                "accounting": summary.get("accounting"),
            }
        )
        save_race_json(results, out / RACE_FILE)
    bar.close()
    _score(results, names[0], metric)
    save_race_json(results, out / RACE_FILE)
    folder.mark("finished")
    return results


def _folder_name(name: str) -> str:
    """A run folder's name for an estimator's name: a spec's ``:`` (``auto:K=4``) becomes
    ``+``, and anything but letters, digits, ``._=+-`` becomes ``_``, so that the folder is a
    portable file name."""
    return re.sub(r"[^\w.=+-]", "_", name.replace(":", "+"))


def lr_sweep(
    prompt: str,
    out_dir: str | Path,
    lrs: Sequence[float],
    *,
    estimators: Sequence[str | Estimator] = ("baseline", "auto"),
    seeds: int = 2,
    first_seed: int = 0,
    budget_s: float = 120.0,
    base: TextTo3DConfig | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Each estimator's best learning rate, picked on seeds of its own before a race.

    Lower variance buys a larger step, and Adam normalises the gradient's scale, so a race at one
    shared learning rate hides most of the difference between estimators: each gets the rate
    with the best median final quality here, on seeds the race does not use.

    Args:
        prompt: the object to carve.
        out_dir: the sweep's folder (one race per learning rate).
        lrs: the learning rates to try.
        estimators: as for `race`.
        seeds: seeds per estimator and rate (``first_seed, ...``; keep them apart from the
            race's).
        first_seed: the first seed.
        budget_s: seconds of training per run.
        base: the settings every run starts from.
        resume: continue a stopped sweep.
        overwrite: replace a sweep.
        progress: show progress bars.

    Returns:
        ``{"lrs", "final": {estimator: [median final quality per rate]}, "best": {estimator:
        rate}}`` (also written to ``lr_sweep.json``).
    """
    lrs = [_checks.positive_float("lrs", v) for v in lrs]
    if not lrs:
        raise ValueError("lrs must hold at least one learning rate")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    finals: dict[str, list[float]] = {}
    names: list[str] = []
    for value in lrs:
        res = race(
            prompt,
            out / f"lr_{value:g}",
            estimators=estimators,
            seeds=seeds,
            first_seed=first_seed,
            budget_s=budget_s,
            lr=value,
            base=base,
            resume=resume,
            overwrite=overwrite,
            progress=progress,
        )
        names = list(res["estimators"])
        for name, entry in res["estimators"].items():
            finals.setdefault(name, []).append(entry["final"]["median"])
    best = {name: lrs[max(range(len(lrs)), key=lambda i: finals[name][i])] for name in names}
    sweep = {"lrs": lrs, "seeds": seeds, "budget_s": budget_s, "final": finals, "best": best}
    save_race_json(sweep, out / "lr_sweep.json")
    return sweep


def _score(results: dict[str, Any], baseline: str, metric: str) -> None:
    column = 2 if metric == "iou" else 3
    base_runs = results["estimators"][baseline]["seeds"]
    finals = [run["curve"][-1][column] for run in base_runs]
    target = statistics.median(finals)
    results["target"] = {"metric": metric, "value": target, "of": f"{baseline} median final"}
    base_times = [time_to_target(run["curve"], target, column) for run in base_runs]
    for entry in results["estimators"].values():
        runs = sorted(entry["seeds"], key=lambda r: r["seed"])
        entry["seeds"] = runs
        times = [time_to_target(run["curve"], target, column) for run in runs]
        entry["time_to_target_s"] = times
        entry["final"] = {
            "median": statistics.median(run["curve"][-1][column] for run in runs),
            "per_seed": [run["curve"][-1][column] for run in runs],
        }
        lo, hi = _bootstrap(times, base_times)
        entry["ratio_to_baseline"] = {"median": _ratio(times, base_times), "ci95": [lo, hi]}


def save_race_json(results: dict[str, Any], path: str | Path) -> str:
    """Write a race's results as strict JSON, atomically (a temporary file, then a rename).

    A ratio or interval bound that is infinite (the median seed never reached the target) or
    undefined (neither estimator's median seed did) is written as ``null``: Python's
    ``Infinity`` and ``NaN`` are not JSON, and strict readers (``jq``, browsers) reject them.

    Returns:
        ``str(path)``.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    text = json.dumps(_finite(results), indent=2, default=str, allow_nan=False)
    tmp.write_text(text + "\n")
    tmp.replace(path)
    return str(path)


def _finite(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by ``None`` (json's ``default`` hook is
    never called for floats, so this walks the containers itself)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def save_race_plot(results: dict[str, Any], path: str | Path) -> str:
    """The race as a picture, one colour per estimator, in three panels.

    Top: quality against wall-clock, one thin line per seed, the median in bold, the target
    dashed, the ratios in the legend. Bottom left: the same near the target, where the race is
    decided (the full range hides differences of a few hundredths of IoU on a plateau), with
    each estimator's median time to target as a dotted vertical line. Bottom right: every seed's
    time to target (a seed that never reached it drawn at the budget as an open marker), the
    median as a bar: the numbers the ratio is made of.

    Returns:
        ``str(path)``.
    """
    from matplotlib.figure import Figure

    metric = results.get("target", {}).get("metric", "iou")
    column = 2 if metric == "iou" else 3
    ylabel = "3D IoU with the true shape" if metric == "iou" else "p(prompt), held-out views"
    fig = Figure(figsize=(13, 10), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.1, 1])
    ax = top.subplots()
    zoom, dots = bottom.subplots(1, 2, width_ratios=[1.4, 1])
    budget = float(results["budget_s"])
    grid = torch.linspace(0.0, budget, 200).tolist()
    target = results.get("target")
    names = list(results["estimators"])
    finals: list[float] = []
    for i, name in enumerate(names):
        entry = results["estimators"][name]
        color = f"C{i}"
        interp = []
        for run in entry["seeds"]:
            xs = [row[0] for row in run["curve"]]
            ys = [row[column] for row in run["curve"]]
            for a in (ax, zoom):
                a.plot(xs, ys, color=color, lw=0.7, alpha=0.35)
            interp.append(_step_interp(xs, ys, grid))
            finals += [y for y in ys[-1:] if y is not None]
        med = [statistics.median(col) for col in zip(*interp)] if interp else []
        ax.plot(grid, med, color=color, lw=2.5, label=_legend_label(name, entry))
        zoom.plot(grid, med, color=color, lw=2.5)
        times = entry.get("time_to_target_s") or []
        if times:
            t_med = _median_time(times)
            if math.isfinite(t_med):
                zoom.axvline(t_med, color=color, ls=":", lw=1.5)
            reached = [t for t in times if t is not None]
            missed = len(times) - len(reached)
            jitter = [
                (j - (len(times) - 1) / 2) * 0.25 / max(len(times), 1) for j in range(len(times))
            ]
            dots.scatter(reached, [i + jitter[j] for j in range(len(reached))], color=color, s=28)
            if missed:
                dots.scatter(
                    [budget] * missed,
                    [i + jitter[len(reached) + j] for j in range(missed)],
                    facecolors="none",
                    edgecolors=color,
                    s=40,
                )
            if math.isfinite(t_med):
                dots.plot([t_med, t_med], [i - 0.3, i + 0.3], color=color, lw=3)
    if target:
        for a in (ax, zoom):
            a.axhline(target["value"], ls="--", color="k", lw=1)
        ax.plot([], [], ls="--", color="k", lw=1, label=f"target: {target['of']}")
        hi = max([target["value"], *finals])
        zoom.set_ylim(target["value"] - 2.5 * max(hi - target["value"], 0.01), hi + 0.005)
        # from just before the earliest arrival (where the race is decided) to the end
        arrivals = [
            t
            for entry in results["estimators"].values()
            for t in entry.get("time_to_target_s") or []
            if t is not None
        ]
        zoom.set_xlim(min([0.25 * budget, *(0.8 * t for t in arrivals)]), budget)
    ax.set_xlabel("training wall-clock (s)")
    ax.set_ylabel(ylabel)
    ax.set_title(
        f"race {results['prompt']!r}: {len(results['seeds'])} seeds per estimator, "
        f"{results['device']}"
    )
    ax.legend(loc="lower right", fontsize=10)
    zoom.set_xlabel("training wall-clock (s)")
    zoom.set_ylabel(ylabel)
    zoom.set_title("near the target (dotted: median time to target)")
    dots.set_yticks(range(len(names)), names)
    dots.set_ylim(-0.6, len(names) - 0.4)
    dots.set_xlim(0.0, budget * 1.04)
    dots.axvline(budget, color="0.6", lw=1)
    dots.set_xlabel("time to target (s); open: not reached within the budget")
    dots.set_title("each seed's time to target (bar: median)")
    fig.savefig(path, dpi=100)
    return str(path)


def _legend_label(name: str, entry: dict[str, Any]) -> str:
    """An estimator's ratio to the baseline's time, or that its median seed never arrived
    (read from the times, so that results read back from JSON, where the infinite ratio is
    ``null``, say the same)."""
    ratio = entry.get("ratio_to_baseline")
    if not ratio:
        return name
    times = entry.get("time_to_target_s") or []
    if times and math.isinf(_median_time(times)):
        return f"{name}: its median seed did not reach the target"
    lo, hi = ratio.get("ci95", [math.nan, math.nan])
    return f"{name}: {_fmt(ratio.get('median'))}x the baseline's time [{_fmt(lo)}, {_fmt(hi)}]"


def _step_interp(xs: list[float], ys: list[float | None], grid: list[float]) -> list[float]:
    out, j, last = [], 0, ys[0] if ys and ys[0] is not None else 0.0
    for g in grid:
        while j < len(xs) and xs[j] <= g:
            if ys[j] is not None:
                last = ys[j]
            j += 1
        out.append(last)
    return out


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "inf" if v == math.inf else "n/a"
    return f"{v:.2f}"
