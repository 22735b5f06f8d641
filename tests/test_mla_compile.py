"""Static-capacity MLALatentCache + patch_mla under torch.compile (CUDA graphs, compiled decode).

CPU tests trace with dynamo's ``eager`` backend (``fullgraph=True``: any graph break fails) and count
frames/recompiles with ``torch._dynamo.utils.counters``; the reference attention path runs on CPU. The
GPU test (``-m gpu``, skipped without CUDA) runs generate's compile path in mode ``reduce-overhead``
(CUDA graphs, the Triton decode kernel inside) and compares tokens with eager.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import CompileConfig, DynamicCache

from conftest import tiny_model
from kvcompress.mla import MLALatentCache, StaticMLALatentLayer, patch_mla

VARIANTS = [("deepseek_v2", {}), ("deepseek_v3", {"q_lora_rank": 16})]
PAD = 0


def cache_kwarg(model) -> str:
    """transformers 5.24 names the cache argument ``cache``, 5.17 ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def make_model(family: str, overrides: dict, device: str = "cpu", dtype: torch.dtype = torch.float32):
    model = tiny_model(family, dtype=dtype, **overrides).to(device)
    model.config._attn_implementation = "sdpa"
    return model


def prompts(lengths, device="cpu", vocab=160, seed=1):
    """Left-padded random prompts and their attention mask."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[row, width - n:] = 1
    return ids.to(device), mask.to(device)


def greedy(model, cache, ids, mask, new_tokens=8, **gen):
    kw = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD, eos_token_id=None,
              **{cache_kwarg(model): cache}, **gen)
    return model.generate(input_ids=ids, attention_mask=mask, **kw)


def frames() -> int:
    """Graphs dynamo has produced so far (one per compile or recompile; a graph break would add more)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def check_compiled_steps(model, cache, eager_cache, ids, mask, width: int, backend: str, steps: int = 4) -> None:
    """Eager prefill into both caches, then ``steps`` one-token steps of ``torch.compile(model, fullgraph=True)``
    (a graph break raises) on ``cache`` against eager steps on ``eager_cache``: the same logits, the step traced
    once and reused (no recompiles: lengths live on the device). The caller enters any patch. The 2-D mask
    has the cache's full ``width`` (future columns 1, masked by causality): the same shape at every step, as
    a CUDA-graph decode loop keeps it."""
    kw = cache_kwarg(model)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        for c in (cache, eager_cache):
            model(input_ids=ids, attention_mask=mask, use_cache=True, **{kw: c})  # eager prefill
        step = torch.compile(model, backend=backend, fullgraph=True)
        token = torch.full((ids.shape[0], 1), 7, dtype=torch.long)
        full_mask = torch.cat([mask, torch.ones(ids.shape[0], width - mask.shape[1], dtype=mask.dtype)], dim=1)
        for i in range(steps):
            got = step(input_ids=token, attention_mask=full_mask, use_cache=True, **{kw: cache}).logits
            ref = model(input_ids=token, attention_mask=full_mask, use_cache=True, **{kw: eager_cache}).logits
            assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)
            if i == 0:
                after_first = frames()
    assert graph_breaks() == 0
    assert after_first >= 1 and frames() == after_first, "a later decode step recompiled"


