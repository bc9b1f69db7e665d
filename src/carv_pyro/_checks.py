"""The library's argument validators: the one place that says what a valid argument is.

Every public constructor, config and command checks its arguments here, before any work is done
or any state changes, and every failure names the argument, what it got and what would be right.
A boolean is never accepted as a number (``True`` is an ``int`` to Python, not to a user).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from typing import Any

__all__ = [
    "choice",
    "device_checks",
    "finite_float",
    "host_checks",
    "in_range",
    "instance",
    "non_negative_float",
    "non_negative_int",
    "ordered_pair",
    "positive_float",
    "positive_int",
    "seed_value",
]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive_int(name: str, value: Any, *, maximum: int | None = None) -> int:
    """``value`` as an ``int >= 1`` (and ``<= maximum`` if given), else ``ValueError``."""
    if not _is_int(value) or value < 1 or (maximum is not None and value > maximum):
        bound = f" and at most {maximum}" if maximum is not None else ""
        raise ValueError(f"{name} must be a positive integer{bound}, got {value!r}")
    return int(value)


def non_negative_int(name: str, value: Any) -> int:
    """``value`` as an ``int >= 0``, else ``ValueError``."""
    if not _is_int(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def finite_float(name: str, value: Any) -> float:
    """``value`` as a finite ``float``, else ``ValueError``."""
    if not _is_real(value) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def positive_float(name: str, value: Any) -> float:
    """``value`` as a finite ``float > 0``, else ``ValueError``."""
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def non_negative_float(name: str, value: Any) -> float:
    """``value`` as a finite ``float >= 0``, else ``ValueError``."""
    if not _is_real(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def in_range(
    name: str,
    value: Any,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a ``float`` in the interval ``low .. high`` (ends open as asked)."""
    ok = _is_real(value) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (
            value < high if high_open else value <= high
        )
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


def ordered_pair(
    name: str, value: Any, low: float, high: float, *, strict: bool = True
) -> tuple[float, float]:
    """``value`` as a pair ``(a, b)`` with ``low <= a < b <= high`` (``a <= b`` if not strict)."""
    try:
        a, b = (float(v) for v in value)
        if isinstance(value, (str, bytes)) or any(isinstance(v, bool) for v in value):
            raise TypeError
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high) of numbers, got {value!r}") from None
    rel = "<" if strict else "<="
    ok = low <= a and b <= high and (a < b if strict else a <= b)
    if not ok or math.isnan(a) or math.isnan(b):
        raise ValueError(f"{name} must satisfy {low} <= low {rel} high <= {high}, got {value!r}")
    return a, b


def choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """``value`` if it is one of ``choices``, else ``ValueError`` listing them."""
    options = tuple(choices)
    try:
        ok = value in options
    except TypeError:  # unhashable or incomparable
        ok = False
    if not ok:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def instance(name: str, value: Any, types: type | tuple[type, ...], what: str) -> Any:
    """``value`` if it is an instance of ``types``, else ``TypeError`` saying ``what`` it must be."""
    if not isinstance(value, types):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__} ({value!r:.80})")
    return value


def seed_value(name: str, value: Any) -> int | None:
    """``None`` or a seed in ``[0, 2**63)``, else ``ValueError``."""
    if value is None:
        return None
    if not _is_int(value) or not 0 <= value < 2**63:
        raise ValueError(f"{name} must be None or an integer in [0, 2**63), got {value!r}")
    return int(value)


# -- checks that read a value back from the device ------------------------------------------
#
# A check such as "are the class labels in range" or "is any teacher output NaN" reads a value
# back to the host; on a GPU that read waits for all queued work (a host synchronisation).
# Such checks run on the host when `host_checks(device)` says so: by default for CPU tensors
# only (where reading is free), everywhere inside ``device_checks(True)`` (CARVLoss(checks=True)
# enters it around a step), nowhere inside ``device_checks(False)``. Where a host check is off,
# a device-side assert or a deferred read takes its place where one exists.

_HOST_CHECKS: ContextVar[bool | None] = ContextVar("carv_pyro_host_checks", default=None)


def host_checks(device: Any) -> bool:
    """Whether checks that read values of a tensor on ``device`` back to the host run now."""
    flag = _HOST_CHECKS.get()
    if flag is None:
        return getattr(device, "type", device) == "cpu"
    return flag


@contextlib.contextmanager
def device_checks(enabled: bool | None) -> Iterator[None]:
    """Within the block, host checks run everywhere (``True``), nowhere (``False``), or for CPU
    tensors only (``None``, the default)."""
    if enabled is not None and not isinstance(enabled, bool):
        raise ValueError(f"checks must be True, False or None, got {enabled!r:.80}")
    token = _HOST_CHECKS.set(enabled)
    try:
        yield
    finally:
        _HOST_CHECKS.reset(token)
