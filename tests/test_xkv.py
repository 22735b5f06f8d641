"""XKVCache: exactness at full rank, real memory saving at truncated rank, errors, integration on SmolLM2."""

from __future__ import annotations

import inspect
import math
import sys

import pytest
import torch
from transformers import DynamicCache

from conftest import tiny_config, tiny_model
from kvcompress import XKVCache, default_group_size
from kvcompress.ops import truncated_svd

FAMILIES = ["llama", "qwen2", "mistral"]
# transformers renamed generate's past_key_values= to cache= (5.2x); older releases only know the old name.
GENERATE_HAS_CACHE_KWARG = 'new_name="cache"' in inspect.getsource(
    __import__("transformers").generation.utils.GenerationMixin)


def left_padded_batch(vocab: int = 160, lengths=(48, 41), seed: int = 1):
    """Two prompts of different lengths, left padded with token 0."""
    g = torch.Generator().manual_seed(seed)
    total = max(lengths)
    ids = torch.zeros(len(lengths), total, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, total - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[row, total - n:] = 1
    return ids, mask


def generate(model, ids, mask, cache, **kwargs):
    return model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=8,
                          do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0,
                          **kwargs)


def assert_same_generation(ref, out, atol=1e-4):
    assert torch.equal(ref.sequences, out.sequences)
    for a, b in zip(ref.scores, out.scores):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-4)


def full_rank_cache(config, **kwargs):
    params = dict(group_size=2, rank_k=None, rank_v=None, factor_bits=None, matrix_bits=None, window=4, sink=2, min_compress_tokens=1)
    params.update(kwargs)
    return XKVCache(config, **params)


@pytest.mark.parametrize("merge", [True, False])
@pytest.mark.parametrize("family", FAMILIES)
def test_full_rank_matches_dynamic_cache_with_left_padding_and_second_turn(family, merge):
    """Full rank is lossless, also through a second turn: merged into the first segment by the incremental
    SVD (merge_segments=True) or as a second segment."""
    model = tiny_model(family)
    ids, mask = left_padded_batch()
    ref_cache, cache = DynamicCache(config=model.config), full_rank_cache(model.config, merge_segments=merge)
    ref = generate(model, ids, mask, ref_cache)
    out = generate(model, ids, mask, cache)
    assert_same_generation(ref, out)
    assert all(len(group.segments) == 1 for group in cache.groups), "the prompt must have been compressed"

    # Second turn on the same cache objects: previous sequence plus a new user chunk.
    new_tokens = torch.randint(3, 160, (2, 20), generator=torch.Generator().manual_seed(7))
    ids2 = torch.cat([ref.sequences, new_tokens], dim=1)
    mask2 = torch.cat([mask, torch.ones(2, ids2.shape[1] - mask.shape[1], dtype=torch.long)], dim=1)
    ref2 = generate(model, ids2, mask2, ref_cache)
    out2 = generate(model, ids2, mask2, cache)
    assert_same_generation(ref2, out2)
    segments = 1 if merge else 2
    assert all(len(group.segments) == segments for group in cache.groups), "second turn: merged / a new segment"
    assert cache.get_seq_length() == ref_cache.get_seq_length()
    assert cache.nbytes() == cache.expected_nbytes()


@pytest.mark.parametrize("pre_rope", [True, False])
def test_full_rank_exact_pre_and_post_rope(pre_rope):
    model = tiny_model("llama", seed=3)
    ids, mask = left_padded_batch(seed=4)
    ref = generate(model, ids, mask, DynamicCache(config=model.config))
    out = generate(model, ids, mask, full_rank_cache(model.config, pre_rope=pre_rope, group_size=4))
    assert_same_generation(ref, out)


def test_both_generate_keywords():
    model = tiny_model("qwen2")
    ids, mask = left_padded_batch()
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                         past_key_values=full_rank_cache(model.config))
    assert torch.equal(ref, out)
    if not GENERATE_HAS_CACHE_KWARG:
        pytest.skip("this transformers' generate has no cache= keyword (patch_model translates it)")
    cache = full_rank_cache(model.config)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                         cache=cache)
    assert torch.equal(ref, out)
    assert cache.get_seq_length() == ids.shape[1] + 5


