"""xKV's accuracy levers: exact outlier tokens, a memory ratio target, ranks split by the spectra."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from conftest import tiny_model
from kvcompress import XKVCache
from kvcompress.ops import cache_nbytes
from kvcompress.xkv import patch_xkv
from kvcompress.xkv.compression import select_outliers, split_rank_by_spectrum
from test_xkv import assert_same_generation, generate, left_padded_batch

SMALL = dict(group_size=2, window=4, sink=2, min_compress_tokens=1)


def prefill_and_step(model, cache, ids, mask=None):
    """Logits of one decode step after a prefill of ``ids[:, :-1]`` into ``cache``."""
    with torch.no_grad():
        kwargs = {} if mask is None else {"attention_mask": mask[:, :-1]}
        model(ids[:, :-1], past_key_values=cache, **kwargs)
        kwargs = {} if mask is None else {"attention_mask": mask}
        return model(ids[:, -1:], past_key_values=cache, **kwargs).logits[:, -1]


def stock_states(model, ids):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    return cache


@pytest.mark.parametrize("merge", [True, False])
def test_full_rank_with_outliers_matches_dynamic_cache(merge):
    """Outliers are exact copies: at full rank they change nothing (left padding and a second turn too)."""
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    ref = generate(model, ids, mask, DynamicCache(config=model.config))
    cache = XKVCache(model.config, rank_k=None, rank_v=None, factor_bits=None, matrix_bits=None, outliers=0.25,
                     merge_segments=merge, **SMALL)
    out = generate(model, ids, mask, cache)
    assert_same_generation(ref, out)
    assert any(s.num_outliers for g in cache.groups for s in g.segments)
    assert cache.nbytes() == cache.expected_nbytes()


def test_outlier_tokens_are_rebuilt_exactly_and_the_worst_are_chosen():
    """At a low rank, the rebuilt states of the chosen tokens equal the stock cache's exactly, and the chosen
    tokens are the ones whose rebuilt keys/values were worst without outliers."""
    model = tiny_model("llama")
    ids = torch.randint(3, 160, (2, 120), generator=torch.Generator().manual_seed(3))
    stock = stock_states(model, ids)
    plain = XKVCache(model.config, rank_k=3, rank_v=3, **SMALL)
    with_outliers = XKVCache(model.config, rank_k=3, rank_v=3, outliers=0.1, **SMALL)
    with torch.no_grad():
        model(ids, past_key_values=plain)
        model(ids, past_key_values=with_outliers)
    segment = with_outliers.groups[0].segments[0]
    assert segment.num_outliers == round(0.1 * segment.length)
    start = segment.start
    errors = []
    for layer_idx in with_outliers.groups[0].layer_indices:
        keys, values = with_outliers.layers[layer_idx].full_states()
        stock_k, stock_v = stock.layers[layer_idx].keys, stock.layers[layer_idx].values
        for row in range(ids.shape[0]):
            slots = segment.outlier_index[row] + start
            torch.testing.assert_close(keys[row][:, slots], stock_k[row][:, slots], rtol=0, atol=0)
            torch.testing.assert_close(values[row][:, slots], stock_v[row][:, slots], rtol=0, atol=0)
        pk, pv = plain.layers[layer_idx].full_states()
        seg = slice(start, start + segment.length)
        k_scale = stock_k[:, :, seg].square().sum((1, 3)).mean(-1, keepdim=True)
        v_scale = stock_v[:, :, seg].square().sum((1, 3)).mean(-1, keepdim=True)
        errors.append((pk[:, :, seg] - stock_k[:, :, seg]).square().sum((1, 3)) / k_scale
                      + (pv[:, :, seg] - stock_v[:, :, seg]).square().sum((1, 3)) / v_scale)
    error = sum(errors)  # [B, T] over the group, as select_outliers scores (rotation keeps key norms)
    for row in range(ids.shape[0]):
        expected = error[row].topk(segment.num_outliers).indices.sort().values
        assert torch.equal(segment.outlier_index[row], expected)
    # and the whole cache gets closer to the stock one
    ref = prefill_and_step(model, DynamicCache(config=model.config), ids)
    err_plain = (prefill_and_step(model, XKVCache(model.config, rank_k=3, rank_v=3, **SMALL), ids) - ref).abs().max()
    err_out = (prefill_and_step(model, XKVCache(model.config, rank_k=3, rank_v=3, outliers=0.3, **SMALL), ids)
               - ref).abs().max()
    assert err_out < err_plain


def test_select_outliers_finds_a_planted_rare_token():
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(4, 64, generator=g)
    x = torch.randn(1, 200, 4, generator=g) @ basis  # rank 4
    x[0, 137] += 5 * torch.randn(64, generator=g)  # a direction nothing else has
    from kvcompress.ops import truncated_svd
    left, _ = truncated_svd(x, 4, "exact")
    assert select_outliers(x, left, x.clone(), left.clone(), 1).tolist() == [[137]]


@pytest.mark.parametrize("static", [False, True], ids=["growable", "static"])
def test_fused_decode_with_outliers_equals_rebuilt_states(static):
    """The patched decode (outliers as their own exact parts, their factored rows masked) gives the
    unpatched cache's logits (rebuilt states with the exact rows written back), with left padding."""
    model = tiny_model("llama")
    ids, mask = left_padded_batch(lengths=(60, 47))
    params = dict(rank_k=3, rank_v=4, outliers=0.2, max_cache_len=80 if static else None, **SMALL)
    ref = prefill_and_step(model, XKVCache(model.config, **params), ids, mask)
    handle = patch_xkv(model)
    try:
        cache = XKVCache(model.config, **params)
        out = prefill_and_step(model, cache, ids, mask)
    finally:
        handle.remove()
    assert cache.layers[0].outlier_tokens() > 0
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


