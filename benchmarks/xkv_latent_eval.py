"""xKV over the MLA latent (``xkv_mla``): reconstruction and logit error on a tiny DeepSeek-V3, and
perplexity / needle accuracy on SmolLM2-135M-Instruct converted to MLA by TransMLA (lossless setting).

Part ``tiny`` (seconds): a random DeepSeek-V3 config (8 layers, kv_lora_rank 64, rope 16) over a random
prompt. For each group size and rank fraction: the relative Frobenius error of the rebuilt latent
``|C - A B| / |C|`` over all layers, and the max-abs / relative error of the next-token logits against
``MLALatentCache``. Random weights have little cross-layer structure: the numbers check the maths and the
trend, not what a trained model gets.

Part ``smollm2``: the real model converted losslessly (``convert_gqa_to_mla(model)``: kv_lora_rank 193,
rope 192; logits equal to the source's), patched with ``patch_xkv_mla`` (or ``patch_mla`` for the
reference). Measured per cache configuration:

* the cache bytes after each needle prompt (mean) and the ratio ``MLALatentCache / XKVLatentCache``;
* perplexity with a compressed context: the held-out text (``calibration_text("heldout")``) cut into
  ``--ppl-windows`` windows of ``2 * --ppl-context`` tokens; the first half fills the cache (compressed
  like a prompt), the second half is scored in one forward over that cache;
* needle accuracy: ``kvcompress.needle`` prompts of ``--needle-length`` tokens at ``--needle-prompts``
  depths evenly spread in [0, 1], greedy answer of ``--answer-tokens`` tokens, correct when the number
  appears in it.

A configuration is ``rank:rope_rank[:bits]`` (fractions of ``group_size * width`` or ints; ``rope_rank``
``none`` keeps the RoPE keys exact; ``bits`` 8 stores factors and matrices in 8 bits).

CPU run (2 cores: the lossless conversion alone takes ~4.5 minutes; the tiny part seconds):
    PYTHONPATH=. python benchmarks/xkv_latent_eval.py --parts tiny smollm2 --configs 0.34:0.34 0.22:0.22 \
        --out xkv_latent.json
GPU:
    PYTHONPATH=. python benchmarks/xkv_latent_eval.py --device cuda --parts smollm2 --needle-prompts 16 \
        --configs 0.5:none 0.34:0.34 0.22:0.22 1.0:1.0:8 0.5:0.5:8 --out xkv_latent.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import time

import torch
import torch.nn.functional as F


def cache_kwarg(model) -> str:
    """transformers 5.24 names the cache argument ``cache``, 5.17 ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def parse_config(text: str) -> dict:
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"config must be rank:rope_rank[:bits], got {text!r}")

    def rank(s):
        if s.lower() == "none":
            return None
        return float(s) if "." in s else int(s)

    bits = int(parts[2]) if len(parts) == 3 else None
    return dict(latent_rank=rank(parts[0]), rope_rank=rank(parts[1]), factor_bits=bits, matrix_bits=bits)


def config_name(cfg: dict) -> str:
    bits = f" int{cfg['factor_bits']}" if cfg.get("factor_bits") else ""
    return f"xkv_mla r={cfg['latent_rank']} rope={cfg['rope_rank']}{bits}"


@torch.no_grad()
def tiny_part(args) -> list[dict]:
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    from kvcompress.mla import MLALatentCache
    from kvcompress.xkv_latent import XKVLatentCache, patch_xkv_mla

    cfg = DeepseekV3Config(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=8,
                           num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=64, q_lora_rank=32,
                           qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, n_routed_experts=4,
                           num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=64,
                           first_k_dense_replace=1, n_group=1, topk_group=1, max_position_embeddings=2048)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.config._attn_implementation = "sdpa"
    ids = torch.randint(3, 256, (1, args.tiny_tokens), generator=torch.Generator().manual_seed(1))
    key = cache_kwarg(model)
    ref_cache = MLALatentCache(model.config)
    model(ids[:, :-1], **{key: ref_cache})
    ref = model(ids[:, -1:], **{key: ref_cache}).logits[0, -1]
    exact = [layer.keys[:, 0, : args.tiny_tokens - 1] for layer in ref_cache.layers]
    rows = []
    with patch_xkv_mla(model):
        for group in args.tiny_groups:
            for fraction in args.tiny_ranks:
                cache = XKVLatentCache(model.config, group_size=group, latent_rank=fraction, window=0, min_compress_tokens=1)
                model(ids[:, :-1], **{key: cache})
                rebuilt = [layer.full_states()[0][:, 0] for layer in cache.layers]
                num = math.sqrt(sum(((a - b).double().norm() ** 2).item() for a, b in zip(rebuilt, exact)))
                den = math.sqrt(sum((b.double().norm() ** 2).item() for b in exact))
                logits = model(ids[:, -1:], **{key: cache}).logits[0, -1]
                row = {"part": "tiny", "group_size": group, "rank_fraction": fraction, "rank": cache.rank,
                       "latent_rel_error": num / den, "logit_max_abs_error": (logits - ref).abs().max().item(),
                       "logit_rel_error": ((logits - ref).norm() / ref.norm()).item()}
                rows.append(row)
                print(f"tiny G={group} rank={fraction:<5} (r={cache.rank:4d})  latent rel err {row['latent_rel_error']:.4f}"
                      f"  logit max err {row['logit_max_abs_error']:.4f}  rel {row['logit_rel_error']:.4f}", flush=True)
    return rows


