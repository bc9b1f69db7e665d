"""The teacher's speed options keep the estimator's guarantees (issue 18), checked on the CPU.

- ``compile=`` is validated, and a compiled teacher gives eager's residuals (a cheap
  ``torch.compile`` backend stands in for inductor here: it traces the same graph);
- the estimator stays exactly unbiased through a compiled teacher (exact quadrature over the
  timestep uniforms, as ``test_unbiased_exact``);
- ``CARVLoss(checks=...)``: without host checks a NaN teacher output is still refused, at the
  next step; the loss value left on the device (`DeviceLoss`) behaves as its float.

The GPU side (no host synchronisation in a warm step) is in ``tests/test_gpu.py``.
"""

from __future__ import annotations

import math

import pyro
import pytest
import torch

import carv_pyro as carv
from carv_pyro import _checks
from carv_pyro.infer.loss import DeviceLoss
from carv_pyro.proposals import WeightedProposal
from carv_pyro.teachers.embedded import load_default

from .analytic import THETA0, expected_grad, sds
from .test_unbiased_exact import exact_expectation

#: traces the model with dynamo and AOT autograd, without inductor's (slow on CPU) code generation
CHEAP = {"backend": "aot_eager"}


@pytest.mark.parametrize(
    "bad, match",
    [
        ("yes", "compile must be True, False or a dict"),
        (1, "compile must be True, False or a dict"),
        ({"mod": "max-autotune"}, r"compile has keys torch.compile does not take: \['mod'\]"),
    ],
)
def test_compile_argument_is_validated(bad, match):
    with pytest.raises(ValueError, match=match):
        load_default(compile=bad)


def test_compile_options_are_read():
    assert load_default().compile_kwargs is None
    assert load_default(compile=True).compile_kwargs == {}
    assert not load_default(compile={"mode": "max-autotune-no-cudagraphs"}).uses_cuda_graphs
    assert load_default(compile={"mode": "reduce-overhead"}).uses_cuda_graphs


def test_compiled_teacher_gives_eager_residuals():
    eager = load_default()
    compiled = load_default(compile=CHEAP)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1, 16, 16, generator=g)
    eps = torch.randn(6, 1, 16, 16, generator=g)
    t = torch.tensor([5, 100, 300, 500, 800, 990])
    cond = torch.tensor([3, 1, 4, 1, 5, 9])
    want = carv.SDS(eager, guidance_scale=2.0).evaluate(x, t, eps, cond)
    got = carv.SDS(compiled, guidance_scale=2.0).evaluate(x, t, eps, cond)
    torch.testing.assert_close(got.residual, want.residual, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.surrogate, want.surrogate, rtol=1e-5, atol=1e-5)
    # the network that ran is wrapped; the user's UNet is not compiled in place
    module, wrapper = compiled._compiled
    assert module is compiled.unet and wrapper is not compiled.unet
    assert getattr(compiled.unet, "_compiled_call_impl", None) is None


def test_compiled_teacher_in_a_carv_step_matches_eager():
    grads = []
    for option in (False, CHEAP):
        objective = carv.SDS(load_default(compile=option), guidance_scale=2.0)

        def model(objective=objective):
            x = pyro.param("x", torch.zeros(2, 1, 1, 16, 16))
            with pyro.plate("views", 2, dim=-2), carv.draws(3, dim=-1):
                carv.teacher_term("sds", objective, x, cond=3)

        pyro.clear_param_store()
        estimator = carv.Estimator.preset("carv", K=3)
        estimator.loss().loss_and_grads(model, estimator.guide(model, seed=4))
        grads.append(pyro.param("x").unconstrained().grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stratify", [None, "per_outer", "global"])
def test_estimator_is_exactly_unbiased_through_a_compiled_teacher(stratify):
    objective = sds("sds")
    teacher = objective.teacher
    teacher._predict_eps = torch.compile(teacher._predict_eps, **CHEAP)
    xi = torch.tensor([0.5, -1.0], dtype=torch.float64)
    proposal = WeightedProposal(objective.prior, objective.schedule, objective.weight)
    got = exact_expectation(objective, proposal, stratify, 2, 3, xi)
    torch.testing.assert_close(got, expected_grad(objective, xi), rtol=1e-9, atol=1e-12)


# -- checks that read values back from the device ---------------------------------------------


def test_checks_argument_is_validated():
    with pytest.raises(ValueError, match="checks must be True, False or None"):
        carv.CARVLoss(checks="yes")
    assert _checks.host_checks(torch.device("cpu"))
    assert not _checks.host_checks(torch.device("meta"))
    with _checks.device_checks(True):
        assert _checks.host_checks(torch.device("meta"))
    with _checks.device_checks(False):
        assert not _checks.host_checks(torch.device("cpu"))


def _nan_model(objective, nan: bool):
    from .analytic import DIRECTION

    def model():
        theta = pyro.param("theta", THETA0.clone())
        with pyro.plate("views", 3, dim=-2):
            z = torch.tensor([0.0, float("nan") if nan else 0.5, 0.0], dtype=torch.float64)
            x = theta + z.reshape(3, 1, 1) * DIRECTION
            with carv.draws(2, "noise", dim=-1):
                carv.teacher_term("sds", objective, x)

    return model


def test_nan_is_refused_at_the_next_step_without_host_checks():
    objective = sds("sds")
    pyro.clear_param_store()
    loss = carv.CARVLoss(checks=False)
    guide = carv.TimestepGuide()
    loss.loss_and_grads(_nan_model(objective, True), guide)  # no host read: the step runs
    with pytest.raises(carv.NonFiniteTeacherError, match="'sds'.*earlier step"):
        loss.loss_and_grads(_nan_model(objective, False), guide)
    loss.loss_and_grads(_nan_model(objective, False), guide)  # reported once, then clean


def test_nan_is_refused_in_the_step_with_host_checks():
    objective = sds("sds")
    for checks in (None, True):
        pyro.clear_param_store()
        with pytest.raises(carv.NonFiniteTeacherError, match="'sds'.*timesteps"):
            carv.CARVLoss(checks=checks).loss_and_grads(
                _nan_model(objective, True), carv.TimestepGuide()
            )
        assert pyro.param("theta").unconstrained().grad is None


def test_label_range_error_is_kept_with_host_checks():
    teacher = load_default()
    x = torch.zeros(2, 1, 16, 16)
    for checks in (None, True):
        with _checks.device_checks(checks), pytest.raises(ValueError, match=r"\[0, 10\]"):
            teacher._predict_eps(x, torch.tensor([1, 2]), torch.tensor([3, 11]))


def test_device_loss_is_its_float():
    a = DeviceLoss(torch.tensor(2.5, dtype=torch.float64))
    b = DeviceLoss(torch.tensor(-1.0, dtype=torch.float64))
    assert float(a) == 2.5 and a.tensor is None  # read once, then held as a float
    assert a + 1 == 3.5 and 1 - a == -1.5 and a * b == -2.5 and a / 2 == 1.25
    assert b < a and a > b and a == 2.5 and abs(b) == 1.0 and -b == 1.0
    assert f"{a:.1f}" == "2.5" and repr(a) == "2.5" and int(a) == 2 and round(a) == 2
    assert math.isfinite(a) and hash(a) == hash(2.5)
    from pyro.infer.util import torch_item

    assert torch_item(b) is b  # Pyro passes a number through without reading it
