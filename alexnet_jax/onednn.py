"""oneDNN's convolutions inside the XLA:CPU step (`model.kernels=onednn`).

XLA:CPU in jaxlib 0.10 computes convolutions with Eigen (or YNNPACK, slower still): on AlexNet's
layers 1.2-1.5x slower than oneDNN, the library PyTorch's CPU convolutions use, and two thirds of
the training step. No XLA option reaches oneDNN's convolutions (`cpu_flags.py`; README,
"Performance"), so this module calls them itself: `csrc/onednn_conv.cc` holds three XLA FFI
handlers (forward, input gradient, kernel gradient), compiled on first use with the system C++
compiler against the oneDNN wheel of requirements.txt, cached, and registered with `jax.ffi`;
`conv` is a `custom_vjp` over them. The step stays one XLA program: pure, jit-able, pmap-able.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
import threading
import warnings

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "onednn_conv.cc")
TARGETS = ("OnednnConvForward", "OnednnConvBackwardData", "OnednnConvBackwardWeights")
TARGETS_BF16 = tuple(f"{name}Bf16" for name in TARGETS)
_lock = threading.Lock()
_loaded: list[str] = []  # the path of the registered library, once loaded


def prefix() -> str:
    """Where pip put the oneDNN wheels' include/ and lib/ (this environment's data prefix)."""
    return os.environ.get("ALEXNET_JAX_ONEDNN_PREFIX") or sysconfig.get_paths()["data"]


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def missing() -> str | None:
    """Why `model.kernels=onednn` cannot run here, in one line; None if it can (cheap: no build)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        here = f"{platform.system()} {platform.machine()}"
        return f"model.kernels=onednn needs Linux on x86-64 (the oneDNN wheels'); this is {here}"
    root = prefix()
    for path, what in (
        (os.path.join(root, "include", "dnnl.hpp"), "oneDNN's headers (onednn-devel-cpu-gomp)"),
        (os.path.join(root, "lib", "libdnnl.so"), "oneDNN (onednn-cpu-gomp)"),
    ):
        if not os.path.exists(path):
            return (
                f"model.kernels=onednn: {what} not found at {path}; pip install -r requirements.txt"
            )
    if _compiler() is None:
        return (
            "model.kernels=onednn needs a C++ compiler (g++, or $CXX) to build csrc/onednn_conv.cc"
        )
    return None


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "alexnet_jax")


def build() -> str:
    """The compiled library's path, compiling it first if this source, jaxlib and oneDNN have not
    been compiled together before (a few seconds). Written under a temporary name and renamed, so
    that processes building at once never load a half-written file."""
    problem = missing()
    if problem:
        raise RuntimeError(problem)
    root, include = prefix(), jax.ffi.include_dir()
    with open(SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read() + f"{jax.__version__}|{include}|{root}".encode())
    out = os.path.join(cache_dir(), f"onednn_conv-{digest.hexdigest()[:16]}.so")
    if os.path.exists(out):
        return out
    os.makedirs(cache_dir(), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir())
    os.close(fd)
    lib = os.path.join(root, "lib")
    cmd = [
        str(_compiler()), "-O2", "-std=c++17", "-shared", "-fPIC", "-w", SOURCE,
        f"-I{include}", f"-I{os.path.join(root, 'include')}", f"-L{lib}", "-ldnnl",
        f"-Wl,-rpath,{lib}", "-o", tmp,
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        os.unlink(tmp)
        raise RuntimeError(f"building {SOURCE} failed:\n{result.stderr[-2000:]}")
    os.replace(tmp, out)
    return out


def load() -> str:
    """Builds (if needed) and registers the FFI targets once per process; the library's path."""
    with _lock:
        if not _loaded:
            path = build()
            lib = ctypes.cdll.LoadLibrary(path)
            for name in TARGETS + TARGETS_BF16:
                capsule = jax.ffi.pycapsule(getattr(lib, name))
                jax.ffi.register_ffi_target(name, capsule, platform="cpu")
            _loaded.append(path)
    return _loaded[0]


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX-BF16), where oneDNN's
    bf16 convolutions are faster than float32 ones; elsewhere they would be emulated."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


@functools.cache
def usable() -> bool:
    """Whether oneDNN's convolutions can run in this process: built (or cached) and registered.
    model.kernels='auto' takes them on a CPU when they can; a failed build says why, once."""
    if missing() is not None:
        return False
    try:
        load()
    except (RuntimeError, OSError) as e:
        warnings.warn(f"model.kernels=auto: XLA's convolutions; oneDNN's: {e}", stacklevel=2)
        return False
    return True


def _out_size(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv(x: Array, kernel: Array, stride: int, pad: int, bf16: bool = False) -> Array:
    """`lax.conv_general_dilated(x, kernel, (stride, stride), [(pad, pad)] * 2,
    dimension_numbers=("NHWC", "HWIO", "NHWC"))` on oneDNN, for float32 x and kernel.

    With `bf16`, what a bfloat16 matrix unit computes (the bf16 model's `precision.Upcast`
    arithmetic, on oneDNN's bf16 kernels): x, the kernel and, backward, the output's gradient
    rounded to bfloat16; the output and both gradients float32.
    """
    return _forward(x, kernel, stride, pad, bf16)[0]


def _used(x: Array, kernel: Array, stride: int, pad: int) -> Array:
    """x without the rows and columns no window reaches (oneDNN takes no negative padding)."""
    h, w = x.shape[1:3]
    kh, kw = kernel.shape[:2]
    need_h = (_out_size(h, kh, stride, pad) - 1) * stride + kh - pad
    need_w = (_out_size(w, kw, stride, pad) - 1) * stride + kw - pad
    return x[:, : min(h, need_h), : min(w, need_w)]


def _call(target: str, shape: tuple[int, ...], *args: Array, stride: int, pad: int) -> Array:
    out = jax.ShapeDtypeStruct(shape, jnp.float32)  # every result is float32
    return jax.ffi.ffi_call(target, out, vmap_method="sequential")(*args, stride=stride, pad=pad)


def _forward(x: Array, kernel: Array, stride: int, pad: int, bf16: bool):
    if x.dtype != jnp.float32 or kernel.dtype != jnp.float32:
        raise TypeError(f"onednn.conv takes float32; got {x.dtype} and {kernel.dtype}")
    load()
    if bf16:  # kept in bf16 for the backward too: half the bytes of float32 residuals
        x, kernel = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
    n, h, w, _ = x.shape
    kh, kw, _, o = kernel.shape
    shape = (n, _out_size(h, kh, stride, pad), _out_size(w, kw, stride, pad), o)
    target = (TARGETS_BF16 if bf16 else TARGETS)[0]
    y = _call(target, shape, _used(x, kernel, stride, pad), kernel, stride=stride, pad=pad)
    return y, (x, kernel)


def _backward(stride: int, pad: int, bf16: bool, residuals, g: Array):
    x, kernel = residuals  # bf16 already with `bf16`
    used = _used(x, kernel, stride, pad)
    g = g.astype(x.dtype)
    targets = TARGETS_BF16 if bf16 else TARGETS
    dx = _call(targets[1], used.shape, g, kernel, stride=stride, pad=pad)
    dk = _call(targets[2], kernel.shape, used, g, stride=stride, pad=pad)
    if used.shape != x.shape:  # the rows no window reached get no gradient
        widths = [(0, a - b, 0) for a, b in zip(x.shape, used.shape, strict=True)]
        dx = lax.pad(dx, jnp.zeros((), dx.dtype), widths)
    return dx, dk


conv.defvjp(_forward, _backward)
