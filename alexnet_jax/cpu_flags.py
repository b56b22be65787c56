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


def bf16_upcast() -> bool:
    """Whether this backend computes bfloat16 convolutions and matmuls in float32.

    XLA:CPU in jaxlib 0.10 has no bfloat16 convolution or matmul kernel on its paths (Eigen,
    YNNPACK; the oneDNN fusion options do not take them either): a pass rewrites each one into
    convert -> float32 op -> convert before any library sees it, so the AMX-BF16 units of recent
    Xeons stay idle and `model.dtype=bfloat16` costs the converts and saves no arithmetic.
    Read off the compiled HLO of one small convolution and one matmul, so that a jaxlib that
    changes this is noticed (the benchmark prints it; tests/test_model_speedforms.py checks it).
    """
    import jax
    import jax.numpy as jnp

    x = jnp.zeros((2, 8, 8, 8), jnp.bfloat16)
    w = jnp.zeros((3, 3, 8, 8), jnp.bfloat16)

    def conv(x: jax.Array, w: jax.Array) -> jax.Array:
        dims = ("NHWC", "HWIO", "NHWC")
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dims)

    texts = [
        jax.jit(conv).lower(x, w).compile().as_text(),
        jax.jit(jnp.matmul).lower(x[0, 0], w[0, 0]).compile().as_text(),
    ]
    ops = [
        line.split("=", 1)[1].strip()
        for text in texts
        for line in (text or "").splitlines()  # None where a backend cannot print its HLO
        if " convolution(" in line or " dot(" in line
    ]
    return bool(ops) and all(op.startswith("f32") for op in ops)
