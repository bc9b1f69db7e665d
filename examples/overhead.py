"""Overhead of CARVLoss against a hand-written torch loop of the same math.

Both compute the SDS gradient of an upstream ``x = tanh(theta + xi * basis)`` with ``R`` upstream
samples and ``K`` uniform ``(t, eps)`` draws each, one batched teacher call of ``R * K`` draws, and
one backward pass. The teacher is a class-conditional diffusers ``UNet2DModel`` at 16x16 (the
embedded teacher's architecture, random weights). The two are timed interleaved (A, B, A, B, ...)
so that machine load hits both alike; the table reports medians.

    python examples/overhead.py --R 4 --K 8 --repeats 50
    python examples/overhead.py --profile 200    # where a CARV step's time goes (cProfile)
    python examples/overhead.py --stub-teacher --repeats 300   # the fixed cost alone
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time

import pyro
import pyro.distributions as dist
import torch
from diffusers import DDPMScheduler, UNet2DModel

import carv_pyro as carv
from carv_pyro.teachers import DiffusersTeacher


def build_teacher(seed: int = 0) -> DiffusersTeacher:
    with torch.random.fork_rng():  # seeded weights, the global RNG left as it was
        torch.manual_seed(seed)
        unet = UNet2DModel(
            sample_size=16,
            in_channels=1,
            out_channels=1,
            block_out_channels=(16, 32, 32),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
            num_class_embeds=11,
            norm_num_groups=8,
        )
    return DiffusersTeacher(unet, DDPMScheduler(num_train_timesteps=1000))


class FreeUNet(torch.nn.Module):
    """A teacher network that costs nothing (``eps_hat = x_t / 2``): with it, both loops time
    only their own work, so the fixed cost is measured without the UNet's run-to-run noise
    (``--stub-teacher``)."""

    def __init__(self) -> None:
        super().__init__()
        # one frozen parameter: the teacher reads the network's device and dtype from it
        self.anchor = torch.nn.Parameter(torch.zeros(()), requires_grad=False)

    def forward(self, x, t, class_labels=None, return_dict=True):
        out = x * 0.5
        return (out,) if not return_dict else argparse.Namespace(sample=out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--R", type=int, default=4)
    parser.add_argument("--K", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N", help="also profile N CARV steps (cProfile)"
    )
    parser.add_argument(
        "--stub-teacher",
        action="store_true",
        help="a free teacher network in both loops: the fixed cost alone, without UNet noise",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    R, K = args.R, args.K

    teacher = build_teacher()
    n_params = sum(p.numel() for p in teacher.unet.parameters())
    if args.stub_teacher:
        teacher.unet = FreeUNet()
    objective = carv.SDS(teacher, weighting="sds")
    label = torch.tensor(3)
    g = torch.Generator().manual_seed(1)
    basis = torch.randn(1, 16, 16, generator=g) * 0.3

    # -- the Pyro way ---------------------------------------------------------------------
    def model():
        theta = pyro.param("theta", torch.zeros(1, 16, 16))
        with pyro.plate("views", R, dim=-2):
            xi = pyro.sample("xi", dist.Normal(0.0, 1.0))
            x = torch.tanh(theta + xi[..., None, None, None] * basis)  # (R, 1, 1, 16, 16)
            with carv.draws(K, dim=-1):
                carv.teacher_term("sds", objective, x, cond=label)

    # the "reuse" preset: K uniform (t, eps) draws per upstream sample, as the hand loop draws
    estimator = carv.Estimator.preset("reuse", K=K)
    guide = estimator.guide(model, seed=2)
    loss = estimator.loss()
    theta = pyro.param("theta", torch.zeros(1, 16, 16)).unconstrained()

    def carv_step():
        theta.grad = None
        loss.loss_and_grads(model, guide)

    # -- by hand ---------------------------------------------------------------------------
    prior = objective.prior
    schedule = teacher.schedule
    theta_h = torch.zeros(1, 16, 16, requires_grad=True)

    def hand_step():
        theta_h.grad = None
        xi = torch.randn(R, 1, generator=g)
        x = torch.tanh(theta_h + xi[..., None, None, None] * basis)  # (R, 1, 1, 16, 16)
        t = torch.randint(prior.low, prior.high + 1, (R, K), generator=g)
        eps = torch.randn(R, K, 1, 16, 16, generator=g)
        xr = x.expand(R, K, 1, 16, 16).reshape(R * K, 1, 16, 16)
        tf = t.reshape(-1)
        a = schedule.alpha(tf).reshape(-1, 1, 1, 1)
        s = schedule.sigma(tf).reshape(-1, 1, 1, 1)
        with torch.no_grad():
            x_t = a * xr + s * eps.reshape(R * K, 1, 16, 16)
            eps_hat = teacher.unet(x_t, tf, class_labels=label.expand(R * K)).sample
            h = (s * s) * (eps_hat - eps.reshape(R * K, 1, 16, 16))
        ((xr * h).sum() / (R * K)).backward()

    # the teacher call alone, for scale
    x_t = torch.randn(R * K, 1, 16, 16, generator=g)
    tt = torch.randint(0, 1000, (R * K,), generator=g)

    def teacher_only():
        with torch.no_grad():
            teacher.unet(x_t, tt, class_labels=label.expand(R * K))

    for _ in range(5):
        carv_step()
        hand_step()
    times = {"carv": [], "hand": [], "teacher": []}
    for _ in range(args.repeats):
        for name, fn in (("carv", carv_step), ("hand", hand_step), ("teacher", teacher_only)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(
        f"teacher: {'a free stub (--stub-teacher)' if args.stub_teacher else 'UNet2DModel'}, "
        f"{n_params / 1e3:.0f}k parameters, 1x16x16; R={R}, K={K}; "
        f"torch threads={args.threads}; {args.repeats} interleaved repeats (medians)"
    )
    print(f"{'':<24}{'ms/step':>10}")
    print(f"{'teacher forward alone':<24}{med['teacher']:>10.2f}")
    print(f"{'hand-written torch':<24}{med['hand']:>10.2f}")
    print(f"{'CARVLoss (Pyro)':<24}{med['carv']:>10.2f}")
    print(
        f"overhead ratio CARV / hand = {med['carv'] / med['hand']:.3f}; "
        f"tracing + bookkeeping = {med['carv'] - med['hand']:.2f} ms per step"
    )
    # the same fixed cost from the paired repeats (each CARV step against the hand step run
    # right after it): load that drifts over the run cancels within a pair
    diffs = sorted((c - h) * 1e3 for c, h in zip(times["carv"], times["hand"]))
    q1, q2, q3 = statistics.quantiles(diffs, n=4)
    print(f"paired CARV - hand: median {q2:.2f} ms, quartiles [{q1:.2f}, {q3:.2f}] ms")
    if args.profile:
        profile(carv_step, args.profile)


def _package(file: str) -> str:
    for key in ("carv_pyro", "/pyro/", "torch/distributions", "diffusers", "torch"):
        if key in file:
            return key.strip("/")
    return "built-in ops and other"


def profile(step, n: int, top: int = 20) -> None:
    """Print where ``n`` steps spend their own time: per package, then the library's and Pyro's
    own frames (the fixed cost a hand-written loop does not pay), per step."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(n):
        step()
    profiler.disable()
    stats = pstats.Stats(profiler, stream=io.StringIO())
    per_package: dict[str, float] = {}
    frames = []
    for (file, line, name), (_, calls, own, cum, _) in stats.stats.items():
        package = _package(file)
        per_package[package] = per_package.get(package, 0.0) + own
        if package in ("carv_pyro", "pyro", "torch/distributions"):
            where = file.split("site-packages/")[-1].split("src/")[-1]
            frames.append((own, cum, calls, f"{where}:{line} {name}"))
    print(f"\nprofile of {n} CARV steps (cProfile), own time per step by package:")
    for package, own in sorted(per_package.items(), key=lambda kv: -kv[1]):
        print(f"  {own / n * 1e3:8.3f} ms  {package}")
    print("the library's and Pyro's own frames (own ms, cumulative ms, calls per step):")
    for own, cum, calls, where in sorted(frames, reverse=True)[:top]:
        print(f"  {own / n * 1e3:7.3f} {cum / n * 1e3:8.3f} {calls / n:6.1f}x  {where}")


if __name__ == "__main__":
    main()
