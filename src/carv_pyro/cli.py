"""The ``carv-pyro`` command.

Subcommands:

- ``carv-pyro dream "3" --out DIR``: carve a digit into a voxel field by score distillation
  with the embedded teacher ([`carv_pyro.pipelines.text_to_3d.dream`][carv_pyro.pipelines.text_to_3d.dream]).
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


# -------------------------------------------------------------------------------- dream


def _add_dream(subparsers: Any) -> None:
    from .pipelines.text_to_3d import ESTIMATORS

    p = subparsers.add_parser(
        "dream",
        help="carve a digit into a 3-D voxel field by score distillation",
        description=(
            "Optimize a voxel field so that its renders from random cameras look like the "
            "prompt's digit to the embedded diffusion teacher (SDS through Pyro's SVI), then "
            "write turntable.png, curves.png, summary.json and checkpoint.pt into --out."
        ),
    )
    p.add_argument("prompt", help="a digit 0-9 or its English name, e.g. 3 or three")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--steps", type=_positive_int, help="SVI steps (default 200)")
    p.add_argument(
        "--estimator",
        choices=list(ESTIMATORS),
        help="gradient estimator preset (default carv): baseline = one t ~ p(t) per view; "
        "reuse = K prior draws per view; carv = K importance-sampled, stratified draws",
    )
    p.add_argument("--K", type=_positive_int, help="teacher draws per view (preset's default)")
    p.add_argument("--R", type=_positive_int, help="rendered views per step (default 4)")
    p.add_argument("--lr", type=_positive_float, help="Adam learning rate (default 0.1)")
    p.add_argument(
        "--guidance-scale", type=_positive_float, help="classifier-free guidance scale (default 10)"
    )
    p.add_argument("--seed", type=_non_negative_int, help="random seed (default 0)")
    p.add_argument(
        "--eval-every", type=_positive_int, help="steps between quality evaluations (default 25)"
    )
    p.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        help="also checkpoint every N steps (the last step always is)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from DIR/checkpoint.pt (its settings are reused; pass --steps to extend)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=partial(_run_dream, parser=p))


def _dream_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Any:
    """Validate the dream arguments and return the config, before any heavy work."""
    from .data import parse_prompt

    try:
        parse_prompt(args.prompt)
    except ValueError:
        parser.error(
            f"unknown prompt {args.prompt!r}: expected a digit 0-9 or its English name "
            f"(zero, one, ..., nine)"
        )
    reason = _check_writable(args.out)
    if reason is not None:
        parser.error(f"--out: cannot write to the output folder {args.out!r} ({reason})")

    from .pipelines.text_to_3d import (
        CHECKPOINT_FILE,
        TextTo3DConfig,
        check_resumable,
        estimator_preset,
        load_checkpoint_config,
    )

    overrides = {
        "steps": args.steps,
        "K": args.K,
        "R": args.R,
        "lr": args.lr,
        "guidance_scale": args.guidance_scale,
        "seed": args.seed,
        "eval_every": args.eval_every,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.estimator is not None:
        settings = estimator_preset(args.estimator).settings()
        settings.update(overrides)
        overrides = settings
    try:
        if args.resume:
            try:
                saved = load_checkpoint_config(args.out)
            except (OSError, ValueError, RuntimeError) as err:
                parser.error(
                    f"--resume: cannot read {os.path.join(args.out, CHECKPOINT_FILE)}: {err}"
                )
            if saved is None:
                parser.error(f"--resume: no {CHECKPOINT_FILE} in {args.out!r} to resume from")
            fields = saved.to_dict()
            fields.update(overrides)
            config = TextTo3DConfig.from_dict(fields)
            if parse_prompt(config.prompt) != parse_prompt(args.prompt):
                parser.error(
                    f"--resume: the checkpoint in {args.out!r} is for prompt {saved.prompt!r}, "
                    f"not {args.prompt!r}"
                )
            check_resumable(saved, config)
        else:
            config = TextTo3DConfig(prompt=args.prompt, **overrides)
    except ValueError as err:
        parser.error(str(err))
    return config


def _run_dream(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    config = _dream_config(args, parser)

    from .pipelines.text_to_3d import dream

    summary = dream(
        config,
        args.out,
        progress=not args.quiet,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
    )
    first, last = summary["initial_quality"], summary["final_quality"]
    views = summary["eval_views"]
    print(
        f"dream {config.prompt!r} [{summary['estimator']}, R={config.R}, K={config.K}]: "
        f"{summary['steps']} steps in {summary['wall_s']:.1f} s "
        f"({summary['sec_per_step'] * 1e3:.0f} ms/step)\n"
        f"  held-out views read as {summary['label']}: {last['accuracy']:.0%} of {views} "
        f"(mean p = {last['mean_prob']:.2f}); at step 0: {first['accuracy']:.0%} "
        f"(mean p = {first['mean_prob']:.2f})\n"
        f"  wrote {', '.join(os.path.basename(f) for f in summary['files'].values())} "
        f"to {args.out}"
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
    if args.pretrain_steps is not None and args.pipeline != "distillation":
        parser.error(f"--pretrain-steps applies to --pipeline distillation, not {args.pipeline!r}")
    for flag in ("json", "plot"):
        path = getattr(args, flag)
        if path is not None:
            reason = _check_writable(os.path.dirname(os.path.abspath(path)))
            if reason is not None:
                parser.error(f"--{flag}: cannot write {path!r} ({reason})")
    from .bench import main as bench_main

    return bench_main(args)


# --------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """The ``carv-pyro`` argument parser (subcommands ``dream`` and ``bench``)."""
    parser = argparse.ArgumentParser(
        prog="carv-pyro",
        description="Cheaper gradients from frozen diffusion teachers (CARV, as a Pyro plugin).",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    _add_dream(subparsers)
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
    # Each handler holds its subcommand's parser, so errors come with that subcommand's usage.
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
