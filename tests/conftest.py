import pyro
import pytest
import torch
from hypothesis import HealthCheck, settings

from .seeds import SHIFT, seed

# The suite's tensors are tiny: one thread avoids inter-op overhead and oversubscription.
torch.set_num_threads(1)

# Property tests draw the same examples every run (never flaky); a shifted CARV_TEST_SEED draws
# other examples from a seed of its own (every property must hold for any).
settings.register_profile(
    "carv",
    deadline=None,
    derandomize=SHIFT == 0,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("carv")
if SHIFT:
    import hypothesis.core

    hypothesis.core.global_force_seed = SHIFT


@pytest.fixture(autouse=True)
def _fresh_pyro():
    pyro.clear_param_store()
    pyro.set_rng_seed(seed(0))
    yield
    pyro.clear_param_store()
