"""TPLA's prefill in MLA form (``prefill="mla"``) and rotations folded into the projection weights
(``fold_rotation=True``): equal to the stock prefill / the run-time rotation where the maths says so,
different where the per-shard softmax makes them differ. Tiny random DeepSeek-V3 models, CPU."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from test_mla_compile import check_compiled_steps, prompts
from test_tpla import generate, mla_reference, prompt_batch, tpla_model
from kvcompress import patch_model
from kvcompress.mla import MLALatentCache
from kvcompress.tpla import TPLACache, patch_tpla


def run(model, ids, mask, num_shards, rotation, new_tokens=8, max_cache_len=None, **patch):
    with patch_tpla(model, num_shards=num_shards, rotation=rotation, **patch):
        cache = TPLACache(model.config, num_shards=num_shards, rotation=rotation, max_cache_len=max_cache_len)
        return generate(model, ids, mask, cache, new_tokens)


def short_prompt(length: int = 8):
    ids = torch.randint(3, 160, (2, length), generator=torch.Generator().manual_seed(4))
    return ids, torch.ones_like(ids)


def uniform_norm(model, value: float = 1.3):
    """kv_a_layernorm's weight g = value * 1: diag(g) commutes with every rotation."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.kv_a_layernorm.weight.fill_(value)
    return model


# -- prefill in MLA form -------------------------------------------------------------------------------
@pytest.mark.parametrize("length", [8, 24])
@pytest.mark.parametrize("max_cache_len", [None, 40])
def test_mla_prefill_is_the_stock_prefill_bitwise(length, max_cache_len):
    """On an empty cache the prompt (short or long) runs the stock arithmetic: the first logits are the
    unpatched model's bit for bit, for the growable and the static cache."""
    model = tpla_model()
    ids, mask = prompt_batch(length=length)
    _, ref = generate(model, ids, mask, DynamicCache(config=model.config), new_tokens=1)
    _, logits = run(model, ids, mask, 2, "hadamard", new_tokens=1, max_cache_len=max_cache_len)
    assert torch.equal(logits, ref)


@pytest.mark.parametrize("num_shards, rotation", [(2, "hadamard"), (4, "pca"), (2, None)])
def test_mla_prefill_equals_the_tpla_prefill_for_long_prompts(num_shards, rotation):
    """Prompts longer than max_absorbed_tokens: both prefill modes are exact MLA (rounding apart), and the
    decode that follows is the same TPLA decode: same tokens, logits within fp32 rounding."""
    model = tpla_model()
    ids, mask = prompt_batch(length=24)
    tokens, logits = run(model, ids, mask, num_shards, rotation)
    ref_tokens, ref_logits = run(model, ids, mask, num_shards, rotation, prefill="tpla")
    assert torch.equal(tokens, ref_tokens)
    assert (logits - ref_logits).abs().max() < 1e-5


def test_short_prompts_differ_where_the_split_changes_the_softmax():
    """A prompt of at most max_absorbed_tokens tokens: prefill="tpla" takes the per-shard softmax (not MLA),
    prefill="mla" is the stock prefill; with one token both are exact (every shard's softmax is 1)."""
    model = tpla_model()
    ids, mask = short_prompt(8)
    _, ref = generate(model, ids, mask, DynamicCache(config=model.config), new_tokens=1)
    _, mla_form = run(model, ids, mask, 2, "hadamard", new_tokens=1)
    _, split = run(model, ids, mask, 2, "hadamard", new_tokens=1, prefill="tpla")
    assert torch.equal(mla_form, ref)
    assert (split - ref).abs().max() > 1e-4  # the per-shard softmax's error, far above fp32 rounding
    one, one_mask = short_prompt(1)
    _, ref = generate(model, one, one_mask, DynamicCache(config=model.config), new_tokens=1)
    _, split = run(model, one, one_mask, 2, "hadamard", new_tokens=1, prefill="tpla")
    assert (split - ref).abs().max() < 1e-5


@pytest.mark.parametrize("max_cache_len", [None, 64])
def test_long_forward_on_a_filled_cache(max_cache_len):
    """A second long forward (a continued prompt): the new tokens' keys/values from kv_b_proj, the cached
    ones from the slices; equal to prefill="tpla" (all from slices) and to absorbed-MLA caching of the same
    forwards, within fp32 rounding. The static cache hands back its capacity and the mask is cut to the
    valid tokens."""
    model = tpla_model()
    ids, mask = prompt_batch(length=24)
    more = torch.randint(3, 160, (2, 20), generator=torch.Generator().manual_seed(9))
    full_mask = torch.cat([mask, torch.ones_like(more)], dim=1)

    def two_forwards(**patch):
        with patch_tpla(model, num_shards=2, rotation="hadamard", **patch), torch.no_grad():
            cache = TPLACache(model.config, num_shards=2, rotation="hadamard", max_cache_len=max_cache_len)
            model(input_ids=ids, attention_mask=mask, past_key_values=cache)
            return model(input_ids=more, attention_mask=full_mask, past_key_values=cache).logits

    mla_form, split = two_forwards(), two_forwards(prefill="tpla")
    from kvcompress.mla import patch_mla

    with patch_mla(model), torch.no_grad():
        cache = MLALatentCache(model.config)
        model(input_ids=ids, attention_mask=mask, past_key_values=cache)
        ref = model(input_ids=more, attention_mask=full_mask, past_key_values=cache).logits
    assert (mla_form - split).abs().max() < 1e-5
    assert (mla_form - ref).abs().max() < 1e-5


