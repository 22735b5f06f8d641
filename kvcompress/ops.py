"""Shared linear algebra and RoPE helpers used by every method (plain PyTorch, CPU and GPU).

RoPE convention: the one of Llama/Qwen2/Mistral in transformers ("rotate half"): the first
``rotary_dim`` features of a head are split in two halves ``(x1, x2)`` and position ``p`` maps them to
``(x1 cos - x2 sin, x2 cos + x1 sin)`` with angles ``p * inv_freq``. A rotation by ``-p`` undoes it.
"""

from __future__ import annotations

import torch


def rope_inv_freq(config) -> torch.Tensor:
    """Inverse frequencies (float32, length ``rotary_dim // 2``) of a config's RoPE.

    Uses transformers' own initialisation functions for scaled RoPE types (linear, llama3, yarn, ...),
    and the default formula ``theta ** (-2i / rotary_dim)`` otherwise. The post-processing attention
    factor some RoPE types apply to cos/sin is deliberately ignored: it multiplies every key by the same
    constant, which a rotation by ``-p`` followed by ``+p`` (what the caches do) leaves untouched.
    """
    params = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if rope_type != "default":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(f"unsupported rope_type {rope_type!r}; known: {sorted(ROPE_INIT_FUNCTIONS)}")
        inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](config, None)
        return inv_freq.float()
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    factor = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0
    rotary_dim = int(head_dim * factor)
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)).float()


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` of shape ``positions.shape + (2 * len(inv_freq),)`` in float32."""
    angles = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device, torch.float32)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` features of ``x`` (``[..., T, head_dim]``); ``cos``/``sin`` broadcast
    against ``x[..., :rotary_dim]``. Computed in float32, returned in ``x.dtype``. Pass ``-sin`` to undo."""
    rotary_dim = cos.shape[-1]
    half = rotary_dim // 2
    xr = x[..., :rotary_dim].float()
    out = xr * cos
    # rotate_half(x) * sin without materialising rotate_half: (-x2, x1) * (sin1, sin2)
    out[..., :half] -= xr[..., half:] * sin[..., :half]
    out[..., half:] += xr[..., :half] * sin[..., half:]
    out = out.to(x.dtype)
    if rotary_dim == x.shape[-1]:
        return out
    return torch.cat((out, x[..., rotary_dim:]), dim=-1)


SVD_METHODS = ("auto", "exact", "gram32", "randomized")


def resolve_svd_method(method: str, device: torch.device | str, *, dtype: torch.dtype | None = None) -> str:
    """The route ``truncated_svd`` takes for ``method`` on ``device``: ``"auto"`` is ``"exact"`` on the CPU
    and ``"gram32"`` on accelerators, where float64 eigen-decompositions are slow (float64 runs at a small
    fraction of the float32 rate on GPUs); see docs/performance.md for the measured costs. Float64 input
    (``dtype``) resolves ``"auto"`` to ``"exact"`` everywhere: a float32 route would throw away the input's
    precision. ``truncated_svd`` may still leave ``"gram32"`` for ``"exact"`` where the input's conditioning
    needs it (see there)."""
    if method not in SVD_METHODS:
        raise ValueError(f"svd_method must be one of {list(SVD_METHODS)}, got {method!r}")
    if method != "auto":
        return method
    if dtype == torch.float64:
        return "exact"
    return "exact" if torch.device(device).type == "cpu" else "gram32"


# A component whose singular value is at most ``max(T, D) * eps * sigma_max`` is zero to working precision
# (LAPACK's and NumPy's matrix-rank rule): what is left of it is the rounding noise of the products that
# computed it. ``eps`` is that of the precision the factorisation is computed in (float64 for "exact",
# float32 for "gram32"/"randomized"), not of the input's dtype: an fp16 input is exact in float32, and a
# component far below fp16's eps relative to sigma_max is still stored to fp16's relative precision.
def rank_tolerance(singular_values: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
    """The absolute threshold (``[...]``, one per matrix of a batch) at and below which a singular value of a
    matrix with ``size = max(T, D)`` factored in ``dtype`` is zero: ``size * finfo(dtype).eps * sigma_max``."""
    eps = torch.finfo(dtype).eps
    return singular_values.amax(dim=-1) * (size * eps) if singular_values.shape[-1] else \
        singular_values.new_zeros(singular_values.shape[:-1])


def numerical_rank(singular_values: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
    """How many of ``singular_values`` (``[..., k]``, any order) exceed ``rank_tolerance``: the numerical rank
    of a matrix with ``size = max(T, D)`` factored in ``dtype`` (an integer tensor of shape ``[...]``)."""
    tol = rank_tolerance(singular_values, size, dtype)
    return (singular_values > tol[..., None]).sum(dim=-1)


def nonzero_components(left: torch.Tensor, right: torch.Tensor) -> int:
    """The number ``k`` of leading components of a factorisation ``left @ right`` (``[..., T, r]`` and
    ``[..., r, D]``) that are not exact zeros in every matrix of the batch: ``left[..., :k] @ right[..., :k, :]``
    is the same product. ``truncated_svd`` and ``extend_truncated_svd`` return the components beyond the
    numerical rank as exact zeros, last; a caller keeps ``k`` of them and drops the rest to save memory."""
    if left.shape[-1] != right.shape[-2]:
        raise ValueError(f"left has {left.shape[-1]} components and right {right.shape[-2]}; they must match")
    used = (left != 0).flatten(0, -2).any(dim=0) | (right != 0).transpose(-2, -1).flatten(0, -2).any(dim=0)
    nonzero = used.nonzero()
    return int(nonzero[-1]) + 1 if nonzero.numel() else 0


# Smallest singular value, relative to the largest, whose direction a Gram route resolves: its Gram matrix holds
# sigma^2, and an eigenvalue below ~eps * sigma_max^2 is rounding noise, so the direction found for it is an
# arbitrary mix of the directions at that level (the product is still an orthogonal projection, but no longer
# the optimal one). 32 * eps leaves a margin for the eigensolver's own error: ~2e-3 in float32, ~1e-7 in float64.
def gram_min_sigma_ratio(dtype: torch.dtype) -> float:
    """``sqrt(32 * eps)`` of ``dtype``: below this fraction of the largest singular value, a Gram route computed
    in ``dtype`` no longer resolves a component's direction."""
    return (32 * torch.finfo(dtype).eps) ** 0.5


