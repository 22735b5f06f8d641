"""Fused GPU kernels (Triton) for the compressed caches' decode attention, each with a plain-PyTorch
reference that is the CPU path and the definition the kernel is tested against.

``triton_usable(tensor)`` says whether a Triton kernel can run on a tensor's device: Triton is
importable, the tensor lives on a CUDA device, and ``KVCOMPRESS_DISABLE_TRITON`` is not set (a switch
for A/B timing and for bisecting a suspected kernel bug).
"""

from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install on a machine without a GPU toolchain
        return False
    return True


def triton_usable(tensor: torch.Tensor) -> bool:
    """True when the Triton kernels can run on ``tensor``'s device (CUDA + Triton, not disabled)."""
    if os.environ.get("KVCOMPRESS_DISABLE_TRITON", "") not in ("", "0"):
        return False
    if os.environ.get("TRITON_INTERPRET", "") == "1":  # Triton's CPU interpreter: development and tests
        return _triton_importable()
    return tensor.is_cuda and _triton_importable()
