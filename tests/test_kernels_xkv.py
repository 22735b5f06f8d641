"""xKV fused decode: the reference against naive float64 attention over rebuilt K/V, the Triton kernels
(CPU interpreter in a subprocess; CUDA when present) against the reference, the growable exact-tail
storage, and patched generation (``patch_xkv``) against the unpatched materialising path."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from conftest import tiny_model
from kvcompress.kernels import configure_kernels, xkv_decode
from kvcompress.kernels.xkv_decode import ExactPart, FactoredPart, xkv_decode_attention, xkv_decode_attention_reference
from kvcompress.ops import rope_cos_sin
from kvcompress.xkv import XKVCache, XKVLayer, _rope_table_dtype, patch_xkv, tail_capacity
from kvcompress.xkv import attention as xkv_attention

TESTS = Path(__file__).resolve().parent
HAVE_TRITON = importlib.util.find_spec("triton") is not None


# -- random cases ---------------------------------------------------------------------------------
def make_case(batch=2, q_heads=8, kv_heads=2, head_dim=32, rank_k=24, rank_v=40, layout=("e3", "f37", "f50", "e9"),
              pad=(0, 7), rope=True, dtype=torch.float32, device="cpu", seed=0):
    """A query and parts in token order: ``"eN"`` an exact part of N tokens, ``"fN"`` a factored segment
    of N tokens (RoPE at its slots when ``rope``). ``pad[b]`` masks the first tokens of row ``b``."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)

    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)).float()
    parts, slot = [], 0
    for item in layout:
        kind, n = item[0], int(item[1:])
        if kind == "e":
            parts.append(ExactPart(randn(batch, kv_heads, n, head_dim), randn(batch, kv_heads, n, head_dim)))
        else:
            cos = sin = None
            if rope:
                cos, sin = rope_cos_sin(inv_freq, torch.arange(slot, slot + n))
                # the table dtype XKVCache hands the decode (float16 for 16-bit states)
                cos, sin = cos.to(device, _rope_table_dtype(dtype)), sin.to(device, _rope_table_dtype(dtype))
            parts.append(FactoredPart(randn(batch, n, rank_k), randn(batch, rank_k, kv_heads * head_dim, scale=rank_k ** -0.5),
                                      randn(batch, n, rank_v), randn(batch, rank_v, kv_heads * head_dim, scale=rank_v ** -0.5),
                                      cos, sin))
        slot += n
    valid = torch.ones(batch, slot, dtype=torch.bool)
    for row, p in enumerate(pad[:batch]):
        valid[row, :p] = False
    query = randn(batch, q_heads, 1, head_dim)
    return query, parts, head_dim ** -0.5, valid.to(device)


def naive_attention(query, parts, scaling, valid):
    """Float64 softmax attention over keys and values rebuilt from the factors (RoPE rotate-half)."""
    keys, values = [], []
    for part in parts:
        if isinstance(part, ExactPart):
            keys.append(part.keys.double())
            values.append(part.values.double())
            continue
        b, t, _ = part.key_factor.shape
        h = part.key_right.shape[-1] // query.shape[-1]  # kv heads
        k = (part.key_factor.double() @ part.key_right.double()).view(b, t, h, -1)
        if part.cos is not None:
            cos, sin = part.cos.double()[:, None, :], part.sin.double()[:, None, :]
            half = k.shape[-1] // 2
            rot = torch.cat((-k[..., half:], k[..., :half]), dim=-1)
            k = k * cos + rot * sin
        keys.append(k.transpose(1, 2))
        values.append((part.value_factor.double() @ part.value_right.double()).view(b, t, h, -1).transpose(1, 2))
    k, v = torch.cat(keys, dim=2), torch.cat(values, dim=2)
    groups = query.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (query.double() @ k.transpose(-1, -2)) * scaling  # [B, Hq, 1, T]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).transpose(1, 2)  # [B, 1, Hq, dv]


def rel_err(out, ref):
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


