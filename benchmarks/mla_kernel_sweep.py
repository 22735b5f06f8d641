"""MLA decode kernel pair (chunk + merge) at 16 heads x 32K, bf16: 120 tile / chunk configurations, timed by
triton's do_bench and by CUDA-graph replay (20 calls captured in one graph, best of 5 replays / 20: the
GPU time a compiled decode step sees, without the host path), against the bytes floor (latent + RoPE key
bytes at the measured copy bandwidth).

    PYTHONPATH=. OUT=docs/results python benchmarks/mla_kernel_sweep.py   # writes $OUT/perf/mla_kernel_sweep_dsv2lite_c32k_<device>.json
    DEFAULT_ONLY=1 PYTHONPATH=. python benchmarks/mla_kernel_sweep.py     # only the tiles _config picks

Needs CUDA and Triton. The MLA kernel figures in docs/performance.md (MLA section) come from this script on
one H100.
"""
import os, json, itertools
import torch
from triton.testing import do_bench
from kvcompress.bench.hardware import copy_bandwidth, mla_kernel_inputs as kernel_inputs
from kvcompress.kernels import mla_decode as m

bw = copy_bandwidth("cuda")
print(f"bandwidth {bw/1e9:.0f} GB/s", flush=True)


def graph_ms(fn, n=20):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n):
            fn()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = 1e9
    for _ in range(5):
        a.record(); g.replay(); b.record(); torch.cuda.synchronize()
        best = min(best, a.elapsed_time(b) / n)
    return best

rows = []
for batch in (1, 8):
    q, qr, c, k = kernel_inputs(batch, 16, 32768, torch.bfloat16, "cuda")
    out = torch.empty_like(q)
    floor = 1000 * (c.numel() + k.numel()) * 2 / bw
    res = []
    if os.environ.get("DEFAULT_ONLY"):
        f = lambda: m._triton_forward(q, qr, c, k, 0.07, None, None, None, out)
        f2 = lambda: m.mla_decode_attention(q, qr, c, k, 0.07, out=out)
        print(f"batch {batch}: default config {m._config(c.dtype, 512, 64, batch, 16, 32768, c.device)}: graph {graph_ms(f):.4f} ms, public call in graph {graph_ms(f2):.4f}, floor {floor:.4f}", flush=True)
        continue
    for mc, bt, w, st in itertools.product((64, 128, 256, 512, 1024), (32, 64), (4, 8), (2, 3, 4)):
        f = lambda: m._triton_forward(q, qr, c, k, 0.07, None, None, None, out, block_t=bt, num_warps=w, num_stages=st, min_chunk=mc)
        try:
            d = do_bench(f, return_mode="median")
            gm = graph_ms(f)
        except Exception as e:
            continue
        res.append((gm, d, mc, bt, w, st, m.plan(batch, 16, 32768, c.device, 16, bt, mc)[0]))
    res.sort()
    print(f"batch {batch}: floor {floor:.4f} ms", flush=True)
    default = [r for r in res if r[2:6] == (256, 32, 4, 2)]
    for r in default + res[:12]:
        print(f"  graph {r[0]:.4f} ({r[0]/floor:.2f}x)  do_bench {r[1]:.4f} ({r[1]/floor:.2f}x)  min_chunk {r[2]} block_t {r[3]} warps {r[4]} stages {r[5]} chunks {r[6]}", flush=True)
    rows.append(dict(batch=batch, floor_ms=floor, results=[dict(graph_ms=r[0], do_bench_ms=r[1], min_chunk=r[2], block_t=r[3], num_warps=r[4], num_stages=r[5], chunks=r[6]) for r in res]))
if not os.environ.get('DEFAULT_ONLY'):
  os.makedirs(os.environ.get("OUT", "/tmp") + "/perf", exist_ok=True)
  json.dump(dict(device=torch.cuda.get_device_name(), bandwidth_GBps=bw / 1e9, rows=rows),
          open(os.environ.get("OUT", "/tmp") + "/perf/mla_kernel_sweep_dsv2lite_c32k_"
               + torch.cuda.get_device_name().split()[1].lower() + ".json", "w"), indent=1)
