"""TPLACache(max_cache_len=N): static layers (kvcompress.storage.StaticBufferLayer) with the meaning
MLALatentCache gives max_cache_len: fixed shapes, in-place updates at a device counter, is_compileable;
the TPLA decode reads the valid length from that counter. CPU: eager, and torch.compile with the
``eager`` / ``aot_eager`` backends (fullgraph)."""

from __future__ import annotations

import pytest
import torch
from transformers import CompileConfig, DynamicCache

from test_mla_compile import check_compiled_steps, generate_compiled_twice, prompts
from test_tpla import generate, prompt_batch, tpla_model
from kvcompress import make_cache, patch_model
from kvcompress.tpla import StaticTPLALayer, TPLACache, TPLALayer, patch_tpla

R, P, LAYERS = 32, 8, 4


def test_static_layers_and_compileability():
    model = tpla_model()
    static = TPLACache(model.config, num_shards=2, rotation="hadamard", max_cache_len=48)
    grow = TPLACache(model.config, num_shards=2, rotation="hadamard")
    assert static.is_compileable and not grow.is_compileable
    assert all(isinstance(layer, StaticTPLALayer) for layer in static.layers)
    assert all(isinstance(layer, TPLALayer) for layer in grow.layers)
    ids, mask = prompt_batch()
    with patch_tpla(model, num_shards=2, rotation="hadamard"):
        generate(model, ids, mask, static, new_tokens=5)
    layer = static.layers[0]
    tokens = 24 + 4  # the last generated token is never fed back
    assert layer.keys.shape == (2, 2, 48, R // 2) and layer.values.shape == (2, 2, 48, P)
    assert int(layer.get_seq_length()) == tokens and static.get_mask_sizes(1, 0)[0] == 48
    formula = LAYERS * 2 * tokens * (R // 2 + P) * 4
    assert static.shard_nbytes(0) == static.shard_nbytes(1) == static.expected_shard_nbytes() == formula
    assert static.nbytes() == 2 * formula and static.reserved_nbytes() == LAYERS * 2 * 2 * 48 * (R // 2 + P) * 4


@pytest.mark.parametrize("num_shards, rotation", [(1, None), (2, "hadamard"), (4, None)])
def test_static_equals_growable(num_shards, rotation):
    """The same tokens and logits (fp32 rounding) from the static and the growable TPLACache."""
    model = tpla_model()
    ids, mask = prompt_batch()
    with patch_tpla(model, num_shards=num_shards, rotation=rotation):
        ref_tokens, ref_logits = generate(model, ids, mask, TPLACache(model.config, num_shards=num_shards,
                                                                       rotation=rotation))
        tokens, logits = generate(model, ids, mask, TPLACache(model.config, num_shards=num_shards, rotation=rotation,
                                                              max_cache_len=40))
    assert torch.equal(tokens, ref_tokens)
    assert (logits - ref_logits).abs().max() < 1e-4


def test_static_on_an_unpatched_model_is_stock():
    model = tpla_model()
    ids, mask = prompt_batch()
    ref_tokens, ref_logits = generate(model, ids, mask, DynamicCache(config=model.config))
    tokens, logits = generate(model, ids, mask, TPLACache(model.config, num_shards=2, rotation=None, max_cache_len=40))
    assert torch.equal(tokens, ref_tokens) and (logits - ref_logits).abs().max() < 1e-5


def test_static_overflow_and_bad_capacity():
    model = tpla_model()
    ids, mask = prompt_batch()
    with patch_tpla(model, num_shards=2, rotation=None):
        with pytest.raises(ValueError, match="max_cache_len=26"):
            generate(model, ids, mask, TPLACache(model.config, num_shards=2, rotation=None, max_cache_len=26))
    for bad in (0, -4, 2.5, True):
        with pytest.raises((TypeError, ValueError), match=r"max_cache_len=.*allowed: int >= 1"):
            TPLACache(model.config, num_shards=2, rotation=None, max_cache_len=bad)


def test_registry_builds_the_static_cache():
    """make_cache / patch_model take max_cache_len for tpla as for mla."""
    model = tpla_model()
    cache = make_cache("tpla", model, num_shards=2, rotation=None, max_cache_len=40)
    assert isinstance(cache, TPLACache) and all(isinstance(layer, StaticTPLALayer) for layer in cache.layers)
    ids, mask = prompt_batch()
    with patch_tpla(model, num_shards=2, rotation=None):
        ref_tokens, _ = generate(model, ids, mask, TPLACache(model.config, num_shards=2, rotation=None))
    with patch_model(model, "tpla", num_shards=2, rotation=None, max_cache_len=40) as handle:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                             eos_token_id=None)
        assert isinstance(handle.last_cache.layers[0], StaticTPLALayer)
    assert torch.equal(out, ref_tokens)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_static_decode_step_compiles_fullgraph_without_recompiles(backend):
    """Patched TPLA decode steps compiled with fullgraph=True over the static cache: eager's logits, one
    graph reused at every step (lengths live on the device)."""
    model = tpla_model()
    ids, mask = prompts([12, 9])
    cache = TPLACache(model.config, num_shards=2, rotation="hadamard", max_cache_len=32)
    eager_cache = TPLACache(model.config, num_shards=2, rotation="hadamard", max_cache_len=32)
    with patch_tpla(model, num_shards=2, rotation="hadamard", max_absorbed_tokens=4):
        check_compiled_steps(model, cache, eager_cache, ids, mask, 32, backend)
    assert int(cache.layers[0].get_seq_length()) == 12 + 4


def test_generate_compiles_the_tpla_decode_step():
    """generate()'s own compile path (backend 'eager', fullgraph, forced on CPU) with the static cache:
    the eager tokens, no graph breaks, no recompile in a second generate."""
    model = tpla_model()
    ids, mask = prompts([20, 13])
    config = CompileConfig(backend="eager", fullgraph=True)
    config._compile_all_devices = True  # generate() compiles only on accelerators unless told
    with patch_tpla(model, num_shards=2, rotation="hadamard"):
        first = generate_compiled_twice(
            model, lambda: TPLACache(model.config, num_shards=2, rotation="hadamard", max_cache_len=40), ids, mask,
            config)
    assert first >= 1
