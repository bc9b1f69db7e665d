"""`attribute`: every example's feature as a resumable run, then TRAK scores.

Attribution over many examples is long (``K`` teacher forward and backward passes per example,
per estimate), so it runs on the shared ``carv_pyro.pipelines.base.TrainLoop``, one example of
one estimate a step. With an ``out_dir`` it checkpoints (every ``checkpoint_every`` steps, every
``checkpoint_every_s`` seconds, after the step in progress on SIGINT/SIGTERM, and at the end)
the features done so far, the featurizer's param store and the loop's state; a run resumed with
``resume=True`` then ends bit for bit where the uninterrupted run does, because the draws of
every example are seeded from ``seed`` up front (`example_seeds`), not from a generator's
running state. A finished or foreign folder is never overwritten without ``resume`` or
``overwrite`` (``carv_pyro.pipelines.base.RunFolder``).

```python
run = attribute(featurizer, train_x, train_y, query_x, query_y, estimator=carv, out_dir="runs/a")
run.scores.topk(5, dim=1)  # (n_query, 5): the most helpful training examples of each query
```
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ... import _checks
from ...infer.estimator import Estimator
from ...infer.samplers import RandomSource
from ..base.checkpoint import Checkpointer, RunFolder, write_json
from ..base.loop import Clock, LoopState, TrainLoop, check_run_options
from .featurizer import AttributionFeaturizer, check_examples, example_seeds, fixed_k_estimator
from .scores import attribution_scores

__all__ = [
    "CHECKPOINT_FILE",
    "FEATURES_FILE",
    "RUN_KIND",
    "SUMMARY_FILE",
    "AttributionRun",
    "attribute",
]

#: The run folder's kind (its ``carv-run.json`` marker).
RUN_KIND = "attribution"
#: The checkpoint's file name inside the run folder.
CHECKPOINT_FILE = "checkpoint.pt"
#: The finished run's tensors (``features``, ``estimates``, ``scores``), written by ``torch.save``.
FEATURES_FILE = "features.pt"
#: The finished run's JSON summary.
SUMMARY_FILE = "summary.json"
#: The version of the checkpoint's layout.
CHECKPOINT_FORMAT = 1
#: A param store with nothing in it.
EMPTY_STORE: dict[str, Any] = {"params": {}, "constraints": {}}


@dataclass
class AttributionRun:
    """What `attribute` returns.

    Attributes:
        features: ``(n, k)`` float64, each example's feature averaged over the estimates; the
            training examples first, then the queries.
        estimates: ``(E, n, k)`` every estimate's features (the teacher's dtype, on the CPU).
        n_train: the number of training examples (the first rows).
        scores: ``(n_query, n_train)`` float64 TRAK scores (`attribution_scores`), or ``None``
            without queries.
        steps: examples estimated, ``E n`` once finished.
        seconds: wall-clock seconds of estimation, across resumes.
        settings: what the run's features depend on (a resume must match them).
        resumed_from: the step a resumed run continued from (``None``: a fresh run).
        out_dir: the run folder, if the run had one.
    """

    features: Tensor
    estimates: Tensor
    n_train: int
    scores: Tensor | None
    steps: int
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)
    resumed_from: int | None = None
    out_dir: str | None = None

    @property
    def train_features(self) -> Tensor:
        """``(n_train, k)`` the training examples' features."""
        return self.features[: self.n_train]

    @property
    def query_features(self) -> Tensor:
        """``(n_query, k)`` the queries' features."""
        return self.features[self.n_train :]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (without the tensors, which go to ``features.pt``)."""
        out: dict[str, Any] = {
            "settings": self.settings,
            "steps": self.steps,
            "seconds": self.seconds,
            "resumed_from": self.resumed_from,
            "n_train": self.n_train,
            "n_query": int(self.features.shape[0]) - self.n_train,
            "estimates": int(self.estimates.shape[0]),
            "dim": int(self.features.shape[1]),
        }
        if self.scores is not None:
            top = self.scores.topk(min(5, self.n_train), dim=1).indices
            out["top_train_examples"] = top.tolist()
        return out


def _fingerprint(*tensors: Tensor | None) -> str:
    """sha256 of the tensors' shapes, dtypes and bytes: the run's inputs, compared on resume."""
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none;")
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _estimator_settings(est: Estimator) -> dict[str, Any]:
    """`Estimator.settings`, with a fixed proposal (e.g. `pilot_proposal`'s) shown by the hash
    of its probabilities, so that a resume can tell it from another."""
    out = est.settings()
    probs = getattr(est.proposal, "probs", None)
    if not isinstance(est.proposal, str) and callable(probs):
        out["proposal"] = {
            "class": type(est.proposal).__name__,
            "probs_sha256": _fingerprint(torch.as_tensor(probs(), dtype=torch.float64)),
        }
    return out


def _differences(saved: dict[str, Any], ours: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(saved) | set(ours) if saved.get(k) != ours.get(k))


def attribute(
    featurizer: AttributionFeaturizer,
    train_images: Tensor,
    train_labels: Tensor | None = None,
    query_images: Tensor | None = None,
    query_labels: Tensor | None = None,
    *,
    estimator: Estimator | str = "stratified",
    estimates: int = 1,
    shared_draws: bool = True,
    seed: int = 0,
    damping: float = 1e-3,
    out_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    checkpoint_every: int | None = None,
    checkpoint_every_s: float | None = 60.0,
    progress: bool = True,
    hooks: Sequence[Callable[[LoopState, dict[str, Any]], None]] = (),
) -> AttributionRun:
    """Every example's feature, averaged over ``estimates`` independent estimates, as a
    resumable run; TRAK scores of the queries against the training examples.

    Step ``s`` estimates example ``s mod n`` in estimate ``s // n``, with
    `AttributionFeaturizer.features` on that one example. Estimate ``e`` is seeded by the
    ``e``-th ``integer_seed`` of ``RandomSource(seed)`` and its examples by `example_seeds`, as
    in `AttributionFeaturizer.reference`, so ``estimates=n, shared_draws=False`` is that
    reference (up to rounding in the projection) and ``estimates=1`` one estimate. A fresh run
    starts from an empty featurizer param store (a learning proposal such as ``"adaptive"``
    starts afresh), so two runs with the same settings and inputs agree bit for bit.

    Args:
        featurizer: the featurizer (its teacher, parameters and projection).
        train_images: ``(n_train, *image)`` the training examples.
        train_labels: ``(n_train,)`` their labels, or ``None`` (an unconditional teacher).
        query_images: ``(n_query, *image)`` the queries, or ``None`` (features only).
        query_labels: ``(n_query,)`` their labels (given exactly when ``train_labels`` is).
        estimator: an [`Estimator`][carv_pyro.Estimator] (``K`` set, not adapting; its
            proposal may be a fixed distribution such as `pilot_proposal`'s) or a preset name.
        estimates: independent estimates averaged (``E``).
        shared_draws: the same ``(t, eps)`` draws for every example within an estimate.
        seed: seeds every draw of the run.
        damping: the TRAK scores' relative ridge.
        out_dir: the run folder (``checkpoint.pt``; when finished ``features.pt`` and
            ``summary.json``); a finished or foreign folder is never overwritten without
            ``resume`` or ``overwrite``.
        resume: continue the run checkpointed in ``out_dir`` (its settings and inputs must be
            these).
        overwrite: replace the run in ``out_dir``.
        checkpoint_every: also checkpoint every this many steps.
        checkpoint_every_s: also checkpoint every this many wall seconds (``None``: never), so
            a SIGKILL loses at most about that much work.
        progress: show a progress bar over the steps.
        hooks: ``hook(state, metrics)`` after every step (see
            ``carv_pyro.pipelines.base.TrainLoop``).

    Returns:
        An `AttributionRun`.

    Raises:
        ValueError: naming the first invalid argument, before any work (a
            ``carv_pyro.pipelines.base.RunFolderError`` when ``out_dir`` may not be used as
            asked; on resume, settings or inputs that differ from the checkpoint's).
        TypeError: on a featurizer or flag of the wrong type.
        RunStopped: after SIGINT/SIGTERM, once the last completed step is checkpointed.
    """
    _checks.instance("featurizer", featurizer, AttributionFeaturizer, "an AttributionFeaturizer")
    est = fixed_k_estimator(estimator)
    estimates = _checks.positive_int("estimates", estimates)
    for name, flag in (
        ("shared_draws", shared_draws),
        ("progress", progress),
        ("resume", resume),
        ("overwrite", overwrite),
    ):
        _checks.instance(name, flag, bool, "True or False")
    seed = _checks.non_negative_int("seed", seed)
    damping = _checks.non_negative_float("damping", damping)
    hooks = check_run_options(
        checkpoint_every, checkpoint_every_s, hooks, out_dir, resume=resume, overwrite=overwrite
    )
    train_labels = check_examples(train_images, train_labels, ("train_images", "train_labels"))
    images, labels = train_images, train_labels
    if query_images is not None:
        query_labels = check_examples(query_images, query_labels, ("query_images", "query_labels"))
        if (query_labels is None) != (train_labels is None):
            raise ValueError(
                "give labels for both the training examples and the queries, or for neither "
                f"(train_labels is {'None' if train_labels is None else 'given'}, query_labels "
                f"is {'None' if query_labels is None else 'given'})"
            )
        images = torch.cat([train_images, query_images])
        labels = None if train_labels is None else torch.cat([train_labels, query_labels])
    elif query_labels is not None:
        raise ValueError("query_labels was given without query_images")
    featurizer.teacher_inputs(images[:1])  # the teacher's event shape, checked before any work
    n_train, n = int(train_images.shape[0]), int(images.shape[0])
    settings = json.loads(
        json.dumps(
            {
                "featurizer": featurizer.describe(),
                "estimator": _estimator_settings(est),
                "estimates": estimates,
                "shared_draws": shared_draws,
                "seed": seed,
                "damping": damping,
                "n_train": n_train,
                "n_query": n - n_train,
                "inputs_sha256": _fingerprint(images, labels),
            }
        )
    )

    folder = None
    saved: dict[str, Any] | None = None
    if out_dir is not None:
        folder = RunFolder(out_dir, RUN_KIND, CHECKPOINT_FILE)
        if folder.check(resume=resume, overwrite=overwrite):
            saved = folder.checkpoint.load()
            differ = _differences(saved.get("settings", {}), settings)
            if saved.get("format") != CHECKPOINT_FORMAT or differ:
                raise ValueError(
                    f"cannot resume the run in {folder.path}: its settings differ in {differ} "
                    f"(the featurizer, the estimator, the inputs and the seed must be the run's "
                    f"own); pass overwrite=True to replace it"
                )
        folder.prepare(resume=resume, overwrite=overwrite)

    # every draw's seed, fixed up front: a resumed step draws exactly what it would have
    source = RandomSource(seed=seed)
    seeds = [example_seeds(source.integer_seed(), n, shared_draws) for _ in range(estimates)]
    rows = torch.full((estimates, n, featurizer.dim), torch.nan, dtype=featurizer.params[0].dtype)
    # a run is reproducible from its settings alone: a learning proposal starts afresh (and
    # a resumed one where the checkpoint left it)
    featurizer.set_state(saved["featurizer"] if saved is not None else EMPTY_STORE)
    if saved is not None:
        rows = saved["rows"]

    def step(state: LoopState) -> dict[str, Any]:
        e, i = divmod(state.step, n)
        y = None if labels is None else labels[i : i + 1]
        result = featurizer.features(images[i : i + 1], y, estimator=est, seed=seeds[e][i])
        rows[e, i] = result.features[0].detach().cpu()
        return {"estimate": e, "example": i, "seconds_teacher": result.seconds_teacher}

    def save(state: LoopState) -> None:
        folder.checkpoint.save(
            {
                "format": CHECKPOINT_FORMAT,
                "settings": settings,
                "loop": state.to_dict(),
                "rows": rows,
                "featurizer": featurizer.get_state(),
            }
        )

    where = str(out_dir) if out_dir is not None else ""
    loop = TrainLoop(
        step,
        steps=estimates * n,
        clock=Clock("wall", featurizer.params[0].device),
        hooks=hooks,
        save=save if folder is not None else None,
        checkpoint_every=checkpoint_every,
        checkpoint_every_s=checkpoint_every_s,
        progress=progress,
        desc=f"attribution {est.name}",
        where=where,
    )
    state = loop.run(LoopState.from_dict(saved["loop"]) if saved is not None else None)

    features = rows.to(torch.float64).mean(0)
    scores = None
    if n > n_train:
        scores = attribution_scores(features[:n_train], features[n_train:], damping=damping)
    run = AttributionRun(
        features=features,
        estimates=rows,
        n_train=n_train,
        scores=scores,
        steps=state.step,
        seconds=state.seconds,
        settings=settings,
        resumed_from=None if saved is None else int(saved["loop"]["step"]),
        out_dir=where or None,
    )
    if folder is not None:
        Checkpointer(folder.path / FEATURES_FILE).save(
            {"features": features, "estimates": rows, "scores": scores, "n_train": n_train}
        )
        write_json(folder.path / SUMMARY_FILE, run.to_dict())
        folder.mark("finished")
    return run
