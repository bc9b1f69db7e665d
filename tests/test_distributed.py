"""Outer samples sharded over 2 CPU processes (gloo) equal the single-process estimator.

With fixed upstream samples and fixed ``(t, eps)`` draws, rank ``i`` sees the contiguous shard
``shard_range(R)[i]`` of the same draws, so the all-reduced gradient must equal the one-process
gradient over all ``R`` samples (to rounding), and the pooled accounting statistics must equal
one accumulator fed with every rank's per-step estimates.

Faults: ranks at different steps raise `OutOfStepError` on both ranks; a step that raises on one
rank only raises on both (its own error there, `RankFailedError` naming it on the other) and the
next step runs in step; a rank that never reaches the collective makes the other fail within
the (test-set, short) timeout with a `RankTimeoutError` naming it.
"""

from __future__ import annotations

import math
import time
from collections import deque

import pyro
import pytest
import torch
import torch.multiprocessing as mp
from pyro import poutine

import carv_pyro as carv
from carv_pyro.accounting import Accountant, VarianceComponents
from carv_pyro.distributed import (
    DEFAULT_TIMEOUT_S,
    DistributedAccountant,
    DistributedCARVLoss,
    OutOfStepError,
    RankFailedError,
    RankTimeoutError,
    all_reduce_gradients,
    init_from_env,
    launch,
    merge_components,
    shard_range,
    shard_size,
)

from .analytic import DIRECTION, THETA0, sds

R, K = 5, 4  # uneven shards over 2 ranks: 3 + 2
WORLD = 2
STEPS = 3
SEED = 123


def fixed_draws(objective, step: int):
    """``xi (R,)``, ``t (R, K)`` and ``eps (R, K, D)`` of one step, the same in every process."""
    g = torch.Generator().manual_seed(SEED + step)
    xi = torch.randn(R, generator=g, dtype=torch.float64)
    t = objective.prior.sample((R, K), generator=g)
    eps = torch.randn(R, K, 2, generator=g, dtype=torch.float64)
    return xi, t, eps


def make_model(objective, xi, t, eps):
    """``x_r = theta + xi_r d`` with the draws ``t``, ``eps`` fixed by ``poutine.condition``;
    the plate's indices pick the rank's upstream samples and their draws."""

    def model():
        theta = pyro.param("theta", THETA0.clone())
        with pyro.plate("views", len(xi), dim=-2) as idx:
            x = theta + xi[idx].reshape(-1, 1, 1) * DIRECTION  # (R_i, 1, D)
            fixed = {"sds.t": t[idx], "sds.eps": eps[idx]}
            with pyro.plate("noise", K, dim=-1), poutine.condition(data=fixed):
                carv.teacher_term("sds", objective, x)

    return model


def _rank_values(rank: int) -> list[float]:
    g = torch.Generator().manual_seed(7 + rank)
    return (torch.rand(4 + 3 * rank, generator=g, dtype=torch.float64) * 10).tolist()


