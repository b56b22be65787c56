"""Mixed precision on XLA:CPU: what a bfloat16 matrix unit computes, written out in float32.

`model.dtype=bfloat16` with the CPU kernel forms (model.kernels cpu or onednn). XLA:CPU in jaxlib
0.10 has no bfloat16 convolution or matmul (`cpu_flags.bf16_upcast`): it computes them in float32
between converts. `Upcast` writes that arithmetic out instead, with a bfloat16 unit's rounding
points (operands rounded, float32 accumulation) and no bfloat16 storage between the layers
(README, "Performance"). With model.kernels='onednn' on a CPU with bf16 units, the
convolutions compute the same on oneDNN's bf16 kernels instead (`onednn.conv`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def round_to_bfloat16(x: Array) -> Array:
    """x rounded to the nearest bfloat16 (ties to even), kept float32: bit for bit
    `x.astype(bfloat16).astype(float32)`, as one elementwise op that XLA fuses into the op making
    `x`, where the convert pair is two passes around a bfloat16 buffer."""
    return lax.reduce_precision(x, exponent_bits=8, mantissa_bits=7)


@jax.custom_vjp
def _bf16_operand(x: Array) -> Array:
    return round_to_bfloat16(x)


# The operand's rounding passes its cotangent through: the gradient a matrix unit returns is its
# float32 accumulator (the conv's or matmul's own backward rounds *its* operands, below).
_bf16_operand.defvjp(lambda x: (round_to_bfloat16(x), None), lambda _, g: (g,))


@jax.custom_vjp
def _bf16_cotangent(y: Array) -> Array:
    return y


# The output's cotangent is the backward convolutions' and matmuls' operand: rounded.
_bf16_cotangent.defvjp(lambda y: (y, None), lambda _, g: (round_to_bfloat16(g),))


class Upcast:
    """A layer's operands and result in `dtype`; with `on` and dtype bfloat16, the arithmetic of a
    bfloat16 matrix unit written out in float32 (model.kernels='cpu').

    Every convolution and matmul then takes bfloat16-rounded operands, forward and backward (the
    input and the kernel; the output's gradient), and accumulates and returns float32: what a
    TPU's MXU or a GPU's tensor cores compute for bf16 inputs with a float32 accumulator
    (`preferred_element_type=float32`). The activations, the elementwise layers (ReLU, LRN,
    pooling, dropout) and the gradients stay float32. XLA:CPU has no bfloat16 convolution or
    matmul (`cpu_flags.bf16_upcast`): it would compute these same float32 products, and storing
    activations and gradients in bfloat16 as well (the portable form) costs a conversion at every
    layer boundary and saves no arithmetic (README, "Performance").
    """

    def __init__(self, dtype: Any, on: bool) -> None:
        self.dtype = jnp.dtype(dtype)
        self.on = on and self.dtype == jnp.bfloat16

    def operand(self, x: Array) -> Array:
        if self.on:
            return _bf16_operand(x.astype(jnp.float32))
        return x.astype(self.dtype)

    def result(self, y: Array) -> Array:
        return _bf16_cotangent(y) if self.on else y.astype(self.dtype)
