"""Train the embedded default teacher and its digit classifier, measure them, write the manifest.

Everything runs offline on a CPU from scikit-learn's bundled digits (8x8, upsampled to 16x16):

1. a small CNN digit classifier (:class:`carv_pyro.classifier.DigitClassifier`), light random
   shifts as augmentation, checked on the held-out test split;
2. a class-conditional diffusers ``UNet2DModel`` (labels 0-9 plus the null class 10) on a
   linear-beta ``DDPMScheduler`` with 1000 steps: epsilon-prediction MSE, 10% label dropout to
   the null class (classifier-free guidance), AdamW with warmup and cosine decay, and an EMA of
   the weights (the EMA weights are shipped);
3. quality, measured: the test-split denoising loss of the trained network against the same
   network at initialisation, and the classifier's accuracy on DDIM samples (20 per digit)
   with classifier-free guidance, plus a Fréchet distance in the classifier's feature space;
4. ``unet/``, ``scheduler/``, ``classifier.safetensors``, ``samples.png`` and
   ``manifest.json`` (sha256 of every weight and config file, command, seed, timings, losses,
   quality numbers) in ``--out``.

Usage (about 10 minutes on one free CPU core; longer on a busy machine)::

    python scripts/train_default_teacher.py            # writes src/carv_pyro/teachers/default/
    python scripts/train_default_teacher.py --steps 200 --out /tmp/teacher   # quick smoke run
    python scripts/train_default_teacher.py --eval-only   # re-measure the shipped weights
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from tqdm.auto import tqdm

from carv_pyro.classifier import (
    CLASSIFIER_FILE,
    DigitClassifier,
    classifier_accuracy,
    load_classifier,
    random_shift,
    save_classifier,
)
from carv_pyro.data import load_digits_images
from carv_pyro.sampling import ddim_sample
from carv_pyro.teachers.diffusers_teacher import DiffusersTeacher
from carv_pyro.teachers.embedded import (
    DEFAULT_ETA,
    DEFAULT_GUIDANCE_SCALE,
    MANIFEST_FILE,
    NULL_CLASS,
    file_sha256,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "src" / "carv_pyro" / "teachers" / "default"

UNET_CONFIG = {
    "sample_size": 16,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": (32, 32, 32),  # 16x16 -> 8x8 -> 4x4
    "down_block_types": ("DownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "UpBlock2D"),
    "layers_per_block": 1,
    "add_attention": True,  # one self-attention block, in the 4x4 mid block
    "attention_head_dim": 16,
    "norm_num_groups": 8,
    "num_class_embeds": NULL_CLASS + 1,  # digits 0-9 and the null class 10
}
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 1e-4,
    "beta_end": 2e-2,
    "prediction_type": "epsilon",
    "clip_sample": True,
    "clip_sample_range": 1.0,
}

# Acceptance thresholds; the script exits non-zero (after writing the manifest) if one fails.
MIN_CLASSIFIER_TEST_ACCURACY = 0.97
MIN_SAMPLE_ACCURACY = 0.80


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1000, help="UNet optimisation steps")
    p.add_argument("--batch-size", type=int, default=96, help="UNet batch size")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    p.add_argument("--warmup", type=int, default=100, help="linear warmup steps")
    p.add_argument("--ema-decay", type=float, default=0.995, help="EMA decay of the weights")
    p.add_argument("--label-dropout", type=float, default=0.1, help="P(label -> null class)")
    p.add_argument("--seed", type=int, default=0, help="seed of everything (split: always 0)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 is robust on shared CPUs)"
    )
    p.add_argument("--classifier-epochs", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE_SCALE)
    p.add_argument("--eta", type=float, default=DEFAULT_ETA, help="DDIM eta of the headline")
    p.add_argument(
        "--sweep",
        type=_sampler_setting,
        nargs="*",
        default=[(1.0, 0.0), (1.0, 1.0), (2.0, 0.0), (3.0, 1.0)],
        metavar="SCALE:ETA",
        help="further (guidance scale, eta) settings whose sample quality is also reported",
    )
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--samples-per-digit", type=int, default=20)
    p.add_argument(
        "--eval-only",
        action="store_true",
        help="skip training: re-measure the weights already in --out and rewrite the manifest "
        "(training records are kept from the existing manifest)",
    )
    return p.parse_args(argv)


def _sampler_setting(text: str) -> tuple[float, float]:
    """Parse ``"2:1"`` (guidance scale 2, eta 1) or ``"2"`` (eta 0)."""
    scale, _, eta = text.partition(":")
    return float(scale), float(eta or 0.0)


def log(msg: str) -> None:
    tqdm.write(f"[{time.strftime('%H:%M:%S')}] {msg}")
    sys.stdout.flush()


def num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------- classifier


def train_classifier(
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    epochs: int,
    seed: int,
    batch_size: int = 64,
    lr: float = 1e-3,
) -> tuple[DigitClassifier, dict]:
    """Adam with cosine decay and +-1 pixel random shifts; returns the model and its stats."""
    x_train, y_train = train
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = x_train.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    start = time.perf_counter()
    model.train()
    for _ in tqdm(range(epochs), desc="classifier", unit="epoch", mininterval=2.0):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            x = random_shift(x_train[idx], max_shift=1, generator=gen)
            loss = F.cross_entropy(model(x), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    stats = {
        "num_parameters": num_params(model),
        "config": model.config,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "augmentation": "random integer shifts of up to 1 pixel per axis",
        "train_accuracy": classifier_accuracy(model, *train),
        "test_accuracy": classifier_accuracy(model, *test),
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    return model, stats


# --------------------------------------------------------------------------- diffusion


def lr_factor(step: int, total: int, warmup: int, floor: float = 0.05) -> float:
    """Linear warmup, then cosine decay from 1 to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def train_unet(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    images: torch.Tensor,
    labels: torch.Tensor,
    args: argparse.Namespace,
) -> tuple[UNet2DModel, dict]:
    """Epsilon-prediction MSE with label dropout; returns the EMA model and training stats."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    ac = scheduler.alphas_cumprod.float()
    sqrt_a, sqrt_1ma = ac.sqrt(), (1.0 - ac).sqrt()
    num_t = scheduler.config.num_train_timesteps
    ema = copy.deepcopy(unet).requires_grad_(False)
    unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args.steps, args.warmup))
    n = images.shape[0]
    perm, pos = torch.randperm(n, generator=gen), 0
    curve, window = [], []
    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc="unet", unit="step", mininterval=5.0)
    for step in bar:
        if pos + args.batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos : pos + args.batch_size]
        pos += args.batch_size
        x0, y = images[idx], labels[idx].clone()
        y[torch.rand(y.shape, generator=gen) < args.label_dropout] = NULL_CLASS
        t = torch.randint(0, num_t, (x0.shape[0],), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        x_t = sqrt_a[t].view(-1, 1, 1, 1) * x0 + sqrt_1ma[t].view(-1, 1, 1, 1) * eps
        loss = F.mse_loss(unet(x_t, t, class_labels=y).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        # EMA with the usual warmup, so early steps are not dominated by the initialisation
        decay = min(args.ema_decay, (1.0 + step) / (10.0 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), unet.parameters()):
                p_ema.lerp_(p, 1.0 - decay)
        window.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == args.steps:
            curve.append({"step": step + 1, "loss": round(float(np.mean(window)), 5)})
            bar.set_postfix(loss=f"{np.mean(window):.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
            log(
                f"step {step + 1}/{args.steps}  loss(last 100) {np.mean(window):.4f}  "
                f"{time.perf_counter() - start:.0f}s"
            )
            window = []
    ema.eval()
    unet.eval()
    stats = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "optimizer": f"AdamW(lr={args.lr}, weight_decay=0), grad-norm clip 1.0",
        "lr_schedule": f"linear warmup {args.warmup} steps, cosine decay to 5% of peak",
        "ema_decay": args.ema_decay,
        "label_dropout": args.label_dropout,
        "timestep_sampling": f"uniform over 0..{num_t - 1}",
        "wall_time_s": round(time.perf_counter() - start, 1),
        "final_train_loss": curve[-1]["loss"],
        "loss_curve": curve,
    }
    return ema, stats


@torch.no_grad()
def denoising_loss(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    per_image: int = 10,
    seed: int = 1234,
) -> dict:
    """Mean epsilon MSE on ``images``, ``per_image`` stratified timesteps each, fixed noise.

    Timesteps are stratified over ``[0, T)``: draw ``k`` of an image uses
    ``t = floor((k + u) T / per_image)``, so every image sees the whole range of noise levels.
    Labels ``None`` means the unconditional (null-class) prediction.
    """
    gen = torch.Generator().manual_seed(seed)
    num_t = scheduler.config.num_train_timesteps
    ac = scheduler.alphas_cumprod.float()
    n = images.shape[0]
    k = torch.arange(per_image).repeat(n)
    t = ((k + torch.rand(k.shape, generator=gen)) * num_t / per_image).long().clamp_max(num_t - 1)
    x0 = images.repeat_interleave(per_image, 0)
    y = (labels if labels is not None else torch.full((n,), NULL_CLASS)).repeat_interleave(
        per_image
    )
    eps = torch.randn(x0.shape, generator=gen)
    x_t = ac[t].sqrt().view(-1, 1, 1, 1) * x0 + (1 - ac[t]).sqrt().view(-1, 1, 1, 1) * eps
    errs = []
    for i in range(0, x0.shape[0], 500):
        out = unet(x_t[i : i + 500], t[i : i + 500], class_labels=y[i : i + 500]).sample
        errs.append((out - eps[i : i + 500]).pow(2).flatten(1).mean(1))
    err = torch.cat(errs)
    by_stratum = err.view(n, per_image).mean(0)
    return {
        "mean": round(float(err.mean()), 5),
        "stderr": round(float(err.std() / math.sqrt(err.numel())), 5),
        "by_t_stratum": [round(float(v), 5) for v in by_stratum],
    }


# --------------------------------------------------------------------------- quality


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a`` (N, F) and ``b`` (M, F)."""
    from scipy import linalg

    a64, b64 = a.double().numpy(), b.double().numpy()
    mu_a, mu_b = a64.mean(0), b64.mean(0)
    cov_a, cov_b = np.cov(a64, rowvar=False), np.cov(b64, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b)
    covmean = np.real(covmean)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2.0 * covmean))


