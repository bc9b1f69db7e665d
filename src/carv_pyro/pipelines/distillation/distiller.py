"""`Distiller`: the state of a DMD run (teachers, generator, fake score, model, random state)."""

from __future__ import annotations

import copy
import math
from typing import Any

import pyro
import torch
from torch import Tensor, nn

from ... import _checks
from ...infer.estimator import Estimator, resolve_estimator
from ...infer.guide import TimestepGuide
from ...infer.loss import CARVLoss
from ...measure import gradient_estimate
from ...teachers.base import AbstractTeacher
from .config import DEFAULT_K, DistillationConfig
from .fake_score import FakeScore
from .generator import Generator
from .model import make_model
from .objective import dmd_objective
from .teacher import default_teacher

__all__ = ["Distiller", "derived_seeds"]

#: What each seed derived from ``config.seed`` seeds (see `derived_seeds`).
SEED_PURPOSES = ("generator", "fake", "latents", "fake_samples", "guide", "guides")


def derived_seeds(seed: int) -> dict[str, int]:
    """Independent seeds for each purpose in `SEED_PURPOSES`, drawn from one seeded generator.

    Nearby run seeds give unrelated streams (seed ``s``'s latents never replay seed ``s + 1``'s
    fake-score draws, as ``seed + offset`` schemes would).
    """
    _checks.seed_value("seed", seed)
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 2**62, (len(SEED_PURPOSES),), generator=g).tolist()
    return dict(zip(SEED_PURPOSES, (int(v) for v in values)))


