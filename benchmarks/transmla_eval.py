"""SmolLM2-135M-Instruct converted to MLA by TransMLA at several (kv_lora_rank, rope_dim, freq_fold)
settings: KV cache per token, held-out perplexity and needle accuracy, before and after recovery training.

For every setting the model is converted from calibration windows of Python's bundled docs
(``calibration_text(--calib-split)``), then measured:

* KV elements and bytes per token (all layers) against the source's ``2 * kv_heads * head_dim * layers``;
* perplexity over ``--ppl-tokens`` tokens of ``calibration_text("heldout")`` in non-overlapping
  ``--window``-token windows (each window scored from its own start);
* needle accuracy: ``kvcompress.needle`` prompts of ``--needle-lengths`` tokens at ``--needle-prompts``
  depths evenly spread in [0, 1]; greedy answer of ``--answer-tokens`` tokens; correct when the needle's
  number appears in it. Converted models generate with ``MLALatentCache`` and absorbed decode
  (``patch_mla``), the source with ``DynamicCache``; the cache bytes after the longest prompt are recorded.

With ``--recovery-tokens N`` (or ``--recovery-steps N``) each lossy setting is then distilled from the
source (``distill_from_teacher``: logit KL, plus ``--hidden-weight``/``--attention-weight`` per-layer
terms) on ``--recovery-len``-token windows of ``--recovery-corpus`` (``both`` = the calibration split of
Python's docs + the standard library's docstrings; never the held-out text) and measured again. With
``--checkpoint-dir`` the recovery writes checkpoints (one sub-folder per setting) and ``--resume``
continues an interrupted run. Every row is written to ``--out`` as soon as it is measured.

GPU run of docs/transmla.md (one setting, recovery on 3M tokens, ~8 minutes on an H200):
    PYTHONPATH=. python benchmarks/transmla_eval.py --device cuda --settings 128:64 \
        --recovery-tokens 3000000 --out transmla.json
CPU smoke (a few recovery steps on short windows; minutes):
    PYTHONPATH=. python benchmarks/transmla_eval.py --device cpu --settings 128:64 --ppl-tokens 1024 \
        --needle-lengths 2048 --needle-prompts 1 --calib-seqs 2 --calib-len 256 --recovery-steps 2 \
        --recovery-len 256 --recovery-batch 1 --skip-before --out smoke.json
Perplexity only (no needle), e.g. to compare calibration sizes: ``--needle-prompts 0``.

With ``--ruler-dataset`` (a JSONL of ``kvcompress ruler --generate-only``) every row also runs RULER
(``ruler_average``: the mean of the task accuracies; per-sample records under ``--ruler-out``/results,
resumed when cut short; summary.md there at the end): the source as ``dynamic``, converted models with
``MLALatentCache`` and absorbed decode as ``transmla:<setting>``, e.g. for the 2x cache after recovery:
    PYTHONPATH=. python benchmarks/transmla_eval.py --device cuda --settings 128:64 \
        --rope-selection log_rotation --rope-context 4096 --recovery-tokens 3000000 --recovery-lr 3e-4 \
        --skip-before --ruler-dataset results/r4k/dataset.jsonl --ruler-batch 20 --out transmla_2x.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kvcompress.bench.spec import MethodSpec
from kvcompress.mla import MLALatentCache, patch_mla
from kvcompress.models import load_smollm2
from kvcompress.needle import encode_chat, needle_prompt
from kvcompress.ruler import report as ruler_report
from kvcompress.ruler import results as ruler_results
from kvcompress.ruler import runner as ruler_runner
from kvcompress.ruler.generate import read_jsonl
from kvcompress.transmla import (
    TRAIN_CHOICES,
    calibration_tokens,
    convert_gqa_to_mla,
    distill_from_teacher,
    kv_elements_per_token,
)
from kvcompress.transmla.rorope import ROPE_SELECTIONS

DEFAULT_SETTINGS = ["128:64"]  # the docs' other rows: 193:192 160:32 160:32:2 96:32 64:16


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
    """Per length: how many of the ``prompts`` prompts were answered correctly; plus the cache bytes after the last prompt of the longest length.
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
        results[length] = correct
    return results, cache_bytes


