"""A step that fails part-way (an exception, also KeyboardInterrupt, inside an attention forward) leaves an
XKVCache either as it was before the step or refusing further use with a clear error, and the model as it
was; a cache built for another number of layers is refused before it is written."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from conftest import tiny_config, tiny_model
from kvcompress import XKVCache, patch_model
from kvcompress.xkv import patch_xkv

KW = dict(group_size=2, rank_k=None, rank_v=None, factor_bits=None, matrix_bits=None, window=4, sink=2, min_compress_tokens=1)


def step(model, cache, ids):
    with torch.no_grad():
        return model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1]


class Interrupt:
    """A forward hook on one attention module's output projection (inside the attention's forward) that
    raises ``error`` once, on the next decode step."""

    def __init__(self, module, error):
        self.error, self.armed = error, False
        self.hook = module.o_proj.register_forward_hook(self)

    def __call__(self, module, args, output):
        if self.armed and args[0].shape[1] == 1:
            self.armed = False
            raise self.error


@pytest.mark.parametrize("error", [KeyboardInterrupt(), RuntimeError("out of memory (simulated)")],
                         ids=["KeyboardInterrupt", "RuntimeError"])
def test_interrupted_decode_step_refuses_the_cache_and_leaves_the_model(error):
    model = tiny_model("llama")
    ids = torch.randint(3, 160, (1, 30), generator=torch.Generator().manual_seed(0))
    attention = [m for m in model.modules() if type(m).__name__ == "LlamaAttention"]
    with torch.no_grad():
        stock_logits = step(model, DynamicCache(config=model.config), ids)
    handle = patch_xkv(model)
    cache = XKVCache(model.config, **KW)
    step(model, cache, ids)  # prefill: compressed segments, so the next step takes the fused decode
    assert all(group.segments for group in cache.groups)
    interrupt = Interrupt(attention[1], error)
    interrupt.armed = True
    with pytest.raises(type(error)):
        step(model, cache, ids[:, :1])  # layer 0 took the token, layer 1 failed after its update
    interrupt.hook.remove()
    # the cache's layers now disagree: it must refuse, patched or not, instead of attending silently wrong
    with pytest.raises(RuntimeError, match="reset"):
        step(model, cache, ids[:, :1])
    handle.remove()
    with pytest.raises(RuntimeError, match="reset"):
        step(model, cache, ids[:, :1])
    # the model is as before, and reset() makes the cache usable again
    with torch.no_grad():
        assert torch.equal(step(model, DynamicCache(config=model.config), ids), stock_logits)
    cache.reset()
    torch.testing.assert_close(step(model, cache, ids), stock_logits, atol=1e-5, rtol=1e-5)


def test_failure_before_any_update_leaves_the_cache_usable():
    """An exception in the first attention before its cache update: nothing was written, so the cache is as
    before the step and the next step gives DynamicCache's logits."""
    model = tiny_model("llama")
    ids = torch.randint(3, 160, (1, 30), generator=torch.Generator().manual_seed(0))
    attention = [m for m in model.modules() if type(m).__name__ == "LlamaAttention"]
    ref, cache = DynamicCache(config=model.config), XKVCache(model.config, **KW)
    with patch_xkv(model):
        step(model, ref, ids)
        step(model, cache, ids)
        hook = attention[0].k_proj.register_forward_hook(lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            step(model, cache, ids[:, :1])
        hook.remove()
        torch.testing.assert_close(step(model, cache, ids[:, :1]), step(model, ref, ids[:, :1]), atol=1e-5,
                                   rtol=1e-5)


@pytest.mark.parametrize("patched", [False, True])
@pytest.mark.parametrize("cache_layers", [2, 8])
def test_cache_for_another_number_of_layers_is_refused(cache_layers, patched):
    """A cache built for 2 or 8 layers on a 4-layer model: a clear error naming both layer counts; patched
    (patch_model), before any layer is written."""
    model = tiny_model("llama")
    cache = XKVCache(tiny_config("llama", num_hidden_layers=cache_layers), **KW)
    ids = torch.randint(3, 160, (1, 30), generator=torch.Generator().manual_seed(0))
    handle = patch_model(model, "xkv") if patched else None
    try:
        # unpatched, fewer layers than the model: the cache only knows its own count
        words = f"built for {cache_layers} layers" if cache_layers < 4 and not patched else \
            f"{cache_layers} layers.*4|4.*{cache_layers} layers"
        with pytest.raises((ValueError, RuntimeError), match=words):
            step(model, cache, ids)
            step(model, cache, ids[:, :1])  # unpatched, more layers than the model: seen at the next step
        if patched:
            assert cache.get_seq_length() == 0 and all(not layer.is_initialized for layer in cache.layers)
    finally:
        if handle is not None:
            handle.remove()
