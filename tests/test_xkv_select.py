"""Selective reconstruction at decode (``XKVCache(select_budget=..., select_chunk=...)``): the full budget is
today's decode bit for bit, a smaller one equals masked attention over the same selected tokens (both scorers,
``select_score``), token scores are each chunk's best token with the centre rotation, a left-padded row
selects as the row alone, the selection finds a planted high-scoring key, landmarks are counted in the bytes,
and the static cache compiles with it."""

from __future__ import annotations

import contextlib

import pytest
import torch

from conftest import tiny_config, tiny_model
from test_mla_compile import check_compiled_steps, greedy, prompts
from test_kernels_xkv import GPU_SHAPES, HAVE_TRITON, TESTS, run_interpreted
from test_xkv_compile import SMALL
from kvcompress.bench.spec import parse_method_specs
from kvcompress.kernels import xkv_decode
from kvcompress.kernels.xkv_decode import FactoredPart, SelectedPart, xkv_decode_attention
from kvcompress.kernels.xkv_select import landmark_scores, select_chunks, select_chunks_by_tokens, token_scores
from kvcompress.ops import apply_rope, rope_cos_sin
from kvcompress.xkv import XKVCache, patch_xkv
from kvcompress.xkv.compression import chunk_landmarks, chunk_means


def make_model(family: str = "llama"):
    model = tiny_model(family)
    model.config._attn_implementation = "sdpa"
    return model


def decode_logits(model, cache, ids, mask, steps: int = 3) -> list[torch.Tensor]:
    """Prefill then ``steps`` one-token steps (fixed tokens), the logits of each step."""
    out = []
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=True, past_key_values=cache)
        token = torch.full((ids.shape[0], 1), 7, dtype=torch.long)
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out.append(model(input_ids=token, attention_mask=mask, use_cache=True, past_key_values=cache).logits)
    return out


# -- parameters ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,exc", [
    (dict(select_budget=0), ValueError), (dict(select_budget=-4), ValueError), (dict(select_budget=1.5), ValueError),
    (dict(select_budget=0.0), ValueError), (dict(select_budget="half"), ValueError), (dict(select_budget=True), TypeError),
    (dict(select_chunk=0), ValueError), (dict(select_chunk=2.0), TypeError), (dict(select_chunk=None), TypeError),
])
def test_bad_select_parameters_name_the_parameter_and_the_allowed_values(kwargs, exc):
    name = next(iter(kwargs))
    with pytest.raises(exc, match=name) as error:
        XKVCache(tiny_config("llama"), **kwargs)
    assert "allowed" in str(error.value)


def test_method_specs_take_the_select_parameters():
    spec = parse_method_specs("xkv:select_budget=0.1:select_chunk=16")[0]
    assert spec.params == dict(select_budget=0.1, select_chunk=16)
    assert parse_method_specs("xkv:select_budget=256")[0].params == dict(select_budget=256)
    assert parse_method_specs("xkv:select_budget=all")[0].params == dict(select_budget="all")
    with pytest.raises(ValueError, match="select_budget"):
        parse_method_specs("xkv:select_budget=2.5")


def test_selected_chunks_follows_the_budget():
    cache = XKVCache(tiny_config("llama"), select_budget=0.1, select_chunk=16)
    assert cache.selects and cache.selected_chunks(1000) == 7  # ceil(100 / 16)
    assert cache.selected_chunks(10) == 1  # at least one chunk
    tokens = XKVCache(tiny_config("llama"), select_budget=40, select_chunk=16)
    assert tokens.selected_chunks(1000) == 3 and tokens.selected_chunks(33) == 3  # every chunk: no selection
    for budget in (None, "all"):
        assert not XKVCache(tiny_config("llama"), select_budget=budget).selects


# -- landmarks ----------------------------------------------------------------------------------------
def test_chunk_means_with_an_uneven_last_chunk():
    x = torch.randn(2, 21, 5, dtype=torch.float64)
    means = chunk_means(x, 8, dim=1)
    assert means.shape == (2, 3, 5)
    for c, (a, b) in enumerate(((0, 8), (8, 16), (16, 21))):
        torch.testing.assert_close(means[:, c], x[:, a:b].mean(1))


