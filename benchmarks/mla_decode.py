"""Decode speed and memory of absorbed MLA (kvcompress.mla) against stock DeepSeek-V2 decode, in one run.

The model is a DeepSeek-V2-Lite-shaped model with random weights: hidden 2048, 16 heads, kv_lora_rank 512,
RoPE 64, nope 128, v 128, q_lora_rank None, 27 layers, dense MLPs of V2-Lite's dense width (10944, about
the weight bytes V2-Lite's 2 shared + 6 routed experts read per token), a small vocabulary (4096; the
real 102400-row head would add 0.4 GB to every step of both paths alike). Only decode is timed: each
cache is filled with random latents for ``context`` tokens layer by layer (what a prefill leaves behind,
without spending minutes prefilling), then one token per batch row is decoded per step.

For every (context, batch): stock = unpatched model + ``DynamicCache``; absorbed = ``patch_mla`` +
``MLALatentCache``. Reported: median ms/step, tokens/s, peak GPU memory during the steps (absolute and
above the weights + cache already held), cache bytes, speed-up, and the bytes floor: (weight bytes + cache
bytes) / measured device copy bandwidth, the time one step must take if it only streams what it has to
read. One absorbed combination is profiled (CUDA kernels' busy time vs wall time, top kernels) to say what
dominates. Combinations that do not fit in memory are reported as skipped.

GPU (the figures in docs/mla.md):
    PYTHONPATH=. python benchmarks/mla_decode.py --device cuda --json mla.json
CPU smoke run (small shapes, seconds):
    python benchmarks/mla_decode.py --device cpu --small
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import time

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, DeepseekV2Config, DynamicCache

from kvcompress.mla import MLALatentCache, absorbed_attention, patch_mla
from kvcompress.ops import tensor_nbytes

V2_LITE = dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=None,
               qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, num_hidden_layers=27,
               intermediate_size=10944, vocab_size=4096)
SMALL = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=64, q_lora_rank=None,
             qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, num_hidden_layers=4,
             intermediate_size=512, vocab_size=512)


def build_model(shapes: dict, device: str, dtype: torch.dtype, max_positions: int):
    """A random-weight DeepSeek-V2 with dense MLPs in every layer (first_k_dense_replace = all layers)."""
    cfg = DeepseekV2Config(**shapes, first_k_dense_replace=shapes["num_hidden_layers"], n_routed_experts=8,
                           num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=64,
                           max_position_embeddings=max_positions, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                           tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def cache_kwarg(model) -> str:
    """transformers 5.24 names the cache argument ``cache``, 5.17 ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def fill(cache, cfg, batch: int, tokens: int, dtype, device) -> None:
    """Give every layer ``tokens`` random (unit-RMS, like the normalised latent) latents and RoPE keys."""
    g = torch.Generator(device=device).manual_seed(1)
    for layer in range(cfg.num_hidden_layers):
        latent = torch.randn(batch, 1, tokens, cfg.kv_lora_rank, generator=g, device=device, dtype=dtype)
        rope = torch.randn(batch, 1, tokens, cfg.qk_rope_head_dim, generator=g, device=device, dtype=dtype)
        cache.update(latent, rope, layer)
        del latent, rope


def cache_bytes(cache) -> int:
    """Every layer's keys/values bytes, the same count for both caches (stock holds the same latent)."""
    return sum(tensor_nbytes(l.keys, l.values) for l in cache.layers if l.is_initialized)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def decode(model, cache, batch: int, steps: int, warmup: int, device: str, budget_s: float) -> dict:
    """Median ms of one-token decode steps over ``cache``; peak memory during the timed steps."""
    kw = {cache_kwarg(model): cache, "use_cache": True}
    token = torch.full((batch, 1), 7, device=device, dtype=torch.long)
    for _ in range(warmup):
        model(input_ids=token, **kw)
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model(input_ids=token, **kw)
        sync(device)
        times.append(time.perf_counter() - start)
        if sum(times) > budget_s and len(times) >= 3:
            break
    result = {"ms": 1000 * statistics.median(times), "steps": len(times)}
    if device == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["transient_gib"] = (torch.cuda.max_memory_allocated() - held) / 2**30
    return result


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a device copy of 1 GiB (CPU: 256 MiB), counting bytes read and written."""
    n = (2**30 if device == "cuda" else 2**28) // 2
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
    return 2 * n * 2 / best


def weight_bytes(model) -> int:
    """Weights one decode step reads: everything but the embedding table (one row of it per token)."""
    embed = model.get_input_embeddings().weight
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not embed)


@torch.no_grad()
def profile_step(model, cache, batch: int, device: str, steps: int = 3) -> dict:
    """Wall time vs summed CUDA kernel time per step, kernel count, and the top kernels by time."""
    from torch.profiler import ProfilerActivity, profile

    kw = {cache_kwarg(model): cache, "use_cache": True}
    token = torch.full((batch, 1), 7, device=device, dtype=torch.long)
    model(input_ids=token, **kw)
    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            model(input_ids=token, **kw)
        sync(device)
        wall = (time.perf_counter() - start) / steps
    kernels: dict[str, float] = {}
    count = 0
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name] = kernels.get(event.name, 0.0) + event.time_range.elapsed_us()
            count += 1
    busy_ms = sum(kernels.values()) / 1000 / steps
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:8]
    return {"wall_ms": 1000 * wall, "kernel_busy_ms": busy_ms, "kernels_per_step": count / steps,
            "top": [(name[:90], us / 1000 / steps) for name, us in top]}


def cuda_ms(fn, iters: int = 30) -> float:
    """Mean ms of ``fn()`` on the GPU (CUDA events, after 3 warm-up calls)."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


