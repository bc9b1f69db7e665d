"""Analytic set-ups with closed-form expected gradients, shared by the tests.

Gaussian teacher of ``N(m, s^2 I)`` data and a linear upstream ``x = theta + xi * d``. The SDS
residual ``h = w(t) (eps_hat(alpha x + sigma eps, t) - eps)`` is affine in ``eps`` with

    E_eps[h | x, t] = w(t) alpha_t sigma_t (x - m) / (alpha_t^2 s^2 + sigma_t^2),

so the expected gradient w.r.t. ``theta`` for fixed upstream samples ``x_r`` is
``c * mean_r (x_r - m)`` with ``c = sum_t p(t) w(t) alpha_t sigma_t / (alpha_t^2 s^2 + sigma_t^2)``.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

import carv_pyro as carv
from carv_pyro.schedules import DiscreteSchedule
from carv_pyro.teachers import GaussianTeacher

T = 60
D = 2
MEAN = torch.tensor([0.5, -0.25], dtype=torch.float64)
STD = 0.7
DIRECTION = torch.tensor([0.3, 0.1], dtype=torch.float64)
THETA0 = torch.tensor([1.0, 0.2], dtype=torch.float64)


def schedule() -> DiscreteSchedule:
    return DiscreteSchedule.linear(T, 1e-3, 0.2)


def sds(weighting: str = "sds", t_range=(0.1, 0.9)) -> carv.SDS:
    teacher = GaussianTeacher(MEAN.clone(), STD, schedule())
    return carv.SDS(teacher, weighting=weighting, t_range=t_range)


def sds_constant(objective: carv.TeacherObjective) -> float:
    """``c = E_p[w alpha sigma / (alpha^2 s^2 + sigma^2)]``."""
    t = torch.arange(T)
    f64 = torch.empty((), dtype=torch.float64)
    a = objective.schedule.alpha(t, like=f64)
    s = objective.schedule.sigma(t, like=f64)
    w = objective.weight(t)
    return float((objective.prior.probs() * w * a * s / (a * a * STD**2 + s * s)).sum())


def make_model(objective, R: int, K: int, xi: torch.Tensor | None = None, *, inner: str = "plain"):
    """``x_r = theta + xi_r d`` at plates views (dim -2, R) and noise (dim -1, K).

    With ``xi`` given the upstream samples are fixed data; else ``xi_r ~ N(0, 1)``. The inner
    plate is a plain ``pyro.plate("noise")`` or, with ``inner="draws"``, the reserved
    ``carv.draws(K, "noise")`` that estimators may resize.
    """

    def model():
        theta = pyro.param("theta", THETA0.clone())
        with pyro.plate("views", R, dim=-2):
            if xi is None:
                z = pyro.sample("xi", dist.Normal(torch.zeros((), dtype=torch.float64), 1.0))
            else:
                z = xi.reshape(R, 1)
            x = theta + z.unsqueeze(-1) * DIRECTION  # (R, 1, D)
            plate = (
                carv.draws(K, "noise", dim=-1)
                if inner == "draws"
                else pyro.plate("noise", K, dim=-1)
            )
            with plate:
                carv.teacher_term("sds", objective, x)

    return model


def expected_grad(objective, xi: torch.Tensor | None) -> torch.Tensor:
    """Exact ``E[grad]`` at ``THETA0`` for fixed ``xi`` (or ``E_xi`` when ``xi`` is None)."""
    mean_xi = 0.0 if xi is None else float(xi.mean())
    return sds_constant(objective) * (THETA0 + mean_xi * DIRECTION - MEAN)


def grad_of(loss, model, guide, *args, **kwargs) -> torch.Tensor:
    """One gradient estimate w.r.t. ``theta``."""
    theta = pyro.param("theta", THETA0.clone()).unconstrained()
    theta.grad = None
    loss.loss_and_grads(model, guide, *args, **kwargs)
    return theta.grad.detach().clone()


def z_scores(grads: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Per-coordinate z-scores of the mean of ``grads`` (N, D) against ``want`` (D,)."""
    mean, se = grads.mean(0), grads.std(0) / grads.shape[0] ** 0.5
    return (mean - want) / se


def closed_form_components(objective, proposal_probs=None) -> tuple[float, float]:
    """``(V_b, V_w)`` at ``THETA0`` for ``xi ~ N(0, 1)`` and i.i.d. draws from ``q``.

    Per draw ``g = rho(t) (A(t) (x - m) + B(t) eps)`` with ``A = w alpha sigma / Den``,
    ``B = w (sigma^2 / Den - 1)``, ``rho = p / q``, so ``E[g | x] = c (x - m)`` and
    ``E[||g||^2 | x] = E_p[rho A^2] ||x - m||^2 + E_p[rho B^2] D``. Hence
    ``V_b = c^2 ||d||^2`` and ``V_w = (E_p[rho A^2] - c^2)(||theta - m||^2 + ||d||^2)
    + E_p[rho B^2] D``.
    """
    t = torch.arange(T)
    f64 = torch.empty((), dtype=torch.float64)
    a = objective.schedule.alpha(t, like=f64)
    s = objective.schedule.sigma(t, like=f64)
    w = objective.weight(t)
    den = a * a * STD**2 + s * s
    p = objective.prior.probs()
    q = p if proposal_probs is None else proposal_probs
    rho = torch.where(q > 0, p / q, torch.zeros_like(p))
    A = w * s * a / den
    B = w * (s * s / den - 1)
    c = (p * A).sum()
    d2 = (DIRECTION**2).sum()
    m2 = ((THETA0 - MEAN) ** 2).sum()
    vb = c * c * d2
    vw = ((p * rho * A * A).sum() - c * c) * (m2 + d2) + (p * rho * B * B).sum() * D
    return float(vb), float(vw)
