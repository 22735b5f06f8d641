"""One layer's xKV decode attention: correctness of the fused kernels and their speed against stock and
today's materialising path, with the bytes and flops floors measured on the same device.

(a) Check: fresh random bf16 and fp32 inputs (sinks, two segments of odd lengths, a tail, left padding,
GQA) through ``xkv_decode_attention`` with the Triton kernels and with the float32 reference; prints the
relative max error (limits: bf16 1e-2, fp32 1e-4; the script exits 1 if one is exceeded).

(b) Timing at the Llama-3.1-8B shape: 32 query heads, 8 KV heads, head_dim 128, group of 4 layers (group
width 4096), rank_k 512, rank_v 768 (XKVCache's defaults 0.125 / 0.1875), RoPE theta 500000, bf16; per
context ``T``: 4 sink tokens, one segment of ``T - 68`` tokens, a 64-token tail. For each batch x context:

- stock: ``F.scaled_dot_product_attention`` over full K/V ``[B, 8, T, 128]`` (what DynamicCache decode reads);
- today: XKVLayer's materialising path: rebuild K = RoPE(U_k B_k) and V = U_v B_v in HBM, concatenate with
  sinks and tail, then the same SDPA;
- fused: ``kvcompress.kernels.xkv_decode.xkv_decode_attention`` (Triton);
- floor: max(bytes / copy bandwidth, rebuild flops / bf16 matmul rate), with bytes = factors + right factors
  + exact tokens + query/output, flops = ``2 * B * T_seg * r_k * H * d`` (rebuilding the keys; the value side
  stays in the latent and adds ``2 * B * T_seg * Hq * r_v``, counted too). Both ceilings are measured here:
  a 1 GiB device copy and an 8192^3 bf16 matmul.

(c) ``--select-budgets F [F ...]`` (fractions of the segment, or token counts >= 1): selective reconstruction
(``XKVCache(select_budget=F, select_chunk=--select-chunk)``) timed at the same shapes: a step's chunk
selection (``--select-score tokens``: :func:`kvcompress.kernels.xkv_select.select_chunks_by_tokens`, every token
scored in the factor space; ``landmarks``: :func:`~kvcompress.kernels.xkv_select.select_chunks`, landmark keys
rebuilt and scored; then ``topk``) plus
the fused attention over the selected tokens (:class:`~kvcompress.kernels.xkv_decode.SelectedPart`), columns
``select<F>_us``; the check also compares the selected kernels with the reference.

Times are medians of ``triton.testing.do_bench`` (L2 flushed between runs). About 2 minutes on an H100.

Host work per fused call (printed as "per call: ..."): torch ops dispatched (views included) and Triton
launches. Counted under the CPU interpreter for sinks + one segment + tail: before the single-buffer
rewrite 87 torch ops (39 of them views; a torch.cat of sinks and tail, logsumexp/where merges, a float copy
of B_v) + 2 launches; after, 5 torch ops (4 allocations and the split-K sum) + 4 launches
(``tests/test_kernels_xkv.py`` bounds it). patch_xkv's attention function adds 1 view (the mask row).

GPU:
    PYTHONPATH=. python benchmarks/xkv_decode.py
    PYTHONPATH=. python benchmarks/xkv_decode.py --select-budgets 0.05 0.1 0.25 --select-chunk 32
CPU smoke run (reference path only, tiny shapes):
    PYTHONPATH=. python benchmarks/xkv_decode.py --device cpu --small
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from kvcompress.kernels import configure_kernels
from kvcompress.kernels.xkv_decode import ExactPart, FactoredPart, SelectedPart, xkv_decode_attention
from kvcompress.kernels.xkv_select import select_chunks, select_chunks_by_tokens
from kvcompress.ops import apply_rope, rope_cos_sin
from kvcompress.xkv import _rope_table_dtype
from kvcompress.xkv.compression import chunk_count, chunk_means

LLAMA8B = dict(q_heads=32, kv_heads=8, head_dim=128, rank_k=512, rank_v=768, theta=500000.0)
SINK, TAIL = 4, 64


def make_layer(batch: int, tokens: int, shape: dict, dtype: torch.dtype, device: str, segments: tuple[int, ...] | None = None,
               seed: int = 0):
    """Query ``[B, Hq, 1, d]`` and the parts of one layer: sinks, segments, tail (random, unit-scale)."""
    g = torch.Generator(device=device).manual_seed(seed)
    h, d, rk, rv = shape["kv_heads"], shape["head_dim"], shape["rank_k"], shape["rank_v"]

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=g, device=device, dtype=torch.float32) * scale).to(dtype)

    segments = segments or (tokens - SINK - TAIL,)
    inv_freq = 1.0 / (shape["theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d)).float()
    parts, slot = [ExactPart(randn(batch, h, SINK, d), randn(batch, h, SINK, d))], SINK
    for n in segments:
        cos, sin = rope_cos_sin(inv_freq.to(device), torch.arange(slot, slot + n, device=device))
        cos, sin = cos.to(_rope_table_dtype(dtype)), sin.to(_rope_table_dtype(dtype))  # as XKVCache passes them
        parts.append(FactoredPart(randn(batch, n, rk), randn(batch, rk, h * d, scale=rk ** -0.5),
                                  randn(batch, n, rv), randn(batch, rv, h * d, scale=rv ** -0.5), cos, sin))
        slot += n
    parts.append(ExactPart(randn(batch, h, TAIL, d), randn(batch, h, TAIL, d)))
    query = randn(batch, shape["q_heads"], 1, d)
    return query, parts


def materialise(parts) -> tuple[torch.Tensor, torch.Tensor]:
    """Today's XKVLayer.full_states: rebuild each segment (matmul, RoPE in float32, back to dtype), concat."""
    keys, values = [], []
    for part in parts:
        if isinstance(part, ExactPart):
            keys.append(part.keys)
            values.append(part.values)
            continue
        b, t, _ = part.key_factor.shape
        d = keys[0].shape[-1]
        k = torch.matmul(part.key_factor, part.key_right).view(b, t, -1, d)
        k = apply_rope(k, part.cos[:, None, :], part.sin[:, None, :])
        keys.append(k.transpose(1, 2))
        values.append(torch.matmul(part.value_factor, part.value_right).view(b, t, -1, d).transpose(1, 2))
    return torch.cat(keys, dim=-2), torch.cat(values, dim=-2)


