"""`take_ready`: the bounded queue of device values that the loss (deferred NaN counts) and the
accountant (CUDA timings) read once the device has delivered them."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from carv_pyro._deferred import take_ready


@dataclass
class Item:
    name: int
    done: bool

    def ready(self) -> bool:
        return self.done


def queue(*done: bool) -> deque[Item]:
    return deque(Item(i, d) for i, d in enumerate(done))


def names(items) -> list[int]:
    return [item.name for item in items]


def test_takes_the_ready_oldest_in_order():
    """Oldest first while ready; an item behind one that is not ready waits its turn."""
    q = queue(True, True, False, True)
    assert names(take_ready(q, bound=8)) == [0, 1]
    assert names(q) == [2, 3]
    q[0].done = True
    assert names(take_ready(q, bound=8)) == [2, 3] and not q


def test_force_takes_everything():
    q = queue(False, True, False)
    assert names(take_ready(q, bound=8, force=True)) == [0, 1, 2] and not q


def test_past_the_bound_the_oldest_are_taken_ready_or_not():
    q = queue(*[False] * 5)
    assert names(take_ready(q, bound=3)) == [0, 1]  # at most 3 stay pending
    assert names(q) == [2, 3, 4]
    q = queue(False, False, True, False)  # within the bound, a ready oldest is still taken
    assert names(take_ready(q, bound=2)) == [0, 1, 2]
    assert names(q) == [3]


def test_items_are_popped_as_the_reader_asks():
    """A reader that stops (here by raising, as the loss does for a NaN count) leaves the rest."""
    q = queue(True, True, True)
    try:
        for item in take_ready(q, bound=8):
            if item.name == 1:
                raise FloatingPointError
    except FloatingPointError:
        pass
    assert names(q) == [2]