def ruler_label(name: str) -> str:
    """The RULER results label of a row: ``dynamic`` for the source (the report's reference), else
    ``transmla:<setting>`` (one plot line through the settings), e.g. ``transmla:kv128_rope64_rec``."""
    if name.startswith("source"):
        return "dynamic"
    return "transmla:" + name.replace("MLA ", "").replace(" +", "_").replace(" ", "_")


def ruler_accuracy(model, tokenizer, name: str, samples: list[dict], args, latent_cache: bool) -> dict:
    """RULER on ``samples`` (``kvcompress ruler``'s runner: chat template, greedy, per-sample records
    appended to ``--ruler-out``/results, so a cut-short run resumes). Converted models decode with the
    ``mla`` method (``MLALatentCache`` + absorbed decode), the source with ``DynamicCache``. Returns the
    row's RULER fields: the mean over tasks of the task accuracies, the samples and per-task scores."""
    label = ruler_label(name)
    method = MethodSpec(label, "mla" if latent_cache else "dynamic", {})
    results = Path(args.ruler_out) / "results"
    records = ruler_runner.run_ruler(model, tokenizer, samples, [method], results, batch_size=args.ruler_batch,
                                     max_new_tokens=args.ruler_max_new_tokens, desc=f"RULER {label}")[label]
    (row,) = ruler_report.summarize(records)
    every = list(row["tasks"].values())
    return {"ruler_label": label, "ruler_samples": row["n"], "ruler_tasks": row["tasks"],
            "ruler_average": sum(every) / len(every)}


def measure(name, model, tokenizer, args, heldout, latent_cache, source_elements, extra=None, ruler=None):
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
           "cache_ratio": source_elements / elements, "perplexity": ppl, "needle_found": needle,
           "needle_prompts": args.needle_prompts,
           "mla_cache_bytes_last_prompt": cache_bytes, "seconds": time.time() - start}
    row.update(extra or {})
    if ruler:
        row.update(ruler_accuracy(model, tokenizer, name, ruler, args, latent_cache))
        row["seconds"] = time.time() - start
    needle_text = " ".join(f"{k}:{v}/{args.needle_prompts}" for k, v in needle.items())
    ruler_text = f"  RULER {row['ruler_average']:.1f} ({row['ruler_samples']} samples)" if ruler else ""
    print(f"{name:28s} {elements * element_size:6d} B/token  x{row['cache_ratio']:.2f}  ppl {ppl:8.3f}  "
          f"needle {needle_text}{ruler_text}", flush=True)
    return row


@contextmanager
def recovery_precision(device: str, precision: str):
    """fp32; tf32 (float32 weights, TF32 matmuls); bf16 (autocast, float32 weights and loss)."""
    if not device.startswith("cuda") or precision == "fp32":
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        if precision == "bf16":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                yield
        else:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def recovery_corpus(model, tokenizer, corpus: str, length: int) -> torch.Tensor:
    """Every whole ``length``-token window of the recovery text (never the held-out split)."""
    splits = {"calibration": ["calibration"], "stdlib": ["stdlib"], "both": ["calibration", "stdlib"]}[corpus]
    return torch.cat([calibration_tokens(model, tokenizer, None, length, split=s, progress=False) for s in splits])


