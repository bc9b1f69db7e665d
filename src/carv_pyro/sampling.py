"""DDIM sampling from any teacher, with classifier-free guidance.

`ddim_sample` only uses the teacher interface (``teacher.predict_eps``,
``teacher.schedule.alpha / sigma / num_timesteps`` and ``teacher.event_shape``), so it runs the
embedded default teacher, any [`DiffusersTeacher`][carv_pyro.teachers.DiffusersTeacher] and the analytic
Gaussian teachers alike.

Examples:
    >>> from carv_pyro.teachers.embedded import load_default
    >>> teacher = load_default()
    >>> images = ddim_sample(teacher, torch.arange(10), steps=20, guidance_scale=2.0)
    >>> images.shape
    torch.Size([10, 1, 16, 16])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["ddim_sample", "ddim_timesteps"]


def ddim_timesteps(num_timesteps: int, steps: int) -> Tensor:
    """The decreasing integer timesteps a ``steps``-step DDIM run visits.

    Evenly spaced from ``T - 1`` down to ``0`` (both included; "trailing" spacing), so the
    first step starts from the noisiest timestep of the schedule.

    Args:
        num_timesteps: ``T`` of the teacher's discrete schedule.
        steps: number of denoising steps, ``1 <= steps <= T``.

    Returns:
        ``(steps,)`` int64, strictly decreasing.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be an integer in [1, {num_timesteps}], got {steps!r}")
    if steps == 1:
        return torch.tensor([num_timesteps - 1])
    return torch.linspace(num_timesteps - 1, 0, steps, dtype=torch.float64).round().long()


@torch.no_grad()
def ddim_sample(
    teacher: Any,
    labels: Tensor | None,
    *,
    steps: int = 50,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    eta: float = 0.0,
    num_samples: int | None = None,
    clip_sample: float | None = None,
    x_T: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> Tensor:
    """Draw samples with DDIM (Song et al., 2021) and classifier-free guidance.

    Each step predicts ``eps_hat = teacher.predict_eps(x_t, t, labels, guidance_scale)``, forms
    ``x0_hat = (x_t - sigma_t eps_hat) / alpha_t`` (optionally clipped) and moves to the
    previous timestep with

        ``x_prev = alpha_prev x0_hat + sqrt(sigma_prev^2 - s^2) eps_hat + s z``,
        ``s = eta sqrt((sigma_prev^2 / sigma_t^2) (1 - alpha_t^2 / alpha_prev^2))``;

    after the last timestep (``t = 0``) it returns ``x0_hat``. ``eta = 0`` is deterministic
    DDIM, ``eta = 1`` is DDPM-like ancestral sampling.

    Args:
        teacher: any teacher with ``predict_eps(x_t, t, cond, guidance_scale)``, ``schedule``
            (``alpha(t, like=)``, ``sigma(t, like=)``, ``num_timesteps``) and ``event_shape``.
        labels: ``(N, *cond_event_shape)`` conditioning (class labels ``(N,)`` long for the
            default teacher), or ``None`` for unconditional sampling (then give
            ``num_samples``, and ``guidance_scale`` must be 1).
        steps: number of denoising steps (network evaluations, doubled under guidance).
        guidance_scale: classifier-free guidance scale ``s`` (1: no guidance). The default
            teacher's recommended value is
            `carv_pyro.teachers.embedded.DEFAULT_GUIDANCE_SCALE`.
        generator: torch generator for the initial noise and (``eta > 0``) the step noise.
        eta: DDIM stochasticity in ``[0, 1]``.
        num_samples: ``N`` when ``labels`` is ``None``; must equal ``len(labels)`` otherwise.
        clip_sample: if set, clamp ``x0_hat`` to ``[-clip_sample, clip_sample]`` at every step
            (images in ``[-1, 1]``: 1.0).
        x_T: optional ``(N, *event_shape)`` starting noise (overrides ``generator`` for it).
        dtype: floating dtype of the samples.
        device: device of the samples (default: ``labels``' device, else CPU).
        progress: show a tqdm progress bar over the steps.

    Returns:
        ``(N, *event_shape)`` samples (for the default teacher ``(N, 1, 16, 16)`` in roughly
        ``[-1, 1]``).

    Raises:
        ValueError: on inconsistent ``labels`` / ``num_samples`` / ``x_T``, ``eta`` outside
            ``[0, 1]`` or a bad ``steps``.
    """
    if not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"eta must lie in [0, 1], got {eta!r}")
    if labels is not None:
        labels = torch.as_tensor(labels)
        if labels.dim() == 0:
            raise ValueError("labels must have a leading batch dimension (N, ...), got a scalar")
        n = labels.shape[0]
        if num_samples is not None and num_samples != n:
            raise ValueError(f"num_samples={num_samples} does not match len(labels)={n}")
        if device is None:
            device = labels.device
    else:
        if num_samples is None:
            raise ValueError("give num_samples when labels is None")
        n = int(num_samples)
    device = torch.device(device) if device is not None else torch.device("cpu")
    schedule = teacher.schedule
    event_shape = tuple(teacher.event_shape)
    timesteps = ddim_timesteps(schedule.num_timesteps, steps)

    gen_device = generator.device if generator is not None else device
    if x_T is None:
        x = torch.randn((n, *event_shape), generator=generator, device=gen_device, dtype=dtype)
    else:
        if tuple(x_T.shape) != (n, *event_shape):
            raise ValueError(f"x_T must have shape {(n, *event_shape)}, got {tuple(x_T.shape)}")
        x = x_T.to(dtype=dtype)
    x = x.to(device)
    if labels is not None:
        labels = labels.to(device)
    bcast = (n,) + (1,) * len(event_shape)

    iterator = range(len(timesteps))
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="DDIM", unit="step", leave=False)
    for i in iterator:
        t = timesteps[i].expand(n).to(device)
        eps = teacher.predict_eps(x, t, labels, guidance_scale=guidance_scale)
        alpha_t = schedule.alpha(t, like=x).view(bcast)
        sigma_t = schedule.sigma(t, like=x).view(bcast)
        x0 = (x - sigma_t * eps) / alpha_t
        if clip_sample is not None:
            x0 = x0.clamp(-float(clip_sample), float(clip_sample))
        if i + 1 == len(timesteps):
            x = x0
            break
        t_prev = timesteps[i + 1].expand(n).to(device)
        alpha_p = schedule.alpha(t_prev, like=x).view(bcast)
        sigma_p = schedule.sigma(t_prev, like=x).view(bcast)
        if eta > 0:
            ratio = (1.0 - (alpha_t / alpha_p) ** 2).clamp_min(0.0)
            s = eta * (sigma_p / sigma_t) * ratio.sqrt()
            dir_coef = (sigma_p**2 - s**2).clamp_min(0.0).sqrt()
            z = torch.randn(x.shape, generator=generator, device=gen_device, dtype=dtype)
            x = alpha_p * x0 + dir_coef * eps + s * z.to(device)
        else:
            x = alpha_p * x0 + sigma_p * eps
    return x
