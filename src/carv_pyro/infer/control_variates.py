"""Control variates that keep the objective: zero-mean terms with online-fitted coefficients.

An objective declares zero-mean terms ``c_m(batch)`` of its residual (its
``control_variates``: callables ``NoisedBatch -> (N, *event)`` with ``E[c_m | x, t] = 0``), and an
estimator with ``control_variates=True`` replaces the residual ``r`` of every draw by

    r - sum_m gamma_m(t) c_m,

with the coefficients ``gamma(t)`` (one vector per timestep bin) fitted by least squares to the
draws of *earlier* steps: ``gamma_b = G_b^{-1} v_b`` with ``G_b = sum <c_j, c_k>`` and
``v_b = sum <r, c_k>`` over the past draws in bin ``b`` (decayed, the parameters move). Given the
past, ``gamma`` is fixed and each subtracted term has mean zero, so the estimate stays exactly
unbiased, with any proposal, stratification or noise design (every draw's ``(t, eps)`` keeps its
marginal law, independent of ``x``); a term whose ``eps`` is conditioned (a fixed point, not a
draw) is evaluated without them. The fit minimises the residual's variance in x-space per
timestep bin, a proxy for the gradient's within-sample variance ``V_w``; control variates
cannot touch ``V_b`` (they have mean zero given ``x``).

The control variates shipped:

- ``eps`` ([`carv_pyro.objectives.eps_control_variate`][carv_pyro.objectives.eps_control_variate]),
  declared by [`SDS`][carv_pyro.SDS]: SDS subtracts ``eps`` with coefficient one; the fit tunes
  it per timestep (for a Gaussian teacher the optimum ``sigma_t^2 / (alpha_t^2 s^2 + sigma_t^2)
  - 1`` removes the noise's share of the residual entirely);
- `SteinControlVariate`, in the spirit of SteinDreamer: for a cheap baseline ``phi(x_t)``,
  Stein's identity for Gaussian noise, ``E[eps phi(x_t)] = sigma_t E[grad phi(x_t)]``, gives the
  zero-mean term ``eps phi(x_t) - sigma_t grad_{x_t} phi(x_t)`` (``phi = 1`` gives ``eps``).
  Baselines: `gaussian_baseline` (the log-density of Gaussian data noised to ``t``) and
  `clean_gain` (an elementwise gain of the clean sample, ``c = x^p * eps``).

```python
sds = carv.SDS(teacher)                                   # declares eps
sds.control_variates += (SteinControlVariate(gaussian_baseline(0.0, 0.5)),)
estimator = carv.Estimator(K=8, proposal="weighted", stratify="per_outer", control_variates=True)
```

The fit lives in the guide (`TimestepGuide.control_variates`); it learns from steps that ran a
backward (`TimestepGuide.update`, called by the loss) and not inside `TimestepGuide.frozen`.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from einops import einsum, rearrange
from torch import Tensor

from .. import _checks
from ..objectives import RESIDUAL_HOOK, NoisedBatch, TeacherObjective
from ..timesteps import timestep_bins

__all__ = [
    "ControlVariateFit",
    "SteinControlVariate",
    "clean_gain",
    "gaussian_baseline",
]


# -- Stein control variates -----------------------------------------------------------------


class SteinControlVariate:
    """``eps phi(x_t) - sigma_t grad_{x_t} phi(x_t)``: zero-mean given ``x`` and ``t``.

    For ``x_t = alpha_t x + sigma_t eps`` with ``eps ~ N(0, I)``, Gaussian integration by parts
    gives ``E[eps phi(x_t)] = sigma_t E[grad phi(x_t)]`` for any differentiable ``phi`` of at most
    polynomial growth, so the term has mean zero whatever ``phi`` (SteinDreamer's control
    variate, here with a cheap baseline ``phi``). ``phi`` may also depend on the batch's fixed
    parts (``x``, ``t``, ``cond``).

    Args:
        baseline: ``phi(x_t, batch) -> (N,)``, one value per draw depending on that draw's
            ``x_t`` only; with ``diagonal=True``, ``(N, *event)`` with entry ``j`` depending on
            ``x_t[..., j]`` only (an elementwise field: then ``c_j = eps_j phi_j - sigma
            d phi_j / d x_t,j``).
        diagonal: the baseline is an elementwise field (see above).
        name: a name for reports.

    Raises:
        TypeError: if ``baseline`` is not callable.
    """

    def __init__(
        self,
        baseline: Callable[[Tensor, NoisedBatch], Tensor],
        *,
        diagonal: bool = False,
        name: str | None = None,
    ):
        if not callable(baseline):
            raise TypeError(f"baseline must be a callable (x_t, batch) -> Tensor, got {baseline!r}")
        _checks.instance("diagonal", diagonal, bool, "True or False")
        self.baseline = baseline
        self.diagonal = diagonal
        self.name = name or getattr(baseline, "__name__", "stein")

    def __call__(self, batch: NoisedBatch) -> Tensor:
        """The ``(N, *event)`` control variate of a batch."""
        with torch.enable_grad():
            x_t = batch.x_t.detach().requires_grad_(True)
            phi = self.baseline(x_t, batch)
            want = tuple(x_t.shape) if self.diagonal else tuple(x_t.shape[:1])
            if tuple(phi.shape) != want:
                raise ValueError(
                    f"the baseline {self.name!r} returned shape {tuple(phi.shape)}; expected "
                    f"{want} ({'elementwise' if self.diagonal else 'one value per draw'})"
                )
            if phi.requires_grad:
                (grad,) = torch.autograd.grad(phi.sum(), x_t)
            else:  # a baseline constant in x_t: its gradient is zero
                grad = torch.zeros_like(x_t)
        phi = phi.detach()
        if not self.diagonal:
            phi = phi.reshape((-1,) + (1,) * (x_t.dim() - 1))
        return batch.eps * phi - batch.sigma * grad

    def __repr__(self) -> str:
        return f"SteinControlVariate({self.name!r}, diagonal={self.diagonal})"


def gaussian_baseline(mean: float = 0.0, std: float = 1.0) -> Callable:
    """``phi(x_t) = -||x_t - alpha_t mean||^2 / (2 (alpha_t^2 std^2 + sigma_t^2) d)``: the
    log-density (per coordinate, up to a constant) of ``N(mean, std^2 I)`` data noised to ``t``,
    a cheap stand-in for the teacher. Its Stein term holds that Gaussian teacher's noise
    prediction ``sigma_t (x_t - alpha_t mean) / (alpha_t^2 std^2 + sigma_t^2)``, centred.

    Args:
        mean: the data's mean.
        std: the data's standard deviation (positive).
    """
    std = _checks.positive_float("std", std)
    mean = float(mean)

    def gaussian(x_t: Tensor, batch: NoisedBatch) -> Tensor:
        var = batch.alpha**2 * std**2 + batch.sigma**2
        sq = (x_t - batch.alpha * mean) ** 2 / var
        return -0.5 * sq.flatten(1).mean(1)

    return gaussian


def clean_gain(power: int = 1) -> Callable:
    """The elementwise baseline ``phi_j = x_j^power`` of the clean sample (constant in
    ``x_t``): with ``diagonal=True`` its term is ``x^power * eps``, a noise term whose gain
    follows the image (the teacher's noise prediction differs on the object and around it).

    Args:
        power: a positive integer.
    """
    power = _checks.positive_int("power", power)

    def gain(x_t: Tensor, batch: NoisedBatch) -> Tensor:
        return batch.x.to(x_t.dtype) ** power

    gain.__name__ = f"clean_gain{power}"
    return gain


# -- the online fit -------------------------------------------------------------------------


@dataclass
class _Sums:
    """Per timestep bin: ``G`` ``(B, M, M)``, ``v`` ``(B, M)``, ``n`` ``(B,)`` (float64)."""

    G: Tensor
    v: Tensor
    n: Tensor

    @classmethod
    def zeros(cls, n_bins: int, m: int, device) -> _Sums:
        z = dict(dtype=torch.float64, device=device)
        return cls(
            torch.zeros(n_bins, m, m, **z), torch.zeros(n_bins, m, **z), torch.zeros(n_bins, **z)
        )


class ControlVariateFit:
    """Fits and applies the declared control variates of the objectives a guide runs.

    Args:
        n_bins: timestep bins over each prior's support, one coefficient vector per bin.
        decay: per-step decay of the running sums (the parameters move, old draws fade).
        ridge: relative ridge on the per-bin Gram matrices (keeps the solve stable).

    Raises:
        ValueError: naming the first invalid argument.
    """

    def __init__(self, n_bins: int = 16, decay: float = 0.98, ridge: float = 1e-6):
        self.n_bins = _checks.positive_int("n_bins", n_bins)
        _checks.in_range("decay", decay, 0.0, 1.0, low_open=True)
        self.decay = float(decay)
        self.ridge = _checks.non_negative_float("ridge", ridge)
        self._sums: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._pending: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._bins: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @contextlib.contextmanager
    def applying(self, fixed_noise: Callable[[], bool] | None = None) -> Iterator[None]:
        """Within this context, declared control variates are fitted and applied (the guide's
        run enters it). Statistics of a run wait for `commit`.

        Args:
            fixed_noise: asked before each residual; ``True`` means the term's ``eps`` was given
                (conditioned), not drawn: its control variates have no zero mean there, so the
                residual passes unchanged (and teaches the fit nothing).
        """
        self._pending = weakref.WeakKeyDictionary()

        def hook(objective: TeacherObjective, batch: NoisedBatch, r: Tensor) -> Tensor:
            if fixed_noise is not None and fixed_noise():
                return r
            return self.adjust(objective, batch, r)

        token = RESIDUAL_HOOK.set(hook)
        try:
            yield
        finally:
            RESIDUAL_HOOK.reset(token)

    def coefficients(self, objective: TeacherObjective, device=None) -> Tensor:
        """``(n_bins, M)`` float64 coefficients now (zeros before any committed draw)."""
        sums = self._sums.get(objective)
        m = len(objective.control_variates)
        if sums is None or sums.v.shape[-1] != m:
            return torch.zeros(self.n_bins, m, dtype=torch.float64, device=device)
        diag = torch.diagonal(sums.G, dim1=-2, dim2=-1)
        lam = self.ridge * diag.mean(-1, keepdim=True) + 1e-300
        eye = torch.eye(m, dtype=torch.float64, device=sums.G.device)
        gamma = torch.linalg.solve(sums.G + lam[..., None] * eye, sums.v)
        return gamma if device is None else gamma.to(device)

    def adjust(self, objective: TeacherObjective, batch: NoisedBatch, r: Tensor) -> Tensor:
        """The residual with the fitted control variates subtracted; stages the draws'
        statistics for `commit` (the hook `TeacherObjective.evaluate` calls).

        Args:
            objective: the objective.
            batch: the flat batch of ``N`` draws.
            r: ``(N, *event)`` its residual.

        Returns:
            ``(N, *event)``: ``r - sum_m gamma_m(t) c_m``.
        """
        cvs = objective.control_variates
        c = torch.stack([cv(batch).to(r.dtype) for cv in cvs])  # (M, N, *event)
        if c.shape[1:] != r.shape:
            raise ValueError(
                f"a control variate of {objective!r} returned shape {tuple(c.shape[1:])}; "
                f"expected the residual's {tuple(r.shape)}"
            )
        bins = self._bin_index(objective, r.device)[batch.t]  # (N,)
        gamma = self.coefficients(objective, r.device)[bins].to(r.dtype)  # (N, M)
        c_flat = rearrange(c, "m n ... -> m n (...)")
        r_flat = rearrange(r, "n ... -> n (...)")
        fitted = einsum(gamma, c_flat, "n m, m n d -> n d")
        # statistics of this step's draws, for later steps only (so the estimate stays unbiased)
        ok = torch.isfinite(r_flat).all(1) & torch.isfinite(c_flat).all(0).all(-1)
        c64 = torch.where(ok[None, :, None], c_flat, 0.0).to(torch.float64)
        r64 = torch.where(ok[:, None], r_flat, 0.0).to(torch.float64)
        pend = self._pending.get(objective)
        if pend is None:
            pend = self._pending[objective] = _Sums.zeros(self.n_bins, len(cvs), r.device)
        pend.G.index_add_(0, bins, einsum(c64, c64, "j n d, k n d -> n j k"))
        pend.v.index_add_(0, bins, einsum(c64, r64, "m n d, n d -> n m"))
        pend.n.index_add_(0, bins, ok.to(torch.float64))
        return (r_flat - fitted).reshape(r.shape)

    def commit(self) -> None:
        """Fold the staged statistics into the running sums (after a step's backward)."""
        for objective, pend in list(self._pending.items()):
            sums = self._sums.get(objective)
            if sums is None or sums.v.shape != pend.v.shape:
                self._sums[objective] = pend
                continue
            for name in ("G", "v", "n"):
                old = getattr(sums, name)
                setattr(sums, name, self.decay * old + getattr(pend, name).to(old.device))
        self._pending = weakref.WeakKeyDictionary()

    def state_of(self, objective: TeacherObjective) -> dict[str, Tensor] | None:
        """The committed running sums of ``objective``'s fit, as CPU tensors (``None`` before
        any committed draw): what `restore` takes back, e.g. in a checkpoint."""
        sums = self._sums.get(objective)
        if sums is None:
            return None
        return {name: getattr(sums, name).detach().cpu().clone() for name in ("G", "v", "n")}

    def restore(self, objective: TeacherObjective, state: dict[str, Tensor] | None) -> None:
        """Continue ``objective``'s fit from `state_of`'s result (``None``: start afresh).

        Raises:
            ValueError: if the state's bins or control variates do not match this fit and
                ``objective``.
        """
        if state is None:
            self._sums.pop(objective, None)
            return
        m = len(objective.control_variates)
        want = {"G": (self.n_bins, m, m), "v": (self.n_bins, m), "n": (self.n_bins,)}
        got = {k: tuple(state[k].shape) for k in want if k in state}
        if got != want:
            raise ValueError(
                f"the saved control-variate fit has shapes {got}; this fit ({self.n_bins} bins) "
                f"and the objective ({m} control variates) need {want}"
            )
        self._sums[objective] = _Sums(
            *(state[k].to(torch.float64).clone() for k in ("G", "v", "n"))
        )

    def __getstate__(self) -> dict:
        """Its settings only: the running sums are keyed by objective, weakly, and a weak key
        cannot be pickled (a `TimestepGuide` pickles its fit by term name instead)."""
        state = dict(self.__dict__)
        for name in ("_sums", "_pending", "_bins"):
            state[name] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        for name in ("_sums", "_pending", "_bins"):
            setattr(self, name, weakref.WeakKeyDictionary())

    def _bin_index(self, objective: TeacherObjective, device) -> Tensor:
        hit = self._bins.get(objective)
        if hit is None or hit.device != torch.device(device):
            hit = self._bins[objective] = timestep_bins(objective.prior, self.n_bins).to(device)
        return hit

    def __repr__(self) -> str:
        return f"ControlVariateFit(n_bins={self.n_bins}, decay={self.decay})"
