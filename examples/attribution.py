"""Data attribution with the digits teacher (D-TRAK): which training digits explain a query?

Each example's feature is the projected gradient of the teacher's denoising loss w.r.t. its
weights, an expectation over (t, eps) estimated with K teacher evaluations per example. The
baseline draws t i.i.d. from the uniform prior. CARV, at the same K (so the same compute),
importance-samples t from q*(t) ∝ p(t) sqrt(E||g||^2 | t), estimated once from a pilot on two
other digits, stratifies it (one draw per stratum of q*) and draws eps by scrambled-Sobol QMC.
Each estimator is a carv_pyro.Estimator, built from the bench's table of methods.
Scores are TRAK's Q (F^T F + lambda I)^-1 F^T.

With --run-dir DIR the two long estimates (the reference and the CARV features) run as
resumable runs (carv_pyro.pipelines.attribution.attribute) in DIR/reference and DIR/carv: they
checkpoint every minute, Ctrl-C or SIGTERM stops them after the example in progress, and the
same command with --resume continues them exactly; a finished run is never overwritten without
--resume or --overwrite.

    python examples/attribution.py              # a few minutes on one CPU core
    python examples/attribution.py --ecm        # also the ECM table at K = 4 and K = 64
    python examples/attribution.py --run-dir runs/attribution   # resumable (--resume after a stop)

Writes attribution.png (each query next to its top-5 attributed training digits).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import time

import torch

from carv_pyro import Estimator
from carv_pyro.data import load_digits_images
from carv_pyro.pipelines.attribution import (
    BENCH_METHODS,
    AttributionFeaturizer,
    attribute,
    attribution_scores,
    load_attribution_teacher,
    pick_examples,
    pilot_proposal,
    rank_correlation,
)
from carv_pyro.pipelines.attribution.run import CHECKPOINT_FILE
from carv_pyro.pipelines.base import RunFolderError, RunStopped

torch.set_num_threads(1)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-train", type=int, default=20, help="training digits to attribute to")
    p.add_argument("--n-query", type=int, default=3, help="held-out query digits")
    p.add_argument("--K", type=int, default=16, help="teacher evaluations per example")
    p.add_argument("--dim", type=int, default=128, help="projected feature dimension k")
    p.add_argument(
        "--params",
        default="up_blocks.2,conv_norm_out,conv_out",
        help="comma-separated parameter name prefixes, or 'all'",
    )
    p.add_argument("--pilot-draws", type=int, default=32, help="pilot draws per pilot digit")
    p.add_argument("--reference-n", type=int, default=8, help="K=64 estimates in the reference")
    p.add_argument("--repeats", type=int, default=4, help="repeats of the Spearman comparison")
    p.add_argument("--ecm", action="store_true", help="also measure ECM at K = 4 and 64")
    p.add_argument("--ecm-examples", type=int, default=4, help="examples in the ECM study")
    p.add_argument("--ecm-repeats", type=int, default=12, help="estimates per ECM row")
    p.add_argument(
        "--ecm-reference-n", type=int, default=32, help="K=64 estimates in the ECM reference"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="attribution.png")
    p.add_argument("--run-dir", default=None, help="folder of resumable run folders (optional)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue the runs in --run-dir")
    group.add_argument("--overwrite", action="store_true", help="replace the runs in --run-dir")
    return p.parse_args()


def run_folder(args: argparse.Namespace, name: str) -> dict:
    """``out_dir``, ``resume`` and ``overwrite`` of one run: resume where a checkpoint is."""
    if args.run_dir is None:
        return {}
    folder = os.path.join(args.run_dir, name)
    resume = args.resume and os.path.isfile(os.path.join(folder, CHECKPOINT_FILE))
    return {"out_dir": folder, "resume": resume, "overwrite": args.overwrite}


def bench_estimators(q_star) -> dict[str, Estimator]:
    """The bench's methods as estimators ("pilot" is the proposal q*); K is set per use."""
    return {
        name: Estimator(
            proposal=q_star if proposal == "pilot" else proposal,
            stratify=stratify,
            noise=noise,
            name=name,
        )
        for name, (proposal, stratify, noise) in BENCH_METHODS.items()
    }