GRAM32_MIN_SIGMA_RATIO = gram_min_sigma_ratio(torch.float32)


def _null(sigma: torch.Tensor, size: int, dtype: torch.dtype, gram: bool) -> torch.Tensor:
    """Which components (``sigma`` ``[..., r]``, measured as norms of the projected matrix) are zero.

    ``rank_tolerance`` for a backward-stable route (the randomised one's small SVD). A Gram route's direction
    for a zero singular value carries the Gram matrix's rounding (``size * eps * sigma_max^2``) divided by the
    gap to each resolved eigenvalue ``sigma_j^2``, so the matrix projected on it is up to
    ``size * eps * sigma_max^2 / sigma_j`` rather than ``size * eps * sigma_max``: in float64 the threshold grows
    by ``sigma_max / sigma_j`` for the smallest resolved ``sigma_j`` (at most ``size * sqrt(eps / 32) *
    sigma_max``). Not in float32, where that bound would reach real components: there a component between
    ``rank_tolerance`` and ``GRAM32_MIN_SIGMA_RATIO`` sends the factorisation to the float64 route instead.
    """
    tol = rank_tolerance(sigma, size, dtype)[..., None]
    if gram and dtype == torch.float64:
        top = sigma.amax(dim=-1, keepdim=True)
        resolved = sigma >= top * gram_min_sigma_ratio(dtype)
        smallest = torch.where(resolved, sigma, top).amin(dim=-1, keepdim=True)
        tol = tol * torch.where(smallest > 0, top / torch.where(smallest > 0, smallest, 1.0), 1.0)
    return sigma <= tol


