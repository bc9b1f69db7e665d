"""`AttributionBench`: the data-attribution pipeline for ``carv-pyro bench``."""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import torch
from torch import Tensor

from ... import _checks
from ...infer.estimator import Estimator
from ...infer.samplers import RandomSource
from ...timesteps import AbstractTimestepDistribution
from ..base.bench import FixedCheckpointBench, config_estimator
from .data import pick_examples
from .featurizer import AttributionFeaturizer, FeatureResult
from .pilot import pilot_proposal
from .scores import attribution_scores, rank_correlation
from .teacher import load_attribution_teacher

__all__ = ["BENCH_METHODS", "AttributionBench"]

#: The configurations the bench compares: name -> (proposal, stratify, noise), turned into an
#: [`Estimator`][carv_pyro.Estimator] by ``config_estimator``. ``"pilot"`` stands for the
#: variance-optimal proposal of `pilot_proposal`, estimated once on separate examples.
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


class AttributionBench(FixedCheckpointBench):
    """The data-attribution pipeline for ``carv-pyro bench``: per-example gradient features.

    The estimated quantity is the projected gradient feature of a fixed set of examples (a few
    training digits and a few held-out queries), flattened: ``P = n_examples * k``, at the
    teacher's weights (the fixed checkpoint; `checkpoint_unchanged` says it never moved). A
    configuration's ``K`` is the number of teacher evaluations per example; ``R`` is the number
    of examples (each its own outer plate, see `AttributionFeaturizer`), so `estimate` and
    `reference` are the featurizer's rather than one gradient of a model. Draws are shared
    across examples within an estimate (D-TRAK) and independent across estimates.

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

    Raises:
        TypeError: if ``quick`` or ``smoke`` is not a bool.
        ValueError: if ``seed`` is not a non-negative integer.
    """

    name = "attribution"

    def __init__(self, quick: bool, seed: int = 0, device: str = "cpu", smoke: bool = False):
        from ...data import load_digits_images

        _checks.instance("quick", quick, bool, "True or False")
        _checks.instance("smoke", smoke, bool, "True or False")
        super().__init__(seed=_checks.non_negative_int("seed", seed), device=device)
        self.quick = quick or smoke
        self.smoke = smoke
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
        self._source = RandomSource(seed=self.seed)
        self._references: dict[int, Tensor] = {}
        self._pilot: AbstractTimestepDistribution | None = None
        self.pilot_seconds = math.nan
        self.last_result: FeatureResult | None = None
        self.rows: list = []  # set by carv_pyro.bench.main after the protocol has run

    # -- FixedCheckpointBench ----------------------------------------------------------------
    def params(self) -> list[Tensor]:
        """The teacher weights the features are gradients w.r.t. (the checkpoint)."""
        return self.featurizer.params

    def configs(self) -> list[dict]:
        """The bench's methods (all of `BENCH_METHODS` when full) at ``K = 4`` and ``64``."""
        return [
            dict(method=m, R=self.R, K=K, proposal=p, stratify=s, noise=noise)
            for K in (4, 64)
            for m, (p, s, noise) in BENCH_METHODS.items()
            if m in self.methods
        ]

    def reference_config(self) -> dict[str, Any]:
        """Pilot IS, stratified, ``reference_K`` draws per example, independent across them."""
        return dict(
            method="reference",
            R=self.R,
            K=self.reference_K,
            proposal="pilot",
            stratify="per_outer",
            noise="iid",
            shared_draws=False,
        )

    def estimator(self, config: dict[str, Any]) -> Estimator:
        """The `Estimator` of a configuration (``"pilot"`` replaced by `pilot`'s proposal)."""
        if config.get("proposal") == "pilot":
            config = dict(config, proposal=self.pilot())
        return config_estimator(config)

    def pilot(self) -> AbstractTimestepDistribution:
        """The pilot proposal ``q*`` (computed on first use, on the two pilot digits)."""
        if self._pilot is None:
            t0 = time.perf_counter()
            self._pilot = pilot_proposal(
                self.featurizer,
                self.pilot_images,
                self.pilot_labels,
                n_draws=self.pilot_draws,
                seed=self.seed + 11,
            )
            self.pilot_seconds = time.perf_counter() - t0
        return self._pilot

    def _features(self, config: dict) -> FeatureResult:
        if int(config.get("R", self.R)) != self.R:
            raise ValueError(
                f"config R must be {self.R} (the number of examples), got {config['R']!r}"
            )
        return self.featurizer.features(
            self.images,
            self.labels,
            estimator=self.estimator(config),
            shared_draws=bool(config.get("shared_draws", True)),
            seed=self._source.integer_seed(),
        )

    def estimate(self, config: dict) -> Tensor:
        """One estimate of all examples' features, flattened: ``(R k,)`` float64 on the CPU."""
        if self._snapshot is None:
            self._snapshot = [p.detach().clone() for p in self.params()]
        self.last_result = self._features(config)
        return self.last_result.features.flatten().to("cpu", torch.float64)

    def reference(self, n: int) -> Tensor:
        """The mean of ``n`` estimates of `reference_config`: ``(R k,)``, cached per ``n``."""
        n = _checks.positive_int("n", n)
        if n not in self._references:
            self._references[n] = (
                self.featurizer.reference(
                    self.images,
                    self.labels,
                    n=n,
                    estimator=self.estimator(self.reference_config()),
                    seed=self.seed + 7,
                )
                .flatten()
                .cpu()
            )
        return self._references[n]

    # -- attribution ---------------------------------------------------------------------
    def scores(self, flat_features: Tensor) -> Tensor:
        """``(n_query, n_train)`` TRAK scores from a flattened ``(R k,)`` estimate."""
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

        Args:
            repeats: estimates per method and ``K`` (default 2 smoke, 3 quick, 8 full).

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
        for config in self.configs():
            method, K = config["method"], config["K"]
            if method not in compared:
                continue
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
