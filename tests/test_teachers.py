"""Tests for ``carv_pyro.teachers``: the interface, the exact Gaussian teachers, diffusers UNets.

Analytic teachers are checked against independent computations (joint-Gaussian conditioning by
linear algebra, Tweedie's formula by autograd of the mixture density). Diffusers teachers use
tiny UNets built from config dicts, so the whole file runs in seconds on a CPU.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel, UNet2DModel
from hypothesis import given, settings
from hypothesis import strategies as st

from carv_pyro.schedules import DiscreteSchedule
from carv_pyro.teachers import (
    AbstractTeacher,
    DiffusersTeacher,
    GaussianMixtureTeacher,
    GaussianTeacher,
)

T = 50
SETTINGS = settings(max_examples=20, deadline=None, derandomize=True)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny UNets run fastest on one thread (and do not oversubscribe a shared CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def schedule() -> DiscreteSchedule:
    return DiscreteSchedule.linear(T)


def _schedule() -> DiscreteSchedule:
    return DiscreteSchedule.linear(T)


# ----------------------------------------------------------------- tiny models

UNET_KW = dict(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    block_out_channels=(8, 16),
    layers_per_block=1,
    norm_num_groups=4,
)


def _class_unet(cls: type[UNet2DModel] = UNet2DModel, seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return cls(
        **UNET_KW,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        num_class_embeds=4,
    )


def _cross_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        **UNET_KW,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=2,
    )


def _scheduler(prediction_type: str = "epsilon", cls: type = DDPMScheduler):
    return cls(num_train_timesteps=T, prediction_type=prediction_type)


class _ReparamUNet(UNet2DModel):
    """Outputs ``v`` or ``x0`` derived from the eps that the same weights predict.

    A teacher over this UNet with a ``v_prediction`` (or ``sample``) scheduler must return
    exactly the eps of an ``epsilon`` teacher over the plain UNet.
    """

    target = "v_prediction"

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        eps = super().forward(sample, timestep, class_labels=class_labels, return_dict=False)[0]
        ac = self.alphas_cumprod.to(sample)[timestep].reshape(-1, 1, 1, 1)
        alpha, sigma = ac.sqrt(), (1 - ac).sqrt()
        x0 = (sample - sigma * eps) / alpha
        return ((alpha * eps - sigma * x0) if self.target == "v_prediction" else x0,)


@pytest.fixture(scope="module")
def class_teacher() -> DiffusersTeacher:
    return DiffusersTeacher(_class_unet(), _scheduler())


@pytest.fixture(scope="module")
def cross_teacher() -> DiffusersTeacher:
    torch.manual_seed(1)
    return DiffusersTeacher(
        _cross_unet(), _scheduler(), null_encoder_hidden_states=torch.randn(5, 8)
    )


def _inputs(n: int, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g, dtype=dtype)
    t = torch.randint(0, T, (n,), generator=g)
    labels = torch.randint(0, 4, (n,), generator=g)
    ehs = torch.randn(n, 5, 8, generator=g, dtype=dtype)
    return x, t, labels, ehs


# ------------------------------------------------------- Gaussian: formula, Tweedie


@SETTINGS
@given(
    dim=st.integers(1, 5),
    std=st.floats(0.05, 5.0),
    t=st.integers(0, T - 1),
    seed=st.integers(0, 2**16),
)
def test_gaussian_matches_formula(dim, std, t, seed):
    schedule = _schedule()
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(dim, generator=g, dtype=torch.float64)
    x_t = torch.randn(3, dim, generator=g, dtype=torch.float64)
    teacher = GaussianTeacher(mean, std, schedule)
    a = schedule.alphas_cumprod[t].sqrt()
    s = (1 - schedule.alphas_cumprod[t]).sqrt()
    expected = s * (x_t - a * mean) / (a**2 * std**2 + s**2)
    got = teacher.predict_eps(x_t, torch.full((3,), t))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_gaussian_is_tweedie_by_linear_algebra(schedule):
    """E[eps | x_t] by conditioning the joint Gaussian of (eps, x_t), full matrices."""
    torch.manual_seed(0)
    d = 4
    mean = torch.randn(d, dtype=torch.float64)
    std = torch.rand(d, dtype=torch.float64) + 0.2  # per-coordinate std
    teacher = GaussianTeacher(mean, std, schedule)
    x_t = torch.randn(6, d, dtype=torch.float64)
    t = torch.tensor([0, 5, 17, 30, 42, 49])
    got = teacher.predict_eps(x_t, t)
    for i in range(6):
        a, s = schedule.alpha(t[i], like=x_t), schedule.sigma(t[i], like=x_t)
        # z = (x0, eps) ~ N((mean, 0), diag(std^2, 1)); x_t = A z with A = [a I, s I].
        cov_z = torch.diag(torch.cat([std**2, torch.ones(d, dtype=torch.float64)]))
        A = torch.cat(
            [a * torch.eye(d, dtype=torch.float64), s * torch.eye(d, dtype=torch.float64)], 1
        )
        cov_xt = A @ cov_z @ A.T
        cov_eps_xt = (cov_z @ A.T)[d:]
        expected = cov_eps_xt @ torch.linalg.solve(cov_xt, x_t[i] - a * mean)
        torch.testing.assert_close(got[i], expected, rtol=1e-10, atol=1e-12)


def test_gaussian_follows_input_dtype_and_event_shape(schedule):
    teacher = GaussianTeacher(torch.zeros(2, 3), torch.tensor([1.0, 2.0, 3.0]), schedule)
    assert teacher.event_shape == (2, 3) and teacher.cond_event_shape is None
    for dtype in (torch.float32, torch.float64):
        out = teacher.predict_eps(torch.ones(4, 2, 3, dtype=dtype), 7)
        assert out.dtype == dtype and out.shape == (4, 2, 3)


@pytest.mark.parametrize(
    "mean, std, match",
    [
        (torch.tensor(1.0), 1.0, "mean"),
        (1.0, 1.0, "mean"),
        (torch.zeros(3), -1.0, "std"),
        (torch.zeros(3), torch.ones(2), "std"),
    ],
)
def test_gaussian_rejects_bad_arguments(schedule, mean, std, match):
    with pytest.raises(ValueError, match=match):
        GaussianTeacher(mean, std, schedule)


# ------------------------------------------------------------- Gaussian mixture


def _mixture(schedule, m=3, d=2, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    means = 2 * torch.randn(m, d, generator=g, dtype=dtype)
    stds = torch.rand(m, generator=g, dtype=dtype) + 0.3
    weights = torch.rand(m, generator=g, dtype=dtype) + 0.1
    return GaussianMixtureTeacher(means, stds, weights, schedule)


def test_mixture_with_one_component_is_gaussian(schedule):
    torch.manual_seed(0)
    mean = torch.randn(1, 3, dtype=torch.float64)
    mix = GaussianMixtureTeacher(mean, torch.tensor([0.7]), torch.tensor([1.0]), schedule)
    gauss = GaussianTeacher(mean[0], 0.7, schedule)
    x_t = torch.randn(5, 3, dtype=torch.float64)
    t = torch.tensor([0, 10, 20, 30, 49])
    torch.testing.assert_close(mix.predict_eps(x_t, t), gauss.predict_eps(x_t, t))


def test_mixture_is_tweedie_by_autograd(schedule):
    """E[eps | x_t] = -sigma_t grad log p_t(x_t), with p_t built from torch.distributions."""
    mix = _mixture(schedule)
    torch.manual_seed(1)
    x_t = torch.randn(6, 2, dtype=torch.float64)
    t = torch.tensor([0, 3, 12, 25, 40, 49])
    got = mix.predict_eps(x_t, t)
    a = schedule.alpha(t, like=x_t)[:, None]
    s = schedule.sigma(t, like=x_t)[:, None]
    scale = (a**2 * mix.stds**2 + s**2).sqrt()  # (N, M)
    comps = torch.distributions.Independent(
        torch.distributions.Normal(a[..., None] * mix.means, scale[..., None].expand(-1, -1, 2)),
        1,
    )
    p_t = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(probs=mix.weights.expand(6, -1)), comps
    )
    x = x_t.clone().requires_grad_(True)
    (score,) = torch.autograd.grad(p_t.log_prob(x).sum(), x)
    torch.testing.assert_close(got, -s * score, rtol=1e-9, atol=1e-12)


def test_mixture_is_stable_for_far_apart_components(schedule):
    means = torch.tensor([[-1e3, 0.0], [1e3, 0.0]])
    mix = GaussianMixtureTeacher(
        means, torch.tensor([0.1, 0.1]), torch.tensor([0.5, 0.5]), schedule
    )
    x_t = torch.tensor([[990.0, 0.0], [-990.0, 0.0]])
    out = mix.predict_eps(x_t, torch.tensor([0, 0]))
    assert torch.isfinite(out).all()
    near = torch.stack(
        [mix.component(1).predict_eps(x_t[:1], 0)[0], mix.component(0).predict_eps(x_t[1:], 0)[0]]
    )
    torch.testing.assert_close(out, near)


def test_mixture_conditional_is_component_denoiser(schedule):
    mix = _mixture(schedule)
    torch.manual_seed(2)
    x_t = torch.randn(6, 2, dtype=torch.float64)
    t = torch.randint(0, T, (6,))
    cond = torch.tensor([0, 1, 2, 2, 1, 0])
    got = mix.predict_eps(x_t, t, cond)
    for i in range(6):
        expected = mix.component(int(cond[i])).predict_eps(x_t[i : i + 1], t[i : i + 1])
        torch.testing.assert_close(got[i : i + 1], expected)
    # index M is the whole mixture, which is also what cond=None gives
    full = torch.full((6,), 3)
    torch.testing.assert_close(mix.predict_eps(x_t, t, full), mix.predict_eps(x_t, t))
    torch.testing.assert_close(mix.null_cond(6), full)


@SETTINGS
@given(scale=st.floats(-2.0, 8.0), seed=st.integers(0, 2**16))
def test_mixture_cfg_formula_is_exact(scale, seed):
    mix = _mixture(_schedule(), seed=seed % 7)
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(5, 2, generator=g, dtype=torch.float64)
    t = torch.randint(0, T, (5,), generator=g)
    cond = torch.randint(0, 3, (5,), generator=g)
    cond_eps = mix.predict_eps(x_t, t, cond)
    uncond_eps = mix.predict_eps(x_t, t, None)
    expected = uncond_eps + scale * (cond_eps - uncond_eps)
    got = mix.predict_eps(x_t, t, cond, guidance_scale=scale)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_mixture_cfg_scale_one_and_three(schedule):
    mix = _mixture(schedule)
    torch.manual_seed(3)
    x_t, t, cond = torch.randn(4, 2, dtype=torch.float64), torch.tensor([1, 9, 20, 44]), 1
    eps_c, eps_u = mix.predict_eps(x_t, t, cond), mix.predict_eps(x_t, t)
    torch.testing.assert_close(mix.predict_eps(x_t, t, cond, guidance_scale=1.0), eps_c)
    torch.testing.assert_close(
        mix.predict_eps(x_t, t, cond, guidance_scale=3.0), eps_u + 3 * (eps_c - eps_u)
    )


def test_mixture_rejects_bad_cond(schedule):
    mix = _mixture(schedule)
    x_t = torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="cond"):
        mix.predict_eps(x_t, 0, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"cond must have shape \(2,\)"):
        mix.predict_eps(x_t, 0, torch.tensor([[0, 1]]))


# ------------------------------------------------------- the template method


class _SpyTeacher(AbstractTeacher):
    """``eps = x_t * (t + 1) + cond`` with ``null_cond = 0``; records each hook call."""

    def __init__(self, max_batch=None):
        self.schedule = _schedule()
        self.event_shape = torch.Size([2])
        self.cond_event_shape = torch.Size([])
        self.max_batch = max_batch
        self.calls: list[int] = []
        self.grad_modes: list[bool] = []

    def null_cond(self, n):
        return torch.zeros(n)

    def _predict_eps(self, x_t, t, cond):
        self.calls.append(x_t.shape[0])
        self.grad_modes.append(torch.is_grad_enabled())
        return x_t * (t[:, None] + 1) + cond[:, None]


@SETTINGS
@given(n=st.integers(0, 20), max_batch=st.one_of(st.none(), st.integers(1, 8)))
def test_template_chunks_and_guidance_batches(n, max_batch):
    teacher = _SpyTeacher(max_batch)
    x = torch.arange(2 * n, dtype=torch.float64).reshape(n, 2)
    t = torch.arange(n) % T
    cond = torch.arange(n, dtype=torch.float64)
    out = teacher.predict_eps(x, t, cond, guidance_scale=2.0)
    # one batched evaluation of 2N rows (conditional + null), split into chunks
    assert sum(teacher.calls) == (2 * n if n else 0)
    assert all(c <= (max_batch or 2 * n) for c in teacher.calls)
    eps_c = x * (t[:, None] + 1) + cond[:, None]
    eps_u = x * (t[:, None] + 1)
    torch.testing.assert_close(out, eps_u + 2.0 * (eps_c - eps_u))


def test_template_grad_mode():
    teacher = _SpyTeacher()
    x = torch.ones(3, 2, requires_grad=True)
    out = teacher.predict_eps(x, 1, torch.ones(3))
    assert not out.requires_grad and teacher.grad_modes == [False]
    teacher.requires_grad = True
    out = teacher.predict_eps(x, 1, torch.ones(3))
    assert out.requires_grad and teacher.grad_modes[-1]
    with torch.no_grad():
        assert not teacher.predict_eps(x, 1, torch.ones(3)).requires_grad


def test_template_broadcasts_scalar_t_and_single_cond():
    teacher = _SpyTeacher()
    x = torch.ones(3, 2)
    torch.testing.assert_close(
        teacher.predict_eps(x, 4, 1.5),
        teacher.predict_eps(x, torch.full((3,), 4), torch.full((3,), 1.5)),
    )


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(x_t=torch.ones(3)), ValueError, r"x_t must have shape \(N, 2\)"),
        (dict(x_t=torch.ones(3, 2, 1)), ValueError, r"x_t must have shape \(N, 2\)"),
        (dict(t=torch.zeros(2, dtype=torch.long)), ValueError, r"t must have shape \(3,\)"),
        (dict(t=torch.zeros(3)), TypeError, "t must hold integer"),
        (dict(t=T), ValueError, r"t must lie in \[0, 49\]"),
        (dict(cond=torch.ones(3, 1)), ValueError, r"cond must have shape \(3,\)"),
        (dict(cond=None, guidance_scale=2.0), ValueError, "guidance_scale.*cond"),
        (dict(guidance_scale=float("nan")), ValueError, "guidance_scale"),
        (dict(x_t=torch.ones(3, 2, dtype=torch.long)), TypeError, "x_t"),
    ],
)
def test_template_validates_arguments(kwargs, error, match):
    args = dict(x_t=torch.ones(3, 2), t=torch.zeros(3, dtype=torch.long), cond=torch.ones(3))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        _SpyTeacher().predict_eps(**args)


def test_unconditional_teacher_rejects_cond(schedule):
    teacher = GaussianTeacher(torch.zeros(2), 1.0, schedule)
    with pytest.raises(ValueError, match="cond must be None"):
        teacher.predict_eps(torch.ones(3, 2), 1, cond=torch.ones(3))
    with pytest.raises(ValueError, match="guidance_scale"):
        teacher.predict_eps(torch.ones(3, 2), 1, guidance_scale=3.0)


def test_teachers_are_not_modules(schedule, class_teacher):
    for teacher in (GaussianTeacher(torch.zeros(2), 1.0, schedule), class_teacher):
        assert not isinstance(teacher, torch.nn.Module)


# ---------------------------------------------------------------- diffusers


def test_diffusers_shapes_and_frozen_weights(class_teacher, cross_teacher):
    assert class_teacher.event_shape == (1, 8, 8)
    assert class_teacher.cond_event_shape == ()
    assert class_teacher.null_class == 3
    assert cross_teacher.cond_event_shape == (5, 8)
    for teacher in (class_teacher, cross_teacher):
        assert not teacher.unet.training
        assert all(not p.requires_grad for p in teacher.unet.parameters())
    x, t, labels, _ = _inputs(2)
    x.requires_grad_(True)
    assert not class_teacher.predict_eps(x, t, labels).requires_grad


def test_diffusers_uncond_and_tuple_sample_size():
    torch.manual_seed(0)
    unet = UNet2DModel(
        **{**UNET_KW, "sample_size": (8, 12)},
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    teacher = DiffusersTeacher(unet, _scheduler())
    assert teacher.event_shape == (1, 8, 12) and teacher.cond_event_shape is None
    assert teacher.null_cond(2) is None
    out = teacher.predict_eps(torch.randn(2, 1, 8, 12), torch.tensor([0, 49]))
    assert out.shape == (2, 1, 8, 12)
    with pytest.raises(ValueError, match="guidance_scale"):
        teacher.predict_eps(torch.randn(2, 1, 8, 12), 3, guidance_scale=2.0)
    with pytest.raises(ValueError, match="cond must be None"):
        teacher.predict_eps(torch.randn(2, 1, 8, 12), 3, cond=torch.tensor([0, 1]))


@pytest.mark.parametrize("target", ["v_prediction", "sample"])
def test_diffusers_prediction_types_agree(target):
    eps_teacher = DiffusersTeacher(_class_unet(seed=3), _scheduler("epsilon"))
    reparam = _class_unet(_ReparamUNet, seed=3)
    reparam.target = target
    sched = _scheduler(target)
    reparam.alphas_cumprod = sched.alphas_cumprod.clone()
    other = DiffusersTeacher(reparam, sched)
    assert other.prediction_type == target
    # float64 so the sigma_t -> 0 division of "sample" loses nothing
    x, t, labels, _ = _inputs(6, seed=4, dtype=torch.float64)
    t[0] = 0
    torch.testing.assert_close(
        other.predict_eps(x, t, labels),
        eps_teacher.predict_eps(x, t, labels),
        rtol=1e-9,
        atol=1e-9,
    )


def test_diffusers_rejects_bad_prediction_type():
    with pytest.raises(ValueError, match="prediction_type.*'bogus'"):
        DiffusersTeacher(_class_unet(), _scheduler("bogus"))


def test_diffusers_cfg_formula_class_labels(class_teacher):
    x, t, labels, _ = _inputs(4, seed=5)
    eps_c = class_teacher.predict_eps(x, t, labels)
    eps_u = class_teacher.predict_eps(x, t, class_teacher.null_cond(4))
    torch.testing.assert_close(class_teacher.predict_eps(x, t), eps_u)  # cond=None: null class
    got = class_teacher.predict_eps(x, t, labels, guidance_scale=3.0)
    torch.testing.assert_close(got, eps_u + 3.0 * (eps_c - eps_u), rtol=1e-4, atol=1e-5)


def test_diffusers_cfg_formula_cross_attention(cross_teacher):
    x, t, _, ehs = _inputs(3, seed=6)
    eps_c = cross_teacher.predict_eps(x, t, ehs)
    eps_u = cross_teacher.predict_eps(x, t, cross_teacher.null_encoder_hidden_states)
    got = cross_teacher.predict_eps(x, t, ehs, guidance_scale=3.0)
    torch.testing.assert_close(got, eps_u + 3.0 * (eps_c - eps_u), rtol=1e-4, atol=1e-5)


def test_diffusers_guidance_without_null_raises():
    teacher = DiffusersTeacher(_cross_unet(), _scheduler())
    assert teacher.cond_event_shape == (-1, 8)  # any sequence length
    x, t, _, ehs = _inputs(2)
    assert teacher.predict_eps(x, t, ehs).shape == x.shape
    assert teacher.predict_eps(x, t, ehs[:, :3]).shape == x.shape
    with pytest.raises(ValueError, match="guidance_scale.*null"):
        teacher.predict_eps(x, t, ehs, guidance_scale=2.0)
    with pytest.raises(ValueError, match="cond is required"):
        teacher.predict_eps(x, t)
    with pytest.raises(ValueError, match=r"cond must have shape \(2, \*, 8\)"):
        teacher.predict_eps(x, t, ehs[..., :4])


@pytest.mark.parametrize("which", ["class", "cross"])
def test_diffusers_batch_equals_row_loop_and_chunks(which, class_teacher, cross_teacher):
    teacher = class_teacher if which == "class" else cross_teacher
    x, t, labels, ehs = _inputs(7, seed=7)
    cond = labels if which == "class" else ehs
    full = teacher.predict_eps(x, t, cond, guidance_scale=2.0)
    rows = torch.cat(
        [teacher.predict_eps(x[i : i + 1], t[i : i + 1], cond[i : i + 1], 2.0) for i in range(7)]
    )
    torch.testing.assert_close(full, rows, rtol=1e-4, atol=1e-5)
    chunked = DiffusersTeacher(
        teacher.unet,
        teacher.scheduler,
        max_batch=3,
        null_encoder_hidden_states=teacher.null_encoder_hidden_states,
    )
    torch.testing.assert_close(
        chunked.predict_eps(x, t, cond, guidance_scale=2.0), full, rtol=1e-4, atol=1e-5
    )


def test_diffusers_dtype(class_teacher):
    x, t, labels, _ = _inputs(3, seed=8, dtype=torch.float64)
    out64 = class_teacher.predict_eps(x, t, labels)
    assert out64.dtype == torch.float64
    assert next(class_teacher.unet.parameters()).dtype == torch.float32  # master untouched
    out32 = class_teacher.predict_eps(x.float(), t, labels)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), out64, rtol=1e-4, atol=1e-5)
    low = DiffusersTeacher(class_teacher.unet, class_teacher.scheduler, dtype=torch.bfloat16)
    out_bf16 = low.predict_eps(x.float(), t, labels)
    assert out_bf16.dtype == torch.float32
    torch.testing.assert_close(out_bf16.double(), out64, rtol=0.1, atol=0.1)


def test_diffusers_requires_grad_reaches_weights():
    teacher = DiffusersTeacher(_class_unet(), _scheduler())
    x, t, labels, _ = _inputs(2)
    teacher.requires_grad = True
    loss = teacher.predict_eps(x, t, labels).square().sum()
    grads = torch.autograd.grad(loss, list(teacher.unet.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    with pytest.raises(ValueError, match="teacher.to"):
        teacher.predict_eps(x.double(), t, labels)
    teacher.requires_grad = False
    assert all(not p.requires_grad for p in teacher.unet.parameters())


def test_diffusers_rejects_bad_shapes(class_teacher):
    x, t, labels, _ = _inputs(3)
    with pytest.raises(ValueError, match=r"x_t must have shape \(N, 1, 8, 8\).*\(3, 8, 8\)"):
        class_teacher.predict_eps(x[:, 0], t, labels)
    with pytest.raises(ValueError, match=r"t must have shape \(3,\)"):
        class_teacher.predict_eps(x, t[:2], labels)
    with pytest.raises(ValueError, match=r"cond must have shape \(3,\)"):
        class_teacher.predict_eps(x, t, labels[:2])
    with pytest.raises(ValueError, match=r"cond must hold class labels in \[0, 3\]"):
        class_teacher.predict_eps(x, t, labels + 4)


@pytest.mark.parametrize("which", ["class", "cross"])
def test_diffusers_save_load_round_trip(which, tmp_path, class_teacher, cross_teacher):
    teacher = class_teacher if which == "class" else cross_teacher
    teacher.save_pretrained(tmp_path / "teacher")
    loaded = DiffusersTeacher.from_pretrained(tmp_path / "teacher", max_batch=2)
    assert type(loaded.unet) is type(teacher.unet)
    assert loaded.max_batch == 2 and loaded.cond_event_shape == teacher.cond_event_shape
    assert all(not p.requires_grad for p in loaded.unet.parameters())
    x, t, labels, ehs = _inputs(3, seed=9)
    cond = labels if which == "class" else ehs
    # like with like: the same weights in the same chunks give the same numbers, bit for bit
    # (chunking alone moves float32 results by ~1e-6; that is tested in test_gpu_paths)
    saved, teacher.max_batch = teacher.max_batch, 2
    try:
        want = teacher.predict_eps(x, t, cond, guidance_scale=2.5)
    finally:
        teacher.max_batch = saved
    assert torch.equal(loaded.predict_eps(x, t, cond, guidance_scale=2.5), want)


def test_diffusers_from_pretrained_scheduler_class_and_errors(tmp_path):
    teacher = DiffusersTeacher(_class_unet(), _scheduler("v_prediction", DDIMScheduler))
    teacher.save_pretrained(tmp_path)
    loaded = DiffusersTeacher.from_pretrained(tmp_path, null_class=0)
    assert isinstance(loaded.scheduler, DDIMScheduler)
    assert loaded.prediction_type == "v_prediction" and loaded.null_class == 0
    with pytest.raises(FileNotFoundError, match="no teacher folder"):
        DiffusersTeacher.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="scheduler config"):
        DiffusersTeacher.from_pretrained(tmp_path, subfolder_scheduler="nope")
    cfg = tmp_path / "unet" / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "_class_name": "VQModel"}))
    with pytest.raises(ValueError, match="unsupported UNet class 'VQModel'"):
        DiffusersTeacher.from_pretrained(tmp_path)
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "_class_name": "UNet2DModel"}))
    assert DiffusersTeacher.check_folder(tmp_path) is UNet2DModel  # files only, no weights read
    for weights in (tmp_path / "unet").glob("diffusion_pytorch_model.*"):
        weights.unlink()
    with pytest.raises(FileNotFoundError, match="no UNet weights"):  # before diffusers' own
        DiffusersTeacher.from_pretrained(tmp_path)
    cfg.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a JSON object"):
        DiffusersTeacher.check_folder(tmp_path)


def test_diffusers_rejects_bad_constructor_arguments():
    with pytest.raises(TypeError, match="unet"):
        DiffusersTeacher(torch.nn.Linear(2, 2), _scheduler())
    with pytest.raises(ValueError, match="null_class"):
        DiffusersTeacher(_class_unet(), _scheduler(), null_class=4)
    with pytest.raises(ValueError, match="null_encoder_hidden_states"):
        DiffusersTeacher(_cross_unet(), _scheduler(), null_encoder_hidden_states=torch.ones(5, 3))
    with pytest.raises(ValueError, match="max_batch"):
        DiffusersTeacher(_class_unet(), _scheduler(), max_batch=0)