def selective_step(query, parts, scale, budget: float, chunk: int, score: str = "tokens"):
    """A step's selective decode of ``parts`` (one segment at index 1) as a function ``step()``: select the top
    chunks per KV head, attend exactly over them, sinks and tail. ``score="tokens"``: each chunk's best token
    score (:func:`kvcompress.kernels.xkv_select.select_chunks_by_tokens`); ``"landmarks"``: landmarks as
    XKVCache computes them once per compression (chunk means of the key factor rows and of the cos/sin table)."""
    seg = parts[1]
    tokens = seg.length
    landmarks = chunk_means(seg.key_factor, chunk, dim=1)
    cos, sin = chunk_means(seg.cos, chunk, dim=0), chunk_means(seg.sin, chunk, dim=0)
    wanted = budget if budget >= 1 else math.ceil(budget * tokens)
    keep = min(chunk_count(tokens, chunk), max(1, chunk_count(int(wanted), chunk)))

    def step(use_triton=None):
        if score == "tokens":
            index, index_valid = select_chunks_by_tokens(query, seg.key_factor, seg.key_right, seg.cos, seg.sin, scale,
                                                         chunk, keep)
        else:
            index, index_valid = select_chunks(query, landmarks, seg.key_right, cos, sin, scale, tokens, chunk, keep)
        selected = [parts[0], SelectedPart(seg, index, index_valid), *parts[2:]]
        return xkv_decode_attention(query, selected, scale, use_triton=use_triton)
    return step, keep * chunk


def sdpa(query, keys, values, scale):
    return F.scaled_dot_product_attention(query, keys, values, scale=scale, enable_gqa=True)


def timer(device: str):
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3  # us

    def cpu(fn):
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e6
    return cpu


