"""Score distillation with the outer plate (views) sharded across processes.

Every process renders its shard of the ``--views`` cameras, encodes them with the VAE, runs the
teacher on its ``shard x K`` draws, and one all-reduce per step averages the gradients (weighted
by shard size), so every process takes the same optimiser step as a single process would with
all the views. Teacher and upstream are those of ``gpu_bench.py`` (SD-2.1-size UNet with random
weights, render -> VAE encoder), or tiny stand-ins with ``--quick``.

    torchrun --nproc_per_node=2 examples/distributed_sds.py --views 8 --K 4   # 2 GPUs (NCCL)
    torchrun --nproc_per_node=2 examples/distributed_sds.py --quick           # 2 CPU procs (gloo)
    python examples/distributed_sds.py --quick                                # one process

Each run writes ``<out>/dist_w<world>_R<views>.json`` (rank 0); ``--summarize`` turns such files
into a scaling table (throughput of outer samples per second, 1 process against several).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import pyro
import torch
import torch.distributed as dist
from pyro.infer import SVI

import carv_pyro as carv
from carv_pyro.distributed import (
    DistributedAccountant,
    DistributedCARVLoss,
    init_from_env,
    rank_and_world,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_bench  # noqa: E402  (the teacher and upstream at SD 2.1 size)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--views", type=int, default=8, help="R: outer samples per step, all ranks")
    p.add_argument("--K", type=int, default=4, help="inner draws per view")
    p.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--quick", action="store_true", help="tiny teacher and upstream")
    p.add_argument("--accountant", action="store_true", help="pool V_b, V_w across ranks")
    p.add_argument("--out", default="benchmarks")
    p.add_argument("--summarize", nargs="+", default=None, help="JSON files to tabulate")
    return p.parse_args(argv)


def train(args: argparse.Namespace) -> dict | None:
    device = init_from_env()
    rank, world = rank_and_world()
    if device.type == "cpu":
        torch.set_num_threads(1)
    bench_args = gpu_bench.parse_args(
        ["--device", str(device), "--dtype", args.dtype] + (["--quick"] if args.quick else [])
    )
    b = gpu_bench.Bench(bench_args)  # seeded: the same teacher and field on every rank
    # then independent cameras and draws per rank, from seeded generators (no global seeding)
    b.camera_generator.manual_seed(1 + rank)
    estimator = carv.Estimator.preset("carv", K=args.K)  # q ∝ p w alpha, stratified per view
    guide = estimator.guide(b.model, seed=1000 + rank)
    accountant = DistributedAccountant(every=5) if args.accountant else None
    loss = DistributedCARVLoss(estimator.loss(accountant=accountant), outer_plate="views")
    svi = SVI(b.model, guide, pyro.optim.Adam({"lr": 1e-2}), loss=loss)

    for _ in range(args.warmup):
        svi.step(args.views, args.K)
    gpu_bench.sync(device)
    if world > 1:
        dist.barrier()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        value = svi.step(args.views, args.K)
    gpu_bench.sync(device)
    seconds = (time.perf_counter() - t0) / args.steps

    # every rank must hold the same parameters after the same steps
    checksum = torch.stack([p.detach().double().sum() for p in b.field.parameters()]).to(device)
    if world > 1:
        gathered = [torch.empty_like(checksum) for _ in range(world)]
        dist.all_gather(gathered, checksum)
        assert all(torch.equal(g, gathered[0]) for g in gathered), "ranks diverged"
    result = {
        "world": world,
        "views": args.views,
        "views_per_rank": loss.last_weight,
        "K": args.K,
        "seconds_per_step": seconds,
        "views_per_second": args.views / seconds,
        "draws_per_second": args.views * args.K / seconds,
        "loss": value,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": f"torchrun --nproc_per_node={world} " + " ".join(sys.argv),
        "teacher": "tiny" if args.quick else "SD 2.1-base UNet (random weights)",
        "dtype": args.dtype,
    }
    if rank == 0:
        print(json.dumps(result), flush=True)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"dist_w{world}_R{args.views}.json").write_text(json.dumps(result, indent=2))
    if world > 1:
        dist.destroy_process_group()
    return result


def summarize(files: list[str], out: str) -> str:
    runs = sorted(
        (json.loads(Path(f).read_text()) for f in files), key=lambda r: (r["world"], r["views"])
    )
    base = {r["views"]: r for r in runs if r["world"] == 1}
    one_per_rank = {r["views_per_rank"]: r for r in runs if r["world"] == 1}
    lines = [
        "# Outer samples sharded across GPUs: throughput",
        "",
        f"- device: {runs[0]['device']}; teacher: {runs[0]['teacher']}, {runs[0]['dtype']}",
        f"- date: {runs[0]['date']}",
        "- commands: " + "; ".join(f"`{r['command']}`" for r in runs),
        "",
        "| processes | views per step (R) | views per process | K | ms per step | views/s | "
        "speed-up vs 1 process, same R | vs 1 process, same views per process |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in runs:
        same_r = base.get(r["views"])
        same_shard = one_per_rank.get(r["views_per_rank"])
        strong = r["views_per_second"] / same_r["views_per_second"] if same_r else None
        weak = r["views_per_second"] / same_shard["views_per_second"] if same_shard else None
        lines.append(
            f"| {r['world']} | {r['views']} | {r['views_per_rank']:.0f} | {r['K']} | "
            f"{r['seconds_per_step'] * 1e3:.1f} | {r['views_per_second']:.2f} | "
            f"{'-' if strong is None else f'{strong:.2f}x'} | "
            f"{'-' if weak is None else f'{weak:.2f}x'} |"
        )
    text = "\n".join(lines) + "\n"
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "distributed.md").write_text(text)
    print(text)
    return text


def main(argv=None):
    args = parse_args(argv)
    if args.summarize:
        return summarize(args.summarize, args.out)
    return train(args)


if __name__ == "__main__":
    main()
