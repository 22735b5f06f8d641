"""Needle accuracy against cache ratio for XKVCache settings on SmolLM2 (the table in docs/xkv.md).

Each prompt is prefilled once with the stock cache; every setting then gets a fresh XKVCache fed the very
same prefill keys/values layer by layer (exactly what generate's prefill does: the group's last layer
triggers the SVD) and decodes greedily from the same first token. The ratio is the stock cache's bytes
over ``XKVCache.nbytes()`` for the same tokens after decoding.

With ``--prefill-chunk N`` every configuration, the DynamicCache reference included, instead runs its own
``model.generate(..., prefill_chunk_size=N)``: each chunk is then a multi-token update, so later chunks
attend over the compressed earlier ones and are compressed into the group's last segment (a setting's
``merge``, the default: ``XKVCache(merge_segments=True)``) or into a segment of their own (``split``).
This costs one full prefill per configuration and prompt.

    python benchmarks/xkv_sweep.py --prompts 10 --context 4096 --out results/xkv_sweep.md
    python benchmarks/xkv_sweep.py --prompts 12 --prefill-chunk 1024 \
        --setting 5,0.125,0.1875,pre,merge --setting 5,0.125,0.1875,pre,split --out results/xkv_chunked.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
import transformers
from transformers import DynamicCache

from kvcompress.ops import cache_nbytes
from kvcompress.models import load_smollm2
from kvcompress.needle import encode_chat, needle_prompt
from kvcompress.xkv import XKVCache

# (group_size, rank_k, rank_v, pre_rope[, merge_segments]): merge_segments defaults to True (XKVCache's default)
_SETTINGS_4 = [
    (1, 0.5, 0.5, True), (1, 0.375, 0.5, True), (1, 0.25, 0.375, True),
    (2, 0.375, 0.5, True), (2, 0.25, 0.375, True), (2, 0.1875, 0.3125, True),
    (5, 0.25, 0.375, True), (5, 0.1875, 0.3125, True), (5, 0.15, 0.25, True), (5, 0.125, 0.1875, True),
    (6, 0.1875, 0.3125, True), (6, 0.15, 0.25, True),
    (10, 0.15, 0.25, True), (10, 0.125, 0.1875, True),
    (5, 0.25, 0.375, False), (5, 0.1875, 0.3125, False),
]
DEFAULT_SETTINGS = [(*s, True) for s in _SETTINGS_4]


def parse_setting(text: str) -> tuple[int, float, float, bool, bool]:
    """``group_size,rank_k,rank_v,pre|post[,merge|split]`` (the fifth field is XKVCache's merge_segments)."""
    fields = text.split(",")
    if len(fields) not in (4, 5):
        raise argparse.ArgumentTypeError(f"expected group_size,rank_k,rank_v,pre|post[,merge|split], got {text!r}")
    g, rk, rv, pre = fields[:4]
    merge = True
    if len(fields) == 5:
        flag = fields[4].strip().lower()
        if flag not in ("merge", "split", "1", "0", "true", "false"):
            raise argparse.ArgumentTypeError(f"fifth field must be merge or split, got {fields[4]!r}")
        merge = flag in ("merge", "1", "true")
    return int(g), float(rk), float(rv), pre.lower() in ("1", "true", "pre"), merge


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


@torch.no_grad()
def generate_chunked(model, inputs, cache, chunk: int, max_new_tokens: int, eos: int) -> list[int]:
    """Greedy tokens of ``model.generate`` with chunked prefill on ``cache`` (stops after ``eos``, like
    :func:`greedy_from`)."""
    try:  # "cache" on recent transformers, "past_key_values" on older ones (5.17)
        from kvcompress.patch import GENERATE_CACHE_KWARG
    except ImportError:
        GENERATE_CACHE_KWARG = "past_key_values"
    out = model.generate(**inputs, **{GENERATE_CACHE_KWARG: cache}, prefill_chunk_size=chunk,
                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    tokens = out[0, inputs["input_ids"].shape[1]:].tolist()
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def _label(setting) -> str:
    g, rk, rv, pre, merge = setting
    return f"{g},{rk},{rv},{'pre' if pre else 'post'},{'merge' if merge else 'split'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--setting", action="append", type=parse_setting,
                        help="group_size,rank_k,rank_v,pre|post[,merge|split] (repeatable; default: a built-in "
                             "sweep); merge|split sets XKVCache's merge_segments (default merge)")
    parser.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                        help="run every configuration, DynamicCache included, through model.generate with "
                             "prefill_chunk_size=N (one prefill per configuration; default: one-shot prefill, "
                             "shared by all settings)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("results/xkv_sweep.md"))
    args = parser.parse_args()
    settings = list(dict.fromkeys(args.setting or DEFAULT_SETTINGS))  # "...,pre" and "...,pre,merge" are one
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        parser.error(f"--prefill-chunk must be >= 1, got {args.prefill_chunk}")
    chunk = args.prefill_chunk

    model, tokenizer = load_smollm2(device=args.device)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    rows: dict[tuple, dict] = {s: {"found": 0, "same": 0, "ratio": [], "svd_s": [], "nbytes": [], "segments": [],
                                   "answers": []} for s in settings}
    dense_found, prefill_s, prompt_tokens, dense_bytes, dense_answers = 0, [], [], [], []
    for i in tqdm(range(args.prompts), desc="prompts"):
        depth = i / max(1, args.prompts - 1) * 0.9 + 0.05
        prompt = needle_prompt(tokenizer, args.context, depth, seed=i)
        inputs = encode_chat(tokenizer, prompt.messages).to(args.device)
        prompt_tokens.append(inputs["input_ids"].shape[1])
        dense = DynamicCache(config=model.config)
        start = time.perf_counter()
        if chunk is None:
            with torch.no_grad():
                logits = model(**inputs, past_key_values=dense, use_cache=True).logits[:, -1]
            prefill_s.append(time.perf_counter() - start)
            first = logits.argmax(-1)
            prefill_kv = [(layer.keys.clone(), layer.values.clone()) for layer in dense.layers]
            ref_tokens = greedy_from(model, dense, first, args.max_new_tokens, eos)
        else:
            ref_tokens = generate_chunked(model, inputs, dense, chunk, args.max_new_tokens, eos)
            prefill_s.append(time.perf_counter() - start)  # prefill + decode for the chunked route
        ref_answer = tokenizer.decode(ref_tokens, skip_special_tokens=True)
        dense_found += prompt.answer in ref_answer
        dense_bytes.append(cache_nbytes(dense))
        dense_answers.append(ref_answer)
        for setting in tqdm(settings, desc="settings", leave=False):
            g, rk, rv, pre, merge = setting
            cache = XKVCache(model.config, group_size=g, rank_k=rk, rank_v=rv, window=args.window,
                             sink=args.sink, pre_rope=pre, merge_segments=merge)
            start = time.perf_counter()
            if chunk is None:
                for layer_idx, (k, v) in enumerate(prefill_kv):
                    cache.update(k, v, layer_idx)
                rows[setting]["svd_s"].append(time.perf_counter() - start)
                tokens = greedy_from(model, cache, first, args.max_new_tokens, eos)
            else:
                tokens = generate_chunked(model, inputs, cache, chunk, args.max_new_tokens, eos)
                rows[setting]["svd_s"].append(time.perf_counter() - start)  # whole generate call
            answer = tokenizer.decode(tokens, skip_special_tokens=True)
            rows[setting]["found"] += prompt.answer in answer
            rows[setting]["same"] += tokens == ref_tokens
            rows[setting]["ratio"].append(cache_nbytes(dense) / cache.nbytes())
            rows[setting]["nbytes"].append(cache.nbytes())
            rows[setting]["segments"].append([len(group.segments) for group in cache.groups])
            rows[setting]["answers"].append(answer)
            tqdm.write(f"  prompt {i} {_label(setting)}: {answer!r} ratio {cache_nbytes(dense) / cache.nbytes():.2f}x "
                       f"segments/group {rows[setting]['segments'][-1]}")
        tqdm.write(f"prompt {i}: depth {depth:.2f} answer {prompt.answer} dense {ref_answer!r}")
        # rewritten after every prompt, so an interrupted run leaves the prompts it finished
        write_report(args, rows, i + 1, dense_found, prefill_s, prompt_tokens, dense_bytes, dense_answers,
                     final=i + 1 == args.prompts)


def write_report(args, rows, n, dense_found, prefill_s, prompt_tokens, dense_bytes, dense_answers,
                 final: bool = True) -> None:
    chunk = args.prefill_chunk
    route = (f"chunked prefill: model.generate(prefill_chunk_size={chunk}) per configuration" if chunk is not None
             else "one-shot prefill shared by all settings")
    timing = "generate (prefill + decode)" if chunk is not None else "prefill"
    lines = [
        f"SmolLM2-135M-Instruct fp32, {n} needle prompts of ~{args.context} tokens (depths 0.05-0.95), "
        f"window={args.window}, sink={args.sink}, greedy {args.max_new_tokens} tokens, device {args.device}, {route}.",
        f"DynamicCache found {dense_found}/{n}; {timing} {sum(prefill_s) / n:.2f} s per prompt; "
        f"{sum(dense_bytes) / n / 2**20:.2f} MiB per prompt.",
        "",
        "| group_size | rank_k | rank_v | keys | merge_segments | cache ratio | cache MiB | segments/group | found | "
        f"same tokens as DynamicCache | {'generate' if chunk is not None else 'SVD'} s/prompt |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (g, rk, rv, pre, merge), row in rows.items():
        ratio = sum(row["ratio"]) / n
        svd = sum(row["svd_s"]) / n
        mib = sum(row["nbytes"]) / n / 2**20
        per_group = [c for prompt_counts in row["segments"] for c in prompt_counts]
        segs = f"{min(per_group)}" if min(per_group) == max(per_group) else f"{min(per_group)}-{max(per_group)}"
        lines.append(f"| {g} | {rk} | {rv} | {'pre' if pre else 'post'}-RoPE | {merge} | "
                     f"{ratio:.2f}x | {mib:.2f} | {segs} | {row['found']}/{n} | {row['same']}/{n} | {svd:.2f} |")
    if n < args.prompts:
        lines.insert(0, f"(partial: {n} of {args.prompts} prompts done)")
    text = "\n".join(lines)
    if final:
        print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    setup = dict(prompts=n, prompts_planned=args.prompts, context=args.context, prompt_tokens=prompt_tokens,
                 max_new_tokens=args.max_new_tokens, window=args.window, sink=args.sink, device=args.device, prefill_chunk=chunk,
                 torch=torch.__version__, transformers=transformers.__version__,
                 dense={"found": dense_found, "nbytes": dense_bytes, "answers": dense_answers, "s": prefill_s})
    args.out.with_suffix(".json").write_text(json.dumps(
        {"setup": setup, **{_label(s): r for s, r in rows.items()}}, indent=1))


if __name__ == "__main__":
    main()
