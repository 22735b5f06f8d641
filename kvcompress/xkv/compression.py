"""xKV's group factorisation: rank resolution, the pre-RoPE un-rotation, and the creation and merging of
the compressed segments a group of layers shares (:func:`plan_group_compression`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..ops import apply_rope, extend_truncated_svd, nonzero_components, tensor_nbytes, truncated_svd

Rank = int | float | None


@dataclass
class _Segment:
    """Tokens ``[start, start + length)`` of every layer of a group, held as shared token factors."""

    start: int
    length: int
    key_factor: torch.Tensor  # [B, length, r_k], shared by the group's layers
    value_factor: torch.Tensor  # [B, length, r_v]


@dataclass
class _Group:
    """The state a group of layers shares: its compressed segments, in token order."""

    layer_indices: list[int]
    segments: list[_Segment] = field(default_factory=list)

    def nbytes(self) -> int:
        return sum(tensor_nbytes(s.key_factor, s.value_factor) for s in self.segments)


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


def factors_save_memory(tokens: int, group_size: int, key_rank: int, value_rank: int, layer_width: int) -> bool:
    """Whether factors of ``tokens`` tokens are smaller than the exact states they replace.

    A truncated rank that is a large fraction of the group's width can cost more than it saves on a short
    segment (``T*r + G*r*H*d >= G*T*H*d``); such a segment stays exact. ``layer_width`` is ``H*d``.
    """
    key_rank, value_rank = min(key_rank, tokens), min(value_rank, tokens)
    factored = (key_rank + value_rank) * (tokens + group_size * layer_width)
    return factored < 2 * group_size * tokens * layer_width


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
    if to_compress < params.min_compress_tokens or (
            not merge and not full_rank
            and not factors_save_memory(to_compress, group_size, key_rank, value_rank, layer_width)):
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
    if merge:
        key_factor, key_right = extend_truncated_svd(
            previous.key_factor, torch.cat(previous_key_rights, dim=-1), stacked_keys, key_rank, params.svd_method)
        value_factor, value_right = extend_truncated_svd(
            previous.value_factor, torch.cat(previous_value_rights, dim=-1), stacked_values, value_rank,
            params.svd_method)
        segment = _Segment(previous.start, previous.length + to_compress, key_factor, value_factor)
    else:
        key_factor, key_right = truncated_svd(stacked_keys, key_rank, params.svd_method)
        value_factor, value_right = truncated_svd(stacked_values, value_rank, params.svd_method)
        segment = _Segment(start, to_compress, key_factor, value_factor)
    if drop_zero_components:
        key_rank = max(nonzero_components(key_factor, key_right), 1)
        value_rank = max(nonzero_components(value_factor, value_right), 1)
        segment.key_factor, key_right = segment.key_factor[..., :key_rank].contiguous(), key_right[:, :key_rank]
        segment.value_factor = segment.value_factor[..., :value_rank].contiguous()
        value_right = value_right[:, :value_rank]
    return GroupCompression(to_sink, to_compress, merge, segment,
                            [r.contiguous() for r in key_right.chunk(group_size, dim=-1)],
                            [r.contiguous() for r in value_right.chunk(group_size, dim=-1)])