def test_outliers_survive_batch_operations():
    """Selecting a row keeps that row's own outliers: its next logits equal a run of that row alone."""
    model = tiny_model("llama")
    ids = torch.randint(3, 160, (3, 90), generator=torch.Generator().manual_seed(5))
    params = dict(rank_k=3, rank_v=3, outliers=0.1, **SMALL)
    alone = prefill_and_step(model, XKVCache(model.config, **params), ids[1:2])
    cache = XKVCache(model.config, **params)
    with torch.no_grad():
        model(ids[:, :-1], past_key_values=cache)
        cache.batch_select_indices(torch.tensor([1]))
        out = model(ids[1:2, -1:], past_key_values=cache).logits[:, -1]
    torch.testing.assert_close(out, alone, atol=1e-5, rtol=1e-5)
    assert cache.nbytes() == cache.expected_nbytes()


FLOAT = dict(factor_bits=None, matrix_bits=None)


@pytest.mark.parametrize("ratio", [3.0, 5.0])
@pytest.mark.parametrize("allocation", ["fixed", "spectrum"])
@pytest.mark.parametrize("outliers, bits", [(0.0, FLOAT), (0.02, FLOAT), (0.0, dict(factor_bits=8, matrix_bits=None)),
                                            (0.02, dict(factor_bits=8, matrix_bits=8))])
def test_ratio_reaches_the_target_on_the_measured_bytes(ratio, allocation, outliers, bits):
    """ratio= takes the largest ranks whose measured bytes (nbytes: everything held, RoPE tables, outlier slots
    and masks included) stay within the target, and not much smaller ones. (A tiny head_dim makes the RoPE
    table a large share of the bytes: 8 layers, a 16-token window, 800 tokens leave the factors room.)"""
    model = tiny_model("llama", num_hidden_layers=8)
    ids = torch.randint(3, 160, (2, 800), generator=torch.Generator().manual_seed(2))
    stock = cache_nbytes(stock_states(model, ids[:, :-1]))
    cache = XKVCache(model.config, group_size=2, window=16, ratio=ratio, min_rank=1, rank_allocation=allocation,
                     outliers=outliers, **bits)
    prefill_and_step(model, cache, ids)  # the decode step adds one exact token: measure after the prefill
    cache.crop(-1)
    achieved = stock / cache.nbytes()
    assert cache.nbytes() == cache.expected_nbytes()
    assert ratio <= achieved < ratio * 1.25, achieved
    for group in cache.groups:
        (segment,) = group.segments
        if allocation == "fixed":  # the default rank_k:rank_v = 2:3
            assert abs(segment.key_factor.shape[-1] / segment.value_factor.shape[-1] - 2 / 3) < 0.2


