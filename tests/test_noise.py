"""The noise samplers: scrambled-Sobol noise is exact, independent across calls and a net.

`SobolNoise` turns ``31 d`` base uniforms into 30-bit words (a linear matrix scramble and a
digital shift, `scrambled_sobol_ints`) and the points into normals at the midpoints of the
``2^-30`` grid. Exactness is checked without statistics where it can be: the words are
``floor(2^30 u)`` of the base uniforms (exactly uniform for a uniform on the ``2^-53`` grid),
every point is the shift XOR a point that does not depend on the shift (so it is exactly
uniform on the grid for any scramble), the scramble is torch's own, and the net property is
counted point by point.

Statistical thresholds: every z-test is at ``Z = 5`` standard errors. The file runs 3 (moments of
the marginal, 2000 calls) + 4 (cross-call products, 2000 pairs) + 2 coordinates x 2 set-ups
(gradients, 300 estimates) = 11 z-tests; a Bonferroni bound puts the chance of a false alarm for
any seed below 11 * 5.7e-7 = 6.3e-6 (each is a mean of at least 300 independent, light-tailed
terms, so the normal approximation holds). Every seed is shifted by ``CARV_TEST_SEED``.
"""

from __future__ import annotations

import math

import pytest
import torch

import carv_pyro as carv
from carv_pyro.infer import samplers
from carv_pyro.infer.samplers import RandomSource, SobolNoise, scrambled_sobol_ints
from carv_pyro.layout import TermLayout

from .analytic import grad_of, make_model, schedule
from .seeds import seed

Z = 5.0
CPU = torch.device("cpu")
BITS = 30


def layout(n_outer: int, n_inner: int) -> TermLayout:
    return TermLayout(torch.Size([n_outer, n_inner]), (), "draws", -1, True)


def sobol_uniforms(n_outer, n_inner, event, source) -> torch.Tensor:
    """``(n_outer, n_inner, d)`` float64: the sampler's points mapped back through the normal
    CDF (exact to ~1e-16, far inside the ``2^-31`` margin of the midpoints to any cell edge)."""
    eps = SobolNoise().sample(layout(n_outer, n_inner), event, torch.float64, CPU, source)
    return 0.5 * (1 + torch.erf(eps / math.sqrt(2.0))).reshape(n_outer, n_inner, -1)


def random_words(d: int, s: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed(s))
    return torch.randint(0, 1 << BITS, (d, BITS + 1), generator=gen)


def test_words_are_floor_of_the_base_uniforms_on_the_2_53_grid():
    """``u = k 2^-53`` (torch's CPU doubles) and ``(k + 1/2) 2^-53`` (curand's, before rounding)
    both give the word ``k >> 23``: each word has exactly ``2^23`` of the ``2^53`` grid points, so
    it is exactly uniform on ``[0, 2^30)``; ``u = 1`` (curand's rounding can reach it) wraps to
    0."""

    class Fixed(RandomSource):
        def uniform(self, shape, device="cpu"):
            return self.u.reshape(shape)

    gen = torch.Generator().manual_seed(seed(1))
    k = torch.randint(0, 1 << 53, (3, BITS + 1), generator=gen)
    k[0, :3] = torch.tensor([0, 1 << 23, (1 << 53) - 1])
    for offset in (0.0, 0.5):
        src = Fixed()
        src.u = (k.to(torch.float64) + offset) * 2.0**-53
        eps = SobolNoise().sample(layout(1, 1), torch.Size([3]), torch.float64, CPU, src)
        # the first point is the shift word alone: u = (shift + 1/2) 2^-30
        shift = torch.floor(0.5 * (1 + torch.erf(eps[0, 0] / math.sqrt(2.0))) * 2**BITS)
        assert torch.equal(shift.to(torch.int64), k[:, BITS] >> 23)
    src = Fixed()
    src.u = torch.ones(1, BITS + 1, dtype=torch.float64)
    eps = SobolNoise().sample(layout(1, 1), torch.Size([1]), torch.float64, CPU, src)
    lowest = math.sqrt(2.0) * torch.erfinv(torch.tensor(2.0**-BITS - 1.0, dtype=torch.float64))
    assert float(eps) == float(lowest)