def spearman_vs_reference(featurizer, images, labels, n_train, ref_scores, estimator, repeats):
    """Mean rank correlation (over queries and repeats) of the scores with the reference's."""
    rhos, secs = [], []
    for r in range(repeats):
        t0 = time.perf_counter()
        f = featurizer.features(
            images, labels, estimator=estimator, seed=1000 * estimator.K + r
        ).features
        secs.append(time.perf_counter() - t0)
        scores = attribution_scores(f[:n_train], f[n_train:])
        rhos.append(float(rank_correlation(scores, ref_scores).mean()))
    se = statistics.stdev(rhos) / len(rhos) ** 0.5 if len(rhos) > 1 else float("nan")
    return statistics.fmean(rhos), se, statistics.median(secs)


def ecm_table(featurizer, images, labels, methods, reference_estimator, reference_n, repeats):
    """ECM against the baseline at the same K: Var_base cost_base / (Var cost).

    Var is the protocol's mean ||g - g_ref||^2 against a high-sample reference; tr Cov (the
    spread around the repeats' own mean) is printed too, free of the reference's error. The
    methods run interleaved, so that a changing load on the machine hits them alike.
    """
    reference = featurizer.reference(
        images, labels, n=reference_n, estimator=reference_estimator, seed=123, progress=True
    ).flatten()
    print(f"\nECM at equal K ({images.shape[0]} examples, {repeats} estimates per row, reference")
    evals = reference_n * reference_estimator.K
    print(f"of {evals} evaluations per example); Var = mean ||g - g_ref||^2 (+- se)")
    head = f"{'method':<22}{'K':>4}{'Var':>11}{'+-':>9}{'tr Cov':>11}{'cost (s)':>10}{'ECM':>7}"
    print(head + f"{'ECM (tr Cov)':>14}")
    for K in (4, 64):
        est = {m: [] for m in methods}
        secs = {m: [] for m in methods}
        for r in range(repeats):
            for method, estimator in methods.items():
                t0 = time.perf_counter()
                g = featurizer.features(
                    images, labels, estimator=estimator.replace(K=K), seed=7 + r
                ).features
                secs[method].append(time.perf_counter() - t0)
                est[method].append(g.flatten().to(torch.float64))
        base = None
        for method in methods:
            e = torch.stack(est[method])
            sq = ((e - reference) ** 2).sum(1)
            var, se = float(sq.mean()), float(sq.std() / len(sq) ** 0.5)
            cov = float(e.var(0).sum())
            cost = statistics.median(secs[method])
            base = base or (var, cov, cost)
            ecm, ecm_cov = base[0] * base[2] / (var * cost), base[1] * base[2] / (cov * cost)
            print(
                f"{method:<22}{K:>4}{var:>11.4g}{se:>9.2g}{cov:>11.4g}{cost:>10.3f}{ecm:>7.2f}"
                f"{ecm_cov:>14.2f}"
            )