def write(path, meta, rows) -> None:
    if path:
        partial = Path(str(path) + ".partial")
        partial.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        partial.replace(path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--settings", nargs="+", type=parse_setting, default=[parse_setting(s) for s in DEFAULT_SETTINGS],
                        help="kv_lora_rank:rope_dim[:freq_fold] (default: %(default)s)")
    conv = parser.add_argument_group("conversion")
    conv.add_argument("--calib-seqs", type=int, default=16)
    conv.add_argument("--calib-len", type=int, default=512)
    conv.add_argument("--calib-split", choices=["calibration", "stdlib"], default="calibration")
    conv.add_argument("--rorope-basis", choices=["qk", "key"], default="qk")
    conv.add_argument("--rope-selection", choices=ROPE_SELECTIONS, default="rotation")
    conv.add_argument("--rope-context", type=int, default=None, help="default: max_position_embeddings")
    conv.add_argument("--no-balance-kv", action="store_true")
    ev = parser.add_argument_group("evaluation")
    ev.add_argument("--ppl-tokens", type=int, default=8192)
    ev.add_argument("--window", type=int, default=512)
    ev.add_argument("--needle-lengths", type=int, nargs="+", default=[2048, 4096])
    ev.add_argument("--needle-prompts", type=int, default=8)
    ev.add_argument("--ruler-dataset", default=None,
                    help="also run RULER on every row: a JSONL from 'kvcompress ruler --generate-only'")
    ev.add_argument("--ruler-out", default=None, help="RULER results directory (default: next to --out)")
    ev.add_argument("--ruler-batch", type=int, default=8, help="RULER prompts per batch (default 8)")
    ev.add_argument("--ruler-samples", type=int, default=None, help="first N samples of each task (default all)")
    ev.add_argument("--ruler-max-new-tokens", type=int, default=None, help="cap on RULER answer tokens")
    ev.add_argument("--answer-tokens", type=int, default=24)
    ev.add_argument("--skip-source", action="store_true", help="do not measure the source model")
    ev.add_argument("--skip-before", action="store_true", help="do not measure settings before recovery")
    rec = parser.add_argument_group("recovery (distill_from_teacher)")
    rec.add_argument("--recovery-tokens", type=int, default=0, help="token budget (0: use --recovery-steps)")
    rec.add_argument("--recovery-steps", type=int, default=0)
    rec.add_argument("--recovery-lr", type=float, default=1e-4)
    rec.add_argument("--recovery-batch", type=int, default=2, help="windows per step")
    rec.add_argument("--recovery-len", type=int, default=2048, help="tokens per training window")
    rec.add_argument("--recovery-corpus", choices=["calibration", "stdlib", "both"], default="both")
    rec.add_argument("--recovery-precision", choices=["fp32", "tf32", "bf16"], default="tf32")
    rec.add_argument("--kl-weight", type=float, default=1.0)
    rec.add_argument("--hidden-weight", type=float, default=0.0)
    rec.add_argument("--attention-weight", type=float, default=0.0)
    rec.add_argument("--temperature", type=float, default=1.0)
    rec.add_argument("--train", choices=TRAIN_CHOICES, default="attention")
    rec.add_argument("--lr-schedule", choices=["constant", "cosine"], default="cosine")
    rec.add_argument("--warmup-steps", type=int, default=20)
    rec.add_argument("--max-grad-norm", type=float, default=1.0)
    rec.add_argument("--no-shuffle", action="store_true")
    rec.add_argument("--checkpoint-dir", default=None, help="checkpoints, one sub-folder per setting")
    rec.add_argument("--checkpoint-every", type=int, default=None)
    rec.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir")
    parser.add_argument("--out", "--json", dest="out", default=None, help="write all rows to this JSON file")
    args = parser.parse_args(argv)
    recover = args.recovery_tokens > 0 or args.recovery_steps > 0
    ruler = None
    if args.ruler_dataset:
        if args.ruler_batch < 1:
            parser.error(f"--ruler-batch must be at least 1, got {args.ruler_batch}")
        ruler = read_jsonl(args.ruler_dataset)
        if args.ruler_samples is not None:
            ruler = [x for x in ruler if x["index"] < args.ruler_samples]
        if not ruler:
            parser.error(f"--ruler-dataset {args.ruler_dataset}: no samples")
        if args.ruler_out is None:
            args.ruler_out = str(Path(args.out).with_suffix("") if args.out else Path("results")) + "_ruler"
    if args.recovery_tokens and args.recovery_steps:
        parser.error("give --recovery-tokens or --recovery-steps, not both")

    import transformers

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    meta = {"device": device_name, "torch": torch.__version__, "transformers": transformers.__version__,
            "args": {k: v for k, v in vars(args).items()}}
    rows = []
    begin = time.time()
    model, tokenizer = load_smollm2(device=args.device, attn_implementation="sdpa")
    meta["load_seconds"] = time.time() - begin
    calibration = calibration_tokens(model, tokenizer, args.calib_seqs, args.calib_len, split=args.calib_split)
    heldout = calibration_tokens(model, tokenizer, 1, args.ppl_tokens, split="heldout")[0]
    train_tokens = recovery_corpus(model, tokenizer, args.recovery_corpus, args.recovery_len) if recover else None
    if train_tokens is not None:
        meta["recovery_corpus_tokens"] = train_tokens.numel()
        print(f"recovery corpus: {train_tokens.shape[0]} windows of {train_tokens.shape[1]} tokens", flush=True)
    source_elements = kv_elements_per_token(model)
    if not args.skip_source:
        rows.append(measure("source (GQA)", model, tokenizer, args, heldout, False, source_elements, ruler=ruler))
        write(args.out, meta, rows)
    for kv_lora_rank, rope_dim, fold in tqdm(args.settings, desc="settings"):
        name = f"MLA kv{kv_lora_rank} rope{rope_dim}" + (f" fold{fold}" if fold > 1 else "")
        start = time.time()
        converted = convert_gqa_to_mla(model, kv_lora_rank, rope_dim, calibration, freq_fold=fold,
                                       rorope_basis=args.rorope_basis, balance_kv=not args.no_balance_kv,
                                       rope_selection=args.rope_selection, rope_context=args.rope_context)
        info = {"kv_lora_rank": kv_lora_rank, "rope_dim": rope_dim, "freq_fold": fold,
                "convert_seconds": time.time() - start, "lossless": converted.transmla_info["lossless"],
                "rope_slots_per_block": converted.transmla_info["rope_slots_per_block"], "recovery_tokens": 0}
        if not args.skip_before or not recover or info["lossless"]:
            rows.append(measure(name, converted, tokenizer, args, heldout, True, source_elements, info, ruler=ruler))
            write(args.out, meta, rows)
        if recover and not info["lossless"]:
            start = time.time()
            checkpoints = None
            if args.checkpoint_dir:
                checkpoints = Path(args.checkpoint_dir) / f"kv{kv_lora_rank}_rope{rope_dim}_fold{fold}"
            budget = dict(token_budget=args.recovery_tokens) if args.recovery_tokens else dict(steps=args.recovery_steps)
            with recovery_precision(args.device, args.recovery_precision):
                losses = distill_from_teacher(
                    converted, model, train_tokens, lr=args.recovery_lr, temperature=args.temperature,
                    batch_size=args.recovery_batch, kl_weight=args.kl_weight, hidden_weight=args.hidden_weight,
                    attention_weight=args.attention_weight, train=args.train, lr_schedule=args.lr_schedule,
                    warmup_steps=args.warmup_steps, max_grad_norm=args.max_grad_norm,
                    shuffle=not args.no_shuffle, checkpoint_dir=checkpoints,
                    checkpoint_every=args.checkpoint_every if checkpoints else None,
                    resume=args.resume and checkpoints is not None, **budget)
            tokens_done = len(losses) * args.recovery_batch * args.recovery_len
            info = dict(info, recovery_steps=len(losses), recovery_tokens=tokens_done,
                        recovery_seconds=time.time() - start, recovery_loss_first=losses[0] if losses else None,
                        recovery_loss_last=losses[-1] if losses else None,
                        recovery_losses_every_10=losses[::10])
            print(f"recovery: {len(losses)} steps, {tokens_done} tokens, {info['recovery_seconds']:.0f} s, "
                  f"loss {info['recovery_loss_first']} -> {info['recovery_loss_last']}", flush=True)
            rows.append(measure(name + " +rec", converted, tokenizer, args, heldout, True, source_elements, info,
                                ruler=ruler))
            write(args.out, meta, rows)
        del converted
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    meta["total_seconds"] = time.time() - begin
    if ruler:  # every row's RULER records in one table and plot (summary.md, accuracy_vs_ratio.png)
        md, _ = ruler_report.write_report(ruler_results.read_all(Path(args.ruler_out) / "results"),
                                          args.ruler_out, "RULER, SmolLM2 and its TransMLA conversions")
        print(md.read_text())
    print(json.dumps(meta))
    write(args.out, meta, rows)


if __name__ == "__main__":
    main()
