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
With the kernels, all parts of a layer share one float32 score buffer ``S [B, Hq, T]`` (exact parts in
the first columns, then the segments) whose log-sum-exp is taken once: each part's softmax is then already
normalised over the whole sequence, so the parts' outputs simply add up (no ``(o, lse)`` merge), and the
sinks and tail are read where they lie (no concatenation). Per layer and step: ``3 * segments + 1``
launches and ``2 * segments + 3`` torch ops (allocations and the split-K sum): 4 launches and 5 ops for
sinks + one segment + tail, against 2 launches and 87 torch ops (39 of them views) before
(``tests/test_kernels_xkv.py`` bounds the count).

1. ``_xkv_scores_kernel``, grid ``(H, token tiles, B)``, per segment: a program rebuilds one
   ``[BLOCK_T, d]`` key tile of one KV head in registers (``U_k[tile] @ B_k[:, h]`` as two half-width
   ``tl.dot`` over ``r_k`` chunks, so the rotate-half RoPE needs no shuffle), rotates it with the segment's
   cos/sin, and scores it against the ``G`` query heads of that KV head. It writes only float32 scores:
   ``Hq`` floats per token, against ``2*H*d`` elements of rebuilt keys and values. Heads are the fastest
   grid axis, so the ``H`` programs of one tile run together: ``U_k[tile]`` comes from HBM once, then from
   L2. On CUDA the tile sizes are autotuned once per (rank, group, head dim, RoPE, dtype), up to 256-token
   tiles that load ``B_k[:, h]`` once per 256 tokens. The token grid splits the sequence across the whole
   GPU at batch 1 (flash-decoding's purpose).
2. ``_xkv_exact_lse_kernel``, grid ``(Hq, B)``: the exact parts' (sinks, tail) scores in float32, then
   the softmax shift of each row: its log-sum-exp over every column (0 for an all-masked row).
3. ``_xkv_latent_pv_kernel``, grid ``(r_v chunks, sequence splits, B)``, per segment: ``U_v`` is shared by
   all heads, so ``P U_v`` is a ``[Hq, T] x [T, r_v]`` product for all query heads at once, split over the
   sequence (split-K) with float32 partials, summed by one reduction. A per-KV-head online-softmax kernel
   would re-read ``U_v`` ``H`` times and hold a ``G x r_v`` accumulator (``r_v`` = 768 at the defaults on
   Llama-3-8B), which is why softmax statistics come from the stored scores instead (one cheap extra pass
   over ``Hq*T`` floats).
4. ``_xkv_output_kernel``, grid ``(H, B)``, per segment: the latent projected by ``B_v[:, h]`` (read in its
   dtype, accumulated in float32: no float copy of ``B_v``), plus the exact parts' ``softmax . V`` (first
   segment); the last segment writes the output in the query's dtype (a float32 accumulator in between).

Floors per layer and step (one segment of ``T`` tokens): bytes ``B*T*(r_k + r_v)*e`` for the factors
plus ``B*(r_k + r_v)*H*d*e`` for the right factors; flops ``2*B*T*r_k*H*d`` for the key rebuild (the
dominant term; the value side is ``2*B*T*Hq*r_v``). ``benchmarks/xkv_decode.py`` measures both ceilings.

Selective reconstruction (:class:`SelectedPart`, chosen by :mod:`kvcompress.kernels.xkv_select`): a segment
of which each KV head attends only the tokens ``index[b, h]``. Kernel 1 then gathers those factor rows and
RoPE rows (``HAS_INDEX``) and scores them into one column each, kernel 3 is ``_xkv_select_pv_kernel``, grid
``(r_v chunks, splits, B*H)``: the heads no longer share the rows of ``U_v``, so each KV head's ``G`` query
heads gather their own; kernels 2 and 4 are unchanged (they read only ``S`` and the latent).

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

import functools
import math
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import kernel_options, next_pow2 as _pow2, sm_count, triton_usable

try:  # Triton is optional: without it (CPU-only installs) the reference is the only path
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except Exception:  # ImportError, or a broken install without a GPU toolchain
    _HAVE_TRITON = False
try:  # host-side TMA descriptors (Triton >= 3.3): kernel 1's TMA path (see _tma_usable)
    from triton.tools.tensor_descriptor import TensorDescriptor
except Exception:
    TensorDescriptor = None


