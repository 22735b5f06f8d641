"""Answer a ~4k-token needle-in-a-haystack prompt with SmolLM2-135M-Instruct twice, once with the stock
DynamicCache and once with XKVCache (default parameters), and print both answers, both caches' bytes and
the saving. Runs offline on CPU in a few minutes."""

from __future__ import annotations

import argparse
import time

import torch

HELP = "answer a long needle prompt with the stock cache and with XKVCache; print the memory saving"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--context", type=int, default=4096, help="haystack length in tokens (default 4096)")
    parser.add_argument("--depth", type=float, default=0.5, help="needle depth in [0, 1] (default 0.5)")
    parser.add_argument("--seed", type=int, default=0, help="needle key/number seed (default 0)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm
    from transformers import DynamicCache

    from .models import load_smollm2
    from .ops import cache_nbytes
    from .patch import GENERATE_CACHE_KWARG
    from .needle import encode_chat, needle_prompt
    from .xkv import XKVCache

    steps = tqdm(total=4, desc="demo", unit="step")
    steps.set_postfix_str("loading SmolLM2-135M-Instruct")
    model, tokenizer = load_smollm2(device=args.device)
    steps.update()
    prompt = needle_prompt(tokenizer, args.context, args.depth, args.seed)
    inputs = encode_chat(tokenizer, prompt.messages).to(args.device)
    prompt_tokens = inputs["input_ids"].shape[1]

    results = {}
    for name, make in (("DynamicCache", lambda: DynamicCache(config=model.config)),
                       ("XKVCache", lambda: XKVCache(model.config))):
        steps.set_postfix_str(f"generating with {name} ({prompt_tokens} prompt tokens)")
        cache = make()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**inputs, **{GENERATE_CACHE_KWARG: cache}, max_new_tokens=args.max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
        seconds = time.perf_counter() - start
        answer = tokenizer.decode(out[0, prompt_tokens:], skip_special_tokens=True).strip()
        results[name] = (answer, cache_nbytes(cache), seconds, cache)
        steps.update()
    steps.set_postfix_str("done")
    steps.update()
    steps.close()

    xkv = results["XKVCache"][3]
    print(f"\nprompt: {prompt_tokens} tokens, needle '{prompt.key}' = {prompt.answer} at depth {prompt.depth}")
    print(f"XKVCache parameters: {xkv.params} -> group_size={xkv.group_size}, rank_k={xkv.rank_k}, "
          f"rank_v={xkv.rank_v}")
    for name, (answer, nbytes, seconds, _) in results.items():
        found = "found" if prompt.answer in answer else "MISSED"
        print(f"{name:>12}: {nbytes / 2**20:8.2f} MiB  {seconds:6.1f} s  answer: {answer!r} ({found})")
    dense, compressed = results["DynamicCache"][1], results["XKVCache"][1]
    print(f"memory saving: {dense / compressed:.2f}x smaller cache ({(1 - compressed / dense) * 100:.0f}% less)")
    return 0
