"""XKVCache against DynamicCache where the two must agree: crop's arguments and results, the memory held
(reserved_nbytes) next to the reported saving, rank-deficient prompts, and the model types patch_xkv
accepts."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import DynamicCache, LlamaConfig

from conftest import tiny_config, tiny_model
from kvcompress import XKVCache
from kvcompress.ops import tensor_nbytes
from kvcompress.patch import GENERATE_CACHE_KWARG
from kvcompress.xkv import patch_xkv

KW = dict(group_size=2, rank_k=None, rank_v=None, factor_bits=None, matrix_bits=None, window=4, sink=2, min_compress_tokens=1)


def smollm2_shaped_config() -> LlamaConfig:
    """SmolLM2-135M's attention shapes (30 layers, 3 KV heads of 64) with a tiny vocabulary and MLP."""
    return LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                       num_hidden_layers=30, intermediate_size=64, vocab_size=64)


def fill(cache, config, tokens: int, decode: int = 0, seed: int = 0):
    """Run ``cache.update`` for every layer in order as a forward would: one ``tokens``-token prefill, then
    ``decode`` one-token steps (random states: the bytes do not depend on the values)."""
    g = torch.Generator().manual_seed(seed)
    heads, dim = config.num_key_value_heads, config.head_dim
    for new in [tokens] + [1] * decode:
        for layer in range(config.num_hidden_layers):
            cache.update(torch.randn(1, heads, new, dim, generator=g), torch.randn(1, heads, new, dim, generator=g),
                         layer)


def dynamic_nbytes(cache: DynamicCache) -> int:
    return sum(tensor_nbytes(layer.keys, layer.values) for layer in cache.layers)


@pytest.mark.parametrize("tokens", [300, 4096])
def test_reserved_bytes_below_dynamic_cache_with_defaults(tokens):
    """Default parameters on a SmolLM2-shaped config: the memory an XKVCache holds (reserved_nbytes: every
    allocated byte) is below DynamicCache's after the prompt and after decoding, so the reported saving
    (nbytes) is not undone by spare capacity."""
    config = smollm2_shaped_config()
    for decode in (0, 8):
        xkv, stock = XKVCache(config), DynamicCache(config=config)
        fill(xkv, config, tokens, decode)
        fill(stock, config, tokens, decode)
        assert xkv.get_seq_length() == stock.get_seq_length() == tokens + decode
        assert xkv.nbytes() <= xkv.reserved_nbytes() < dynamic_nbytes(stock), (decode, xkv.reserved_nbytes())


def test_short_prompt_tail_is_proportional():
    """A prompt too short to compress: the tail's first allocation is proportional to it, not a fixed
    granule that dwarfs it."""
    config = smollm2_shaped_config()
    xkv, stock = XKVCache(config), DynamicCache(config=config)
    fill(xkv, config, 20)
    fill(stock, config, 20)
    assert not any(group.segments for group in xkv.groups)
    assert xkv.nbytes() == dynamic_nbytes(stock) and xkv.reserved_nbytes() <= 2 * dynamic_nbytes(stock)


def crop_outcome(cache, n):
    try:
        cache.crop(n)
    except Exception as error:  # noqa: BLE001 - the type is what is compared
        return type(error)
    return cache.get_seq_length()


@pytest.mark.parametrize("n", [0, -3, -20, -21, -1000, 5, 30])
def test_crop_of_an_exact_cache_equals_dynamic_cache(n):
    """Nothing compressed yet: crop gives DynamicCache's length or its error type for every argument."""
    model = tiny_model("llama")
    ids = torch.randint(3, 160, (1, 20), generator=torch.Generator().manual_seed(0))
    stock, xkv = DynamicCache(config=model.config), XKVCache(model.config, group_size=2, min_compress_tokens=64)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=stock)
        model(input_ids=ids, past_key_values=xkv)
    assert crop_outcome(xkv, n) == crop_outcome(stock, n)
    if xkv.get_seq_length() == stock.get_seq_length() and stock.get_seq_length() > 0:  # continues like stock
        with torch.no_grad():
            a = model(input_ids=ids[:, :1], past_key_values=stock).logits
            b = model(input_ids=ids[:, :1], past_key_values=xkv).logits
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_crop_into_compressed_tokens_names_why():
    model = tiny_model("llama")
    ids = torch.randint(3, 160, (1, 40), generator=torch.Generator().manual_seed(0))
    xkv, stock = XKVCache(model.config, group_size=2, window=4, sink=2, min_compress_tokens=1), DynamicCache()
    with torch.no_grad():
        model(input_ids=ids, past_key_values=xkv)
        model(input_ids=ids, past_key_values=stock)
    for n in (-10, -1000):
        with pytest.raises(ValueError, match="compressed"):
            xkv.crop(n)
        assert xkv.get_seq_length() == 40
    assert crop_outcome(xkv, 3) == crop_outcome(stock, 3)  # the stock rule for a positive argument
    xkv.crop(-4)
    assert xkv.get_seq_length() == 36


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_patch_xkv_refuses_unsupported_model_types(family):
    model = tiny_model(family)
    implementation = model.config._attn_implementation
    with pytest.raises(ValueError, match=rf"model_type='{family}'.*\['llama', 'qwen2', 'mistral'\]"):
        patch_xkv(model)
    assert model.config._attn_implementation == implementation