def test_landmark_is_the_chunk_mean_key_without_rope():
    """Keys stored rotated: the landmark key ``Abar_c B`` is exactly the mean of the chunk's rebuilt keys."""
    g = torch.Generator().manual_seed(0)
    batch, tokens, rank, heads, dim, chunk = 2, 37, 6, 2, 8, 8
    kf = torch.randn(batch, tokens, rank, generator=g, dtype=torch.float64)
    kr = torch.randn(batch, rank, heads * dim, generator=g, dtype=torch.float64)
    landmarks = chunk_means(kf, chunk, dim=1)
    query = torch.randn(batch, 4, 1, dim, generator=g, dtype=torch.float64)
    scores = landmark_scores(query, landmarks, kr, None, None, 0.5)  # [B, H, C]
    keys = (kf @ kr).view(batch, tokens, heads, dim)
    mean_keys = chunk_means(keys, chunk, dim=1)  # [B, C, H, d]
    q = query[:, :, 0].view(batch, heads, 2, dim)
    want = (torch.einsum("bhgd,bchd->bhgc", q, mean_keys) * 0.5).amax(2)
    torch.testing.assert_close(scores, want.float(), rtol=1e-5, atol=1e-5)


# -- through the cache ----------------------------------------------------------------------------------
@pytest.mark.parametrize("score", ["tokens", "landmarks"])
def test_full_budget_is_todays_decode_bit_for_bit(score):
    """None, 'all', a fraction 1.0 and a token budget covering the segment: the same logits as the default cache
    (torch.equal); None and 'all' also hold the same bytes (no landmarks), and token scores never store any."""
    model = make_model()
    ids, mask = prompts([60, 47])
    with patch_xkv(model):
        ref_cache = XKVCache(model.config, **SMALL)
        ref = decode_logits(model, ref_cache, ids, mask)
        for budget in (None, "all", 1.0, 10_000):
            cache = XKVCache(model.config, select_budget=budget, select_chunk=8, select_score=score, **SMALL)
            got = decode_logits(model, cache, ids, mask)
            assert all(torch.equal(a, b) for a, b in zip(ref, got)), budget
            assert cache.nbytes() == cache.expected_nbytes()
            if budget in (None, "all") or score == "tokens":
                assert cache.nbytes() == ref_cache.nbytes()
            else:
                assert cache.nbytes() > ref_cache.nbytes()  # landmarks held


def _dense_selected_attention(layer, query, parts, valid, scaling):
    """Float64 attention over the layer's rebuilt sequence (``full_states``: every segment rebuilt, outliers'
    exact states in place) with each KV head restricted to the exact tokens and its selected segment tokens."""
    keys, values = layer.full_states()
    batch, heads, total, dim = keys.shape
    allowed = torch.ones(batch, heads, total, dtype=torch.bool) if valid is None else (
        valid[:, None, :total].expand(batch, heads, total).clone())
    # outlier columns after the tail in ``valid`` are the outliers' own slots (rebuilt in place by full_states):
    # mark every outlier slot allowed where the decode mask allows its exact part
    pos, j = layer.sink_keys.shape[-2], 0
    extra = total
    for segment, part in zip(layer.group.segments, parts[1:]):
        end = pos + segment.length
        if isinstance(part, SelectedPart):
            # scatter_add: a short last chunk repeats its last slot (masked), which must not hide the valid one
            chosen = torch.zeros(batch, heads, segment.length, dtype=torch.long)
            chosen = chosen.scatter_add_(2, part.index, part.index_valid.long()) > 0
            allowed[:, :, pos:end] = chosen if valid is None else chosen & valid[:, None, pos:end]
        if segment.outlier_index is not None:
            slots = segment.outlier_index + pos  # [B, n]
            ok = valid[:, extra:extra + slots.shape[1]] if valid is not None else torch.ones_like(slots, dtype=torch.bool)
            allowed.scatter_(2, slots[:, None, :].expand(batch, heads, -1), ok[:, None, :].expand(batch, heads, -1))
            extra += slots.shape[1]
            j += 1
        pos = end
    q = query[:, :, 0].double().view(batch, heads, -1, dim)
    scores = torch.einsum("bhgd,bhtd->bhgt", q, keys.double()) * scaling
    scores = scores.masked_fill(~allowed[:, :, None, :], float("-inf"))
    out = torch.einsum("bhgt,bhtd->bhgd", scores.softmax(-1), values.double())
    return out.reshape(batch, 1, -1, dim)


