"""The DMD objective as a plain Pyro model: latents on the outer plate, teacher draws inside.

```
latents (R, dim=-2):  z ~ N(0, I), label ~ U{0..C-1}  ->  x = G(z, label)      (upstream)
  noise = carv_pyro.draws(K, dim=-1):  teacher_term("dmd", objective, x, cond=label)
```

The latent sites are ordinary Pyro latents drawn from their priors; their draws come from a
``torch.Generator`` handed to `make_model` (``rng``), so a run is reproducible without touching
torch's global generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from einops import rearrange
from torch import Tensor, nn

from ... import _checks
from ...infer.primitives import draws, teacher_term
from ...objectives import TeacherObjective

__all__ = ["LABEL_SAMPLING", "StratifiedLabels", "make_model"]

#: How `make_model` draws the class labels of the ``R`` samples.
LABEL_SAMPLING = ("iid", "stratified")


def _draw(fn, shape, generator: torch.Generator | None, dtype, device) -> Tensor:
    """``fn(shape)`` on ``generator``'s device (or ``device`` without one), moved to ``device``."""
    where = generator.device if generator is not None else device
    return fn(tuple(shape), generator=generator, dtype=dtype, device=where).to(device)


class _SeededNormal(dist.Normal):
    """``Normal(loc, scale)`` whose reparameterized draws come from a ``torch.Generator``."""

    def __init__(self, loc, scale, generator: torch.Generator | None = None, validate_args=None):
        self.generator = generator
        super().__init__(loc, scale, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(_SeededNormal, _instance)
        new = super().expand(batch_shape, _instance=new)
        new.generator = self.generator
        return new

    def rsample(self, sample_shape: tuple[int, ...] = ()) -> Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))
        eps = _draw(torch.randn, shape, self.generator, self.loc.dtype, self.loc.device)
        return self.loc + eps * self.scale


class StratifiedLabels(dist.Categorical):
    """Uniform class labels, drawn stratified across the plate (marginally exactly uniform).

    ``log_prob`` is the uniform ``Categorical``'s, and every single draw is uniform over the
    ``C`` classes, but the ``n`` draws of one call are spread evenly: draw ``i`` takes
    ``floor(C u_i)`` with ``u_i = (pi_i + U_i) / n`` for a random permutation ``pi`` (one ``u``
    per stratum of ``[0, 1)``), so every class appears ``floor(n / C)`` or ``ceil(n / C)`` times.
    An estimator that averages per-sample terms stays unbiased (linearity), while the
    between-sample variance due to the labels shrinks.

    Args:
        num_classes: ``C``.
        device: where the labels live.
        generator: the ``torch.Generator`` of the draws (torch's global one when ``None``).
    """

    def __init__(
        self,
        num_classes: int,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        validate_args=None,
    ):
        _checks.positive_int("num_classes", num_classes)
        self.generator = generator
        super().__init__(
            logits=torch.zeros(num_classes, device=device), validate_args=validate_args
        )

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(StratifiedLabels, _instance)
        new = super().expand(batch_shape, _instance=new)
        new.generator = self.generator
        return new

    def sample(self, sample_shape: tuple[int, ...] = ()) -> Tensor:
        """``(*sample_shape, *batch_shape)`` long labels, stratified over all of them."""
        shape = self._extended_shape(torch.Size(sample_shape))
        n = math.prod(shape)
        device = self.logits.device
        keys = _draw(torch.rand, (n,), self.generator, torch.float32, device)
        strata = torch.argsort(keys).to(torch.float64)
        u = (strata + _draw(torch.rand, (n,), self.generator, torch.float64, device)) / n
        labels = (u * self._num_events).floor().long().clamp_max(self._num_events - 1)
        return labels.reshape(shape)


