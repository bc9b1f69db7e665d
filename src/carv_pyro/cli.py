"""The ``carv-pyro`` command.

Subcommands:

- ``carv-pyro dream torus``: carve a shape into a voxel field by score distillation with the
  embedded 3D-aware teacher ([`carv_pyro.pipelines.text_to_3d.dream`][carv_pyro.pipelines.text_to_3d.dream]).
- ``carv-pyro race torus``: estimators against the clock to the same quality
  ([`carv_pyro.pipelines.text_to_3d.race`][carv_pyro.pipelines.text_to_3d.race]).
- ``carv-pyro bench``: the benchmark tables ([`carv_pyro.bench`][carv_pyro.bench]).

Every argument is checked before any work starts (the prompt, positive sizes, a writable output
folder); a bad one ends the command with exit status 2 and a message on stderr that names it.
The teacher (diffusers and its weights) is loaded only once the arguments are known to be good.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

__all__ = ["main", "build_parser"]

BENCH_PIPELINES = ("text-to-3d", "distillation", "attribution")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text!r}")
    return value


def _check_writable(folder: str) -> str | None:
    """Create ``folder`` and a temporary file in it; return the reason if that fails."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".carv-write-test-"):
            pass
    except OSError as err:
        return err.strerror or str(err)
    return None


def _check_outputs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """``--json`` and ``--plot`` must be writable, checked before any work."""
    for flag in ("json", "plot"):
        path = getattr(args, flag)
        if path is not None:
            reason = _check_writable(os.path.dirname(os.path.abspath(path)))
            if reason is not None:
                parser.error(f"--{flag}: cannot write {path!r} ({reason})")


# -------------------------------------------------------------------------------- dream


#: The estimator presets, named here so that ``--help`` needs no torch import; a test checks
#: them against `carv_pyro.PRESETS`, the one table.
ESTIMATOR_NAMES = ("baseline", "reuse", "stratified", "carv", "adaptive", "auto")


#: The shapes teacher's prompts, named here so that ``--help`` lists them without a torch import;
#: a test checks them against `carv_pyro.pipelines.shapes.SHAPE_CLASSES`.
SHAPE_NAMES = (
    "sphere",
    "cube",
    "cylinder",
    "cone",
    "torus",
    "pyramid",
    "octahedron",
    "tube",
    "arch",
    "cross",
    "mug",
    "lblock",
)


def _estimator_names() -> tuple[str, ...]:
    return ESTIMATOR_NAMES


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """Options shared by dream and race."""
    p.add_argument(
        "--teacher",
        default="shapes",
        metavar="NAME|DIR",
        help="the teacher: shapes (the embedded 3D-aware teacher, default), digits (the 16x16 "
        "digits teacher) or a local diffusers folder",
    )
    p.add_argument("--R", type=_positive_int, help="rendered views per step (default 4)")
    p.add_argument("--K", type=_positive_int, help="teacher draws per view (the preset's)")
    p.add_argument("--lr", type=_positive_float, help="Adam learning rate (default 0.3)")
    p.add_argument(
        "--guidance-scale",
        type=_positive_float,
        help="classifier-free guidance scale, e_u + s (e_c - e_u) (default: the teacher's)",
    )
    p.add_argument("--resolution", type=_positive_int, help="voxels per side (default 32)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu; e.g. cuda)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="the teacher's compute dtype (default float32)",
    )
    _add_compile_option(p)
    _add_threads_option(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


#: ``--compile`` modes: `carv_pyro.pipelines.text_to_3d.COMPILE_MODES` (spelled out here so that
#: ``--help`` imports no torch; a test keeps the two equal).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _add_threads_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=_positive_int,
        metavar="N",
        help="CPU threads for torch's operators (default: torch's, one per core). On a machine "
        "where other work keeps a core busy, --threads 1 avoids threads waiting on each "
        "other (a step of the main job measured 0.55 s with 2 threads against 0.32 s with 1 on "
        "a 2-core CPU beside one busy process); changes speed, not results' law",
    )


def _add_compile_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default=None,
        choices=COMPILE_MODES,
        metavar="MODE",
        help="compile the teacher's network with torch.compile (default: eager); MODE is "
        "torch.compile's: default (when --compile is given alone), reduce-overhead (CUDA "
        "graphs), max-autotune or max-autotune-no-cudagraphs. Changes speed, not the "
        "estimator; a resumed run may change it",
    )