def test_ratio_on_a_short_prompt_stops_at_min_rank():
    """A prompt too short for the ratio: the ranks stop at min_rank instead of falling to 1 + 1, and the cache
    then holds more than 1/ratio; min_rank=1 gives the ratio's own ranks back."""
    model = tiny_model("llama", num_hidden_layers=8)
    ids = torch.randint(3, 160, (1, 200), generator=torch.Generator().manual_seed(3))
    stock = cache_nbytes(stock_states(model, ids[:, :-1]))
    floored = XKVCache(model.config, group_size=2, window=16, ratio=12.0, min_rank=8, **FLOAT)
    free = XKVCache(model.config, group_size=2, window=16, ratio=12.0, min_rank=1, **FLOAT)
    for cache in (floored, free):
        prefill_and_step(model, cache, ids)
        cache.crop(-1)
        assert cache.nbytes() == cache.expected_nbytes()
    low = [(s.key_factor.shape[-1], s.value_factor.shape[-1]) for g in free.groups for s in g.segments]
    assert low and all(k + v < 16 for k, v in low), low  # the ratio alone asks for less than the floor
    for group in floored.groups:
        (segment,) = group.segments
        assert min(segment.key_factor.shape[-1], segment.value_factor.shape[-1]) == 8
    assert stock / floored.nbytes() < stock / free.nbytes()  # the floor holds more (neither reaches 12x here)


def test_min_rank_keeps_tokens_exact_when_factors_would_not_save_memory():
    model = tiny_model("llama", num_hidden_layers=8)
    ids = torch.randint(3, 160, (1, 120), generator=torch.Generator().manual_seed(5))
    width = 2 * model.config.num_key_value_heads * (model.config.hidden_size // model.config.num_attention_heads)
    cache = XKVCache(model.config, group_size=2, window=16, ratio=12.0, min_rank=width, **FLOAT)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    assert all(not g.segments for g in cache.groups)  # full-width factors of 100 tokens cost more than them
    layer = cache.layers[0]  # the sinks and the exact tail: every token, as the stock cache holds it
    torch.testing.assert_close(torch.cat([layer.sink_keys, layer.keys], -2), stock_states(model, ids).layers[0].keys)


def test_ratio_with_chunked_prefill_merges_and_keeps_the_target():
    model = tiny_model("llama", num_hidden_layers=8)
    ids = torch.randint(3, 160, (1, 700), generator=torch.Generator().manual_seed(4))
    cache = XKVCache(model.config, group_size=2, window=16, ratio=4.0, min_rank=1, outliers=0.02)
    with torch.no_grad():
        for a in range(0, 700, 175):
            model(ids[:, a:a + 175], past_key_values=cache)
    assert all(len(g.segments) == 1 for g in cache.groups)
    stock = cache_nbytes(stock_states(model, ids))
    assert cache.nbytes() == cache.expected_nbytes()
    assert stock / cache.nbytes() >= 4.0


def test_spectrum_split_follows_the_singular_values():
    """Keys of rank 2 and values of high rank: the split gives the values almost everything."""
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 300, 2, generator=g) @ torch.randn(2, 40, generator=g)
    values = torch.randn(1, 300, 40, generator=g)
    from kvcompress.ops import truncated_svd
    kl, _ = truncated_svd(keys, 19, "exact")
    vl, _ = truncated_svd(values, 19, "exact")
    rk, rv = split_rank_by_spectrum(kl, keys.square().sum(), vl, values.square().sum(), 20)
    assert (rk, rv) == (2, 18)