@pytest.mark.parametrize("patched", [False, True])
def test_repeated_token_prompt_full_rank_matches_dynamic_cache(patched):
    """One token repeated (the group's keys and values nearly rank-deficient): finite logits and
    DynamicCache's greedy tokens at full rank, growable and static, unpatched and patched."""
    model = tiny_model("llama")
    ids = torch.full((1, 48), 37)
    kw = dict(group_size=2, rank_k=None, rank_v=None, factor_bits=None, matrix_bits=None, window=4, sink=2, min_compress_tokens=1)

    def greedy(cache):
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                                  max_new_tokens=6, do_sample=False, output_scores=True,
                                  return_dict_in_generate=True, pad_token_id=0)

    stock = greedy(DynamicCache(config=model.config))
    growable, static = XKVCache(model.config, **kw), XKVCache(model.config, max_cache_len=64, **kw)
    with patch_xkv(model) if patched else contextlib.nullcontext():
        outs = [greedy(growable), greedy(static)]
    for out in outs:
        assert all(torch.isfinite(s).all() for s in out.scores)
        assert torch.equal(out.sequences, stock.sequences)
    assert growable.nbytes() == growable.expected_nbytes()


def test_exactly_rank_deficient_segment_keeps_only_nonzero_components():
    """States of one repeated row (rank 1): a growable cache keeps one component per factor (nbytes says so
    and equals the formula) and rebuilds the states; a static cache keeps the rank's shapes (zeros
    included) and rebuilds the same states."""
    config = tiny_config("llama")
    heads, dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    row_k, row_v = torch.randn(1, heads, 1, dim), torch.randn(1, heads, 1, dim)
    keys, values = row_k.expand(1, heads, 40, dim).contiguous(), row_v.expand(1, heads, 40, dim).contiguous()
    kw = dict(group_size=2, rank_k=None, rank_v=None, factor_bits=None, matrix_bits=None, window=4, sink=2, min_compress_tokens=1, pre_rope=False)
    growable, static = XKVCache(config, **kw), XKVCache(config, max_cache_len=48, **kw)
    for cache in (growable, static):
        for layer in range(config.num_hidden_layers):
            cache.update(keys, values, layer)
    for group in growable.groups:
        assert group.segments[0].key_factor.shape[-1] == group.segments[0].value_factor.shape[-1] == 1
    assert all(g.segments[0].key_factor.shape[-1] == g.segments[0].length for g in static.groups)  # 34 < width
    assert growable.nbytes() == growable.expected_nbytes() < static.nbytes() == static.expected_nbytes()
    for cache in (growable, static):
        rebuilt_k, rebuilt_v = cache.layers[1].full_states()
        torch.testing.assert_close(rebuilt_k[:, :, :40], keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rebuilt_v[:, :, :40], values, atol=1e-5, rtol=1e-5)


# -- a cache built for another number of layers, without the patch ------------------------------------------
def generate_with(model, cache, ids, new_tokens: int = 3):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **{GENERATE_CACHE_KWARG: cache},
                              max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


def held_tokens(cache) -> list[int]:
    return [int(layer.get_seq_length()) if layer.is_initialized else 0 for layer in cache.layers]


@pytest.mark.parametrize("max_cache_len", [None, 64])
def test_unpatched_cache_for_fewer_layers_names_both_counts_and_refuses(max_cache_len):
    """A 4-layer XKVCache in an unpatched 8-layer model's generate: the update of layer 4 raises a ValueError
    naming the cache's 4 layers and the model's (at least 5) before anything is written for it, and the
    cache then refuses further use (layers 0-3 hold the prompt, one forward ahead of any other layer)
    instead of continuing from misaligned layers; reset() clears the refusal."""
    model = tiny_model("llama", num_hidden_layers=8)
    cache = XKVCache(tiny_config("llama"), max_cache_len=max_cache_len, **KW)
    ids = torch.randint(3, 160, (1, 30), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"built for 4 layers but the model has at least 5 layers"):
        generate_with(model, cache, ids)
    assert held_tokens(cache) == [30] * 4
    with pytest.raises(RuntimeError, match="reset"):
        generate_with(model, cache, ids)
    assert held_tokens(cache) == [30] * 4
    cache.reset()
    with pytest.raises(ValueError, match=r"built for 4 layers but the model has at least 5 layers"):
        generate_with(model, cache, ids)


@pytest.mark.parametrize("max_cache_len", [None, 64])
def test_unpatched_cache_for_more_layers_is_refused_before_the_next_forward_writes(max_cache_len):
    """A 12-layer XKVCache in an unpatched 8-layer model: the prefill fills layers 0-7 (what a single
    forward computes is right: each layer attends over its own tokens); the first layer of the next forward
    refuses, naming both layer counts, before it writes anything."""
    model = tiny_model("llama", num_hidden_layers=8)
    cache = XKVCache(tiny_config("llama", num_hidden_layers=12), max_cache_len=max_cache_len, **KW)
    ids = torch.randint(3, 160, (1, 30), generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match=r"model has 8 layers where this cache was built for 12 layers"):
        generate_with(model, cache, ids)
    assert held_tokens(cache) == [30] * 8 + [0] * 4
