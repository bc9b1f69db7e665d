"""The base of the pipelines' bench adapters: gradient estimates at one fixed checkpoint.

``carv-pyro bench`` measures every estimator of a pipeline side by side at one fixed parameter
value ``theta`` (see [`carv_pyro.bench`][carv_pyro.bench]). `FixedCheckpointBench` owns what
every adapter shares: a private Pyro param store, one cached ``(model, guide, loss)`` per
configuration (built from an [`Estimator`][carv_pyro.Estimator]), gradients through
[`carv_pyro.measure.gradient_estimate`][carv_pyro.measure.gradient_estimate], the reference, and
a check that the checkpoint never moved, and the accountant's learned cost model at the
checkpoint (`FixedCheckpointBench.learn_cost_model`). A subclass implements
`FixedCheckpointBench.params`, `FixedCheckpointBench.model_for` and
`FixedCheckpointBench.configs`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyro
import torch
from torch import Tensor

from ...accounting import Accountant
from ...infer.estimator import Estimator
from ...infer.loss import CARVLoss
from ...measure import gradient_estimate

__all__ = ["FixedCheckpointBench", "config_estimator"]


#: Estimates a configuration with control variates runs before it is measured: its fit learns
#: the coefficients at the checkpoint (as a training run's does over its first steps).
CV_WARMUP = 10


def config_estimator(config: dict[str, Any]) -> Estimator:
    """The `Estimator` of a bench configuration ``{method, R, K, proposal, stratify, noise,
    outer, cv}`` (``cv``: the name of the control variates the pipeline declares, or ``None``)."""
    return Estimator(
        K=int(config["K"]),
        proposal=config.get("proposal", "prior"),
        stratify=config.get("stratify"),
        noise=config.get("noise", "iid"),
        outer=config.get("outer"),
        control_variates=bool(config.get("cv")),
        name=str(config.get("method", "custom")),
    )


class FixedCheckpointBench:
    """Gradient estimates of many estimators at one fixed checkpoint.

    Args:
        seed: seeds the configurations' draws (configuration ``i`` gets ``seed + 100 + i``).
        device: where the estimates run.

    Attributes:
        name: the pipeline's name in reports.
    """

    name = "pipeline"

    def __init__(self, seed: int = 0, device: str | torch.device = "cpu"):
        self.seed = int(seed)
        self.device = torch.device(device)
        self._store: dict[str, Any] = {"params": {}, "constraints": {}}
        self._cache: dict[tuple, tuple[Callable, Any, CARVLoss, tuple, dict]] = {}
        self._snapshot: list[Tensor] | None = None

    # -- what a subclass provides ---------------------------------------------------------------
    def params(self) -> list[Tensor]:
        """The tensors whose gradient is measured (the checkpoint ``theta``)."""
        raise NotImplementedError

    def model_for(self, config: dict[str, Any], seed: int) -> tuple[Callable, tuple, dict]:
        """``(model, args, kwargs)`` for a configuration; ``seed`` seeds its upstream draws."""
        raise NotImplementedError

    def configs(self) -> list[dict[str, Any]]:
        """The configurations to measure: dicts with ``method``, ``R``, ``K`` and options."""
        raise NotImplementedError

    def reference_config(self) -> dict[str, Any]:
        """The configuration averaged into the reference (default: the largest ``R K``)."""
        return max(self.configs(), key=lambda c: c["R"] * c["K"])

    def extras(self) -> dict[str, Any]:
        """End-to-end comparisons beyond the protocol (default: none)."""
        return {}

    # -- the shared machinery ---------------------------------------------------------------
    def scope(self):
        """The bench's private param store (a context manager)."""
        return pyro.get_param_store().scope(self._store)

    def setup(self, config: dict[str, Any]):
        """The cached ``(model, guide, loss, args, kwargs)`` of a configuration."""
        key = tuple(sorted((k, repr(v)) for k, v in config.items()))
        if key not in self._cache:
            seed = self.seed + 100 + len(self._cache)
            model, args, kwargs = self.model_for(config, seed)
            guide = config_estimator(config).guide(model, seed=seed + 7919)
            self._cache[key] = (model, guide, CARVLoss(), args, kwargs)
            if config.get("cv"):
                with self.scope():
                    for _ in range(CV_WARMUP):
                        gradient_estimate(
                            self._cache[key][2], model, guide, *args, params=self.params(), **kwargs
                        )
        return self._cache[key]

    def estimate(self, config: dict[str, Any]) -> Tensor:
        """One gradient estimate of a configuration: ``(P,)`` float64 on the CPU."""
        if self._snapshot is None:
            self._snapshot = [p.detach().clone() for p in self.params()]
        model, guide, loss, args, kwargs = self.setup(config)
        with self.scope():
            return gradient_estimate(loss, model, guide, *args, params=self.params(), **kwargs)

    def reference(self, n: int) -> Tensor:
        """The mean of ``n`` estimates of `reference_config`."""
        config = dict(self.reference_config(), method="reference")
        return torch.stack([self.estimate(config) for _ in range(n)]).mean(0)

    @property
    def has_cost_model(self) -> bool:
        """Whether `learn_cost_model` applies: the estimates are `CARVLoss` steps of
        `model_for` (an adapter that estimates otherwise, as attribution's per-example features
        do, has no step for the accountant to time)."""
        return type(self).model_for is not FixedCheckpointBench.model_for

    def learn_cost_model(self, R: int, steps: int, every: int = 2, warmup: int = 2) -> Accountant:
        """An accountant that has learned the cost of this pipeline's steps as ``"auto"`` does
        when it starts: plain reuse at ``K = 1``, every ``every``-th step a measuring step that
        probes ``K = 2``.

        Its [`cost_of(K)`][carv_pyro.accounting.Accountant.cost_of] is then the model the
        adapting estimator chooses ``K`` by: the measured step cost at ``K = 1`` without the
        teacher, plus the teacher's cost line through the sizes it timed (``K = 1`` and the
        probes' ``K = 2``). The steps run at the checkpoint and leave it unchanged (gradients
        are read and put back); their draws come from their own seeds, so the rows' draws are
        the same with or without this.

        Args:
            R: upstream samples per step.
            steps: steps to run (about half are plain, half measuring).
            every: the measuring cadence.
            warmup: untimed steps first (the first calls allocate and cache; a training run's
                accountant sees them too, but its window forgets them).

        Returns:
            The `Accountant`, with ``step_costs``, ``teacher_costs`` and ``cost_of`` learned.
        """
        config = dict(method="cost model", R=R, K=1)
        model, args, kwargs = self.model_for(config, self.seed + 50)
        guide = config_estimator(config).guide(model, seed=self.seed + 51)
        # k_range=(1, 1): an adapting accountant (so measuring steps probe K = 2) that stays at
        # K = 1, as auto:K=1 does until its measurements say otherwise; backoff=1: a fixed cadence
        accountant = Accountant(
            every=every,
            adapt=True,
            k_range=(1, 1),
            min_measurements=1,
            backoff=1.0,
            window=max(steps, 2),
        )
        loss = CARVLoss(accountant=accountant)
        with self.scope():
            for _ in range(warmup):
                gradient_estimate(CARVLoss(), model, guide, *args, params=self.params(), **kwargs)
            for _ in range(steps):
                gradient_estimate(loss, model, guide, *args, params=self.params(), **kwargs)
        return accountant

    def checkpoint_unchanged(self) -> bool:
        """Whether the checkpoint is exactly as it was at the first estimate."""
        if self._snapshot is None:
            return True
        return all(torch.equal(a, p.detach()) for a, p in zip(self._snapshot, self.params()))
