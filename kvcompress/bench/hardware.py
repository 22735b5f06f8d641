"""Device utilities the benchmark scripts share: synchronisation, measured copy bandwidth (the bytes floor
of a decode step divides by it) and random MLA decode-kernel inputs."""

from __future__ import annotations

import time

import torch


def sync(device: str | torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA), so that wall-clock times are the device's."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def copy_bandwidth(device: str | torch.device, gib: float | None = None) -> float:
    """Bytes/s of a device copy of ``gib`` GiB (default 1 on CUDA, 0.25 on CPU), counting bytes read and
    written; best of 10 copies after 3 untimed ones."""
    gib = gib if gib is not None else (1.0 if str(device).startswith("cuda") else 0.25)
    n = int(gib * 2**30) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    best = float("inf")
    for _ in range(10):
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    del src, dst
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
    return 2 * n * 2 / best


def mla_kernel_inputs(batch: int, heads: int, tokens: int, dtype: torch.dtype, device: str, seed: int = 0,
                      r: int = 512, p: int = 64):
    """Fresh random MLA decode inputs (one query token): queries ``(batch, heads, 1, r)``, RoPE queries
    ``(batch, heads, 1, p)``, latent ``(batch, tokens, r)`` and RoPE key ``(batch, tokens, p)``, unit scale."""
    g = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    return rand(batch, heads, 1, r), rand(batch, heads, 1, p), rand(batch, tokens, r), rand(batch, tokens, p)
