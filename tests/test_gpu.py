"""Guarantees that depend on the device, checked on CUDA (``pytest -m gpu``).

Skipped where there is no GPU (CI); ``scripts/gpu_tests.sh`` runs them on a lent GPU in one
call. Each test states the guarantee it checks:

- a seeded CARV step repeats bit for bit on the GPU (deterministic kernels on), and a CPU
  generator given for a CUDA run is used correctly (draws made on the CPU and moved);
- NaN teacher outputs are refused before any gradient exists with ``checks=True``, and at a later
  step without host checks (the default on a GPU);
- a warm CARV step never synchronises the host with the GPU (the embedded teacher, guidance on,
  Pyro's validation on or off), and does with ``checks=True``; nor does a warm step of the
  adapting ``auto`` preset between measurements (lazy CUDA timings) or of the ``adaptive``
  proposal (statistics on the device), nor does an outer design take a GPU shard's rows;
- bad inputs give the same clear errors as on the CPU;
- the estimator is unbiased on the device, by exact quadrature over the timestep uniforms, with a
  float32 teacher and with a bf16 one (the weights and reductions stay in float32/float64);
- chunking the teacher's rows equals one call;
- ``dream`` checkpoints and resumes bit for bit on CUDA;
- the race runs at its ``--quick`` size on CUDA.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import carv_pyro as carv

from .analytic import THETA0, D, expected_grad, sds

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _deterministic():
    """Deterministic kernels where a guarantee needs them (documented in the docs' GPU page)."""
    old = torch.are_deterministic_algorithms_enabled()
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    # TF32 rounds float32 convolutions to 10 mantissa bits, with algorithms that depend on the
    # batch: chunked and unchunked calls then differ by ~1e-4 (measured on an H200)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.use_deterministic_algorithms(old)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def _cuda_model(objective, R=3, K=4, xi=None):
    import pyro
    import pyro.distributions as dist

    from .analytic import DIRECTION

    def model():
        theta = pyro.param("theta", THETA0.clone().to(CUDA))
        with pyro.plate("views", R, dim=-2):
            if xi is None:
                z = pyro.sample(
                    "xi", dist.Normal(torch.zeros((), dtype=torch.float64, device=CUDA), 1.0)
                )
            else:
                z = xi.to(CUDA).reshape(R, 1)
            x = theta + z.unsqueeze(-1) * DIRECTION.to(CUDA)
            with carv.draws(K, "noise", dim=-1):
                carv.teacher_term("sds", objective, x)

    return model


def _cuda_sds(weighting="sds"):
    objective = sds(weighting)
    objective.teacher.mean = objective.teacher.mean.to(CUDA)
    return objective


def _grad(loss, model, guide):
    import pyro

    theta = pyro.param("theta").unconstrained()
    theta.grad = None
    loss.loss_and_grads(model, guide)
    return theta.grad.detach().clone()


def test_seeded_step_repeats_bit_for_bit_on_cuda():
    import pyro

    objective = _cuda_sds()
    xi = torch.tensor([0.2, -0.4, 1.0], dtype=torch.float64)
    model = _cuda_model(objective, xi=xi)
    estimator = carv.Estimator.preset("carv", K=4).replace(noise="sobol")
    out = []
    for _ in range(2):
        pyro.clear_param_store()
        pyro.param("theta", THETA0.clone().to(CUDA))
        out.append(_grad(carv.CARVLoss(), model, estimator.guide(seed=7)))
    assert out[0].device.type == "cuda" and torch.equal(out[0], out[1])
    # a CPU generator for a CUDA run: the draws are made on the CPU and moved, the same each time
    out = []
    for _ in range(2):
        pyro.clear_param_store()
        pyro.param("theta", THETA0.clone().to(CUDA))
        gen = torch.Generator().manual_seed(3)
        out.append(_grad(carv.CARVLoss(), model, estimator.guide(generator=gen)))
    assert torch.equal(out[0], out[1])


def test_nan_teacher_output_is_refused_on_cuda():
    import pyro

    objective = _cuda_sds()
    model = _cuda_model(objective, xi=torch.tensor([0.0, float("nan"), 0.0], dtype=torch.float64))
    pyro.param("theta", THETA0.clone().to(CUDA))
    # with host checks (one read in the step): before any gradient exists
    with pytest.raises(carv.NonFiniteTeacherError, match="'sds'.*timesteps"):
        carv.CARVLoss(checks=True).loss_and_grads(model, carv.TimestepGuide())
    assert pyro.param("theta").unconstrained().grad is None
    # without (the default on a GPU): no read in the step; refused at a later one
    loss, guide = carv.CARVLoss(), carv.TimestepGuide()
    loss.loss_and_grads(model, guide)
    torch.cuda.synchronize()
    with pytest.raises(carv.NonFiniteTeacherError, match="'sds'.*earlier step"):
        loss.loss_and_grads(model, guide)


def _embedded_svi(R=2, K=4, preset="carv", checks=None, compile=False):
    """Warm SVI steps of SDS with the embedded digits teacher (guidance on) on CUDA."""
    import pyro
    from pyro.infer import SVI

    from carv_pyro.teachers.embedded import load_default

    objective = carv.SDS(load_default(compile=compile).to(CUDA), guidance_scale=2.0)

    def model():
        x = pyro.param("x", torch.zeros(R, 1, 1, 16, 16, device=CUDA))
        with pyro.plate("views", R, dim=-2), carv.draws(K, dim=-1):
            carv.teacher_term("sds", objective, x, cond=3)

    pyro.clear_param_store()
    estimator = carv.Estimator.preset(preset, K=K)
    svi = SVI(
        model,
        estimator.guide(model, seed=3),
        pyro.optim.Adam({"lr": 1e-2}),
        loss=estimator.loss(checks=checks),
    )
    for _ in range(3):  # warm: caches filled, tables on the device
        svi.step()
    torch.cuda.synchronize()
    return svi


@pytest.mark.parametrize("preset", ["reuse", "carv", "stratified"])
@pytest.mark.parametrize("validation", [True, False])
def test_warm_carv_step_never_synchronises_on_cuda(preset, validation):
    """No host synchronisation in a warm step (the default checks), Pyro validation on or off."""
    import pyro

    from carv_pyro.infer.loss import DeviceLoss

    with pyro.validation_enabled(validation):
        svi = _embedded_svi(preset=preset)
        torch.cuda.set_sync_debug_mode("error")
        try:
            values = [svi.step() for _ in range(2)]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert all(isinstance(v, DeviceLoss) for v in values)
    assert all(math.isfinite(v) for v in values)  # read here, outside the steps


def test_carv_step_with_checks_synchronises_on_cuda():
    """``checks=True`` reads on the host in the step, as asked (and returns a float)."""
    svi = _embedded_svi(checks=True)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            svi.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert isinstance(svi.step(), float)


def test_bad_inputs_give_the_cpu_errors_on_cuda():
    objective = _cuda_sds()

    def model():
        with carv.draws(2, dim=-1):
            carv.teacher_term("sds", objective, torch.zeros(3, device=CUDA))

    with pytest.raises(ValueError, match="event shape"):
        carv.CARVLoss().loss_and_grads(model, carv.TimestepGuide())
    with pytest.raises(TypeError, match="floating-point"):
        carv.teacher_term("sds", objective, torch.zeros(2, dtype=torch.long, device=CUDA))


@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stratify", [None, "per_outer", "global"])
def test_exact_quadrature_unbiasedness_on_cuda(teacher_dtype, stratify):
    """The estimator's expectation over the base uniforms equals the closed form on the GPU.

    With a float32 teacher the match is to float32 rounding; a bf16 teacher's predictions are
    rounded to 8 bits, so its exact expectation matches the bf16 teacher's own closed form within
    bf16 rounding of the residual (relative 1e-2), while the weights stay exact.
    """
    from .test_unbiased_exact import FixedUniforms, ZeroNoise, _breakpoints

    objective = sds("sds")
    teacher = objective.teacher
    teacher.mean = teacher.mean.to(CUDA)
    xi = torch.tensor([0.5, -1.0], dtype=torch.float64)
    R, K = 2, 3
    model = _cuda_model(objective, R=R, K=K, xi=xi)
    source = FixedUniforms()
    q = carv.proposals.WeightedProposal(objective.prior, objective.schedule, objective.weight)
    guide = carv.TimestepGuide(proposal=q, stratify=stratify, noise=ZeroNoise(), source=source)
    import pyro

    pyro.param("theta", THETA0.clone().to(CUDA))
    loss = carv.CARVLoss()
    n = {None: 1, "per_outer": K, "global": R * K}[stratify]
    shifts = range(R * K) if stratify == "global" else range(1)
    pts = _breakpoints(q, n)
    total = torch.zeros(D, dtype=torch.float64, device=CUDA)
    if teacher_dtype is torch.bfloat16:
        real = teacher._predict_eps
        teacher._predict_eps = lambda x_t, t, c: real(x_t.to(torch.bfloat16).double(), t, c).to(
            torch.bfloat16
        )
    for shift in shifts:
        source.shift = shift
        for lo, hi in zip(pts[:-1], pts[1:]):
            if hi - lo < 1e-15:
                continue
            source.u = 0.5 * (lo + hi)
            total += (hi - lo) * _grad(loss, model, guide)
    got = (total / len(shifts)).cpu()
    rtol = 1e-9 if teacher_dtype is torch.float32 else 2e-2
    torch.testing.assert_close(got, expected_grad(objective, xi), rtol=rtol, atol=1e-12)


def test_chunked_teacher_equals_one_call_on_cuda():
    from .test_gpu_paths import _inputs, _teacher

    teacher = _teacher().to(CUDA)
    teacher.null_encoder_hidden_states = teacher.null_encoder_hidden_states.to(CUDA)
    x, t, cond = _inputs(7, "cuda")
    whole = teacher.predict_eps(x, t, cond, guidance_scale=3.0)
    teacher.max_batch = 3
    chunked = teacher.predict_eps(x, t, cond, guidance_scale=3.0)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)