class Distiller:
    """The state of a DMD run: real teacher, generator, fake score and the DMD objective.

    Every draw of the run comes from the distiller's own generators, seeded from
    ``config.seed`` (see `derived_seeds`): the latents of the model (``rngs["latents"]``), the
    fake score's training samples (``rngs["fake_samples"]``) and its ``(t, eps)`` draws
    (``fake.rng``); torch's global generator is used only inside ``torch.random.fork_rng`` to
    initialise the networks.

    Args:
        config: the run's settings.
        teacher: the frozen real teacher (default: the embedded digits teacher, or a random
            stand-in with a warning while its weights are missing). It is moved to ``device``
            in place.
        device: where the networks live.
        generator: an initial generator (default: a new `Generator` seeded from
            ``config.seed``); used as is, not copied.
        fake: an initial `FakeScore` (default: built from ``config.fake_init``).

    Attributes:
        config: the settings.
        device: where the networks live.
        real: the real teacher.
        num_classes: the generator's classes (the teacher's null class, 10 for digits).
        generator: the generator (registered as ``pyro.module("generator", ...)`` by the model).
        fake: the `FakeScore`.
        objective: the DMD objective (`dmd_objective`).
        rngs: ``{"latents", "fake_samples", "guides"}`` CPU ``torch.Generator`` s.
        model: ``model(R, K)`` from `make_model` with ``R = config.R`` and the estimator's ``K``.

    Raises:
        ValueError: on a teacher that is not a class-conditional diffusers teacher, or a
            generator whose output does not fit it.
        TypeError: if ``config`` is not a `DistillationConfig`.
    """

    def __init__(
        self,
        config: DistillationConfig | None = None,
        teacher: Any = None,
        device: str | torch.device = "cpu",
        *,
        generator: nn.Module | None = None,
        fake: FakeScore | None = None,
    ):
        config = DistillationConfig() if config is None else config
        _checks.instance("config", config, DistillationConfig, "a DistillationConfig")
        self.config = config
        self.device = torch.device(device)
        real = default_teacher() if teacher is None else teacher
        if not isinstance(real, AbstractTeacher) or not hasattr(real, "unet"):
            raise ValueError(
                f"teacher must be a class-conditional DiffusersTeacher, got {type(real).__name__}"
            )
        if getattr(real, "num_class_embeds", None) is None:
            raise ValueError(
                "teacher must be class-conditional (UNet2DModel with num_class_embeds)"
            )
        self.real = real.to(self.device)
        self.num_classes = int(real.null_class if real.null_class is not None else 10)
        seeds = derived_seeds(config.seed)
        if generator is None:
            with torch.random.fork_rng(devices=[]):  # nn.Module initialises from the global RNG
                torch.manual_seed(seeds["generator"])
                generator = Generator(
                    z_dim=config.z_dim,
                    num_classes=self.num_classes,
                    width=config.width,
                    image_size=int(real.event_shape[-1]),
                )
        if tuple(generator.event_shape) != tuple(real.event_shape):
            raise ValueError(
                f"generator makes {tuple(generator.event_shape)} but the teacher takes "
                f"{tuple(real.event_shape)}"
            )
        self.generator = generator.to(self.device)
        if fake is None:
            fake = FakeScore.from_teacher(
                real,
                init=config.fake_init,
                channels=config.fake_channels,
                seed=seeds["fake"],
                device=self.device,
                lr=config.fake_lr,
                t_range=config.t_range,
            )
        self.fake = fake
        self.rngs = {
            name: torch.Generator().manual_seed(seeds[name])
            for name in ("latents", "fake_samples", "guides")
        }
        self.objective = dmd_objective(
            self.real,
            self.fake.teacher,
            guidance_scale=config.guidance_scale,
            t_range=config.t_range,
            normalize=config.normalize,
        )
        self.model = make_model(
            self.generator,
            self.objective,
            config.R,
            config.estimator.K or DEFAULT_K,
            labels=config.labels,
            rng=self.rngs["latents"],
        )
        self._guides: dict[Estimator, TimestepGuide] = {}

    # -- training parts ------------------------------------------------------------------------
    def fake_step(self, updates: int | None = None) -> float:
        """Train the fake score on fresh generator samples (uniform labels).

        Args:
            updates: number of updates (default ``config.fake_updates``).

        Returns:
            The mean denoising loss of the updates (``nan`` for none).
        """
        n = self.config.fake_updates if updates is None else updates
        _checks.non_negative_int("updates", n)
        rng = self.rngs["fake_samples"]
        losses = []
        for _ in range(n):
            labels = torch.randint(0, self.num_classes, (self.config.fake_batch,), generator=rng)
            x0 = self.generator.sample(labels, generator=rng)  # (B, *event)
            losses.append(self.fake.update(x0, labels.to(self.device)))
        return sum(losses) / len(losses) if losses else math.nan

    def guide(
        self, estimator: Estimator | str | None = None, *, seed: int | None = None
    ) -> TimestepGuide:
        """A [`TimestepGuide`][carv_pyro.TimestepGuide] for `model` from an estimator.

        Args:
            estimator: an [`Estimator`][carv_pyro.Estimator] or preset name (default: the
                config's).
            seed: seeds the guide's draws (default: the next seed of ``rngs["guides"]``, so
                two guides never share draws).
        """
        est = self.config.estimator if estimator is None else resolve_estimator(estimator)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), generator=self.rngs["guides"]))
        return est.guide(self.model, seed=seed)

    def parameters(self) -> list[Tensor]:
        """The generator's trainable parameters (the ``theta`` of the gradient)."""
        return [p for p in self.generator.parameters() if p.requires_grad]

    def gradient(
        self,
        R: int,
        K: int | None = None,
        estimator: Estimator | str | TimestepGuide | None = None,
    ) -> Tensor:
        """ONE gradient estimate at the current parameters, nothing stepped.

        Runs [`gradient_estimate`][carv_pyro.measure.gradient_estimate] in a private Pyro
        param-store scope; every ``.grad`` is left as it was. Repeated calls with one estimator
        reuse its guide (cached per estimator), so they make independent draws.

        Args:
            R: generator samples.
            K: inner draws per sample (default: the estimator's ``K``).
            estimator: an [`Estimator`][carv_pyro.Estimator], a preset name or a ready
                [`TimestepGuide`][carv_pyro.TimestepGuide] (default: the config's estimator).

        Returns:
            ``(P,)`` float64 CPU tensor: the flattened generator gradient.

        Raises:
            ValueError: on a non-positive ``R`` or ``K`` or an unknown estimator.
        """
        _checks.positive_int("R", R)
        if K is not None:
            _checks.positive_int("K", K)
        if isinstance(estimator, TimestepGuide):
            guide = estimator
            model_K = K or guide.K or DEFAULT_K
        else:
            est = self.config.estimator if estimator is None else resolve_estimator(estimator)
            if K is not None and est.K != K:
                est = est.replace(K=K)
            guide = self._guides.get(est)
            if guide is None:
                guide = self._guides[est] = self.guide(est)
            model_K = est.K or DEFAULT_K
        with pyro.get_param_store().scope():
            return gradient_estimate(
                CARVLoss(), self.model, guide, R=R, K=model_K, params=self.parameters()
            )

    # -- copies and checkpoints ----------------------------------------------------------------
    def clone(self, config: DistillationConfig | None = None) -> Distiller:
        """An independent copy of the generator, the fake score (optimizer and draws included)
        and the random state, over the same real teacher.

        Args:
            config: the copy's config (default: this one's); the networks are copied as they are.
        """
        other = Distiller(
            config or self.config,
            self.real,
            self.device,
            generator=copy.deepcopy(self.generator),
            fake=self.fake.clone(),
        )
        for name, rng in self.rngs.items():
            other.rngs[name].set_state(rng.get_state())
        return other

    def state_dict(self) -> dict[str, Any]:
        """The generator's weights, the fake score's state and the random state (CPU tensors)."""
        return {
            "generator": self.generator.state_dict(),
            "fake": self.fake.state_dict(),
            "rngs": {name: rng.get_state() for name, rng in self.rngs.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict`'s result in place (the networks keep their tensors)."""
        self.generator.load_state_dict(state["generator"])
        self.fake.load_state_dict(state["fake"])
        for name, value in state["rngs"].items():
            self.rngs[name].set_state(value)