def test_sampling_with_fixed_seed_matches():
    model = tiny_model("llama", seed=5)
    ids, mask = left_padded_batch()
    outs = []
    for cache in (DynamicCache(config=model.config), full_rank_cache(model.config)):
        torch.manual_seed(123)
        outs.append(model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=8,
                                   do_sample=True, top_k=20, pad_token_id=0))
    assert torch.equal(outs[0], outs[1])


def test_beam_search_reorders_shared_factors():
    model = tiny_model("llama", seed=6)
    ids, mask = left_padded_batch()
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False,
                  pad_token_id=0)
    ref = model.generate(past_key_values=DynamicCache(config=model.config), **kwargs)
    out = model.generate(past_key_values=full_rank_cache(model.config), **kwargs)
    assert torch.equal(ref, out)


def test_sliding_window_layers_stay_stock():
    config = tiny_config("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=2)
    assert config.layer_types == ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config).eval()
    ids, mask = left_padded_batch(lengths=(40, 40))
    ref = generate(model, ids, mask, DynamicCache(config=config))
    cache = full_rank_cache(config, group_size=2)
    out = generate(model, ids, mask, cache)
    assert_same_generation(ref, out)
    assert [type(layer).__name__ for layer in cache.layers] == ["GrowableXKVLayer", "GrowableXKVLayer",
                                                                 "DynamicSlidingWindowLayer",
                                                                 "DynamicSlidingWindowLayer"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [None, 8])
def test_truncated_rank_nbytes_equals_formula_and_frees_full_tensors(dtype, bits):
    config = tiny_config("llama", num_hidden_layers=4)
    model = tiny_model("llama", seed=2).to(dtype)
    prompt, new, window, sink = 120, 6, 8, 3
    ids = torch.randint(3, 160, (2, prompt), generator=torch.Generator().manual_seed(0))
    cache = XKVCache(config, group_size=2, rank_k=0.25, rank_v=10, window=window, sink=sink, factor_bits=bits,
                     matrix_bits=bits)
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                   max_new_tokens=new, do_sample=False, pad_token_id=0)
    # Independent evaluation of docs/xkv.md's formula (8 bits: int8 entries, plus per token one key and one
    # value scale, per component one scale, per layer one scale per column of each matrix).
    batch, heads, head_dim, g, groups, elem = 2, 2, 16, 2, 2, dtype.itemsize
    width = g * heads * head_dim
    r_k, r_v = math.ceil(0.25 * width), 10
    compressed = prompt - sink - window
    exact = sink + window + (new - 1)  # the last generated token is never fed back
    group_bytes = elem * (compressed * (r_k + r_v) + g * (r_k + r_v) * heads * head_dim
                          + g * exact * 2 * heads * head_dim)
    if bits == 8:
        group_bytes = (compressed * (r_k + r_v) + g * (r_k + r_v) * heads * head_dim  # one byte each
                       + elem * (2 * compressed + (r_k + r_v) + g * 2 * heads * head_dim)  # the scales
                       + elem * g * exact * 2 * heads * head_dim)
    # cos and sin of the compressed slots, shared: float32, or float16 for 16-bit states (the fused
    # decode's kernel reads them per key tile)
    table_elem = 4 if dtype == torch.float32 else 2
    rope_table = table_elem * 2 * compressed * head_dim
    assert cache.nbytes() == batch * groups * group_bytes + rope_table == cache.expected_nbytes()
    (segment,) = cache.groups[0].segments
    cos, sin = cache.layers[0].decode_parts()[1].cos, cache.layers[0].decode_parts()[1].sin
    assert cos.dtype == sin.dtype == (torch.float32 if dtype == torch.float32 else torch.float16)
    assert cos.shape == (segment.length, head_dim)
    dense = elem * batch * 4 * (prompt + new - 1) * 2 * heads * head_dim
    assert cache.nbytes() < dense / 1.5
    for layer in cache.layers:
        assert layer.keys.shape[-2] == window + new - 1  # only the exact tail is held in full
        assert layer.sink_keys.shape[-2] == sink
    assert cache.get_seq_length() == prompt + new - 1


