"""Outer samples sharded across processes with ``torch.distributed``.

The hierarchical estimator averages over ``R`` upstream samples (the outer plate). With ``W``
processes (one per GPU under NCCL, or CPU processes under gloo), rank ``i`` takes a contiguous
shard of ``R_i`` of them (`shard_size`, `shard_range`), runs the ordinary
[`CARVLoss`][carv_pyro.CARVLoss] step on its shard, and the gradients are combined as

    grad = sum_i R_i grad_i / sum_i R_i,

one all-reduce of a flat buffer per step. Each rank's ``grad_i`` is the plate average over its
``R_i`` upstream samples (times ``K`` inner draws), so ``grad`` equals, to rounding, the
single-process estimate over all ``R`` samples with the same draws.

**How the model gets its shard.** `DistributedCARVLoss` takes the outer plate's name and
runs the model under `ShardMessenger`: ``pyro.plate("views", R)`` then yields this rank's
indices ``range(start_i, stop_i)`` instead of ``range(R)``, so

- upstream randomness drawn inside the plate (camera poses) is drawn ``R_i`` times per rank;
  give every rank its own random stream with `seed_rank` so the shards are independent;
- data indexed by the plate (``with pyro.plate("views", R) as idx: x = data[idx]``) is sharded
  without further code.

A model may instead size its plate itself with `shard_size` (and pass
``outer_plate=None``).

**Accounting.** `DistributedAccountant` is an [`Accountant`][carv_pyro.accounting.Accountant]
whose measurements are gathered from all ranks (every rank pools every rank's per-step
estimates of ``V_w`` and ``V_b``, as one accountant would that saw all the streams) and whose
costs are averaged over ranks, so every rank computes the same ``K*`` and sets the same ``K``.
`merge_components` merges any [`VarianceComponents`][carv_pyro.accounting.VarianceComponents] across
ranks (all-gather of [`state`][carv_pyro.accounting.VarianceComponents.state], then
[`merge`][carv_pyro.accounting.VarianceComponents.merge]).

Example (``torchrun --nproc_per_node=2 train.py``)::

    device = carv_pyro.distributed.init_from_env()        # NCCL on GPUs, gloo on CPUs
    carv_pyro.distributed.seed_rank(0)
    loss = DistributedCARVLoss(carv.CARVLoss(accountant=DistributedAccountant()), outer_plate="views")
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), loss=loss)
    for step in range(n_steps):
        svi.step()                                         # same parameters on every rank

Host synchronisation: the all-reduce is a collective; under NCCL it is enqueued on the GPU and
the host only waits where the loss value is read (as in the single-process step).
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
from collections import deque
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

import pyro
import torch
import torch.distributed as dist
from pyro import poutine
from pyro.infer.elbo import ELBO
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
from torch import Tensor

from ..accounting import Accountant, VarianceComponents, _Measurement

__all__ = [
    "DistributedAccountant",
    "DistributedCARVLoss",
    "ShardMessenger",
    "all_reduce_gradients",
    "init_from_env",
    "launch",
    "merge_components",
    "rank_and_world",
    "seed_rank",
    "shard_range",
    "shard_size",
]


# -- process group helpers ---------------------------------------------------------------------


def rank_and_world(group: Any = None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group``; ``(0, 1)`` without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def _comm_device(group: Any = None) -> torch.device:
    """Where collective buffers live: the current CUDA device under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard_range(total: int, rank: int | None = None, world_size: int | None = None) -> range:
    """This rank's contiguous block of ``range(total)``.

    The first ``total % world_size`` ranks get one sample more; shards are in rank order, so
    concatenating them gives ``range(total)``.

    Args:
        total: ``R``, outer samples over all ranks.
        rank: default: this process's rank.
        world_size: default: the process group's size (1 without one).

    Returns:
        ``range(start, stop)``.

    Raises:
        ValueError: if ``total < world_size`` (a rank would get no sample) or on bad arguments.
    """
    r, w = rank_and_world()
    rank = r if rank is None else rank
    world_size = w if world_size is None else world_size
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise ValueError(f"total must be a positive int, got {total!r}")
    if not (isinstance(world_size, int) and world_size >= 1 and 0 <= rank < world_size):
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if total < world_size:
        raise ValueError(
            f"cannot shard {total} outer samples over {world_size} processes: every rank needs "
            f"at least one"
        )
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def shard_size(total: int, rank: int | None = None, world_size: int | None = None) -> int:
    """``R_i``: how many of ``total`` outer samples this rank takes (see `shard_range`)."""
    return len(shard_range(total, rank, world_size))


