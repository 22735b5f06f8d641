"""Real-model check of xKV's compiled decode: SmolLM2-135M-Instruct, needle prompts, greedy tokens.

For each prompt (needle at several depths of a ~``--context``-token haystack): greedy generation with
stock ``DynamicCache`` (eager), ``XKVCache`` with its fused decode (eager, ``patch_xkv``), and
``XKVCache(max_cache_len=prompt + new tokens)`` with the same patch, whose decode step ``generate``
compiles (on CUDA: inductor, ``reduce-overhead``, CUDA graphs). Reports whether each run finds the needle,
and how many generated tokens the compiled run shares with the eager xKV run and with stock. Random-weight
models cannot answer this (their logits are near-ties); this is where compiled-vs-eager equality means
something. The first compiled call compiles (tens of seconds); each new prompt length compiles again
(the cache's capacity is part of the graph's shapes).

GPU (the SmolLM2 GGUF file copied to the GPU machine, its path in KVCOMPRESS_SMOLLM2_GGUF):
    PYTHONPATH=. python benchmarks/compiled_needle.py --device cuda --json out.json
CPU plumbing check (dynamo's eager backend; slow, minutes):
    PYTHONPATH=. python benchmarks/compiled_needle.py --device cpu --context 1024 --depths 0.5 --backend eager
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from tqdm import tqdm
from transformers import CompileConfig, DynamicCache

from kvcompress.models import load_smollm2
from kvcompress.needle import encode_chat, needle_prompt
from kvcompress.xkv import XKVCache, patch_xkv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--context", type=int, default=4000)
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--new-tokens", type=int, default=32)  # the answer follows ~16 tokens of preamble
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (eager: CPU plumbing check)")
    parser.add_argument("--json")
    args = parser.parse_args()
    model, tokenizer = load_smollm2(dtype=getattr(torch, args.dtype), device=args.device)
    model.config._attn_implementation = "sdpa"
    config = CompileConfig(backend=args.backend, mode="reduce-overhead" if args.backend == "inductor" else None,
                           fullgraph=True)
    if args.device == "cpu":
        config._compile_all_devices = True  # generate() compiles only on accelerators unless told
    rows = []
    for seed, depth in enumerate(tqdm(args.depths, desc="prompts")):
        prompt = needle_prompt(tokenizer, args.context, depth, seed=seed)
        enc = {k: v.to(args.device) for k, v in encode_chat(tokenizer, prompt.messages).items()}
        length = enc["input_ids"].shape[1]
        gen = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)

        def run(cache, **extra):
            start = time.perf_counter()
            out = model.generate(**enc, past_key_values=cache, **gen, **extra)
            seconds = time.perf_counter() - start
            tokens = out[0, length:].tolist()
            return tokens, seconds

        stock, stock_s = run(DynamicCache(config=model.config), disable_compile=True)
        with patch_xkv(model):
            eager, eager_s = run(XKVCache(model.config), disable_compile=True)
            cache = XKVCache(model.config, max_cache_len=length + args.new_tokens)
            compiled, compiled_s = run(cache, compile_config=config)
            again, again_s = run(XKVCache(model.config, max_cache_len=length + args.new_tokens),
                                 compile_config=config)  # same shapes: the compiled graph is reused
        text = {name: tokenizer.decode(t, skip_special_tokens=True)
                for name, t in (("stock", stock), ("xkv", eager), ("xkv_compiled", compiled))}

        def same(a, b):
            return sum(x == y for x, y in zip(a, b)) / max(len(a), 1)

        rows.append(dict(depth=depth, prompt_tokens=length, answer=prompt.answer,
                         found={k: prompt.answer in v for k, v in text.items()},
                         compiled_same_as_eager_xkv=same(compiled, eager), compiled_same_as_stock=same(compiled, stock),
                         compiled_repeat_same=same(again, compiled), seconds=dict(stock=stock_s, xkv=eager_s,
                         xkv_compiled_first=compiled_s, xkv_compiled_again=again_s), text=text,
                         xkv_cache_bytes=cache.nbytes()))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "text"}), flush=True)
    found = {k: sum(r["found"][k] for r in rows) for k in ("stock", "xkv", "xkv_compiled")}
    summary = dict(device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu", dtype=args.dtype,
                   backend=args.backend, torch=torch.__version__, prompts=len(rows), found=found,
                   compiled_same_as_eager_xkv=sum(r["compiled_same_as_eager_xkv"] for r in rows) / len(rows),
                   compiled_same_as_stock=sum(r["compiled_same_as_stock"] for r in rows) / len(rows))
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(summary=summary, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
