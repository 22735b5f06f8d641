"""SmolLM2-135M-Instruct converted to MLA by TransMLA at several (kv_lora_rank, rope_dim, freq_fold)
settings: KV cache per token, held-out perplexity and needle accuracy, before and after recovery training.

For every setting the model is converted from calibration windows of Python's bundled docs
(``calibration_text("calibration")``), then measured:

* KV elements and bytes per token (all layers) against the source's ``2 * kv_heads * head_dim * layers``;
* perplexity over ``--ppl-tokens`` tokens of ``calibration_text("heldout")`` in non-overlapping
  ``--window``-token windows (each window scored from its own start);
* needle accuracy: ``kvcompress.needle`` prompts of ``--needle-lengths`` tokens at ``--needle-prompts``
  depths evenly spread in [0, 1]; greedy answer of ``--answer-tokens`` tokens; correct when the needle's
  number appears in it. Converted models generate with ``MLALatentCache`` and absorbed decode
  (``patch_mla``), the source with ``DynamicCache``; the cache bytes after the longest prompt are recorded.

With ``--recovery-steps N`` each lossy setting is then distilled from the source (logit KL,
``distill_from_teacher``) on the calibration windows and measured again.

GPU run of docs/transmla.md:
    PYTHONPATH=. python benchmarks/transmla_eval.py --device cuda --json transmla.json
CPU run (small sizes, minutes):
    python benchmarks/transmla_eval.py --device cpu --ppl-tokens 2048 --needle-lengths 2048 \
        --needle-prompts 3 --calib-seqs 4 --calib-len 256 --settings 128:64 96:32
Perplexity only (no needle), e.g. to compare calibration sizes: ``--needle-prompts 0``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kvcompress.mla import MLALatentCache, patch_mla
from kvcompress.models import load_smollm2
from kvcompress.needle import encode_chat, needle_prompt
from kvcompress.transmla import calibration_tokens, convert_gqa_to_mla, distill_from_teacher, kv_elements_per_token

DEFAULT_SETTINGS = ["193:192", "128:64", "160:32", "160:32:2", "96:32", "64:16"]


def cache_kwarg(model) -> str:
    """transformers 5.24 names the cache argument ``cache``, 5.17 ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def parse_setting(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in text.split(":")]
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"setting must be kv_lora_rank:rope_dim[:freq_fold], got {text!r}")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else 1


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, window: int, device: str) -> float:
    nll, count = 0.0, 0
    for start in range(0, ids.numel() - 1, window):
        chunk = ids[start : start + window][None].to(device)
        if chunk.shape[1] < 2:
            break
        logits = model(input_ids=chunk, use_cache=False).logits.float()
        nll += F.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    return math.exp(nll / count)