def sample_quality(
    teacher: DiffusersTeacher,
    classifier: DigitClassifier,
    test_features: torch.Tensor,
    *,
    guidance_scale: float,
    eta: float,
    args: argparse.Namespace,
) -> tuple[dict, torch.Tensor]:
    """Classifier accuracy and Fréchet distance of ``samples_per_digit`` DDIM samples a digit."""
    labels = torch.arange(10).repeat_interleave(args.samples_per_digit)
    gen = torch.Generator().manual_seed(args.seed + 2)
    start = time.perf_counter()
    samples = ddim_sample(
        teacher,
        labels,
        steps=args.ddim_steps,
        guidance_scale=guidance_scale,
        generator=gen,
        eta=eta,
        progress=True,
    )
    wall = time.perf_counter() - start
    images = samples.clamp(-1.0, 1.0)
    with torch.no_grad():
        pred = classifier(images).argmax(-1)
        feats = classifier.features(images)
    correct = (pred == labels).float()
    result = {
        "guidance_scale": guidance_scale,
        "eta": eta,
        "ddim_steps": args.ddim_steps,
        "clip_sample": None,
        "num_samples": int(labels.numel()),
        "classifier_accuracy": round(float(correct.mean()), 4),
        "per_digit_accuracy": [round(float(v), 3) for v in correct.view(10, -1).mean(1)],
        "frechet_distance_to_test": round(frechet_distance(feats, test_features), 3),
        "sampling_wall_time_s": round(wall, 1),
    }
    log(
        f"samples at guidance {guidance_scale}, eta {eta}: classifier accuracy "
        f"{result['classifier_accuracy']:.4f}, FD {result['frechet_distance_to_test']:.2f}"
    )
    return result, images