def seed_rank(seed: int, group: Any = None) -> int:
    """Seed Pyro, torch and numpy with ``seed + rank`` so that every rank draws independently.

    Returns:
        the seed used on this rank.
    """
    rank, _ = rank_and_world(group)
    pyro.set_rng_seed(seed + rank)
    return seed + rank


def init_from_env(backend: str | None = None, timeout_s: float = 600.0) -> torch.device:
    """Initialise the default process group from ``torchrun``'s environment variables.

    Uses NCCL when CUDA is available (one GPU per process: ``LOCAL_RANK``), else gloo. Without
    ``WORLD_SIZE`` in the environment (a plain ``python script.py``) nothing is initialised and
    the script runs as one process.

    Args:
        backend: ``"nccl"`` or ``"gloo"``; default by device.
        timeout_s: collective timeout.

    Returns:
        this process's device (``cuda:LOCAL_RANK`` or ``cpu``).
    """
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        backend = backend or ("nccl" if use_cuda else "gloo")
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    return device


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launched(rank, fn, world_size, backend, port, timeout_s, args) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group(
        backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
    )
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def launch(
    fn: Callable[..., None],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    timeout_s: float = 120.0,
    start_method: str = "spawn",
) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` new processes on this machine.

    Each process joins a process group on ``127.0.0.1`` (a free port) before ``fn`` runs and
    leaves it afterwards. For tests and CPU runs; on GPUs prefer ``torchrun`` with
    `init_from_env`.

    Args:
        fn: a module-level function (it is pickled by name under ``"spawn"``).
        world_size: number of processes.
        *args: passed to ``fn`` after ``(rank, world_size)``.
        backend: ``"gloo"`` (CPU) or ``"nccl"``.
        timeout_s: collective timeout.
        start_method: ``"spawn"`` (fresh interpreters; safe with CUDA and threads) or
            ``"fork"`` (POSIX only: the children inherit the imported modules and start in
            well under a second; only for CPU work in a single-threaded parent).

    Raises:
        torch.multiprocessing.ProcessRaisedException: if a process raises.
    """
    import torch.multiprocessing as mp

    port = _free_port()
    mp.start_processes(
        _launched,
        args=(fn, world_size, backend, port, timeout_s, args),
        nprocs=world_size,
        join=True,
        start_method=start_method,
    )


# -- collectives -------------------------------------------------------------------------------


def all_reduce_gradients(
    params: Iterable[Tensor],
    weight: float = 1.0,
    *,
    extra: Iterable[float] = (),
    group: Any = None,
) -> list[float]:
    """Replace every ``p.grad`` by the ``weight``-weighted average over ranks, in place.

    ``p.grad <- sum_i weight_i p.grad_i / sum_i weight_i``, with one all-reduce of a flat buffer
    (the gradients, the ``extra`` numbers and the weight). A parameter without ``.grad`` on a
    rank counts as a zero gradient there. Every rank must pass the same parameters in the same
    order.

    Args:
        params: the parameters (``.grad`` of each is read and written).
        weight: this rank's weight, e.g. its number of outer samples ``R_i``.
        extra: numbers averaged the same way (e.g. the loss value).
        group: the process group (default: the world).

    Returns:
        the averaged ``extra`` numbers (empty without ``extra``).
    """
    params = list(params)
    extra = [float(e) for e in extra]
    _, world = rank_and_world(group)
    if world == 1:
        return extra
    device = _comm_device(group)
    dtype = torch.float32
    for p in params:
        dtype = torch.promote_types(dtype, p.dtype)
    if not weight > 0 or not math.isfinite(weight):
        raise ValueError(f"weight must be a positive finite number, got {weight!r}")
    pieces = [
        (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(device, dtype)
        for p in params
    ]
    tail = torch.tensor(extra + [1.0], dtype=dtype, device=device)
    flat = torch.cat(pieces + [tail]) * weight
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat = flat / flat[-1]
    offset = 0
    for p in params:
        n = p.numel()
        g = flat[offset : offset + n].reshape(p.shape).to(p.device, p.dtype)
        if p.grad is None:
            p.grad = g
        else:
            p.grad.copy_(g)
        offset += n
    return flat[offset:-1].tolist() if extra else []


def merge_components(components: VarianceComponents, group: Any = None) -> VarianceComponents:
    """All ranks' [`VarianceComponents`][carv_pyro.accounting.VarianceComponents] merged, in rank order.

    Equals (to rounding) one accumulator that saw every rank's estimates. Collective: every rank
    must call it.

    Returns:
        a new merged accumulator (the same on every rank).
    """
    _, world = rank_and_world(group)
    local = torch.tensor(components.state(), dtype=torch.float64, device=_comm_device(group))
    if world == 1:
        return VarianceComponents.from_state(local.tolist())
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local, group=group)
    merged = VarianceComponents()
    for state in gathered:
        merged.merge(VarianceComponents.from_state(state.tolist()))
    return merged


# -- plate sharding ----------------------------------------------------------------------------


class ShardMessenger(Messenger):
    """Runs a model with the plate ``name`` restricted to this rank's shard.

    ``pyro.plate(name, R)`` yields ``range(start_i, stop_i)`` (`shard_range`) instead of
    ``range(R)``: its batch size becomes ``R_i``, and indexing data with the plate's indices
    selects the shard.

    Args:
        name: the outer plate's name.
        group: the process group (default: the world).

    Attributes:
        last_shard: the ``range`` used the last time the plate was entered.
    """

    def __init__(self, name: str, group: Any = None):
        super().__init__()
        self.name = name
        self.group = group
        self.last_shard: range | None = None

    def _pyro_sample(self, msg) -> None:
        if isinstance(msg["fn"], _Subsample) and msg["name"] == self.name:
            fn = msg["fn"]
            if fn.subsample_size is not None and fn.subsample_size < fn.size:
                raise ValueError(
                    f"plate {self.name!r} is subsampled already (subsample_size="
                    f"{fn.subsample_size}); shard the full plate instead"
                )
            rank, world = rank_and_world(self.group)
            shard = shard_range(int(fn.size), rank, world)
            self.last_shard = shard
            msg["value"] = torch.arange(shard.start, shard.stop, device=getattr(fn, "device", None))


# -- the accountant ----------------------------------------------------------------------------


class DistributedAccountant(Accountant):
    """An [`Accountant`][carv_pyro.accounting.Accountant] that pools every rank's measurements.

    On a measuring step each rank contributes its per-step estimates of ``V_w`` and ``V_b`` and
    its cost medians; an all-gather gives every rank all of them, in rank order. The window then
    holds ``window * world_size`` measurements (``window`` steps of every rank), the costs are
    the averages over ranks, and ``K*`` (and the adapted ``K``) is the same on every rank.

    Takes [`Accountant`][carv_pyro.accounting.Accountant]'s arguments, plus ``group``.
    """

    def __init__(self, *args: Any, group: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.group = group
        self._merged_costs: tuple[float, float] | None = None

    def observe_measurement(self, v_within: float | None, v_between: float | None) -> None:
        """Gather every rank's estimates (collective), then pool them as one accountant."""
        _, world = rank_and_world(self.group)
        if world == 1:
            super().observe_measurement(v_within, v_between)
            return
        if self._measurements.maxlen != self.window * world:
            self._measurements = deque(self._measurements, maxlen=self.window * world)
        c_outer, c_inner = self._local_costs()
        nan = math.nan
        local = torch.tensor(
            [
                nan if v_within is None else v_within,
                nan if v_between is None else v_between,
                c_outer,
                c_inner,
            ],
            dtype=torch.float64,
            device=_comm_device(self.group),
        )
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local, group=self.group)
        rows = [g.tolist() for g in gathered]
        costs = [(r[2], r[3]) for r in rows if math.isfinite(r[2]) and math.isfinite(r[3])]
        if costs:
            self._merged_costs = (
                sum(c[0] for c in costs) / len(costs),
                sum(c[1] for c in costs) / len(costs),
            )

        def opt(v: float) -> float | None:
            return None if math.isnan(v) else v

        for r in rows[:-1]:
            self._measurements.append(_Measurement(self.step, opt(r[0]), opt(r[1])))
        super().observe_measurement(opt(rows[-1][0]), opt(rows[-1][1]))

    def _local_costs(self) -> tuple[float, float]:
        return super().cost_estimates()

    def cost_estimates(self) -> tuple[float, float]:
        """Declared costs, else the rank-averaged costs of the last measurement, else local."""
        if self.costs is None and self._merged_costs is not None:
            return self._merged_costs
        return super().cost_estimates()


# -- the loss ----------------------------------------------------------------------------------


class DistributedCARVLoss(ELBO):
    """A [`CARVLoss`][carv_pyro.CARVLoss] whose outer plate is sharded across processes.

    Use it in place of the wrapped loss in ``SVI``. Each step, every rank runs the wrapped loss
    on its shard of the outer plate (see the module docstring), then one all-reduce replaces
    every parameter's ``.grad`` by the shard-size-weighted average over ranks, so that all ranks
    hold the gradient of the single-process estimator over the full plate and take the same
    optimiser step. The returned loss is averaged the same way.

    Args:
        loss: the per-rank [`CARVLoss`][carv_pyro.CARVLoss]. Give it a
            `DistributedAccountant` to pool the accounting across ranks (a plain
            [`Accountant`][carv_pyro.accounting.Accountant] is refused when ``world_size > 1``: ranks
            would choose different ``K``).
        outer_plate: name of the plate to shard; ``None`` if the model sizes its own shard
            (e.g. with `shard_size`).
        term: the teacher term whose outer size weights the average (default: the first).
        group: the process group (default: the world).

    Raises:
        TypeError: if ``loss`` is not an ELBO with ``loss_and_grads``.
        ValueError: if the loss has a non-distributed accountant in a multi-process run.
    """

    def __init__(
        self,
        loss: ELBO,
        *,
        outer_plate: str | None = None,
        term: str | None = None,
        group: Any = None,
    ):
        if not isinstance(loss, ELBO):
            raise TypeError(f"loss must be a CARVLoss (an ELBO), got {type(loss).__name__}")
        acc = getattr(loss, "accountant", None)
        _, world = rank_and_world(group)
        if acc is not None and world > 1 and not isinstance(acc, DistributedAccountant):
            raise ValueError(
                "the wrapped loss has a plain Accountant; with several processes use "
                "carv_pyro.distributed.DistributedAccountant so that every rank pools the same "
                "statistics and chooses the same K"
            )
        super().__init__(num_particles=1)
        self.inner = loss
        self.outer_plate = outer_plate
        self.term = term
        self.group = group
        self.last_weight: float = 1.0

    # the wrapped loss's diagnostics, for logging
    @property
    def diagnostics(self):
        return self.inner.diagnostics

    @property
    def last_records(self):
        return self.inner.last_records

    @property
    def accountant(self):
        return getattr(self.inner, "accountant", None)

    def summary(self) -> dict[str, float]:
        """The wrapped loss's [`summary`][carv_pyro.CARVLoss.summary] (this rank's diagnostics)."""
        return self.inner.summary()

    def _shard(self):
        if self.outer_plate is None:
            return contextlib.nullcontext()
        return ShardMessenger(self.outer_plate, self.group)

    def _weight(self) -> float:
        records = self.inner.last_records
        if not records:
            return 1.0
        for record in records:
            if self.term is None or record.name == self.term:
                return float(record.n_outer)
        raise ValueError(f"term {self.term!r} not among {[r.name for r in records]}")

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """This rank's step on its shard, then the all-reduce of gradients and loss.

        Returns:
            float: the loss averaged over ranks (the same on every rank).
        """
        with poutine.trace(param_only=True) as capture, self._shard():
            value = self.inner.loss_and_grads(model, guide, *args, **kwargs)
        sites = sorted(capture.trace.nodes.items())
        params = [site["value"].unconstrained() for _, site in sites]
        params = [p for p in params if p.requires_grad]
        self.last_weight = self._weight()
        (value,) = all_reduce_gradients(params, self.last_weight, extra=[value], group=self.group)
        return value

    def loss(self, model, guide, *args, **kwargs) -> float:
        """The loss averaged over ranks (collective)."""
        with self._shard():
            value = self.inner.loss(model, guide, *args, **kwargs)
        self.last_weight = self._weight()
        (value,) = all_reduce_gradients([], self.last_weight, extra=[value], group=self.group)
        return value

    def _get_trace(self, model, guide, args, kwargs):
        return self.inner._get_trace(model, guide, args, kwargs)

    def differentiable_loss(self, model, guide, *args, **kwargs):
        """Not supported: gradients are combined after backward. Use `loss_and_grads`, or
        call `all_reduce_gradients` after your own backward."""
        raise NotImplementedError(
            "DistributedCARVLoss combines gradients after backward; use loss_and_grads (as SVI "
            "does) or the wrapped loss's differentiable_loss followed by all_reduce_gradients"
        )
