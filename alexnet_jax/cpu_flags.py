"""The XLA:CPU setting that makes AlexNet's training step fast on CPUs.

XLA:CPU in jaxlib 0.10 hands convolutions and matmuls to YNNPACK (`individual_convolution`,
`individual_dot`). For AlexNet's layers YNNPACK's convolution weight gradients are 3-6x slower than
XLA's own (Eigen) convolutions (conv1: 1.2 s vs 0.2 s of CPU time at batch 64), while its matmuls
are faster than Eigen's. Reductions, on the other hand, XLA rewrites into slow `reduce_window`
trees (100 ms for one bias gradient at batch 64) unless YNNPACK takes them (`reduce`). So: YNNPACK
for matmuls, matmul fusions and reductions, Eigen for convolutions. On a 2-core Xeon this takes the
training step from 0.8x to 1.2x PyTorch's speed before any change to the model (README,
"Performance"). GPUs and TPUs ignore the option.

XLA reads XLA_FLAGS once, when JAX starts its backend, so `configure()` must run before the first
JAX computation; importing `alexnet_jax` runs it. A user's own setting of the option wins.
"""

from __future__ import annotations

import os
from importlib import metadata

OPTION = "--xla_cpu_experimental_ynn_fusion_type"
VALUE = "individual_dot,reduce,dot"
# XLA aborts on an unknown flag, so the option is only set where it was measured to exist and help.
TESTED_JAXLIB = ("0.10.",)


def configure() -> bool:
    """Adds `OPTION=VALUE` to XLA_FLAGS unless set already; True if XLA_FLAGS now has the option."""
    flags = os.environ.get("XLA_FLAGS", "")
    if OPTION in flags:
        return True
    try:
        jaxlib_version = metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        return False
    if not jaxlib_version.startswith(TESTED_JAXLIB):
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {OPTION}={VALUE}".strip()
    return True


def active() -> bool:
    """Whether this process's XLA_FLAGS keep convolutions off YNNPACK."""
    return f"{OPTION}={VALUE}" in os.environ.get("XLA_FLAGS", "")
