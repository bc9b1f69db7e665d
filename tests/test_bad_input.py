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


# -- issue 14: every bad input is refused before any work, naming the argument ----------------


@pytest.mark.parametrize("scale", [float("inf"), float("nan"), 0.0, -1.0, True, "7.5", None])
def test_sds_guidance_scale_must_be_finite_and_positive(scale):
    with pytest.raises(ValueError, match=r"guidance_scale must be a positive finite number"):
        carv.SDS(sds().teacher, guidance_scale=scale)


@pytest.mark.parametrize(
    "weighting,exc,match",
    [
        (lambda t: t, TypeError, r"weighting '<lambda>' failed when called as weighting\("),
        (lambda schedule, t: 1.0, TypeError, r"returned a torch.float32 tensor of shape \(\)"),
        (lambda schedule, t: "w", TypeError, "returned str"),
        (lambda schedule, t: t > 3, TypeError, r"torch.bool tensor"),
        (lambda schedule, t: torch.ones(len(t) + 1), TypeError, r"shape \(59,\) for t of"),
        (lambda schedule, t: -torch.ones(len(t)), ValueError, "finite and non-negative"),
        (lambda schedule, t: 1.0 / (t - 30), ValueError, r"finite and non-negative"),
    ],
)
def test_weighting_callable_is_called_once_at_construction(weighting, exc, match):
    with pytest.raises(exc, match=match):
        carv.SDS(sds().teacher, weighting=weighting)


