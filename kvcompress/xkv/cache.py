"""The xKV cache: :class:`XKVCache`, its parameters (:class:`XKVParams`) and its layers."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer, StaticSlidingWindowLayer

from ..kernels.xkv_decode import ExactPart, FactoredPart, SelectedPart
from ..models import text_config
from ..ops import SVD_METHODS, apply_rope, rope_cos_sin, rope_inv_freq, row_blocks, tensor_nbytes
from ..registry import MethodParams, Range, param
from ..storage import RowMapped, grown_capacity, stock_crop_length
from ..kernels.xkv_select import select_chunks, select_chunks_by_tokens
from .compression import (Rank, _Group, _Segment, _rope_table_dtype, chunk_count, chunk_landmarks, default_group_size,
                          dequantize_columns, plan_group_compression, resolve_rank)

_RANK = (Range(int, low=1), Range(float, low=0.0, high=1.0, low_open=True))


@dataclass(frozen=True)
class XKVParams(MethodParams):
    """The parameters of :class:`XKVCache` (and of the registered method ``xkv``), declared once."""

    method: ClassVar[str] = "xkv"

    group_size: int | None = param(None, "adjacent layers sharing one SVD (None: divisor nearest 4)",
                                   Range(int, low=1), none_ok=True,
                                   note="must divide the number of full-attention layers")
    rank_k: Rank = param(0.3, "rank of the keys' group SVD: absolute, fraction of the width, None = full",
                         *_RANK, none_ok=True, note="int at most group_size*kv_heads*head_dim")
    rank_v: Rank = param(0.45, "rank of the values' group SVD: absolute, fraction of the width, None = full",
                         *_RANK, none_ok=True, note="int at most group_size*kv_heads*head_dim")
    window: int = param(64, "most recent prompt tokens kept exact", Range(int, low=0))
    sink: int = param(4, "first tokens of the sequence kept exact", Range(int, low=0))
    pre_rope: bool = param(True, "compress keys before RoPE (True) or as rotated", Range(bool))
    min_compress_tokens: int = param(32, "fewest tokens worth a new compressed segment", Range(int, low=1))
    svd_method: str = param("auto", "factorisation route: auto, exact, gram32, randomized",
                            Range(str, choices=SVD_METHODS), note="auto = exact on CPU, gram32 on GPU")
    max_cache_len: int | None = param(None, "None (storage grows) or a fixed capacity in tokens "
                                      "(static shapes: compileable, CUDA graphs)", Range(int, low=1), none_ok=True)
    merge_segments: bool = param(True, "later compressions (prefill chunks, next turns) extend the last "
                                 "segment by an incremental SVD instead of starting a new one", Range(bool))
    ratio: float | None = param(None, "target memory ratio DynamicCache/XKVCache: each compression takes the "
                                "ranks that reach it (rank_k:rank_v, or the spectra, split them)",
                                Range(float, low=1.0, low_open=True), none_ok=True)
    min_rank: Rank = param(0.1, "with ratio=: the smallest rank keys and values may each take (absolute or "
                           "fraction of the width); a prompt too short for the ratio holds less than it asks "
                           "instead of falling to rank 1", *_RANK, note="int at most group_size*kv_heads*head_dim")
    rank_allocation: str = param("fixed", "split of the keys'/values' rank: fixed (rank_k:rank_v) or spectrum "
                                 "(the group's singular values, for the least relative error)",
                                 Range(str, choices=("fixed", "spectrum")))
    factor_bits: int | None = param(8, "store the token factors in 8 bits (a scale per row and per "
                                    "component) or as the states (None)", Range(int, choices=(8,)), none_ok=True)
    matrix_bits: int | None = param(8, "store the reconstruction matrices in 8 bits (a scale per column) "
                                    "or as the states (None)", Range(int, choices=(8,)), none_ok=True)
    outliers: float = param(0.0, "fraction of each compression's tokens kept exact: those the group's "
                            "factors rebuild worst", Range(float, low=0.0, high=0.5))
    select_budget: int | float | str | None = param(
        None, "selective decode: tokens of each compressed segment rebuilt and attended per step and KV head "
        "(int), or a fraction of the segment (float); None or 'all' = every token (full reconstruction)",
        Range(int, low=1), Range(float, low=0.0, high=1.0, low_open=True), Range(str, choices=("all",)),
        none_ok=True, note="chosen by chunk landmarks; needs the fused decode (patch_xkv)")
    select_chunk: int = param(32, "selective decode: tokens per chunk, the unit that is scored and selected",
                              Range(int, low=1, high=4096))
    select_score: str = param("tokens", "selective decode: how chunks are ranked: tokens (each chunk's best "
                              "token score, the query rotated to the chunk's centre) or landmarks (chunk-mean "
                              "keys, stored)", Range(str, choices=("tokens", "landmarks")))

    def __getitem__(self, name: str):
        """``params["window"]``: the parameter's value (``XKVCache.params`` used to be a dict)."""
        if name not in type(self).defaults():
            raise KeyError(f"{name!r} is not an xkv parameter; allowed: {list(type(self).defaults())}")
        return getattr(self, name)


# The exact tail lives in a preallocated buffer that grows geometrically (kvcompress.storage's rule), so
# appending a decoded token is one in-place write (amortised O(1)) instead of a torch.cat of the whole tail.
# Its first allocation is proportional to the tokens it must hold: after a compression the tail holds
# ~window tokens, and a fixed 256-token buffer per layer next to them made a 300-token XKVCache reserve
# more bytes than DynamicCache holds (SmolLM2's shapes, default parameters: tests/test_xkv_reliability.py).
tail_capacity = grown_capacity  # the exact tail's capacity for ``needed`` tokens, holding ``capacity`` now


class ForwardContext:
    """What one patched attention forward over an :class:`XKVLayer` exchanges with the layer's ``update``.

    ``tail``: the exact tail a one-token update returned instead of whole keys and values (the attention
    function then attends over the factors), ``None`` otherwise; ``compression_due``: a multi-token update
    of the group's last layer left the group's compression to the caller (:meth:`XKVCache.compress`).
    """

    def __init__(self, layer: "XKVLayer"):
        self.layer = layer
        self.tail: tuple[torch.Tensor, torch.Tensor] | None = None
        self.compression_due = False


