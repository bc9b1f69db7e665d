"""Device values read on the host once the device has delivered them, from a bounded queue.

The loss's deferred NaN refusal (each step's count of non-finite teacher outputs, copied to the
host without waiting) and the accountant's CUDA timings queue such values and read them, oldest
first, once reading would not wait; a device far behind cannot grow a queue past its bound.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Protocol, TypeVar


class _Pending(Protocol):
    def ready(self) -> bool: ...


T = TypeVar("T", bound=_Pending)


def take_ready(queue: deque[T], bound: int, *, force: bool = False) -> Iterator[T]:
    """Pop the items of ``queue`` to read now, oldest first.

    Taken: every item with ``force`` (reading them waits for the device); else the oldest while
    it is ``ready()`` (reading it would not wait), and while the queue holds more than ``bound``
    items (reading those waits), so that at most ``bound`` stay pending. Order is kept: an item
    behind one that is not ready waits its turn (the device finishes work in order).

    Items are popped one at a time as the reader asks for them: those after the one a reader
    stops at (by ``break`` or an exception) stay queued.

    Args:
        queue: the pending items, oldest first; each has ``ready() -> bool``.
        bound: the most items left pending when the device is behind.
        force: take every item.
    """
    while queue and (force or len(queue) > bound or queue[0].ready()):
        yield queue.popleft()
