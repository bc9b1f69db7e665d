"""The text-to-3D job (``carv-pyro dream``) as a PyTorch Lightning module, ready for DDP.

threestudio runs on PyTorch Lightning; `TextTo3DModule` puts the library's main job in the same
engine: the training logic (render ``R`` views of a voxel field, score them with the frozen
teacher by SDS through the CARV estimator, step Adam) lives in the module, and the `Trainer`
brings devices, DDP, logging and checkpoints:

```python
import pytorch_lightning as pl
from carv_pyro.integrations.lightning import TextTo3DModule
from carv_pyro.pipelines.text_to_3d import TextTo3DConfig

module = TextTo3DModule(TextTo3DConfig(prompt="torus", estimator="carv", R=4, steps=300))
pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1).fit(module)
```

Under DDP it is the job of [`carv_pyro.distributed`][carv_pyro.infer.distributed], reused as
is:

- **The outer plate is sharded.** The ``R`` views of a step are split over the ranks
  (`ShardMessenger` on the model's ``views`` plate: rank ``i`` renders ``R_i`` of them), and
  `DistributedCARVLoss` all-reduces the gradients weighted by ``R_i``, so every rank takes the
  Adam step of one process over all ``R`` views (the plain mean over ranks when ``R`` divides
  evenly). The module optimizes manually: DDP's own gradient hook never runs (no
  ``manual_backward``), so gradients are reduced once.
- **Every rank draws its own cameras and (t, eps), from one seed.** The module takes one
  ``config.seed`` and derives every stream from it and the rank (`derive_seed`); no stream is
  taken from the global RNG, so ``seed_everything`` (which seeds every rank alike: two GPUs
  worth one, threestudio's issue 195) cannot make ranks repeat each other, and the ranks' seeds
  are checked to differ when training starts. The field's initial noise is seeded by
  ``config.seed`` alone: every rank starts from the same field.
- **Global stratification spans the ranks.** With ``stratify="global"`` (or ``"auto"`` at
  ``K = 1``) the ``R K`` timesteps of a step are one stratified design over all ranks
  (`SharedStrataSource`); with ``"per_outer"`` each view's ``K`` draws are stratified anyway.
  An estimator's outer-plate design of the cameras (``Estimator(outer=...)``, see
  ``carv_pyro.infer.outer``) is likewise one design over all ranks, drawn from a shared seed,
  each rank taking the rows of its views.
- **The accountant pools the ranks.** A `DistributedAccountant` measures ``V_b``, ``V_w`` and
  costs from every rank's draws, so every rank predicts the same ``K*`` and the adapting
  estimator (``"auto"``) sets the same ``K`` everywhere.
- **A resumed run continues exactly.** `on_save_checkpoint` adds to Lightning's checkpoint what
  `dream`'s own checkpoint holds beside the field and Adam's state, for every rank (gathered
  from all ranks: Lightning writes the file on rank 0 only): the camera generator's state, the
  guide's random sources (its own draws, the shared strata, the outer design's stream), the
  run's Pyro param store beyond the field (a learning proposal's statistics), the accountant
  (its measurements, costs, cadence and ``K``) and the seeds. `on_load_checkpoint` gives each
  rank its own part back when training starts, so ``trainer.fit(module, ckpt_path=...)`` in a
  fresh `Trainer` ends with the field, bit for bit, of the uninterrupted run, for estimators
  whose choices do not follow measured times (an adapting ``"auto"`` keeps its accountant's
  statistics and ``K`` across the resume, but its later choices follow the times it measures,
  as in `dream`). Everything is plain data (tensors, numbers, lists, dicts), so Lightning's
  default ``weights_only`` load reads it. A checkpoint from another number of processes (or
  one without this state) restores the field and Adam's state only: the streams are then
  derived afresh from the step it resumes at, and the accountant starts afresh, with a warning.
- **Metrics go through Lightning's logger** (``self.log``): ``train/loss`` (averaged over
  ranks), the term's diagnostics ``sds/ess``, ``sds/max_weight``, ``sds/value`` (averaged over
  ranks), ``sds/K``, the accountant's ``carv/k_star``, ``carv/v_between``, ``carv/v_within``,
  ``carv/ecm_predicted``, ``carv/c_outer``, ``carv/c_inner``; every ``eval_every`` steps and at
  the last, rank 0 (the field is the same on every rank) evaluates the quality and gives
  ``quality/iou``, ``quality/iou_hard``, ``quality/p``, ``quality/accuracy`` to the loggers
  at that step only (``self.log`` would repeat the last value at every step in between).

PyTorch Lightning is an optional dependency: ``pip install "carv-pyro[lightning]"``.
"""

