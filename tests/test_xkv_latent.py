"""xKV over the MLA latent (kvcompress.xkv_latent) against MLALatentCache on tiny random DeepSeek models.

The reference is ``MLALatentCache`` (the exact latent). "rebuilt" is ``XKVLatentCache`` handing the rebuilt
latent to the stock model or to ``patch_mla``; "factored" is ``patch_xkv_mla``, attending over the factors.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from conftest import tiny_model
from kvcompress import make_cache
from kvcompress.mla import MLALatentCache, patch_mla
from kvcompress.xkv_latent import XKVLatentCache, XKVLatentParams, factored_latent_attention, patch_xkv_mla

PROMPT = 40


def make_model(family="deepseek_v3", **overrides):
    model = tiny_model(family, **({"q_lora_rank": 16} if family == "deepseek_v3" else {}), **overrides)
    model.config._attn_implementation = "sdpa"
    return model


def cache_kwarg(model) -> str:
    """transformers 5.24 calls the cache argument ``cache``, 5.17 ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def prompt(batch=2, length=PROMPT, seed=0):
    return torch.randint(3, 160, (batch, length), generator=torch.Generator().manual_seed(seed))


def generate(model, cache, ids, new_tokens=6):
    return model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None,
                          return_dict_in_generate=True, output_logits=True, **{cache_kwarg(model): cache})


def max_diff(a, b):
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))


def small(model, **kw):
    """A cache that compresses a 40-token prompt (window 4)."""
    return XKVLatentCache(model.config, **dict(dict(group_size=2, window=4, min_compress_tokens=4), **kw))


# -- exactness at full rank ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
@pytest.mark.parametrize("patch", [None, patch_mla, patch_xkv_mla])
def test_full_rank_reproduces_the_latent_cache(family, patch):
    model = make_model(family)
    ids = prompt()
    handle = patch(model) if patch else None
    try:
        ref = generate(model, MLALatentCache(model.config), ids)
        cache = small(model, latent_rank=None)
        out = generate(model, cache, ids)
    finally:
        if handle:
            handle.remove()
    assert all(len(g.segments) == 1 and g.segments[0].length == PROMPT - 4 for g in cache.groups)  # it compressed
    assert torch.equal(out.sequences, ref.sequences)
    assert max_diff(out.logits, ref.logits) < 1e-4
    assert cache.get_seq_length() == PROMPT + 5


def test_factored_decode_runs_and_agrees_with_the_rebuilt_latent():
    """Truncated rank, 8-bit storage, factored RoPE keys, a second multi-token turn (merge): the factored path
    and the rebuilt path attend over the same numbers, so they agree to rounding."""
    model = make_model()
    ids = prompt()
    params = dict(latent_rank=0.3, rope_rank=0.5, factor_bits=8, matrix_bits=8)
    outs = []
    for patch in (patch_mla, patch_xkv_mla):
        with patch(model) as handle:
            cache = small(model, **params)
            first = generate(model, cache, ids)
            follow = torch.cat([first.sequences, prompt(length=12, seed=5)], dim=1)
            second = generate(model, cache, follow)
            state = model.model.layers[0].self_attn.__dict__
            if patch is patch_xkv_mla:
                assert state["kvcompress_xkv_mla"].factored_calls == 5 + 1 + 5  # the 13-token second turn too
            outs.append((first, second, cache))
        assert handle is not None
    (a1, a2, ca), (b1, b2, cb) = outs
    assert torch.equal(a1.sequences, b1.sequences) and torch.equal(a2.sequences, b2.sequences)
    assert max_diff(a1.logits + a2.logits, b1.logits + b2.logits) < 1e-4
    assert [len(g.segments) for g in cb.groups] == [1, 1]  # merged into one segment
    assert cb.groups[0].segments[0].length == follow.shape[1] - 4  # compressed at the second prompt
    assert cb.nbytes() == ca.nbytes() == cb.expected_nbytes()


def test_factored_attention_equals_attention_over_the_rebuilt_latent():
    """factored_latent_attention over parts == absorbed attention over their rebuilt latents (float64)."""
    from kvcompress.mla import absorbed_attention
    from kvcompress.xkv_latent import LatentParts, SegmentView

    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    b, h, s, d, p = 2, 3, 2, 16, 4
    segs = [SegmentView(rnd(b, 7, 5), rnd(b, 5, d), rope=rnd(b, 7, p)),
            SegmentView(rnd(b, 6, 4), rnd(b, 4, d), rope_factor=rnd(b, 6, 3), rope_right=rnd(b, 3, p))]
    parts = LatentParts(segs, rnd(b, 5, d), rnd(b, 5, p))
    latent = torch.cat([v.latent() for v in segs] + [parts.tail_latent], 1)
    rope = torch.cat([v.rope_key() for v in segs] + [parts.tail_rope], 1)
    q, qr = rnd(b, h, s, d), rnd(b, h, s, p)
    mask = torch.ones(b, 1, s, 18, dtype=torch.bool)
    mask[0, ..., :3] = False
    for m in (None, mask, torch.where(mask, 0.0, -1e9).double()):
        ref = absorbed_attention(q, qr, latent, rope, m, 0.3)
        torch.testing.assert_close(factored_latent_attention(q, qr, parts, m, 0.3), ref, rtol=1e-10, atol=1e-10)


