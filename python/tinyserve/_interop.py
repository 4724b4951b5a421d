"""Framework interop: which framework made an array, its device, its current stream, and
allocation through that framework. Frameworks are imported only when an array of theirs shows up,
so importing tinyserve never imports torch, CuPy or JAX."""

from __future__ import annotations

import importlib
import sys
from typing import Any

import numpy as np


def framework(array: Any) -> str:
    """'torch', 'cupy', 'jax', 'numpy', or 'other' (any DLPack or buffer-protocol producer)."""
    module = type(array).__module__.split(".", 1)[0]
    if module in ("torch", "cupy", "numpy"):
        return module
    if module in ("jax", "jaxlib"):
        return "jax"
    return "other"


def is_cuda(array: Any) -> bool:
    """True when the array's memory is on a CUDA device (DLPack device type 2 or 13)."""
    dlpack_device = getattr(array, "__dlpack_device__", None)
    if dlpack_device is None:
        return False
    return dlpack_device()[0] in (2, 13)


def resolve_stream(stream: Any, array: Any) -> int:
    """The cudaStream_t integer to launch on. None picks the current stream of the framework
    that made `array` (torch, CuPy), else the legacy default stream."""
    if stream is None:
        if not is_cuda(array):
            return 0
        fw = framework(array)
        if fw == "torch":
            torch = sys.modules["torch"]
            return int(torch.cuda.current_stream(array.device).cuda_stream)
        if fw == "cupy":
            cupy = sys.modules["cupy"]
            return int(cupy.cuda.get_current_stream().ptr)
        return 0
    if isinstance(stream, int):
        return stream
    for attribute in ("cuda_stream", "ptr"):
        value = getattr(stream, attribute, None)
        if isinstance(value, int):
            return value
    raise TypeError(
        "tinyserve: stream must be None, an int (cudaStream_t), or an object with .cuda_stream "
        f"(torch) or .ptr (CuPy), got {type(stream).__name__}"
    )


def empty(like: Any, shape: tuple[int, ...], dtype: str | None = None) -> Any:
    """A new uninitialised array of `shape` from the framework and device of `like`, with the
    dtype of `like` or the one named ('float32', 'uint8')."""
    fw = framework(like)
    if fw == "torch":
        torch = sys.modules["torch"]
        dt = like.dtype if dtype is None else getattr(torch, dtype)
        return torch.empty(shape, dtype=dt, device=like.device)
    if fw == "cupy":
        cupy = sys.modules["cupy"]
        with cupy.cuda.Device(like.device.id):
            return cupy.empty(shape, dtype=like.dtype if dtype is None else dtype)
    if fw == "jax":
        jax = sys.modules["jax"]
        jnp = importlib.import_module("jax.numpy")
        dt = like.dtype if dtype is None else dtype
        # JAX arrays are immutable to JAX programs; this one is fresh and private until returned,
        # and the ops wait for writes into it to finish before handing it back (_ops._finish_jax).
        return jax.device_put(jnp.zeros(shape, dtype=dt), next(iter(like.devices())))
    if fw == "numpy":
        return np.empty(shape, dtype=like.dtype if dtype is None else dtype)
    if is_cuda(like):
        raise TypeError(
            f"tinyserve: cannot allocate an output like a {type(like).__name__} on a CUDA "
            "device; pass out= explicitly"
        )
    return np.empty(shape, dtype=np.asarray(like).dtype if dtype is None else dtype)


def wait_ready(*arrays: Any) -> None:
    """JAX computes asynchronously and shares no stream with us: wait until its arrays exist."""
    for a in arrays:
        if framework(a) == "jax":
            a.block_until_ready()
