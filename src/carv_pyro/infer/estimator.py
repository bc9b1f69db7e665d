"""`Estimator`: how a teacher expectation is estimated, as one frozen, validated object.

An estimator is the tuple the paper compares: ``K`` inner ``(t, eps)`` draws per upstream
sample, the timestep proposal, the stratification and the noise design, plus whether ``K`` is
chosen online from measured costs and variances (the compute-aware ``"auto"``). It is validated
once, at construction; everything that runs an estimator (the pipelines, ``carv-pyro bench``,
the command line) takes an `Estimator` or a preset name resolved through `PRESETS`, so a
preset means the same thing everywhere.

```python
estimator = carv.Estimator(K=8, proposal="weighted", stratify="per_outer")
svi = SVI(model, estimator.guide(model), pyro.optim.Adam({"lr": 1e-2}), loss=estimator.loss())
```
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .. import _checks
from ..timesteps import AbstractTimestepDistribution
from .guide import TimestepGuide
from .outer import OUTER
from .proposals import PROPOSALS
from .samplers import NOISE, STRATIFY

__all__ = ["AUTO_START", "MEASURING_OVERHEAD", "PRESETS", "Estimator", "resolve_estimator"]


@dataclass(frozen=True)
class Estimator:
    """How a teacher expectation is estimated.

    Attributes:
        K: inner draws per upstream sample; sets the size of every reserved inner plate
            ([`carv_pyro.draws`][carv_pyro.draws]). ``None`` keeps the model's own size. With
            ``adapt`` it is the starting size.
        proposal: ``"prior"``, ``"weighted"``, ``"adaptive"``, a timestep distribution, or a
            callable ``objective -> distribution``.
        stratify: ``None``, ``"per_outer"`` (``B = K`` strata per upstream sample),
            ``"global"`` (``B = R K`` strata across all draws) or ``"auto"`` (per upstream sample
            when ``K > 1``, globally at ``K = 1``).
        noise: ``"iid"``, ``"antithetic"`` (even ``K``) or ``"sobol"``.
        outer: the outer-plate design of the upstream latents drawn from their priors
            (camera poses, generator latents, labels): ``None`` (i.i.d.), ``"stratified"``,
            ``"antithetic"`` (even plates) or ``"sobol"``; see
            [`carv_pyro.infer.outer`][carv_pyro.infer.outer].
        control_variates: fit and apply the control variates the objective declares
            (SDS: its ``eps`` term with a tuned coefficient per timestep), keeping the estimate
            unbiased; see [`carv_pyro.infer.control_variates`][carv_pyro.infer.control_variates].
        adapt: choose ``K`` online: an [`Accountant`][carv_pyro.accounting.Accountant] measures
            ``V_b``, ``V_w`` and the cost of a step at the sizes it runs, and sets ``K`` to the
            candidate that minimises ``Var(R, K) * cost(R, K)`` (the compute-aware estimator).
        k_range: the sizes ``adapt`` may choose from, ``(min, max)``.
        name: the estimator's name in reports (a preset's name, or ``"custom"``).

    Raises:
        ValueError: naming the first invalid field.
    """

    K: int | None = None
    proposal: str | AbstractTimestepDistribution | Callable = "prior"
    stratify: str | None = None
    noise: str = "iid"
    outer: str | None = None
    control_variates: bool = False
    adapt: bool = False
    k_range: tuple[int, int] = (1, 32)
    name: str = "custom"

    def __post_init__(self) -> None:
        if self.K is not None:
            _checks.positive_int("K", self.K)
        p = self.proposal
        if isinstance(p, str):
            _checks.choice("proposal", p, PROPOSALS)
        elif not isinstance(p, AbstractTimestepDistribution) and not callable(p):
            raise ValueError(
                f"proposal must be one of {tuple(PROPOSALS)}, an AbstractTimestepDistribution or "
                f"a callable objective -> proposal, got {p!r}"
            )
        _checks.choice("stratify", self.stratify, STRATIFY)
        _checks.choice("noise", self.noise, NOISE)
        _checks.choice("outer", self.outer, OUTER)
        _checks.instance("control_variates", self.control_variates, bool, "True or False")
        if self.noise == "antithetic" and self.K is not None and self.K % 2:
            raise ValueError(f"noise='antithetic' needs an even K, got K={self.K}")
        _checks.instance("adapt", self.adapt, bool, "True or False")
        lo, hi = _checks.ordered_pair("k_range", self.k_range, 1, 2**20, strict=False)
        if lo != int(lo) or hi != int(hi):
            raise ValueError(f"k_range must be a pair of integers, got {self.k_range!r}")
        object.__setattr__(self, "k_range", (int(lo), int(hi)))
        if self.adapt:
            if self.K is None:
                raise ValueError("adapt=True needs a starting K")
            if not lo <= self.K <= hi:
                raise ValueError(f"K={self.K} lies outside k_range={self.k_range}")
            if self.noise == "antithetic":
                raise ValueError("adapt=True may choose an odd K; use noise='iid' or 'sobol'")
        _checks.instance("name", self.name, str, "a string")

    # -- building ----------------------------------------------------------------------------
    def guide(
        self,
        model: Callable | None = None,
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        upstream: Callable | None = None,
        sites: tuple[str, ...] | None = None,
        outer_seed: int | None = None,
    ) -> TimestepGuide:
        """The [`TimestepGuide`][carv_pyro.TimestepGuide] of this estimator for ``model``.

        Args:
            model: the Pyro model (optional: the loss runs whatever model it is given).
            seed: seeds the guide's draws (reproducible per device).
            generator: a ``torch.Generator`` instead of ``seed``.
            upstream: a user's guide for the upstream latent sites (see `TimestepGuide`).
            sites: the terms to propose for (default: all).
            outer_seed: seeds the outer design apart from the rest: the same on every rank
                shards one global design (see `TimestepGuide`).
        """
        return TimestepGuide(
            model,
            proposal=self.proposal,
            stratify=self.stratify,
            noise=self.noise,
            K=self.K,
            sites=sites,
            upstream=upstream,
            seed=seed,
            generator=generator,
            outer=self.outer,
            outer_seed=outer_seed,
            control_variates=self.control_variates,
        )

    def loss(self, **kwargs: Any):
        """A [`CARVLoss`][carv_pyro.CARVLoss] for this estimator.

        With ``adapt`` the loss gets an adapting [`Accountant`][carv_pyro.accounting.Accountant]
        whose measuring steps add at most `MEASURING_OVERHEAD` of the plain steps' time
        (``kwargs`` may pass ``accountant=`` to use another observer).

        Args:
            **kwargs: `CARVLoss` arguments (``num_particles``, ``nonfinite``, ...).
        """
        from ..accounting import Accountant
        from .loss import CARVLoss

        if self.adapt and "accountant" not in kwargs:
            kwargs["accountant"] = Accountant(
                adapt=True, k_range=self.k_range, max_overhead=MEASURING_OVERHEAD
            )
        return CARVLoss(**kwargs)

    def replace(self, **changes: Any) -> Estimator:
        """A copy with some fields changed (validated again); the name becomes ``"custom"``
        unless given, except for a change of ``K`` alone, which keeps it."""
        if "name" not in changes and set(changes) - {"K"}:
            changes["name"] = "custom"
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> Estimator:
        """A named estimator from `PRESETS`, with some fields overridden.

        Raises:
            ValueError: naming the unknown preset and the known ones, or an override the
                preset forbids (``"baseline"`` is ``K = 1``).
        """
        est = PRESETS.get(name) if isinstance(name, str) else None
        if est is None:
            raise ValueError(f"unknown estimator {name!r}; expected one of {tuple(PRESETS)}")
        if name == "baseline" and overrides.get("K", 1) != 1:
            raise ValueError(
                f"the 'baseline' estimator draws one t per upstream sample (K = 1), got "
                f"K={overrides['K']}; use 'reuse' for K > 1 prior draws"
            )
        return est.replace(**overrides) if overrides else est

    @classmethod
    def from_spec(cls, spec: str) -> Estimator:
        """An estimator from a preset name with fields changed, as the command line writes it.

        ``"PRESET"`` or ``"PRESET:FIELD=VALUE:FIELD=VALUE..."``, e.g. ``"auto:K=4"`` (auto
        starting at ``K = 4``) or ``"carv:outer=lattice"``. Values are parsed by the field:
        integers for ``K``, ``true``/``false`` for ``adapt`` and ``control_variates``,
        ``LO-HI`` for ``k_range``, ``none`` for an absent ``K``, ``stratify`` or ``outer``.
        A spec with fields is named by the whole spec, so that races and reports tell the
        variants apart.

        Raises:
            ValueError: naming the spec and the unknown preset, field or value.
        """
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"an estimator spec is PRESET[:FIELD=VALUE...], got {spec!r}")
        preset, *parts = [p.strip() for p in spec.strip().split(":")]
        if not parts:
            return cls.preset(preset)
        changes: dict[str, Any] = {}
        for part in parts:
            field, eq, value = part.partition("=")
            field, value = field.strip(), value.strip()
            if not eq or field not in _SPEC_FIELDS:
                raise ValueError(
                    f"estimator spec {spec!r}: {part!r} is not FIELD=VALUE with FIELD one of "
                    f"{tuple(_SPEC_FIELDS)}"
                )
            if field in changes:
                raise ValueError(f"estimator spec {spec!r} sets {field!r} twice")
            try:
                changes[field] = _SPEC_FIELDS[field](value)
            except ValueError as err:
                raise ValueError(f"estimator spec {spec!r}: {field}: {err}") from None
        try:
            return cls.preset(preset, **changes).replace(name=spec.strip())
        except ValueError as err:
            raise ValueError(f"estimator spec {spec!r}: {err}") from None

    def settings(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields (a non-string proposal is shown by its repr)."""
        out = dataclasses.asdict(self)
        if not isinstance(self.proposal, str):
            out["proposal"] = repr(self.proposal)
        out["k_range"] = list(self.k_range)
        return out

    def __repr__(self) -> str:
        fields = f"K={self.K}, proposal={self.proposal!r}, stratify={self.stratify!r}"
        fields += f", noise={self.noise!r}"
        if self.outer is not None:
            fields += f", outer={self.outer!r}"
        if self.control_variates:
            fields += ", control_variates=True"
        if self.adapt:
            fields += f", adapt=True, k_range={self.k_range}"
        return f"Estimator({self.name!r}: {fields})"


