"""Data attribution, D-TRAK style: projected per-example gradients of the teacher's own loss.

For a training example ``(x_i, y_i)`` the feature is the expected gradient of the denoising loss
with respect to the teacher's weights ``phi`` (all of them, or those under some name prefixes),

    g(x_i) = E_{t ~ p(t), eps ~ N(0, I)} [ grad_phi  w(t) ||eps_phi(alpha_t u_i + sigma_t eps, t, y_i) - eps||^2 ],

with ``u_i = upstream(x_i)`` (the identity for a pixel teacher, a frozen VAE encoder for a latent
teacher), randomly projected to ``k`` dimensions: ``f(x_i) = P g(x_i)`` with a seeded Gaussian or
Rademacher ``P`` (`RandomProjection`). TRAK-style scores between queries and training
examples come from `attribution_scores`.

The expectation over ``(t, eps)`` is a Pyro model with the usual two plates, estimated by
[`CARVLoss`][carv_pyro.CARVLoss] under a [`TimestepGuide`][carv_pyro.TimestepGuide] (so timestep importance
sampling and stratification apply):

```python
def model(u, y, K):                                   # u: (R, *event), y: (R,)
    with pyro.plate("examples", R, dim=-2):           # outer: the examples
        with pyro.plate("draws", K, dim=-1):          # inner: K (t, eps) draws per example
            carv_pyro.teacher_term("denoise", objective, u.unsqueeze(1), cond=y[:, None])
```

[`CARVLoss`][carv_pyro.CARVLoss] averages over both plates, so one backward pass would mix the
examples. Per-example gradients are therefore taken one example at a time (the outer plate has
size 1 in each call, and ``K`` draws go to the teacher in one batch): the feature of example
``i`` is the gradient of example ``i``'s term only. With ``shared_draws=True`` (D-TRAK's choice)
every example sees the same ``(t, eps)`` draws, as D-TRAK reuses one fixed set of draws; with
``shared_draws=False`` the draws are independent across examples. Either way every feature is
an unbiased estimate of ``P g(x_i)``.

Which timestep proposal: for the embedded digits teacher the per-draw gradient norm is far from
flat in ``t`` (``E||f||^2 | t`` falls about a thousandfold from ``t = 0`` to ``t > 500``), so
importance sampling matters more than stratification. `pilot_proposal` estimates the
variance-optimal ``q*(t) ∝ p(t) sqrt(E||f||^2 | t)`` once, from a few single-draw gradients of
a couple of examples; the features then use it with stratification, and with antithetic or
scrambled-Sobol noise (``noise="antithetic"`` / ``"sobol"``), which cancels part of the
gradient's part that is odd in ``eps`` (``IS*+strat+QMC``). On a 2-core CPU, at equal ``K``,
these gave ECMs of about 2.6 (``IS*+strat``) and 3.3-3.8 (with QMC or antithetic noise) at
``K = 4``, 3.0 and 4-4.9 at ``K = 64``, against 1.3-1.4 for stratification alone.

Examples:
    ```python
    teacher = carv_pyro.teachers.load_default()
    featurizer = AttributionFeaturizer(teacher, dim=256, projection_seed=0)
    q = pilot_proposal(featurizer, pilot_images, pilot_labels)     # once, a few seconds
    carv = dict(K=16, proposal=q, stratify="per_outer", noise="sobol")
    train = featurizer.features(train_images, train_labels, **carv)
    query = featurizer.features(query_images, query_labels, **carv)
    scores = attribution_scores(train.features, query.features)  # (m, n)
    values, index = scores.topk(5, dim=1)                          # most helpful training examples
    ```
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from torch import Tensor, nn

from ..guides import NOISE, PROPOSALS, STRATIFY, TimestepGuide
from ..infer.loss import CARVLoss
from ..objectives import DenoisingLoss, TeacherObjective
from ..infer.primitives import teacher_term
from ..timesteps import AbstractTimestepDistribution, Categorical
from ..timing import Stopwatch

__all__ = [
    "AttributionBench",
    "AttributionFeaturizer",
    "BENCH_METHODS",
    "FeatureResult",
    "PROJECTIONS",
    "RandomProjection",
    "SCORE_METHODS",
    "TINY_VAE_CONFIG",
    "VAEEncoder",
    "attribution_scores",
    "geometric_bins",
    "load_attribution_teacher",
    "pick_examples",
    "pilot_proposal",
    "rank_correlation",
    "select_parameters",
]

#: Kinds of random projection.
PROJECTIONS = ("gaussian", "rademacher")
#: Ways to turn features into attribution scores (see `attribution_scores`).
SCORE_METHODS = ("trak", "cosine")

_TERM = "denoise"
_MASK64 = (1 << 63) - 1


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _mix_seed(*parts: int) -> int:
    """A deterministic 63-bit seed from integers (splitmix64-style mixing)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & ((1 << 64) - 1))) * 0xBF58476D1CE4E5B9 & ((1 << 64) - 1)
        h ^= h >> 31
    return h & _MASK64


# ----------------------------------------------------------------------------- projection