def generate_compiled_twice(model, make_cache, ids, mask, config: CompileConfig) -> int:
    """generate() with eager decode, then twice with ``compile_config`` on one cache (reset in between):
    the same greedy tokens every time, no graph breaks, no recompile in the second call. Returns the frames
    dynamo compiled in the first compiled call. The caller enters any patch."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    ref = greedy(model, make_cache(), ids, mask, disable_compile=True)
    cache = make_cache()
    got = greedy(model, cache, ids, mask, compile_config=config)
    first = frames()
    cache.reset()
    again = greedy(model, cache, ids, mask, compile_config=config)
    assert torch.equal(ref, got) and torch.equal(ref, again)
    assert graph_breaks() == 0 and frames() == first, "a graph break, or the second generate recompiled"
    return first


# -- the cache --------------------------------------------------------------------------------------
def test_static_cache_is_compileable_and_static():
    model = make_model("deepseek_v2", {})
    assert MLALatentCache(model.config, max_cache_len=64).is_compileable
    assert not MLALatentCache(model.config).is_compileable  # the growable one keeps Python-int lengths
    cache = MLALatentCache(model.config, max_cache_len=64)
    assert all(isinstance(layer, StaticMLALatentLayer) for layer in cache.layers)
    ids, mask = prompts([20, 13])
    with patch_mla(model):
        greedy(model, cache, ids, mask, new_tokens=5)
    layer = cache.layers[0]
    assert layer.keys.shape == (2, 1, 64, 32) and layer.values.shape == (2, 1, 64, 8)
    assert int(layer.get_seq_length()) == 20 + 4  # the last generated token is never fed back
    assert cache.get_mask_sizes(1, 0)[0] == 64 and layer.get_max_length() == 64
    assert cache.nbytes() == cache.expected_nbytes() == 4 * 2 * 24 * (32 + 8) * 4
    assert cache.reserved_nbytes() == 4 * 2 * 64 * (32 + 8) * 4


@pytest.mark.parametrize("family,overrides", VARIANTS)
def test_static_cache_greedy_matches_growable_and_stock(family, overrides):
    """fp32: static-capacity cache + patch_mla == growable cache + patch_mla == stock DynamicCache."""
    model = make_model(family, overrides)
    ids, mask = prompts([20, 13])
    ref = greedy(model, DynamicCache(config=model.config), ids, mask)
    with patch_mla(model):
        grow = greedy(model, MLALatentCache(model.config), ids, mask)
        static = greedy(model, MLALatentCache(model.config, max_cache_len=40), ids, mask)
    assert torch.equal(ref, grow) and torch.equal(ref, static)


def test_static_cache_overflow_names_max_cache_len():
    model = make_model("deepseek_v2", {})
    ids, mask = prompts([20, 13])
    with patch_mla(model):
        with pytest.raises(ValueError, match="max_cache_len=24"):
            greedy(model, MLALatentCache(model.config, max_cache_len=24), ids, mask, new_tokens=8)
        with pytest.raises(ValueError, match="max_cache_len=10"):  # the prompt alone
            greedy(model, MLALatentCache(model.config, max_cache_len=10), ids, mask, new_tokens=2)
    with pytest.raises(ValueError, match="max_cache_len"):
        MLALatentCache(model.config, max_cache_len=0)


# -- compile (CPU tracing) ------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("family,overrides", VARIANTS)
def test_decode_step_traces_fullgraph_without_recompiles(family, overrides, backend):
    """One patched decode step compiled with fullgraph=True (a graph break raises) is traced once and
    reused for several steps (no recompiles: lengths live on the device), with eager's logits.
    ``aot_eager`` also functionalises the graph: the in-place cache writes must survive as input mutations."""
    model = make_model(family, overrides)
    ids, mask = prompts([12, 9])
    cache = MLALatentCache(model.config, max_cache_len=32)
    with patch_mla(model, max_absorbed_tokens=4):
        check_compiled_steps(model, cache, MLALatentCache(model.config, max_cache_len=32), ids, mask, 32, backend)
    assert int(cache.layers[0].get_seq_length()) == 12 + 4


@pytest.mark.parametrize("family,overrides", VARIANTS)
def test_generate_compiled_eager_backend_matches_and_never_recompiles(family, overrides):
    """generate()'s own compile path (CompileConfig(backend='eager', fullgraph=True), forced on CPU) with
    the static-capacity cache: same tokens as eager, zero graph breaks, one frame compiled for decode and
    no recompiles in a second generate call on the same shapes."""
    model = make_model(family, overrides)
    ids, mask = prompts([20, 13])
    config = CompileConfig(backend="eager", fullgraph=True)
    config._compile_all_devices = True  # generate() compiles only on accelerators unless told (meant for tests)
    with patch_mla(model):
        first = generate_compiled_twice(model, lambda: MLALatentCache(model.config, max_cache_len=40), ids, mask, config)
    assert first >= 1, "generate did not compile the decode step"


INTERPRETER_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, "tests")
    import interpreter_compat  # Triton 3.6's interpreter under NumPy >= 2.4
    from conftest import tiny_model
    from kvcompress.kernels import mla_decode
    from kvcompress.mla import MLALatentCache, patch_mla
    assert mla_decode._OP is not None, "no torch.library.triton_op"
    model = tiny_model("deepseek_v2")
    model.config._attn_implementation = "sdpa"
    kw = "cache" if "cache" in __import__("inspect").signature(model.forward).parameters else "past_key_values"
    ids = torch.randint(3, 160, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 24, dtype=torch.long)
    ops = []

    def backend(gm, example_inputs):  # dynamo's eager backend, recording which ops the graph calls
        ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    caches = [MLALatentCache(model.config, max_cache_len=24) for _ in range(2)]
    with patch_mla(model, max_absorbed_tokens=4), torch.no_grad():
        for c in caches:
            model(input_ids=ids, attention_mask=mask[:, :10], use_cache=True, **{kw: c})
        step = torch.compile(model, backend=backend, fullgraph=True)
        token = torch.full((2, 1), 7, dtype=torch.long)
        err = 0.0
        for _ in range(3):
            got = step(input_ids=token, attention_mask=mask, use_cache=True, **{kw: caches[0]}).logits
            ref = model(input_ids=token, attention_mask=mask, use_cache=True, **{kw: caches[1]}).logits
            err = max(err, (got - ref).abs().max().item())
    # the op called eagerly (as inductor's fallback would) against the float32 reference
    g = torch.Generator().manual_seed(0)
    q, qr = torch.randn(2, 4, 1, 32, generator=g), torch.randn(2, 4, 1, 8, generator=g)
    c, k = torch.randn(2, 40, 32, generator=g), torch.randn(2, 40, 8, generator=g)
    lens, keep = torch.tensor([30, 17]), torch.rand(2, 40, generator=g) > 0.1
    op = mla_decode._OP(q, qr, c, k, 0.1, lens, None, keep)
    op_err = (op - mla_decode.mla_decode_attention_reference(q, qr, c, k, 0.1, lens, None, keep)).abs().max().item()
    print(json.dumps({"err": err, "op_err": op_err, "kernel_ops": sum("mla_decode_attention" in o for o in ops), "graphs":
                      int(torch._dynamo.utils.counters["stats"]["unique_graphs"])}))
""")