from __future__ import annotations

import collections
import importlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pyro
import torch
import torch.distributed as dist
from pyro.params.param_store import param_with_module_name
from torch.distributions import constraints

try:
    import pytorch_lightning as pl
except ImportError as error:  # pragma: no cover - the extra is installed wherever this is tested
    raise ImportError(
        "carv_pyro.integrations.lightning needs PyTorch Lightning: "
        'pip install "carv-pyro[lightning]" (or pip install "pytorch-lightning>=2.2")'
    ) from error
from pytorch_lightning.utilities import rank_zero_warn

from .. import _checks
from ..infer.distributed import (
    DistributedAccountant,
    DistributedCARVLoss,
    SharedStrataSource,
    shard_range,
)
from ..objectives import SDS
from ..pipelines.render import VoxelField
from ..pipelines.text_to_3d.config import TextTo3DConfig
from ..pipelines.text_to_3d.model import make_model
from ..pipelines.text_to_3d.quality import quality
from ..pipelines.text_to_3d.scene import Scene, make_scene

__all__ = ["CHECKPOINT_KEY", "STREAMS", "TextTo3DModule", "derive_seed"]

#: The random streams of a run: ``"cameras"`` and ``"draws"`` (the guide's noise and
#: per-view strata) are per rank; ``"strata"`` (the global stratified design of the timesteps)
#: and ``"outer"`` (an estimator's outer-plate design of the cameras) are shared, so that each
#: rank takes its own part of one design.
STREAMS = ("cameras", "draws", "strata", "outer")


def derive_seed(seed: int, stream: str, rank: int | None = None, step: int = 0) -> int:
    """An independent seed for one random stream of one rank, derived from the run's one seed.

    numpy's ``SeedSequence(seed, spawn_key=(stream, rank, step))``: different ``(stream, rank,
    step)`` give statistically independent streams, and no two ranks can share one.

    Args:
        seed: the run's seed (``config.seed``).
        stream: one of `STREAMS`.
        rank: the rank, or ``None`` for a stream shared by all ranks.
        step: the step the streams start at (a run resumed from a checkpoint without its
            streams draws fresh ones, not the ones it already drew).

    Returns:
        a seed in ``[0, 2**63)``.

    Raises:
        ValueError: on a seed, rank or step that is not a non-negative integer, or an unknown
            stream.
    """
    if _checks.seed_value("seed", seed) is None:
        raise ValueError("seed must be an integer in [0, 2**63), got None")
    _checks.choice("stream", stream, STREAMS)
    if rank is not None:
        _checks.non_negative_int("rank", rank)
    _checks.non_negative_int("step", step)
    key = (STREAMS.index(stream), 0 if rank is None else 1 + rank, step)
    state = np.random.SeedSequence(seed, spawn_key=key).generate_state(1, np.uint64)[0]
    return int(state) >> 1


