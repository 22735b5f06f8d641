"""xKV decode attention over the factored cache without rebuilding full keys/values in HBM.

The maths
---------
One layer of an :class:`kvcompress.xkv.XKVCache` holds, in token order, exact parts (sink tokens, the
recent tail: ordinary post-RoPE keys ``K`` and values ``V``, ``[B, H, T, d]``) and factored segments. A
segment of ``T`` tokens stores, per batch row, token factors shared by the layer's group and per-layer
right factors::

    K_pre = U_k B_k      U_k [T, r_k],  B_k [r_k, H*d]   (keys before RoPE, slot-numbered)
    V     = U_v B_v      U_v [T, r_v],  B_v [r_v, H*dv]

Token ``t`` of a segment starting at slot ``p0`` has the key ``k_t = R(p0 + t) (U_k B_k)[t, h]`` for KV head
``h`` (``R`` the rotate-half RoPE of :mod:`kvcompress.ops`, given as the segment's cos/sin table). For a
decode query ``q`` of query head ``j`` (KV head ``h = j // G``, ``G`` query heads per KV head) with scale
``c``, a part's scores, log-sum-exp and normalised output are::

    s_t = c * q . k_t                (-inf where the token is masked)
    lse = log sum_t exp(s_t)
    o   = sum_t softmax(s)_t v_t

and for a factored segment the value side stays in the latent, since softmax is linear in the rows it
averages: ``sum_t P_t (U_v B_v)[t, h] = (P U_v) B_v[:, h]``: the ``r_v``-vector ``P U_v`` is projected by
``B_v[:, h]`` once. Parts merge exactly by log-sum-exp::

    out = sum_i exp(lse_i - L) o_i,     L = log sum_i exp(lse_i)

(a part whose tokens are all masked, e.g. the sinks of a left-padded row, has ``lse = -inf`` and weight 0).

The kernels (Triton)
--------------------
With the kernels, each segment is scored into a float32 buffer ``S [B, Hq, T_seg]`` and reduced to
per-split partials ``(m, l, sum_t exp(s_t - m) U_v[t])`` (flash-decoding's split-K over the sequence), and
one online softmax per query head merges the exact parts (sinks and tail, read where they lie: no
concatenation) and the segments' splits by their maxima (the ``(o, lse)`` merge above, unnormalised until
the end). Per layer and step: ``3 * segments`` launches and 2 torch ops, the output and one float32
scratch buffer for everything else (1 op without segments): 3 launches and 2 ops for sinks + one segment +
tail, against 2 launches and 87 torch ops (39 of them views) before the fused kernels
(``tests/test_kernels_xkv.py`` bounds the count).

1. ``_xkv_scores_kernel``, grid ``(H, token tiles, B)``, per segment: a program rebuilds one
   ``[BLOCK_T, d]`` key tile of one KV head in registers (``U_k[tile] @ B_k[:, h]`` as two half-width
   ``tl.dot`` over ``r_k`` chunks, so the rotate-half RoPE needs no shuffle), rotates it with the segment's
   cos/sin, and scores it against the ``G`` query heads of that KV head. It writes only float32 scores:
   ``Hq`` floats per token, against ``2*H*d`` elements of rebuilt keys and values. Heads are the fastest
   grid axis, so the ``H`` programs of one tile run together: ``U_k[tile]`` comes from HBM once, then from
   L2. On CUDA the tile sizes are autotuned once per (rank, group, head dim, RoPE, dtype), up to 256-token
   tiles that load ``B_k[:, h]`` once per 256 tokens. The token grid splits the sequence across the whole
   GPU at batch 1 (flash-decoding's purpose). With the scores, each tile's softmax statistics per query
   head (max ``m``, sum ``l`` relative to it; ``(-inf, 0)`` where the tile is all masked) go to a small
   buffer, in slots of ``_STAT_T`` = 32 tokens whatever tile size the autotuner picks (the tile's first
   slot; a larger tile fills its other slots with ``(-inf, 0)``).
2. ``_xkv_latent_pv_kernel``, grid ``(r_v chunks, sequence splits, B)``, per segment: ``U_v`` is shared by
   all heads, so ``P U_v`` is a ``[Hq, T] x [T, r_v]`` product for all query heads at once, split over the
   sequence (split-K, at most ``_PV_MAX_SPLITS`` splits, each a whole number of kernel 1's tiles: a
   multiple of 256 tokens when kernel 1 is autotuned). A split's ``(m, l)`` come from kernel 1's statistics of its tiles, so the scores are read once,
   as ``exp(s - m)``; the float32 partials carry ``(m, l)`` in two extra columns. A per-KV-head kernel over
   the whole sequence would re-read ``U_v`` ``H`` times and hold a ``G x r_v`` accumulator (``r_v`` = 768
   at the defaults on Llama-3-8B).
3. ``_xkv_output_kernel``, grid ``(H, dv / BLOCK_DV, B)``, per segment: the online softmax of the ``G``
   query heads of KV head ``h`` over ``BLOCK_DV`` output columns. The first launch takes the exact parts
   (scores in float32, ``softmax . V`` for those columns); each launch merges one segment: its splits'
   partials weighted by ``exp(m_split - m_segment)`` in split order (deterministic, no separate reduction)
   into the latent, projected by those columns of ``B_v[:, h]`` (read in its dtype, accumulated in
   float32: no float copy of ``B_v``). The last launch writes ``acc / l`` in the query's dtype (0 for a row
   with no valid token); a float32 state buffer carries ``(acc, m, l)`` between launches. The column
   chunks give batch 1 ``H * dv / 32`` programs instead of ``H``.

Floors per layer and step (one segment of ``T`` tokens): bytes ``B*T*(r_k + r_v)*e`` for the factors
plus ``B*(r_k + r_v)*H*d*e`` for the right factors; flops ``2*B*T*r_k*H*d`` for the key rebuild (the
dominant term; the value side is ``2*B*T*Hq*r_v``). ``benchmarks/xkv_decode.py`` measures both ceilings.

Under ``torch.compile`` (``fullgraph=True``, ``mode="reduce-overhead"``: CUDA graphs),
:func:`xkv_decode_attention` calls the custom op ``torch.ops.kvcompress.xkv_decode_attention`` with the parts
flattened (sinks, the segments' factors and RoPE tables, tail); the op runs the same paths. Host code
depends on shapes, dtypes and the device only (no ``.item()``, no synchronisation), so the launches can be
captured and replayed.

Precision: products accumulate in float32; float32 inputs use IEEE float32 dots (not TF32). The output
has the query's dtype. The reference (:func:`xkv_decode_attention_reference`) computes everything in
float32 (float64 for float64 inputs) and is the CPU path and the kernels' definition.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import next_pow2 as _pow2, sm_count, triton_usable

try:  # Triton is optional: without it (CPU-only installs) the reference is the only path
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except Exception:  # ImportError, or a broken install without a GPU toolchain
    _HAVE_TRITON = False

# Tests set this to fill the kernels' output buffers with NaN before launch, so that an element a kernel
# fails to write shows up as NaN instead of passing with stale memory.
_POISON_BUFFERS = False
# Tests set this to a dict (BLOCK_T, BLOCK_R, num_warps, num_stages) to run kernel 1 with one of the
# autotuner's configs where it does not autotune (the interpreter, KVCOMPRESS_XKV_AUTOTUNE=0).
_SCORES_FIXED: dict | None = None
# Kernel 2 splits a segment's tokens over at most this many programs per r_v chunk; kernel 3 merges the
# splits while it loads the latent, reading G * r_v * splits floats per program, so more splits make
# kernel 2 wider and kernel 3 longer.
_PV_MAX_SPLITS = 16
# Kernel 3's output columns per program (value dims above it are split over the grid).
_OUT_BLOCK_DV = 32
# Kernel 1 writes softmax statistics per slot of this many tokens; every BLOCK_T it may use is a multiple.
_STAT_T = 32

__all__ = ["ExactPart", "FactoredPart", "xkv_decode_attention", "xkv_decode_attention_reference",
           "part_attention_reference", "merge_partials", "valid_mask_from_attention_mask"]


@dataclass
class ExactPart:
    """Tokens held exactly: post-RoPE ``keys [B, H, T, d]`` and ``values [B, H, T, dv]`` (views are fine)."""

    keys: torch.Tensor
    values: torch.Tensor

    @property
    def length(self) -> int:
        return self.keys.shape[-2]


@dataclass
class FactoredPart:
    """A compressed segment of one layer: keys ``rope(key_factor @ key_right)``, values
    ``value_factor @ value_right``.

    Shapes: ``key_factor [B, T, r_k]``, ``key_right [B, r_k, H*d]``, ``value_factor [B, T, r_v]``,
    ``value_right [B, r_v, H*dv]``; ``cos``/``sin`` ``[T, rotary_dim]`` float32, the rotate-half table of the
    segment's slots (both halves equal, as :func:`kvcompress.ops.rope_cos_sin` builds them), or ``None``
    when the keys are stored rotated (``pre_rope=False``).
    """

    key_factor: torch.Tensor
    key_right: torch.Tensor
    value_factor: torch.Tensor
    value_right: torch.Tensor
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.key_factor.shape[-2]


Part = ExactPart | FactoredPart


# -- validation -----------------------------------------------------------------------------------
def _check(query: torch.Tensor, parts: Sequence[Part], valid: torch.Tensor | None) -> tuple[int, int, int]:
    """Validate shapes/dtypes/devices; returns ``(kv_heads, value_head_dim, total_tokens)``."""
    if not isinstance(query, torch.Tensor) or query.dim() != 4 or query.shape[2] != 1:
        raise ValueError("query must be a 4-D tensor [batch, q_heads, 1, head_dim] (one decode token), got "
                         f"{tuple(query.shape) if isinstance(query, torch.Tensor) else type(query).__name__}")
    if not parts:
        raise ValueError("parts must hold at least one ExactPart or FactoredPart")
    batch, q_heads, _, head_dim = query.shape
    kv_heads = value_dim = None
    total = 0
    for i, part in enumerate(parts):
        if isinstance(part, ExactPart):
            if part.keys.dim() != 4 or part.values.dim() != 4:
                raise ValueError(f"parts[{i}].keys/values must be [batch, kv_heads, tokens, head_dim]")
            h, dv = part.keys.shape[1], part.values.shape[-1]
            if part.keys.shape[-1] != head_dim or part.keys.shape[0] != batch or part.values.shape[:3] != part.keys.shape[:3]:
                raise ValueError(f"parts[{i}] has keys {tuple(part.keys.shape)} / values {tuple(part.values.shape)}; "
                                 f"the query gives batch={batch}, head_dim={head_dim}")
            tensors = (part.keys, part.values)
        elif isinstance(part, FactoredPart):
            kf, kr, vf, vr = part.key_factor, part.key_right, part.value_factor, part.value_right
            if any(t.dim() != 3 for t in (kf, kr, vf, vr)):
                raise ValueError(f"parts[{i}] factors must be 3-D: key_factor/value_factor [batch, tokens, rank], "
                                 "key_right/value_right [batch, rank, heads*head_dim]")
            if kf.shape[0] != batch or vf.shape[0] != batch or kr.shape[0] != batch or vr.shape[0] != batch:
                raise ValueError(f"parts[{i}] factors must have batch size {batch} (the query's)")
            if kr.shape[1] != kf.shape[2] or vr.shape[1] != vf.shape[2] or vf.shape[1] != kf.shape[1]:
                raise ValueError(f"parts[{i}] factor shapes disagree: key_factor {tuple(kf.shape)}, key_right "
                                 f"{tuple(kr.shape)}, value_factor {tuple(vf.shape)}, value_right {tuple(vr.shape)}")
            if kr.shape[2] % head_dim:
                raise ValueError(f"parts[{i}].key_right width {kr.shape[2]} is not a multiple of head_dim={head_dim}")
            h = kr.shape[2] // head_dim
            if vr.shape[2] % h:
                raise ValueError(f"parts[{i}].value_right width {vr.shape[2]} is not a multiple of kv_heads={h}")
            dv = vr.shape[2] // h
            if (part.cos is None) != (part.sin is None):
                raise ValueError(f"parts[{i}]: pass both cos and sin, or neither")
            if part.cos is not None and (part.cos.dim() != 2 or part.cos.shape[0] != kf.shape[1]
                                         or part.cos.shape[1] > head_dim or part.cos.shape[1] % 2
                                         or part.sin.shape != part.cos.shape):
                raise ValueError(f"parts[{i}].cos/sin must be [tokens={kf.shape[1]}, rotary_dim <= {head_dim}, even], "
                                 f"got {tuple(part.cos.shape)} / {tuple(part.sin.shape)}")
            tensors = (kf, kr, vf, vr)
        else:
            raise TypeError(f"parts[{i}] must be an ExactPart or FactoredPart, got {type(part).__name__}")
        if kv_heads is None:
            kv_heads, value_dim = h, dv
        elif (h, dv) != (kv_heads, value_dim):
            raise ValueError(f"parts[{i}] has {h} kv heads of value dim {dv}; earlier parts have {kv_heads} / {value_dim}")
        for t in tensors:
            if t.dtype != query.dtype or t.device != query.device:
                raise ValueError(f"parts[{i}] tensors must have the query's dtype {query.dtype} and device "
                                 f"{query.device}, got {t.dtype} on {t.device}")
        total += part.length
    if q_heads % kv_heads:
        raise ValueError(f"query has {q_heads} heads, not a multiple of the parts' kv_heads={kv_heads}")
    if valid is not None and (not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool
                              or tuple(valid.shape) != (batch, total)):
        raise ValueError(f"valid must be a bool tensor [batch={batch}, tokens={total}] (True = attend), got "
                         f"{(valid.dtype, tuple(valid.shape)) if isinstance(valid, torch.Tensor) else type(valid).__name__}")
    return kv_heads, value_dim, total


def valid_mask_from_attention_mask(mask: torch.Tensor | None, batch: int, tokens: int) -> torch.Tensor | None:
    """The per-token bool mask ``[batch, tokens]`` (True = attend) from transformers' decode-step 4-D mask
    ``[B or 1, 1, 1, >= tokens]`` (bool, or additive float where ``finfo.min`` means masked). ``None`` stays
    ``None`` (every token attended). The result may be a strided view (a bool mask's last query row,
    broadcast over the batch): at most 3 torch ops, as this runs for every layer of every decode step."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        raise ValueError(f"attention mask must be a 4-D tensor [batch, 1, queries, tokens], got "
                         f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    if mask.shape[-1] < tokens:
        raise ValueError(f"attention mask covers {mask.shape[-1]} tokens, fewer than the {tokens} attended")
    if torch.compiler.is_compiling():  # traced once, so plain indexing (dynamo cannot trace storage_offset)
        last = mask[:, 0, -1, mask.shape[3] - tokens:]
    else:  # mask[:, 0, -1, -tokens:] as one view instead of three
        offset = mask.storage_offset() + (mask.shape[2] - 1) * mask.stride(2) + (mask.shape[3] - tokens) * mask.stride(3)
        last = mask.as_strided((mask.shape[0], tokens), (mask.stride(0), mask.stride(3)), offset)
    if mask.dtype != torch.bool:  # additive: anything above half the dtype's lowest value counts as attend
        last = last > torch.finfo(mask.dtype).min / 2
    return last if last.shape[0] == batch else last.expand(batch, tokens)


