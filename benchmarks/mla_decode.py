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
dominates. Combinations that do not fit in memory are reported as skipped. On CUDA the absorbed path runs the
Triton decode kernel (kvcompress.kernels.mla_decode); a third column, "absorbed plain", is the same
absorbed path with KVCOMPRESS_DISABLE_TRITON=1 (the plain-PyTorch attention).

Before the model, the kernel alone (CUDA only, skipped with --no-kernel):
  (a) correctness: kernel vs the float32 reference on fresh random bf16 and fp32 inputs (ragged lengths,
      left padding, a key mask; V2-Lite 16 heads and V3 128 heads, r = 512, p = 64), max relative error;
  (b) timing: triton.testing.do_bench median of the kernel, of the plain absorbed_attention, against the
      bytes floor (latent + RoPE-key bytes / measured copy bandwidth) for 16 and 128 heads at the
      contexts x batches, and a small sweep of block sizes at the largest context.

GPU (the figures in docs/mla.md; about 4 minutes):
    PYTHONPATH=. python benchmarks/mla_decode.py --device cuda --json mla.json
Kernel only (about a minute):
    PYTHONPATH=. python benchmarks/mla_decode.py --device cuda --kernel-only --json mla_kernel.json
CPU smoke run (small shapes, seconds):
    python benchmarks/mla_decode.py --device cpu --small

Compiled decode (--compile): two more columns, "stock compiled" (unpatched model + transformers'
StaticCache) and "absorbed compiled" (patch_mla + MLALatentCache(max_cache_len=context + 256)), each the
model call under torch.compile(fullgraph=True, mode="reduce-overhead"): CUDA graphs, the Triton decode
kernel inside the graph through its torch.library.triton_op. That is what generate() does by itself for a
compileable cache on GPU. Each (context, batch) and column compiles once (tens of seconds, reported as
warm-up seconds); recompiles during the timed steps are counted (should be 0). About 3 minutes on an H100:
    PYTHONPATH=. python benchmarks/mla_decode.py --device cuda --compile --no-kernel --no-plain \
        --contexts 8192 --batches 1 --json mla_compile.json
On CPU the compiled columns trace with --compile-backend eager (tracing check only, no CUDA graphs).
--kernel-only ignores --compile (no model).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import statistics
import time

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, DeepseekV2Config, DynamicCache

from kvcompress.bench.hardware import copy_bandwidth, mla_kernel_inputs, sync
from kvcompress.kernels import configure_kernels, triton_usable
from kvcompress.kernels import mla_decode as mla_kernel
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


