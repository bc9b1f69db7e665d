"""`dream`: carve a prompt into a voxel field by score distillation, and save what came out.

The DreamFusion recipe at the size of a CPU: a `VoxelField` is rendered from random cameras over
the full circle (the expensive upstream step ``x = g(theta, xi)``), and the embedded 3D-aware
shapes teacher, conditioned on the prompt and on each view's camera, scores every render by SDS.
The run lives in its own Pyro param store, checkpoints atomically every minute (and every
``checkpoint_every`` steps), stops cleanly on SIGINT/SIGTERM after the step in progress, and
resumes exactly: a resumed run ends with the same field, bit for bit, as an uninterrupted one
(for estimators whose choices do not follow measured times; ``"auto"`` keeps its accountant's
statistics and chosen ``K`` across a resume, but later choices follow the times it measures).
"""

from __future__ import annotations

import collections
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro.infer import SVI

from ...objectives import SDS
from ..base import Checkpointer, Clock, LoopState, RunFolder, TrainLoop
from ..render import VoxelField
from .config import TextTo3DConfig
from .model import make_model
from .pictures import save_curves, save_turntable
from .quality import quality
from .scene import Scene, make_scene

__all__ = [
    "CHECKPOINT_FILE",
    "DreamRun",
    "build_run",
    "checkpoint_progress",
    "dream",
    "load_checkpoint_config",
]

CHECKPOINT_FILE = "checkpoint.pt"
"""Name of the checkpoint `dream` writes into its output folder."""

RUN_KIND = "dream"
_VERSION = 2


@dataclass
class DreamRun:
    """Everything a `dream` run builds; its state is what the checkpoint holds.

    Attributes:
        config: the settings.
        scene: teacher and prompt.
        field: the carved field.
        model: the Pyro model.
        guide: the estimator's guide.
        svi: the SVI object (optimizer and loss).
        loss: the estimator's `CARVLoss` (and its accountant).
        camera_generator: the camera prior's generator.
        truth: the true shape's occupancy (or ``None``).
    """

    config: TextTo3DConfig
    scene: Scene
    field: VoxelField
    model: Any
    guide: Any
    svi: SVI
    loss: Any
    camera_generator: torch.Generator
    truth: torch.Tensor | None

    def state(self, loop: LoopState) -> dict[str, Any]:
        """The checkpoint: config, loop, param store, optimizer, every random state, the
        estimator's accountant."""
        return {
            "version": _VERSION,
            "kind": RUN_KIND,
            "config": self.config.to_dict(),
            "loop": loop.to_dict(),
            "param_store": pyro.get_param_store().get_state(),
            "optimizer": self.svi.optim.get_state(),
            "rng": {"cameras": self.camera_generator.get_state(), "guide": self.guide.get_state()},
            "accountant": self.loss.accountant,
        }

    def restore(self, state: dict[str, Any]) -> LoopState:
        """Load a checkpoint's state into this run; return its loop state."""
        from pyro.params.param_store import param_with_module_name

        store = pyro.get_param_store()
        store.clear()
        # the checkpoint is read on the host: copy the field's values into its own tensors
        # (on the run's device) and keep those as the store's entries, so the model, the store
        # and the optimizer share them
        params = dict(state["param_store"]["params"])
        with torch.no_grad():
            for name, p in self.field.named_parameters():
                key = param_with_module_name("field", name)
                if key in params:
                    p.copy_(params[key])
                    params[key] = p
        store.set_state(
            {"params": params, "constraints": dict(state["param_store"]["constraints"])}
        )
        self.svi.optim.set_state(state["optimizer"])
        self.camera_generator.set_state(state["rng"]["cameras"])
        self.guide.set_state(state["rng"]["guide"])
        self.loss.accountant = state["accountant"]
        return LoopState.from_dict(state["loop"])

    def inner_size(self) -> int | None:
        """The inner draws per view now in use."""
        acc = self.loss.accountant
        if acc is not None and acc.k is not None:
            return acc.k
        return self.config.estimator.K


