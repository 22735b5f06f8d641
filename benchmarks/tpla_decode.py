"""TPLA decode step per shard against a shard that holds the full latent (plain tensor parallelism).

DeepSeek-V3 attention shapes by default (128 heads, kv_lora_rank 512, rope 64, nope 128, v 128, hidden
7168), random bf16 weights and cache, one attention layer, one new token per sequence.

* ``--mode single`` (one GPU): each shard is timed alone on the one device.
  - ``tpla N``: a shard of TPLA: all 128 heads, latent slice ``r/N`` + the replicated RoPE key
    (``tpla.tpla_attention``'s maths: absorbed attention over the slice, its ``W_UV`` rows).
  - ``tp N``: a shard of plain tensor parallelism: ``128/N`` heads, the full latent ``r`` + RoPE key.
  - ``mla``: one device with all heads and the full latent (N = 1 reference).
  Timed: query to latent space, scores, softmax, weighted sum, ``W_UV``; no collectives. The attention
  is ``mla.latent_attention``, what the patched models' decode runs: the Triton decode kernel on CUDA
  (``--attention plain``: the plain-PyTorch ``absorbed_attention`` instead, for comparison).
  Each row also times the attention alone ("kernel") and prints two floors: bytes (the cache, plus for
  the step the ``W_UK`` / ``W_UV`` weights, over the measured copy bandwidth) and arithmetic
  (``2 B H T (2 w + p)`` operations over the measured bf16 matrix rate); "x floor" is the time over the
  larger of the two.
* ``--mode distributed`` (N GPUs via NCCL, or N CPU processes via gloo): one process per
  shard. Both schemes end in the same row-parallel ``o_proj`` (each rank ``128/N`` heads' rows) and one
  all-reduce of the hidden vector; TPLA first reduce-scatters its partial per-head outputs (``H * v``)
  so that each rank gets the summed outputs of its ``128/N`` heads. Rank 0 also checks that the
  distributed TPLA output equals the simulated N-shard computation (``tpla_attention`` on one device).

* ``--mode projection`` (one device): the latent side of one decode step, per layer, for ``B`` new tokens:
  ``runtime`` = ``kv_a_proj_with_mqa``, ``kv_a_layernorm`` and the ``r x r`` rotation ``z = Q^T c``
  (``patch_tpla(fold_rotation=False)``) against ``folded`` = the folded ``kv_a_proj`` rows and a weightless
  RMSNorm (``fold_rotation=True``), both through ``kvcompress.tpla``'s own code on random weights (CUDA
  graphs: one layer per copy, each with its own weights, ``--rotate-mib`` of weights in all). It also
  checks, on the same inputs in float32, that the folded slices times the folded ``W'_b`` equal the
  run-time ones times ``W_b Q`` (``max_abs_err_kv``).

Timing (single mode, CUDA): the step is captured in a CUDA graph and the median replay is reported, as a
serving engine runs decode; the graph runs the step over several copies of the inputs in turn (at least
``--rotate-mib`` of data), so that a small cache is read from memory, not from the 60 MB L2, and the
time per step is the replay over the copies. ``--eager`` times eager launches with CUDA events instead
(medians over ``--iters`` steps after ``--warmup``; also the CPU timing). Every ratio compares numbers of
the same run. Results print as a table and go to ``--json``.

    python benchmarks/tpla_decode.py --mode single --device cuda --contexts 32768 65536 --batches 1 8
    python benchmarks/tpla_decode.py --mode distributed --device cuda --shards 2 --contexts 8192 32768 65536 --batches 1 8
    python benchmarks/tpla_decode.py --mode single --device cpu --contexts 1024 --heads 16 --rank 128 --hidden 512
    python benchmarks/tpla_decode.py --mode projection --device cuda --batches 1 8 64
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch

from kvcompress.mla import absorbed_attention, latent_attention
from kvcompress.tpla import tpla_attention


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["single", "distributed", "projection"], default="single")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--shards", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768, 65536])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--heads", type=int, default=128)
    parser.add_argument("--rank", type=int, default=512, help="kv_lora_rank")
    parser.add_argument("--rope", type=int, default=64)
    parser.add_argument("--nope", type=int, default=128)
    parser.add_argument("--v", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--attention", choices=["kernel", "plain"], nargs="+", default=["kernel"],
                        help="kernel: mla.latent_attention (the Triton kernel on CUDA); plain: absorbed_attention")
    parser.add_argument("--eager", action="store_true", help="time eager launches (no CUDA graph)")
    parser.add_argument("--rotate-mib", type=float, default=256.0,
                        help="graph timing: copies of the inputs until at least this much data is read per replay")
    parser.add_argument("--bandwidth", type=float, default=None, help="bytes/s for the floor (default: measured copy)")
    parser.add_argument("--flops", type=float, default=None,
                        help="bf16 matrix FLOP/s for the floor (default: measured 8192^3 product)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    for n in args.shards:
        if n < 1 or args.rank % n or args.heads % n:
            parser.error(f"--shards {n} must divide --rank {args.rank} and --heads {args.heads}")
    return args


def timed(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn()`` launched eagerly."""
    for _ in range(warmup):
        fn()
    samples = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def graph_timed(fns, device: torch.device, iters: int) -> float:
    """Median milliseconds per call of one CUDA graph that runs every ``fns[i]()`` once, in turn."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        for fn in fns:
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    torch.cuda.synchronize(device)
    samples = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / len(fns))
    del graph
    return statistics.median(samples)


def attention(kind: str):
    """The absorbed attention a shard runs: the patched models' (kernel on CUDA) or the plain one."""
    if kind == "plain":
        return lambda q_latent, q_rope, latent, rope_key, scale: absorbed_attention(q_latent, q_rope, latent,
                                                                                    rope_key, None, scale)
    return lambda q_latent, q_rope, latent, rope_key, scale: latent_attention(q_latent, q_rope, latent, rope_key,
                                                                              None, scale)


