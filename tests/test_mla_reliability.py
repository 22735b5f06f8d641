"""Regression tests for the DeepSeek latent methods (kvcompress.mla, kvcompress.tpla): crop against
DynamicCache, assisted (prompt-lookup) decoding, weights changed after patching, plain forwards and
losses of patched models, caches built for another layer count, calibration input and unsupported
models. Tiny random DeepSeek-V2/V3 models on CPU."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from conftest import tiny_config, tiny_model
from kvcompress.mla import MLALatentCache, patch_mla
from kvcompress.patch import GENERATE_CACHE_KWARG
from kvcompress.tpla import TPLACache, patch_tpla

R, P, LAYERS = 32, 8, 4


def model_of(family: str = "deepseek_v3", seed: int = 0, dtype=torch.float32, **overrides):
    model = tiny_model(family, seed=seed, dtype=dtype, **overrides)
    model.config._attn_implementation = "sdpa"
    return model


# -- crop: exactly DynamicCache's -----------------------------------------------------------------------
def _mla_pair(batch: int, tokens: int):
    return (torch.randn(batch, 1, tokens, R), torch.randn(batch, 1, tokens, P)), {}


def _tpla_pair(batch: int, tokens: int):
    return (torch.randn(batch, 2, tokens, R // 2), torch.randn(batch, 2, tokens, P)), {"tpla": True}


CACHES = {
    "mla": (lambda cfg: MLALatentCache(cfg), _mla_pair),
    "mla-static": (lambda cfg: MLALatentCache(cfg, max_cache_len=40), _mla_pair),
    "tpla": (lambda cfg: TPLACache(cfg, num_shards=2, rotation=None), _tpla_pair),
    "tpla-static": (lambda cfg: TPLACache(cfg, num_shards=2, rotation=None, max_cache_len=40), _tpla_pair),
}


def _outcome(action):
    try:
        action()
    except Exception as error:  # the type is compared with DynamicCache's
        return type(error)
    return None


@pytest.mark.parametrize("kind", list(CACHES))
@pytest.mark.parametrize("n", [0, -1, -3, -12, -20, 3, 12, 20])
def test_crop_equals_dynamic_cache(kind, n):
    """crop(n) on every MLA/TPLA layer class leaves the same tokens as DynamicCache.crop(n) (or raises the
    same error type), and later updates continue from there identically."""
    torch.manual_seed(0)
    make, pair = CACHES[kind]
    cfg = tiny_config("deepseek_v3")
    ours, stock = make(cfg), DynamicCache()
    (k, v), kw = pair(2, 12)
    for layer in range(LAYERS):
        ours.update(k, v, layer, **kw)
        stock.update(k, v, layer)
    assert _outcome(lambda: ours.crop(n)) == _outcome(lambda: stock.crop(n))
    assert int(ours.get_seq_length()) == stock.get_seq_length()
    (k2, v2), _ = pair(2, 3)
    for layer in range(LAYERS):
        got_k, got_v = ours.update(k2, v2, layer, **kw)
        ref_k, ref_v = stock.update(k2, v2, layer)
        length = ref_k.shape[-2]
        assert int(ours.layers[layer].get_seq_length()) == length
        assert torch.equal(got_k[..., :length, :], ref_k) and torch.equal(got_v[..., :length, :], ref_v)


# -- assisted (prompt-lookup) decoding -----------------------------------------------------------------
def repetitive_prompt(period: int = 9, repeats: int = 3, seed: int = 0) -> torch.Tensor:
    """A prompt that repeats one random phrase: prompt lookup finds drafts in it."""
    phrase = torch.randint(3, 160, (1, period), generator=torch.Generator().manual_seed(seed))
    return phrase.repeat(1, repeats)


def greedy(model, ids, cache=None, new_tokens: int = 12, **kwargs):
    extra = {} if cache is None else {GENERATE_CACHE_KWARG: cache}
    return model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None,
                          **extra, **kwargs)


def forward_calls(model, attribute: str) -> int:
    state = getattr(model.model.layers[0].self_attn, attribute)
    return sum(getattr(state, name) for name in ("absorbed_calls", "tpla_calls", "expanded_calls") if hasattr(state, name))


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
@pytest.mark.parametrize("make_cache", [lambda m: MLALatentCache(m.config),
                                        lambda m: MLALatentCache(m.config, max_cache_len=64),
                                        lambda m: DynamicCache(config=m.config)],
                         ids=["latent", "latent-static", "dynamic"])
def test_prompt_lookup_on_patched_mla_gives_stock_tokens(family, make_cache):
    model = model_of(family)
    ids = repetitive_prompt()
    stock = greedy(model, ids)
    with patch_mla(model):
        got = greedy(model, ids, make_cache(model), prompt_lookup_num_tokens=4)
        calls = forward_calls(model, "kvcompress_mla")
    assert torch.equal(got, stock)
    assert calls < 12, "no draft was accepted: the test did not exercise assisted decoding"


@pytest.mark.parametrize("max_cache_len", [None, 64])
def test_prompt_lookup_on_patched_tpla_gives_its_greedy_tokens(max_cache_len):
    """Verifying drafts is a multi-token TPLA forward (per-shard softmax per query, causal): it gives the
    tokens of step-by-step TPLA decoding."""
    model = model_of()
    ids = repetitive_prompt()
    with patch_tpla(model, num_shards=2, rotation="hadamard"):
        plain = greedy(model, ids, TPLACache(model.config, num_shards=2, rotation="hadamard"))
        got = greedy(model, ids, TPLACache(model.config, num_shards=2, rotation="hadamard", max_cache_len=max_cache_len),
                     prompt_lookup_num_tokens=4)
        calls = forward_calls(model, "kvcompress_tpla") - 12  # minus the plain run's
    assert torch.equal(got, plain)
    assert calls < 12


# -- weights changed after patching ---------------------------------------------------------------------
def decode_logits(model, ids, make_cache, steps: int = 3) -> torch.Tensor:
    """Prefill and ``steps`` greedy one-token forwards; the stacked last-position logits."""
    cache = make_cache()
    out = []
    with torch.no_grad():
        logits = model(input_ids=ids, past_key_values=cache).logits[:, -1]
        for _ in range(steps):
            out.append(logits)
            logits = model(input_ids=logits.argmax(-1, keepdim=True), past_key_values=cache).logits[:, -1]
    out.append(logits)
    return torch.stack(out)


def new_kv_b_weights(model, seed: int = 11) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {f"model.layers.{i}.self_attn.kv_b_proj.weight":
            torch.randn(layer.self_attn.kv_b_proj.weight.shape, generator=generator) * 0.05
            for i, layer in enumerate(model.model.layers)}


@pytest.mark.parametrize("rotation", [None, "hadamard"])
def test_tpla_sees_weights_loaded_after_patching(rotation):
    model = model_of()
    ids = repetitive_prompt()[:, :20]
    make = lambda: TPLACache(model.config, num_shards=2, rotation=rotation)  # noqa: E731
    handle = patch_tpla(model, num_shards=2, rotation=rotation)
    before = decode_logits(model, ids, make)
    model.load_state_dict(new_kv_b_weights(model), strict=False)
    after = decode_logits(model, ids, make)
    handle.remove()
    with patch_tpla(model, num_shards=2, rotation=rotation):
        fresh = decode_logits(model, ids, make)
    assert (before - fresh).abs().max() > 1e-2  # the new weights matter
    assert torch.equal(after, fresh)


@pytest.mark.parametrize("method", ["mla", "tpla"])
def test_model_to_float64_after_patching_matches_a_fresh_patch(method):
    model = model_of(first_k_dense_replace=LAYERS)  # grouped MoE matmuls lack float64
    ids = repetitive_prompt()[:, :20]
    if method == "mla":
        patch, make = patch_mla, lambda: MLALatentCache(model.config)
    else:
        patch = lambda m: patch_tpla(m, num_shards=2, rotation="hadamard")  # noqa: E731
        make = lambda: TPLACache(model.config, num_shards=2, rotation="hadamard")  # noqa: E731
    handle = patch(model)
    decode_logits(model, ids, make)
    model.to(torch.float64)
    after = decode_logits(model, ids, make)
    handle.remove()
    with patch(model):
        fresh = decode_logits(model, ids, make)
    assert after.dtype == torch.float64
    torch.testing.assert_close(after, fresh, rtol=0, atol=1e-12)


# -- plain forwards and losses ---------------------------------------------------------------------------
PATCHES = {
    "mla": lambda m: patch_mla(m),
    "tpla-1": lambda m: patch_tpla(m, num_shards=1, rotation="hadamard"),
    "tpla-2": lambda m: patch_tpla(m, num_shards=2, rotation="hadamard"),
}


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
@pytest.mark.parametrize("patch", list(PATCHES))
def test_plain_forward_and_loss_match_stock(family, patch):
    """model(ids) / model(ids, labels=...) with the model's default cache, use_cache=False, in eval and
    train mode: the stock logits and loss. Forwards of <= max_absorbed_tokens take the method's decode
    path, exact for MLA and for one TPLA shard (N = 2 is TPLA's approximation there, so only long ones)."""
    model = model_of(family)
    ids = repetitive_prompt()[:, :24]
    lengths = (24,) if patch == "tpla-2" else (24, 6)
    with torch.no_grad():
        stock = {n: model(ids[:, :n], labels=ids[:, :n]) for n in lengths}
    with PATCHES[patch](model):
        for n in lengths:
            for kwargs in (lambda: {}, lambda: {"use_cache": False},
                           lambda: {"past_key_values": DynamicCache(config=model.config)}):
                with torch.no_grad():
                    plain = model(ids[:, :n], **kwargs()).logits
                    out = model(ids[:, :n], labels=ids[:, :n], **kwargs())
                torch.testing.assert_close(plain, stock[n].logits, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(out.loss, stock[n].loss, rtol=1e-5, atol=1e-5)
        model.train()
        loss = model(ids, labels=ids).loss
        loss.backward()
        model.eval()
    torch.testing.assert_close(loss.detach(), stock[24].loss, rtol=1e-5, atol=1e-5)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_tpla_over_a_stock_cache_decodes_like_a_tpla_cache():
    """A TPLA-patched model over DynamicCache / MLALatentCache (which hold the stock latent) decodes with
    the same per-shard softmax as over a TPLACache."""
    model = model_of()
    ids = repetitive_prompt()[:, :20]
    with patch_tpla(model, num_shards=2, rotation="hadamard"):
        ref = decode_logits(model, ids, lambda: TPLACache(model.config, num_shards=2, rotation="hadamard"))
        for make in (lambda: DynamicCache(config=model.config), lambda: MLALatentCache(model.config)):
            torch.testing.assert_close(decode_logits(model, ids, make), ref, rtol=1e-5, atol=1e-5)


# -- a cache for another number of layers -------------------------------------------------------------------
@pytest.mark.parametrize("layers", [2, 6])
@pytest.mark.parametrize("max_cache_len", [None, 64])
def test_tpla_cache_for_another_layer_count_is_refused_before_any_write(layers, max_cache_len):
    model = model_of()
    cache = TPLACache(tiny_config("deepseek_v3", num_hidden_layers=layers), num_shards=2, rotation=None,
                      max_cache_len=max_cache_len)
    ids = repetitive_prompt()
    with patch_tpla(model, num_shards=2, rotation=None), torch.no_grad():
        for length in (24, 3):
            with pytest.raises(ValueError, match=f"built for {layers} layers but the model.*has 4"):
                model(ids[:, :length], past_key_values=cache)
    assert not any(layer.is_initialized for layer in cache.layers)



UNPATCHED_CACHES = {
    "mla": lambda cfg: MLALatentCache(cfg),
    "mla-static": lambda cfg: MLALatentCache(cfg, max_cache_len=64),
    "tpla": lambda cfg: TPLACache(cfg, num_shards=2, rotation=None),
    "tpla-static": lambda cfg: TPLACache(cfg, num_shards=2, rotation=None, max_cache_len=64),
}


def held_tokens(cache) -> list[int]:
    return [int(layer.get_seq_length()) if layer.is_initialized else 0 for layer in cache.layers]


@pytest.mark.parametrize("kind", list(UNPATCHED_CACHES))
def test_unpatched_cache_for_fewer_layers_names_both_counts_and_refuses(kind):
    """A 2-layer cache in an unpatched 4-layer model's generate: layer 2's update raises a ValueError naming
    both layer counts before it writes, and the cache then refuses further use (layers 0-1 hold the
    prompt, a forward ahead of the rest) until reset()."""
    model = model_of()
    cache = UNPATCHED_CACHES[kind](tiny_config("deepseek_v3", num_hidden_layers=2))
    ids = repetitive_prompt()
    with pytest.raises(ValueError, match=r"built for 2 layers but the model has at least 3 layers"):
        greedy(model, ids, cache, new_tokens=3)
    assert held_tokens(cache) == [27, 27]
    with pytest.raises(RuntimeError, match="reset"):
        greedy(model, ids, cache, new_tokens=3)
    assert held_tokens(cache) == [27, 27]
    cache.reset()
    with pytest.raises(ValueError, match=r"built for 2 layers but the model has at least 3 layers"):
        greedy(model, ids, cache, new_tokens=3)


@pytest.mark.parametrize("kind", list(UNPATCHED_CACHES))
def test_unpatched_cache_for_more_layers_is_refused_before_the_next_forward_writes(kind):
    """A 6-layer cache in an unpatched 4-layer model: the prefill fills layers 0-3; the first layer of the
    next forward refuses, naming both counts, before it writes anything (it used to go on silently)."""
    model = model_of()
    cache = UNPATCHED_CACHES[kind](tiny_config("deepseek_v3", num_hidden_layers=6))
    ids = repetitive_prompt()
    with pytest.raises(RuntimeError, match=r"model has 4 layers where this cache was built for 6 layers"):
        greedy(model, ids, cache, new_tokens=3)
    assert held_tokens(cache) == [27] * 4 + [0, 0]


@pytest.mark.parametrize("kind", list(UNPATCHED_CACHES))
def test_forward_stopped_part_way_refuses_the_cache_until_reset(kind):
    """A decode step interrupted inside layer 1 (after layers 0 and 1 took its token): the next step refuses
    instead of attending over layers one token apart; after reset() the cache gives DynamicCache's logits."""
    model = model_of()
    ids = repetitive_prompt()[:, :20]
    with torch.no_grad():
        stock = model(ids, past_key_values=DynamicCache(config=model.config)).logits
    cache = UNPATCHED_CACHES[kind](model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache)

    def interrupt(module, args, output):
        raise KeyboardInterrupt

    hook = model.model.layers[1].self_attn.o_proj.register_forward_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt), torch.no_grad():
            model(ids[:, :1], past_key_values=cache)
    finally:
        hook.remove()
    assert held_tokens(cache) == [21, 21, 20, 20]
    with pytest.raises(RuntimeError, match=r"layers 0\.\.1 hold 21 tokens, layer 2 holds 20.*reset"), torch.no_grad():
        model(ids[:, :1], past_key_values=cache)
    assert held_tokens(cache) == [21, 21, 20, 20]
    cache.reset()
    with torch.no_grad():
        logits = model(ids, past_key_values=cache).logits
    torch.testing.assert_close(logits, stock, rtol=1e-5, atol=1e-5)



# -- memory allocated next to memory held -------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mla", "tpla"])
def test_growable_storage_allocates_in_proportion_to_the_prompt(kind):
    """A 300-token prompt and a few decoded tokens: the growable latent caches allocate at most ~1.1x the
    bytes they hold (the first allocation is proportional to the prompt, not the prompt + 256 tokens)."""
    cfg = tiny_config("deepseek_v3")
    cache = UNPATCHED_CACHES[kind](cfg)
    _, pair = CACHES[kind]
    for tokens in [300] + [1] * 8:
        (k, v), kw = pair(1, tokens)
        for layer in range(LAYERS):
            cache.update(k, v, layer, **kw)
        assert cache.nbytes() == (cache.expected_nbytes() if kind == "mla" else 2 * cache.expected_shard_nbytes())
        assert cache.nbytes() <= cache.reserved_nbytes() <= 1.1 * cache.nbytes(), (tokens, cache.reserved_nbytes())


# -- calibration input and unsupported models --------------------------------------------------------------
@pytest.mark.parametrize("calibration, error, match", [
    (torch.full((1, 8), 160), ValueError, r"calibration token ids must lie in \[0, 160\).*from 160 to 160"),
    (torch.tensor([[3, -1, 4]]), ValueError, r"calibration token ids must lie in \[0, 160\)"),
    (torch.ones(1, 8), TypeError, "calibration must hold integer token ids.*torch.float32"),
    (torch.ones(1, 8, dtype=torch.bool), TypeError, "calibration must hold integer token ids"),
    (torch.arange(8), ValueError, r"calibration must be None or a 2-D tensor.*\(8,\)"),
    ([[1, 2, 3]], ValueError, "calibration must be None or a 2-D tensor.*list"),
])
def test_bad_calibration_is_refused_before_any_change(calibration, error, match):
    model = model_of()
    with pytest.raises(error, match=match):
        patch_tpla(model, num_shards=2, rotation="pca", calibration=calibration)
    assert not any("forward" in layer.self_attn.__dict__ for layer in model.model.layers)
    with patch_tpla(model, num_shards=2, rotation="pca", calibration=torch.randint(0, 160, (2, 16))):
        pass


def test_llama_is_refused_naming_model_type_and_supported_types():
    llama = tiny_model("llama")
    for action in (lambda: patch_mla(llama), lambda: patch_tpla(llama), lambda: MLALatentCache(llama.config),
                   lambda: TPLACache(llama.config)):
        with pytest.raises(ValueError, match=r"model_type='llama'.*\['deepseek_v2', 'deepseek_v3'\]"):
            action()
    assert "forward" not in llama.model.layers[0].self_attn.__dict__
