"""Framework interop: which framework made an array, its device, its current stream, and
allocation through that framework. Frameworks are imported only when an array of theirs shows up,
so importing tinyserve never imports torch, CuPy or JAX."""

from __future__ import annotations

import importlib
import numbers
import operator
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._tinyserve import ArgumentTypeError

# torch's C++ DLPack exporter and raw current-stream query, found once the first torch tensor shows
# up. Both are private to torch (and may be absent): every use falls back to the public path.
_TORCH_TENSOR: Any = None
_TORCH_TO_DLPACK: Any = None
_TORCH_RAW_STREAM: Any = None


def _find_torch_fast_paths() -> None:
    global _TORCH_TENSOR, _TORCH_TO_DLPACK, _TORCH_RAW_STREAM
    torch = sys.modules.get("torch")
    if torch is None:
        return
    _TORCH_TO_DLPACK = getattr(torch._C, "_to_dlpack", None)
    _TORCH_RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    _TORCH_TENSOR = torch.Tensor


def export(array: Any) -> Any:
    """What to hand the compiled core for `array`. A torch tensor goes as the DLPack capsule that
    torch's C++ exporter makes: the same description of the same memory as torch's Python-level
    ``__dlpack__``, at about a fifth of the cost (which matters with up to ten arrays per call), and
    without the event that ``__dlpack__`` records on the caller's stream for the legacy default
    stream to wait on when the two differ. Anything else goes as it is (the core imports it
    through ``__dlpack__`` or the buffer protocol).
    """
    tp = type(array)
    if tp is not _TORCH_TENSOR:
        if _TORCH_TENSOR is not None or tp.__module__ != "torch" or tp.__name__ != "Tensor":
            return array
        _find_torch_fast_paths()
    if _TORCH_TO_DLPACK is None:
        return array
    try:
        return _TORCH_TO_DLPACK(array)
    except Exception:  # noqa: BLE001 - whatever it refuses, the public path reports
        return array


_FRAMEWORKS = {"torch": "torch", "cupy": "cupy", "numpy": "numpy", "jax": "jax", "jaxlib": "jax"}


def framework(array: Any) -> str:
    """'torch', 'cupy', 'jax', 'numpy', or 'other' (any DLPack or buffer-protocol producer). A
    subclass defined elsewhere (a torch.Tensor subclass of the caller's) is its base's."""
    for cls in type(array).__mro__[:-1]:  # the class, then its bases; not object
        fw = _FRAMEWORKS.get(cls.__module__.split(".", 1)[0])
        if fw is not None:
            return fw
    return "other"


def is_cuda(array: Any) -> bool:
    """True when the array's memory is on a CUDA device (DLPack device type 2 or 13)."""
    dlpack_device = getattr(array, "__dlpack_device__", None)
    if dlpack_device is None:
        return False
    try:
        return dlpack_device()[0] in (2, 13)
    except Exception:  # noqa: BLE001 - a device DLPack cannot name: the core reports it
        return False


def resolve_stream(
    stream: Any, array: Any, op: str, cuda: bool | None = None, fw: str | None = None
) -> int:
    """The cudaStream_t integer that `op` launches on. None picks the current stream of the
    framework that made `array` (torch, CuPy), else the legacy default stream. `cuda` is
    is_cuda(array) and `fw` framework(array) when the caller knows them. The core checks the
    integer's range."""
    if stream is None:
        if not (is_cuda(array) if cuda is None else cuda):
            return 0
        if fw is None:
            fw = framework(array)
        if fw == "torch":
            if _TORCH_TENSOR is None:
                _find_torch_fast_paths()
            if _TORCH_RAW_STREAM is not None and type(array) is _TORCH_TENSOR:
                return int(_TORCH_RAW_STREAM(array.get_device()))
            torch = sys.modules["torch"]
            return int(torch.cuda.current_stream(array.device).cuda_stream)
        if fw == "cupy":
            cupy = sys.modules["cupy"]
            return int(cupy.cuda.get_current_stream().ptr)
        return 0
    if isinstance(stream, numbers.Integral) and not isinstance(stream, bool):
        return int(stream)  # NumPy integers too
    for attribute in ("cuda_stream", "ptr"):
        value = getattr(stream, attribute, None)
        if isinstance(value, int):
            return value
    raise ArgumentTypeError(
        f"tinyserve.{op}: stream must be None, an int (cudaStream_t), or an object with "
        f".cuda_stream (torch) or .ptr (CuPy), got {type(stream).__name__}"
    )


def int_argument(value: Any, op: str, name: str) -> int:
    """An int argument that a Python wrapper reads itself as an int, as the core reads one:
    anything with __index__ (NumPy integers, 0-d integer tensors) but a bool or a bool tensor;
    anything else is the core's ArgumentTypeError naming `op` and `name`."""
    is_bool = isinstance(value, bool) or str(getattr(value, "dtype", "")) in ("bool", "torch.bool")
    if not is_bool:
        try:
            return operator.index(value)
        except TypeError:
            pass
    kind = "bool" if is_bool else type(value).__name__
    raise ArgumentTypeError(f"tinyserve.{op}: {name} must be an int, got {kind}")


def array_list(value: Any, op: str, name: str, items: str) -> list[Any] | tuple[Any, ...]:
    """A sequence of arrays: a list or tuple as it is (copy_blocks runs every step), another
    sequence as a list. One array, which iterates by rows, or anything else is
    ArgumentTypeError: `{name} must be a sequence of {items}`."""
    if isinstance(value, (list, tuple)):
        return value
    is_one_array = hasattr(value, "__dlpack__") or hasattr(value, "__array_interface__")
    if is_one_array or not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
        raise ArgumentTypeError(
            f"tinyserve.{op}: {name} must be a sequence of {items}, got {type(value).__name__}"
        )
    return list(value)


def empty(
    like: Any,
    shape: tuple[int, ...],
    dtype: str | None = None,
    fw: str | None = None,
    op: str = "empty",
) -> Any:
    """A new uninitialised array of `shape` from the framework and device of `like`, with the
    dtype of `like` or the one named ('float32', 'uint8'). `fw` is framework(like) when the
    caller knows it; `op` names the op in errors."""
    if fw is None:
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
        raise ArgumentTypeError(
            f"tinyserve.{op}: cannot allocate an output on a CUDA device through an unknown "
            f"framework (pass out= explicitly), got a {type(like).__name__}"
        )
    if dtype is None:
        try:  # a DLPack producer or a buffer of a dtype NumPy knows
            dtype = np.from_dlpack(like).dtype if hasattr(like, "__dlpack__") else None
            dtype = np.asarray(like).dtype if dtype is None else dtype
        except (TypeError, ValueError, BufferError, RuntimeError):
            raise ArgumentTypeError(
                f"tinyserve.{op}: cannot allocate an output like a {type(like).__name__} whose "
                "dtype NumPy cannot hold (pass out= explicitly)"
            ) from None
    return np.empty(shape, dtype=dtype)


def any_jax(*arrays: Any) -> bool:
    """Whether any of the arrays is JAX's (never, while JAX has not been imported)."""
    return "jax" in sys.modules and any(framework(a) == "jax" for a in arrays)


def wait_ready(*arrays: Any) -> None:
    """JAX computes asynchronously and shares no stream with us: wait until its arrays exist."""
    if "jax" not in sys.modules:
        return
    for a in arrays:
        if framework(a) == "jax":
            a.block_until_ready()


def device_key(array: Any, fw: str) -> Any:
    """A hashable name of the array's device; `fw` is framework(array)."""
    if fw == "torch":
        return array.device
    return array.__dlpack_device__()
