"""`select_parameters`: which of a teacher's weights the attribution gradient is taken w.r.t."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = ["select_parameters"]


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix if prefix.endswith(".") else prefix + ".")


def select_parameters(
    module: nn.Module, prefixes: Sequence[str] | str | None = None
) -> list[tuple[str, nn.Parameter]]:
    """The named parameters of ``module`` whose names start with one of ``prefixes``.

    Args:
        module: the teacher's network.
        prefixes: e.g. ``("up_blocks.2",)`` for the last up-block of a UNet; ``None``: all.

    Returns:
        ``[(name, parameter), ...]`` in ``module.named_parameters()`` order.

    Raises:
        ValueError: if a prefix matches no parameter, or nothing is selected.
    """
    named = list(module.named_parameters())
    if prefixes is None:
        chosen = named
    else:
        if isinstance(prefixes, str):
            prefixes = (prefixes,)
        prefixes = tuple(prefixes)
        if not prefixes or not all(isinstance(p, str) for p in prefixes):
            raise ValueError(f"params must be None or non-empty name prefixes, got {prefixes!r}")
        for p in prefixes:
            if not any(_matches(n, p) for n, _ in named):
                top = sorted({n.split(".")[0] for n, _ in named})
                raise ValueError(
                    f"params: prefix {p!r} matches no parameter of {type(module).__name__} "
                    f"(top-level names: {top})"
                )
        chosen = [(n, q) for n, q in named if any(_matches(n, p) for p in prefixes)]
    if not chosen:
        raise ValueError(f"params: no parameters selected from {type(module).__name__}")
    return chosen
