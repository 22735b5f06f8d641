"""Where a decode step's time goes, for one method against ``dynamic``: torch.profiler over a short
``generate`` (prefill excluded by a first untimed generate), printing the CPU operators with the most self
time, the CUDA runtime calls (launches, synchronisations, device-to-host copies) per decode step, and
the kernels with the most GPU time. A diagnostic for docs/performance.md, not a benchmark.

    PYTHONPATH=. python benchmarks/profile_decode.py --model deepseek-v2-lite --methods dynamic,mla --context 32768
    PYTHONPATH=. python benchmarks/profile_decode.py --model llama-3.1-8b --layers 4 --methods dynamic,xkv --context 4096
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    from kvcompress.bench import speed
    from kvcompress.bench.spec import install_method, make_cache, parse_method_specs

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-3.1-8b", choices=speed.SHAPES)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--methods", default="dynamic,xkv")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = speed.load_model(args.model, device, dtype, args.layers)
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.context), device=device,
                        generator=torch.Generator(device=device).manual_seed(0))
    from kvcompress.patch import GENERATE_CACHE_KWARG

    for method in parse_method_specs(args.methods):
        handle = install_method(method, model)

        def generate(new_tokens: int):
            kwargs = {} if handle is not None else {GENERATE_CACHE_KWARG: make_cache(method, model)}
            with torch.inference_mode():
                return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                                      disable_compile=True, **kwargs)

        try:
            generate(args.steps)  # warm-up: kernels compile, autotuners settle
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            # two profiles, 1 and 1 + steps new tokens: the difference is the decode steps alone
            tables = []
            for new_tokens in (1, 1 + args.steps):
                with torch.profiler.profile(activities=activities) as prof:
                    generate(new_tokens)
                    if device == "cuda":
                        torch.cuda.synchronize()
                tables.append({e.key: e for e in prof.key_averages()})
        finally:
            if handle is not None:
                handle.remove()
        short, long = tables

        def per_step(key: str, attr: str) -> float:
            a = getattr(long.get(key), attr, 0) if key in long else 0
            b = getattr(short.get(key), attr, 0) if key in short else 0
            return (a - b) / args.steps

        print(f"\n== {method.label}: {args.model}, batch {args.batch}, context {args.context}, per decode step")
        runtime = [k for k in long if k.startswith("cuda") or k.startswith("cu")]
        for key in sorted(runtime, key=lambda k: -per_step(k, "count"))[:8]:
            print(f"  {key:40s} {per_step(key, 'count'):8.1f} calls  {per_step(key, 'self_cpu_time_total') / 1e3:7.3f} ms CPU")
        ops = sorted((k for k in long if not k.startswith("cuda")), key=lambda k: -per_step(k, "self_cpu_time_total"))
        print("  CPU operators by self time:")
        for key in ops[: args.top]:
            print(f"    {key[:60]:60s} {per_step(key, 'count'):7.1f} calls {per_step(key, 'self_cpu_time_total') / 1e3:7.3f} ms")
        if device == "cuda":
            attr = "self_device_time_total" if hasattr(next(iter(long.values())), "self_device_time_total") else "self_cuda_time_total"
            kernels = sorted(long, key=lambda k: -per_step(k, attr))
            print("  GPU time by kernel/op:")
            for key in kernels[: args.top]:
                print(f"    {key[:60]:60s} {per_step(key, attr) / 1e3:7.3f} ms")


if __name__ == "__main__":
    main()