def test_good_weighting_callable_and_other_objective_arguments():
    objective = carv.SDS(sds().teacher, weighting=lambda schedule, t: torch.ones(t.shape))
    assert torch.equal(objective.weight(torch.arange(3)), torch.ones(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="residual must be a callable"):
        TeacherObjective(sds().teacher, residual="eps")
    with pytest.raises(TypeError, match="prior must be an AbstractTimestepDistribution"):
        carv.SDS(sds().teacher, prior=[0.5, 0.5])
    with pytest.raises(TypeError, match="fake must be an AbstractTeacher"):
        carv.ScoreDifference(sds().teacher, "fake")


def test_integer_x_is_refused_naming_x():
    objective = sds()

    def model():
        pyro.param("theta", THETA0.clone())
        with pyro.plate("views", 2, dim=-2), pyro.plate("noise", 3, dim=-1):
            carv.teacher_term("sds", objective, torch.ones(2, 1, D, dtype=torch.long))

    _svi_step_raises(model, lambda: None, carv.CARVLoss(), "x must be a floating-point", TypeError)


def _plates_model(R, K, subsample_size=None, draws_plate=False):
    objective = sds()

    def model():
        theta = pyro.param("theta", THETA0.clone())
        with pyro.plate("upstream", R, dim=-2, subsample_size=subsample_size) as rows:
            inner = carv.draws(K, dim=-1) if draws_plate else pyro.plate("noise", K, dim=-1)
            with inner:
                carv.teacher_term("sds", objective, theta.expand(len(rows), 1, D))

    return model


@pytest.mark.parametrize(
    "R,K,sub,draws_plate,match",
    [
        (0, 3, None, False, r"plate 'upstream' has size 0 \(pyro.plate\('upstream', 0\)\)"),
        (2, 0, None, False, r"plate 'noise' has size 0"),
        (4, 3, 0, False, r"plate 'upstream' has subsample_size 0 \(of size 4\)"),
        (2, 0, None, True, r"draws\('draws'\) size must be a positive integer, got 0"),
    ],
)
def test_a_plate_of_size_zero_is_named_before_any_work(R, K, sub, draws_plate, match):
    """R = 0 upstream samples or K = 0 draws: a ValueError naming the plate (Pyro's own
    ZeroDivisionError names none), for every guide, before the teacher runs."""
    model = _plates_model(R, K, sub, draws_plate)
    _svi_step_raises(model, carv.TimestepGuide(model), carv.CARVLoss(), match)
    pyro.clear_param_store()
    _svi_step_raises(model, lambda: None, carv.CARVLoss(), match)
    pyro.clear_param_store()
    estimator = carv.Estimator.preset("carv", K=4 if draws_plate else None)
    _svi_step_raises(model, estimator.guide(model), estimator.loss(), match)


def test_an_empty_plate_in_an_upstream_guide_or_an_empty_x_is_named():
    model = _plates_model(2, 3)

    def upstream():
        with pyro.plate("cameras", 0):
            pass

    guide = carv.TimestepGuide(model, upstream=upstream)
    _svi_step_raises(model, guide, carv.CARVLoss(), r"plate 'cameras' has size 0")
    loss = carv.TeacherLoss(sds(), estimator=carv.Estimator.preset("carv", K=2))
    with pytest.raises(ValueError, match=r"x must have shape \(R, 2\) with R >= 1 rows.*\(0, 2\)"):
        loss(torch.zeros(0, D, requires_grad=True))


@pytest.fixture(scope="module")
def digits_teacher():
    from carv_pyro.teachers.embedded import load_default

    return load_default()


def _cond_step_raises(teacher, cond, exc, match, monkeypatch):
    """One SVI step with ``cond`` raises before the teacher runs and before ``x`` changes."""
    calls = []
    real = teacher._predict_eps
    monkeypatch.setattr(teacher, "_predict_eps", lambda *a: calls.append(1) or real(*a))
    objective = carv.SDS(teacher, guidance_scale=3.0)
    event = tuple(teacher.event_shape)

    def model():
        x = pyro.param("theta", torch.zeros((1, 1) + event))
        with pyro.plate("views", 1, dim=-2), pyro.plate("noise", 2, dim=-1):
            carv.teacher_term("sds", objective, x, cond=cond)

    svi = SVI(model, lambda: None, pyro.optim.SGD({"lr": 1.0}), loss=carv.CARVLoss())
    with pytest.raises(exc, match=match):
        svi.step()
    assert torch.equal(pyro.param("theta").detach(), torch.zeros((1, 1) + event))
    assert not calls, "the teacher ran before the bad cond was noticed"


@pytest.mark.parametrize("cond", ["3", "three", ["3", "4"]])
def test_string_cond_for_the_digits_teacher_says_what_it_takes(digits_teacher, cond, monkeypatch):
    _cond_step_raises(
        digits_teacher,
        cond,
        TypeError,
        r"cond must not be a string .*integer class labels in \[0, 10\].*default_prompt_cond",
        monkeypatch,
    )


@pytest.mark.parametrize("cond", [True, False, torch.tensor(True)])
def test_bool_cond_is_refused(digits_teacher, cond, monkeypatch):
    _cond_step_raises(digits_teacher, cond, TypeError, r"cond must not be a bool", monkeypatch)


@pytest.mark.parametrize("cond,given", [(12, "got 12"), (-1, "got -1"), ([3, 12], r"got \[12\]")])
def test_bad_digit_label_names_the_label_given(digits_teacher, cond, given, monkeypatch):
    # (the teacher itself would report "range [10, 12]": guidance adds the null class 10)
    _cond_step_raises(
        digits_teacher,
        torch.tensor(cond).reshape(1, -1) if isinstance(cond, list) else cond,
        ValueError,
        r"cond must hold class labels in \[0, 10\] for DiffusersTeacher, " + given,
        monkeypatch,
    )


def test_float_labels_are_refused(digits_teacher, monkeypatch):
    _cond_step_raises(digits_teacher, 3.0, TypeError, "integer class labels", monkeypatch)


class _LetterMixture(carv.teachers.GaussianMixtureTeacher):
    """A mixture teacher that reads prompts: the optional ``parse_prompt`` hook."""

    def parse_prompt(self, prompt: str) -> int:
        if prompt not in ("a", "b"):
            raise ValueError(f"unknown prompt {prompt!r}: expected 'a' or 'b'")
        return "ab".index(prompt)


def _mixture(cls=carv.teachers.GaussianMixtureTeacher):
    from .analytic import schedule

    means = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    return cls(means, 0.5, torch.tensor([0.5, 0.5]), schedule())


def test_a_teacher_with_parse_prompt_reads_string_cond(monkeypatch):
    teacher = _mixture(_LetterMixture)
    objective = carv.SDS(teacher)
    got = {}

    def model():
        theta = pyro.param("theta", THETA0.clone())
        with pyro.plate("views", 1, dim=-2), pyro.plate("noise", 2, dim=-1):
            carv.teacher_term("sds", objective, theta.expand(1, 1, D), cond="b")

    real = teacher._predict_eps

    def spy(x_t, t, c):
        got["c"] = c
        return real(x_t, t, c)

    monkeypatch.setattr(teacher, "_predict_eps", spy)
    carv.CARVLoss().loss_and_grads(model, lambda: None)
    assert got["c"].tolist() == [1, 1]
    pyro.clear_param_store()
    _cond_step_raises(
        teacher, "c", ValueError, r"cond 'c' is not a prompt.*expected 'a' or 'b'", monkeypatch
    )


def test_mixture_labels_range_includes_the_whole_mixture_index(monkeypatch):
    # M = 2 components: labels 0, 1 and 2 (the whole mixture) are valid, 3 is not
    _cond_step_raises(
        _mixture(),
        3,
        ValueError,
        r"labels in \[0, 2\] for GaussianMixtureTeacher, got 3",
        monkeypatch,
    )
    pyro.clear_param_store()
    _cond_step_raises(_mixture(), "3", TypeError, "no parse_prompt", monkeypatch)


def test_the_teacher_itself_refuses_text_it_cannot_read(digits_teacher):
    """The refusal lives in the teacher's encode_cond, so predict_eps says the same."""
    x = torch.zeros((2,) + tuple(digits_teacher.event_shape))
    with pytest.raises(TypeError, match=r"cond must not be a string \(got '3'\).*\[0, 10\]"):
        digits_teacher.predict_eps(x, 5, cond="3")
    assert digits_teacher.describe_cond() == (
        "DiffusersTeacher takes integer class labels in [0, 10] (an int or a long tensor)"
    )
    assert _mixture().label_range() == (0, 2) and _mixture(_LetterMixture).encode_cond("b") == 1


class _WordTeacher(carv.teachers.GaussianMixtureTeacher):
    """Reads text by overriding encode_cond (no parse_prompt, no text encoder)."""

    def encode_cond(self, cond):
        if cond in ("left", "right"):
            return torch.tensor(("left", "right").index(cond))
        return super().encode_cond(cond)


def test_a_teacher_overriding_encode_cond_reads_its_own_prompts(monkeypatch):
    teacher = _mixture(_WordTeacher)
    seen = []
    real = teacher._predict_eps
    monkeypatch.setattr(teacher, "_predict_eps", lambda x, t, c: seen.append(c) or real(x, t, c))

    def model():
        theta = pyro.param("theta", THETA0.clone())
        with pyro.plate("views", 1, dim=-2), pyro.plate("noise", 2, dim=-1):
            carv.teacher_term("sds", carv.SDS(teacher), theta.expand(1, 1, D), cond="right")

    carv.CARVLoss().loss_and_grads(model, lambda: None)
    assert seen[0].tolist() == [1, 1]
    pyro.clear_param_store()
    _cond_step_raises(teacher, "up", TypeError, "cond must not be a string", monkeypatch)


def test_cond_for_an_unconditional_teacher_names_cond():
    objective = sds()

    def model():
        theta = pyro.param("theta", THETA0.clone())
        with pyro.plate("views", 2, dim=-2), pyro.plate("noise", 3, dim=-1):
            carv.teacher_term("sds", objective, theta.expand(2, 1, D), cond=3)

    _svi_step_raises(model, lambda: None, carv.CARVLoss(), r"cond was given \(3\).*unconditional")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a CPU-only build")
def test_bench_device_cuda_on_a_cpu_build(capsys, monkeypatch):
    import argparse

    from carv_pyro import bench, cli

    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the device was checked")

    for name in list(bench.PIPELINES):
        monkeypatch.setitem(bench.PIPELINES, name, forbidden)
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "--quick", "--device", "cuda"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--device cuda: no CUDA device here" in err and "Traceback" not in err
    args = argparse.Namespace(
        pipeline="text-to-3d", quick=True, json=None, plot=None, device="cuda", seed=0, repeats=None
    )
    with pytest.raises(ValueError, match=r"device='cuda'.*no CUDA device"):
        bench.main(args)
    with pytest.raises(ValueError, match="device must be"):
        bench.main(argparse.Namespace(**{**vars(args), "device": "tpu"}))


def test_issue_14_inputs_done_elsewhere_stay_refused():
    from carv_pyro.accounting import Accountant
    from carv_pyro.distributed import DistributedCARVLoss

    with pytest.raises(ValueError, match="K must be a positive integer, got 0"):
        carv.Estimator(K=0)
    with pytest.raises(ValueError, match="costs"):
        Accountant(costs=(1,))
    with pytest.raises(ValueError, match="min_measurements"):
        Accountant(min_measurements=-3)
    with pytest.raises(TypeError, match="accountant must be"):
        carv.CARVLoss(accountant="yes")
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        carv.TimestepGuide(None, generator=1234)
    with pytest.raises(TypeError, match="outer_plate"):
        DistributedCARVLoss(carv.CARVLoss(), outer_plate=3)
