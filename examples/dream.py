"""Text-to-3D with plain Pyro: carve a torus into a voxel field by score distillation.

The render of a random camera is the expensive upstream sample (the ``views`` plate); the
teacher's (t, eps) draws are the cheap reserved inner plate (``carv_pyro.draws``). The estimator
is one object: swapping the preset is all it takes to change how the gradient is estimated.
The teacher is the embedded 3D-aware shapes teacher (the digits teacher, carving a "3", where
the shapes teacher is not installed). ``carv-pyro dream torus`` is the same job with
checkpoints, quality curves and a JSON summary.

    python examples/dream.py            # a few minutes on a CPU; writes dream_torus.png
"""

import pyro
import torch
from pyro.infer import SVI

import carv_pyro as carv
from carv_pyro.pipelines.render import VoxelField
from carv_pyro.pipelines.text_to_3d import make_model, make_scene, quality
from carv_pyro.pipelines.text_to_3d.pictures import save_turntable
from carv_pyro.teachers.shapes import SHAPES_TEACHER_DIR

torch.set_num_threads(1)

if (SHAPES_TEACHER_DIR / "unet").is_dir() and (SHAPES_TEACHER_DIR / "manifest.json").is_file():
    teacher, prompt = "shapes", "torus"
else:
    print(f"note: the shapes teacher is not installed in {SHAPES_TEACHER_DIR}; using digits")
    teacher, prompt = "digits", "3"
scene = make_scene(teacher, prompt)  # the teacher bound to the prompt: cond, renders, cameras
sds = carv.SDS(scene.teacher, weighting="sds", guidance_scale=scene.guidance_scale)
field = VoxelField(resolution=32, channels=scene.channels, seed=0)  # density and albedo logits

# "carv": 8 draws per view, t importance-sampled from q(t) ∝ p(t) w(t) alpha_t, one draw per
# stratum of each view. ("baseline" is threestudio's one t ~ p(t) per view; "auto" chooses K
# online from measured costs and variances.)
estimator = carv.Estimator.preset("carv")
model = make_model(
    field, scene, sds, R=4, K=estimator.K, generator=torch.Generator().manual_seed(1)
)
svi = SVI(model, estimator.guide(model, seed=2), pyro.optim.Adam({"lr": 0.05}), estimator.loss())
truth = scene.true_occupancy(field.resolution)  # the torus's true shape (None for digits)
for step in range(201):
    loss = svi.step()
    if step % 50 == 0:
        q = quality(field, scene, true_occupancy=truth)
        print(
            f"step {step:4d}  SDS loss {loss:8.3f}  "
            + "  ".join(f"{k} {v:.3f}" for k, v in q.items())
        )

path = save_turntable(field, scene, f"dream_{prompt}.png", title=f"{prompt!r} [{estimator.name}]")
print("wrote", path)
