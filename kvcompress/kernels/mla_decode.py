"""Absorbed MLA decode attention over the latent cache: a Triton kernel and its plain-PyTorch reference.

The maths
---------
For batch row ``b``, head ``h`` and new query ``i`` (of ``S``; decode has ``S = 1``), with the query
already moved into latent space (``q_lat = W_UK^T q^N``, ``r`` values) and its rotated RoPE part ``q^R``
(``p`` values), every head attends over the same cached latents ``c_t`` (``r``) and RoPE keys
``k^R_t`` (``p``)::

    s_t   = scale * (q_lat . c_t + q^R . k^R_t)
    out   = sum_t softmax(s)_t c_t                  ([B, H, S, r], latent space: apply W_UV next)

over the valid tokens of row ``b``: ``t`` in ``[kv_start, kv_start + kv_len)`` (left padding, ragged
batches, a preallocated cache of which only the first ``kv_len`` tokens are filled). Tokens outside that
range do not exist for the row. Inside it, query ``i`` is token ``kv_start + kv_len - S + i`` and sees keys up
to itself (causal), and ``key_mask[b, t] == False`` masks key ``t`` (padding inside the range). A masked
key gets the score ``-1e30`` rather than ``-inf``, like transformers' eager attention (``finfo.min``): a
row whose every key is masked (a padding query) averages its keys uniformly instead of giving NaN.

The kernel (FlashMLA / flash-decoding style)
--------------------------------------------
All heads share the latent, so a program takes a block of ``BLOCK_M`` query rows (``rows = H * S``, row
``h * S + i``), loads each ``[BLOCK_T, r]`` latent tile and ``[BLOCK_T, p]`` RoPE tile once and uses it for
all of them with two ``tl.dot`` (scores) and one ``tl.dot`` (weighted sum), with an online softmax in
float32. Head blocks are wide (:func:`_config`): 128 rows when the latent is at most 256 wide (a TPLA
shard, ``r/N``: at 128 heads one program per tile, so the cache is read exactly once) and 64 rows at
``r = 512`` (plain MLA, a plain-TP shard), where the ``64 x 512`` float32 accumulator already takes 128
registers a thread on two warpgroups. On Hopper the products run as ``wgmma`` with the queries resident
in shared memory and ``num_stages`` latent tiles in flight. Optionally (``split_v = 2``) two neighbouring
programs each accumulate one half of the output columns: both score the whole latent (the second read of
a tile is served by L2), which halves the accumulator at the price of computing the scores twice.

The sequence is split into chunks (``grid = (split_v x row blocks, chunks, B)``, about one program per
SM, two for the small 4-warp programs: :func:`plan`); each chunk writes its normalised partial output
and log-sum-exp, and a second small kernel merges them (``out = sum_c exp(lse_c - max) o_c / sum_c
exp(lse_c - max)``), a block of chunks per load. Products accumulate in float32 (fp32 inputs use IEEE
fp32 dots, not TF32); the output has the inputs' dtype.

Floors: one decode step must read the cache once, ``B * T * (r + p) * element_size`` bytes (``T`` the
valid tokens), plus the queries and outputs (``B * H * S * (2 r + p)`` elements, small) and the partials
(``B * H * S * chunks * r`` values in the inputs' dtype, float32 for float32 inputs, plus one float32
log-sum-exp per row and chunk, written and read, kept small by the chunk heuristic). It also
does ``2 * B * H * S * T * (2 r + p)`` floating-point operations: at 128 heads and ``r = 512`` that is
about 240 per cache byte, at the H100/H200's ridge (about 200 in bf16), so wide-head MLA decode is as
much bound by the tensor cores as by memory. Lengths and starts are device tensors and are never read on
the host, so a call does no host synchronisation and, with fixed tensor shapes (a fixed-capacity cache
plus ``kv_lengths``), can be captured in a CUDA graph.

The reference (:func:`mla_decode_attention_reference`) computes the same thing in float32 (float64 for
float64 inputs) with dense masks; it is the CPU path and the definition the kernel is tested against.
:func:`mla_decode_attention` dispatches: the kernel when :func:`kvcompress.kernels.triton_usable` says
so, else the reference.
"""

import math
from typing import Optional