# -- bounded error decreasing with rank ----------------------------------------------------------------
def test_lower_ranks_give_bounded_error_decreasing_with_rank():
    model = make_model()
    ids = prompt(batch=1, length=64)
    with torch.no_grad():
        ref = model(ids, **{cache_kwarg(model): MLALatentCache(model.config)})
        step = ids[:, -1:]
        ref_next = model(step, **{cache_kwarg(model): ref.past_key_values}).logits
        errors, latent_errors = [], []
        with patch_xkv_mla(model):
            for rank in (8, 16, 32, 48, 64):
                cache = small(model, latent_rank=rank)
                model(ids, **{cache_kwarg(model): cache})
                logits = model(step, **{cache_kwarg(model): cache}).logits
                errors.append((logits - ref_next).abs().max().item())
                exact = ref.past_key_values.layers[1].keys[:, 0, :60]
                rebuilt = cache.layers[1].full_states()[0][:, 0, :60]
                latent_errors.append(((rebuilt - exact).norm() / exact.norm()).item())
    assert all(a >= b - 1e-6 for a, b in zip(latent_errors, latent_errors[1:])), latent_errors
    assert latent_errors[-1] < 1e-5 and latent_errors[0] < 1.0
    assert errors[0] > errors[-1] and errors[-1] < 1e-4
    assert max(errors) < 10 * ref_next.abs().max().item()  # bounded


# -- memory ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [None, 8])
@pytest.mark.parametrize("rope_rank", [None, 6])
def test_nbytes_matches_an_independent_formula(bits, rope_rank):
    model = make_model()  # 4 layers, kv_lora_rank 32, rope 8, fp32
    ids = prompt(batch=2)
    cache = small(model, latent_rank=20, rope_rank=rope_rank, factor_bits=bits, matrix_bits=bits)
    generate(model, cache, ids, new_tokens=3)
    B, G, groups, dc, p, e, r = 2, 2, 2, 32, 8, 4, 20
    L, tail = PROMPT - 4, 4 + 2  # 36 compressed tokens; window + 2 decoded tokens exact
    f, m = (1, 1) if bits == 8 else (e, e)

    def factor(rank):  # the token factor (+ its 8-bit scales: one per row and per component)
        return B * (L * rank * f + ((L + rank) * e if bits == 8 else 0))

    def matrix(rank, width):  # one layer's matrix (+ one scale per column)
        return B * (rank * width * m + (width * e if bits == 8 else 0))

    per_group = factor(r) + G * matrix(r, dc)
    per_group += G * B * L * p * e if rope_rank is None else factor(rope_rank) + G * matrix(rope_rank, p)
    expected = groups * per_group + groups * G * B * tail * (dc + p) * e
    assert cache.nbytes() == expected == cache.expected_nbytes()


def test_truncated_cache_is_smaller_than_the_latent_cache():
    model = make_model()
    ids = prompt(batch=1, length=200, seed=2)
    ref, cache = MLALatentCache(model.config), small(model, latent_rank=16, factor_bits=8, matrix_bits=8)
    generate(model, ref, ids, new_tokens=2)
    generate(model, cache, ids, new_tokens=2)
    assert cache.nbytes() * 3 < ref.nbytes()


# -- the API -------------------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    model = make_model()
    with pytest.raises(ValueError, match=r"group_size=3 does not divide num_hidden_layers=4; allowed: \[1, 2, 4\]"):
        XKVLatentCache(model.config, group_size=3)
    with pytest.raises(ValueError, match=r"rank=65 is out of range: allowed ranks are 1..64"):
        XKVLatentCache(model.config, group_size=2, latent_rank=65)
    with pytest.raises(ValueError, match=r"rope_rank=17 is out of range: allowed ranks are 1..16"):
        XKVLatentCache(model.config, group_size=2, rope_rank=17)
    with pytest.raises(ValueError, match="latent_rank"):
        XKVLatentCache(model.config, latent_rank=1.5)
    with pytest.raises(ValueError, match="factor_bits"):
        XKVLatentCache(model.config, factor_bits=4)
    with pytest.raises(ValueError, match="model_type"):
        XKVLatentCache(tiny_model("llama").config)
    with pytest.raises(ValueError, match="max_absorbed_tokens"):
        patch_xkv_mla(model, max_absorbed_tokens=0)
    cache = XKVLatentCache(model.config, group_size=2)
    with pytest.raises(ValueError, match=r"expects the latent as \[batch, 1, tokens, 32\]"):
        cache.update(torch.zeros(1, 4, 3, 32), torch.zeros(1, 1, 3, 8), 0)
    with patch_mla(model):
        with pytest.raises(ValueError, match="already patched"):
            patch_xkv_mla(model)
    assert XKVLatentCache(model.config).group_size == 4  # None: the divisor of 4 layers nearest 4


def test_registered_method_builds_and_patches():
    model = make_model()
    cache = make_cache("xkv_mla", model, group_size=2, latent_rank=16)
    assert isinstance(cache, XKVLatentCache) and cache.rank == 16
    assert XKVLatentParams().latent_rank == 0.5
    ids = prompt()
    from kvcompress import patch_model

    with patch_model(model, "xkv_mla", group_size=2, window=4, min_compress_tokens=4) as handle:
        out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert isinstance(handle.last_cache, XKVLatentCache) and handle.last_cache.groups[0].segments
    assert out.shape == (2, PROMPT + 3)


def test_crop_only_within_the_exact_tail():
    model = make_model()
    cache = small(model)
    generate(model, cache, prompt(), new_tokens=3)
    held = cache.get_seq_length()
    cache.crop(-2)
    assert cache.get_seq_length() == held - 2
    with pytest.raises(ValueError, match="compressed tokens that cannot be cut"):
        cache.crop(-10)
