"""A small CNN digit classifier, the judge of the embedded default teacher's samples.

`DigitClassifier` reads ``1 x 16 x 16`` images in ``[-1, 1]`` (the format of
[`carv_pyro.data.load_digits_images`][carv_pyro.data.load_digits_images] and of the default teacher's samples) and returns
logits over the digits 0-9. Its penultimate-layer `features` serve as the
embedding of a Fréchet distance between sample sets (an FID for digits).

The shipped weights (``teachers/default/classifier.safetensors``) are trained by
``scripts/train_default_teacher.py`` and load offline with `load_classifier`.

Examples:
    >>> from carv_pyro.data import load_digits_images
    >>> clf = load_classifier()
    >>> images, labels = load_digits_images(split="test")
    >>> bool((clf(images).argmax(-1) == labels).float().mean() > 0.95)
    True
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CLASSIFIER_FILE",
    "DigitClassifier",
    "classifier_accuracy",
    "load_classifier",
    "random_shift",
    "save_classifier",
]

CLASSIFIER_FILE = "classifier.safetensors"
"""File name of the classifier weights inside the default teacher folder."""


class DigitClassifier(nn.Module):
    """A four-convolution CNN for ``(N, 1, 16, 16)`` digit images in ``[-1, 1]``.

    Layout: two 3x3 convolutions at 16x16, max-pool, two at 8x8, max-pool, then a linear map of
    the ``(2 * width, 4, 4)`` activations to ``num_features`` (the embedding) and a linear head.

    Args:
        width: channels of the 16x16 convolutions (the 8x8 ones have ``2 * width``).
        num_features: ``F``, the size of the penultimate-layer embedding.
        num_classes: number of classes (10 digits).
        dropout: dropout rate applied to the embedding in training mode.
    """

    def __init__(
        self, width: int = 16, num_features: int = 64, num_classes: int = 10, dropout: float = 0.2
    ):
        super().__init__()
        if width < 1 or num_features < 1 or num_classes < 2:
            raise ValueError(
                f"need width >= 1, num_features >= 1, num_classes >= 2; got {width}, "
                f"{num_features}, {num_classes}"
            )
        self.config = {
            "width": int(width),
            "num_features": int(num_features),
            "num_classes": int(num_classes),
            "dropout": float(dropout),
        }
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 16x16 -> 8x8
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Flatten(),
            nn.Linear(2 * width * 16, num_features),
            nn.ReLU(),
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(num_features, num_classes)

    def _check(self, x: Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, 16, 16):
            raise ValueError(f"expected images of shape (N, 1, 16, 16), got {tuple(x.shape)}")

    def features(self, x: Tensor) -> Tensor:
        """Penultimate-layer embedding.

        Args:
            x: ``(N, 1, 16, 16)`` images in ``[-1, 1]``.

        Returns:
            ``(N, F)`` non-negative features (post-ReLU), ``F = num_features``.
        """
        self._check(x)
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits.

        Args:
            x: ``(N, 1, 16, 16)`` images in ``[-1, 1]``.

        Returns:
            ``(N, num_classes)`` logits.
        """
        return self.head(self.dropout(self.features(x)))


def random_shift(
    images: Tensor, max_shift: int = 1, generator: torch.Generator | None = None
) -> Tensor:
    """Translate each image by a random integer offset, filling with background (-1).

    Args:
        images: ``(N, C, H, W)`` images with background value -1.
        max_shift: offsets are drawn uniformly from ``-max_shift .. max_shift`` per axis.
        generator: optional torch generator for reproducibility.

    Returns:
        ``(N, C, H, W)`` shifted images.
    """
    n, _, h, w = images.shape
    m = max_shift
    padded = F.pad(images, (m, m, m, m), value=-1.0)
    dy = torch.randint(0, 2 * m + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * m + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]  # (N, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]  # (N, 1, 1, W)
    batch = torch.arange(n)[:, None, None, None]
    chans = torch.arange(images.shape[1])[None, :, None, None]
    return padded[batch, chans, rows, cols]


@torch.no_grad()
def classifier_accuracy(
    classifier: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 512
) -> float:
    """Fraction of ``images`` (``(N, 1, 16, 16)``) whose argmax logit equals ``labels`` (``(N,)``)."""
    correct = 0
    for i in range(0, images.shape[0], batch_size):
        logits = classifier(images[i : i + batch_size])
        correct += int((logits.argmax(-1) == labels[i : i + batch_size]).sum())
    return correct / max(int(images.shape[0]), 1)


def _default_path() -> Path:
    from .teachers.embedded import DEFAULT_TEACHER_DIR

    return Path(DEFAULT_TEACHER_DIR) / CLASSIFIER_FILE


def save_classifier(classifier: DigitClassifier, path: str | Path) -> None:
    """Save weights (fp32 safetensors) with the constructor config in the file's metadata."""
    from safetensors.torch import save_file

    state = {k: v.detach().float().contiguous() for k, v in classifier.state_dict().items()}
    save_file(state, str(path), metadata={"config": json.dumps(classifier.config)})


def load_classifier(path: str | Path | None = None) -> DigitClassifier:
    """Load the shipped digit classifier (offline), in eval mode with frozen weights.

    Args:
        path: a ``.safetensors`` file written by ``save_classifier``; default: the one
            shipped in ``carv_pyro/teachers/default/``.

    Returns:
        A `DigitClassifier` in eval mode whose parameters have ``requires_grad=False``.

    Raises:
        FileNotFoundError: if the weights file does not exist (run
            ``scripts/train_default_teacher.py`` to create it).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path) if path is not None else _default_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"classifier weights not found at {path}; run scripts/train_default_teacher.py"
        )
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    config = json.loads(meta.get("config", "{}"))
    model = DigitClassifier(**config)
    model.load_state_dict(load_file(str(path)))
    model.eval()
    model.requires_grad_(False)
    return model
