"""Soak: a few thousand SVI steps through CARVLoss with an adapting Accountant, memory flat.

A small analytic model (``tests/analytic.py``: Gaussian teacher, linear upstream) runs
`STEPS` SVI steps in a bounded time. After a warm-up (allocator pools, Pyro's caches, the
accountant's windows filling) the resident set size, sampled from ``/proc/self/statm``, may
grow by at most `RSS_BOUND_MIB` over the rest of the run. Measured on one CPU core: the
run grows by about 0.3 MiB, while keeping one step's record value per step (a leak of one small
``(R, K)`` tensor, under 1 KiB with its overhead) grows it by about 2.3 MiB over 2,500 steps,
about 3.5 MiB over these 3,500, which is above the bound. Per-step structures stay bounded: the accountant's windows (deques of ``window``
entries), its per-K step times (one deque per K tried), the param store (one parameter), and
the loss's last records (one step's). The accountant's ``history`` keeps one entry per
measurement (every ``every`` steps) by design; its growth is asserted to be exactly that.
"""

from __future__ import annotations

import os
import time

import pyro
import pytest
from pyro.infer import SVI

import carv_pyro as carv
from carv_pyro.accounting import Accountant

from .analytic import make_model, sds

STEPS = 4000
WARMUP = 500
EVERY = 10
WINDOW = 20
RSS_BOUND_MIB = 1.5
TIME_BOUND_S = 30.0


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_thousands_of_steps_keep_memory_flat_and_structures_bounded():
    objective = sds()
    model = make_model(objective, 2, 4, inner="draws")
    accountant = Accountant(every=EVERY, window=WINDOW, adapt=True, k_range=(1, 8))
    loss = carv.CARVLoss(accountant=accountant)
    guide = carv.Estimator(proposal="weighted", stratify="per_outer").guide(model, seed=0)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), loss=loss)

    t0 = time.perf_counter()
    samples = []
    for step in range(STEPS):
        value = svi.step()
        assert value == value, f"NaN loss at step {step}"
        if step == WARMUP:
            rss_after_warmup = _rss_mib()
            store_after_warmup = sorted(pyro.get_param_store().keys())
        if step > WARMUP and step % 250 == 0:
            samples.append(_rss_mib())
    elapsed = time.perf_counter() - t0
    growth = max(samples + [_rss_mib()]) - rss_after_warmup

    assert elapsed < TIME_BOUND_S, f"{STEPS} steps took {elapsed:.1f} s"
    assert growth < RSS_BOUND_MIB, (
        f"RSS grew by {growth:.2f} MiB after the warm-up (bound {RSS_BOUND_MIB} MiB); "
        f"samples {samples}"
    )
    # per-step structures are bounded
    assert len(accountant._measurements) <= WINDOW
    assert len(accountant._outer_times) <= WINDOW and len(accountant._inner_times) <= WINDOW
    assert len(accountant._step_times) <= 8
    assert all(len(d) <= WINDOW for d in accountant._step_times.values())
    assert sorted(pyro.get_param_store().keys()) == store_after_warmup
    assert len(loss.last_records) == 1
    # the history is one entry per measurement (not per step), and bounded
    assert 0 < len(accountant.history) <= min(STEPS // EVERY, accountant.history.maxlen)