def test_triton_op_is_traced_into_the_graph_in_the_interpreter():
    """The Triton kernel (in Triton's CPU interpreter) is one custom op (torch.library.triton_op) inside a
    fullgraph-compiled patched decode step: once per layer in a single graph, eager's logits. A subprocess,
    since TRITON_INTERPRET must be set before triton loads."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    env.pop("KVCOMPRESS_DISABLE_TRITON", None)
    proc = subprocess.run([sys.executable, "-c", INTERPRETER_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["kernel_ops"] == 4 and result["graphs"] == 1, result  # 4 layers, no recompile
    assert result["err"] < 1e-4 and result["op_err"] < 1e-5, result


# -- GPU: CUDA graphs ---------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family,overrides", VARIANTS)
def test_reduce_overhead_on_cuda_matches_eager(family, overrides):
    """generate compiles the patched decode step (inductor, reduce-overhead = CUDA graphs, the Triton
    decode kernel inside) with the static-capacity cache: same greedy tokens as eager, no graph breaks,
    no recompiles on a second call."""
    model = make_model(family, overrides, device="cuda")
    ids, mask = prompts([20, 13], device="cuda")
    config = CompileConfig(mode="reduce-overhead", fullgraph=True)
    with patch_mla(model):
        generate_compiled_twice(model, lambda: MLALatentCache(model.config, max_cache_len=48), ids, mask, config)
