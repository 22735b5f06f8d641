"""Randomised cases for MLA and TPLA: tiny DeepSeek-V2/V3 configs drawn from a seeded generator, fp32
and bf16, left-padded batches with a 1-token and a repeated-token prompt. Outputs are finite; in fp32
patch_mla + MLALatentCache gives the stock greedy tokens, and TPLA's simulated shards give MLA's
results where its maths is exact (one shard; the prefill for any N) with static and growable caches
alike."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import DynamicCache

from conftest import tiny_model
from kvcompress.mla import MLALatentCache, patch_mla
from kvcompress.patch import GENERATE_CACHE_KWARG
from kvcompress.tpla import TPLACache, patch_tpla

SEEDS = [0, 1, 2]


def random_case(seed: int):
    """A tiny random config (family, widths, q_lora_rank, rope style) and a left-padded batch of prompts:
    one of a single token, one repeating one token, one random."""
    rng = random.Random(seed)
    family = rng.choice(["deepseek_v2", "deepseek_v3"])
    overrides = dict(num_hidden_layers=2, first_k_dense_replace=rng.choice([1, 2]),
                     kv_lora_rank=rng.choice([16, 32]), qk_rope_head_dim=rng.choice([4, 8]),
                     qk_nope_head_dim=rng.choice([8, 16]), v_head_dim=rng.choice([8, 16]),
                     num_attention_heads=rng.choice([2, 4]), q_lora_rank=rng.choice([None, 16]))
    overrides["num_key_value_heads"] = overrides["num_attention_heads"]
    if family == "deepseek_v3":
        overrides["rope_interleave"] = rng.choice([False, True])
    width = rng.randint(6, 20)
    token = rng.randrange(3, 160)
    rows = [[rng.randrange(3, 160)], [token] * rng.randint(2, width),
            [rng.randrange(3, 160) for _ in range(width)]]
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return family, overrides, ids, mask


def run(model, ids, mask, cache, new_tokens: int = 4):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                         eos_token_id=None, return_dict_in_generate=True, output_logits=True,
                         **{GENERATE_CACHE_KWARG: cache})
    return out.sequences, torch.stack(out.logits).float()


@pytest.mark.parametrize("seed", SEEDS)
def test_fp32_mla_and_tpla_match_stock(seed):
    family, overrides, ids, mask = random_case(seed)
    model = tiny_model(family, seed=seed, **overrides)
    model.config._attn_implementation = "sdpa"
    ref_tokens, ref_logits = run(model, ids, mask, DynamicCache(config=model.config))
    assert torch.isfinite(ref_logits).all()
    with patch_mla(model, max_absorbed_tokens=4):
        tokens, logits = run(model, ids, mask, MLALatentCache(model.config))
    assert torch.equal(tokens, ref_tokens)
    assert (logits - ref_logits).abs().max() < 1e-4
    with patch_tpla(model, num_shards=1, rotation="hadamard", max_absorbed_tokens=4):
        tokens, logits = run(model, ids, mask, TPLACache(model.config, num_shards=1, rotation="hadamard"))
    assert torch.equal(tokens, ref_tokens) and (logits - ref_logits).abs().max() < 1e-4
    for rotation in (None, "hadamard"):
        with patch_tpla(model, num_shards=2, rotation=rotation, max_absorbed_tokens=4):
            grow_tokens, grow = run(model, ids, mask, TPLACache(model.config, num_shards=2, rotation=rotation))
            if rotation == "hadamard":  # static storage: the same results as the growable one
                tokens, logits = run(model, ids, mask, TPLACache(model.config, num_shards=2, rotation=rotation,
                                                                 max_cache_len=ids.shape[1] + 8))
                assert torch.equal(tokens, grow_tokens) and (logits - grow).abs().max() < 1e-4
        assert torch.isfinite(grow).all()
        assert (grow[0] - ref_logits[0]).abs().max() < 1e-4  # the prefill (> 4 tokens) is exact MLA


@pytest.mark.parametrize("seed", SEEDS[:1])
def test_bf16_outputs_are_finite(seed):
    family, overrides, ids, mask = random_case(seed)
    model = tiny_model(family, seed=seed, dtype=torch.bfloat16, **overrides)
    model.config._attn_implementation = "sdpa"
    with patch_mla(model, max_absorbed_tokens=4):
        _, logits = run(model, ids, mask, MLALatentCache(model.config))
    assert torch.isfinite(logits).all()
    with patch_tpla(model, num_shards=2, rotation="hadamard", max_absorbed_tokens=4):
        _, logits = run(model, ids, mask, TPLACache(model.config, num_shards=2, rotation="hadamard",
                                                    max_cache_len=ids.shape[1] + 8))
    assert torch.isfinite(logits).all()
