"""`train_distillation`: DMD on the shared training loop, with checkpoints and an exact resume.

Each generator step is ``config.fake_updates`` fake-score updates on fresh generator samples
followed by one ``SVI`` step of the generator with the config's estimator (its
[`TimestepGuide`][carv_pyro.TimestepGuide] and [`CARVLoss`][carv_pyro.CARVLoss]). The steps run
in a ``carv_pyro.pipelines.base.TrainLoop``: a number of steps or a compute budget,
the Fréchet distance on a cadence (not counted by the clock), and, given an ``out_dir``,
checkpoints from which a stopped run resumes bit for bit.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyro
import torch
from pyro.infer import SVI
from pyro.params.param_store import param_with_module_name

from ... import _checks
from ...infer.estimator import Estimator
from ..base.checkpoint import RunFolder, write_json
from ..base.loop import Clock, LoopState, TrainLoop, check_run_options
from .config import DistillationConfig
from .distiller import Distiller, derived_seeds
from .metrics import fid_digits

__all__ = [
    "CHECKPOINT_FILE",
    "RUN_KIND",
    "SUMMARY_FILE",
    "DistillationHistory",
    "train_distillation",
]

#: The run folder's kind (its ``carv-run.json`` marker).
RUN_KIND = "distillation"
#: The checkpoint's file name inside the run folder.
CHECKPOINT_FILE = "checkpoint.pt"
#: The JSON summary written when a run finishes.
SUMMARY_FILE = "history.json"
#: The version of the checkpoint's layout.
CHECKPOINT_FORMAT = 1


@dataclass
class DistillationHistory:
    """What `train_distillation` returns.

    Attributes:
        config: the run's config (with the estimator applied).
        estimator: the estimator's name (a preset's, or ``"custom"``).
        clock: ``"process"`` (CPU seconds of this process) or ``"wall"``.
        step: generator steps done, per record.
        seconds: compute seconds (excluding evaluation) at each record.
        loss: DMD value per generator step.
        fake_loss: mean fake denoising loss per generator step.
        evals: ``[{"step", "seconds", "fd"}]`` Fréchet-distance evaluations (the first at step 0).
        distiller: the trained `Distiller`.
        out_dir: the run folder, if the run had one.
    """

    config: DistillationConfig
    estimator: str
    clock: str
    step: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    fake_loss: list[float] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    distiller: Distiller | None = None
    out_dir: str | None = None

    @classmethod
    def from_state(
        cls,
        config: DistillationConfig,
        clock: str,
        state: LoopState,
        distiller: Distiller | None = None,
        out_dir: str | None = None,
    ) -> DistillationHistory:
        """The history of a loop's state (one record per step)."""
        return cls(
            config=config,
            estimator=config.estimator.name,
            clock=clock,
            step=[int(m["step"]) for m in state.log],
            seconds=[float(m["seconds"]) for m in state.log],
            loss=[float(m["loss"]) for m in state.log],
            fake_loss=[float(m["fake_loss"]) for m in state.log],
            evals=[dict(e) for e in state.evals],
            distiller=distiller,
            out_dir=out_dir,
        )

    @property
    def final_fd(self) -> float:
        """The last evaluated Fréchet distance (``nan`` if none)."""
        return self.evals[-1]["fd"] if self.evals else math.nan

    @property
    def steps(self) -> int:
        """Generator steps done."""
        return self.step[-1] if self.step else 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (without the networks)."""
        return {
            "config": self.config.to_dict(),
            "estimator": self.estimator,
            "clock": self.clock,
            "steps": self.steps,
            "seconds": self.seconds[-1] if self.seconds else 0.0,
            "final_fd": self.final_fd,
            "evals": list(self.evals),
            "loss": list(self.loss),
            "fake_loss": list(self.fake_loss),
        }


def _restore_param_store(
    saved: dict[str, Any], generator: torch.nn.Module, module_name: str
) -> None:
    """Load a checkpointed param store into the current one, keeping the generator's own tensors
    as its entries (their values are copied in), so ``pyro.module`` and the model share them."""
    params = dict(saved["params"])
    with torch.no_grad():
        for name, p in generator.named_parameters():
            key = param_with_module_name(module_name, name)
            if key in params:
                p.copy_(params[key])
                params[key] = p
    pyro.get_param_store().set_state({"params": params, "constraints": dict(saved["constraints"])})


def _resumed_config(saved: dict[str, Any], given: DistillationConfig | None) -> DistillationConfig:
    if given is None:
        try:
            return DistillationConfig.from_dict(saved["config"])
        except ValueError as err:  # e.g. an estimator whose proposal is an object, not a name
            raise ValueError(
                f"the checkpoint's config cannot be rebuilt from its settings ({err}); resume "
                f"with the run's own config (config=...)"
            ) from None
    ours = given.to_dict()
    differ = sorted(
        k for k in set(ours) | set(saved["config"]) if ours.get(k) != saved["config"].get(k)
    )
    if differ:
        raise ValueError(
            f"config differs from the checkpoint's in {differ}; resume with the run's own config "
            f"(pass config=None to take it from the checkpoint)"
        )
    return given


def train_distillation(
    config: DistillationConfig | None = None,
    estimator: Estimator | str | None = None,
    *,
    steps: int | None = None,
    budget_seconds: float | None = None,
    teacher: Any = None,
    init: Distiller | None = None,
    device: str | torch.device = "cpu",
    eval_every: int | None = None,
    evaluate: bool = True,
    fake_warmup: int | None = None,
    clock: str = "auto",
    progress: bool = True,
    out_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    checkpoint_every: int | None = None,
    checkpoint_every_s: float | None = 60.0,
    hooks: Sequence[Callable[[LoopState, dict[str, Any]], None]] = (),
) -> DistillationHistory:
    """Train a one-step generator by DMD for a number of steps or a compute budget.

    Each generator step is ``config.fake_updates`` fake-score updates followed by one ``SVI``
    step of the generator under ``config.estimator`` (``estimator.guide(model, seed=...)`` and
    ``estimator.loss()``). Before the first step the fake score gets ``fake_warmup`` updates,
    counted in the budget. The budget counts all training work and excludes evaluation; with
    ``clock="auto"`` it is this process's CPU time on a CPU (so other load on the machine does
    not shrink it) and wall time on a GPU. The Fréchet distance (`fid_digits`) is evaluated
    before the first step, every ``eval_every`` steps and after the last.

    The run lives in a private Pyro param store and seeds no global random generator: every draw
    comes from generators seeded by ``config.seed``. With ``out_dir`` it checkpoints (every
    ``checkpoint_every`` steps, every ``checkpoint_every_s`` seconds, on SIGINT/SIGTERM after
    the step in progress, and at the end) the param store, the generator's Adam and the fake
    score's AdamW states, every random state, the fake-update counter and the loop's state; a
    run resumed with ``resume=True`` then continues exactly as the uninterrupted run would have
    (bit for bit on one machine; an adapting ``"auto"`` estimator chooses ``K`` from measured
    times, so its runs are not reproducible even uninterrupted).

    Args:
        config: the settings (default `DistillationConfig`; on resume, default: the
            checkpoint's, and a given config must equal it).
        estimator: an [`Estimator`][carv_pyro.Estimator] or preset name replacing
            ``config.estimator`` (a preset means what it means everywhere: ``"carv"`` is
            ``K = 8`` with IS and stratification); ``None`` keeps the config's.
        steps: stop after this many generator steps (counted across resumes).
        budget_seconds: stop once the compute spent reaches this (checked after each step).
        teacher: the real teacher (default: ``init``'s, else the embedded one).
        init: start from a copy of this checkpoint (its generator, fake score and random state).
        device: where to train (ignored when ``init`` is given).
        eval_every: evaluate the Fréchet distance every this many steps (and at the start and
            end).
        evaluate: ``False`` skips every evaluation.
        fake_warmup: fake updates before the first generator step (default:
            ``config.fake_warmup`` from scratch, 0 from a checkpoint ``init``).
        clock: ``"auto"``, ``"process"`` or ``"wall"``.
        progress: show a tqdm progress bar.
        out_dir: the run folder (checkpoint ``checkpoint.pt``, summary ``history.json``); a
            finished or foreign folder is never overwritten without ``resume`` or ``overwrite``.
        resume: continue the run checkpointed in ``out_dir``.
        overwrite: replace the run in ``out_dir``.
        checkpoint_every: also checkpoint every this many steps.
        checkpoint_every_s: also checkpoint every this many wall seconds (``None``: never).
        hooks: ``hook(state, metrics)`` after every step (see
            ``carv_pyro.pipelines.base.TrainLoop``).

    Returns:
        A `DistillationHistory`.

    Raises:
        ValueError: naming the first invalid argument (an unknown estimator, neither ``steps``
            nor ``budget_seconds``, non-positive values, ``resume`` without ``out_dir``, a
            config that differs from the checkpoint's); a
            ``carv_pyro.pipelines.base.RunFolderError`` (a ``ValueError``) when
            ``out_dir`` may not be used as asked.
        TypeError: on a config or ``init`` of the wrong type.
        RunStopped: after SIGINT/SIGTERM, once the last completed step is checkpointed.
    """
    given = config
    if config is not None:
        _checks.instance("config", config, DistillationConfig, "a DistillationConfig")
    if estimator is not None:
        config = (config or DistillationConfig()).replace(estimator=estimator)
        given = config
    config = DistillationConfig() if config is None else config
    if steps is None and budget_seconds is None:
        raise ValueError("give steps or budget_seconds (or both) to bound the run")
    if steps is not None:
        _checks.positive_int("steps", steps)
    if budget_seconds is not None:
        budget_seconds = _checks.positive_float("budget_seconds", budget_seconds)
    if eval_every is not None:
        _checks.positive_int("eval_every", eval_every)
    if init is not None:
        _checks.instance("init", init, Distiller, "a Distiller or None")
    if fake_warmup is None:
        fake_warmup = config.fake_warmup if init is None else 0
    _checks.non_negative_int("fake_warmup", fake_warmup)
    _checks.choice("clock", clock, Clock.KINDS)
    _checks.choice("evaluate", evaluate, (True, False))
    _checks.choice("resume", resume, (True, False))
    _checks.choice("overwrite", overwrite, (True, False))
    hooks = check_run_options(
        checkpoint_every, checkpoint_every_s, hooks, out_dir, resume=resume, overwrite=overwrite
    )

    folder = None
    saved: dict[str, Any] | None = None
    if out_dir is not None:
        folder = RunFolder(out_dir, RUN_KIND, CHECKPOINT_FILE)
        if folder.prepare(resume=resume, overwrite=overwrite):
            saved = folder.checkpoint.load()
            config = _resumed_config(saved, given)

    if teacher is None and init is not None:
        teacher = init.real
    if saved is not None:
        distiller = Distiller(config, teacher, device)
        distiller.load_state_dict(saved["distiller"])
    elif init is not None:
        distiller = init.clone(config)
    else:
        distiller = Distiller(config, teacher=teacher, device=device)
    timer = Clock(clock, distiller.device)
    where = str(out_dir) if out_dir is not None else ""

    with pyro.get_param_store().scope():
        guide = distiller.guide(config.estimator, seed=derived_seeds(config.seed)["guide"])
        optim = pyro.optim.Adam({"lr": config.lr, "betas": config.betas})
        loss = config.estimator.loss()
        if saved is not None:
            _restore_param_store(saved["param_store"], distiller.generator, "generator")
            optim.set_state(saved["optim"])
            guide.set_state(saved["guide"])
            if saved.get("accountant") is not None:
                loss.accountant = saved["accountant"]
        svi = SVI(distiller.model, guide, optim, loss=loss)

        def step(state: LoopState) -> dict[str, Any]:
            if state.step == 0 and fake_warmup:
                distiller.fake_step(fake_warmup)
            fake_loss = distiller.fake_step()
            value = svi.step(R=config.R)
            return {"loss": float(value), "fake_loss": float(fake_loss)}

        def evaluate_fd(state: LoopState) -> dict[str, Any]:
            return {"fd": fid_digits(distiller.generator, config.fd_samples, seed=config.seed)}

        def save(state: LoopState) -> None:
            folder.checkpoint.save(
                {
                    "format": CHECKPOINT_FORMAT,
                    "config": config.to_dict(),
                    "loop": state.to_dict(),
                    "distiller": distiller.state_dict(),
                    "param_store": pyro.get_param_store().get_state(),
                    "optim": optim.get_state(),
                    "guide": guide.get_state(),
                    "accountant": loss.accountant,
                }
            )

        loop = TrainLoop(
            step,
            steps=steps,
            budget_s=budget_seconds,
            clock=timer,
            evaluate=evaluate_fd if evaluate else None,
            eval_every=eval_every,
            hooks=hooks,
            save=save if folder is not None else None,
            checkpoint_every=checkpoint_every,
            checkpoint_every_s=checkpoint_every_s,
            progress=progress,
            desc=f"dmd {config.estimator.name}",
            where=where,
        )
        state = loop.run(LoopState.from_dict(saved["loop"]) if saved is not None else None)

    history = DistillationHistory.from_state(config, timer.kind, state, distiller, where or None)
    if folder is not None:
        write_json(folder.path / SUMMARY_FILE, history.to_dict())
        folder.mark("finished")
    return history
