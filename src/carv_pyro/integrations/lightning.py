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

from typing import Any

import numpy as np
import pyro
import torch
from torch.utils.data import DataLoader, IterableDataset

try:
    import pytorch_lightning as pl
except ImportError as error:  # pragma: no cover - the extra is installed wherever this is tested
    raise ImportError(
        "carv_pyro.integrations.lightning needs PyTorch Lightning: "
        'pip install "carv-pyro[lightning]" (or pip install "pytorch-lightning>=2.2")'
    ) from error

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

__all__ = ["STREAMS", "TextTo3DModule", "derive_seed"]

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
        step: the step the streams start at (a resumed run draws fresh streams, not the ones it
            already drew).

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


class _Steps(IterableDataset):
    """``0, 1, ..., n - 1``: the batches of a job that draws its own data.

    Iterable, so Lightning does not put a ``DistributedSampler`` on it: every rank gets every
    step (what a step renders is drawn by the module); sized, so that
    ``trainer.estimated_stepping_batches`` knows the last step.
    """

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(range(self.n))


class TextTo3DModule(pl.LightningModule):
    """The text-to-3D SDS job as a `LightningModule`, sharded over ranks under DDP.

    One training step is one step of `dream`: ``config.R`` views (over all ranks) from the
    camera prior, rendered by a `VoxelField`, scored by SDS with ``config.estimator``, one Adam
    step at ``config.lr`` on the field. Lightning's ``Trainer`` chooses the devices (the
    config's ``device`` is not used); the module's dataloader has ``config.steps`` batches, so
    ``max_epochs=1`` runs the configured steps (``max_steps`` may stop it earlier).

    The per-rank parts (the Pyro model, guide and loss) are built when training starts, once
    the rank and device are known; a run resumed from a Lightning checkpoint gets the field and
    Adam's state back and draws fresh random streams derived from the step it resumes at.

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
        self.scene = scene or make_scene(config.teacher, config.prompt, dtype=config.torch_dtype)
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
        self.seeds: dict[str, int] = {}
        self.last_quality: dict[str, float] = {}
        # the run's own Pyro param store: the model's pyro.module("field", ...) must find this
        # field, not one another run left in the global store
        self._store: dict[str, Any] = {"params": {}, "constraints": {}}

    # -- Lightning's hooks ---------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        """``config.steps`` placeholder batches (the step draws its own cameras)."""
        return DataLoader(_Steps(self.config.steps), batch_size=None)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam on the field at ``config.lr`` (as `dream`)."""
        return torch.optim.Adam(self.field.parameters(), lr=self.config.lr)

    def on_train_start(self) -> None:
        """Build this rank's model, guide and loss, and check that the ranks' seeds differ."""
        config, est = self.config, self.config.estimator
        rank, world = self.global_rank, self.trainer.world_size
        shard_range(config.R, rank, world)  # ValueError now if a rank would get no view
        step = int(self.trainer.global_step)
        self.seeds = {
            "cameras": derive_seed(config.seed, "cameras", rank, step),
            "draws": derive_seed(config.seed, "draws", rank, step),
            "strata": derive_seed(config.seed, "strata", None, step),
            "outer": derive_seed(config.seed, "outer", None, step),
        }
        self._check_rank_seeds()
        self.scene.teacher.to(self.device)
        # cameras are drawn on the host from their own stream (as dream does)
        cameras = torch.Generator().manual_seed(self.seeds["cameras"])
        self.pyro_model = make_model(
            self.field,
            self.scene,
            self.objective,
            config.R,
            est.K or 1,
            cameras,
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
