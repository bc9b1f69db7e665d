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

import functools
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
    "scrambled_sobol_ints",
    "sobol_directions",
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


#: binary digits of a Sobol coordinate (``SobolEngine.MAXBIT``): points lie on the ``2**-30`` grid
_SOBOL_BITS = torch.quasirandom.SobolEngine.MAXBIT


@functools.lru_cache(maxsize=32)
def sobol_directions(d: int, device: torch.device) -> Tensor:
    """``(d, 30)`` int64 direction numbers of the unscrambled Sobol sequence in ``d`` dimensions
    (torch's, Joe and Kuo's D(6)), on ``device``. A dimension's numbers do not depend on ``d``
    (these are the first ``d`` rows of any larger ``d``'s). Constants, so cached per dimension
    and device."""
    return torch.quasirandom.SobolEngine(d).sobolstate.to(device)


@functools.lru_cache(maxsize=8)
def _bit_masks(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """``(30,)`` int64 constants on ``device``: bit positions ``b``, ``2^b``, and the masks of
    the bits above ``b``."""
    bit = torch.arange(_SOBOL_BITS, device=device)
    one = torch.ones((), dtype=torch.int64, device=device)
    return bit, one << bit, -(one << (bit + 1))


def scrambled_sobol_ints(n: int, directions: Tensor, words: Tensor) -> Tensor:
    """The first ``n`` points of a scrambled Sobol sequence, as ``30``-bit integers.

    The scramble is Matousek's linear matrix scramble plus a digital shift, what
    ``SobolEngine(scramble=True)`` does, written as a few batched tensor ops: in dimension ``j``
    output bit ``b`` of every direction number is its own bit ``b`` XOR a random combination of
    its more significant bits (a lower-triangular binary matrix with unit diagonal, in
    most-significant-first order), and every point is then XORed with the shift ``s_j``. Point
    ``i`` (natural order) is ``s_j XOR`` the XOR of the scrambled direction numbers of the set
    bits of ``i``.

    The points of indices ``[c 2^m, (c + 1) 2^m)`` are a digital shift of a ``(t, m, d)``-net,
    so each coordinate has one point in each interval ``[a 2^-m, (a + 1) 2^-m)`` (the scramble
    keeps the generating matrices' t-value). For any scramble matrices, a uniform shift word
    makes every point exactly uniform on the ``2^-30`` grid.

    Args:
        n: points, at most ``2**30``.
        directions: ``(d, 30)`` int64 unscrambled direction numbers (`sobol_directions`).
        words: ``(d, 31)`` int64 random words in ``[0, 2**30)``: ``words[:, b]`` holds the
            random bits of the scramble matrix's row for output bit ``b`` (only its bits above
            ``b`` are used), ``words[:, 30]`` the shift.

    Returns:
        ``(n, d)`` int64 in ``[0, 2**30)``, on ``directions``' device.
    """
    if not 1 <= n <= 1 << _SOBOL_BITS:
        raise ValueError(f"a Sobol sequence has between 1 and 2**{_SOBOL_BITS} points, got {n}")
    nbits = max(1, (n - 1).bit_length())
    bit, power, above = _bit_masks(directions.device)
    # row b of the scramble matrix as a bit mask: bit b, and the random bits above it
    rows = (words[:, :_SOBOL_BITS] & above) | power  # (d, 30)
    # output bit b of a direction number: the parity of its bits that row b selects
    v = rows[:, :, None] & directions[:, None, :nbits]  # (d, 30, nbits)
    for shift in (16, 8, 4, 2, 1):
        v ^= v >> shift
    v = ((v & 1) << bit[:, None]).sum(1).T  # (nbits, d) scrambled direction numbers
    # natural order by doubling: the second half of 2^(k+1) points is the first half XOR v_k
    x = words[:, _SOBOL_BITS][None]
    for k in range(nbits):
        x = torch.cat([x, x ^ v[k]])
    return x[:n]


class SobolNoise(AbstractNoiseSampler):
    """Randomized QMC normals: scrambled Sobol points through the inverse normal CDF.

    Each upstream sample gets a consecutive block of ``K`` points of one scrambled sequence in
    ``d = prod(event_shape)`` dimensions (a net when ``K`` is a power of two: each coordinate
    has one point in each interval ``[a / K, (a + 1) / K)``). Every call scrambles afresh
    (`scrambled_sobol_ints`: a random linear matrix scramble and a random digital shift, as
    ``SobolEngine(scramble=True)`` does), from ``31 d`` of the source's base uniforms, so draws
    in different calls are independent. The digital shift makes every point exactly uniform on
    the ``2^-30`` grid; the points are taken at the grid's midpoints, ``u = (x + 1/2) 2^-30``,
    so ``eps = sqrt(2) erfinv(2u - 1)`` is finite, its law symmetric, and ``N(0, I)`` up to that
    grid. Everything runs on the draws' device (no host copy, no sync); the unscrambled direction
    numbers are cached per dimension and device.

    The same seeded source gives the same draws on a device. Cost at ``K = 64``, ``d = 128`` on
    one CPU core: 0.2 ms a call (i.i.d. noise: 0.02 ms); the ``SobolEngine`` built per call
    before (same law, other draws) spent 1.6 ms in its scramble loop alone, on the host.
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
        device = _canonical(device)
        # floor(2^30 u) of a uniform on the grid k 2^-53 (torch's CPU doubles) is k >> 23,
        # exactly uniform on [0, 2^30). curand's doubles, (k + 1/2) 2^-53 rounded to the float
        # grid (u = 1 possible: the remainder wraps it to 0), move 2^-53 of probability between
        # words: uniform up to the float grid.
        base = source.uniform((d, _SOBOL_BITS + 1), device).to(device)
        words = torch.floor(base * 2.0**_SOBOL_BITS).to(torch.int64) % (1 << _SOBOL_BITS)
        x = scrambled_sobol_ints(n_outer * n_inner, sobol_directions(d, device), words)
        # 2u - 1 with u = (x + 1/2) 2^-30 in [2^-31, 1 - 2^-31], exact in float64
        z = x.to(torch.float64).mul_(2.0 ** (1 - _SOBOL_BITS)).add_(2.0**-_SOBOL_BITS - 1.0)
        z = z.erfinv_().mul_(math.sqrt(2.0))
        z = z.reshape((n_outer, n_inner) + tuple(event_shape)).to(dtype)
        return layout.ungroup(z, len(event_shape))


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
