"""MLA latent-only cache and absorbed decode (kvcompress.mla) against the stock DeepSeek-V2/V3 path.

Tiny random models built here (seconds on CPU). The stock reference is the unpatched model with
transformers' ``DynamicCache``; "absorbed" is the model patched by ``patch_mla`` with ``MLALatentCache``.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import DynamicCache

from conftest import tiny_config, tiny_model
from kvcompress.mla import (
    MLALatentCache,
    absorbed_attention,
    mla_attention_modules,
    patch_mla,
)

# (family, config overrides): V2 without q_lora_rank (V2-Lite style), V3 with it (q_a_proj/q_b_proj path).
VARIANTS = [("deepseek_v2", {}), ("deepseek_v3", {"q_lora_rank": 16})]
PAD = 0


def cache_kwarg(model) -> str:
    """transformers 5.24 calls the cache argument ``cache``, 5.17 ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def make_model(family, overrides, dtype=torch.float32, attn="sdpa", seed=0):
    model = tiny_model(family, seed=seed, dtype=dtype, **overrides)
    model.config._attn_implementation = attn
    return model


def left_padded_prompts(lengths, seed=1, vocab=160):
    """A batch of random prompts of the given lengths, left-padded with PAD, and its attention mask."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, vocab, (n,), generator=g)
        mask[row, width - n :] = 1
    return ids, mask


def two_turns(model, cache, seed_sample=None, new_tokens=5):
    """Turn 1: 24/19-token left-padded prompts (prefill > 16 tokens: the expanded path), 5 tokens generated.
    Turn 2: 6 more user tokens appended to each row (absorbed multi-token step), 5 tokens generated.
    Returns the sequences and per-step logits of both turns."""
    kw = dict(max_new_tokens=new_tokens, return_dict_in_generate=True, output_logits=True, pad_token_id=PAD,
              eos_token_id=None, **{cache_kwarg(model): cache})
    if seed_sample is None:
        kw["do_sample"] = False
    else:
        kw.update(do_sample=True, top_k=0, top_p=1.0, temperature=1.0)
    ids, mask = left_padded_prompts([24, 19])
    if seed_sample is not None:
        torch.manual_seed(seed_sample)
    first = model.generate(input_ids=ids, attention_mask=mask, **kw)
    follow = torch.randint(3, 160, (2, 6), generator=torch.Generator().manual_seed(7))
    ids2 = torch.cat([first.sequences, follow], dim=1)
    mask2 = torch.cat([mask, torch.ones(2, ids2.shape[1] - mask.shape[1], dtype=torch.long)], dim=1)
    if seed_sample is not None:
        torch.manual_seed(seed_sample + 1)
    second = model.generate(input_ids=ids2, attention_mask=mask2, **kw)
    return [first.sequences, second.sequences], list(first.logits) + list(second.logits)


def max_diff(a, b):
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))


# -- exactness against the stock path -------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family,overrides", VARIANTS)
def test_greedy_two_turns_match_stock(family, overrides, attn):
    model = make_model(family, overrides, attn=attn)
    ref_seqs, ref_logits = two_turns(model, DynamicCache(config=model.config))
    handle = patch_mla(model)
    cache = MLALatentCache(model.config)
    seqs, logits = two_turns(model, cache)
    state = mla_attention_modules(model)[0].kvcompress_mla
    handle.remove()
    for ref, got in zip(ref_seqs, seqs):
        assert torch.equal(ref, got)
    assert max_diff(ref_logits, logits) < 1e-4
    # both paths ran: the 24-token prefill expanded; 4 decode steps, the second turn's 7 new tokens (its
    # 6 plus the last answer token, never fed back in turn 1) and 4 more decode steps absorbed
    assert state.expanded_calls == 1 and state.absorbed_calls == 4 + 1 + 4
    assert cache.get_seq_length() == ref_seqs[1].shape[1] - 1  # the last generated token is never fed back


@pytest.mark.parametrize("family,overrides", VARIANTS)
def test_sampling_with_seed_matches_stock(family, overrides):
    model = make_model(family, overrides)
    ref_seqs, _ = two_turns(model, DynamicCache(config=model.config), seed_sample=123, new_tokens=8)
    with patch_mla(model):
        seqs, _ = two_turns(model, MLALatentCache(model.config), seed_sample=123, new_tokens=8)
    for ref, got in zip(ref_seqs, seqs):
        assert torch.equal(ref, got)


def test_prefill_is_bitwise_stock_and_dynamic_cache_works():
    """Prefill (> max_absorbed_tokens) takes the stock recipe: bitwise equal logits. A patched model also
    decodes absorbed over a plain DynamicCache (it holds the same latent)."""
    model = make_model("deepseek_v2", {})
    ids, mask = left_padded_prompts([24, 19])
    kw = cache_kwarg(model)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, **{kw: DynamicCache(config=model.config)}).logits
        with patch_mla(model):
            got = model(input_ids=ids, attention_mask=mask, **{kw: MLALatentCache(model.config)}).logits
    assert torch.equal(ref, got)
    ref_seqs, ref_logits = two_turns(model, DynamicCache(config=model.config))
    with patch_mla(model):
        seqs, logits = two_turns(model, DynamicCache(config=model.config))
    assert torch.equal(ref_seqs[1], seqs[1]) and max_diff(ref_logits, logits) < 1e-4


def test_short_padded_prompt_is_absorbed_and_matches_stock():
    """A prompt of <= max_absorbed_tokens goes through the absorbed path too (causal + padding mask)."""
    model = make_model("deepseek_v2", {})
    ids, mask = left_padded_prompts([6, 4])
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=PAD,
              eos_token_id=None, return_dict_in_generate=True, output_logits=True)
    ref = model.generate(**kw, **{cache_kwarg(model): DynamicCache(config=model.config)})
    with patch_mla(model):
        got = model.generate(**kw, **{cache_kwarg(model): MLALatentCache(model.config)})
        state = mla_attention_modules(model)[0].kvcompress_mla
        assert state.expanded_calls == 0 and state.absorbed_calls == 5
    assert torch.equal(ref.sequences, got.sequences) and max_diff(ref.logits, got.logits) < 1e-4


def test_positional_call_matches_stock():
    """The patched forward also accepts the stock forward's positional argument order."""
    model = make_model("deepseek_v2", {})
    attn = mla_attention_modules(model)[1]
    hidden = torch.randn(2, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(4))
    position_ids = torch.arange(5)[None].expand(2, -1)
    rope = model.model.rotary_emb(hidden, position_ids)
    names = list(inspect.signature(type(attn).forward).parameters)[2:5]  # after self, hidden_states
    values = {"attention_mask": None, "position_embeddings": rope, "cache": None, "past_key_values": None}
    args = [values[n] for n in names]
    with torch.no_grad():
        ref, _ = attn(hidden, *args)
        with patch_mla(model):
            got, _ = attn(hidden, *args)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_beam_search_matches_stock():
    model = make_model("deepseek_v3", {"q_lora_rank": 16})
    ids, mask = left_padded_prompts([20, 17])
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False,
              pad_token_id=PAD, eos_token_id=None)
    ref = model.generate(**kw, **{cache_kwarg(model): DynamicCache(config=model.config)})
    with patch_mla(model):
        got = model.generate(**kw, **{cache_kwarg(model): MLALatentCache(model.config)})
    assert torch.equal(ref, got)


