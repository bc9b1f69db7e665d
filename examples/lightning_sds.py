"""Text-to-3D on PyTorch Lightning: the ``carv-pyro dream`` job as a LightningModule under DDP.

The ``R`` views of every step are split over the processes; each renders its shard, scores it
with the shapes teacher through the CARV estimator, and the gradients are averaged over the
processes (weighted by their number of views), so every process takes the same Adam step. Every
process draws its own cameras and (t, eps) from seeds derived from the one ``--seed``, global
stratification spans the processes, and the accountant pools every process's statistics.

    python examples/lightning_sds.py --devices 2 --steps 20          # 2 CPU processes (gloo)
    python examples/lightning_sds.py --devices 2 --accelerator gpu   # 2 GPUs (NCCL)
    python examples/lightning_sds.py --steps 300 --resolution 32     # one process, full size
    python examples/lightning_sds.py --steps 300 --checkpoint-every 50  # Lightning checkpoints
    python examples/lightning_sds.py --steps 300 --resume runs/lightning_sds/checkpoints/last.ckpt

Writes into ``--out``: Lightning's ``metrics.csv`` (the loss, the estimator's diagnostics, the
accountant's V_b, V_w and K*, the 3D IoU), ``summary.json`` and ``turntable.png`` (rank 0),
and with ``--checkpoint-every`` Lightning checkpoints in ``checkpoints/``. A run resumed from one
(``--resume``, with the same settings and number of processes) ends with the same field, bit for
bit, as the uninterrupted run: the checkpoint holds every process's random streams and the
accountant beside the field and Adam's state.
Requires ``pip install "carv-pyro[lightning]"``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from carv_pyro import PRESETS
from carv_pyro.integrations.lightning import TextTo3DModule
from carv_pyro.pipelines.text_to_3d import TextTo3DConfig
from carv_pyro.pipelines.text_to_3d.pictures import save_turntable


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=1, help="processes (one per device)")
    p.add_argument("--accelerator", default="cpu", help="cpu, gpu or auto")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--prompt", default="torus")
    p.add_argument("--estimator", default="carv", choices=tuple(PRESETS))
    p.add_argument("--views", type=int, default=4, help="R: views per step over all processes")
    p.add_argument("--resolution", type=int, default=16, help="voxels per side")
    p.add_argument("--lr", type=float, default=TextTo3DConfig.lr, help="Adam rate (0.3)")
    p.add_argument("--seed", type=int, default=0, help="the one seed every rank derives from")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--measure-every", type=int, default=5, help="accountant: steps between")
    p.add_argument("--out", default="runs/lightning_sds")
    p.add_argument(
        "--checkpoint-every", type=int, default=None, help="steps between Lightning checkpoints"
    )
    p.add_argument("--resume", default=None, help="a Lightning checkpoint to continue from")
    p.add_argument("--no-pictures", action="store_true", help="skip the turntable")
    args = p.parse_args(argv)
    if args.devices < 1:
        p.error(f"--devices must be at least 1, got {args.devices}")
    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        p.error(f"--checkpoint-every must be at least 1, got {args.checkpoint_every}")
    if args.views < args.devices:
        p.error(f"--views ({args.views}) must be at least --devices ({args.devices})")
    return args


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.accelerator == "cpu":
        # the processes share the machine's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.devices))
    config = TextTo3DConfig(
        prompt=args.prompt,
        estimator=args.estimator,
        steps=args.steps,
        R=args.views,
        resolution=args.resolution,
        lr=args.lr,
        seed=args.seed,
        eval_every=args.eval_every,
    )
    module = TextTo3DModule(config, measure_every=args.measure_every)
    out = Path(args.out)
    checkpoints = []
    if args.checkpoint_every is not None:
        # the state after every --checkpoint-every steps, and last.ckpt: what --resume takes
        checkpoints.append(
            ModelCheckpoint(
                dirpath=out / "checkpoints",
                every_n_train_steps=args.checkpoint_every,
                save_top_k=-1,
                save_last=True,
            )
        )
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        # "ddp" starts the other processes by running this script again (as torchrun would)
        strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=1,
        logger=CSVLogger(out, name="", version=""),
        log_every_n_steps=1,
        callbacks=checkpoints,
        enable_checkpointing=bool(checkpoints),
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(module, ckpt_path=args.resume)
    seconds = time.perf_counter() - start
    rank, world = trainer.global_rank, trainer.world_size
    print(f"rank {rank}/{world}: seeds {module.seeds}", flush=True)
    if rank != 0:
        return None
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    summary = {
        "prompt": config.prompt,
        "estimator": config.estimator.name,
        "processes": world,
        "views_per_step": config.R,
        "steps": int(trainer.global_step),
        "resumed_from": args.resume,
        "wall_s": seconds,
        "K": metrics.get("sds/K"),
        "k_star": metrics.get("carv/k_star"),
        "final_quality": module.last_quality,
        "metrics_csv": str(Path(trainer.logger.log_dir) / "metrics.csv"),
    }
    if not args.no_pictures:
        summary["turntable"] = save_turntable(
            module.field,
            module.scene,
            out / "turntable.png",
            title=f"{config.prompt!r} [{config.estimator.name}, {world} processes]",
        )
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
