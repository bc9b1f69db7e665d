"""The shared base of the pipelines' configs: one estimator field, validation, JSON round trips.

A pipeline's config is a dataclass that derives from `PipelineConfig`, validates its own fields
in ``__post_init__`` with [`carv_pyro._checks`][carv_pyro._checks] (calling
``super().__post_init__()`` first), and gets ``to_dict`` / ``from_dict`` / ``replace`` for free.
Its ``estimator`` field takes an [`Estimator`][carv_pyro.Estimator] or a preset name, resolved
through the one registry, so ``"carv"`` means the same thing in every pipeline.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from ... import _checks
from ...infer.estimator import Estimator, resolve_estimator

__all__ = ["PipelineConfig"]

C = TypeVar("C", bound="PipelineConfig")


@dataclasses.dataclass
class PipelineConfig:
    """Fields every pipeline config has.

    Attributes:
        estimator: how the teacher expectation is estimated: an
            [`Estimator`][carv_pyro.Estimator] or a preset name (see `carv_pyro.PRESETS`).
        seed: seeds the run's initialisation and draws (the global RNGs are left alone).
    """

    estimator: Estimator | str = "carv"
    seed: int = 0

    def __post_init__(self) -> None:
        self.estimator = resolve_estimator(self.estimator)
        _checks.non_negative_int("seed", self.seed)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields (tuples become lists, the estimator its settings)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Estimator):
                value = value.settings()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Inverse of `to_dict`.

        Raises:
            ValueError: on unknown keys or invalid values.
        """
        _checks.instance("data", data, dict, "a dict of config fields")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(known)}")
        kwargs = {}
        for key, value in data.items():
            if key == "estimator" and isinstance(value, dict):
                settings = dict(value)
                settings["k_range"] = tuple(settings.get("k_range", (1, 32)))
                value = Estimator(**settings)
            elif isinstance(value, list):
                value = tuple(value)
            kwargs[key] = value
        return cls(**kwargs)

    def replace(self: C, **changes: Any) -> C:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)
