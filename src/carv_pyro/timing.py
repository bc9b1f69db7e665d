"""Stopwatches for the cost meter: CUDA events on GPUs, ``perf_counter`` on CPUs.

A CUDA stopwatch records events on the current stream and reads them only when
`Stopwatch.seconds` is called, so timing a step adds no host synchronisation until the
accountant reads its costs; `Stopwatch.ready` says, without waiting, whether that read would
wait for the device (an accountant reads only ready stopwatches, unless it needs the numbers).
"""

from __future__ import annotations

import os
import platform
import time
from typing import Any

import torch

__all__ = ["Stopwatch", "device_name", "is_ready", "seconds_of"]


def device_name(device: str | torch.device) -> str:
    """The machine a measurement ran on, for reports: the GPU's name, or the CPU and its cores."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


class Stopwatch:
    """Times one interval on ``device``.

    Args:
        device: where the timed work runs; CUDA devices use CUDA events.
    """

    def __init__(self, device: torch.device | str | None = None):
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.cuda = device.type == "cuda" and torch.cuda.is_available()
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()
            self._t1: float | None = None

    def stop(self) -> Stopwatch:
        """End the interval (records an event on CUDA; reads the clock on CPU)."""
        if self.cuda:
            self._end.record()
        else:
            self._t1 = time.perf_counter()
        return self

    def ready(self) -> bool:
        """Whether `seconds` can answer without waiting for the device (``Event.query``, no
        synchronisation). A CPU stopwatch is ready once stopped."""
        if self.cuda:
            return self._end.query()
        return self._t1 is not None

    def seconds(self) -> float:
        """Elapsed seconds (synchronises on the end event for CUDA unless `ready`)."""
        if self.cuda:
            if not self._end.query():  # a finished event is read as is: no call that may wait
                self._end.synchronize()
            return self._start.elapsed_time(self._end) / 1e3
        if self._t1 is None:
            raise RuntimeError("Stopwatch.seconds() called before stop()")
        return self._t1 - self._t0


def seconds_of(measured: Any) -> float:
    """Seconds of a measured time: a stopped `Stopwatch` (read, which on a GPU waits for the
    device unless it is `ready`), plain seconds, or ``None`` (not timed: zero)."""
    if measured is None:
        return 0.0
    return float(measured.seconds() if hasattr(measured, "seconds") else measured)


def is_ready(measured: Any) -> bool:
    """Whether `seconds_of` can read ``measured`` without waiting for the device."""
    return not hasattr(measured, "ready") or measured.ready()