def _layer_case(model, ids, mask, **params):
    """A patched prefill into a fresh cache; returns the cache."""
    cache = XKVCache(model.config, **SMALL, **params)
    with patch_xkv(model), torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=True, past_key_values=cache)
    return cache


@pytest.mark.parametrize("bits", [8, None], ids=["int8", "float"])
@pytest.mark.parametrize("pre_rope", [True, False])
@pytest.mark.parametrize("outliers", [0.0, 0.1])
@pytest.mark.parametrize("score", ["tokens", "landmarks"])
def test_selected_decode_equals_masked_attention_over_the_selected_tokens(bits, pre_rope, outliers, score):
    """batch 2 (left padded), GQA (4 query heads, 2 KV heads), a segment whose last chunk is short: the
    selective decode equals dense float64 attention over the cache's rebuilt keys/values restricted, per KV
    head, to the sinks, tail, outliers and the selected tokens."""
    model = make_model()
    ids, mask = prompts([152, 121])
    cache = _layer_case(model, ids, mask, select_budget=0.25, select_chunk=7, pre_rope=pre_rope, outliers=outliers,
                        factor_bits=bits, matrix_bits=bits, select_score=score)
    layer = cache.layers[1]
    segment = layer.group.segments[0]
    assert segment.length % 7  # an uneven last chunk
    assert (segment.key_landmarks is None) == (score == "tokens")
    g = torch.Generator().manual_seed(3)
    query = torch.randn(2, 4, 1, cache.head_dim, generator=g)
    total = layer.seq_tokens()
    valid = mask.bool()  # the padded row's 31 pads reach into the segment
    assert total == valid.shape[1]
    full_valid = layer.decode_valid(valid, 2, total)
    parts = layer.select_parts(query, layer.decode_parts(), full_valid, 0.3)
    assert isinstance(parts[1], SelectedPart) and parts[1].selected == cache.selected_chunks(segment.length) * 7
    got = xkv_decode_attention(query, parts, 0.3, full_valid)
    want = _dense_selected_attention(layer, query, parts, full_valid, 0.3)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # the reference path of a SelectedPart is the same function as the eager call on CPU; the float64 naive
    # rebuild of the parts agrees as well
    ref = xkv_decode.xkv_decode_attention_reference(query, parts, 0.3, full_valid)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


def test_selection_picks_the_top_landmark_chunks_without_rope():
    """Keys stored rotated, float factors, no outliers: the selected chunks of each KV head are exactly the
    top chunks by the best query head's score against the chunk means of the rebuilt keys."""
    model = make_model()
    ids, mask = prompts([160, 160])
    cache = _layer_case(model, ids, mask, select_budget=24, select_chunk=8, pre_rope=False, factor_bits=None,
                        matrix_bits=None, select_score="landmarks")
    layer = cache.layers[0]
    segment = layer.group.segments[0]
    keep = cache.selected_chunks(segment.length)
    query = torch.randn(2, 4, 1, cache.head_dim, generator=torch.Generator().manual_seed(1))
    parts = layer.select_parts(query, layer.decode_parts(), None, 0.25)
    keys, _ = layer.full_states()
    seg_keys = keys[:, :, 2:2 + segment.length].double()  # [B, H, T, d] (2 sinks)
    means = chunk_means(seg_keys, 8, dim=2)  # [B, H, C, d]
    q = query[:, :, 0].double().view(2, 2, 2, -1)
    scores = torch.einsum("bhgd,bhcd->bhgc", q, means).amax(2)
    want = scores.topk(keep, dim=-1).indices.sort(-1).values
    got = parts[1].index[..., ::8] // 8
    assert torch.equal(got, want)