def test_segment_that_would_not_save_memory_stays_exact():
    config = tiny_config("llama")  # group width 2 * 2 * 16 = 64
    model = tiny_model("llama")
    ids = torch.randint(3, 160, (1, 40), generator=torch.Generator().manual_seed(0))
    wasteful = XKVCache(config, group_size=2, rank_k=0.9, rank_v=0.9, window=4, sink=2, factor_bits=None,
                        matrix_bits=None)  # 58+58 of 64 in float32
    model(input_ids=ids, past_key_values=wasteful)
    assert all(not group.segments for group in wasteful.groups)
    # the same ranks in 8 bits cost a quarter per entry: they save memory, so the prompt is compressed
    eight_bit = XKVCache(config, group_size=2, rank_k=0.9, rank_v=0.9, window=4, sink=2)
    model(input_ids=ids, past_key_values=eight_bit)
    assert all(len(group.segments) == 1 for group in eight_bit.groups)
    assert eight_bit.nbytes() < wasteful.nbytes()
    dense = DynamicCache(config=config)
    model(input_ids=ids, past_key_values=dense)
    assert wasteful.nbytes() == sum(l.keys.nbytes + l.values.nbytes for l in dense.layers)
    thrifty = XKVCache(config, group_size=2, rank_k=8, rank_v=8, window=4, sink=2)
    model(input_ids=ids, past_key_values=thrifty)
    assert all(len(group.segments) == 1 for group in thrifty.groups) and thrifty.nbytes() < wasteful.nbytes()


def test_truncated_rank_degrades_gracefully():
    """Lower rank, larger error; every rank reproduces the first generated token exactly (prefill is exact)."""
    model = tiny_model("llama", seed=8)
    ids = torch.randint(3, 160, (1, 96), generator=torch.Generator().manual_seed(3))
    ref = model(input_ids=ids, past_key_values=DynamicCache(config=model.config)).logits[:, -1]
    errors = []
    for rank in (64, 16, 4):
        cache = XKVCache(model.config, group_size=2, rank_k=rank, rank_v=rank, window=0, sink=0, factor_bits=None,
                         matrix_bits=None)  # float factors: rank 64 is the whole width, so exact
        logits = model(input_ids=ids, past_key_values=cache).logits[:, -1]
        torch.testing.assert_close(logits, ref)  # the prompt's own forward attends exact states
        step = model(input_ids=ids[:, :1], past_key_values=cache).logits[:, -1]
        dense_cache = DynamicCache(config=model.config)
        model(input_ids=ids, past_key_values=dense_cache)
        dense_step = model(input_ids=ids[:, :1], past_key_values=dense_cache).logits[:, -1]
        errors.append((step - dense_step).norm().item())
    assert errors[0] < 1e-3 and errors[0] < errors[1] < errors[2]


def test_eckart_young_error_equals_discarded_singular_values():
    x = torch.randn(3, 200, 48, dtype=torch.float64)
    s = torch.linalg.svdvals(x)
    for rank in (1, 7, 30, 48):
        left, right = truncated_svd(x, rank)
        err = (x - left @ right).pow(2).sum(dim=(-2, -1))
        torch.testing.assert_close(err, s[:, rank:].pow(2).sum(-1), atol=1e-8, rtol=1e-8)
        assert left.shape == (3, 200, rank) and right.shape == (3, rank, 48)