def shard_step(q_nope, q_rope, w_uk, w_uv_t, latent, rope_key, scale, attend=attention("kernel")):
    """One decode step of one shard: ``[B, H, nope]`` queries to ``[H, B, v]`` per-head outputs.

    ``latent`` ``[B, T, w]``, ``rope_key`` ``[B, T, p]``, ``w_uk`` ``[H, nope, w]``, ``w_uv_t`` ``[H, w, v]``."""
    q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1).unsqueeze(2)  # [B, H, 1, w]
    out = attend(q_latent, q_rope.unsqueeze(2), latent, rope_key, scale)  # [B, H, 1, w]
    return torch.bmm(out.squeeze(2).transpose(0, 1), w_uv_t)  # [H, B, v]


def make_inputs(args, batch, tokens, heads, width, device, dtype, generator):
    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=generator, device=device, dtype=torch.float32) * std).to(dtype)

    return dict(q_nope=rnd(batch, heads, args.nope), q_rope=rnd(batch, heads, args.rope),
                w_uk=rnd(heads, args.nope, width, std=width ** -0.5), w_uv_t=rnd(heads, width, args.v, std=width ** -0.5),
                latent=rnd(batch, tokens, width), rope_key=rnd(batch, tokens, args.rope))


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int = 8192) -> float:
    """FLOP/s of an ``n^3`` matrix product on random data: best of 10 after 3 untimed."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n ** 3 / best


def run_single(args) -> tuple[list[dict], dict]:
    from kvcompress.bench.hardware import copy_bandwidth

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    scale = (args.nope + args.rope) ** -0.5
    use_graphs = device.type == "cuda" and not args.eager
    ceilings = {"bandwidth": args.bandwidth or copy_bandwidth(device),
                "flops": args.flops or (matmul_rate(device, dtype) if device.type == "cuda" else None)}
    rows = []
    for kind in args.attention:
        attend = attention(kind)
        for batch in args.batches:
            for tokens in args.contexts:
                configs = [("mla", 1, args.heads, args.rank)]
                for n in args.shards:
                    configs += [("tp", n, args.heads // n, args.rank), ("tpla", n, args.heads, args.rank // n)]
                times = {}
                for scheme, n, heads, width in configs:
                    generator = torch.Generator(device=device).manual_seed(0)
                    first = make_inputs(args, batch, tokens, heads, width, device, dtype, generator)
                    set_bytes = nbytes(*first.values())
                    copies = max(1, math.ceil(args.rotate_mib * 2**20 / set_bytes)) if use_graphs else 1
                    sets = [first] + [make_inputs(args, batch, tokens, heads, width, device, dtype, generator)
                                      for _ in range(copies - 1)]
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats(device)
                    step_fns = [lambda s=s: shard_step(scale=scale, attend=attend, **s) for s in sets]
                    q_latents = [torch.bmm(s["q_nope"].transpose(0, 1), s["w_uk"]).transpose(0, 1).unsqueeze(2)
                                 for s in sets]
                    attn_fns = [lambda s=s, q=q: attend(q, s["q_rope"].unsqueeze(2), s["latent"], s["rope_key"], scale)
                                for s, q in zip(sets, q_latents)]
                    if use_graphs:
                        ms, kernel_ms = graph_timed(step_fns, device, args.iters), graph_timed(attn_fns, device, args.iters)
                    else:
                        ms = timed(step_fns[0], device, args.warmup, args.iters)
                        kernel_ms = timed(attn_fns[0], device, args.warmup, args.iters)
                    times[(scheme, n)] = ms
                    cache_bytes = nbytes(first["latent"], first["rope_key"])
                    step_bytes = cache_bytes + nbytes(first["w_uk"], first["w_uv_t"], first["q_nope"], first["q_rope"])
                    flops = 2 * batch * heads * tokens * (2 * width + args.rope)
                    step_flops = flops + 2 * batch * heads * width * (args.nope + args.v)
                    bw, rate = ceilings["bandwidth"], ceilings["flops"]
                    row = dict(mode="single", attention=kind, scheme=scheme, shards=n, batch=batch, tokens=tokens,
                               heads=heads, latent_width=width, ms=ms, kernel_ms=kernel_ms, cache_bytes=cache_bytes,
                               step_bytes=step_bytes, flops=flops, input_copies=copies,
                               kernel_bytes_floor_ms=1e3 * cache_bytes / bw, step_bytes_floor_ms=1e3 * step_bytes / bw,
                               peak_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None)
                    if rate:
                        row["kernel_flops_floor_ms"] = 1e3 * flops / rate
                        row["step_flops_floor_ms"] = 1e3 * step_flops / rate
                    row["kernel_x_floor"] = kernel_ms / max(row["kernel_bytes_floor_ms"], row.get("kernel_flops_floor_ms", 0))
                    row["step_x_floor"] = ms / max(row["step_bytes_floor_ms"], row.get("step_flops_floor_ms", 0))
                    row["kernel_x_bytes_floor"] = kernel_ms / row["kernel_bytes_floor_ms"]
                    rows.append(row)
                    del first, sets, step_fns, attn_fns, q_latents
                kernel_times = {(r["scheme"], r["shards"]): r["kernel_ms"] for r in rows[-len(configs):]}
                for row in rows[-len(configs):]:
                    if row["scheme"] == "tpla":
                        row["speedup_vs_tp"] = times[("tp", row["shards"])] / row["ms"]
                        row["kernel_speedup_vs_tp"] = kernel_times[("tp", row["shards"])] / row["kernel_ms"]
                        row["speedup_vs_mla"] = times[("mla", 1)] / row["ms"]
    return rows, ceilings


class _LatentSide(torch.nn.Module):
    """The attention attributes ``TPLADecode.project`` reads: ``kv_a_proj_with_mqa``, ``kv_a_layernorm``,
    ``kv_b_proj`` (for the fold) and the shapes; random weights, the norm weight uneven."""

    def __init__(self, args, dtype, device, generator):
        super().__init__()
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

        r, p, heads = args.rank, args.rope, args.heads
        self.kv_lora_rank, self.qk_rope_head_dim, self.num_heads = r, p, heads
        self.qk_nope_head_dim, self.v_head_dim = args.nope, args.v
        self.kv_a_proj_with_mqa = torch.nn.Linear(args.hidden, r + p, bias=False, device=device, dtype=dtype)
        self.kv_a_layernorm = DeepseekV3RMSNorm(r).to(device=device, dtype=dtype)
        self.kv_b_proj = torch.nn.Linear(r, heads * (args.nope + args.v), bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            for weight in (self.kv_a_proj_with_mqa.weight, self.kv_b_proj.weight):
                weight.copy_(torch.randn(weight.shape, generator=generator, device=device) * weight.shape[1] ** -0.5)
            self.kv_a_layernorm.weight.copy_(0.5 + torch.rand(r, generator=generator, device=device))


def run_projection(args) -> list[dict]:
    """Per batch: the latent side with the run-time rotation and with the folded weights (see the docstring)."""
    from kvcompress.tpla import TPLADecode, TPLAWeights, hadamard_rotation

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    use_graphs = device.type == "cuda" and not args.eager
    q = hadamard_rotation(args.rank)

    def build(dtype, seed, n):
        """One layer's latent side: the module and both strategies (run-time rotation, folded)."""
        module = _LatentSide(args, dtype, device, torch.Generator(device=device).manual_seed(seed))
        runtime, folded = TPLAWeights(q, slice(None)), TPLAWeights(q, slice(None), folded=True)
        runtime.current(module), folded.current(module)
        return (module, runtime, TPLADecode(runtime, n, "hadamard", None, None, 16, "half", None),
                TPLADecode(runtime, n, "hadamard", None, None, 16, "half", None, folded=folded))

    def step(module, runtime, strategy, h):
        latent, _ = strategy.project(module, h, None, True)
        if latent.rotated is not None:
            return strategy._slices(latent.rotated, None)
        return strategy._slices(latent.stock, runtime.rotation)

    rows = []
    for n in args.shards:
        for batch in args.batches:
            generator = torch.Generator(device=device).manual_seed(0)
            layer_bytes = (args.rank + args.rope) * args.hidden * torch.empty(0, dtype=dtype).element_size()
            # graphs: one layer per copy (its own weights), enough that the weights come from memory, not L2
            copies = max(1, math.ceil(args.rotate_mib * 2**20 / layer_bytes)) if use_graphs else 1
            layers = [build(dtype, seed, n) for seed in range(copies)]
            hidden = [torch.randn(batch, 1, args.hidden, generator=generator, device=device).to(dtype)
                      for _ in range(copies)]
            times = {}
            for name, which in (("runtime", 2), ("folded", 3)):
                fns = [lambda h=h, layer=layer: step(layer[0], layer[1], layer[which], h)
                       for h, layer in zip(hidden, layers)]
                times[name] = graph_timed(fns, device, args.iters) if use_graphs else \
                    timed(fns[0], device, args.warmup, args.iters)
            del layers
            with torch.no_grad():  # equality of what attention reads, fp32: slices times the matching W'_b
                module, runtime, plain, fold = build(torch.float32, 0, n)
                h32 = hidden[0].float()
                lat_run, _ = plain.project(module, h32, None, True)
                lat_fold, _ = fold.project(module, h32, None, True)
                kv_run = torch.nn.functional.linear(lat_run.stock @ runtime.rotation, runtime.kv_b)
                kv_fold = torch.nn.functional.linear(lat_fold.rotated, fold.folded.kv_b)
                err = (kv_run - kv_fold).abs().max().item()
            rows.append(dict(mode="projection", shards=n, batch=batch, runtime_ms=times["runtime"],
                             folded_ms=times["folded"], speedup=times["runtime"] / times["folded"],
                             layer_copies=copies, max_abs_err_kv=err, max_abs_kv=kv_run.abs().max().item()))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _distributed_worker(rank: int, args, init_file: str, out_file: str) -> None:
    import torch.distributed as dist

    n = args.shards[0]
    use_cuda = args.device.startswith("cuda")
    device = torch.device(f"cuda:{rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if use_cuda else "gloo", init_method=f"file://{init_file}", rank=rank, world_size=n)
    dtype = getattr(torch, args.dtype)
    scale = (args.nope + args.rope) ** -0.5
    H, r, w, hv = args.heads, args.rank, args.rank // n, args.heads // n
    rows = []
    try:
        for batch in args.batches:
            for tokens in args.contexts:
                heads = slice(rank * hv, (rank + 1) * hv)
                cols = slice(rank * w, (rank + 1) * w)

                def draw():
                    # every rank draws the same full tensors (same seed) and keeps its slices
                    generator = torch.Generator(device=device).manual_seed(0)
                    full = make_inputs(args, batch, tokens, H, r, device, dtype, generator)
                    o_proj = (torch.randn(args.hidden, H * args.v, generator=generator, device=device)
                              * (H * args.v) ** -0.5).to(dtype)
                    return full, o_proj

                reference = None
                if rank == 0:  # simulated N-shard TPLA on one device, for the equality check
                    full, o_proj = draw()
                    q_latent = torch.bmm(full["q_nope"].transpose(0, 1), full["w_uk"]).transpose(0, 1).unsqueeze(2)
                    shards = full["latent"].view(batch, tokens, n, w).transpose(1, 2)
                    out = tpla_attention(q_latent, full["q_rope"].unsqueeze(2), shards,
                                         full["rope_key"].unsqueeze(1).expand(-1, n, -1, -1), None, scale)
                    per_head = torch.bmm(out.squeeze(2).transpose(0, 1), full["w_uv_t"])  # [H, B, v]
                    reference = per_head.transpose(0, 1).reshape(batch, H * args.v) @ o_proj.T
                    del full, o_proj, q_latent, shards, out, per_head

                def build(name):
                    """One scheme's per-rank state, built alone so its memory can be measured alone."""
                    full, o_proj = draw()
                    o_rows = o_proj[:, rank * hv * args.v:(rank + 1) * hv * args.v].contiguous()
                    if name == "tp":  # plain TP: this rank's heads, the FULL latent
                        state = dict(q_nope=full["q_nope"][:, heads].contiguous(),
                                     q_rope=full["q_rope"][:, heads].contiguous(),
                                     w_uk=full["w_uk"][heads].contiguous(), w_uv_t=full["w_uv_t"][heads].contiguous(),
                                     latent=full["latent"], rope_key=full["rope_key"])
                    else:  # TPLA: every head, this rank's latent slice (+ the replicated rope key)
                        state = dict(q_nope=full["q_nope"], q_rope=full["q_rope"],
                                     w_uk=full["w_uk"][..., cols].contiguous(), w_uv_t=full["w_uv_t"][:, cols].contiguous(),
                                     latent=full["latent"][..., cols].contiguous(), rope_key=full["rope_key"])
                    return state, o_rows

                def tp_step(state, o_rows):
                    out = shard_step(scale=scale, **state).transpose(0, 1).reshape(batch, hv * args.v)
                    hidden = out @ o_rows.T
                    dist.all_reduce(hidden)
                    return hidden

                def tpla_step(state, o_rows):
                    partial = shard_step(scale=scale, **state)  # [H, B, v]: this shard's part of every head
                    mine = torch.empty(hv, batch, args.v, device=device, dtype=dtype)
                    dist.reduce_scatter_tensor(mine, partial.contiguous())  # summed outputs of this rank's heads
                    hidden = mine.transpose(0, 1).reshape(batch, hv * args.v) @ o_rows.T
                    dist.all_reduce(hidden)
                    return hidden

                result = {}
                for name, step_fn in (("tp", tp_step), ("tpla", tpla_step)):
                    if use_cuda:
                        torch.cuda.synchronize(device)
                        torch.cuda.empty_cache()
                        base = torch.cuda.memory_allocated(device)  # rank 0's reference output and nothing else
                    state, o_rows = build(name)
                    if use_cuda:
                        torch.cuda.synchronize(device)
                        resident = torch.cuda.memory_allocated(device) - base
                        torch.cuda.reset_peak_memory_stats(device)

                    def step():
                        return step_fn(state, o_rows)

                    out = step()
                    dist.barrier()
                    ms = timed(step, device, args.warmup, args.iters)
                    times = [torch.tensor([ms], device=device) for _ in range(n)]
                    dist.all_gather(times, torch.tensor([ms], device=device))
                    cache_bytes = (state["latent"].numel() + state["rope_key"].numel()) * state["latent"].element_size()
                    result[name] = dict(ms_per_rank=[t.item() for t in times], cache_bytes=cache_bytes,
                                        resident_bytes=resident if use_cuda else None,
                                        peak_bytes=(torch.cuda.max_memory_allocated(device) - base) if use_cuda else None,
                                        out=out)
                    del state, o_rows
                if rank == 0:
                    err = (result["tpla"]["out"].float() - reference.float()).abs().max().item()
                    ref_scale = reference.float().abs().max().item()
                    for name in ("tp", "tpla"):
                        res = result[name]
                        rows.append(dict(mode="distributed", scheme=name, shards=n, batch=batch, tokens=tokens,
                                         ms=max(res["ms_per_rank"]), ms_per_rank=res["ms_per_rank"],
                                         cache_bytes_per_rank=res["cache_bytes"],
                                         resident_bytes_rank0=res["resident_bytes"], peak_bytes_rank0=res["peak_bytes"],
                                         max_abs_err_vs_simulated=err if name == "tpla" else None,
                                         ref_max_abs=ref_scale if name == "tpla" else None))
                    rows[-1]["speedup_vs_tp"] = rows[-2]["ms"] / rows[-1]["ms"]
                del result, reference
                if use_cuda:
                    torch.cuda.empty_cache()
        if rank == 0:
            with open(out_file, "w") as f:
                json.dump(rows, f)
    finally:
        dist.destroy_process_group()


def run_distributed(args) -> list[dict]:
    import tempfile

    import torch.multiprocessing as mp

    if len(args.shards) != 1:
        raise SystemExit("--mode distributed takes exactly one --shards value (the number of processes)")
    n = args.shards[0]
    if args.device.startswith("cuda") and torch.cuda.device_count() < n:
        raise SystemExit(f"--shards {n} needs {n} GPUs, found {torch.cuda.device_count()}")
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "rows.json")
        mp.spawn(_distributed_worker, args=(args, os.path.join(tmp, "init"), out_file), nprocs=n, join=True)
        with open(out_file) as f:
            return json.load(f)