class RandomProjection:
    """A seeded random projection ``R^d -> R^k``, ``f = P g`` with ``E[P^T P] = I``.

    ``P`` has i.i.d. entries ``N(0, 1/k)`` (``"gaussian"``) or ``±1/sqrt(k)``
    (``"rademacher"``), so ``E||P g||^2 = ||g||^2`` (Johnson-Lindenstrauss). It is never held
    whole unless it is small: column block ``j`` (``chunk_size`` input coordinates) is drawn
    from its own generator seeded by ``(seed, j)``, so the same seed always gives the same
    ``P``, block by block, on any device. Blocks are cached while ``k d`` floats fit in
    ``max_cache_bytes``, otherwise they are regenerated at every call.

    Args:
        dim_in: ``d``, the gradient's dimension.
        dim_out: ``k``, the feature's dimension.
        seed: the projection's seed.
        kind: ``"gaussian"`` or ``"rademacher"``.
        chunk_size: input coordinates per block.
        max_cache_bytes: cache the blocks (float32) when ``4 k d`` is at most this.

    Raises:
        ValueError: naming the bad argument.

    Examples:
        >>> proj = RandomProjection(1000, 16, seed=0)
        >>> proj(torch.randn(3, 1000)).shape
        torch.Size([3, 16])
    """

    def __init__(
        self,
        dim_in: int,
        dim_out: int,
        *,
        seed: int = 0,
        kind: str = "gaussian",
        chunk_size: int = 1 << 16,
        max_cache_bytes: int = 1 << 28,
    ):
        self.dim_in = _positive_int("dim_in", dim_in)
        self.dim_out = _positive_int("dim_out", dim_out)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        if kind not in PROJECTIONS:
            raise ValueError(f"unknown kind {kind!r}; expected one of {PROJECTIONS}")
        self.chunk_size = _positive_int("chunk_size", chunk_size)
        if isinstance(max_cache_bytes, bool) or not isinstance(max_cache_bytes, int):
            raise ValueError(f"max_cache_bytes must be an integer, got {max_cache_bytes!r}")
        self.seed = seed
        self.kind = kind
        self.cached = 4 * self.dim_in * self.dim_out <= max_cache_bytes
        self._cache: dict[tuple[int, torch.device, torch.dtype], Tensor] = {}

    @property
    def n_blocks(self) -> int:
        """Number of column blocks."""
        return -(-self.dim_in // self.chunk_size)

    def block(self, j: int, device: torch.device | str = "cpu", dtype=torch.float32) -> Tensor:
        """Column block ``j`` of ``P``: ``(k, width)``, the same for the same seed.

        Args:
            j: block index in ``[0, n_blocks)``.
            device: where to return it.
            dtype: its dtype.
        """
        device = torch.device(device)
        key = (j, device, dtype)
        if key in self._cache:
            return self._cache[key]
        lo = j * self.chunk_size
        width = min(self.chunk_size, self.dim_in - lo)
        gen = torch.Generator().manual_seed(_mix_seed(self.seed, j, self.dim_out))
        if self.kind == "gaussian":
            b = torch.randn((self.dim_out, width), generator=gen)
        else:
            b = torch.randint(0, 2, (self.dim_out, width), generator=gen).float().mul_(2).sub_(1)
        b = b.mul_(1.0 / math.sqrt(self.dim_out)).to(device=device, dtype=dtype)
        if self.cached:
            self._cache[key] = b
        return b

    def matrix(self) -> Tensor:
        """The whole ``(k, d)`` float32 matrix (for tests and small ``d``)."""
        return torch.cat([self.block(j) for j in range(self.n_blocks)], dim=1)

    def __call__(self, g: Tensor) -> Tensor:
        """Project gradients.

        Args:
            g: ``(n, d)`` or ``(d,)`` gradients.

        Returns:
            ``(n, k)`` (or ``(k,)``) projections ``g P^T``, in ``g``'s dtype and device.

        Raises:
            ValueError: if ``g``'s last dimension is not ``d``.
        """
        if not isinstance(g, Tensor) or g.dim() not in (1, 2) or g.shape[-1] != self.dim_in:
            shape = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
            raise ValueError(
                f"g must have shape (n, {self.dim_in}) or ({self.dim_in},), got {shape}"
            )
        flat = g.reshape(-1, self.dim_in)
        out = flat.new_zeros((flat.shape[0], self.dim_out))
        for j in range(self.n_blocks):
            lo = j * self.chunk_size
            b = self.block(j, flat.device, flat.dtype)
            out += flat[:, lo : lo + b.shape[1]] @ b.T
        return out if g.dim() == 2 else out[0]

    def __repr__(self) -> str:
        return (
            f"RandomProjection(dim_in={self.dim_in}, dim_out={self.dim_out}, seed={self.seed}, "
            f"kind={self.kind!r})"
        )


# ------------------------------------------------------------------------------ upstream

#: A tiny ``AutoencoderKL`` for 1 x 16 x 16 images: 4 x 8 x 8 latents (random weights).
TINY_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 1,
    "out_channels": 1,
    "latent_channels": 4,
    "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
    "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
    "block_out_channels": (8, 16),
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "sample_size": 16,
}


class VAEEncoder:
    """A frozen diffusers ``AutoencoderKL`` encoder as the upstream of a latent teacher.

    ``u = scaling_factor * mean(q(z | x))``: the posterior mean, as latent-diffusion training
    uses it (deterministic, so one encoding per example is reused by all its draws).

    Args:
        vae: an ``AutoencoderKL``; default: one built from ``config`` with seeded random
            weights (the encoder's cost is real, its weights are not trained).
        config: constructor arguments for the default (default `TINY_VAE_CONFIG`).
        seed: seed of the default's random weights.
        scaling_factor: latent scale (default: the VAE config's ``scaling_factor``).
    """

    def __init__(
        self,
        vae: Any = None,
        *,
        config: dict[str, Any] | None = None,
        seed: int = 0,
        scaling_factor: float | None = None,
    ):
        from diffusers import AutoencoderKL

        if vae is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                vae = AutoencoderKL(**(config or TINY_VAE_CONFIG))
        elif not isinstance(vae, AutoencoderKL):
            raise ValueError(f"vae must be a diffusers AutoencoderKL, got {type(vae).__name__}")
        vae.requires_grad_(False)
        vae.eval()
        self.vae = vae
        self.scaling_factor = float(
            vae.config.scaling_factor if scaling_factor is None else scaling_factor
        )

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        """``(n, C, H, W)`` images -> ``(n, latent_channels, h, w)`` latents."""
        param = next(self.vae.parameters())
        x = images.to(device=param.device, dtype=param.dtype)
        return self.vae.encode(x).latent_dist.mean * self.scaling_factor

    def to(self, *args: Any, **kwargs: Any) -> VAEEncoder:
        """Move the VAE (``torch.nn.Module.to`` arguments); returns ``self``."""
        self.vae.to(*args, **kwargs)
        return self


# ------------------------------------------------------------------------------ features


