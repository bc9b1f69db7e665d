"""`FakeScore`: the online "fake" score network of distribution matching (DMD, VSD).

Distribution-matching gradients (DMD's generator step, ProlificDreamer's VSD) need the score of
the student's OWN samples next to the frozen teacher's. `FakeScore` is that network: a
[`DiffusersTeacher`][carv_pyro.teachers.DiffusersTeacher] (frozen between updates, never a Pyro
parameter) that objectives query like any teacher, trained between student steps with its own
torch optimizer on fresh student samples by the standard denoising loss. It knows nothing of
generators: a VSD pipeline calls `FakeScore.update` with its renders.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from ... import _checks
from ...objectives import DenoisingLoss
from ...teachers.trainable import copy_teacher, trainable

__all__ = ["FAKE_INITS", "FakeScore"]

#: How `FakeScore.from_teacher` makes the network.
FAKE_INITS = ("real", "scratch")


def new_fake_unet(real: Any, channels: tuple[int, ...]) -> nn.Module:
    """A fresh class-conditional ``UNet2DModel`` shaped like ``real``'s input and labels.

    Initialised from torch's global generator (wrap the call in ``torch.random.fork_rng``).
    """
    from diffusers import UNet2DModel

    cfg = real.unet.config
    return UNet2DModel(
        sample_size=cfg.sample_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        block_out_channels=tuple(channels),
        down_block_types=("DownBlock2D",) * len(channels),
        up_block_types=("UpBlock2D",) * len(channels),
        layers_per_block=1,
        norm_num_groups=min(8, min(channels)),
        num_class_embeds=cfg.num_class_embeds,
    )


class FakeScore:
    """The "fake" score network of DMD/VSD: a diffusers teacher of the student's own samples.

    Between student steps `update` trains the network with AdamW on clean student samples, using
    the standard denoising loss ([`DenoisingLoss`][carv_pyro.objectives.DenoisingLoss],
    eps-space MSE) with ``t`` from ``U(t_range)``; the network is opened for training only inside
    `update` (``carv_pyro.teachers.trainable.trainable``), so every objective that
    queries it between updates sees a frozen teacher. The ``(t, eps)`` draws of the updates come
    from the fake score's own ``torch.Generator``.

    Args:
        teacher: the fake network as a ``DiffusersTeacher`` (same schedule as the real teacher;
            `from_teacher` builds one).
        lr: AdamW learning rate.
        t_range: ``(lo, hi)`` of the timesteps it is trained on.
        weight_decay: AdamW weight decay.
        betas: AdamW betas (DMD2's ``(0, 0.99)``).
        seed: seeds the updates' ``(t, eps)`` draws.

    Attributes:
        teacher: the network, as a teacher.
        loss: its denoising objective.
        optimizer: the AdamW optimizer of the network.
        updates: updates done so far.
        rng: the CPU ``torch.Generator`` of the updates' draws.

    Raises:
        ValueError: naming the first invalid argument.
    """

    def __init__(
        self,
        teacher: Any,
        lr: float = 1e-3,
        t_range: tuple[float, float] = (0.02, 0.98),
        weight_decay: float = 0.0,
        *,
        betas: tuple[float, float] = (0.0, 0.99),
        seed: int = 0,
    ):
        _checks.positive_float("fake lr", lr)
        _checks.non_negative_float("weight_decay", weight_decay)
        _checks.seed_value("seed", seed)
        if not isinstance(getattr(teacher, "unet", None), nn.Module):
            raise ValueError(f"teacher must be a DiffusersTeacher, got {type(teacher).__name__}")
        self.teacher = teacher
        self.loss = DenoisingLoss(teacher, weighting="uniform", t_range=t_range, reduction="mean")
        self.optimizer = torch.optim.AdamW(
            teacher.unet.parameters(), lr=lr, betas=tuple(betas), weight_decay=weight_decay
        )
        self.updates = 0
        self.rng = torch.Generator().manual_seed(seed)

    @classmethod
    def from_teacher(
        cls,
        real: Any,
        *,
        init: str = "real",
        channels: tuple[int, ...] = (16, 32),
        seed: int = 0,
        device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> FakeScore:
        """A fake score with ``real``'s schedule and conditioning.

        Args:
            real: the real teacher (a ``DiffusersTeacher``).
            init: ``"real"`` (a copy of the real UNet, as DMD does) or ``"scratch"`` (a fresh
                ``UNet2DModel`` with ``channels``, initialised from ``seed``).
            channels: ``block_out_channels`` of a ``"scratch"`` network.
            seed: seeds a scratch network's weights; ``seed + 1`` seeds the updates' draws.
            device: where the network lives (default: the real UNet's device).
            **kwargs: `FakeScore` arguments (``lr``, ``t_range``, ``weight_decay``, ``betas``).

        Returns:
            A `FakeScore`.

        Raises:
            ValueError: on an unknown ``init`` or bad channels.
        """
        _checks.choice("fake_init", init, FAKE_INITS)
        _checks.seed_value("seed", seed)
        if init == "real":
            unet = copy.deepcopy(real.unet)
        else:
            channels = tuple(_checks.positive_int("fake_channels", c) for c in channels)
            with torch.random.fork_rng(devices=[]):  # diffusers initialises from the global RNG
                torch.manual_seed(seed)
                unet = new_fake_unet(real, channels)
        if device is not None:
            unet = unet.to(device)
        return cls(copy_teacher(real, unet), seed=(seed + 1) % 2**63, **kwargs)

    def update(self, x0: Tensor, labels: Tensor | None) -> float:
        """One denoising step of the fake network on clean samples ``x0``.

        Args:
            x0: ``(N, *event)`` student samples (detached here).
            labels: ``(N,)`` their class labels, or ``None`` for an unconditional network.

        Returns:
            The step's denoising loss.
        """
        x0 = x0.detach()
        n = x0.shape[0]
        t = self.loss.prior.sample((n,), generator=self.rng).to(x0.device)
        eps = torch.randn(x0.shape, generator=self.rng, dtype=x0.dtype).to(x0.device)
        with trainable(self.teacher):
            self.teacher.unet.train()
            loss = self.loss.evaluate(x0, t, eps, labels).surrogate.mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        return float(loss.detach())

    def clone(self) -> FakeScore:
        """An independent copy: network, optimizer state, draws and update count."""
        unet = copy.deepcopy(self.teacher.unet)
        group = self.optimizer.param_groups[0]
        other = FakeScore(
            copy_teacher(self.teacher, unet),
            group["lr"],
            self.loss.prior.t_range,
            group["weight_decay"],
            betas=group["betas"],
        )
        other.load_state_dict(copy.deepcopy(self.state_dict()))
        return other

    def state_dict(self) -> dict[str, Any]:
        """Everything an exact resume needs: weights, optimizer, random state, update count."""
        return {
            "network": self.teacher.unet.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": self.rng.get_state(),
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict`'s result (in place)."""
        self.teacher.unet.load_state_dict(state["network"])
        clear = getattr(self.teacher, "clear_cache", None)
        if clear is not None:
            clear()  # a cast copy of the old weights must not outlive them
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng.set_state(state["rng"])
        self.updates = int(state["updates"])
