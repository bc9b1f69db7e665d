"""Tutorial: text-to-3D score distillation on the embedded teacher, in a Pyro SVI loop.

The render of a random camera is the expensive upstream sample (outer plate); the teacher's
(t, eps) draws are the cheap inner plate. We train the same voxel field with the threestudio
baseline (uniform t, K = 1) and with CARV (importance-sampled, stratified t, K = 8), save
turntables, and plot the classifier's confidence in the prompt against wall-clock time.
"""

import math
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pyro
import torch
from pyro.infer import SVI

import carv_pyro as carv
from carv_pyro.classifier import load_classifier
from carv_pyro.pipelines.render import VoxelField, render, save_turntable_png
from carv_pyro.pipelines.text_to_3d import quality

SMOKE = os.environ.get("CARV_SMOKE") == "1"  # the test suite runs every tutorial at smoke size
OUT = os.environ.get("CARV_TUTORIAL_OUT", "docs/tutorials/img")
STEPS = 4 if SMOKE else 150
os.makedirs(OUT, exist_ok=True)

teacher = carv.teachers.load_default()  # 16x16 digits DDPM shipped inside the package
sds = carv.SDS(teacher, weighting="sds", guidance_scale=10.0)
label = torch.tensor(3)  # the "prompt": the teacher is conditioned on digit classes
classifier = load_classifier()


def make_model(field):
    def model(R=4, K=8):
        pyro.module("field", field)  # the field's logits are what SVI optimizes
        with pyro.plate("views", R, dim=-2):  # outer plate: R rendered views
            # a frontal arc: the digits teacher knows no back or side of a digit
            azimuth = pyro.sample("azimuth", pyro.distributions.Uniform(-math.pi / 4, math.pi / 4))
            elevation = pyro.sample("elevation", pyro.distributions.Uniform(-0.17, 0.52))
            image = render(field, azimuth, elevation, n_samples=24)  # (R, 1, 1, 16, 16)
            with pyro.plate("noise", K, dim=-1):  # inner plate: K (t, eps) draws per view
                carv.teacher_term("sds", sds, image, cond=label)

    return model


curves = {}
for name, K, guide_options in [
    ("baseline", 1, dict(proposal="prior", stratify=None)),  # threestudio's default
    ("carv", 8, dict(proposal="weighted", stratify="per_outer")),
]:
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    field = VoxelField(resolution=16, seed=0)
    model = make_model(field)
    guide = carv.TimestepGuide(model, **guide_options)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.1}), loss=carv.CARVLoss())
    curve, train_s = [], 0.0
    for step in range(STEPS):
        start = time.perf_counter()
        svi.step(K=K)
        train_s += time.perf_counter() - start  # training time only, evaluation excluded
        if step % 10 == 0 or step == STEPS - 1:
            curve.append((train_s, quality(field, 3, classifier).mean_prob))
    curves[name] = curve
    save_turntable_png(field, os.path.join(OUT, f"sds_{name}_turntable.png"), n_views=8)
    print(f"{name}: {STEPS} steps in {curve[-1][0]:.1f} s, p(3) = {curve[-1][1]:.2f}")

fig, ax = plt.subplots(figsize=(6, 3.5))
for name, curve in curves.items():
    ax.plot(*zip(*curve), "o-", label=name)
ax.set_xlabel("training wall-clock (s)")
ax.set_ylabel("classifier p(prompt) over held-out views")
ax.legend()
fig.tight_layout()
fig.savefig(os.path.join(OUT, "sds_quality_wallclock.png"), dpi=120)
