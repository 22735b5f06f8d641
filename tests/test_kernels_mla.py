"""MLA absorbed decode kernel (kvcompress.kernels.mla_decode): the reference against naive float64
attention and against ``absorbed_attention``, the Triton kernel against the reference (CPU interpreter in
a subprocess; CUDA when present), and the growable preallocated storage of the MLA / TPLA caches."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from conftest import tiny_config
from kvcompress.kernels import mla_decode, next_pow2
from kvcompress.kernels.mla_decode import (
    key_mask_from_attention_mask,
    mla_decode_attention,
    mla_decode_attention_reference,
)
from kvcompress.mla import GrowableLayer, MLALatentCache, MLALatentLayer, absorbed_attention
from kvcompress.tpla import TPLACache

HAVE_TRITON = importlib.util.find_spec("triton") is not None


def make_case(batch=3, heads=4, queries=1, rank=40, rope=8, tokens=77, dtype=torch.float32, device="cpu", seed=0):
    """Random queries and cache, plus ragged ranges (row 1 left-padded, row 2 short) and a key mask."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(device)

    q_latent, q_rope = randn(batch, heads, queries, rank), randn(batch, heads, queries, rope)
    latent, rope_key = randn(batch, tokens, rank), randn(batch, tokens, rope)
    starts = torch.tensor([0, 9, 2][:batch] + [0] * max(0, batch - 3), device=device)
    lengths = torch.tensor([tokens, tokens - 9, max(queries, tokens // 3)][:batch] + [tokens] * max(0, batch - 3),
                           device=device)
    key_mask = (torch.rand(batch, tokens, generator=g) > 0.25).to(device)
    return q_latent, q_rope, latent, rope_key, rank ** -0.5, lengths, starts, key_mask


def naive(q_latent, q_rope, latent, rope_key, scale, lengths=None, starts=None, key_mask=None):
    """Float64, one (row, head, query) at a time, written from the definition."""
    batch, heads, queries, rank = q_latent.shape
    tokens = latent.shape[1]
    out = torch.zeros(batch, heads, queries, rank, dtype=torch.float64)
    for b in range(batch):
        start = 0 if starts is None else int(starts[b])
        end = tokens if lengths is None else min(tokens, start + int(lengths[b]))
        for h in range(heads):
            for i in range(queries):
                keys = range(start, end)
                if not keys:
                    continue
                scores = []
                for t in keys:
                    ok = t < end - (queries - 1 - i) and (key_mask is None or bool(key_mask[b, t]))
                    s = scale * (q_latent[b, h, i].double() @ latent[b, t].double()
                                 + q_rope[b, h, i].double() @ rope_key[b, t].double())
                    scores.append(s.item() if ok else -1e30)
                w = torch.softmax(torch.tensor(scores, dtype=torch.float64), 0)
                out[b, h, i] = w @ latent[b, start:end].double()
    return out


def rel_err(got, ref):
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


# -- reference ------------------------------------------------------------------------------------
@pytest.mark.parametrize("heads,queries,rank,rope,tokens", [(4, 1, 40, 8, 77), (3, 3, 32, 16, 50), (16, 1, 24, 8, 5)])
@pytest.mark.parametrize("ranges", ["none", "lengths", "starts+lengths", "mask", "all"])
def test_reference_equals_naive_float64(heads, queries, rank, rope, tokens, ranges):
    q, qr, c, k, scale, lengths, starts, key_mask = make_case(heads=heads, queries=queries, rank=rank, rope=rope,
                                                              tokens=tokens, dtype=torch.float64, seed=heads)
    kw = {"none": {}, "lengths": dict(lengths=lengths), "starts+lengths": dict(lengths=lengths, starts=starts),
          "mask": dict(key_mask=key_mask), "all": dict(lengths=lengths, starts=starts, key_mask=key_mask)}[ranges]
    got = mla_decode_attention_reference(q, qr, c, k, scale, kv_lengths=kw.get("lengths"),
                                         kv_starts=kw.get("starts"), key_mask=kw.get("key_mask"))
    assert got.dtype == torch.float64
    assert torch.allclose(got, naive(q, qr, c, k, scale, **kw), atol=1e-12, rtol=0)


@pytest.mark.parametrize("queries", [1, 4])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
def test_reference_equals_absorbed_attention(queries, mask_kind):
    """With transformers' causal + padding masks the reference (key mask + in-kernel causality) is the
    existing absorbed path; float64, so only the algorithm is compared."""
    q, qr, c, k, scale, _, _, _ = make_case(batch=2, heads=5, queries=queries, tokens=33, dtype=torch.float64)
    tokens = c.shape[1]
    pad = torch.tensor([0, 6])
    keys_ok = torch.arange(tokens)[None, :] >= pad[:, None]  # left padding
    causal = torch.arange(tokens)[None, :] <= torch.arange(tokens - queries, tokens)[:, None]
    full = keys_ok[:, None, None, :] & causal[None, None]  # [B, 1, S, T]
    mask = {"none": None, "bool": full,
            "additive": torch.zeros(full.shape, dtype=torch.float64).masked_fill(~full, torch.finfo(torch.float64).min)}[mask_kind]
    ref = absorbed_attention(q, qr, c, k, mask, scale)
    got = mla_decode_attention_reference(q, qr, c, k, scale, key_mask=key_mask_from_attention_mask(mask, 2, tokens))
    assert torch.allclose(got, ref, atol=1e-12, rtol=0)
    # the same padding as a range (kv_starts) instead of a mask gives the same for the valid rows
    by_range = mla_decode_attention_reference(q, qr, c, k, scale, kv_starts=pad)
    if mask_kind != "none":
        assert torch.allclose(by_range, ref, atol=1e-12, rtol=0)


def test_reference_edge_rows():
    """A row with no valid token gives zeros; a query whose keys are all masked averages its range
    uniformly (as eager attention's finfo.min does); float32 inputs give float32 out."""
    q, qr, c, k, scale, _, _, _ = make_case(batch=2, tokens=10)
    lengths = torch.tensor([0, 10])
    key_mask = torch.ones(2, 10, dtype=torch.bool)
    key_mask[1] = False
    out = mla_decode_attention_reference(q, qr, c, k, scale, kv_lengths=lengths, key_mask=key_mask)
    assert out.dtype == torch.float32
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.allclose(out[1], c[1].mean(0).expand_as(out[1]), atol=1e-6)


def test_bad_inputs_name_the_parameter():
    q, qr, c, k, scale, lengths, starts, key_mask = make_case()
    with pytest.raises(TypeError, match="rope_key"):
        mla_decode_attention(q, qr, c, k.double(), scale)
    with pytest.raises(ValueError, match="latent"):
        mla_decode_attention(q, qr, c[:, :, :-1], k, scale)
    with pytest.raises(ValueError, match="q_rope"):
        mla_decode_attention(q, qr[:, :2], c, k, scale)
    with pytest.raises(ValueError, match="kv_lengths"):
        mla_decode_attention(q, qr, c, k, scale, kv_lengths=lengths[:2])
    with pytest.raises(TypeError, match="kv_starts"):
        mla_decode_attention(q, qr, c, k, scale, kv_starts=starts.float())
    with pytest.raises(ValueError, match="key_mask"):
        mla_decode_attention(q, qr, c, k, scale, key_mask=key_mask.int())
    with pytest.raises(TypeError, match="scale"):
        mla_decode_attention(q, qr, c, k, float("nan"))
    with pytest.raises(ValueError, match="out"):
        mla_decode_attention(q, qr, c, k, scale, out=torch.empty(1))
    # [B, 1, T, r] caches (what the cache layers hold) are accepted as views
    four_d = mla_decode_attention(q, qr, c[:, None], k[:, None], scale)
    assert torch.allclose(four_d, mla_decode_attention_reference(q, qr, c, k, scale), atol=1e-6)


# -- the Triton kernel ----------------------------------------------------------------------------
CASES = {  # name: (make_case kwargs, which ranges, min_chunk (small: force several chunks and the merge))
    "plain": (dict(), "none", 256),
    "ragged+pad+mask": (dict(), "all", 16),
    "causal S=3": (dict(queries=3, heads=3, rank=32, rope=16, tokens=50), "all", 16),
    "non-pow2 r, T=5": (dict(heads=16, rank=24, tokens=5), "lengths", 256),
    "17 heads (2 row blocks)": (dict(heads=17, rank=16, tokens=64, batch=2), "mask", 32),
    "len 0 row": (dict(batch=2, tokens=40), "zero", 16),
    "r=200 (2 merge column blocks)": (dict(heads=2, rank=200, rope=16, tokens=70), "all", 16),
}


# name: (make_case kwargs, ranges, tile overrides of _triton_forward): the wide-tile paths the GPU takes
# at 64-128 heads (row blocks of 32-128, the output split in halves, several merge blocks), at tiny sizes
WIDE_CASES = {
    "128-row block, 2 merge blocks": (dict(heads=20, rank=48, tokens=77), "all",
                                      dict(block_m=128, block_t=16, num_warps=8, waves=8, merge_chunks=2)),
    "split_v=2, non-pow2 r": (dict(heads=20, rank=40, tokens=60), "all",
                              dict(block_m=32, block_t=16, split_v=2, waves=4, merge_chunks=2)),
    "split_v=2, causal S=3": (dict(heads=5, queries=3, rank=32, rope=16, tokens=50), "all",
                              dict(block_m=64, block_t=32, split_v=2)),
    "split_v=2, len 0 row": (dict(batch=2, heads=3, rank=64, tokens=40), "zero",
                             dict(block_m=16, block_t=16, split_v=2, waves=6, merge_chunks=2)),
}


def run_case(name, device="cpu", dtype=torch.float32):
    """Kernel (scratch and output poisoned with NaN) vs reference for one case of CASES or WIDE_CASES;
    returns the relative error."""
    if name in WIDE_CASES:
        kwargs, ranges, tiles = WIDE_CASES[name]
        min_chunk = 16
    else:
        (kwargs, ranges, min_chunk), tiles = CASES[name], {}
    q, qr, c, k, scale, lengths, starts, key_mask = make_case(**kwargs, dtype=dtype, device=device, seed=len(name))
    kw = {"none": {}, "all": dict(kv_lengths=lengths, kv_starts=starts, key_mask=key_mask),
          "lengths": dict(kv_lengths=lengths), "mask": dict(key_mask=key_mask),
          "zero": dict(kv_lengths=torch.tensor([0, 7], device=device), kv_starts=torch.tensor([3, 30], device=device))}[ranges]
    ref = mla_decode_attention_reference(q, qr, c, k, scale, **kw)
    out = torch.full_like(q, float("nan"))
    mla_decode._POISON_BUFFERS = True
    try:
        got = mla_decode._triton_forward(q, qr, c, k, scale, kw.get("kv_lengths"), kw.get("kv_starts"),
                                         kw.get("key_mask"), out, min_chunk=min_chunk, **tiles)
    finally:
        mla_decode._POISON_BUFFERS = False
    assert got is out and torch.isfinite(out).all(), name
    return rel_err(out, ref)


INTERPRETER_SCRIPT = """
import interpreter_compat  # Triton 3.6's interpreter under NumPy >= 2.4
import json, torch
import test_kernels_mla as t
from kvcompress.kernels import triton_usable
from kvcompress.kernels import mla_decode, next_pow2
assert mla_decode._HAVE_TRITON and triton_usable(torch.zeros(1))
errors = {name: t.run_case(name) for name in [*t.CASES, *t.WIDE_CASES]}
# 16-bit inputs keep 16-bit partials (float16: the interpreter emulates it exactly, bfloat16 it does not)
errors.update({"fp16 " + name: t.run_case(name, dtype=torch.float16) for name in t.WIDE_CASES})
# the public dispatcher takes the kernel here too
q, qr, c, k, scale, lengths, starts, key_mask = t.make_case()
errors["dispatch"] = t.rel_err(mla_decode.mla_decode_attention(q, qr, c, k, scale, lengths, starts, key_mask),
                               mla_decode.mla_decode_attention_reference(q, qr, c, k, scale, lengths, starts, key_mask))
print("RESULT " + json.dumps(errors))
"""


@pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed")
def test_kernel_matches_reference_in_the_interpreter():
    """fp32 (and fp16 for the wide tiles) in Triton's CPU interpreter (a subprocess: TRITON_INTERPRET must
    be set before triton loads)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [os.path.dirname(__file__), os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
         os.environ.get("PYTHONPATH", "")]))
    env.pop("KVCOMPRESS_DISABLE_TRITON", None)
    proc = subprocess.run([sys.executable, "-c", INTERPRETER_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=600, cwd=os.path.dirname(__file__))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    errors = json.loads(lines[-1][len("RESULT "):])
    assert set(errors) == set(CASES) | set(WIDE_CASES) | {"fp16 " + name for name in WIDE_CASES} | {"dispatch"}
    for name, error in errors.items():
        assert error <= (5e-3 if name.startswith("fp16") else 1e-4), (name, error)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not HAVE_TRITON, reason="needs CUDA and Triton")
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-4)])
@pytest.mark.parametrize("name", list(CASES) + list(WIDE_CASES))
def test_gpu_kernel_matches_reference(dtype, tol, name):
    assert run_case(name, "cuda", dtype) <= tol


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not HAVE_TRITON, reason="needs CUDA and Triton")
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-4)])
@pytest.mark.parametrize("heads,tokens", [(16, 3001), (128, 1000)])
def test_gpu_kernel_deepseek_shapes(dtype, tol, heads, tokens):
    """V2-Lite / V3 attention widths (r = 512, p = 64), ragged and padded, default chunking."""
    q, qr, c, k, scale, lengths, starts, key_mask = make_case(batch=3, heads=heads, rank=512, rope=64, tokens=tokens,
                                                              dtype=dtype, device="cuda", seed=3)
    ref = mla_decode_attention_reference(q, qr, c, k, 0.07, lengths, starts, key_mask)
    out = mla_decode_attention(q, qr, c, k, 0.07, lengths, starts, key_mask, out=torch.full_like(q, float("nan")))
    assert torch.isfinite(out).all() and rel_err(out, ref) <= tol


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not HAVE_TRITON, reason="needs CUDA and Triton")
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("heads,rank", [(16, 64), (16, 512), (32, 512), (64, 128), (64, 512), (96, 256), (128, 64),
                                        (128, 128), (128, 256), (128, 512)])
def test_gpu_kernel_wide_heads_bf16(heads, rank, batch):
    """The tiles taken at 16-128 heads over latents of 64-512 values (TPLA shards r/N, plain MLA / TP
    shards r), bf16, fresh random inputs, ragged lengths (and left padding at batch 3), a token count
    that ends mid-tile, default chunking: kernel vs the float32 reference."""
    tokens = 1500
    q, qr, c, k, _, _, _, _ = make_case(batch=batch, heads=heads, rank=rank, rope=64, tokens=tokens,
                                        dtype=torch.bfloat16, device="cuda", seed=heads * 1000 + rank + batch)
    starts = torch.tensor([0, 37, 5][:batch], device="cuda")
    lengths = torch.tensor([tokens - 63, tokens - 37, 300][:batch], device="cuda")
    scale = (rank + 64) ** -0.5 * 4  # peaked softmax: a wrong score shows in the output
    ref = mla_decode_attention_reference(q, qr, c, k, scale, lengths, starts)
    out = mla_decode_attention(q, qr, c, k, scale, lengths, starts, out=torch.full_like(q, float("nan")))
    assert torch.isfinite(out).all() and rel_err(out, ref) <= 1e-2


def test_tile_config_takes_wide_head_blocks_that_fit(monkeypatch):
    """16-bit latents take head blocks of 128 rows (256 wide) or 64 rows (other widths), as many stages as
    shared memory holds (<= 3), two waves for 4-warp programs; float32, widths past 512, the interpreter
    and small shared memories keep the 16-row tiles."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert mla_decode._config(torch.bfloat16, 512, 64, 128, cpu)["block_m"] == 16  # interpreter: no shared memory
    monkeypatch.setattr(mla_decode, "shared_memory", lambda device: 227 * 1024)  # H100 / H200
    config = lambda rank, rows, dtype=torch.bfloat16: mla_decode._config(dtype, rank, 64, rows, cuda)  # noqa: E731
    for rank, rows, block_m in [(128, 128, 64), (256, 128, 128), (64, 128, 64), (512, 128, 64), (512, 64, 64),
                                (512, 32, 32), (512, 16, 16), (256, 48, 64), (1024, 128, 16)]:
        cfg = config(rank, rows)
        assert cfg["block_m"] == block_m, (rank, rows, cfg)
        assert cfg["split_v"] == 1 and 1 <= cfg["num_stages"] <= 3
        assert cfg["waves"] == (2 if cfg["num_warps"] == 4 else 1)
        if block_m >= 64 and rank <= 512:
            width = next_pow2(rank)
            assert cfg["num_warps"] == 8 or block_m * width < 64 * 256
            # queries + stages of [BLOCK_T, r + p] tiles fit in 227 KB
            smem = 2 * (block_m + cfg["block_t"] * cfg["num_stages"]) * (width + 64)
            assert smem <= 227 * 1024 - 16 * 1024, (rank, rows, cfg, smem)
    assert config(256, 128)["num_stages"] >= 2 and config(128, 128)["num_stages"] == 3
    assert (config(512, 32)["block_t"], config(512, 32)["num_stages"]) == (64, 2)  # a 4-way TP shard
    assert config(256, 128)["num_warps"] == 8 and config(128, 128)["num_warps"] == 4
    assert config(512, 128, torch.float32)["block_m"] == 16
    monkeypatch.setattr(mla_decode, "shared_memory", lambda device: 99 * 1024)  # consumer GPUs
    assert config(256, 128)["block_m"] == 16


@pytest.mark.parametrize("batch,rows,tokens,block_m,split_v", [(1, 128, 32768, 128, 1), (8, 128, 32768, 128, 1),
                                                                (1, 128, 65536, 64, 2), (3, 32, 1000, 32, 1),
                                                                (1, 16, 100, 16, 1)])
def test_plan_fills_the_gpu_once_with_nonempty_chunks(monkeypatch, batch, rows, tokens, block_m, split_v):
    monkeypatch.setattr(mla_decode, "sm_count", lambda device: 132)
    chunks, chunk_len = mla_decode.plan(batch, rows, tokens, torch.device("cuda", 0), block_m, 64, 256, split_v)
    programs = batch * split_v * math.ceil(rows / block_m) * chunks
    assert chunk_len % 64 == 0 and (chunks - 1) * chunk_len < tokens <= chunks * chunk_len
    assert programs <= 132 and chunks <= math.ceil(tokens / 256)  # one wave; >= 256 tokens a chunk
    assert programs >= 100 or chunks == math.ceil(tokens / 256)  # the SMs are filled unless chunks would be short


# -- growable storage -----------------------------------------------------------------------------
def feed(layers, steps, batch=2, width=(12, 4), prefill=5, seed=0):
    """The same prefill then single-token updates into every layer; returns what the last update returned."""
    g = torch.Generator().manual_seed(seed)
    for n in [prefill] + [1] * steps:
        k = torch.randn(batch, 1, n, width[0], generator=g)
        v = torch.randn(batch, 1, n, width[1], generator=g)
        results = [layer.update(k, v) for layer in layers]
    return results


def test_growable_equals_cat_and_reallocates_logarithmically():
    grow, cat = MLALatentLayer(0, 12, 4), DynamicLayer()
    steps = 3000
    (gk, gv), (ck, cv) = feed([grow, cat], steps)
    assert torch.equal(gk, ck) and torch.equal(gv, cv)
    assert torch.equal(grow.latent, cat.keys) and torch.equal(grow.rope_key, cat.values)
    assert grow.get_seq_length() == cat.get_seq_length() == steps + 5
    assert grow.nbytes() == ck.nbytes + cv.nbytes  # the valid tokens only, as DynamicCache counts
    assert grow.reserved_nbytes() >= grow.nbytes()
    assert grow.capacity % 16 == 0 and grow.capacity <= 1.25 * (steps + 5) + 16
    # 32 -> ... -> >= 3005 growing by 1.25x: about log_1.25(3005 / 32) + 1 = 22 allocations, not 3000
    assert grow.reallocations <= math.ceil(math.log(3005 / 32, 1.25)) + 2


def test_growable_cache_ops_match_dynamic_layer():
    """crop (both conventions), beam reorder, batch select / repeat, then more updates: same as DynamicLayer."""
    grow, cat = MLALatentLayer(0, 12, 4), DynamicLayer()
    feed([grow, cat], 300, batch=3)
    storage = grow._key_storage
    grow.crop(-7), cat.crop(-7)
    assert torch.equal(grow.keys, cat.keys) and grow.get_seq_length() == 298
    assert grow._key_storage is storage  # cropping keeps the storage
    beams = torch.tensor([2, 0, 0])
    grow.reorder_cache(beams), cat.reorder_cache(beams)
    assert torch.equal(grow.keys, cat.keys) and torch.equal(grow.values, cat.values)
    assert grow._key_storage is storage  # in place
    grow.batch_select_indices(torch.tensor([0, 2])), cat.batch_select_indices(torch.tensor([0, 2]))
    grow.batch_repeat_interleave(2), cat.batch_repeat_interleave(2)
    assert torch.equal(grow.keys, cat.keys) and torch.equal(grow.values, cat.values)
    (gk, gv), (ck, cv) = feed([grow, cat], 20, batch=4, prefill=1, seed=3)
    assert torch.equal(gk, ck) and torch.equal(gv, cv)
    # cache_utils' offload/prefetch assign keys then values: the assigned tensors become the storage
    grow.keys, grow.values = grow.keys.clone(), grow.values.clone()
    assert grow.capacity == grow.get_seq_length() == cat.get_seq_length()
    with pytest.raises(ValueError, match="values of"):
        grow.values = grow.values[:, :, :3]
    (gk, gv), (ck, cv) = feed([grow, cat], 3, batch=4, prefill=1, seed=4)
    assert torch.equal(gk, ck) and torch.equal(gv, cv)
    for argument in (0, -1, 100, -10_000):  # every crop argument: DynamicLayer's length, or its error
        try:
            cat.crop(argument)
        except Exception as stock_error:
            with pytest.raises(type(stock_error)):
                grow.crop(argument)
        else:
            grow.crop(argument)
        assert grow.get_seq_length() == cat.get_seq_length() and torch.equal(grow.keys, cat.keys)
    grow.reset()
    assert grow.get_seq_length() == 0 and grow.nbytes() == grow.reserved_nbytes() == 0 and grow.keys is None
    feed([grow], 2, batch=1)  # a new batch size after reset
    assert grow.keys.shape == (1, 1, 7, 12)


def test_max_cache_len_is_static_and_refuses_overflow():
    layer = MLALatentLayer(0, 12, 4, max_cache_len=40)
    feed([layer], 10)
    storage = layer._key_storage
    feed([layer], 20, prefill=1)
    assert layer._key_storage is storage and layer.capacity == 40 and layer.reallocations == 1
    with pytest.raises(ValueError, match="max_cache_len"):
        feed([layer], 0, prefill=10)
    with pytest.raises(ValueError, match="max_cache_len"):
        GrowableLayer(max_cache_len=0)


def test_caches_report_valid_and_reserved_bytes():
    cfg = tiny_config("deepseek_v2")
    mla, tpla = MLALatentCache(cfg), TPLACache(cfg, num_shards=2, rotation=None)
    g = torch.Generator().manual_seed(0)
    for step in range(30):
        n = 9 if step == 0 else 1
        for layer in range(cfg.num_hidden_layers):
            c = torch.randn(2, 1, n, cfg.kv_lora_rank, generator=g)
            kr = torch.randn(2, 1, n, cfg.qk_rope_head_dim, generator=g)
            mla.update(c, kr, layer)
            tpla.update(c.view(2, n, 2, -1).transpose(1, 2).contiguous(), kr.expand(2, 2, n, -1).contiguous(), layer,
                        tpla=True)
    tokens = 9 + 29
    assert mla.nbytes() == mla.expected_nbytes() == cfg.num_hidden_layers * 2 * tokens * (
        cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    assert tpla.nbytes() == cfg.num_hidden_layers * 2 * tokens * (cfg.kv_lora_rank + 2 * cfg.qk_rope_head_dim) * 4
    # first allocation: the 9 prompt tokens + 16 of room = 32 (multiples of 16); the 33rd token grows it 1.25x to 48
    assert mla.reserved_nbytes() == cfg.num_hidden_layers * 2 * 48 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    assert tpla.reserved_nbytes() >= tpla.nbytes()
    # TPLA's shards hold exactly the MLA latent's slices
    for a, b in zip(mla.layers, tpla.layers):
        assert torch.equal(b.keys.transpose(1, 2).reshape(2, 1, tokens, -1), a.latent)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not HAVE_TRITON, reason="needs CUDA and Triton")
def test_gpu_kernel_is_capturable_with_device_lengths():
    """Lengths are device tensors read only by the kernel: one CUDA graph serves every length."""
    q, qr, c, k, _, _, _, _ = make_case(batch=2, heads=16, rank=512, rope=64, tokens=1024, dtype=torch.bfloat16,
                                        device="cuda", seed=4)
    lengths = torch.tensor([500, 1000], device="cuda")
    out = torch.empty_like(q)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        mla_decode_attention(q, qr, c, k, 0.07, kv_lengths=lengths, out=out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        mla_decode_attention(q, qr, c, k, 0.07, kv_lengths=lengths, out=out)
    for new in ([500, 1000], [7, 1024], [1, 333]):
        lengths.copy_(torch.tensor(new))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = mla_decode_attention_reference(q, qr, c, k, 0.07, kv_lengths=lengths)
        assert torch.isfinite(out).all() and rel_err(out, ref) <= 1e-2, new


GPU = pytest.mark.skipif(not torch.cuda.is_available() or not HAVE_TRITON, reason="needs CUDA and Triton")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, GPU])])
def test_patched_generation_matches_stock(device, monkeypatch):
    """patch_mla (fp32): two left-padded turns give stock's tokens and logits; on CUDA the absorbed
    steps go through the kernel (on CPU through absorbed_attention: this checks the harness)."""
    from test_mla import VARIANTS, make_model, max_diff, two_turns
    from transformers import DynamicCache

    from kvcompress.mla import patch_mla

    calls = []
    forward = mla_decode._triton_forward
    monkeypatch.setattr(mla_decode, "_triton_forward", lambda *a, **kw: calls.append(1) or forward(*a, **kw))
    monkeypatch.delenv("KVCOMPRESS_DISABLE_TRITON", raising=False)
    for family, overrides in VARIANTS:
        model = make_model(family, overrides).to(device)
        ref_seqs, ref_logits = two_turns_on(device, two_turns, model, DynamicCache(config=model.config))
        with patch_mla(model):
            seqs, logits = two_turns_on(device, two_turns, model, MLALatentCache(model.config))
        for ref, got in zip(ref_seqs, seqs):
            assert torch.equal(ref, got)
        assert max_diff(ref_logits, logits) < 1e-4
    if device == "cuda":
        assert calls  # the absorbed steps really went through the kernel


def two_turns_on(device, two_turns, model, cache):
    """``test_mla.two_turns`` (which builds its inputs on the CPU) with generation on ``device``:
    inputs moved there, sequences and logits handed back on the CPU."""
    original = model.generate

    def generate(input_ids=None, attention_mask=None, **kw):
        out = original(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kw)
        out.sequences = out.sequences.cpu()
        out.logits = tuple(x.cpu() for x in out.logits)
        return out

    model.generate = generate
    try:
        return two_turns(model, cache)
    finally:
        del model.generate


def test_long_prompt_reserves_at_most_256_spare_tokens_and_decode_does_not_copy():
    layer = MLALatentLayer(0, 8, 4)
    layer.update(torch.randn(1, 1, 5000, 8), torch.randn(1, 1, 5000, 4))
    assert 5000 + 256 <= layer.capacity < 5000 + 256 + 16  # not 1.25 x 5000
    for _ in range(256):
        layer.update(torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 4))
    assert layer.reallocations == 1 and layer.get_seq_length() == 5256
