"""GPU benchmark: carv-pyro at Stable-Diffusion-2.1 scale, side by side with plain diffusers/torch.

Builds an SD-2.1-base-size ``UNet2DConditionModel`` (866M parameters, 64x64x4 latents, the
published config written out below) with RANDOM weights (the architecture sets the cost; nothing
is downloaded) and a realistic upstream: a voxel field rendered at ``--render-size``, bilinearly
upsampled to 512x512 and encoded by an ``AutoencoderKL`` encoder of SD's config (as threestudio
does). One run reports:

(a) teacher throughput inside CARV (``objective.evaluate``: noising, guidance, weights) against
    the raw diffusers UNet forward at the same batch (guidance doubling both);
(b) one CARV SVI step against a hand-written torch loop of the same math (overhead ratio), with
    the GPU-busy fraction of each from the profiler and the host synchronisations in a step;
(c) the measured ``c_outer`` / ``c_inner``, ``V_b`` / ``V_w``, the accountant's ``K*`` and
    predicted ECM (`carv_pyro.measure.measure`);
(d) peak GPU memory against ``K`` (and with chunking, ``max_batch``);
(e) the teacher's time per draw against its FLOP floor (FLOPs counted with
    ``torch.utils.flop_counter``; the floor at the bf16 matmul rate measured in the same run),
    with channels_last, the attention kernel and ``torch.compile`` on and off, and the library's
    own option (``DiffusersTeacher(..., compile={"mode": m})``) inside CARV's teacher
    evaluation for each mode in ``--compile-modes``.

Writes ``<out>/gpu_<card>.md`` and ``.json`` (``cpu_quick`` on a CPU) with card, date and command.

    python examples/gpu_bench.py --device cuda --dtype bf16 --out benchmarks
    python examples/gpu_bench.py --device cpu --quick          # tiny sizes: a smoke test
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import math
import platform
import re
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import pyro
import torch
import torch.nn.functional as F
from pyro.infer import SVI

import carv_pyro as carv
from carv_pyro.measure import measure
from carv_pyro.pipelines.render import VoxelField, render
from carv_pyro.pipelines.text_to_3d import SeededUniform

#: Stable Diffusion 2.1-base (512 px) UNet, as published in its ``unet/config.json``.
SD21_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=(
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    only_cross_attention=False,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
    upcast_attention=False,
    dual_cross_attention=False,
    class_embed_type=None,
    num_class_embeds=None,
    resnet_time_scale_shift="default",
)
#: Stable Diffusion's VAE (``vae/config.json``); only the encoder is used (the upstream).
SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
#: SD 2.1-base's scheduler (epsilon prediction, scaled-linear betas).
SD21_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    steps_offset=1,
    prediction_type="epsilon",
)
TEXT_TOKENS = 77

#: Tiny stand-ins for ``--quick`` (a CPU smoke test of every code path).
TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=32,
    attention_head_dim=(2, 4),
    use_linear_projection=True,
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 16, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=64,
    scaling_factor=0.18215,
)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ------------------------------------------------------------------------------------- timing


def si(x: float) -> str:
    """``1.61e12 -> '1.61 T'``."""
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}"
    return f"{x:.3g} "


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device: torch.device, reps: int, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` over ``reps`` calls after ``warmup`` (CUDA events on GPUs)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_rate(device: torch.device, dtype: torch.dtype, quick: bool) -> float:
    """Measured dense matmul FLOP/s in ``dtype`` (the ceiling for the FLOP floor)."""
    n = 512 if quick or device.type != "cuda" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = time_fn(lambda: a @ b, device, reps=10 if device.type == "cuda" else 3, warmup=3)
    return 2 * n**3 / seconds


# ------------------------------------------------------------------------------------- setup


class Bench:
    """The teacher, the upstream and the SDS model at one size."""

    def __init__(self, args: argparse.Namespace):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        self.args = args
        self.device = torch.device(args.device)
        self.dtype = DTYPES[args.dtype]
        unet_cfg = TINY_UNET if args.quick else SD21_UNET
        vae_cfg = TINY_VAE if args.quick else SD_VAE
        # seeded random weights; the global RNG is left as it was
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.device(self.device):
            torch.manual_seed(0)
            self.unet = UNet2DConditionModel(**unet_cfg)
            self.vae = AutoencoderKL(**vae_cfg)
        torch.nn.Module.to(self.unet, dtype=self.dtype).eval().requires_grad_(False)
        torch.nn.Module.to(self.vae, dtype=self.dtype).eval().requires_grad_(False)
        self.n_params = sum(p.numel() for p in self.unet.parameters())
        self.scheduler = DDPMScheduler(**SD21_SCHEDULER)
        width = unet_cfg["cross_attention_dim"]
        tokens = 8 if args.quick else TEXT_TOKENS
        g = torch.Generator().manual_seed(1)
        # random prompt embeddings stand in for the text encoder's output (its cost is paid once)
        self.cond = torch.randn(tokens, width, generator=g).to(self.device)
        null = torch.randn(tokens, width, generator=g).to(self.device)
        self.teacher = carv.teachers.DiffusersTeacher(
            self.unet, self.scheduler, dtype=self.dtype, null_encoder_hidden_states=null
        )
        # DiffusersTeacher.to moves the UNet only; keep the null conditioning on the device
        self.teacher.null_encoder_hidden_states = null
        self.objective = carv.SDS(self.teacher, guidance_scale=args.guidance_scale)
        self.latent_shape = tuple(self.teacher.event_shape)
        self.image_size = int(vae_cfg["sample_size"])
        self.render_size = 16 if args.quick else args.render_size
        self.n_samples = 16 if args.quick else args.n_samples
        self.field = VoxelField(resolution=16 if args.quick else 64, channels=3, seed=0).to(
            self.device
        )
        # the cameras' draws (the model's prior and the hand loop's) come from generators on the
        # device: reproducible, and no host-to-device copy in a step
        self.camera_generator = torch.Generator(self.device).manual_seed(1)
        self.hand_generator = torch.Generator(self.device).manual_seed(2)

    # -- the upstream: render -> upsample -> VAE encoder mean * scaling factor
    def upstream(self, field, azimuth, elevation):
        """``(R, 1)`` camera angles -> ``(R, 1, 4, h, w)`` latents (fp32, differentiable)."""
        images = render(
            field, azimuth, elevation, image_size=self.render_size, n_samples=self.n_samples
        )  # (R, 1, 3, r, r)
        flat = images.flatten(0, 1)
        if self.render_size != self.image_size:
            flat = F.interpolate(
                flat, (self.image_size, self.image_size), mode="bilinear", align_corners=False
            )
        post = self.vae.encode(flat.to(self.dtype)).latent_dist
        latents = (post.mean * self.vae.config.scaling_factor).float()
        return latents.reshape(images.shape[:2] + latents.shape[1:])

    def cameras(self, shape):
        lo, hi = math.radians(-10.0), math.radians(30.0)
        g = self.hand_generator
        az = (torch.rand(shape, device=self.device, generator=g) * 2 - 1) * math.pi
        el = lo + (hi - lo) * torch.rand(shape, device=self.device, generator=g)
        return az, el

    def model(self, R: int, K: int):
        pyro.module("field", self.field)
        zero = torch.zeros((), device=self.device)
        g = self.camera_generator
        # validate_args=False: the bounds are ours; with Pyro's validation on (its default),
        # checking them would read back from the GPU at every step (the library's own sites
        # never validate)
        lo, hi = math.radians(-10.0), math.radians(30.0)
        with pyro.plate("views", R, dim=-2):
            az = pyro.sample(
                "azimuth",
                SeededUniform(zero - math.pi, zero + math.pi, g, validate_args=False),
            )
            el = pyro.sample(
                "elevation", SeededUniform(zero + lo, zero + hi, g, validate_args=False)
            )
            latents = self.upstream(self.field, az, el)  # (R, 1, 4, h, w)
            with carv.draws(K, dim=-1):  # the reserved inner plate
                carv.teacher_term("sds", self.objective, latents, cond=self.cond)

    # -- raw diffusers forward with guidance doubling
    def raw_inputs(self, n: int):
        x = torch.randn((2 * n,) + self.latent_shape, device=self.device, dtype=self.dtype)
        t = torch.randint(20, 980, (2 * n,), device=self.device)
        ehs = torch.cat(
            [
                self.teacher.null_encoder_hidden_states.expand(n, -1, -1),
                self.cond.expand(n, -1, -1),
            ]
        ).to(self.dtype)
        return x, t, ehs

    def raw_forward(self, x, t, ehs):
        with torch.no_grad():
            return self.unet(x, t, encoder_hidden_states=ehs, return_dict=False)[0]

    def carv_inputs(self, n: int):
        x = torch.randn((n,) + self.latent_shape, device=self.device)
        t = self.objective.prior.sample((n,)).to(self.device)
        eps = torch.randn_like(x)
        cond = self.cond.expand(n, -1, -1)
        return x, t, eps, cond


def hand_written_step_factory(b: Bench, R: int, K: int):
    """The same SDS step in plain torch: render, encode, one guided UNet call, backward, Adam."""
    field = VoxelField(resolution=b.field.resolution, channels=3, seed=0).to(b.device)
    opt = torch.optim.Adam(field.parameters(), lr=1e-2)
    sched = b.objective.schedule
    lo, hi = b.objective.prior.low, b.objective.prior.high
    alpha = sched._alpha.float().to(b.device)
    sigma = sched._sigma.float().to(b.device)
    weight = (sigma**2).float()  # SDS weighting 1 - alphabar
    null = b.teacher.null_encoder_hidden_states.to(b.dtype).expand(R * K, -1, -1)
    cond = b.cond.to(b.dtype).expand(R * K, -1, -1)
    ehs = torch.cat([null, cond])
    s = b.args.guidance_scale
    view = (-1, 1, 1, 1)

    def step():
        opt.zero_grad(set_to_none=True)
        az, el = b.cameras((R, 1))
        latents = b.upstream(field, az, el)  # (R, 1, 4, h, w)
        x = latents.expand(R, K, *b.latent_shape).reshape(R * K, *b.latent_shape)
        g = b.hand_generator
        t = torch.randint(lo, hi + 1, (R * K,), device=b.device, generator=g)
        eps = torch.randn(x.shape, device=b.device, dtype=x.dtype, generator=g)
        with torch.no_grad():
            x_t = alpha[t].view(view) * x + sigma[t].view(view) * eps
            inp = torch.cat([x_t, x_t]).to(b.dtype)
            e = b.unet(inp, torch.cat([t, t]), encoder_hidden_states=ehs, return_dict=False)[0]
            e_u, e_c = e.float().chunk(2)
            h = weight[t].view(view) * (e_u + s * (e_c - e_u) - eps)
        surrogate = (x * h).sum() / (R * K)
        surrogate.backward()
        opt.step()

    return step


def carv_step_factory(b: Bench, R: int, K: int, loss=None):
    pyro.clear_param_store()
    # K uniform (t, eps) draws per view, as the hand-written loop draws them
    estimator = carv.Estimator.preset("reuse", K=K)
    guide = estimator.guide(b.model, seed=3)
    loss = loss or estimator.loss()
    svi = SVI(b.model, guide, pyro.optim.Adam({"lr": 1e-2}), loss=loss)
    return (lambda: svi.step(R, K)), loss, guide


# ------------------------------------------------------------------------------------- sections


def section_floor(b: Bench, res: dict) -> None:
    """FLOPs of one guided draw and the FLOP floor at the measured matmul rate."""
    from torch.utils.flop_counter import FlopCounterMode

    x, t, ehs = b.raw_inputs(1)
    with FlopCounterMode(display=False) as counter:
        b.raw_forward(x, t, ehs)
    flops = counter.get_total_flops()
    rate = matmul_rate(b.device, b.dtype, b.args.quick)
    res["floor"] = {
        "flops_per_guided_draw": flops,
        "matmul_flops_per_s": rate,
        "floor_ms_per_draw": flops / rate * 1e3,
        "unet_params": b.n_params,
    }
    log(
        f"floor: {si(flops)}FLOP per guided draw, matmul {si(rate)}FLOP/s "
        f"-> {flops / rate * 1e3:.3f} ms/draw"
    )


def section_throughput(b: Bench, res: dict) -> None:
    """(a) raw UNet vs the teacher inside CARV, ms per draw, by batch."""
    rows = []
    for n in b.args.batches:
        raw_in = b.raw_inputs(n)
        raw = time_fn(lambda raw_in=raw_in: b.raw_forward(*raw_in), b.device, b.args.reps)
        carv_in = b.carv_inputs(n)
        inside = time_fn(
            lambda carv_in=carv_in: b.objective.evaluate(*carv_in), b.device, b.args.reps
        )
        row = {
            "draws": n,
            "unet_rows": 2 * n,
            "raw_ms_per_draw": raw / n * 1e3,
            "carv_ms_per_draw": inside / n * 1e3,
            "carv_vs_raw_throughput": raw / inside,
        }
        rows.append(row)
        log(
            f"(a) batch {n}: raw {row['raw_ms_per_draw']:.3f} ms/draw, carv "
            f"{row['carv_ms_per_draw']:.3f} ms/draw ({row['carv_vs_raw_throughput']:.1%})"
        )
    res["throughput"] = rows


def _set_attention(unet, kind: str) -> None:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor() if kind == "classic" else AttnProcessor2_0())


def _memory_format(unet, channels_last: bool) -> None:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.nn.Module.to(unet, memory_format=fmt)


def section_options(b: Bench, res: dict) -> None:
    """(e) channels_last, attention kernel, torch.compile: on and off."""
    n_big = b.args.batches[-1]
    n_small = b.args.attention_batch
    rows = []

    def run(name, n, inside=False):
        if inside:
            carv_in = b.carv_inputs(n)
            sec = time_fn(lambda: b.objective.evaluate(*carv_in), b.device, b.args.reps)
        else:
            raw_in = b.raw_inputs(n)
            sec = time_fn(lambda: b.raw_forward(*raw_in), b.device, b.args.reps)
        ms = sec / n * 1e3
        floor = res.get("floor", {}).get("floor_ms_per_draw", math.nan)
        rows.append(
            {
                "option": name,
                "draws": n,
                "path": "CARV teacher" if inside else "raw UNet",
                "ms_per_draw": ms,
                "floor_fraction": floor / ms,
            }
        )
        log(
            f"(e) {name} @ {n} draws ({rows[-1]['path']}): {ms:.3f} ms/draw, {floor / ms:.1%} of floor"
        )

    # attention kernels at a batch where the classic (materialised) attention fits in memory
    run("eager, SDPA (AttnProcessor2_0, default)", n_small)
    _set_attention(b.unet, "classic")
    try:
        run("eager, classic attention (AttnProcessor, no SDPA)", n_small)
    except torch.OutOfMemoryError:
        rows.append({"option": "classic attention", "draws": n_small, "error": "out of memory"})
    finally:
        _set_attention(b.unet, "sdpa")
    if b.device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for backend in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
            try:
                with sdpa_kernel(getattr(SDPBackend, backend)):
                    run(f"eager, SDPA forced to {backend.lower()}", n_small)
            except Exception as e:  # a backend may not support the shapes
                rows.append({"option": f"SDPA {backend.lower()}", "error": repr(e)[:200]})
    run("eager, SDPA, NCHW", n_big)
    _memory_format(b.unet, True)
    run("eager, SDPA, channels_last", n_big)
    best_cl = rows[-1]["ms_per_draw"] < rows[-2]["ms_per_draw"]
    _memory_format(b.unet, best_cl)
    if b.args.compile:
        try:
            t0 = time.perf_counter()
            b.unet.compile()
            raw_in = b.raw_inputs(n_big)
            b.raw_forward(*raw_in)
            sync(b.device)
            res["compile_seconds"] = time.perf_counter() - t0
            log(f"(e) compiled in {res['compile_seconds']:.0f} s")
            fmt = "channels_last" if best_cl else "NCHW"
            run(f"torch.compile, SDPA, {fmt}", n_big)
            run(f"torch.compile, SDPA, {fmt}", n_big, inside=True)
        except Exception as e:
            rows.append({"option": "torch.compile", "error": repr(e)[:300]})
            log(f"(e) torch.compile failed: {e!r}"[:300])
        finally:
            b.unet._compiled_call_impl = None  # back to eager for the other sections
    fmt = "channels_last" if best_cl else "NCHW"
    for mode in b.args.compile_modes if b.device.type == "cuda" or b.args.compile else ():
        _library_compile_row(b, res, rows, mode, n_big, fmt)
    _memory_format(b.unet, False)
    res["options"] = rows


def _library_compile_row(b: Bench, res: dict, rows: list, mode: str, n: int, fmt: str) -> None:
    """One row of (e): the teacher built with the library's ``compile=`` option, timed inside
    CARV's teacher evaluation (noising, guidance rows fused into one call, weights)."""
    option = True if mode == "default" else {"mode": mode}
    teacher = carv.teachers.DiffusersTeacher(
        b.unet,
        b.scheduler,
        dtype=b.dtype,
        null_encoder_hidden_states=b.teacher.null_encoder_hidden_states,
        compile=option,
    )
    objective = carv.SDS(teacher, guidance_scale=b.args.guidance_scale)
    carv_in = b.carv_inputs(n)
    name = f"library compile={option!r}, SDPA, {fmt}"
    try:
        t0 = time.perf_counter()
        objective.evaluate(*carv_in)
        sync(b.device)
        seconds = time.perf_counter() - t0
        res.setdefault("library_compile_seconds", {})[mode] = seconds
        log(f"(e) library compile mode {mode}: compiled in {seconds:.0f} s")
        sec = time_fn(lambda: objective.evaluate(*carv_in), b.device, b.args.reps)
    except Exception as e:  # a mode may fail on a machine (e.g. no Triton)
        rows.append({"option": name, "error": repr(e)[:300]})
        log(f"(e) {name} failed: {e!r}"[:300])
        return
    finally:
        torch._dynamo.reset()  # each mode compiles afresh; none leaks into later sections
    ms = sec / n * 1e3
    floor = res.get("floor", {}).get("floor_ms_per_draw", math.nan)
    rows.append(
        {
            "option": name,
            "draws": n,
            "path": "CARV teacher",
            "ms_per_draw": ms,
            "floor_fraction": floor / ms,
        }
    )
    log(f"(e) {name} @ {n} draws (CARV teacher): {ms:.3f} ms/draw, {floor / ms:.1%} of floor")