@pytest.mark.parametrize("n", [1, 5, 64, 96])
def test_every_point_is_the_shift_xor_a_point_independent_of_the_shift(n):
    """Hence exactness: for any scramble matrices, a uniform shift word makes every coordinate of
    every point exactly uniform on the ``2^-30`` grid."""
    d = 7
    words = random_words(d, 2)
    no_shift = words.clone()
    no_shift[:, BITS] = 0
    directions = samplers.sobol_directions(d, CPU)
    base = scrambled_sobol_ints(n, directions, no_shift)
    for s in range(3):
        shifted = no_shift.clone()
        shifted[:, BITS] = random_words(d, 10 + s)[:, BITS]
        got = scrambled_sobol_ints(n, directions, shifted)
        assert torch.equal(got, base ^ shifted[:, BITS])
    assert base.min() >= 0 and base.max() < 1 << BITS


def test_without_scramble_the_points_are_torchs_sobol_points():
    d, n = 6, 128
    x = scrambled_sobol_ints(
        n, samplers.sobol_directions(d, CPU), torch.zeros(d, BITS + 1, dtype=torch.int64)
    )
    want = torch.quasirandom.SobolEngine(d).draw(n, dtype=torch.float64) * 2**BITS
    assert set(map(tuple, x.tolist())) == set(map(tuple, want.to(torch.int64).tolist()))


@pytest.mark.skipif(
    not hasattr(torch, "_sobol_engine_scramble_"), reason="torch's scramble op is private"
)
def test_the_scramble_is_torchs_linear_matrix_scramble():
    """The same random bits as torch's lower-triangular matrices (row ``p`` acts on output bit
    ``29 - p``) scramble the direction numbers as ``SobolEngine(scramble=True)`` does."""
    d, n = 9, 64
    words = random_words(d, 3)
    words[:, BITS] = 0  # no shift: torch's state holds the scrambled direction numbers only
    ltm = torch.zeros(d, BITS, BITS, dtype=torch.int64)
    for p in range(BITS):
        for k in range(p):
            ltm[:, p, k] = (words[:, BITS - 1 - p] >> (BITS - 1 - k)) & 1
    state = samplers.sobol_directions(d, CPU).clone()
    torch._sobol_engine_scramble_(state, ltm, d)
    want = torch.zeros(n, d, dtype=torch.int64)
    for i in range(n):
        for k in range(n.bit_length()):
            if (i >> k) & 1:
                want[i] ^= state[:, k]
    assert torch.equal(scrambled_sobol_ints(n, samplers.sobol_directions(d, CPU), words), want)


@pytest.mark.parametrize("m", [0, 1, 3, 6, 7])
def test_each_block_of_k_points_is_a_net(m):
    """``K = 2^m`` points per upstream sample: one in each ``[a / K, (a + 1) / K)`` in every
    coordinate, and the first two coordinates a (0, m, 2)-net (one point in every elementary
    box of area ``1 / K``), for every upstream sample and call."""
    K, R, d = 1 << m, 3, 5
    source = RandomSource(seed=seed(4))
    for _ in range(3):
        u = sobol_uniforms(R, K, torch.Size([d]), source)
        for r in range(R):
            cells = torch.floor(u[r] * K).to(torch.int64)
            assert all(sorted(cells[:, j].tolist()) == list(range(K)) for j in range(d))
            for a in range(m + 1):
                boxes = torch.floor(u[r, :, 0] * 2**a) * 2 ** (m - a) + torch.floor(
                    u[r, :, 1] * 2 ** (m - a)
                )
                assert sorted(boxes.to(torch.int64).tolist()) == list(range(K))


def test_marginal_moments_and_independence_across_calls():
    """Over 2000 calls (one point of an 8-point block in 2 dims): ``E u = 1/2``,
    ``E u^2 = 1/3``, ``P(eps < 0) = 1/2`` (SE from the exact variances), and consecutive calls
    uncorrelated (products of centred uniforms, mean 0, SE ``(1/12) / sqrt(n)``)."""
    n = 2000
    source = RandomSource(seed=seed(5))
    u = torch.stack([sobol_uniforms(1, 8, torch.Size([2]), source)[0, 3] for _ in range(n)])
    se = math.sqrt(1 / 12 / n)
    assert abs(float(u.mean()) - 0.5) / se < Z
    se2 = math.sqrt((1 / 5 - 1 / 9) / n)  # Var u^2 = E u^4 - (E u^2)^2
    assert abs(float((u**2).mean()) - 1 / 3) / se2 < Z
    assert abs(float((u < 0.5).double().mean()) - 0.5) / math.sqrt(0.25 / n) < Z
    c = u - 0.5
    for j in range(2):
        for lag_j in range(2):
            prod = c[:-1, j] * c[1:, lag_j]
            assert abs(float(prod.mean())) / (1 / 12 / math.sqrt(n - 1)) < Z


