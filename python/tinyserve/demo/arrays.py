"""Allocation and transfers: NumPy on the CPU, torch for bfloat16 and for CUDA."""

from __future__ import annotations

from typing import Any

import numpy as np


class Arrays:
    """Allocation and transfers in the framework that holds the KV cache."""

    def __init__(self, device: str, dtype: str):
        self.device = device
        self.dtype = dtype
        self.use_torch = device == "cuda" or dtype == "bfloat16"
        if self.use_torch:
            import torch

            self.torch = torch
            self.torch_dtype = getattr(torch, dtype)
        self.framework = "torch" if self.use_torch else "NumPy"

    def nan(self, shape: tuple[int, ...]) -> Any:
        """A new array of the storage dtype filled with NaN: a slot read before it was written
        turns the attention output into NaN, which the check reports."""
        if self.use_torch:
            return self.torch.full(shape, float("nan"), dtype=self.torch_dtype, device=self.device)
        return np.full(shape, np.nan, dtype=self.dtype)

    def put(self, array: np.ndarray) -> Any:
        """A host array on the device; floating-point arrays are converted to the storage dtype
        (they are already rounded to it), integer arrays keep their dtype."""
        array = np.ascontiguousarray(array)
        floating = array.dtype.kind == "f"
        if self.use_torch:
            t = self.torch.from_numpy(array)
            return t.to(device=self.device, dtype=self.torch_dtype if floating else t.dtype)
        return array.astype(self.dtype, copy=False) if floating else array

    def round(self, array: np.ndarray) -> np.ndarray:
        """float32 values rounded to the storage dtype (exactly representable in float32)."""
        if self.dtype == "float32":
            return array
        if self.use_torch:
            t = self.torch.from_numpy(np.ascontiguousarray(array))
            return t.to(self.torch_dtype).to(self.torch.float32).numpy()
        return array.astype(self.dtype).astype(np.float32)

    def to_f64(self, array: Any) -> np.ndarray:
        if self.use_torch:
            return array.detach().to("cpu", self.torch.float64).numpy()
        return np.asarray(array, dtype=np.float64)

    def nbytes(self, array: Any) -> int:
        if self.use_torch:
            return array.numel() * array.element_size()
        return array.nbytes

    def synchronize(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()