def test_default_group_size():
    assert default_group_size(30) == 5 and default_group_size(32) == 4 and default_group_size(7) == 7
    assert XKVCache(tiny_config("llama", num_hidden_layers=6)).group_size == 3


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(rank_k=65), ValueError, ["rank_k", "1..64"]),
        (dict(rank_v=0), ValueError, ["rank_v", "int >= 1"]),
        (dict(rank_k=-3), ValueError, ["rank_k"]),
        (dict(rank_k=1.5), ValueError, ["rank_k", "(0, 1]"]),
        (dict(rank_v=0.0), ValueError, ["rank_v", "(0, 1]"]),
        (dict(rank_k="half"), TypeError, ["rank_k"]),
        (dict(group_size=3), ValueError, ["group_size=3", "[1, 2, 4]"]),
        (dict(group_size=0), ValueError, ["group_size"]),
        (dict(window=-1), ValueError, ["window", ">= 0"]),
        (dict(sink=1.5), TypeError, ["sink", "int >= 0"]),
        (dict(min_compress_tokens=0), ValueError, ["min_compress_tokens", ">= 1"]),
        (dict(pre_rope="yes"), TypeError, ["pre_rope"]),
    ],
)
def test_bad_parameters(kwargs, exc, words):
    params = dict(group_size=2)
    params.update(kwargs)
    with pytest.raises(exc) as info:
        XKVCache(tiny_config("llama"), **params)
    for word in words:
        assert word in str(info.value)


def test_unsupported_configs():
    from transformers import T5Config

    with pytest.raises(ValueError, match="decoder-only"):
        XKVCache(T5Config())
    with pytest.raises(ValueError, match="MLA"):
        XKVCache(tiny_config("deepseek_v3"))
    with pytest.raises(ValueError, match="sliding-window"):
        XKVCache(tiny_config("mistral", sliding_window=64))


def test_bad_states_raise_before_any_change_and_generation_continues():
    model = tiny_model("llama")
    cache = XKVCache(model.config, group_size=2, rank_k=16, rank_v=16, window=4, sink=2)
    ids = torch.randint(3, 160, (1, 40), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, past_key_values=cache)
    before = (cache.get_seq_length(), cache.nbytes(), [l.keys.clone() for l in cache.layers])
    good = torch.randn(1, 2, 1, 16)
    cases = [
        (good.double(), good, TypeError, "dtype"),
        (good, good.half(), TypeError, "dtype"),
        (good.to("meta"), good, ValueError, "device"),
        (torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16), ValueError, "batch size"),
        (torch.randn(1, 3, 1, 16), good, ValueError, "kv_heads=2"),
        (torch.randn(1, 2, 1, 8), good, ValueError, "head_dim=16"),
    ]
    for keys, values, exc, word in cases:
        with pytest.raises(exc, match=word):
            cache.update(keys, values, 1)
    after = (cache.get_seq_length(), cache.nbytes(), [l.keys for l in cache.layers])
    assert before[:2] == after[:2] and all(torch.equal(a, b) for a, b in zip(before[2], after[2]))
    # The cache still works after the refused updates.
    ref_cache = DynamicCache(config=model.config)
    model(input_ids=ids, past_key_values=ref_cache)
    step = model(input_ids=ids[:, :1], past_key_values=cache).logits
    assert step.shape == (1, 1, 160) and cache.get_seq_length() == 41


def test_crop_only_exact_tokens():
    model = tiny_model("llama")
    cache = XKVCache(model.config, group_size=2, rank_k=16, rank_v=16, window=4, sink=2)
    model(input_ids=torch.randint(3, 160, (1, 40)), past_key_values=cache)
    with pytest.raises(ValueError, match="compressed"):
        cache.crop(-10)
    assert cache.get_seq_length() == 40
    cache.crop(-3)
    assert cache.get_seq_length() == 37 and not cache.is_croppable