@torch.no_grad()
def needle_accuracy(model, tokenizer, lengths, prompts, answer_tokens, device, latent_cache: bool):
    """Per length: fraction correct; plus the cache bytes after the last prompt of the longest length.
    ``prompts = 0`` skips the needle test (perplexity only)."""
    results, cache_bytes = {}, None
    if prompts == 0:
        return results, cache_bytes
    for length in lengths:
        correct = 0
        for n in range(prompts):
            depth = n / max(prompts - 1, 1)
            prompt = needle_prompt(tokenizer, length, depth, seed=n)
            enc = encode_chat(tokenizer, prompt.messages).to(device)
            kw = dict(max_new_tokens=answer_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            if latent_cache:
                cache = MLALatentCache(model.config)
                out = model.generate(**enc, **kw, **{cache_kwarg(model): cache})
                cache_bytes = cache.nbytes()
            else:
                out = model.generate(**enc, **kw)
            answer = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            correct += prompt.answer in answer
        results[length] = correct / prompts
    return results, cache_bytes


def measure(name, model, tokenizer, args, heldout, latent_cache, source_elements, extra=None):
    start = time.time()
    ppl = perplexity(model, heldout, args.window, args.device)
    if latent_cache:
        with patch_mla(model):
            needle, cache_bytes = needle_accuracy(model, tokenizer, args.needle_lengths, args.needle_prompts,
                                                  args.answer_tokens, args.device, True)
    else:
        needle, cache_bytes = needle_accuracy(model, tokenizer, args.needle_lengths, args.needle_prompts,
                                              args.answer_tokens, args.device, False)
    elements = kv_elements_per_token(model)
    element_size = next(model.parameters()).element_size()
    row = {"name": name, "kv_elements_per_token": elements, "kv_bytes_per_token": elements * element_size,
           "cache_ratio": source_elements / elements, "perplexity": ppl, "needle": needle,
           "mla_cache_bytes_last_prompt": cache_bytes, "seconds": time.time() - start}
    row.update(extra or {})
    needle_text = " ".join(f"{k}:{v:.2f}" for k, v in needle.items())
    print(f"{name:28s} {elements * element_size:6d} B/token  x{row['cache_ratio']:.2f}  ppl {ppl:8.3f}  "
          f"needle {needle_text}", flush=True)
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--settings", nargs="+", type=parse_setting, default=[parse_setting(s) for s in DEFAULT_SETTINGS],
                        help="kv_lora_rank:rope_dim[:freq_fold] (default: %(default)s)")
    parser.add_argument("--calib-seqs", type=int, default=16)
    parser.add_argument("--calib-len", type=int, default=512)
    parser.add_argument("--ppl-tokens", type=int, default=8192)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--needle-lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--needle-prompts", type=int, default=8)
    parser.add_argument("--answer-tokens", type=int, default=24)
    parser.add_argument("--recovery-steps", type=int, default=0)
    parser.add_argument("--recovery-lr", type=float, default=1e-4)
    parser.add_argument("--recovery-batch", type=int, default=4)
    parser.add_argument("--json", default=None, help="write all rows to this JSON file")
    args = parser.parse_args(argv)

    model, tokenizer = load_smollm2(device=args.device, attn_implementation="sdpa")
    calibration = calibration_tokens(model, tokenizer, args.calib_seqs, args.calib_len)
    heldout = calibration_tokens(model, tokenizer, 1, args.ppl_tokens, split="heldout")[0]
    source_elements = kv_elements_per_token(model)
    rows = [measure("source (GQA)", model, tokenizer, args, heldout, False, source_elements)]
    for kv_lora_rank, rope_dim, fold in tqdm(args.settings, desc="settings"):
        name = f"MLA kv{kv_lora_rank} rope{rope_dim}" + (f" fold{fold}" if fold > 1 else "")
        start = time.time()
        converted = convert_gqa_to_mla(model, kv_lora_rank, rope_dim, calibration, freq_fold=fold)
        info = {"kv_lora_rank": kv_lora_rank, "rope_dim": rope_dim, "freq_fold": fold,
                "convert_seconds": time.time() - start, "lossless": converted.transmla_info["lossless"],
                "recovery_steps": 0}
        rows.append(measure(name, converted, tokenizer, args, heldout, True, source_elements, info))
        if args.recovery_steps and not converted.transmla_info["lossless"]:
            start = time.time()
            losses = distill_from_teacher(converted, model, calibration, steps=args.recovery_steps,
                                          lr=args.recovery_lr, batch_size=args.recovery_batch)
            info = dict(info, recovery_steps=len(losses), recovery_seconds=time.time() - start,
                        recovery_loss_first=losses[0], recovery_loss_last=losses[-1])
            rows.append(measure(name + " +rec", converted, tokenizer, args, heldout, True, source_elements, info))
        del converted
        if args.device == "cuda":
            torch.cuda.empty_cache()
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    meta = {"device": device_name, "torch": torch.__version__, "args": {k: v for k, v in vars(args).items()}}
    import transformers

    meta["transformers"] = transformers.__version__
    print(json.dumps(meta))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
