"""`Generator`: the one-step, class-conditional student of DMD."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from ... import _checks

__all__ = ["Generator"]


class Generator(nn.Module):
    """A one-step, class-conditional generator ``G(z, y) -> (N, 1, 16, 16)`` in ``[-1, 1]``.

    Layout: the latent ``z`` and a label embedding go through a linear map to a
    ``(2 width, 4, 4)`` feature map, then two nearest-neighbour upsamplings with 3x3 convolutions
    (``4 -> 8 -> 16``), a last 3x3 convolution to one channel, and ``tanh``.

    Any module with the attributes ``z_dim``, ``num_classes`` (``None`` if unconditional) and
    ``event_shape`` and a ``forward(z, labels)`` works with
    [`make_model`][carv_pyro.pipelines.distillation.make_model].

    Its weights are initialised by torch's global generator, as for any ``nn.Module``; the
    pipeline builds it inside ``torch.random.fork_rng`` with its own seed.

    Args:
        z_dim: size of the latent ``z ~ N(0, I)``.
        num_classes: number of class labels (10 digits); ``None`` for an unconditional generator.
        width: channels of the 8x8 and 16x16 convolutions.
        embed_dim: size of the label embedding.
        image_size: side of the output (a multiple of 4).

    Raises:
        ValueError: naming the first invalid argument.
    """

    def __init__(
        self,
        z_dim: int = 32,
        num_classes: int | None = 10,
        width: int = 32,
        embed_dim: int = 16,
        image_size: int = 16,
    ):
        super().__init__()
        for name, value in (("z_dim", z_dim), ("width", width), ("embed_dim", embed_dim)):
            _checks.positive_int(name, value)
        _checks.positive_int("image_size", image_size)
        if image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4, got {image_size}")
        if num_classes is not None:
            _checks.positive_int("num_classes", num_classes)
        self.z_dim = z_dim
        self.num_classes = num_classes
        self.event_shape = torch.Size([1, image_size, image_size])
        self._base = image_size // 4
        self.embed = nn.Embedding(num_classes, embed_dim) if num_classes else None
        in_dim = z_dim + (embed_dim if num_classes else 0)
        self.fc = nn.Sequential(nn.Linear(in_dim, 2 * width * self._base**2), nn.SiLU())
        self.up = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(2 * width, width, 3, padding=1),
            nn.SiLU(),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(width, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, 1, 3, padding=1),
        )

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        """Generate images.

        Args:
            z: ``(N, z_dim)`` latents.
            labels: ``(N,)`` long class labels (required iff the generator is conditional).

        Returns:
            ``(N, 1, H, W)`` images in ``[-1, 1]``.

        Raises:
            ValueError: on a wrong shape of ``z`` or ``labels``.
        """
        if z.dim() != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"z must have shape (N, {self.z_dim}), got {tuple(z.shape)}")
        h = z
        if self.embed is not None:
            if labels is None or labels.shape != (z.shape[0],):
                got = None if labels is None else tuple(labels.shape)
                raise ValueError(f"labels must have shape ({z.shape[0]},), got {got}")
            h = torch.cat([z, self.embed(labels.long())], dim=1)
        h = rearrange(self.fc(h), "n (c h w) -> n c h w", h=self._base, w=self._base)
        return torch.tanh(self.up(h))

    @torch.no_grad()
    def sample(
        self,
        labels: Tensor | None = None,
        n: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Draw ``z ~ N(0, I)`` and generate without gradients.

        Args:
            labels: ``(N,)`` labels; default ``arange(n) % num_classes`` (balanced).
            n: number of samples when ``labels`` is None.
            generator: the ``torch.Generator`` of ``z`` (drawn on its device, then moved);
                ``None`` uses torch's global generator.

        Returns:
            ``(N, 1, H, W)`` images in ``[-1, 1]``.

        Raises:
            ValueError: if neither ``labels`` nor a positive ``n`` is given.
        """
        device = next(self.parameters()).device
        if labels is None:
            _checks.positive_int("n", n)
            if self.num_classes is not None:
                labels = torch.arange(n) % self.num_classes
        count = n if labels is None else labels.shape[0]
        where = generator.device if generator is not None else device
        z = torch.randn(count, self.z_dim, generator=generator, device=where).to(device)
        return self(z, None if labels is None else labels.to(device))
