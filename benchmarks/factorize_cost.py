"""Time and error of ways to get a truncated factorisation of a tall KV-cache matrix (xKV's prefill step).

For shapes ``T x D`` (tokens x group width) and rank ``r``: the project's exact route
(``kvcompress.ops.truncated_svd``: float64 Gram + eigh), float32 Gram + eigh, ``torch.linalg.svd`` in
float32, and randomised ``torch.svd_lowrank`` (q = r + 16, 2 power iterations). Error is the Frobenius
error of the rank-r product relative to the optimum (the discarded singular values): 1.000 is optimal.

    python benchmarks/factorize_cost.py --device cuda
    python benchmarks/factorize_cost.py --device cpu --max-elements 2e7
"""

from __future__ import annotations

import argparse
import time

import torch

from kvcompress.ops import truncated_svd


def gram32(x: torch.Tensor, rank: int):
    _, vecs = torch.linalg.eigh(x.mT @ x)
    right = vecs[..., -rank:].flip(-1).mT
    return x @ right.mT, right


def svd32(x: torch.Tensor, rank: int):
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    return u[..., :rank] * s[..., None, :rank], vh[..., :rank, :]


def lowrank(x: torch.Tensor, rank: int):
    u, s, v = torch.svd_lowrank(x, q=min(rank + 16, min(x.shape[-2:])), niter=2)
    return u[..., :rank] * s[..., None, :rank], v[..., :rank].mT


def timed(fn, x, rank, device, repeats=3):
    fn(x, rank)
    if device == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(x, rank)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-elements", type=float, default=2**27, help="skip shapes larger than T*D (default 2^27)")
    args = parser.parse_args()
    shapes = [s for s in [(4096, 960, 120), (4096, 960, 180), (4096, 4096, 512), (32768, 4096, 512)]
              if s[0] * s[1] <= args.max_elements]
    print(f"device {args.device}; median of 3 after a warm-up")
    print("| T x D, rank | method | seconds | error / optimal |\n|---|---|---|---|")
    for t, d, r in shapes:
        g = torch.Generator(device="cpu").manual_seed(0)
        # a decaying spectrum like a KV cache's
        x = (torch.randn(t, d, generator=g) * torch.exp(-torch.arange(d) / (d / 8))).to(args.device)
        s = torch.linalg.svdvals(x.double())
        optimum = s[r:].pow(2).sum().sqrt()
        for name, fn in (("float64 Gram + eigh (default)", truncated_svd), ("float32 Gram + eigh", gram32),
                         ("float32 SVD", svd32), ("randomised svd_lowrank", lowrank)):
            if name == "float32 SVD" and t * d > 4096 * 4096:
                continue
            seconds, (left, right) = timed(fn, x, r, args.device)
            err = (x.double() - left.double() @ right.double()).norm() / optimum
            print(f"| {t} x {d}, {r} | {name} | {seconds:.4f} | {err:.4f} |")


if __name__ == "__main__":
    main()