@pytest.mark.slow
def test_smollm2_needle_2k_same_answer_as_stock(smollm2):
    """Integration: the real model, defaults, a ~2k-token needle prompt: same answer as DynamicCache."""
    from kvcompress.needle import encode_chat, needle_prompt

    model, tokenizer = smollm2
    prompt = needle_prompt(tokenizer, 2048, depth=0.4, seed=3)
    inputs = encode_chat(tokenizer, prompt.messages)
    answers, sizes = [], []
    for cache in (DynamicCache(config=model.config), XKVCache(model.config)):
        with torch.no_grad():
            out = model.generate(**inputs, past_key_values=cache, max_new_tokens=24, do_sample=False)
        answers.append(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
        sizes.append(cache.nbytes() if hasattr(cache, "nbytes") else
                     sum(l.keys.nbytes + l.values.nbytes for l in cache.layers))
    assert prompt.answer in answers[0], answers[0]
    assert prompt.answer in answers[1], answers[1]
    assert sizes[0] / sizes[1] > 3.0, sizes


@pytest.mark.parametrize("shape", [(600, 128), (96, 300)], ids=["tall", "wide"])
@pytest.mark.parametrize("method", ["exact", "gram32", "randomized"])
@pytest.mark.parametrize("blocked", [False, True], ids=["one-block", "blocks"])
def test_truncated_svd_methods_reach_near_optimal_error(method, shape, blocked, monkeypatch):
    """Every route reaches the Eckart-Young optimum (randomized within 5%), with orthonormal right factors.
    ``blocks``: the input is read 64 rows (tall) or 64 columns (wide) at a time, ragged last block and a
    batch dimension included, as it is for long prompts; the batched result equals the per-row one."""
    import kvcompress.ops as ops
    from kvcompress.ops import truncated_svd

    g = torch.Generator().manual_seed(7)
    t, d = shape
    x = torch.randn(t, d, generator=g) * torch.exp(-torch.arange(d) / 16.0)
    rank = 24
    if blocked:
        monkeypatch.setattr(ops, "ROW_BLOCK_ELEMENTS", 1)  # the smallest block: 64 rows or columns
    optimum = torch.linalg.svdvals(x.double())[rank:].pow(2).sum().sqrt()
    left, right = truncated_svd(x, rank, method)
    assert left.shape == (t, rank) and right.shape == (rank, d)
    err = (x.double() - left.double() @ right.double()).norm() / optimum
    assert err < (1.0001 if method != "randomized" else 1.05), err
    # right factors have orthonormal rows in every route
    torch.testing.assert_close(right @ right.T, torch.eye(rank), atol=1e-4, rtol=0)
    if blocked and method != "randomized":
        other = torch.randn(t, d, generator=g) * torch.exp(-torch.arange(d) / 16.0)
        batch_left, batch_right = truncated_svd(torch.stack([x, other]), rank, method)
        torch.testing.assert_close(batch_left[0] @ batch_right[0], left @ right, atol=1e-5, rtol=1e-5)


def test_wide_full_rank_factorisation_is_exact_even_when_rank_deficient():
    from kvcompress.ops import truncated_svd

    g = torch.Generator().manual_seed(8)
    x = (torch.randn(40, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 90, generator=g, dtype=torch.float64))
    left, right = truncated_svd(x, 40, "exact")  # full rank of a rank-5 wide matrix
    assert torch.isfinite(left).all() and torch.isfinite(right).all()
    torch.testing.assert_close(left @ right, x, atol=1e-9, rtol=0)


def test_svd_method_is_validated_and_used(monkeypatch):
    from kvcompress import ops, xkv

    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                         intermediate_size=64, vocab_size=64)
    with pytest.raises(ValueError, match="svd_method=.qr. is out of range; allowed: one of .auto., .exact."):
        XKVCache(config, svd_method="qr")
    assert ops.resolve_svd_method("auto", "cpu") == "exact"
    assert ops.resolve_svd_method("auto", "cuda") == "gram32"
    seen = []
    real = ops.truncated_svd
    monkeypatch.setattr(xkv.compression, "truncated_svd", lambda x, r, m: seen.append(m) or real(x, r, m))
    cache = XKVCache(config, group_size=2, rank_k=4, rank_v=4, window=2, sink=1, min_compress_tokens=1,
                     svd_method="randomized")
    k = torch.randn(1, 2, 40, 8)
    for layer in range(2):
        cache.update(k, k.clone(), layer)
    assert seen == ["randomized", "randomized"]


