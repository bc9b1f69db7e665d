"""`AttributionFeaturizer`: per-example projected gradient features, estimated with an `Estimator`.

The feature of example ``i`` is the expected gradient of the teacher's denoising loss w.r.t. some
of its weights, a Pyro model with the examples as the outer plate and the ``K`` cheap
``(t, eps)`` draws as the reserved inner plate:

```python
def model(u, y, K):                                   # u: (R, *event), y: (R,)
    with pyro.plate("examples", R, dim=-2):           # outer: the examples
        with carv_pyro.draws(K, dim=-1):              # inner: K (t, eps) draws per example
            carv_pyro.teacher_term("denoise", objective, u.unsqueeze(1), cond=y[:, None])
```

[`CARVLoss`][carv_pyro.CARVLoss] averages over both plates, so one backward pass would mix the
examples; the featurizer therefore runs the model one example at a time (the outer plate has
size 1, the ``K`` draws go to the teacher in one batch) and reads each gradient with
[`gradient_estimate`][carv_pyro.measure.gradient_estimate].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from torch import Tensor, nn

from ... import _checks
from ...infer.estimator import Estimator, resolve_estimator
from ...infer.loss import CARVLoss
from ...infer.primitives import draws, teacher_term
from ...infer.samplers import RandomSource
from ...measure import gradient_estimate
from ...objectives import DenoisingLoss, TeacherObjective
from ...teachers.trainable import trainable
from ...timing import Stopwatch
from .parameters import select_parameters
from .projection import PROJECTIONS, RandomProjection
from .recorder import DrawRecorder

__all__ = [
    "TERM",
    "AttributionFeaturizer",
    "FeatureResult",
    "check_examples",
    "example_seeds",
    "fixed_k_estimator",
]

#: The teacher term's name in the featurizer's model (sites ``denoise.t``, ``denoise.eps``).
TERM = "denoise"


def example_seeds(seed: int, n: int, shared_draws: bool) -> list[int]:
    """The draws' seed of each of ``n`` examples in one estimate seeded by ``seed``.

    Shared draws: ``seed`` for every example (D-TRAK's one fixed set of draws); else ``n``
    independent seeds drawn from ``RandomSource(seed)``. `AttributionFeaturizer.features` and
    the resumable [`attribute`][carv_pyro.pipelines.attribution.attribute] run both use it, so
    they draw alike.
    """
    if shared_draws:
        return [seed] * n
    source = RandomSource(seed=seed)
    return [source.integer_seed() for _ in range(n)]


@dataclass
class FeatureResult:
    """Per-example features and what they cost.

    Attributes:
        features: ``(n, k)`` projected features (``(n, d)`` raw gradients when not projected),
            in the teacher's dtype, on its device.
        K: ``(t, eps)`` draws per example.
        seconds_upstream: wall-clock seconds of the upstream step (all examples).
        seconds_teacher: wall-clock seconds of the estimator (the model's trace, the teacher's
            forward and backward passes).
        seconds_projection: wall-clock seconds of the projection.
        timesteps: ``(n, K)`` the draws' timesteps, when asked for (``record_draws``); the
            recorded draws are CPU tensors whatever the device.
        noise: ``(n, K, *event)`` the draws' noise, when asked for.
        weights: ``(n, K)`` float64, the draws' importance weights ``p(t) / q(t)``, when asked
            for.
        estimator: the [`Estimator`][carv_pyro.Estimator] the features were estimated with.
    """

    features: Tensor
    K: int
    seconds_upstream: float
    seconds_teacher: float
    seconds_projection: float
    timesteps: Tensor | None = None
    noise: Tensor | None = None
    weights: Tensor | None = None
    estimator: Estimator | None = None

    @property
    def seconds(self) -> float:
        """Total wall-clock seconds."""
        return self.seconds_upstream + self.seconds_teacher + self.seconds_projection


def fixed_k_estimator(estimator: Estimator | str, **overrides: Any) -> Estimator:
    """The `Estimator` features are estimated with: ``K`` set and not adapting.

    Raises:
        ValueError: naming the estimator (or the override) that does not fit.
    """
    est = resolve_estimator(estimator, **overrides)
    if est.K is None:
        raise ValueError(f"the estimator must set K (teacher evaluations per example), got {est!r}")
    if est.adapt:
        raise ValueError(
            f"features are estimated at a fixed K; the adapting estimator {est!r} is not "
            f"supported (pass adapt=False or a preset without it)"
        )
    return est


def check_examples(
    images: Any, labels: Any, names: tuple[str, str] = ("images", "labels")
) -> Tensor | None:
    """Check ``(n, *image)`` examples and their ``(n,)`` labels; return the labels as a tensor.

    Raises:
        ValueError: naming the argument (``names``) that is not of that shape.
    """
    if not isinstance(images, Tensor) or images.dim() < 2 or images.shape[0] < 1:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{names[0]} must be an (n, ...) tensor with n >= 1, got {shape}")
    if labels is None:
        return None
    n = images.shape[0]
    labels = torch.as_tensor(labels)
    if labels.shape != (n,):
        raise ValueError(
            f"{names[1]} must have shape ({n},) to match {names[0]}, got {tuple(labels.shape)}"
        )
    return labels


class AttributionFeaturizer:
    """Per-example gradient features of a teacher's denoising loss, estimated with CARV.

    Args:
        teacher: the teacher whose weights the gradients are taken w.r.t.; it is made trainable
            ([`trainable`][carv_pyro.teachers.trainable.trainable]) only while features are
            computed, and every flag and gradient is restored afterwards.
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

    Attributes:
        named_params: ``[(name, parameter), ...]`` the selected weights.
        params: the selected weights.
        dim_in: ``d``, their total number of entries.
        projection: the `RandomProjection`, or ``None``.

    Raises:
        ValueError: naming the bad argument.
        TypeError: if the teacher has no ``requires_grad`` switch.
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
        _checks.choice("projection", projection, PROJECTIONS)
        self.teacher = teacher
        self.module = module
        self.objective = objective
        self.upstream = upstream
        self.named_params = select_parameters(module, params)
        self.params = [p for _, p in self.named_params]
        self.dim_in = sum(p.numel() for p in self.params)
        self._trainable = trainable(teacher, module, self.params)
        # the featurizer's own Pyro param store (a learning proposal's state lives there)
        self._store: dict[str, Any] = {"params": {}, "constraints": {}}
        self.projection: RandomProjection | None = None
        if dim is not None:
            self.projection = RandomProjection(
                self.dim_in,
                _checks.positive_int("dim", dim),
                seed=projection_seed,
                kind=projection,
                max_cache_bytes=max_cache_bytes,
            )

    @property
    def dim(self) -> int:
        """Dimension of a feature (``k``, or ``d`` without projection)."""
        return self.projection.dim_out if self.projection is not None else self.dim_in

    def get_state(self) -> dict[str, Any]:
        """The featurizer's own Pyro param store (a learning proposal's state), for checkpoints."""
        return {
            "params": dict(self._store["params"]),
            "constraints": dict(self._store["constraints"]),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore what `get_state` returned."""
        self._store.clear()
        self._store.update(params=dict(state["params"]), constraints=dict(state["constraints"]))

    def describe(self) -> dict[str, Any]:
        """What makes this featurizer's features what they are, JSON-ready (for run folders):
        the teacher's class, the selected parameters, the dimensions and the projection."""
        projection = self.projection
        return {
            "teacher": type(self.teacher).__name__,
            "params": [name for name, _ in self.named_params],
            "dim_in": self.dim_in,
            "dim": self.dim,
            "projection": None
            if projection is None
            else {"kind": projection.kind, "seed": projection.seed},
            "objective": type(self.objective).__name__,
            "upstream": None if self.upstream is None else type(self.upstream).__name__,
        }

    # -- the Pyro model ------------------------------------------------------------------
    def model(self, u: Tensor, cond: Tensor | None, K: int) -> None:
        """The teacher expectation as a Pyro model: examples outer, ``K`` draws inner.

        Args:
            u: ``(R, *event)`` teacher inputs (upstream outputs) of ``R`` examples.
            cond: ``(R,)`` conditioning (class labels) or ``None``.
            K: draws per example (the reserved inner plate's default size).
        """
        R = u.shape[0]
        with pyro.plate("examples", R, dim=-2), draws(K, dim=-1):
            teacher_term(
                TERM, self.objective, u.unsqueeze(1), cond=None if cond is None else cond[:, None]
            )

    # -- features ------------------------------------------------------------------------
    def features(
        self,
        images: Tensor,
        labels: Tensor | None = None,
        *,
        estimator: Estimator | str = "reuse",
        shared_draws: bool = True,
        seed: int | None = None,
        project: bool = True,
        batch_size: int = 32,
        record_draws: bool = False,
        loss: CARVLoss | None = None,
        progress: bool = False,
        **overrides: Any,
    ) -> FeatureResult:
        """One unbiased estimate of every example's (projected) gradient feature.

        With ``shared_draws=True`` (D-TRAK's choice) every example sees the same ``(t, eps)``
        draws, as D-TRAK reuses one fixed set of draws; with ``shared_draws=False`` the draws
        are independent across examples. Either way every feature is an unbiased estimate of
        ``P g(x_i)``.

        Args:
            images: ``(n, *image)`` examples (upstream inputs).
            labels: ``(n,)`` class labels (the teacher's conditioning) or ``None``.
            estimator: an [`Estimator`][carv_pyro.Estimator] or a preset name
                (`carv_pyro.PRESETS`); its ``K`` is the number of teacher evaluations per
                example, its proposal may be a fixed distribution such as `pilot_proposal`'s.
                ``stratify="global"`` equals ``"per_outer"`` here (one example per run).
            shared_draws: the same ``(t, eps)`` draws for every example, else independent ones.
            seed: seed of the draws; ``None``: drawn from torch's global generator.
            project: apply the random projection (if the featurizer has one).
            batch_size: examples whose raw gradients are held at once before projecting.
            record_draws: also return the draws (timesteps, noise, importance weights).
            loss: the [`CARVLoss`][carv_pyro.CARVLoss] to use (default: the estimator's).
            progress: show a progress bar over the examples.
            **overrides: `Estimator` fields to change (``K=``, ``proposal=``, ``stratify=``,
                ``noise=``), validated by the estimator.

        Returns:
            A `FeatureResult` with ``features`` of shape ``(n, k)`` (or ``(n, d)``).

        Raises:
            ValueError: naming the bad argument (estimator fields are checked by `Estimator`).
            TypeError: on a flag that is not a bool.
        """
        from tqdm.auto import tqdm

        est = fixed_k_estimator(estimator, **overrides)
        K = est.K
        batch_size = _checks.positive_int("batch_size", batch_size)
        for name, flag in (
            ("shared_draws", shared_draws),
            ("project", project),
            ("record_draws", record_draws),
        ):
            _checks.instance(name, flag, bool, "True or False")
        _checks.seed_value("seed", seed)
        labels = check_examples(images, labels)
        n = images.shape[0]
        loss = est.loss() if loss is None else loss
        if record_draws and loss.num_particles != 1:
            raise ValueError("record_draws needs a loss with num_particles=1")
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        seeds = example_seeds(seed, n, shared_draws)
        recorder = DrawRecorder(TERM)
        if record_draws:
            loss.hooks.append(recorder)
        param0 = self.params[0]
        device = param0.device
        out: list[Tensor] = []
        secs = {"up": 0.0, "teacher": 0.0, "proj": 0.0}
        bar = tqdm(total=n, desc="features", disable=not progress, leave=False)
        try:
            with pyro.get_param_store().scope(self._store), self._trainable:
                for lo in range(0, n, batch_size):
                    hi = min(n, lo + batch_size)
                    watch = Stopwatch(device)
                    u = self.teacher_inputs(images[lo:hi]).to(device=device, dtype=param0.dtype)
                    secs["up"] += watch.stop().seconds()
                    grads = torch.empty((hi - lo, self.dim_in), dtype=param0.dtype, device=device)
                    for i in range(lo, hi):
                        y = None if labels is None else labels[i : i + 1].to(device)
                        guide = est.guide(self.model, seed=seeds[i])
                        watch = Stopwatch(device)
                        u_i = u[i - lo : i - lo + 1]
                        g = gradient_estimate(
                            loss, self.model, guide, u_i, y, K, params=self.params
                        )
                        grads[i - lo] = g.to(device=device, dtype=param0.dtype)
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
                loss.hooks.remove(recorder)
        result = FeatureResult(
            features=torch.cat(out),
            K=K,
            seconds_upstream=secs["up"],
            seconds_teacher=secs["teacher"],
            seconds_projection=secs["proj"],
            estimator=est,
        )
        if record_draws:  # one example per run: batch shape (1, K)
            result.timesteps = torch.cat(recorder.timesteps)
            result.noise = torch.cat(recorder.noise)
            result.weights = torch.cat(recorder.weights)
        return result

    def teacher_inputs(self, images: Tensor) -> Tensor:
        """``(n, *image) -> (n, *event)``: the teacher's inputs (``upstream(images)``, no grad).

        Raises:
            ValueError: if they are not of the teacher's event shape.
        """
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

    def reference(
        self,
        images: Tensor,
        labels: Tensor | None = None,
        *,
        n: int = 16,
        estimator: Estimator | str = "stratified",
        seed: int | None = 0,
        progress: bool = False,
        **overrides: Any,
    ) -> Tensor:
        """A high-sample reference: the mean of ``n`` independent estimates.

        Each estimate draws independently across examples (``shared_draws=False``), so the
        reference uses ``n K`` teacher evaluations per example. Every estimate is unbiased
        whatever the estimator; a good one (`pilot_proposal`'s ``q*``, stratified) makes the
        reference tighter.

        Args:
            images: as in `features`.
            labels: as in `features`.
            n: estimates averaged.
            estimator: an [`Estimator`][carv_pyro.Estimator] or a preset name.
            seed: seed of the draws.
            progress: show a progress bar.
            **overrides: `Estimator` fields to change (e.g. ``K=64``).

        Returns:
            ``(n_examples, k)`` float64 reference features.
        """
        from tqdm.auto import tqdm

        n = _checks.positive_int("n", n)
        est = resolve_estimator(estimator, **overrides)
        source = RandomSource(seed=_checks.seed_value("seed", seed))
        total = None
        for _ in tqdm(range(n), desc="reference", disable=not progress, leave=False):
            f = self.features(
                images, labels, estimator=est, shared_draws=False, seed=source.integer_seed()
            ).features.to(torch.float64)
            total = f if total is None else total + f
        return total / n