def _worker(rank: int, world: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    pyro.clear_param_store()
    objective = sds("sds")
    accountant = DistributedAccountant(every=1, window=50)
    loss = DistributedCARVLoss(carv.CARVLoss(accountant=accountant), outer_plate="views")
    grads, values, thetas = [], [], []
    for step in range(STEPS):
        xi, t, eps = fixed_draws(objective, step)
        model = make_model(objective, xi, t, eps)
        guide = carv.TimestepGuide(model)
        theta = pyro.param("theta", THETA0.clone()).unconstrained()
        values.append(loss.loss_and_grads(model, guide))
        grads.append(theta.grad.detach().clone())
        with torch.no_grad():  # an SGD step, as SVI would take it
            theta -= 0.1 * theta.grad
        theta.grad = None
        thetas.append(theta.detach().clone())
    vc = VarianceComponents()
    for v in _rank_values(rank):
        vc.update(v_within=v, v_between=v - 3.0)
    torch.save(
        {
            "grads": grads,
            "values": values,
            "thetas": thetas,
            "k_star": [h.get("k_star") for h in accountant.history],
            "components": accountant.components.state(),
            "merged": merge_components(vc).state(),
            "weight": loss.last_weight,
        },
        f"{out_dir}/rank{rank}.pt",
    )


def _single_process(objective, accountant=None):
    """The one-process reference: all R samples, the same draws, the same SGD steps."""
    pyro.clear_param_store()
    loss = carv.CARVLoss(accountant=accountant)
    grads, values, per_shard = [], [], []
    for step in range(STEPS):
        xi, t, eps = fixed_draws(objective, step)
        model = make_model(objective, xi, t, eps)
        guide = carv.TimestepGuide(model)
        theta = pyro.param("theta", THETA0.clone()).unconstrained()
        # per-shard quadrant estimates at the current theta (what each rank measures)
        for rank in range(WORLD):
            rows = shard_range(R, rank, WORLD)
            acc = Accountant(every=1, window=50)
            shard_loss = carv.CARVLoss(accountant=acc)
            sl = slice(rows.start, rows.stop)
            shard_model = make_model(objective, xi[sl], t[sl], eps[sl])
            shard_guide = carv.TimestepGuide(shard_model)
            saved = theta.grad
            theta.grad = None
            shard_loss.loss_and_grads(shard_model, shard_guide)
            theta.grad = saved
            m = acc._measurements[-1]
            per_shard.append((m.v_within, m.v_between))
        theta.grad = None
        values.append(loss.loss_and_grads(model, guide))
        grads.append(theta.grad.detach().clone())
        with torch.no_grad():
            theta -= 0.1 * theta.grad
        theta.grad = None
    return grads, values, per_shard


# fork: the children inherit the imports (spawn would re-import torch and pyro in each)
START = "fork" if "fork" in mp.get_all_start_methods() else "spawn"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    launch(_worker, WORLD, str(out), backend="gloo", start_method=START)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _adapting_worker(rank: int, world: int, out_dir: str) -> None:
    """Ranks that timed their steps differently must still choose the same ``K``."""
    torch.set_num_threads(1)
    acc = DistributedAccountant(
        adapt=True, every=1, window=50, min_measurements=1, k_range=(1, 16), tolerance=0.0
    )
    acc.last_R, acc.last_K, acc.k = 4, 4, 4
    # rank 0's teacher is launch-bound (flat in K: it would double K), rank 1's grows with K
    slope = 0.0 if rank == 0 else 0.1
    acc._step_times = {4: deque([0.2 + 4 * slope])}
    acc._teacher_times = {2: deque([0.05 + 2 * slope]), 4: deque([0.05 + 4 * slope])}
    # the rest of a step (0.15 s, 0.0375 s a view): a step at K = 4 costs it plus its teacher
    acc._outer_times.append(0.0375)
    acc._inner_times.append(0.001 + slope)
    local = Accountant(adapt=True, every=1, window=50, min_measurements=1, k_range=(1, 16))
    local.last_R, local.last_K, local.k, local.tolerance = 4, 4, 4, 0.0
    local._step_times, local._teacher_times = dict(acc._step_times), dict(acc._teacher_times)
    local._outer_times.append(0.0375)
    local._inner_times.append(0.001 + slope)
    # on rank 1's curve K = 4 is the optimum: (0.12 + 1/4) 0.6 < (0.12 + 1/5) 0.7, (0.12 + 1/3) 0.5
    local.observe_measurement(v_within=1.0, v_between=0.12)
    acc.observe_measurement(v_within=1.0, v_between=0.12)
    torch.save(
        {
            "k": acc.k,
            "local_k": local.k,
            "step_costs": acc.step_costs,
            "teacher_costs": acc.teacher_costs,
        },
        f"{out_dir}/rank{rank}.pt",
    )


def test_ranks_with_different_cost_curves_choose_the_same_k(tmp_path):
    launch(_adapting_worker, WORLD, str(tmp_path), backend="gloo", start_method=START)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    # alone, rank 0 would double K (its teacher is free) and rank 1 would keep it
    assert [r["local_k"] for r in res] == [8, 4]
    # pooled, both decide on the slowest rank's curve: a synchronous step waits for it
    assert [r["k"] for r in res] == [4, 4]
    for r in res:
        assert r["step_costs"] == pytest.approx({4: 0.6})
        assert r["teacher_costs"] == pytest.approx({2: 0.25, 4: 0.45})


def _overhead_worker(rank: int, world: int, out_dir: str) -> None:
    """Ranks whose measuring steps cost differently must still measure on the same steps."""
    torch.set_num_threads(1)
    kwargs = dict(adapt=False, every=2, max_every=1000, max_overhead=0.1, window=50)
    acc, local = DistributedAccountant(**kwargs), Accountant(**kwargs)
    for a in (acc, local):
        a.last_R, a.last_K = 4, 2
        a._step_times = {2: deque([1.0])}
        a._teacher_times = {2: deque([0.1])}
        a._outer_times.append(0.225)
        a._inner_times.append(0.0125)
        # rank 1's measuring step costs more than rank 0's: 3 and 5 plain steps
        a._measuring_times.append(3.0 if rank == 0 else 5.0)
        a.observe_measurement(v_within=1.0, v_between=0.1)
    torch.save(
        {"next": acc._next_measure, "local_next": local._next_measure}, f"{out_dir}/rank{rank}.pt"
    )


def test_ranks_whose_measuring_steps_cost_differently_measure_on_the_same_steps(tmp_path):
    launch(_overhead_worker, WORLD, str(tmp_path), backend="gloo", start_method=START)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    # alone, rank 0 would wait 1 + 2 / 0.1 steps and rank 1 1 + 4 / 0.1: pooled, the dearest
    assert [r["local_next"] for r in res] == [21, 41]
    assert [r["next"] for r in res] == [41, 41]


# -- faults ------------------------------------------------------------------------------------


class _ShardFails(Exception):
    """What the model raises on one rank's shard (as a NonFiniteTeacherError would)."""


def _fault_model(objective, step: int, fail_on: int | None):
    xi, t, eps = fixed_draws(objective, step)
    inner = make_model(objective, xi, t, eps)

    def model():
        if fail_on is not None and torch.distributed.get_rank() == fail_on:
            pyro.param("theta", THETA0.clone())
            raise _ShardFails(f"bad shard on rank {fail_on}")
        inner()

    return model


def _fault_worker(rank: int, world: int, out_dir: str) -> None:
    """Three scenarios in one process group: out of step, a failing shard, then a normal step."""
    torch.set_num_threads(1)
    pyro.clear_param_store()
    objective = sds("sds")
    loss = DistributedCARVLoss(carv.CARVLoss(), outer_plate="views")
    theta = pyro.param("theta", THETA0.clone()).unconstrained()
    res: dict = {}
    # 1. resumed from different checkpoints: rank 0 at step 8, rank 1 at step 7
    loss.step = 8 - rank
    model = _fault_model(objective, 0, None)
    try:
        loss.loss_and_grads(model, carv.TimestepGuide(model))
    except OutOfStepError as error:
        res["out_of_step"] = str(error)
    res["grad_after_out_of_step"] = theta.grad
    # 2. in step again; rank 1's shard raises: both ranks raise, neither combines a gradient
    loss.step = 3
    model = _fault_model(objective, 1, fail_on=1)
    try:
        loss.loss_and_grads(model, carv.TimestepGuide(model))
    except (_ShardFails, RankFailedError) as error:
        res["failed"] = (type(error).__name__, str(error), getattr(error, "ranks", None))
    res["grad_after_failure"] = theta.grad
    # 3. a loop that caught the error goes on: the next step runs, in step on both ranks
    model = _fault_model(objective, 2, None)
    res["value"] = loss.loss_and_grads(model, carv.TimestepGuide(model))
    res["grad"] = theta.grad.detach().clone()
    res["step"] = loss.step
    torch.save(res, f"{out_dir}/rank{rank}.pt")


def _hang_worker(rank: int, world: int, out_dir: str, hang_s: float) -> None:
    """Rank 1 never reaches the collective (it hangs, then leaves); rank 0 must fail in time."""
    torch.set_num_threads(1)
    if rank == 1:
        time.sleep(hang_s)
        return
    pyro.clear_param_store()
    objective = sds("sds")
    loss = DistributedCARVLoss(carv.CARVLoss(), outer_plate="views")
    model = _fault_model(objective, 0, None)
    t0 = time.monotonic()
    try:
        loss.loss_and_grads(model, carv.TimestepGuide(model))
        res = {"error": None}
    except RankTimeoutError as error:
        res = {"error": str(error), "ranks": error.ranks}
    res["elapsed"] = time.monotonic() - t0
    torch.save(res, f"{out_dir}/rank{rank}.pt")


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults")
    launch(_fault_worker, WORLD, str(out), backend="gloo", start_method=START, timeout_s=20.0)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_ranks_out_of_step_raise_on_every_rank_naming_the_steps(faults):
    for res in faults:
        msg = res["out_of_step"]
        assert "rank 1 is at step 7, rank 0 is at step 8" in msg
        assert "skipped a step" in msg and "every rank must call loss_and_grads" in msg
        assert res["grad_after_out_of_step"] is None  # nothing combined, no partial gradient


def test_a_step_that_raises_on_one_rank_raises_on_every_rank_and_keeps_them_in_step(faults):
    kind0, msg0, ranks0 = faults[0]["failed"]
    kind1, msg1, _ = faults[1]["failed"]
    assert kind0 == "RankFailedError" and ranks0 == [1] and "rank(s) [1] at step 3" in msg0
    assert kind1 == "_ShardFails" and "bad shard on rank 1" in msg1
    for res in faults:
        assert res["grad_after_failure"] is None
        assert res["step"] == 5
    # the next step is the ordinary all-reduced step: the same gradient and loss on both ranks
    assert torch.equal(faults[0]["grad"], faults[1]["grad"])
    assert faults[0]["value"] == faults[1]["value"]


def test_a_rank_that_never_reaches_the_collective_is_named_within_the_timeout(tmp_path):
    timeout_s, hang_s = 1.0, 3.5
    t0 = time.monotonic()
    launch(
        _hang_worker,
        WORLD,
        str(tmp_path),
        hang_s,
        backend="gloo",
        start_method=START,
        timeout_s=timeout_s,
    )
    res = torch.load(tmp_path / "rank0.pt", weights_only=False)
    assert res["error"] is not None, "rank 0 did not notice that rank 1 never answered"
    assert res["ranks"] == [1]
    assert "rank(s) [1] stopped answering" in res["error"]
    assert "rank 1 never reached a step" in res["error"] and "is at step 0" in res["error"]
    assert res["elapsed"] < hang_s - 1.0, res["elapsed"]  # the timeout, not rank 1 leaving
    assert time.monotonic() - t0 < hang_s + 10.0


def test_timeouts_are_short_by_default_and_checked():
    assert DEFAULT_TIMEOUT_S <= 60.0
    for bad in (0, -1.0, float("inf"), "60", True):
        with pytest.raises(ValueError, match="timeout_s"):
            init_from_env(timeout_s=bad)
        with pytest.raises(ValueError, match="timeout_s"):
            launch(_hang_worker, 2, timeout_s=bad)
    with pytest.raises(ValueError, match="world_size"):
        launch(_hang_worker, 0)
    with pytest.raises(ValueError, match="backend"):
        init_from_env(backend="mpi2")


def test_shards_cover_the_plate_in_rank_order():
    shards = [shard_range(R, r, WORLD) for r in range(WORLD)]
    assert [list(s) for s in shards] == [[0, 1, 2], [3, 4]]
    assert sum(shard_size(10, r, 3) for r in range(3)) == 10
    with pytest.raises(ValueError, match="at least one"):
        shard_range(1, 0, 2)


def test_all_reduced_gradient_equals_the_single_process_gradient(results):
    objective = sds("sds")
    want_grads, want_values, _ = _single_process(objective)
    for res in results:
        for got, want in zip(res["grads"], want_grads):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        for got, want in zip(res["values"], want_values):
            assert math.isclose(got, want, rel_tol=1e-10)
    # the ranks took their own shard sizes as weights and ended on the same parameters
    assert [res["weight"] for res in results] == [3.0, 2.0]
    for a, b in zip(results[0]["thetas"], results[1]["thetas"]):
        assert torch.equal(a, b)


def test_pooled_statistics_equal_one_accumulator_over_every_ranks_estimates(results):
    objective = sds("sds")
    _, _, per_shard = _single_process(objective)
    single = VarianceComponents()
    for v_within, v_between in per_shard:  # step by step, rank 0 then rank 1
        single.update(v_within, v_between)
    for res in results:
        got = res["components"]
        assert got[0] == single.n_within and got[3] == single.n_outer
        torch.testing.assert_close(torch.tensor(got), torch.tensor(single.state()))
    # every rank computed the same K* from the pooled statistics and rank-averaged costs
    assert results[0]["k_star"] == results[1]["k_star"]
    assert len(results[0]["k_star"]) == STEPS and math.isfinite(results[0]["k_star"][-1])


def test_merge_components_equals_the_single_stream(results):
    single = VarianceComponents()
    for rank in range(WORLD):
        for v in _rank_values(rank):
            single.update(v_within=v, v_between=v - 3.0)
    for res in results:
        torch.testing.assert_close(
            torch.tensor(res["merged"]), torch.tensor(single.state()), rtol=1e-12, atol=1e-12
        )


def test_single_process_fallbacks_are_identities():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    assert all_reduce_gradients([p], 5.0, extra=[1.5]) == [1.5]
    assert torch.equal(p.grad, torch.full((3,), 2.0))
    vc = VarianceComponents()
    vc.update(1.0, 2.0)
    assert merge_components(vc).state() == vc.state()
    with pytest.raises(NotImplementedError):
        DistributedCARVLoss(carv.CARVLoss()).differentiable_loss(None, None)