import torch

from . import next_pow2 as _pow2, shared_memory, sm_count, triton_usable

try:  # Triton is optional: without it (CPU-only installs) the reference is the only path
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except Exception:  # ImportError, or a broken install without a GPU toolchain
    _HAVE_TRITON = False

MASKED_SCORE = -1.0e30  # a masked key's score: finite, so an all-masked row averages uniformly (as eager)
_POISON_BUFFERS = False  # tests: fill the kernel's scratch (partials) with NaN so an unwritten element shows

__all__ = ["mla_decode_attention", "mla_decode_attention_reference", "key_mask_from_attention_mask"]


# -- validation -----------------------------------------------------------------------------------
def _as_3d(name: str, cache: torch.Tensor) -> torch.Tensor:
    """``[B, T, d]``, or ``[B, 1, T, d]`` flattened (a view: the caches hold ``[B, 1, T, d]``)."""
    if not isinstance(cache, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cache).__name__}")
    if cache.dim() == 4 and cache.shape[1] == 1:
        return cache.flatten(1, 2)
    if cache.dim() != 3:
        raise ValueError(f"{name} must be [batch, tokens, width] or [batch, 1, tokens, width], got {tuple(cache.shape)}")
    return cache


def _check(q_latent, q_rope, latent, rope_key, scale, kv_lengths, kv_starts, key_mask, out):
    """Validate shapes, dtypes and devices (never values: that would need a host sync). Returns 3-D caches."""
    for name, t in (("q_latent", q_latent), ("q_rope", q_rope)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [batch, heads, queries, width], got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    latent, rope_key = _as_3d("latent", latent), _as_3d("rope_key", rope_key)
    batch, heads, queries, rank = q_latent.shape
    if tuple(q_rope.shape[:3]) != (batch, heads, queries):
        raise ValueError(f"q_rope {tuple(q_rope.shape)} must match q_latent {tuple(q_latent.shape)} in batch, heads, queries")
    if latent.shape[0] != batch or latent.shape[2] != rank:
        raise ValueError(f"latent {tuple(latent.shape)} must be [batch={batch}, tokens, r={rank}] (q_latent's batch and width)")
    if rope_key.shape[0] != batch or rope_key.shape[1] != latent.shape[1] or rope_key.shape[2] != q_rope.shape[3]:
        raise ValueError(f"rope_key {tuple(rope_key.shape)} must be [batch={batch}, tokens={latent.shape[1]}, "
                         f"p={q_rope.shape[3]}]")
    if latent.shape[1] < 1:
        raise ValueError("latent holds no tokens; attention needs at least one")
    allowed = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    for name, t in (("q_latent", q_latent), ("q_rope", q_rope), ("latent", latent), ("rope_key", rope_key)):
        if t.dtype not in allowed:
            raise TypeError(f"{name} has dtype {t.dtype}; allowed: {list(allowed)}")
        if t.dtype != latent.dtype:
            raise TypeError(f"{name} is {t.dtype} but latent is {latent.dtype}; all four inputs must share a dtype")
        if t.device != latent.device:
            raise ValueError(f"{name} is on {t.device} but latent is on {latent.device}; all inputs must share a device")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float, got {scale!r}")
    for name, t in (("kv_lengths", kv_lengths), ("kv_starts", kv_starts)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != batch:
            raise ValueError(f"{name} must be a 1-D tensor of {batch} token counts (one per batch row), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
        if t.device != latent.device:
            raise ValueError(f"{name} is on {t.device} but latent is on {latent.device}; pass it as a device tensor")
    if key_mask is not None:
        if not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool or \
                tuple(key_mask.shape) != (batch, latent.shape[1]):
            got = (f"{key_mask.dtype} {tuple(key_mask.shape)}" if isinstance(key_mask, torch.Tensor)
                   else type(key_mask).__name__)
            raise ValueError(f"key_mask must be a bool tensor [batch={batch}, tokens={latent.shape[1]}] "
                             f"(True = attend), got {got}")
        if key_mask.device != latent.device:
            raise ValueError(f"key_mask is on {key_mask.device} but latent is on {latent.device}")
    if out is not None:
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(q_latent.shape) or \
                out.dtype != q_latent.dtype or out.device != q_latent.device:
            raise ValueError(f"out must be a {q_latent.dtype} tensor of shape {tuple(q_latent.shape)} on {q_latent.device}")
    return latent, rope_key


# -- reference ------------------------------------------------------------------------------------
def mla_decode_attention_reference(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    rope_key: torch.Tensor,
    scale: float,
    kv_lengths: torch.Tensor | None = None,
    kv_starts: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-PyTorch absorbed MLA attention with the kernel's semantics (the CPU path and the kernel's
    definition): ``softmax(scale * (q_latent c^T + q_rope k_rope^T)) c`` over each row's valid tokens.

    Args:
        q_latent: ``[B, H, S, r]``, queries in latent space (``W_UK^T q^N``).
        q_rope: ``[B, H, S, p]``, the rotated RoPE part of the queries.
        latent: ``[B, T, r]`` (or ``[B, 1, T, r]``), the cached latents.
        rope_key: ``[B, T, p]`` (or ``[B, 1, T, p]``), the cached rotated RoPE keys.
        scale: the softmax scale.
        kv_lengths: ``None`` (``T - kv_start``) or int ``[B]`` on the inputs' device: valid tokens per row.
        kv_starts: ``None`` (0) or int ``[B]``: the first valid token per row (left padding).
        key_mask: ``None`` or bool ``[B, T]``: False masks a key inside the valid range (score -1e30).
        out: optional ``[B, H, S, r]`` tensor of the inputs' dtype to write into.

    Returns:
        ``[B, H, S, r]`` in the inputs' dtype, computed in float32 (float64 for float64 inputs). Query ``i``
        sees keys ``t < kv_start + kv_len - (S - 1 - i)`` (causal); a row with no valid token gives zeros.
    """
    latent, rope_key = _check(q_latent, q_rope, latent, rope_key, scale, kv_lengths, kv_starts, key_mask, out)
    batch, heads, queries, rank = q_latent.shape
    tokens, device = latent.shape[1], latent.device
    work = torch.float64 if latent.dtype == torch.float64 else torch.float32
    q = q_latent.to(work).reshape(batch, heads * queries, rank)
    qr = q_rope.to(work).reshape(batch, heads * queries, q_rope.shape[-1])
    c = latent.to(work)
    scores = (q @ c.transpose(1, 2) + qr @ rope_key.to(work).transpose(1, 2)) * scale
    scores = scores.view(batch, heads, queries, tokens)
    t = torch.arange(tokens, device=device)
    start = torch.zeros(batch, dtype=torch.long, device=device) if kv_starts is None else kv_starts.long().clamp(min=0)
    end = torch.full_like(start, tokens) if kv_lengths is None else start + kv_lengths.long()
    end = end.clamp(max=tokens)
    in_range = (t[None, :] >= start[:, None]) & (t[None, :] < end[:, None])  # [B, T]
    # query i is token end - S + i: it sees keys t < end - (S - 1 - i)
    behind = (queries - 1 - torch.arange(queries, device=device))[None, :, None]
    allowed = t[None, None, :] < (end[:, None, None] - behind)  # [B, S, T]
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, :]
    scores = scores.masked_fill(~allowed[:, None], MASKED_SCORE)
    scores = scores.masked_fill(~in_range[:, None, None, :], float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row without valid tokens: all -inf -> 0
    result = (weights.view(batch, heads * queries, tokens) @ c).view(batch, heads, queries, rank)
    result = result.to(q_latent.dtype)
    if out is not None:
        return out.copy_(result)
    return result


def key_mask_from_attention_mask(mask: torch.Tensor | None, batch: int, tokens: int) -> torch.Tensor | None:
    """The per-key bool mask ``[batch, tokens]`` (True = attend) the kernel takes, from transformers'
    4-D attention mask ``[B or 1, 1, S, >= tokens]`` (bool, True = attend; or additive float, 0 = attend and
    ``finfo.min`` = masked). The last query row is used: under causal + padding masking (what transformers
    builds for DeepSeek) it sees every existing key, so it is exactly the padding mask; the kernel applies
    causality itself. No host synchronisation."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        raise ValueError(f"attention mask must be a 4-D tensor [batch, 1, queries, tokens], got "
                         f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    last = mask[:, 0, -1, -tokens:]
    if mask.dtype != torch.bool:  # additive: anything above half the dtype's lowest value counts as attend
        last = last > torch.finfo(mask.dtype).min / 2
    return last.expand(batch, tokens)


# -- the Triton kernels ---------------------------------------------------------------------------
if _HAVE_TRITON:

    # lengths and counts vary from call to call: one compiled variant for all of them
    @triton.jit(do_not_specialize=["n_tokens", "n_rows", "n_queries", "n_chunks", "chunk_len"])
    def _mla_decode_chunk_kernel(
        Q, QR, C, KR, MASK, STARTS, LENS, O_PART, LSE_PART,
        stride_qb, stride_qh, stride_qs, stride_qd,
        stride_rb, stride_rh, stride_rs, stride_rd,
        stride_cb, stride_ct, stride_cd,
        stride_kb, stride_kt, stride_kd,
        stride_mb, stride_mt,
        n_tokens, n_rows, n_queries, n_chunks, chunk_len, scale_log2,
        R: tl.constexpr, P: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, SPLIT_V: tl.constexpr,
        BLOCK_P: tl.constexpr,
        HAS_MASK: tl.constexpr, HAS_STARTS: tl.constexpr, HAS_LENS: tl.constexpr, IEEE: tl.constexpr,
    ):
        """One (output half x row block, chunk, batch row): online softmax over the chunk's tokens for
        BLOCK_M query rows; the normalised partial output of this program's BLOCK_V latent columns and the
        log2-sum-exp go to O_PART / LSE_PART. With SPLIT_V = 2 the other half of the latent still enters
        the scores (loaded, multiplied, not accumulated)."""
        pid = tl.program_id(0)
        half = pid % SPLIT_V  # the output halves of one row block are neighbours: their tiles meet in L2
        row_block = pid // SPLIT_V
        chunk = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        head = rows // n_queries
        qi = rows % n_queries
        offs_v = half * BLOCK_V + tl.arange(0, BLOCK_V)
        v_ok = offs_v < R
        offs_p = tl.arange(0, BLOCK_P)
        p_ok = offs_p < P
        q_rows = Q + b * stride_qb + head[:, None] * stride_qh + qi[:, None] * stride_qs
        q = tl.load(q_rows + offs_v[None, :] * stride_qd, mask=row_ok[:, None] & v_ok[None, :], other=0.0)
        qr = tl.load(QR + b * stride_rb + head[:, None] * stride_rh + qi[:, None] * stride_rs + offs_p[None, :] * stride_rd,
                     mask=row_ok[:, None] & p_ok[None, :], other=0.0)
        if SPLIT_V == 2:
            offs_w = (1 - half) * BLOCK_V + tl.arange(0, BLOCK_V)
            w_ok = offs_w < R
            q_w = tl.load(q_rows + offs_w[None, :] * stride_qd, mask=row_ok[:, None] & w_ok[None, :], other=0.0)
        start = 0
        if HAS_STARTS:
            start = tl.maximum(tl.load(STARTS + b).to(tl.int32), 0)
        end = n_tokens
        if HAS_LENS:
            end = tl.minimum(start + tl.load(LENS + b).to(tl.int32), n_tokens)
        lo = tl.maximum(chunk * chunk_len, start)
        hi = tl.minimum(chunk * chunk_len + chunk_len, end)
        row_end = end - (n_queries - 1 - qi)  # causal: query i is token end - S + i
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
        c_row = C + b * stride_cb
        k_row = KR + b * stride_kb
        for t0 in range(lo, hi, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            t_ok = offs_t < hi
            c = tl.load(c_row + offs_t[:, None] * stride_ct + offs_v[None, :] * stride_cd,
                        mask=t_ok[:, None] & v_ok[None, :], other=0.0)
            kr = tl.load(k_row + offs_t[:, None] * stride_kt + offs_p[None, :] * stride_kd,
                         mask=t_ok[:, None] & p_ok[None, :], other=0.0)
            if IEEE:  # fp32 inputs: exact fp32 products (the default on NVIDIA would be TF32)
                s = tl.dot(q, tl.trans(c), input_precision="ieee")
                s = tl.dot(qr, tl.trans(kr), s, input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(c))
                s = tl.dot(qr, tl.trans(kr), s)
            if SPLIT_V == 2:
                c_w = tl.load(c_row + offs_t[:, None] * stride_ct + offs_w[None, :] * stride_cd,
                              mask=t_ok[:, None] & w_ok[None, :], other=0.0)
                if IEEE:
                    s = tl.dot(q_w, tl.trans(c_w), s, input_precision="ieee")
                else:
                    s = tl.dot(q_w, tl.trans(c_w), s)
            # log2 domain (exp2 below); the cast: inductor passes a Python float scalar as fp64
            s = (s * scale_log2).to(tl.float32)
            allowed = offs_t[None, :] < row_end[:, None]
            if HAS_MASK:
                keep = tl.load(MASK + b * stride_mb + offs_t * stride_mt, mask=t_ok, other=0)
                allowed = allowed & (keep != 0)[None, :]
            s = tl.where(allowed, s, -1.0e30)
            s = tl.where(t_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile has a token in range
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            if IEEE:
                acc = tl.dot(p, c, acc, input_precision="ieee")
            else:
                acc = tl.dot(p.to(c.dtype), c, acc)
            m_i = m_new
        has = l_i > 0
        o = acc / tl.where(has, l_i, 1.0)[:, None]
        part = (b * n_rows + rows) * n_chunks + chunk
        tl.store(O_PART + part[:, None] * R + offs_v[None, :], o.to(O_PART.dtype.element_ty),
                 mask=row_ok[:, None] & v_ok[None, :])
        if half == 0:  # both halves computed the same (m, l) up to the order of three fp32 additions
            lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
            tl.store(LSE_PART + part, lse, mask=row_ok)

    @triton.jit(do_not_specialize=["n_rows", "n_queries", "n_chunks"])
    def _mla_decode_merge_kernel(
        O_PART, LSE_PART, OUT,
        stride_ob, stride_oh, stride_os, stride_od,
        n_rows, n_queries, n_chunks,
        R: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """One (row, batch row, block of BLOCK_R latent columns): merge the chunks' partial outputs by their
        log-sum-exp, BLOCK_C chunks per load (a [BLOCK_C, BLOCK_R] tile in flight, not one chunk at a time:
        the merge is latency-bound otherwise when there are a hundred chunks)."""
        row = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        col0 = tl.program_id(2) * BLOCK_R
        base = (b * n_rows + row) * n_chunks
        offs_r = col0 + tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        tops = tl.full([BLOCK_C], float("-inf"), tl.float32)
        for c0 in range(0, n_chunks, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            tops = tl.maximum(tops, tl.load(LSE_PART + base + offs_c, mask=offs_c < n_chunks, other=float("-inf")))
        top = tl.max(tops, 0)
        top = tl.where(top == float("-inf"), 0.0, top)  # no valid token at all: weights 0, output 0
        total = tl.zeros([BLOCK_C], tl.float32)
        acc = tl.zeros([BLOCK_R], tl.float32)
        for c0 in range(0, n_chunks, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            c_ok = offs_c < n_chunks
            w = tl.exp2(tl.load(LSE_PART + base + offs_c, mask=c_ok, other=float("-inf")) - top)
            o = tl.load(O_PART + (base + offs_c)[:, None] * R + offs_r[None, :], mask=c_ok[:, None] & r_ok[None, :],
                        other=0.0).to(tl.float32)
            # a chunk without tokens has weight 0 and an output of 0 (never NaN): no masking needed
            acc += tl.sum(w[:, None] * o, 0)
            total += w
        total_sum = tl.sum(total, 0)
        acc = acc / tl.where(total_sum > 0, total_sum, 1.0)
        head = row // n_queries
        qi = row % n_queries
        tl.store(OUT + b * stride_ob + head * stride_oh + qi * stride_os + offs_r * stride_od,
                 acc.to(OUT.dtype.element_ty), mask=r_ok)


def plan(batch: int, rows: int, tokens: int, device: torch.device, block_m: int = 64, block_t: int = 64,
         min_chunk: int = 256, split_v: int = 1, waves: int = 1) -> tuple[int, int]:
    """``(chunks, chunk_len)``: split the tokens so that ``split_v * row blocks * chunks * batch``
    programs fill about ``waves`` waves of the GPU's SMs (the wide tiles leave room for one program per
    SM), with at least ``min_chunk`` tokens per chunk (partials stay a small fraction of the bytes read).
    ``chunk_len`` is a multiple of ``block_t`` and every chunk is non-empty. Depends only on shapes, so a
    captured decode step keeps its launch configuration."""
    sms = sm_count(device)
    programs = batch * split_v * math.ceil(rows / block_m)
    chunks = max(1, min(round(waves * sms / programs), math.ceil(tokens / min_chunk)))
    chunk_len = math.ceil(math.ceil(tokens / chunks) / block_t) * block_t
    return math.ceil(tokens / chunk_len), chunk_len


def _config(dtype: torch.dtype, rank: int, rope_dim: int, rows: int, device: torch.device) -> dict:
    """Tiles for ``rows`` query rows (heads x new tokens) over a latent of ``rank`` values.

    Wide head blocks, so that each latent tile is read once for many heads: 128 rows when the latent is
    256 wide (a TPLA shard at N = 2: at 128 heads one program per tile), 64 rows otherwise (plain MLA, a
    plain-TP shard, a TPLA shard at N = 4), on 8 warps (two warpgroups: ``tl.dot`` runs as Hopper
    ``wgmma``) once the float32 accumulator ``BLOCK_M x BLOCK_V`` reaches 64 x 256. The queries stay in
    shared memory for the whole loop, the rest of it holds up to 3 latent tiles in flight. 4-warp
    programs are small enough for two per SM, so they get two waves of programs, 8-warp ones one.

    Measured on an H200 at 32K tokens, bf16, batch 8 (``benchmarks/mla_kernel_sweep.py``, CUDA-graph
    replay; 128 heads unless said): r/N = 128 64 rows on 4 warps, two waves 60.9 us against 63.9 for 128
    rows on 8 warps; r/N = 256 128 rows 91.4 us against 194.5 for 64 rows and 170.1 for two output halves
    (``split_v = 2``); r = 512 64 rows 359 us, two output halves 357 (not worth the second score
    computation); 32 heads at r = 512 64-token tiles in 2 stages 155.9 us against 193.1 for 32-token tiles
    in 3; 16 heads two waves 88.6 us against 107.2 for one. Float32 inputs, widths past 512 and devices
    with less than 160 KB of shared memory per program (and Triton's CPU interpreter, which reports none)
    keep the small tiles of 16 rows."""
    width, rope = _pow2(rank), _pow2(rope_dim)
    if dtype in (torch.float32, torch.float64) or width > 512 or shared_memory(device) < 160 * 1024:
        return {"block_m": 16, "block_t": 16 if dtype.itemsize > 2 or width > 512 else 32, "split_v": 1,
                "num_warps": 4, "num_stages": 2, "waves": 2}
    block_m = min(128 if width == 256 else 64, max(16, _pow2(rows)))
    num_warps = 8 if block_m == 128 or block_m * width >= 64 * 256 else 4
    block_t = 64 if width + rope <= 320 or (block_m == 32 and width == 512) else 32
    stage_bytes = block_t * (width + rope) * dtype.itemsize
    resident = block_m * (width + rope) * dtype.itemsize + 16 * 1024  # queries + softmax / layout scratch
    num_stages = max(1, min(3, (shared_memory(device) - resident) // stage_bytes))
    return {"block_m": block_m, "block_t": block_t, "split_v": 1, "num_warps": num_warps,
            "num_stages": int(num_stages), "waves": 2 if num_warps == 4 else 1}


def _direct(kernel):
    """Launch a Triton kernel as is (eager calls that are never traced)."""
    return kernel


def _triton_forward(q_latent, q_rope, latent, rope_key, scale, kv_lengths, kv_starts, key_mask, out,
                    block_m=None, block_t=None, num_warps=None, num_stages=None, min_chunk=256, split_v=None,
                    waves=None, merge_chunks=None, wrap=_direct):
    """Allocate the partials and launch the chunk and merge kernels. Host work depends on shapes, dtypes
    and the device only (never tensor values), so it runs unchanged under FakeTensor tracing; ``wrap`` is
    ``torch.library.wrap_triton`` inside the custom op (the launches become traceable graph nodes).
    The keyword tiles override :func:`_config`'s choice (sweeps, tests)."""
    if latent.dtype == torch.float64:
        raise TypeError("the Triton MLA decode kernel takes float16/bfloat16/float32; use the reference for float64")
    batch, heads, queries, rank = q_latent.shape
    tokens, p = latent.shape[1], rope_key.shape[2]
    rows = heads * queries
    cfg = _config(latent.dtype, rank, p, rows, latent.device)
    block_m = block_m or cfg["block_m"]
    block_t = block_t or cfg["block_t"]
    split_v = split_v or cfg["split_v"]
    if split_v not in (1, 2):
        raise ValueError(f"split_v={split_v!r}: allowed values are 1 and 2")
    block_v = _pow2(math.ceil(rank / split_v))
    chunks, chunk_len = plan(batch, rows, tokens, latent.device, block_m, block_t, min_chunk, split_v,
                             waves or cfg["waves"])
    # 16-bit inputs keep 16-bit partials: each is normalised (|o| <= max |c|), so that rounds like the output
    # does, and halves the partials' traffic, which at batch 1 (a hundred chunks) rivals the cache's
    o_part = torch.empty(batch * rows * chunks * rank, dtype=latent.dtype if latent.dtype.itemsize == 2 else torch.float32,
                         device=latent.device)
    lse_part = torch.empty(batch * rows * chunks, dtype=torch.float32, device=latent.device)
    if _POISON_BUFFERS:
        o_part.fill_(float("nan"))
        lse_part.fill_(float("nan"))
    if out is None:
        out = torch.empty_like(q_latent)
    if key_mask is None:
        mask = latent  # dummy pointer, never read
    elif wrap is not _direct or torch.compiler.is_compiling():
        # traced (the custom op under inductor): inductor cannot lower a bool -> uint8 reinterpreting view
        # (torch.iinfo(bool) fails), so a B x T byte copy
        mask = key_mask.to(torch.uint8)
    else:
        mask = key_mask.view(torch.uint8)
    mask_strides = (mask.stride(0), mask.stride(1)) if key_mask is not None else (0, 0)
    starts = kv_starts if kv_starts is not None else latent
    lens = kv_lengths if kv_lengths is not None else latent
    grid = (split_v * math.ceil(rows / block_m), chunks, batch)
    wrap(_mla_decode_chunk_kernel)[grid](
        q_latent, q_rope, latent, rope_key, mask, starts, lens, o_part, lse_part,
        *q_latent.stride(), *q_rope.stride(), *latent.stride(), *rope_key.stride(), *mask_strides,
        tokens, rows, queries, chunks, chunk_len, float(scale) * 1.4426950408889634,
        R=rank, P=p, BLOCK_M=block_m, BLOCK_T=block_t, BLOCK_V=block_v, SPLIT_V=split_v, BLOCK_P=_pow2(p),
        HAS_MASK=key_mask is not None, HAS_STARTS=kv_starts is not None, HAS_LENS=kv_lengths is not None,
        IEEE=latent.dtype == torch.float32,
        num_warps=num_warps or cfg["num_warps"], num_stages=num_stages or cfg["num_stages"],
    )
    merge_cols = min(_pow2(rank), 128)
    # a [chunks, columns] tile of at most 4096 floats per load (32 registers a thread)
    merge_chunks = merge_chunks or min(_pow2(chunks, 2), max(2, 4096 // merge_cols))
    wrap(_mla_decode_merge_kernel)[(rows, batch, math.ceil(rank / merge_cols))](
        o_part, lse_part, out, *out.stride(), rows, queries, chunks,
        R=rank, BLOCK_R=merge_cols, BLOCK_C=merge_chunks, num_warps=4,
    )
    return out


class _InterpretedLauncher:
    """``wrap_triton`` for a kernel of Triton's CPU interpreter (``TRITON_INTERPRET=1``), which torch
    returns unwrapped: launches as usual, except on FakeTensors (dynamo's shape propagation through the
    op's fake implementation), where it does nothing -- the outputs' metadata is all that is needed there.
    Lets the CPU tests trace the op; a FunctionalTensor or anything else still launches (and fails loudly)."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        from torch._subclasses.fake_tensor import FakeTensor

        def launch(*args, **kwargs):
            if any(isinstance(a, FakeTensor) for a in args):
                return None
            return self.kernel[grid](*args, **kwargs)

        return launch


def _wrap_for_op(kernel):
    """``torch.library.wrap_triton(kernel)``: a launch that torch's tracers see as a graph node."""
    if not isinstance(kernel, triton.runtime.jit.JITFunction):
        # Triton's CPU interpreter (an InterpretedFunction): torch >= 2.12 hands it back unwrapped, older
        # versions raise, so it is never passed to wrap_triton
        return _InterpretedLauncher(kernel)
    return torch.library.wrap_triton(kernel)


# -- the custom op (torch.compile / CUDA graphs) ----------------------------------------------------
# torch.library.triton_op makes the launch one opaque op for dynamo (its host code -- the chunk plan,
# lru_cache'd device queries, scratch allocation -- is never traced by dynamo, so it cannot graph-break)
# while inductor still sees the Triton kernels through wrap_triton and compiles them into its graph
# (CUDA-graph capturable: scratch comes from the graph's allocator, lengths are device tensors).
_OP = None
if _HAVE_TRITON and hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton"):
    try:
        @torch.library.triton_op("kvcompress::mla_decode_attention", mutates_args=())
        def _mla_decode_op(
            q_latent: torch.Tensor,
            q_rope: torch.Tensor,
            latent: torch.Tensor,
            rope_key: torch.Tensor,
            scale: float,
            kv_lengths: Optional[torch.Tensor],  # typing.Optional: what older infer_schema versions parse
            kv_starts: Optional[torch.Tensor],
            key_mask: Optional[torch.Tensor],
        ) -> torch.Tensor:
            """The Triton path of :func:`mla_decode_attention` (3-D caches, validated inputs) as a custom op."""
            return _triton_forward(q_latent, q_rope, latent, rope_key, scale, kv_lengths, kv_starts, key_mask,
                                   None, wrap=_wrap_for_op)

        _OP = torch.ops.kvcompress.mla_decode_attention
    except Exception:  # registered already (a module reload), or a torch whose triton_op cannot take it
        try:
            _OP = torch.ops.kvcompress.mla_decode_attention
        except (AttributeError, RuntimeError):
            _OP = None  # eager launches only


def mla_decode_attention(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    rope_key: torch.Tensor,
    scale: float,
    kv_lengths: torch.Tensor | None = None,
    kv_starts: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Absorbed MLA decode attention, ``[B, H, S, r]``: the Triton kernel when
    :func:`kvcompress.kernels.triton_usable` says so for ``latent`` (CUDA + Triton, or Triton's CPU
    interpreter), else :func:`mla_decode_attention_reference`. Arguments and semantics are the
    reference's (see there and the module docstring); float64 always takes the reference.

    Inside ``torch.compile`` (and without ``out``) the kernel is called through the custom op
    ``torch.ops.kvcompress.mla_decode_attention`` (``torch.library.triton_op``), so a compiled caller
    (fullgraph, mode="reduce-overhead") keeps it in its graph; eager calls launch it directly."""
    latent3, rope3 = _check(q_latent, q_rope, latent, rope_key, scale, kv_lengths, kv_starts, key_mask, out)
    if _HAVE_TRITON and latent3.dtype != torch.float64 and triton_usable(latent3):
        # under torch.compile: the custom op (dynamo keeps it in the graph); eager calls launch directly
        # and skip the dispatcher's per-call overhead (27 layers a step add up)
        if out is None and _OP is not None and torch.compiler.is_compiling():
            return _OP(q_latent, q_rope, latent3, rope3, float(scale), kv_lengths, kv_starts, key_mask)
        return _triton_forward(q_latent, q_rope, latent3, rope3, scale, kv_lengths, kv_starts, key_mask, out)
    return mla_decode_attention_reference(q_latent, q_rope, latent3, rope3, scale, kv_lengths, kv_starts, key_mask, out)
