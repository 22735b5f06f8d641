"""Cost of xKV's compression step beside the prefill itself (SmolLM2, one ~4k-token prompt).

Times, in one process: a prefill with the stock DynamicCache; a prefill with XKVCache (the same forward
plus the group SVDs); and the compression alone (the prefill's keys/values fed to a fresh XKVCache layer
by layer), for each xKV setting of ``--methods`` (registry specs, e.g. the levers: ``xkv:outliers=0.02``,
``xkv:factor_bits=None:matrix_bits=None`` for float factors). Medians of ``--repeats`` runs.

    python benchmarks/xkv_prefill_cost.py --context 4096 --repeats 3 \
        --methods xkv:factor_bits=None:matrix_bits=None,xkv,xkv:ratio=7,xkv:outliers=0.02
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache

from kvcompress.models import load_smollm2
from kvcompress.bench.spec import parse_method_specs
from kvcompress.needle import encode_chat, needle_prompt
from kvcompress.registry import make_cache


def timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", default="xkv", help="comma list of xkv settings (default: the defaults)")
    args = parser.parse_args()
    specs = parse_method_specs(args.methods)
    for spec in specs:
        if spec.name != "xkv":
            parser.error(f"--methods: {spec.label!r} is not an xkv setting (allowed: xkv[:param=value...])")

    model, tokenizer = load_smollm2(device=args.device)
    inputs = encode_chat(tokenizer, needle_prompt(tokenizer, args.context, 0.5).messages).to(args.device)
    tokens = inputs["input_ids"].shape[1]
    results = {"prefill, DynamicCache": []}
    for spec in specs:
        results[f"prefill, {spec.label}"] = []
        results[f"compression alone, {spec.label}"] = []
    with torch.no_grad():
        for _ in range(args.repeats):
            dense = DynamicCache(config=model.config)
            results["prefill, DynamicCache"].append(timed(lambda: model(**inputs, past_key_values=dense),
                                                          args.device))
            states = [(layer.keys, layer.values) for layer in dense.layers]
            for spec in specs:
                results[f"prefill, {spec.label}"].append(timed(
                    lambda: model(**inputs, past_key_values=make_cache("xkv", model, **spec.params)), args.device))
                cache = make_cache("xkv", model, **spec.params)

                def compress():
                    for layer_idx, (k, v) in enumerate(states):
                        cache.update(k, v, layer_idx)

                results[f"compression alone, {spec.label}"].append(timed(compress, args.device))
    print(f"SmolLM2-135M-Instruct fp32, {tokens} prompt tokens, device {args.device}, "
          f"threads {torch.get_num_threads()}, median of {args.repeats}")
    stock = statistics.median(results["prefill, DynamicCache"])
    print("| step | seconds | / stock prefill |\n|---|---|---|")
    for name, values in results.items():
        print(f"| {name} | {statistics.median(values):.3f} | {statistics.median(values) / stock:.2f} |")


if __name__ == "__main__":
    main()