CASES = {
    "gqa4_pad_two_segments": dict(),
    "mha_odd_tokens": dict(q_heads=2, kv_heads=2, layout=("e1", "f33", "e5"), pad=(3, 0)),
    "gqa8_no_rope_three_segments": dict(q_heads=16, kv_heads=2, rope=False, layout=("f17", "f65", "f9", "e2")),
    "batch3_head64_no_sinks": dict(batch=3, head_dim=64, layout=("f71", "e4"), pad=(0, 5, 30), rank_k=16, rank_v=80),
    "four_exact_parts": dict(layout=("e3", "f20", "e5", "f30", "e2", "e4"), pad=(0, 9)),
    "exact_only": dict(layout=("e5", "e7"), pad=(2, 0)),
    "short_segment_one_split": dict(layout=("e2", "f20", "e3"), pad=(0, 3)),
}


# the GPU tests' shapes (kernels and the compiled op alike): Llama-3-8B heads with two segments and left
# padding, and a small GQA layout without RoPE and without sinks
GPU_SHAPES = [dict(q_heads=32, kv_heads=8, head_dim=128, rank_k=128, rank_v=192, layout=("e4", "f1000", "f333", "e70"),
                   pad=(0, 11)),
              dict(q_heads=8, kv_heads=2, head_dim=64, rank_k=40, rank_v=72, layout=("f257", "e3"), pad=(2, 0),
                   rope=False)]

# counting torch ops and Triton launches of one call: xkv_decode.count_ops_and_launches
count_ops_and_launches = xkv_decode.count_ops_and_launches


# Bounds on one fused call (the Triton path): sinks + one segment + tail is 4 launches and 5 torch ops (4
# allocations, the split-K sum); the version before this bound took 2 launches and 87 torch ops, among
# them a torch.cat of sinks and tail every step and a float copy of B_v.
OP_BOUNDS = {"one_segment": (("e4", "f100", "e20"), 4, 6), "two_segments": (("e4", "f60", "f40", "e20"), 7, 9)}


# -- reference ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_matches_naive_float64(name):
    query, parts, scaling, valid = make_case(**CASES[name], dtype=torch.float64)
    torch.testing.assert_close(xkv_decode_attention_reference(query, parts, scaling, valid),
                               naive_attention(query, parts, scaling, valid), rtol=1e-10, atol=1e-12)
    query, parts, scaling, valid = make_case(**CASES[name], dtype=torch.float32, seed=1)
    out = xkv_decode_attention(query, parts, scaling, valid, use_triton=False)
    assert out.dtype == torch.float32 and out.shape == (query.shape[0], 1, query.shape[1], query.shape[-1])
    assert rel_err(out, naive_attention(query, parts, scaling, valid)) < 1e-5


def test_masking_and_merge_are_used():
    """Changing a masked token changes nothing; changing a valid factored token changes the output."""
    query, parts, scaling, valid = make_case()
    base = xkv_decode_attention_reference(query, parts, scaling, valid)
    parts[1].key_factor[1, 0] += 5.0  # row 1 masks its first 7 tokens: slot 3 is one of them
    torch.testing.assert_close(xkv_decode_attention_reference(query, parts, scaling, valid), base)
    parts[1].key_factor[0, 0] += 5.0  # row 0 sees every token
    assert not torch.allclose(xkv_decode_attention_reference(query, parts, scaling, valid)[0], base[0])


def test_bad_inputs_raise_naming_the_parameter():
    query, parts, scaling, valid = make_case()
    with pytest.raises(ValueError, match="query"):
        xkv_decode_attention(query[:, :, :, :5].expand(-1, -1, 2, -1), parts, scaling, valid)
    with pytest.raises(ValueError, match="valid"):
        xkv_decode_attention(query, parts, scaling, valid[:, 1:])
    with pytest.raises(ValueError, match=r"parts\[1\]"):
        xkv_decode_attention(query, [parts[0], FactoredPart(parts[1].key_factor, parts[1].key_right[:, :5],
                                                            parts[1].value_factor, parts[1].value_right)], scaling)
    with pytest.raises(ValueError, match="multiple of the parts' kv_heads"):
        xkv_decode_attention(query[:, :3], parts, scaling, valid)
    with pytest.raises(TypeError, match=r"parts\[0\]"):
        xkv_decode_attention(query, [object()], scaling)