def save_grid(images: torch.Tensor, per_digit: int, path: Path, title: str) -> None:
    """Rows: digits 0-9; columns: the first 10 samples of each digit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(10, per_digit)
    grid = images.view(10, per_digit, 16, 16)[:, :cols]
    fig, axes = plt.subplots(10, cols, figsize=(cols * 0.5, 10 * 0.5 + 0.4))
    for r in range(10):
        for c in range(cols):
            ax = axes[r, c]
            ax.imshow(grid[r, c].numpy(), cmap="gray", vmin=-1, vmax=1)
            ax.set_axis_off()
    fig.suptitle(title, fontsize=7)
    fig.subplots_adjust(
        left=0.01, right=0.99, bottom=0.01, top=1 - 0.4 / (10 * 0.5 + 0.4), wspace=0.05, hspace=0.05
    )
    fig.savefig(path, dpi=64)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(
        shlex.quote(a) for a in [_display_path(Path(sys.argv[0]))] + sys.argv[1:]
    )
    log(f"writing to {out}; command: {command}")

    train = load_digits_images(16, "train", seed=0)
    test = load_digits_images(16, "test", seed=0)
    log(f"data: {train[0].shape[0]} train / {test[0].shape[0]} test images")
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    torch.manual_seed(args.seed)
    untrained = UNet2DModel(**UNET_CONFIG).eval().requires_grad_(False)  # the seeded init
    n_params = num_params(untrained)
    log(f"UNet2DModel: {n_params} parameters")

    if args.eval_only:
        previous = json.loads((out / MANIFEST_FILE).read_text())
        classifier = load_classifier(out / CLASSIFIER_FILE)
        clf_stats = previous["classifier"]
        clf_stats["test_accuracy"] = classifier_accuracy(classifier, *test)
        teacher = DiffusersTeacher.from_pretrained(out)
        ema, raw, train_stats = teacher.unet, None, previous["training"]
        train_command = previous["command"]
        train_wall = previous["wall_time_s"]
    else:
        # 1. classifier ---------------------------------------------------------------------
        classifier, clf_stats = train_classifier(
            train, test, epochs=args.classifier_epochs, seed=args.seed
        )
        log(
            f"classifier: {clf_stats['num_parameters']} params, test accuracy "
            f"{clf_stats['test_accuracy']:.4f} ({clf_stats['wall_time_s']}s)"
        )
        classifier.requires_grad_(False)
        save_classifier(classifier, out / CLASSIFIER_FILE)

        # 2. diffusion teacher --------------------------------------------------------------
        raw = copy.deepcopy(untrained).requires_grad_(True)
        ema, train_stats = train_unet(raw, scheduler, *train, args)
        for sub in ("unet", "scheduler"):
            shutil.rmtree(out / sub, ignore_errors=True)
        DiffusersTeacher(ema, scheduler, null_class=NULL_CLASS).save_pretrained(out)
        # reload: the evaluation sees exactly what ships, through the teacher interface
        teacher = DiffusersTeacher.from_pretrained(out)
        train_command, train_wall = command, None
    eval_start = time.perf_counter()

    # 3a. denoising loss on the test split --------------------------------------------------
    loss_stats = {
        "protocol": "test split (360 images) x 10 stratified timesteps each, fixed noise "
        "(seed 1234); mean per-pixel epsilon MSE; 'untrained' is the same network at "
        "its seeded initialisation",
        "trained_ema": denoising_loss(teacher.unet, scheduler, *test),
        "trained_ema_unconditional": denoising_loss(teacher.unet, scheduler, test[0], None),
        "untrained": denoising_loss(untrained, scheduler, *test),
    }
    if raw is not None:
        loss_stats["trained_raw"] = denoising_loss(raw, scheduler, *test)
    elif "trained_raw" in previous["quality"]["denoising_loss_test"]:
        loss_stats["trained_raw"] = previous["quality"]["denoising_loss_test"]["trained_raw"]
    loss_stats["ratio_untrained_over_trained"] = round(
        loss_stats["untrained"]["mean"] / loss_stats["trained_ema"]["mean"], 2
    )
    log(
        f"test denoising loss: trained (EMA) {loss_stats['trained_ema']['mean']:.4f}, "
        f"untrained {loss_stats['untrained']['mean']:.4f}"
    )

    # 3b. sample quality --------------------------------------------------------------------
    with torch.no_grad():
        test_features = classifier.features(test[0])
        train_features = classifier.features(train[0][:360])
    quality, images = sample_quality(
        teacher,
        classifier,
        test_features,
        guidance_scale=args.guidance_scale,
        eta=args.eta,
        args=args,
    )
    save_grid(
        images,
        args.samples_per_digit,
        out / "samples.png",
        f"DDIM {args.ddim_steps} steps, guidance {args.guidance_scale}, eta {args.eta}: "
        f"classifier accuracy {quality['classifier_accuracy']:.3f}",
    )
    sweep = []
    for scale, eta in args.sweep:
        res, _ = sample_quality(
            teacher, classifier, test_features, guidance_scale=scale, eta=eta, args=args
        )
        keep = ("guidance_scale", "eta", "classifier_accuracy", "frechet_distance_to_test")
        sweep.append({k: res[k] for k in keep})
    quality["sweep"] = sweep
    quality["frechet_distance_train360_to_test"] = round(
        frechet_distance(train_features, test_features), 3
    )
    quality["features"] = (
        "DigitClassifier.features (64-d) of samples clamped to [-1, 1], against the 360 test "
        "images; 'frechet_distance_train360_to_test' (360 real training images) is the "
        "real-data reference"
    )
    eval_wall = round(time.perf_counter() - eval_start, 1)

    # 4. manifest ---------------------------------------------------------------------------
    files = sorted(
        p for p in out.rglob("*") if p.is_file() and p.name not in (MANIFEST_FILE, "samples.png")
    )
    for p in files:
        p.chmod(0o644)  # safetensors writes 0600; package data should be world-readable
    clf_acc, sample_acc = clf_stats["test_accuracy"], quality["classifier_accuracy"]
    checks = {
        f"classifier test accuracy >= {MIN_CLASSIFIER_TEST_ACCURACY}": (
            clf_acc >= MIN_CLASSIFIER_TEST_ACCURACY
        ),
        f"classifier accuracy on samples >= {MIN_SAMPLE_ACCURACY}": (
            sample_acc >= MIN_SAMPLE_ACCURACY
        ),
        "test denoising loss: trained < untrained / 5": (
            5 * loss_stats["trained_ema"]["mean"] < loss_stats["untrained"]["mean"]
        ),
    }
    import diffusers
    import sklearn

    manifest = {
        "name": "carv-pyro default teacher: class-conditional 16x16 digits DDPM",
        "created_by": "scripts/train_default_teacher.py",
        "command": train_command,
        "seed": args.seed,
        "steps": train_stats["steps"],
        "batch_size": train_stats["batch_size"],
        "threads": args.threads,
        "wall_time_s": train_wall or round(time.perf_counter() - t_start, 1),
        "evaluation": {
            "command": command,
            "wall_time_s": eval_wall,
            "note": "re-measured with --eval-only" if args.eval_only else "same run",
        },
        "date": time.strftime("%Y-%m-%d"),
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "scikit-learn": sklearn.__version__,
            "machine": platform.machine(),
        },
        "data": {
            "source": "sklearn.datasets.load_digits (bundled, 1797 8x8 images)",
            "preprocessing": "bilinear upsample to 16x16, pixel/16 scaled to [-1, 1]",
            "split": "stratified 80/20, seed 0 (carv_pyro.data.load_digits_images)",
            "num_train": int(train[0].shape[0]),
            "num_test": int(test[0].shape[0]),
        },
        "unet": {
            "class": "UNet2DModel",
            "num_parameters": n_params,
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in UNET_CONFIG.items()},
            "weights": "EMA",
            "null_class": NULL_CLASS,
        },
        "scheduler": {"class": "DDPMScheduler", "config": SCHEDULER_CONFIG},
        "training": train_stats,
        "final_losses": {
            "train_loss_last_100_steps": train_stats["final_train_loss"],
            "test_denoising_loss_trained_ema": loss_stats["trained_ema"]["mean"],
            "test_denoising_loss_untrained": loss_stats["untrained"]["mean"],
        },
        "classifier": clf_stats,
        "quality": {"denoising_loss_test": loss_stats, "samples": quality},
        "checks": checks,
        "files": {p.relative_to(out).as_posix(): file_sha256(p) for p in files},
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"wrote {out / MANIFEST_FILE}; total {time.perf_counter() - t_start:.0f}s")
    failed = [name for name, ok in checks.items() if not ok]
    if failed:
        log(f"FAILED checks: {failed}")
        return 1
    log("all checks passed")
    return 0


def _display_path(path: Path) -> str:
    try:
        return path.resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return str(path)


if __name__ == "__main__":
    raise SystemExit(main())