def _add_dream(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "dream",
        help="carve a prompt into a 3-D voxel field by score distillation",
        description=(
            "Optimize a voxel field so that its renders from random cameras around the full "
            "circle look like the prompt to the embedded 3D-aware diffusion teacher (SDS "
            "through Pyro's SVI), then write turntable.png, curves.png, summary.json and "
            "checkpoint.pt into --out. Ctrl-C or SIGTERM stop after the step in progress with a "
            "checkpoint; --resume continues exactly."
        ),
    )
    p.add_argument(
        "prompt",
        help=f"the object: a shape of the shapes teacher ({', '.join(SHAPE_NAMES)}), or a digit "
        "0-9 (or its name) with --teacher digits",
    )
    p.add_argument("--out", metavar="DIR", help="output folder (default runs/PROMPT)")
    p.add_argument("--steps", type=_positive_int, help="SVI steps (default 300)")
    p.add_argument(
        "--estimator",
        metavar="PRESET[:FIELD=VALUE...]",
        help=f"gradient estimator, one of {', '.join(_estimator_names())} (default auto: K and "
        "costs measured online; baseline = one t ~ p(t) per view, threestudio's; reuse = K prior "
        "draws per view; carv = K importance-sampled, stratified draws), with fields changed "
        "as in auto:K=4 or carv:outer=lattice",
    )
    p.add_argument("--seed", type=_non_negative_int, help="random seed (default 0)")
    p.add_argument(
        "--eval-every", type=_positive_int, help="steps between quality evaluations (default 25)"
    )
    p.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        help="also checkpoint every N steps (it always does every minute and at the end)",
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out (its settings are reused; pass --steps to extend)",
    )
    group.add_argument(
        "--overwrite", action="store_true", help="replace the run (or other files) in --out"
    )
    _add_run_options(p)
    p.set_defaults(handler=partial(_run_dream, parser=p))


def _check_device(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    import torch  # the first heavy import: only once a command runs

    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device: not a torch device: {args.device!r} (try cpu or cuda)")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(
            f"--device {args.device}: no CUDA device here (torch {torch.__version__} sees none); "
            f"use --device cpu"
        )
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device: use cpu or cuda, got {args.device!r}")


def _run_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides = {
        "R": args.R,
        "lr": args.lr,
        "guidance_scale": args.guidance_scale,
        "resolution": args.resolution,
        "teacher": args.teacher,
        "device": args.device,
        "dtype": args.dtype,
        "compile": args.compile,
    }
    return {k: v for k, v in overrides.items() if v is not None}


def _estimator(
    name: str | None, K: int | None, parser: argparse.ArgumentParser, flag: str = "--estimator"
) -> Any:
    from .infer.estimator import Estimator

    try:
        spec = name or "auto"
        est = Estimator.from_spec(spec)
        if K is None:
            return est
        if any(part.partition("=")[0].strip() == "K" for part in spec.split(":")[1:]):
            raise ValueError(f"{spec!r} sets K itself; give K in the spec or with --K, not both")
        Estimator.preset(spec.split(":")[0].strip(), K=K)  # the preset's check: baseline is K = 1
        return est.replace(K=K)
    except ValueError as err:
        parser.error(f"{flag}/--K: {err}")