__all__ = ["ExactPart", "FactoredPart", "SelectedPart", "xkv_decode_attention", "xkv_decode_attention_reference",
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
    ``value_right [B, r_v, H*dv]``; ``cos``/``sin`` ``[T, rotary_dim]``, the rotate-half table of the
    segment's slots (both halves equal, as :func:`kvcompress.ops.rope_cos_sin` builds them), or ``None``
    when the keys are stored rotated (``pre_rope=False``). The table is float32, or float16 for 16-bit
    factors (``XKVCache`` passes float16 there: the kernel's table reads halve, at 5e-4 relative error,
    finer than the bfloat16 rotation of stock attention); both paths rotate in float32.
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


@dataclass
class SelectedPart:
    """A compressed segment of which each KV head attends only some tokens (selective reconstruction,
    :func:`kvcompress.kernels.xkv_select.select_chunks`): ``segment``'s tokens ``index [B, H, n]`` (int64,
    segment-relative), attended where ``index_valid [B, H, n]`` (bool) is True.

    Attention rebuilds exactly those tokens (``k = R(p_i) (U_k B_k)[i, h]``, ``v = (U_v B_v)[i, h]``) and
    takes them in one softmax with the layer's other parts. ``length`` is the segment's (the columns of the
    call's ``valid`` mask it spans, as for the :class:`FactoredPart`); those columns are not read:
    ``index_valid`` already holds the mask of the selected tokens."""

    segment: FactoredPart
    index: torch.Tensor
    index_valid: torch.Tensor

    @property
    def length(self) -> int:
        return self.segment.length

    @property
    def selected(self) -> int:
        """Tokens attended per KV head (``n``, masked ones included)."""
        return self.index.shape[-1]


Part = ExactPart | FactoredPart | SelectedPart


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
        elif isinstance(part, (FactoredPart, SelectedPart)):
            selected = isinstance(part, SelectedPart)
            if selected:
                if not isinstance(part.segment, FactoredPart):
                    raise TypeError(f"parts[{i}].segment must be a FactoredPart, got {type(part.segment).__name__}")
                index, index_valid, part = part.index, part.index_valid, part.segment
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
            if selected and (not isinstance(index, torch.Tensor) or index.dtype != torch.int64 or index.dim() != 3
                             or tuple(index.shape[:2]) != (batch, h) or index.device != query.device
                             or not isinstance(index_valid, torch.Tensor) or index_valid.dtype != torch.bool
                             or index_valid.shape != index.shape or index_valid.device != query.device):
                raise ValueError(f"parts[{i}] (SelectedPart): index must be int64 [batch={batch}, kv_heads={h}, n] "
                                 "and index_valid bool of the same shape, on the query's device")
        else:
            raise TypeError(f"parts[{i}] must be an ExactPart, FactoredPart or SelectedPart, got {type(part).__name__}")
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


def _selected_attention_reference(query: torch.Tensor, part: SelectedPart,
                                  scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`part_attention_reference` of a :class:`SelectedPart`: the selected rows of each KV head rebuilt
    (keys rotated at their own slots), then masked softmax attention over them."""
    work = _work_dtype(query.dtype)
    batch, q_heads, _, head_dim = query.shape
    seg, index = part.segment, part.index
    kv_heads, n = index.shape[1], index.shape[2]

    def rows(factor: torch.Tensor) -> torch.Tensor:  # [B, T, r] -> [B, H, n, r]
        r = factor.shape[-1]
        return factor.to(work).gather(1, index.reshape(batch, -1, 1).expand(-1, -1, r)).view(batch, kv_heads, n, r)

    def per_head(right: torch.Tensor) -> torch.Tensor:  # [B, r, H*d] -> [B, H, r, d]
        return right.to(work).view(batch, right.shape[1], kv_heads, -1).permute(0, 2, 1, 3)

    keys = torch.matmul(rows(seg.key_factor), per_head(seg.key_right))  # [B, H, n, d], pre-RoPE
    if seg.cos is not None:
        rotary_dim, half = seg.cos.shape[-1], seg.cos.shape[-1] // 2
        cos, sin = seg.cos.to(work)[index], seg.sin.to(work)[index]  # [B, H, n, rotary_dim]
        x1, x2 = keys[..., :half], keys[..., half:rotary_dim]
        rotated = torch.cat((x1 * cos[..., :half] - x2 * sin[..., :half], x2 * cos[..., half:] + x1 * sin[..., half:]), -1)
        keys = torch.cat((rotated, keys[..., rotary_dim:]), dim=-1)
    values = torch.matmul(rows(seg.value_factor), per_head(seg.value_right))  # [B, H, n, dv]
    groups = q_heads // kv_heads
    q = query[:, :, 0, :].to(work).view(batch, kv_heads, groups, head_dim)
    scores = torch.matmul(q, keys.transpose(-1, -2)) * scaling  # [B, H, G, n]
    scores = scores.masked_fill(~part.index_valid[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    out = torch.matmul(torch.exp(scores - safe[..., None]), values)  # [B, H, G, dv]
    return out.reshape(batch, q_heads, -1), lse.reshape(batch, q_heads)


def part_attention_reference(query: torch.Tensor, part: Part, scaling: float,
                             valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One part's normalised output ``o [B, Hq, dv]`` and log-sum-exp ``lse [B, Hq]`` (float32, float64
    for float64 inputs); ``valid [B, T_part]`` masks tokens (a :class:`SelectedPart` reads its own
    ``index_valid`` instead). See the module docstring for the maths."""
    if isinstance(part, SelectedPart):
        return _selected_attention_reference(query, part, scaling)
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
        Q, UK, BK, COS, SIN, VALID, S, INDEX, IVALID,
        T, R, G, col0, valid_off,
        stride_qb, stride_qh, stride_qd,
        stride_ub, stride_ut, stride_ur,
        stride_bb, stride_br, stride_bc,
        stride_ct, stride_cd,
        stride_vb, stride_vt,
        stride_sb, stride_sh, stride_st,
        stride_ib, stride_ih, stride_it,
        scale,
        HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr,
        HAS_ROPE: tl.constexpr, HAS_VALID: tl.constexpr, PRECISION: tl.constexpr,
        KEYS_IN_QUERY_DTYPE: tl.constexpr, USE_TMA: tl.constexpr, HAS_INDEX: tl.constexpr = False,
    ):
        """Grid ``(H, tiles, B)``: one tile of a segment's keys of KV head ``h`` rebuilt and scored into
        columns ``col0..`` of ``S``. ``HAS_INDEX`` (a :class:`SelectedPart`): tile position ``j`` is the
        segment's token ``INDEX[b, h, j]`` (rows gathered, rotated at their own slots), ``T`` the selected
        count and ``IVALID[b, h, j]`` its mask (``VALID`` is not read)."""
        h = tl.program_id(0)
        tile = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
        t_ok = offs_t < T
        if HAS_INDEX:
            index_ptr = b * stride_ib + h * stride_ih + offs_t * stride_it
            rows = tl.load(INDEX + index_ptr, mask=t_ok, other=0)
        else:
            rows = offs_t
        offs_d = tl.arange(0, HALF)
        col = h * 2 * HALF + offs_d  # first half of head h's columns in B_k
        k1 = tl.zeros([BLOCK_T, HALF], dtype=tl.float32)
        k2 = tl.zeros([BLOCK_T, HALF], dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            if USE_TMA:
                # UK/BK are tensor descriptors of [B, T, r_k] / [B, r_k, H*d] (blocks [1, BLOCK_T, BLOCK_R] /
                # [1, BLOCK_R, HALF]); out-of-range rows and ranks load as zeros
                bi = tl.program_id(2)
                u = UK.load([bi, tile * BLOCK_T, r0]).reshape(BLOCK_T, BLOCK_R)
                b1 = BK.load([bi, r0, h * 2 * HALF]).reshape(BLOCK_R, HALF)
                b2 = BK.load([bi, r0, h * 2 * HALF + HALF]).reshape(BLOCK_R, HALF)
            else:
                offs_r = r0 + tl.arange(0, BLOCK_R)
                r_ok = offs_r < R
                u = tl.load(UK + b * stride_ub + rows[:, None] * stride_ut + offs_r[None, :] * stride_ur,
                            mask=t_ok[:, None] & r_ok[None, :], other=0.0)
                b_rows = BK + b * stride_bb + offs_r[:, None] * stride_br
                b1 = tl.load(b_rows + col[None, :] * stride_bc, mask=r_ok[:, None], other=0.0)
                b2 = tl.load(b_rows + (col + HALF)[None, :] * stride_bc, mask=r_ok[:, None], other=0.0)
            k1 += tl.dot(u, b1, input_precision=PRECISION)
            k2 += tl.dot(u, b2, input_precision=PRECISION)
        if HAS_ROPE:
            # rotate-half: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin); both halves of the table are equal,
            # so only the first is read (a float16 table halves these reads again)
            c = tl.load(COS + rows[:, None] * stride_ct + offs_d[None, :] * stride_cd, mask=t_ok[:, None],
                        other=0.0).to(tl.float32)
            s = tl.load(SIN + rows[:, None] * stride_ct + offs_d[None, :] * stride_cd, mask=t_ok[:, None],
                        other=0.0).to(tl.float32)
            r1 = k1 * c - k2 * s
            r2 = k2 * c + k1 * s
        else:
            r1 = k1
            r2 = k2
        offs_g = tl.arange(0, BLOCK_G)
        g_ok = offs_g < G
        heads = h * G + offs_g
        q_ptr = Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd
        q1 = tl.load(q_ptr, mask=g_ok[:, None], other=0.0)
        q2 = tl.load(q_ptr + HALF * stride_qd, mask=g_ok[:, None], other=0.0)
        if KEYS_IN_QUERY_DTYPE:
            # half-precision inputs: the rotated keys are rounded to the query's dtype, as stock attention
            # holds them, and scored by a 16-bit dot with float32 accumulation; a float32 dot here would move
            # float32 keys through shared memory at twice the bytes
            scores = tl.dot(q1, tl.trans(r1.to(q1.dtype)))
            scores += tl.dot(q2, tl.trans(r2.to(q2.dtype)))
        else:
            scores = tl.dot(q1.to(tl.float32), tl.trans(r1), input_precision=PRECISION)
            scores += tl.dot(q2.to(tl.float32), tl.trans(r2), input_precision=PRECISION)
        scores = scores * scale
        keep = t_ok
        if HAS_INDEX:
            keep = keep & (tl.load(IVALID + index_ptr, mask=t_ok, other=0) != 0)
        elif HAS_VALID:
            keep = keep & (tl.load(VALID + b * stride_vb + (valid_off + offs_t) * stride_vt, mask=t_ok, other=0) != 0)
        scores = tl.where(keep[None, :], scores, float("-inf"))
        tl.store(S + b * stride_sb + heads[:, None] * stride_sh + (col0 + offs_t)[None, :] * stride_st, scores,
                 mask=g_ok[:, None] & t_ok[None, :])

    @triton.jit
    def _online_update(m, l, s):
        """Online log-sum-exp statistics (max ``m``, sum ``l`` relative to it) of a row updated by the
        block ``s``; a row that is still all ``-inf`` keeps ``m = -inf``, ``l = 0`` instead of NaN."""
        m_new = tl.maximum(m, tl.max(s, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp(m - m_safe) + tl.sum(tl.exp(s - m_safe), axis=0)
        return m_new, l

    @triton.jit
    def _exact_scores(q, m, l, K, N, VALID, S_ROW, b, h, col0, valid_off,
                      stride_kb, stride_kh, stride_kt, stride_kd, stride_vb, stride_vt, stride_st, scale,
                      D: tl.constexpr, BLOCK_E: tl.constexpr, HAS_VALID: tl.constexpr):
        """Scores of one exact part's ``N`` tokens (keys ``K[b, h]``) into columns ``col0..`` of one row of
        ``S`` (float32 products, as the reference)."""
        offs_d = tl.arange(0, D)
        for e0 in range(0, N, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            e_ok = offs_e < N
            k = tl.load(K + b * stride_kb + h * stride_kh + offs_e[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                        mask=e_ok[:, None], other=0.0).to(tl.float32)
            s = tl.sum(k * q[None, :], axis=1) * scale
            keep = e_ok
            if HAS_VALID:
                keep = keep & (tl.load(VALID + b * stride_vb + (valid_off + offs_e) * stride_vt, mask=e_ok, other=0) != 0)
            s = tl.where(keep, s, float("-inf"))
            tl.store(S_ROW + (col0 + offs_e) * stride_st, s, mask=e_ok)
            m, l = _online_update(m, l, s)
        return m, l

    @triton.jit
    def _xkv_exact_lse_kernel(
        Q, K1, K2, VALID, S, SHIFT,
        N1, N2, T_ALL, G, valid_off1, valid_off2,
        stride_qb, stride_qh, stride_qd,
        stride_k1b, stride_k1h, stride_k1t, stride_k1d,
        stride_k2b, stride_k2h, stride_k2t, stride_k2d,
        stride_vb, stride_vt,
        stride_sb, stride_sh, stride_st,
        stride_mb, stride_mh,
        scale,
        D: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr, HAS_VALID: tl.constexpr,
    ):
        """Grid ``(Hq, B)``: one query head's scores of the exact parts (columns ``[0, N1 + N2)`` of ``S``),
        then its softmax shift: the log-sum-exp over every column (0 for an all-masked row)."""
        j = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        h = j // G
        offs_d = tl.arange(0, D)
        q = tl.load(Q + b * stride_qb + j * stride_qh + offs_d * stride_qd).to(tl.float32)
        s_row = S + b * stride_sb + j * stride_sh
        m = tl.max(tl.full([BLOCK_E], float("-inf"), dtype=tl.float32), axis=0)
        l = tl.sum(tl.zeros([BLOCK_E], dtype=tl.float32), axis=0)
        m, l = _exact_scores(q, m, l, K1, N1, VALID, s_row, b, h, 0, valid_off1,
                             stride_k1b, stride_k1h, stride_k1t, stride_k1d, stride_vb, stride_vt, stride_st, scale,
                             D, BLOCK_E, HAS_VALID)
        m, l = _exact_scores(q, m, l, K2, N2, VALID, s_row, b, h, N1, valid_off2,
                             stride_k2b, stride_k2h, stride_k2t, stride_k2d, stride_vb, stride_vt, stride_st, scale,
                             D, BLOCK_E, HAS_VALID)
        for c0 in range(N1 + N2, T_ALL, BLOCK_S):  # the factored segments' columns (kernel 1 wrote them)
            offs_c = c0 + tl.arange(0, BLOCK_S)
            s = tl.load(s_row + offs_c * stride_st, mask=offs_c < T_ALL, other=float("-inf"))
            m, l = _online_update(m, l, s)
        shift = tl.where(l > 0, m + tl.log(l), 0.0)
        tl.store(SHIFT + b * stride_mb + j * stride_mh, shift)

    @triton.jit
    def _xkv_latent_pv_kernel(
        S, M, UV, OUT,
        T, RV, HQ, tiles_per_split, col0,
        stride_sb, stride_sh, stride_st,
        stride_mb, stride_mh,
        stride_ub, stride_ut, stride_ur,
        stride_ob, stride_os, stride_oh, stride_or,
        BLOCK_HQ: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
    ):
        rc = tl.program_id(0)
        split = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        offs_h = tl.arange(0, BLOCK_HQ)
        h_ok = offs_h < HQ
        offs_r = rc * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = offs_r < RV
        m = tl.load(M + b * stride_mb + offs_h * stride_mh, mask=h_ok, other=0.0)
        acc = tl.zeros([BLOCK_HQ, BLOCK_R], dtype=tl.float32)
        t_begin = split * tiles_per_split * BLOCK_T
        for i in range(0, tiles_per_split):
            offs_t = t_begin + i * BLOCK_T + tl.arange(0, BLOCK_T)
            t_ok = offs_t < T
            s = tl.load(S + b * stride_sb + offs_h[:, None] * stride_sh + (col0 + offs_t)[None, :] * stride_st,
                        mask=h_ok[:, None] & t_ok[None, :], other=float("-inf"))
            p = tl.exp(s - m[:, None])  # m = the row's lse over all parts: normalised; masked entries: 0
            u = tl.load(UV + b * stride_ub + offs_t[:, None] * stride_ut + offs_r[None, :] * stride_ur,
                        mask=t_ok[:, None] & r_ok[None, :], other=0.0)
            acc += tl.dot(p.to(u.dtype), u, input_precision=PRECISION)
        tl.store(OUT + b * stride_ob + split * stride_os + offs_h[:, None] * stride_oh + offs_r[None, :] * stride_or,
                 acc, mask=h_ok[:, None] & r_ok[None, :])

    @triton.jit
    def _xkv_select_pv_kernel(
        S, M, UV, INDEX, OUT,
        N, RV, H, G, tiles_per_split, col0,
        stride_sb, stride_sh, stride_st,
        stride_mb, stride_mh,
        stride_ub, stride_ut, stride_ur,
        stride_ib, stride_ih, stride_it,
        stride_ob, stride_os, stride_oh, stride_or,
        BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """Grid ``(r_v chunks, splits, B*H)``: a :class:`SelectedPart`'s split-K partial of ``softmax . U_v``
        for the ``G`` query heads of KV head ``h``, over its selected tokens: the rows of ``U_v`` are gathered
        by ``INDEX[b, h]`` (each KV head selects its own tokens, so ``U_v`` is no longer shared by all heads)."""
        rc = tl.program_id(0)
        split = tl.program_id(1)
        bh = tl.program_id(2)
        b = (bh // H).to(tl.int64)
        h = bh % H
        offs_g = tl.arange(0, BLOCK_G)
        g_ok = offs_g < G
        heads = h * G + offs_g
        offs_r = rc * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = offs_r < RV
        m = tl.load(M + b * stride_mb + heads * stride_mh, mask=g_ok, other=0.0)
        acc = tl.zeros([BLOCK_G, BLOCK_R], dtype=tl.float32)
        t_begin = split * tiles_per_split * BLOCK_T
        for i in range(0, tiles_per_split):
            offs_t = t_begin + i * BLOCK_T + tl.arange(0, BLOCK_T)
            t_ok = offs_t < N
            rows = tl.load(INDEX + b * stride_ib + h * stride_ih + offs_t * stride_it, mask=t_ok, other=0)
            s = tl.load(S + b * stride_sb + heads[:, None] * stride_sh + (col0 + offs_t)[None, :] * stride_st,
                        mask=g_ok[:, None] & t_ok[None, :], other=float("-inf"))
            p = tl.exp(s - m[:, None])  # masked (and padded) entries: 0
            u = tl.load(UV + b * stride_ub + rows[:, None] * stride_ut + offs_r[None, :] * stride_ur,
                        mask=t_ok[:, None] & r_ok[None, :], other=0.0)
            acc += tl.dot(p.to(u.dtype), u, input_precision=PRECISION)
        tl.store(OUT + b * stride_ob + split * stride_os + heads[:, None] * stride_oh + offs_r[None, :] * stride_or,
                 acc, mask=g_ok[:, None] & r_ok[None, :])

    @triton.jit
    def _exact_pv(acc, V, N, S, SHIFT_ROW, b, h, heads, g_ok, col0,
                  stride_vb, stride_vh, stride_vt, stride_vd, stride_sb, stride_sh, stride_st,
                  DV: tl.constexpr, BLOCK_E: tl.constexpr, PRECISION: tl.constexpr):
        offs_dv = tl.arange(0, DV)
        for e0 in range(0, N, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            e_ok = offs_e < N
            s = tl.load(S + b * stride_sb + heads[:, None] * stride_sh + (col0 + offs_e)[None, :] * stride_st,
                        mask=g_ok[:, None] & e_ok[None, :], other=float("-inf"))
            p = tl.exp(s - SHIFT_ROW[:, None])
            v = tl.load(V + b * stride_vb + h * stride_vh + offs_e[:, None] * stride_vt + offs_dv[None, :] * stride_vd,
                        mask=e_ok[:, None], other=0.0).to(tl.float32)
            acc += tl.dot(p, v, input_precision=PRECISION)
        return acc

    @triton.jit
    def _xkv_output_kernel(
        LATENT, BV, S, SHIFT, V1, V2, ACC, OUT,
        RV, G, N1, N2,
        stride_pb, stride_ph, stride_pr,
        stride_bb, stride_br, stride_bc,
        stride_sb, stride_sh, stride_st,
        stride_mb, stride_mh,
        stride_v1b, stride_v1h, stride_v1t, stride_v1d,
        stride_v2b, stride_v2h, stride_v2t, stride_v2d,
        stride_ab, stride_ah, stride_ad,
        stride_ob, stride_oh, stride_od,
        DV: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
        HAS_SEG: tl.constexpr, HAS_EXACT: tl.constexpr, ACC_IN: tl.constexpr, ACC_OUT: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """Grid ``(H, B)``: for the ``G`` query heads of KV head ``h``, project a segment's latent
        ``softmax . U_v`` by ``B_v[:, h]``; add the exact parts' ``softmax . V`` (once);
        add / write the float32 accumulator (several segments) or write the output in its dtype."""
        h = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        offs_g = tl.arange(0, BLOCK_G)
        g_ok = offs_g < G
        heads = h * G + offs_g
        offs_dv = tl.arange(0, DV)
        acc = tl.zeros([BLOCK_G, DV], dtype=tl.float32)
        if HAS_SEG:
            for r0 in range(0, RV, BLOCK_R):
                offs_r = r0 + tl.arange(0, BLOCK_R)
                r_ok = offs_r < RV
                latent = tl.load(LATENT + b * stride_pb + heads[:, None] * stride_ph + offs_r[None, :] * stride_pr,
                                 mask=g_ok[:, None] & r_ok[None, :], other=0.0)
                bv = tl.load(BV + b * stride_bb + offs_r[:, None] * stride_br + (h * DV + offs_dv)[None, :] * stride_bc,
                             mask=r_ok[:, None], other=0.0).to(tl.float32)
                acc += tl.dot(latent, bv, input_precision=PRECISION)
        if HAS_EXACT:
            shift = tl.load(SHIFT + b * stride_mb + heads * stride_mh, mask=g_ok, other=0.0)
            acc = _exact_pv(acc, V1, N1, S, shift, b, h, heads, g_ok, 0,
                            stride_v1b, stride_v1h, stride_v1t, stride_v1d, stride_sb, stride_sh, stride_st,
                            DV, BLOCK_E, PRECISION)
            acc = _exact_pv(acc, V2, N2, S, shift, b, h, heads, g_ok, N1,
                            stride_v2b, stride_v2h, stride_v2t, stride_v2d, stride_sb, stride_sh, stride_st,
                            DV, BLOCK_E, PRECISION)
        a_ptr = ACC + b * stride_ab + heads[:, None] * stride_ah + offs_dv[None, :] * stride_ad
        if ACC_IN:
            acc += tl.load(a_ptr, mask=g_ok[:, None], other=0.0)
        if ACC_OUT:
            tl.store(a_ptr, acc, mask=g_ok[:, None])
        else:
            o_ptr = OUT + b * stride_ob + heads[:, None] * stride_oh + offs_dv[None, :] * stride_od
            tl.store(o_ptr, acc.to(OUT.dtype.element_ty), mask=g_ok[:, None])

    # Kernel 1 does almost all the flops (the key rebuild); its best tile depends on the GPU, so on CUDA it
    # is autotuned once per (rank, group, head dim, RoPE, dtype). Configs that do not fit are skipped by
    # the autotuner. KVCOMPRESS_XKV_AUTOTUNE=0 uses the fixed default instead (and the interpreter always does).
    # With 16-bit scores and float16 RoPE tables, 128-token tiles with 4 warps were the fastest
    # at every measured shape (batch 1-8, 4K-32K, H200) and 256-token tiles 5-30% slower; a longer list
    # only let the autotuner's noisy timing pick a slower tile (705 against 648 us at batch 8 x 32K).
    # Larger token tiles load the per-head B_k (r_k x d, 128 KB in bf16 at the defaults) once per more
    # tokens; the 32/64-token ones are for float32 inputs, whose tiles take twice the registers.
    def _set_tma_blocks(nargs: dict) -> None:
        """Autotuner pre-hook: the tensor descriptors' block shapes follow the config being run."""
        if nargs.get("USE_TMA"):
            nargs["UK"].block_shape = [1, nargs["BLOCK_T"], nargs["BLOCK_R"]]
            nargs["BK"].block_shape = [1, nargs["BLOCK_R"], nargs["HALF"]]

    _SCORES_CONFIGS = [
        triton.Config({"BLOCK_T": bt, "BLOCK_R": br}, num_warps=w, num_stages=st, pre_hook=_set_tma_blocks)
        for bt, br, w, st in ((32, 64, 4, 3), (64, 32, 4, 4), (64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 4, 4),
                              (128, 32, 4, 4))
    ]
    _xkv_scores_kernel_tuned = triton.autotune(configs=_SCORES_CONFIGS, key=["R", "G", "HALF", "HAS_ROPE", "HAS_INDEX"])(
        _xkv_scores_kernel)


def _autotune() -> bool:
    options = kernel_options()
    return options.xkv_autotune and not options.triton_interpret


@functools.lru_cache(maxsize=None)
def _sm90_or_newer(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


_TMA_FAILURE: list[str] = []  # set by _tma_failed: the default (auto) mode then keeps to the pointer loads


def _tma_failed(error: Exception) -> None:
    """The default TMA path failed to compile or launch (a Triton or driver without the lowering this
    kernel needs): warn once and use the pointer loads from now on in this process."""
    if not _TMA_FAILURE:
        warnings.warn(f"kvcompress: the xKV decode kernel's TMA loads failed ({type(error).__name__}: "
                      f"{str(error)[:200]}); using pointer loads. KVCOMPRESS_XKV_TMA=0 skips the attempt, "
                      "=1 makes it an error.", RuntimeWarning, stacklevel=3)
    _TMA_FAILURE.append(f"{type(error).__name__}: {error}")


def _tma_usable(key_factor: torch.Tensor, key_right: torch.Tensor) -> bool:
    """Whether kernel 1 loads ``U_k``/``B_k`` through TMA tensor descriptors (Hopper's bulk copy engine).

    ``kernel_options().xkv_tma`` (``KVCOMPRESS_XKV_TMA``) ``"auto"``: on for CUDA tensors on sm_90 or newer,
    until a TMA launch fails (then a warning and the pointer loads); ``"off"``: never; ``"on"``: also in
    Triton's interpreter (tests), and a failure is an error. In every case Triton must have host-side descriptors and
    both factors must meet TMA's layout rules (last dim contiguous, 16-byte aligned base and strides);
    otherwise the pointer loads run.

    On by default: on the H100, the fused call at batch 8 x 32K went from 848 to 768 us
    per layer (kernel 1: 656 -> 576 us) and batch 1 x 4K from 38.7 to 36.8 us; the GPU tests compare both
    paths against the reference (docs/performance-notes.md)."""
    mode = kernel_options().xkv_tma
    if mode == "off" or TensorDescriptor is None or (_TMA_FAILURE and mode == "auto"):
        return False
    if key_factor.is_cuda:
        if not _sm90_or_newer(key_factor.device.index or 0):
            return False
    elif mode != "on":
        return False
    for t in (key_factor, key_right):
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(st * t.element_size() % 16 for st in t.stride()[:-1]):
            return False
    return True


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
    segments = [part.segment if isinstance(part, SelectedPart) else part for part in parts]
    return all(part.cos is None or part.cos.shape[-1] == head_dim for part in segments if isinstance(part, FactoredPart))


def _fused_triton(query: torch.Tensor, parts: Sequence[Part], scaling: float, valid: torch.Tensor | None,
                  kv_heads: int, value_dim: int, total: int) -> torch.Tensor:
    """All parts of one layer in ``3 * segments + 1`` launches and at most ``2 * segments + 3`` torch ops
    (allocations, the split-K sums; one more float32 accumulator with several segments). Every part's scores
    go to one float32 buffer ``S [B, Hq, T]`` (exact parts first, then the segments) whose log-sum-exp is
    taken once over all parts, so each part's ``softmax`` is already globally normalised and the parts just
    add up (no per-part ``(o, lse)`` merge, no concatenation of sinks and tail).

    1. per segment, :func:`_xkv_scores_kernel`: rebuilt keys scored into the segment's columns;
    2. :func:`_xkv_exact_lse_kernel`: the exact parts' scores, then the row's shift (lse, 0 if all masked);
    3. per segment, :func:`_xkv_latent_pv_kernel`: split-K partials of ``softmax . U_v``, then their sum;
    4. per segment, :func:`_xkv_output_kernel`: the latent projected by ``B_v`` (in registers, no
       float copy of ``B_v``), plus the exact parts' ``softmax . V`` on the first segment, written as
       the output in the query's dtype by the last one (a float32 accumulator between segments).
    """
    batch, q_heads, _, head_dim = query.shape
    groups = q_heads // kv_heads
    wide = query.dtype == torch.float32
    precision = "ieee" if wide else "tf32"  # bf16 scores are then as precise as bf16 keys, or better
    device = query.device
    # token offsets (for ``valid``) of every part; exact parts take the first columns of S
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
    n_exact = sum(p.length for p, _ in exact)
    # a SelectedPart takes one column per selected slot, a whole segment one per token
    width = n_exact + sum(p.selected if isinstance(p, SelectedPart) else p.length for p, _ in segments)
    scores = torch.empty(batch, q_heads, width, device=device, dtype=torch.float32)
    shift = torch.empty(batch, q_heads, device=device, dtype=torch.float32)
    out = torch.empty(batch, 1, q_heads, value_dim, device=device, dtype=query.dtype)
    if kernel_options().poison_buffers:
        scores.fill_(float("nan"))
        shift.fill_(float("nan"))
        out.fill_(float("nan"))
    has_valid = valid is not None
    valid_arg = valid if has_valid else scores  # never read without HAS_VALID
    stride_vb, stride_vt = (valid.stride(0), valid.stride(1)) if has_valid else (0, 0)
    sq = query.stride()
    block_g = _pow2(groups)
    # 1. factored keys' scores
    if _autotune():
        kernel, tuning = _xkv_scores_kernel_tuned, {}
    else:
        kernel = _xkv_scores_kernel
        tuning = kernel_options().xkv_scores_config or (dict(BLOCK_T=32, BLOCK_R=32, num_warps=4) if wide else
                                   dict(BLOCK_T=128, BLOCK_R=64, num_warps=4, num_stages=3))
    col = n_exact
    columns = []
    for selection, token0 in segments:
        selected = isinstance(selection, SelectedPart)
        part = selection.segment if selected else selection
        rank_k = part.key_factor.shape[2]
        tokens = selection.selected if selected else part.key_factor.shape[1]  # columns (rows scored)
        has_rope = part.cos is not None
        cos = part.cos if has_rope else scores  # any tensor: never read when HAS_ROPE is False
        sin = part.sin if has_rope else scores
        kf, kr = part.key_factor, part.key_right
        index = selection.index if selected else scores  # never read without HAS_INDEX
        index_valid = selection.index_valid if selected else scores
        si = index.stride() if selected else (0, 0, 0)
        grid = lambda meta, _t=tokens: (kv_heads, triton.cdiv(_t, meta["BLOCK_T"]), batch)  # noqa: E731
        args = [query, kf, kr, cos, sin, valid_arg, scores, index, index_valid,
                tokens, rank_k, groups, col, token0,
                sq[0], sq[1], sq[3],
                kf.stride(0), kf.stride(1), kf.stride(2),
                kr.stride(0), kr.stride(1), kr.stride(2),
                cos.stride(0), cos.stride(1) if has_rope else 0,
                stride_vb, stride_vt,
                scores.stride(0), scores.stride(1), scores.stride(2),
                si[0], si[1], si[2],
                float(scaling)]
        constants = dict(HALF=head_dim // 2, BLOCK_G=block_g, HAS_ROPE=has_rope, HAS_VALID=has_valid,
                         PRECISION=precision, KEYS_IN_QUERY_DTYPE=not wide, HAS_INDEX=selected, **tuning)
        if not selected and _tma_usable(kf, kr):  # TMA loads tiles of consecutive rows: no gather
            block_t, block_r = tuning.get("BLOCK_T", 128), tuning.get("BLOCK_R", 64)  # the pre-hook resets them
            descriptors = [TensorDescriptor(kf, list(kf.shape), list(kf.stride()), [1, block_t, block_r]),
                           TensorDescriptor(kr, list(kr.shape), list(kr.stride()), [1, block_r, head_dim // 2])]
            try:
                _launch(kernel, grid, args[0], *descriptors, *args[3:], USE_TMA=True, **constants)
            except Exception as error:  # a Triton/GPU whose TMA lowering rejects the kernel: nothing ran
                if kernel_options().xkv_tma == "on":
                    raise
                _tma_failed(error)
                _launch(kernel, grid, *args, USE_TMA=False, **constants)
        else:
            _launch(kernel, grid, *args, USE_TMA=False, **constants)
        columns.append(col)
        col += tokens
    # 2. exact scores and the shift over all columns
    (e1, off1), (e2, off2) = (exact + [(None, 0), (None, 0)])[:2]
    k1 = e1.keys if e1 is not None else query
    k2 = e2.keys if e2 is not None else query
    n1 = e1.length if e1 is not None else 0
    n2 = e2.length if e2 is not None else 0
    s1, s2 = k1.stride(), k2.stride()
    _launch(
        _xkv_exact_lse_kernel, (q_heads, batch),
        query, k1, k2, valid_arg, scores, shift,
        n1, n2, width, groups, off1, off2,
        sq[0], sq[1], sq[3],
        s1[0], s1[1], s1[2], s1[3],
        s2[0], s2[1], s2[2], s2[3],
        stride_vb, stride_vt,
        scores.stride(0), scores.stride(1), scores.stride(2),
        shift.stride(0), shift.stride(1),
        float(scaling),
        D=head_dim, BLOCK_E=32, BLOCK_S=2048 if device.type == "cuda" else 64, HAS_VALID=has_valid,
        num_warps=8 if device.type == "cuda" else 4,
    )
    # 3. split-K partials of softmax . U_v, one buffer per segment
    # 16-bit inputs: 256-wide r_v chunks, so each program's softmax tile serves 256 latent columns (the
    # scores are re-read and re-exponentiated once per chunk); measured best of 7 tiles at every shape
    # (H100: batch 8 x 32K 180 -> 164 us, batch 1 x 4K 26 -> 18 us)
    block_r, block_tv = (64, 32) if wide else (256, 32)
    partials = []
    for (selection, _), col0 in zip(segments, columns):
        selected = isinstance(selection, SelectedPart)
        part = selection.segment if selected else selection
        tokens = selection.selected if selected else part.value_factor.shape[1]
        rank_v = part.value_factor.shape[2]
        r_chunks = triton.cdiv(rank_v, block_r)
        tiles = triton.cdiv(tokens, block_tv)
        programs = r_chunks * batch * (kv_heads if selected else 1)
        splits = max(1, min(tiles, math.ceil(2 * sm_count(device) / programs)))
        tiles_per_split = triton.cdiv(tiles, splits)
        splits = triton.cdiv(tiles, tiles_per_split)
        partial = torch.empty(batch, splits, q_heads, rank_v, device=device, dtype=torch.float32)
        if kernel_options().poison_buffers:
            partial.fill_(float("nan"))
        vf = part.value_factor
        if selected:
            index = selection.index
            _launch(
                _xkv_select_pv_kernel, (r_chunks, splits, batch * kv_heads),
                scores, shift, vf, index, partial,
                tokens, rank_v, kv_heads, groups, tiles_per_split, col0,
                scores.stride(0), scores.stride(1), scores.stride(2),
                shift.stride(0), shift.stride(1),
                vf.stride(0), vf.stride(1), vf.stride(2),
                index.stride(0), index.stride(1), index.stride(2),
                partial.stride(0), partial.stride(1), partial.stride(2), partial.stride(3),
                BLOCK_G=block_g, BLOCK_T=block_tv, BLOCK_R=block_r, PRECISION=precision,
                num_warps=4,
            )
        else:
            _launch(
                _xkv_latent_pv_kernel, (r_chunks, splits, batch),
                scores, shift, vf, partial,
                tokens, rank_v, q_heads, tiles_per_split, col0,
                scores.stride(0), scores.stride(1), scores.stride(2),
                shift.stride(0), shift.stride(1),
                vf.stride(0), vf.stride(1), vf.stride(2),
                partial.stride(0), partial.stride(1), partial.stride(2), partial.stride(3),
                BLOCK_HQ=_pow2(q_heads), BLOCK_T=block_tv, BLOCK_R=block_r, PRECISION=precision,
                num_warps=4,
            )
        # The split-K sum as one reduction (deterministic); summing in the output kernel would be a serial
        # loop over up to ~2 * SMs splits at batch 1.
        if splits > 1:
            latent = partial.sum(dim=1)
            partials.append((latent, latent.stride(), rank_v))
        else:  # one split: the partial is the latent, no reduction
            partials.append((partial, (partial.stride(0), partial.stride(2), partial.stride(3)), rank_v))
    # 4. project, add the exact parts, write
    v1 = e1.values if e1 is not None else query
    v2 = e2.values if e2 is not None else query
    t1, t2 = v1.stride(), v2.stride()
    acc = out
    if len(segments) > 1:
        acc = torch.empty(batch, q_heads, value_dim, device=device, dtype=torch.float32)
    steps = [(seg, p) for (seg, _), p in zip(segments, partials)] or [(None, None)]
    for i, (seg, partial_info) in enumerate(steps):
        if seg is not None:
            latent, sp, rank_v = partial_info
            bv = seg.segment.value_right if isinstance(seg, SelectedPart) else seg.value_right
            sb = bv.stride()
        else:
            latent, rank_v, bv, sp, sb = scores, 0, scores, (0, 0, 0), (0, 0, 0)
        last = i == len(steps) - 1
        _launch(
            _xkv_output_kernel, (kv_heads, batch),
            latent, bv, scores, shift, v1, v2, acc, out,
            rank_v, groups, n1, n2,
            sp[0], sp[1], sp[2],
            sb[0], sb[1], sb[2],
            scores.stride(0), scores.stride(1), scores.stride(2),
            shift.stride(0), shift.stride(1),
            t1[0], t1[1], t1[2], t1[3],
            t2[0], t2[1], t2[2], t2[3],
            acc.stride(0), acc.stride(-2), acc.stride(-1),
            out.stride(0), out.stride(2), out.stride(3),
            DV=value_dim, BLOCK_G=block_g, BLOCK_R=32 if wide else 64, BLOCK_E=32,
            HAS_SEG=seg is not None, HAS_EXACT=i == 0 and n_exact > 0, ACC_IN=i > 0, ACC_OUT=not last,
            PRECISION=precision, num_warps=4,
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
    "Tensor[] cos, Tensor[] sin, Tensor[] select_index, Tensor[] select_valid, float scaling, Tensor? valid, "
    "bool? use_triton) -> Tensor"
)


def _flat_args(query: torch.Tensor, parts: Sequence[Part], valid: torch.Tensor | None, kv_heads: int,
               value_dim: int) -> tuple:
    """``parts`` as the op's arguments after ``query``: ``(sink_keys, sink_values, tail_keys, tail_values,
    key_factors, key_rights, value_factors, value_rights, cos, sin, select_index, select_valid, valid)``. The
    first part is the sinks when exact; every later exact part goes to the tail (joined if several). When an
    exact part lies between segments, ``valid`` is permuted to the op's token order (softmax ignores token
    order). ``select_index``/``select_valid``: per segment its :class:`SelectedPart` index and mask, or a
    0-element placeholder for a segment attended whole (both lists empty when no segment is selected)."""
    batch, _, _, head_dim = query.shape
    indexed, offset = [], 0
    for i, part in enumerate(parts):
        indexed.append((i, part, offset))
        offset += part.length
    sinks = indexed[0] if isinstance(parts[0], ExactPart) else None
    rest = indexed[1:] if sinks is not None else indexed
    segments = [item for item in rest if not isinstance(item[1], ExactPart)]
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
    selections = [p for _, p, _ in segments]
    segs = [p.segment if isinstance(p, SelectedPart) else p for p in selections]
    select_index, select_valid = [], []
    if any(isinstance(p, SelectedPart) for p in selections):
        empty_index = query.new_empty(0, dtype=torch.int64)
        empty_valid = query.new_empty(0, dtype=torch.bool)
        select_index = [p.index if isinstance(p, SelectedPart) else empty_index for p in selections]
        select_valid = [p.index_valid if isinstance(p, SelectedPart) else empty_valid for p in selections]
    cos, sin = [], []
    if any(p.cos is not None for p in segs):
        none = None if all(p.cos is not None for p in segs) else query.new_empty(0, 0, dtype=torch.float32)
        cos = [p.cos if p.cos is not None else none for p in segs]
        sin = [p.sin if p.sin is not None else none for p in segs]
    return (sink_keys, sink_values, tail_keys, tail_values, [p.key_factor for p in segs],
            [p.key_right for p in segs], [p.value_factor for p in segs], [p.value_right for p in segs],
            cos, sin, select_index, select_valid, valid)


def _op_impl(query: torch.Tensor, sink_keys: torch.Tensor, sink_values: torch.Tensor, tail_keys: torch.Tensor,
             tail_values: torch.Tensor, key_factors: list[torch.Tensor], key_rights: list[torch.Tensor],
             value_factors: list[torch.Tensor], value_rights: list[torch.Tensor], cos: list[torch.Tensor],
             sin: list[torch.Tensor], select_index: list[torch.Tensor], select_valid: list[torch.Tensor],
             scaling: float, valid: torch.Tensor | None, use_triton: bool | None) -> torch.Tensor:
    """The op's kernel: the parts rebuilt, then the eager path (the kernels or the reference)."""
    tables = list(zip(cos, sin)) if cos else [(None, None)] * len(key_factors)
    segments = [FactoredPart(kf, kr, vf, vr, c if c is not None and c.numel() else None,
                             s if s is not None and s.numel() else None)
                for kf, kr, vf, vr, (c, s) in zip(key_factors, key_rights, value_factors, value_rights, tables)]
    if select_index:
        segments = [SelectedPart(seg, index, index_valid) if index.dim() == 3 else seg
                    for seg, index, index_valid in zip(segments, select_index, select_valid)]
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
        ``softmax_t(c q.k_t) v_t`` over all valid tokens. With the kernels, every part (segments and the
        exact sinks and tail, read where they are) is scored into one buffer normalised once
        (:func:`_fused_triton`: ``3 * segments + 1`` launches, no torch maths); shapes the kernels do not
        cover, and the reference, merge per-part ``(o, lse)`` as in the module docstring.

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
