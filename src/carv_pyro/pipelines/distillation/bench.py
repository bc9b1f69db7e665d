"""`DistillationBench`: the ``carv-pyro bench`` adapter, DMD gradients at one fixed checkpoint."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ... import _checks
from ...objectives import eps_control_variate
from ..base.bench import FixedCheckpointBench
from .config import DEFAULT_K, DistillationConfig
from .distiller import Distiller
from .metrics import fid_digits
from .model import make_model
from .train import train_distillation

__all__ = ["BENCH_ROWS", "DESIGN_ROWS", "DistillationBench"]

#: The bench's rows: ``(method, K, proposal, stratify, noise)``, measured at the bench's ``R``.
BENCH_ROWS: tuple[tuple[str, int, str, str | None, str], ...] = (
    ("baseline", 1, "prior", None, "iid"),
    ("baseline+strat", 1, "prior", "global", "iid"),
    ("reuse", DEFAULT_K, "prior", None, "iid"),
    ("reuse+strat", DEFAULT_K, "prior", "per_outer", "iid"),
    ("reuse+IS+strat", DEFAULT_K, "weighted", "per_outer", "iid"),
    ("reuse+strat+QMC", DEFAULT_K, "prior", "per_outer", "sobol"),
)

#: Rows beyond the inner plate: ``(method, K, proposal, stratify, noise, outer, cv)``. The
#: outer designs draw the latents ``z`` and labels jointly (`carv_pyro.infer.outer`); each plain
#: pair (``outer strat``, ``outer lattice``) at ``K = 1`` and ``K = DEFAULT_K`` splits ``V_b``
#: (what the design removes, what is left); ``cv="eps"`` fits a coefficient per timestep on the
#: noise ``eps``, zero-mean given the sample (declared on the DMD objective by the bench).
DESIGN_ROWS: tuple[tuple[str, int, str, str | None, str, str | None, str | None], ...] = (
    ("outer strat", 1, "prior", None, "iid", "stratified", None),
    ("outer strat", DEFAULT_K, "prior", None, "iid", "stratified", None),
    ("outer lattice", 1, "prior", None, "iid", "lattice", None),
    ("outer lattice", DEFAULT_K, "prior", None, "iid", "lattice", None),
    ("reuse+strat+outer strat", DEFAULT_K, "prior", "per_outer", "iid", "stratified", None),
    ("reuse+strat+outer lattice", DEFAULT_K, "prior", "per_outer", "iid", "lattice", None),
    ("reuse+strat+outer anti", DEFAULT_K, "prior", "per_outer", "iid", "antithetic", None),
    ("reuse+strat+outer sobol", DEFAULT_K, "prior", "per_outer", "iid", "sobol", None),
    ("reuse+strat+CV(eps)", DEFAULT_K, "prior", "per_outer", "iid", None, "eps"),
    ("reuse+strat+outer+CV", DEFAULT_K, "prior", "per_outer", "iid", "antithetic", "eps"),
)


class DistillationBench(FixedCheckpointBench):
    """Benchmark adapter: DMD gradient estimates at one fixed, realistic checkpoint.

    At construction it builds the real teacher, a generator and a fake score and trains them
    briefly by DMD (fake warm-up, then generator steps with the config's estimator, by default
    ``"stratified"`` at ``K = 16``) so that ``theta`` is a mid-training checkpoint whose fake
    score tracks the generator. Every `estimate` is then ONE gradient of the generator's
    parameters at that checkpoint; nothing is stepped.

    The between-sample share of the variance (different latents ``z`` give different expected
    gradients) depends strongly on the checkpoint, so the ``(R, 1) -> (R, 16)`` ratio does too:
    on one H200 at R = 8 the stratified cut was 10.9x right after the fake warm-up, 4.9x after
    100 steps and 5.9x after 400, against ceilings ``(V_b + V_w) / V_b`` of 56x, 4.8x and 6.7x
    (``benchmarks/distillation_h200.md``). Pass ``pretrain_steps`` to choose the checkpoint.
    Importance sampling with ``q ∝ p w alpha`` (the ``reuse+IS+strat`` row) measured 3.8-15x
    MORE variance than stratification alone here, which is why the pipeline's default estimator
    does not importance-sample.

    Args:
        quick: small sizes (``R = 4``, 10 pretraining steps, about 10 CPU-seconds with the
            embedded teacher) instead of the paper's ``R = 8`` and 100 pretraining steps.
        seed: seeds everything.
        device: ``"cpu"`` or ``"cuda"``.
        smoke: tiny sizes for a quick check of the plumbing (``R = 2``, one pretraining step,
            a short equal-budget comparison); the numbers mean nothing.
        teacher: the real teacher (default: the embedded one; a random stand-in with a warning
            while its weights are missing).
        pretrain_steps: generator steps of pretraining (default: 1 smoke, 10 quick, 100 full).
        config: overrides of `DistillationConfig` fields (e.g. ``{"fake_warmup": 5}``).

    Attributes:
        config: the run's `DistillationConfig`.
        distiller: the `Distiller` at the checkpoint.
        R: generator samples per estimate.
        pretrain_steps: the DMD steps before the checkpoint.

    Raises:
        ValueError: naming the first invalid argument.
    """

    name = "distillation"

    def __init__(
        self,
        quick: bool,
        seed: int,
        device: str = "cpu",
        *,
        smoke: bool = False,
        teacher: Any = None,
        pretrain_steps: int | None = None,
        config: dict[str, Any] | None = None,
    ):
        _checks.non_negative_int("seed", seed)
        super().__init__(seed=seed, device=device)
        self.quick = bool(quick)
        self.smoke = bool(smoke)
        settings: dict[str, Any] = {"R": 8, "seed": self.seed, "fd_samples": 1000}
        if self.quick:
            settings.update(R=4, fake_batch=16, fake_warmup=20, fd_samples=500)
        if self.smoke:
            settings.update(R=2, fake_batch=4, fake_warmup=1, fake_updates=1, fd_samples=20)
        if config is not None:
            _checks.instance("config", config, dict, "a dict of DistillationConfig fields")
            settings.update(config)
        self.config = DistillationConfig(**settings)
        if pretrain_steps is None:
            pretrain_steps = 1 if self.smoke else 10 if self.quick else 100
        self.pretrain_steps = _checks.non_negative_int("pretrain_steps", pretrain_steps)
        if pretrain_steps:
            history = train_distillation(
                self.config,
                steps=pretrain_steps,
                teacher=teacher,
                device=device,
                evaluate=False,
                progress=False,
            )
            self.distiller = history.distiller
        else:
            self.distiller = Distiller(self.config, teacher=teacher, device=device)
            self.distiller.fake_step(self.config.fake_warmup)
        self.R = self.config.R
        # the DMD residual's zero-mean term for the CV rows (inert unless an estimator applies it)
        self.distiller.objective.control_variates = (eps_control_variate,)
        self._snapshot = [p.detach().clone() for p in self.params()]

    # -- the FixedCheckpointBench hooks ----------------------------------------------------------
    def params(self) -> list[Tensor]:
        """The generator's trainable parameters (the checkpoint ``theta``)."""
        return self.distiller.parameters()

    def model_for(self, config: dict[str, Any], seed: int):
        """``(model, (), {})``: the DMD model at the checkpoint with ``config``'s ``R`` and ``K``,
        its latents drawn from a generator seeded with ``seed``."""
        model = make_model(
            self.distiller.generator,
            self.distiller.objective,
            config["R"],
            config["K"],
            labels=self.config.labels,
            rng=torch.Generator().manual_seed(seed),
        )
        return model, (), {}

    def configs(self) -> list[dict[str, Any]]:
        """The rows to measure: ``dict(method, R, K, proposal, stratify, noise)`` (`BENCH_ROWS`)."""
        rows = [
            {"method": m, "R": self.R, "K": K, "proposal": p, "stratify": s, "noise": n}
            for m, K, p, s, n in BENCH_ROWS
        ]
        rows += [
            {"method": m, "R": self.R, "K": K, "proposal": p, "stratify": s, "noise": n}
            | {"outer": o, "cv": cv}
            for m, K, p, s, n, o, cv in DESIGN_ROWS
        ]
        return rows

    def reference_config(self) -> dict[str, Any]:
        """The reference: ``R = 8 R_bench``, ``K = 16``, stratified per sample, prior proposal."""
        return {
            "method": "reference",
            "R": 8 * self.R,
            "K": DEFAULT_K,
            "proposal": "prior",
            "stratify": "per_outer",
            "noise": "iid",
        }

    # -- the protocol ------------------------------------------------------------------------
    def estimate(self, config: dict[str, Any]) -> Tensor:
        """ONE gradient estimate at the fixed checkpoint for a row of `configs`.

        Args:
            config: ``dict(R=int, K=int, proposal=str, stratify=None|str, noise=str)``
                (``method`` names the row; other keys are ignored).

        Returns:
            ``(P,)`` float64 CPU tensor: the flattened generator gradient.

        Raises:
            ValueError: on a missing or non-positive ``R`` / ``K`` or unknown options.
        """
        if not isinstance(config, dict) or "R" not in config or "K" not in config:
            raise ValueError(f"config must be a dict holding 'R' and 'K', got {config!r}")
        _checks.positive_int("R", config["R"])
        _checks.positive_int("K", config["K"])
        return super().estimate(config)

    def reference(self, n: int) -> Tensor:
        """A high-sample reference gradient: the mean of ``n`` estimates of `reference_config`.

        Returns:
            ``(P,)`` float64 CPU tensor.

        Raises:
            ValueError: if ``n`` is not a positive integer.
        """
        _checks.positive_int("n", n)
        return super().reference(n)

    def extras(self, budget_seconds: float | None = None) -> dict[str, Any]:
        """Fréchet distance after an equal compute budget, baseline against the config's
        estimator, both from the checkpoint.

        Args:
            budget_seconds: compute per run (default: 1 smoke, 10 quick, 120 full), process CPU
                seconds on a CPU.

        Returns:
            ``{"fd_checkpoint", "budget_s", "clock", "fd_samples", "estimators"}`` and, per
            estimator name (``"baseline"`` and e.g. ``"stratified"``), ``"fd_{name}"`` and
            ``"steps_{name}"``.
        """
        if budget_seconds is None:
            budget_seconds = 1.0 if self.smoke else 10.0 if self.quick else 120.0
        budget = _checks.positive_float("budget_seconds", budget_seconds)
        out: dict[str, Any] = {"budget_s": budget, "fd_samples": self.config.fd_samples}
        out["fd_checkpoint"] = fid_digits(
            self.distiller.generator, self.config.fd_samples, seed=self.seed
        )
        names = []
        for estimator in ("baseline", self.config.estimator):
            history = train_distillation(
                self.config,
                estimator,
                budget_seconds=budget,
                init=self.distiller,
                progress=False,
            )
            names.append(history.estimator)
            out[f"fd_{history.estimator}"] = history.final_fd
            out[f"steps_{history.estimator}"] = history.steps
            out["clock"] = history.clock
        out["estimators"] = names
        return out
