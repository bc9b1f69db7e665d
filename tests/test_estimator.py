"""End-to-end behaviour of the estimator (Estimator, TimestepGuide, CARVLoss) through Pyro's SVI.

Statistical thresholds: every z-test here is at ``Z = 5`` standard errors per coordinate. The
file runs 2 coordinates x 12 z-tested set-ups = 24 tests; a Bonferroni bound puts the chance of a
false alarm for any seed below 24 * 5.7e-7 = 1.4e-5 (the estimates are means of a few hundred
independent, light-tailed draws, so the normal approximation holds).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from pyro.infer import SVI

import carv_pyro as carv
from carv_pyro.infer.samplers import RandomSource, stratified_uniforms
from carv_pyro.layout import TermLayout
from carv_pyro.timesteps import Categorical

from .analytic import THETA0, D, expected_grad, grad_of, make_model, sds, z_scores
from .seeds import seed

Z = 5.0
N_REPEATS = 300


@pytest.mark.parametrize(
    "proposal,stratify,noise",
    [
        ("prior", None, "iid"),
        ("prior", "per_outer", "iid"),
        ("prior", "global", "iid"),
        ("weighted", None, "iid"),
        ("weighted", "per_outer", "iid"),
        ("weighted", "global", "iid"),
        ("weighted", "per_outer", "antithetic"),
        ("weighted", "per_outer", "sobol"),
        ("weighted", "global", "antithetic"),
        ("adaptive", "per_outer", "iid"),
    ],
)
def test_gradient_mean_within_standard_errors(proposal, stratify, noise):
    objective = sds("sds")
    model = make_model(objective, R=3, K=4, inner="draws")  # xi ~ N(0, 1) inside the model
    estimator = carv.Estimator(K=4, proposal=proposal, stratify=stratify, noise=noise)
    guide = estimator.guide(model, seed=seed(1))
    loss = estimator.loss()
    grads = torch.stack([grad_of(loss, model, guide) for _ in range(N_REPEATS)])
    assert (z_scores(grads, expected_grad(objective, None)).abs() <= Z).all()


def test_svi_moves_theta_to_the_data_mean():
    """SGD along the estimate: the average of the late iterates sits at the data mean.

    With step size 2 the expected map contracts by ``1 - 2c ~ 0.56`` per step, so the iterates
    fluctuate around the mean with a standard deviation of about 0.1 per coordinate; the average
    of the last 150 is within 0.05 of it by more than 5 of its standard errors.
    """
    objective = sds("sds")
    model = make_model(objective, R=2, K=4, inner="draws")
    estimator = carv.Estimator.preset("carv", K=4)
    svi = SVI(
        model, estimator.guide(model, seed=seed(2)), pyro.optim.SGD({"lr": 2.0}), estimator.loss()
    )
    start = (pyro.param("theta", THETA0.clone()).detach() - objective.teacher.mean).norm()
    late = []
    for i in range(250):
        svi.step()
        if i >= 100:
            late.append(pyro.param("theta").detach().clone())
    end = (torch.stack(late).mean(0) - objective.teacher.mean).norm()
    assert end < 0.1 * start


def test_empty_user_guide_draws_everything_from_the_prior():
    objective = sds("uniform")
    model = make_model(objective, R=2, K=2)
    loss = carv.CARVLoss()

    def empty_guide():
        pass

    grads = torch.stack([grad_of(loss, model, empty_guide) for _ in range(N_REPEATS)])
    assert (z_scores(grads, expected_grad(objective, None)).abs() <= Z).all()
    assert loss.diagnostics["sds"].max_weight == 1.0


def test_num_particles_and_differentiable_loss_agree_with_loss_and_grads():
    objective = sds("sds")
    model = make_model(objective, R=2, K=3, xi=torch.tensor([0.1, -0.4], dtype=torch.float64))
    estimator = carv.Estimator(proposal="weighted", stratify="per_outer")
    g1 = grad_of(carv.CARVLoss(num_particles=3), model, estimator.guide(seed=seed(3)))
    theta = pyro.param("theta").unconstrained()
    theta.grad = None
    carv.CARVLoss(num_particles=3).differentiable_loss(
        model, estimator.guide(seed=seed(3))
    ).backward()
    torch.testing.assert_close(theta.grad, g1)


def test_same_seed_gives_bit_identical_gradients_and_other_seeds_differ():
    objective = sds("sds")
    model = make_model(objective, R=3, K=4)
    estimator = carv.Estimator(proposal="weighted", stratify="global", noise="sobol")
    out = []
    for s in (seed(123), seed(123), seed(124)):
        pyro.clear_param_store()
        pyro.set_rng_seed(seed(0))  # the model's own prior draws (xi) use the global RNG
        out.append(grad_of(carv.CARVLoss(), model, estimator.guide(seed=s)))
    assert torch.equal(out[0], out[1])
    assert not torch.equal(out[0], out[2])


def test_guide_state_round_trip_repeats_the_draws():
    objective = sds("sds")
    model = make_model(objective, R=3, K=4, xi=torch.tensor([0.1, -0.4, 0.9], dtype=torch.float64))
    guide = carv.Estimator(proposal="weighted", stratify="per_outer").guide(seed=seed(5))
    grad_of(carv.CARVLoss(), model, guide)
    state = guide.get_state()
    a = grad_of(carv.CARVLoss(), model, guide)
    guide.set_state(state)
    b = grad_of(carv.CARVLoss(), model, guide)
    assert torch.equal(a, b)


def test_diagnostics_report_ess_and_weights():
    objective = sds("sds")
    model = make_model(objective, R=2, K=8)
    loss = carv.CARVLoss()
    grad_of(loss, model, carv.TimestepGuide(model, proposal="weighted"))
    d = loss.diagnostics["sds"]
    assert d.batch_shape == (2, 8)
    assert 1.0 <= d.ess <= 16.0
    assert d.min_weight <= d.mean_weight <= d.max_weight
    assert d.n_nonfinite == 0
    summary = loss.summary()
    assert summary["sds/K"] == 8.0 and summary["sds/ess"] == d.ess


def test_inner_plate_outside_the_outer_plate_is_named_by_draws():
    """Inner plate entered first, outer plate inside: the reserved plate says which is which."""
    objective = sds("sds")
    xi = torch.tensor([0.2, -0.6], dtype=torch.float64)

    def model():
        theta = pyro.param("theta", THETA0.clone())
        with carv.draws(3, "noise", dim=-2), pyro.plate("views", 2, dim=-1):
            x = theta + xi.reshape(1, 2, 1) * torch.ones(D, dtype=torch.float64)
            carv.teacher_term("sds", objective, x)

    loss = carv.CARVLoss()
    grad_of(loss, model, carv.TimestepGuide(model, proposal="weighted", stratify="per_outer"))
    layout = loss.last_records[0].layout
    assert (layout.inner_plate, layout.inner_dim, layout.n_outer, layout.n_inner) == (
        "noise",
        -2,
        2,
        3,
    )


def test_plain_plates_where_x_varies_along_the_innermost_have_no_inner_plate():
    objective = sds("sds")

    def model():
        theta = pyro.param("theta", THETA0.clone())
        with pyro.plate("noise", 3, dim=-2), pyro.plate("views", 2, dim=-1):
            x = theta + torch.tensor([0.2, -0.6], dtype=torch.float64).reshape(1, 2, 1)
            carv.teacher_term("sds", objective, x)

    loss = carv.CARVLoss()
    grad_of(loss, model, carv.TimestepGuide())
    layout = loss.last_records[0].layout
    assert layout.inner_plate is None and layout.n_inner == 1 and layout.n_outer == 6


def test_estimator_K_resizes_the_reserved_plate_and_refuses_a_plain_one():
    objective = sds("sds")
    loss = carv.CARVLoss()
    grad_of(loss, make_model(objective, R=2, K=3, inner="draws"), carv.Estimator(K=6).guide())
    assert loss.last_records[0].batch_shape == (2, 6)
    with pytest.raises(ValueError, match="cannot be resized.*carv_pyro.draws"):
        grad_of(loss, make_model(objective, R=2, K=3), carv.Estimator(K=6).guide())
    # a plain plate of the asked size is fine, and K=None keeps the model's size
    grad_of(loss, make_model(objective, R=2, K=6), carv.Estimator(K=6).guide())
    grad_of(loss, make_model(objective, R=2, K=3), carv.Estimator().guide())
    assert loss.last_records[0].batch_shape == (2, 3)


# -- the Estimator object -------------------------------------------------------------------


def test_presets_are_one_table_and_mean_one_thing():
    assert set(carv.PRESETS) == {"baseline", "reuse", "stratified", "carv", "adaptive", "auto"}
    base = carv.Estimator.preset("baseline")
    assert (base.K, base.proposal, base.stratify, base.noise) == (1, "prior", None, "iid")
    est = carv.Estimator.preset("carv", K=4)
    assert est.name == "carv" and est.K == 4 and est.proposal == "weighted"
    assert est.replace(noise="sobol").name == "custom"
    assert "carv" in repr(est) and "K=4" in repr(est)
    with pytest.raises(ValueError, match="K = 1"):
        carv.Estimator.preset("baseline", K=8)
    with pytest.raises(ValueError, match="unknown estimator"):
        carv.Estimator.preset("fast")
    auto = carv.Estimator.preset("auto")
    assert auto.adapt and isinstance(auto.loss().accountant, carv.Accountant)


def test_an_estimator_spec_changes_a_presets_fields_and_is_named_by_the_spec():
    est = carv.Estimator.from_spec("auto:K=4:outer=none:k_range=2-16")
    assert est == carv.Estimator.preset("auto").replace(
        K=4, outer=None, k_range=(2, 16), name="auto:K=4:outer=none:k_range=2-16"
    )
    assert carv.Estimator.from_spec("carv") is carv.PRESETS["carv"]
    cv = carv.Estimator.from_spec("carv:control_variates=true:stratify=global")
    assert cv.control_variates and cv.stratify == "global" and cv.proposal == "weighted"
    assert carv.Estimator.from_spec("baseline:outer=lattice").K == 1


@pytest.mark.parametrize(
    "spec,match",
    [
        ("fast", "unknown estimator 'fast'"),
        ("", "PRESET"),
        ("auto:K", "FIELD=VALUE"),
        ("auto:speed=2", "FIELD=VALUE with FIELD one of"),
        ("auto:K=four", "K: expected an integer, got 'four'"),
        ("auto:K=4:K=8", "sets 'K' twice"),
        ("auto:adapt=yes", "adapt: expected true or false"),
        ("auto:k_range=32", "k_range: expected LO-HI"),
        ("auto:K=64", "outside k_range"),
        ("carv:outer=grid", "outer must be one of"),
        ("baseline:K=2", "K = 1"),
    ],
)
def test_a_bad_estimator_spec_names_the_spec_and_what_is_wrong(spec, match):
    with pytest.raises(ValueError, match=match) as info:
        carv.Estimator.from_spec(spec)
    if spec:
        assert repr(spec) in str(info.value)


def test_estimator_settings_round_trip():
    est = carv.Estimator.preset("auto")
    settings = est.settings()
    settings["k_range"] = tuple(settings["k_range"])
    assert carv.Estimator(**settings) == est


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(K=0), "K must be a positive integer"),
        (dict(K=True), "K must be a positive integer"),
        (dict(proposal="fancy"), "proposal must be one of"),
        (dict(stratify="rows"), "stratify must be one of"),
        (dict(noise="pink"), "noise must be one of"),
        (dict(K=3, noise="antithetic"), "even K"),
        (dict(adapt=True), "needs a starting K"),
        (dict(K=4, adapt=True, k_range=(8, 16)), "outside k_range"),
        (dict(k_range=(4, 2)), "k_range"),
    ],
)
def test_estimator_validates_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        carv.Estimator(**kwargs)


# -- stratification invariants -------------------------------------------------------------


def _layout(R: int, K: int) -> TermLayout:
    from pyro.poutine.indep_messenger import CondIndepStackFrame

    frames = (CondIndepStackFrame("views", -2, R, 0), CondIndepStackFrame("noise", -1, K, 0))
    return TermLayout.from_frames("t", frames, "noise", torch.Size([R, 1]))


@given(
    R=st.integers(1, 5),
    K=st.integers(1, 6),
    stratify=st.sampled_from(["per_outer", "global"]),
    s=st.integers(0, 10_000),
)
def test_one_draw_per_stratum(R, K, stratify, s):
    layout = _layout(R, K)
    u = stratified_uniforms(layout, stratify, RandomSource(seed=s), "cpu")
    assert u.shape == (R, K)
    assert ((u >= 0) & (u < 1)).all()
    if stratify == "per_outer":
        strata = (u * K).floor().long().sort(dim=-1).values
        assert torch.equal(strata, torch.arange(K).expand(R, K))
    else:
        strata = (u * R * K).floor().long().flatten().sort().values
        assert torch.equal(strata, torch.arange(R * K))


@given(
    probs=st.lists(st.floats(0.0, 1.0), min_size=2, max_size=30).filter(lambda p: sum(p) > 0.01),
    u=st.lists(st.floats(0.0, 1.0, exclude_max=True), min_size=1, max_size=20),
)
def test_icdf_lands_on_the_support_and_inverts_the_cdf(probs, u):
    q = Categorical(torch.tensor(probs, dtype=torch.float64))
    u = torch.tensor(u, dtype=torch.float64)
    t = q.icdf(u)
    assert (q.probs()[t] > 0).all()
    cdf = q.cdf(t)
    below = torch.where(t > 0, q.cdf((t - 1).clamp_min(0)), torch.zeros_like(cdf))
    assert ((below <= u + 1e-12) & (u < cdf + 1e-12)).all()


def test_svi_with_class_label_conditioning_on_mixture_teacher():
    """A conditional analytic teacher (mixture, CFG) runs through SVI with cond broadcast."""
    from carv_pyro.teachers import GaussianMixtureTeacher

    from .analytic import schedule

    means = torch.tensor([[1.0, 0.0], [-1.0, 0.5]], dtype=torch.float64)
    teacher = GaussianMixtureTeacher(
        means,
        torch.tensor([0.3, 0.4], dtype=torch.float64),
        torch.tensor([0.5, 0.5], dtype=torch.float64),
        schedule(),
    )
    final = {}
    for scale in (1.0, 3.0):
        pyro.clear_param_store()
        objective = carv.SDS(teacher, guidance_scale=scale)

        def model(objective=objective):
            theta = pyro.param("theta", torch.zeros(2, dtype=torch.float64))
            with pyro.plate("views", 2, dim=-2), carv.draws(8, "noise", dim=-1):
                carv.teacher_term("sds", objective, theta.expand(2, 1, 2), cond=0)

        guide = carv.Estimator.preset("carv").guide(model, seed=seed(7))
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), loss=carv.CARVLoss())
        late = []
        for i in range(300):
            svi.step()
            if i >= 200:
                late.append(pyro.param("theta").detach().clone())
        final[scale] = torch.stack(late).mean(0)
    # without guidance SDS seeks the conditioned component's mode (its mean)...
    assert (final[1.0] - means[0]).norm() < 0.2
    # ...and guidance pushes further away from the other component
    assert final[3.0][0] > final[1.0][0] + 0.2


def test_score_difference_descends_towards_the_real_distribution():
    """VSD/DMD sign: SGD along w (eps_real - eps_fake) moves samples from fake to real."""
    from carv_pyro.teachers import GaussianTeacher

    from .analytic import schedule

    real = GaussianTeacher(torch.tensor([0.0, 0.0], dtype=torch.float64), 1.0, schedule())
    fake = GaussianTeacher(torch.tensor([1.0, 1.0], dtype=torch.float64), 1.0, schedule())
    objective = carv.ScoreDifference(real, fake, weighting="uniform")

    def model():
        theta = pyro.param("theta", torch.ones(2, dtype=torch.float64))
        with pyro.plate("views", 1, dim=-2), carv.draws(16, dim=-1):
            carv.teacher_term("dmd", objective, theta.expand(1, 1, 2))

    theta = pyro.param("theta", torch.ones(2, dtype=torch.float64)).unconstrained()
    carv.CARVLoss().loss_and_grads(model, carv.Estimator(stratify="per_outer").guide(seed=seed(8)))
    # the gradient points from the real mean (0) towards the fake one (1): SGD descends to 0
    assert (theta.grad > 0).all()


def test_prior_site_with_a_parameter_dependent_reparameterized_prior_gets_its_path_gradient():
    """xi ~ N(mu, 1) with mu a parameter, drawn from the prior: d/dmu E[f] flows through rsample."""
    objective = sds("uniform")
    mu0 = torch.tensor(0.3, dtype=torch.float64)

    def model():
        theta = pyro.param("theta", THETA0.clone())
        mu = pyro.param("mu", mu0.clone())
        with pyro.plate("views", 2, dim=-2):
            xi = pyro.sample("xi", dist.Normal(mu, 1.0))
            x = theta + xi.unsqueeze(-1) * torch.tensor([0.3, 0.1], dtype=torch.float64)
            with carv.draws(4, dim=-1):
                carv.teacher_term("sds", objective, x)

    from .analytic import DIRECTION, sds_constant

    loss = carv.CARVLoss()
    guide = carv.Estimator().guide(seed=seed(9))
    grads = []
    for _ in range(N_REPEATS):
        mu = pyro.param("mu", mu0.clone()).unconstrained()
        mu.grad = None
        loss.loss_and_grads(model, guide)
        grads.append(mu.grad.detach().clone().reshape(1))
    want = sds_constant(objective) * (THETA0 + mu0 * DIRECTION - objective.teacher.mean)
    want = (want * DIRECTION).sum().reshape(1)
    assert (z_scores(torch.stack(grads), want).abs() <= Z).all()
