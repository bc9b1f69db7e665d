"""The outer plate sharded across processes, under its public path ``carv_pyro.distributed``.

It lives in [`carv_pyro.infer.distributed`][carv_pyro.infer.distributed].
"""

from .infer.distributed import *  # noqa: F403
from .infer.distributed import __all__  # noqa: F401
