"""Tutorial: single-step distillation (DMD-style) with the CARV estimator.

A one-step generator G(z, digit) learns from the frozen embedded teacher through the
distribution-matching gradient w(t) (eps_real - eps_fake), with a "fake" score network trained
online on the generator's samples. The generator's latents are the outer plate (upstream cost:
the generator forward and backward); the (t, eps) draws are the inner plate. Both estimators
start from one shared checkpoint and get the same compute budget; only the draws differ.
"""

import os

import torch

from carv_pyro.pipelines.distillation import (
    DistillationConfig,
    fid_digits,
    save_sample_grid,
    train_distillation,
)

SMOKE = os.environ.get("CARV_SMOKE") == "1"  # the test suite runs every tutorial at smoke size
OUT = os.environ.get("CARV_TUTORIAL_OUT", "docs/tutorials/img")
os.makedirs(OUT, exist_ok=True)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)

config = DistillationConfig(R=4 if SMOKE else 8, fd_samples=50 if SMOKE else 500, seed=0)
# a shared warm start, so that both estimators begin from the same generator and fake network
start = train_distillation(
    config, "carv", steps=2 if SMOKE else 50, device=DEVICE, evaluate=False, progress=not SMOKE
)
checkpoint = start.distiller
print(f"checkpoint: Fréchet distance {fid_digits(checkpoint.generator, config.fd_samples):.1f}")

results = {}
for estimator in ("baseline", "carv"):  # baseline: K = 1 as DMD; carv: K = 16, stratified
    history = train_distillation(
        config,
        estimator,
        budget_seconds=2.0 if SMOKE else 90.0,  # wall seconds on a GPU, CPU seconds on a CPU
        init=checkpoint,
        eval_every=25,
        progress=not SMOKE,
    )
    results[estimator] = history
    print(
        f"{estimator:8s} K={history.config.K:2d} steps={history.steps:4d} "
        f"Fréchet distance={history.final_fd:.1f}"
    )

save_sample_grid(
    {
        "checkpoint": checkpoint.generator,
        f"baseline (FD {results['baseline'].final_fd:.0f})": results[
            "baseline"
        ].distiller.generator,
        f"carv (FD {results['carv'].final_fd:.0f})": results["carv"].distiller.generator,
    },
    os.path.join(OUT, "distillation_samples.png"),
)
