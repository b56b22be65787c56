"""Four CPU devices for every test, so that pmap, psum and pmean run for real.

This must run before JAX initialises its backends, hence at import time of the conftest.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import chex

chex.set_n_cpu_devices(4)  # sets XLA_FLAGS; must happen before JAX initialises a backend