def _spec_optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    return lambda v: None if v.lower() == "none" else parse(v)


def _spec_int(v: str) -> int:
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"expected an integer, got {v!r}") from None


def _spec_bool(v: str) -> bool:
    if v.lower() not in ("true", "false"):
        raise ValueError(f"expected true or false, got {v!r}")
    return v.lower() == "true"


def _spec_range(v: str) -> tuple[int, int]:
    lo, dash, hi = v.partition("-")
    if not dash:
        raise ValueError(f"expected LO-HI, e.g. 1-32, got {v!r}")
    return _spec_int(lo), _spec_int(hi)


#: How `Estimator.from_spec` parses each field's value.
_SPEC_FIELDS: dict[str, Callable[[str], Any]] = {
    "K": _spec_optional(_spec_int),
    "proposal": str,
    "stratify": _spec_optional(str),
    "noise": str,
    "outer": _spec_optional(str),
    "control_variates": _spec_bool,
    "adapt": _spec_bool,
    "k_range": _spec_range,
}


#: The largest fraction of the plain steps' time that an adapting estimator's measuring steps
#: may add (`Accountant`'s ``max_overhead``). On the 2-core CPU's text-to-3D step a measuring
#: step costs about 1.9 plain steps (the upstream's backward runs three times), so it measures
#: about every 11 steps at first; where it costs less, as often as ``every`` allows.
MEASURING_OVERHEAD = 0.1