def print_single(rows: list[dict], ceilings: dict) -> None:
    rate = ceilings["flops"]
    print(f"floors: copy bandwidth {ceilings['bandwidth'] / 1e12:.2f} TB/s"
          + (f", bf16 matrix rate {rate / 1e12:.0f} TFLOP/s" if rate else ""))
    print("| attention | scheme | N | B | T | heads | w | step ms | step floor ms | step x floor | kernel ms "
          "| kernel bytes floor ms | kernel x bytes floor | kernel flops floor ms | kernel x floor | TPLA vs TP step "
          "| TPLA vs TP kernel |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        step_floor = max(r["step_bytes_floor_ms"], r.get("step_flops_floor_ms", 0))
        flops_floor = f"{r['kernel_flops_floor_ms']:.4f}" if "kernel_flops_floor_ms" in r else "n/a"
        vs = (f"{r['speedup_vs_tp']:.2f}x | {r['kernel_speedup_vs_tp']:.2f}x" if "speedup_vs_tp" in r else " | ")
        print(f"| {r['attention']} | {r['scheme']} | {r['shards']} | {r['batch']} | {r['tokens']} | {r['heads']} "
              f"| {r['latent_width']} | {r['ms']:.4f} | {step_floor:.4f} | {r['step_x_floor']:.2f}x "
              f"| {r['kernel_ms']:.4f} | {r['kernel_bytes_floor_ms']:.4f} | {r['kernel_x_bytes_floor']:.2f}x | {flops_floor} "
              f"| {r['kernel_x_floor']:.2f}x "
              f"| {vs} |")


def main(argv=None) -> None:
    args = parse_args(argv)
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    ceilings = None
    if args.mode == "single":
        rows, ceilings = run_single(args)
    elif args.mode == "projection":
        rows = run_projection(args)
    else:
        rows = run_distributed(args)
    try:
        from importlib.metadata import version

        triton_version = version("triton")
    except Exception:  # not installed (CPU-only)
        triton_version = "none"
    print(f"device: {device_name}, torch {torch.__version__}, triton {triton_version}, dtype {args.dtype}, "
          f"heads {args.heads}, kv_lora_rank {args.rank}, rope {args.rope}, "
          + ("eager launches" if args.eager or args.mode != "single" or not args.device.startswith("cuda")
             else "CUDA graph replay"))
    if args.mode == "single":
        print_single(rows, ceilings)
    if args.mode == "projection":
        print("| N | B | run-time rotation ms | folded ms | folded speed-up | max abs err kv (max abs kv, fp32) |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['shards']} | {r['batch']} | {r['runtime_ms']:.4f} | {r['folded_ms']:.4f} | {r['speedup']:.2f}x "
                  f"| {r['max_abs_err_kv']:.3g} ({r['max_abs_kv']:.3g}) |")
    for row in rows if args.mode == "distributed" else []:
        extra = f"  x{row['speedup_vs_tp']:.2f} vs tp" if "speedup_vs_tp" in row else ""
        if row.get("max_abs_err_vs_simulated") is not None:
            extra += f"  err vs simulated {row['max_abs_err_vs_simulated']:.3g} (|ref| {row['ref_max_abs']:.3g})"
        cache = row.get("cache_bytes", row.get("cache_bytes_per_rank"))
        if row.get("peak_bytes_rank0") is not None and row["mode"] == "distributed":
            extra += (f"  resident {row['resident_bytes_rank0'] / 2**20:.1f} MiB"
                      f"  peak {row['peak_bytes_rank0'] / 2**20:.1f} MiB (rank 0, this scheme alone)")
        print(f"{row['scheme']:5s} N={row['shards']} B={row['batch']:2d} T={row['tokens']:6d}  {row['ms']:8.3f} ms"
              f"  cache/shard {cache / 2**20:8.1f} MiB{extra}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device_name, torch=torch.__version__, args=vars(args), ceilings=ceilings, rows=rows),
                      f, indent=1)


if __name__ == "__main__":
    main()