class _Steps:
    """``0, 1, ..., n - 1``: the batches of a job that draws its own data.

    A plain iterable, not a ``DataLoader``, so Lightning puts no ``DistributedSampler`` on it:
    every rank gets every step (what a step renders is drawn by the module). Sized, so that
    ``trainer.estimated_stepping_batches`` knows the last step, and stateful, so that a run
    resumed in the middle of its epoch goes on from the step it was saved at. The state is the
    module's step count when the checkpoint is written, not how many batches were taken out:
    Lightning fetches one batch ahead.

    Args:
        n: the batches of an epoch.
        done: the number of steps trained so far (read when a checkpoint is written).
    """

    def __init__(self, n: int, done: Callable[[], int]):
        self.n = n
        self.done = done
        self._start = 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        start, self._start = self._start, 0  # the next epoch starts from its first step again
        return iter(range(start, self.n))

    def state_dict(self) -> dict[str, int]:
        """The step the epoch has reached."""
        return {"step": self.done() % self.n}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Go on from the saved step."""
        self._start = int(state["step"])


# -- the module's checkpointed state, as plain data -----------------------------------------------

#: The key of the module's state in a Lightning checkpoint, and the version of its layout.
CHECKPOINT_KEY = "carv_pyro"
_STATE_VERSION = 1
#: Modules whose classes an accountant's state may hold (rebuilt attribute by attribute).
_STATE_MODULES = ("carv_pyro.accounting", "carv_pyro.infer.distributed")
#: Accountant attributes that belong to the process, not to the run (the process group).
_PROCESS_ATTRIBUTES = ("group",)


def _to_plain(value: Any) -> Any:
    """``value`` as tensors, numbers, strings, lists and dicts (what Lightning's default
    ``weights_only`` load accepts); objects of the accounting's classes by their attributes.

    `dream` pickles its accountant; a Lightning checkpoint is read with ``weights_only=True``
    (torch's default since 2.6), which refuses pickled objects and deques, hence this.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, (list, tuple)):
        return {"__seq__": type(value).__name__, "items": [_to_plain(v) for v in value]}
    if isinstance(value, collections.deque):
        return {"__deque__": [_to_plain(v) for v in value], "maxlen": value.maxlen}
    if isinstance(value, dict):
        return {"__map__": [[_to_plain(k), _to_plain(v)] for k, v in value.items()]}
    cls = type(value)
    if cls.__module__ in _STATE_MODULES and hasattr(value, "__dict__"):
        # what the object pickles (an accountant reads its pending CUDA timings first)
        getstate = getattr(value, "__getstate__", None)
        state = getstate() if getstate is not None else None
        state = state if isinstance(state, dict) else vars(value)
        attrs = {k: v for k, v in state.items() if k not in _PROCESS_ATTRIBUTES}
        return {"__object__": f"{cls.__module__}:{cls.__qualname__}", "attrs": _to_plain(attrs)}
    raise TypeError(
        f"cannot checkpoint a {cls.__module__}.{cls.__qualname__} ({value!r:.60}) as plain data"
    )


def _from_plain(value: Any) -> Any:
    """Inverse of `_to_plain`."""
    if not isinstance(value, dict):
        return value
    if "__seq__" in value:
        items = [_from_plain(v) for v in value["items"]]
        return tuple(items) if value["__seq__"] == "tuple" else items
    if "__deque__" in value:
        return collections.deque((_from_plain(v) for v in value["__deque__"]), value["maxlen"])
    if "__map__" in value:
        return {_from_plain(k): _from_plain(v) for k, v in value["__map__"]}
    if "__object__" in value:
        module, _, name = value["__object__"].partition(":")
        if module not in _STATE_MODULES:
            raise ValueError(f"a checkpoint names the class {value['__object__']!r}: not loaded")
        obj = object.__new__(getattr(importlib.import_module(module), name))
        vars(obj).update(_from_plain(value["attrs"]))
        return obj
    raise ValueError(f"not a checkpointed value: {sorted(value)}")


def _restore_attributes(target: Any, state: Any) -> None:
    """Give ``target`` the attributes of the checkpointed object ``state`` (its process
    attributes, such as the process group, stay ``target``'s)."""
    saved = _from_plain(state)
    if type(saved) is not type(target):
        raise ValueError(
            f"the checkpoint holds a {type(saved).__name__}, this run a {type(target).__name__}"
        )
    for key in _PROCESS_ATTRIBUTES:
        if hasattr(target, key):
            setattr(saved, key, getattr(target, key))
    vars(target).clear()
    vars(target).update(vars(saved))


class TextTo3DModule(pl.LightningModule):
    """The text-to-3D SDS job as a `LightningModule`, sharded over ranks under DDP.

    One training step is one step of `dream`: ``config.R`` views (over all ranks) from the
    camera prior, rendered by a `VoxelField`, scored by SDS with ``config.estimator``, one Adam
    step at ``config.lr`` on the field. Lightning's ``Trainer`` chooses the devices (the
    config's ``device`` is not used); the module's dataloader has ``config.steps`` batches, so
    ``max_epochs=1`` runs the configured steps (``max_steps`` may stop it earlier).

    The per-rank parts (the Pyro model, guide and loss) are built when training starts, once
    the rank and device are known. A run resumed from a Lightning checkpoint
    (``trainer.fit(module, ckpt_path=...)``) gets back the field and Adam's state (Lightning's
    part) and every rank's random streams, learned proposal and accountant (`on_save_checkpoint`
    / `on_load_checkpoint`), and continues exactly as the uninterrupted run would.

    Args:
        config: the run's settings (`TextTo3DConfig`).
        scene: the teacher and prompt (default: ``make_scene(config.teacher, config.prompt)``).
        measure_every: the accountant measures ``V_b`` and ``V_w`` every this many steps,
            pooled over ranks (three extra vector-Jacobian products on those steps); ``None``:
            no accountant (not allowed for an adapting estimator such as ``"auto"``).

    Attributes:
        field: the carved field (the module's only parameters).
        objective: the SDS objective.
        pyro_model, guide, loss: the Pyro model, its `TimestepGuide` and the
            `DistributedCARVLoss` of this rank (``None`` until training starts).
        camera_generator: the ``torch.Generator`` of this rank's cameras (``None`` until
            training starts).
        seeds: this rank's seeds by stream (empty until training starts).
        last_quality: the latest evaluation (``{}`` until one ran; rank 0 only).

    Raises:
        TypeError: if ``config`` is not a `TextTo3DConfig` or ``scene`` not a `Scene`.
        ValueError: on a bad ``measure_every`` or an adapting estimator without one.
    """

    def __init__(
        self,
        config: TextTo3DConfig,
        *,
        scene: Scene | None = None,
        measure_every: int | None = 10,
    ):
        _checks.instance("config", config, TextTo3DConfig, "a TextTo3DConfig")
        if scene is not None:
            _checks.instance("scene", scene, Scene, "a Scene (see make_scene) or None")
        if measure_every is not None:
            _checks.positive_int("measure_every", measure_every)
        elif config.estimator.adapt:
            raise ValueError(
                f"measure_every=None leaves no accountant, but estimator "
                f"{config.estimator.name!r} adapts K from the accountant's measurements"
            )
        super().__init__()
        self.automatic_optimization = False  # the gradients are reduced by DistributedCARVLoss
        self.config = config
        self.measure_every = measure_every
        self.save_hyperparameters({"config": config.to_dict(), "measure_every": measure_every})
        # the teacher is no submodule (it is frozen: DDP and checkpoints must not carry it);
        # it is moved to the module's device when training starts
        self.scene = scene or make_scene(
            config.teacher, config.prompt, dtype=config.torch_dtype, compile=config.teacher_compile
        )
        self.field = VoxelField(config.resolution, self.scene.channels, seed=config.seed)
        self.objective = SDS(
            self.scene.teacher,
            weighting=config.weighting,
            t_range=config.t_range,
            guidance_scale=config.guidance_scale or self.scene.guidance_scale,
        )
        self.truth = self.scene.true_occupancy(config.resolution)
        self.pyro_model: Any = None
        self.guide: Any = None
        self.loss: DistributedCARVLoss | None = None
        self.camera_generator: torch.Generator | None = None
        self.seeds: dict[str, int] = {}
        self._resume: dict[str, Any] | None = None  # a checkpoint's state, until training starts
        self.last_quality: dict[str, float] = {}
        # the run's own Pyro param store: the model's pyro.module("field", ...) must find this
        # field, not one another run left in the global store
        self._store: dict[str, Any] = {"params": {}, "constraints": {}}

    # -- Lightning's hooks ---------------------------------------------------------------------
    def train_dataloader(self) -> _Steps:
        """``config.steps`` placeholder batches (the step draws its own cameras)."""
        return _Steps(self.config.steps, lambda: int(self.trainer.global_step))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam on the field at ``config.lr`` (as `dream`)."""
        return torch.optim.Adam(self.field.parameters(), lr=self.config.lr)

    def on_train_start(self) -> None:
        """Build this rank's model, guide and loss, check that the ranks' seeds differ, and
        give a resumed run its checkpointed state."""
        config, est = self.config, self.config.estimator
        rank, world = self.global_rank, self.trainer.world_size
        shard_range(config.R, rank, world)  # ValueError now if a rank would get no view
        step = int(self.trainer.global_step)
        saved = self._resumable_state(world, step)
        if saved is not None:
            self.seeds = dict(saved["seeds"])
        else:
            self.seeds = {
                "cameras": derive_seed(config.seed, "cameras", rank, step),
                "draws": derive_seed(config.seed, "draws", rank, step),
                "strata": derive_seed(config.seed, "strata", None, step),
                "outer": derive_seed(config.seed, "outer", None, step),
            }
        self._check_rank_seeds()
        self.scene.teacher.to(self.device)
        # cameras are drawn on the host from their own stream (as dream does)
        self.camera_generator = torch.Generator().manual_seed(self.seeds["cameras"])
        self.pyro_model = make_model(
            self.field,
            self.scene,
            self.objective,
            config.R,
            est.K or 1,
            self.camera_generator,
            azimuth_deg=config.azimuth_deg,
            elevation_deg=config.elevation_deg,
        )
        # an outer design (est.outer) shards one global design by the plate's indices
        self.guide = est.guide(self.pyro_model, outer_seed=self.seeds["outer"])
        self.guide.source = SharedStrataSource(self.seeds["draws"], self.seeds["strata"])
        accountant = None
        if self.measure_every is not None:
            accountant = DistributedAccountant(
                every=self.measure_every, adapt=est.adapt, k_range=est.k_range
            )
        self.loss = DistributedCARVLoss(est.loss(accountant=accountant), outer_plate="views")
        self.loss.step = step  # ranks resumed from different checkpoints are caught
        if saved is not None:
            self._restore(saved)

    # -- checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Add every rank's random streams, learned proposal and accountant to the checkpoint.

        Collective under DDP (Lightning calls this hook on every rank and writes the file on
        rank 0): the ranks' states are gathered, in rank order. Before training has started
        there is nothing of the run's own to add.
        """
        if self.loss is None:
            return
        own = _to_plain(self._rank_state())
        world = self.trainer.world_size
        if world > 1 and dist.is_available() and dist.is_initialized():
            ranks: list[Any] = [None] * world
            dist.all_gather_object(ranks, own)
        else:
            ranks = [own]
        checkpoint[CHECKPOINT_KEY] = {
            "version": _STATE_VERSION,
            "step": int(self.trainer.global_step),
            "ranks": ranks,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the run's state from ``checkpoint`` until training starts (the per-rank parts
        it goes into are built then)."""
        self._resume = checkpoint.get(CHECKPOINT_KEY)

    def _rank_state(self) -> dict[str, Any]:
        """This rank's state beside the field and Adam's: what `dream`'s checkpoint holds."""
        field_keys = {param_with_module_name("field", n) for n, _ in self.field.named_parameters()}
        store = self._store
        learned = {k: v for k, v in store["params"].items() if k not in field_keys}
        for key in learned:
            if store["constraints"].get(key, constraints.real) is not constraints.real:
                raise TypeError(
                    f"the run's param store holds a constrained entry {key!r} "
                    f"({store['constraints'][key]}); only unconstrained ones are checkpointed"
                )
        return {
            "seeds": dict(self.seeds),
            "rng": {"cameras": self.camera_generator.get_state(), "guide": self.guide.get_state()},
            # beyond the field (Lightning's part): a learning proposal's running statistics,
            # unconstrained, each restored to the kind of device it was on
            "param_store": {k: (v, v.device.type != "cpu") for k, v in learned.items()},
            "accountant": self.loss.accountant,
        }

    def _resumable_state(self, world: int, step: int) -> dict[str, Any] | None:
        """This rank's checkpointed state, or ``None`` (a fresh run, or a checkpoint whose
        state cannot continue here: then with a warning)."""
        resume, self._resume = self._resume, None
        if resume is None:
            if step > 0:
                rank_zero_warn(
                    f"the checkpoint (step {step}) holds no carv-pyro state: the field and "
                    f"Adam's state are restored, the random streams are derived afresh from "
                    f"step {step} and the accountant starts afresh"
                )
            return None
        if resume.get("version") != _STATE_VERSION:
            raise ValueError(
                f"the checkpoint's carv-pyro state has version {resume.get('version')!r}; this "
                f"version of TextTo3DModule reads version {_STATE_VERSION}"
            )
        ranks = resume["ranks"]
        if len(ranks) != world:
            rank_zero_warn(
                f"the checkpoint was written by {len(ranks)} processes and resumes on {world}: "
                f"the views shard differently, so the run cannot continue as it was; the "
                f"field and Adam's state are restored, the random streams are derived afresh "
                f"from step {step} and the accountant starts afresh"
            )
            return None
        return _from_plain(ranks[self.global_rank])

    def _restore(self, saved: dict[str, Any]) -> None:
        self.camera_generator.set_state(saved["rng"]["cameras"])
        self.guide.set_state(saved["rng"]["guide"])
        for key, (value, on_device) in saved["param_store"].items():
            self._store["params"][key] = value.to(self.device) if on_device else value
            self._store["constraints"][key] = constraints.real
        accountant = self.loss.accountant
        if (saved["accountant"] is None) != (accountant is None):
            raise ValueError(
                "the checkpoint was written with measure_every="
                + ("None" if saved["accountant"] is None else "an accountant")
                + f" and resumes with measure_every={self.measure_every}"
            )
        if accountant is not None:
            _restore_attributes(accountant, saved["accountant"])

    def _check_rank_seeds(self) -> None:
        """Every rank's own seeds must differ from every other rank's (collective)."""
        own = torch.tensor([self.seeds["cameras"], self.seeds["draws"]], device=self.device)
        gathered = self.all_gather(own)  # (world, 2), or (2,) in one process
        if gathered.dim() == 1:
            return
        for column, name in enumerate(("cameras", "draws")):
            values = gathered[:, column].tolist()
            if len(set(values)) != len(values):
                raise RuntimeError(
                    f"ranks share a {name} seed ({values}): every rank would draw the same "
                    f"views; is global_rank set on every process?"
                )

    def training_step(self, batch: Any, batch_idx: int) -> None:
        """One SDS step on this rank's shard; the gradients are averaged over ranks, then Adam."""
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        with pyro.get_param_store().scope(self._store):
            value = self.loss.loss_and_grads(self.pyro_model, self.guide)
        optimizer.step()
        self._log_step(value)
        step = int(self.trainer.global_step)
        last = step >= int(self.trainer.estimated_stepping_batches)
        if step % self.config.eval_every == 0 or last:
            self._evaluate()

    def _log_step(self, value: float) -> None:
        summary = self.loss.summary()
        term = self.loss.last_records[0].name
        # this rank's draws: averaged over ranks by Lightning (one all-reduce a key)
        per_rank = {
            f"{term}/{key}": summary[f"{term}/{key}"] for key in ("ess", "max_weight", "value")
        }
        self.log_dict(per_rank, sync_dist=True, on_step=True, on_epoch=False)
        # the same on every rank: the loss is averaged already, the accountant pooled
        same = {"train/loss": value, f"{term}/K": summary[f"{term}/K"]}
        if self.loss.accountant is not None:
            for key in ("k_star", "ecm_predicted", "v_between", "v_within", "c_outer", "c_inner"):
                same[f"carv/{key}"] = summary[key]
        self.log_dict(same, on_step=True, on_epoch=False, prog_bar=False)
        self.log("loss", value, on_step=True, on_epoch=False, prog_bar=True, logger=False)

    def _evaluate(self) -> None:
        # rank 0 only: the field is the same on every rank, and the others go on to the next
        # step's collectives (well within the process group's timeout for a CPU-sized check)
        if self.global_rank != 0:
            return
        self.last_quality = quality(
            self.field,
            self.scene,
            n_views=self.config.eval_views,
            elevations_deg=self.config.eval_elevations_deg,
            true_occupancy=self.truth,
        )
        metrics = {f"quality/{key}": value for key, value in self.last_quality.items()}
        # straight to the loggers: a value given to self.log is logged again at every later
        # step until it is logged anew, which would draw flat segments into the quality curve
        for logger in self.loggers:
            logger.log_metrics(metrics, step=int(self.trainer.global_step))