def teacher_forced_decode_logits(model, cache_factory, patched: bool, steps=4):
    """Prefill a left-padded batch, then feed ``steps`` fixed tokens one at a time; returns the step logits."""
    ids, mask = left_padded_prompts([24, 19])
    follow = torch.randint(3, 160, (2, steps), generator=torch.Generator().manual_seed(3))
    kw = cache_kwarg(model)
    cache = cache_factory(model)
    handle = patch_mla(model) if patched else None
    out = []
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **{kw: cache})
        for i in range(steps):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
            out.append(model(input_ids=follow[:, i : i + 1], attention_mask=mask, **{kw: cache}).logits[:, -1].float())
    if handle is not None:
        handle.remove()
    return torch.stack(out)


@pytest.mark.parametrize("family,overrides", VARIANTS)
def test_bf16_absorbed_as_accurate_as_stock(family, overrides):
    """In bf16 the two paths round differently; the absorbed one must be about as close to the fp32 truth."""
    truth = teacher_forced_decode_logits(make_model(family, overrides), lambda m: DynamicCache(config=m.config), False)
    model = make_model(family, overrides, dtype=torch.bfloat16)
    stock = teacher_forced_decode_logits(model, lambda m: DynamicCache(config=m.config), False)
    absorbed = teacher_forced_decode_logits(model, MLALatentCache, True)
    stock_err = (stock - truth).abs().max().item()
    absorbed_err = (absorbed - truth).abs().max().item()
    assert stock_err > 0  # bf16 really rounds: the comparison below means something
    # measured on these seeds: stock 3.7e-3 / 4.4e-3, absorbed 4.1e-3 / 4.4e-3 (logits up to ~0.6)
    assert absorbed_err <= 1.5 * stock_err, (absorbed_err, stock_err)


