"""The teacher interface: predict the noise ``eps`` in ``x_t = alpha_t x + sigma_t eps``.

A teacher is a frozen denoiser. `AbstractTeacher` owns everything that is the same for
every teacher (shape checks, classifier-free guidance, chunking into batches of at most
``max_batch`` rows, gradient mode, dtype of the result); a subclass implements one batched hook,
`AbstractTeacher._predict_eps`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..layout import to_device
from ..schedules import DiscreteSchedule

__all__ = ["AbstractTeacher"]


def _format_shape(shape: tuple[int, ...], batch: str | None = "N") -> str:
    """``(N, 1, 16, 16)``; ``-1`` entries (any size) are shown as ``*``."""
    dims = ([batch] if batch is not None else []) + ["*" if d < 0 else str(d) for d in shape]
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


def _matches(shape: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    """Whether ``shape`` equals ``expected``, where an expected ``-1`` matches any size."""
    return len(shape) == len(expected) and all(e < 0 or s == e for s, e in zip(shape, expected))


def _is_text(cond: Any) -> bool:
    """Whether ``cond`` is a prompt or a list or tuple holding prompts."""
    if isinstance(cond, (str, bytes)):
        return True
    return (
        isinstance(cond, (list, tuple))
        and len(cond) > 0
        and any(isinstance(c, (str, bytes)) for c in cond)
    )


class AbstractTeacher:
    """A frozen diffusion teacher: ``eps_hat(x_t, t, cond)`` under a discrete noise schedule.

    This is a plain class, not an `torch.nn.Module`, so a teacher (and the network it
    wraps) can never be registered as a Pyro parameter by accident.

    Attributes:
        schedule: the [`DiscreteSchedule`][carv_pyro.schedules.DiscreteSchedule] that defines
            ``alpha_t`` and ``sigma_t`` for the integer timesteps ``t``.
        event_shape: shape of one clean sample ``x``, e.g. ``(C, H, W)`` or ``(D,)``.
        cond_event_shape: shape of ONE conditioning item: ``()`` for class labels, ``(L, D)``
            for cross-attention ``encoder_hidden_states``; ``None`` for an unconditional
            teacher. An entry ``-1`` means "any size" (e.g. a sequence length ``L`` the
            teacher does not fix).
        max_batch: evaluate the network in chunks of at most this many rows (``None``: one
            call). Guidance doubles the rows, and they are chunked too.
        requires_grad: ``False`` (default): `predict_eps` runs under
            `torch.no_grad`. Set it ``True`` to keep the autograd graph (e.g. to
            differentiate w.r.t. the teacher's weights in data attribution); the graph is then
            kept whenever gradients are enabled in the caller.

        parse_prompt: ``prompt -> conditioning`` (e.g. a class label) for a teacher that reads
            text prompts, defined as a method by such a subclass; ``None`` (default):
            `encode_cond` refuses strings with an error saying what the teacher takes.

    `predict_eps` is a template method: the base class owns it, and subclasses
    implement `_predict_eps` (and optionally `null_cond` for classifier-free
    guidance, `encode_cond` or `parse_prompt` for user-facing conditioning, and `label_range`
    when their class labels are not ``0 .. num_class_embeds - 1``).

    Subclassing:
        A teacher that knows the data is ``N(0, I)`` in ``D`` dimensions, where the exact
        answer is ``E[eps | x_t] = sigma_t x_t``:

        >>> class StandardNormalTeacher(AbstractTeacher):
        ...     def __init__(self, dim, schedule):
        ...         self.schedule = schedule
        ...         self.event_shape = torch.Size([dim])
        ...         self.cond_event_shape = None
        ...
        ...     def _predict_eps(self, x_t, t, cond):
        ...         # x_t: (N, D); t: (N,) long, on x_t's device; cond: None
        ...         return self.schedule.sigma(t, like=x_t)[:, None] * x_t
        >>> teacher = StandardNormalTeacher(3, DiscreteSchedule.linear(100))
        >>> teacher.predict_eps(torch.ones(2, 3), torch.tensor([0, 99])).shape
        torch.Size([2, 3])
    """

    schedule: DiscreteSchedule
    event_shape: torch.Size
    cond_event_shape: torch.Size | None = None
    max_batch: int | None = None
    requires_grad: bool = False
    parse_prompt: Callable[[str], Any] | None = None

    # ------------------------------------------------------------------ hooks

    def _predict_eps(self, x_t: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        """The batched prediction that subclasses implement.

        Called by `predict_eps` with validated arguments, at most ``max_batch`` rows at a
        time, already under the right gradient mode.

        Args:
            x_t: ``(n, *event_shape)`` noisy samples.
            t: ``(n,)`` long timesteps on ``x_t``'s device, in ``[0, T - 1]``.
            cond: ``(n, *cond_event_shape)`` on ``x_t``'s device, or ``None``.

        Returns:
            ``(n, *event_shape)`` predicted noise (any floating dtype; the base casts it to
            ``x_t``'s dtype).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement _predict_eps")

    def null_cond(self, n: int) -> Tensor | None:
        """The unconditional conditioning used by classifier-free guidance.

        Args:
            n: number of rows.

        Returns:
            ``(n, *cond_event_shape)``, or ``None`` (default) when the teacher has no
            unconditional branch, in which case ``guidance_scale != 1`` raises.
        """
        return None

    def encode_cond(self, cond: Any) -> Tensor | None:
        """Turn user-facing conditioning into a tensor, refusing what the teacher cannot read.

        `predict_eps` calls this for any ``cond`` that is not already a tensor, and
        [`teacher_term`][carv_pyro.teacher_term] for every ``cond``, before any draw is made. A
        subclass that reads richer conditioning (a pipeline teacher's text encoder, the shapes
        teacher's ``(prompt, azimuth, elevation)``) overrides it.

        The default: a prompt (a string, or a list or tuple holding strings) goes through
        `parse_prompt`, one string at a time, when the teacher defines it; without it, text is
        refused, since ``torch.as_tensor("3")`` has no meaning a user would expect. Anything else
        goes through `torch.as_tensor`.

        Args:
            cond: e.g. an ``int`` class label, a nested list or a prompt; ``None`` stays
                ``None``.

        Returns:
            a tensor of shape ``cond_event_shape``, possibly with leading batch dims.

        Raises:
            TypeError: on text for a teacher without `parse_prompt`, naming ``cond``, what it
                got and what the teacher takes.
            ValueError: on a prompt that `parse_prompt` refuses (its message is kept).
        """
        if cond is None:
            return None
        if not _is_text(cond):
            return torch.as_tensor(cond)
        if self.parse_prompt is None:
            hint = ""
            if self.cond_event_shape is not None and len(self.cond_event_shape) == 0:
                hint = (
                    f". For the digits teacher use carv_pyro.teachers.embedded."
                    f"default_prompt_cond({cond!r:.40}) (or carv_pyro.data.parse_prompt for the "
                    f"label)"
                )
            raise TypeError(
                f"cond must not be a string (got {cond!r:.80}): {self.describe_cond()}, and it "
                f"has no parse_prompt of its own to read prompts{hint}"
            )
        try:
            if isinstance(cond, (str, bytes)):
                return torch.as_tensor(self.parse_prompt(cond))
            return torch.as_tensor([self.parse_prompt(c) for c in cond])
        except ValueError as error:
            raise ValueError(
                f"cond {cond!r:.80} is not a prompt this teacher reads: {error}"
            ) from None

    def label_range(self) -> tuple[int, int] | None:
        """The valid class labels ``(low, high)`` of a class-label teacher.

        Returns:
            ``(0, num_class_embeds - 1)`` when the teacher has an integer ``num_class_embeds``
            (default), else ``None`` (it does not say, and labels are not range-checked before
            the teacher runs).
        """
        n = getattr(self, "num_class_embeds", None)
        if isinstance(n, int) and not isinstance(n, bool):
            return 0, n - 1
        return None

    def describe_cond(self) -> str:
        """What the teacher takes as ``cond``, in words, for error messages.

        Returns:
            e.g. ``"DiffusersTeacher takes integer class labels in [0, 10] (an int or a long
            tensor)"``.
        """
        name = type(self).__name__
        if self.cond_event_shape is None:
            return f"{name} is unconditional (cond must be None)"
        event = tuple(self.cond_event_shape)
        if event:
            return f"{name} takes cond as tensors of shape {event} per draw"
        labels = self.label_range()
        where = f" in [{labels[0]}, {labels[1]}]" if labels else ""
        return f"{name} takes integer class labels{where} (an int or a long tensor)"

    # ----------------------------------------------------------- template method

    def predict_eps(
        self,
        x_t: Tensor,
        t: Tensor | int,
        cond: Tensor | Any | None = None,
        guidance_scale: float = 1.0,
    ) -> Tensor:
        """Predict the noise in ``x_t``, with classifier-free guidance.

        This is a template method owned by `AbstractTeacher`; subclasses implement
        `_predict_eps` instead. It

        1. validates shapes (a `ValueError` names the argument and the expected shape);
        2. applies classifier-free guidance when ``guidance_scale != 1``:
           ``eps = eps_uncond + s * (eps_cond - eps_uncond)``, evaluating the conditional and
           the unconditional (`null_cond`) branch in one batched call of ``2N`` rows;
        3. splits the rows into chunks of at most ``max_batch``;
        4. runs under `torch.no_grad` unless gradients are enabled AND
           ``self.requires_grad`` is set.

        Args:
            x_t: ``(N, *event_shape)`` noisy samples (floating point).
            t: ``(N,)`` integer timesteps in ``[0, T - 1]``; a python ``int`` or a 0-d tensor is
                broadcast to all rows.
            cond: ``(N, *cond_event_shape)`` conditioning, or ONE item of shape
                ``cond_event_shape`` broadcast to all rows, or ``None``. A non-tensor is first
                passed through `encode_cond`.
            guidance_scale: the classifier-free guidance scale ``s``; ``1`` means plain
                conditional prediction.

        Returns:
            ``(N, *event_shape)`` predicted noise, in ``x_t``'s dtype and on its device.

        Raises:
            ValueError: on a shape mismatch, conditioning given to an unconditional teacher,
                or ``guidance_scale != 1`` without ``cond`` or without `null_cond`.
            TypeError: if ``x_t`` is not a floating tensor or ``t`` is not integer.
        """
        x_t, t, cond = self._validate(x_t, t, cond)
        s = self._validate_guidance(guidance_scale, cond)
        n = x_t.shape[0]
        if s != 1.0:
            null = self.null_cond(n)
            if null is None:
                raise ValueError(
                    f"guidance_scale={guidance_scale} needs an unconditional branch, but "
                    f"{type(self).__name__} has no null conditioning (null_cond returned None)"
                )
            null = self._check_cond(torch.as_tensor(null), n, x_t.device, name="null_cond(n)")
            x_in = torch.cat([x_t, x_t])
            t_in = torch.cat([t, t])
            c_in = torch.cat([null, cond])
        else:
            x_in, t_in, c_in = x_t, t, cond

        with torch.set_grad_enabled(torch.is_grad_enabled() and bool(self.requires_grad)):
            eps = self._chunked(x_in, t_in, c_in)
            if s != 1.0:
                eps_uncond, eps_cond = eps[:n], eps[n:]
                eps = eps_uncond + s * (eps_cond - eps_uncond)
        return eps.to(dtype=x_t.dtype, device=x_t.device)

    # ---------------------------------------------------------------- helpers

    def _chunked(self, x_t: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        """Call the hook on chunks of at most ``max_batch`` rows and concatenate."""
        n = x_t.shape[0]
        size = self.max_batch
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"max_batch must be a positive int or None, got {size!r}")
        if n == 0:
            return torch.zeros_like(x_t)
        if size is None or n <= size:
            return self._checked_hook(x_t, t, cond)
        outs = [
            self._checked_hook(
                x_t[i : i + size], t[i : i + size], None if cond is None else cond[i : i + size]
            )
            for i in range(0, n, size)
        ]
        return torch.cat(outs)

    def _checked_hook(self, x_t: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        out = self._predict_eps(x_t, t, cond)
        if not isinstance(out, Tensor) or out.shape != x_t.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise RuntimeError(
                f"{type(self).__name__}._predict_eps must return a tensor of shape "
                f"{tuple(x_t.shape)}, got {got}"
            )
        return out

    def _validate(self, x_t: Any, t: Any, cond: Any) -> tuple[Tensor, Tensor, Tensor | None]:
        event_shape = tuple(self.event_shape)
        if not isinstance(x_t, Tensor):
            raise TypeError(f"x_t must be a tensor, got {type(x_t).__name__}")
        if not x_t.dtype.is_floating_point:
            raise TypeError(f"x_t must be a floating-point tensor, got dtype {x_t.dtype}")
        if x_t.dim() != len(event_shape) + 1 or tuple(x_t.shape[1:]) != event_shape:
            raise ValueError(
                f"x_t must have shape {_format_shape(event_shape)} for this teacher, got "
                f"{tuple(x_t.shape)}"
            )
        n = x_t.shape[0]

        t = torch.as_tensor(t, device=x_t.device)
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"t must hold integer timesteps, got dtype {t.dtype}")
        if t.dim() == 0:
            t = t.expand(n)
        if t.shape != (n,):
            raise ValueError(
                f"t must have shape ({n},) to match x_t (or be a scalar), got {tuple(t.shape)}"
            )
        # the schedule's own range check (one read on the CPU, a device-side assert elsewhere)
        t = self.schedule.check_timesteps(t)

        if cond is None:
            return x_t, t, None
        if self.cond_event_shape is None:
            raise ValueError(
                f"cond must be None: {type(self).__name__} is unconditional "
                f"(cond_event_shape is None)"
            )
        if not isinstance(cond, Tensor):
            cond = self.encode_cond(cond)
            if cond is None:
                return x_t, t, None
        cond = self._check_cond(torch.as_tensor(cond), n, x_t.device, name="cond")
        return x_t, t, cond

    def _check_cond(self, cond: Tensor, n: int, device: torch.device, name: str) -> Tensor:
        expected = tuple(self.cond_event_shape or ())
        shape = tuple(cond.shape)
        if _matches(shape, expected):
            cond = cond.expand(n, *shape)
        elif not _matches(shape, (n, *expected)):
            raise ValueError(
                f"{name} must have shape {_format_shape(expected, batch=str(n))} (or "
                f"{_format_shape(expected, batch=None)} for all rows) for this teacher, got "
                f"{shape}"
            )
        return to_device(cond, device)  # a host tensor (null_cond's labels) without a sync

    @staticmethod
    def _validate_guidance(guidance_scale: Any, cond: Tensor | None) -> float:
        try:
            s = float(guidance_scale)
        except (TypeError, ValueError):
            raise TypeError(
                f"guidance_scale must be a real number, got {guidance_scale!r}"
            ) from None
        if not math.isfinite(s):
            raise ValueError(f"guidance_scale must be finite, got {guidance_scale!r}")
        if s != 1.0 and cond is None:
            raise ValueError(
                f"guidance_scale={guidance_scale} needs conditioning: cond is None (use "
                f"guidance_scale=1.0 for an unconditional prediction)"
            )
        return s

    def __repr__(self) -> str:
        cond = None if self.cond_event_shape is None else tuple(self.cond_event_shape)
        return (
            f"{type(self).__name__}(event_shape={tuple(self.event_shape)}, "
            f"cond_event_shape={cond}, schedule={self.schedule!r})"
        )