def save_picture(path, query_images, train_images, top, scores, train_labels, query_labels):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m, k = top.shape
    fig, axes = plt.subplots(m, k + 1, figsize=(1.4 * (k + 1), 1.5 * m), squeeze=False)
    for i in range(m):
        axes[i, 0].imshow(query_images[i, 0], cmap="gray", vmin=-1, vmax=1)
        axes[i, 0].set_title(f"query ({int(query_labels[i])})", fontsize=8)
        for j in range(k):
            n = int(top[i, j])
            axes[i, j + 1].imshow(train_images[n, 0], cmap="gray", vmin=-1, vmax=1)
            axes[i, j + 1].set_title(
                f"#{n} ({int(train_labels[n])}) {float(scores[i, n]):.2g}", fontsize=7
            )
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    teacher, kind = load_attribution_teacher(args.seed)
    params = None if args.params == "all" else tuple(args.params.split(","))
    featurizer = AttributionFeaturizer(
        teacher, params=params, dim=args.dim, projection_seed=args.seed
    )
    print(
        f"teacher: {kind}; gradient w.r.t. {featurizer.dim_in} weights "
        f"({args.params}), projected to k = {featurizer.dim}"
    )
    train_x, train_y = load_digits_images(16, "train")
    test_x, test_y = load_digits_images(16, "test")
    ti = pick_examples(train_y, args.n_train + 2, offset=args.seed)
    ti, pilot = ti[: args.n_train], ti[args.n_train :]
    qi = pick_examples(test_y, args.n_query, offset=args.seed + 3)
    images = torch.cat([train_x[ti], test_x[qi]])
    labels = torch.cat([train_y[ti], test_y[qi]])
    n = args.n_train

    t0 = time.perf_counter()
    q_star = pilot_proposal(
        featurizer, train_x[pilot], train_y[pilot], n_draws=args.pilot_draws, seed=args.seed
    )
    early = float(q_star.cdf(torch.tensor(49)))
    print(f"pilot q*: {time.perf_counter() - t0:.0f} s; q*(t < 50) = {early:.2f} (prior: 0.05)")
    methods = bench_estimators(q_star)
    # the reference: q* stratified, 64 evaluations per example per estimate
    reference_estimator = methods["IS*+strat"].replace(K=64)

    # the long estimates: resumable runs, one example a step (the reference draws
    # independently across examples, as featurizer.reference does)
    examples = (train_x[ti], train_y[ti], test_x[qi], test_y[qi])
    reference = attribute(
        featurizer,
        *examples,
        estimator=reference_estimator,
        estimates=args.reference_n,
        shared_draws=False,
        seed=args.seed,
        **run_folder(args, "reference"),
    )
    print(
        f"reference: {args.reference_n * reference_estimator.K} evaluations per example "
        f"({reference.seconds:.0f} s)"
    )
    ref_scores = reference.scores

    carv = attribute(
        featurizer,
        *examples,
        estimator=methods["IS*+strat+QMC"].replace(K=args.K),
        seed=args.seed,
        **run_folder(args, "carv"),
    )
    scores = carv.scores
    top = scores.topk(5, dim=1).indices
    print(f"\ntop-5 attributed training digits (CARV: IS*+strat+QMC, K = {args.K}):")
    for i in range(args.n_query):
        names = ", ".join(f"#{int(j)} ({int(train_y[ti][j])})" for j in top[i])
        same = float((train_y[ti][top[i]] == test_y[qi][i]).float().mean())
        print(f"  query {i} (a {int(test_y[qi][i])}): {names}   same digit: {same:.0%}")

    print(f"\nSpearman of the scores with the reference's ({args.repeats} repeats, mean +- se)")
    for K in sorted({4, args.K}):
        for name in ("baseline", "strat", "IS+strat", "IS*+strat", "IS*+strat+QMC"):
            estimator = methods[name].replace(K=K)
            rho, se, sec = spearman_vs_reference(
                featurizer, images, labels, n, ref_scores, estimator, args.repeats
            )
            print(f"  K = {K:>3}  {name:<14} rho = {rho:.3f} +- {se:.3f}   {sec:.2f} s/estimate")

    save_picture(args.out, test_x[qi], train_x[ti], top, scores, train_y[ti], test_y[qi])
    print(f"\nwrote {args.out}")

    if args.ecm:
        e = args.ecm_examples
        ecm_table(
            featurizer,
            images[:e],
            labels[:e],
            methods,
            reference_estimator,
            args.ecm_reference_n,
            args.ecm_repeats,
        )


def _signalled(signum, frame):
    # outside a run's loop (which stops cleanly itself), SIGTERM ends the script like Ctrl-C
    raise KeyboardInterrupt(signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _signalled)
    try:
        main()
    except RunStopped as stop:  # after the example in progress, checkpointed with --run-dir
        print(f"attribution.py: {stop}", file=sys.stderr)
        sys.exit(stop.exit_code)
    except KeyboardInterrupt as stop:
        signum = stop.args[0] if stop.args and isinstance(stop.args[0], int) else signal.SIGINT
        print(
            f"attribution.py: stopped by {signal.Signals(signum).name}; the last checkpoint in "
            f"--run-dir, if any, is kept (continue with --resume)",
            file=sys.stderr,
        )
        sys.exit(128 + signum)
    except RunFolderError as err:  # a finished run is never overwritten: --resume/--overwrite
        sys.exit(f"attribution.py: {err}")