def test_valid_mask_from_attention_mask_views():
    """Bool and additive 4-D masks (batch or broadcast rows, more columns than tokens, a non-contiguous
    view): the last query row's last ``tokens`` columns, in one view op for a bool mask."""
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(3, 1, 2, 12, generator=g) > 0.3
    additive = torch.zeros(3, 1, 2, 12).masked_fill(~keep, torch.finfo(torch.float32).min)
    expected = keep[:, 0, -1, -9:]
    for mask in (keep, additive, keep.transpose(2, 3).contiguous().transpose(2, 3)):
        valid = xkv_decode.valid_mask_from_attention_mask(mask, 3, 9)
        assert valid.dtype == torch.bool and torch.equal(valid, expected)
    valid = xkv_decode.valid_mask_from_attention_mask(keep[:1], 3, 9)
    assert valid.shape == (3, 9) and torch.equal(valid, expected[:1].expand(3, 9))
    assert xkv_decode.valid_mask_from_attention_mask(None, 3, 9) is None
    with pytest.raises(ValueError, match="fewer than"):
        xkv_decode.valid_mask_from_attention_mask(keep, 3, 13)


# -- Triton ---------------------------------------------------------------------------------------
_INTERPRETER_SCRIPT = r"""
import json, os, sys
os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere
sys.path[:0] = [{tests!r}, {root!r}]
import interpreter_compat  # Triton 3.6's interpreter under NumPy >= 2.4
import torch
from kvcompress.kernels import configure_kernels, xkv_decode
from test_kernels_xkv import CASES, OP_BOUNDS, count_ops_and_launches, make_case, rel_err, patched_generation_matches
tma_calls = [0]
_tma_usable = xkv_decode._tma_usable
def counting_tma_usable(*args):
    used = _tma_usable(*args)
    tma_calls[0] += used
    return used
xkv_decode._tma_usable = counting_tma_usable
counts = {{}}
for name, (layout, _, _) in OP_BOUNDS.items():
    for masked in (False, True):
        query, parts, scaling, valid = make_case(layout=layout, seed=4)
        ops, launches = count_ops_and_launches(lambda: xkv_decode.xkv_decode_attention(
            query, parts, scaling, valid if masked else None, use_triton=True))
        counts[name + ("_masked" if masked else "")] = dict(ops=dict(ops), launches=launches)
configure_kernels(poison_buffers=True)
errors = {{}}
for name, case in CASES.items():
    query, parts, scaling, valid = make_case(**case, seed=3)
    ref = xkv_decode.xkv_decode_attention(query, parts, scaling, valid, use_triton=False)
    out = xkv_decode.xkv_decode_attention(query, parts, scaling, valid, use_triton=True)
    errors[name] = rel_err(out, ref) if torch.isfinite(out).all() else float("inf")
for block_t, block_r in ((256, 64), (128, 32)):  # the autotuner's large token tiles (T < BLOCK_T included)
    configure_kernels(xkv_scores_config=dict(BLOCK_T=block_t, BLOCK_R=block_r, num_warps=8, num_stages=2))
    for name in ("gqa4_pad_two_segments", "gqa8_no_rope_three_segments"):
        query, parts, scaling, valid = make_case(**dict(CASES[name], layout=("e3", "f300", "f37", "e9")), seed=6)
        ref = xkv_decode.xkv_decode_attention(query, parts, scaling, valid, use_triton=False)
        out = xkv_decode.xkv_decode_attention(query, parts, scaling, valid, use_triton=True)
        errors[f"{{name}}_tile{{block_t}}"] = rel_err(out, ref) if torch.isfinite(out).all() else float("inf")
configure_kernels(xkv_scores_config=None)
query, parts, scaling, valid = make_case(seed=3)
valid[1] = False  # a row that attends to nothing: 0, as the reference
out = xkv_decode.xkv_decode_attention(query, parts, scaling, valid, use_triton=True)
ref = xkv_decode.xkv_decode_attention(query, parts, scaling, valid, use_triton=False)
masked_row_ok = bool(torch.isfinite(out).all() and (out[1] == 0).all() and rel_err(out[0], ref[0]) <= 1e-4)
calls = patched_generation_matches("llama", dict(hidden_size=128))
print("RESULT " + json.dumps(dict(errors=errors, fused_calls=calls, counts=counts, masked_row_ok=masked_row_ok,
                                  tma_calls=tma_calls[0])))
"""