# -- memory ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nbytes_is_the_latent_formula_and_nothing_per_head(dtype):
    overrides = {"q_lora_rank": 16}
    cfg = tiny_config("deepseek_v3", **overrides)
    model = make_model("deepseek_v3", overrides, dtype=dtype)
    cache = MLALatentCache(model.config)
    assert cache.nbytes() == 0
    with patch_mla(model):
        seqs, _ = two_turns(model, cache, new_tokens=3)
    tokens = seqs[1].shape[1] - 1  # the last generated token is never fed back
    element = torch.tensor([], dtype=dtype).element_size()
    formula = cfg.num_hidden_layers * 2 * tokens * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * element
    assert cache.nbytes() == formula == cache.expected_nbytes()
    for layer in cache.layers:
        assert layer.latent.shape == (2, 1, tokens, cfg.kv_lora_rank) and layer.latent.dtype == dtype
        assert layer.rope_key.shape == (2, 1, tokens, cfg.qk_rope_head_dim)
    # the stock DynamicCache holds the same latent on these transformers versions: same bytes
    stock = DynamicCache(config=model.config)
    two_turns(model, stock, new_tokens=3)
    assert sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
               for layer in stock.layers) == formula


# -- decode never expands the cache ---------------------------------------------------------------------
def count_kv_b_proj_tokens(model, run):
    """Tokens pushed through each layer's kv_b_proj while ``run()`` executes (a forward hook per layer)."""
    seen = []
    hooks = [m.kv_b_proj.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[-2]))
             for m in mla_attention_modules(model)]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("family,overrides", VARIANTS)
def test_decode_never_calls_kv_b_proj(family, overrides):
    model = make_model(family, overrides)
    layers = model.config.num_hidden_layers
    ids, mask = left_padded_prompts([24, 19])
    kw = cache_kwarg(model)

    def prefill_then_decode(cache, steps=4):
        calls = {}
        with torch.no_grad():
            calls["prefill"] = count_kv_b_proj_tokens(model, lambda: model(input_ids=ids, attention_mask=mask, **{kw: cache}))
            m = mask
            calls["decode"] = []
            for i in range(steps):
                m = torch.cat([m, torch.ones(2, 1, dtype=torch.long)], dim=1)
                tok = torch.full((2, 1), 5 + i)
                calls["decode"] += count_kv_b_proj_tokens(model, lambda: model(input_ids=tok, attention_mask=m, **{kw: cache}))
        return calls

    stock = prefill_then_decode(DynamicCache(config=model.config))
    # the hook works: stock decode expands all cached tokens in every layer at every step
    assert stock["decode"] == [24 + 1 + i for i in range(4) for _ in range(layers)]
    with patch_mla(model):
        absorbed = prefill_then_decode(MLALatentCache(model.config))
    assert absorbed["prefill"] == [24] * layers
    assert absorbed["decode"] == []
    # leaving the with-block removed the patch's state from every module
    assert all(m.__dict__.get("kvcompress_mla") is None for m in mla_attention_modules(model))


def test_absorbed_weights_built_once_per_module():
    model = make_model("deepseek_v2", {})
    handle = patch_mla(model)
    two_turns(model, MLALatentCache(model.config), new_tokens=4)
    states = [m.kvcompress_mla for m in mla_attention_modules(model)]
    assert all(s.weights.builds == 1 and s.absorbed_calls > 0 for s in states)
    handle.remove()


