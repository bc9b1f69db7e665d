"""The pictures of a text-to-3D run: a labelled turntable and quality curves (PNG).

No ``pyplot``: figures are drawn on ``matplotlib.figure.Figure`` so the user's backend is left
alone.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..render import render
from .scene import Scene

__all__ = ["save_curves", "save_turntable"]


@torch.no_grad()
def _views(field: nn.Module, scene: Scene, azimuths: list[float], elevation: float, size: int):
    p = next(field.parameters())
    kwargs = dict(scene.render_kwargs)
    kwargs.update(image_size=size, supersample=1)
    if "n_samples" in kwargs:
        kwargs["n_samples"] = max(
            int(kwargs["n_samples"]), 2 * int(getattr(field, "resolution", 32))
        )
    az = torch.tensor([math.radians(a) for a in azimuths], dtype=p.dtype, device=p.device)
    el = torch.full_like(az, math.radians(elevation))
    images = render(field, az, el, **kwargs)  # (V, C, H, W)
    return ((images.clamp(-1, 1) + 1) / 2).float().cpu()


def save_turntable(
    field: nn.Module,
    scene: Scene,
    path: str | Path,
    *,
    n_views: int = 8,
    elevation_deg: float = 20.0,
    size: int = 160,
    title: str = "",
) -> str:
    """Write a turntable: ``n_views`` views around the object, each ``size`` pixels, its
    azimuth under it; for a scene with a known shape a second row shows the true shape rendered
    the same way.

    Returns:
        ``str(path)``.
    """
    from matplotlib.figure import Figure

    azimuths = [-180.0 + 360.0 * (i + 0.5) / n_views for i in range(n_views)]
    rows = [("carved", _views(field, scene, azimuths, elevation_deg, size))]
    truth = scene.true_occupancy(int(getattr(field, "resolution", 32)))
    if truth is not None:
        from ..shapes import shape_field

        name = scene.names[scene.label]
        p = next(field.parameters())
        true_field = shape_field(name, int(field.resolution), dtype=p.dtype, device=p.device)
        rows.append((f"true {name}", _views(true_field, scene, azimuths, elevation_deg, size)))
    scale = size / 100
    fig = Figure(figsize=(n_views * scale * 1.05, len(rows) * scale * 1.2 + 0.6), dpi=100)
    axes = fig.subplots(len(rows), n_views, squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(n_views):
            ax = axes[r][c]
            img = images[c].permute(1, 2, 0).numpy()
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(f"azimuth {azimuths[c]:+.0f}°", fontsize=9)
            if c == 0:
                ax.set_ylabel(label, fontsize=10)
    fig.suptitle(title or f"{scene.prompt!r}, elevation {elevation_deg:.0f}°", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    return str(path)


def save_curves(
    evals: list[dict[str, Any]], log: list[dict[str, Any]], path: str | Path, title: str
) -> str:
    """Write quality (IoU, p(prompt)) and loss against step and training wall-clock.

    Returns:
        ``str(path)``.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 7), layout="constrained")
    axes = fig.subplots(2, 2)
    steps = [e["step"] for e in evals]
    wall = [e["seconds"] for e in evals]
    for col, (xs, xlabel) in enumerate(((steps, "step"), (wall, "training wall-clock (s)"))):
        ax = axes[0, col]
        for key, style, label in (
            ("iou", "o-", "soft 3D IoU with the true shape"),
            ("iou_hard", "x-", "3D IoU of the solid voxels"),
            ("p", "s--", "mean p(prompt), held-out views"),
            ("accuracy", "^:", "held-out views classified as the prompt"),
        ):
            values = [e.get(key) for e in evals]
            if any(v is not None for v in values):
                pts = [(x, v) for x, v in zip(xs, values) if v is not None]
                ax.plot([x for x, _ in pts], [v for _, v in pts], style, label=label)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("quality")
        ax.legend(loc="lower right", fontsize=8)
        ax = axes[1, col]
        lx = [entry["step"] if col == 0 else entry["seconds"] for entry in log]
        ax.plot(lx, [entry.get("loss") for entry in log], ".", markersize=2, alpha=0.5)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("SDS loss per step")
        if log and any("K" in entry for entry in log):
            twin = ax.twinx()
            twin.step(lx, [entry.get("K") for entry in log], where="post", color="C3", lw=1)
            twin.set_ylabel("inner draws K", color="C3")
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    return str(path)
