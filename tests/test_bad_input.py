"""Bad input gets a clear error naming the argument, before any parameter changes."""

from __future__ import annotations

import pyro
import pytest
import torch
from pyro.infer import SVI

import carv_pyro as carv
from carv_pyro.objectives import TeacherObjective
from carv_pyro.proposals import Categorical, DefensiveMixture, HistogramProposal
from carv_pyro.schedules import DiscreteSchedule
from carv_pyro.timesteps import UniformTimesteps

from .analytic import THETA0, D, T, make_model, sds


def _svi_step_raises(model, guide, loss, match, exc=ValueError):
    svi = SVI(model, guide, pyro.optim.SGD({"lr": 1.0}), loss=loss)
    before = pyro.param("theta", THETA0.clone()).detach().clone()
    with pytest.raises(exc, match=match):
        svi.step()
    assert torch.equal(pyro.param("theta").detach(), before)


def test_proposal_with_zero_mass_on_the_prior_support():
    objective = sds()
    probs = objective.prior.probs().clone()
    probs[objective.prior.low + 3] = 0.0
    model = make_model(objective, 2, 2)
    guide = carv.TimestepGuide(model, proposal=Categorical(probs))
    _svi_step_raises(model, guide, carv.CARVLoss(), r"proposal for term 'sds' has q\(t\) = 0")


@pytest.mark.parametrize("t_range", [(0.5, 0.2), (-0.1, 0.5), (0.2, 1.0), (0.1,), "x"])
def test_bad_t_range(t_range):
    with pytest.raises(ValueError, match="t_range"):
        sds(t_range=t_range)


def test_x_with_the_wrong_event_shape():
    objective = sds()

    def model():
        theta = pyro.param("theta", THETA0.clone())
        with pyro.plate("views", 2, dim=-2), pyro.plate("noise", 3, dim=-1):
            carv.teacher_term("sds", objective, theta.expand(2, 1, D)[..., :1])

    _svi_step_raises(model, lambda: None, carv.CARVLoss(), r"event shape \(2,\)")


def test_x_whose_batch_shape_disagrees_with_the_plates():
    objective = sds()

    def model():
        theta = pyro.param("theta", THETA0.clone())
        with pyro.plate("views", 2, dim=-2), pyro.plate("noise", 3, dim=-1):
            carv.teacher_term("sds", objective, theta.expand(2, D))  # (R, D): R lands on dim -1

    _svi_step_raises(
        model, lambda: None, carv.CARVLoss(), r"does not broadcast with the enclosing plates"
    )


class _NaNTeacher(carv.teachers.GaussianTeacher):
    def _predict_eps(self, x_t, t, cond):
        eps = super()._predict_eps(x_t, t, cond)
        return torch.where((t > 40).reshape(-1, 1), torch.full_like(eps, float("nan")), eps)


def _nan_model():
    from .analytic import MEAN, STD, schedule

    objective = carv.SDS(_NaNTeacher(MEAN.clone(), STD, schedule()), t_range=(0.1, 0.9))
    return objective, make_model(objective, 2, 8, xi=torch.tensor([0.0, 0.1], dtype=torch.float64))


def test_nan_teacher_output_raises_naming_the_site_and_timesteps():
    _, model = _nan_model()
    _svi_step_raises(
        model,
        carv.TimestepGuide(model),
        carv.CARVLoss(),
        r"'sds' produced NaN/Inf.*timesteps",
        exc=carv.NonFiniteTeacherError,
    )


def test_nan_policy_zero_drops_and_reports():
    _, model = _nan_model()
    loss = carv.CARVLoss(nonfinite="zero")
    pyro.set_rng_seed(1)
    theta = pyro.param("theta", THETA0.clone()).unconstrained()
    loss.loss_and_grads(model, carv.TimestepGuide(model, stratify="global"))
    assert torch.isfinite(theta.grad).all()
    assert loss.diagnostics["sds"].n_nonfinite > 0


def test_timestep_guide_on_a_model_without_teacher_terms():
    def model():
        pyro.param("theta", THETA0.clone())
        pyro.sample("z", pyro.distributions.Normal(0.0, 1.0))

    _svi_step_raises(model, carv.TimestepGuide(model), carv.CARVLoss(), "no teacher_term")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"proposal": "fancy"}, "proposal must be one of"),
        ({"stratify": "per_view"}, "stratify must be one of"),
        ({"noise": "halton"}, "noise must be one of"),
    ],
)
def test_unknown_guide_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        carv.TimestepGuide(None, **kwargs)


def test_unknown_loss_and_objective_options():
    with pytest.raises(ValueError, match="nonfinite"):
        carv.CARVLoss(nonfinite="ignore")
    with pytest.raises(ValueError, match="num_particles"):
        carv.CARVLoss(num_particles=0)
    with pytest.raises(ValueError, match="unknown weighting"):
        carv.SDS(sds().teacher, weighting="dreamfusion2")
    with pytest.raises(ValueError, match="exactly one"):
        TeacherObjective(sds().teacher)


def test_antithetic_needs_even_inner_draws():
    objective = sds()
    model = make_model(objective, 2, 3)
    _svi_step_raises(
        model,
        carv.TimestepGuide(model, noise="antithetic"),
        carv.CARVLoss(),
        "even number of inner draws",
    )


def test_non_reparameterized_parameter_dependent_latent_is_rejected():
    objective = sds()

    def model():
        theta = pyro.param("theta", THETA0.clone())
        with pyro.plate("views", 2, dim=-2):
            k = pyro.sample("k", pyro.distributions.Bernoulli(logits=theta[0]))
            x = theta + k.unsqueeze(-1)
            with pyro.plate("noise", 2, dim=-1):
                carv.teacher_term("sds", objective, x)

    _svi_step_raises(model, lambda: None, carv.CARVLoss(), "not reparameterizable")


def test_schedule_and_prior_validation():
    with pytest.raises(ValueError, match="alphas_cumprod"):
        DiscreteSchedule(torch.tensor([0.5, 0.9]))
    with pytest.raises(TypeError, match="alphas_cumprod"):
        DiscreteSchedule.from_diffusers(object())
    schedule = DiscreteSchedule.linear(T)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 59\]"):
        schedule.alpha(torch.tensor([60]))
    with pytest.raises(TypeError, match="integer"):
        schedule.sigma(torch.tensor([0.5]))
    prior = UniformTimesteps(T)
    with pytest.raises(ValueError, match="weight"):
        DefensiveMixture(prior, prior, 0.0)
    with pytest.raises(ValueError, match="bin_weights"):
        HistogramProposal(prior, torch.tensor([1.0, -1.0]))
