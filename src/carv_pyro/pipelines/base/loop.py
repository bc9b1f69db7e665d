"""One training loop for every pipeline: steps, hooks, evaluation cadence, a clock and a budget,
checkpoints, and stops on signals that lose nothing.

`TrainLoop` runs a pipeline's ``step`` function until a number of steps or a compute budget is
reached. Between steps it evaluates on a cadence (evaluation is not counted by the clock), runs
per-step hooks, and checkpoints every so many steps or seconds. SIGINT (Ctrl-C) and SIGTERM
(what ``timeout``, schedulers and ``docker stop`` send) do not tear a step: the step in progress
finishes, the state after it is checkpointed, and the loop raises `RunStopped`, so a resumed
run continues exactly where the stopped one would have. A second signal aborts at once; the last
checkpoint stands. SIGKILL cannot be caught: the periodic checkpoint bounds what it loses.

The param-store policy of every pipeline: a run lives in its own Pyro param store
(``pyro.get_param_store().scope()``), so it neither sees nor changes the caller's, and it seeds
no global random generator (every draw comes from the run's own seeded generators).
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ... import _checks

__all__ = ["Clock", "LoopState", "RunStopped", "StopSignals", "TrainLoop", "check_run_options"]


class Clock:
    """Seconds of training work, accumulated between `start` and `pause`.

    Args:
        kind: ``"wall"`` (``perf_counter``), ``"process"`` (this process's CPU time, robust to
            other load on a CPU machine) or ``"auto"`` (wall on a GPU, process on a CPU).
        device: where the work runs; on CUDA the clock synchronises before reading.
    """

    KINDS = ("auto", "wall", "process")

    def __init__(self, kind: str = "wall", device: torch.device | str = "cpu"):
        _checks.choice("clock", kind, self.KINDS)
        self.device = torch.device(device)
        if kind == "auto":
            kind = "wall" if self.device.type == "cuda" else "process"
        self.kind = kind
        self.total = 0.0
        self._start: float | None = None

    def _now(self) -> float:
        if self.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.synchronize(self.device)
        return time.process_time() if self.kind == "process" else time.perf_counter()

    def start(self) -> None:
        """Start (or resume) counting."""
        self._start = self._now()

    def pause(self) -> float:
        """Stop counting; return the total so far."""
        if self._start is not None:
            self.total += self._now() - self._start
            self._start = None
        return self.total


class RunStopped(Exception):
    """A run stopped on a signal after checkpointing its last completed step.

    Args:
        signum: the signal.
        step: the last completed step.
        where: the run's folder, for the message.
        saved: whether that step was checkpointed (``False``: a run without a folder).

    Attributes:
        signum: the signal (``signal.SIGINT`` or ``signal.SIGTERM``).
        step: the last completed step.
        exit_code: the conventional exit status, ``128 + signum``.
    """

    def __init__(self, signum: int, step: int, where: str = "", saved: bool = True):
        self.signum = signum
        self.step = step
        self.exit_code = 128 + int(signum)
        name = signal.Signals(signum).name
        if not saved:  # a run without a folder: say so rather than promise a resume
            super().__init__(
                f"stopped by {name} after step {step}; nothing was saved (no run folder)"
            )
            return
        super().__init__(
            f"stopped by {name} after step {step}; the run is checkpointed"
            + (f" in {where}" if where else "")
            + " and continues with --resume"
        )


class StopSignals:
    """A context in which SIGINT and SIGTERM ask the loop to stop between steps.

    The first signal sets `received`; a second one raises ``KeyboardInterrupt`` at once. Outside
    the main thread (where handlers cannot be installed) it does nothing.

    Attributes:
        received: the first signal number received, or ``None``.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._saved: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt(f"second signal ({signal.Signals(signum).name}): aborting")
        self.received = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._saved[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._saved.items():
            signal.signal(s, handler)
        self._saved.clear()


@dataclass
class LoopState:
    """What a `TrainLoop` has done so far (part of every checkpoint).

    Attributes:
        step: completed steps.
        seconds: training seconds counted by the clock (evaluation excluded).
        log: one dict of metrics per step (what ``step`` returned, with ``step`` and ``seconds``).
        evals: one dict per evaluation (what ``evaluate`` returned, with ``step`` and
            ``seconds``).
    """

    step: int = 0
    seconds: float = 0.0
    log: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (for checkpoints and summaries)."""
        return {"step": self.step, "seconds": self.seconds, "log": self.log, "evals": self.evals}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoopState:
        """Inverse of `to_dict`."""
        return cls(
            step=int(data["step"]),
            seconds=float(data["seconds"]),
            log=list(data["log"]),
            evals=list(data["evals"]),
        )


class TrainLoop:
    """Run ``step`` until ``steps`` steps or ``budget_s`` seconds of training work.

    Args:
        step: one training step; returns a dict of metrics (e.g. ``{"loss": ...}``).
        steps: stop after this many steps (counted from zero, across resumes).
        budget_s: stop once the clock reaches this many seconds (checked after each step).
        clock: the `Clock` (default: wall clock on the CPU).
        evaluate: ``state -> metrics``, run at the start (if there is no evaluation yet), every
            ``eval_every`` steps and after the last step; not counted by the clock.
        eval_every: steps between evaluations (``None``: only at the start and the end).
        eval_every_s: also evaluate whenever the clock passes another multiple of this many
            seconds (curves against wall-clock at an even resolution).
        hooks: ``hook(state, metrics)`` called after every step (schedules, logging).
        save: ``state -> None`` writes a checkpoint of everything (the loop's state included).
        checkpoint_every: also checkpoint every this many steps.
        checkpoint_every_s: also checkpoint when this many wall seconds have passed since the
            last checkpoint (default 60: a SIGKILL loses at most about a minute).
        progress: show a tqdm progress bar.
        desc: the progress bar's label.
        where: the run's folder, for messages.

    Raises:
        ValueError: on bad arguments, or neither ``steps`` nor ``budget_s``.
    """

    def __init__(
        self,
        step: Callable[[LoopState], dict[str, Any]],
        *,
        steps: int | None = None,
        budget_s: float | None = None,
        clock: Clock | None = None,
        evaluate: Callable[[LoopState], dict[str, Any]] | None = None,
        eval_every: int | None = None,
        eval_every_s: float | None = None,
        hooks: Sequence[Callable[[LoopState, dict[str, Any]], None]] = (),
        save: Callable[[LoopState], None] | None = None,
        checkpoint_every: int | None = None,
        checkpoint_every_s: float | None = 60.0,
        progress: bool = True,
        desc: str = "train",
        where: str = "",
    ):
        if steps is None and budget_s is None:
            raise ValueError("give steps or budget_s (or both) to bound the run")
        if steps is not None:
            _checks.positive_int("steps", steps)
        if budget_s is not None:
            _checks.positive_float("budget_s", budget_s)
        if eval_every is not None:
            _checks.positive_int("eval_every", eval_every)
        if eval_every_s is not None:
            _checks.positive_float("eval_every_s", eval_every_s)
        if checkpoint_every is not None:
            _checks.positive_int("checkpoint_every", checkpoint_every)
        if checkpoint_every_s is not None:
            _checks.positive_float("checkpoint_every_s", checkpoint_every_s)
        self.step_fn = step
        self.steps = steps
        self.budget_s = budget_s
        self.clock = clock or Clock("wall")
        self.evaluate = evaluate
        self.eval_every = eval_every
        self.eval_every_s = eval_every_s
        self.hooks = list(hooks)
        self.save = save
        self.checkpoint_every = checkpoint_every
        self.checkpoint_every_s = checkpoint_every_s
        self.progress = progress
        self.desc = desc
        self.where = where

    def done(self, state: LoopState) -> bool:
        """Whether the run has reached its steps or its budget."""
        return (self.steps is not None and state.step >= self.steps) or (
            self.budget_s is not None and state.seconds >= self.budget_s
        )

    def _evaluate(self, state: LoopState) -> dict[str, Any] | None:
        if self.evaluate is None:
            return None
        entry = {"step": state.step, "seconds": state.seconds}
        entry.update(self.evaluate(state))
        state.evals.append(entry)
        return entry

    def run(self, state: LoopState | None = None) -> LoopState:
        """Run (or continue) the loop.

        Returns:
            The final state.

        Raises:
            RunStopped: after a SIGINT/SIGTERM, once the last completed step is checkpointed.
        """
        from tqdm.auto import tqdm

        state = LoopState() if state is None else state
        self.clock.total = state.seconds
        if not state.evals:
            self._evaluate(state)
        budget = self.budget_s is not None and self.steps is None
        total = self.budget_s if budget else self.steps
        bar = tqdm(
            total=total,
            initial=min(state.seconds if budget else state.step, total),
            unit="s" if budget else "step",
            disable=not self.progress,
            desc=self.desc,
            dynamic_ncols=True,
            bar_format=(
                "{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}{postfix}]"
                if budget
                else None
            ),
        )
        last_save = time.monotonic()
        try:
            with StopSignals() as signals:
                while not self.done(state):
                    self.clock.start()
                    metrics = dict(self.step_fn(state))
                    state.seconds = self.clock.pause()
                    state.step += 1
                    metrics.update(step=state.step, seconds=state.seconds)
                    state.log.append(metrics)
                    for hook in self.hooks:
                        hook(state, metrics)
                    bar.update((min(state.seconds, total) - bar.n) if budget else 1)
                    regular = self.eval_every is not None and state.step % self.eval_every == 0
                    if self.eval_every_s is not None and state.evals:
                        last = state.evals[-1]["seconds"]
                        regular = regular or (
                            state.seconds // self.eval_every_s > last // self.eval_every_s
                        )
                    if regular or self.done(state):
                        entry = self._evaluate(state)
                        if entry is not None:
                            bar.set_postfix(_postfix(entry))
                    due = self.save is not None and (
                        (self.checkpoint_every and state.step % self.checkpoint_every == 0)
                        or (
                            self.checkpoint_every_s is not None
                            and time.monotonic() - last_save >= self.checkpoint_every_s
                        )
                    )
                    if signals.received is not None:
                        if self.save is not None:
                            self.save(state)
                        raise RunStopped(
                            signals.received, state.step, self.where, self.save is not None
                        )
                    if due:
                        self.save(state)
                        last_save = time.monotonic()
        finally:
            bar.close()
        if self.save is not None:
            self.save(state)
        return state


def _postfix(entry: dict[str, Any]) -> dict[str, str]:
    out = {}
    for k, v in entry.items():
        if k in ("step", "seconds") or not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        out[k] = f"{v:.3g}" if math.isfinite(v) else str(v)
        if len(out) == 3:
            break
    return out


def check_run_options(
    checkpoint_every: int | None,
    checkpoint_every_s: float | None,
    hooks: Sequence[Callable] | Any,
    out_dir: Any,
    *,
    resume: bool,
    overwrite: bool,
) -> list[Callable]:
    """Check the options every resumable run takes; return the hooks as a list.

    Raises:
        ValueError: naming the first bad option (a non-positive cadence, a hook that is not
            callable, ``resume``/``overwrite`` without a run folder).
    """
    if checkpoint_every is not None:
        _checks.positive_int("checkpoint_every", checkpoint_every)
    if checkpoint_every_s is not None:
        _checks.positive_float("checkpoint_every_s", checkpoint_every_s)
    hooks = list(hooks)
    for hook in hooks:
        if not callable(hook):
            raise ValueError(f"hooks must be callables hook(state, metrics), got {hook!r}")
    if out_dir is None and (resume or overwrite):
        raise ValueError("resume and overwrite need an out_dir (the run folder)")
    return hooks
