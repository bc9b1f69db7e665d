"""The one way to make part of a frozen teacher trainable, and to copy a teacher's interface.

Teachers are frozen: their networks are never Pyro parameters and run under ``torch.no_grad``.
Two pipelines need to differentiate through one anyway: data attribution takes per-example
gradients w.r.t. some of the teacher's weights, and distribution matching (DMD, VSD) trains a
"fake" score network with the teacher's interface. `trainable` opens a teacher for that, for the
duration of a ``with`` block, and restores every flag and gradient afterwards; `copy_teacher`
puts another network behind a teacher's schedule and conditioning.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

__all__ = ["copy_teacher", "trainable"]


class trainable:  # noqa: N801 (a context manager used like a function)
    """Within this context the teacher keeps its autograd graph and exactly ``params`` require
    grad; the teacher's ``requires_grad``, every parameter's flag and every ``.grad`` are
    restored on exit.

    Args:
        teacher: a teacher with a settable ``requires_grad`` (e.g. a
            [`DiffusersTeacher`][carv_pyro.teachers.DiffusersTeacher]).
        module: the network whose parameters are chosen among (default: ``teacher.unet``).
        params: the parameters to train (default: all of ``module``'s).
        keep_grads: keep the ``.grad`` the block accumulated instead of restoring the old ones
            (an optimizer step inside the block has used them either way).

    Examples:
        >>> with trainable(teacher, params=[teacher.unet.conv_out.weight]):  # doctest: +SKIP
        ...     loss = objective.evaluate(x, t, eps, cond).surrogate.sum()
        ...     (g,) = torch.autograd.grad(loss, [teacher.unet.conv_out.weight])
    """

    def __init__(
        self,
        teacher: Any,
        module: nn.Module | None = None,
        params: Iterable[nn.Parameter] | None = None,
        *,
        keep_grads: bool = False,
    ):
        if not hasattr(teacher, "requires_grad"):
            raise TypeError(
                f"teacher must have a requires_grad switch, got {type(teacher).__name__}"
            )
        module = getattr(teacher, "unet", None) if module is None else module
        if not isinstance(module, nn.Module):
            raise TypeError("module must be the teacher's network (an nn.Module)")
        self.teacher = teacher
        self.module = module
        self.params = list(module.parameters()) if params is None else list(params)
        owned = {id(p) for p in module.parameters()}
        if any(id(p) not in owned for p in self.params):
            raise ValueError("params must be parameters of the teacher's network")
        self.keep_grads = keep_grads

    def __enter__(self) -> trainable:
        self._teacher_flag = self.teacher.requires_grad
        self._saved = [(p, p.requires_grad, p.grad) for p in self.module.parameters()]
        self._training = self.module.training
        self.teacher.requires_grad = True  # a DiffusersTeacher unfreezes its whole network here
        chosen = {id(p) for p in self.params}
        for p in self.module.parameters():
            p.requires_grad_(id(p) in chosen)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.teacher.requires_grad = self._teacher_flag
        for p, flag, grad in self._saved:
            p.requires_grad_(flag)
            if not self.keep_grads:
                p.grad = grad
        self.module.train(self._training)


def copy_teacher(teacher: Any, network: nn.Module) -> Any:
    """A [`DiffusersTeacher`][carv_pyro.teachers.DiffusersTeacher] over ``network`` with
    ``teacher``'s scheduler and null class (the interface of a "fake" score network)."""
    from .diffusers_teacher import DiffusersTeacher

    return DiffusersTeacher(network, teacher.scheduler, null_class=teacher.null_class)