def test_full_rank_spectrum_allocation_is_exact():
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    ref = generate(model, ids, mask, DynamicCache(config=model.config))
    out = generate(model, ids, mask, XKVCache(model.config, rank_k=None, rank_v=None, factor_bits=None,
                                              matrix_bits=None, rank_allocation="spectrum",
                                              outliers=0.1, **SMALL))
    assert_same_generation(ref, out)


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(outliers=0.6), ValueError, ["outliers", "[0, 0.5]"]),
    (dict(outliers="some"), TypeError, ["outliers"]),
    (dict(ratio=1.0), ValueError, ["ratio", "> 1"]),
    (dict(ratio=float("nan")), ValueError, ["ratio"]),
    (dict(min_rank=0), ValueError, ["min_rank"]),
    (dict(min_rank=1.5), ValueError, ["min_rank"]),
    (dict(rank_allocation="energy"), ValueError, ["rank_allocation", "'fixed'", "'spectrum'"]),
    (dict(factor_bits=4), ValueError, ["factor_bits", "8"]),
    (dict(matrix_bits=16), ValueError, ["matrix_bits", "8"]),
])
def test_bad_lever_parameters(kwargs, exc, words):
    with pytest.raises(exc) as info:
        XKVCache(tiny_model("llama").config, **kwargs)
    for word in words:
        assert word in str(info.value)


def test_quantize_rows_error_is_within_half_a_step():
    from kvcompress.xkv.compression import quantize_rows
    x = torch.randn(2, 50, 17, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 3, 50)[:, None]
    x[0, 3] = 0  # an all-zero row stays zero
    q, scale = quantize_rows(x)
    assert q.dtype == torch.int8 and scale.shape == (2, 50, 1)
    err = (q.float() * scale - x).abs()
    assert bool((err <= scale / 2 * (1 + 1e-6)).all())
    assert bool((q[0, 3] == 0).all())


def test_quantize_factor_error_is_within_half_a_step_and_beats_row_scales():
    """Each entry is within half its step (row scale x component range); on a factor whose columns fall as
    singular values do, the component ranges cut the error of row scales alone (1.6x here, ~8x on
    SmolLM2's key factors)."""
    from kvcompress.xkv.compression import quantize_factor, quantize_rows
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 300, 40, generator=g) * torch.logspace(0, -3, 40)  # decaying components
    x[0, 5] = 0
    x[1, :, 7] = 0  # an all-zero row and column stay zero
    q, scale, channel = quantize_factor(x)
    assert q.dtype == torch.int8 and scale.shape == (2, 300, 1) and channel.shape == (2, 1, 40)
    rebuilt = q.float() * scale * channel
    assert bool(((rebuilt - x).abs() <= scale * channel / 2 * (1 + 1e-5) + 1e-12).all())
    assert bool((rebuilt[0, 5] == 0).all()) and bool((rebuilt[1, :, 7] == 0).all())
    qr, sr = quantize_rows(x)
    assert (rebuilt - x).norm() * 1.5 < (qr.float() * sr - x).norm()


def test_quantize_columns_error_is_within_half_a_step():
    from kvcompress.xkv.compression import dequantize_columns, quantize_columns
    x = torch.randn(3, 20, 64, generator=torch.Generator().manual_seed(1)) * torch.logspace(-2, 2, 64)
    x[1, :, 3] = 0
    q, scale = quantize_columns(x)
    assert q.dtype == torch.int8 and scale.shape == (3, 1, 64)
    rebuilt = dequantize_columns(q, scale, torch.float32)
    assert bool(((rebuilt - x).abs() <= scale / 2 * (1 + 1e-5)).all())
    assert bool((rebuilt[1, :, 3] == 0).all())
    assert dequantize_columns(x, None, torch.float32) is x