def select_parameters(
    module: nn.Module, prefixes: Sequence[str] | str | None = None
) -> list[tuple[str, nn.Parameter]]:
    """The named parameters of ``module`` whose names start with one of ``prefixes``.

    Args:
        module: the teacher's network.
        prefixes: e.g. ``("up_blocks.2",)`` for the last up-block of a UNet; ``None``: all.

    Returns:
        ``[(name, parameter), ...]`` in ``module.named_parameters()`` order.

    Raises:
        ValueError: if a prefix matches no parameter, or nothing is selected.
    """
    named = list(module.named_parameters())
    if prefixes is None:
        chosen = named
    else:
        if isinstance(prefixes, str):
            prefixes = (prefixes,)
        prefixes = tuple(prefixes)
        if not prefixes or not all(isinstance(p, str) for p in prefixes):
            raise ValueError(f"params must be None or non-empty name prefixes, got {prefixes!r}")
        for p in prefixes:
            if not any(n == p or n.startswith(p if p.endswith(".") else p + ".") for n, _ in named):
                top = sorted({n.split(".")[0] for n, _ in named})
                raise ValueError(
                    f"params: prefix {p!r} matches no parameter of {type(module).__name__} "
                    f"(top-level names: {top})"
                )
        chosen = [
            (n, q)
            for n, q in named
            if any(n == p or n.startswith(p if p.endswith(".") else p + ".") for p in prefixes)
        ]
    if not chosen:
        raise ValueError(f"params: no parameters selected from {type(module).__name__}")
    return chosen


@dataclass
class FeatureResult:
    """Per-example features and what they cost.

    Attributes:
        features: ``(n, k)`` projected features (``(n, d)`` raw gradients when not projected).
        K: ``(t, eps)`` draws per example.
        seconds_upstream: wall-clock seconds of the upstream step (all examples).
        seconds_teacher: wall-clock seconds of the estimator (the model's trace, the teacher's
            forward and backward passes).
        seconds_projection: wall-clock seconds of the projection.
        timesteps: ``(n, K)`` the draws' timesteps, when asked for (``record_draws``); the
            recorded draws are CPU tensors whatever the device.
        noise: ``(n, K, *event)`` the draws' noise, when asked for.
        weights: ``(n, K)`` the draws' importance weights ``p(t) / q(t)``, when asked for.
    """

    features: Tensor
    K: int
    seconds_upstream: float
    seconds_teacher: float
    seconds_projection: float
    timesteps: Tensor | None = None
    noise: Tensor | None = None
    weights: Tensor | None = None

    @property
    def seconds(self) -> float:
        """Total wall-clock seconds."""
        return self.seconds_upstream + self.seconds_teacher + self.seconds_projection


