"""TPLA accuracy against exact MLA for N shards x rotation none/hadamard/pca (CPU is enough).

``--model tiny`` (``--fold-rotation``: each rotated configuration also with ``fold_rotation=True``): a
small random DeepSeek-V3 whose latent has the structure trained latents have, planted:
``kv_a_proj``'s latent rows get a decaying spectrum (low effective rank) and ``--outliers`` channels
scaled by ``--outlier-scale`` (massive channels). Teacher-forced decode of ``--decode`` tokens after a
``--prompt``-token prefill, one token per forward; reported per configuration: relative logit error
``||l - l_mla|| / ||l_mla||`` (over all steps), mean KL(mla || tpla) of the next-token distributions and
top-1 agreement with exact MLA.

``--model smollm2``: SmolLM2-135M-Instruct converted to MLA by ``kvcompress.transmla`` (``--latent``,
``--rope-dim``); perplexity of held-out text where the first ``--ppl-prefill`` tokens of each window are
prefilled (exact) and the rest are fed in chunks of ``--chunk`` tokens (<= max_absorbed_tokens: the TPLA
path), and needle accuracy on ``kvcompress.needle`` prompts (greedy answer, correct if it contains the
number). PCA calibrates on the conversion's calibration text.

    python benchmarks/tpla_accuracy.py --model tiny
    python benchmarks/tpla_accuracy.py --model smollm2 --json tpla_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kvcompress.mla import MLALatentCache, patch_mla
from kvcompress.tpla import TPLACache, patch_tpla

ROTATIONS = (None, "hadamard", "pca")


def configs(shards, rotations=ROTATIONS):
    return [(n, rot) for n in shards for rot in rotations]


# -- tiny model with planted latent structure ----------------------------------------------------------
def planted_model(args):
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    cfg = DeepseekV3Config(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=8, kv_lora_rank=args.latent, q_lora_rank=None,
                           qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, first_k_dense_replace=4,
                           max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(args.seed)
    r = args.latent
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            w = attn.kv_a_proj_with_mqa.weight
            u, _, vh = torch.linalg.svd(w[:r].double(), full_matrices=False)
            spectrum = torch.exp(-torch.arange(r, dtype=torch.float64) / args.decay) * w[:r].norm() / math.sqrt(r) * 4
            w[:r] = (u * spectrum) @ vh
            channels = torch.randperm(r, generator=g)[: args.outliers]
            w[channels] *= args.outlier_scale
            attn.kv_a_layernorm.weight.copy_(0.5 + torch.rand(r, generator=g))
            # larger query/key weights: attention with some contrast (random init is nearly uniform)
            attn.q_proj.weight.mul_(args.query_gain)
    return model


@torch.no_grad()
def teacher_forced_logits(model, ids, prompt, cache):
    out = model(input_ids=ids[:, :prompt], past_key_values=cache)
    logits = [out.logits[:, -1]]
    for t in range(prompt, ids.shape[1] - 1):
        logits.append(model(input_ids=ids[:, t : t + 1], past_key_values=cache).logits[:, -1])
    return torch.stack(logits, 1).float()


def run_tiny(args):
    model = planted_model(args)
    ids = torch.randint(3, 512, (args.batch, args.prompt + args.decode), generator=torch.Generator().manual_seed(1))
    with patch_mla(model):
        ref = teacher_forced_logits(model, ids, args.prompt, MLALatentCache(model.config))
    ref_logp = ref.log_softmax(-1)
    rows = []
    folds = (False, True) if args.fold_rotation else (False,)
    runs = [(n, rot, fold) for n, rot in configs(args.shards) for fold in folds if not (fold and rot is None)]
    for n, rot, fold in tqdm(runs, desc="tiny"):
        with patch_tpla(model, num_shards=n, rotation=rot, fold_rotation=fold):
            got = teacher_forced_logits(model, ids, args.prompt, TPLACache(model.config, num_shards=n, rotation=rot))
        rows.append(dict(model="tiny-planted", shards=n, rotation=rot, fold_rotation=fold,
                         rel_logit_err=((got - ref).norm() / ref.norm()).item(),
                         kl=F.kl_div(got.log_softmax(-1), ref_logp, log_target=True, reduction="none").sum(-1).mean().item(),
                         top1_agree=(got.argmax(-1) == ref.argmax(-1)).float().mean().item()))
        r = rows[-1]
        print(f"N={n} rotation={str(rot):8s}{' folded' if fold else ''} rel logit err {r['rel_logit_err']:.4f}  KL {r['kl']:.2e}  "
              f"top-1 agree {r['top1_agree']:.3f}", flush=True)
    return rows


# -- converted SmolLM2 ----------------------------------------------------------------------------------
@torch.no_grad()
def chunked_perplexity(model, windows, prefill, chunk, make_cache):
    nll, count = 0.0, 0
    for window in windows:
        ids = window[None]
        cache = make_cache()
        logits = [model(input_ids=ids[:, :prefill], past_key_values=cache).logits[:, -1:]]
        for start in range(prefill, ids.shape[1] - 1, chunk):
            logits.append(model(input_ids=ids[:, start : min(start + chunk, ids.shape[1] - 1)], past_key_values=cache).logits)
        logits = torch.cat(logits, 1)[0].float()  # predicts tokens prefill .. end
        nll += F.cross_entropy(logits, ids[0, prefill : prefill + logits.shape[0]], reduction="sum").item()
        count += logits.shape[0]
    return math.exp(nll / count)


@torch.no_grad()
def needle_accuracy(model, tokenizer, length, prompts, answer_tokens, make_cache):
    from kvcompress.needle import encode_chat, needle_prompt
    from kvcompress.patch import GENERATE_CACHE_KWARG

    correct = 0
    for k in range(prompts):
        prompt = needle_prompt(tokenizer, length, k / max(prompts - 1, 1), seed=k)
        enc = encode_chat(tokenizer, prompt.messages)
        out = model.generate(**enc, max_new_tokens=answer_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             **{GENERATE_CACHE_KWARG: make_cache()})
        correct += prompt.answer in tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return correct / prompts


def run_smollm2(args):
    from kvcompress.models import load_smollm2
    from kvcompress.transmla import calibration_tokens, convert_gqa_to_mla

    source, tokenizer = load_smollm2()
    calibration = calibration_tokens(source, tokenizer, args.calib_seqs, args.calib_len)
    model = convert_gqa_to_mla(source, kv_lora_rank=args.latent, rope_dim=args.rope_dim, calibration=calibration)
    model.eval()
    del source
    heldout = calibration_tokens(model, tokenizer, args.ppl_windows, args.ppl_window, split="heldout") if args.ppl_windows else None
    rows = []

    def measure(name, n, rot, make_cache):
        start = time.time()
        ppl = chunked_perplexity(model, heldout, args.ppl_prefill, args.chunk, make_cache) if args.ppl_windows else float("nan")
        needle = (needle_accuracy(model, tokenizer, args.needle_length, args.needle_prompts, args.answer_tokens, make_cache)
                  if args.needle_prompts else float("nan"))
        rows.append(dict(model=f"smollm2-transmla kv{args.latent} rope{args.rope_dim}", scheme=name, shards=n,
                         rotation=rot, perplexity=ppl, needle=needle, seconds=time.time() - start))
        print(f"{name:5s} N={n} rotation={str(rot):8s} ppl {ppl:8.3f}  needle@{args.needle_length} {needle:.2f}", flush=True)

    if not args.skip_mla:
        with patch_mla(model):
            measure("mla", 1, None, lambda: MLALatentCache(model.config))
    rotations = [None if r == "none" else r for r in args.rotations]
    for n, rot in tqdm(configs(args.shards, rotations), desc="smollm2"):
        with patch_tpla(model, num_shards=n, rotation=rot, calibration=calibration[:, : args.calib_len]):
            measure("tpla", n, rot, lambda: TPLACache(model.config, num_shards=n, rotation=rot))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rotations", nargs="+", choices=["none", "hadamard", "pca"], default=["none", "hadamard", "pca"],
                        help="smollm2 only")
    parser.add_argument("--latent", type=int, default=None, help="kv_lora_rank (tiny: 64, smollm2: 128)")
    # tiny
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--decay", type=float, default=8.0, help="latent spectrum exp(-k/decay)")
    parser.add_argument("--outliers", type=int, default=2)
    parser.add_argument("--outlier-scale", type=float, default=20.0)
    parser.add_argument("--query-gain", type=float, default=4.0)
    parser.add_argument("--fold-rotation", action="store_true",
                        help="also measure every rotated configuration with fold_rotation=True")
    # smollm2
    parser.add_argument("--rope-dim", type=int, default=64)
    parser.add_argument("--calib-seqs", type=int, default=4)
    parser.add_argument("--calib-len", type=int, default=256)
    parser.add_argument("--ppl-windows", type=int, default=4)
    parser.add_argument("--ppl-window", type=int, default=512)
    parser.add_argument("--ppl-prefill", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--needle-length", type=int, default=1024)
    parser.add_argument("--needle-prompts", type=int, default=4)
    parser.add_argument("--answer-tokens", type=int, default=10)
    parser.add_argument("--skip-mla", action="store_true", help="do not measure the exact-MLA reference row")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.latent is None:
        args.latent = 64 if args.model == "tiny" else 128
    torch.set_grad_enabled(False)
    rows = run_tiny(args) if args.model == "tiny" else run_smollm2(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
