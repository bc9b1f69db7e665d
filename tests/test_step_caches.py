"""The per-step work kept across steps (issue 18) is invalidated whenever it must be.

A training step reuses what depends only on its objective, shapes and conditioning: the timestep
and noise priors at the draws' batch shape, the checked and broadcast conditioning, the
schedule's tables per device and dtype, a named weighting's table. Each cache here is checked
against what it must notice (a new shape, dtype, device, prior, schedule, teacher, conditioning
tensor, an in-place change), and a warm step is checked to give bit for bit the gradient of a
cold one. The ``meta`` device stands in for a second device: it has no data, but every cache key
sees its device.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

import carv_pyro as carv
from carv_pyro.infer.primitives import _broadcast_shape, _term_cache
from carv_pyro.objectives import _nonfinite_rows
from carv_pyro.schedules import DiscreteSchedule
from carv_pyro.teachers import GaussianTeacher
from carv_pyro.teachers.gaussian import GaussianMixtureTeacher
from carv_pyro.timesteps import UniformTimesteps

EVENT = (1, 2, 2)


def _mixture() -> GaussianMixtureTeacher:
    means = torch.stack([torch.full(EVENT, -1.0), torch.full(EVENT, 1.0)])
    return GaussianMixtureTeacher(means, 0.5, torch.ones(2), DiscreteSchedule.linear(100))


def _gaussian() -> GaussianTeacher:
    return GaussianTeacher(torch.zeros(EVENT), 1.0, DiscreteSchedule.linear(100))


# -- conditioning ----------------------------------------------------------------------------


def test_cond_cache_hits_for_the_same_tensor_and_shape():
    objective = carv.SDS(_mixture())  # the cache holds its objective weakly
    cache = _term_cache(objective)
    label = torch.tensor(1)
    first = cache.cond(label, torch.Size([2, 3]), torch.device("cpu"))
    assert cache.cond(label, torch.Size([2, 3]), torch.device("cpu")) is first
    assert first.shape == (6,) and (first == 1).all()


def test_cond_cache_rebuilds_on_shape_device_and_new_tensor():
    objective = carv.SDS(_mixture())  # the cache holds its objective weakly
    cache = _term_cache(objective)
    label = torch.tensor(1)
    cpu = torch.device("cpu")
    first = cache.cond(label, torch.Size([2, 3]), cpu)
    other_shape = cache.cond(label, torch.Size([4, 1]), cpu)
    assert other_shape.shape == (4,)
    meta = cache.cond(label, torch.Size([2, 3]), torch.device("meta"))
    assert meta.device.type == "meta"
    fresh = cache.cond(torch.tensor(0), torch.Size([2, 3]), cpu)
    assert (fresh == 0).all() and (first == 1).all()


def test_cond_cache_sees_in_place_changes_of_the_label():
    objective = carv.SDS(_mixture())
    cache = _term_cache(objective)
    label = torch.tensor(1)
    cache.cond(label, torch.Size([2]), torch.device("cpu"))
    label.fill_(7)  # out of range: the cached check must not stand for it
    with pytest.raises(ValueError, match="class labels in \\[0, 2\\]"):
        cache.cond(label, torch.Size([2]), torch.device("cpu"))


def test_cond_cache_sees_writes_into_its_own_result():
    objective = carv.SDS(_mixture())  # the cache holds its objective weakly
    cache = _term_cache(objective)
    labels = torch.tensor([0, 1])
    first = cache.cond(labels, torch.Size([3, 2]), torch.device("cpu"))
    first.add_(1)  # someone wrote into the cached tensor (a copy: labels are untouched)
    again = cache.cond(labels, torch.Size([3, 2]), torch.device("cpu"))
    assert again is not first and again.tolist() == [0, 1] * 3


def test_cond_cache_rebuilds_for_another_teacher():
    objective = carv.SDS(_mixture())
    cache = _term_cache(objective)
    cache.cond(2, torch.Size([2]), torch.device("cpu"))  # 2 = the whole mixture: valid here
    objective.teacher = GaussianMixtureTeacher(
        torch.zeros(1, *EVENT), 0.5, torch.ones(1), DiscreteSchedule.linear(100)
    )
    with pytest.raises(ValueError, match="class labels in \\[0, 1\\]"):
        cache.cond(2, torch.Size([2]), torch.device("cpu"))


def test_cond_cache_keeps_type_checks_for_bool_and_float():
    objective = carv.SDS(_mixture())  # the cache holds its objective weakly
    cache = _term_cache(objective)
    cache.cond(1, torch.Size([2]), torch.device("cpu"))
    with pytest.raises(TypeError, match="bool"):
        cache.cond(True, torch.Size([2]), torch.device("cpu"))  # True == 1, and hashes so
    with pytest.raises(TypeError, match="integer class labels"):
        cache.cond(1.0, torch.Size([2]), torch.device("cpu"))


def test_cond_needing_grad_is_never_cached():
    # a learned conditioning tensor has a new graph every step
    teacher = _mixture()
    objective = carv.SDS(teacher)
    cache = _term_cache(objective)
    c = torch.ones((), requires_grad=True)
    teacher.cond_event_shape = torch.Size([])
    with pytest.raises(TypeError, match="integer class labels"):
        cache.cond(c, torch.Size([2]), torch.device("cpu"))
    assert not cache._conds


@pytest.mark.parametrize(
    "a, b", [((2, 3), ()), ((2, 3), (3,)), ((2, 1), (1, 4)), ((0,), (1,)), ((2, 3), (2,))]
)
def test_broadcast_shape_is_torchs(a, b):
    try:
        want = tuple(torch.broadcast_shapes(a, b))
    except RuntimeError:
        want = None
    assert _broadcast_shape(a, b) == want


# -- the site priors -------------------------------------------------------------------------


def test_priors_cache_keys_on_shape_dtype_device_and_prior():
    objective = carv.SDS(_gaussian())
    cache = _term_cache(objective)
    cpu = torch.device("cpu")
    t1, e1 = cache.priors(torch.Size([2, 3]), torch.float32, cpu)
    assert cache.priors(torch.Size([2, 3]), torch.float32, cpu)[0] is t1
    assert t1.batch_shape == (2, 3) and e1.batch_shape == (2, 3)
    assert e1.event_shape == EVENT and e1.base_dist.loc.dtype == torch.float32
    t2, _ = cache.priors(torch.Size([4, 1]), torch.float32, cpu)
    assert t2.batch_shape == (4, 1)
    _, e3 = cache.priors(torch.Size([2, 3]), torch.float64, cpu)
    assert e3.base_dist.loc.dtype == torch.float64
    _, e4 = cache.priors(torch.Size([2, 3]), torch.float32, torch.device("meta"))
    assert e4.base_dist.loc.device.type == "meta"
    objective.prior = UniformTimesteps(100, (0.5, 0.9))
    t5, _ = cache.priors(torch.Size([2, 3]), torch.float32, cpu)
    assert t5 is not t1
    assert torch.equal(t5.probs[0, 0], objective.prior.probs())


def test_priors_cache_sees_in_place_changes_of_the_prior():
    objective = carv.SDS(_gaussian())
    cache = _term_cache(objective)
    cpu = torch.device("cpu")
    t1, _ = cache.priors(torch.Size([2]), torch.float32, cpu)
    objective.prior._probs.zero_()[10] = 1.0  # the prior's probabilities changed in place
    t2, _ = cache.priors(torch.Size([2]), torch.float32, cpu)
    assert t2 is not t1 and t2.probs[0, 10] == 1.0


def test_caches_die_with_their_objective():
    import gc
    import weakref

    objective = carv.SDS(_gaussian())
    cache = _term_cache(objective)
    cache.priors(torch.Size([2]), torch.float32, torch.device("cpu"))
    ref = weakref.ref(cache)
    del objective, cache
    gc.collect()
    assert ref() is None  # the weak map dropped its entry with the objective


# -- schedule and weighting tables -----------------------------------------------------------


def test_schedule_lookup_per_dtype_and_device():
    schedule = DiscreteSchedule.linear(100)
    t = torch.tensor([0, 5, 99])
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        got = schedule.lookup("sigma", t, dtype)
        assert got.dtype == dtype
        assert torch.equal(got, schedule._sigma[t].to(dtype))
        alpha = schedule.alpha(t, like=torch.empty((), dtype=dtype))
        assert torch.equal(alpha, schedule._alpha[t].to(dtype))
    meta = schedule.lookup("alpha", t.to("meta"), torch.float32)
    assert meta.device.type == "meta"


@pytest.mark.parametrize("bad", [[-1, 3], [0, 100]])
def test_check_timesteps_refuses_out_of_range(bad):
    with pytest.raises(ValueError, match="t must lie in \\[0, 99\\]"):
        DiscreteSchedule.linear(100).check_timesteps(torch.tensor(bad))


def test_check_timesteps_refuses_floats():
    with pytest.raises(TypeError, match="integer timesteps"):
        DiscreteSchedule.linear(100).check_timesteps(torch.tensor([1.0]))


@pytest.mark.parametrize("weighting", ["sds", "uniform", "fantasia3d"])
def test_weight_table_is_the_weighting_bit_for_bit(weighting):
    objective = carv.SDS(_gaussian(), weighting=weighting)
    t = torch.arange(100)
    assert torch.equal(objective._weight_of(t), objective.weight(t))


def test_weight_table_rebuilds_for_a_new_schedule():
    objective = carv.SDS(_gaussian())
    t = torch.tensor([10, 50])
    before = objective._weight_of(t)
    objective.schedule = DiscreteSchedule.linear(100, beta_end=0.05)
    after = objective._weight_of(t)
    assert not torch.equal(before, after)
    assert torch.equal(after, objective.weight(t))


def test_custom_weighting_is_called_every_time():
    calls = []

    def w(schedule, t):
        calls.append(len(t))
        return torch.ones(t.shape, dtype=torch.float64)

    objective = carv.TeacherObjective(
        _gaussian(), residual=carv.objectives.eps_residual, weighting=w
    )
    calls.clear()
    objective._weight_of(torch.tensor([1, 2]))
    objective._weight_of(torch.tensor([1, 2]))
    assert calls == [2, 2]


def test_nonfinite_rows():
    h = torch.zeros(5, 1, 2, 2)
    h[1, 0, 0, 1] = float("nan")
    h[2, 0, 1, 0] = float("inf")
    h[3, 0, 0, 0] = -float("inf")
    h[4] = 3e38  # finite, however large
    assert _nonfinite_rows(h).tolist() == [False, True, True, True, False]
    assert _nonfinite_rows(torch.zeros(3, 0)).tolist() == [False] * 3


# -- whole steps -----------------------------------------------------------------------------


def _model(objective, R, K, label):
    def model():
        theta = pyro.param("theta", torch.zeros(EVENT))
        with pyro.plate("views", R, dim=-2):
            xi = pyro.sample("xi", dist.Normal(0.0, 1.0))
            x = theta + xi[..., None, None, None]
            with carv.draws(K, dim=-1):
                carv.teacher_term("sds", objective, x, cond=label)

    return model


def _grad(loss, model, guide) -> torch.Tensor:
    pyro.get_param_store().clear()
    pyro.set_rng_seed(3)
    guide.set_state({"source": {}})  # the guide's seeded generators start afresh
    loss.loss_and_grads(model, guide)
    return pyro.param("theta").unconstrained().grad.clone()


@pytest.mark.parametrize("preset", ["reuse", "carv"])
def test_warm_steps_match_a_cold_step_across_models(preset):
    # one objective, loss and guide serve models of other shapes in turn: every step must be
    # the one a fresh objective (cold caches) gives, bit for bit
    teacher = _mixture()
    warm = carv.SDS(teacher)
    label = torch.tensor(1)
    estimator = carv.Estimator.preset(preset, K=None)
    loss = estimator.loss()
    shapes = [(2, 4), (3, 2), (2, 4), (1, 1), (3, 2)]
    for R, K in shapes:
        guide = estimator.guide(seed=5)
        got = _grad(loss, _model(warm, R, K, label), guide)
        cold = carv.SDS(teacher)
        guide = estimator.guide(seed=5)
        want = _grad(loss, _model(cold, R, K, label), guide)
        assert torch.equal(got, want), (R, K)
        trace = loss.last_particle.records[0]
        assert tuple(trace.batch_shape) == (R, K)


def test_plain_path_matches_the_weighted_path_bit_for_bit():
    # weights of exactly one skip the multiplications; a mask of True takes the general path
    objective = carv.SDS(_mixture())
    model = _model(objective, 2, 4, 1)
    estimator = carv.Estimator.preset("reuse", K=None)
    loss = estimator.loss()
    plain = _grad(loss, model, estimator.guide(seed=7))
    masked = _grad(loss, poutine.mask(model, mask=torch.tensor(True)), estimator.guide(seed=7))
    assert torch.equal(plain, masked)


def test_cond_changed_between_steps_reaches_the_teacher():
    # the conditioning tensor is reused and changed in place between steps: the step must see
    # the new label (the two components' denoisers differ)
    objective = carv.SDS(_mixture())
    label = torch.tensor(0)
    model = _model(objective, 2, 2, label)
    estimator = carv.Estimator.preset("reuse", K=None)
    loss = estimator.loss()
    g0 = _grad(loss, model, estimator.guide(seed=1))
    label.fill_(1)
    g1 = _grad(loss, model, estimator.guide(seed=1))
    want = _grad(loss, _model(carv.SDS(objective.teacher), 2, 2, 1), estimator.guide(seed=1))
    assert not torch.equal(g0, g1) and torch.equal(g1, want)
