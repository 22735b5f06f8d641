"""The custom op ``torch.ops.kvcompress.xkv_decode_attention`` that carries the fused xKV decode through
``torch.compile``: registration and fake (meta) implementation, compiled calls (``fullgraph=True``,
dynamo's ``eager``/``aot_eager`` backends on CPU) against the eager path for every part layout, with the
reference inside the op and, when Triton is installed, the interpreted kernels (a subprocess); on CUDA
(``-m gpu``) inductor in mode ``reduce-overhead`` (CUDA graphs)."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from kvcompress.kernels import xkv_decode
from kvcompress.kernels.xkv_decode import xkv_decode_attention
from test_kernels_xkv import GPU_SHAPES, HAVE_TRITON, TESTS, make_case, rel_err, run_interpreted

# Part layouts the op must flatten: sinks + segments + tail, a missing sink or tail part (empty exact
# tensors), no segment, exact parts between segments (joined, ``valid`` permuted), mixed RoPE tables.
LAYOUTS = {
    "one_segment": dict(layout=("e3", "f37", "e9")),
    "two_segments": dict(layout=("e3", "f37", "f50", "e9")),
    "no_sinks": dict(batch=3, head_dim=64, layout=("f71", "e4"), pad=(0, 5, 30), rank_k=16, rank_v=80),
    "no_tail": dict(layout=("e2", "f40"), pad=(0, 3)),
    "segments_only": dict(q_heads=16, kv_heads=2, layout=("f17", "f45"), rope=False),
    "exact_only": dict(layout=("e5", "e7"), pad=(2, 0)),
    "exact_between_segments": dict(layout=("e3", "f20", "e5", "f30", "e2", "e4"), pad=(0, 9)),
}


def mixed_rope_case(seed: int = 0):
    """Two segments, only the first with a RoPE table (the op's 0-element placeholder for the second)."""
    query, parts, scaling, valid = make_case(layout=("e3", "f37", "f50", "e9"), seed=seed)
    parts[2].cos = parts[2].sin = None
    return query, parts, scaling, valid


def case(name: str, seed: int):
    return mixed_rope_case(seed) if name == "mixed_rope" else make_case(**LAYOUTS[name], seed=seed)


class CountingBackend:
    """A dynamo backend that counts compiled graphs (a recompile is a second graph) and records whether
    they call the op, delegating to ``eager``/``aot_eager``."""

    def __init__(self, backend: str):
        self.backend, self.graphs, self.op_calls = backend, 0, 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs += 1
        op = torch.ops.kvcompress.xkv_decode_attention
        self.op_calls += sum(node.target in (op, op.default) for node in gm.graph.nodes)
        return torch._dynamo.lookup_backend(self.backend)(gm, example_inputs)


def flat_op_args(query, parts, scaling, valid, use_triton=None) -> tuple:
    kv_heads, value_dim, _ = xkv_decode._check(query, parts, valid)
    *flat, valid = xkv_decode._flat_args(query, parts, valid, kv_heads, value_dim)
    return (query, *flat, float(scaling), valid, use_triton)


# -- registration and fake implementation --------------------------------------------------------------
def test_op_is_registered_with_flat_arguments_and_eager_calls_skip_it():
    op = torch.ops.kvcompress.xkv_decode_attention
    assert xkv_decode._OP is op
    schema = str(op.default._schema)
    assert "Tensor[] key_factors" in schema and "Tensor? valid" in schema and "float scaling" in schema
    assert not any(arg.alias_info is not None and arg.alias_info.is_write for arg in op.default._schema.arguments)
    # eager calls stay off the dispatcher (no per-call overhead): the op never shows up
    query, parts, scaling, valid = make_case()
    ops, _ = xkv_decode.count_ops_and_launches(lambda: xkv_decode_attention(query, parts, scaling, valid))
    assert "xkv_decode_attention" not in ops


@pytest.mark.parametrize("name", sorted(LAYOUTS) + ["mixed_rope"])
def test_op_equals_the_eager_call_and_passes_opcheck(name):
    """Called directly, the op gives the eager call's output for every layout; opcheck checks its schema
    (no mutation, no aliasing) and its fake implementation against the real one."""
    query, parts, scaling, valid = case(name, seed=1)
    args = flat_op_args(query, parts, scaling, valid, use_triton=False)
    ref = xkv_decode_attention(query, parts, scaling, valid, use_triton=False)
    assert rel_err(torch.ops.kvcompress.xkv_decode_attention(*args), ref) <= 1e-6
    torch.library.opcheck(torch.ops.kvcompress.xkv_decode_attention, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_impl_gives_shape_and_dtype(dtype):
    query, parts, scaling, valid = make_case(batch=3, q_heads=8, kv_heads=2, head_dim=64, layout=("e2", "f20", "e4"),
                                             pad=(0, 1, 2), dtype=dtype)
    parts[0].values = parts[0].values[..., :32].contiguous()  # value head dim 32 != key head dim 64
    parts[2].values = parts[2].values[..., :32].contiguous()
    parts[1].value_right = parts[1].value_right[..., : 2 * 32].contiguous()
    args = flat_op_args(query, parts, scaling, valid)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor)
                else [mode.from_tensor(t) for t in a] if isinstance(a, list) else a for a in args]
        out = torch.ops.kvcompress.xkv_decode_attention(*fake)
    assert out.shape == (3, 1, 8, 32) and out.dtype == dtype and out.is_contiguous()