def run_interpreted(script: str, **env_vars: str) -> dict:
    """Run ``script`` under TRITON_INTERPRET=1 (plus ``env_vars``) in a subprocess (the variable must be set
    before Triton is imported, and must not leak into other tests); returns the JSON of its last ``RESULT ``
    line."""
    env = dict(os.environ, TRITON_INTERPRET="1", **env_vars)
    env.pop("KVCOMPRESS_DISABLE_TRITON", None)
    if "KVCOMPRESS_XKV_TMA" not in env_vars:
        env.pop("KVCOMPRESS_XKV_TMA", None)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed (the kernels run on GPUs with Triton)")
@pytest.mark.parametrize("tma", [False, True])
def test_triton_interpreter_matches_reference_fp32(tma):
    """The Triton kernels under TRITON_INTERPRET=1 (a subprocess: see run_interpreted), output buffers
    poisoned with NaN; ``tma``: kernel 1's tensor-descriptor loads (KVCOMPRESS_XKV_TMA=1 forces them in the
    interpreter; by default they are for CUDA sm_90+ only), which must really be taken."""
    if tma and xkv_decode.TensorDescriptor is None:
        pytest.skip("this Triton has no host-side tensor descriptors")
    result = run_interpreted(_INTERPRETER_SCRIPT.format(tests=str(TESTS), root=str(TESTS.parent)),
                             **({"KVCOMPRESS_XKV_TMA": "1"} if tma else {}))
    assert (result["tma_calls"] > 0) == tma
    assert set(CASES) <= set(result["errors"]) and len(result["errors"]) == len(CASES) + 4
    for name, error in result["errors"].items():
        assert error <= 1e-4, (name, error)
    assert result["masked_row_ok"]
    assert result["fused_calls"] > 0  # the patched generation really went through the kernels
    # Launches and torch ops per fused call stay bounded: a per-step torch.cat of the exact parts, a float
    # copy of B_v or a torch-side softmax merge would break these.
    for name, count in result["counts"].items():
        _, max_launches, max_ops = OP_BOUNDS[name.removesuffix("_masked")]
        assert count["launches"] <= max_launches and sum(count["ops"].values()) <= max_ops, (name, count)
        assert "cat" not in count["ops"] and "_to_copy" not in count["ops"], (name, count)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not HAVE_TRITON, reason="needs CUDA and Triton")
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-4)])
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("tma", [False, True])
def test_gpu_kernel_matches_reference(dtype, tol, shape, tma, monkeypatch):
    # kernel 1's tensor-descriptor loads (the default on sm_90+; elsewhere the pointer path runs either way)
    query, parts, scaling, valid = make_case(**shape, dtype=dtype, device="cuda", seed=5)
    ref = xkv_decode_attention(query, parts, scaling, valid, use_triton=False)
    with configure_kernels(xkv_tma="on" if tma else "off", poison_buffers=True):
        out = xkv_decode_attention(query, parts, scaling, valid, use_triton=True)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, ref) <= tol


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
def test_tma_switch_modes_and_layout_rules():
    """xkv_tma: 'auto' is CUDA sm_90+ only (so off for CPU tensors), 'on' forces it where the layout allows,
    'off' never; a misaligned stride falls back to the pointer loads."""
    factor, right = torch.zeros(2, 64, 32), torch.zeros(2, 32, 16)
    with configure_kernels(xkv_tma="auto"):
        assert not xkv_decode._tma_usable(factor, right)
    with configure_kernels(xkv_tma="off"):
        assert not xkv_decode._tma_usable(factor, right)
    with configure_kernels(xkv_tma="on"):
        assert xkv_decode._tma_usable(factor, right) == (xkv_decode.TensorDescriptor is not None)
        assert not xkv_decode._tma_usable(torch.zeros(2, 64, 33)[..., :32], right)  # row stride of 33 floats


