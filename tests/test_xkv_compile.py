"""Static-capacity XKVCache (``max_cache_len``) under torch.compile (CUDA graphs / compile).

The static cache keeps ``sinks + compressed tokens + tail capacity == max_cache_len`` and counts the tail on
the device, so a decode step has the same shapes and no Python-int length at every step: generate() can
compile it (CUDA graphs on GPU). CPU tests trace with dynamo's ``eager``/``aot_eager`` backends
(``fullgraph=True``: a graph break fails) and count frames; the GPU test (``-m gpu``) runs inductor in mode
``reduce-overhead`` with the fused Triton decode inside.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import CompileConfig, DynamicCache

from conftest import tiny_model
from test_mla_compile import cache_kwarg, check_compiled_steps, generate_compiled_twice, greedy, prompts
from kvcompress.xkv import XKVCache, XKVLayer, patch_xkv

SMALL = dict(sink=2, window=8, min_compress_tokens=4)  # tiny prompts still get a compressed segment


def make_model(family: str = "llama", device: str = "cpu", dtype: torch.dtype = torch.float32):
    model = tiny_model(family, dtype=dtype).to(device)
    model.config._attn_implementation = "sdpa"
    return model


def test_static_cache_keeps_the_capacity_invariant_and_the_formula():
    model = make_model()
    ids, mask = prompts([40, 31])
    cache = XKVCache(model.config, max_cache_len=64, **SMALL)
    assert cache.is_compileable and not XKVCache(model.config, **SMALL).is_compileable
    with patch_xkv(model):
        greedy(model, cache, ids, mask, new_tokens=6, disable_compile=True)
    for layer in cache.layers:
        assert isinstance(layer, XKVLayer) and layer.key_rights, "the prompt was not compressed"
        compressed = sum(s.length for s in layer.group.segments)
        # sinks + compressed + tail capacity == max_cache_len: every step's shapes are the same
        assert layer.sink_keys.shape[-2] + compressed + layer.tail_capacity() == 64
        assert int(layer.get_seq_length()) == layer.seq_tokens() == 40 + 5  # last token never fed back
        assert layer.get_mask_sizes(1) == (64, 0) and layer.get_max_length() == 64
    assert cache.nbytes() == cache.expected_nbytes()
    assert cache.reserved_nbytes() > cache.nbytes()  # the tail's free slots


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("fused", [False, True])
def test_static_cache_greedy_matches_growable(family, fused):
    """fp32: the static-capacity cache gives the growable cache's tokens (rebuild path and fused decode),
    and at full rank both equal stock DynamicCache."""
    model = make_model(family)
    ids, mask = prompts([40, 31])
    grow = greedy(model, XKVCache(model.config, **SMALL), ids, mask, new_tokens=8)
    full = greedy(model, XKVCache(model.config, rank_k=None, rank_v=None, factor_bits=None, matrix_bits=None, max_cache_len=56, **SMALL), ids, mask,
                  new_tokens=8, disable_compile=True)
    stock = greedy(model, DynamicCache(config=model.config), ids, mask, new_tokens=8)
    with patch_xkv(model) if fused else contextlib.nullcontext():
        static = greedy(model, XKVCache(model.config, max_cache_len=56, **SMALL), ids, mask, new_tokens=8,
                        disable_compile=True)
    assert torch.equal(grow, static)
    assert torch.equal(full, stock)


def _static_storage(cache: XKVCache) -> dict[tuple, int]:
    """Address of every tensor a compiled decode step reads, by role."""
    out = {}
    for layer in cache.layers:
        i = layer.layer_idx
        out.update({("tail_keys", i): layer._key_buffer.data_ptr(), ("tail_values", i): layer._value_buffer.data_ptr(),
                    ("tail_length", i): layer.tail_length.data_ptr(), ("sink_keys", i): layer.sink_keys.data_ptr()})
        out.update({("key_right", i, j): t.data_ptr() for j, t in enumerate(layer.key_rights)})
        out.update({("value_right", i, j): t.data_ptr() for j, t in enumerate(layer.value_rights)})
    for g, group in enumerate(cache.groups):
        for j, segment in enumerate(group.segments):
            out[("key_factor", g, j)] = segment.key_factor.data_ptr()
            out[("value_factor", g, j)] = segment.value_factor.data_ptr()
    for key, (cos, sin) in cache._rope_tables.items():
        out[("cos", *key)], out[("sin", *key)] = cos.data_ptr(), sin.data_ptr()
    return out


@pytest.mark.parametrize("chunk", [None, 16])
def test_static_cache_reset_keeps_storage_so_graphs_replay(chunk):
    """After reset(), a sequence of the same shapes writes into the same tensors (the CUDA graphs recorded
    for the first sequence replay: no re-recording per request), with the tokens of a fresh cache; a sequence
    of other shapes still gets a fresh cache's tokens, and what it cannot reuse is freed at the next reset."""
    model = make_model()
    ids, mask = prompts([40, 31])
    gen = dict(new_tokens=6, disable_compile=True)
    if chunk:
        gen["prefill_chunk_size"] = chunk
    make = lambda: XKVCache(model.config, max_cache_len=56, **SMALL)  # noqa: E731
    with patch_xkv(model):
        fresh = greedy(model, make(), ids, mask, **gen)
        cache = make()
        first = greedy(model, cache, ids, mask, **gen)
        before = _static_storage(cache)
        assert any(role[0] == "key_factor" for role in before) and any(role[0] == "cos" for role in before)
        reserved = cache.reserved_nbytes()
        cache.reset()
        # the kept storage is still allocated: reserved_nbytes says so, nbytes counts no tokens
        assert cache.nbytes() == 0 and cache.reserved_nbytes() == reserved
        again = greedy(model, cache, ids, mask, **gen)
        assert cache.reserved_nbytes() == reserved
        assert _static_storage(cache) == before  # every tensor of the decode step at its old address
        assert not cache._kept_storage
        assert torch.equal(first, fresh) and torch.equal(again, fresh)
        # another prompt length: other shapes; the cache still gives a fresh cache's tokens
        ids2, mask2 = prompts([33, 26], seed=3)
        cache.reset()
        other = greedy(model, cache, ids2, mask2, **gen)
        assert torch.equal(other, greedy(model, make(), ids2, mask2, **gen))
        stale = dict(cache._kept_storage)
        assert stale, "the first sequence's factors (other lengths) are still kept, until the next reset"
        cache.reset()
        assert all(cache._kept_storage.get(role) is not t for role, t in stale.items())
    growable = XKVCache(model.config, **SMALL)
    greedy(model, growable, ids, mask, **gen)
    growable.reset()
    assert not growable._kept_storage  # only a static capacity keeps storage


