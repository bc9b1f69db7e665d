"""How a distilled generator is judged: the Fréchet distance in the digit classifier's features,
and pictures of its samples."""

from __future__ import annotations

from functools import lru_cache

import torch
from einops import rearrange
from torch import Tensor, nn

from ... import _checks

__all__ = ["fid_digits", "frechet_distance", "save_sample_grid"]


def frechet_distance(feats_a: Tensor, feats_b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (the FID formula).

    ``||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^{1/2} S_b S_a^{1/2})^{1/2})``, computed in
    float64 with symmetric eigendecompositions (negative eigenvalues from round-off are clipped),
    so it is stable for singular covariances. Covariances are unbiased (``n - 1``).

    Args:
        feats_a: ``(N_a, F)`` features (tensor or array), ``N_a >= 2``.
        feats_b: ``(N_b, F)`` features, ``N_b >= 2``.

    Returns:
        The distance (``>= 0`` up to round-off).

    Raises:
        ValueError: on non-2-D inputs, fewer than 2 rows, mismatched ``F`` or non-finite values.
    """
    a = torch.as_tensor(feats_a).detach().to("cpu", torch.float64)
    b = torch.as_tensor(feats_b).detach().to("cpu", torch.float64)
    for nm, f in (("feats_a", a), ("feats_b", b)):
        if f.dim() != 2 or f.shape[0] < 2:
            raise ValueError(f"{nm} must have shape (N, F) with N >= 2, got {tuple(f.shape)}")
        if not torch.isfinite(f).all():
            raise ValueError(f"{nm} must be finite")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: feats_a has {a.shape[1]}, feats_b {b.shape[1]}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a = torch.cov(a.T).reshape(a.shape[1], a.shape[1])  # (F, F)
    cov_b = torch.cov(b.T).reshape(b.shape[1], b.shape[1])
    vals, vecs = torch.linalg.eigh(0.5 * (cov_a + cov_a.T))
    sqrt_a = (vecs * vals.clamp_min(0).sqrt()) @ vecs.T
    middle = sqrt_a @ cov_b @ sqrt_a
    cross = torch.linalg.eigvalsh(0.5 * (middle + middle.T)).clamp_min(0).sqrt().sum()
    fd = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2.0 * cross
    return float(fd)


@lru_cache(maxsize=4)
def _real_features(split: str, device: str) -> Tensor:
    """``(N, F)`` classifier features of scikit-learn's digits (cached per split and device)."""
    from ...data import load_digits_images

    images, _ = load_digits_images(size=16, split=split)
    with torch.no_grad():
        return _classifier(device).features(images.to(device)).cpu()


@lru_cache(maxsize=2)
def _classifier(device: str) -> nn.Module:
    from ...classifier import load_classifier

    with torch.random.fork_rng(devices=[]):  # the module's init draws from the global RNG
        return load_classifier().to(device)


REAL_SPLITS = ("all", "train", "test")


@torch.no_grad()
def fid_digits(
    generator: nn.Module,
    n: int = 1000,
    *,
    real_split: str = "all",
    seed: int = 0,
    batch_size: int = 500,
) -> float:
    """Fréchet distance of a generator's samples to real digits in the classifier's features.

    The embedding is the penultimate layer of the shipped digit classifier
    ([`carv_pyro.classifier.DigitClassifier.features`][carv_pyro.classifier.DigitClassifier.features]);
    the real set is scikit-learn's digits
    ([`carv_pyro.data.load_digits_images`][carv_pyro.data.load_digits_images]). Samples use
    balanced labels ``arange(n) % 10`` and latents from a ``torch.Generator`` seeded with
    ``seed``, so repeated evaluations of one generator agree exactly. The value depends on
    ``n``: compare at equal ``n``.

    Args:
        generator: a class-conditional `Generator`.
        n: number of generated samples (``>= 2``).
        real_split: ``"all"`` (1797 images), ``"train"`` or ``"test"``.
        seed: seeds the latents.
        batch_size: samples per generator and classifier call.

    Returns:
        The Fréchet distance.

    Raises:
        ValueError: naming the first invalid argument.
    """
    _checks.positive_int("n", n)
    if n < 2:
        raise ValueError(f"n must be at least 2, got {n}")
    _checks.positive_int("batch_size", batch_size)
    _checks.choice("real_split", real_split, REAL_SPLITS)
    _checks.seed_value("seed", seed)
    device = next(generator.parameters()).device
    classifier = _classifier(str(device))
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % (generator.num_classes or 10)
    feats = []
    was_training = generator.training
    generator.eval()
    try:
        for i in range(0, n, batch_size):
            x = generator.sample(labels[i : i + batch_size], generator=g)  # (B, 1, H, W)
            feats.append(classifier.features(x).cpu())
    finally:
        generator.train(was_training)
    return frechet_distance(torch.cat(feats), _real_features(real_split, str(device)))


def save_sample_grid(
    generators: dict[str, nn.Module], path: str, n_per_class: int = 8, seed: int = 0
) -> str:
    """Save a PNG with one panel of samples per generator (rows: digits 0-9).

    Args:
        generators: ``{title: generator}``; all get the same latents.
        path: the PNG file.
        n_per_class: columns per panel.
        seed: seeds the latents.

    Returns:
        ``path``.

    Raises:
        ValueError: on an empty ``generators`` or a non-positive ``n_per_class``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _checks.positive_int("n_per_class", n_per_class)
    _checks.seed_value("seed", seed)
    if not generators:
        raise ValueError("generators must hold at least one {title: generator}")
    fig, axes = plt.subplots(1, len(generators), figsize=(3.2 * len(generators), 4.2))
    axes = [axes] if len(generators) == 1 else list(axes)
    for ax, (title, gen) in zip(axes, generators.items()):
        classes = gen.num_classes or 1
        labels = torch.arange(classes).repeat_interleave(n_per_class)
        x = gen.sample(labels, generator=torch.Generator().manual_seed(seed)).cpu()
        grid = rearrange(x, "(r c) 1 h w -> (r h) (c w)", r=classes, c=n_per_class)
        ax.imshow(grid.numpy(), cmap="gray", vmin=-1, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