@pytest.mark.parametrize("static", [False, True], ids=["growable", "static"])
@pytest.mark.parametrize("merge", [True, False])
@pytest.mark.parametrize("matrix_bits", [None, 8])
def test_int8_factors_bytes_formula_and_paths_agree(static, merge, matrix_bits):
    """factor_bits=8: the factors are int8 (bytes measured = formula), the fused decode equals the rebuilt
    states, a chunked prefill merges through the dequantised factors, and the error is far below a rank
    cut of the same bytes."""
    model = tiny_model("llama", num_hidden_layers=8)
    ids = torch.randint(3, 160, (2, 400), generator=torch.Generator().manual_seed(1))
    params = dict(group_size=2, window=16, ratio=4.0, min_rank=1, factor_bits=8, matrix_bits=matrix_bits, outliers=0.02,
                  merge_segments=merge, max_cache_len=420 if static else None)

    def run(patched, **overrides):
        handle = patch_xkv(model) if patched else None
        try:
            cache = XKVCache(model.config, **dict(params, **overrides))
            with torch.no_grad():
                for a in (0, 200):
                    model(ids[:, a:a + 200 - (a == 200)], past_key_values=cache)
                logits = model(ids[:, -1:], past_key_values=cache).logits[:, -1]
            return cache, logits
        finally:
            if handle is not None:
                handle.remove()

    cache, rebuilt = run(False)
    _, fused = run(True)
    torch.testing.assert_close(fused, rebuilt, atol=2e-5, rtol=1e-5)
    segments = cache.groups[0].segments
    assert len(segments) == (1 if merge else 2)
    assert all(s.key_factor.dtype == torch.int8 and s.value_factor.dtype == torch.int8 for s in segments)
    layer = cache.layers[0]
    assert all(r.dtype == (torch.int8 if matrix_bits else torch.float32) for r in layer.key_rights + layer.value_rights)
    assert cache.nbytes() == cache.expected_nbytes()
    ref = prefill_and_step(model, DynamicCache(config=model.config), ids)
    _, plain = run(False, factor_bits=None, matrix_bits=None)  # the same bytes in rank of float factors
    assert (rebuilt - ref).abs().max() < (plain - ref).abs().max()


def test_int8_factors_at_full_rank_stay_close():
    """Full rank with 8-bit factors is not lossless (the quantisation is the only error): logits within a
    small tolerance of DynamicCache, greedy tokens the same."""
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    ref = generate(model, ids, mask, DynamicCache(config=model.config))
    for bits in (dict(factor_bits=8, matrix_bits=None), dict(factor_bits=8, matrix_bits=8),
                 dict(factor_bits=None, matrix_bits=8)):
        out = generate(model, ids, mask, XKVCache(model.config, rank_k=None, rank_v=None, **bits, **SMALL))
        assert torch.equal(ref.sequences, out.sequences), bits
        for a, b in zip(ref.scores, out.scores):
            torch.testing.assert_close(a, b, atol=5e-3, rtol=1e-3)


def test_int8_matrices_survive_batch_operations():
    """Beam-style reorders and selections map the matrices' column scales with them: the reordered cache
    gives the reordered logits."""
    model = tiny_model("llama")
    ids = torch.randint(3, 160, (3, 90), generator=torch.Generator().manual_seed(5))
    cache = XKVCache(model.config, ratio=3.0, min_rank=1, factor_bits=8, matrix_bits=8, **SMALL)
    with torch.no_grad():
        model(ids[:, :-1], past_key_values=cache)
        order = torch.tensor([2, 0, 1])
        cache.reorder_cache(order)
        out = model(ids[order, -1:], past_key_values=cache).logits[:, -1]
    fresh = XKVCache(model.config, ratio=3.0, min_rank=1, factor_bits=8, matrix_bits=8, **SMALL)
    with torch.no_grad():
        model(ids[order, :-1], past_key_values=fresh)
        ref = model(ids[order, -1:], past_key_values=fresh).logits[:, -1]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert cache.nbytes() == cache.expected_nbytes()