# -- reference ------------------------------------------------------------------------------------
def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _softmax_parts(scores: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, lse)`` of ``scores [B, H, G, T]`` with ``valid [B, T]``; an all-masked row gets ``P = 0``,
    ``lse = -inf`` (weight 0 in the merge) instead of NaN."""
    if valid is not None:
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return torch.exp(scores - safe[..., None]), lse


def _rotate_half_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``rotary_dim`` features of ``x [B, T, H, d]`` with ``cos/sin [T, rotary_dim]``, in
    ``x.dtype`` (``kvcompress.ops.apply_rope`` works in float32; the float64 reference must not)."""
    rotary_dim = cos.shape[-1]
    half = rotary_dim // 2
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:rotary_dim]
    rotated = torch.cat((x1 * cos[..., :half] - x2 * sin[..., :half], x2 * cos[..., half:] + x1 * sin[..., half:]), -1)
    return torch.cat((rotated, x[..., rotary_dim:]), dim=-1)


def part_attention_reference(query: torch.Tensor, part: Part, scaling: float,
                             valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One part's normalised output ``o [B, Hq, dv]`` and log-sum-exp ``lse [B, Hq]`` (float32, float64
    for float64 inputs); ``valid [B, T_part]`` masks tokens. See the module docstring for the maths."""
    work = _work_dtype(query.dtype)
    batch, q_heads, _, head_dim = query.shape
    if isinstance(part, ExactPart):
        kv_heads = part.keys.shape[1]
        keys, values = part.keys.to(work), part.values.to(work)  # [B, H, T, d]
    else:
        kv_heads = part.key_right.shape[-1] // head_dim
        keys = torch.matmul(part.key_factor.to(work), part.key_right.to(work))
        keys = keys.view(batch, -1, kv_heads, head_dim)  # [B, T, H, d], pre-RoPE
        if part.cos is not None:
            keys = _rotate_half_rope(keys, part.cos, part.sin)
        keys = keys.transpose(1, 2)
    groups = q_heads // kv_heads
    q = query[:, :, 0, :].to(work).view(batch, kv_heads, groups, head_dim)
    scores = torch.matmul(q, keys.transpose(-1, -2)) * scaling  # [B, H, G, T]
    probs, lse = _softmax_parts(scores, valid)
    if isinstance(part, ExactPart):
        out = torch.matmul(probs, values)  # [B, H, G, dv]
    else:
        latent = torch.matmul(probs.reshape(batch, q_heads, -1), part.value_factor.to(work))  # [B, Hq, r_v]
        rank_v = part.value_right.shape[1]
        right = part.value_right.to(work).view(batch, rank_v, kv_heads, -1).permute(0, 2, 1, 3)  # [B, H, r_v, dv]
        out = torch.matmul(latent.view(batch, kv_heads, groups, rank_v), right)
    return out.reshape(batch, q_heads, -1), lse.reshape(batch, q_heads)


def merge_partials(partials: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``sum_i exp(lse_i - L) o_i`` with ``L = logsumexp_i lse_i``: exact softmax attention over the union
    of the parts. Parts with ``lse = -inf`` get weight 0; a row masked everywhere gives 0."""
    outs = torch.stack([o for o, _ in partials])  # [P, B, Hq, dv]
    lses = torch.stack([lse for _, lse in partials])  # [P, B, Hq]
    total = torch.logsumexp(lses, dim=0)
    safe = torch.where(torch.isfinite(total), total, torch.zeros_like(total))
    weights = torch.exp(lses - safe)  # exp(-inf) = 0 for empty parts
    outs = torch.where(torch.isfinite(lses)[..., None], outs, torch.zeros_like(outs))
    return (weights[..., None] * outs).sum(0)


