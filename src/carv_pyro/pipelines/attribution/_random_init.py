"""Networks at a seeded random initialisation, drawn from an explicit generator.

A module is built on the ``meta`` device (so construction draws nothing from torch's global
generator), materialised on the CPU, and every parameter is drawn as PyTorch's defaults would
draw it (``kaiming_uniform_(a=sqrt(5))`` weights and ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``
biases for linear and convolution layers, ``N(0, 1)`` embeddings, unit-scale normalisations),
from a ``torch.Generator`` seeded with ``seed``. The global random state is never read or set.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

__all__ = ["random_init"]

M = TypeVar("M", bound=nn.Module)

_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.modules.batchnorm._NormBase)


def random_init(build: Callable[[], M], seed: int) -> M:
    """``build()`` with its parameters drawn from a generator seeded with ``seed``.

    Args:
        build: constructs the module (e.g. ``lambda: UNet2DModel(**config)``).
        seed: the generator's seed.

    Returns:
        The module on the CPU.

    Raises:
        TypeError: if the module holds buffers or parameters of layers this cannot initialise.
    """
    with torch.device("meta"):
        module = build()
    if any(True for _ in module.buffers()):
        raise TypeError(f"random_init cannot initialise the buffers of {type(module).__name__}")
    module.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(int(seed))
    done: set[int] = set()
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
                nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=gen)
                done.add(id(m.weight))
                if m.bias is not None:
                    bound = 1.0 / math.sqrt(max(m.weight[0].numel(), 1))
                    nn.init.uniform_(m.bias, -bound, bound, generator=gen)
                    done.add(id(m.bias))
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, generator=gen)
                if m.padding_idx is not None:
                    m.weight[m.padding_idx].zero_()
                done.add(id(m.weight))
            elif isinstance(m, _NORMS):
                for p, value in ((m.weight, 1.0), (m.bias, 0.0)):
                    if p is not None:
                        p.fill_(value)
                        done.add(id(p))
    left = [name for name, p in module.named_parameters() if id(p) not in done]
    if left:
        raise TypeError(f"random_init cannot initialise the parameters {left[:5]}")
    return module
