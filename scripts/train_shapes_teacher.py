"""Train the embedded shapes teacher and its shape classifier, measure them, write the manifest.

The teacher knows 3D: a camera- and class-conditioned diffusers ``UNet2DConditionModel``
(``class_embed_type="projection"`` on the vector ``[one-hot class + null, sin/cos azimuth,
sin/cos elevation]``, see ``carv_pyro.teachers.shapes``) trained on 32x32 renders of the
procedural shapes of ``carv_pyro.pipelines.shapes`` from random orbit cameras. The renders are
made by ``carv_pyro.pipelines.render.render`` itself, Lambertian-shaded and anti-aliased, from
``VoxelField`` density grids of the shapes: a voxel field rendered with the same settings can
reproduce the training data exactly.

Steps:

1. data: a pool of ``--num-renders`` renders (classes balanced, azimuth uniform over the full
   circle, elevation uniform over ``--elevation-deg``), rendered once on ``--device`` into one
   tensor; a held-out set from other cameras (another seed);
2. a ``ShapeClassifier`` on the pool (random shifts and a little noise as augmentation), checked
   on the held-out renders;
3. the UNet: epsilon-prediction MSE on a linear-beta 1000-step ``DDPMScheduler``, 10% class
   dropout to the null slot (the camera is kept: classifier-free guidance keeps the camera),
   AdamW with warmup and cosine decay, an EMA of the weights (shipped);
4. quality: held-out denoising loss of the trained (EMA) network against its seeded
   initialisation; the classifier's accuracy on DDIM samples from held-out cameras, per class;
   the agreement of each sample's silhouette with the true shape's render from the SAME camera
   against a render from another camera (3D awareness: it must be higher), over a sweep of
   guidance scales;
5. ``--out``: ``unet/``, ``scheduler/``, ``carv_teacher.json``, ``shapes_teacher.json``,
   ``classifier.safetensors``, ``samples.png`` (rows: classes, columns: azimuths),
   ``renders.png`` (the true renders at the same cameras) and ``manifest.json`` (sha256 of
   every file, command, seed, steps, batch, device, wall times, environment, losses, quality).

The script imports only the carv_pyro modules it needs, without the package's ``__init__``
(which imports pyro): it needs torch, diffusers, safetensors, einops, numpy, tqdm and matplotlib.
It is deterministic given ``--seed`` on a CPU (and on a GPU up to the nondeterminism of CUDA
kernels, which deterministic algorithms are requested to avoid), unless ``--train-seconds``
shortens the run (see below; the manifest records it).

Usage::

    # the H200 run, about 8 minutes in all (measured on an H200 with --train-seconds 300: data
    # 18 s, classifier 41 s, UNet 54.7 ms/step at batch 512 so 5261 steps in 288 s, evaluation
    # 10 s, 358 s in all); --train-seconds 400 gives about 7300 steps and 8 minutes.
    # Writes src/carv_pyro/teachers/shapes_teacher/
    python scripts/train_shapes_teacher.py --device cuda --steps 30000 --batch-size 512 \\
        --lr 1e-3 --warmup 1000 --ema-decay 0.9995 --num-renders 240000 \\
        --classifier-epochs 4 --samples-per-class 48 --train-seconds 400

    # the small CPU version (the defaults; 22 minutes on one core of a busy 2-core machine:
    # held-out denoising loss 0.0057, samples 94% right at guidance 1 but weakly tied to their
    # camera; the H200 run above is the one that ships)
    python scripts/train_shapes_teacher.py

    # re-measure the weights in --out (e.g. on a CPU after the GPU run); keeps the training
    # records, rewrites the quality numbers and the manifest
    python scripts/train_shapes_teacher.py --eval-only --samples-per-class 16

    # smoke run (a minute)
    python scripts/train_shapes_teacher.py --steps 20 --num-renders 240 --test-per-class 5 \\
        --classifier-epochs 1 --samples-per-class 2 --ddim-steps 5 --sweep --out /tmp/shapes

``--train-seconds S`` caps the UNet phase on a machine of unknown speed: after the first 50
steps the step time is measured once and the number of steps fixed to
``min(--steps, S / step_time)`` (the cosine schedule then decays over that many steps), so the
run ends in time with a fully decayed learning rate; it is then deterministic only up to that
count, which the manifest records (``training.steps_planned``, ``training.steps``).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import platform
import shlex
import shutil
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from tqdm.auto import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "src" / "carv_pyro" / "teachers" / "shapes_teacher"


def _import_carv_pyro_submodules() -> None:
    """Make ``carv_pyro.*`` submodules importable without running ``carv_pyro/__init__.py``.

    The package's ``__init__`` imports the Pyro estimator (pyro), which training does not need;
    a stand-in package object with the real ``__path__`` lets the submodules used here
    (renderer, shapes, classifier, teachers, sampling; none imports pyro) load on a machine
    without pyro. ``src/`` is used when carv_pyro is not installed.
    """
    if "carv_pyro" in sys.modules:
        return
    spec = importlib.util.find_spec("carv_pyro")
    if spec is None:
        sys.path.insert(0, str(REPO_ROOT / "src"))
        spec = importlib.util.find_spec("carv_pyro")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("carv_pyro not found (install it or run from the repository)")
    package = types.ModuleType("carv_pyro")
    package.__path__ = list(spec.submodule_search_locations)
    package.__file__ = spec.origin
    sys.modules["carv_pyro"] = package


_import_carv_pyro_submodules()

from carv_pyro.pipelines.render import Lighting, random_cameras, render  # noqa: E402
from carv_pyro.pipelines.shape_classifier import (  # noqa: E402
    CLASSIFIER_FILE,
    ShapeClassifier,
    load_shape_classifier,
    save_shape_classifier,
)
from carv_pyro.pipelines.shapes import (  # noqa: E402
    SHAPE_ALBEDO,
    SHAPE_CLASSES,
    shape_field,
)
from carv_pyro.sampling import ddim_sample  # noqa: E402
from carv_pyro.teachers.manifest import MANIFEST_FILE, file_sha256  # noqa: E402
from carv_pyro.teachers.shapes import (  # noqa: E402
    SHAPES_GUIDANCE_SCALE,
    SHAPES_TEACHER_CONFIG,
    ShapesTeacher,
    cond_dim,
    label_cond,
)

NUM_CLASSES = len(SHAPE_CLASSES)
NULL_LABEL = NUM_CLASSES

IMAGE_SIZE = 32
FIELD_RESOLUTION = 32
RENDER_SETTINGS = {
    "image_size": IMAGE_SIZE,
    "n_samples": 48,
    "shading": "lambertian",
    "supersample": 2,
    "radius": 3.0,
    "ortho_half_width": 1.0,
    "background": -1.0,
}
FIELD_SETTINGS = {
    "resolution": FIELD_RESOLUTION,
    "sharpness": float(FIELD_RESOLUTION),
    "albedo": SHAPE_ALBEDO,
}

UNET_CONFIG = {
    "sample_size": IMAGE_SIZE,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": (32, 64, 96),  # 32x32 -> 16x16 -> 8x8
    "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    "mid_block_type": "UNetMidBlock2D",  # self-attention at 8x8, no cross-attention
    "layers_per_block": 1,
    "attention_head_dim": 32,
    "norm_num_groups": 16,
    "resnet_time_scale_shift": "scale_shift",  # FiLM: the embedding scales and shifts features
    "class_embed_type": "projection",  # the conditioning vector -> added to the time embedding
    "projection_class_embeddings_input_dim": cond_dim(NUM_CLASSES),
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
NO_CLIP_NOTE = (
    "x0 is not clipped during DDIM: the first step is at t = 999, where alpha = 0.006 multiplies "
    "the guidance term (eps_c - eps_u) by sigma / alpha = 157 in x0; clipping that x0 to [-1, 1] "
    "saturates it into a bright disc, and guided samples then became spheres (measured: 50% "
    "accuracy at guidance 2 with clipping, 100% without)"
)
SILHOUETTE_THRESHOLD = -0.75
"""A pixel belongs to the object's silhouette above this value (background -1; the darkest
lit surface, ambient only, is ``2 * 0.85 * 0.3 - 1 = -0.49``)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if any)")
    p.add_argument("--seed", type=int, default=0, help="seed of everything")
    p.add_argument("--steps", type=int, default=2000, help="UNet optimisation steps")
    p.add_argument("--batch-size", type=int, default=32, help="UNet batch size")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    p.add_argument("--warmup", type=int, default=200, help="linear warmup steps")
    p.add_argument("--ema-decay", type=float, default=0.995, help="EMA decay of the weights")
    p.add_argument("--label-dropout", type=float, default=0.1, help="P(class -> null slot)")
    p.add_argument(
        "--train-seconds",
        type=float,
        default=None,
        help="cap on the UNet phase: fix the step count after 50 steps from the measured speed",
    )
    p.add_argument("--num-renders", type=int, default=7200, help="training renders (pool)")
    p.add_argument("--test-per-class", type=int, default=100, help="held-out renders a class")
    p.add_argument(
        "--loss-per-class",
        type=int,
        default=20,
        help="held-out renders a class for the denoising loss (10 timesteps each)",
    )
    p.add_argument(
        "--elevation-deg", type=float, nargs=2, default=(-10.0, 50.0), metavar=("LOW", "HIGH")
    )
    p.add_argument("--render-chunk", type=int, default=None, help="views per render call")
    p.add_argument("--classifier-epochs", type=int, default=6)
    p.add_argument("--guidance-scale", type=float, default=SHAPES_GUIDANCE_SCALE)
    p.add_argument(
        "--sweep",
        type=float,
        nargs="*",
        default=[1.0, 3.0, 5.0],
        metavar="SCALE",
        help="further guidance scales whose sample quality is also reported",
    )
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--samples-per-class", type=int, default=12)
    p.add_argument("--min-classifier-accuracy", type=float, default=0.95)
    p.add_argument("--min-sample-accuracy", type=float, default=0.8)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument(
        "--nondeterministic",
        action="store_true",
        help="on CUDA, let cuDNN benchmark and pick nondeterministic kernels (faster steps; "
        "the run is then not reproducible bit for bit)",
    )
    p.add_argument(
        "--eval-only",
        action="store_true",
        help="skip data pool, classifier and UNet training: re-measure the teacher already in "
        "--out and rewrite its manifest (the training records are kept from the existing one)",
    )
    return p.parse_args(argv)