# -- token scores ----------------------------------------------------------------------------------------
def _token_case(pre_rope: bool, tokens: int = 29, chunk: int = 6):
    g = torch.Generator().manual_seed(5)
    batch, heads, q_heads, dim, rank = 2, 2, 4, 8, 5
    factor = torch.randn(batch, tokens, rank, generator=g, dtype=torch.float64)
    right = torch.randn(batch, rank, heads * dim, generator=g, dtype=torch.float64)
    query = torch.randn(batch, q_heads, 1, dim, generator=g, dtype=torch.float64)
    cos = sin = None
    if pre_rope:
        inv_freq = 1.0 / (50.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        cos, sin = rope_cos_sin(inv_freq, torch.arange(100, 100 + tokens))
        cos, sin = cos.double(), sin.double()
    return factor, right, query, cos, sin


@pytest.mark.parametrize("pre_rope", [True, False])
def test_token_scores_are_the_best_token_of_each_chunk_with_the_centre_rotation(pre_rope):
    """Each chunk's score is the best query head's best token score ``q . R(m_c) (A B)[t, h]``, ``m_c`` the
    chunk's centre slot (its own for the short last chunk), exact without RoPE; padding is masked per token."""
    factor, right, query, cos, sin = _token_case(pre_rope)
    tokens, chunk, scale = factor.shape[1], 6, 0.7
    valid = torch.ones(2, tokens, dtype=torch.bool)
    valid[1, :9] = False  # left padding inside chunk 1 of row 1
    got = token_scores(query, factor, right, cos, sin, scale, chunk, valid)
    keys = (factor @ right).view(2, tokens, 2, 8).transpose(1, 2)  # [B, H, T, d], not rotated
    want = torch.full((2, 2, 5), float("-inf"), dtype=torch.float64)
    for c in range(5):
        a, b = c * chunk, min(tokens, (c + 1) * chunk)
        k = keys[:, :, a:b]
        if cos is not None:
            m = a + (b - a) // 2
            k = apply_rope(k, cos[m], sin[m])
        s = torch.einsum("bhgd,bhtd->bhgt", query[:, :, 0].view(2, 2, 2, 8), k) * scale
        s = s.masked_fill(~valid[:, None, None, a:b], float("-inf"))
        want[..., c] = s.amax(-1).amax(2)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.isinf(got[1, :, 0]).all() and torch.isfinite(got[1, :, 1]).all()


def test_token_scores_with_one_token_chunks_are_the_exact_scores():
    """``select_chunk=1``: every token is its chunk's centre, so the score is the exact ``q . k_t`` (RoPE at
    the token's own slot), and selection is exact top-k over the rebuilt keys."""
    factor, right, query, cos, sin = _token_case(True)
    got = token_scores(query, factor, right, cos, sin, 1.0, 1)
    keys = apply_rope((factor @ right).view(2, -1, 2, 8).transpose(1, 2), cos, sin)
    want = torch.einsum("bhgd,bhtd->bhgt", query[:, :, 0].view(2, 2, 2, 8), keys).amax(2)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    index, ok = select_chunks_by_tokens(query, factor, right, cos, sin, 1.0, 1, keep=4)
    assert torch.equal(index, want.topk(4, dim=-1).indices.sort(-1).values) and ok.all()
    with pytest.raises(ValueError, match="keep"):
        select_chunks_by_tokens(query, factor, right, cos, sin, 1.0, 1, keep=30)


@pytest.mark.parametrize("score", ["tokens", "landmarks"])
def test_left_padded_batch_selects_as_each_row_alone(score):
    """Row independence: a row left-padded by whole chunks (no sinks, so no slot holds padding exactly) decodes
    with select_budget < 1 to the same logits and greedy tokens as the row alone -- its padding chunks are never
    chosen and its real chunks and their scores are the row's own (lossless factors, float64)."""
    model = make_model().double()
    params = dict(sink=0, window=8, min_compress_tokens=4, rank_k=None, rank_v=None, factor_bits=None,
                  matrix_bits=None, select_budget=16, select_chunk=8, select_score=score)
    ids, mask = prompts([76, 44])  # row 1: 32 pads, 4 chunks
    with patch_xkv(model):
        cache = XKVCache(model.config, **params)
        batch = decode_logits(model, cache, ids, mask, steps=4)
        assert cache.selected_chunks(cache.groups[0].segments[0].length) == 2
        batch_tokens = greedy(model, XKVCache(model.config, **params), ids, mask, new_tokens=6)
        for row in range(2):
            keep = mask[row].bool()
            one_ids, one_mask = ids[row:row + 1, keep], mask[row:row + 1, keep]
            alone = decode_logits(model, XKVCache(model.config, **params), one_ids, one_mask, steps=4)
            for a, b in zip(batch, alone):
                torch.testing.assert_close(a[row:row + 1], b, rtol=1e-6, atol=1e-6)  # the float64 Gram SVD: ~1e-8
            tokens = greedy(model, XKVCache(model.config, **params), one_ids, one_mask, new_tokens=6)
            assert torch.equal(batch_tokens[row, -6:], tokens[0, -6:])


def _planted_cache(batch=2, tokens=150, chunk=10, needles=((37, 101), (64, 12)), scale=30.0, score="landmarks"):
    """A cache filled by direct updates (no model): random keys/values in every layer and, per batch row
    ``b`` and KV head ``h``, token ``needles[b][h]`` given a key ``scale`` times a fixed unit direction ``u_h``
    (post-RoPE). Returns the cache and the query ``u`` (every query head of KV head ``h`` along ``u_h``)."""
    cfg = tiny_config("llama")
    cache = XKVCache(cfg, group_size=2, rank_k=None, rank_v=None, sink=2, window=8, min_compress_tokens=4,
                     select_budget=chunk, select_chunk=chunk, select_score=score)
    g = torch.Generator().manual_seed(0)
    heads, dim = cache.num_kv_heads, cache.head_dim
    inv_freq = cache._inv_freq
    cos, sin = rope_cos_sin(inv_freq, torch.arange(tokens))
    directions = torch.nn.functional.normalize(torch.randn(heads, dim, generator=g), dim=-1)
    for layer_idx in range(cfg.num_hidden_layers):
        keys = torch.randn(batch, heads, tokens, dim, generator=g) * 0.3
        keys = apply_rope(keys, cos, sin)  # as a model hands them: rotated
        for b, row in enumerate(needles):
            for h, t in enumerate(row):
                keys[b, h, t] = scale * directions[h]
        values = torch.randn(batch, heads, tokens, dim, generator=g)
        cache.update(keys, values, layer_idx)
    query = directions.repeat_interleave(cfg.num_attention_heads // heads, dim=0)[None, :, None, :].expand(batch, -1, 1, -1)
    return cache, query.contiguous()


@pytest.mark.parametrize("score", ["tokens", "landmarks"])
def test_selection_finds_the_chunk_of_a_planted_key(score):
    """One chunk of 14 kept per KV head: each head of each row picks the chunk of its own planted key (a random
    choice would find all four with probability 14^-4)."""
    needles = ((37, 101), (64, 12))
    cache, query = _planted_cache(needles=needles, score=score)
    for layer in cache.layers:
        segment = layer.group.segments[0]
        assert segment.start == 2 and cache.selected_chunks(segment.length) == 1 < -(-segment.length // 10)
        parts = layer.select_parts(query, layer.decode_parts(), None, cache.head_dim ** -0.5)
        index = parts[1].index + segment.start  # slots
        for b, row in enumerate(needles):
            for h, t in enumerate(row):
                assert t in index[b, h].tolist(), (layer.layer_idx, b, h)
        # and attention puts nearly all weight on the needle: the output is its value
        out = xkv_decode_attention(query, parts, 1.0)
        full = xkv_decode_attention(query, layer.decode_parts(), 1.0)
        torch.testing.assert_close(out, full, rtol=1e-3, atol=1e-3)


def test_select_chunks_masks_chunks_without_valid_tokens_and_the_short_tail():
    g = torch.Generator().manual_seed(2)
    landmarks = torch.randn(1, 4, 3, generator=g)
    right = torch.randn(1, 3, 2 * 4, generator=g)
    query = torch.randn(1, 2, 1, 4, generator=g)
    valid = torch.ones(1, 19, dtype=torch.bool)
    valid[0, :10] = False  # chunks 0 and 1 (tokens 0..9) hold nothing valid
    index, ok = select_chunks(query, landmarks, right, None, None, 1.0, tokens=19, chunk=5, keep=2, valid=valid)
    assert index.shape == (1, 2, 10)
    chunks = index[..., ::5] // 5
    assert torch.equal(chunks, torch.tensor([[[2, 3], [2, 3]]]))
    assert index.max() == 18 and not ok[..., -1].any()  # the short last chunk's missing slot: clamped, masked
    with pytest.raises(ValueError, match="keep"):
        select_chunks(query, landmarks, right, None, None, 1.0, tokens=19, chunk=5, keep=5)


def test_landmarks_are_counted_and_follow_merges_and_batch_operations():
    """Chunked prefill merges into one segment (its landmarks recomputed for the whole segment), beam search
    reorders the landmarks with the factors: the formula holds throughout."""
    model = make_model()
    ids, mask = prompts([90, 77])
    cache = XKVCache(model.config, select_budget=0.2, select_chunk=8, select_score="landmarks", **SMALL)
    with patch_xkv(model):
        greedy(model, cache, ids, mask, new_tokens=4, num_beams=2, prefill_chunk_size=32, disable_compile=True)
    segment = cache.groups[0].segments[0]
    assert len(cache.groups[0].segments) == 1 and segment.key_landmarks.shape[:2] == (4, -(-segment.length // 8))
    want, _, _ = chunk_landmarks(segment, 8)
    torch.testing.assert_close(segment.key_landmarks, want)
    assert cache.nbytes() == cache.expected_nbytes()


@pytest.mark.parametrize("ratio", [3.0])
@pytest.mark.parametrize("score", ["tokens", "landmarks"])
def test_ratio_holds_with_landmarks(ratio, score):
    model = make_model()
    ids, mask = prompts([200, 180])
    cache = _layer_case(model, ids, mask, group_size=2, ratio=ratio, min_rank=1, select_budget=0.1, select_chunk=8,
                        select_score=score)
    from transformers import DynamicCache
    stock = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=True, past_key_values=stock)
    stock_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in stock.layers)
    assert cache.nbytes() == cache.expected_nbytes()
    assert stock_bytes / cache.nbytes() >= ratio


# -- static capacity, compile ------------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [True])
def test_static_selective_cache_matches_growable_and_compiles_fullgraph(fused):
    model = make_model()
    ids, mask = prompts([40, 31])
    params = dict(select_budget=0.3, select_chunk=4, **SMALL)
    with patch_xkv(model) if fused else contextlib.nullcontext():
        grow = greedy(model, XKVCache(model.config, **params), ids, mask, new_tokens=6)
        static = greedy(model, XKVCache(model.config, max_cache_len=56, **params), ids, mask, new_tokens=6,
                        disable_compile=True)
        assert torch.equal(grow, static)
        cache, eager_cache = (XKVCache(model.config, max_cache_len=48, **params) for _ in range(2))
        check_compiled_steps(model, cache, eager_cache, ids, mask, 48, "aot_eager")
    assert cache.nbytes() == cache.expected_nbytes()


def _selected_case(seed=0):
    from test_kernels_xkv import make_case

    query, parts, scaling, valid = make_case(layout=("e3", "f37", "f50", "e9"), seed=seed)
    g = torch.Generator().manual_seed(seed)
    seg = parts[1]
    index = torch.randint(0, seg.length, (2, 2, 12), generator=g)
    index_valid = torch.rand(2, 2, 12, generator=g) > 0.2
    parts[1] = SelectedPart(seg, index, index_valid)
    return query, parts, scaling, valid


def test_selected_part_through_the_custom_op():
    """The op carries SelectedParts (index and mask lists, placeholders for whole segments): opcheck, and a
    compiled call (fullgraph) equals the eager one."""
    query, parts, scaling, valid = _selected_case()
    kv_heads, value_dim, _ = xkv_decode._check(query, parts, valid)
    *flat, flat_valid = xkv_decode._flat_args(query, parts, valid, kv_heads, value_dim)
    args = (query, *flat, float(scaling), flat_valid, False)
    ref = xkv_decode_attention(query, parts, scaling, valid)
    torch.testing.assert_close(torch.ops.kvcompress.xkv_decode_attention(*args), ref, rtol=1e-6, atol=1e-6)
    torch.library.opcheck(torch.ops.kvcompress.xkv_decode_attention, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    torch._dynamo.reset()
    step = torch.compile(lambda q, p, v: xkv_decode_attention(q, p, scaling, v), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(step(query, parts, valid), ref, rtol=1e-6, atol=1e-6)


def test_selected_part_reference_equals_naive_rebuild():
    """A SelectedPart's reference equals float64 attention over the naively rebuilt segment, masked to the
    selected tokens of each head (duplicates of a valid token count once per occurrence)."""
    query, parts, scaling, valid = _selected_case(seed=4)
    sel = parts[1]
    seg: FactoredPart = sel.segment
    out, lse = xkv_decode.part_attention_reference(query, sel, scaling)
    b, t, _ = seg.key_factor.shape
    keys = (seg.key_factor.double() @ seg.key_right.double()).view(b, t, 2, -1)
    keys = apply_rope(keys, seg.cos[:, None, :].double(), seg.sin[:, None, :].double()).double()
    values = (seg.value_factor.double() @ seg.value_right.double()).view(b, t, 2, -1)
    for row in range(b):
        for h in range(2):
            idx = sel.index[row, h][sel.index_valid[row, h]]
            k, v = keys[row, idx, h], values[row, idx, h]  # [n, d]
            q = query[row, 4 * h:4 * h + 4, 0].double()  # 8 query heads over 2 KV heads
            s = q @ k.T * scaling
            torch.testing.assert_close(out[row, 4 * h:4 * h + 4].double(), s.softmax(-1) @ v, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(lse[row, 4 * h:4 * h + 4].double(), s.logsumexp(-1), rtol=1e-5, atol=1e-5)


# -- the Triton kernels (CPU interpreter in a subprocess; CUDA when present) ----------------------------------
_INTERPRETER_SCRIPT = r"""
import json, os, sys
os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere
sys.path[:0] = [{tests!r}, {root!r}]
import interpreter_compat  # Triton 3.6's interpreter under NumPy >= 2.4
import torch
from kvcompress.kernels import configure_kernels, xkv_decode
from test_kernels_xkv import CASES, make_case, rel_err
from test_xkv_select import random_selection, selective_generation_matches
configure_kernels(poison_buffers=True)
errors = {{}}
for name, case in CASES.items():
    query, parts, scaling, valid = make_case(**case, seed=3)
    segments = [i for i, p in enumerate(parts) if isinstance(p, xkv_decode.FactoredPart)]
    for which in ([segments[0]], segments) if segments else ():
        selected = random_selection(query, list(parts), valid, set(which), 13, seed=5)
        ref = xkv_decode.xkv_decode_attention(query, selected, scaling, valid, use_triton=False)
        out = xkv_decode.xkv_decode_attention(query, selected, scaling, valid, use_triton=True)
        errors[f"{{name}}_{{len(which)}}"] = rel_err(out, ref) if torch.isfinite(out).all() else float("inf")
launches = []
original = xkv_decode._launch
xkv_decode._launch = lambda kernel, *a, **k: (launches.append(kernel), original(kernel, *a, **k))[1]
calls = selective_generation_matches()
select_launches = sum(k is xkv_decode._xkv_select_pv_kernel for k in launches)
print("RESULT " + json.dumps(dict(errors=errors, calls=calls, select_launches=select_launches)))
"""


def random_selection(query, parts, valid, which: set, n: int, seed: int):
    """``parts`` with the factored parts at positions ``which`` replaced by SelectedParts of ``n`` random
    tokens per KV head (duplicates possible), a quarter of them masked, and masked where ``valid`` is."""
    g = torch.Generator().manual_seed(seed)
    batch, offset = query.shape[0], 0
    for i, part in enumerate(parts):
        if i in which:
            heads = part.key_right.shape[-1] // query.shape[-1]
            index = torch.randint(0, part.length, (batch, heads, n), generator=g).to(query.device)
            ok = (torch.rand(batch, heads, n, generator=g) > 0.25).to(query.device)
            if valid is not None:
                ok &= valid[:, offset:offset + part.length].gather(1, index.flatten(1)).view(batch, heads, n)
            parts[i] = SelectedPart(part, index, ok)
        offset += part.length
    return parts


def selective_generation_matches(device: str = "cpu") -> int:
    """Patched greedy decode with a select budget, once through the kernels and once through the reference
    (``use_triton`` forced off): the same tokens. Returns the selective decode calls made."""
    from kvcompress.xkv import attention as xkv_attention

    model = tiny_model("llama", hidden_size=128).to(device)  # head_dim 32: the kernels' smallest
    model.config._attn_implementation = "sdpa"
    ids, mask = (t.to(device) for t in prompts([70, 57]))
    outs, calls = [], []
    original = xkv_attention.xkv_decode_attention
    for use_triton in (True, False):
        def forced(query, parts, scaling, valid=None, use_triton_arg=None, _use=use_triton):
            calls.append(any(isinstance(p, SelectedPart) for p in parts))
            return original(query, parts, scaling, valid, use_triton=_use)
        xkv_attention.xkv_decode_attention = forced
        try:
            with patch_xkv(model):
                cache = XKVCache(model.config, select_budget=0.2, select_chunk=8, outliers=0.05, **SMALL)
                outs.append(greedy(model, cache, ids, mask, new_tokens=4))
        finally:
            xkv_attention.xkv_decode_attention = original
    assert torch.equal(outs[0], outs[1])
    return sum(calls)


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed (the kernels run on GPUs with Triton)")
def test_triton_interpreter_selected_parts_match_reference():
    """The kernels with SelectedParts (one or every segment selected, GQA 1-8, no RoPE, padding, masked and
    duplicate slots) under TRITON_INTERPRET=1 against the reference, and a patched selective generation
    through the kernels giving the reference's tokens."""
    result = run_interpreted(_INTERPRETER_SCRIPT.format(tests=str(TESTS), root=str(TESTS.parent)))
    assert len(result["errors"]) >= 9
    for name, error in result["errors"].items():
        assert error <= 1e-4, (name, error)
    assert result["calls"] > 0 and result["select_launches"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not HAVE_TRITON, reason="needs CUDA and Triton")
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-4)])
@pytest.mark.parametrize("shape", range(len(GPU_SHAPES)))
def test_cuda_selected_parts_match_reference(dtype, tol, shape):
    from test_kernels_xkv import make_case, rel_err

    query, parts, scaling, valid = make_case(**GPU_SHAPES[shape], dtype=dtype, device="cuda", seed=2)
    segments = {i for i, p in enumerate(parts) if isinstance(p, FactoredPart)}
    parts = random_selection(query, parts, valid, segments, 200, seed=3)
    ref = xkv_decode_attention(query, parts, scaling, valid, use_triton=False)
    out = xkv_decode_attention(query, parts, scaling, valid, use_triton=True)
    assert torch.isfinite(out).all() and rel_err(out, ref) <= tol


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not HAVE_TRITON, reason="needs CUDA and Triton")
def test_cuda_selective_generation_and_reduce_overhead():
    """On CUDA: the kernels' selective generation equals the reference's, and generate's reduce-overhead
    compile (CUDA graphs) of the static selective cache gives the eager tokens without recompiles."""
    from transformers import CompileConfig
    from test_mla_compile import generate_compiled_twice

    assert selective_generation_matches("cuda") > 0
    model = tiny_model("llama").to("cuda")
    model.config._attn_implementation = "sdpa"
    ids, mask = prompts([40, 31], device="cuda")
    params = dict(select_budget=0.3, select_chunk=4, **SMALL)
    with patch_xkv(model):
        generate_compiled_twice(model, lambda: XKVCache(model.config, max_cache_len=64, **params), ids, mask,
                                CompileConfig(mode="reduce-overhead", fullgraph=True))