@torch.no_grad()
def compressed_perplexity(model, ids: torch.Tensor, context: int, windows: int, make_cache) -> float:
    key, nll, count = cache_kwarg(model), 0.0, 0
    for w in range(windows):
        chunk = ids[w * 2 * context : (w + 1) * 2 * context][None]
        if chunk.shape[1] < 2 * context:
            break
        cache = make_cache()
        model(chunk[:, :context], **{key: cache})
        logits = model(chunk[:, context:], **{key: cache}).logits.float()
        # token context+i is predicted by the logits at context+i-1: the first scored one by the context's last
        nll += F.cross_entropy(logits[0, :-1], chunk[0, context + 1 :], reduction="sum").item()
        count += context - 1
    return math.exp(nll / count)


@torch.no_grad()
def needles(model, tokenizer, length, prompts, answer_tokens, make_cache) -> tuple[int, float]:
    from kvcompress.needle import encode_chat, needle_prompt

    correct, sizes = 0, []
    for n in range(prompts):
        prompt = needle_prompt(tokenizer, length, n / max(prompts - 1, 1), seed=n)
        enc = encode_chat(tokenizer, prompt.messages)
        cache = make_cache()
        out = model.generate(**enc, max_new_tokens=answer_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, **{cache_kwarg(model): cache})
        sizes.append(cache.nbytes())
        correct += prompt.answer in tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return correct, sum(sizes) / max(len(sizes), 1)


def smollm2_part(args) -> list[dict]:
    from kvcompress.mla import MLALatentCache, patch_mla
    from kvcompress.models import load_smollm2
    from kvcompress.transmla import calibration_tokens, convert_gqa_to_mla
    from kvcompress.xkv_latent import XKVLatentCache, patch_xkv_mla

    model, tokenizer = load_smollm2(device=args.device, attn_implementation="sdpa")
    heldout = calibration_tokens(model, tokenizer, 1, 2 * args.ppl_context * args.ppl_windows, split="heldout")[0]
    converted = convert_gqa_to_mla(model)
    assert converted.transmla_info["lossless"]
    del model
    heldout = heldout.to(args.device)
    rows = []
    configs = [None] + args.configs
    for cfg in configs:
        start = time.time()
        if cfg is None:
            name, patch = "MLALatentCache", patch_mla
            make = lambda: MLALatentCache(converted.config)  # noqa: E731
        else:
            name, patch = config_name(cfg), patch_xkv_mla
            make = lambda cfg=cfg: XKVLatentCache(converted.config, group_size=args.group_size, window=args.window,  # noqa: E731
                                                  **cfg)
        with patch(converted):
            ppl = compressed_perplexity(converted, heldout, args.ppl_context, args.ppl_windows, make)
            found, nbytes = needles(converted, tokenizer, args.needle_length, args.needle_prompts,
                                    args.answer_tokens, make) if args.needle_prompts else (0, float("nan"))
        row = {"part": "smollm2", "name": name, **(cfg or {}), "perplexity": ppl, "needle_found": found,
               "needle_prompts": args.needle_prompts, "needle_length": args.needle_length,
               "cache_bytes_mean": nbytes, "seconds": time.time() - start}
        if rows:
            row["ratio_vs_mla"] = rows[0]["cache_bytes_mean"] / nbytes
        rows.append(row)
        ratio = f"x{row.get('ratio_vs_mla', 1.0):.2f}"
        print(f"{name:36s} {nbytes / 2**20:8.2f} MiB  {ratio}  ppl {ppl:8.3f}  needle {found}/{args.needle_prompts}"
              f"  ({row['seconds']:.0f} s)", flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--parts", nargs="+", choices=["tiny", "smollm2"], default=["tiny", "smollm2"])
    parser.add_argument("--tiny-tokens", type=int, default=512)
    parser.add_argument("--tiny-groups", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--tiny-ranks", type=float, nargs="+", default=[0.125, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--configs", nargs="+", type=parse_config, default=[parse_config("0.34:0.34"),
                                                                             parse_config("0.22:0.22")])
    parser.add_argument("--group-size", type=int, default=None, help="default: the divisor nearest 4 (SmolLM2: 5)")
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--ppl-context", type=int, default=512)
    parser.add_argument("--ppl-windows", type=int, default=3)
    parser.add_argument("--needle-length", type=int, default=2048)
    parser.add_argument("--needle-prompts", type=int, default=8)
    parser.add_argument("--answer-tokens", type=int, default=24)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    import transformers

    meta = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "args": {k: v for k, v in vars(args).items()}}
    rows = []
    if "tiny" in args.parts:
        rows += tiny_part(args)
    if "smollm2" in args.parts:
        rows += smollm2_part(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