def _split_valid(valid: torch.Tensor | None, parts: Sequence[Part]) -> list[torch.Tensor | None]:
    if valid is None:
        return [None] * len(parts)
    pieces, start = [], 0
    for part in parts:
        pieces.append(valid[:, start : start + part.length])
        start += part.length
    return pieces


def xkv_decode_attention_reference(query: torch.Tensor, parts: Sequence[Part], scaling: float,
                                   valid: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-PyTorch :func:`xkv_decode_attention` (float32 work, float64 for float64 inputs)."""
    _check(query, parts, valid)
    partials = [part_attention_reference(query, part, scaling, v) for part, v in zip(parts, _split_valid(valid, parts))]
    return merge_partials(partials).to(query.dtype)[:, None]


# -- Triton ---------------------------------------------------------------------------------------
# Every Triton launch goes through _launch, so tests can count launches per call (and bound them).
def _launch(kernel, grid, *args, **kwargs) -> None:
    kernel[grid](*args, **kwargs)


def count_ops_and_launches(fn) -> tuple[dict[str, int], int]:
    """Diagnostics (the benchmark and the tests bound the host work of a call): torch ops dispatched by
    ``fn()``, by name (views included: each costs host time; ops inside a Triton launch, e.g. the
    interpreter's copies, are not counted) and the Triton launches it made (through :func:`_launch`)."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class OpCounter(TorchDispatchMode):
        paused = False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not self.paused:
                ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    module = sys.modules[__name__]
    ops, launches, original, counter = Counter(), [0], module._launch, OpCounter()

    def launch(*args, **kwargs):
        launches[0] += 1
        counter.paused = True
        try:
            return original(*args, **kwargs)
        finally:
            counter.paused = False

    module._launch = launch
    try:
        with counter:
            fn()
    finally:
        module._launch = original
    return ops, launches[0]


if _HAVE_TRITON:

    @triton.jit
    def _xkv_scores_kernel(
        Q, UK, BK, COS, SIN, VALID, S, STATS,
        T, R, G, col0, valid_off, slot0, n_slots, s_off, x_off,
        stride_qb, stride_qh, stride_qd,
        stride_ub, stride_ut, stride_ur,
        stride_bb, stride_br, stride_bc,
        stride_ct, stride_cd,
        stride_vb, stride_vt,
        stride_sb, stride_sh, stride_st,
        stride_xp, stride_xb, stride_xh, stride_xn,
        scale,
        HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr,
        STAT_T: tl.constexpr, HAS_ROPE: tl.constexpr, HAS_VALID: tl.constexpr, PRECISION: tl.constexpr,
    ):
        h = tl.program_id(0)
        tile = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
        t_ok = offs_t < T
        offs_d = tl.arange(0, HALF)
        col = h * 2 * HALF + offs_d  # first half of head h's columns in B_k
        k1 = tl.zeros([BLOCK_T, HALF], dtype=tl.float32)
        k2 = tl.zeros([BLOCK_T, HALF], dtype=tl.float32)
        u_base = UK + b * stride_ub
        b_base = BK + b * stride_bb
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_ok = offs_r < R
            u = tl.load(u_base + offs_t[:, None] * stride_ut + offs_r[None, :] * stride_ur,
                        mask=t_ok[:, None] & r_ok[None, :], other=0.0)
            b1 = tl.load(b_base + offs_r[:, None] * stride_br + col[None, :] * stride_bc, mask=r_ok[:, None], other=0.0)
            b2 = tl.load(b_base + offs_r[:, None] * stride_br + (col + HALF)[None, :] * stride_bc,
                         mask=r_ok[:, None], other=0.0)
            k1 += tl.dot(u, b1, input_precision=PRECISION)
            k2 += tl.dot(u, b2, input_precision=PRECISION)
        if HAS_ROPE:
            # rotate-half: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin); both halves of the table are equal
            c = tl.load(COS + offs_t[:, None] * stride_ct + offs_d[None, :] * stride_cd, mask=t_ok[:, None], other=0.0)
            s = tl.load(SIN + offs_t[:, None] * stride_ct + offs_d[None, :] * stride_cd, mask=t_ok[:, None], other=0.0)
            r1 = k1 * c - k2 * s
            r2 = k2 * c + k1 * s
        else:
            r1 = k1
            r2 = k2
        offs_g = tl.arange(0, BLOCK_G)
        g_ok = offs_g < G
        heads = h * G + offs_g
        q_ptr = Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd
        q1 = tl.load(q_ptr, mask=g_ok[:, None], other=0.0).to(tl.float32)
        q2 = tl.load(q_ptr + HALF * stride_qd, mask=g_ok[:, None], other=0.0).to(tl.float32)
        scores = tl.dot(q1, tl.trans(r1), input_precision=PRECISION)
        scores += tl.dot(q2, tl.trans(r2), input_precision=PRECISION)
        scores = scores * scale
        keep = t_ok
        if HAS_VALID:
            keep = keep & (tl.load(VALID + b * stride_vb + (valid_off + offs_t) * stride_vt, mask=t_ok, other=0) != 0)
        scores = tl.where(keep[None, :], scores, float("-inf"))
        tl.store(S + s_off + b * stride_sb + heads[:, None] * stride_sh + (col0 + offs_t)[None, :] * stride_st, scores,
                 mask=g_ok[:, None] & t_ok[None, :])
        # The tile's softmax statistics, so that kernel 2 combines T / STAT_T of them per row instead of
        # re-reading the row's T scores. Slots are STAT_T tokens wide whatever BLOCK_T the autotuner picks:
        # the tile's first slot holds its (max, sum relative to it), the others the empty (-inf, 0).
        m = tl.max(scores, axis=1)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        l = tl.sum(tl.exp(scores - m_safe[:, None]), axis=1)  # an all-masked tile: m = -inf, l = 0
        x_row = STATS + x_off + b * stride_xb + heads * stride_xh
        if BLOCK_T == STAT_T:
            x_ptr = x_row + (slot0 + tile) * stride_xn
            tl.store(x_ptr, m, mask=g_ok)
            tl.store(x_ptr + stride_xp, l, mask=g_ok)
        else:
            offs_k = tl.arange(0, BLOCK_T // STAT_T)
            slot = tile * (BLOCK_T // STAT_T) + offs_k
            first = (offs_k == 0)[None, :]
            x_ptr = x_row[:, None] + (slot0 + slot)[None, :] * stride_xn
            x_ok = g_ok[:, None] & (slot < n_slots)[None, :]
            tl.store(x_ptr, tl.where(first, m[:, None], float("-inf")), mask=x_ok)
            tl.store(x_ptr + stride_xp, tl.where(first, l[:, None], 0.0), mask=x_ok)

    @triton.jit
    def _merge_stats(m, l, tm, tl_, AXIS: tl.constexpr):
        """Softmax statistics ``(m, l)`` (max, sum relative to it) merged with a block of others ``(tm, tl_)``
        along ``AXIS``; empty ones are ``(-inf, 0)``, and a row still all empty stays ``(-inf, 0)``, not NaN."""
        m_new = tl.maximum(m, tl.max(tm, axis=AXIS))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        if AXIS == 0:
            l = l * tl.exp(m - m_safe) + tl.sum(tl_ * tl.exp(tm - m_safe), axis=0)
        else:
            l = l * tl.exp(m - m_safe) + tl.sum(tl_ * tl.exp(tm - m_safe[:, None]), axis=1)
        return m_new, l

    @triton.jit
    def _xkv_latent_pv_kernel(
        S, STATS, UV, OUT,
        T, RV, HQ, tiles_per_split, col0, slot0, s_off, x_off, o_off,
        stride_sb, stride_sh, stride_st,
        stride_xp, stride_xb, stride_xh, stride_xn,
        stride_ub, stride_ut, stride_ur,
        stride_ob, stride_os, stride_oh, stride_or,
        BLOCK_HQ: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_SL: tl.constexpr,
        STAT_T: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """Grid ``(r_v chunks, splits, B)``: one split of a segment's tokens, all query heads. The split's own
        softmax max ``m`` (from kernel 1's slot statistics, so one pass over the scores) shifts the
        exponentials; the partial ``sum_t exp(s_t - m) U_v[t]`` goes to columns ``[0, RV)`` of ``OUT``, and
        ``(m, l)`` (``l`` the split's sum relative to ``m``) to columns ``RV, RV + 1`` (r chunk 0 only)."""
        rc = tl.program_id(0)
        split = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        offs_h = tl.arange(0, BLOCK_HQ)
        h_ok = offs_h < HQ
        offs_r = rc * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = offs_r < RV
        t_begin = split * tiles_per_split * BLOCK_T
        t_end = tl.minimum(t_begin + tiles_per_split * BLOCK_T, T)
        x_row = STATS + x_off + b * stride_xb + offs_h[:, None] * stride_xh
        m = tl.max(tl.full([BLOCK_HQ, BLOCK_SL], float("-inf"), dtype=tl.float32), axis=1)
        l = tl.sum(tl.zeros([BLOCK_HQ, BLOCK_SL], dtype=tl.float32), axis=1)
        for c0 in range(t_begin // STAT_T, tl.cdiv(t_end, STAT_T), BLOCK_SL):  # BLOCK_T is a multiple of STAT_T
            offs_c = c0 + tl.arange(0, BLOCK_SL)
            c_ok = h_ok[:, None] & (offs_c * STAT_T < t_end)[None, :]
            x_ptr = x_row + (slot0 + offs_c)[None, :] * stride_xn
            tm = tl.load(x_ptr, mask=c_ok, other=float("-inf"))
            tl_ = tl.load(x_ptr + stride_xp, mask=c_ok, other=0.0)
            m, l = _merge_stats(m, l, tm, tl_, 1)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        acc = tl.zeros([BLOCK_HQ, BLOCK_R], dtype=tl.float32)
        for i in range(0, tiles_per_split):
            offs_t = t_begin + i * BLOCK_T + tl.arange(0, BLOCK_T)
            t_ok = offs_t < T
            s = tl.load(S + s_off + b * stride_sb + offs_h[:, None] * stride_sh + (col0 + offs_t)[None, :] * stride_st,
                        mask=h_ok[:, None] & t_ok[None, :], other=float("-inf"))
            p = tl.exp(s - m_safe[:, None])  # <= 1; masked entries: 0
            u = tl.load(UV + b * stride_ub + offs_t[:, None] * stride_ut + offs_r[None, :] * stride_ur,
                        mask=t_ok[:, None] & r_ok[None, :], other=0.0)
            acc += tl.dot(p.to(u.dtype), u, input_precision=PRECISION)
        o_row = OUT + o_off + b * stride_ob + split * stride_os + offs_h * stride_oh
        tl.store(o_row[:, None] + offs_r[None, :] * stride_or, acc, mask=h_ok[:, None] & r_ok[None, :])
        if rc == 0:
            tl.store(o_row + RV * stride_or, m, mask=h_ok)
            tl.store(o_row + (RV + 1) * stride_or, l, mask=h_ok)

    @triton.jit
    def _exact_attend(m, l, acc, q, K, V, N, VALID, b, h, g_ok, offs_dv, valid_off, scale,
                      stride_kb, stride_kh, stride_kt, stride_kd, stride_wb, stride_wh, stride_wt, stride_wd,
                      stride_vb, stride_vt,
                      D: tl.constexpr, BLOCK_E: tl.constexpr, HAS_VALID: tl.constexpr, PRECISION: tl.constexpr):
        """One exact part (keys ``K[b, h]``, values ``V[b, h]``, ``N`` tokens) into the online softmax
        ``(m, l, acc)`` of the ``G`` query heads ``q`` (float32 scores, as the reference)."""
        offs_d = tl.arange(0, D)
        for e0 in range(0, N, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            e_ok = offs_e < N
            k = tl.load(K + b * stride_kb + h * stride_kh + offs_e[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                        mask=e_ok[:, None], other=0.0).to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            keep = e_ok
            if HAS_VALID:
                keep = keep & (tl.load(VALID + b * stride_vb + (valid_off + offs_e) * stride_vt, mask=e_ok, other=0) != 0)
            s = tl.where(g_ok[:, None] & keep[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_safe)  # 0 while the row was empty (acc, l are 0 then)
            p = tl.exp(s - m_safe[:, None])
            v = tl.load(V + b * stride_wb + h * stride_wh + offs_e[:, None] * stride_wt + offs_dv[None, :] * stride_wd,
                        mask=e_ok[:, None], other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
            l = l * alpha + tl.sum(p, axis=1)
            m = m_new
        return m, l, acc

    @triton.jit
    def _xkv_output_kernel(
        Q, K1, V1, K2, V2, VALID, PART, BV, STATE, OUT,
        RV, G, N1, N2, SPLITS, valid_off1, valid_off2, p_off, a_off,
        stride_qb, stride_qh, stride_qd,
        stride_k1b, stride_k1h, stride_k1t, stride_k1d,
        stride_v1b, stride_v1h, stride_v1t, stride_v1d,
        stride_k2b, stride_k2h, stride_k2t, stride_k2d,
        stride_v2b, stride_v2h, stride_v2t, stride_v2d,
        stride_vb, stride_vt,
        stride_pb, stride_ps, stride_ph, stride_pr,
        stride_bb, stride_br, stride_bc,
        stride_ab, stride_ah, stride_ad,
        stride_ob, stride_oh, stride_od,
        scale,
        D: tl.constexpr, DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_SP: tl.constexpr, BLOCK_E: tl.constexpr,
        HAS_SEG: tl.constexpr, HAS_EXACT: tl.constexpr, HAS_VALID: tl.constexpr, ACC_IN: tl.constexpr,
        ACC_OUT: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """Grid ``(H, DV / BLOCK_DV, B)``: the ``G`` query heads of KV head ``h``, ``BLOCK_DV`` output columns.
        An online softmax ``(m, l, acc)`` (``acc`` unnormalised, relative to ``m``) takes the exact parts
        (first launch), then one segment per launch: its split-K partials merged by their ``(m, l)`` in
        split order (deterministic) into the latent, projected by ``B_v[:, h]``. Between launches the state
        waits in ``STATE`` (float32: ``acc`` in columns ``[0, DV)``, this chunk's ``m, l`` after them); the
        last launch writes ``acc / l`` (0 for a row with no valid token) in the output's dtype."""
        h = tl.program_id(0)
        chunk = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        offs_g = tl.arange(0, BLOCK_G)
        g_ok = offs_g < G
        heads = h * G + offs_g
        offs_dv = chunk * BLOCK_DV + tl.arange(0, BLOCK_DV)
        a_row = STATE + a_off + b * stride_ab + heads * stride_ah
        ml_ptr = a_row + (DV + 2 * chunk) * stride_ad
        if ACC_IN:
            acc = tl.load(a_row[:, None] + offs_dv[None, :] * stride_ad, mask=g_ok[:, None], other=0.0)
            m = tl.load(ml_ptr, mask=g_ok, other=float("-inf"))
            l = tl.load(ml_ptr + stride_ad, mask=g_ok, other=0.0)
        else:
            acc = tl.zeros([BLOCK_G, BLOCK_DV], dtype=tl.float32)
            m = tl.max(tl.full([BLOCK_G, BLOCK_DV], float("-inf"), dtype=tl.float32), axis=1)
            l = tl.sum(tl.zeros([BLOCK_G, BLOCK_DV], dtype=tl.float32), axis=1)
        if HAS_EXACT:
            offs_d = tl.arange(0, D)
            q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                        mask=g_ok[:, None], other=0.0).to(tl.float32)
            m, l, acc = _exact_attend(m, l, acc, q, K1, V1, N1, VALID, b, h, g_ok, offs_dv, valid_off1, scale,
                                      stride_k1b, stride_k1h, stride_k1t, stride_k1d,
                                      stride_v1b, stride_v1h, stride_v1t, stride_v1d, stride_vb, stride_vt,
                                      D, BLOCK_E, HAS_VALID, PRECISION)
            m, l, acc = _exact_attend(m, l, acc, q, K2, V2, N2, VALID, b, h, g_ok, offs_dv, valid_off2, scale,
                                      stride_k2b, stride_k2h, stride_k2t, stride_k2d,
                                      stride_v2b, stride_v2h, stride_v2t, stride_v2d, stride_vb, stride_vt,
                                      D, BLOCK_E, HAS_VALID, PRECISION)
        if HAS_SEG:
            offs_sp = tl.arange(0, BLOCK_SP)
            p_base = PART + p_off + b * stride_pb + heads[None, :] * stride_ph
            # the segment's max and sum over its splits' (m, l)
            m_seg = tl.max(tl.full([BLOCK_SP, BLOCK_G], float("-inf"), dtype=tl.float32), axis=0)
            l_seg = tl.sum(tl.zeros([BLOCK_SP, BLOCK_G], dtype=tl.float32), axis=0)
            for s0 in range(0, SPLITS, BLOCK_SP):
                sp = s0 + offs_sp
                sp_ok = (sp < SPLITS)[:, None] & g_ok[None, :]
                ml = p_base + sp[:, None] * stride_ps + RV * stride_pr
                m_seg, l_seg = _merge_stats(m_seg, l_seg, tl.load(ml, mask=sp_ok, other=float("-inf")),
                                            tl.load(ml + stride_pr, mask=sp_ok, other=0.0), 0)
            m_seg_safe = tl.where(m_seg == float("-inf"), 0.0, m_seg)
            seg = tl.zeros([BLOCK_G, BLOCK_DV], dtype=tl.float32)
            for r0 in range(0, RV, BLOCK_R):
                offs_r = r0 + tl.arange(0, BLOCK_R)
                r_ok = offs_r < RV
                # BLOCK_SP splits per load: independent loads in flight instead of one serial chain
                latent = tl.zeros([BLOCK_G, BLOCK_R], dtype=tl.float32)
                for s0 in range(0, SPLITS, BLOCK_SP):
                    sp = s0 + offs_sp
                    sp_ok = (sp < SPLITS)[:, None] & g_ok[None, :]
                    ms = tl.load(p_base + sp[:, None] * stride_ps + RV * stride_pr, mask=sp_ok,
                                 other=float("-inf"))
                    w = tl.exp(ms - m_seg_safe[None, :])  # an empty split (or padding): 0
                    part = tl.load(p_base[:, :, None] + sp[:, None, None] * stride_ps + offs_r[None, None, :] * stride_pr,
                                   mask=sp_ok[:, :, None] & r_ok[None, None, :], other=0.0)
                    latent += tl.sum(part * w[:, :, None], axis=0)
                bv = tl.load(BV + b * stride_bb + offs_r[:, None] * stride_br + (h * DV + offs_dv)[None, :] * stride_bc,
                             mask=r_ok[:, None], other=0.0).to(tl.float32)
                seg += tl.dot(latent, bv, input_precision=PRECISION)
            m_new = tl.maximum(m, m_seg)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha, beta = tl.exp(m - m_safe), tl.exp(m_seg - m_safe)
            acc = acc * alpha[:, None] + seg * beta[:, None]
            l = l * alpha + l_seg * beta
            m = m_new
        if ACC_OUT:
            tl.store(a_row[:, None] + offs_dv[None, :] * stride_ad, acc, mask=g_ok[:, None])
            tl.store(ml_ptr, m, mask=g_ok)
            tl.store(ml_ptr + stride_ad, l, mask=g_ok)
        else:
            out = tl.where(l[:, None] > 0, acc / tl.where(l > 0, l, 1.0)[:, None], 0.0)
            o_ptr = OUT + b * stride_ob + heads[:, None] * stride_oh + offs_dv[None, :] * stride_od
            tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=g_ok[:, None])

    # Kernel 1 does almost all the flops (the key rebuild); its best tile depends on the GPU, so on CUDA it
    # is autotuned once per (rank, group, head dim, RoPE, dtype). Configs that do not fit are skipped by
    # the autotuner. KVCOMPRESS_XKV_AUTOTUNE=0 uses the fixed default instead (and the interpreter always does).
    # Large token tiles (128/256) load the per-head B_k (r_k x d, 128 KB in bf16 at the defaults) once per
    # more tokens: with 32-64-token tiles B_k traffic from L2 was 2-4 GB per call at batch 8 x 32K.
    _SCORES_CONFIGS = [
        triton.Config({"BLOCK_T": bt, "BLOCK_R": br}, num_warps=w, num_stages=st)
        for bt, br, w, st in ((32, 64, 4, 3), (64, 64, 4, 3), (64, 64, 8, 3), (128, 64, 8, 3),
                              (64, 32, 4, 4), (128, 32, 8, 4), (64, 128, 8, 2),
                              (128, 64, 8, 2), (128, 128, 8, 2), (256, 32, 8, 2), (256, 32, 8, 3),
                              (256, 64, 8, 2), (256, 64, 8, 3))
    ]
    assert all(c.kwargs["BLOCK_T"] % _STAT_T == 0 for c in _SCORES_CONFIGS)
    _MAX_SCORES_BLOCK_T = max(c.kwargs["BLOCK_T"] for c in _SCORES_CONFIGS)
    _xkv_scores_kernel_tuned = triton.autotune(configs=_SCORES_CONFIGS, key=["R", "G", "HALF", "HAS_ROPE"])(
        _xkv_scores_kernel)


def _autotune() -> bool:
    return (os.environ.get("TRITON_INTERPRET", "") != "1"
            and os.environ.get("KVCOMPRESS_XKV_AUTOTUNE", "1") not in ("0", ""))


def _pow2_at_least_16(n: int) -> bool:
    return n >= 16 and not n & (n - 1)


def _kernel_supported(query: torch.Tensor, parts: Sequence[Part], value_dim: int) -> bool:
    """The kernels cover the usual case: full rotary (or none), power-of-two head dims (``tl.arange`` needs
    them; keys >= 32, values >= 16), float32/bfloat16/float16. Anything else takes the reference."""
    head_dim = query.shape[-1]
    if query.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if head_dim < 32 or not _pow2_at_least_16(head_dim) or not _pow2_at_least_16(value_dim):
        return False
    return all(part.cos is None or part.cos.shape[-1] == head_dim for part in parts if isinstance(part, FactoredPart))


def _fused_triton(query: torch.Tensor, parts: Sequence[Part], scaling: float, valid: torch.Tensor | None,
                  kv_heads: int, value_dim: int, total: int) -> torch.Tensor:
    """All parts of one layer in ``3 * segments`` launches (1 without segments: the output kernel alone)
    and 2 torch ops, both allocations: the output and one float32 scratch buffer that holds the scores,
    the statistics, the partials and the state between output launches (1 op without segments). No per-part ``(o, lse)`` merge in torch and no concatenation
    of sinks and tail: the output kernel's online softmax merges the exact parts and the segments' splits.

    1. per segment, :func:`_xkv_scores_kernel`: rebuilt keys scored into the segment's columns of ``S``, and
       each tile's softmax statistics (max, sum) into 32-token slots of a small float32 buffer;
    2. per segment, :func:`_xkv_latent_pv_kernel`: per split of whole kernel-1 tiles, ``(m, l)`` from the
       statistics and the partial ``exp(s - m) . U_v``;
    3. per segment, :func:`_xkv_output_kernel`, grid ``(H, dv / BLOCK_DV, B)``: the exact parts (first
       launch) and the segment's splits merged by their maxima, the latent projected by ``B_v`` (in
       registers, no float copy of ``B_v``), written normalised in the query's dtype by the last launch.
    """
    batch, q_heads, _, head_dim = query.shape
    groups = q_heads // kv_heads
    wide = query.dtype == torch.float32
    precision = "ieee" if wide else "tf32"  # bf16 scores are then as precise as bf16 keys, or better
    device = query.device
    # token offsets (for ``valid``) of every part
    exact, segments, offset = [], [], 0
    for part in parts:
        if part.length:
            (exact if isinstance(part, ExactPart) else segments).append((part, offset))
        offset += part.length
    if len(exact) > 2:  # the kernels take two exact parts (sinks, tail); more is unusual: join all but the first
        rest = [p for p, _ in exact[1:]]
        joined = ExactPart(torch.cat([p.keys for p in rest], dim=-2), torch.cat([p.values for p in rest], dim=-2))
        order = [exact[0], *exact[1:], *segments]  # softmax ignores token order: permute valid to match
        if valid is not None:
            valid = torch.cat([valid[:, o:o + p.length] for p, o in order], dim=-1)
        return _fused_triton(query, [exact[0][0], joined, *[p for p, _ in segments]], scaling, valid, kv_heads,
                             value_dim, total)
    has_valid = valid is not None
    valid_arg = valid if has_valid else query  # never read without HAS_VALID
    stride_vb, stride_vt = (valid.stride(0), valid.stride(1)) if has_valid else (0, 0)
    sq = query.stride()
    block_g = _pow2(groups)
    if _autotune():
        kernel, tuning = _xkv_scores_kernel_tuned, {}
    else:
        kernel = _xkv_scores_kernel
        tuning = _SCORES_FIXED or dict(BLOCK_T=32 if wide else 64, BLOCK_R=32 if wide else 64,
                                       num_warps=4 if wide else 8)
    # The plan: kernel 2's splits per segment. A split's (max, sum) comes from kernel 1's statistics, which
    # are per token tile of kernel 1 (in the tile's first slot): splits must hold whole tiles of it, of any
    # size the autotuner may pick.
    block_r, block_tv = 64 if wide else 128, 32 if wide else 64
    step = max(1, (_MAX_SCORES_BLOCK_T if not tuning else tuning["BLOCK_T"]) // block_tv)
    plans = []
    for part, _ in segments:
        tokens, rank_v = part.value_factor.shape[1], part.value_factor.shape[2]
        r_chunks = triton.cdiv(rank_v, block_r)
        tiles = triton.cdiv(tokens, block_tv)
        splits = max(1, min(tiles, _PV_MAX_SPLITS, math.ceil(2 * sm_count(device) / (r_chunks * batch))))
        tiles_per_split = triton.cdiv(triton.cdiv(tiles, splits), step) * step
        # a partials row: the r_v sums, then (max, sum); rows padded to 16 floats (64-byte aligned)
        plans.append((r_chunks, triton.cdiv(tiles, tiles_per_split), tiles_per_split,
                      triton.cdiv(rank_v + 2, 16) * 16))
    # DV chunks multiply kernel 3's programs (batch 1: H programs would leave most SMs idle); each chunk
    # re-reads its heads' partials and exact keys, so the chunks stay at least _OUT_BLOCK_DV columns wide
    block_dv = min(value_dim, _OUT_BLOCK_DV)
    chunks = value_dim // block_dv
    # All float32 scratch in one allocation, regions 128-byte aligned: S [B, Hq, segment tokens], the
    # statistics [2, B, Hq, slots] (max, sum), per segment the partials [B, splits, Hq, row], and with
    # several segments kernel 3's state between launches [B, Hq, dv + 2 * chunks] (acc, then (max, sum)
    # per chunk).
    seg_tokens = sum(p.length for p, _ in segments)
    slots = [triton.cdiv(p.length, _STAT_T) for p, _ in segments]
    width = value_dim + 2 * chunks
    sizes = [batch * q_heads * seg_tokens, 2 * batch * q_heads * sum(slots),
             *[batch * splits * q_heads * row for _, splits, _, row in plans],
             batch * q_heads * width if len(segments) > 1 else 0]
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + triton.cdiv(size, 32) * 32)
    s_off, x_off, *p_offs, a_off, _ = offsets
    out = torch.empty(batch, 1, q_heads, value_dim, device=device, dtype=query.dtype)
    scratch = out  # placeholder (never read): exact parts alone need no scratch
    if segments:
        scratch = torch.empty(offsets[-1], device=device, dtype=torch.float32)
    if _POISON_BUFFERS:
        out.fill_(float("nan"))
        scratch.fill_(float("nan"))
    s_strides = (q_heads * seg_tokens, seg_tokens, 1)
    x_strides = (batch * q_heads * sum(slots), q_heads * sum(slots), sum(slots), 1)
    # 1. factored keys' scores and tile statistics
    col, slot0 = 0, 0
    columns = []
    for (part, token0), seg_slots in zip(segments, slots):
        tokens, rank_k = part.key_factor.shape[1], part.key_factor.shape[2]
        has_rope = part.cos is not None
        cos = part.cos if has_rope else scratch  # any tensor: never read when HAS_ROPE is False
        sin = part.sin if has_rope else scratch
        kf, kr = part.key_factor, part.key_right
        _launch(
            kernel, lambda meta, _t=tokens: (kv_heads, triton.cdiv(_t, meta["BLOCK_T"]), batch),
            query, kf, kr, cos, sin, valid_arg, scratch, scratch,
            tokens, rank_k, groups, col, token0, slot0, seg_slots, s_off, x_off,
            sq[0], sq[1], sq[3],
            kf.stride(0), kf.stride(1), kf.stride(2),
            kr.stride(0), kr.stride(1), kr.stride(2),
            cos.stride(0), cos.stride(1) if has_rope else 0,
            stride_vb, stride_vt,
            *s_strides, *x_strides,
            float(scaling),
            HALF=head_dim // 2, BLOCK_G=block_g, STAT_T=_STAT_T,
            HAS_ROPE=has_rope, HAS_VALID=has_valid, PRECISION=precision, **tuning,
        )
        columns.append((col, slot0))
        col += tokens
        slot0 += seg_slots
    # 2. per segment, split-K partials of exp(s - split max) . U_v with each split's (max, sum)
    p_strides = []
    for (part, _), (col0, seg_slot0), (r_chunks, splits, tiles_per_split, row), p_off in zip(
            segments, columns, plans, p_offs):
        tokens, rank_v = part.value_factor.shape[1], part.value_factor.shape[2]
        p_strides.append((splits * q_heads * row, q_heads * row, row, 1))
        vf = part.value_factor
        _launch(
            _xkv_latent_pv_kernel, (r_chunks, splits, batch),
            scratch, scratch, vf, scratch,
            tokens, rank_v, q_heads, tiles_per_split, col0, seg_slot0, s_off, x_off, p_off,
            *s_strides, *x_strides,
            vf.stride(0), vf.stride(1), vf.stride(2),
            *p_strides[-1],
            BLOCK_HQ=_pow2(q_heads), BLOCK_T=block_tv, BLOCK_R=block_r,
            # 32 slots a step: 128 made ptxas spill (sm_90, bf16); the interpreter's 2 make the tests' splits
            # take several steps
            BLOCK_SL=min(32, _pow2(tiles_per_split * block_tv // _STAT_T)) if device.type == "cuda" else 2,
            STAT_T=_STAT_T, PRECISION=precision, num_warps=4,
        )
    # 3. per segment (the exact parts with the first): merge, project, write
    (e1, off1), (e2, off2) = (exact + [(None, 0), (None, 0)])[:2]
    k1, v1 = (e1.keys, e1.values) if e1 is not None else (query, query)
    k2, v2 = (e2.keys, e2.values) if e2 is not None else (query, query)
    n1 = e1.length if e1 is not None else 0
    n2 = e2.length if e2 is not None else 0
    steps = list(zip(segments, plans, p_offs, p_strides)) or [(None, None, 0, (0, 0, 0, 0))]
    for i, (seg, plan, p_off, sp) in enumerate(steps):
        if seg is not None:
            seg = seg[0]
            rank_v, splits = seg.value_factor.shape[2], plan[1]
            bv, sb = seg.value_right, seg.value_right.stride()
        else:
            rank_v, splits, bv, sb = 0, 0, scratch, (0, 0, 0)
        last = i == len(steps) - 1
        _launch(
            _xkv_output_kernel, (kv_heads, chunks, batch),
            query, k1, v1, k2, v2, valid_arg, scratch, bv, scratch, out,
            rank_v, groups, n1, n2, splits, off1, off2, p_off, a_off,
            sq[0], sq[1], sq[3],
            *k1.stride(), *v1.stride(), *k2.stride(), *v2.stride(),
            stride_vb, stride_vt,
            *sp,
            sb[0], sb[1], sb[2],
            q_heads * width, width, 1,
            out.stride(0), out.stride(2), out.stride(3),
            float(scaling),
            D=head_dim, DV=value_dim, BLOCK_DV=block_dv, BLOCK_G=block_g, BLOCK_R=32 if wide else 64,
            BLOCK_SP=2 if splits < 4 else 4, BLOCK_E=32,
            HAS_SEG=seg is not None, HAS_EXACT=i == 0 and bool(exact), HAS_VALID=has_valid, ACC_IN=i > 0,
            ACC_OUT=not last, PRECISION=precision, num_warps=4,
        )
    return out


# -- the custom op (torch.compile / CUDA graphs) ----------------------------------------------------
# A list of dataclass parts cannot cross an op boundary, so the op takes the layer flattened in a fixed
# order: the sinks, the segments' factors (and RoPE tables) in order, the tail. Missing exact parts are
# empty [B, H, 0, d] tensors (zero-length parts are skipped by both paths); an empty cos/sin list means no
# segment has a RoPE table, and an empty (0-element) table stands for one segment without RoPE.
#
# torch.library.custom_op, not triton_op + wrap_triton (as mla_decode.py): the op is fully opaque, so
# dynamo never traces its host code (the part walk, the split-K plan, sm_count, the launch counter of the
# tests), inductor calls it as an extern kernel, and a CUDA-graph tree captures the launches it makes.
# The scores kernel is a triton.autotune kernel with a grid lambda and the output kernel runs once per
# segment with flags that differ per launch: through wrap_triton inductor would have to re-implement that
# autotuning and launch plan in its generated code, for no gain (nothing around these kernels is fusable,
# and under CUDA graphs the extern call's host overhead is not replayed). Autotuning and the first JIT
# compile happen in the tree's eager warm-up run, before capture; the host code depends on shapes, dtypes
# and the device only (no .item(), no syncs), so capture and replay are exact for new values.
_OP_SCHEMA = (
    "(Tensor query, Tensor sink_keys, Tensor sink_values, Tensor tail_keys, Tensor tail_values, "
    "Tensor[] key_factors, Tensor[] key_rights, Tensor[] value_factors, Tensor[] value_rights, "
    "Tensor[] cos, Tensor[] sin, float scaling, Tensor? valid, bool? use_triton) -> Tensor"
)


def _flat_args(query: torch.Tensor, parts: Sequence[Part], valid: torch.Tensor | None, kv_heads: int,
               value_dim: int) -> tuple:
    """``parts`` as the op's arguments after ``query``: ``(sink_keys, sink_values, tail_keys, tail_values,
    key_factors, key_rights, value_factors, value_rights, cos, sin, valid)``. The first part is the sinks
    when exact; every later exact part goes to the tail (joined if several). When an exact part lies
    between segments, ``valid`` is permuted to the op's token order (softmax ignores token order)."""
    batch, _, _, head_dim = query.shape
    indexed, offset = [], 0
    for i, part in enumerate(parts):
        indexed.append((i, part, offset))
        offset += part.length
    sinks = indexed[0] if isinstance(parts[0], ExactPart) else None
    rest = indexed[1:] if sinks is not None else indexed
    segments = [item for item in rest if isinstance(item[1], FactoredPart)]
    tails = [item for item in rest if isinstance(item[1], ExactPart)]
    order = ([sinks] if sinks is not None else []) + segments + tails
    if valid is not None and [i for i, _, _ in order] != list(range(len(parts))):
        valid = torch.cat([valid[:, o:o + p.length] for _, p, o in order], dim=-1)
    if sinks is not None:
        sink_keys, sink_values = sinks[1].keys, sinks[1].values
    else:
        sink_keys = query.new_empty(batch, kv_heads, 0, head_dim)
        sink_values = query.new_empty(batch, kv_heads, 0, value_dim)
    if len(tails) == 1:
        tail_keys, tail_values = tails[0][1].keys, tails[0][1].values
    elif tails:
        tail_keys = torch.cat([p.keys for _, p, _ in tails], dim=-2)
        tail_values = torch.cat([p.values for _, p, _ in tails], dim=-2)
    else:
        tail_keys = query.new_empty(batch, kv_heads, 0, head_dim)
        tail_values = query.new_empty(batch, kv_heads, 0, value_dim)
    segs = [p for _, p, _ in segments]
    cos, sin = [], []
    if any(p.cos is not None for p in segs):
        none = None if all(p.cos is not None for p in segs) else query.new_empty(0, 0, dtype=torch.float32)
        cos = [p.cos if p.cos is not None else none for p in segs]
        sin = [p.sin if p.sin is not None else none for p in segs]
    return (sink_keys, sink_values, tail_keys, tail_values, [p.key_factor for p in segs],
            [p.key_right for p in segs], [p.value_factor for p in segs], [p.value_right for p in segs],
            cos, sin, valid)


def _op_impl(query: torch.Tensor, sink_keys: torch.Tensor, sink_values: torch.Tensor, tail_keys: torch.Tensor,
             tail_values: torch.Tensor, key_factors: list[torch.Tensor], key_rights: list[torch.Tensor],
             value_factors: list[torch.Tensor], value_rights: list[torch.Tensor], cos: list[torch.Tensor],
             sin: list[torch.Tensor], scaling: float, valid: torch.Tensor | None,
             use_triton: bool | None) -> torch.Tensor:
    """The op's kernel: the parts rebuilt, then the eager path (the kernels or the reference)."""
    tables = list(zip(cos, sin)) if cos else [(None, None)] * len(key_factors)
    segments = [FactoredPart(kf, kr, vf, vr, c if c is not None and c.numel() else None,
                             s if s is not None and s.numel() else None)
                for kf, kr, vf, vr, (c, s) in zip(key_factors, key_rights, value_factors, value_rights, tables)]
    parts = [ExactPart(sink_keys, sink_values), *segments, ExactPart(tail_keys, tail_values)]
    kv_heads, value_dim, total = _check(query, parts, valid)
    if use_triton and not _HAVE_TRITON:
        raise RuntimeError("use_triton=True but Triton is not importable; pass use_triton=None or False")
    if total == 0:
        raise ValueError("parts hold no tokens")
    return _run(query, parts, scaling, valid, use_triton, kv_heads, value_dim, total)


def _op_fake(query: torch.Tensor, sink_keys: torch.Tensor, sink_values: torch.Tensor, *args) -> torch.Tensor:
    """Metadata only (FakeTensor tracing): ``[B, 1, Hq, dv]`` in the query's dtype, contiguous, as both
    paths return it."""
    return query.new_empty(query.shape[0], 1, query.shape[1], sink_values.shape[-1])


_OP = None
if hasattr(torch.library, "custom_op"):
    try:
        _op_def = torch.library.custom_op("kvcompress::xkv_decode_attention", _op_impl, mutates_args=(),
                                          schema=_OP_SCHEMA)
        _op_def.register_fake(_op_fake)
        _OP = torch.ops.kvcompress.xkv_decode_attention
    except Exception:  # registered already (a module reload), or a torch whose custom_op cannot take it
        try:
            _OP = torch.ops.kvcompress.xkv_decode_attention
        except (AttributeError, RuntimeError):
            _OP = None  # eager calls only; torch.compile traces the Python path


def _run(query: torch.Tensor, parts: Sequence[Part], scaling: float, valid: torch.Tensor | None,
         use_triton: bool | None, kv_heads: int, value_dim: int, total: int) -> torch.Tensor:
    """The eager path of validated inputs: the kernels, or the reference (per-part ``(o, lse)`` merge)."""
    if use_triton is None:
        use_triton = _HAVE_TRITON and triton_usable(query)
    if use_triton and _kernel_supported(query, parts, value_dim):
        return _fused_triton(query, parts, scaling, valid, kv_heads, value_dim, total)
    # Reference path (CPU, or shapes the kernels do not cover): softmax ignores token order, so the exact
    # parts (sinks, tail) become one, one small attention instead of one per part.
    pieces = [(p, v) for p, v in zip(parts, _split_valid(valid, parts)) if p.length]
    exact = [(p, v) for p, v in pieces if isinstance(p, ExactPart)]
    if len(exact) > 1:
        joined = ExactPart(torch.cat([p.keys for p, _ in exact], dim=-2), torch.cat([p.values for p, _ in exact], dim=-2))
        pieces = [(p, v) for p, v in pieces if not isinstance(p, ExactPart)]
        pieces.append((joined, None if valid is None else torch.cat([v for _, v in exact], dim=-1)))
    partials = [part_attention_reference(query, part, scaling, part_valid) for part, part_valid in pieces]
    return merge_partials(partials).to(query.dtype)[:, None]


def xkv_decode_attention(query: torch.Tensor, parts: Sequence[Part], scaling: float,
                         valid: torch.Tensor | None = None, use_triton: bool | None = None) -> torch.Tensor:
    """Decode attention of one layer over exact and factored parts, never building full keys/values.

    Args:
        query: ``[B, Hq, 1, d]``, post-RoPE (as the attention module hands it to attention functions).
        parts: the layer's tokens in order: :class:`ExactPart` (sinks, tail) and :class:`FactoredPart`
            (compressed segments), all with the query's dtype and device.
        scaling: the softmax scale ``c`` (``s = c * q.k``), usually ``d ** -0.5``.
        valid: optional bool ``[B, sum of part lengths]``, True = attend (left padding masks the first
            tokens of a row); see :func:`valid_mask_from_attention_mask`.
        use_triton: ``None`` (default) picks the kernels when :func:`kvcompress.kernels.triton_usable` says
            so; ``True`` forces them (error if Triton is missing), ``False`` forces the reference.

    Returns:
        ``[B, 1, Hq, dv]`` in the query's dtype (the layout transformers' attention functions return):
        ``softmax_t(c q.k_t) v_t`` over all valid tokens. With the kernels, the exact sinks and tail (read
        where they are) and the segments' split-K partials are merged by one online softmax in the output
        kernel (:func:`_fused_triton`: ``3 * segments`` launches, no torch maths); shapes the kernels do
        not cover, and the reference, merge per-part ``(o, lse)`` as in the module docstring.

    Inside ``torch.compile`` the call goes through the custom op ``torch.ops.kvcompress.xkv_decode_attention``
    (``torch.library.custom_op``, flat arguments; the same paths inside), so a compiled caller keeps it in
    its graph (``fullgraph=True``, ``mode="reduce-overhead"``); eager calls skip the dispatcher.
    """
    kv_heads, value_dim, total = _check(query, parts, valid)
    if use_triton and not _HAVE_TRITON:
        raise RuntimeError("use_triton=True but Triton is not importable; pass use_triton=None or False")
    if total == 0:
        raise ValueError("parts hold no tokens")
    if _OP is not None and torch.compiler.is_compiling():
        # the choice between kernels and reference (environment, lru_cache'd probes) is made in the op
        *flat, valid = _flat_args(query, parts, valid, kv_heads, value_dim)
        return _OP(query, *flat, float(scaling), valid, use_triton)
    return _run(query, parts, scaling, valid, use_triton, kv_heads, value_dim, total)
