"""Needle accuracy against cache ratio for XKVCache settings on SmolLM2 (the table in docs/xkv.md).

Each prompt is prefilled once with the stock cache; every setting then gets a fresh XKVCache fed the very
same prefill keys/values layer by layer (exactly what generate's prefill does: the group's last layer
triggers the SVD) and decodes greedily from the same first token. The ratio is the stock cache's bytes
over ``XKVCache.nbytes()`` for the same tokens after decoding.

    python benchmarks/xkv_sweep.py --prompts 10 --context 4096 --out results/xkv_sweep.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from kvcompress.ops import cache_nbytes
from kvcompress.models import load_smollm2
from kvcompress.needle import encode_chat, needle_prompt
from kvcompress.xkv import XKVCache

# (group_size, rank_k, rank_v, pre_rope)
DEFAULT_SETTINGS = [
    (1, 0.5, 0.5, True), (1, 0.375, 0.5, True), (1, 0.25, 0.375, True),
    (2, 0.375, 0.5, True), (2, 0.25, 0.375, True), (2, 0.1875, 0.3125, True),
    (5, 0.25, 0.375, True), (5, 0.1875, 0.3125, True), (5, 0.15, 0.25, True), (5, 0.125, 0.1875, True),
    (6, 0.1875, 0.3125, True), (6, 0.15, 0.25, True),
    (10, 0.15, 0.25, True), (10, 0.125, 0.1875, True),
    (5, 0.25, 0.375, False), (5, 0.1875, 0.3125, False),
]


def parse_setting(text: str) -> tuple[int, float, float, bool]:
    g, rk, rv, pre = text.split(",")
    return int(g), float(rk), float(rv), pre.lower() in ("1", "true", "pre")


@torch.no_grad()
def greedy_from(model, cache, first_token: torch.Tensor, max_new_tokens: int, eos: int) -> list[int]:
    tokens = [int(first_token)]
    next_ids = first_token.view(1, 1)
    for _ in range(max_new_tokens - 1):
        if tokens[-1] == eos:
            break
        logits = model(input_ids=next_ids, past_key_values=cache, use_cache=True).logits[:, -1]
        next_ids = logits.argmax(-1, keepdim=True)
        tokens.append(int(next_ids))
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--setting", action="append", type=parse_setting,
                        help="group_size,rank_k,rank_v,pre|post (repeatable; default: a built-in sweep)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("results/xkv_sweep.md"))
    args = parser.parse_args()
    settings = args.setting or DEFAULT_SETTINGS

    model, tokenizer = load_smollm2(device=args.device)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    rows: dict[tuple, dict] = {s: {"found": 0, "same": 0, "ratio": [], "svd_s": []} for s in settings}
    dense_found, prefill_s = 0, []
    for i in tqdm(range(args.prompts), desc="prompts"):
        depth = i / max(1, args.prompts - 1) * 0.9 + 0.05
        prompt = needle_prompt(tokenizer, args.context, depth, seed=i)
        inputs = encode_chat(tokenizer, prompt.messages).to(args.device)
        dense = DynamicCache(config=model.config)
        start = time.perf_counter()
        with torch.no_grad():
            logits = model(**inputs, past_key_values=dense, use_cache=True).logits[:, -1]
        prefill_s.append(time.perf_counter() - start)
        first = logits.argmax(-1)
        prefill_kv = [(layer.keys.clone(), layer.values.clone()) for layer in dense.layers]
        ref_tokens = greedy_from(model, dense, first, args.max_new_tokens, eos)
        ref_answer = tokenizer.decode(ref_tokens, skip_special_tokens=True)
        dense_found += prompt.answer in ref_answer
        for setting in tqdm(settings, desc="settings", leave=False):
            g, rk, rv, pre = setting
            cache = XKVCache(model.config, group_size=g, rank_k=rk, rank_v=rv, window=args.window,
                             sink=args.sink, pre_rope=pre)
            start = time.perf_counter()
            for layer_idx, (k, v) in enumerate(prefill_kv):
                cache.update(k, v, layer_idx)
            rows[setting]["svd_s"].append(time.perf_counter() - start)
            tokens = greedy_from(model, cache, first, args.max_new_tokens, eos)
            answer = tokenizer.decode(tokens, skip_special_tokens=True)
            rows[setting]["found"] += prompt.answer in answer
            rows[setting]["same"] += tokens == ref_tokens
            rows[setting]["ratio"].append(cache_nbytes(dense) / cache.nbytes())
        tqdm.write(f"prompt {i}: depth {depth:.2f} answer {prompt.answer} dense {ref_answer!r}")

    n = args.prompts
    lines = [
        f"SmolLM2-135M-Instruct fp32, {n} needle prompts of ~{args.context} tokens (depths 0.05-0.95), "
        f"window={args.window}, sink={args.sink}, greedy {args.max_new_tokens} tokens, device {args.device}.",
        f"DynamicCache found {dense_found}/{n}; prefill {sum(prefill_s) / n:.2f} s per prompt.",
        "",
        "| group_size | rank_k | rank_v | keys | cache ratio | found | same tokens as DynamicCache | SVD s/prompt |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (g, rk, rv, pre), row in rows.items():
        ratio = sum(row["ratio"]) / n
        svd = sum(row["svd_s"]) / n
        lines.append(f"| {g} | {rk} | {rv} | {'pre' if pre else 'post'}-RoPE | {ratio:.2f}x | "
                     f"{row['found']}/{n} | {row['same']}/{n} | {svd:.2f} |")
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(
        {f"{g},{rk},{rv},{pre}": r for (g, rk, rv, pre), r in rows.items()}, indent=1))


if __name__ == "__main__":
    main()
