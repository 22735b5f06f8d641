"""xKV's group factorisation: rank resolution, the pre-RoPE un-rotation, and the creation and merging of
the compressed segments a group of layers shares (:func:`plan_group_compression`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..ops import apply_rope, extend_truncated_svd, nonzero_components, row_blocks, tensor_nbytes, truncated_svd

Rank = int | float | None


@dataclass
class _Segment:
    """Tokens ``[start, start + length)`` of every layer of a group, held as shared token factors."""

    start: int
    length: int
    key_factor: torch.Tensor  # [B, length, r_k], shared by the group's layers
    value_factor: torch.Tensor  # [B, length, r_v]
    # Outlier tokens (XKVCache(outliers=...)): per batch row, the segment-relative slots whose exact keys and
    # values the group's layers hold beside the factors (``XKVLayer.outlier_keys``), sorted, ``[B, n]``; and
    # ``keep [B, length]``, False at those slots: the factored rows attention must skip (it reads the exact
    # copies instead). Both None when the segment has no outliers.
    outlier_index: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    # Quantised token factors (XKVCache(factor_bits=8)): key_factor/value_factor are int8 and entry (t, i)
    # stands for ``factor[t, i] * scale[t] * channel[i]`` (``scale [B, length, 1]``, ``channel [B, 1, r]``, the
    # states' dtype; :func:`quantize_factor`). None: the factors are float.
    key_scale: torch.Tensor | None = None
    value_scale: torch.Tensor | None = None
    key_channel: torch.Tensor | None = None
    value_channel: torch.Tensor | None = None
    dtype: torch.dtype | None = None  # the states' dtype (what the factors stand for)
    # Selective decode with landmarks (XKVCache(select_budget=..., select_score="landmarks")): per chunk of
    # ``select_chunk`` tokens, the mean of its key factor rows ``[B, C, r_k]`` (states' dtype) and, keys compressed before RoPE, the chunk means of the
    # segment's cos/sin table ``[C, rotary_dim]`` (:func:`chunk_landmarks`). None: the segment has no landmarks.
    key_landmarks: torch.Tensor | None = None
    landmark_cos: torch.Tensor | None = None
    landmark_sin: torch.Tensor | None = None

    def key_left(self, a: int = 0, b: int | None = None) -> torch.Tensor:
        """The keys' token factor rows ``a:b`` in the states' dtype (dequantised when stored in 8 bits)."""
        return _rows(self.key_factor, self.key_scale, self.key_channel, a, b, self.dtype)

    def value_left(self, a: int = 0, b: int | None = None) -> torch.Tensor:
        """The values' token factor rows ``a:b`` in the states' dtype."""
        return _rows(self.value_factor, self.value_scale, self.value_channel, a, b, self.dtype)

    @property
    def num_outliers(self) -> int:
        return 0 if self.outlier_index is None else self.outlier_index.shape[-1]

    def tensors(self) -> list[torch.Tensor]:
        """The tensors the segment holds (for byte counts and batch operations)."""
        return [t for t in (self.key_factor, self.value_factor, self.outlier_index, self.keep, self.key_scale,
                            self.value_scale, self.key_channel, self.value_channel, self.key_landmarks,
                            self.landmark_cos, self.landmark_sin) if t is not None]


def _rows(factor: torch.Tensor, scale: torch.Tensor | None, channel: torch.Tensor | None, a: int, b: int | None,
          dtype) -> torch.Tensor:
    rows = factor[:, a:b]
    if scale is None:
        return rows
    return (rows.float() * scale[:, a:b].float() * channel.float()).to(dtype)


def chunk_count(tokens: int, chunk: int) -> int:
    """Chunks of ``chunk`` tokens covering ``tokens`` (the last one may be shorter)."""
    return -(-tokens // chunk)


def chunk_means(x: torch.Tensor, chunk: int, dim: int) -> torch.Tensor:
    """Means of ``x`` over consecutive chunks of ``chunk`` entries along ``dim`` (the last chunk may be shorter:
    its mean is over its own entries), computed in float32 and returned in ``x.dtype``."""
    x = x.movedim(dim, -2)
    tokens = x.shape[-2]
    count = chunk_count(tokens, chunk)
    padded = torch.nn.functional.pad(x.float(), (0, 0, 0, count * chunk - tokens))
    sums = padded.unflatten(-2, (count, chunk)).sum(-2)
    sizes = torch.full((count, 1), float(chunk), device=x.device)
    sizes[-1] = tokens - (count - 1) * chunk
    return (sums / sizes).to(x.dtype).movedim(-2, dim)


def chunk_landmarks(segment: "_Segment", chunk: int, cos: torch.Tensor | None = None,
                    sin: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """A segment's landmarks for selective decode: per chunk ``c`` of ``chunk`` consecutive tokens (the last one
    may be shorter) the mean of its key factor rows, ``Abar_c = mean_{t in c} A_k[t]`` ``[B, C, r_k]``, and,
    keys compressed before RoPE (``cos``/``sin`` the segment's table ``[T, rotary_dim]``), the chunk means of the
    table ``[C, rotary_dim]``.

    Why these: layer ``l``'s mean key of the chunk is ``mean_t R(p_t) A_k[t] B_l``. Without RoPE that is exactly
    ``Abar_c B_l`` (linear in the rows). With RoPE, ``mean_t R(p_t)`` is, per frequency, a rotation by the
    chunk-mean angle scaled by ``|mean_t e^{i w p_t}|`` -- exactly the rotate-half matrix with the mean cos and
    mean sin -- so ``M_c Abar_c B_l`` is the mean key up to the spread of the rows inside the chunk (exact when
    they are equal); fast frequencies, whose rotations cancel over a chunk, are damped as in the true mean.
    Quantised factors (``factor_bits=8``) are dequantised first: the landmark is the mean of what attention
    rebuilds. Returns ``(landmarks, cos_means or None, sin_means or None)``."""
    landmarks = chunk_means(segment.key_left(), chunk, dim=1)
    if cos is None:
        return landmarks, None, None
    return landmarks, chunk_means(cos, chunk, dim=0), chunk_means(sin, chunk, dim=0)


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``round(x / scale)`` in int8, symmetric ``[-127, 127]``, computed in float32."""
    return (x.float() / scale.float()).round_().clamp_(-127, 127).to(torch.int8)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 8-bit quantisation with one scale per row: ``x[t] ~ q[t] * scale[t]``, ``q`` int8 in
    ``[-127, 127]``, ``scale = max|x[t]| / 127`` (in ``x``'s dtype; 1 for an all-zero row); the error per
    entry is at most ``scale/2``. (:func:`quantize_factor` adds per-column ranges; the cache uses that.)"""
    scale = _nonzero(x.abs().amax(dim=-1, keepdim=True).float() / 127.0).to(x.dtype)
    q = _int8(x, scale)
    return q, scale


def quantize_factor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric 8-bit quantisation of a token factor ``x [B, T, r]``:
    ``x[t, i] ~ q[t, i] * scale[t] * channel[i]`` with ``q`` int8 in ``[-127, 127]``.

    ``channel[i] = max_t |x[t, i]|`` first brings every component to the same range; ``scale[t]`` is then the
    row's largest equalised entry over 127. Why both: the columns of ``U S`` fall with the singular values,
    so one scale per row alone spends its 255 levels on the first components and rounds the small ones to
    nothing (relative error of a rank-622 factor of SmolLM2's keys: 4.2% per row, 0.5% with the channels);
    one scale per column alone lets one loud token coarsen all the others. Scales in ``x``'s dtype; an
    all-zero row or column gets scale 1. Returns ``(q, scale [B, T, 1], channel [B, 1, r])``."""
    xf = x.float()
    channel = _nonzero(xf.abs().amax(dim=-2, keepdim=True)).to(x.dtype)
    equalised = xf / channel.float()
    scale = _nonzero(equalised.abs().amax(dim=-1, keepdim=True) / 127.0).to(x.dtype)
    q = _int8(equalised, scale)
    return q, scale, channel


def quantize_columns(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 8-bit quantisation of a reconstruction matrix ``x [B, r, W]`` with one scale per column
    (output feature): ``x[i, j] ~ q[i, j] * scale[j]``, ``scale = max_i |x[i, j]| / 127`` in ``x``'s dtype
    (1 for an all-zero column). Per column rather than per row: the rows of ``V^T`` are orthonormal, so
    their ranges are alike, while the features (heads, channels) differ; on SmolLM2's groups it gave a
    third less error than per row. Returns ``(q, scale [B, 1, W])``."""
    scale = _nonzero(x.float().abs().amax(dim=-2, keepdim=True) / 127.0).to(x.dtype)
    q = _int8(x, scale)
    return q, scale


def dequantize_columns(q: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``q * scale`` in ``dtype`` (:func:`quantize_columns`); ``q`` itself when ``scale`` is None."""
    if scale is None:
        return q
    return (q.float() * scale.float()).to(dtype)


@dataclass
class _Group:
    """The state a group of layers shares: its compressed segments, in token order."""

    layer_indices: list[int]
    segments: list[_Segment] = field(default_factory=list)

    def nbytes(self) -> int:
        return sum(tensor_nbytes(*s.tensors()) for s in self.segments)


def _rope_table_dtype(states_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the cache's RoPE tables: float16 for 16-bit states (half the bytes the fused decode's
    key-rebuild kernel reads for them; 5e-4 relative error, finer than the bfloat16 tables stock attention
    rotates bfloat16 keys with), float32 otherwise. Rotations are computed in float32 either way."""
    return torch.float16 if states_dtype in (torch.float16, torch.bfloat16) else torch.float32


def resolve_rank(name: str, rank: Rank, width: int) -> int:
    """Absolute rank for a group of feature width ``width`` (``rank`` already of a valid type and range,
    see ``XKVParams``): ``None`` is ``width``, a fraction is rounded up; an int larger than ``width`` raises."""
    if rank is None:
        return width
    if isinstance(rank, float):
        return max(1, math.ceil(rank * width))
    if rank > width:
        raise ValueError(
            f"{name}={rank} is out of range: allowed ranks are 1..{width} (group_size * kv_heads * head_dim), "
            "a float in (0, 1], or None for full rank"
        )
    return rank


def default_group_size(num_layers: int, requested: int = 4) -> int:
    """The divisor of ``num_layers`` nearest ``requested`` (ties go to the larger group: more sharing).

    SmolLM2's 30 layers give 5; Llama-3's 32 give 4.
    """
    divisors = [g for g in range(1, num_layers + 1) if num_layers % g == 0]
    return min(divisors, key=lambda g: (abs(g - requested), -g))


def factors_save_memory(tokens: int, group_size: int, key_rank: int, value_rank: int, layer_width: int,
                        element_size: int = 1, factor_bytes: int | None = None,
                        matrix_bytes: int | None = None) -> bool:
    """Whether factors of ``tokens`` tokens are smaller than the exact states they replace.

    A truncated rank that is a large fraction of the group's width can cost more than it saves on a short
    segment (``f*T*r + m*G*r*H*d >= e*G*T*H*d`` per keys or values, ``e`` the states' element size, ``f``
    and ``m`` the bytes of a factor and a matrix entry: ``e``, or 1 in 8 bits); such a segment stays
    exact. ``layer_width`` is ``H*d``. (The 8-bit scales are left out: a few per token and component.)
    """
    e = element_size
    f = e if factor_bytes is None else factor_bytes
    m = e if matrix_bytes is None else matrix_bytes
    key_rank, value_rank = min(key_rank, tokens), min(value_rank, tokens)
    factored = (key_rank + value_rank) * (f * tokens + m * group_size * layer_width)
    return factored < e * 2 * group_size * tokens * layer_width


@dataclass
class GroupCompression:
    """One compression of a group, computed but not applied: move ``to_sink`` tail tokens into the sinks,
    then ``to_compress`` into ``segment`` (a new one, or the group's last one extended when ``merge``), whose
    per-layer reconstruction matrices are ``key_rights[i]``/``value_rights[i]`` (``[B, r, H*d]``)."""

    to_sink: int
    to_compress: int
    merge: bool = False
    segment: _Segment | None = None
    key_rights: list[torch.Tensor] = field(default_factory=list)
    value_rights: list[torch.Tensor] = field(default_factory=list)
    # the exact copies of the new outlier tokens, per layer ``[B, H, n, d]`` (empty lists: none chosen); the
    # segment's outlier_index/keep already include them (and, when merging, the previous segment's outliers)
    outlier_keys: list[torch.Tensor] = field(default_factory=list)
    outlier_values: list[torch.Tensor] = field(default_factory=list)
    # XKVCache(matrix_bits=8): key_rights/value_rights are int8 and these are their column scales per layer
    # ``[B, 1, H*d]`` (:func:`quantize_columns`); None: the matrices are float
    key_right_scales: list[torch.Tensor] | None = None
    value_right_scales: list[torch.Tensor] | None = None


def outlier_count(fraction: float, tokens: int) -> int:
    """Outlier tokens kept exact out of ``tokens`` newly compressed ones: ``round(fraction * tokens)``."""
    return min(int(round(fraction * tokens)), tokens)


def _residual_energy(x: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
    """``||x_t - left_t right||^2`` per row ``[B, T]`` for a factorisation whose ``right`` has orthonormal rows
    (every route of :func:`kvcompress.ops.truncated_svd`): then ``left_t right`` is the orthogonal projection of
    ``x_t``, so its residual energy is ``||x_t||^2 - ||left_t||^2`` -- no reconstruction needed. float32, a block
    of rows at a time (clamped at 0 against rounding)."""
    out = x.new_empty(x.shape[:-1], dtype=torch.float32)
    for a, b in row_blocks(x.shape[-2], x.shape[-1] + left.shape[-1]):
        xs = x[..., a:b, :].float().square().sum(-1)
        out[..., a:b] = (xs - left[..., a:b, :].float().square().sum(-1)).clamp_min_(0)
    return out


def _energy(x: torch.Tensor) -> torch.Tensor:
    """Squared Frobenius norm over the batch, float32 (a 0-d tensor)."""
    return x.float().square().sum()


def split_rank_by_spectrum(key_left: torch.Tensor, key_energy: torch.Tensor, value_left: torch.Tensor,
                           value_energy: torch.Tensor, total: int) -> tuple[int, int]:
    """Split ``total = r_k + r_v`` between the keys and the values of a group from their spectra.

    ``key_left``/``value_left`` are ``U S`` of factorisations at a rank of at least ``total - 1`` (columns in
    order of decreasing singular value; their squared column norms, summed over the batch, are ``sigma_i^2``),
    ``*_energy`` the squared Frobenius norms of what was factorised. The split keeps the ``total`` largest
    relative energies ``sigma_i^2 / |K|^2`` and ``sigma_j^2 / |V|^2``: it minimises
    ``|K - K_r|^2/|K|^2 + |V - V_r|^2/|V|^2``, the sum of the relative errors (Eckart-Young per matrix, and a
    greedy choice over two sorted lists is optimal for a sum of their tails). Each side keeps at least 1. The
    ranks are chosen over the whole batch (one shape for every row)."""
    tiny = torch.finfo(torch.float32).tiny
    k = key_left.float().square().sum(dim=tuple(range(key_left.dim() - 1))) / key_energy.clamp_min(tiny)
    v = value_left.float().square().sum(dim=tuple(range(value_left.dim() - 1))) / value_energy.clamp_min(tiny)
    both = torch.cat([k, v])
    top = both.topk(min(total, both.numel())).indices
    key_rank = int((top < k.numel()).sum())
    key_rank = min(max(key_rank, 1), total - 1, k.numel())
    value_rank = min(total - key_rank, v.numel())
    return key_rank, value_rank


def select_outliers(stacked_keys: torch.Tensor, key_left: torch.Tensor, stacked_values: torch.Tensor,
                    value_left: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` tokens of each batch row whose reconstruction is worst, sorted ``[B, count]``.

    A token's score is its residual energy in the group's stacked keys and in its values (``[B, T, G*H*d]``,
    keys as factorised, i.e. un-rotated when compressed before RoPE: a rotation keeps the norm), each divided
    by the mean energy per token of what was factorised, so keys and values weigh the same whatever their
    scale: ``e_t = |dK_t|^2 / mean_t |K_t|^2 + |dV_t|^2 / mean_t |V_t|^2``. A low-rank basis keeps what most
    tokens share; a rare token (a needle, a number in a long filler) is the one it drops, and the one whose
    residual is largest."""
    score = None
    for x, left in ((stacked_keys, key_left), (stacked_values, value_left)):
        residual = _residual_energy(x, left)
        scale = x.float().square().sum(-1).mean(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        score = residual / scale if score is None else score + residual / scale
    return score.topk(count, dim=-1).indices.sort(dim=-1).values


def unrotate_keys(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Keys ``[B, T, H, d]`` rotated back by their slot (``cos``/``sin`` ``[T, rotary_dim]`` of those slots):
    the pre-RoPE keys, up to one fixed rotation per row, where their low-rank structure lives."""
    return apply_rope(keys, cos[:, None, :], -sin[:, None, :])


def plan_group_compression(
    tail_keys: list[torch.Tensor], tail_values: list[torch.Tensor], *, held_sinks: int, first_slot: int,
    previous: _Segment | None, previous_key_rights: list[torch.Tensor], previous_value_rights: list[torch.Tensor],
    params, key_rank: int, value_rank: int, layer_width: int,
    rope_table: Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None,
    drop_zero_components: bool = True,
    rank_budget: Callable[[int, int, bool], int] | None = None,
    min_rank: int = 1,
) -> GroupCompression | None:
    """Factorise what a group's exact tails (``[B, H, t, d]``, one per layer, in order) owe: every tail token
    older than ``params.window`` past the sinks (``held_sinks`` held, ``params.sink`` wanted).

    ``first_slot`` is the slot of the tails' first token; ``previous`` the group's last segment (merged into
    when ``params.merge_segments`` and the new tokens continue it, with the layers' ``previous_*_rights``);
    ``rope_table(start, keys)`` gives the cos/sin of slots ``start..`` for ``keys`` when keys are compressed
    before RoPE (``None``: as rotated). ``drop_zero_components``: a factorisation of rank-deficient tokens
    (a prompt of one repeated token) has exact zero components beyond the numerical rank; drop them (the
    memory then says so) instead of keeping the rank's fixed shapes (static caches keep them). Returns
    ``None`` when nothing is due. Changes nothing.

    ``rank_budget(tokens, outliers, merge)`` (``XKVCache(ratio=...)``): the total rank ``r_k + r_v`` a segment of
    ``tokens`` tokens holding ``outliers`` exact tokens can afford; ``key_rank:value_rank`` then gives the split,
    or with ``params.rank_allocation == "spectrum"`` the singular values do (:func:`split_rank_by_spectrum`;
    without a budget that redistributes ``key_rank + value_rank``). Under a budget neither rank goes below
    ``min_rank``; a new segment whose factors at the raised ranks would not save memory is not made.
    """
    tail = tail_keys[0].shape[-2]
    if any(k.shape[-2] != tail for k in tail_keys):
        raise RuntimeError("layers of an xKV group disagree on their token count")  # a bug, not user input
    group_size = len(tail_keys)
    to_sink = min(max(params.sink - held_sinks, 0), tail)
    to_compress = max(tail - to_sink - params.window, 0)
    start = first_slot + to_sink  # slot of the first token to compress
    # merge into the last segment when the new tokens continue it (the next chunk of a chunked prefill, a
    # next turn): no new fixed factor cost, so only min_compress_tokens decides
    merge = params.merge_segments and previous is not None and previous.start + previous.length == start
    full_rank = params.rank_k is None and params.rank_v is None  # always factored: it verifies the maths
    e = tail_keys[0].element_size()
    if to_compress < params.min_compress_tokens or (
            not merge and not full_rank and rank_budget is None
            and not factors_save_memory(to_compress, group_size, key_rank, value_rank, layer_width,
                                        e, 1 if params.factor_bits == 8 else e, 1 if params.matrix_bits == 8 else e)):
        to_compress = 0
    if to_sink == 0 and to_compress == 0:
        return None
    if not to_compress:
        return GroupCompression(to_sink, 0)
    chunk = slice(to_sink, to_sink + to_compress)
    keys = [k[:, :, chunk].transpose(1, 2) for k in tail_keys]  # [B, T, H, d] each
    if rope_table is not None:
        keys = [unrotate_keys(k, *rope_table(start, k)) for k in keys]
    stacked_keys = torch.cat([k.flatten(2) for k in keys], dim=-1)  # [B, T, G*H*d]
    stacked_values = torch.cat([v[:, :, chunk].transpose(1, 2).flatten(2) for v in tail_values], -1)
    length = (previous.length if merge else 0) + to_compress  # the segment's tokens after this compression
    width = group_size * layer_width
    count = outlier_count(params.outliers, to_compress)
    spectrum = params.rank_allocation == "spectrum"
    if rank_budget is not None:  # ratio=: the ranks this segment can afford, but not below min_rank each
        total = max(rank_budget(length, count + (previous.num_outliers if merge else 0), merge), 2)
        floor = min(min_rank, width)
        if not spectrum:
            key_rank = min(max(round(total * key_rank / (key_rank + value_rank)), 1), total - 1)
            key_rank, value_rank = max(key_rank, floor), max(total - key_rank, floor)
            total = key_rank + value_rank
        else:
            total = max(total, 2 * floor)
        if total > 2 * floor or merge or full_rank:
            pass  # the budget's own ranks, or a segment that exists already
        elif not factors_save_memory(to_compress, group_size, total // 2, total - total // 2, layer_width, e,
                                     1 if params.factor_bits == 8 else e, 1 if params.matrix_bits == 8 else e):
            return GroupCompression(to_sink, 0) if to_sink else None
    else:
        total = key_rank + value_rank
    key_rank, value_rank = min(key_rank, width), min(value_rank, width)
    if spectrum:  # factorise both at the largest rank either may take, then split by the spectra
        key_rank = value_rank = min(total - 1, width)
    if merge:
        key_factor, key_right = extend_truncated_svd(
            previous.key_left(), torch.cat(previous_key_rights, dim=-1), stacked_keys, key_rank, params.svd_method)
        value_factor, value_right = extend_truncated_svd(
            previous.value_left(), torch.cat(previous_value_rights, dim=-1), stacked_values, value_rank,
            params.svd_method)
        segment = _Segment(previous.start, previous.length + to_compress, key_factor, value_factor,
                           dtype=stacked_keys.dtype)
    else:
        key_factor, key_right = truncated_svd(stacked_keys, key_rank, params.svd_method)
        value_factor, value_right = truncated_svd(stacked_values, value_rank, params.svd_method)
        segment = _Segment(start, to_compress, key_factor, value_factor, dtype=stacked_keys.dtype)
    if spectrum:
        key_energy = _energy(stacked_keys) + (_energy(previous.key_left()) if merge else 0.0)
        value_energy = _energy(stacked_values) + (_energy(previous.value_left()) if merge else 0.0)
        key_rank, value_rank = split_rank_by_spectrum(segment.key_factor, key_energy, segment.value_factor,
                                                      value_energy, total)
        segment.key_factor, key_right = segment.key_factor[..., :key_rank].contiguous(), key_right[..., :key_rank, :]
        segment.value_factor = segment.value_factor[..., :value_rank].contiguous()
        value_right = value_right[..., :value_rank, :]
    if drop_zero_components:
        key_rank = max(nonzero_components(segment.key_factor, key_right), 1)
        value_rank = max(nonzero_components(segment.value_factor, value_right), 1)
        segment.key_factor, key_right = segment.key_factor[..., :key_rank].contiguous(), key_right[:, :key_rank]
        segment.value_factor = segment.value_factor[..., :value_rank].contiguous()
        value_right = value_right[:, :value_rank]
    plan = GroupCompression(to_sink, to_compress, merge, segment,
                            [r.contiguous() for r in key_right.chunk(group_size, dim=-1)],
                            [r.contiguous() for r in value_right.chunk(group_size, dim=-1)])
    if merge and previous.outlier_index is not None:
        segment.outlier_index, segment.keep = previous.outlier_index, previous.keep
    if count:
        new = segment.length - to_compress  # the new tokens' rows start here (0 unless merging)
        index = select_outliers(stacked_keys, segment.key_factor[:, new:], stacked_values,
                                segment.value_factor[:, new:], count)  # relative to the new tokens
        for k, v in zip(tail_keys, tail_values):
            rows = index[:, None, :, None]
            plan.outlier_keys.append(k[:, :, chunk].gather(2, rows.expand(*k.shape[:2], count, k.shape[-1])))
            plan.outlier_values.append(v[:, :, chunk].gather(2, rows.expand(*v.shape[:2], count, v.shape[-1])))
        keep = torch.ones(index.shape[0], to_compress, dtype=torch.bool, device=index.device)
        keep.scatter_(1, index, False)
        if segment.outlier_index is not None:
            index = torch.cat([segment.outlier_index, index + new], dim=-1)
            keep = torch.cat([segment.keep, keep], dim=-1)
        elif new:
            index = index + new
            keep = torch.cat([keep.new_ones(keep.shape[0], new), keep], dim=-1)
        segment.outlier_index, segment.keep = index, keep
    elif segment.outlier_index is not None:  # merged, no new outliers: the old ones, keep mask extended
        segment.keep = torch.cat([segment.keep, segment.keep.new_ones(segment.keep.shape[0], to_compress)], dim=-1)
    if params.factor_bits == 8:  # last: the spectra, the outliers and the merge read the float factors
        segment.key_factor, segment.key_scale, segment.key_channel = quantize_factor(segment.key_factor)
        segment.value_factor, segment.value_scale, segment.value_channel = quantize_factor(segment.value_factor)
    if params.matrix_bits == 8:
        plan.key_right_scales = []
        plan.value_right_scales = []
        for rights, scales in ((plan.key_rights, plan.key_right_scales), (plan.value_rights, plan.value_right_scales)):
            for i, right in enumerate(rights):
                rights[i], scale = quantize_columns(right)
                scales.append(scale)
    return plan