class AttributionFeaturizer:
    """Per-example gradient features of a teacher's denoising loss, estimated with CARV.

    Args:
        teacher: the teacher whose weights the gradients are taken w.r.t.; it is unfrozen only
            while features are computed (its ``requires_grad`` and its parameters' flags are
            restored afterwards).
        params: name prefixes of the parameters to use (e.g. ``("up_blocks.2",)``);
            ``None``: all of them.
        dim: ``k``, the projected dimension; ``None``: no projection (raw ``d``-dim gradients).
        projection_seed: the projection's seed.
        projection: ``"gaussian"`` or ``"rademacher"``.
        objective: the per-draw loss (default [`DenoisingLoss`][carv_pyro.objectives.DenoisingLoss]
            with uniform ``w(t)`` and ``t`` uniform over all timesteps, as in D-TRAK).
        upstream: ``(n, *image) -> (n, *event)`` frozen map from examples to the teacher's
            input (e.g. `VAEEncoder`); ``None``: identity (pixel teacher).
        module: the ``nn.Module`` holding the teacher's weights (default ``teacher.unet``).
        max_cache_bytes: see `RandomProjection`.

    Raises:
        ValueError: naming the bad argument.
    """

    def __init__(
        self,
        teacher: Any,
        *,
        params: Sequence[str] | str | None = None,
        dim: int | None = 256,
        projection_seed: int = 0,
        projection: str = "gaussian",
        objective: TeacherObjective | None = None,
        upstream: Callable[[Tensor], Tensor] | None = None,
        module: nn.Module | None = None,
        max_cache_bytes: int = 1 << 28,
    ):
        if module is None:
            module = getattr(teacher, "unet", None)
            if module is None and isinstance(teacher, nn.Module):
                module = teacher
        if not isinstance(module, nn.Module):
            raise ValueError(
                f"module: the teacher {type(teacher).__name__} has no .unet; pass the nn.Module "
                f"that holds its weights as module="
            )
        if objective is None:
            objective = DenoisingLoss(teacher)
        elif not isinstance(objective, TeacherObjective) or objective.teacher is not teacher:
            raise ValueError("objective must be a TeacherObjective over the same teacher")
        if objective.is_residual:
            raise ValueError(
                "objective must be a loss objective (e.g. DenoisingLoss): attribution "
                "differentiates the per-draw loss w.r.t. the teacher's weights"
            )
        if upstream is not None and not callable(upstream):
            raise ValueError(f"upstream must be callable or None, got {upstream!r}")
        if projection not in PROJECTIONS:
            raise ValueError(f"unknown projection {projection!r}; expected one of {PROJECTIONS}")
        self.teacher = teacher
        self.module = module
        self.objective = objective
        self.upstream = upstream
        self.named_params = select_parameters(module, params)
        self.params = [p for _, p in self.named_params]
        self.dim_in = sum(p.numel() for p in self.params)
        self.projection: RandomProjection | None = None
        if dim is not None:
            self.projection = RandomProjection(
                self.dim_in,
                _positive_int("dim", dim),
                seed=projection_seed,
                kind=projection,
                max_cache_bytes=max_cache_bytes,
            )

    @property
    def dim(self) -> int:
        """Dimension of a feature (``k``, or ``d`` without projection)."""
        return self.projection.dim_out if self.projection is not None else self.dim_in

    # -- the Pyro model ------------------------------------------------------------------
    def model(self, u: Tensor, cond: Tensor | None, K: int) -> None:
        """The teacher expectation as a Pyro model: examples outer, ``K`` draws inner.

        Args:
            u: ``(R, *event)`` teacher inputs (upstream outputs) of ``R`` examples.
            cond: ``(R,)`` conditioning (class labels) or ``None``.
            K: draws per example.
        """
        R = u.shape[0]
        with pyro.plate("examples", R, dim=-2), pyro.plate("draws", K, dim=-1):
            teacher_term(
                _TERM, self.objective, u.unsqueeze(1), cond=None if cond is None else cond[:, None]
            )

    # -- features ------------------------------------------------------------------------
    def features(
        self,
        images: Tensor,
        labels: Tensor | None = None,
        *,
        K: int = 16,
        proposal: str | AbstractTimestepDistribution = "prior",
        stratify: str | None = None,
        noise: str = "iid",
        shared_draws: bool = True,
        seed: int | None = None,
        project: bool = True,
        batch_size: int = 32,
        record_draws: bool = False,
        loss: CARVLoss | None = None,
        progress: bool = False,
    ) -> FeatureResult:
        """One unbiased estimate of every example's (projected) gradient feature.

        Args:
            images: ``(n, *image)`` examples (upstream inputs).
            labels: ``(n,)`` class labels (the teacher's conditioning) or ``None``.
            K: ``(t, eps)`` draws per example (teacher evaluations per example).
            proposal: [`TimestepGuide`][carv_pyro.TimestepGuide] ``proposal``: ``"prior"``,
                ``"weighted"`` (``q ∝ p w alpha``), ``"adaptive"``, or a fixed
                [`AbstractTimestepDistribution`][carv_pyro.proposals.AbstractTimestepDistribution] such as the
                variance-optimal one from `pilot_proposal`.
            stratify: ``None`` or ``"per_outer"`` (``K`` strata of ``q`` per example);
                ``"global"`` is accepted and, with one example per call, equals ``"per_outer"``.
            noise: ``"iid"``, ``"antithetic"`` or ``"sobol"``.
            shared_draws: the same ``(t, eps)`` draws for every example (D-TRAK), else
                independent draws.
            seed: seed of the draws; ``None``: drawn from torch's global generator.
            project: apply the random projection (if the featurizer has one).
            batch_size: examples whose raw gradients are held at once before projecting.
            record_draws: also return the draws (timesteps, noise, importance weights).
            loss: the [`CARVLoss`][carv_pyro.CARVLoss] to use (default: a new one).
            progress: show a progress bar over the examples.

        Returns:
            A `FeatureResult` with ``features`` of shape ``(n, k)`` (or ``(n, d)``).

        Raises:
            ValueError: naming the bad argument.
        """
        from tqdm.auto import tqdm

        K = _positive_int("K", K)
        batch_size = _positive_int("batch_size", batch_size)
        if not isinstance(proposal, AbstractTimestepDistribution) and proposal not in PROPOSALS:
            raise ValueError(
                f"unknown proposal {proposal!r}; expected one of {PROPOSALS} or an "
                f"AbstractTimestepDistribution"
            )
        if stratify not in STRATIFY:
            raise ValueError(f"unknown stratify {stratify!r}; expected one of {STRATIFY}")
        if noise not in NOISE:
            raise ValueError(f"unknown noise {noise!r}; expected one of {NOISE}")
        if not isinstance(shared_draws, bool):
            raise ValueError(f"shared_draws must be a bool, got {shared_draws!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an integer or None, got {seed!r}")
        if not isinstance(images, Tensor) or images.dim() < 2 or images.shape[0] < 1:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be an (n, ...) tensor with n >= 1, got {shape}")
        n = images.shape[0]
        if labels is not None:
            labels = torch.as_tensor(labels)
            if labels.shape != (n,):
                raise ValueError(
                    f"labels must have shape ({n},) to match images, got {tuple(labels.shape)}"
                )
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        per_example = [seed] * n if shared_draws else [_mix_seed(seed, i, 0x51ED) for i in range(n)]
        guide = TimestepGuide(proposal=proposal, stratify=stratify, noise=noise)
        loss = CARVLoss() if loss is None else loss
        draws: list[tuple[Tensor, Tensor, Tensor]] = []
        if record_draws:
            loss.hooks.append(_DrawRecorder(draws))
        param0 = self.params[0]
        device = param0.device
        out: list[Tensor] = []
        secs = {"up": 0.0, "teacher": 0.0, "proj": 0.0}
        bar = tqdm(total=n, desc="features", disable=not progress, leave=False)
        try:
            with _unfrozen(self.teacher, self.module, self.params):
                for lo in range(0, n, batch_size):
                    hi = min(n, lo + batch_size)
                    watch = Stopwatch(device)
                    u = self._upstream(images[lo:hi]).to(device=device, dtype=param0.dtype)
                    secs["up"] += watch.stop().seconds()
                    grads = torch.empty((hi - lo, self.dim_in), dtype=param0.dtype, device=device)
                    for i in range(lo, hi):
                        y = None if labels is None else labels[i : i + 1].to(device)
                        watch = Stopwatch(device)
                        grads[i - lo] = self._gradient(
                            u[i - lo : i - lo + 1], y, K, guide, loss, per_example[i]
                        )
                        secs["teacher"] += watch.stop().seconds()
                        bar.update(1)
                    watch = Stopwatch(device)
                    if project and self.projection is not None:
                        grads = self.projection(grads)
                    out.append(grads.detach())
                    secs["proj"] += watch.stop().seconds()
        finally:
            bar.close()
            if record_draws:
                loss.hooks.pop()
        result = FeatureResult(
            features=torch.cat(out),
            K=K,
            seconds_upstream=secs["up"],
            seconds_teacher=secs["teacher"],
            seconds_projection=secs["proj"],
        )
        if record_draws:
            result.timesteps = torch.stack([d[0] for d in draws])
            result.noise = torch.stack([d[1] for d in draws])
            result.weights = torch.stack([d[2] for d in draws])
        return result

    def _upstream(self, images: Tensor) -> Tensor:
        if self.upstream is None:
            u = images
        else:
            with torch.no_grad():
                u = self.upstream(images)
        event = tuple(self.objective.event_shape)
        if tuple(u.shape[1:]) != event:
            what = "images" if self.upstream is None else "upstream(images)"
            raise ValueError(
                f"{what} must have shape (n, {', '.join(map(str, event))}) for this teacher, got "
                f"{tuple(u.shape)}"
            )
        return u

    def _gradient(
        self,
        u: Tensor,
        cond: Tensor | None,
        K: int,
        guide: TimestepGuide,
        loss: CARVLoss,
        seed: int,
    ) -> Tensor:
        """``(d,)`` gradient of one example's term, ``(1/K) sum_k w_k grad loss_k``."""
        for p in self.params:
            p.grad = None
        cuda = u.device.type == "cuda"
        devices = []
        if cuda:
            devices = [
                u.device.index if u.device.index is not None else torch.cuda.current_device()
            ]
        with torch.random.fork_rng(devices=devices):
            # seed only the generators the draws use (torch.manual_seed touches every backend)
            torch.default_generator.manual_seed(seed)
            if cuda:
                with torch.cuda.device(u.device):
                    torch.cuda.manual_seed(seed)
            loss.loss_and_grads(self.model, guide, u, cond, K)
        flat = [
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.params
        ]
        for p in self.params:
            p.grad = None
        return torch.cat(flat)

    def reference(
        self,
        images: Tensor,
        labels: Tensor | None = None,
        *,
        n: int = 16,
        K: int = 64,
        proposal: str | AbstractTimestepDistribution = "prior",
        seed: int = 0,
        progress: bool = False,
    ) -> Tensor:
        """A high-sample reference: the mean of ``n`` independent stratified estimates.

        Each estimate draws ``K`` timesteps per example, one per stratum of ``proposal``, so
        the reference uses ``n K`` teacher evaluations per example. Every estimate is unbiased
        whatever the proposal; a good one (`pilot_proposal`) makes the reference tighter.

        Args:
            images: as in `features`.
            labels: as in `features`.
            n: estimates averaged.
            K: draws per example per estimate.
            proposal: the timestep proposal (see `features`).
            seed: seed of the draws.
            progress: show a progress bar.

        Returns:
            ``(n_examples, k)`` reference features.
        """
        from tqdm.auto import tqdm

        n = _positive_int("n", n)
        total = None
        for r in tqdm(range(n), desc="reference", disable=not progress, leave=False):
            f = self.features(
                images,
                labels,
                K=K,
                proposal=proposal,
                stratify="per_outer",
                shared_draws=False,
                seed=_mix_seed(seed, r, 0x2EF),
            ).features.to(torch.float64)
            total = f if total is None else total + f
        return total / n