@pytest.mark.parametrize("method", ["exact", "gram32", "randomized"])
@pytest.mark.parametrize("split", [500, 40], ids=["tall", "wide-then-tall"])
@pytest.mark.parametrize("blocked", [False, True], ids=["one-block", "row-blocks"])
def test_extend_truncated_svd_is_the_optimum_of_the_stacked_matrix(method, split, blocked, monkeypatch):
    """extend_truncated_svd(left, right, rows) == truncated_svd([left @ right; rows]) (the optimum of the
    stacked matrix), lossless at full rank, and close to a one-shot factorisation of all rows on data with
    decaying spectrum (what a streaming / chunked prefill gives up). ``row-blocks``: the long factor is
    read in blocks of 64 rows (500 = 7 * 64 + 52), as it is for long sequences."""
    import kvcompress.ops as ops
    from kvcompress.ops import extend_truncated_svd

    if blocked:
        monkeypatch.setattr(ops, "ROW_BLOCK_ELEMENTS", 1)  # the smallest block: 64 rows
        assert ops.row_blocks(500, 24) == [(a, min(a + 64, 500)) for a in range(0, 500, 64)]

    g = torch.Generator().manual_seed(11)
    d, rank = 128, 24
    x = (torch.randn(700, d, generator=g, dtype=torch.float64) * torch.exp(-torch.arange(d) / 16.0)).float()
    old, new = x[:split], x[split:]
    left, right = truncated_svd(old, rank, "exact")
    got_left, got_right = extend_truncated_svd(left, right, new, rank, method)
    assert got_left.shape == (700, rank) and got_right.shape == (rank, d)
    stacked = torch.cat([left @ right, new]).double()
    optimum = torch.linalg.svdvals(stacked)[rank:].pow(2).sum().sqrt()
    err = (stacked - got_left.double() @ got_right.double()).norm() / optimum
    assert err < 1.0001, err
    one_shot = torch.linalg.svdvals(x.double())[rank:].pow(2).sum().sqrt()
    assert 1.0 <= (x.double() - got_left.double() @ got_right.double()).norm() / one_shot < 1.05
    # full rank: nothing is lost, whatever the split
    fl, fr = truncated_svd(old, d, "exact")
    full_left, full_right = extend_truncated_svd(fl, fr, new, d, method)
    torch.testing.assert_close(full_left @ full_right, x, atol=1e-4, rtol=1e-4)


def test_chunked_prefill_merges_into_one_segment_per_group():
    """generate's chunked prefill: with merge_segments (default) every group ends with one segment spanning
    the whole compressed prompt, so the cache holds the one-shot prefill's bytes; without it, one segment
    per chunk. Greedy tokens at full rank equal stock's either way."""
    model = tiny_model("llama")
    ids, mask = left_padded_batch(lengths=(96, 80))
    kw = dict(group_size=2, window=4, sink=2, min_compress_tokens=1)
    one_shot = XKVCache(model.config, rank_k=8, rank_v=8, **kw)
    generate(model, ids, mask, one_shot)
    merged = XKVCache(model.config, rank_k=8, rank_v=8, **kw)
    generate(model, ids, mask, merged, prefill_chunk_size=32)
    split = XKVCache(model.config, rank_k=8, rank_v=8, merge_segments=False, **kw)
    generate(model, ids, mask, split, prefill_chunk_size=32)
    assert all(len(g.segments) == 1 for g in merged.groups) and all(len(g.segments) == 3 for g in split.groups)
    assert merged.nbytes() == one_shot.nbytes() == merged.expected_nbytes() < split.nbytes()
    stock = generate(model, ids, mask, DynamicCache(config=model.config))
    full = generate(model, ids, mask, XKVCache(model.config, rank_k=None, rank_v=None, factor_bits=None, matrix_bits=None, **kw), prefill_chunk_size=32)
    assert torch.equal(stock.sequences, full.sequences)


