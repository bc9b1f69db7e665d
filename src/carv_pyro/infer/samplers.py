"""Seedable draws for the teacher sites, in BoTorch's style: base samples apart from their use.

A `RandomSource` owns the randomness of a guide: with a ``seed`` it keeps one generator per
device, seeded from that seed, so the same seed gives the same draws on a device run after run
(CPU and CUDA draws differ from each other, as torch's generators do); with a user's
``generator`` every draw is made on that generator's device and then moved; with neither, torch's
global generators are used (seeded by ``pyro.set_rng_seed``).

The samplers turn base samples into draws of a term's layout:

- `stratified_uniforms`: timestep uniforms, i.i.d. or one per equal-probability stratum, per
  upstream sample (``"per_outer"``, ``B = K`` strata) or across all draws (``"global"``,
  ``B = R K``); every uniform has marginal law ``U[0, 1)``, so ``q.icdf(u)`` has marginal ``q``;
- noise samplers (`IIDNoise`, `AntitheticNoise`, `SobolNoise`): every ``eps`` has marginal
  ``N(0, I)``, so noise designs carry no importance weight.

Subclassing `RandomSource` (overriding `RandomSource.uniform` and
`RandomSource.permutation_keys`) is how the exact-quadrature tests integrate the estimator over
its base uniforms.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from .. import _checks
from ..layout import TermLayout, to_device

__all__ = [
    "NOISE",
    "STRATIFY",
    "AbstractNoiseSampler",
    "AntitheticNoise",
    "IIDNoise",
    "RandomSource",
    "SobolNoise",
    "noise_sampler",
    "stratified_uniforms",
]

STRATIFY = (None, "per_outer", "global", "auto")
NOISE = ("iid", "antithetic", "sobol")

_MASK64 = (1 << 64) - 1


def _mix(seed: int, salt: int) -> int:
    """splitmix64 of ``seed`` and ``salt``: independent-looking seeds per device and purpose."""
    z = (seed + 0x9E3779B97F4A7C15 * (salt + 1)) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def _canonical(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class RandomSource:
    """The base randomness of a guide's draws.

    Args:
        seed: an integer seed: one generator per device, seeded from it (reproducible per
            device). Give at most one of ``seed`` and ``generator``.
        generator: a ``torch.Generator``: every draw is made on its device and moved to where it
            is used (a CPU generator serves a CUDA run correctly, at the cost of a copy).

    With neither, draws come from torch's global generators.

    Raises:
        ValueError: if both are given, or the seed is not an integer in ``[0, 2**63)``.
        TypeError: if ``generator`` is not a ``torch.Generator``.
    """

    def __init__(self, seed: int | None = None, generator: torch.Generator | None = None):
        _checks.seed_value("seed", seed)
        if generator is not None:
            _checks.instance("generator", generator, torch.Generator, "a torch.Generator or None")
            if seed is not None:
                raise ValueError("give at most one of seed and generator")
        self.seed = seed
        self.generator = generator
        self._generators: dict[torch.device, torch.Generator] = {}

    def generator_for(self, device: torch.device | str) -> torch.Generator | None:
        """The generator that draws for ``device`` (``None``: torch's global one)."""
        if self.generator is not None:
            return self.generator
        if self.seed is None:
            return None
        device = _canonical(device)
        gen = self._generators.get(device)
        if gen is None:
            salt = 0 if device.type == "cpu" else 1 + (device.index or 0)
            gen = torch.Generator(device=device).manual_seed(_mix(self.seed, salt))
            self._generators[device] = gen
        return gen

    def _draw(self, fn, shape, dtype, device) -> Tensor:
        device = torch.device(device)
        gen = self.generator_for(device)
        where = gen.device if gen is not None else device
        out = fn(tuple(shape), dtype=dtype, device=where, generator=gen)
        return out if out.device == _canonical(device) else to_device(out, device)

    def uniform(self, shape: tuple[int, ...], device: torch.device | str = "cpu") -> Tensor:
        """Base uniforms ``U[0, 1)`` of ``shape``, float64, on ``device``."""
        return self._draw(torch.rand, shape, torch.float64, device)

    def permutation_keys(
        self, shape: tuple[int, ...], device: torch.device | str = "cpu"
    ) -> Tensor:
        """Keys whose ``argsort`` along the last dim is a uniformly random permutation."""
        return self._draw(torch.rand, shape, torch.float32, device)

    def normal(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> Tensor:
        """Standard normals of ``shape`` and ``dtype`` on ``device``."""
        return self._draw(torch.randn, shape, dtype, device)

    def global_strata(self, n: int, device: torch.device | str = "cpu") -> Tensor:
        """``n`` uniforms, exactly one in each stratum ``[b / n, (b + 1) / n)``, strata in a
        uniformly random order: the ``"global"`` design of `stratified_uniforms`.

        The hook a source overrides to stratify over more draws than this process makes
        ([`SharedStrataSource`][carv_pyro.infer.distributed.SharedStrataSource] spans ranks).

        Returns:
            ``(n,)`` float64 on ``device``.
        """
        strata = torch.argsort(self.permutation_keys((1, n), device), dim=-1)[0]
        return (strata.to(torch.float64) + self.uniform((n,), device)) / n

    def integer_seed(self) -> int:
        """A fresh seed for a scrambled sequence, drawn on the host (no device round trip)."""
        gen = self.generator_for("cpu") if self.generator is None else self.generator
        where = gen.device if gen is not None else torch.device("cpu")
        return int(torch.randint(0, 2**62, (), generator=gen, device=where))

    def get_state(self) -> dict:
        """The generators' states (for checkpoints): a dict of CPU byte tensors."""
        if self.generator is not None:
            return {"generator": self.generator.get_state()}
        return {str(d): g.get_state() for d, g in self._generators.items()}

    def set_state(self, state: dict) -> None:
        """Restore `get_state`'s result (a device's generator not in it starts afresh)."""
        if self.generator is not None:
            self.generator.set_state(state["generator"])
            return
        self._generators.clear()
        for key, value in state.items():
            gen = self.generator_for(torch.device(key))
            if gen is not None:
                gen.set_state(value)

    def __repr__(self) -> str:
        if self.generator is not None:
            return f"RandomSource(generator on {self.generator.device})"
        return f"RandomSource(seed={self.seed})"


def stratified_uniforms(
    layout: TermLayout, stratify: str | None, source: RandomSource, device: torch.device | str
) -> Tensor:
    """Uniforms in ``[0, 1)`` of ``layout.batch_shape``, stratified as asked.

    Args:
        layout: the term's layout (which dim holds the inner draws).
        stratify: ``None`` (i.i.d.), ``"per_outer"`` (``B = K`` strata per upstream sample),
            ``"global"`` (``B = R K`` strata across all draws) or ``"auto"`` (``"per_outer"``
            when there are several inner draws per upstream sample, else ``"global"``: with
            ``K = 1`` per-outer strata would be a single one).
        source: the base randomness.
        device: where the uniforms are drawn and returned.

    Returns:
        float64 ``batch_shape`` uniforms; each has marginal law ``U[0, 1)`` and, within a group,
        exactly one falls in each stratum ``[b / B, (b + 1) / B)`` (the stratum of each draw is
        a uniformly random permutation).
    """
    shape = tuple(layout.batch_shape)
    if stratify == "auto":
        stratify = "per_outer" if layout.n_inner > 1 else "global"
    if stratify is None:
        return source.uniform(shape, device)
    if stratify == "global":
        return source.global_strata(math.prod(shape), device).reshape(shape)
    if stratify == "per_outer":
        n_outer, n_inner = layout.n_outer, layout.n_inner
        strata = torch.argsort(source.permutation_keys((n_outer, n_inner), device), dim=-1)
        u = (strata.to(torch.float64) + source.uniform((n_outer, n_inner), device)) / n_inner
        return layout.ungroup(u)
    raise ValueError(f"stratify must be one of {STRATIFY}, got {stratify!r}")


class AbstractNoiseSampler:
    """Draws the ``eps`` of all draws of a term. Every draw must have marginal law ``N(0, I)``.

    Subclasses implement `sample`; since the marginal is exact, noise designs carry no
    importance weight.

    Subclassing:
        ```python
        class ZeroNoise(AbstractNoiseSampler):      # eps = 0: the exact E_eps of an affine residual
            def sample(self, layout, event_shape, dtype, device, source):
                return torch.zeros(tuple(layout.batch_shape) + tuple(event_shape),
                                   dtype=dtype, device=device)
        ```
        (``ZeroNoise`` has no ``N(0, I)`` marginal: it is a test device, not an estimator.)
    """

    #: even inner draws needed (antithetic pairs)
    needs_even_inner = False

    def sample(
        self,
        layout: TermLayout,
        event_shape: torch.Size,
        dtype: torch.dtype,
        device: torch.device,
        source: RandomSource,
    ) -> Tensor:
        """Return ``(*layout.batch_shape, *event_shape)`` noise."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class IIDNoise(AbstractNoiseSampler):
    """Independent standard normal noise (the default)."""

    def sample(self, layout, event_shape, dtype, device, source):
        return source.normal(tuple(layout.batch_shape) + tuple(event_shape), dtype, device)


class AntitheticNoise(AbstractNoiseSampler):
    """Antithetic pairs ``(eps, -eps)`` within each upstream sample's inner draws.

    Needs an even number of inner draws per upstream sample.
    """

    needs_even_inner = True

    def sample(self, layout, event_shape, dtype, device, source):
        n_outer, n_inner = layout.n_outer, layout.n_inner
        if n_inner % 2:
            raise ValueError(
                f"noise='antithetic' needs an even number of inner draws per upstream sample; "
                f"the inner plate {layout.inner_plate!r} holds {n_inner} (batch shape "
                f"{tuple(layout.batch_shape)})"
            )
        half = source.normal((n_outer, n_inner // 2) + tuple(event_shape), dtype, device)
        return layout.ungroup(torch.cat([half, -half], dim=1), len(event_shape))


class SobolNoise(AbstractNoiseSampler):
    """Randomized QMC normals: scrambled Sobol points through the inverse normal CDF.

    Each upstream sample gets a consecutive block of ``K`` points of one scrambled sequence in
    ``d = prod(event_shape)`` dimensions (a net when ``K`` is a power of two). The scrambling's
    random digital shift makes every point's marginal exactly uniform, so every ``eps`` is
    exactly ``N(0, I)``. The inverse CDF is guarded so it never returns infinity. The points are
    made on the CPU (``SobolEngine`` has no CUDA kernel) and copied without a host sync.
    """

    MAX_DIM = torch.quasirandom.SobolEngine.MAXDIM

    def __init__(self) -> None:
        self._warned = False

    def sample(self, layout, event_shape, dtype, device, source):
        d = math.prod(event_shape)
        if d > self.MAX_DIM:
            raise ValueError(
                f"noise='sobol' supports at most {self.MAX_DIM} dimensions per draw, the event "
                f"shape {tuple(event_shape)} has {d}; use noise='iid' or 'antithetic'"
            )
        n_outer, n_inner = layout.n_outer, layout.n_inner
        if n_inner & (n_inner - 1) and not self._warned:
            warnings.warn(
                f"noise='sobol' works best with a power-of-two number of inner draws; got "
                f"{n_inner}",
                stacklevel=2,
            )
            self._warned = True
        engine = torch.quasirandom.SobolEngine(d, scramble=True, seed=source.integer_seed())
        u = engine.draw(n_outer * n_inner, dtype=torch.float64)
        # BoTorch's guard: keep u strictly inside (0, 1) so erfinv stays finite.
        eps64 = torch.finfo(torch.float64).eps
        u = 0.5 + (1.0 - eps64) * (u - 0.5)
        z = math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0)
        z = z.reshape((n_outer, n_inner) + tuple(event_shape)).to(dtype)
        return layout.ungroup(to_device(z, device), len(event_shape))


_NOISE = {"iid": IIDNoise, "antithetic": AntitheticNoise, "sobol": SobolNoise}


def noise_sampler(noise: str | AbstractNoiseSampler) -> AbstractNoiseSampler:
    """The sampler for a noise option: a name in `NOISE` or a sampler instance.

    Raises:
        ValueError: on an unknown name or another type.
    """
    if isinstance(noise, AbstractNoiseSampler):
        return noise
    if isinstance(noise, str) and noise in _NOISE:
        return _NOISE[noise]()
    raise ValueError(f"noise must be one of {NOISE} or an AbstractNoiseSampler, got {noise!r}")