def _sync_locations(fn) -> list[tuple[str, int]]:
    """Host synchronisations in ``fn()`` (CUDA sync debug mode), by source line."""
    counts: collections.Counter = collections.Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message):
            where = f"{Path(w.filename).parent.name}/{Path(w.filename).name}:{w.lineno}"
            counts[where] += 1
    return counts.most_common()


def _busy_fraction(fn, device) -> dict:
    """GPU kernel time / wall time of one call of ``fn`` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    # kernels (and copies) are the device-side events; operators only launch them
    kernel_us = sum(e.device_time_total for e in events if e.device_type.name == "CUDA")
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    return {
        "wall_ms": wall * 1e3,
        "gpu_kernel_ms": kernel_us / 1e3,
        "gpu_busy_fraction": kernel_us / 1e6 / wall if device.type == "cuda" else math.nan,
        "top_cpu_ops": [(e.key, round(e.self_cpu_time_total / 1e3, 3), e.count) for e in top],
    }


def section_overhead(b: Bench, res: dict) -> None:
    """(b) one CARV SVI step vs the hand-written torch loop."""
    R, K = b.args.R, b.args.K
    hand = hand_written_step_factory(b, R, K)
    step, loss, _ = carv_step_factory(b, R, K)
    t_hand = time_fn(hand, b.device, b.args.step_reps, warmup=2)
    t_carv = time_fn(step, b.device, b.args.step_reps, warmup=2)
    # again in the other order (drift, clocks), then take the mean of both
    t_hand2 = time_fn(hand, b.device, b.args.step_reps, warmup=1)
    t_carv2 = time_fn(step, b.device, b.args.step_reps, warmup=1)
    spread = abs(t_hand2 / t_hand - 1)
    t_hand, t_carv = (t_hand + t_hand2) / 2, (t_carv + t_carv2) / 2
    teacher_in_step = loss.last_records[0].teacher_time.seconds()
    out = {
        "R": R,
        "K": K,
        "hand_ms": t_hand * 1e3,
        "carv_ms": t_carv * 1e3,
        "overhead": t_carv / t_hand - 1.0,
        "teacher_ms_in_carv_step": teacher_in_step * 1e3,
        "spread_hand": spread,
    }
    log(
        f"(b) R={R} K={K}: hand {out['hand_ms']:.1f} ms, CARV {out['carv_ms']:.1f} ms, "
        f"overhead {out['overhead']:+.1%}"
    )
    out["profile_carv"] = _busy_fraction(step, b.device)
    out["profile_hand"] = _busy_fraction(hand, b.device)
    if b.device.type == "cuda":
        out["host_syncs_carv"] = _sync_locations(step)
        out["host_syncs_hand"] = _sync_locations(hand)
        # the library reads nothing back inside a step (CARVLoss(checks=None), the default):
        # expect 0 here (tests/test_gpu.py checks it under sync debug mode "error")
        log(f"(b) host syncs in one CARV step: {sum(c for _, c in out['host_syncs_carv'])}")
    res["overhead"] = out


def section_accounting(b: Bench, res: dict) -> None:
    """(c) V_b, V_w, c_outer, c_inner, K*, ECM from carv_pyro.measure.measure."""
    R, K = b.args.R, b.args.K
    pyro.clear_param_store()
    guide = carv.Estimator.preset("reuse", K=K).guide(b.model, seed=4)
    ks = [k for k in (1, 2, 4, 8, 16, 32) if R * k <= 2 * b.args.batches[-1]]
    report = measure(
        b.model,
        guide,
        R,
        K,
        loss=carv.CARVLoss(),
        n_repeats=b.args.measure_repeats,
        candidate_ks=ks,
        n_timing=3,
        warmup=1,
    )
    # an independent measurement of the upstream: forward + backward per view
    field = b.field

    def upstream_fb():
        az, el = b.cameras((R, 1))
        b.upstream(field, az, el).square().mean().backward()

    c_outer_direct = time_fn(upstream_fb, b.device, reps=3, warmup=1) / R
    field.zero_grad(set_to_none=True)
    out = {
        "R": R,
        "K": K,
        "v_between": report.v_between,
        "v_within": report.v_within,
        "c_outer_ms": report.c_outer * 1e3,
        "c_outer_direct_ms": c_outer_direct * 1e3,
        "c_inner_ms": report.c_inner * 1e3,
        "k_star_linear": report.k_star,
        "teacher_ms_by_K": {k: v * 1e3 for k, v in report.teacher_seconds.items()},
        "ecm_by_K": {k: report.ecm(k) for k in report.teacher_seconds},
        "table": report.table(),
    }
    best = max(out["ecm_by_K"], key=out["ecm_by_K"].get) if out["ecm_by_K"] else None
    out["best_K_measured_cost"] = best
    log(
        f"(c) c_outer {out['c_outer_ms']:.2f} ms (direct {out['c_outer_direct_ms']:.2f}), "
        f"c_inner {out['c_inner_ms']:.3f} ms, K* {out['k_star_linear']:.3g}, best K {best}"
    )
    res["accounting"] = out


def section_memory(b: Bench, res: dict) -> None:
    """(d) peak memory of one CARV step against K (and with max_batch chunking)."""
    R = b.args.R
    rows = []
    settings = [(k, None) for k in b.args.memory_ks]
    settings.append((b.args.memory_ks[-1], b.args.memory_chunk))
    for k, max_batch in settings:
        b.teacher.max_batch = max_batch
        step, _, _ = carv_step_factory(b, R, k)
        try:
            step()  # warm
            sync(b.device)
            if b.device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(b.device)
                base = torch.cuda.memory_allocated(b.device)
            t = time_fn(step, b.device, reps=2, warmup=0)
            peak = torch.cuda.max_memory_allocated(b.device) if b.device.type == "cuda" else 0
            rows.append(
                {
                    "K": k,
                    "max_batch": max_batch,
                    "draws": R * k,
                    "peak_GiB": peak / 2**30,
                    "step_peak_over_resident_GiB": (peak - base) / 2**30
                    if b.device.type == "cuda"
                    else math.nan,
                    "step_ms": t * 1e3,
                    "ms_per_draw": t / (R * k) * 1e3,
                }
            )
            log(f"(d) K={k} max_batch={max_batch}: peak {peak / 2**30:.2f} GiB, {t * 1e3:.0f} ms")
        except torch.OutOfMemoryError:
            rows.append({"K": k, "max_batch": max_batch, "error": "out of memory"})
        finally:
            b.teacher.max_batch = None
    res["memory"] = rows


# ------------------------------------------------------------------------------------- report


def card_name(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    m = re.search(r"(H100|H200|A100|L40S?|A10G?|V100|T4|L4|RTX\s*\w+)", name)
    return (m.group(1) if m else name).lower().replace(" ", "")


def fmt(v, spec=".3g") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else format(v, spec)
    return str(v)


def markdown(res: dict) -> str:
    m = res["meta"]
    lines = [
        f"# carv-pyro GPU benchmark: {m['card']}",
        "",
        f"- date: {m['date']}",
        f"- command: `{m['command']}`",
        f"- device: {m['device_name']}; torch {m['torch']}, diffusers {m['diffusers']}, "
        f"python {m['python']}",
        f"- teacher: {m['teacher']}; dtype {m['dtype']}; guidance scale {m['guidance_scale']} "
        f"(classifier-free guidance doubles the UNet batch); random weights",
        f"- upstream: {m['upstream']}",
        "",
    ]
    fl = res.get("floor")
    if fl:
        lines += [
            "## FLOP floor",
            "",
            f"{si(fl['flops_per_guided_draw'])}FLOP per guided draw (2 UNet rows; "
            f"`torch.utils.flop_counter`), dense {m['dtype']} matmul measured at "
            f"{si(fl['matmul_flops_per_s'])}FLOP/s -> floor "
            f"**{fl['floor_ms_per_draw']:.3f} ms per draw**. UNet parameters: "
            f"{fl['unet_params'] / 1e6:.0f}M.",
            "",
        ]
    if res.get("throughput"):
        floor = (fl or {}).get("floor_ms_per_draw", math.nan)
        lines += [
            "## (a) Teacher throughput: inside CARV vs raw diffusers UNet (same batch)",
            "",
            "| draws | UNet rows | raw UNet ms/draw | CARV teacher ms/draw | CARV / raw throughput "
            "| raw % of floor |",
            "| ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in res["throughput"]:
            lines.append(
                f"| {r['draws']} | {r['unet_rows']} | {r['raw_ms_per_draw']:.3f} | "
                f"{r['carv_ms_per_draw']:.3f} | {r['carv_vs_raw_throughput']:.1%} | "
                f"{floor / r['raw_ms_per_draw']:.1%} |"
            )
        lines.append("")
    if res.get("options"):
        lines += [
            "## (e) Time per draw against the FLOP floor: options on and off",
            "",
            "| option | draws | path | ms/draw | % of floor |",
            "| --- | ---: | --- | ---: | ---: |",
        ]
        for r in res["options"]:
            if "error" in r:
                lines.append(f"| {r['option']} | {r.get('draws', '-')} | error: {r['error']} | | |")
                continue
            lines.append(
                f"| {r['option']} | {r['draws']} | {r['path']} | {r['ms_per_draw']:.3f} | "
                f"{r['floor_fraction']:.1%} |"
            )
        if "compile_seconds" in res:
            lines.append(f"\ntorch.compile took {res['compile_seconds']:.0f} s (first call).")
        lines.append("")
    ov = res.get("overhead")
    if ov:
        pc, ph = ov["profile_carv"], ov["profile_hand"]
        lines += [
            "## (b) One CARV SVI step vs a hand-written torch loop of the same math",
            "",
            f"R = {ov['R']} views, K = {ov['K']} draws each (one guided UNet call of "
            f"{2 * ov['R'] * ov['K']} rows), Adam on the voxel field.",
            "",
            "| | ms/step | GPU busy (profiler) |",
            "| --- | ---: | ---: |",
            f"| hand-written torch | {ov['hand_ms']:.2f} | {fmt(ph['gpu_busy_fraction'], '.1%')} |",
            f"| CARV (`SVI.step`, `Estimator.guide`, `CARVLoss`) | {ov['carv_ms']:.2f} | "
            f"{fmt(pc['gpu_busy_fraction'], '.1%')} |",
            "",
            f"Overhead of the Pyro plumbing: **{ov['overhead']:+.1%}** of a step (run-to-run "
            f"spread of the hand loop {ov['spread_hand']:.1%}). Teacher time inside the CARV step "
            f"(CUDA events around the batched call): {ov['teacher_ms_in_carv_step']:.1f} ms.",
            "",
        ]
        if ov.get("host_syncs_carv") is not None:
            lines += [
                "Host synchronisations in one step (`torch.cuda.set_sync_debug_mode('warn')`): "
                f"CARV {sum(c for _, c in ov['host_syncs_carv'])}, hand-written "
                f"{sum(c for _, c in ov['host_syncs_hand'])}.",
                "",
                "| where (CARV step) | count |",
                "| --- | ---: |",
            ]
            lines += [f"| `{w}` | {c} |" for w, c in ov["host_syncs_carv"]]
            lines.append("")
        lines += ["Top host-side ops of one CARV step (self CPU ms, calls):", ""]
        lines += [f"- `{k}`: {ms} ms x {n}" for k, ms, n in pc["top_cpu_ops"]]
        lines.append("")
    ac = res.get("accounting")
    if ac:
        lines += [
            "## (c) Accounting at this scale (`carv_pyro.measure.measure`)",
            "",
            f"At R = {ac['R']}, K = {ac['K']}: c_outer = {ac['c_outer_ms']:.2f} ms per view "
            f"(timed directly: {ac['c_outer_direct_ms']:.2f} ms, render + VAE encoder forward "
            f"and backward), c_inner = {ac['c_inner_ms']:.3f} ms per draw, V_b = "
            f"{ac['v_between']:.3g}, V_w = {ac['v_within']:.3g} (random weights: the variance "
            f"ratio is illustrative; the costs are real). Linear-cost K* = "
            f"{ac['k_star_linear']:.3g}; best K under the measured batch costs: "
            f"**{ac['best_K_measured_cost']}**.",
            "",
            "| K | teacher ms per call (R K draws) | predicted ECM vs K = 1 |",
            "| ---: | ---: | ---: |",
        ]
        for k, ms in ac["teacher_ms_by_K"].items():
            lines.append(f"| {k} | {ms:.2f} | {ac['ecm_by_K'][k]:.3g} |")
        lines.append("")
    if res.get("memory"):
        lines += [
            "## (d) Peak GPU memory of one CARV step against K",
            "",
            "| K | max_batch | draws | peak GiB | step peak over resident GiB | ms/step | ms/draw |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in res["memory"]:
            if "error" in r:
                lines.append(f"| {r['K']} | {r['max_batch']} | | {r['error']} | | | |")
                continue
            lines.append(
                f"| {r['K']} | {fmt(r['max_batch'])} | {r['draws']} | {r['peak_GiB']:.2f} | "
                f"{fmt(r['step_peak_over_resident_GiB'], '.2f')} | {r['step_ms']:.1f} | "
                f"{r['ms_per_draw']:.2f} |"
            )
        lines.append("")
    if res.get("errors"):
        lines += ["## Errors", ""] + [f"- {k}: `{v}`" for k, v in res["errors"].items()] + [""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke test)")
    p.add_argument("--out", default="benchmarks", help="folder for the .md and .json")
    p.add_argument("--sections", default="floor,a,e,b,c,d")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="draws per call for (a)")
    p.add_argument("--attention-batch", type=int, default=None)
    p.add_argument("--R", type=int, default=None, help="views per step for (b), (c), (d)")
    p.add_argument("--K", type=int, default=None, help="draws per view for (b), (c)")
    p.add_argument("--memory-ks", type=int, nargs="+", default=None)
    p.add_argument("--memory-chunk", type=int, default=None, help="max_batch rows for (d)")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--step-reps", type=int, default=None)
    p.add_argument("--measure-repeats", type=int, default=None)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--render-size", type=int, default=128)
    p.add_argument("--n-samples", type=int, default=64)
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure torch.compile in (e) (default: on CUDA only; slow to compile on a CPU)",
    )
    p.add_argument(
        "--compile-modes",
        type=lambda v: [m for m in v.split(",") if m],
        default=["default", "max-autotune-no-cudagraphs", "reduce-overhead"],
        help="modes of the library's compile= option timed in (e), comma-separated; 'default' "
        "is compile=True (each compiles the UNet afresh: about a minute for SD-2.1 on a GPU, "
        "several for max-autotune-no-cudagraphs)",
    )
    args = p.parse_args(argv)
    quick = args.quick
    defaults = dict(
        batches=[1, 4] if quick else [1, 8, 32, 64],
        attention_batch=2 if quick else 8,
        R=2 if quick else 4,
        K=2 if quick else 8,
        memory_ks=[1, 2] if quick else [1, 2, 4, 8, 16, 32],
        memory_chunk=4 if quick else 64,
        reps=2 if quick else 10,
        step_reps=2 if quick else 8,
        measure_repeats=2 if quick else 8,
    )
    defaults["compile"] = args.device.startswith("cuda")
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1 if args.quick else torch.get_num_threads())
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    import diffusers

    log(f"building ({'tiny' if args.quick else 'SD 2.1 size'}) on {device}")
    b = Bench(args)
    res: dict = {
        "meta": {
            "card": card_name(device),
            "device_name": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or "cpu",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python " + " ".join(sys.argv) if argv is None else " ".join(argv),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "python": platform.python_version(),
            "dtype": args.dtype,
            "guidance_scale": args.guidance_scale,
            "teacher": ("tiny UNet2DConditionModel" if args.quick else "SD 2.1-base UNet")
            + f" ({b.n_params / 1e6:.1f}M params), latents {b.latent_shape}",
            "upstream": f"VoxelField render at {b.render_size}x{b.render_size} "
            f"({b.n_samples} samples/ray) -> bilinear to {b.image_size}x{b.image_size} -> "
            f"AutoencoderKL encoder ({'tiny' if args.quick else 'SD config'}, {args.dtype}) mean x "
            f"0.18215",
            "args": vars(args),
        },
        "errors": {},
    }
    sections = {
        "floor": section_floor,
        "a": section_throughput,
        "e": section_options,
        "b": section_overhead,
        "c": section_accounting,
        "d": section_memory,
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"gpu_{res['meta']['card']}" if device.type == "cuda" else "cpu_quick"
    for key in args.sections.split(","):
        t0 = time.perf_counter()
        try:
            sections[key](b, res)
        except Exception as e:
            res["errors"][key] = repr(e)[:500]
            traceback.print_exc()
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()
        log(f"section {key} done in {time.perf_counter() - t0:.1f} s")
        # write after every section, so that a run cut short keeps what it measured
        (out_dir / f"{stem}.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
        (out_dir / f"{stem}.md").write_text(markdown(res) + "\n")
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
