import pyro
import pytest
import torch
from hypothesis import HealthCheck, settings

# The suite's tensors are tiny: one thread avoids inter-op overhead and oversubscription.
torch.set_num_threads(1)

settings.register_profile(
    "carv",
    deadline=None,
    derandomize=True,  # tests are seeded: the same examples every run, never flaky
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("carv")


@pytest.fixture(autouse=True)
def _fresh_pyro():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()
