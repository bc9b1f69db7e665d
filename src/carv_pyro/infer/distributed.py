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

**Global stratification across ranks.** With ``stratify="global"`` (or ``"auto"`` at ``K = 1``)
the ``R K`` timestep draws of a step are one stratified design: one draw in each of ``R K``
equal-probability strata of ``q``. A guide whose source is a `SharedStrataSource` draws that
design over all ranks' draws from a stream that is the same on every rank and keeps its own
shard of it (one all-gather of a count per step), so the union of the ranks' draws is the
single-process design; its other draws (noise) come from the rank's own seed.

**Accounting.** `DistributedAccountant` is an [`Accountant`][carv_pyro.accounting.Accountant]
whose measurements are gathered from all ranks (every rank pools every rank's per-step
estimates of ``V_w`` and ``V_b``, as one accountant would that saw all the streams) and whose
costs are gathered too (``c_outer`` and ``c_inner`` averaged over ranks, the cost of a step at
each ``K`` the slowest rank's), so every rank computes the same ``K*`` and sets the same ``K``.
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

**Faults: timeouts, a rank that stopped answering, ranks out of step.** Every collective here
waits at most the process group's timeout, `DEFAULT_TIMEOUT_S` (60 s) unless
`init_from_env` / `launch` are given another ``timeout_s``. When it runs out (or a peer's
connection closes), the error is a `RankTimeoutError` that names the ranks that did not answer
and the last step each of them reported (every rank records its step in the process group's
store before its collectives), instead of the backend's bare timeout.

`DistributedCARVLoss` counts its calls (``step``) and checks, with one small extra all-reduce
per step, that every rank is at the same step and in the same method before any gradient is
combined. Every rank must call ``loss_and_grads`` for every step: a rank that skipped one (or
resumed from another checkpoint) makes every rank raise `OutOfStepError` ("rank 1 is at step 7,
rank 0 at step 8 ..."), never a silently mis-paired all-reduce. If the wrapped loss raises on
some ranks only (e.g. a `NonFiniteTeacherError` on one shard), that rank still takes part in
the check and re-raises its own error, and every other rank raises `RankFailedError` naming
it, so a loop that catches the error and goes on stays in step on every rank.

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

from .. import _checks
from ..accounting import Accountant, VarianceComponents, _Measurement
from .samplers import RandomSource

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DistributedAccountant",
    "DistributedCARVLoss",
    "OutOfStepError",
    "RankFailedError",
    "RankTimeoutError",
    "ShardMessenger",
    "SharedStrataSource",
    "all_reduce_gradients",
    "init_from_env",
    "launch",
    "merge_components",
    "rank_and_world",
    "seed_rank",
    "shard_range",
    "shard_size",
]


#: Default collective timeout, in seconds, of `init_from_env` and `launch`. Short on purpose:
#: torch's own default (10 min, 30 min under NCCL) keeps every other rank blocked that long
#: when one rank hangs or dies; a healthy step of this library's collectives (one all-reduce of
#: the gradients) takes milliseconds, so 60 s is ample while a fault surfaces within a minute.
#: Raise it for very slow steps between collectives, e.g. a long evaluation on one rank only.
DEFAULT_TIMEOUT_S = 60.0

_HEARTBEAT_KEY = "carv_pyro/step/{rank}"
_TIMEOUT_S: float | None = None  # set by init_from_env / launch, for error messages


class RankTimeoutError(RuntimeError):
    """A collective timed out (or lost a peer): names the ranks that stopped answering.

    Attributes:
        ranks: the ranks that had not reached the collective (as far as the store tells).
    """

    def __init__(self, message: str, ranks: list[int]):
        super().__init__(message)
        self.ranks = ranks


class OutOfStepError(RuntimeError):
    """Ranks called `DistributedCARVLoss` at different steps (or different methods)."""


class RankFailedError(RuntimeError):
    """The wrapped loss raised on other ranks at this step (they re-raise their own error).

    Attributes:
        ranks: the ranks whose step raised.
    """

    def __init__(self, message: str, ranks: list[int]):
        super().__init__(message)
        self.ranks = ranks


def _store() -> Any:
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no store: heartbeats are best effort
        return None


def _heartbeat(step: int) -> None:
    """Record this rank's step in the default store (read back when a collective times out)."""
    store = _store()
    if store is None:
        return
    with contextlib.suppress(Exception):
        store.set(_HEARTBEAT_KEY.format(rank=dist.get_rank()), str(step))


def _heartbeats(world: int) -> dict[int, int | None] | None:
    """Every rank's last recorded step (``None``: never recorded); ``None`` if no store answers."""
    store = _store()
    if store is None:
        return None
    steps: dict[int, int | None] = {}
    try:
        for r in range(world):
            key = _HEARTBEAT_KEY.format(rank=r)
            steps[r] = int(store.get(key)) if store.check([key]) else None
    except Exception:  # noqa: BLE001 - the store's host (rank 0) may be gone
        return None
    return steps


def _collective(what: str, fn: Callable[[], Any], group: Any = None, step: int | None = None):
    """Run the collective ``fn``; on a timeout or a lost peer raise `RankTimeoutError`.

    The ranks named are those whose last recorded step (see `_heartbeat`) is behind this rank's
    ``step``, or that never recorded one; without step information (or a store) every other
    rank is named as a suspect.
    """
    try:
        return fn()
    except RuntimeError as error:  # DistBackendError and gloo/NCCL timeouts are RuntimeErrors
        rank, world = rank_and_world(group)
        others = [r for r in range(world) if r != rank]
        seen = _heartbeats(world)
        timeout = _group_timeout(group)
        after = f" after {timeout:g} s" if timeout is not None else ""
        if seen is None:
            ranks = others
            detail = (
                f"rank(s) {others} did not answer and the process group's store cannot be "
                f"reached (rank 0 hosts it and may have exited)"
            )
        else:
            ranks = [
                r for r in others if seen[r] is None or (step is not None and seen[r] < step)
            ] or others
            where = ", ".join(
                f"rank {r} "
                + ("never reached a step" if seen[r] is None else f"last at step {seen[r]}")
                for r in ranks
            )
            here = "" if step is None else f" (this rank, {rank}, is at step {step})"
            detail = f"rank(s) {ranks} stopped answering: {where}{here}"
        raise RankTimeoutError(
            f"{what} on rank {rank} failed{after}: {detail}. A rank that hangs, dies or skips "
            f"a collective blocks the others; see the timeout_s of init_from_env/launch "
            f"(default {DEFAULT_TIMEOUT_S:g} s). Backend error: {error}",
            ranks,
        ) from error


def _group_timeout(group: Any = None) -> float | None:
    """The timeout this module gave the process group (``None`` if another code created it)."""
    return _TIMEOUT_S


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


def init_from_env(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> torch.device:
    """Initialise the default process group from ``torchrun``'s environment variables.

    Uses NCCL when CUDA is available (one GPU per process: ``LOCAL_RANK``), else gloo. Without
    ``WORLD_SIZE`` in the environment (a plain ``python script.py``) nothing is initialised and
    the script runs as one process.

    Args:
        backend: ``"nccl"`` or ``"gloo"``; default by device.
        timeout_s: how long a collective waits for the other ranks before it raises (a
            `RankTimeoutError` naming the ranks that did not answer). The default,
            `DEFAULT_TIMEOUT_S` = 60 s, is short on purpose: a hung or dead rank should stop
            the run within a minute, not after torch's 10 (or 30) minutes; raise it if one
            rank does long work between collectives that the others wait for.

    Returns:
        this process's device (``cuda:LOCAL_RANK`` or ``cpu``).

    Raises:
        ValueError: on a ``backend`` other than ``"nccl"``, ``"gloo"`` or ``None``, or a
            ``timeout_s`` that is not a positive number.
    """
    if backend is not None:
        _checks.choice("backend", backend, ("nccl", "gloo"))
    timeout_s = _checks.positive_float("timeout_s", timeout_s)
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        backend = backend or ("nccl" if use_cuda else "gloo")
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)
        global _TIMEOUT_S
        _TIMEOUT_S = timeout_s
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
    global _TIMEOUT_S
    _TIMEOUT_S = timeout_s
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def launch(
    fn: Callable[..., None],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    timeout_s: float = DEFAULT_TIMEOUT_S,
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
        timeout_s: how long a collective waits for the other ranks (default
            `DEFAULT_TIMEOUT_S`, short on purpose: see `init_from_env`).
        start_method: ``"spawn"`` (fresh interpreters; safe with CUDA and threads) or
            ``"fork"`` (POSIX only: the children inherit the imported modules and start in
            well under a second; only for CPU work in a single-threaded parent).

    Raises:
        torch.multiprocessing.ProcessRaisedException: if a process raises.
        ValueError: on a bad ``world_size``, ``backend``, ``timeout_s`` or ``start_method``.
    """
    import torch.multiprocessing as mp

    _checks.positive_int("world_size", world_size)
    _checks.choice("backend", backend, ("nccl", "gloo"))
    timeout_s = _checks.positive_float("timeout_s", timeout_s)
    _checks.choice("start_method", start_method, mp.get_all_start_methods())
    if not callable(fn):
        raise TypeError(f"fn must be a callable (rank, world_size, *args), got {fn!r:.80}")

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
    step: int | None = None,
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
        step: this rank's step, for the message of a `RankTimeoutError`.

    Returns:
        the averaged ``extra`` numbers (empty without ``extra``).

    Raises:
        RankTimeoutError: if the all-reduce times out or loses a peer (names the ranks).
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
    _collective(
        "the gradient all-reduce",
        lambda: dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group),
        group,
        step,
    )
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
    _collective("merge_components", lambda: dist.all_gather(gathered, local, group=group), group)
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


class SharedStrataSource(RandomSource):
    """A rank's [`RandomSource`][carv_pyro.infer.samplers.RandomSource] whose global strata
    span all ranks.

    Every draw comes from this rank's own ``seed`` except the ``"global"`` stratified design:
    `global_strata` gathers every rank's number of draws ``n_i`` (collective), draws the design
    of ``N = sum_i n_i`` draws from a stream seeded by ``shared_seed`` (the same on every rank,
    so every rank draws the same ``N`` strata and jitters) and returns this rank's slice, the
    draws ``sum_{j < i} n_j .. + n_i``. Shards of the outer plate are contiguous and in rank
    order (`shard_range`), so the union of the ranks' draws, in rank order, is exactly the
    design one process would draw for all ``R K`` draws from ``shared_seed``.

    Pass it as a guide's ``source`` (``TimestepGuide(..., source=...)``, or set
    ``guide.source``); every rank must then run the guide at every step, as
    `DistributedCARVLoss` does.

    Args:
        seed: this rank's own seed (different on every rank).
        shared_seed: the global design's seed (the same on every rank).
        group: the process group (default: the world).

    Raises:
        ValueError: if a seed is not an integer in ``[0, 2**63)`` or the two are equal.
    """

    def __init__(self, seed: int, shared_seed: int, *, group: Any = None):
        for name, value in (("seed", seed), ("shared_seed", shared_seed)):
            if _checks.seed_value(name, value) is None:
                raise ValueError(f"{name} must be an integer in [0, 2**63), got None")
        if seed == shared_seed:
            raise ValueError(
                f"seed and shared_seed must differ (both {seed}): the rank's own draws would "
                f"repeat the shared design's"
            )
        super().__init__(seed=seed)
        self.shared = RandomSource(seed=shared_seed)
        self.group = group

    def global_strata(self, n: int, device: torch.device | str = "cpu") -> Tensor:
        """This rank's ``n`` draws of the ``N``-draw global design (see the class docstring).

        Returns:
            ``(n,)`` float64 on ``device``: exactly one of all ranks' ``N`` draws falls in each
            stratum ``[b / N, (b + 1) / N)``.
        """
        rank, world = rank_and_world(self.group)
        if world == 1:
            return self.shared.global_strata(n, device)
        local = torch.tensor([n], dtype=torch.int64, device=_comm_device(self.group))
        counts = [torch.empty_like(local) for _ in range(world)]
        _collective(
            "the global strata's all-gather",
            lambda: dist.all_gather(counts, local, group=self.group),
            self.group,
        )
        sizes = [int(c) for c in counts]
        start = sum(sizes[:rank])
        return self.shared.global_strata(sum(sizes), device)[start : start + n]

    def get_state(self) -> dict:
        """Both streams' states (for checkpoints)."""
        return {"own": super().get_state(), "shared": self.shared.get_state()}

    def set_state(self, state: dict) -> None:
        """Restore `get_state`'s result."""
        super().set_state(state["own"])
        self.shared.set_state(state["shared"])

    def __repr__(self) -> str:
        return f"SharedStrataSource(seed={self.seed}, shared_seed={self.shared.seed})"


# -- the accountant ----------------------------------------------------------------------------


class DistributedAccountant(Accountant):
    """An [`Accountant`][carv_pyro.accounting.Accountant] that pools every rank's measurements.

    On a measuring step each rank contributes its per-step estimates of ``V_w`` and ``V_b``, its
    cost medians and its measured cost curves (the median step and teacher seconds at each
    ``K`` it has run); an all-gather gives every rank all of them, in rank order. The window then
    holds ``window * world_size`` measurements (``window`` steps of every rank), ``c_outer`` and
    ``c_inner`` are the averages over ranks, and the cost of a step at each ``K`` is the
    slowest rank's (a synchronous step waits for it). Every rank then decides from the same
    numbers, so ``K*`` and the adapted ``K`` are the same on every rank (with rank-local cost
    curves, ranks that timed differently could choose different sizes). Under ``max_overhead``
    the next measuring step is spaced by the rank whose measuring step cost the most, so that
    every rank measures on the same steps.

    Takes [`Accountant`][carv_pyro.accounting.Accountant]'s arguments, plus ``group``.
    """

    def __init__(self, *args: Any, group: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.group = group
        self._merged_costs: tuple[float, float] | None = None
        self._merged_curves: tuple[dict[int, float], dict[int, float]] | None = None
        self._merged_overhead: float | None = None

    def observe_measurement(self, v_within: float | None, v_between: float | None) -> None:
        """Gather every rank's estimates and costs (collective), then pool them as one
        accountant."""
        _, world = rank_and_world(self.group)
        if world == 1:
            super().observe_measurement(v_within, v_between)
            return
        if self._measurements.maxlen != self.window * world:
            self._measurements = deque(self._measurements, maxlen=self.window * world)
        local = {
            "v_within": v_within,
            "v_between": v_between,
            "costs": self._local_costs(),
            "step_costs": super().step_costs,
            "teacher_costs": super().teacher_costs,
            "overhead": super()._overhead_ratio(),
        }
        gathered: list[Any] = [None] * world
        _collective(
            "the accountant's all-gather",
            lambda: dist.all_gather_object(gathered, local, group=self.group),
            self.group,
        )
        costs = [r["costs"] for r in gathered if all(math.isfinite(c) for c in r["costs"])]
        if costs:
            self._merged_costs = (
                sum(c[0] for c in costs) / len(costs),
                sum(c[1] for c in costs) / len(costs),
            )
        self._merged_curves = (
            _slowest(r["step_costs"] for r in gathered),
            _slowest(r["teacher_costs"] for r in gathered),
        )
        # every rank must measure on the same steps: the cadence follows the dearest rank's
        overheads = [r["overhead"] for r in gathered if r.get("overhead") is not None]
        self._merged_overhead = max(overheads) if overheads else None
        for r in gathered[:-1]:
            self._measurements.append(_Measurement(self.step, r["v_within"], r["v_between"]))
        super().observe_measurement(gathered[-1]["v_within"], gathered[-1]["v_between"])

    def _local_costs(self) -> tuple[float, float]:
        return super().cost_estimates()

    def _overhead_ratio(self) -> float | None:
        """The largest rank's measuring overhead, as gathered at this measurement (with one
        process, this one's)."""
        if rank_and_world(self.group)[1] == 1:
            return super()._overhead_ratio()
        return self.__dict__.get("_merged_overhead")

    def cost_estimates(self) -> tuple[float, float]:
        """Declared costs, else the rank-averaged costs of the last measurement, else local."""
        if self.costs is None and self._merged_costs is not None:
            return self._merged_costs
        return super().cost_estimates()

    @property
    def step_costs(self) -> dict[int, float]:
        """``{K: seconds of a step}``: the slowest rank's median at each ``K``, as gathered at
        the last measurement (this rank's own before the first)."""
        return dict(self._merged_curves[0]) if self._merged_curves else super().step_costs

    @property
    def teacher_costs(self) -> dict[int, float]:
        """``{K: seconds of the teacher call}``: the slowest rank's median at each ``K``, as
        gathered at the last measurement (this rank's own before the first)."""
        return dict(self._merged_curves[1]) if self._merged_curves else super().teacher_costs


def _slowest(curves: Iterable[dict[int, float]]) -> dict[int, float]:
    """``{K: the largest seconds any rank measured at K}`` over the ranks' cost curves."""
    out: dict[int, float] = {}
    for curve in curves:
        for k, seconds in curve.items():
            out[k] = max(out.get(k, seconds), seconds)
    return dict(sorted(out.items()))


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

    Attributes:
        step: how many times ``loss_and_grads`` was called on this rank (a call that raised
            counts). Every step first checks, with one all-reduce of ``3 * world_size``
            integers, that all ranks are at the same step and in the same method; set it when
            resuming (``loss.step = start_step``) so that ranks resumed from different
            checkpoints are caught.

    Raises:
        TypeError: if ``loss`` is not an ELBO with ``loss_and_grads``, or ``outer_plate`` /
            ``term`` is not a string or ``None``.
        ValueError: if the loss has a non-distributed accountant in a multi-process run.

    Every rank must call ``loss_and_grads`` for every step, even after an error it caught.
    A step then raises, on every rank:

    - `OutOfStepError` if the ranks are at different steps (one skipped a call) or one called
      ``loss`` while another called ``loss_and_grads``; nothing is combined and no ``.grad`` is
      written;
    - on the ranks whose wrapped loss raised, that error; on the others `RankFailedError`
      naming them (all ranks stay in step, so the next step can run);
    - `RankTimeoutError` naming the ranks that did not answer within the process group's
      timeout (see `init_from_env`).
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
        if outer_plate is not None:
            _checks.instance("outer_plate", outer_plate, str, "a plate name (str) or None")
        if term is not None:
            _checks.instance("term", term, str, "a teacher term's name (str) or None")
        super().__init__(num_particles=1)
        self.inner = loss
        self.outer_plate = outer_plate
        self.term = term
        self.group = group
        self.last_weight: float = 1.0
        self.step: int = 0

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

    _METHODS = ("loss_and_grads", "loss")

    def _check_in_step(self, method: str, error: BaseException | None, step: int) -> None:
        """One all-reduce of every rank's (step, method, failed); raise on every rank if off.

        Raises:
            OutOfStepError: if the ranks' steps or methods differ.
            RankFailedError: if the wrapped loss raised on other ranks (this rank re-raises
                its own ``error`` instead).
        """
        rank, world = rank_and_world(self.group)
        if world == 1:
            if error is not None:
                raise error
            return
        _heartbeat(step)
        code = self._METHODS.index(method)
        buf = torch.zeros(3 * world, dtype=torch.int64, device=_comm_device(self.group))
        buf[rank] = step
        buf[world + rank] = code
        buf[2 * world + rank] = 0 if error is None else 1
        _collective(
            f"the step check of DistributedCARVLoss.{method}",
            lambda: dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group),
            self.group,
            step,
        )
        steps, codes, failed = (
            buf.tolist()[:world],
            buf.tolist()[world : 2 * world],
            buf.tolist()[2 * world :],
        )
        if len(set(steps)) > 1 or len(set(codes)) > 1:

            def where(r: int) -> str:
                if len(set(codes)) == 1:
                    return f"rank {r} is at step {steps[r]}"
                return f"rank {r} is at step {steps[r]} in {self._METHODS[codes[r]]}"

            parts = [where(r) for r in sorted(range(world), key=lambda r: (steps[r], r))]
            raise OutOfStepError(
                f"ranks out of step on rank {rank}: {', '.join(parts)}: a rank skipped a step "
                f"(e.g. after an exception it caught) or resumed at another step; every rank "
                f"must call {method} for every step (set DistributedCARVLoss.step when "
                f"resuming). No gradient was combined."
            ) from error
        if error is not None:
            raise error
        bad = [r for r in range(world) if failed[r]]
        if bad:
            raise RankFailedError(
                f"the wrapped loss raised on rank(s) {bad} at step {step} (see their own "
                f"error); this rank ({rank}) skips the step too, so that all ranks stay in step. "
                f"No gradient was combined.",
                bad,
            )

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """This rank's step on its shard, the step check, then the all-reduce of gradients and loss.

        Returns:
            float: the loss averaged over ranks (the same on every rank).

        Raises:
            OutOfStepError, RankFailedError, RankTimeoutError: see the class docstring.
        """
        error: Exception | None = None
        capture = poutine.trace(param_only=True)
        try:
            with capture, self._shard():
                value = self.inner.loss_and_grads(model, guide, *args, **kwargs)
        except Exception as caught:  # noqa: BLE001 - re-raised after the step check
            error = caught
        sites = sorted(capture.trace.nodes.items())
        params = [site["value"].unconstrained() for _, site in sites]
        params = [p for p in params if p.requires_grad]
        step = self.step
        self.step += 1
        try:
            self._check_in_step("loss_and_grads", error, step)
        except BaseException:
            # SVI neither steps nor zeroes the gradients when this raises: drop this rank's
            # partial gradients so that a loop that goes on does not add them to the next step
            for p in params:
                p.grad = None
            raise
        self.last_weight = self._weight()
        (value,) = all_reduce_gradients(
            params, self.last_weight, extra=[value], group=self.group, step=step
        )
        return value

    def loss(self, model, guide, *args, **kwargs) -> float:
        """The loss averaged over ranks (collective; checked like `loss_and_grads`, not counted)."""
        error: Exception | None = None
        try:
            with self._shard():
                value = self.inner.loss(model, guide, *args, **kwargs)
        except Exception as caught:  # noqa: BLE001 - re-raised after the step check
            error = caught
        self._check_in_step("loss", error, self.step)
        self.last_weight = self._weight()
        (value,) = all_reduce_gradients(
            [], self.last_weight, extra=[value], group=self.group, step=self.step
        )
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
