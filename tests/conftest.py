"""Four CPU devices for every test, so that pmap, psum and pmean run for real; hypothesis profiles.

The device count must be set before JAX initialises its backends, hence at import time of the
conftest.

Hypothesis profiles: `default` is derandomized (CI sees the same examples every run, so a
statistical property cannot fail by bad luck on a submission) and small; `slow` draws fresh,
ten times as many examples (the `tests/test_props_*.py` modules multiply their per-test
`max_examples` by 10 under it). `pytest -m slow` picks `slow`; HYPOTHESIS_PROFILE=slow (or default)
overrides that, e.g. `HYPOTHESIS_PROFILE=slow pytest -m '' tests/test_props_*.py` runs every
property with the larger counts.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import chex
from hypothesis import HealthCheck, settings

chex.set_n_cpu_devices(4)  # sets XLA_FLAGS; must happen before JAX initialises a backend

# Generating a pytree or an image can take longer than hypothesis's data-generation budget on
# two busy cores; that is not a problem with the test.
_SLOW_DATA = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile(
    "default", derandomize=True, database=None, suppress_health_check=_SLOW_DATA
)
settings.register_profile(
    "slow", derandomize=False, database=None, suppress_health_check=_SLOW_DATA
)


def pytest_configure(config):
    marks = (config.getoption("markexpr", "") or "").strip()
    profile = os.environ.get("HYPOTHESIS_PROFILE") or ("slow" if marks == "slow" else "default")
    settings.load_profile(profile)