def test_kernel_options_from_environment_and_configure():
    """The environment gives the defaults (a typo names the variable and its allowed values);
    configure_kernels changes the one options object the kernels read and restores it as a context."""
    from kvcompress import kernels

    env = {"KVCOMPRESS_XKV_TMA": "1", "KVCOMPRESS_XKV_AUTOTUNE": "0", "KVCOMPRESS_DISABLE_TRITON": "1"}
    assert kernels.options_from_environment(env) == kernels.KernelOptions(
        disable_triton=True, xkv_tma="on", xkv_autotune=False)
    assert kernels.options_from_environment({}) == kernels.KernelOptions()
    with pytest.raises(ValueError, match="KVCOMPRESS_XKV_TMA.*'auto'.*'0'.*'1'"):
        kernels.options_from_environment({"KVCOMPRESS_XKV_TMA": "yes"})
    for name in ("KVCOMPRESS_XKV_AUTOTUNE", "KVCOMPRESS_DISABLE_TRITON"):
        with pytest.raises(ValueError, match=f"{name}='maybe'.*'0' and '1'"):
            kernels.options_from_environment({name: "maybe"})
    before = kernels.kernel_options()
    with kernels.configure_kernels(disable_triton=True, xkv_tma="off") as options:
        assert options is kernels.kernel_options() and options.disable_triton and options.xkv_tma == "off"
        assert not kernels.triton_usable(torch.zeros(1))
    assert kernels.kernel_options() is before
    previous = kernels.configure_kernels(xkv_autotune=not before.xkv_autotune)
    assert previous.xkv_autotune == before.xkv_autotune and kernels.kernel_options().xkv_autotune != before.xkv_autotune
    kernels.configure_kernels(**dataclasses.asdict(before))
    assert kernels.kernel_options() == before
    with pytest.raises(TypeError, match="unknown option.*'xkv_tmaa'.*allowed"):
        kernels.configure_kernels(xkv_tmaa="on")
    with pytest.raises(ValueError, match="xkv_tma='1'.*'auto', 'on', 'off'"):
        kernels.configure_kernels(xkv_tma="1")
    assert kernels.kernel_options() == before


