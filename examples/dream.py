"""Text-to-3D with plain Pyro: carve the digit 3 into a voxel field by score distillation.

The render of a random camera is the expensive upstream sample; the teacher's (t, eps) draws are
the cheap inner plate. Swapping the guide is all it takes to change the gradient estimator.

    python examples/dream.py            # about a minute on one CPU core; writes dream3.png
"""

import math

import pyro
import torch
from pyro.infer import SVI

import carv_pyro as carv
from carv_pyro.pipelines.render import VoxelField, render, save_turntable_png
from carv_pyro.teachers import load_default

torch.set_num_threads(1)
pyro.set_rng_seed(0)

field = VoxelField(resolution=16, seed=0)  # the 3-D scene: density and albedo logits
sds = carv.SDS(load_default(), weighting="sds", guidance_scale=10.0)
label = torch.tensor(3)  # the "prompt": the teacher is class-conditional on digits


def model(R=4, K=8):
    pyro.module("field", field)  # the field's logits are what SVI optimizes
    with pyro.plate("views", R, dim=-2):  # outer plate: R rendered views
        # a frontal arc: the digits teacher knows no back or side of a digit
        azimuth = pyro.sample("azimuth", pyro.distributions.Uniform(-math.pi / 4, math.pi / 4))
        elevation = pyro.sample("elevation", pyro.distributions.Uniform(-0.17, 0.52))
        image = render(field, azimuth, elevation, n_samples=24)  # (R, 1, 1, 16, 16)
        with pyro.plate("noise", K, dim=-1):  # inner plate: K cheap (t, eps) draws per view
            carv.teacher_term("sds", sds, image, cond=label)


# CARV: importance-sample t from q(t) ∝ p(t) w(t) alpha_t, one draw per stratum of each view.
# (The threestudio baseline is proposal="prior", stratify=None and K=1.)
guide = carv.TimestepGuide(model, proposal="weighted", stratify="per_outer")
svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.1}), loss=carv.CARVLoss())
for step in range(200):
    loss = svi.step()
    if step % 50 == 0:
        print(f"step {step:4d}  SDS loss {loss:8.2f}")

save_turntable_png(field, "dream3.png", n_views=8)
print("wrote dream3.png")
