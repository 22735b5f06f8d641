"""TPLA decode step per shard against a shard that holds the full latent (plain tensor parallelism).

DeepSeek-V3 attention shapes by default (128 heads, kv_lora_rank 512, rope 64, nope 128, v 128, hidden
7168), random bf16 weights and cache, one attention layer, one new token per sequence.

* ``--mode single`` (one GPU): each shard is timed alone on the one device.
  - ``tpla N``: a shard of TPLA: all 128 heads, latent slice ``r/N`` + the replicated RoPE key
    (``tpla.tpla_attention``'s maths: absorbed attention over the slice, its ``W_UV`` rows).
  - ``tp N``: a shard of plain tensor parallelism: ``128/N`` heads, the full latent ``r`` + RoPE key.
  - ``mla``: one device with all heads and the full latent (N = 1 reference).
  Timed: query to latent space, scores, softmax, weighted sum, ``W_UV``; no collectives.
* ``--mode distributed`` (N GPUs via NCCL, or N CPU processes via gloo): one process per
  shard. Both schemes end in the same row-parallel ``o_proj`` (each rank ``128/N`` heads' rows) and one
  all-reduce of the hidden vector; TPLA first reduce-scatters its partial per-head outputs (``H * v``)
  so that each rank gets the summed outputs of its ``128/N`` heads. Rank 0 also checks that the
  distributed TPLA output equals the simulated N-shard computation (``tpla_attention`` on one device).

Times are medians over ``--iters`` steps after ``--warmup`` (CUDA events on GPU); every ratio compares
numbers of the same run. Results print as a table and go to ``--json``.

    python benchmarks/tpla_decode.py --mode single --device cuda --contexts 32768 --batches 1 8
    python benchmarks/tpla_decode.py --mode distributed --device cuda --shards 2 --contexts 8192 32768 65536 --batches 1 8
    python benchmarks/tpla_decode.py --mode single --device cpu --contexts 1024 --heads 16 --rank 128 --hidden 512
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from kvcompress.mla import absorbed_attention
from kvcompress.tpla import tpla_attention


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["single", "distributed"], default="single")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--shards", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768])
    parser.add_argument("--batches", type=int, nargs="+", default=[1])
    parser.add_argument("--heads", type=int, default=128)
    parser.add_argument("--rank", type=int, default=512, help="kv_lora_rank")
    parser.add_argument("--rope", type=int, default=64)
    parser.add_argument("--nope", type=int, default=128)
    parser.add_argument("--v", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    for n in args.shards:
        if n < 1 or args.rank % n or args.heads % n:
            parser.error(f"--shards {n} must divide --rank {args.rank} and --heads {args.heads}")
    return args


def timed(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn()``."""
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


def shard_step(q_nope, q_rope, w_uk, w_uv_t, latent, rope_key, scale):
    """One decode step of one shard: ``[B, H, nope]`` queries to ``[H, B, v]`` per-head outputs.

    ``latent`` ``[B, T, w]``, ``rope_key`` ``[B, T, p]``, ``w_uk`` ``[H, nope, w]``, ``w_uv_t`` ``[H, w, v]``."""
    batch, heads, _ = q_nope.shape
    q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1).unsqueeze(2)  # [B, H, 1, w]
    out = absorbed_attention(q_latent, q_rope.unsqueeze(2), latent, rope_key, None, scale)  # [B, H, 1, w]
    return torch.bmm(out.squeeze(2).transpose(0, 1), w_uv_t)  # [H, B, v]


def make_inputs(args, batch, tokens, heads, width, device, dtype, generator):
    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=generator, device=device, dtype=torch.float32) * std).to(dtype)

    return dict(q_nope=rnd(batch, heads, args.nope), q_rope=rnd(batch, heads, args.rope),
                w_uk=rnd(heads, args.nope, width, std=width ** -0.5), w_uv_t=rnd(heads, width, args.v, std=width ** -0.5),
                latent=rnd(batch, tokens, width), rope_key=rnd(batch, tokens, args.rope))


def run_single(args) -> list[dict]:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    scale = (args.nope + args.rope) ** -0.5
    rows = []
    for batch in args.batches:
        for tokens in args.contexts:
            configs = [("mla", 1, args.heads, args.rank)]
            for n in args.shards:
                configs += [("tp", n, args.heads // n, args.rank), ("tpla", n, args.heads, args.rank // n)]
            times = {}
            for scheme, n, heads, width in configs:
                generator = torch.Generator(device=device).manual_seed(0)
                inputs = make_inputs(args, batch, tokens, heads, width, device, dtype, generator)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                ms = timed(lambda: shard_step(scale=scale, **inputs), device, args.warmup, args.iters)
                times[(scheme, n)] = ms
                cache_bytes = (inputs["latent"].numel() + inputs["rope_key"].numel()) * inputs["latent"].element_size()
                rows.append(dict(mode="single", scheme=scheme, shards=n, batch=batch, tokens=tokens, heads=heads,
                                 latent_width=width, ms=ms, cache_bytes=cache_bytes,
                                 peak_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None))
                del inputs
            for row in rows[-len(configs):]:
                if row["scheme"] == "tpla":
                    row["speedup_vs_tp"] = times[("tp", row["shards"])] / row["ms"]
                    row["speedup_vs_mla"] = times[("mla", 1)] / row["ms"]
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


def main(argv=None) -> None:
    args = parse_args(argv)
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    rows = run_single(args) if args.mode == "single" else run_distributed(args)
    print(f"device: {device_name}, torch {torch.__version__}, dtype {args.dtype}, heads {args.heads}, "
          f"kv_lora_rank {args.rank}, rope {args.rope}")
    for row in rows:
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
            json.dump(dict(device=device_name, torch=torch.__version__, args=vars(args), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