def geometric_bins(prior: AbstractTimestepDistribution, n_bins: int = 12) -> Tensor:
    """``(T,)`` bin index of every timestep: ``n_bins`` geometrically growing bins.

    Bin ``b`` covers ``[lo + e_b, lo + e_{b+1})`` with ``e_b ≈ span^(b / n_bins) - 1`` over the
    prior's support ``[lo, lo + span)``, so the first bins are single timesteps and the last
    ones wide: the resolution where per-draw gradient norms change fastest (small ``t``).
    Empty bins are merged, so fewer than ``n_bins`` may result.

    Args:
        prior: the timestep prior (its support is binned; other timesteps go to the end bins).
        n_bins: the number of bins asked for.

    Returns:
        ``(T,)`` long bin indices ``0 .. n - 1``.
    """
    n_bins = _positive_int("n_bins", n_bins)
    support = torch.nonzero(prior.probs() > 0).flatten()
    lo, hi = int(support[0]), int(support[-1])
    span = hi - lo + 1
    edges = sorted({round(span ** (b / n_bins)) - 1 for b in range(n_bins)} | {0, span})
    edges = torch.tensor(edges, dtype=torch.long)
    t = torch.arange(prior.num_timesteps).clamp(lo, hi) - lo
    return torch.searchsorted(edges[1:-1], t, right=True)


def pilot_proposal(
    featurizer: AttributionFeaturizer,
    images: Tensor,
    labels: Tensor | None = None,
    *,
    n_draws: int = 48,
    n_bins: int = 12,
    defensive: float = 0.1,
    seed: int = 0,
) -> Categorical:
    """The variance-optimal timestep proposal, estimated from a pilot of per-draw gradients.

    ``q*(t) ∝ p(t) sqrt(E[||f||^2 | t])`` (DESIGN §1) where ``f`` is one draw's (projected)
    gradient feature. For the denoising loss the x-space proxies that ``"weighted"`` and
    ``"adaptive"`` use do not track ``||f||``, which falls by orders of magnitude from ``t = 0``
    to large ``t``; here the second moments are measured directly, per geometric bin
    (`geometric_bins`), from ``n_draws`` single-draw gradients of each pilot example
    drawn equally over the bins. The result is mixed with the prior,
    ``q = (1 - a) q* + a p``, so that every weight ``p / q`` stays below ``1 / a``.

    The pilot costs ``n_examples * n_draws`` teacher forward and backward passes, once; the
    proposal is then fixed and reused for every example (an unbiased IS proposal needs only
    to be independent of the draws it weights).

    Args:
        featurizer: the featurizer whose features the proposal is for.
        images: a few pilot examples (as in `AttributionFeaturizer.features`).
        labels: their labels.
        n_draws: single-draw gradients per pilot example.
        n_bins: geometric timestep bins asked for.
        defensive: the prior's share ``a`` in ``(0, 1]``.
        seed: seed of the pilot draws.

    Returns:
        A [`Categorical`][carv_pyro.proposals.Categorical] over the timesteps.

    Raises:
        ValueError: naming the bad argument.
    """
    n_draws = _positive_int("n_draws", n_draws)
    if not 0.0 < float(defensive) <= 1.0:
        raise ValueError(f"defensive must lie in (0, 1], got {defensive!r}")
    prior = featurizer.objective.prior
    p = prior.probs()
    bins = geometric_bins(prior, n_bins)
    n = int(bins.max()) + 1
    mass = torch.zeros(n, dtype=torch.float64).index_add_(0, bins, p)
    # the pilot draws each bin equally often, t within a bin by the prior
    pilot = Categorical(torch.where(mass[bins] > 0, p / mass[bins].clamp_min(1e-300), 0.0))
    sum_sq = torch.zeros(n, dtype=torch.float64)
    count = torch.zeros(n, dtype=torch.float64)
    for r in range(n_draws):
        res = featurizer.features(
            images,
            labels,
            K=1,
            proposal=pilot,
            shared_draws=False,
            seed=_mix_seed(seed, r, 0x9110),
            record_draws=True,
        )
        # the recorded draws live on the CPU, the features where the teacher runs
        f = res.features.to("cpu", torch.float64) / res.weights.to(torch.float64)  # unweighted
        b = bins[res.timesteps[:, 0]]
        sum_sq.index_add_(0, b, f.pow(2).sum(1))
        count.index_add_(0, b, torch.ones_like(b, dtype=torch.float64))
    seen = count > 0
    m2 = torch.where(seen, sum_sq / count.clamp_min(1.0), sum_sq[seen].sum() / count[seen].sum())
    q = p * m2.clamp_min(0.0).sqrt()[bins]
    q = q / q.sum() if q.sum() > 0 else p
    return Categorical((1.0 - float(defensive)) * q + float(defensive) * p)