def test_stock_latent_cache_prefill_is_stock():
    """A patched model over a DynamicCache (the stock latent): the prompt is the stock prefill bit for bit."""
    model = tpla_model()
    ids, mask = prompt_batch(length=24)
    _, ref = generate(model, ids, mask, DynamicCache(config=model.config), new_tokens=1)
    with patch_tpla(model, num_shards=2, rotation="hadamard"):
        _, logits = generate(model, ids, mask, DynamicCache(config=model.config), new_tokens=1)
    assert torch.equal(logits, ref)


# -- rotations folded into the weights ------------------------------------------------------------------
@pytest.mark.parametrize("rotation", ["hadamard", "pca"])
def test_fold_equals_runtime_rotation_for_one_shard(rotation):
    """N = 1: folded == unfolded (== absorbed MLA) for any kv_a_layernorm weight, fp32 tolerance."""
    model = tpla_model()
    ids, mask = prompt_batch()
    ref_tokens, ref_logits = mla_reference(model, ids, mask)
    unfolded_tokens, unfolded = run(model, ids, mask, 1, rotation)
    tokens, logits = run(model, ids, mask, 1, rotation, fold_rotation=True)
    assert torch.equal(tokens, unfolded_tokens) and torch.equal(tokens, ref_tokens)
    assert (logits - unfolded).abs().max() < 1e-5 and (logits - ref_logits).abs().max() < 1e-4


@pytest.mark.parametrize("num_shards", [2, 4])
@pytest.mark.parametrize("rotation", ["hadamard", "pca"])
@pytest.mark.parametrize("max_cache_len", [None, 40])
def test_fold_equals_runtime_rotation_with_a_uniform_norm_weight(num_shards, rotation, max_cache_len):
    """N > 1 with g uniform (diag(g) commutes with Q): every shard holds the same slice either way, so
    folded == unfolded TPLA within fp32 tolerance (the decode is per-shard, so this is not MLA)."""
    model = uniform_norm(tpla_model())
    ids, mask = prompt_batch()
    ref_tokens, ref = run(model, ids, mask, num_shards, rotation, max_cache_len=max_cache_len)
    tokens, logits = run(model, ids, mask, num_shards, rotation, max_cache_len=max_cache_len, fold_rotation=True)
    assert torch.equal(tokens, ref_tokens)
    assert (logits - ref).abs().max() < 1e-5


def test_fold_with_uneven_norm_weight_is_another_split():
    """N = 2 with a non-uniform g: the folded shards split Q^T n, the unfolded ones Q^T (g * n); the
    per-shard softmaxes then see different partial scores, so the outputs differ beyond rounding (the
    docstring's statement), while both stay TPLA-close to MLA."""
    model = tpla_model()
    ids, mask = prompt_batch()
    _, mla = mla_reference(model, ids, mask)
    _, unfolded = run(model, ids, mask, 2, "hadamard")
    _, folded = run(model, ids, mask, 2, "hadamard", fold_rotation=True)
    tpla_error = (unfolded - mla).abs().max()
    assert (folded - unfolded).abs().max() > 1e-4
    assert (folded - mla).abs().max() < 10 * tpla_error


def test_folded_decode_applies_no_rotation():
    """After the prefill the folded decode never touches Q: poisoning it with NaN changes nothing."""
    model = uniform_norm(tpla_model())
    ids, mask = prompt_batch()
    ref_tokens, ref = run(model, ids, mask, 2, "hadamard", fold_rotation=True)
    with patch_tpla(model, num_shards=2, rotation="hadamard", fold_rotation=True), torch.no_grad():
        cache = TPLACache(model.config, num_shards=2, rotation="hadamard")
        out = model(input_ids=ids, attention_mask=mask, past_key_values=cache)
        for attn in (layer.self_attn for layer in model.model.layers):
            attn.kvcompress_tpla.folded.rotation.fill_(float("nan"))
        token, step_mask = out.logits[:, -1:].argmax(-1), mask
        for step in range(1, 8):
            step_mask = torch.cat([step_mask, torch.ones_like(token)], dim=1)
            out = model(input_ids=token, attention_mask=step_mask, past_key_values=cache)
            assert torch.isfinite(out.logits).all()
            assert (out.logits[:, -1] - ref[step]).abs().max() < 1e-5
            token = out.logits[:, -1:].argmax(-1)
            assert torch.equal(token[:, 0], ref_tokens[:, ids.shape[1] + step])