def _dream_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Any:
    """Validate the dream arguments and return the config, before any heavy work."""
    from .pipelines.base import RunFolder, RunFolderError
    from .pipelines.text_to_3d import CHECKPOINT_FILE, TextTo3DConfig, checkpoint_progress

    _check_device(args, parser)
    args.out = args.out or os.path.join("runs", args.prompt.strip().replace(" ", "_") or "run")
    folder = RunFolder(args.out, "dream", CHECKPOINT_FILE)
    try:
        folder.check(resume=args.resume, overwrite=args.overwrite)
    except RunFolderError as err:
        parser.error(f"--out: {err}")
    parent = os.path.dirname(os.path.abspath(args.out))
    reason = _check_writable(parent)
    if reason is not None:
        parser.error(f"--out: cannot write to {args.out!r} ({reason})")
    overrides = _run_overrides(args)
    for key in ("steps", "seed", "eval_every"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    try:
        if args.resume:
            saved, done = checkpoint_progress(args.out)
            if args.steps is not None and args.steps < done:
                parser.error(
                    f"--steps: the run in {args.out!r} is at step {done}; ask for at least "
                    f"{done} steps, or leave --steps out to finish its own {saved.steps}"
                )
            if saved.prompt.strip().lower() != args.prompt.strip().lower():
                parser.error(
                    f"--resume: the run in {args.out!r} is for prompt {saved.prompt!r}, not "
                    f"{args.prompt!r}"
                )
            fields = saved.to_dict()
            # a resumed run may run longer, and compile or not (speed only); --compile absent
            # keeps the run's setting
            resumable = ("steps", "compile")
            fields.update({k: v for k, v in overrides.items() if k in resumable})
            config = TextTo3DConfig.from_dict(fields)
            config.resumable_from(saved)
            ignored = sorted(
                k for k in overrides if k not in resumable and fields.get(k) != overrides[k]
            )
            if ignored and any(getattr(args, k, None) is not None for k in ignored):
                parser.error(f"--resume reuses the run's settings; do not change {ignored}")
            marker = folder._marker() or {}
            if marker.get("state") == "finished" and done >= config.steps:
                args.finished_at = done
        else:
            estimator = _estimator(args.estimator, args.K, parser)
            config = TextTo3DConfig(prompt=args.prompt, estimator=estimator, **overrides)
            _check_prompt(config, parser)
    except (ValueError, OSError) as err:
        parser.error(str(err))
    return config


def _check_prompt(config: Any, parser: argparse.ArgumentParser) -> None:
    """The teacher folder's files, and the prompt against the teacher's classes, read from its
    settings (no weights loaded)."""
    import json
    from pathlib import Path

    digits = config.teacher == "digits"
    settings = None
    if config.teacher == "shapes":
        from .teachers.shapes import SHAPES_TEACHER_CONFIG, SHAPES_TEACHER_DIR

        settings = SHAPES_TEACHER_DIR / SHAPES_TEACHER_CONFIG
    elif not digits:
        folder = Path(config.teacher)
        expected = (
            f"expected shapes, digits or a local diffusers folder with unet/ and scheduler/, "
            f"got {config.teacher!r}"
        )
        if not folder.is_dir():
            parser.error(f"--teacher: {expected} (not a folder)")
        from .teachers.diffusers_teacher import DiffusersTeacher

        try:
            DiffusersTeacher.check_folder(folder)
        except (FileNotFoundError, ValueError) as err:
            parser.error(f"--teacher: {expected}: {err}")
        settings = folder / "shapes_teacher.json"
        # make_scene loads a folder without the shapes settings as a digits-style teacher
        digits = not settings.is_file()
    if digits:
        from .data import parse_prompt

        try:
            parse_prompt(config.prompt)
        except ValueError as err:
            where = "" if config.teacher == "digits" else f" (a digits teacher: {config.teacher})"
            parser.error(f"prompt: {err}{where}")
        return
    from .teachers.shapes import parse_shape_prompt

    names = tuple(json.loads(settings.read_text())["class_names"])
    try:
        parse_shape_prompt(config.prompt, names)
    except ValueError as err:
        parser.error(f"prompt: {err}")


def _stopped(err: BaseException, out: str) -> int:
    from .pipelines.base import RunStopped

    if isinstance(err, RunStopped):
        print(f"carv-pyro: {err}", file=sys.stderr)
        return err.exit_code
    print(
        f"carv-pyro: interrupted; the step in progress was not saved, the last checkpoint in "
        f"{out} is kept (continue with --resume)",
        file=sys.stderr,
    )
    return 130


def _run_dream(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    config = _dream_config(args, parser)
    done = getattr(args, "finished_at", None)
    if done is not None:
        # resuming a finished run would only rewrite its files (and its summary would say it
        # was resumed): leave them as they are
        print(
            f"dream {config.prompt!r}: the run in {args.out} finished at step {done} of "
            f"{config.steps}; nothing to do, its files are kept (pass --steps N with N > {done} "
            f"to continue it)"
        )
        return 0

    from .pipelines.base import RunStopped
    from .pipelines.text_to_3d import dream

    try:
        summary = dream(
            config,
            args.out,
            progress=not args.quiet,
            checkpoint_every=args.checkpoint_every,
            resume=args.resume,
            overwrite=args.overwrite,
        )
    except (RunStopped, KeyboardInterrupt) as err:
        return _stopped(err, args.out)
    first, last = summary["initial_quality"], summary["final_quality"]
    parts = []
    if "iou" in last:
        parts.append(
            f"3D IoU with the true {config.prompt} {last['iou']:.2f} (start {first['iou']:.2f})"
        )
    if "p" in last:
        parts.append(
            f"held-out views read as {config.prompt!r}: p = {last['p']:.2f}, {last['accuracy']:.0%}"
        )
    print(
        f"dream {config.prompt!r} [{summary['estimator']}, R={config.R}, K={summary['K']['last']}, "
        f"teacher {config.teacher}, {config.device}]: {summary['steps']} steps in "
        f"{summary['wall_s']:.1f} s of training\n  " + "; ".join(parts) + "\n"
        f"  wrote {', '.join(os.path.basename(f) for f in summary['files'].values())} to "
        f"{args.out}"
    )
    return 0


# --------------------------------------------------------------------------------- race


def _add_race(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "race",
        help="race estimators to the same quality under one wall-clock budget",
        description=(
            "Run each estimator for several seeds under the same wall-clock budget of training, "
            "interleaved, and report the time each needs to reach the baseline's median final "
            "3D IoU, as a ratio to the baseline with a paired bootstrap 95% interval."
        ),
    )
    p.add_argument(
        "prompt",
        help=f"the object to carve: a shape ({', '.join(SHAPE_NAMES)}), or a digit with "
        "--teacher digits",
    )
    p.add_argument("--seeds", type=_positive_int, default=7, help="seeds per estimator (7)")
    p.add_argument("--first-seed", type=_non_negative_int, default=100, help="the first seed (100)")
    p.add_argument(
        "--budget-s", type=_positive_float, default=120.0, help="seconds of training per run"
    )
    p.add_argument(
        "--estimators",
        default="baseline,reuse,carv,auto",
        help="comma-separated presets, each with fields changed if wanted (auto:K=4, "
        "carv:outer=lattice); the first is the baseline (default baseline,reuse,carv,auto)",
    )
    p.add_argument(
        "--lrs",
        metavar="NAME=LR,...",
        help="learning rate per estimator, e.g. baseline=0.1,auto=0.05 (default --lr for all)",
    )
    p.add_argument(
        "--lr-grid",
        metavar="LR,LR,...",
        help="first pick each estimator's learning rate from this grid on --tune-seeds seeds of "
        "their own (reported beside the race; its runs go to DIR-lr-sweep)",
    )
    p.add_argument("--tune-seeds", type=_positive_int, default=2, help="seeds per rate (2)")
    p.add_argument("--out", metavar="DIR", help="the race's folder (default runs/race_PROMPT)")
    p.add_argument("--json", metavar="PATH", help="also write the results here")
    p.add_argument("--plot", metavar="PATH", help="write quality against wall-clock (PNG)")
    p.add_argument(
        "--quick", action="store_true", help="a small race (seconds per run; for smoke tests)"
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue a stopped race")
    group.add_argument("--overwrite", action="store_true", help="replace a race in --out")
    _add_run_options(p)
    p.set_defaults(handler=partial(_run_race, parser=p))


def _parse_lrs(text: str | None, names: list[str], parser: argparse.ArgumentParser):
    if text is None:
        return None
    out = {}
    for part in text.split(","):
        # the rate follows the last "=": an estimator spec has "=" of its own (auto:K=4=0.3)
        name, _, value = part.rpartition("=")
        name = name.strip()
        if name not in names:
            parser.error(f"--lrs: {name!r} is not one of the racing estimators {names}")
        try:
            out[name] = _positive_float(value)
        except argparse.ArgumentTypeError as err:
            parser.error(f"--lrs: {name}: {err}")
    return out


def _run_race(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    _check_device(args, parser)
    names = [n.strip() for n in args.estimators.split(",") if n.strip()]
    # --K sizes every estimator but the baseline (K = 1 by definition)
    estimators = [
        _estimator(
            n, args.K if n.split(":")[0].strip() != "baseline" else None, parser, "--estimators"
        )
        for n in names
    ]
    if len(set(names)) != len(names) or not names:
        parser.error(f"--estimators: give distinct estimators, got {args.estimators!r}")
    lrs = _parse_lrs(args.lrs, names, parser)
    grid = None
    if args.lr_grid is not None:
        try:
            grid = [_positive_float(v) for v in args.lr_grid.split(",")]
        except argparse.ArgumentTypeError as err:
            parser.error(f"--lr-grid: {err}")
    _check_outputs(args, parser)
    args.out = args.out or os.path.join("runs", f"race_{args.prompt.strip().replace(' ', '_')}")
    from .pipelines.base import RunFolder, RunFolderError, RunStopped
    from .pipelines.text_to_3d import (
        TextTo3DConfig,
        lr_sweep,
        race,
        save_race_json,
        save_race_plot,
    )

    try:
        RunFolder(args.out, "race", "race.json").check(resume=args.resume, overwrite=args.overwrite)
        # the sweep's races live beside the race's folder, not in it: the race's folder holds
        # only the race
        sweep_dir = f"{os.path.normpath(args.out)}-lr-sweep"
        base = TextTo3DConfig(prompt=args.prompt, **_run_overrides(args))
        _check_prompt(base, parser)
    except (RunFolderError, ValueError) as err:
        parser.error(str(err))
    if args.quick:
        base = base.replace(resolution=min(base.resolution, 16), R=min(base.R, 2), eval_views=4)
        args.budget_s = min(args.budget_s, 4.0)
        args.seeds = min(args.seeds, 2)
    progress = not args.quiet
    sweep = None
    try:
        if grid is not None:
            sweep = lr_sweep(
                args.prompt,
                sweep_dir,
                grid,
                estimators=estimators,
                seeds=args.tune_seeds,
                first_seed=0,
                budget_s=args.budget_s,
                base=base,
                resume=args.resume,
                overwrite=args.overwrite,
                progress=progress,
            )
            lrs = sweep["best"]
        results = race(
            args.prompt,
            args.out,
            estimators=estimators,
            seeds=args.seeds,
            first_seed=args.first_seed,
            budget_s=args.budget_s,
            lr=lrs,
            base=base,
            resume=args.resume,
            overwrite=args.overwrite and grid is None,
            progress=progress,
        )
    except (RunStopped, KeyboardInterrupt) as err:
        return _stopped(err, args.out)
    if sweep is not None:
        results["lr_sweep"] = sweep
    if args.json:
        save_race_json(results, args.json)
    if args.plot:
        save_race_plot(results, args.plot)
    target = results["target"]
    print(
        f"race {args.prompt!r} on {results['device']}: {args.seeds} seeds x {args.budget_s:g} s; "
        f"target {target['metric']} = {target['value']:.3f} ({target['of']})"
    )
    for name, entry in results["estimators"].items():
        r = entry["ratio_to_baseline"]
        times = ", ".join("-" if t is None else f"{t:.1f}" for t in entry["time_to_target_s"])
        lo, hi = r["ci95"]
        print(
            f"  {name:>10} (lr {entry['lr']:g}): time to target / baseline's = {r['median']:.2f} "
            f"[95% {lo:.2f}, {hi:.2f}]; per seed (s): {times}"
        )
    return 0


# -------------------------------------------------------------------------------- bench


def _add_bench(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "bench",
        help="measure variance, cost and ECM of the estimators on the pipelines",
        description="Benchmark the gradient estimators (baseline, reuse, CARV) side by side.",
    )
    p.add_argument(
        "--pipeline",
        choices=BENCH_PIPELINES,
        default="text-to-3d",
        help="the pipeline to benchmark (default text-to-3d)",
    )
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a variance-against-cost picture")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="random seed (default 0)")
    _add_compile_option(p)
    _add_threads_option(p)
    p.add_argument(
        "--repeats", type=_positive_int, help="independent estimates per variance measurement"
    )
    p.add_argument(
        "--pretrain-steps",
        type=_non_negative_int,
        metavar="N",
        help="distillation only: DMD steps before the measured checkpoint (default 10 quick, "
        "100 full; 0 measures right after the fake score's warm-up)",
    )
    p.set_defaults(handler=partial(_run_bench, parser=p))


def _run_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    _check_device(args, parser)
    if args.pretrain_steps is not None and args.pipeline != "distillation":
        parser.error(f"--pretrain-steps applies to --pipeline distillation, not {args.pipeline!r}")
    if args.compile is not None and args.pipeline != "text-to-3d":
        parser.error(f"--compile applies to --pipeline text-to-3d, not {args.pipeline!r}")
    _check_outputs(args, parser)
    from .bench import main as bench_main

    return bench_main(args)


# --------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """The ``carv-pyro`` argument parser (subcommands ``dream``, ``race`` and ``bench``)."""
    parser = argparse.ArgumentParser(
        prog="carv-pyro",
        description="Cheaper gradients from frozen diffusion teachers (CARV, as a Pyro plugin).",
    )
    from importlib.metadata import PackageNotFoundError, version

    try:
        __version__ = version("carv-pyro")
    except PackageNotFoundError:  # run from a source tree
        __version__ = "unknown"
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    _add_dream(subparsers)
    _add_race(subparsers)
    _add_bench(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``carv-pyro`` command.

    Args:
        argv: the arguments after the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit status (0 on success). Bad arguments raise ``SystemExit(2)`` after printing a
        message that names them to stderr.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "threads", None) is not None:
        import torch

        torch.set_num_threads(args.threads)
    # Each handler holds its subcommand's parser, so errors come with that subcommand's usage.
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