def test_each_call_scrambles_afresh():
    """Two calls differ by more than a digital shift (their scrambles are independent too), and
    the points of a call never repeat."""
    source = RandomSource(seed=seed(6))
    eps = [SobolNoise().sample(layout(2, 16), torch.Size([4]), torch.float64, CPU, source)]
    eps.append(SobolNoise().sample(layout(2, 16), torch.Size([4]), torch.float64, CPU, source))
    x = [torch.floor(0.5 * (1 + torch.erf(e / math.sqrt(2.0))) * 2**BITS).long() for e in eps]
    diff = (x[0] ^ x[1]).reshape(-1, 4)
    assert not (diff == diff[0]).all()
    assert len(set(map(tuple, x[0].reshape(-1, 4).tolist()))) == 32


def test_same_seed_same_draws_other_seed_others_and_dtype_device_shape():
    event = torch.Size([2, 3])

    def draw(s, dtype=torch.float32):
        src = RandomSource(seed=s)
        return SobolNoise().sample(layout(3, 4), event, dtype, CPU, src)

    a, b, c = draw(seed(7)), draw(seed(7)), draw(seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (3, 4, 2, 3) and a.dtype == torch.float32 and a.device == CPU
    assert torch.isfinite(draw(seed(9), torch.float64)).all()


def test_no_sobol_engine_is_built_per_call(monkeypatch):
    """The cost fix: direction numbers are cached per dimension, so a call builds no engine."""
    d = 131  # a dimension no other test uses
    src = RandomSource(seed=seed(10))
    SobolNoise().sample(layout(1, 4), torch.Size([d]), torch.float32, CPU, src)
    built = []
    real = torch.quasirandom.SobolEngine.__init__
    monkeypatch.setattr(
        torch.quasirandom.SobolEngine,
        "__init__",
        lambda self, *a, **k: built.append(a) or real(self, *a, **k),
    )
    for _ in range(3):
        SobolNoise().sample(layout(1, 4), torch.Size([d]), torch.float32, CPU, src)
    assert built == []


def test_max_dim_and_power_of_two_warning():
    src = RandomSource(seed=seed(11))
    big = torch.Size([SobolNoise.MAX_DIM + 1])
    with pytest.raises(ValueError, match="at most 21201 dimensions"):
        SobolNoise().sample(layout(1, 4), big, torch.float32, CPU, src)
    sampler = SobolNoise()
    with pytest.warns(UserWarning, match="power-of-two"):
        sampler.sample(layout(1, 3), torch.Size([2]), torch.float32, CPU, src)
    with pytest.raises(ValueError, match="between 1 and"):
        scrambled_sobol_ints(0, samplers.sobol_directions(2, CPU), random_words(2, 0))


@pytest.mark.parametrize("stratify", ["per_outer", "global"])
def test_gradient_with_sobol_noise_is_unbiased_for_a_nonlinear_residual(stratify):
    """``h = eps^2 + tanh(eps)`` has ``E h = 1`` per coordinate (tanh is odd): an estimate through
    the estimator with ``noise="sobol"`` is unbiased only if the noise's second moment is exact,
    not just its mean (as the affine SDS residual needs). Weights ``p / q`` keep it so under
    ``proposal="weighted"``."""
    from carv_pyro.teachers import GaussianTeacher

    from .analytic import MEAN, STD

    teacher = GaussianTeacher(MEAN.clone(), STD, schedule())
    objective = carv.TeacherObjective(
        teacher, residual=lambda b: b.eps**2 + torch.tanh(b.eps), weighting="uniform"
    )
    model = make_model(objective, R=2, K=8, inner="draws")
    estimator = carv.Estimator(K=8, proposal="weighted", stratify=stratify, noise="sobol")
    guide = estimator.guide(model, seed=seed(12))
    loss = estimator.loss()
    grads = torch.stack([grad_of(loss, model, guide) for _ in range(300)])
    z = (grads.mean(0) - 1.0) / (grads.std(0) / math.sqrt(grads.shape[0]))
    assert (z.abs() <= Z).all(), z
