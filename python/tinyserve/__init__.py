"""tinyserve: a paged KV-cache library for LLM serving engines.

Ops take arrays from any framework (NumPy, PyTorch, CuPy, JAX, any DLPack producer); the device
of the arrays picks the backend (CPU or CUDA). See README.md and docs/ for the contracts."""

from ._cache_pool import CachePool
from ._compactor import allocate_host_pool, compact_and_shrink, execute_plan, grow_pool
from ._ops import (
    DEFAULT_SUMMARY,
    build_page_meta,
    copy_blocks,
    page_meta_shape,
    paged_attention,
    plan_paged_attention,
    reshape_and_cache,
    select_pages,
    select_pages_workspace_bytes,
    swap_blocks,
)
from ._tinyserve import (
    ArgumentTypeError,
    BlockManager,
    Compactor,
    MovePlan,
    OutOfBlocks,
    __version__,
    cpu_hardware_float16,
    cuda_compiled,
    cuda_device_count,
    num_threads,
    set_num_threads,
)


def cuda_available() -> bool:
    """True when tinyserve was built with CUDA and a CUDA device is visible."""
    return cuda_compiled() and cuda_device_count() > 0


def cmake_dir() -> str:
    """The folder to put on CMAKE_PREFIX_PATH (or pass as tinyserve_DIR) so that a C++ project's
    find_package(tinyserve) finds the library shipped in this package."""
    import os

    from . import _tinyserve

    package = os.path.dirname(os.path.abspath(_tinyserve.__file__))
    return os.path.join(package, "lib", "cmake", "tinyserve")


__all__ = [
    "DEFAULT_SUMMARY",
    "ArgumentTypeError",
    "BlockManager",
    "CachePool",
    "Compactor",
    "MovePlan",
    "OutOfBlocks",
    "__version__",
    "allocate_host_pool",
    "build_page_meta",
    "cmake_dir",
    "compact_and_shrink",
    "copy_blocks",
    "cpu_hardware_float16",
    "cuda_available",
    "cuda_compiled",
    "cuda_device_count",
    "execute_plan",
    "grow_pool",
    "num_threads",
    "page_meta_shape",
    "paged_attention",
    "plan_paged_attention",
    "reshape_and_cache",
    "select_pages",
    "select_pages_workspace_bytes",
    "set_num_threads",
    "swap_blocks",
]
