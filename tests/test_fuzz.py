"""Randomised XKVCache checks over tiny Llama / Qwen2 / Mistral models built here (random init, seeded):
dtypes, ranks, left-padded batches and degenerate prompts (one repeated token, an all-padding row, a
one-token prompt). Every case gives finite logits; at full rank (fp32) the greedy tokens equal
DynamicCache's; both for the cache alone and under ``patch_model(model, "xkv")``."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import DynamicCache

from conftest import tiny_model
from kvcompress import XKVCache, patch_model

NEW_TOKENS = 4
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def cpu_supports(dtype: torch.dtype) -> bool:
    try:
        a = torch.ones(2, 2, dtype=dtype)
        return bool(torch.isfinite(a @ a).all())
    except RuntimeError:
        return False


PROMPTS = ["random", "repeated", "one_token", "padding_row"]
SEEDS = range(16)


def random_case(seed: int) -> dict:
    """One case drawn from ``seed``: model family and shapes, dtype, ranks, prompt kind, batch. Seeds 0-11
    cover every prompt kind in every dtype (full rank in fp32, where tokens must equal DynamicCache's;
    either rank in 16 bits);
    seeds 12-15 every prompt kind in fp32 at low rank."""
    rng = random.Random(seed)
    heads = rng.choice([2, 4])
    dtype = DTYPES[(seed // 4) % 3] if seed < 12 else torch.float32
    case = dict(
        family=rng.choice(["llama", "qwen2", "mistral"]),
        layers=rng.choice([2, 4]),
        heads=heads,
        kv_heads=rng.choice([h for h in (1, 2, 4) if heads % h == 0]),
        dtype=dtype,
        full_rank=(dtype == torch.float32 or rng.random() < 0.5) if seed < 12 else False,
        prompt=PROMPTS[seed % 4],
        batch=rng.choice([1, 2, 3]),
        length=rng.randint(8, 40),
    )
    if case["prompt"] == "padding_row":
        case["batch"] = max(case["batch"], 2)
    return case


def prompt_batch(case: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``[batch, length]`` ids (pad = 0) and mask for the case's prompt kind."""
    g = torch.Generator().manual_seed(seed)
    batch, length = case["batch"], case["length"]
    if case["prompt"] == "one_token":
        length = 1
    ids = torch.zeros(batch, length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row in range(batch):
        n = length if row == 0 else int(torch.randint(1, length + 1, (1,), generator=g))
        if case["prompt"] == "padding_row" and row == batch - 1:
            continue  # a row of padding only
        tokens = torch.randint(3, 160, (n,), generator=g)
        if case["prompt"] == "repeated":
            tokens[:] = tokens[0]
        ids[row, length - n:], mask[row, length - n:] = tokens, 1
    return ids, mask


def greedy(model, ids, mask, cache):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=NEW_TOKENS,
                              do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzz_xkv_against_dynamic_cache(seed):
    case = random_case(seed)
    if not cpu_supports(case["dtype"]):
        pytest.skip(f"this CPU has no {case['dtype']} matmul")
    head_dim = 16
    model = tiny_model(case["family"], seed=seed, dtype=case["dtype"], num_hidden_layers=case["layers"],
                       num_attention_heads=case["heads"], num_key_value_heads=case["kv_heads"],
                       hidden_size=case["heads"] * head_dim, head_dim=head_dim)
    ids, mask = prompt_batch(case, seed)
    ranks = dict(rank_k=None, rank_v=None, factor_bits=None, matrix_bits=None) if case["full_rank"] else dict(rank_k=0.25, rank_v=0.25)
    params = dict(group_size=2 if case["layers"] % 2 == 0 else 1, window=2, sink=1, min_compress_tokens=1, **ranks)
    stock = greedy(model, ids, mask, DynamicCache(config=model.config))
    runs = [greedy(model, ids, mask, XKVCache(model.config, **params))]
    with patch_model(model, "xkv", **params):
        runs.append(greedy(model, ids, mask, None))
    exact = case["full_rank"] and case["dtype"] == torch.float32
    real = mask.any(dim=1)  # rows with at least one real token
    for out in runs:
        assert out.sequences.shape == stock.sequences.shape, case
        for scores in out.scores:
            assert torch.isfinite(scores[real]).all(), case
        if exact:
            assert torch.equal(out.sequences[real], stock.sequences[real]), case
            for a, b in zip(out.scores, stock.scores):
                torch.testing.assert_close(a[real], b[real], atol=1e-4, rtol=1e-4)
