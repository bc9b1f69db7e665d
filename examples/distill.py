"""Single-step distillation (DMD) of the embedded digits teacher: baseline vs CARV, equal compute.

A one-step generator G(z, digit) learns from the frozen teacher through DMD2's normalized score
difference, with a "fake" score network trained online on the generator's samples. Both
estimators start from the same briefly pretrained checkpoint and get the same compute budget
(this process's CPU seconds on a CPU); only the timestep/noise draws differ:

- baseline: one t ~ p(t) per generator sample (K = 1), as DMD does;
- carv: K = 16 draws per sample, one per stratum of p(t), averaged before the generator backward.

    python examples/distill.py                 # ~2 x 120 CPU-seconds; writes distill.png
    python examples/distill.py --budget 30     # shorter
"""

import argparse
import json

import torch

from carv_pyro.pipelines.distillation import (
    DistillationConfig,
    fid_digits,
    save_sample_grid,
    train_distillation,
)

torch.set_num_threads(1)

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--budget", type=float, default=120.0, help="compute seconds per estimator")
parser.add_argument("--pretrain-steps", type=int, default=50, help="shared warm start (steps)")
parser.add_argument("--R", type=int, default=8, help="generator samples per step")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--out", default="distill.png", help="PNG of samples")
args = parser.parse_args()

config = DistillationConfig(R=args.R, seed=args.seed)
print(f"pretraining a shared checkpoint for {args.pretrain_steps} steps (carv estimator)...")
start = train_distillation(config, "carv", steps=args.pretrain_steps, evaluate=False)
checkpoint = start.distiller
print(f"checkpoint FD {fid_digits(checkpoint.generator, config.fd_samples):.2f}")

results = {}
for estimator in ("baseline", "carv"):
    history = train_distillation(
        config, estimator, budget_seconds=args.budget, init=checkpoint, eval_every=25
    )
    results[estimator] = history
    print(
        f"{estimator:8s}  K={history.config.K:2d}  steps={history.steps:4d}  "
        f"{history.clock} seconds={history.seconds[-1]:6.1f}  FD={history.final_fd:.2f}"
    )

save_sample_grid(
    {
        "checkpoint": checkpoint.generator,
        f"baseline (FD {results['baseline'].final_fd:.1f})": results[
            "baseline"
        ].distiller.generator,
        f"carv (FD {results['carv'].final_fd:.1f})": results["carv"].distiller.generator,
    },
    args.out,
)
print(f"wrote {args.out}")
print(json.dumps({k: v.evals for k, v in results.items()}, indent=1))
