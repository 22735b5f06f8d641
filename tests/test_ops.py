"""kvcompress.ops factorisations on degenerate input: rank-deficient and zero matrices give finite factors whose
components beyond the numerical rank are exact zeros, full rank is lossless on every route and dtype, and a
seeded fuzz test holds every route to the exact SVD's error."""

from __future__ import annotations

import random

import pytest
import torch

from kvcompress import ops
from kvcompress.ops import (extend_truncated_svd, nonzero_components, numerical_rank, rank_tolerance,
                            resolve_svd_method, truncated_svd)

ROUTES = ["exact", "gram32", "randomized", "auto"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def svdvals(x: torch.Tensor) -> torch.Tensor:
    """Float64 singular values of every matrix of ``x``; all-zero matrices skip LAPACK (over a second each)."""
    x = x.double()
    zero = (x == 0).flatten(-2).all(-1)
    if not bool(zero.any()):
        return torch.linalg.svdvals(x)
    s = x.new_zeros(*x.shape[:-2], min(x.shape[-2:]))
    if not bool(zero.all()):
        s[~zero] = torch.linalg.svdvals(x[~zero])
    return s


def optimum(x: torch.Tensor, rank: int) -> torch.Tensor:
    """The Eckart-Young error at ``rank`` of every matrix of ``x`` (float64 SVD)."""
    return svdvals(x)[..., rank:].pow(2).sum(-1).sqrt()


def error(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    return (x.double() - left.double() @ right.double()).norm(dim=(-2, -1))


def slack(x: torch.Tensor, rank: int, method: str, s: torch.Tensor | None = None) -> torch.Tensor:
    """What rounding may add to the optimum: the factors' storage in ``x.dtype`` (a few eps of the input's norm),
    and the components below the float32 routes' zero tolerance (``size * eps32 * sigma_max`` each)."""
    norm = x.double().norm(dim=(-2, -1))
    top = (svdvals(x) if s is None else s)[..., 0]
    work = torch.float64 if method == "exact" or (method == "auto" and x.device.type == "cpu") else torch.float32
    size = max(x.shape[-2:])
    return 8 * torch.finfo(x.dtype).eps * norm + rank ** 0.5 * size * torch.finfo(work).eps * top


def exact_rank(x: torch.Tensor, s: torch.Tensor | None = None) -> int:
    """The largest rank of a batch of matrices whose nonzero singular values are well above float32's noise."""
    s = svdvals(x) if s is None else s
    return int(numerical_rank(s, max(x.shape[-2:]), torch.float32).max())


def degenerate(kind: str, t: int, d: int, dtype: torch.dtype, g: torch.Generator) -> tuple[torch.Tensor, int]:
    """A ``t x d`` matrix in ``dtype`` of a degenerate ``kind`` (exactly representable in every dtype), and its
    rank."""
    generic = torch.randn(t, d, generator=g, dtype=torch.float64) * torch.exp(-torch.arange(d) / max(d / 4, 1))
    if kind == "zeros":
        return torch.zeros(t, d, dtype=dtype), 0
    if kind == "repeated_row":  # a prompt of one token repeated
        return generic[:1].to(dtype).expand(t, d).contiguous(), 1
    if kind == "rank1":  # small integers: the outer product is exact in bf16/fp16
        u = torch.randint(-4, 5, (t, 1), generator=g).double()
        v = torch.randint(-4, 5, (1, d), generator=g).double()
        u[0, 0], v[0, 0] = 1.0, 1.0
        return (u @ v).to(dtype), 1
    if kind == "low_rank":  # every row one of k rows: rank k < min(t, d)
        k = max(1, min(t, d) // 3)
        base = generic[:k].to(dtype)
        idx = torch.cat([torch.arange(k), torch.randint(0, k, (t - k,), generator=g)])
        return base[idx].contiguous(), k
    x = generic.to(dtype)
    if kind == "zero_rows":  # padding rows
        x[t // 2:] = 0
    elif kind == "zero_columns":
        x[:, d // 3: 2 * d // 3] = 0
    elif kind != "generic":
        raise ValueError(kind)
    return x, exact_rank(x)


KINDS = ["zeros", "repeated_row", "rank1", "low_rank", "zero_rows", "zero_columns"]


def check(x: torch.Tensor, rank: int, method: str, left: torch.Tensor, right: torch.Tensor, rtol: float = 1e-3,
          s: torch.Tensor | None = None):
    """Finite factors in ``x.dtype`` whose error is at most the optimum * (1 + rtol) + ``slack`` (``s``: the
    singular values of ``x`` when already computed)."""
    assert torch.isfinite(left).all() and torch.isfinite(right).all(), (method, x.dtype)
    assert left.dtype == x.dtype and right.dtype == x.dtype
    s = svdvals(x) if s is None else s
    err, best = error(x, left, right), s[..., rank:].pow(2).sum(-1).sqrt()
    bound = best * (1 + rtol) + slack(x, rank, method, s)
    assert (err <= bound).all(), (method, x.dtype, rank, err, best, bound)


# 1. Rank-deficient input.

@pytest.mark.parametrize("method", ROUTES)
@pytest.mark.parametrize("shape", [(40, 96), (160, 48)], ids=["wide", "tall"])
@pytest.mark.parametrize("full", [False, True], ids=["rank8", "full"])
def test_a_repeated_token_factors_to_finite_factors_with_one_component(method, shape, full):
    """A prompt of one repeated token: the stacked keys are rank 1. The wide Gram route divided by a clamped zero
    eigenvalue and rebuilt NaN keys; now the factors are finite, reconstruct it, and hold one component."""
    g = torch.Generator().manual_seed(0)
    t, d = shape
    x = (torch.randn(1, d, generator=g) * 3).expand(t, d).contiguous()
    rank = min(t, d) if full else 8
    left, right = truncated_svd(x, rank, method)
    check(x, rank, method, left, right)
    assert left.shape == (t, rank) and right.shape == (rank, d)
    assert nonzero_components(left, right) == 1
    assert (left[:, 1:] == 0).all() and (right[1:] == 0).all()
    torch.testing.assert_close(left @ right, x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", ["exact", "gram32", "randomized"])
@pytest.mark.parametrize("shape", [(36, 80), (150, 40)], ids=["wide", "tall"])
@pytest.mark.parametrize("kind", KINDS)
def test_degenerate_input_gives_finite_exact_zero_components(kind, shape, method, dtype):
    """Zeros, padding rows, a repeated row, a zeroed block of columns, rank 1 and rank k < requested: finite
    factors at the exact SVD's error, and exactly the components beyond the rank are zero, in both factors."""
    g = torch.Generator().manual_seed(hash((kind, shape)) % 1000)
    t, d = shape
    x, true_rank = degenerate(kind, t, d, dtype, g)
    s = svdvals(x)
    for rank in sorted({1, 3, true_rank + 2, min(t, d)}):
        rank = min(rank, t, d)
        left, right = truncated_svd(x, rank, method)
        check(x, rank, method, left, right, s=s)
        kept = nonzero_components(left, right)
        assert kept == min(rank, true_rank), (rank, kept, true_rank)
        assert (left[:, kept:] == 0).all() and (right[kept:] == 0).all()


@pytest.mark.parametrize("method", ["exact", "gram32", "randomized"])
@pytest.mark.parametrize("shape", [(300, 70), (70, 300)], ids=["tall", "wide"])
def test_blocked_and_batched_degenerate_input(method, shape, monkeypatch):
    """The blocked reads (64 rows or columns at a time) and a batch mixing a rank-1, an all-zero and a generic
    matrix: each matrix gets its own zero components; nonzero_components is the batch's largest count."""
    monkeypatch.setattr(ops, "ROW_BLOCK_ELEMENTS", 1)
    g = torch.Generator().manual_seed(3)
    t, d = shape
    generic, full_rank = degenerate("generic", t, d, torch.float32, g)
    x = torch.stack([degenerate("repeated_row", t, d, torch.float32, g)[0], torch.zeros(t, d), generic])
    for rank in (5, min(t, d)):
        left, right = truncated_svd(x, rank, method)
        check(x, rank, method, left, right)
        assert (left[1] == 0).all() and (right[1] == 0).all()
        assert (left[0, :, 1:] == 0).all() and (right[0, 1:] == 0).all() and (left[0, :, 0] != 0).any()
        assert nonzero_components(left, right) == min(rank, full_rank)
        assert nonzero_components(left[:2], right[:2]) == 1


@pytest.mark.parametrize("method", ["exact", "gram32", "randomized"])
@pytest.mark.parametrize("new_kind", ["repeated_row", "zeros", "generic"])
@pytest.mark.parametrize("split", [300, 40], ids=["small-chunk", "tall-gram"])
def test_extend_with_rank_deficient_old_factors_or_rows(method, new_kind, split):
    """The incremental route of chunked prefill: old factors of a repeated-token segment (one non-zero
    component, the others exact zeros), then new rows that repeat it, are zero, or are generic."""
    g = torch.Generator().manual_seed(4)
    d, rank = 64, 8
    old = degenerate("repeated_row", split, d, torch.float32, g)[0]
    new = degenerate(new_kind, 340 - split, d, torch.float32, g)[0]
    left, right = truncated_svd(old, rank, "exact")
    assert nonzero_components(left, right) == 1
    for r in (rank, d):
        got_left, got_right = extend_truncated_svd(left, right, new, r, method)
        stacked = torch.cat([left @ right, new])
        check(stacked, got_left.shape[-1], method, got_left, got_right)
        expected = exact_rank(stacked)
        kept = nonzero_components(got_left, got_right)
        assert kept == min(r, expected), (kept, expected)
        assert (got_left[:, kept:] == 0).all() and (got_right[kept:] == 0).all()


def test_numerical_rank_rule():
    """The tolerance: size * eps(dtype) * sigma_max, inclusive; zero matrices have rank 0."""
    s = torch.tensor([[10.0, 1e-3, 2e-5, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    eps32 = torch.finfo(torch.float32).eps
    torch.testing.assert_close(rank_tolerance(s, 100, torch.float32), torch.tensor([10 * 100 * eps32, 0.0],
                                                                                    dtype=torch.float64))
    assert numerical_rank(s, 100, torch.float32).tolist() == [2, 0]  # 2e-5 < 1.19e-4
    assert numerical_rank(s, 100, torch.float64).tolist() == [3, 0]
    assert numerical_rank(torch.tensor([1.0, 9e-4]), 1, torch.float16).item() == 1  # eps16 ~ 9.8e-4
    left, right = torch.zeros(2, 5, 3), torch.zeros(2, 3, 4)
    assert nonzero_components(left, right) == 0
    left[1, 2, 1] = 1.0
    assert nonzero_components(left, right) == 2
    with pytest.raises(ValueError, match="components"):
        nonzero_components(torch.zeros(5, 3), torch.zeros(2, 4))


# 2. Full rank is lossless on the GPU default route, in fp16, at large magnitudes.

def large_ill_conditioned(t: int, d: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Entries ~1e3, condition ~1e4 (singular values geometric from sigma_max down to 1e-4 of it)."""
    g = torch.Generator().manual_seed(seed)
    n = min(t, d)
    u, _ = torch.linalg.qr(torch.randn(t, n, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, n, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -4, n, dtype=torch.float64)
    x = (u * s) @ v.T
    return (x * (1e3 / x.abs().max())).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(96, 256), (256, 96)], ids=["wide", "tall"])
def test_full_rank_gram32_is_as_exact_as_the_exact_route(shape, dtype):
    """'auto' is 'gram32' on CUDA (simulated here by asking for it): at full rank its product equals x to the
    exact route's error, whatever the conditioning; attention scores against the rebuilt keys too."""
    assert resolve_svd_method("auto", "cuda") == "gram32"
    t, d = shape
    x = large_ill_conditioned(t, d, dtype)
    rank = min(t, d)
    results = {m: truncated_svd(x, rank, m) for m in ("exact", "gram32")}
    errors = {m: error(x, *lr) for m, lr in results.items()}
    assert all(torch.isfinite(lr[0]).all() and torch.isfinite(lr[1]).all() for lr in results.values())
    assert errors["gram32"] <= 1.1 * errors["exact"] + 1e-12, errors
    assert errors["exact"] <= 4 * torch.finfo(dtype).eps * x.double().norm()
    q = torch.randn(8, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) / d ** 0.5
    scores = q @ x.double().T
    score_err = {m: (q @ (lr[0].double() @ lr[1].double()).T - scores).abs().max() for m, lr in results.items()}
    assert score_err["gram32"] <= 1.1 * score_err["exact"] + 1e-9, score_err


def test_gram32_redoes_a_factorisation_it_cannot_resolve(monkeypatch):
    """Kept components below GRAM32_MIN_SIGMA_RATIO of the largest: the float32 Gram matrix cannot resolve
    their directions, so gram32 takes the float64 route for that matrix (and only then)."""
    x = large_ill_conditioned(200, 64, torch.float32)  # sigma from 1 to 1e-4 of the largest
    calls = []
    real = ops.truncated_svd
    monkeypatch.setattr(ops, "truncated_svd", lambda x, r, m="exact": calls.append(m) or real(x, r, m))
    left, right = ops.truncated_svd(x, 60, "gram32")  # sigma_60 ~ 1.9e-4 < 2e-3: redone
    assert calls == ["gram32", "exact"]
    assert error(x, left, right) <= optimum(x, 60) * 1.0001 + slack(x, 60, "exact")
    calls.clear()
    ops.truncated_svd(x, 10, "gram32")  # sigma_10 ~ 0.27: resolved
    assert calls == ["gram32"]


def test_resolve_svd_method_by_dtype():
    assert resolve_svd_method("auto", "cpu") == "exact"
    assert resolve_svd_method("auto", "cuda", dtype=torch.float16) == "gram32"
    assert resolve_svd_method("auto", "cuda", dtype=torch.float64) == "exact"
    assert resolve_svd_method("gram32", "cuda", dtype=torch.float64) == "gram32"
    with pytest.raises(ValueError, match="svd_method must be one of"):
        resolve_svd_method("qr", "cpu")


# 3. Fuzz.

def test_fuzz_every_route_shape_rank_dtype_and_degenerate_kind():
    """Seeded random cases: tall and wide, batched or not, rank 1..full, fp32/bf16/fp16, generic and degenerate
    matrices. Every route: finite factors, error <= the exact SVD's * (1 + tol) + the dtype's slack (tol 5% for
    the randomised range finder, 0.1% otherwise), exact reconstruction at full rank, zeros past the rank."""
    rnd = random.Random(1234)
    g = torch.Generator().manual_seed(1234)
    for case in range(200):
        t, d = rnd.randint(2, 130), rnd.randint(2, 130)
        dtype = rnd.choice(DTYPES)
        kinds = [rnd.choice(KINDS + ["generic"] * 3) for _ in range(rnd.choice([1, 1, 2, 3]))]
        mats = [degenerate(kind, t, d, dtype, g) for kind in kinds]
        x = mats[0][0] if len(mats) == 1 else torch.stack([m for m, _ in mats])
        s = svdvals(x)
        true_rank = exact_rank(x, s)
        full = min(t, d)
        for method in ROUTES:
            for rank in sorted({rnd.randint(1, full), full}):
                left, right = truncated_svd(x, rank, method)
                tol = 0.05 if method == "randomized" and rank < full else 1e-3
                check(x, rank, method, left, right, rtol=tol, s=s)
                kept = nonzero_components(left, right)
                assert kept <= min(rank, true_rank), (case, kinds, method, rank)
                assert (left[..., kept:] == 0).all() and (right[..., kept:, :] == 0).all()
                if rank == full:
                    scale = x.double().abs().amax()
                    torch.testing.assert_close(left.double() @ right.double(), x.double(), rtol=0,
                                               atol=float(16 * torch.finfo(dtype).eps * scale * full ** 0.5))


@pytest.mark.parametrize("rank", [8, None], ids=["rank8", "full"])
@pytest.mark.parametrize("method", ["exact", "gram32"])
def test_xkv_cache_of_a_repeated_token_prompt_rebuilds_finite_states(method, rank):
    """End to end: one token repeated, so every layer's keys/values are one row repeated and the group's stacked
    matrix is rank 1 and wide (40 tokens < 2 layers x 4 heads x 16); the rebuilt states were NaN."""
    from transformers import LlamaConfig

    from kvcompress import XKVCache

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2,
                         intermediate_size=64, vocab_size=64)
    cache = XKVCache(config, group_size=2, rank_k=rank, rank_v=rank, window=0, sink=0, min_compress_tokens=1,
                     svd_method=method, pre_rope=False)
    g = torch.Generator().manual_seed(0)
    for layer in range(2):
        k = torch.randn(1, 4, 1, 16, generator=g).expand(1, 4, 40, 16).contiguous()
        cache.update(k, (2 * k).contiguous(), layer)
    for layer in range(2):
        keys, values = cache.layers[layer].full_states()
        assert torch.isfinite(keys).all() and torch.isfinite(values).all()
        torch.testing.assert_close(values, 2 * keys, atol=1e-4, rtol=1e-4)
