"""The code paths a GPU run takes, exercised on the CPU (and on CUDA where there is one).

- a teacher computing in bf16 (or fp16) with float32 inputs returns float32 close to the float32
  teacher, with or without a cast copy of the UNet;
- chunking the teacher's rows (``max_batch``) equals one call, also through ``CARVLoss``;
- the latent pipeline teacher runs an SDS step in bf16;
- on CUDA: the same step on the device, timed with CUDA events.
"""

from __future__ import annotations

import pyro
import pytest
import torch

import carv_pyro as carv
from carv_pyro.timing import Stopwatch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMScheduler, UNet2DConditionModel  # noqa: E402

from carv_pyro.teachers import DiffusersTeacher  # noqa: E402

T = 50
L, D = 4, 8
R, K = 2, 3
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=D,
        attention_head_dim=2,
    )


def _teacher(**kwargs) -> DiffusersTeacher:
    g = torch.Generator().manual_seed(3)
    null = torch.randn(L, D, generator=g)
    return DiffusersTeacher(
        _unet(), DDPMScheduler(num_train_timesteps=T), null_encoder_hidden_states=null, **kwargs
    )


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _inputs(n: int = 5, device: str = "cpu"):
    g = torch.Generator().manual_seed(11)
    x_t = torch.randn(n, 4, 8, 8, generator=g).to(device)
    t = torch.randint(0, T, (n,), generator=g).to(device)
    cond = torch.randn(L, D, generator=g).to(device)
    return x_t, t, cond


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_teacher_with_float32_inputs(dtype):
    if dtype == torch.float16 and not torch.cuda.is_available():
        # fp16 convolutions have CPU kernels in recent torch; skip where they do not
        try:
            torch.nn.functional.conv2d(
                torch.ones(1, 1, 3, 3, dtype=dtype), torch.ones(1, 1, 1, 1, dtype=dtype)
            )
        except RuntimeError:
            pytest.skip("no float16 convolution on this CPU build")
    ref = _teacher()
    low = _teacher(dtype=dtype)
    x_t, t, cond = _inputs()
    u = torch.finfo(dtype).eps / 2  # unit roundoff: 2^-8 for bf16, 2^-11 for fp16
    for s in (1.0, 3.0):
        want = ref.predict_eps(x_t, t, cond, guidance_scale=s)
        got = low.predict_eps(x_t, t, cond, guidance_scale=s)
        assert got.dtype == torch.float32 and got.shape == x_t.shape
        # measured ~4 u through this UNet for both formats; guidance amplifies the
        # difference eps_cond - eps_uncond by about s. Bound: 10 u s.
        assert _rel(got, want) < 10 * u * s
    # the master UNet stays float32; the cast copy is made once and cached
    assert next(low.unet.parameters()).dtype == torch.float32
    cast = low._cast
    assert next(cast.parameters()).dtype == dtype
    low.predict_eps(x_t, t, cond)
    assert low._cast is cast


def test_teacher_moved_to_its_compute_dtype_keeps_no_copy():
    teacher = _teacher(dtype=torch.bfloat16).to(torch.bfloat16)
    x_t, t, cond = _inputs()
    out = teacher.predict_eps(x_t, t, cond, guidance_scale=2.0)
    assert out.dtype == torch.float32
    assert teacher._cast is None  # computed with teacher.unet itself


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_chunked_prediction_equals_one_call(guidance_scale):
    x_t, t, cond = _inputs(n=7)
    whole = _teacher().predict_eps(x_t, t, cond, guidance_scale=guidance_scale)
    for max_batch in (1, 3, 13):
        chunked = _teacher(max_batch=max_batch).predict_eps(
            x_t, t, cond, guidance_scale=guidance_scale
        )
        # float32 kernels block differently at other batch sizes: rounding only (~2e-6 seen)
        assert _rel(chunked, whole) < 1e-5


def _sds_grad(teacher, device="cpu", seed: int = 5) -> torch.Tensor:
    """One CARVLoss gradient of a latent image under fixed seeds."""
    objective = carv.SDS(teacher, guidance_scale=7.5)
    _, _, cond = _inputs(device=device)

    def model():
        z = pyro.param("z", torch.zeros(4, 8, 8, device=device))
        with pyro.plate("views", R, dim=-2):
            shift = pyro.sample(
                "shift", pyro.distributions.Normal(torch.zeros((), device=device), 0.5)
            )
            x = torch.tanh(z + shift[..., None, None, None])  # (R, 1, 4, 8, 8)
            with pyro.plate("noise", K, dim=-1):
                carv.teacher_term("sds", objective, x, cond=cond)

    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = carv.TimestepGuide(model, proposal="weighted", stratify="per_outer")
    loss = carv.CARVLoss()
    loss.loss_and_grads(model, guide)
    return pyro.param("z").unconstrained().grad.detach().clone()


def test_chunked_carv_step_equals_unchunked():
    whole = _sds_grad(_teacher())
    chunked = _sds_grad(_teacher(max_batch=4))  # 2 R K = 12 guided rows in 3 chunks
    assert whole.abs().sum() > 0
    assert _rel(chunked, whole) < 1e-5


def test_bf16_carv_step_is_close_to_float32():
    want = _sds_grad(_teacher())
    got = _sds_grad(_teacher(dtype=torch.bfloat16))
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert _rel(got, want) < 5e-2


def test_pipeline_teacher_sds_step_in_bf16(tmp_path):
    pytest.importorskip("transformers")
    from carv_pyro.teachers.pipeline import teacher_from_pipeline

    from .test_pipeline_teacher import build_tiny_pipeline

    pipe = build_tiny_pipeline(tmp_path)
    grads = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        teacher = teacher_from_pipeline(pipe, dtype=dtype, max_batch=5)
        objective = carv.SDS(teacher, guidance_scale=7.5)

        def model(teacher=teacher, objective=objective):
            img = pyro.param("img", torch.zeros(3, 16, 16))
            with pyro.plate("views", R, dim=-2):
                latents = teacher.encode_images(torch.tanh(img).expand(R, 1, 3, 16, 16))
                with pyro.plate("noise", K, dim=-1):
                    carv.teacher_term("sds", objective, latents, cond="a dog")

        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        carv.CARVLoss().loss_and_grads(model, carv.TimestepGuide(model))
        grads[name] = pyro.param("img").unconstrained().grad.detach().clone()
    assert torch.isfinite(grads["bf16"]).all()
    assert _rel(grads["bf16"], grads["fp32"]) < 5e-2


def test_stopwatch_uses_cuda_events_only_on_cuda():
    assert not Stopwatch("cpu").cuda
    watch = Stopwatch("cpu").stop()
    assert watch.seconds() >= 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_step_matches_cuda_float32():
    def on_cuda(teacher):
        # DiffusersTeacher.to moves the UNet only: move the null conditioning too, so that
        # guidance does not copy it from the host in every step
        teacher.null_encoder_hidden_states = teacher.null_encoder_hidden_states.cuda()
        return teacher

    want = _sds_grad(on_cuda(_teacher().to("cuda")), "cuda")
    got = _sds_grad(on_cuda(_teacher(dtype=torch.bfloat16).to("cuda", torch.bfloat16)), "cuda")
    assert got.device.type == "cuda" and torch.isfinite(got).all()
    assert _rel(got, want) < 5e-2  # same seed, same device: the same draws
    assert Stopwatch("cuda").cuda
