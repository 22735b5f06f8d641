"""MLA decode kernel pair (chunk + merge) at 32K tokens, bf16: tile configurations per shard shape, timed by
CUDA-graph replay over rotating input copies (at least 256 MiB read per replay, so that the 60 MB L2 does
not hold a small cache), against the bytes floor (latent + RoPE key at 4.1 TB/s).

Shapes (heads x latent width): a TPLA shard at N = 4 and 2 (128 x 128, 128 x 256), plain MLA (128 x 512),
plain-TP shards at N = 2 and 4 (64 x 512, 32 x 512) and DeepSeek-V2-Lite (16 x 512); batch 1 and 8. Each
configuration (head block, token tile, output split, warps, stages) is compiled first in 8 processes, then
timed at one and two waves of programs per SM (and half a wave at batch 1).

    PYTHONPATH=. OUT=docs/results python benchmarks/mla_kernel_sweep.py   # writes $OUT/perf/mla_kernel_sweep_c32k_<device>.json

Needs CUDA and Triton. The tiles kvcompress.kernels.mla_decode._config picks, and the figures quoted in its
docstring, come from this script on one H200 (docs/results/perf/mla_kernel_sweep_c32k_h200.json).
"""
import json
import math
import os
import time

import torch

from benchmarks.tpla_decode import graph_timed

SHAPES = {"tpla4": (128, 128), "tpla2": (128, 256), "mla": (128, 512), "tp2": (64, 512), "tp4": (32, 512),
          "v2lite": (16, 512)}


def tiles(block_m, block_t, split_v, num_warps, num_stages):
    return dict(block_m=block_m, block_t=block_t, split_v=split_v, num_warps=num_warps, num_stages=num_stages)


CONFIGS = {
    "v2lite": [tiles(16, 32, 1, 4, 3), tiles(16, 64, 1, 4, 3)],
    "tpla4": [tiles(128, 64, 1, 8, 3), tiles(128, 128, 1, 8, 2), tiles(64, 64, 1, 4, 3)],
    "tpla2": [tiles(128, 64, 1, 8, 3), tiles(128, 64, 1, 8, 2), tiles(128, 32, 1, 8, 3), tiles(64, 64, 1, 8, 2),
              tiles(128, 64, 2, 8, 2)],
    "mla": [tiles(64, 32, 1, 8, 3), tiles(64, 32, 2, 4, 3), tiles(128, 32, 2, 8, 1), tiles(64, 64, 2, 8, 2)],
    "tp2": [tiles(64, 32, 1, 8, 3), tiles(64, 32, 2, 4, 3)],
    "tp4": [tiles(32, 32, 1, 8, 3), tiles(32, 64, 1, 8, 2), tiles(64, 32, 1, 8, 3)],
}
WAVES = {1: (1, 0.5, 2), 8: (1, 2)}
TOKENS, BANDWIDTH = 32768, 4.1e12


def inputs(batch, heads, tokens, r, seed=0, p=64):
    g = torch.Generator(device="cuda").manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    return rnd(batch, heads, 1, r), rnd(batch, heads, 1, p), rnd(batch, tokens, r), rnd(batch, tokens, p)


def compile_one(job):
    """Compile one configuration (a small launch; Triton's disk cache keeps it for the timing process)."""
    name, config = job
    from kvcompress.kernels import mla_decode as m

    heads, r = SHAPES[name]
    q, qr, c, k = inputs(1, heads, 1024, r)
    m._triton_forward(q, qr, c, k, 0.07, None, None, None, None, **config)
    torch.cuda.synchronize()


def graph_ms(fns, iters=30):
    """Median milliseconds per call of one CUDA graph that runs every ``fns[i]()`` once."""
    return graph_timed(fns, torch.cuda.current_device(), iters)


def main():
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from kvcompress.kernels import mla_decode as m

    t0 = time.time()
    with ProcessPoolExecutor(8, mp_context=mp.get_context("spawn")) as pool:
        list(pool.map(compile_one, [(name, c) for name, configs in CONFIGS.items() for c in configs]))
    print(f"compiled in {time.time() - t0:.1f}s", flush=True)
    rows = []
    for batch in (1, 8):
        for name, (heads, r) in SHAPES.items():
            per_copy = (batch * TOKENS * (r + 64) + batch * heads * (2 * r + 64)) * 2
            copies = [inputs(batch, heads, TOKENS, r, seed=i) for i in range(max(1, math.ceil(256 * 2**20 / per_copy)))]
            floor = 1e3 * batch * TOKENS * (r + 64) * 2 / BANDWIDTH
            for config in CONFIGS[name]:
                for waves in WAVES[batch]:
                    try:
                        ms = graph_ms([lambda s=s: m._triton_forward(*s, 0.07, None, None, None, None, **config,
                                                                     waves=waves) for s in copies])
                    except Exception as error:  # out of shared memory / registers for this configuration
                        print("failed", name, config, waves, repr(error)[:200])
                        continue
                    rows.append(dict(shape=name, heads=heads, latent_width=r, batch=batch, **config, waves=waves,
                                     ms=ms, x_floor=ms / floor))
                    print(json.dumps(rows[-1]), flush=True)
            del copies
            torch.cuda.empty_cache()
    print("\nbest per shape and batch (bytes floor at 4.1 TB/s):")
    for batch in (1, 8):
        for name in SHAPES:
            best = min((r for r in rows if r["shape"] == name and r["batch"] == batch), key=lambda r: r["ms"])
            print(f"{name:6s} B={batch} {best['ms'] * 1e3:7.1f} us x{best['x_floor']:.2f} "
                  + " ".join(f"{k}={best[k]}" for k in ("block_m", "block_t", "split_v", "num_warps", "num_stages", "waves")))
    out = os.path.join(os.environ.get("OUT", "/tmp"), "perf")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"mla_kernel_sweep_c32k_{torch.cuda.get_device_name().split()[1].lower()}.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, tokens=TOKENS, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