_TMA_FALLBACK_SCRIPT = r"""
import json, os, sys, warnings
os.environ["TRITON_INTERPRET"] = "1"
sys.path[:0] = [{tests!r}, {root!r}]
import interpreter_compat  # Triton 3.6's interpreter under NumPy >= 2.4
import torch
from kvcompress.kernels import configure_kernels, xkv_decode
from test_kernels_xkv import make_case, rel_err
real_launch, attempts = xkv_decode._launch, []
def launch(kernel, grid, *args, **kwargs):  # a Triton whose TMA lowering fails: the TMA launch raises
    attempts.append(bool(kwargs.get("USE_TMA")))
    if kwargs.get("USE_TMA"):
        raise RuntimeError("no TMA lowering here")
    return real_launch(kernel, grid, *args, **kwargs)
xkv_decode._launch = launch
result = {{}}
query, parts, scaling, valid = make_case(seed=3)
ref = xkv_decode.xkv_decode_attention(query, parts, scaling, valid, use_triton=False)
configure_kernels(xkv_tma="on")  # forced: the failure is an error
try:
    xkv_decode.xkv_decode_attention(query, parts, scaling, valid, use_triton=True)
    result["forced_raised"] = False
except RuntimeError as error:
    result["forced_raised"] = "no TMA lowering" in str(error)
result["failures_after_forced"] = len(xkv_decode._TMA_FAILURE)
# auto, with TMA made usable on these CPU tensors (as on an sm_90 GPU): warn once, then pointer loads
configure_kernels(xkv_tma="auto")
xkv_decode._tma_usable = lambda kf, kr: not xkv_decode._TMA_FAILURE
attempts.clear()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    first = xkv_decode.xkv_decode_attention(query, parts, scaling, valid, use_triton=True)
    after_first = list(attempts)
    second = xkv_decode.xkv_decode_attention(query, parts, scaling, valid, use_triton=True)
result.update(errors=[rel_err(first, ref), rel_err(second, ref)], after_first=after_first,
              after_second=attempts[len(after_first):], warnings=[str(w.message) for w in caught])
print("RESULT " + json.dumps(result))
"""


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
def test_tma_failure_falls_back_to_pointer_loads_with_one_warning():
    """Default mode: a TMA launch that fails (a Triton or driver without the lowering) warns once and the
    call, and every later one, runs the pointer loads with the reference's result; forced mode (=1)
    raises instead. In the interpreter, with the failure injected at the launch."""
    result = run_interpreted(_TMA_FALLBACK_SCRIPT.format(tests=str(TESTS), root=str(TESTS.parent)))
    assert result["forced_raised"] and result["failures_after_forced"] == 0
    assert all(error <= 1e-4 for error in result["errors"]), result["errors"]
    # the first segment's TMA launch fails once; it and every later launch take the pointer loads
    assert result["after_first"][0] is True and result["after_first"][1] is False
    assert result["after_first"].count(True) == 1
    assert True not in result["after_second"]
    assert len(result["warnings"]) == 1 and "TMA loads failed" in result["warnings"][0]


# -- growable exact tail --------------------------------------------------------------------------
def test_tail_capacity_policy():
    # first allocation: the need plus a sixteenth of it (16..256 tokens of room), in multiples of 16
    assert tail_capacity(1, 0) == 32 and tail_capacity(64, 0) == 80 and tail_capacity(256, 0) == 272
    assert tail_capacity(4096, 0) == 4096 + 256  # the room stops at 256 tokens
    assert tail_capacity(257, 256) == 320  # later: 1.25x the capacity
    assert tail_capacity(1200, 1024) == 1280
    assert tail_capacity(5000, 1024) == 5008  # the need wins when larger


def _layer_states(cache, idx=0):
    layer = cache.layers[idx]
    return layer, layer.keys, layer.values


def test_tail_grows_geometrically_in_place_and_reports_valid_bytes():
    config = tiny_model("llama").config
    cache = XKVCache(config, group_size=2, rank_k=None, rank_v=None, factor_bits=None, matrix_bits=None, window=4, sink=0, min_compress_tokens=10_000)
    g = torch.Generator().manual_seed(0)
    states = lambda n: (torch.randn(1, 2, n, 16, generator=g), torch.randn(1, 2, n, 16, generator=g))  # noqa: E731
    k0, v0 = states(3)
    layer = cache.layers[0]  # one layer alone: its own update (the cache's checks the layers' order)
    layer.update(k0, v0)
    assert layer.tail_capacity() == 32
    pointer, written = layer._key_buffer.data_ptr(), [k0]
    reallocations, capacities = 0, []
    for _ in range(600):
        k, v = states(1)
        written.append(k)
        full_k, _ = layer.update(k, v)
        if layer._key_buffer.data_ptr() != pointer:
            reallocations += 1
            pointer = layer._key_buffer.data_ptr()
            capacities.append(layer.tail_capacity())
    # 603 tokens: geometric steps (at least 1.25x each), not one copy per token
    assert len(capacities) <= 14 and capacities[-1] >= 603 and all(c % 16 == 0 for c in capacities)
    assert all(b >= 1.25 * a for a, b in zip([32] + capacities, capacities))
    assert torch.equal(full_k, torch.cat(written, dim=2)) and torch.equal(layer.keys, full_k)
    element = k0.element_size()
    assert layer.nbytes() == 2 * 603 * 2 * 16 * element  # valid tokens only
    assert layer.reserved_nbytes() == 2 * capacities[-1] * 2 * 16 * element
    assert cache.reserved_nbytes() >= cache.nbytes()


