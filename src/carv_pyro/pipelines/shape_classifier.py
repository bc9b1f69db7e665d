"""A small CNN shape classifier: the judge of shaded renders of the procedural shapes.

`ShapeClassifier` reads ``(N, 1, S, S)`` renders in ``[-1, 1]`` (``S = 32`` for the shapes
teacher) and returns logits over the classes of
[`carv_pyro.pipelines.shapes.SHAPE_CLASSES`][carv_pyro.pipelines.shapes.SHAPE_CLASSES]. It is
trained by ``scripts/train_shapes_teacher.py`` on renders from random cameras and serves twice:

- in the shapes teacher's ``manifest.json``, the accuracy of the teacher's DDIM samples;
- in text-to-3D, `prompt_probability` of a carved field's renders from held-out views.

Its shipped weights live in ``teachers/shapes_teacher/classifier.safetensors`` and load
offline with `load_shape_classifier`.

Examples:
    >>> clf = ShapeClassifier(num_classes=12)
    >>> clf(torch.zeros(3, 1, 32, 32)).shape
    torch.Size([3, 12])
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CLASSIFIER_FILE",
    "ShapeClassifier",
    "load_shape_classifier",
    "prompt_probability",
    "save_shape_classifier",
]

CLASSIFIER_FILE = "classifier.safetensors"
"""File name of the classifier weights inside the shapes teacher's folder."""


class ShapeClassifier(nn.Module):
    """A six-convolution CNN for ``(N, 1, S, S)`` renders in ``[-1, 1]``.

    Three stages of two 3x3 convolutions (``width``, ``2 width``, ``4 width`` channels), each
    followed by a 2x2 max-pool (``S -> S / 8``), then a linear map to ``num_features`` (the
    embedding) and a linear head.

    Args:
        image_size: ``S``, pixels per side (a multiple of 8).
        width: channels of the first stage.
        num_features: ``F``, the size of the penultimate-layer embedding.
        num_classes: number of classes.
        dropout: dropout rate applied to the embedding in training mode.

    Raises:
        ValueError: on a non-positive size or an ``image_size`` that is not a multiple of 8.
    """

    def __init__(
        self,
        image_size: int = 32,
        width: int = 16,
        num_features: int = 128,
        num_classes: int = 12,
        dropout: float = 0.2,
    ):
        super().__init__()
        if image_size < 8 or image_size % 8:
            raise ValueError(f"image_size must be a positive multiple of 8, got {image_size}")
        if width < 1 or num_features < 1 or num_classes < 2:
            raise ValueError(
                f"need width >= 1, num_features >= 1, num_classes >= 2; got {width}, "
                f"{num_features}, {num_classes}"
            )
        self.config = {
            "image_size": int(image_size),
            "width": int(width),
            "num_features": int(num_features),
            "num_classes": int(num_classes),
            "dropout": float(dropout),
        }
        layers: list[nn.Module] = []
        channels = 1
        for k in range(3):
            out = width * 2**k
            layers += [
                nn.Conv2d(channels, out, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(out, out, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            channels = out
        side = image_size // 8
        layers += [nn.Flatten(), nn.Linear(channels * side * side, num_features), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(num_features, num_classes)

    def _check(self, x: Tensor) -> None:
        s = self.config["image_size"]
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, s, s):
            raise ValueError(f"expected images of shape (N, 1, {s}, {s}), got {tuple(x.shape)}")

    def features(self, x: Tensor) -> Tensor:
        """Penultimate-layer embedding.

        Args:
            x: ``(N, 1, S, S)`` images in ``[-1, 1]``.

        Returns:
            ``(N, F)`` non-negative features (post-ReLU).
        """
        self._check(x)
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits.

        Args:
            x: ``(N, 1, S, S)`` images in ``[-1, 1]``.

        Returns:
            ``(N, num_classes)`` logits.
        """
        return self.head(self.dropout(self.features(x)))


@torch.no_grad()
def prompt_probability(classifier: ShapeClassifier, images: Tensor, label: int) -> Tensor:
    """The classifier's probability of one class for each image: "p(prompt)" of renders.

    Args:
        classifier: the judge (in eval mode).
        images: ``(*B, 1, S, S)`` renders in ``[-1, 1]`` (e.g. held-out views of a field);
            values are clamped to ``[-1, 1]``.
        label: the prompt's class label.

    Returns:
        ``(*B,)`` probabilities in ``[0, 1]``.
    """
    batch = images.shape[:-3]
    flat = images.reshape(-1, *images.shape[-3:]).clamp(-1.0, 1.0)
    probs = F.softmax(classifier(flat).float(), dim=-1)[:, int(label)]
    return probs.reshape(batch)


def save_shape_classifier(classifier: ShapeClassifier, path: str | Path) -> None:
    """Save weights (fp32 safetensors) with the constructor config in the file's metadata.

    Args:
        classifier: the classifier.
        path: the ``.safetensors`` file to write.
    """
    from safetensors.torch import save_file

    state = {k: v.detach().float().cpu().contiguous() for k, v in classifier.state_dict().items()}
    save_file(state, str(path), metadata={"config": json.dumps(classifier.config)})


def load_shape_classifier(path: str | Path | None = None) -> ShapeClassifier:
    """Load the shipped shape classifier (offline), in eval mode with frozen weights.

    Args:
        path: a ``.safetensors`` file written by `save_shape_classifier`; default: the one in
            the shapes teacher's folder (``carv_pyro/teachers/shapes_teacher/``).

    Returns:
        A `ShapeClassifier` in eval mode whose parameters have ``requires_grad=False``.

    Raises:
        FileNotFoundError: if the weights file does not exist (run
            ``scripts/train_shapes_teacher.py`` to create it).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    if path is None:
        path = Path(__file__).resolve().parents[1] / "teachers" / "shapes_teacher" / CLASSIFIER_FILE
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"shape classifier weights not found at {path}; run scripts/train_shapes_teacher.py"
        )
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    model = ShapeClassifier(**json.loads(meta.get("config", "{}")))
    model.load_state_dict(load_file(str(path)))
    model.eval()
    model.requires_grad_(False)
    return model