class _SeededCategorical(dist.Categorical):
    """Uniform labels drawn i.i.d. from a ``torch.Generator``."""

    def __init__(self, logits, generator: torch.Generator | None = None, validate_args=None):
        self.generator = generator
        super().__init__(logits=logits, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(_SeededCategorical, _instance)
        new = super().expand(batch_shape, _instance=new)
        new.generator = self.generator
        return new

    def sample(self, sample_shape: tuple[int, ...] = ()) -> Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))
        where = self.generator.device if self.generator is not None else self.logits.device
        flat = torch.multinomial(
            self.probs.reshape(-1, self._num_events).to(where).expand(math.prod(shape), -1),
            1,
            replacement=True,
            generator=self.generator,
        )
        return flat.reshape(shape).to(self.logits.device)


def make_model(
    generator: nn.Module,
    objective: TeacherObjective,
    R: int,
    K: int,
    *,
    labels: str = "iid",
    name: str = "dmd",
    module_name: str = "generator",
    rng: torch.Generator | None = None,
) -> Callable[..., None]:
    """The DMD objective as a plain Pyro model.

    ``model(R=R, K=K)`` registers the generator with ``pyro.module(module_name, generator)``,
    draws ``R`` latents in the ``latents`` plate (``dim=-2``): ``z`` ``(R, 1, z_dim)`` from
    ``N(0, I)`` and, for a conditional generator, ``label`` ``(R, 1)`` uniform over the classes
    (i.i.d., or stratified across the plate with `StratifiedLabels`); generates
    ``x = G(z, label)`` of shape ``(R, 1, *event)`` (the upstream step) and records the teacher
    term ``name`` with ``K`` draws per sample in the reserved inner plate ``noise``
    ([`carv_pyro.draws`][carv_pyro.draws], ``dim=-1``), conditioned on the label: ``R * K``
    draws in one batched teacher call. An [`Estimator`][carv_pyro.Estimator] with ``K`` set
    decides the inner size actually used.

    Args:
        generator: a `Generator` (or a module with ``z_dim``, ``num_classes`` and
            ``forward(z, labels)``) whose output shape is the objective's event shape.
        objective: the DMD objective (`dmd_objective`).
        R: default number of generator samples per call.
        K: default number of ``(t, eps)`` draws per sample.
        labels: ``"iid"`` (DMD's sampling) or ``"stratified"`` (each draw still uniform, the
            ``R`` labels spread evenly over the classes: lower between-sample variance).
        name: the teacher term's site name.
        module_name: the generator's name in the param store.
        rng: the ``torch.Generator`` of the latent draws (``z`` and labels); ``None`` uses
            torch's global generator, as plain Pyro does.

    Returns:
        ``model(R=R, K=K)``.

    Raises:
        ValueError: if ``R`` or ``K`` is not a positive integer (also when passed to the model),
            or ``labels`` is unknown.
    """
    _checks.positive_int("R", R)
    _checks.positive_int("K", K)
    _checks.choice("labels", labels, LABEL_SAMPLING)
    if rng is not None:
        _checks.instance("rng", rng, torch.Generator, "a torch.Generator or None")
    num_classes = getattr(generator, "num_classes", None)
    z_dim = _checks.positive_int("generator.z_dim", getattr(generator, "z_dim", None))
    default_R, default_K = R, K

    def model(R: int = default_R, K: int = default_K) -> None:
        _checks.positive_int("R", R)
        _checks.positive_int("K", K)
        pyro.module(module_name, generator)
        p = next(generator.parameters())
        zeros = torch.zeros(z_dim, dtype=p.dtype, device=p.device)
        with pyro.plate("latents", R, dim=-2):
            z = pyro.sample("z", _SeededNormal(zeros, 1.0, generator=rng).to_event(1))  # (R,1,D)
            label = None
            if num_classes is not None:
                if labels == "stratified":
                    label_dist = StratifiedLabels(num_classes, device=p.device, generator=rng)
                else:
                    logits = torch.zeros(num_classes, device=p.device)
                    label_dist = _SeededCategorical(logits, generator=rng)
                label = pyro.sample("label", label_dist)  # (R, 1)
            flat_label = None if label is None else rearrange(label, "r 1 -> r")
            x = generator(rearrange(z, "r 1 d -> r d"), flat_label)  # (R, *event)
            x = rearrange(x, "r ... -> r 1 ...")  # (R, 1, *event)
            with draws(K, name="noise", dim=-1):
                teacher_term(name, objective, x, cond=label)

    return model