def test_tail_assignment_replaces_storage():
    """cache_utils' offload/prefetch assign keys then values: the tensors become the (full) storage."""
    config = tiny_model("llama").config
    cache = XKVCache(config, group_size=2, rank_k=None, rank_v=None, factor_bits=None, matrix_bits=None, window=4, sink=0, min_compress_tokens=10_000)
    k, v = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    layer = cache.layers[0]
    layer.update(k, v)
    layer.keys, layer.values = layer.keys.clone(), layer.values.clone()
    assert layer.tail_capacity() == 5 and layer.reserved_nbytes() == layer.nbytes()
    with pytest.raises(ValueError, match="values hold 3 tokens but keys hold 5"):
        layer.values = layer.values[:, :, :3]
    k2, v2 = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)
    full_k, full_v = layer.update(k2, v2)
    assert torch.equal(full_k, torch.cat([k, k2], 2)) and torch.equal(full_v, torch.cat([v, v2], 2))
    assert layer.tail_capacity() == tail_capacity(6, 5)


def test_tail_crop_reorder_and_compression_shrink():
    model = tiny_model("llama")
    cache = XKVCache(model.config, group_size=2, rank_k=8, rank_v=8, window=4, sink=2, min_compress_tokens=1)
    ids = torch.randint(3, 160, (2, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        for _ in range(3):
            nxt = out.logits[:, -1:].argmax(-1)
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
    layer: XKVLayer = cache.layers[1]
    # the 300-token prefill buffer was freed: the tail's new one fits the window (+ room)
    assert layer.keys.shape[-2] == 4 + 3 and layer.tail_capacity() == tail_capacity(4, 0)
    assert cache.nbytes() == cache.expected_nbytes()
    tail = layer.keys.clone()
    cache.crop(-2)
    assert torch.equal(layer.keys, tail[..., :-2, :]) and cache.get_seq_length() == 300 + 3 - 2
    cache.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(layer.keys, tail[[1, 0], :, :-2]) and layer.tail_capacity() == tail_capacity(4, 0)
    cache.batch_select_indices(torch.tensor([1]))
    assert torch.equal(layer.keys, tail[[0], :, :-2])
    cache.reset()
    assert layer.keys is None and cache.get_seq_length() == 0


# -- patched generation ---------------------------------------------------------------------------
def _left_padded(lengths=(48, 41), vocab=160, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, -n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[row, -n:] = 1
    return ids, mask


def _generate(model, ids, mask, cache):
    return model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=8,
                          do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)


def patched_generation_matches(family: str, overrides: dict | None = None, device: str = "cpu", **cache_kwargs) -> int:
    """Two turns (batch 2, left padding) unpatched and patched: same tokens, close scores. Returns how many
    fused decode calls the patched run made (asserting they happened is the caller's job)."""
    model = tiny_model(family, **(overrides or {})).to(device)
    # merge_segments=False by default: the second turn makes a second segment, so the kernels' multi-segment
    # path runs; with True it extends the first one
    params = dict(group_size=2, rank_k=12, rank_v=16, window=4, sink=2, min_compress_tokens=1, merge_segments=False)
    params.update(cache_kwargs)
    ids, mask = (t.to(device) for t in _left_padded())
    calls = []
    original = xkv_attention.xkv_decode_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    results = []
    for patched in (False, True):
        handle = patch_xkv(model) if patched else None
        xkv_attention.xkv_decode_attention = counting
        try:
            cache = XKVCache(model.config, **params)
            first = _generate(model, ids, mask, cache)
            extra = torch.randint(3, 160, (2, 20), generator=torch.Generator().manual_seed(7)).to(device)
            ids2 = torch.cat([first.sequences, extra], dim=1)
            mask2 = torch.cat([mask, torch.ones(2, ids2.shape[1] - mask.shape[1], dtype=torch.long, device=device)], dim=1)
            second = _generate(model, ids2, mask2, cache)
            results.append((first, second, [len(group.segments) for group in cache.groups]))
        finally:
            xkv_attention.xkv_decode_attention = original
            if handle is not None:
                handle.remove()
    (ref1, ref2, ref_segments), (out1, out2, out_segments) = results
    assert ref_segments == out_segments == [1 if params["merge_segments"] else 2] * len(ref_segments)
    for ref, out in ((ref1, out1), (ref2, out2)):
        assert torch.equal(ref.sequences, out.sequences)
        for a, b in zip(ref.scores, out.scores):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    return len(calls)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_patched_generation_equals_unpatched(family):
    model_layers, steps = 4, 2 * 7  # 8 new tokens per turn: 7 decode steps each
    assert patched_generation_matches(family) == model_layers * steps


def test_patched_generation_equals_unpatched_with_merged_segments():
    assert patched_generation_matches("llama", merge_segments=True) == 4 * 2 * 7


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not HAVE_TRITON, reason="needs CUDA and Triton")
def test_gpu_patched_generation_equals_unpatched_fp32():
    """On CUDA the patched decode runs the Triton kernels (head_dim 32 is covered): same greedy tokens."""
    assert patched_generation_matches("llama", dict(hidden_size=128), device="cuda") == 4 * 2 * 7


def test_patched_full_rank_equals_dynamic_cache_and_remove_restores():
    model = tiny_model("qwen2", seed=2)
    ids, mask = _left_padded(seed=3)
    ref = _generate(model, ids, mask, DynamicCache(config=model.config))
    before = model.config._attn_implementation
    with patch_xkv(model):
        assert model.config._attn_implementation == "kvcompress_xkv_" + before
        with pytest.raises(ValueError, match="already patched"):
            patch_xkv(model)
        cache = XKVCache(model.config, group_size=2, rank_k=None, rank_v=None, factor_bits=None, matrix_bits=None, window=4, sink=2, min_compress_tokens=1)
        out = _generate(model, ids, mask, cache)
    assert model.config._attn_implementation == before
    assert all(not module._forward_pre_hooks for module in model.modules() if hasattr(module, "num_key_value_groups"))
    assert torch.equal(ref.sequences, out.sequences)
    for a, b in zip(ref.scores, out.scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert all(layer.context is None for layer in cache.layers)


def test_patched_model_with_other_caches_runs_as_before():
    model = tiny_model("llama", seed=4)
    ids, mask = _left_padded()
    ref = _generate(model, ids, mask, DynamicCache(config=model.config))
    with patch_xkv(model):
        out = _generate(model, ids, mask, DynamicCache(config=model.config))
    assert torch.equal(ref.sequences, out.sequences)


def test_patched_eager_model_and_unsupported_implementation():
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="eager").eval()
    ids, mask = _left_padded()
    make = lambda: XKVCache(model.config, group_size=2, rank_k=12, rank_v=16, window=4, sink=2,  # noqa: E731
                            min_compress_tokens=1)
    ref = _generate(model, ids, mask, make())
    with patch_xkv(model):
        assert model.config._attn_implementation == "kvcompress_xkv_eager"
        out = _generate(model, ids, mask, make())
    assert model.config._attn_implementation == "eager"
    assert torch.equal(ref.sequences, out.sequences)
    model.config._attn_implementation_internal = "flash_attention_2"  # not loadable here: set the field only
    with pytest.raises(ValueError, match="'sdpa' or 'eager'"):
        patch_xkv(model)


def test_patched_beam_search_equals_unpatched():
    model = tiny_model("llama", seed=6)
    ids, mask = _left_padded()
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
    make = lambda: XKVCache(model.config, group_size=2, rank_k=12, rank_v=16, window=4, sink=2,  # noqa: E731
                            min_compress_tokens=1)
    ref = model.generate(past_key_values=make(), **kwargs)
    with patch_xkv(model):
        out = model.generate(past_key_values=make(), **kwargs)
    assert torch.equal(ref, out)