#: Where the ``auto`` preset's ``K`` starts, before anything is measured: the middle of the
#: sizes it settles at (K = 2 on the 2-core CPU, 2-8 on an H200). Started at K = 1 it spent its
#: first 19 steps there and reached the baseline's final IoU on the H200 at 0.72x the
#: baseline's time, against 0.65x started at 4 (9 seeds, `benchmarks/time_to_quality.md`).
AUTO_START = 4

#: The named estimators. ``K`` is each preset's default; pipelines may change it with
#: ``Estimator.preset(name, K=...)`` (the name is kept), except for the baseline.
PRESETS: dict[str, Estimator] = {
    "baseline": Estimator(K=1, name="baseline"),
    "reuse": Estimator(K=8, name="reuse"),
    "stratified": Estimator(K=8, stratify="per_outer", name="stratified"),
    "carv": Estimator(K=8, proposal="weighted", stratify="per_outer", name="carv"),
    "adaptive": Estimator(K=8, proposal="adaptive", stratify="per_outer", name="adaptive"),
    "auto": Estimator(
        K=AUTO_START,
        proposal="weighted",
        stratify="auto",
        outer="lattice",
        adapt=True,
        k_range=(1, 32),
        name="auto",
    ),
}


def resolve_estimator(estimator: str | Estimator, **overrides: Any) -> Estimator:
    """An `Estimator` from a preset name or an estimator, with overrides.

    Raises:
        TypeError: if ``estimator`` is neither.
    """
    if isinstance(estimator, Estimator):
        return estimator.replace(**overrides) if overrides else estimator
    if isinstance(estimator, str):
        return Estimator.preset(estimator, **overrides)
    raise TypeError(
        f"estimator must be a carv_pyro.Estimator or one of {tuple(PRESETS)}, got {estimator!r}"
    )