def build_run(config: TextTo3DConfig, scene: Scene | None = None) -> DreamRun:
    """A fresh run of ``config`` (in the current param store; `dream` gives it its own).

    Args:
        config: the settings.
        scene: the teacher and prompt (default: ``make_scene(config.teacher, config.prompt)``).
    """
    device = torch.device(config.device)
    if scene is None:
        scene = make_scene(
            config.teacher,
            config.prompt,
            device=device,
            dtype=config.torch_dtype,
            compile=config.teacher_compile,
        )
    sds = SDS(
        scene.teacher,
        weighting=config.weighting,
        t_range=config.t_range,
        guidance_scale=config.guidance_scale or scene.guidance_scale,
    )
    field = VoxelField(config.resolution, scene.channels, seed=config.seed).to(device)
    # the cameras are drawn on the host from their own stream: the same cameras on any device
    camera_generator = torch.Generator().manual_seed(config.seed + 1)
    estimator = config.estimator
    model = make_model(
        field,
        scene,
        sds,
        config.R,
        estimator.K or 1,
        camera_generator,
        azimuth_deg=config.azimuth_deg,
        elevation_deg=config.elevation_deg,
    )
    guide = estimator.guide(model, seed=config.seed + 2)
    loss = estimator.loss()
    svi = SVI(model, guide, pyro.optim.Adam({"lr": config.lr}), loss=loss)
    truth = scene.true_occupancy(config.resolution)
    return DreamRun(config, scene, field, model, guide, svi, loss, camera_generator, truth)


def load_checkpoint_config(out_dir: str | os.PathLike[str]) -> TextTo3DConfig | None:
    """The config stored in ``out_dir``'s checkpoint, or ``None`` if there is none."""
    progress = checkpoint_progress(out_dir)
    return None if progress is None else progress[0]


def checkpoint_progress(out_dir: str | os.PathLike[str]) -> tuple[TextTo3DConfig, int] | None:
    """The config stored in ``out_dir``'s checkpoint and the step the run had reached, or
    ``None`` if there is no checkpoint (read once, for a resume's checks before any work)."""
    ckpt = Checkpointer(Path(out_dir) / CHECKPOINT_FILE)
    if not ckpt.exists():
        return None
    state = ckpt.load()
    return TextTo3DConfig.from_dict(state["config"]), int(state["loop"]["step"])


def _read(ckpt: Checkpointer) -> dict[str, Any]:
    state = ckpt.load()
    if state.get("kind") != RUN_KIND or state.get("version") != _VERSION:
        raise ValueError(
            f"{ckpt.path} is not a carv-pyro dream checkpoint (version {_VERSION}); start a "
            f"new run with --overwrite"
        )
    return state


