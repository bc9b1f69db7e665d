"""What `auto`'s measuring step costs: one text-to-3D SVI step, plain and measuring.

A measuring step (the accountant's, every ``every`` steps at first, less often while ``K``
holds) needs two contrasts of the draws' gradients besides the gradient itself
(`carv_pyro.infer.loss.contrast_backward`). The loss takes the three in one backward pass with
batched cotangents where every op on the path has a batching rule (on CUDA devices), else one
backward pass each. This script times a plain step and a
measuring step both ways, interleaved, on the shapes teacher at the main job's size (R = 4 views
of a 32^3 field):

    python examples/measuring_step.py --device cuda --repeats 30 --K 2 8
    python examples/measuring_step.py --device cpu --repeats 20 --K 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import pyro
import torch

import carv_pyro as carv
from carv_pyro.accounting import Accountant
from carv_pyro.infer import loss as loss_module
from carv_pyro.pipelines.render import VoxelField
from carv_pyro.pipelines.text_to_3d.model import make_model
from carv_pyro.pipelines.text_to_3d.scene import make_scene
from carv_pyro.timing import device_name


def time_steps(device: str, K: int, repeats: int, warmup: int = 3) -> dict[str, list[float]]:
    """Milliseconds per step for a plain step and a measuring step, batched and looped."""
    scene = make_scene("shapes", "torus", device=torch.device(device))
    pyro.clear_param_store()
    field = VoxelField(32, scene.channels, seed=0).to(device)
    sds = carv.SDS(scene.teacher, guidance_scale=scene.guidance_scale)
    model = make_model(field, scene, sds, 4, K, torch.Generator().manual_seed(0))
    estimator = carv.Estimator(K=K, proposal="weighted", stratify="per_outer", outer="lattice")
    guide = estimator.guide(model, seed=0)
    batched = loss_module._batched_contrasts
    default_devices = loss_module.BATCHED_BACKWARD_DEVICES
    losses = {
        "plain": carv.CARVLoss(accountant=Accountant(every=10**9)),
        "measuring, batched": carv.CARVLoss(accountant=Accountant(every=1)),
        "measuring, looped": carv.CARVLoss(accountant=Accountant(every=1)),
    }

    def sync() -> None:
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()

    times: dict[str, list[float]] = {name: [] for name in losses}
    try:
        for i in range(warmup + repeats):
            for name, loss in losses.items():  # interleaved: machine load hits all alike
                looped = name == "measuring, looped"
                loss_module._batched_contrasts = (lambda *a: None) if looped else batched
                # time the batched pass on every device, whatever the library's default there
                loss_module.BATCHED_BACKWARD_DEVICES = frozenset({torch.device(device).type})
                for p in field.parameters():
                    p.grad = None
                sync()
                start = time.perf_counter()
                loss.loss_and_grads(model, guide)
                sync()
                if i >= warmup:
                    times[name].append(1000 * (time.perf_counter() - start))
    finally:
        loss_module._batched_contrasts = batched
        loss_module.BATCHED_BACKWARD_DEVICES = default_devices
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--K", type=int, nargs="+", default=[2])
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    print(f"{device_name(args.device)}; shapes teacher, R = 4, 32^3 field; median ms [quartiles]")
    for K in args.K:
        times = time_steps(args.device, K, args.repeats)
        plain = statistics.median(times["plain"])
        for name, ts in times.items():
            q1, _, q3 = statistics.quantiles(ts, n=4)
            med = statistics.median(ts)
            print(f"  K={K:<3d} {name:20s} {med:8.2f} [{q1:.2f}, {q3:.2f}]  x{med / plain:.2f}")


if __name__ == "__main__":
    main()
