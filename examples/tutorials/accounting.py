"""Tutorial: measure V_b, V_w and costs, then let the accountant choose K while training.

A voxel field rendered from random cameras (the expensive upstream) is carved with the embedded
digits teacher. We measure the variance components and costs at the start, print the
accountant's table and plot variance against cost, then train with an estimator whose K is
chosen online by an Accountant (from measured costs and variances, as the ``auto`` preset does)
and whose timestep proposal is learned (``adaptive``), and plot the learned q(t).
"""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pyro
import torch
from pyro.infer import SVI

import carv_pyro as carv
from carv_pyro.measure import measure
from carv_pyro.pipelines.render import VoxelField
from carv_pyro.pipelines.text_to_3d import make_model, make_scene

SMOKE = os.environ.get("CARV_SMOKE") == "1"  # the test suite runs every tutorial at smoke size
OUT = os.environ.get("CARV_TUTORIAL_OUT", "docs/tutorials/img")
os.makedirs(OUT, exist_ok=True)
KS = (1, 2, 4) if SMOKE else (1, 2, 4, 8, 16)

scene = make_scene("digits", "3")  # the 16x16 digits teacher, bound to the prompt "3"
sds = carv.SDS(scene.teacher, weighting="sds", guidance_scale=5.0)
field = VoxelField(resolution=8 if SMOKE else 16, channels=scene.channels, seed=0)
# a plain Pyro model: "views" (R cameras, dim -2) and the reserved inner plate "draws" (dim -1)
model = make_model(field, scene, sds, R=4, K=4, generator=torch.Generator().manual_seed(1))

# 1. measure at the current parameters: V_b, V_w, c_outer, c_inner (the teacher timed per K)
guide = carv.Estimator(K=4).guide(model, seed=2)  # K = 4 prior draws per view
if SMOKE:
    report = measure(model, guide, n_repeats=3, candidate_ks=KS, n_timing=2, warmup=1)
else:
    # 20 timed repeats of each K, round-robin, for steadier medians on a busy machine
    report = measure(model, guide, n_repeats=40, candidate_ks=KS, n_timing=20)
print(report.table(KS))
report.plot(os.path.join(OUT, "accounting_variance_cost.png"), KS)

# 2. train with K chosen online: the "auto" preset with a learned proposal, and an accountant
#    that measures every 5 steps (the preset's own measures every 10)
estimator = carv.Estimator.preset("auto", proposal="adaptive")
accountant = carv.Accountant(
    adapt=True, every=5, window=10, k_range=estimator.k_range, plate="draws"
)
guide = estimator.guide(model, seed=3)
loss = estimator.loss(accountant=accountant)
svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), loss=loss)
for step in range(11 if SMOKE else 150):
    svi.step()
    if step % 10 == 9:  # the accountant has measured at steps 0, 5, 10, ...
        logged = loss.summary()
        print(
            f"step {step:3d}  K={logged['K']:.0f}  K*={logged['k_star']:.2f}  "
            f"ECM(pred)={logged['ecm_predicted']:.2f}  ESS={logged['sds/ess']:.1f}"
        )
print("K history:", [h["K"] for h in accountant.history])
print("measured seconds per step by K:", {k: round(s, 4) for k, s in accountant.step_costs.items()})

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