def _finish(left: torch.Tensor, right: torch.Tensor, sigma: torch.Tensor, size: int,
            work_dtype: torch.dtype, gram: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the components of ``left``/``right`` (in place where possible) that ``_null`` finds zero from their
    accurately computed singular values ``sigma`` (``[..., r]``), and move them last (stable order otherwise)."""
    if sigma.shape[-1] == 0:
        return left, right
    null = _null(sigma, size, work_dtype, gram)
    if not bool(null.any()):
        return left, right
    order = torch.sort(null.to(torch.int8), dim=-1, stable=True).indices
    if not bool((order == torch.arange(order.shape[-1], device=order.device)).all()):
        left = torch.gather(left, -1, order[..., None, :].expand(left.shape))
        right = torch.gather(right, -2, order[..., :, None].expand(right.shape))
        null = torch.gather(null, -1, order)
    left.masked_fill_(null[..., None, :], 0)
    right.masked_fill_(null[..., :, None], 0)
    return left, right


def _gram32_unresolved(sigma: torch.Tensor, size: int) -> bool:
    """Whether a float32 Gram factorisation kept a non-zero component too small for float32 to have resolved
    its direction (see ``GRAM32_MIN_SIGMA_RATIO``)."""
    if sigma.shape[-1] == 0:
        return False
    top = sigma.amax(dim=-1, keepdim=True)
    kept = ~_null(sigma, size, torch.float32, gram=True)
    return bool((kept & (sigma < top * GRAM32_MIN_SIGMA_RATIO)).any())


def truncated_svd(x: torch.Tensor, rank: int, method: str = "exact") -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factorisation ``x ≈ left @ right`` (Eckart–Young), batched over leading dims.

    ``x`` is ``[..., T, D]``; returns ``left = U_r S_r`` (``[..., T, r]``) and ``right = V_r^T``
    (``[..., r, D]``, orthonormal rows), both in ``x.dtype``. ``rank`` is clamped to ``min(T, D)``. The
    Frobenius error of the product is the root of the sum of the squared discarded singular values.

    Rank-deficient input (all zeros, repeated rows, zero columns, rank below ``rank``): the components beyond
    the numerical rank come back as exact zeros in both factors, after the others (``nonzero_components``
    counts the rest). A component is zero when its singular value, measured as the norm of ``x`` projected
    on its direction, is at most ``max(T, D) * eps * sigma_max`` with ``eps`` the machine epsilon of the
    precision the route computes in (float64 for ``"exact"``, float32 otherwise; ``rank_tolerance``): it
    would only reproduce rounding noise. The float64 Gram route multiplies that threshold by ``sigma_max /
    sigma_j`` for its smallest resolved singular value ``sigma_j`` (>= ``gram_min_sigma_ratio(float64)``, ~1e-7,
    of the largest), the rounding its null directions pick up from the Gram matrix. The factors are always
    finite for finite input.

    ``method`` (one of ``SVD_METHODS``; ``"auto"`` resolves with ``resolve_svd_method``):

    - ``"exact"``: for the tall matrices a KV cache gives (tokens ``T`` >= features ``D``) the right
      singular vectors come from the eigen-decomposition of the ``D x D`` Gram matrix ``x^T x`` in float64,
      and ``left = x V_r``: the same factors as an SVD up to float64 rounding, at a fraction of the cost (a
      tall SVD is slow on CPU and much slower with cuSOLVER on a GPU). Wide matrices (``T < D``) use the
      ``T x T`` Gram matrix ``x x^T`` the same way (an SVD of a 4096 x 4096 matrix took 1.2 s on an H100,
      the Gram route 0.1 s): ``right`` is ``U_r^T x`` with its rows normalised by their own norms.
    - ``"gram32"``: the same Gram route in float32. Squaring the matrix squares its condition number, so
      directions whose singular values are below ~1e-3.5 of the largest lose accuracy; those are the
      discarded ones at the ranks xKV uses, and the product's error stays at the optimum (measured in
      docs/performance.md). Route choice by conditioning: when a kept, non-zero component is below
      ``GRAM32_MIN_SIGMA_RATIO`` (~2e-3) of the largest, float32 has not resolved its direction and the
      factorisation is redone by ``"exact"`` (the float64 Gram route); at full rank too, so that rank-deficient
      input gets its exact zeros and ill-conditioned fp16 input (large magnitudes, condition 1e4) is
      reproduced to the exact route's error.
    - ``"randomized"``: Halko et al.'s randomised range finder (``torch.svd_lowrank``, ``r + 16`` samples,
      2 power iterations) in float32: only matrix products and small factorisations, so it is the fastest
      on GPUs, at a few percent more error than the optimum. Not deterministic across devices. At full rank
      it takes the ``"exact"`` route.
    """
    method = resolve_svd_method(method, x.device, dtype=x.dtype)
    t, d = x.shape[-2], x.shape[-1]
    rank = min(rank, t, d)
    size = max(t, d)
    if method == "randomized" and rank < min(t, d):
        work_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        u, s, v = torch.svd_lowrank(x.to(work_dtype), q=min(rank + 16, t, d), niter=2)
        left = (u[..., :rank] * s[..., None, :rank]).to(x.dtype)
        return _finish(left, v[..., :rank].mT.to(x.dtype), s[..., :rank], size, work_dtype, gram=False)
    gram_dtype = torch.float32 if method == "gram32" and x.dtype != torch.float64 else torch.float64
    # x is read a block at a time (rows when tall, columns when wide) and converted per block: a float copy
    # of the whole stacked group (512 MiB in float32 for 32K tokens x 4096) was the factorisation's peak
    batch_dims = x.shape[:-2]
    if t >= d:
        gram = x.new_zeros(*batch_dims, d, d, dtype=gram_dtype)
        blocks = row_blocks(t, x.numel() // max(t, 1))
        for a, b in blocks:
            rows = _block(x, a, b, gram_dtype)
            gram += rows.mT @ rows
        _, eigenvectors = torch.linalg.eigh(gram)  # ascending eigenvalues
        right = eigenvectors[..., -rank:].flip(-1).mT  # [..., r, D], leading directions first
        left = x.new_empty(*batch_dims, t, rank)
        # the singular values as the norms of x V (computed from x, not from the squared Gram eigenvalues,
        # which lose the small ones): they decide which components are zero
        sigma2 = x.new_zeros(*batch_dims, rank, dtype=gram_dtype)
        for a, b in blocks:
            part = _block(x, a, b, gram_dtype) @ right.mT
            sigma2 += part.square().sum(dim=-2)
            left[..., a:b, :] = part
        sigma = sigma2.sqrt()
        if gram_dtype == torch.float32 and _gram32_unresolved(sigma, size):
            return truncated_svd(x, rank, "exact")
        return _finish(left, right.to(x.dtype).contiguous(), sigma, size, gram_dtype)
    # Wide (fewer tokens than the group width, e.g. a 4K prompt over 4 layers x 8 heads x 128): the Gram
    # matrix of the token side, x x^T = U S^2 U^T, is the small one. W = U_r^T x has rows S_r V_r^T, so
    # right = W with rows normalised by their norms (the accurate S_r: the eigenvalues lose the small ones,
    # and dividing by a clamped zero eigenvalue gave inf) and left = U_r S_r. The product is U_r U_r^T x, the
    # orthogonal projection onto the kept directions, whatever their accuracy: exact at full rank.
    gram = x.new_zeros(*batch_dims, t, t, dtype=gram_dtype)
    blocks = row_blocks(d, x.numel() // max(d, 1))  # column ranges
    for a, b in blocks:
        columns = x[..., a:b].to(gram_dtype)
        gram += columns @ columns.mT
    _, eigenvectors = torch.linalg.eigh(gram)
    u = eigenvectors[..., -rank:].flip(-1)  # [..., T, r]
    # two passes over the columns (norms, then the normalised rows): W in float64 would be the peak again,
    # and normalising after rounding W to fp16 would lose the small rows to underflow
    sigma2 = x.new_zeros(*batch_dims, rank, dtype=gram_dtype)
    for a, b in blocks:
        sigma2 += (u.mT @ x[..., a:b].to(gram_dtype)).square().sum(dim=-1)
    sigma = sigma2.sqrt()
    if gram_dtype == torch.float32 and _gram32_unresolved(sigma, size):
        return truncated_svd(x, rank, "exact")
    null = _null(sigma, size, gram_dtype, gram=True)
    inverse_sigma = torch.where(null, 0.0, 1.0 / torch.where(null, 1.0, sigma))[..., :, None]
    right = x.new_empty(*batch_dims, rank, d)
    for a, b in blocks:
        right[..., a:b] = (u.mT @ x[..., a:b].to(gram_dtype)) * inverse_sigma
    left = (u * sigma[..., None, :]).to(x.dtype)
    return _finish(left, right, sigma, size, gram_dtype)


def extend_truncated_svd(left: torch.Tensor, right: torch.Tensor, rows: torch.Tensor, rank: int,
                         method: str = "exact") -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factorisation of ``[left @ right; rows]``: a truncated factorisation extended by new
    rows without going back to the rows it already compressed (an incremental SVD).

    ``left`` ``[..., T, r0]`` and ``right`` ``[..., r0, D]`` (orthonormal rows, as ``truncated_svd`` returns
    them) stand for ``T`` rows already factored; ``rows`` ``[..., c, D]`` are new. Returns ``(left, right)`` for
    ``T + c`` rows in the same form, with rank ``min(rank, T + c, D)``. The result is the Eckart–Young optimum
    *of the stacked matrix*, which holds the first ``T`` rows only through their rank-``r0`` approximation:
    in general slightly worse than a one-shot factorisation of all rows, exact when ``r0`` was full rank.

    The Gram matrix of the stacked matrix is ``right^T (left^T left) right + rows^T rows`` (``D x D``, built
    without the ``T x D`` product), whose leading eigenvectors give the new ``right``; then
    ``left = [left (right right_new^T); rows right_new^T]``. When ``r0 + c < D`` (a short chunk) the Gram
    matrix is formed in an orthonormal basis of the ``r0 + c`` directions the rows can span (a QR), so the
    eigendecomposition is ``(r0 + c)^2`` instead of ``D^2``. Wide results (``T + c < D``) go through
    ``truncated_svd`` of the stacked matrix instead, which is then the cheaper route. ``method`` as
    ``truncated_svd`` (``"randomized"`` takes the float32 Gram route here), including its handling of
    rank-deficient input (old factors with zero components, zero or repeated new rows): components beyond the
    numerical rank come back as exact zeros, last, and a float32 route whose kept components it cannot
    resolve is redone in float64.
    """
    method = resolve_svd_method(method, rows.device, dtype=rows.dtype)
    t, d = left.shape[-2] + rows.shape[-2], rows.shape[-1]
    rank = min(rank, t, d)
    if t < d:
        return truncated_svd(torch.cat([left @ right, rows], dim=-2), rank, method)
    gram_dtype = torch.float64 if method == "exact" or rows.dtype == torch.float64 else torch.float32
    rw, cw = right.to(gram_dtype), rows.to(gram_dtype)
    # left^T left, a block of rows at a time: ``left`` is the long side (the whole compressed sequence), and a
    # float copy of it (plus the products below) was most of a long chunked prefill's peak memory
    blocks = row_blocks(left.shape[-2], left.numel() // max(left.shape[-2], 1))
    left_gram = left.new_zeros(*left.shape[:-2], left.shape[-1], left.shape[-1], dtype=gram_dtype)
    for a, b in blocks:
        left_block = _block(left, a, b, gram_dtype)
        left_gram += left_block.mT @ left_block
    span = right.shape[-2] + rows.shape[-2]
    if span < d:
        # Every stacked row lies in span(right's rows, rows): at most r0 + c < D directions (small chunks).
        # The same Gram matrix, expressed in an orthonormal basis Q of that span, is (r0 + c)^2 instead of
        # D^2, and its eigendecomposition is the cost that matters. Exact: nothing outside the span is lost.
        q, _ = torch.linalg.qr(torch.cat([rw.mT, cw.mT], dim=-1))  # [..., D, r0 + c]
        rq, cq = rw @ q, cw @ q
        _, eigenvectors = torch.linalg.eigh(rq.mT @ left_gram @ rq + cq.mT @ cq)
        rank = min(rank, span)
        basis = q @ eigenvectors[..., -rank:].flip(-1)  # [..., D, r]
    else:
        _, eigenvectors = torch.linalg.eigh(rw.mT @ left_gram @ rw + cw.mT @ cw)
        basis = eigenvectors[..., -rank:].flip(-1)  # [..., D, r], leading directions first
    # new left = [left (right basis); rows basis], written block by block into its final dtype; its column
    # norms (from the factors, not the Gram eigenvalues) are the singular values that decide the zero ones
    projection = rw @ basis  # [..., r0, r]
    new_left = rows.new_empty(*rows.shape[:-2], t, basis.shape[-1])
    sigma2 = rows.new_zeros(*rows.shape[:-2], basis.shape[-1], dtype=gram_dtype)
    for a, b in blocks:
        part = _block(left, a, b, gram_dtype) @ projection
        sigma2 += part.square().sum(dim=-2)
        new_left[..., a:b, :] = part
    part = cw @ basis
    sigma2 += part.square().sum(dim=-2)
    new_left[..., left.shape[-2]:, :] = part
    sigma = sigma2.sqrt()
    if gram_dtype == torch.float32 and _gram32_unresolved(sigma, max(t, d)):
        return extend_truncated_svd(left, right, rows, rank, "exact")
    return _finish(new_left, basis.mT.to(rows.dtype).contiguous(), sigma, max(t, d), gram_dtype)


# Work over a long sequence (the factorisations' inputs, XKVLayer.full_states' rebuild) goes a block of rows (or
# columns) at a time, each block's temporaries about this many elements (float32: 16 MiB), at least 64 rows
ROW_BLOCK_ELEMENTS = 1 << 22


def row_blocks(rows: int, row_elements: int) -> list[tuple[int, int]]:
    """``[start, end)`` ranges covering ``rows`` rows, each about ``ROW_BLOCK_ELEMENTS`` elements when a row
    (all batch dims included) holds ``row_elements``: the temporaries of long-sequence work stay a few MiB."""
    step = max(64, ROW_BLOCK_ELEMENTS // max(1, row_elements))
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


def _block(x: torch.Tensor, a: int, b: int, dtype: torch.dtype) -> torch.Tensor:
    return x[..., a:b, :].to(dtype)


def grouped_query_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                       scale: float | None = None) -> torch.Tensor:
    """Grouped-query attention through ``F.scaled_dot_product_attention`` without repeating keys/values.

    ``query`` ``[B, Hq, L, d]``, ``key``/``value`` ``[B, Hkv, S, d]`` with ``Hq = G * Hkv``; query head
    ``h * G + j`` reads KV head ``h`` (transformers' ``repeat_kv`` order). Returns ``[B, L, Hq, dv]``, the
    layout transformers' attention functions return.

    Why: with a mask, stock transformers repeats keys and values ``G`` times before SDPA (PyTorch's
    ``enable_gqa`` falls back to the math kernel with a mask on CUDA), which at a 32K-token chunked
    prefill of a Llama-3.1-8B layer is 512 MiB a row, more than the whole xKV cache of every layer.
    Here the ``G`` query heads of each KV head are attended in ``G`` SDPA calls (query head ``j`` of every
    group per call), each over the unrepeated keys and values: the same products and softmax, in the same
    kernels, and no copy.
    """
    batch, q_heads, length, _ = query.shape
    kv_heads = key.shape[1]
    if q_heads % kv_heads:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of key/value heads ({kv_heads})")
    groups = q_heads // kv_heads
    out = query.new_empty(batch, length, q_heads, value.shape[-1])
    grouped_query = query.view(batch, kv_heads, groups, length, query.shape[-1])
    grouped_out = out.view(batch, length, kv_heads, groups, value.shape[-1])
    for j in range(groups):
        part = torch.nn.functional.scaled_dot_product_attention(
            grouped_query[:, :, j], key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
            scale=scale)
        grouped_out[:, :, :, j].copy_(part.transpose(1, 2))
    return out


def tensor_nbytes(*tensors: torch.Tensor | None) -> int:
    """Bytes held by the given tensors' elements (``None`` counts as 0)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def cache_nbytes(cache) -> int:
    """Bytes of the tensors a cache holds: ``cache.nbytes()`` for kvcompress caches, else the sum of every
    layer's ``keys``/``values`` (stock transformers caches)."""
    if callable(getattr(cache, "nbytes", None)):
        return int(cache.nbytes())
    return sum(tensor_nbytes(getattr(layer, "keys", None), getattr(layer, "values", None))
               for layer in getattr(cache, "layers", []))


def cache_reserved_nbytes(cache) -> int:
    """Bytes a cache has allocated: ``cache.reserved_nbytes()`` for kvcompress caches (the valid tokens
    plus the spare capacity of their storage), else :func:`cache_nbytes` (a stock cache's tensors are
    exactly what it allocated: ``DynamicCache`` concatenates to size, ``StaticCache``'s are its buffers)."""
    if callable(getattr(cache, "reserved_nbytes", None)):
        return int(cache.reserved_nbytes())
    return cache_nbytes(cache)