def test_dream_resumes_bit_for_bit_on_cuda(tmp_path):
    from carv_pyro.pipelines.text_to_3d import TextTo3DConfig, dream

    def config(steps):
        return TextTo3DConfig(
            prompt="torus",
            steps=steps,
            eval_every=3,
            eval_views=2,
            estimator=carv.Estimator.preset("carv", K=4),
            device="cuda",
            resolution=16,
        )

    dream(config(6), tmp_path / "a", progress=False, pictures=False)
    dream(config(3), tmp_path / "b", progress=False, pictures=False)
    dream(config(6), tmp_path / "b", progress=False, pictures=False, resume=True)
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["param_store"]["params"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["param_store"]["params"]
    # CUDA has no deterministic kernel for grid_sample's 3-D backward (torch warns): the render's
    # gradient sums atomically, so a run on CUDA is close to, not bit for bit, its resumed twin
    # (measured on an H200, 2026-12-01); on the CPU resume is bit for bit (test_text_to_3d)
    for k in a:
        if k.startswith("field"):
            rel = float((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-12))
            assert rel < 1e-2, (k, rel)


def test_race_quick_on_cuda(tmp_path):
    from carv_pyro import cli

    js = tmp_path / "race.json"
    argv = ["race", "torus", "--quick", "--device", "cuda", "--estimators", "baseline,auto"]
    assert cli.main([*argv, "--out", str(tmp_path / "r"), "--json", str(js), "--quiet"]) == 0
    assert js.stat().st_size > 0


@pytest.mark.parametrize("mode", ["max-autotune-no-cudagraphs", "reduce-overhead"])
def test_compiled_teacher_step_matches_eager_without_syncs_on_cuda(mode):
    """The library's compile= (inductor; CUDA graphs with reduce-overhead) inside warm CARV
    steps: no host synchronisation, and the step's gradient is eager's to float32 rounding."""
    import pyro

    grads = []
    for option in (False, {"mode": mode}):
        svi = _embedded_svi(preset="reuse", compile=option)
        torch.cuda.set_sync_debug_mode("error")
        try:
            svi.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        x = pyro.param("x").unconstrained()
        with torch.no_grad():
            x.zero_()  # the same point for both (Adam's steps amplify rounding)
        pyro.set_rng_seed(0)
        svi.guide.set_state({"source": {}})
        x.grad = None
        svi.loss_and_grads(svi.model, svi.guide)
        grads.append(pyro.param("x").unconstrained().grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("preset", ["auto", "adaptive"])
def test_warm_auto_and_adaptive_steps_never_synchronise_on_cuda(preset, monkeypatch):
    """A warm step of the adapting ``auto`` preset between two measurements (its accountant
    keeps the step's CUDA timings pending and reads them once the device has passed them) and a
    warm step of the ``adaptive`` proposal (its statistics and tables stay on the device) do not
    synchronise; nor does any CUDA event wait in them."""
    from carv_pyro.infer.loss import DeviceLoss

    svi = _embedded_svi(preset=preset)
    acc = svi.loss.__self__.accountant  # SVI keeps the loss's bound methods
    if preset == "auto":
        assert acc is not None and acc.history  # it has measured (at its second step)
    waited = []

    def no_wait(event):  # sync_debug_mode does not see cudaEventSynchronize
        waited.append(event)
        raise AssertionError("a CUDA event was waited for inside a step")

    values = []
    for _ in range(4):
        if acc is not None and acc.wants_components():
            svi.step()  # a measuring step reads the variance estimates: it may wait
            continue
        monkeypatch.setattr(torch.cuda.Event, "synchronize", no_wait)
        torch.cuda.set_sync_debug_mode("error")
        try:
            values.append(svi.step())
        finally:
            torch.cuda.set_sync_debug_mode("default")
            monkeypatch.undo()
    assert len(values) >= 2 and not waited
    assert all(isinstance(v, DeviceLoss) and math.isfinite(v) for v in values)
    if preset == "auto":
        torch.cuda.synchronize()
        assert acc.step_costs  # the pending timings are read when asked for
        assert not acc._pending


@pytest.mark.parametrize("preset", ["auto", "baseline"])
def test_warm_dream_steps_never_synchronise_on_cuda(preset, monkeypatch):
    """The main job's own step (render, camera sites, ``auto``'s lattice design over them, the
    shapes teacher with guidance, the accountant) between measurements does not synchronise."""
    import pyro

    from carv_pyro.pipelines.text_to_3d import TextTo3DConfig
    from carv_pyro.pipelines.text_to_3d.dream import build_run

    pyro.clear_param_store()
    config = TextTo3DConfig(prompt="torus", device="cuda", estimator=preset, R=4, steps=10)
    run = build_run(config)
    acc = run.loss.accountant
    for _ in range(3):  # warm: caches, the accountant's first measurement
        run.svi.step()

    def no_wait(event):
        raise AssertionError("a CUDA event was waited for inside a step")

    plain = 0
    for _ in range(6):
        if acc is not None and acc.wants_components():
            run.svi.step()
            continue
        monkeypatch.setattr(torch.cuda.Event, "synchronize", no_wait)
        torch.cuda.set_sync_debug_mode("error")
        try:
            run.svi.step()
            plain += 1
        finally:
            torch.cuda.set_sync_debug_mode("default")
            monkeypatch.undo()
    assert plain >= 3


def test_adaptive_proposal_on_cuda_matches_the_cpu():
    """The ``adaptive`` proposal's statistics live on the draws' device and its ``q`` is built
    there without host reads: the same statistics and ``q`` as on the CPU, to float64 rounding
    (the mean that unseen bins borrow is summed in another order)."""
    import pyro

    from carv_pyro.infer.proposals import AdaptiveProposal, _moment_mixture

    objective = _cuda_sds()
    pyro.clear_param_store()
    cpu, gpu = AdaptiveProposal(objective, name="cpu"), AdaptiveProposal(objective, name="gpu")
    g = torch.Generator().manual_seed(0)

    class Record:
        batch_shape = torch.Size([3, 5])
        value = None

    for i in range(6):
        r = Record()
        r.residual = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
        r.residual[0, i % 5] = float("nan")
        r.nonfinite = ~torch.isfinite(r.residual).all(-1)
        r.t = torch.randint(6, 30, (3, 5), generator=g)  # some bins stay unseen
        cpu.update(r)
        for k in ("residual", "nonfinite", "t"):
            setattr(r, k, getattr(r, k).to(CUDA))
        gpu.update(r)
    assert gpu._state()[0].device.type == "cuda" and gpu.probs().device.type == "cuda"
    torch.testing.assert_close(gpu._state()[0].cpu(), cpu._state()[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(gpu._state()[1].cpu(), cpu._state()[1], rtol=0, atol=0)
    torch.testing.assert_close(gpu.probs().cpu(), cpu.probs(), rtol=1e-12, atol=1e-15)
    none = torch.full((cpu.n_bins,), float("nan"), dtype=torch.float64)
    p = objective.prior.probs()
    got = _moment_mixture(p.to(CUDA), cpu.bin_index.to(CUDA), none.to(CUDA), 0.1)
    assert torch.equal(got.cpu(), p)  # nothing seen: the prior


@pytest.mark.parametrize("outer", ["stratified", "sobol"])
def test_sharded_outer_design_never_synchronises_on_cuda(outer):
    """A plate subsampled by indices on the GPU (a rank's shard) takes its rows of the global
    design on the device, without reading the indices on the host; the rows equal those taken
    with the indices on the CPU (a ``Uniform(0, 1)`` prior: its inverse CDF is exact on both)."""
    import pyro
    import pyro.distributions as dist

    def model(idx, low, high):
        with pyro.plate("views", 8, dim=-1, subsample=idx):
            return pyro.sample("u", dist.Uniform(low, high))

    def shard(device, sync="default"):
        idx = torch.arange(2, 6, device=device)
        # the bounds made before the check: a Python float would be copied up from pageable
        # memory inside the model, the test's own sync and not the design's
        low, high = torch.tensor([0.0, 1.0], dtype=torch.float64, device=device).unbind()
        guide = carv.TimestepGuide(model, outer=outer, seed=0, outer_seed=5)
        torch.cuda.set_sync_debug_mode(sync)
        try:
            value = guide.run(model, (idx, low, high))[0].nodes["u"]["value"]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert guide.outer.designed == ["u"]
        return value

    with pyro.validation_enabled(False):  # the prior's argument checks read on the host
        shard(CUDA)  # warm: cached direction numbers, pinned buffers
        got = shard(CUDA, sync="error")
        want = shard("cpu")
    assert got.device.type == "cuda" and torch.equal(got.cpu(), want)