def log(msg: str) -> None:
    tqdm.write(f"[{time.strftime('%H:%M:%S')}] {msg}")
    sys.stdout.flush()


def num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def seeded(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


# --------------------------------------------------------------------------------- data


def render_settings() -> dict:
    """``RENDER_SETTINGS`` with the default `Lighting` spelled out (for the json)."""
    lighting = Lighting()
    return {
        **RENDER_SETTINGS,
        "lighting": {k: getattr(lighting, k) for k in lighting.__dataclass_fields__},
    }


def make_fields(device: torch.device) -> list:
    return [
        shape_field(
            name,
            FIELD_SETTINGS["resolution"],
            FIELD_SETTINGS["sharpness"],
            albedo=FIELD_SETTINGS["albedo"],
            device=device,
        ).requires_grad_(False)
        for name in SHAPE_CLASSES
    ]


@torch.no_grad()
def render_views(
    fields: list,
    labels: torch.Tensor,
    azimuth: torch.Tensor,
    elevation: torch.Tensor,
    *,
    chunk: int,
    desc: str,
) -> torch.Tensor:
    """``(N, 1, S, S)`` renders of ``fields[labels[n]]`` from camera ``n``, on the labels' device."""
    settings = {k: v for k, v in RENDER_SETTINGS.items()}
    out = torch.empty(labels.shape[0], 1, IMAGE_SIZE, IMAGE_SIZE, device=labels.device)
    jobs = []
    for c in range(len(fields)):
        idx = (labels == c).nonzero().squeeze(1)
        jobs += [(c, idx[i : i + chunk]) for i in range(0, idx.numel(), chunk)]
    for c, idx in tqdm(jobs, desc=desc, unit="chunk", mininterval=5.0):
        out[idx] = render(fields[c], azimuth[idx], elevation[idx], **settings)
    return out


def draw_views(n: int, seed: int, elevation_deg, device: torch.device):
    """Balanced labels and random cameras, drawn on the CPU (the same on every device)."""
    gen = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % NUM_CLASSES)[torch.randperm(n, generator=gen)]
    lo, hi = (math.radians(e) for e in elevation_deg)
    azimuth, elevation = random_cameras((n,), gen, elevation_range=(lo, hi))
    return labels.to(device), azimuth.to(device), elevation.to(device)