def dream(
    config: TextTo3DConfig,
    out_dir: str | os.PathLike[str],
    *,
    progress: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    checkpoint_every: int | None = None,
    checkpoint_every_s: float | None = 60.0,
    scene: Scene | None = None,
    pictures: bool = True,
) -> dict[str, Any]:
    """Carve ``config.prompt`` into a voxel field by SDS and save what came out.

    Writes into ``out_dir``: ``turntable.png`` (views around the object at 160 pixels with their
    azimuths, above the true shape rendered the same way), ``curves.png`` (3D IoU, p(prompt)
    and the loss against step and training wall-clock), ``summary.json`` (config, quality
    history, times, the estimator's K) and ``checkpoint.pt``.

    Args:
        config: the run's settings.
        out_dir: output folder: new or empty, or a dream folder with ``resume`` / ``overwrite``.
        progress: show a progress bar.
        resume: continue the run checkpointed in ``out_dir``; ``config`` may differ from the
            checkpoint's only in ``steps`` and ``budget_s``.
        overwrite: replace the run in ``out_dir``.
        checkpoint_every: also checkpoint every this many steps.
        checkpoint_every_s: checkpoint at least this often, in seconds (``None``: only at the
            end and on a signal).
        scene: the teacher and prompt (default: built from the config).
        pictures: write the turntable and curves.

    Returns:
        The summary dict that is also written to ``summary.json``.

    Raises:
        RunFolderError: ``out_dir`` holds a run or other files and neither ``resume`` nor
            ``overwrite`` was given (nothing is changed).
        RunStopped: a SIGINT/SIGTERM stopped the run after checkpointing its last step.
        ValueError: a checkpoint whose settings differ from ``config``, or fewer steps than it
            has done.
    """
    if not isinstance(config, TextTo3DConfig):
        raise TypeError(f"config must be a TextTo3DConfig, got {type(config).__name__}")
    out = Path(out_dir)
    folder = RunFolder(out, RUN_KIND, CHECKPOINT_FILE)
    resuming = folder.check(resume=resume, overwrite=overwrite)
    saved = None
    if resuming:
        saved = _read(folder.checkpoint)
        config.resumable_from(TextTo3DConfig.from_dict(saved["config"]))
        done = int(saved["loop"]["step"])
        if done > config.steps:
            raise ValueError(
                f"the checkpoint in {out} is at step {done}, past steps={config.steps}; ask for "
                f"at least {done} steps to resume it"
            )
    if scene is None:
        scene = make_scene(
            config.teacher,
            config.prompt,
            device=config.device,
            dtype=config.torch_dtype,
            compile=config.teacher_compile,
        )
    folder.prepare(resume=resume, overwrite=overwrite)

    with pyro.get_param_store().scope():
        run = build_run(config, scene)
        loop_state = run.restore(saved) if saved is not None else None
        resumed_from = loop_state.step if loop_state is not None else None

        def step(state: LoopState) -> dict[str, Any]:
            value = run.svi.step()
            records = run.loss.last_records
            k = records[0].n_inner if records else None
            return {"loss": float(value), "K": k}

        def evaluate(state: LoopState) -> dict[str, Any]:
            return quality(
                run.field,
                scene,
                n_views=config.eval_views,
                elevations_deg=config.eval_elevations_deg,
                true_occupancy=run.truth,
            )

        name = config.estimator.name
        loop = TrainLoop(
            step,
            steps=config.steps,
            budget_s=config.budget_s,
            clock=Clock("wall", config.device),
            evaluate=evaluate,
            eval_every=config.eval_every,
            eval_every_s=config.eval_every_s,
            save=lambda state: folder.checkpoint.save(run.state(state)),
            checkpoint_every=checkpoint_every,
            checkpoint_every_s=checkpoint_every_s,
            progress=progress,
            desc=f"dream {config.prompt!r} [{name}]",
            where=str(out),
        )
        final = loop.run(loop_state)
        files = {
            "summary": str(out / "summary.json"),
            "checkpoint": str(folder.checkpoint.path),
        }
        if pictures:
            files["turntable"] = save_turntable(
                run.field, scene, out / "turntable.png", title=f"{config.prompt!r} [{name}]"
            )
            files["curves"] = save_curves(
                final.evals,
                final.log,
                out / "curves.png",
                f"{config.prompt!r} ({name}, R={config.R}, teacher {config.teacher})",
            )
        summary = _summary(config, final, resumed_from, files, run.loss.accountant)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    folder.mark("finished")
    return summary


def _summary(
    config: TextTo3DConfig,
    final: LoopState,
    resumed_from: int | None,
    files: dict[str, str],
    accountant: Any = None,
) -> dict[str, Any]:
    first, last = final.evals[0], final.evals[-1]
    metrics = ("iou", "iou_hard", "p", "accuracy")
    ks = [entry.get("K") for entry in final.log]
    steps_at = collections.Counter(k for k in ks if k is not None)
    return {
        "prompt": config.prompt,
        "teacher": config.teacher,
        "estimator": config.estimator.name,
        "config": config.to_dict(),
        "device": config.device,
        "steps": final.step,
        "wall_s": final.seconds,
        "sec_per_step": final.seconds / max(final.step, 1),
        "initial_quality": {k: first[k] for k in metrics if k in first},
        "final_quality": {k: last[k] for k in metrics if k in last},
        "K": {
            "first": ks[0] if ks else None,
            "last": ks[-1] if ks else None,
            # steps run at each K (a measuring step counts at the K it probes)
            "steps_at": {str(k): n for k, n in sorted(steps_at.items())},
        },
        "resumed_from": resumed_from,
        "accounting": None if accountant is None else _accounting(accountant),
        "history": final.evals,
        "files": files,
    }


def _accounting(accountant: Any, last: int = 20) -> dict[str, Any]:
    """What the accountant measured and decided (its last ``last`` measurements, and the step
    and teacher costs it has timed per K), for reading why ``auto`` chose its K."""
    return {
        "measurements": list(accountant.history)[-last:],
        "step_costs_s": {str(k): v for k, v in accountant.step_costs.items()},
        "teacher_costs_s": {str(k): v for k, v in accountant.teacher_costs.items()},
    }