# -- compiled (CPU: the reference inside the op) -------------------------------------------------------
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("name", sorted(LAYOUTS) + ["mixed_rope"])
def test_compiled_fullgraph_matches_eager_without_recompiles(backend, name):
    """fullgraph=True (a graph break raises): the graph calls the op once, matches the eager call, and new
    values of the same shapes (a second case, another seed) reuse the graph."""
    torch._dynamo.reset()
    counting = CountingBackend(backend)
    scaling = case(name, seed=0)[2]
    step = torch.compile(lambda q, p, v: xkv_decode_attention(q, p, scaling, v), backend=counting, fullgraph=True)
    for seed in (0, 1, 2):
        query, parts, _, valid = case(name, seed=seed)
        ref = xkv_decode_attention(query, parts, scaling, valid)
        assert rel_err(step(query, parts, valid), ref) <= 1e-5
    assert counting.graphs == 1 and counting.op_calls == 1


def test_compiled_without_valid_and_with_use_triton_false():
    torch._dynamo.reset()
    counting = CountingBackend("aot_eager")
    query, parts, scaling, valid = make_case()
    step = torch.compile(lambda q, p: xkv_decode_attention(q, p, scaling, None, use_triton=False), backend=counting,
                         fullgraph=True)
    assert rel_err(step(query, parts), xkv_decode_attention(query, parts, scaling, None, use_triton=False)) <= 1e-5
    assert counting.graphs == 1 and counting.op_calls == 1


# -- compiled, Triton interpreter -------------------------------------------------------------------------
_INTERPRETER_SCRIPT = r"""
import json, os, sys
os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere
sys.path[:0] = [{tests!r}, {root!r}]
import interpreter_compat  # Triton 3.6's interpreter under NumPy >= 2.4
import torch
from kvcompress.kernels import configure_kernels, xkv_decode
from test_xkv_op import LAYOUTS, CountingBackend, case, rel_err
launches, original = [0], xkv_decode._launch
def launch(*args, **kwargs):
    launches[0] += 1
    return original(*args, **kwargs)
xkv_decode._launch = launch
configure_kernels(poison_buffers=True)
result = {{}}
for backend, names in {INTERPRETED!r}.items():
    for name in names:
        torch._dynamo.reset()
        counting = CountingBackend(backend)
        scaling = case(name, 0)[2]
        step = torch.compile(lambda q, p, v: xkv_decode.xkv_decode_attention(q, p, scaling, v, use_triton=True),
                             backend=counting, fullgraph=True)
        errors, launched = [], []
        for seed in (0, 1):
            query, parts, _, valid = case(name, seed)
            ref = xkv_decode.xkv_decode_attention(query, parts, scaling, valid, use_triton=False)
            launches[0] = 0
            out = step(query, parts, valid)
            launched.append(launches[0])
            errors.append(rel_err(out, ref) if torch.isfinite(out).all() else float("inf"))
        result[backend + "/" + name] = dict(errors=errors, launches=launched, graphs=counting.graphs,
                                            op_calls=counting.op_calls)
print("RESULT " + json.dumps(result))
"""


# every flattening case once (interpreted kernels are slow), the functionalising backend on the common one
INTERPRETED = {"eager": ["no_sinks", "no_tail", "exact_only", "exact_between_segments", "mixed_rope"],
               "aot_eager": ["two_segments"]}


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed (the kernels run on GPUs with Triton)")
def test_compiled_interpreter_kernels_match_reference_fp32():
    """The op runs the interpreted Triton kernels (TRITON_INTERPRET=1, a subprocess as in
    test_kernels_xkv.py) inside compiled fullgraph calls: the reference's output, launches really made
    on every call, one graph for two calls."""
    result = run_interpreted(_INTERPRETER_SCRIPT.format(tests=str(TESTS), root=str(TESTS.parent),
                                                        INTERPRETED=INTERPRETED))
    assert len(result) == sum(map(len, INTERPRETED.values()))
    for name, r in result.items():
        assert max(r["errors"]) <= 1e-5, (name, r)
        assert min(r["launches"]) >= 2, (name, r)  # the kernels, not the reference
        assert r["graphs"] == 1 and r["op_calls"] == 1, (name, r)


# -- GPU: inductor, CUDA graphs ------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not HAVE_TRITON, reason="needs CUDA and Triton")
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-4)])
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_reduce_overhead_on_cuda_matches_reference(dtype, tol, shape):
    """inductor, mode="reduce-overhead" (CUDA-graph trees: an eager warm-up run autotunes, then the op's
    launches are captured and replayed), fullgraph: each replay with new values gives the reference's
    output, and the function compiles once."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    scaling = make_case(**shape, dtype=dtype, device="cuda", seed=0)[2]
    step = torch.compile(lambda q, p, v: xkv_decode_attention(q, p, scaling, v), mode="reduce-overhead",
                         fullgraph=True)
    for seed in range(4):  # warm-up, record, then replays
        query, parts, _, valid = make_case(**shape, dtype=dtype, device="cuda", seed=seed)
        ref = xkv_decode_attention(query, parts, scaling, valid, use_triton=False)
        out = step(query, parts, valid).clone()  # the next replay overwrites the graph's output
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert rel_err(out, ref) <= tol, seed
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