@pytest.mark.parametrize("method", ["exact", "gram32"])
def test_extend_truncated_svd_small_chunk_route_is_the_same_optimum(method):
    """r0 + c < D (a short chunk after a long segment): the factorisation is computed in the span of the
    old basis and the new rows, and is still the optimum of the stacked matrix (and lossless at full rank)."""
    from kvcompress.ops import extend_truncated_svd

    g = torch.Generator().manual_seed(5)
    d = 256
    x = (torch.randn(400, d, generator=g, dtype=torch.float64) * torch.exp(-torch.arange(d) / 24.0)).float()
    left, right = truncated_svd(x[:350], 16, "exact")
    new = x[350:]  # 50 rows: r0 + c = 66 < 256
    got_left, got_right = extend_truncated_svd(left, right, new, 16, method)
    stacked = torch.cat([left @ right, new]).double()
    optimum = torch.linalg.svdvals(stacked)[16:].pow(2).sum().sqrt()
    err = (stacked - got_left.double() @ got_right.double()).norm() / optimum
    assert got_left.shape == (400, 16) and got_right.shape == (16, d) and err < 1.0001, err
    torch.testing.assert_close(got_right @ got_right.T, torch.eye(16), atol=1e-4, rtol=0)
    # asking for more rank than the stacked matrix can have: the result is exact with rank r0 + c
    full_left, full_right = extend_truncated_svd(left, right, new, d, method)
    assert full_right.shape == (66, d)
    torch.testing.assert_close(full_left @ full_right, stacked.float(), atol=1e-4, rtol=1e-4)


def test_full_states_rebuilds_block_by_block_exactly(monkeypatch):
    """full_states writes segments into one buffer a block of tokens at a time: with blocks forced small
    (64 tokens: two per segment, a ragged last one) it equals the segment rebuilt in one piece, RoPE
    included."""
    import kvcompress.ops as ops
    from kvcompress.ops import apply_rope

    model = tiny_model("llama")
    ids, mask = left_padded_batch(lengths=(96, 80))
    cache = XKVCache(model.config, group_size=2, rank_k=8, rank_v=8, window=4, sink=2, min_compress_tokens=1)
    generate(model, ids, mask, cache)
    layer = cache.layers[0]
    (segment,) = layer.group.segments
    batch, heads = layer.keys.shape[:2]
    monkeypatch.setattr(ops, "ROW_BLOCK_ELEMENTS", 1)  # the smallest block: 64 tokens
    assert segment.length % 64 != 0 and segment.length > 64
    keys, values = layer.full_states()
    start, end = layer.sink_keys.shape[-2], layer.sink_keys.shape[-2] + segment.length
    whole = torch.matmul(segment.key_left(), layer.key_right(0)).view(batch, segment.length, heads, -1)
    cos, sin = cache._rope_table(segment.start, segment.length, whole.device)
    whole = apply_rope(whole, cos[:, None, :], sin[:, None, :]).transpose(1, 2)
    torch.testing.assert_close(keys[:, :, start:end], whole, rtol=0, atol=1e-6)
    rebuilt_values = torch.matmul(segment.value_left(), layer.value_right(0)).view(batch, segment.length, heads, -1)
    torch.testing.assert_close(values[:, :, start:end], rebuilt_values.transpose(1, 2), rtol=0, atol=1e-6)
    assert torch.equal(keys[:, :, :start], layer.sink_keys) and torch.equal(keys[:, :, end:], layer.keys)
    assert torch.equal(values[:, :, end:], layer.values)


