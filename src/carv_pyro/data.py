"""The digits data set of the embedded default teacher, and digit prompts.

The data is scikit-learn's bundled ``load_digits()`` (1797 grey-scale 8x8 images of the
digits 0-9, shipped with scikit-learn, so nothing is downloaded). Images are upsampled
bilinearly to ``size x size`` and scaled to ``[-1, 1]``; a fixed, seeded, stratified 80/20
split separates the training images from the held-out test images.

Examples:
    >>> images, labels = load_digits_images(split="test")
    >>> images.shape, labels.shape
    (torch.Size([360, 1, 16, 16]), torch.Size([360]))
    >>> parse_prompt(" Three ")
    3
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DIGIT_NAMES", "TEST_FRACTION", "load_digits_images", "parse_prompt"]

DIGIT_NAMES: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
)
"""English names of the digits, indexed by the digit (the class label)."""

TEST_FRACTION = 0.2
"""Fraction of the 1797 images held out as the test split (stratified by digit)."""

_SPLITS = ("train", "test", "all")


def load_digits_images(
    size: int = 16, split: str = "train", seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Load scikit-learn's digits as ``[-1, 1]`` images of side ``size``.

    Args:
        size: output side length; the 8x8 originals are upsampled (or kept, for 8) bilinearly
            with ``align_corners=False``.
        split: ``"train"`` (80%), ``"test"`` (20%) or ``"all"`` (the 1797 images in
            scikit-learn's order).
        seed: seed of the stratified train/test split. The default teacher and classifier are
            trained on ``split="train", seed=0`` and evaluated on ``split="test", seed=0``.

    Returns:
        ``(images, labels)``: images ``(N, 1, size, size)`` float32 in ``[-1, 1]`` (0 ink maps
        to -1, full ink to +1) and labels ``(N,)`` int64 in ``0..9``.

    Raises:
        ValueError: if ``split`` is unknown or ``size`` is not a positive integer.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = torch.as_tensor(digits.images, dtype=torch.float32) / 16.0  # (N, 8, 8) in [0, 1]
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    images = pixels.unsqueeze(1)  # (N, 1, 8, 8)
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = (images.clamp(0.0, 1.0) * 2.0 - 1.0).contiguous()

    if split == "all":
        return images, labels
    index = torch.arange(labels.numel()).numpy()
    train_idx, test_idx = train_test_split(
        index, test_size=TEST_FRACTION, random_state=seed, stratify=labels.numpy()
    )
    chosen = torch.as_tensor(sorted(train_idx if split == "train" else test_idx))
    return images[chosen].contiguous(), labels[chosen].contiguous()


def parse_prompt(prompt: str | int) -> int:
    """Turn a digit prompt into its class label.

    Args:
        prompt: a digit ``0..9`` as an ``int`` or a string (``"3"``), or the English name of
            a digit in any case with surrounding blanks (``" Three "``).

    Returns:
        The digit, an ``int`` in ``0..9``.

    Raises:
        ValueError: for anything else (``"ten"``, ``12``, ``True``, ``"3.0"``, ``None``).
    """
    label: int | None = None
    if isinstance(prompt, bool):
        label = None
    elif isinstance(prompt, int):
        label = prompt if 0 <= prompt <= 9 else None
    elif isinstance(prompt, str):
        text = prompt.strip().lower()
        if len(text) == 1 and text in "0123456789":
            label = int(text)
        elif text in DIGIT_NAMES:
            label = DIGIT_NAMES.index(text)
    if label is None:
        raise ValueError(
            f"unknown prompt {prompt!r}: expected a digit 0-9 or its English name, "
            f"e.g. '3' or 'three'"
        )
    return label