def test_static_cache_overflow_names_max_cache_len_and_changes_nothing():
    model = make_model()
    ids, mask = prompts([40, 31])
    with pytest.raises(ValueError, match="max_cache_len=44"):
        greedy(model, XKVCache(model.config, max_cache_len=44, **SMALL), ids, mask, new_tokens=8, disable_compile=True)
    with pytest.raises(ValueError, match="max_cache_len=30"):  # the prompt alone
        greedy(model, XKVCache(model.config, max_cache_len=30, **SMALL), ids, mask, new_tokens=2, disable_compile=True)
    for bad, error in ((0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError), ("64", TypeError)):
        with pytest.raises(error, match="max_cache_len"):
            XKVCache(model.config, max_cache_len=bad)
    # a failed step leaves the cache as it was: the overflowing token is refused before it is written
    cache = XKVCache(model.config, max_cache_len=41, **SMALL)
    greedy(model, cache, ids, mask, new_tokens=2, disable_compile=True)  # 40 + 1 tokens: full
    before = [layer.seq_tokens() for layer in cache.layers]
    with pytest.raises(ValueError, match="max_cache_len=41"):
        model(input_ids=ids[:, :1], use_cache=True, **{cache_kwarg(model): cache})
    assert [layer.seq_tokens() for layer in cache.layers] == before


@pytest.mark.parametrize("merge", [True, False])
def test_second_turn_compresses_again_in_a_static_cache(merge):
    """A multi-token update after decode steps (a next turn) folds the tail into the segment (merged) or a
    second segment and keeps the capacity invariant; tokens equal the growable cache's."""
    model = make_model()
    ids, mask = prompts([40, 31])
    turn2 = torch.randint(3, 160, (2, 20), generator=torch.Generator().manual_seed(5))
    outs = []
    for cap in (None, 120):
        cache = XKVCache(model.config, max_cache_len=cap, merge_segments=merge, **SMALL)
        first = greedy(model, cache, ids, mask, new_tokens=6, disable_compile=True)
        ids2 = torch.cat([first, turn2], dim=1)
        mask2 = torch.cat([mask, torch.ones(2, ids2.shape[1] - mask.shape[1], dtype=mask.dtype)], dim=1)
        outs.append(greedy(model, cache, ids2, mask2, new_tokens=6, disable_compile=True))
        assert len(cache.groups[0].segments) == (1 if merge else 2)
        assert cache.nbytes() == cache.expected_nbytes()
        if cap is not None:
            layer = cache.layers[0]
            assert layer.sink_keys.shape[-2] + sum(s.length for s in layer.group.segments) + layer.tail_capacity() == cap
    assert torch.equal(outs[0], outs[1])


