"""Tutorial: bring your own diffusers model from a local folder.

carv-pyro never downloads anything: a teacher is any diffusers UNet plus scheduler saved in a
local folder (the layout of a Stable Diffusion checkpoint: ``unet/`` and ``scheduler/``). Here we
write a small text-conditioned ``UNet2DConditionModel`` with a v-prediction scheduler to a folder,
as your own checkpoint would be, load it with ``DiffusersTeacher.from_pretrained``, and run SDS on
a latent image conditioned on "prompt embeddings" (``encoder_hidden_states``) with
classifier-free guidance against the empty prompt's embedding.
"""

import os
import tempfile

import pyro
import pyro.distributions as dist
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from pyro.infer import SVI

import carv_pyro as carv
from carv_pyro.teachers import DiffusersTeacher

SMOKE = os.environ.get("CARV_SMOKE") == "1"  # the test suite runs every tutorial at smoke size

# 1. a checkpoint folder, as you would have it (here: random weights, written by us; the global
#    RNG is forked so that making them leaves it as it was)
folder = tempfile.mkdtemp(prefix="my_teacher_")
with torch.random.fork_rng():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=8,
    )
unet.save_pretrained(os.path.join(folder, "unet"))
DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction").save_pretrained(
    os.path.join(folder, "scheduler")
)

# 2. load it offline; v-prediction is converted to eps from the scheduler's config
L, D = 6, 16
prompt = torch.randn(
    L, D, generator=torch.Generator().manual_seed(1)
)  # stands in for your text encoder's output for the prompt
empty_prompt = torch.zeros(L, D)  # and for the empty prompt (the guidance's null condition)
teacher = DiffusersTeacher.from_pretrained(folder, null_encoder_hidden_states=empty_prompt)
print(teacher)
sds = carv.SDS(teacher, weighting="sds", guidance_scale=7.5)


# 3. a latent image as the upstream, R "views" (here: random shifts) and K draws each in the
#    reserved inner plate `carv.draws`
def model(R=2, K=4):
    latent = pyro.param("latent", torch.zeros(4, 8, 8))
    with pyro.plate("views", R, dim=-2):
        shift = pyro.sample("shift", dist.Normal(0.0, 0.05))
        x = latent + shift[..., None, None, None]  # (R, 1, 4, 8, 8)
        with carv.draws(K, dim=-1):
            carv.teacher_term("sds", sds, x, cond=prompt)  # (L, D) broadcasts over all draws


# 4. the estimator: the "carv" preset (q ∝ p w alpha, stratified per view) with scrambled-Sobol
#    noise, at K = 4 draws per view
estimator = carv.Estimator.preset("carv", K=4, noise="sobol")
loss = estimator.loss()
svi = SVI(model, estimator.guide(model, seed=0), pyro.optim.Adam({"lr": 0.02}), loss=loss)
for step in range(5 if SMOKE else 200):
    value = svi.step()
    if step % 50 == 0:
        print(f"step {step:3d}  loss {value:.4f}  ESS {loss.diagnostics['sds'].ess:.1f}")
print("latent norm:", float(pyro.param("latent").detach().norm()))
