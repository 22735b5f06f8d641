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


def next_pow2(n: int, least: int = 16) -> int:
    """The smallest power of two >= ``max(n, least)``: ``tl.arange`` and ``tl.dot`` block sizes."""
    return max(least, 1 << (max(n, 1) - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA ``device`` (cached: launch planning runs every decode step);
    4 elsewhere (Triton's CPU interpreter), so that the split-over-sequence paths are still exercised."""
    if device.type != "cuda":
        return 4
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_shared_memory(index: int) -> int:
    return getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", 48 * 1024)


def shared_memory(device: torch.device) -> int:
    """Bytes of shared memory one program may use on a CUDA ``device`` (the opt-in per-block limit: 227 KB
    on an H100, 163 KB on an A100); 0 elsewhere (Triton's CPU interpreter), which picks the small tiles."""
    if device.type != "cuda":
        return 0
    return _cuda_shared_memory(device.index if device.index is not None else torch.cuda.current_device())
