"""Outer samples sharded over 2 CPU processes (gloo) equal the single-process estimator.

With fixed upstream samples and fixed ``(t, eps)`` draws, rank ``i`` sees the contiguous shard
``shard_range(R)[i]`` of the same draws, so the all-reduced gradient must equal the one-process
gradient over all ``R`` samples (to rounding), and the pooled accounting statistics must equal
one accumulator fed with every rank's per-step estimates.
"""

from __future__ import annotations

import math

import pyro
import pytest
import torch
import torch.multiprocessing as mp
from pyro import poutine

import carv_pyro as carv
from carv_pyro.accounting import Accountant, VarianceComponents
from carv_pyro.distributed import (
    DistributedAccountant,
    DistributedCARVLoss,
    all_reduce_gradients,
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


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    # fork: the children inherit the imports (spawn would re-import torch and pyro in each)
    start = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    launch(_worker, WORLD, str(out), backend="gloo", start_method=start)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


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