# -- the absorbed maths on its own ----------------------------------------------------------------------
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_absorbed_attention_equals_expanded_attention(mask_kind):
    """float64: softmax over per-head expanded keys/values == absorbed attention then W_UV (to 1e-12)."""
    g = torch.Generator().manual_seed(0)
    B, H, S, T, r, p, nope, v = 2, 3, 4, 9, 8, 4, 5, 6
    dt = torch.float64
    q_nope, q_rope = torch.randn(B, H, S, nope, generator=g, dtype=dt), torch.randn(B, H, S, p, generator=g, dtype=dt)
    c, k_rope = torch.randn(B, T, r, generator=g, dtype=dt), torch.randn(B, T, p, generator=g, dtype=dt)
    w_uk, w_uv = torch.randn(H, nope, r, generator=g, dtype=dt), torch.randn(H, v, r, generator=g, dtype=dt)
    scale = 0.3
    causal = torch.arange(T)[None, :] <= torch.arange(T - S, T)[:, None]  # [S, T]
    keep = causal[None, None].expand(B, 1, S, T).clone()
    keep[0, ..., :2] = False  # row 0 is left-padded by two tokens
    if mask_kind == "none":
        mask, keep = None, causal[None, None].expand(B, 1, S, T)
    elif mask_kind == "bool":
        mask = keep
    else:
        mask = torch.zeros(B, 1, S, T, dtype=dt).masked_fill(~keep, torch.finfo(dt).min)
    # reference: expand per head, ordinary attention
    k = torch.cat([torch.einsum("hnr,btr->bhtn", w_uk, c), k_rope[:, None].expand(B, H, T, p)], dim=-1)
    values = torch.einsum("hvr,btr->bhtv", w_uv, c)
    scores = torch.cat([q_nope, q_rope], -1) @ k.transpose(-1, -2) * scale
    scores = scores.masked_fill(~keep, float("-inf"))
    ref = torch.softmax(scores, -1) @ values  # [B, H, S, v]
    q_latent = torch.einsum("bhsn,hnr->bhsr", q_nope, w_uk)
    out_latent = absorbed_attention(q_latent, q_rope, c, k_rope, mask, scale)
    got = torch.einsum("bhsr,hvr->bhsv", out_latent, w_uv)
    assert out_latent.shape == (B, H, S, r)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    # the 4-D cache layout [B, 1, T, *] gives the same
    torch.testing.assert_close(absorbed_attention(q_latent, q_rope, c[:, None], k_rope[:, None], mask, scale), out_latent)


# -- unpatching -----------------------------------------------------------------------------------------
def test_unpatch_restores_stock_bit_for_bit():
    model = make_model("deepseek_v3", {"q_lora_rank": 16})
    never_seqs, never_logits = two_turns(model, DynamicCache(config=model.config))
    modules = mla_attention_modules(model)
    handle = patch_mla(model)
    assert all("forward" in m.__dict__ for m in modules)
    two_turns(model, MLALatentCache(model.config))
    handle.remove()
    assert all("forward" not in m.__dict__ and not hasattr(m, "kvcompress_mla") for m in modules)
    seqs, logits = two_turns(model, DynamicCache(config=model.config))
    assert all(torch.equal(a, b) for a, b in zip(never_seqs, seqs))
    assert all(torch.equal(a, b) for a, b in zip(never_logits, logits))
    handle.remove()  # idempotent
    patch_mla(model).remove()  # can be patched again after removal


def test_unpatched_model_with_latent_cache_is_stock():
    """On transformers >= 5.17 stock DeepSeek attention hands the cache the latent: MLALatentCache works
    unpatched and gives exactly the DynamicCache results."""
    model = make_model("deepseek_v2", {})
    ref_seqs, ref_logits = two_turns(model, DynamicCache(config=model.config))
    seqs, logits = two_turns(model, MLALatentCache(model.config))
    assert all(torch.equal(a, b) for a, b in zip(ref_seqs, seqs))
    assert all(torch.equal(a, b) for a, b in zip(ref_logits, logits))


# -- bad input ------------------------------------------------------------------------------------------
def test_unsupported_model_type():
    llama = tiny_model("llama")
    with pytest.raises(ValueError, match=r"unsupported model type 'llama'.*deepseek_v2.*deepseek_v3"):
        patch_mla(llama)
    with pytest.raises(ValueError, match=r"unsupported model type 'llama'"):
        MLALatentCache(llama.config)
    assert "forward" not in llama.model.layers[0].self_attn.__dict__
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        patch_mla(llama.config)