def compiled_graphs() -> int:
    """Graphs dynamo produced so far (one per compile or recompile)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@torch.no_grad()
def decode(model, cache, batch: int, steps: int, warmup: int, device: str, budget_s: float, step=None) -> dict:
    """Median ms of one-token decode steps over ``cache``; peak memory during the timed steps.

    ``step``: the callable to run instead of ``model`` (a ``torch.compile``'d model); then the first
    warm-up call's seconds (compile + first run) and the graphs dynamo built during the timed steps
    (recompiles: should be 0) are reported too."""
    kw = {cache_kwarg(model): cache, "use_cache": True}
    token = torch.full((batch, 1), 7, device=device, dtype=torch.long)
    compiled = step is not None
    step = model if step is None else step  # not `or`: a compiled module has no truth value

    def run():
        if compiled and device == "cuda":
            # CUDA-graph trees: each call is a new step whose outputs (unused here) may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        step(input_ids=token, **kw)

    extra = {}
    for i in range(warmup):
        start = time.perf_counter()
        run()
        if i == 0 and compiled:
            sync(device)
            extra["warmup_s"] = time.perf_counter() - start
    sync(device)
    graphs = compiled_graphs()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - start)
        if sum(times) > budget_s and len(times) >= 3:
            break
    result = {"ms": 1000 * statistics.median(times), "steps": len(times), **extra}
    if compiled:
        result["recompiles_timed"] = compiled_graphs() - graphs
    if device == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["transient_gib"] = (torch.cuda.max_memory_allocated() - held) / 2**30
    return result


def weight_bytes(model) -> int:
    """Weights one decode step reads: everything but the embedding table (one row of it per token)."""
    embed = model.get_input_embeddings().weight
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not embed)


@torch.no_grad()
def profile_step(model, cache, batch: int, device: str, steps: int = 3, step=None) -> dict:
    """Wall time vs summed CUDA kernel time per step, kernel count, and the top kernels by time.
    ``step``: a compiled model to run instead of ``model`` (CUDA-graph replays)."""
    from torch.profiler import ProfilerActivity, profile

    kw = {cache_kwarg(model): cache, "use_cache": True}
    token = torch.full((batch, 1), 7, device=device, dtype=torch.long)
    compiled = step is not None
    step = model if step is None else step  # not `or`: a compiled module has no truth value

    def run():
        if compiled:
            torch.compiler.cudagraph_mark_step_begin()
        step(input_ids=token, **kw)

    run()
    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            run()
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
        "triton_kernel_ms": cuda_ms(lambda: mla_kernel.mla_decode_attention(q_latent, q_rope, c, k, 0.1)),
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


def triton_disabled(disabled: bool):
    """The plain-PyTorch attention inside the block when ``disabled`` (kvcompress.kernels' options)."""
    return configure_kernels(disable_triton=True) if disabled else contextlib.nullcontext()


@torch.no_grad()
def kernel_check(device: str) -> list[dict]:
    """Kernel vs the float32 reference on fresh random inputs: ragged lengths, left padding, a key mask."""
    results = []
    for dtype in (torch.bfloat16, torch.float32):
        for heads, tokens in ((16, 4099), (128, 1531)):
            batch = 4
            q, qr, c, k = mla_kernel_inputs(batch, heads, tokens, dtype, device, seed=heads)
            starts = torch.tensor([0, 17, 0, 1000], device=device)
            lengths = torch.tensor([tokens, tokens - 17, 33, tokens - 1000], device=device)
            key_mask = torch.rand(batch, tokens, device=device) > 0.1
            ref = mla_kernel.mla_decode_attention_reference(q, qr, c, k, 0.07, lengths, starts, key_mask)
            out = torch.full_like(q, float("nan"))
            mla_kernel.mla_decode_attention(q, qr, c, k, 0.07, lengths, starts, key_mask, out=out)
            err = ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
            results.append({"dtype": str(dtype), "heads": heads, "tokens": tokens, "batch": batch,
                            "max_rel_err": err, "finite": bool(torch.isfinite(out).all())})
            print(json.dumps(results[-1]))
    return results


SWEEP = [dict(block_m=16, block_t=32, num_warps=4, num_stages=2), dict(block_m=16, block_t=64, num_warps=4, num_stages=2),
         dict(block_m=16, block_t=32, num_warps=8, num_stages=3), dict(block_m=32, block_t=32, num_warps=8, num_stages=2),
         dict(block_m=64, block_t=16, num_warps=8, num_stages=2),
         dict(block_m=16, block_t=32, num_warps=4, num_stages=2, min_chunk=512),
         dict(block_m=16, block_t=32, num_warps=4, num_stages=2, min_chunk=1024)]


@torch.no_grad()
def kernel_timing(contexts, batches, dtype, device: str, bandwidth: float, sweep: bool) -> list[dict]:
    """do_bench medians of the kernel and of plain absorbed_attention against the bytes floor."""
    from triton.testing import do_bench

    rows = []
    for heads in (16, 128):
        for tokens in contexts:
            for batch in batches:
                row = {"heads": heads, "context": tokens, "batch": batch}
                try:
                    q, qr, c, k = mla_kernel_inputs(batch, heads, tokens, dtype, device)
                    cache_bytes_ = (c.numel() + k.numel()) * c.element_size()
                    row["cache_bytes"] = cache_bytes_
                    row["floor_ms"] = 1000 * cache_bytes_ / bandwidth
                    row["kernel_ms"] = do_bench(lambda: mla_kernel.mla_decode_attention(q, qr, c, k, 0.07),
                                                return_mode="median")
                    row["plain_ms"] = do_bench(lambda: absorbed_attention(q, qr, c, k, None, 0.07), return_mode="median")
                    row["chunks"] = mla_kernel.plan(batch, heads, tokens, c.device)[0]
                    if sweep and tokens == max(contexts):
                        row["sweep"] = []
                        for cfg in SWEEP:
                            try:
                                ms = do_bench(lambda: mla_kernel._triton_forward(q, qr, c, k, 0.07, None, None, None, None,
                                                                                 **cfg), return_mode="median")
                            except Exception as error:  # out of shared memory / registers for this config
                                ms = f"failed: {type(error).__name__}"
                            row["sweep"].append({**cfg, "ms": ms})
                    del q, qr, c, k
                except torch.OutOfMemoryError:
                    row["skipped"] = "out of GPU memory"
                torch.cuda.empty_cache()
                rows.append(row)
                print(json.dumps(row))
    return rows


def print_kernel_table(check: list[dict], timing: list[dict]) -> None:
    if check:
        print("\nkernel vs float32 reference (fresh random inputs, ragged + padded + key mask): "
              + ", ".join(f"{c['dtype'].replace('torch.', '')} H={c['heads']} max rel err {c['max_rel_err']:.1e}"
                          + ("" if c["finite"] else " NON-FINITE") for c in check))
    if not timing:
        return
    print("\n| heads | context | batch | kernel ms | plain absorbed_attention ms | floor ms | kernel / floor "
          "| kernel GB/s | speed-up vs plain | chunks |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for t in timing:
        if "kernel_ms" not in t:
            print(f"| {t['heads']} | {t['context']} | {t['batch']} | {t.get('skipped', 'n/a')} | | | | | | |")
            continue
        read_gbs = t["cache_bytes"] / (t["kernel_ms"] * 1e-3) / 1e9  # cache bytes read per second
        print(f"| {t['heads']} | {t['context']} | {t['batch']} | {t['kernel_ms']:.3f} | {t['plain_ms']:.3f} "
              f"| {t['floor_ms']:.3f} | {t['kernel_ms'] / t['floor_ms']:.2f}x | {read_gbs:.0f} "
              f"| {t['plain_ms'] / t['kernel_ms']:.1f}x | {t['chunks']} |")
    for t in timing:
        if t.get("sweep"):
            print(f"sweep H={t['heads']} T={t['context']} B={t['batch']}: " + "; ".join(
                f"m{c['block_m']} t{c['block_t']} w{c['num_warps']} s{c['num_stages']}"
                + (f" chunk>={c['min_chunk']}" if "min_chunk" in c else "")
                + (f" {c['ms']:.3f}" if isinstance(c["ms"], float) else f" {c['ms']}") for c in t["sweep"]))


COMPILE_MARGIN = 256  # spare tokens of a static cache: warm-up + timed steps + CUDA-graph recording calls


def compiled_step(model, backend: str):
    """``torch.compile`` of the whole model call, as ``generate`` compiles its decode step for a
    compileable cache (fullgraph; mode reduce-overhead = CUDA graphs, for inductor only)."""
    mode = "reduce-overhead" if backend == "inductor" else None
    return torch.compile(model, backend=backend, mode=mode, fullgraph=True)


def build_cache(mode: str, cfg, context: int):
    """The cache of a model column: stock = DynamicCache, absorbed = growable MLALatentCache; the compiled
    columns take fixed-capacity caches (static shapes): transformers' StaticCache for stock,
    MLALatentCache(max_cache_len=...) for absorbed."""
    if mode == "stock":
        return DynamicCache(config=cfg)
    if mode == "stock_compiled":
        from transformers import StaticCache

        return StaticCache(config=cfg, max_cache_len=context + COMPILE_MARGIN)
    if mode == "absorbed_compiled":
        return MLALatentCache(cfg, max_cache_len=context + COMPILE_MARGIN)
    return MLALatentCache(cfg)


def print_compiled_table(rows: list[dict]) -> None:
    """Eager vs compiled (CUDA graphs) decode, stock and absorbed."""
    if not any("absorbed_compiled" in r or "stock_compiled" in r for r in rows):
        return
    print("\ncompiled (torch.compile fullgraph, mode reduce-overhead; static-capacity caches):")
    print("| context | batch | stock ms/step | stock compiled ms/step | absorbed ms/step | absorbed compiled ms/step "
          "| absorbed compiled tok/s | compiled vs eager absorbed | absorbed compiled vs stock compiled "
          "| warm-up s stock / absorbed compiled | recompiles in timed steps |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = {m: r.get(m, {}) for m in ("stock", "stock_compiled", "absorbed", "absorbed_compiled")}

        def ms(d: dict) -> str:
            return f"{d['ms']:.2f}" if "ms" in d else str(d.get("skipped", "n/a"))[:80]

        s, sc, a, ac = (cells[m] for m in ("stock", "stock_compiled", "absorbed", "absorbed_compiled"))
        tok = f"{1000 * r['batch'] / ac['ms']:.0f}" if "ms" in ac else "n/a"
        vs_eager = f"{a['ms'] / ac['ms']:.2f}x" if "ms" in a and "ms" in ac else "n/a"
        vs_stock = f"{sc['ms'] / ac['ms']:.2f}x" if "ms" in sc and "ms" in ac else "n/a"
        warm = " / ".join(f"{d['warmup_s']:.0f}" if "warmup_s" in d else "n/a" for d in (sc, ac))
        rec = " / ".join(str(d.get("recompiles_timed", "n/a")) for d in (sc, ac))
        print(f"| {r['context']} | {r['batch']} | {ms(s)} | {ms(sc)} | {ms(a)} | {ms(ac)} | {tok} | {vs_eager} "
              f"| {vs_stock} | {warm} | {rec} |")


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
    parser.add_argument("--no-kernel", action="store_true", help="skip the kernel-alone check and timing")
    parser.add_argument("--kernel-only", action="store_true", help="only the kernel check and timing (no model)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the block-size sweep of the kernel timing")
    parser.add_argument("--no-plain", action="store_true",
                        help="skip the 'absorbed plain' model column (KVCOMPRESS_DISABLE_TRITON=1)")
    parser.add_argument("--compile", action="store_true",
                        help="add 'stock compiled' (StaticCache) and 'absorbed compiled' (MLALatentCache with "
                             "max_cache_len + patch_mla) columns: torch.compile fullgraph, reduce-overhead (CUDA "
                             "graphs); about 30-60 s of compile per (context, batch) and column")
    parser.add_argument("--compile-backend", default=None, choices=["inductor", "eager", "aot_eager"],
                        help="torch.compile backend of the compiled columns (default inductor on CUDA, eager on "
                             "CPU: checks the tracing only)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available; use --device cpu --small")
    contexts = args.contexts or ([256, 1024] if args.small else [8192, 32768])
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    shapes = SMALL if args.small else V2_LITE
    device = args.device

    bandwidth = copy_bandwidth(device)
    kernel_runs = device == "cuda" and mla_kernel._HAVE_TRITON and triton_usable(torch.empty(1, device=device))
    info = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
            "transformers": __import__("transformers").__version__, "dtype": str(dtype), "shapes": shapes,
            "copy_bandwidth_GBps": bandwidth / 1e9, "triton_kernel": kernel_runs}
    if kernel_runs:
        info["triton"] = __import__("triton").__version__
    check, timing = [], []
    if kernel_runs and not args.no_kernel:
        check = kernel_check(device)
        timing = kernel_timing(contexts, args.batches, dtype, device, bandwidth, sweep=not args.no_sweep)
    elif not args.no_kernel:
        print("kernel check and timing skipped: needs CUDA and Triton (and KVCOMPRESS_DISABLE_TRITON unset)")
    if args.kernel_only:
        print(json.dumps(info))
        print_kernel_table(check, timing)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"info": info, "kernel_check": check, "kernel_timing": timing}, f, indent=1)
        return

    model = build_model(shapes, device, dtype, max(contexts) + 4096)
    cfg = model.config
    weights = weight_bytes(model)
    info["weight_bytes"] = weights
    print(json.dumps(info))
    rows = []
    combos = [(c, b) for c in contexts for b in args.batches]
    modes = ["stock", "absorbed"] + ([] if args.no_plain or not kernel_runs else ["absorbed_plain"])
    backend = args.compile_backend or ("inductor" if device == "cuda" else "eager")
    if args.compile:
        modes += ["stock_compiled", "absorbed_compiled"]
        info["compile"] = {"backend": backend, "mode": "reduce-overhead" if backend == "inductor" else None,
                           "fullgraph": True, "cache_margin_tokens": COMPILE_MARGIN}
    for context, batch in tqdm(combos, desc="mla decode"):
        row = {"context": context, "batch": batch}
        for mode in modes:
            handle = patch_mla(model) if not mode.startswith("stock") else None
            cache = step = None
            compiled = mode.endswith("_compiled")
            if compiled:
                torch._dynamo.reset()  # a clean compile per shape (no dynamic-shape recompiles, own graph pool)
            try:
                cache = build_cache(mode, cfg, context)
                fill(cache, cfg, batch, context, dtype, device)
                row[f"{mode}_cache_bytes"] = cache_bytes(cache)
                with triton_disabled(mode == "absorbed_plain"):
                    step = compiled_step(model, backend) if compiled else None
                    row[mode] = decode(model, cache, batch, args.steps, args.warmup, device, args.budget, step=step)
                    if isinstance(cache, MLALatentCache):  # after the steps: the storage has grown once
                        row[f"{mode}_reserved_bytes"] = cache.reserved_nbytes()
                    if not args.no_profile and device == "cuda" and context == max(contexts) and mode != "absorbed_plain":
                        try:
                            row[f"{mode}_profile"] = profile_step(model, cache, batch, device, step=step)
                        except Exception as error:  # the profiler around CUDA-graph replays: report, keep the row
                            if not compiled:
                                raise
                            print(f"{mode} profile failed: {type(error).__name__}: {error}")
            except torch.OutOfMemoryError:
                row[mode] = {"skipped": "out of GPU memory"}
            except Exception as error:  # a compile failure is a finding to report, not a reason to lose the run
                if not compiled:
                    raise
                first = str(error).splitlines()[0][:200] if str(error) else ""
                row[mode] = {"skipped": f"failed to compile: {type(error).__name__}: {first}"}
                print(f"{mode} at context {context}, batch {batch}: {row[mode]['skipped']}")
            finally:
                del step
                if handle is not None:
                    handle.remove()
                del cache
                if compiled:
                    torch._dynamo.reset()  # drop the graphs (and their CUDA-graph pools) before the next column
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

    for r in rows:
        for mode in ("stock", "absorbed", "stock_compiled", "absorbed_compiled"):
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
            json.dump({"info": info, "kernel_check": check, "kernel_timing": timing, "rows": rows}, f, indent=1)

    print_kernel_table(check, timing)
    print(f"\n{info['device']}, torch {info['torch']}, transformers {info['transformers']}, {info['dtype']}, "
          f"weights {weights / 2**30:.2f} GiB, copy bandwidth {bandwidth / 1e9:.0f} GB/s; absorbed = "
          + ("Triton kernel" if kernel_runs else "plain PyTorch") + ", absorbed plain = KVCOMPRESS_DISABLE_TRITON=1")
    print("| context | batch | cache GiB | stock ms/step | absorbed ms/step | speed-up | absorbed tok/s | floor ms "
          "| absorbed / floor | peak GiB stock / absorbed | transient GiB stock / absorbed | absorbed plain ms/step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
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
              f"| {cell(s, 'transient_gib', '{:.2f}')} / {cell(a, 'transient_gib', '{:.2f}')} "
              f"| {cell(r.get('absorbed_plain', {}), 'ms')} |")
    print_compiled_table(rows)

if __name__ == "__main__":
    main()
