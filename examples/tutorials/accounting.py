"""Tutorial: measure V_b, V_w and costs, then let the accountant choose K while training.

A voxel field rendered from random cameras (the expensive upstream) is distilled from the
embedded digits teacher. We measure the variance components and costs at the start, print the
accountant's table and plot variance against cost, then train with an online Accountant that
resizes the inner plate to K* and an adaptive timestep proposal, and plot the learned q(t).
"""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pyro
import torch
from pyro.infer import SVI

import carv_pyro as carv
from carv_pyro.accounting import measure
from carv_pyro.pipelines.render import VoxelField
from carv_pyro.pipelines.text_to_3d import make_model

SMOKE = os.environ.get("CARV_SMOKE") == "1"  # the test suite runs every tutorial at smoke size
OUT = os.environ.get("CARV_TUTORIAL_OUT", "docs/tutorials/img")
os.makedirs(OUT, exist_ok=True)
torch.manual_seed(0)
pyro.set_rng_seed(0)

teacher = carv.teachers.load_default()
sds = carv.SDS(teacher, weighting="sds", guidance_scale=5.0)
field = VoxelField(resolution=8 if SMOKE else 16, seed=0)
# a plain Pyro model: plates "views" (R cameras, dim -2) and "noise" (K draws, dim -1)
model = make_model(field, sds, label=3, R=4, K=4, n_samples=8 if SMOKE else 24)

# 1. measure at the current parameters: V_b, V_w, c_outer, c_inner (teacher timed per K)
guide = carv.TimestepGuide(model)
report = measure(model, guide, n_repeats=4 if SMOKE else 40, candidate_ks=(1, 2, 4, 8, 16))
print(report.table((1, 2, 4, 8, 16)))
report.plot(os.path.join(OUT, "accounting_variance_cost.png"), (1, 2, 4, 8, 16))

# 2. train with the online accountant: it re-measures every 5 steps and sets K to K*
accountant = carv.Accountant(adapt=True, every=5, window=10, k_range=(1, 32))
guide = carv.TimestepGuide(model, proposal="adaptive", stratify="per_outer")
loss = carv.CARVLoss(accountant=accountant)
svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), loss=loss)
for step in range(12 if SMOKE else 150):
    svi.step()
    if step % 10 == 0:
        logged = loss.summary()
        print(
            f"step {step:3d}  K={logged['K']:.0f}  K*={logged['k_star']:.2f}  "
            f"ECM(pred)={logged['ecm_predicted']:.2f}  ESS={logged['sds/ess']:.1f}"
        )

# 3. the learned proposal q(t) against the prior
q = guide.proposal_for("sds", sds)
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(q.probs().numpy(), label="adaptive q(t)")
ax.plot(sds.prior.probs().numpy(), label="prior p(t)")
ax.set_xlabel("timestep t")
ax.set_ylabel("probability")
ax.legend()
fig.tight_layout()
fig.savefig(os.path.join(OUT, "accounting_learned_q.png"), dpi=120)
print("K history:", [h["K"] for h in accountant.history])