def test_bad_patch_arguments_change_nothing():
    model = make_model("deepseek_v2", {})
    for bad in (0, -1, 2.0, True, None):
        with pytest.raises((TypeError, ValueError), match=r"max_absorbed_tokens=.*allowed: int >= 1"):
            patch_mla(model, max_absorbed_tokens=bad)
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match=r"attn_implementation 'flex_attention'.*allowed: \['eager', 'sdpa'\]"):
        patch_mla(model)
    model.config._attn_implementation = "sdpa"
    assert all("forward" not in m.__dict__ for m in mla_attention_modules(model))
    handle = patch_mla(model)
    with pytest.raises(ValueError, match="already patched"):
        patch_mla(model)
    handle.remove()


def test_cache_model_mismatch_raises_before_any_change():
    model = make_model("deepseek_v2", {})
    other = MLALatentCache(tiny_config("deepseek_v2", kv_lora_rank=16))
    ids, mask = left_padded_prompts([24, 19])
    kw = cache_kwarg(model)
    with patch_mla(model), torch.no_grad():
        with pytest.raises(ValueError, match=r"cache/model mismatch.*kv_lora_rank=32.*kv_lora_rank=16"):
            model(input_ids=ids, attention_mask=mask, **{kw: other})
    assert other.get_seq_length() == 0 and other.nbytes() == 0
    # unpatched, the cache's own check catches it
    with pytest.raises(ValueError, match=r"cache/model mismatch at layer 0.*kv_lora_rank=16"), torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **{kw: other})
    assert other.nbytes() == 0


@pytest.mark.parametrize("layers", [2, 6])
@pytest.mark.parametrize("static", [False, True])
def test_cache_for_another_layer_count_is_refused_before_any_write(layers, static):
    """A cache built for fewer or more layers than the model is refused at layer 0: nothing is written."""
    model = make_model("deepseek_v2", {})
    cache = MLALatentCache(tiny_config("deepseek_v2", num_hidden_layers=layers), max_cache_len=64 if static else None)
    ids, mask = left_padded_prompts([24, 19])
    with patch_mla(model), torch.no_grad():
        for length in (24, 3):  # the expanded (prefill) and the absorbed path
            with pytest.raises(ValueError, match=f"built for {layers} layers but the model.*has 4"):
                model(input_ids=ids[:, :length], attention_mask=mask[:, :length], **{cache_kwarg(model): cache})
    assert cache.get_seq_length() == 0 and cache.nbytes() == 0
    assert not any(layer.is_initialized for layer in cache.layers)


def test_dtype_mismatch_raises_before_any_change():
    model32 = make_model("deepseek_v2", {})
    model16 = make_model("deepseek_v2", {}, dtype=torch.bfloat16)
    ids, mask = left_padded_prompts([24, 19])
    kw = cache_kwarg(model32)
    cache = MLALatentCache(model32.config)
    with torch.no_grad():
        model32(input_ids=ids, attention_mask=mask, **{kw: cache})
        before = cache.nbytes()
        with patch_mla(model16):
            with pytest.raises(TypeError, match=r"dtype mismatch at layer 0.*torch.bfloat16.*holds torch.float32"):
                model16(input_ids=ids[:, :3], **{kw: cache})
    assert cache.nbytes() == before and cache.get_seq_length() == 24


def test_decompressed_states_are_refused_clearly():
    """What an older transformers' DeepSeek attention would pass: per-head K/V. Refused, cache unchanged."""
    cfg = tiny_config("deepseek_v2")
    cache = MLALatentCache(cfg)
    heads, qk, v = cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    with pytest.raises(ValueError, match="per-head \\(decompressed\\).*patch_mla"):
        cache.update(torch.randn(1, heads, 3, qk), torch.randn(1, heads, 3, v), 0)
    with pytest.raises(ValueError, match="MLALatentCache was built for 4 layers but the model has at least 8 layers"):
        cache.update(torch.randn(1, 1, 3, cfg.kv_lora_rank), torch.randn(1, 1, 3, cfg.qk_rope_head_dim), 7)
    assert cache.nbytes() == 0 and cache.get_seq_length() == 0