@pytest.mark.parametrize("masked", [False, True])
def test_grouped_query_sdpa_equals_transformers_sdpa(masked):
    """grouped_query_sdpa gives transformers' SDPA attention (keys/values repeated per query head) without
    the repeat: a chunk of 5 queries over 13 keys with a causal offset and a padded row, GQA 4:2."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from kvcompress.ops import grouped_query_sdpa

    g = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, h, n, 16, generator=g) for h, n in ((4, 5), (2, 13), (2, 13)))
    mask = None
    if masked:
        mask = torch.ones(2, 1, 5, 13, dtype=torch.bool).tril(diagonal=8)
        mask[1, :, :, :3] = False  # left padding of row 1
    module = SimpleNamespace(num_key_value_groups=2, is_causal=True)
    if mask is None:  # transformers' causal square case
        query, key, value = query, key[:, :, :5], value[:, :, :5]
    ref, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    out = grouped_query_sdpa(query, key, value, mask, is_causal=mask is None, scale=0.3)
    assert out.shape == ref.shape == (2, 5, 4, 16)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        grouped_query_sdpa(torch.randn(1, 3, 2, 16), key, value)


def test_patched_chunked_prefill_never_repeats_keys_and_values(monkeypatch):
    """With patch_xkv, the multi-token calls of a chunked prefill attend without transformers' repeat_kv (a
    Hq/Hkv-fold copy of the layer's keys and values), and each group is compressed by the patch's hook
    after its last layer's attention instead of inside ``update``; the unpatched run repeats and
    compresses in ``update``; both generate the same tokens and scores from the same factors."""
    import transformers.integrations.sdpa_attention as sdpa_module

    from kvcompress.xkv import patch_xkv

    repeats = []
    original = sdpa_module.repeat_kv

    def counting(hidden, n_rep):
        if hidden.shape[-2] > 1:
            repeats.append(hidden.shape[-2])
        return original(hidden, n_rep)

    monkeypatch.setattr(sdpa_module, "repeat_kv", counting)
    model = tiny_model("llama")
    assert model.config.num_attention_heads > model.config.num_key_value_heads
    ids, mask = left_padded_batch(lengths=(96, 80))
    kw = dict(group_size=2, rank_k=8, rank_v=8, window=4, sink=2, min_compress_tokens=1)
    runs = []
    for patched in (False, True):
        repeats.clear()
        handle = patch_xkv(model) if patched else None
        cache = XKVCache(model.config, **kw)
        compressions = []
        original_compress = cache.compress

        def recording(layer_idx, compressions=compressions, original=original_compress):
            # who asked: the layer's update (unpatched) or the patch's forward wrapper after the attention
            compressions.append(sys._getframe(1).f_code.co_name)
            original(layer_idx)

        cache.compress = recording
        try:
            runs.append((generate(model, ids, mask, cache, prefill_chunk_size=32), len(repeats), cache,
                         compressions))
        finally:
            if handle is not None:
                handle.remove()
    (ref, ref_repeats, ref_cache, ref_calls), (out, out_repeats, out_cache, out_calls) = runs
    assert ref_repeats > 0 and out_repeats == 0
    assert_same_generation(ref, out)
    assert len(ref_calls) == len(out_calls) == 3 * len(out_cache.groups)  # 96 + 80 tokens: 3 chunks of 32
    assert set(ref_calls) == {"update"} and set(out_calls) == {"_attention_forward"}
    assert all(layer.context is None for layer in out_cache.layers)
    for a, b in zip(ref_cache.groups, out_cache.groups):
        assert len(a.segments) == len(b.segments) == 1
        assert torch.equal(a.segments[0].key_factor, b.segments[0].key_factor)
    assert ref_cache.nbytes() == out_cache.nbytes()


def test_patched_prefill_that_fails_leaves_no_pending_compression(monkeypatch):
    """A multi-token forward that fails after the cache update (here: in the attention) leaves its tokens
    exact and no compression pending; the next generation on the same cache compresses and matches a
    fresh unpatched run's tokens."""
    import kvcompress.xkv.attention as xkv_module
    from kvcompress.xkv import patch_xkv

    model = tiny_model("llama")
    ids, mask = left_padded_batch(lengths=(96, 80))
    kw = dict(group_size=2, rank_k=None, rank_v=None, factor_bits=None, matrix_bits=None, window=4, sink=2, min_compress_tokens=1)
    original = xkv_module.grouped_query_sdpa

    calls = []

    def failing(*args, **kwargs):  # the second attention: layer 1, the last of group 0, after its update
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated)")
        return original(*args, **kwargs)

    with patch_xkv(model):
        cache = XKVCache(model.config, **kw)
        monkeypatch.setattr(xkv_module, "grouped_query_sdpa", failing)
        with pytest.raises(RuntimeError, match="simulated"):
            generate(model, ids, mask, cache)
        assert len(calls) == 2 and cache.layers[1].get_seq_length() == ids.shape[1]  # updated, then failed
        assert all(layer.context is None for layer in cache.layers)
        assert all(not group.segments for group in cache.groups)
        monkeypatch.setattr(xkv_module, "grouped_query_sdpa", original)
        cache.reset()
        out = generate(model, ids, mask, cache)
        assert all(len(group.segments) == 1 for group in cache.groups)
    ref = generate(model, ids, mask, DynamicCache(config=model.config))
    assert torch.equal(ref.sequences, out.sequences)