def ceilings(device: str, measure) -> tuple[float, float]:
    """(copy bandwidth in bytes/s: read + write of a 1 GiB copy; bf16 matmul flop/s at 8192^3)."""
    if device != "cuda":
        return float("nan"), float("nan")
    src = torch.empty(1 << 29, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    copy_us = measure(lambda: dst.copy_(src))
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    mm_us = measure(lambda: a @ a)
    del src, dst, a
    return 2 * (1 << 30) / (copy_us * 1e-6), 2 * 8192 ** 3 / (mm_us * 1e-6)


def check(device: str) -> bool:
    """(a): kernel vs reference on fresh random inputs; prints errors, returns whether all are in bounds."""
    ok = True
    shape = dict(LLAMA8B)
    for dtype, limit in ((torch.bfloat16, 1e-2), (torch.float32, 1e-4)):
        for batch, segments, seed in ((1, (1001, 333), 11), (3, (517,), 12)):
            tokens = SINK + sum(segments) + TAIL
            query, parts = make_layer(batch, tokens, shape, dtype, device, segments, seed=seed)
            valid = torch.ones(batch, tokens, dtype=torch.bool, device=device)
            valid[-1, : 7 + 40 * (batch > 1)] = False  # left padding on the last row
            scale = shape["head_dim"] ** -0.5
            ref = xkv_decode_attention(query, parts, scale, valid, use_triton=False)
            # On CUDA the kernels are forced (an error, not a silent fallback, if Triton is unusable); the
            # CPU smoke run has no kernels and compares the reference with itself.
            out = xkv_decode_attention(query, parts, scale, valid, use_triton=device == "cuda")
            err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            good = bool(torch.isfinite(out).all()) and err <= limit
            ok &= good
            print(f"check {str(dtype):15s} batch={batch} segments={segments}: rel max err {err:.2e} "
                  f"(limit {limit:.0e}) {'ok' if good else 'FAIL'}", flush=True)
        for batch, tokens, seed in ((1, 1401, 13), (3, 777, 14)):  # selected tokens of one segment
            query, parts = make_layer(batch, tokens, shape, dtype, device, seed=seed)
            step, _ = selective_step(query, parts, shape["head_dim"] ** -0.5, 0.1, 32)
            ref, out = step(use_triton=False), step(use_triton=device == "cuda")
            err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            good = bool(torch.isfinite(out).all()) and err <= limit
            ok &= good
            print(f"check {str(dtype):15s} batch={batch} selected 10% of {tokens - SINK - TAIL}: rel max err "
                  f"{err:.2e} (limit {limit:.0e}) {'ok' if good else 'FAIL'}", flush=True)
    return ok


def count_call(fn) -> tuple[int, int, dict]:
    """(torch ops dispatched, Triton launches, ops by name) of one call of ``fn``
    (:func:`kvcompress.kernels.xkv_decode.count_ops_and_launches`)."""
    from kvcompress.kernels.xkv_decode import count_ops_and_launches

    ops, launches = count_ops_and_launches(fn)
    return sum(ops.values()), launches, dict(ops)


def breakdown(query, parts, scale) -> list[tuple[str, float]]:
    """CUDA time per kernel name (us per call, mean of 20 calls) of one fused call, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        xkv_decode_attention(query, parts, scale)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            xkv_decode_attention(query, parts, scale)
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)
        if us and not event.key.startswith("cuda"):
            totals[event.key] = totals.get(event.key, 0.0) + us / 20
    return sorted(totals.items(), key=lambda kv: -kv[1])


def sweep_scores(query, parts, scale, measure) -> list[dict]:
    """The key-rebuild kernel's fixed configurations, each timed on the whole fused call (autotuner off)."""
    rows = []
    for bt, br, warps, stages in ((256, 64, 8, 2), (256, 64, 8, 3), (256, 32, 8, 3), (256, 32, 8, 4),
                                  (256, 128, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (256, 64, 16, 2),
                                  (256, 64, 4, 2), (512, 32, 8, 2), (512, 64, 16, 2)):
        tile = dict(BLOCK_T=bt, BLOCK_R=br, num_warps=warps, num_stages=stages)
        with configure_kernels(xkv_autotune=False, xkv_scores_config=tile):
            try:
                us = measure(lambda: xkv_decode_attention(query, parts, scale))
            except Exception as e:  # out of shared memory / registers: a result, not a crash
                rows.append(dict(tile, error=str(e)[:120]))
            else:
                rows.append(dict(tile, fused_us=us))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192, 32768])
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke run)")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--select-budgets", type=float, nargs="*", default=[],
                        help="also time selective reconstruction at these budgets (fractions of the segment in "
                        "(0, 1), or token counts >= 1)")
    parser.add_argument("--select-chunk", type=int, default=32, help="tokens per chunk (default 32)")
    parser.add_argument("--select-score", choices=("tokens", "landmarks"), default="tokens",
                        help="how the selection ranks chunks (XKVCache(select_score=...), default tokens)")
    parser.add_argument("--breakdown", action="store_true",
                        help="CUDA: time per kernel of one fused call at the largest batch x context (torch.profiler)")
    parser.add_argument("--sweep", action="store_true",
                        help="CUDA: fixed configurations of the key-rebuild kernel at the largest batch x context")
    args = parser.parse_args()
    if any(b <= 0 for b in args.select_budgets) or args.select_chunk < 1:
        parser.error("--select-budgets must be > 0 (fractions in (0, 1) or token counts >= 1); --select-chunk >= 1")
    device = args.device
    shape = dict(LLAMA8B)
    if args.small:
        shape.update(q_heads=8, kv_heads=2, head_dim=32, rank_k=32, rank_v=48)
        args.batches, args.contexts = [1, 2], [512]

    ok = check(device)
    measure = timer(device)
    bandwidth, flop_rate = ceilings(device, measure)
    print(f"measured: copy bandwidth {bandwidth / 1e9:.0f} GB/s, bf16 matmul {flop_rate / 1e12:.0f} TFLOP/s", flush=True)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    h, d, hq, rk, rv = shape["kv_heads"], shape["head_dim"], shape["q_heads"], shape["rank_k"], shape["rank_v"]
    scale = d ** -0.5
    rows = []
    for batch in args.batches:
        for tokens in args.contexts:
            query, parts = make_layer(batch, tokens, shape, dtype, device)
            keys, values = materialise(parts)  # the stock cache's K/V (same values as the rebuilt ones)
            stock = measure(lambda: sdpa(query, keys, values, scale))
            today = measure(lambda: sdpa(query, *materialise(parts), scale))
            fused = measure(lambda: xkv_decode_attention(query, parts, scale))
            selective = {}
            for budget in args.select_budgets:
                step, kept = selective_step(query, parts, scale, budget, args.select_chunk, args.select_score)
                selective[f"select{budget:g}_us"] = measure(step)
                selective[f"select{budget:g}_tokens"] = kept
            if not rows:
                n_ops, n_launches, by_name = count_call(lambda: xkv_decode_attention(query, parts, scale))
                path = "Triton kernels" if n_launches else "reference path"
                print(f"per call ({path}): {n_ops} torch ops + {n_launches} Triton launches {by_name}", flush=True)
            del keys, values
            seg = tokens - SINK - TAIL
            e = query.element_size()
            nbytes = e * batch * (seg * (rk + rv) + (rk + rv) * h * d + (SINK + TAIL) * 2 * h * d + 2 * hq * d)
            flops = 2 * batch * seg * (rk * h * d + hq * rv)
            floor = max(nbytes / bandwidth, flops / flop_rate) * 1e6
            stock_bytes = e * batch * tokens * 2 * h * d
            rows.append(dict(batch=batch, context=tokens, stock_us=stock, today_us=today, fused_us=fused,
                             floor_us=floor, bytes_floor_us=nbytes / bandwidth * 1e6,
                             flops_floor_us=flops / flop_rate * 1e6, stock_bytes_floor_us=stock_bytes / bandwidth * 1e6,
                             **selective))
            print(json.dumps(rows[-1]), flush=True)
            torch.cuda.empty_cache() if device == "cuda" else None
    extra = {}
    if device == "cuda" and (args.breakdown or args.sweep):
        query, parts = make_layer(max(args.batches), max(args.contexts), shape, dtype, device)
        if args.breakdown:
            extra["breakdown_us"] = breakdown(query, parts, scale)
            print("per-kernel CUDA us per call:", json.dumps(extra["breakdown_us"]), flush=True)
        if args.sweep:
            extra["sweep"] = sweep_scores(query, parts, scale, measure)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", shape=shape,
                           bandwidth=bandwidth, flop_rate=flop_rate, rows=rows, **extra), f, indent=1)
    if device == "cuda":
        from kvcompress.kernels import xkv_decode as kernels

        for key, config in getattr(getattr(kernels, "_xkv_scores_kernel_tuned", None), "cache", {}).items():
            print(f"autotuned scores kernel {key}: {config}")
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"\n{name}, one layer, {dtype}, Llama-3.1-8B shape {shape}; times in us (medians)\n")
    print("| batch | context | stock SDPA | today (rebuild + SDPA) | fused | floor (bytes / flops) | stock bytes floor "
          "| fused vs stock | fused vs today |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['context']} | {r['stock_us']:.1f} | {r['today_us']:.1f} | {r['fused_us']:.1f} | "
              f"{r['floor_us']:.1f} ({r['bytes_floor_us']:.1f} / {r['flops_floor_us']:.1f}) | {r['stock_bytes_floor_us']:.1f} | "
              f"{r['stock_us'] / r['fused_us']:.2f}x | {r['today_us'] / r['fused_us']:.2f}x |")
    if args.select_budgets:
        print(f"\nselective reconstruction (select_chunk={args.select_chunk}, select_score={args.select_score}): selection + fused attention over the "
              "selected tokens, us; ratios against the full fused call and stock SDPA\n")
        print("| batch | context | budget | tokens kept | selective | vs fused (full) | vs stock |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            for budget in args.select_budgets:
                us = r[f"select{budget:g}_us"]
                print(f"| {r['batch']} | {r['context']} | {budget:g} | {r[f'select{budget:g}_tokens']} | {us:.1f} | "
                      f"{r['fused_us'] / us:.2f}x | {r['stock_us'] / us:.2f}x |")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