def random_shift(images: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by a random integer offset (background -1 fills), on its device."""
    n, _, h, w = images.shape
    m = max_shift
    padded = F.pad(images, (m, m, m, m), value=-1.0)
    dy = torch.randint(0, 2 * m + 1, (n,), generator=gen, device=images.device)
    dx = torch.randint(0, 2 * m + 1, (n,), generator=gen, device=images.device)
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    return padded[batch, torch.zeros_like(batch), rows, cols]


# ---------------------------------------------------------------------------- classifier


@torch.no_grad()
def accuracy_by_class(model, images, labels, batch: int = 1024) -> tuple[float, list[float]]:
    preds = torch.cat(
        [model(images[i : i + batch]).argmax(-1) for i in range(0, len(images), batch)]
    )
    correct = (preds == labels).float()
    per = [round(float(correct[labels == c].mean()), 4) for c in range(NUM_CLASSES)]
    return round(float(correct.mean()), 4), per


def train_classifier(pool, labels, test, args, device) -> tuple[ShapeClassifier, dict]:
    """Adam with cosine decay on the pool, +-2 pixel shifts and N(0, 0.03^2) noise."""
    torch.manual_seed(args.seed + 10)
    gen = seeded(args.seed + 11, device)
    model = ShapeClassifier(image_size=IMAGE_SIZE, num_classes=NUM_CLASSES).to(device)
    batch = 128
    n = pool.shape[0]
    steps = args.classifier_epochs * math.ceil(n / batch)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    start = time.perf_counter()
    model.train()
    bar = tqdm(total=steps, desc="classifier", unit="step", mininterval=5.0)
    for _ in range(args.classifier_epochs):
        perm = torch.randperm(n, generator=gen, device=device)
        for i in range(0, n, batch):
            idx = perm[i : i + batch]
            x = random_shift(pool[idx], 2, gen)
            x = x + 0.03 * torch.randn(x.shape, generator=gen, device=device)
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
    bar.close()
    model.eval().requires_grad_(False)
    train_acc, _ = accuracy_by_class(model, pool[:4000], labels[:4000])
    test_acc, test_per = accuracy_by_class(model, *test)
    stats = {
        "num_parameters": num_params(model),
        "config": model.config,
        "epochs": args.classifier_epochs,
        "batch_size": batch,
        "optimizer": "Adam(lr=0.002), cosine decay",
        "augmentation": "random integer shifts of up to 2 pixels per axis, N(0, 0.03^2) noise",
        "train_accuracy": train_acc,
        "heldout_accuracy": test_acc,
        "heldout_accuracy_by_class": dict(zip(SHAPE_CLASSES, test_per)),
        "heldout": f"{test[0].shape[0]} renders from other random cameras (seed {args.seed + 3})",
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    return model, stats


# ------------------------------------------------------------------------------- diffusion


def lr_factor(step: int, total: int, warmup: int, floor: float = 0.05) -> float:
    """Linear warmup, then cosine decay from 1 to ``floor`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def noised(x0, t, eps, alphas_cumprod):
    ac = alphas_cumprod[t].view(-1, 1, 1, 1)
    return ac.sqrt() * x0 + (1.0 - ac).sqrt() * eps


def train_unet(unet, scheduler, data, args, device) -> tuple[UNet2DConditionModel, dict]:
    """Epsilon MSE with class dropout (camera kept); returns the EMA model and its stats."""
    images, labels, azimuth, elevation = data
    gen = seeded(args.seed + 1, device)
    ac = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    num_t = scheduler.config.num_train_timesteps
    ema = copy.deepcopy(unet).requires_grad_(False)
    unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    plan = {"total": args.steps}
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, plan["total"], args.warmup)
    )
    n, b = images.shape[0], args.batch_size
    curve, window = [], []
    calibrate_at = 50
    start = time.perf_counter()
    bar = tqdm(total=args.steps, desc="unet", unit="step", mininterval=5.0)
    step = 0
    while step < plan["total"]:
        idx = torch.randint(0, n, (b,), generator=gen, device=device)
        y = labels[idx].clone()
        y[torch.rand(b, generator=gen, device=device) < args.label_dropout] = NULL_LABEL
        cond = label_cond(y, azimuth[idx], elevation[idx], NUM_CLASSES)
        t = torch.randint(0, num_t, (b,), generator=gen, device=device)
        x0 = images[idx]
        eps = torch.randn(x0.shape, generator=gen, device=device)
        x_t = noised(x0, t, eps, ac)
        loss = F.mse_loss(unet(x_t, t, None, class_labels=cond).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(args.ema_decay, (1.0 + step) / (10.0 + step))
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(unet.parameters()), 1.0 - decay)
        window.append(loss.detach())
        step += 1
        bar.update()
        if args.train_seconds is not None and step == calibrate_at:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - start
            per_step = elapsed / step
            fits = calibrate_at + int((args.train_seconds - elapsed) / per_step)
            plan["total"] = max(calibrate_at, min(args.steps, fits))
            bar.total = plan["total"]
            bar.refresh()
            log(
                f"{per_step * 1e3:.1f} ms/step: {plan['total']} steps fit in "
                f"--train-seconds {args.train_seconds:g}"
            )
        if step % 200 == 0 or step == plan["total"]:
            mean = float(torch.stack(window).mean())
            curve.append({"step": step, "loss": round(mean, 5)})
            bar.set_postfix(loss=f"{mean:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
            window = []
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    ema.eval()
    unet.eval()
    stats = {
        "steps_planned": args.steps,
        "steps": step,
        "train_seconds_cap": args.train_seconds,
        "batch_size": b,
        "optimizer": f"AdamW(lr={args.lr}, weight_decay=0), grad-norm clip 1.0",
        "lr_schedule": f"linear warmup {args.warmup} steps, cosine decay to 5% of peak at the last step",
        "ema_decay": args.ema_decay,
        "label_dropout": f"{args.label_dropout} (class -> null slot; camera kept)",
        "timestep_sampling": f"uniform over 0..{num_t - 1}",
        "sampling": "renders drawn uniformly with replacement from the pool",
        "wall_time_s": round(wall, 1),
        "ms_per_step": round(1e3 * wall / max(step, 1), 2),
        "final_train_loss": curve[-1]["loss"],
        "loss_curve": curve,
    }
    return ema, stats


@torch.no_grad()
def denoising_loss(
    unet, scheduler, data, *, null: bool = False, per_image: int = 10, seed: int = 1234
):
    """Mean eps MSE on held-out renders, ``per_image`` stratified timesteps each, fixed noise."""
    images, labels, azimuth, elevation = data
    device = images.device
    gen = torch.Generator().manual_seed(seed)
    num_t = scheduler.config.num_train_timesteps
    ac = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    n = images.shape[0]
    k = torch.arange(per_image).repeat(n)
    t = ((k + torch.rand(k.shape, generator=gen)) * num_t / per_image).long().clamp_max(num_t - 1)
    t = t.to(device)
    rep = lambda v: v.repeat_interleave(per_image, 0)
    x0 = rep(images)
    y = torch.full_like(labels, NULL_LABEL) if null else labels
    cond = label_cond(rep(y), rep(azimuth), rep(elevation), NUM_CLASSES)
    eps = torch.randn(x0.shape, generator=gen).to(device)
    x_t = noised(x0, t, eps, ac)
    errs = []
    for i in range(0, x0.shape[0], 1000):
        out = unet(x_t[i : i + 1000], t[i : i + 1000], None, class_labels=cond[i : i + 1000]).sample
        errs.append((out - eps[i : i + 1000]).pow(2).flatten(1).mean(1))
    err = torch.cat(errs).cpu()
    return {
        "mean": round(float(err.mean()), 5),
        "stderr": round(float(err.std() / math.sqrt(err.numel())), 5),
        "by_t_stratum": [round(float(v), 5) for v in err.view(n, per_image).mean(0)],
    }


# --------------------------------------------------------------------------------- quality


def silhouette_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(N,)`` IoU of the pixels above `SILHOUETTE_THRESHOLD` in ``(N, 1, S, S)`` images."""
    sa, sb = a > SILHOUETTE_THRESHOLD, b > SILHOUETTE_THRESHOLD
    inter = (sa & sb).flatten(1).sum(1).float()
    union = (sa | sb).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def sample_quality(teacher, classifier, fields, *, guidance_scale, per_class, args, device, seed):
    """Accuracy and camera agreement of DDIM samples from random held-out cameras."""
    labels, azimuth, elevation = draw_views(
        per_class * NUM_CLASSES, seed, args.elevation_deg, device
    )
    order = torch.argsort(labels.cpu(), stable=True).to(device)  # grouped by class
    labels, azimuth, elevation = labels[order], azimuth[order], elevation[order]
    cond = label_cond(labels, azimuth, elevation, NUM_CLASSES)
    start = time.perf_counter()
    samples = ddim_sample(
        teacher,
        cond,
        steps=args.ddim_steps,
        guidance_scale=guidance_scale,
        generator=seeded(seed + 1, device),
        clip_sample=None,  # see NO_CLIP_NOTE
        device=device,
        progress=True,
    ).clamp(-1.0, 1.0)
    wall = time.perf_counter() - start
    truth = render_views(fields, labels, azimuth, elevation, chunk=256, desc="truth")
    # another camera of the same class: the next sample's within its class (cyclic)
    k = torch.arange(labels.numel(), device=device).view(NUM_CLASSES, per_class)
    other = k.roll(1, dims=1).reshape(-1) if per_class > 1 else k.reshape(-1)
    other_truth = truth[other]
    with torch.no_grad():
        pred = classifier(samples).argmax(-1)
    correct = (pred == labels).float().view(NUM_CLASSES, -1)
    same = silhouette_iou(samples, truth).view(NUM_CLASSES, -1)
    different = silhouette_iou(samples, other_truth).view(NUM_CLASSES, -1)
    mae = (samples - truth).abs().flatten(1).mean(1).view(NUM_CLASSES, -1)
    per = lambda v: dict(zip(SHAPE_CLASSES, (round(float(x), 3) for x in v.mean(1))))
    result = {
        "guidance_scale": guidance_scale,
        "eta": 0.0,
        "ddim_steps": args.ddim_steps,
        "clip_sample": None,
        "clip_note": NO_CLIP_NOTE,
        "num_samples": int(labels.numel()),
        "cameras": f"random: azimuth uniform on the circle, elevation uniform on "
        f"{list(args.elevation_deg)} deg (seed {seed}, not the training pool's)",
        "classifier_accuracy": round(float(correct.mean()), 4),
        "classifier_accuracy_by_class": per(correct),
        "silhouette_iou_same_camera": round(float(same.mean()), 4),
        "silhouette_iou_other_camera": round(float(different.mean()), 4),
        "silhouette_iou_same_camera_by_class": per(same),
        "silhouette_iou_other_camera_by_class": per(different),
        "mean_abs_error_to_true_render": round(float(mae.mean()), 4),
        "sampling_wall_time_s": round(wall, 1),
    }
    log(
        f"samples at guidance {guidance_scale}: accuracy {result['classifier_accuracy']:.3f}, "
        f"silhouette IoU same camera {result['silhouette_iou_same_camera']:.3f} vs other "
        f"{result['silhouette_iou_other_camera']:.3f}"
    )
    return result


@torch.no_grad()
def save_grid(teacher, fields, args, device, out: Path) -> None:
    """samples.png / renders.png: rows = classes, columns = 8 azimuths at elevation 20 deg."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_az = 8
    az_deg = torch.arange(n_az) * 360.0 / n_az
    azimuth = torch.deg2rad(az_deg).repeat(NUM_CLASSES).to(device)
    elevation = torch.full_like(azimuth, math.radians(20.0))
    labels = torch.arange(NUM_CLASSES).repeat_interleave(n_az).to(device)
    cond = label_cond(labels, azimuth, elevation, NUM_CLASSES)
    samples = ddim_sample(
        teacher,
        cond,
        steps=args.ddim_steps,
        guidance_scale=args.guidance_scale,
        generator=seeded(args.seed + 7, device),
        clip_sample=None,  # see NO_CLIP_NOTE
        device=device,
    ).clamp(-1, 1)
    truth = render_views(fields, labels, azimuth, elevation, chunk=256, desc="grid truth")
    for images, name, what in (
        (samples, "samples.png", "teacher DDIM samples"),
        (truth, "renders.png", "true renders"),
    ):
        pix = images.view(NUM_CLASSES, n_az, IMAGE_SIZE, IMAGE_SIZE).cpu().numpy()
        fig, axes = plt.subplots(
            NUM_CLASSES, n_az, figsize=(1.3 * n_az + 1.2, 1.3 * NUM_CLASSES + 0.6)
        )
        for i in range(NUM_CLASSES):
            for j in range(n_az):
                ax = axes[i, j]
                ax.imshow(pix[i, j], cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    ax.set_title(f"az {az_deg[j]:.0f}°", fontsize=9)
                if j == 0:
                    ax.set_ylabel(SHAPE_CLASSES[i], fontsize=10)
        extra = (
            f", DDIM {args.ddim_steps} steps, guidance {args.guidance_scale}"
            if name == "samples.png"
            else ""
        )
        fig.suptitle(f"shapes teacher: {what} (elevation 20°{extra})", fontsize=10)
        fig.tight_layout(rect=(0, 0, 1, 0.98))
        fig.savefig(out / name, dpi=72)
        plt.close(fig)


# ------------------------------------------------------------------------------------ main


def resolve_device(name: str, deterministic: bool = True) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
            torch.use_deterministic_algorithms(True, warn_only=True)
        else:  # let cuDNN pick its fastest (possibly nondeterministic) kernels
            torch.backends.cudnn.benchmark = True
    return device


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device, deterministic=not args.nondeterministic)
    command = "python " + shlex.join(
        ["scripts/train_shapes_teacher.py", *(argv if argv is not None else sys.argv[1:])]
    )
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    chunk = args.render_chunk or (1024 if device.type == "cuda" else 32)
    log(f"device {device}, {args.threads} CPU thread(s); writing {out}")

    previous = json.loads((out / MANIFEST_FILE).read_text()) if args.eval_only else None

    # 1. data ----------------------------------------------------------------------------
    t0 = time.perf_counter()
    fields = make_fields(device)
    if not args.eval_only:
        labels, azimuth, elevation = draw_views(
            args.num_renders, args.seed + 2, args.elevation_deg, device
        )
        images = render_views(fields, labels, azimuth, elevation, chunk=chunk, desc="renders")
        train = (images, labels, azimuth, elevation)
    test_views = draw_views(
        args.test_per_class * NUM_CLASSES, args.seed + 3, args.elevation_deg, device
    )
    test_images = render_views(fields, *test_views, chunk=chunk, desc="held-out renders")
    test = (test_images, *test_views)
    data_wall = round(time.perf_counter() - t0, 1)
    log(f"data: {test_images.shape[0]} held-out renders (and the training pool) in {data_wall}s")

    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    torch.manual_seed(args.seed)
    untrained = UNet2DConditionModel(**UNET_CONFIG).eval().requires_grad_(False)
    n_params = num_params(untrained)
    log(f"UNet2DConditionModel: {n_params} parameters")
    if args.eval_only:
        classifier = load_shape_classifier(out / CLASSIFIER_FILE).to(device)
        clf_stats = previous["classifier"]
        clf_stats["heldout_accuracy"], per = accuracy_by_class(
            classifier, test_images, test_views[0]
        )
        clf_stats["heldout_accuracy_by_class"] = dict(zip(SHAPE_CLASSES, per))
        settings = json.loads((out / SHAPES_TEACHER_CONFIG).read_text())
        raw, train_stats = None, previous["training"]
    else:
        # 2. classifier ------------------------------------------------------------------
        classifier, clf_stats = train_classifier(
            images, labels, (test_images, test_views[0]), args, device
        )
        save_shape_classifier(classifier, out / CLASSIFIER_FILE)

        # 3. diffusion teacher -----------------------------------------------------------
        raw = copy.deepcopy(untrained).requires_grad_(True).to(device)
        ema, train_stats = train_unet(raw, scheduler, train, args, device)
        for sub in ("unet", "scheduler"):
            shutil.rmtree(out / sub, ignore_errors=True)
        settings = {
            "class_names": list(SHAPE_CLASSES),
            "cond_layout": "[one-hot class (C) + null slot, sin az, cos az, sin el, cos el]",
            "null_label": NULL_LABEL,
            "render": render_settings(),
            "field": FIELD_SETTINGS,
            "cameras": {
                "azimuth_deg": [-180.0, 180.0],
                "elevation_deg": list(args.elevation_deg),
            },
        }
        ShapesTeacher(ema.cpu(), scheduler, settings=settings).save_pretrained(out)
        (out / SHAPES_TEACHER_CONFIG).write_text(json.dumps(settings, indent=2) + "\n")
    log(
        f"classifier: held-out accuracy {clf_stats['heldout_accuracy']:.4f} "
        f"({clf_stats['wall_time_s']}s to train)"
    )
    # reload: the evaluation sees exactly what ships, through the teacher interface
    teacher = ShapesTeacher.from_pretrained(out, settings=settings).to(device)
    eval_start = time.perf_counter()

    # 4a. denoising loss on held-out renders ---------------------------------------------
    untrained = untrained.to(device)
    # the first loss_per_class held-out renders of each class
    rank = torch.zeros_like(test_views[0])
    for c in range(NUM_CLASSES):
        members = test_views[0] == c
        rank[members] = torch.arange(int(members.sum()), device=device)
    subset = (rank < args.loss_per_class).nonzero().squeeze(1)
    test_loss = tuple(v[subset] for v in test)
    loss_stats = {
        "protocol": f"{subset.numel()} held-out renders x 10 stratified timesteps each, "
        "fixed noise (seed 1234); mean per-pixel epsilon MSE; 'untrained' is the same network "
        "at its seeded initialisation",
        "trained_ema": denoising_loss(teacher.unet, scheduler, test_loss),
        "trained_ema_null_class": denoising_loss(teacher.unet, scheduler, test_loss, null=True),
        "untrained": denoising_loss(untrained, scheduler, test_loss),
    }
    if raw is not None:
        loss_stats["trained_raw"] = denoising_loss(raw, scheduler, test_loss)
    elif "trained_raw" in previous["quality"]["denoising_loss_heldout"]:
        loss_stats["trained_raw"] = previous["quality"]["denoising_loss_heldout"]["trained_raw"]
        loss_stats["trained_raw"]["note"] = "from the training run (the raw weights are not kept)"
    loss_stats["ratio_untrained_over_trained"] = round(
        loss_stats["untrained"]["mean"] / loss_stats["trained_ema"]["mean"], 2
    )
    log(
        f"held-out denoising loss: trained (EMA) {loss_stats['trained_ema']['mean']:.4f}, "
        f"untrained {loss_stats['untrained']['mean']:.4f}"
    )

    # 4b. sample quality -----------------------------------------------------------------
    quality = sample_quality(
        teacher,
        classifier,
        fields,
        guidance_scale=args.guidance_scale,
        per_class=args.samples_per_class,
        args=args,
        device=device,
        seed=args.seed + 4,
    )
    sweep = []
    for scale in args.sweep:
        res = sample_quality(
            teacher,
            classifier,
            fields,
            guidance_scale=scale,
            per_class=max(args.samples_per_class // 2, 1),
            args=args,
            device=device,
            seed=args.seed + 5,
        )
        keep = (
            "guidance_scale",
            "num_samples",
            "classifier_accuracy",
            "silhouette_iou_same_camera",
            "silhouette_iou_other_camera",
            "mean_abs_error_to_true_render",
        )
        sweep.append({k: res[k] for k in keep})
    quality["sweep"] = sweep
    save_grid(teacher, fields, args, device, out)
    eval_wall = round(time.perf_counter() - eval_start, 1)

    # 5. manifest ------------------------------------------------------------------------
    files = sorted(
        p for p in out.rglob("*") if p.is_file() and p.name != MANIFEST_FILE and p.suffix != ".png"
    )
    for p in files:
        p.chmod(0o644)  # safetensors writes 0600; package data should be world-readable
    checks = {
        f"classifier held-out accuracy >= {args.min_classifier_accuracy}": (
            clf_stats["heldout_accuracy"] >= args.min_classifier_accuracy
        ),
        f"classifier accuracy on samples >= {args.min_sample_accuracy}": (
            quality["classifier_accuracy"] >= args.min_sample_accuracy
        ),
        "held-out denoising loss: trained < untrained / 5": (
            5 * loss_stats["trained_ema"]["mean"] < loss_stats["untrained"]["mean"]
        ),
        "samples agree better with the true render from their own camera than from another": (
            quality["silhouette_iou_same_camera"] > quality["silhouette_iou_other_camera"]
        ),
    }
    import diffusers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "numpy": np.__version__,
        "machine": platform.machine(),
        "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    manifest = {
        "name": "carv-pyro shapes teacher: camera- and class-conditional 32x32 DDPM of shaded 3D shapes",
        "created_by": "scripts/train_shapes_teacher.py",
        "command": command,
        "seed": args.seed,
        "steps": train_stats["steps"],
        "batch_size": args.batch_size,
        "device": str(device),
        "threads": args.threads,
        "wall_time_s": round(time.perf_counter() - t_start, 1),
        "phase_wall_time_s": {
            "data": data_wall,
            "classifier": clf_stats["wall_time_s"],
            "unet": train_stats["wall_time_s"],
            "evaluation": eval_wall,
        },
        "date": time.strftime("%Y-%m-%d"),
        "environment": env,
        "data": {
            "classes": list(SHAPE_CLASSES),
            "num_train_renders": args.num_renders,
            "num_heldout_renders": int(test_images.shape[0]),
            "cameras": f"azimuth uniform on [-180, 180) deg, elevation uniform on "
            f"{list(args.elevation_deg)} deg, orbit radius 3, orthographic half-width 1",
            "render": render_settings(),
            "field": FIELD_SETTINGS,
            "source": "carv_pyro.pipelines.shapes.shape_field rendered by "
            "carv_pyro.pipelines.render.render (precomputed once into one tensor on the device)",
            "wall_time_s": data_wall,
        },
        "unet": {
            "class": "UNet2DConditionModel",
            "num_parameters": n_params,
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in UNET_CONFIG.items()},
            "weights": "EMA",
            "conditioning": settings["cond_layout"],
        },
        "scheduler": {"class": "DDPMScheduler", "config": SCHEDULER_CONFIG},
        "training": train_stats,
        "final_losses": {
            "train_loss_last_200_steps": train_stats["final_train_loss"],
            "heldout_denoising_loss_trained_ema": loss_stats["trained_ema"]["mean"],
            "heldout_denoising_loss_untrained": loss_stats["untrained"]["mean"],
        },
        "classifier": clf_stats,
        "quality": {"denoising_loss_heldout": loss_stats, "samples": quality},
        "checks": checks,
        "files": {p.relative_to(out).as_posix(): file_sha256(p) for p in files},
    }
    manifest["evaluation"] = {
        "command": command,
        "device": str(device),
        "environment": env,
        "date": time.strftime("%Y-%m-%d"),
        "wall_time_s": round(time.perf_counter() - eval_start + data_wall, 1),
        "note": "re-measured with --eval-only" if args.eval_only else "same run",
    }
    if previous is not None:  # keep the training run's records
        for key in ("command", "seed", "steps", "batch_size", "device", "threads"):
            manifest[key] = previous[key]
        for key in ("wall_time_s", "date", "environment", "data"):
            manifest[key] = previous[key]
        manifest["phase_wall_time_s"] = {
            **previous["phase_wall_time_s"],
            "evaluation": previous["phase_wall_time_s"]["evaluation"],
        }
        manifest["final_losses"]["train_loss_last_200_steps"] = previous["final_losses"][
            "train_loss_last_200_steps"
        ]
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"wrote {out / MANIFEST_FILE}; total {time.perf_counter() - t_start:.0f}s")
    failed = [name for name, ok in checks.items() if not ok]
    if failed:
        log(f"FAILED checks: {failed}")
        return 1
    log("all checks passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