class _DrawRecorder:
    """A [`CARVLoss`][carv_pyro.CARVLoss] hook that keeps each call's draws and weights."""

    def __init__(self, sink: list):
        self.sink = sink

    def __call__(self, loss, records, model_trace, guide_trace) -> None:
        from ..guides import LOG_Q_KEY

        t_site = model_trace.nodes[f"{_TERM}.t"]
        t = t_site["value"].detach()
        log_q = t_site["infer"].get(LOG_Q_KEY)
        log_p = t_site["fn"].log_prob(t).to(torch.float64)
        w = (log_p - log_q).exp() if log_q is not None else torch.ones_like(log_p)
        eps = model_trace.nodes[f"{_TERM}.eps"]["value"].detach()
        self.sink.append((t[0].cpu(), eps[0].cpu(), w[0].cpu()))


class _unfrozen:
    """Context: the teacher keeps its graph and exactly ``params`` require grad; restored after."""

    def __init__(self, teacher: Any, module: nn.Module, params: list[nn.Parameter]):
        self.teacher = teacher
        self.module = module
        self.params = params

    def __enter__(self) -> None:
        self.saved_teacher = getattr(self.teacher, "requires_grad", False)
        self.saved = [(p, p.requires_grad, p.grad) for p in self.module.parameters()]
        self.teacher.requires_grad = True  # a DiffusersTeacher unfreezes its whole UNet here
        chosen = {id(p) for p in self.params}
        for p in self.module.parameters():
            p.requires_grad_(id(p) in chosen)

    def __exit__(self, *exc: Any) -> None:
        self.teacher.requires_grad = self.saved_teacher
        for p, flag, grad in self.saved:
            p.requires_grad_(flag)
            p.grad = grad


# ------------------------------------------------------------------------------- scores


def attribution_scores(
    train_features: Tensor,
    query_features: Tensor,
    *,
    damping: float = 1e-3,
    method: str = "trak",
) -> Tensor:
    """TRAK-style attribution scores of every training example for every query.

    ``"trak"``: ``S = Q (F^T F + lambda I)^{-1} F^T`` with ``lambda = damping * tr(F^T F) / k``
    (the damping is relative to the mean eigenvalue of ``F^T F``, so it does not depend on the
    gradients' scale); with ``damping = 0`` the pseudo-inverse ``S = Q F^+`` is used. The
    ``n x n`` form ``Q F^T (F F^T + lambda I)^{-1}`` is used when ``n < k``. ``"cosine"``: the
    normalized inner product ``S_ij = <q_i, f_j> / (||q_i|| ||f_j||)``.

    Args:
        train_features: ``(n, k)`` features ``F`` of the training examples.
        query_features: ``(m, k)`` features ``Q`` of the queries.
        damping: relative ridge ``>= 0`` (``"trak"`` only).
        method: ``"trak"`` or ``"cosine"``.

    Returns:
        ``(m, n)`` float64 scores; larger means more helpful.

    Raises:
        ValueError: naming the bad argument.
    """
    if method not in SCORE_METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {SCORE_METHODS}")
    for name, f in (("train_features", train_features), ("query_features", query_features)):
        if not isinstance(f, Tensor) or f.dim() != 2 or f.shape[0] < 1:
            shape = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
            raise ValueError(f"{name} must be a 2-D (rows, k) tensor, got {shape}")
    if train_features.shape[1] != query_features.shape[1]:
        raise ValueError(
            f"query_features has k = {query_features.shape[1]} but train_features has k = "
            f"{train_features.shape[1]}"
        )
    damping = float(damping)
    if not (damping >= 0.0 and math.isfinite(damping)):
        raise ValueError(f"damping must be finite and >= 0, got {damping!r}")
    F = train_features.to(torch.float64)
    Q = query_features.to(torch.float64)
    if method == "cosine":
        Fn = F / F.norm(dim=1, keepdim=True).clamp_min(1e-300)
        Qn = Q / Q.norm(dim=1, keepdim=True).clamp_min(1e-300)
        return Qn @ Fn.T
    n, k = F.shape
    if damping == 0.0:
        return Q @ torch.linalg.pinv(F)
    lam = damping * float((F * F).sum()) / k
    if lam == 0.0:
        return Q.new_zeros((Q.shape[0], n))
    if n < k:
        gram = F @ F.T + lam * torch.eye(n, dtype=F.dtype, device=F.device)
        return torch.linalg.solve(gram, F @ Q.T).T
    gram = F.T @ F + lam * torch.eye(k, dtype=F.dtype, device=F.device)
    return torch.linalg.solve(gram, Q.T).T @ F.T


def _average_ranks(x: Tensor) -> Tensor:
    """Ranks ``0..n-1`` along the last dim, ties sharing their average rank."""
    less = (x.unsqueeze(-1) > x.unsqueeze(-2)).sum(-1).to(torch.float64)
    equal = (x.unsqueeze(-1) == x.unsqueeze(-2)).sum(-1).to(torch.float64)
    return less + 0.5 * (equal - 1.0)


def rank_correlation(a: Tensor, b: Tensor) -> Tensor:
    """Spearman's rank correlation along the last dimension (ties get average ranks).

    Args:
        a: ``(..., n)`` tensor, ``n >= 2``.
        b: a tensor of the same shape.

    Returns:
        ``(...)`` float64 correlations in ``[-1, 1]`` (NaN where a row is constant).

    Raises:
        ValueError: on mismatched shapes or ``n < 2``.
    """
    if a.shape != b.shape:
        raise ValueError(f"b must have a's shape {tuple(a.shape)}, got {tuple(b.shape)}")
    if a.dim() < 1 or a.shape[-1] < 2:
        raise ValueError(f"a must have at least 2 entries along its last dim, got {tuple(a.shape)}")
    ra = _average_ranks(a)
    rb = _average_ranks(b)
    ra = ra - ra.mean(-1, keepdim=True)
    rb = rb - rb.mean(-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1))


# -------------------------------------------------------------------------------- bench