# -- compile (CPU tracing) ------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("fused", [False, True])
def test_decode_step_traces_fullgraph_without_recompiles(backend, fused):
    """One decode step compiled with fullgraph=True (a graph break raises) is traced once and reused for
    several steps with eager's logits; ``aot_eager`` also functionalises the in-place tail writes."""
    model = make_model()
    ids, mask = prompts([40, 31])
    cache, eager_cache = (XKVCache(model.config, max_cache_len=48, **SMALL) for _ in range(2))
    with patch_xkv(model) if fused else contextlib.nullcontext():  # the eager prefill compresses
        check_compiled_steps(model, cache, eager_cache, ids, mask, 48, backend)
    assert cache.layers[0].seq_tokens() == 40 + 4
    assert cache.nbytes() == eager_cache.nbytes() == cache.expected_nbytes()


def test_generate_compiled_eager_backend_matches_and_never_recompiles():
    """generate()'s own compile path (forced on CPU, backend eager, fullgraph) with the fused decode: the
    eager tokens, no graph breaks, no recompiles in a second generate on the same shapes."""
    model = make_model()
    ids, mask = prompts([40, 31])
    config = CompileConfig(backend="eager", fullgraph=True)
    config._compile_all_devices = True  # generate() compiles only on accelerators unless told (meant for tests)
    with patch_xkv(model):
        first = generate_compiled_twice(model, lambda: XKVCache(model.config, max_cache_len=56, **SMALL), ids, mask,
                                        config)
    assert first >= 1, "generate did not compile the decode step"


# -- GPU: CUDA graphs ---------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fused", [False, True])
def test_reduce_overhead_on_cuda_matches_eager(fused):
    """generate compiles the decode step (inductor, reduce-overhead = CUDA graphs; the fused Triton decode
    inside when patched) with the static-capacity cache: eager's greedy tokens, no graph breaks, no
    recompiles on a second call."""
    model = make_model(device="cuda")
    ids, mask = prompts([40, 31], device="cuda")
    config = CompileConfig(mode="reduce-overhead", fullgraph=True)
    with patch_xkv(model) if fused else contextlib.nullcontext():
        generate_compiled_twice(model, lambda: XKVCache(model.config, max_cache_len=64, **SMALL), ids, mask, config)


def test_fused_decode_without_a_mask_hides_the_free_tail_slots():
    """A direct model call without attention_mask (transformers then passes no mask to attention): the
    fused decode over a static cache still attends only to the held tokens, as the growable cache does."""
    model = make_model()
    ids = torch.randint(3, 160, (2, 40), generator=torch.Generator().manual_seed(3))
    kw = cache_kwarg(model)
    logits = []
    with patch_xkv(model), torch.no_grad():
        for cap in (None, 64):
            cache = XKVCache(model.config, max_cache_len=cap, **SMALL)
            model(input_ids=ids, use_cache=True, **{kw: cache})
            step = model(input_ids=ids[:, -1:], use_cache=True, **{kw: cache})
            logits.append(step.logits)
    assert torch.allclose(logits[0], logits[1], atol=1e-5, rtol=1e-5)


def test_static_cache_beam_search_matches_growable():
    """Beam search reorders the cache every step (reorder_cache on the fixed buffers and the shared
    factors): the static-capacity cache gives the growable cache's beams."""
    model = make_model()
    ids, mask = prompts([40, 31])
    outs = []
    for cap in (None, 64):
        cache = XKVCache(model.config, max_cache_len=cap, **SMALL)
        outs.append(greedy(model, cache, ids, mask, new_tokens=6, num_beams=3, disable_compile=True))
        if cap is not None:
            layer = cache.layers[0]
            assert layer.sink_keys.shape[-2] + sum(s.length for s in layer.group.segments) + layer.tail_capacity() == cap
    assert torch.equal(outs[0], outs[1])
