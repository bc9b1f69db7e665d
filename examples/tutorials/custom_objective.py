"""Tutorial: declare a custom teacher objective from parts, and check it is unbiased.

We declare "SDS in x0-space" (the residual is the teacher's denoised estimate's error,
``x - x0_hat``, rescaled) without writing any estimator code, train a point estimate with it on an
analytic Gaussian teacher, and compare the gradient with its closed form.
"""

import os

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI

import carv_pyro as carv
from carv_pyro.measure import gradient_estimate
from carv_pyro.schedules import DiscreteSchedule
from carv_pyro.teachers import GaussianTeacher

SMOKE = os.environ.get("CARV_SMOKE") == "1"  # the test suite runs every tutorial at smoke size
STEPS = 20 if SMOKE else 300

# 1. a teacher: the exact denoiser of N(mean, 0.5^2 I) data in 2-D
schedule = DiscreteSchedule.linear(1000)
teacher = GaussianTeacher(torch.tensor([1.0, -2.0]), 0.5, schedule)


# 2. the parts: a residual on a NoisedBatch, a weighting w(t) and a timestep prior (t_range)
def x0_residual(batch):
    """x - x0_hat, where x0_hat = (x_t - sigma_t eps_hat) / alpha_t (Tweedie)."""
    x0_hat = (batch.x_t - batch.sigma * batch.eps_hat()) / batch.alpha
    return batch.x - x0_hat


def snr_weight(schedule, t):
    """w(t) = alpha_t^2: down-weights the noisiest steps, where x0_hat is least reliable."""
    return schedule.alpha(t, like=torch.empty((), dtype=torch.float64)) ** 2


x0_sds = carv.TeacherObjective(
    teacher, residual=x0_residual, weighting=snr_weight, t_range=(0.02, 0.98)
)


# 3. a plain Pyro model with nested plates: 4 upstream samples, 8 (t, eps) draws each in the
#    reserved inner plate
def model(R=4, K=8):
    theta = pyro.param("theta", torch.zeros(2))
    with pyro.plate("views", R, dim=-2):
        xi = pyro.sample("xi", dist.Normal(0.0, 1.0))
        x = theta + 0.1 * xi.unsqueeze(-1)  # (R, 1, 2): batch dims aligned with the plates
        with carv.draws(K, dim=-1):
            carv.teacher_term("x0_sds", x0_sds, x)


# the estimator knows nothing of the objective: the "carv" preset builds q ∝ p w alpha from the
# objective's own prior and weighting
estimator = carv.Estimator.preset("carv")
guide = estimator.guide(model, seed=0)
svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), loss=estimator.loss())
for _ in range(STEPS):
    svi.step()
print("theta after training:", pyro.param("theta").detach().numpy().round(3))

# 4. unbiasedness, checked against the closed form at a fixed theta. For this teacher
#    x0_hat is affine in x_t, so E[x - x0_hat | x, t] = (1 - alpha^2 s^2 / (alpha^2 s^2 + sigma^2))
#    (x - mean): the expected gradient is c (theta - mean) with c = E_p[w (...)].
t = torch.arange(1000)
a = schedule.alpha(t, like=torch.empty((), dtype=torch.float64))
s = schedule.sigma(t, like=torch.empty((), dtype=torch.float64))
c = (x0_sds.prior.probs() * a**2 * (1 - a**2 * 0.25 / (a**2 * 0.25 + s**2))).sum()
theta = pyro.param("theta").unconstrained()
expected = c * (theta.detach().double() - teacher.mean.double())
loss = carv.CARVLoss()
# gradient_estimate: one estimate at the current theta, leaving every .grad as it was
grads = torch.stack(
    [gradient_estimate(loss, model, guide, params=[theta]) for _ in range(50 if SMOKE else 400)]
)
z = (grads.mean(0) - expected) / (grads.std(0) / len(grads) ** 0.5)
print("mean gradient:", grads.mean(0).numpy(), "closed form:", expected.numpy())
print("z-scores (|z| < 4.5 expected):", z.numpy().round(2))
assert (z.abs() < 4.5).all()