#: The estimators the bench compares: name -> (proposal, stratify, noise). ``"pilot"`` stands for
#: the variance-optimal proposal of `pilot_proposal`, estimated once on separate examples.
BENCH_METHODS: dict[str, tuple[str, str | None, str]] = {
    "baseline": ("prior", None, "iid"),
    "strat": ("prior", "per_outer", "iid"),
    "IS": ("weighted", None, "iid"),
    "IS+strat": ("weighted", "per_outer", "iid"),
    "IS*": ("pilot", None, "iid"),
    "IS*+strat": ("pilot", "per_outer", "iid"),
    "IS*+strat+antithetic": ("pilot", "per_outer", "antithetic"),
    "IS*+strat+QMC": ("pilot", "per_outer", "sobol"),
}

#: The architecture of the embedded teacher (used with random weights when they are missing).
_DEFAULT_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": (32, 32, 32),
    "down_block_types": ("DownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "UpBlock2D"),
    "layers_per_block": 1,
    "add_attention": True,
    "attention_head_dim": 16,
    "norm_num_groups": 8,
    "num_class_embeds": 11,
}


def load_attribution_teacher(seed: int = 0) -> tuple[Any, str]:
    """The embedded digits teacher, or its architecture at a seeded random init if missing.

    Args:
        seed: seed of the random weights (used only when the shipped weights are missing).

    Returns:
        ``(teacher, kind)`` with ``kind`` ``"embedded"`` or ``"random-init"`` (with a warning).
    """
    from ..teachers import load_default

    try:
        return load_default(), "embedded"
    except FileNotFoundError:
        from diffusers import DDPMScheduler, UNet2DModel

        from ..teachers.diffusers_teacher import DiffusersTeacher

        warnings.warn(
            "the embedded teacher's weights are missing; using its architecture with random "
            "weights",
            stacklevel=2,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = UNet2DModel(**_DEFAULT_UNET_CONFIG)
        sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
        return DiffusersTeacher(unet, sched, null_class=10), "random-init"


def pick_examples(labels: Tensor, n: int, offset: int = 0) -> Tensor:
    """``n`` indices into ``labels`` cycling through the digits ``offset, offset + 1, ...``.

    Args:
        labels: ``(N,)`` digit labels.
        n: how many to pick.
        offset: the first digit.

    Returns:
        ``(n,)`` long indices (deterministic: the first unused example of each digit in turn).
    """
    per_class = {c: torch.nonzero(labels == c).flatten().tolist() for c in range(10)}
    total = sum(len(v) for v in per_class.values())
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= total:
        raise ValueError(f"n must be an integer in [0, {total}], got {n!r}")
    picked = []
    i = 0
    while len(picked) < n:
        c = (i + offset) % 10
        j = i // 10
        if j < len(per_class[c]):
            picked.append(per_class[c][j])
        i += 1
    return torch.tensor(picked)


class AttributionBench:
    """The data-attribution pipeline for ``carv-pyro bench``: per-example gradient features.

    The estimated quantity is the projected gradient feature of a fixed set of examples (a few
    training digits and a few held-out queries), flattened: ``P = n_examples * k``. A
    configuration's ``K`` is the number of teacher evaluations per example; ``R`` is the number
    of examples (each its own outer plate, see `AttributionFeaturizer`). Draws are
    shared across examples within an estimate (D-TRAK) and independent across estimates.

    The methods (`BENCH_METHODS`) all spend ``K`` evaluations per example, so the
    meaningful ECM of a row is against the baseline row at the same ``K``. ``"pilot"`` rows use
    `pilot_proposal` computed once on two other training digits (its one-off cost is
    reported by `extras` as ``pilot_seconds``); the reference uses the same proposal with
    stratification, which is unbiased and tighter than stratification alone.

    Quick: the last up-block of the embedded UNet (plus ``conv_norm_out``, ``conv_out``),
    ``k = 64``, 4 training examples and 1 query, six methods. Full: all weights, ``k = 128``,
    12 training examples and 4 queries, every method. Smoke: tiny sizes, to run the code paths.

    After [`carv_pyro.bench.run_protocol`][carv_pyro.bench.run_protocol] has set ``bench.rows``, `extras` also
    reports each row's ECM against the baseline row at the same ``K`` (the bench's own ECM
    column compares with a ``K = 1`` baseline, which this pipeline does not run).

    Args:
        quick: small sizes.
        seed: seeds the projection, the draws, the pilot and the reference.
        device: torch device.
        smoke: tiny sizes (implies ``quick``).
    """

    name = "attribution"

    def __init__(self, quick: bool, seed: int = 0, device: str = "cpu", smoke: bool = False):
        from ..data import load_digits_images

        for name, flag in (("quick", quick), ("smoke", smoke)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be a bool, got {flag!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.quick = quick or smoke
        self.smoke = smoke
        self.seed = seed
        self.device = torch.device(device)
        self.teacher, self.teacher_kind = load_attribution_teacher(seed)
        self.teacher.to(self.device)
        if smoke:  # the code paths only: tiny sizes, numbers meaningless
            self.n_train, self.n_query, self.reference_K, self.pilot_draws = 2, 1, 8, 2
            params, dim = ("conv_out",), 16
            self.methods = ("baseline", "strat", "IS*+strat+QMC")
        elif quick:
            self.n_train, self.n_query, self.reference_K, self.pilot_draws = 4, 1, 64, 16
            params, dim = ("up_blocks.2", "conv_norm_out", "conv_out"), 64
            self.methods = ("baseline", "strat", "IS", "IS+strat", "IS*+strat", "IS*+strat+QMC")
        else:
            self.n_train, self.n_query, self.reference_K, self.pilot_draws = 12, 4, 128, 48
            params, dim = None, 128
            self.methods = tuple(BENCH_METHODS)
        self.featurizer = AttributionFeaturizer(
            self.teacher, params=params, dim=dim, projection_seed=seed
        )
        train_x, train_y = load_digits_images(16, "train")
        test_x, test_y = load_digits_images(16, "test")
        ti = pick_examples(train_y, self.n_train + 2, offset=seed)
        ti, pilot = ti[: self.n_train], ti[self.n_train :]
        qi = pick_examples(test_y, self.n_query, offset=seed)
        self.train_index, self.query_index = ti, qi
        self.images = torch.cat([train_x[ti], test_x[qi]]).to(self.device)
        self.labels = torch.cat([train_y[ti], test_y[qi]]).to(self.device)
        self.pilot_images = train_x[pilot].to(self.device)
        self.pilot_labels = train_y[pilot].to(self.device)
        self.R = self.n_train + self.n_query
        self._gen = torch.Generator().manual_seed(seed)
        self._references: dict[int, Tensor] = {}
        self._pilot: AbstractTimestepDistribution | None = None
        self.pilot_seconds = math.nan
        self.last_result: FeatureResult | None = None
        self.rows: list = []  # set by carv_pyro.bench.main after the protocol has run

    def configs(self) -> list[dict]:
        """The bench's methods (all of `BENCH_METHODS` when full) at ``K = 4`` and ``64``."""
        return [
            dict(method=m, R=self.R, K=K, proposal=p, stratify=s, noise=noise)
            for K in (4, 64)
            for m, (p, s, noise) in BENCH_METHODS.items()
            if m in self.methods
        ]

    def pilot(self) -> AbstractTimestepDistribution:
        """The pilot proposal ``q*`` (computed on first use, on the two pilot digits)."""
        if self._pilot is None:
            t0 = time.perf_counter()
            self._pilot = pilot_proposal(
                self.featurizer,
                self.pilot_images,
                self.pilot_labels,
                n_draws=self.pilot_draws,
                seed=_mix_seed(self.seed, 11),
            )
            self.pilot_seconds = time.perf_counter() - t0
        return self._pilot

    def _proposal(self, name: str) -> str | AbstractTimestepDistribution:
        return self.pilot() if name == "pilot" else name

    def _features(self, config: dict) -> FeatureResult:
        if int(config.get("R", self.R)) != self.R:
            raise ValueError(
                f"config R must be {self.R} (the number of examples), got {config['R']!r}"
            )
        seed = int(torch.randint(0, 2**62, (), generator=self._gen))
        return self.featurizer.features(
            self.images,
            self.labels,
            K=int(config["K"]),
            proposal=self._proposal(config.get("proposal", "prior")),
            stratify=config.get("stratify"),
            noise=config.get("noise", "iid"),
            shared_draws=bool(config.get("shared_draws", True)),
            seed=seed,
        )

    def estimate(self, config: dict) -> Tensor:
        """One estimate of all examples' features, flattened to ``(R * k,)``."""
        self.last_result = self._features(config)
        return self.last_result.features.flatten()

    def reference(self, n: int) -> Tensor:
        """The mean of ``n`` estimates (pilot IS + stratified, ``reference_K`` draws per
        example): ``(R k,)``, cached per ``n``."""
        n = _positive_int("n", n)
        if n not in self._references:
            self._references[n] = self.featurizer.reference(
                self.images,
                self.labels,
                n=n,
                K=self.reference_K,
                proposal=self.pilot(),
                seed=_mix_seed(self.seed, 7),
            ).flatten()
        return self._references[n]

    def scores(self, flat_features: Tensor) -> Tensor:
        """``(n_query, n_train)`` TRAK scores from a flattened estimate."""
        f = flat_features.reshape(self.R, -1)
        return attribution_scores(f[: self.n_train], f[self.n_train :])

    def _same_k_ecm(self) -> dict[str, float]:
        """``Var_base cost_base / (Var cost)`` against the baseline row at the same ``K``."""
        rows = getattr(self, "rows", None) or []
        base = {r.K: r for r in rows if r.method == "baseline"}
        out = {}
        for r in rows:
            b = base.get(r.K)
            if b is not None and r.var > 0 and r.cost_s > 0:
                out[f"ecm_same_K/{r.method}/K={r.K}"] = b.var * b.cost_s / (r.var * r.cost_s)
        return out

    def extras(self, repeats: int | None = None) -> dict:
        """Spearman correlation of attribution scores with the reference's, at equal compute.

        For ``K`` in ``{4, 64}`` and each method, ``repeats`` independent estimates of all
        features give TRAK scores; each query's scores over the training examples are rank-
        correlated with the reference scores, averaged over queries and repeats. The baseline
        and CARV (``strat``, ``IS+strat``, ``IS*+strat``, ``IS*+strat+QMC``) use the same ``K``
        evaluations per example, so equal teacher compute; measured seconds per estimate are
        reported next to them.

        Returns:
            A flat dict: ``spearman/{method}/K={K}``, ``spearman_se/{method}/K={K}``,
            ``seconds/{method}/K={K}``, plus the set-up (``teacher``, ``n_train``, ``n_query``,
            ``dim``, ``n_params``, ``reference_n``, ``reference_evals_per_example``,
            ``pilot_seconds``), and ``ecm_same_K/{method}/K={K}`` when ``bench.rows`` is set.
        """
        repeats = repeats or (2 if self.smoke else 3 if self.quick else 8)
        ref_n = max(self._references) if self._references else (10 if self.quick else 50)
        ref_scores = self.scores(self.reference(ref_n))
        out: dict[str, Any] = {
            "teacher": self.teacher_kind,
            "n_train": self.n_train,
            "n_query": self.n_query,
            "dim": self.featurizer.dim,
            "n_params": self.featurizer.dim_in,
            "reference_n": ref_n,
            "reference_evals_per_example": ref_n * self.reference_K,
            "pilot_seconds": self.pilot_seconds,
        }
        out.update(self._same_k_ecm())
        compared = ("baseline", "strat", "IS+strat", "IS*+strat", "IS*+strat+QMC")
        for K in (4, 64):
            for method in (m for m in compared if m in self.methods):
                proposal, stratify, noise = BENCH_METHODS[method]
                config = dict(
                    method=method, R=self.R, K=K, proposal=proposal, stratify=stratify, noise=noise
                )
                rhos, secs = [], []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    flat = self.estimate(config)
                    secs.append(time.perf_counter() - t0)
                    rho = rank_correlation(self.scores(flat), ref_scores)
                    rhos.append(float(torch.nan_to_num(rho, nan=0.0).mean()))
                key = f"{method}/K={K}"
                out[f"spearman/{key}"] = statistics.fmean(rhos)
                out[f"spearman_se/{key}"] = (
                    statistics.stdev(rhos) / math.sqrt(len(rhos)) if len(rhos) > 1 else math.nan
                )
                out[f"seconds/{key}"] = statistics.median(secs)
        return out