@torch.no_grad()
def attention_breakdown(cfg, batch: int, tokens: int, dtype, device: str) -> dict:
    """One layer's absorbed attention at this size, piece by piece (GPU ms), with the bandwidth the two
    latent-reading products reach, next to the cache append (torch.cat, as DynamicLayer does) and a
    split-K variant of the output product (chunks of 1024 tokens; needs tokens % 1024 == 0) that shows
    how far a better reduction over the tokens could go."""
    heads, r, p = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    g = torch.Generator(device=device).manual_seed(2)
    rand = lambda *shape: torch.randn(*shape, generator=g, device=device, dtype=dtype)
    q_latent, q_rope = rand(batch, heads, 1, r), rand(batch, heads, 1, p)
    c, k = rand(batch, tokens, r), rand(batch, tokens, p)
    cache_c, new_c = rand(batch, 1, tokens, r), rand(batch, 1, 1, r)
    qs, qr = q_latent.reshape(batch, heads, r), q_rope.reshape(batch, heads, p)
    scores = torch.baddbmm(torch.bmm(qr, k.transpose(1, 2)), qs, c.transpose(1, 2), beta=0.1, alpha=0.1)
    weights = torch.softmax(scores, -1, dtype=torch.float32).to(dtype)
    latent_bytes = batch * tokens * r * c.element_size()
    out = {
        "absorbed_attention_ms": cuda_ms(lambda: absorbed_attention(q_latent, q_rope, c, k, None, 0.1)),
        "scores_ms": cuda_ms(lambda: torch.baddbmm(torch.bmm(qr, k.transpose(1, 2)), qs, c.transpose(1, 2),
                                                   beta=0.1, alpha=0.1)),
        "softmax_ms": cuda_ms(lambda: torch.softmax(scores, -1, dtype=torch.float32).to(dtype)),
        "weights_times_latent_ms": cuda_ms(lambda: torch.bmm(weights, c)),
        "cache_append_ms": cuda_ms(lambda: torch.cat([cache_c, new_c], dim=-2)),
        "latent_read_floor_ms": 1000 * latent_bytes / 4.0e12,
    }
    if tokens % 1024 == 0:
        n = tokens // 1024
        c_chunks = c.view(batch * n, 1024, r)

        def split_k():
            w = weights.view(batch, heads, n, 1024).transpose(1, 2).reshape(batch * n, heads, 1024)
            return torch.bmm(w, c_chunks).view(batch, n, heads, r).sum(1, dtype=torch.float32)

        out["weights_times_latent_splitk_ms"] = cuda_ms(split_k)
    out["weights_times_latent_GBps"] = latent_bytes / out["weights_times_latent_ms"] / 1e6
    out["scores_GBps"] = latent_bytes / out["scores_ms"] / 1e6
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--small", action="store_true", help="small shapes (4 layers, hidden 256) for a CPU run")
    parser.add_argument("--contexts", type=int, nargs="+", default=None, help="default 8192 32768 (small: 256 1024)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float32"], help="default bf16 (CPU: float32)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--budget", type=float, default=8.0, help="seconds of timed steps per measurement at most")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available; use --device cpu --small")
    contexts = args.contexts or ([256, 1024] if args.small else [8192, 32768])
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    shapes = SMALL if args.small else V2_LITE
    device = args.device

    model = build_model(shapes, device, dtype, max(contexts) + 4096)
    cfg = model.config
    weights = weight_bytes(model)
    bandwidth = copy_bandwidth(device)
    info = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
            "transformers": __import__("transformers").__version__, "dtype": str(dtype), "shapes": shapes,
            "weight_bytes": weights, "copy_bandwidth_GBps": bandwidth / 1e9}
    print(json.dumps(info))
    rows = []
    combos = [(c, b) for c in contexts for b in args.batches]
    for context, batch in tqdm(combos, desc="mla decode"):
        row = {"context": context, "batch": batch}
        for mode in ("stock", "absorbed"):
            handle = patch_mla(model) if mode == "absorbed" else None
            cache = None
            try:
                cache = MLALatentCache(cfg) if mode == "absorbed" else DynamicCache(config=cfg)
                fill(cache, cfg, batch, context, dtype, device)
                row[f"{mode}_cache_bytes"] = cache_bytes(cache)
                row[mode] = decode(model, cache, batch, args.steps, args.warmup, device, args.budget)
                if not args.no_profile and device == "cuda" and context == max(contexts):
                    row[f"{mode}_profile"] = profile_step(model, cache, batch, device)
            except torch.OutOfMemoryError:
                row[mode] = {"skipped": "out of GPU memory"}
            finally:
                if handle is not None:
                    handle.remove()
                del cache
                if device == "cuda":
                    torch.cuda.empty_cache()
        if device == "cuda" and not args.no_profile:
            try:
                row["attention_breakdown"] = attention_breakdown(cfg, batch, context, dtype, device)
            except torch.OutOfMemoryError:
                row["attention_breakdown"] = {"skipped": "out of GPU memory"}
            torch.cuda.empty_cache()
        if "ms" in row.get("stock", {}) and "ms" in row.get("absorbed", {}):
            row["speedup"] = row["stock"]["ms"] / row["absorbed"]["ms"]
        row["floor_ms"] = 1000 * (weights + row.get("absorbed_cache_bytes", 0)) / bandwidth
        rows.append(row)
        print(json.dumps(row))

    print(f"\n{info['device']}, torch {info['torch']}, transformers {info['transformers']}, {info['dtype']}, "
          f"weights {weights / 2**30:.2f} GiB, copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    print("| context | batch | cache GiB | stock ms/step | absorbed ms/step | speed-up | absorbed tok/s | floor ms "
          "| absorbed / floor | peak GiB stock / absorbed | transient GiB stock / absorbed |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s, a = r.get("stock", {}), r.get("absorbed", {})

        def cell(d: dict, key: str, fmt: str = "{:.1f}") -> str:
            return fmt.format(d[key]) if key in d else d.get("skipped", "n/a")

        speedup = f"{r['speedup']:.1f}x" if "speedup" in r else "n/a"
        tokens_s = f"{1000 * r['batch'] / a['ms']:.0f}" if "ms" in a else "n/a"
        over_floor = f"{a['ms'] / r['floor_ms']:.1f}x" if "ms" in a else "n/a"
        print(f"| {r['context']} | {r['batch']} | {r.get('absorbed_cache_bytes', 0) / 2**30:.2f} | {cell(s, 'ms')} "
              f"| {cell(a, 'ms')} | {speedup} | {tokens_s} | {r['floor_ms']:.2f} | {over_floor} "
              f"| {cell(s, 'peak_gib', '{:.2f}')} / {cell(a, 'peak_gib', '{:.2f}')} "
              f"| {cell(s, 'transient_gib', '{:.2f}')} / {cell(a, 'transient_gib', '{:.2f}')} |")
    for r in rows:
        for mode in ("stock", "absorbed"):
            if f"{mode}_profile" in r:
                p = r[f"{mode}_profile"]
                print(f"\nprofile, {mode}, context {r['context']}, batch {r['batch']}: wall {p['wall_ms']:.1f} ms/step "
                      f"under the profiler, CUDA kernels busy {p['kernel_busy_ms']:.1f} ms/step, "
                      f"{p['kernels_per_step']:.0f} kernels/step")
                for name, ms in p["top"]:
                    print(f"  {ms:7.2f} ms  {name}")
        if "attention_breakdown" in r:
            print(f"\none layer's absorbed attention, context {r['context']}, batch {r['batch']} (GPU ms): "
                  + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in r["attention_breakdown"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
