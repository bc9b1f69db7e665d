"""Tutorial: text-to-3D score distillation with a 3D-aware teacher, in a plain Pyro SVI loop.

The render of a random camera is the expensive upstream sample (the ``views`` plate); the
teacher's (t, eps) draws are the cheap reserved inner plate (``carv_pyro.draws``). We carve the
same voxel field with three estimators for the same wall-clock budget each: the threestudio
baseline (one uniform t per view), ``carv`` (8 importance-sampled, stratified draws per view)
and ``auto`` (K chosen online from measured costs and variances), save turntables, and plot the
quality over training wall-clock: 3D IoU against the true shape, and the shape classifier's
probability of the prompt on held-out views.

The teacher is the embedded shapes teacher (camera-conditioned 32x32 renders of procedural 3D
shapes), or the 16x16 digits teacher where the shapes teacher is not installed.
"""

import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pyro
import torch
from pyro.infer import SVI

import carv_pyro as carv
from carv_pyro.pipelines.render import VoxelField
from carv_pyro.pipelines.text_to_3d import TextTo3DConfig, make_model, make_scene, quality
from carv_pyro.pipelines.text_to_3d.pictures import save_turntable
from carv_pyro.teachers.shapes import SHAPES_TEACHER_DIR

SMOKE = os.environ.get("CARV_SMOKE") == "1"  # the test suite runs every tutorial at smoke size
OUT = os.environ.get("CARV_TUTORIAL_OUT", "docs/tutorials/img")
BUDGET_S = 1.0 if SMOKE else 120.0  # seconds of training per estimator (evaluation excluded)
EVAL_EVERY_S = BUDGET_S / 12
os.makedirs(OUT, exist_ok=True)

# 1. the scene: a teacher bound to a prompt (conditioning, render settings, cameras, the judge)
HAVE_SHAPES = (SHAPES_TEACHER_DIR / "unet").is_dir() and (
    SHAPES_TEACHER_DIR / "manifest.json"
).is_file()
if not HAVE_SHAPES:
    print(f"note: the shapes teacher is not installed in {SHAPES_TEACHER_DIR}; using digits")
TEACHER, PROMPT = ("shapes", "torus") if HAVE_SHAPES else ("digits", "3")
config = TextTo3DConfig(teacher=TEACHER, prompt=PROMPT)  # the defaults of `carv-pyro dream`
scene = make_scene(TEACHER, PROMPT)
sds = carv.SDS(
    scene.teacher,
    weighting=config.weighting,
    t_range=config.t_range,
    guidance_scale=scene.guidance_scale,
)
resolution = 8 if SMOKE else config.resolution
R = 2 if SMOKE else config.R
truth = scene.true_occupancy(resolution)  # the prompt's true shape (None for digits)
metrics = ("iou", "p") if truth is not None else ("p",)

curves = {}
for name in ("baseline", "carv", "auto"):
    # 2. the estimator: a preset means the same thing everywhere (the CLI, the benches, here)
    estimator = carv.Estimator.preset(name)
    pyro.clear_param_store()
    field = VoxelField(resolution, scene.channels, seed=0)  # density and albedo logits
    cameras = torch.Generator().manual_seed(1)  # the camera prior's draws, not the global RNG
    # 3. the model: R views (latent cameras) in the "views" plate, K teacher draws per view in
    #    the reserved `draws` plate, whose size the estimator sets
    model = make_model(field, scene, sds, R, estimator.K, cameras)
    loss = estimator.loss()  # a CARVLoss (with an adapting Accountant for "auto")
    svi = SVI(model, estimator.guide(model, seed=2), pyro.optim.Adam({"lr": config.lr}), loss)
    curve, train_s, steps, next_eval = [], 0.0, 0, 0.0
    while train_s < BUDGET_S:
        start = time.perf_counter()
        svi.step()
        train_s += time.perf_counter() - start
        steps += 1
        if train_s >= next_eval or train_s >= BUDGET_S:  # evaluation is not timed
            q = quality(field, scene, n_views=4 if SMOKE else 8, true_occupancy=truth)
            curve.append((train_s, *(q[m] for m in metrics)))
            next_eval += EVAL_EVERY_S
    curves[name] = curve
    K = loss.last_records[0].n_inner  # for "auto": the K the accountant chose last
    save_turntable(
        field,
        scene,
        os.path.join(OUT, f"sds_{name}_turntable.png"),
        size=64 if SMOKE else 160,
        title=f"{PROMPT!r} [{name}]",
    )
    scores = ", ".join(f"{m} = {q[m]:.3f}" for m in metrics)
    print(f"{name:8s}: {steps:4d} steps in {train_s:5.1f} s, K = {K:2d}, {scores}")

labels = {"iou": "3D IoU with the true shape", "p": "p(prompt), held-out views"}
fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.5), squeeze=False)
for i, (m, ax) in enumerate(zip(metrics, axes[0])):
    for name, curve in curves.items():
        ax.plot([row[0] for row in curve], [row[1 + i] for row in curve], "o-", ms=3, label=name)
    ax.set_xlabel("training wall-clock (s)")
    ax.set_ylabel(labels[m])
    ax.legend()
fig.suptitle(f"{PROMPT!r}, {TEACHER} teacher, one seed")
fig.tight_layout()
fig.savefig(os.path.join(OUT, "sds_quality_wallclock.png"), dpi=120)