class XKVLayer(CacheLayerMixin):
    """One attention layer of an :class:`XKVCache`.

    Holds, in token order: ``sink_keys/values`` (exact, ``[B, H, s, d]``), one pair of reconstruction
    matrices per segment of its group (``[B, r, H*d]``), and ``keys/values``, the exact tail
    (``[B, H, t, d]``). ``update`` returns the whole sequence's keys and values for attention, the
    compressed part rebuilt from the factors.

    The tail is a view of the first ``t`` tokens of a preallocated buffer (``[B, H, capacity, d]``):
    :class:`GrowableXKVLayer` grows it geometrically (:func:`tail_capacity`), :class:`StaticXKVLayer` keeps
    sinks + compressed tokens + its capacity at ``max_cache_len``; the cache picks one from
    ``max_cache_len``. ``nbytes()`` counts the ``t`` valid tokens, ``reserved_nbytes()`` the allocated
    storage.

    Fused decode (:func:`kvcompress.xkv.patch_xkv`): the patch opens a :class:`ForwardContext` on the layer
    for the duration of each attention forward (:meth:`open_forward` / :meth:`close_forward`, in
    ``try/finally``). While one is open, a one-token update of a layer that has compressed segments returns
    only the exact tail (recorded in ``context.tail`` for the attention function, which reads the factors
    through :meth:`decode_parts`), and a multi-token update of the group's last layer leaves the group's
    compression to the patch (``context.compression_due``; it calls :meth:`XKVCache.compress` after the
    attention), so the rebuilt keys and values are freed before the factorisation allocates its own buffers.
    """

    is_sliding = False
    is_static = False  # StaticXKVLayer: fixed capacity
    is_compileable = False
    # crop can drop exact tail tokens but cannot undo a compression: transformers' assisted decoding,
    # which needs a full rollback, refuses this cache with its own clear error.
    is_croppable = False

    def __init__(self, cache: "XKVCache", layer_idx: int, group: _Group, position_in_group: int):
        super().__init__()
        self._cache = cache
        self.layer_idx = layer_idx
        self.group = group
        self.position_in_group = position_in_group
        self.sink_keys: torch.Tensor | None = None
        self.sink_values: torch.Tensor | None = None
        self.key_rights: list[torch.Tensor] = []  # one [B, r_k, H*d] per segment of the group
        self.value_rights: list[torch.Tensor] = []
        # matrix_bits=8: the rights are int8 and these their column scales [B, 1, H*d] (None entries: float)
        self.key_right_scales: list[torch.Tensor | None] = []
        self.value_right_scales: list[torch.Tensor | None] = []
        # per segment: exact copies [B, H, n, d] of its outlier tokens (None: the segment has none)
        self.outlier_keys: list[torch.Tensor | None] = []
        self.outlier_values: list[torch.Tensor | None] = []
        self.context: ForwardContext | None = None  # open while a patched attention forward runs
        # Static capacity (XKVCache(max_cache_len=N)): sinks + compressed tokens + tail capacity == N at all
        # times, the tail's valid length is the device counter ``tail_length`` (host mirror ``_tail_len``,
        # None after compiled steps: re-read once, one sync, by the next eager access).
        self.tail_length: torch.Tensor | None = None

    @property
    def max_cache_len(self) -> int | None:
        """The cache's fixed capacity (``None``: the tail grows)."""
        return self._cache.max_cache_len

    def _valid_tail(self) -> int:
        """Valid tail tokens as a Python int."""
        return self._tail_len

    def _attention_tail(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The tail as attention reads it (growable: the valid tokens; static: the whole buffer)."""
        return self.keys, self.values

    def _append_tail(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise NotImplementedError

    def _allocate_tail(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise NotImplementedError

    def _drop_tail_front(self, count: int) -> None:
        """Forget the first ``count`` tail tokens (moved to the sinks or a segment)."""
        raise NotImplementedError

    def _tail_length_changed(self) -> None:
        """``_tail_len`` was set on the host (crop): static layers copy it to their device counter."""

    def _mark_static(self) -> None:
        """Static layers: tell torch.compile the tensors the layer reads have fixed addresses."""

    # -- the exact tail: a growable buffer, ``keys``/``values`` are views of its valid part -----------
    @property
    def keys(self) -> torch.Tensor | None:
        buffer = self.__dict__.get("_key_buffer")
        return None if buffer is None else buffer[..., : self._valid_tail(), :]

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        # Assigning a tensor makes it the whole buffer (full): the next append reallocates.
        self._key_buffer = value
        self._tail_len = 0 if value is None else value.shape[-2]

    @property
    def values(self) -> torch.Tensor | None:
        buffer = self.__dict__.get("_value_buffer")
        return None if buffer is None else buffer[..., : self._valid_tail(), :]

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        if value is not None and self.__dict__.get("_key_buffer") is not None and value.shape[-2] != self._valid_tail():
            raise ValueError(f"values hold {value.shape[-2]} tokens but keys hold {self._valid_tail()}; assign keys first")
        self._value_buffer = value

    def tail_capacity(self) -> int:
        """Tokens the exact-tail buffer can hold before it must grow (0 before the first update)."""
        buffer = self.__dict__.get("_key_buffer")
        return 0 if buffer is None else buffer.shape[-2]

    def _reallocate_tail(self, capacity: int) -> None:
        """Move the valid tail into fresh buffers of ``capacity`` tokens (grow, or shrink after compression)."""
        keys, values = self.keys, self.values
        new_keys = keys.new_empty(*keys.shape[:2], capacity, keys.shape[-1])
        new_values = values.new_empty(*values.shape[:2], capacity, values.shape[-1])
        new_keys[..., : self._tail_len, :].copy_(keys)
        new_values[..., : self._tail_len, :].copy_(values)
        self._key_buffer, self._value_buffer = new_keys, new_values

    # -- the cache_utils contract -------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size = key_states.shape[0]
        empty = key_states[..., :0, :]
        self.sink_keys, self.sink_values = empty.clone(), value_states[..., :0, :].clone()
        self._allocate_tail(key_states, value_states)
        self.is_initialized = True

    def check_states(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Raise (before any state changes) if the incoming states do not fit this layer."""
        cache = self._cache
        for name, states, head_dim in (
            ("key_states", key_states, cache.head_dim),
            ("value_states", value_states, cache.value_head_dim),
        ):
            if not isinstance(states, torch.Tensor) or states.dim() != 4:
                raise ValueError(f"{name} must be a 4-D tensor [batch, kv_heads, tokens, head_dim]")
            if states.shape[1] != cache.num_kv_heads or states.shape[3] != head_dim:
                raise ValueError(
                    f"{name} of layer {self.layer_idx} has shape {tuple(states.shape)}; the config gives "
                    f"kv_heads={cache.num_kv_heads} and head_dim={head_dim}"
                )
        if key_states.shape[0] != value_states.shape[0] or key_states.shape[2] != value_states.shape[2]:
            raise ValueError("key_states and value_states must have the same batch size and token count")
        if self.is_initialized:
            for name, states in (("key_states", key_states), ("value_states", value_states)):
                if states.dtype != self.dtype:
                    raise TypeError(
                        f"{name}.dtype is {states.dtype} but layer {self.layer_idx} of this XKVCache holds "
                        f"{self.dtype}; allowed: {self.dtype} (use a new cache for another dtype)"
                    )
                if states.device != self.device:
                    raise ValueError(
                        f"{name}.device is {states.device} but layer {self.layer_idx} of this XKVCache lives "
                        f"on {self.device}; allowed: {self.device}"
                    )
            if key_states.shape[0] != self.batch_size:
                raise ValueError(
                    f"batch size of key_states is {key_states.shape[0]} but this XKVCache holds "
                    f"{self.batch_size} rows; allowed: {self.batch_size} (use a new cache for another batch)"
                )

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new tokens to the exact tail and return the whole sequence's keys and values.

        When this is the last layer of its group and more than one token arrived, the group is
        compressed after the full keys/values to return have been built: the prefill itself attends
        over exact states, as in the paper.

        With a :class:`ForwardContext` open (fused decode, see the class docstring), a one-token update of a
        layer with compressed segments returns the exact tail only and records it in ``context.tail``.
        """
        self.check_states(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        multi_token = key_states.shape[-2] > 1
        compresses = multi_token and self.position_in_group == len(self.group.layer_indices) - 1
        if compresses and torch.compiler.is_compiling():
            raise RuntimeError(
                "a multi-token update of an XKVCache compresses its group, which cannot run inside "
                "torch.compile; compile decode steps only (generate() does: its prefill runs eager)")
        self._append_tail(key_states, value_states)
        context = self.context
        if context is not None and not multi_token and self.key_rights:
            # static: the whole tail buffer (stale slots masked), so shapes never change between steps
            context.tail = self._attention_tail()
            return context.tail
        full_keys, full_values = self.full_states()
        if compresses and context is not None:
            context.compression_due = True  # the patch compresses once the attention is done
        elif compresses:
            self._cache.compress(self.layer_idx)
        return full_keys, full_values

    def _compressed_tokens(self) -> int:
        return sum(s.length for s in self.group.segments[: len(self.key_rights)])

    def seq_tokens(self) -> int:
        """Tokens held, as a Python int (static capacity: one host sync after compiled steps)."""
        if not self.is_initialized:
            return 0
        return self.sink_keys.shape[-2] + self._compressed_tokens() + self._valid_tail()

    def reset(self) -> None:
        self.keys = self.values = self.sink_keys = self.sink_values = None
        self.key_rights, self.value_rights = [], []
        self.key_right_scales, self.value_right_scales = [], []
        self.outlier_keys, self.outlier_values = [], []
        self.context = None
        self.tail_length = None
        self.is_initialized = False

    def crop_length(self, tokens_to_remove: int) -> int:
        """The token count ``crop(tokens_to_remove)`` leaves: ``DynamicLayer.crop``'s rule on the installed
        transformers (:func:`kvcompress.storage.stock_crop_length`), or its error. Raises ``ValueError`` when
        that would cut into compressed tokens, which have no exact copy to cut."""
        held = self.seq_tokens()
        length = stock_crop_length(held, tokens_to_remove)
        compressed = self._compressed_tokens()
        if compressed and length < self.sink_keys.shape[-2] + compressed:
            exact = held - self.sink_keys.shape[-2] - compressed
            raise ValueError(
                f"cannot crop({tokens_to_remove}): layer {self.layer_idx} would keep {length} of its {held} "
                f"tokens, but only its last {exact} are exact; the {compressed} before them are compressed "
                f"into factors shared by the group and cannot be cut (allowed: crop(-1)..crop(-{exact}))")
        return length

    def crop(self, tokens_to_remove: int) -> None:
        """Drop tokens as ``DynamicLayer.crop`` does (see :meth:`crop_length`); the tail keeps its capacity."""
        length = self.crop_length(tokens_to_remove)
        if not self.is_initialized:
            return
        sinks = self.sink_keys.shape[-2]
        if length < sinks:  # nothing compressed: the sinks are exact too
            self.sink_keys, self.sink_values = self.sink_keys[..., :length, :], self.sink_values[..., :length, :]
            sinks = length
        self._tail_len = length - sinks - self._compressed_tokens()
        self._tail_length_changed()

    def _map_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        length = self._valid_tail()  # fn maps whole buffers (capacity kept); the valid length is unchanged
        self._key_buffer, self._value_buffer = fn(self._key_buffer), fn(self._value_buffer)
        self._tail_len = length
        self.sink_keys, self.sink_values = fn(self.sink_keys), fn(self.sink_values)
        self.key_rights = [fn(t) for t in self.key_rights]
        self.value_rights = [fn(t) for t in self.value_rights]
        self.key_right_scales = [None if t is None else fn(t) for t in self.key_right_scales]
        self.value_right_scales = [None if t is None else fn(t) for t in self.value_right_scales]
        self.outlier_keys = [None if t is None else fn(t) for t in self.outlier_keys]
        self.outlier_values = [None if t is None else fn(t) for t in self.outlier_values]
        self.batch_size = self.keys.shape[0]
        self._mark_static()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    # -- the patched attention forward ---------------------------------------------------------------
    def open_forward(self) -> "ForwardContext":
        """Open the context of one patched attention forward over this layer (see the class docstring); the
        caller must :meth:`close_forward` it in ``finally``."""
        self.context = ForwardContext(self)
        return self.context

    def close_forward(self, context: "ForwardContext") -> None:
        """Close ``context`` (idempotent): later updates return whole keys and values again."""
        if self.context is context:
            self.context = None

    # -- xKV -----------------------------------------------------------------------------------------
    def key_right(self, j: int) -> torch.Tensor:
        """Segment ``j``'s keys reconstruction matrix ``[B, r_k, H*d]`` in the states' dtype (dequantised
        when stored in 8 bits)."""
        return dequantize_columns(self.key_rights[j], self.key_right_scales[j], self.group.segments[j].dtype)

    def value_right(self, j: int) -> torch.Tensor:
        """Segment ``j``'s values reconstruction matrix ``[B, r_v, H*d]`` in the states' dtype."""
        return dequantize_columns(self.value_rights[j], self.value_right_scales[j], self.group.segments[j].dtype)

    def rights(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every segment's ``(key_right, value_right)`` in the states' dtype, in order."""
        return [(self.key_right(j), self.value_right(j)) for j in range(len(self.key_rights))]

    def full_states(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole sequence's keys and values ``[B, H, T, d]``, compressed segments rebuilt (static
        capacity: ``T = max_cache_len``, the tail's stale slots included, for the mask to hide).

        Built in one preallocated pair of buffers, segments a block of tokens at a time
        (:meth:`XKVCache._rebuild_into`): the transient memory is the returned tensors plus a few MiB, not
        the rebuilt segments, their float32 RoPE temporaries and a concatenated copy (at 32K tokens that
        was about 2.5x the returned tensors' size, most of a chunked prefill's peak)."""
        tail_keys, tail_values = self._attention_tail()
        if not self.key_rights and self.sink_keys.shape[-2] == 0:
            return tail_keys, tail_values
        exact = [(self.sink_keys, self.sink_values), (tail_keys, tail_values)]
        segments = [(segment, *rights) for segment, rights in zip(self.group.segments, self.rights())]
        total = sum(k.shape[-2] for k, _ in exact) + sum(segment.length for segment, _, _ in segments)
        batch, heads = tail_keys.shape[:2]
        keys = tail_keys.new_empty(batch, heads, total, tail_keys.shape[-1])
        values = tail_values.new_empty(batch, heads, total, tail_values.shape[-1])
        pos = self.sink_keys.shape[-2]
        keys[:, :, :pos].copy_(self.sink_keys)
        values[:, :, :pos].copy_(self.sink_values)
        for j, (segment, key_right, value_right) in enumerate(segments):
            end = pos + segment.length
            self._cache._rebuild_into(segment, key_right, value_right, keys[:, :, pos:end], values[:, :, pos:end])
            if segment.outlier_index is not None:  # the outliers' exact states replace their rebuilt ones
                for target, exact in ((keys, self.outlier_keys[j]), (values, self.outlier_values[j])):
                    rows = segment.outlier_index[:, None, :, None].expand(*exact.shape)
                    target[:, :, pos:end].scatter_(2, rows, exact)
            pos = end
        keys[:, :, pos:].copy_(tail_keys)
        values[:, :, pos:].copy_(tail_values)
        return keys, values

    def decode_parts(self, tail: tuple[torch.Tensor, torch.Tensor] | None = None) -> list:
        """The layer's tokens in order as :mod:`kvcompress.kernels.xkv_decode` parts: the sinks
        (``ExactPart``), one ``FactoredPart`` per segment (with its RoPE table when ``pre_rope``), the tail
        (``tail``: the views ``update`` returned, to save two view ops per step; default: ``keys/values``)."""
        parts = [ExactPart(self.sink_keys, self.sink_values)]
        for segment, (key_right, value_right) in zip(self.group.segments, self.rights()):
            cos = sin = None
            if self._cache.params.pre_rope:
                cos, sin = self._cache._segment_rope_table(segment)
            parts.append(FactoredPart(segment.key_left(), key_right, segment.value_left(), value_right, cos, sin))
        if tail is None:
            tail = self._attention_tail()
        parts.append(ExactPart(*tail))
        for keys, values in zip(self.outlier_keys, self.outlier_values):
            if keys is not None:
                parts.append(ExactPart(keys, values))
        return parts

    def select_parts(self, query: torch.Tensor, parts: list, valid: torch.Tensor | None, scaling: float) -> list:
        """:meth:`decode_parts` with selective reconstruction (``XKVCache(select_budget=...)``): each segment whose
        budget keeps fewer chunks than it has becomes a :class:`~kvcompress.kernels.xkv_decode.SelectedPart` of
        the chunks its landmarks score best for ``query`` (per KV head,
        :func:`kvcompress.kernels.xkv_select.select_chunks`); ``valid`` is :meth:`decode_valid`'s mask (its
        segment columns mask padding and outlier rows in the selection). Without a budget: ``parts`` itself."""
        cache = self._cache
        if not cache.selects:
            return parts
        parts, pos = list(parts), self.sink_keys.shape[-2]
        for j, segment in enumerate(self.group.segments[: len(self.key_rights)]):
            chunk, keep = cache.params.select_chunk, cache.selected_chunks(segment.length)
            if keep < chunk_count(segment.length, chunk):
                part = parts[1 + j]
                part_valid = None if valid is None else valid[:, pos : pos + segment.length]
                if segment.key_landmarks is None:  # select_score="tokens"
                    index, index_valid = select_chunks_by_tokens(query, part.key_factor, part.key_right, part.cos,
                                                                 part.sin, scaling, chunk, keep, part_valid)
                else:
                    index, index_valid = select_chunks(query, segment.key_landmarks, part.key_right,
                                                       segment.landmark_cos, segment.landmark_sin, scaling,
                                                       segment.length, chunk, keep, part_valid)
                parts[1 + j] = SelectedPart(part, index, index_valid)
            pos += segment.length
        return parts

    def outlier_tokens(self) -> int:
        """Outlier tokens this layer holds exact copies of (the length of :meth:`decode_parts`' outlier parts)."""
        return sum(k.shape[-2] for k in self.outlier_keys[: len(self.key_rights)] if k is not None)

    def has_outliers(self) -> bool:
        """Whether a segment of this layer holds outlier tokens (then :meth:`decode_parts` ends with their
        exact parts and attention masks must go through :meth:`decode_valid`)."""
        return any(k is not None for k in self.outlier_keys[: len(self.key_rights)])

    def decode_valid(self, valid: torch.Tensor | None, batch: int, tokens: int) -> torch.Tensor | None:
        """The per-token mask of :meth:`decode_parts` from ``valid [B, tokens]`` (``None``: all valid), the mask
        of the layer's tokens in sequence order (sinks, segments, tail): a segment's outlier rows are masked
        in its factored part, and the outlier parts after the tail take the mask of their slots."""
        if not self.has_outliers():
            return valid
        if valid is None:
            valid = torch.ones(batch, tokens, dtype=torch.bool, device=self.sink_keys.device)
        pieces, extra, pos = [valid[:, : self.sink_keys.shape[-2]]], [], self.sink_keys.shape[-2]
        for segment in self.group.segments[: len(self.key_rights)]:
            end = pos + segment.length
            if segment.keep is None:
                pieces.append(valid[:, pos:end])
            else:
                pieces.append(valid[:, pos:end] & segment.keep)
                extra.append(valid[:, pos:end].gather(1, segment.outlier_index))
            pos = end
        pieces.append(valid[:, pos:])
        return torch.cat(pieces + extra, dim=-1)

    def nbytes(self) -> int:
        """Bytes of the tensors this layer holds (the group's shared factors are counted by the cache)."""
        if not self.is_initialized:
            return 0
        return tensor_nbytes(self.keys, self.values, self.sink_keys, self.sink_values, *self.key_rights,
                             *self.value_rights, *self.key_right_scales, *self.value_right_scales,
                             *self.outlier_keys, *self.outlier_values)

    def reserved_nbytes(self) -> int:
        """Bytes allocated by this layer: as ``nbytes()`` but counting the tail buffers' whole capacity."""
        if not self.is_initialized:
            return 0
        return tensor_nbytes(self._key_buffer, self._value_buffer, self.sink_keys, self.sink_values,
                             *self.key_rights, *self.value_rights, *self.key_right_scales,
                             *self.value_right_scales, *self.outlier_keys, *self.outlier_values, self.tail_length)


class GrowableXKVLayer(XKVLayer):
    """An :class:`XKVLayer` whose exact tail grows (``XKVCache(max_cache_len=None)``, ``DynamicLayer``
    semantics): its valid length is a Python int and ``update`` returns the valid tokens only."""

    is_static = False
    is_compileable = False

    def _append_tail(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        needed = self._tail_len + key_states.shape[-2]
        if needed > self.tail_capacity():
            self._reallocate_tail(tail_capacity(needed, self.tail_capacity()))
        self._key_buffer[..., self._tail_len : needed, :].copy_(key_states)
        self._value_buffer[..., self._tail_len : needed, :].copy_(value_states)
        self._tail_len = needed

    def _allocate_tail(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.keys, self.values = key_states[..., :0, :].clone(), value_states[..., :0, :].clone()  # grows on append

    def _drop_tail_front(self, count: int) -> None:
        """Forget the first ``count`` tail tokens (moved to the sinks or a segment); the buffer is rebuilt at
        a capacity proportional to what remains, which also frees the prefill's storage once compressed."""
        remaining_keys, remaining_values = self.keys[..., count:, :], self.values[..., count:, :]
        remaining = remaining_keys.shape[-2]
        capacity = tail_capacity(remaining, 0)
        new_keys = remaining_keys.new_empty(*remaining_keys.shape[:2], capacity, remaining_keys.shape[-1])
        new_values = remaining_values.new_empty(*remaining_values.shape[:2], capacity, remaining_values.shape[-1])
        new_keys[..., :remaining, :].copy_(remaining_keys)
        new_values[..., :remaining, :].copy_(remaining_values)
        self._key_buffer, self._value_buffer, self._tail_len = new_keys, new_values, remaining

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        """Tokens held."""
        if not self.is_initialized:
            return 0
        return self.sink_keys.shape[-2] + self._compressed_tokens() + self.keys.shape[-2]

    def get_max_length(self) -> int:
        return -1


class StaticXKVLayer(XKVLayer):
    """An :class:`XKVLayer` of fixed capacity (``XKVCache(max_cache_len=N)``, ``StaticLayer`` semantics):
    sinks + compressed tokens + tail capacity == N at all times, the tail's valid length is the device
    counter ``tail_length`` (host mirror ``_tail_len``, ``None`` after compiled steps: re-read once, one
    sync, by the next eager access), and ``update`` returns the whole capacity, so a compiled decode step
    has the same shapes every step."""

    is_static = True
    is_compileable = True

    def _valid_tail(self) -> int:
        """Valid tail tokens as a Python int (one host sync after compiled steps)."""
        if self._tail_len is None:
            self._tail_len = int(self.tail_length)
        return self._tail_len

    def _attention_tail(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._key_buffer, self._value_buffer  # the whole buffer: stale slots are masked

    def _append_tail(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Static capacity: write the new tokens in place at the device counter (StaticLayer's recipe, so a
        compiled step has no Python-int length to guard on), checking overflow where that costs no sync."""
        new = key_states.shape[-2]
        if torch.compiler.is_compiling():
            positions = self.tail_length + torch.arange(new, device=key_states.device)
            self._key_buffer.index_copy_(2, positions, key_states)
            self._value_buffer.index_copy_(2, positions, value_states)
            self.tail_length.add_(new)
            self._tail_len = None
            return
        seen = self._valid_tail()
        if seen + new > self.tail_capacity():
            held = self.max_cache_len - self.tail_capacity() + seen
            raise ValueError(
                f"layer {self.layer_idx}: {held} cached + {new} new tokens do not fit max_cache_len="
                f"{self.max_cache_len}; build the XKVCache with a larger max_cache_len (or None to grow)")
        self._key_buffer[..., seen : seen + new, :].copy_(key_states)
        self._value_buffer[..., seen : seen + new, :].copy_(value_states)
        self.tail_length.fill_(seen + new)
        self._tail_len = seen + new

    def _allocate_tail(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # the whole capacity at once; zeros: stale slots are masked but must not be NaN
        shape = (*key_states.shape[:2], self.max_cache_len)
        self.sink_keys = self._cache._reuse(("sink_keys", self.layer_idx), self.sink_keys)
        self.sink_values = self._cache._reuse(("sink_values", self.layer_idx), self.sink_values)
        self._key_buffer = self._zeros("tail_keys", (*shape, key_states.shape[-1]), key_states.dtype)
        self._value_buffer = self._zeros("tail_values", (*shape, value_states.shape[-1]), value_states.dtype)
        self._tail_len = 0
        self.tail_length = self._zeros("tail_length", (), torch.long)
        self._mark_static()

    def _drop_tail_front(self, count: int) -> None:
        """Forget the first ``count`` tail tokens (moved to the sinks or a segment): the buffer shrinks by
        ``count``, so sinks + compressed + tail capacity stay ``max_cache_len``."""
        remaining_keys, remaining_values = self.keys[..., count:, :], self.values[..., count:, :]
        remaining = remaining_keys.shape[-2]
        capacity = self.tail_capacity() - count
        new_keys = self._zeros("tail_keys", (*remaining_keys.shape[:2], capacity, remaining_keys.shape[-1]),
                               remaining_keys.dtype)
        new_values = self._zeros("tail_values", (*remaining_values.shape[:2], capacity, remaining_values.shape[-1]),
                                 remaining_values.dtype)
        new_keys[..., :remaining, :].copy_(remaining_keys)
        new_values[..., :remaining, :].copy_(remaining_values)
        self._key_buffer, self._value_buffer, self._tail_len = new_keys, new_values, remaining
        self.tail_length.fill_(remaining)
        self._mark_static()

    def _tail_length_changed(self) -> None:
        self.tail_length.fill_(self._tail_len)

    def _zeros(self, role: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """Zeros on the layer's device for static storage: the previous sequence's tensor of ``role`` when it
        fits (:meth:`XKVCache._kept`), else a new one."""
        kept = self._cache._kept((role, self.layer_idx), shape, dtype, self.device)
        return kept.zero_() if kept is not None else torch.zeros(shape, dtype=dtype, device=self.device)

    def _static_storage(self) -> dict[tuple, torch.Tensor]:
        """The tensors a compiled decode step reads from this layer, by role (static capacity): what
        :meth:`_mark_static` marks and what ``XKVCache.reset`` keeps for the next sequence."""
        i = self.layer_idx
        storage = {("tail_keys", i): self._key_buffer, ("tail_values", i): self._value_buffer,
                   ("tail_length", i): self.tail_length, ("sink_keys", i): self.sink_keys,
                   ("sink_values", i): self.sink_values}
        storage.update({("key_right", i, j): t for j, t in enumerate(self.key_rights)})
        storage.update({("value_right", i, j): t for j, t in enumerate(self.value_rights)})
        storage.update({("key_right_scale", i, j): t for j, t in enumerate(self.key_right_scales) if t is not None})
        storage.update({("value_right_scale", i, j): t for j, t in enumerate(self.value_right_scales)
                        if t is not None})
        storage.update({("outlier_keys", i, j): t for j, t in enumerate(self.outlier_keys) if t is not None})
        storage.update({("outlier_values", i, j): t for j, t in enumerate(self.outlier_values) if t is not None})
        return storage

    def _mark_static(self) -> None:
        """Tell torch.compile the tensors this layer reads have fixed addresses (CUDA graphs then read them
        in place instead of copying them into the graph's inputs at every replay). Eager only."""
        if not torch.compiler.is_compiling():
            for tensor in self._static_storage().values():
                torch._dynamo.mark_static_address(tensor)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_cache_len, 0  # update returns the whole capacity (StaticLayer's contract)

    def get_seq_length(self) -> torch.Tensor | int:
        """Tokens held: a 0-d device tensor (as ``StaticLayer``: no sync, no recompiles)."""
        if not self.is_initialized:
            return 0
        return self.tail_length + (self.sink_keys.shape[-2] + self._compressed_tokens())

    def get_max_length(self) -> int:
        return self.max_cache_len


def _segment_row_bytes(segment: _Segment, group_size: int, layer_width: int, e: int, matrix_bytes: int) -> int:
    """Bytes per batch row of a segment's own tensors and of its reconstruction matrices in the group's layers
    (its share of the RoPE tables aside): ``T*(r_k*f_k + r_v*f_v)`` for the token factors (``f`` their entry
    size: 1 byte when quantised, plus ``e`` per row and per component scale), ``m*G*(r_k + r_v)*W`` for the
    matrices (``m`` = ``matrix_bytes``: ``e``, or 1 in 8 bits plus ``e`` per column scale), and per
    outlier token its exact keys and values in every layer and its int64 slot, plus the one-byte keep mask;
    with selective decode, ``e*C*r_k`` for the ``C = ceil(T / select_chunk)`` landmark rows."""
    rk, rv, t = segment.key_factor.shape[-1], segment.value_factor.shape[-1], segment.length
    total = t * (rk * segment.key_factor.element_size() + rv * segment.value_factor.element_size())
    if segment.key_scale is not None:  # one scale per row and one per component, keys and values
        total += e * (2 * t + rk + rv)
    total += matrix_bytes * group_size * (rk + rv) * layer_width
    if matrix_bytes != e:  # int8 matrices: one scale per column, per layer, keys and values
        total += e * group_size * 2 * layer_width
    total += segment.num_outliers * (e * group_size * 2 * layer_width + 8) + (t if segment.keep is not None else 0)
    if segment.key_landmarks is not None:  # selective decode: one mean factor row per chunk
        total += e * segment.key_landmarks.shape[-2] * rk
    return total


def _landmark_table_bytes(segment: _Segment) -> int:
    """Bytes of a segment's chunk-mean cos/sin tables (selective decode with ``pre_rope``; not per batch row)."""
    return tensor_nbytes(segment.landmark_cos, segment.landmark_sin)


def _layer_types(cfg, num_layers: int) -> list[str]:
    """Per-layer attention types, inferred as transformers' ``DynamicCache(config=...)`` does."""
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types:
        return list(layer_types)
    if getattr(cfg, "sliding_window", None) is not None:
        return ["sliding_attention"] * num_layers
    if getattr(cfg, "attention_chunk_size", None) is not None:
        return ["chunked_attention"] * num_layers
    return ["full_attention"] * num_layers


class XKVCache(RowMapped, Cache):
    """Cross-layer SVD (xKV) KV cache: groups of adjacent layers share one low-rank token factor.

    Use it like any cache::

        cache = XKVCache(model.config)
        out = model.generate(**inputs, past_key_values=cache, max_new_tokens=32)
        print(cache.nbytes())

    Args:
        config: the model's config (or the model). Must be a decoder with ``num_key_value_heads``.
        group_size: adjacent attention layers per group; must divide the number of full-attention
            layers. ``None`` (default) picks the divisor nearest 4 (SmolLM2's 30 layers: 5).
        rank_k, rank_v: rank of the keys' / values' group SVD: an int in ``[1, group_size*kv_heads*head_dim]``,
            a float in (0, 1] (fraction of that width, rounded up), or ``None`` for full rank (lossless with
            ``factor_bits=None, matrix_bits=None``: reproduces ``DynamicCache`` up to float rounding). A
            segment shorter than the rank keeps rank = its length. The defaults, 0.3 / 0.45 with 8-bit factors
            and matrices, hold SmolLM2 at 4k tokens in 1/6.9 of ``DynamicCache``'s bytes (fp32) with its
            RULER average (docs/xkv.md).
        window: most recent prompt tokens kept exact at each compression (>= 0).
        sink: first tokens of the sequence kept exact (>= 0).
        pre_rope: compress keys before RoPE (default, as the paper) or as rotated (``False``).
        min_compress_tokens: a segment is only made when at least this many tokens are due (>= 1):
            short later turns then stay exact instead of spending a segment's fixed factor cost.
        svd_method: how the group factorisation is computed (``kvcompress.ops.SVD_METHODS``): ``"auto"``
            (exact float64 on the CPU, float32 Gram on GPUs), ``"exact"``, ``"gram32"`` or ``"randomized"``;
            see ``kvcompress.ops.truncated_svd`` and docs/performance.md for cost and error.
        max_cache_len: ``None`` (default: the exact tail grows geometrically) or the most tokens the cache
            will hold (prompt + new tokens). With it the cache has static shapes: every layer's
            ``update`` returns ``max_cache_len`` tokens (sinks, rebuilt segments, the whole fixed tail buffer;
            stale slots are masked), the tail's valid length is a device counter, and
            ``is_compileable`` is True, so ``generate`` compiles the decode step on GPU (CUDA graphs) as for
            ``StaticCache``. Overflow raises ``ValueError`` naming ``max_cache_len`` (checked on eager updates;
            compiled steps cannot check without a host sync). Compression stays eager: multi-token updates
            (prefill, a next turn) must not run inside ``torch.compile``. ``reset()`` keeps the storage for
            the next sequence (as ``StaticCache`` keeps its buffers): a sequence of the same shapes (prompt
            length, batch) writes into the same tensors, so the compiled decode's CUDA graphs replay instead
            of being recorded again for every request.
        merge_segments: tokens compressed after the group's first compression (the next chunk of a chunked
            prefill, the next turn of a conversation) extend the group's last segment with an incremental
            SVD (``kvcompress.ops.extend_truncated_svd``): one basis for the whole sequence, so the memory
            and the decode cost of one segment. ``False`` starts a new segment each time (its own basis:
            more accurate, more memory, one more segment for every decode step to read).
        outliers: fraction in ``[0, 0.5]`` of each compression's tokens kept exact beside the factors: per batch
            row, the tokens whose keys and values the group's factors rebuild worst (largest residual energy,
            :func:`kvcompress.xkv.compression.select_outliers`). A low-rank basis keeps what most tokens share
            and drops what is rare -- a needle is rare. Attention reads their exact copies instead of the
            rebuilt rows, in every path (rebuilt states, fused decode, compiled). Costs ``2*G*H*d`` elements per
            outlier and group plus 9 bytes; ``0`` (default) keeps none.
        ratio: a memory target in the user's terms, ``DynamicCache``'s bytes over this cache's (> 1), or
            ``None`` (default: the ranks are ``rank_k``/``rank_v``). Each compression of a group then takes the
            largest total rank ``r_k + r_v`` whose bytes -- factors, reconstruction matrices, outliers, the
            group's share of the RoPE tables, the exact sinks and window -- fit ``1/ratio`` of the group's
            exact bytes for the tokens it holds (:meth:`rank_budget`); ``rank_k:rank_v`` gives the split (or
            the spectra, see ``rank_allocation``). The exact window and sinks are part of the budget, so a
            short prompt cannot reach a high ratio: its ranks then stop at ``min_rank`` and the cache holds
            more than ``1/ratio`` (a compression whose factors at that rank would not save memory is skipped:
            the tokens stay exact). The ratio holds after the compression; tokens decoded later are exact and
            lower it.
        min_rank: with ``ratio``, the smallest rank the keys and the values may each take: an int in
            ``[1, group_size*kv_heads*head_dim]`` or a fraction of that width (default ``0.1``). On SmolLM2
            (width 960) that is 96, which ``ratio=7`` exceeds from about 1k prompt tokens on; below that the
            ratio's ranks would fall towards 1 + 1 and lose the prompt. ``1`` lets them. With
            ``rank_allocation="spectrum"`` the floor is on their sum (``2*min_rank``).
        rank_allocation: ``"fixed"`` (default): the keys' and values' ranks as given (or, with ``ratio``, in
            the proportion ``rank_k:rank_v``); ``"spectrum"``: per group, the total rank is split between keys
            and values from their singular values, for the least sum of relative errors
            (:func:`kvcompress.xkv.compression.split_rank_by_spectrum`; one split for the whole batch).
        factor_bits: ``8`` (default): the token factors in int8, entry ``(t, i)``
            standing for ``q[t, i] * scale[t] * channel[i]`` (:func:`kvcompress.xkv.compression.quantize_factor`):
            a quarter (fp32) or half (16-bit) of the bytes of the largest part of the cache, so ``ratio=``
            affords 2-4x the rank. Attention dequantises the factors (a copy per layer and step on the decode
            path: bytes saved, not yet time). ``None``: in the states' dtype.
        matrix_bits: ``8`` (default): the reconstruction matrices in int8 with one
            scale per column (:func:`kvcompress.xkv.compression.quantize_columns`). At a few thousand tokens
            the matrices (``G*(r_k + r_v)*H*d`` per layer and segment) cost about as much as int8 factors, so
            with ``factor_bits=8`` this buys another ~1.5x the rank under ``ratio=``. ``None``: in the states'
            dtype.
        select_budget: selective reconstruction at decode. ``None`` (default) or ``"all"``: every decode step
            rebuilds and attends every compressed token (today's results, bit for bit). An int ``n >= 1``: per
            compressed segment, decode layer and KV head, only about ``n`` tokens -- the top
            ``ceil(n / select_chunk)`` chunks by score (``select_score``) -- are rebuilt from the factors and attended,
            exactly, in one softmax with the sinks, the exact window and decoded tail and the outlier tokens;
            a float in (0, 1]: that fraction of each segment's tokens (rounded up). A budget that covers the
            whole segment takes the full reconstruction. Applies to the fused decode
            (:func:`~kvcompress.xkv.patch_xkv`, installed by the
            registered method); unpatched models rebuild every key and value (the model's own attention reads
            them). See docs/xkv.md, "Selective reconstruction".
        select_chunk: tokens per chunk (>= 1, default 32): the unit that is scored and selected. Smaller
            chunks select more precisely (and, with landmarks, cost more bytes: ``r_k / select_chunk`` elements
            per token and group).
        select_score: how a selective step ranks the chunks. ``"tokens"`` (default): each chunk's best token
            score, with the query rotated to the chunk's centre slot and folded into the factor space
            (``r_k`` multiply-adds per token and query head; nothing stored,
            :func:`kvcompress.kernels.xkv_select.token_scores`). ``"landmarks"``: chunk-mean keys
            (:func:`kvcompress.xkv.compression.chunk_landmarks`), computed once per compression and counted in
            ``nbytes()``; cheaper per step, but a mean dilutes a single matching token by ``1/select_chunk``
            and ranks retrieval chunks poorly on real models (docs/xkv.md).

    Sliding-window layers (configs with ``layer_types``) are kept as stock
    ``DynamicSlidingWindowLayer``s and are not grouped.

    A model with another number of layers than the cache's config: :func:`~kvcompress.xkv.patch_xkv`
    refuses it before any layer is written. Without the patch the cache is handed nothing but each layer's
    states and index (no config and no model, ``generate`` included), so it refuses as early as those
    allow: a model with more layers at the update of the first layer the cache lacks (``ValueError``
    naming both counts, before that write; the layers before it took the tokens, so the cache then refuses
    every update until :meth:`reset`), a model with fewer layers at the first update of the next forward
    (its last layers hold fewer tokens than its first: ``RuntimeError`` before anything is written; the
    forward that left them so is itself right). A forward that stopped part-way is refused the same way.
    """

    def __init__(
        self,
        config,
        group_size: int | None = XKVParams.group_size,
        rank_k: Rank = XKVParams.rank_k,
        rank_v: Rank = XKVParams.rank_v,
        window: int = XKVParams.window,
        sink: int = XKVParams.sink,
        pre_rope: bool = XKVParams.pre_rope,
        min_compress_tokens: int = XKVParams.min_compress_tokens,
        svd_method: str = XKVParams.svd_method,
        max_cache_len: int | None = XKVParams.max_cache_len,
        merge_segments: bool = XKVParams.merge_segments,
        outliers: float = XKVParams.outliers,
        ratio: float | None = XKVParams.ratio,
        min_rank: Rank = XKVParams.min_rank,
        rank_allocation: str = XKVParams.rank_allocation,
        factor_bits: int | None = XKVParams.factor_bits,
        matrix_bits: int | None = XKVParams.matrix_bits,
        select_budget: int | float | str | None = XKVParams.select_budget,
        select_chunk: int = XKVParams.select_chunk,
        select_score: str = XKVParams.select_score,
    ):
        # every model-independent rule lives in XKVParams (TypeError/ValueError naming the parameter)
        self.params = params = XKVParams(
            group_size=group_size, rank_k=rank_k, rank_v=rank_v, window=window, sink=sink, pre_rope=pre_rope,
            min_compress_tokens=min_compress_tokens, svd_method=svd_method, max_cache_len=max_cache_len,
            merge_segments=merge_segments, outliers=outliers, ratio=ratio, min_rank=min_rank,
            rank_allocation=rank_allocation, factor_bits=factor_bits, matrix_bits=matrix_bits, select_budget=select_budget,
            select_chunk=select_chunk, select_score=select_score)
        cfg = text_config(config)
        if getattr(cfg, "is_encoder_decoder", False):
            raise ValueError("XKVCache supports decoder-only models; got an encoder-decoder config")
        num_layers = getattr(cfg, "num_hidden_layers", None)
        num_heads = getattr(cfg, "num_attention_heads", None)
        if not num_layers or not num_heads:
            raise ValueError(
                f"unsupported config {type(cfg).__name__}: XKVCache needs num_hidden_layers and "
                "num_attention_heads (a decoder-only transformer with multi-head/grouped-query attention)"
            )
        if hasattr(cfg, "kv_lora_rank"):
            raise ValueError(
                f"unsupported model type {getattr(cfg, 'model_type', '?')!r}: MLA models (DeepSeek-V2/V3) already "
                "cache a latent; use kvcompress.mla.MLALatentCache"
            )
        self.num_layers = num_layers
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
        self.value_head_dim = self.head_dim

        layer_types = _layer_types(cfg, num_layers)
        allowed_types = ("full_attention", "sliding_attention", "chunked_attention")
        unknown = sorted({t for t in layer_types if t not in allowed_types})
        if unknown:
            raise ValueError(f"unsupported layer_types {unknown}; XKVCache handles {list(allowed_types)}")
        full_layers = [i for i, t in enumerate(layer_types) if t == "full_attention"]
        if not full_layers:
            raise ValueError(
                f"unsupported config: all {num_layers} layers are sliding-window layers (sliding_window="
                f"{getattr(cfg, 'sliding_window', None)}); XKVCache compresses full-attention layers only"
            )
        group_size = default_group_size(len(full_layers)) if group_size is None else group_size
        if len(full_layers) % group_size:
            divisors = [g for g in range(1, len(full_layers) + 1) if len(full_layers) % g == 0]
            raise ValueError(
                f"group_size={group_size} does not divide the {len(full_layers)} full-attention layers; "
                f"allowed: {divisors} (or None for the divisor nearest 4)"
            )
        self.group_size = group_size  # resolved (params.group_size may be None)
        self.key_rank = resolve_rank("rank_k", rank_k, group_size * self.num_kv_heads * self.head_dim)
        self.value_rank = resolve_rank("rank_v", rank_v, group_size * self.num_kv_heads * self.value_head_dim)
        self.min_rank = resolve_rank("min_rank", min_rank, group_size * self.num_kv_heads * self.head_dim)
        self._capacity = max_cache_len  # read through the max_cache_len property (transformers 5.17's Cache has one)
        self._inv_freq = rope_inv_freq(cfg) if pre_rope else None
        self._rope_tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        # Static capacity: the previous sequence's tensors, by role, kept by reset() so that the next
        # sequence writes into the same storage (see _kept / _reuse)
        self._kept_storage: dict[tuple, torch.Tensor] = {}

        layer_class = GrowableXKVLayer if max_cache_len is None else StaticXKVLayer
        self.groups = [_Group(full_layers[i : i + group_size]) for i in range(0, len(full_layers), group_size)]
        layers: list[CacheLayerMixin] = [None] * num_layers  # type: ignore[list-item]
        for group in self.groups:
            for position, layer_idx in enumerate(group.layer_indices):
                layers[layer_idx] = layer_class(self, layer_idx, group, position)
        for i, layer_type in enumerate(layer_types):
            if layer_type != "full_attention":
                window_size = cfg.sliding_window if layer_type == "sliding_attention" else cfg.attention_chunk_size
                if max_cache_len is None:
                    layers[i] = DynamicSlidingWindowLayer(sliding_window=window_size)
                else:
                    layers[i] = StaticSlidingWindowLayer(max_cache_len=max_cache_len, sliding_window=window_size)
        super().__init__(layers=layers)
        self._full_layers = full_layers  # the XKVLayers, in the order a forward updates them
        self._refused: str | None = None  # why the cache refuses further updates (None: usable)

    @property
    def max_cache_len(self) -> int | None:
        """The fixed capacity in tokens (``None``: the storage grows)."""
        return self._capacity

    @property
    def selects(self) -> bool:
        """Whether decode reconstructs selectively (``select_budget`` is neither ``None`` nor ``"all"``)."""
        return self.params.select_budget not in (None, "all")

    @property
    def holds_landmarks(self) -> bool:
        """Whether compressions store chunk-mean landmarks (selective decode with ``select_score="landmarks"``)."""
        return self.selects and self.params.select_score == "landmarks"

    def selected_chunks(self, tokens: int) -> int:
        """Chunks of a ``tokens``-token segment that a selective decode step keeps per KV head: the budget in
        tokens (an int, or ``ceil(select_budget * tokens)``) over ``select_chunk``, rounded up, at least 1 and at
        most every chunk (then the step reconstructs the whole segment)."""
        chunk, count = self.params.select_chunk, chunk_count(tokens, self.params.select_chunk)
        budget = self.params.select_budget
        if not self.selects:
            return count
        wanted = budget if isinstance(budget, int) else math.ceil(budget * tokens)
        return min(count, max(1, chunk_count(wanted, chunk)))

    @property
    def rank_k(self) -> int:
        """The keys' resolved rank, :attr:`key_rank` (``params.rank_k`` is the value asked for)."""
        return self.key_rank

    @property
    def rank_v(self) -> int:
        """The values' resolved rank, :attr:`value_rank` (``params.rank_v`` is the value asked for)."""
        return self.value_rank

    # -- consistency: a forward that stopped part-way must not go unnoticed ----------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """``Cache.update``, refusing (before anything is written) a layer this cache does not have, and
        layers that disagree on their token count (a previous forward stopped part-way, or the model has
        fewer layers than the cache): continuing would attend over misaligned tokens silently."""
        self._check_usable()
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or not 0 <= layer_idx < len(self.layers):
            n = len(self.layers)
            written = any(getattr(layer, "is_initialized", False) for layer in self.layers)
            if isinstance(layer_idx, int) and not isinstance(layer_idx, bool) and layer_idx >= n:
                why = (f"this XKVCache was built for {n} layers but the model has at least {layer_idx + 1} layers "
                       f"(an update of layer {layer_idx} arrived)")
            else:
                why = f"layer_idx={layer_idx!r} is out of range for this XKVCache of {n} layers"
            if written:
                # layers 0..n-1 took this forward's tokens, the model's other layers cannot: misaligned for good
                self._refused = why
            raise ValueError(f"{why}; allowed: 0..{n - 1}. Build the cache from the model's own config "
                             "(XKVCache(model.config, ...))")
        layer = self.layers[layer_idx]
        if isinstance(layer, XKVLayer) and not torch.compiler.is_compiling():
            layer.check_states(key_states, value_states)
            self._check_step_order(layer, key_states.shape[-2])
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def _known_tokens(self, layer_idx: int) -> int | None:
        layer = self.layers[layer_idx]
        if layer.is_initialized and layer.is_static and layer._tail_len is None:
            return None  # only the device knows (compiled steps ran): not worth a sync here
        return layer.seq_tokens()

    def _check_step_order(self, layer: "XKVLayer", new: int) -> None:
        """Layer ``i`` of a forward holds as many tokens as the layer before it did before this forward (the
        first one: as many as the last layer holds)."""
        order = self._full_layers
        position = order.index(layer.layer_idx)
        held = self._known_tokens(layer.layer_idx)
        other = order[-1] if position == 0 else order[position - 1]
        reference = self._known_tokens(other)
        if held is None or reference is None or held == (reference if position == 0 else reference - new):
            return
        counts = [self._known_tokens(i) for i in order]
        k = next(i for i in range(1, len(order)) if counts[i] != counts[0])
        self._refused = (
            f"its layers disagree: layers {order[0]}..{order[k - 1]} hold {counts[0]} tokens, layer {order[k]} "
            f"holds {counts[k]}; either a forward stopped part-way (an exception inside the model) or the model "
            f"has {order[k]} layers where this cache was built for {self.num_layers} layers")
        self._check_usable()

    def _check_usable(self) -> None:
        if self._refused is not None:
            raise RuntimeError(f"this XKVCache cannot be used: {self._refused}. Call reset() to start a new "
                               "sequence with it (or build a new cache from the model's config)")

    def refuse(self, reason: str) -> None:
        """Refuse every further update (and compression) until :meth:`reset`, with ``reason`` in the error."""
        self._refused = reason

    def check_model_layers(self, num_layers: int) -> None:
        """Raise ``ValueError`` unless the model about to use this cache has the cache's number of layers
        (called by :func:`~kvcompress.xkv.patch_xkv` before any layer is written)."""
        if num_layers != self.num_layers:
            raise ValueError(f"this XKVCache was built for {self.num_layers} layers but the model has {num_layers} "
                             "layers; build it from the model's config (XKVCache(model.config, ...))")

    def seq_tokens(self) -> list[int]:
        """Tokens held by each full-attention layer, as Python ints (static: one sync after compiled steps)."""
        return [self.layers[i].seq_tokens() for i in self._full_layers]

    # -- memory ---------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds (exact parts, shared factors, reconstruction matrices,
        stock sliding layers, the RoPE tables of compressed segments), measured from the tensors themselves."""
        total = sum(group.nbytes() for group in self.groups)
        total += sum(tensor_nbytes(*table) for table in self._rope_tables.values())
        for layer in self.layers:
            if isinstance(layer, XKVLayer):
                total += layer.nbytes()
            elif getattr(layer, "is_initialized", False):
                total += tensor_nbytes(layer.keys, layer.values)
        return total

    def reserved_nbytes(self) -> int:
        """Bytes allocated: as ``nbytes()`` but counting the exact-tail buffers' whole capacity (the growable
        storage keeps up to 25% of headroom per layer, :func:`kvcompress.storage.grown_capacity`) and, with a
        static capacity, the storage ``reset()`` kept for the next sequence that it has not reused (yet)."""
        total = sum(group.nbytes() for group in self.groups)
        total += sum(tensor_nbytes(*table) for table in self._rope_tables.values())
        total += tensor_nbytes(*self._kept_storage.values())
        for layer in self.layers:
            if isinstance(layer, XKVLayer):
                total += layer.reserved_nbytes()
            elif getattr(layer, "is_initialized", False):
                total += tensor_nbytes(layer.keys, layer.values)
        return total

    # -- batch operations touch the shared factors once ---------------------------------------------
    def _map_rows(self, fn) -> None:
        for group in self.groups:
            for segment in group.segments:
                segment.key_factor, segment.value_factor = fn(segment.key_factor), fn(segment.value_factor)
                if segment.key_scale is not None:
                    segment.key_scale, segment.value_scale = fn(segment.key_scale), fn(segment.value_scale)
                    segment.key_channel, segment.value_channel = fn(segment.key_channel), fn(segment.value_channel)
                if segment.outlier_index is not None:
                    segment.outlier_index, segment.keep = fn(segment.outlier_index), fn(segment.keep)
                if segment.key_landmarks is not None:  # per batch row (the cos/sin means are per slot)
                    segment.key_landmarks = fn(segment.key_landmarks)

    def crop(self, tokens_to_remove: int) -> None:
        """Drop tokens of every layer exactly as ``DynamicCache.crop`` does (same arguments, same lengths,
        same errors on the installed transformers). Only exact tokens can be cut: asking to cut into
        compressed ones raises ``ValueError`` naming why, before anything changes."""
        self._check_usable()
        for layer in self.layers:
            if isinstance(layer, XKVLayer):
                layer.crop_length(tokens_to_remove)  # raises before any layer changes
        super().crop(tokens_to_remove)

    def reset(self) -> None:
        """Forget every token. With a static capacity the storage is kept for the next sequence, as
        ``StaticCache`` keeps its buffers: each tensor the compiled decode reads is written in place by the
        next sequence whenever its shape matches (same prompt length, batch and capacity), so the CUDA
        graphs recorded for this sequence replay for the next one instead of being recorded again (tens of
        milliseconds for a whole model). Tensors that the next sequence does not reuse are freed at the
        following ``reset()``."""
        kept: dict[tuple, torch.Tensor] = {}
        if self.is_static:
            for layer in self.layers:
                if isinstance(layer, XKVLayer) and layer.is_initialized:
                    kept.update(layer._static_storage())
            for g, group in enumerate(self.groups):
                for j, segment in enumerate(group.segments):
                    kept[("key_factor", g, j)] = segment.key_factor
                    kept[("value_factor", g, j)] = segment.value_factor
                    if segment.key_scale is not None:
                        kept[("key_scale", g, j)], kept[("value_scale", g, j)] = segment.key_scale, segment.value_scale
                        kept[("key_channel", g, j)] = segment.key_channel
                        kept[("value_channel", g, j)] = segment.value_channel
                    if segment.outlier_index is not None:
                        kept[("outlier_index", g, j)] = segment.outlier_index
                        kept[("keep", g, j)] = segment.keep
                    for role in ("key_landmarks", "landmark_cos", "landmark_sin"):
                        if getattr(segment, role) is not None:
                            kept[(role, g, j)] = getattr(segment, role)
            for key, (cos, sin) in self._rope_tables.items():
                kept[("cos", *key)], kept[("sin", *key)] = cos, sin
        super().reset()
        self._refused = None
        self._kept_storage = kept
        self._rope_tables.clear()
        for group in self.groups:
            group.segments = []

    @property
    def is_static(self) -> bool:
        """True with a static capacity (``max_cache_len`` set)."""
        return self._capacity is not None

    def _kept(self, role: tuple, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """The previous sequence's tensor of ``role`` if it has this shape, dtype and device (static capacity,
        eager only), taken out of the kept storage; else ``None``. Its contents are stale."""
        if not self.is_static or torch.compiler.is_compiling():
            return None
        old = self._kept_storage.get(role)
        if old is None or tuple(old.shape) != tuple(shape) or old.dtype != dtype or old.device != device:
            return None
        return self._kept_storage.pop(role)

    def _reuse(self, role: tuple, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor``'s values in the previous sequence's storage of ``role`` when that fits (see
        :meth:`_kept`), so its address stays the one the compiled graphs read; else ``tensor`` itself."""
        old = self._kept(role, tensor.shape, tensor.dtype, tensor.device)
        if old is None or old.stride() != tensor.stride():
            return tensor
        return old.copy_(tensor)

    # -- compression -------------------------------------------------------------------------------
    def _rope_table(self, start: int, length: int, device: torch.device,
                    dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[T, rotary_dim]`` of slots ``start..start+T``, built once per segment and shared by every
        layer and every decode step (2-D, as the fused decode reads them: no per-step view); part of what the
        cache holds (``nbytes()`` counts it). ``dtype``: :func:`_rope_table_dtype` of the cached states (float16
        for 16-bit states), the angles computed in float32 first."""
        key = (start, length, device, dtype)
        table = self._rope_tables.get(key)
        if table is None:
            positions = torch.arange(start, start + length, device=device)
            cos, sin = (t.to(dtype) for t in rope_cos_sin(self._inv_freq, positions))  # angles in float32
            table = self._rope_tables[key] = (self._reuse(("cos", *key), cos), self._reuse(("sin", *key), sin))
        return table

    def _segment_rope_table(self, segment: _Segment) -> tuple[torch.Tensor, torch.Tensor]:
        """The cos/sin table of ``segment``'s slots, in the dtype its factors' states call for."""
        return self._rope_table(segment.start, segment.length, segment.key_factor.device,
                                _rope_table_dtype(segment.dtype))

    def _rebuild_into(self, segment: _Segment, key_right: torch.Tensor, value_right: torch.Tensor,
                      keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write one layer's rebuilt segment into ``keys``/``values`` (``[B, H, T, d]`` views): keys
        ``RoPE(A_k[t] B_k)`` (rotated by slot when ``pre_rope``), values ``A_v[t] B_v``.

        A block of tokens at a time (:func:`kvcompress.ops.row_blocks`), so the temporaries (the product,
        RoPE in float32) stay a few MiB whatever the segment's length and the batch."""
        batch, tokens = segment.key_factor.shape[:2]
        heads = self.num_kv_heads
        width = heads * max(self.head_dim, self.value_head_dim)
        # the segment's own table (shared with the fused decode)
        table = self._segment_rope_table(segment) if self.params.pre_rope else None
        for a, b in row_blocks(tokens, batch * width):
            k = torch.matmul(segment.key_left(a, b), key_right).view(batch, b - a, heads, self.head_dim)
            if table is not None:
                k = apply_rope(k, table[0][a:b, None, :], table[1][a:b, None, :])
            keys[:, :, a:b].copy_(k.transpose(1, 2))
            v = torch.matmul(segment.value_left(a, b), value_right)
            values[:, :, a:b].copy_(v.view(batch, b - a, heads, self.value_head_dim).transpose(1, 2))

    def compress(self, layer_idx: int) -> None:
        """Compress the group of layer ``layer_idx`` now: every exact tail token older than ``window`` (past
        the sinks) goes into the group's segments. A multi-token update of a group's last layer does this
        itself, unless a patched attention forward is running (then the patch calls this after the attention).
        """
        self._check_usable()
        layer = self.layers[layer_idx]
        if not isinstance(layer, XKVLayer):
            raise ValueError(f"layer {layer_idx} of this XKVCache is a {type(layer).__name__}; only full-attention "
                             f"layers are compressed (allowed: {[i for g in self.groups for i in g.layer_indices]})")
        self._compress_group(layer.group)

    def _compress_group(self, group: _Group) -> None:
        layers: list[XKVLayer] = [self.layers[i] for i in group.layer_indices]  # type: ignore[misc]
        first = layers[0]
        previous = group.segments[-1] if group.segments else None
        tail = first.keys.shape[-2]
        plan = plan_group_compression(
            [layer.keys for layer in layers], [layer.values for layer in layers],
            held_sinks=first.sink_keys.shape[-2], first_slot=first.seq_tokens() - tail, previous=previous,
            previous_key_rights=[layer.key_right(-1) for layer in layers] if previous is not None else [],
            previous_value_rights=[layer.value_right(-1) for layer in layers] if previous is not None else [],
            params=self.params, key_rank=self.key_rank, value_rank=self.value_rank,
            layer_width=self.num_kv_heads * self.head_dim,
            rope_table=(lambda start, k: self._rope_table(start, k.shape[1], k.device, _rope_table_dtype(k.dtype)))
            if self.params.pre_rope else None, drop_zero_components=not self.is_static,
            rank_budget=self.rank_budget(group) if self.params.ratio is not None else None,
            min_rank=self.min_rank)
        if plan is None:
            return
        to_sink, new_segment, merge = plan.to_sink, plan.segment, plan.merge
        # Everything is computed: commit to all layers at once.
        g = self.groups.index(group)
        for i, layer in enumerate(layers):
            n = layer.layer_idx
            if to_sink:
                layer.sink_keys = self._reuse(("sink_keys", n),
                                              torch.cat([layer.sink_keys, layer.keys[:, :, :to_sink]], dim=-2))
                layer.sink_values = self._reuse(("sink_values", n),
                                                torch.cat([layer.sink_values, layer.values[:, :, :to_sink]], dim=-2))
            if new_segment is not None:
                old_keys = old_values = None
                if merge:
                    layer.key_rights.pop()
                    layer.value_rights.pop()
                    layer.key_right_scales.pop()
                    layer.value_right_scales.pop()
                    old_keys, old_values = layer.outlier_keys.pop(), layer.outlier_values.pop()
                j = len(layer.key_rights)
                layer.key_rights.append(self._reuse(("key_right", n, j), plan.key_rights[i]))
                layer.value_rights.append(self._reuse(("value_right", n, j), plan.value_rights[i]))
                scales = (None, None)
                if plan.key_right_scales is not None:
                    scales = (self._reuse(("key_right_scale", n, j), plan.key_right_scales[i]),
                              self._reuse(("value_right_scale", n, j), plan.value_right_scales[i]))
                layer.key_right_scales.append(scales[0])
                layer.value_right_scales.append(scales[1])
                if plan.outlier_keys:  # the merged segment's earlier outliers first: its index is in that order
                    old_keys = plan.outlier_keys[i] if old_keys is None else torch.cat([old_keys, plan.outlier_keys[i]], -2)
                    old_values = (plan.outlier_values[i] if old_values is None
                                  else torch.cat([old_values, plan.outlier_values[i]], -2))
                layer.outlier_keys.append(None if old_keys is None else self._reuse(("outlier_keys", n, j), old_keys))
                layer.outlier_values.append(
                    None if old_values is None else self._reuse(("outlier_values", n, j), old_values))
            layer._drop_tail_front(to_sink + plan.to_compress)
        if merge:
            group.segments.pop()
        if new_segment is not None:
            j = len(group.segments)
            new_segment.key_factor = self._reuse(("key_factor", g, j), new_segment.key_factor)
            new_segment.value_factor = self._reuse(("value_factor", g, j), new_segment.value_factor)
            if new_segment.key_scale is not None:
                new_segment.key_scale = self._reuse(("key_scale", g, j), new_segment.key_scale)
                new_segment.value_scale = self._reuse(("value_scale", g, j), new_segment.value_scale)
                new_segment.key_channel = self._reuse(("key_channel", g, j), new_segment.key_channel)
                new_segment.value_channel = self._reuse(("value_channel", g, j), new_segment.value_channel)
            if new_segment.outlier_index is not None:
                new_segment.outlier_index = self._reuse(("outlier_index", g, j), new_segment.outlier_index)
                new_segment.keep = self._reuse(("keep", g, j), new_segment.keep)
            if self.holds_landmarks:  # once per compression, from the factors as stored (a merge: the whole new basis)
                table = self._segment_rope_table(new_segment) if self.params.pre_rope else (None, None)
                landmarks = chunk_landmarks(new_segment, self.params.select_chunk, *table)
                new_segment.key_landmarks = self._reuse(("key_landmarks", g, j), landmarks[0])
                if landmarks[1] is not None:
                    new_segment.landmark_cos = self._reuse(("landmark_cos", g, j), landmarks[1])
                    new_segment.landmark_sin = self._reuse(("landmark_sin", g, j), landmarks[2])
            group.segments.append(new_segment)
        if merge:
            # RoPE tables are shared by the groups and cached by (start, length): drop those no segment uses
            # any more (the merged segment's old span, the new tokens' span used to un-rotate them)
            used = {(seg.start, seg.length) for g in self.groups for seg in g.segments}
            for key in [k for k in self._rope_tables if k[:2] not in used]:
                del self._rope_tables[key]
        if new_segment is not None and self.params.pre_rope:
            # the segment's table now, not at its first decode: nbytes() counts what the cache will hold
            # (a merged segment's table covers a new span: it used to appear only at the next step)
            self._segment_rope_table(new_segment)
        if new_segment is not None:
            if self.is_static and not torch.compiler.is_compiling():
                tensors = new_segment.tensors()
                if self.params.pre_rope:
                    tensors += self._segment_rope_table(new_segment)
                for tensor in tensors:
                    torch._dynamo.mark_static_address(tensor)
        for layer in layers:
            layer._mark_static()  # new sinks and reconstruction matrices

    def rank_budget(self, group: _Group):
        """``ratio=``: the function ``(tokens, outliers, merge) -> r_k + r_v`` of the group's next compression -- the
        largest total rank for which the group holds at most ``1/ratio`` of its exact bytes, with the compressed
        segment holding ``tokens`` tokens and ``outliers`` exact ones (per batch row, element size ``e``,
        ``W = H*d`` per layer, ``N`` tokens held, ``X`` of them exact outside the segment, ``O`` the bytes of
        the group's other segments, all but the last when ``merge`` extends it)::

            (f*T + m*G*W + e*[f < e])*(r_k + r_v) + 2*e*T*[f < e] + 2*e*G*W*[m < e] + n*(2*G*W*e + 8) + T*[n > 0]
                + rope/groups  <=  2*G*W*N*e / ratio  -  2*G*W*X*e  -  O

        with ``f`` the bytes of a factor entry (1 with ``factor_bits=8``, which adds the row and component
        scales) and ``m`` of a matrix entry (1 with ``matrix_bits=8``, which adds the column scales).
        """
        first: XKVLayer = self.layers[group.layer_indices[0]]  # type: ignore[assignment]
        e, b = first.keys.element_size(), first.batch_size
        g, w = len(group.layer_indices), self.num_kv_heads * self.head_dim
        held = first.seq_tokens()
        ratio = self.params.ratio
        rotary = 2 * len(self._inv_freq) if self.params.pre_rope else 0
        table_bytes = _rope_table_dtype(first.keys.dtype).itemsize * 2 * rotary / len(self.groups) / b

        quantised = self.params.factor_bits == 8
        f = 1 if quantised else e  # bytes per factor entry
        m = self._matrix_bytes(e)  # bytes per reconstruction matrix entry

        chunk = self.params.select_chunk if self.holds_landmarks else 0

        def budget(tokens: int, outliers: int, merge: bool) -> int:
            previous = group.segments[:-1] if merge else group.segments
            others = sum(s.length for s in previous)
            other_bytes = sum(_segment_row_bytes(s, g, w, e, m) + table_bytes * s.length
                              + _landmark_table_bytes(s) / b for s in previous)
            exact = held - tokens - others
            room = 2 * g * w * e * held / ratio - 2 * g * w * e * exact - other_bytes
            room -= outliers * (2 * g * w * e + 8) + (tokens if outliers else 0) + table_bytes * tokens
            room -= 2 * e * tokens if quantised else 0  # the key and value row scales
            room -= 2 * e * g * w if m != e else 0  # the matrices' column scales
            # selective decode: landmarks cost e*C per key component, counted per unit of r_k + r_v (r_k is
            # at most the total: the ratio then holds with room to spare); their cos/sin means per segment
            landmark = e * chunk_count(tokens, chunk) if chunk else 0
            if chunk and rotary:
                room -= _rope_table_dtype(first.keys.dtype).itemsize * 2 * rotary * chunk_count(tokens, chunk) / b
            return int(room // (f * tokens + m * g * w + (e if quantised else 0) + landmark))
        return budget

    def _matrix_bytes(self, element_size: int) -> int:
        """Bytes of a reconstruction matrix entry: 1 with ``matrix_bits=8``, else the states' element size."""
        return 1 if self.params.matrix_bits == 8 else element_size

    def expected_nbytes(self) -> int:
        """The memory formula evaluated on the current token counts (docs/xkv.md); ``nbytes()`` must equal it.

        Per group, per batch row, with element size ``e``:
        ``e * [sum_segments T_s*(r_k,s + r_v,s) + G*(r_k,s + r_v,s)*H*d  +  G*T_exact*2*H*d]``, plus for each
        segment with ``n_s`` outlier tokens ``n_s*(e*G*2*H*d + 8) + T_s`` (their exact states, int64 slots and
        the one-byte keep mask),
        plus, with ``pre_rope``, one cos/sin table per segment shared by all layers:
        ``t * 2 * T_s * rotary_dim`` with ``t`` = 2 bytes (float16) for 16-bit states, else 4 (float32);
        plus, with selective decode (``select_budget``), per group and segment ``e*C_s*r_k,s`` per batch row for
        the landmarks (``C_s = ceil(T_s / select_chunk)``) and, with ``pre_rope``, ``t * 2 * C_s * rotary_dim``
        for their chunk-mean cos/sin.
        """
        total = 0
        if self.params.pre_rope:
            segments = self.groups[0].segments if self.groups else []
            total += sum(_rope_table_dtype(s.dtype).itemsize * 2 * s.length * 2 * len(self._inv_freq)
                         for s in segments)
        for group in self.groups:
            layer: XKVLayer = self.layers[group.layer_indices[0]]  # type: ignore[assignment]
            if not layer.is_initialized:
                continue
            e, b, hd = layer.keys.element_size(), layer.batch_size, self.num_kv_heads * self.head_dim
            g = len(group.layer_indices)
            total += b * sum(_segment_row_bytes(s, g, hd, e, self._matrix_bytes(e)) for s in group.segments)
            total += sum(_landmark_table_bytes(s) for s in group.segments)
            exact = layer.sink_keys.shape[-2] + layer.keys.shape[-2]
            total += e * b * g * exact * 2 * hd
        for layer in self.layers:
            if not isinstance(layer, XKVLayer) and getattr(layer, "is_initialized", False):
                total += tensor_nbytes(layer.keys, layer.values)
        return total