def test_fold_follows_weight_changes_and_refuses_mixed_caches():
    """The folded kv_a rows and W_b diag(g) Q are re-derived after an in-place weight change (N = 1 stays
    MLA); a TPLACache filled by a folded patch refuses an unfolded one; a DynamicCache is served unfolded."""
    model = tpla_model()
    ids, mask = prompt_batch()
    with patch_tpla(model, num_shards=1, rotation="hadamard", fold_rotation=True):
        folded = model.model.layers[0].self_attn.kvcompress_tpla.folded
        builds = folded.builds
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.kv_a_layernorm.weight.mul_(1.5)
                layer.self_attn.kv_a_proj_with_mqa.weight.mul_(0.9)
        tokens, logits = generate(model, ids, mask, TPLACache(model.config, num_shards=1, rotation="hadamard"))
        assert folded.builds == builds + 1
        dyn_tokens, _ = generate(model, ids, mask, DynamicCache(config=model.config))
        filled = TPLACache(model.config, num_shards=1, rotation="hadamard")
        generate(model, ids, mask, filled, new_tokens=1)
    ref_tokens, ref_logits = mla_reference(model, ids, mask)
    assert torch.equal(tokens, ref_tokens) and (logits - ref_logits).abs().max() < 1e-4
    assert torch.equal(dyn_tokens, ref_tokens)
    with patch_tpla(model, num_shards=1, rotation="hadamard"):
        with pytest.raises(ValueError, match="fold_rotation"):
            generate(model, ids, mask, filled, new_tokens=1)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_folded_static_decode_compiles_fullgraph(backend):
    """The folded decode step over the static cache compiles with fullgraph=True, matches eager, no recompiles."""
    model = tpla_model()
    ids, mask = prompts([12, 9])
    cache = TPLACache(model.config, num_shards=2, rotation="hadamard", max_cache_len=32)
    eager_cache = TPLACache(model.config, num_shards=2, rotation="hadamard", max_cache_len=32)
    with patch_tpla(model, num_shards=2, rotation="hadamard", max_absorbed_tokens=4, fold_rotation=True):
        check_compiled_steps(model, cache, eager_cache, ids, mask, 32, backend)


def test_folded_weights_are_static_addresses():
    """The tensors a compiled step reads off the patch (not parameters) are marked as fixed addresses, so
    CUDA graphs do not copy them into the graph inputs at each replay."""
    model = tpla_model()
    with patch_tpla(model, num_shards=2, rotation="hadamard", fold_rotation=True):
        state = model.model.layers[0].self_attn.kvcompress_tpla
        for tensor in (state.folded.kv_b, state.folded.kv_a, state.folded.rotation):
            assert getattr(tensor, "_dynamo_static_input_type", None) is not None
    with patch_tpla(model, num_shards=2, rotation="hadamard"):
        state = model.model.layers[0].self_attn.kvcompress_tpla
        assert state.folded is None
        assert getattr(state.weights.kv_b, "_dynamo_static_input_type", None) is not None


def test_registry_passes_prefill_and_fold():
    model = uniform_norm(tpla_model())
    ids, mask = prompt_batch()
    ref_tokens, _ = run(model, ids, mask, 2, "hadamard", fold_rotation=True, prefill="tpla")
    with patch_model(model, "tpla", num_shards=2, rotation="hadamard", fold_rotation=True, prefill="tpla") as handle:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                             eos_token_id=None)
        state = model.model.layers[0].self_attn.kvcompress_tpla
        assert state.prefill == "tpla" and state.folded is not None and isinstance(handle.last_cache, TPLACache)
    assert torch.equal(out, ref_tokens)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(prefill="split"), ValueError, r"prefill=.*allowed"),
    (dict(prefill=None), (TypeError, ValueError), "prefill"),
    (dict(fold_rotation="yes"), (TypeError, ValueError), "fold_rotation"),
])
def test_bad_prefill_and_fold_refused(kwargs, error, match):
    model = tpla_model()
    with pytest.raises(error, match=match):
        patch_tpla(model, num_shards=2, rotation="hadamard", **kwargs)
    assert not hasattr(model.model.layers[0].self_attn, "kvcompress_tpla")


def test_generate_compiles_the_folded_decode_step():
    """generate()'s compile path (backend 'eager', fullgraph, forced on CPU) with the folded patch and the
    static cache: the eager tokens, no graph breaks, no recompile in a second generate."""
    from transformers import CompileConfig

    from test_mla_compile import generate_compiled_twice

    model = tpla_model()
    ids, mask = prompts([20, 13])
    config = CompileConfig(backend="eager", fullgraph=True)
    config._compile_all_devices = True  # generate() compiles only on accelerators unless told
    with patch_tpla(model, num_shards=2, rotation="hadamard", fold_rotation=True):
        first = generate_compiled_twice(
            model, lambda: TPLACache(model.config, num_shards=2, rotation="hadamard", max_cache_len=40), ids, mask,
            config)
    assert first >= 1
