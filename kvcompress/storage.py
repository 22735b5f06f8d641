"""Token storage for cache layers: one growable buffer and one static (fixed-capacity) buffer.

Both follow transformers' ``cache_utils`` layer contract (``keys``/``values`` of shape ``[B, n, T, d]``,
``update``, ``get_seq_length``, ``crop``, the batch operations) so a cache built from them works with
everything ``generate`` does to a ``DynamicCache``/``StaticCache``:

* :class:`GrowableLayer` -- ``DynamicLayer`` semantics (the valid tokens are a Python int, the returned
  views change shape every step) without ``DynamicLayer``'s per-step ``torch.cat`` of the whole cache:
  tokens are written in place into spare capacity that grows geometrically (:func:`grown_capacity`).
* :class:`StaticBufferLayer` -- ``StaticLayer`` semantics (storage allocated once at ``max_cache_len``,
  the valid length a 0-d device counter, the whole storage returned, ``is_compileable``), plus an
  eager overflow check against a host mirror of the length and ``crop`` that never goes below 0.

``crop`` of both takes exactly the arguments, and gives exactly the lengths or errors, of the installed
transformers' ``DynamicLayer.crop`` (:func:`stock_crop_length`): a negative ``n`` drops the last ``-n``
tokens, ``0`` keeps all, and a positive ``n`` is what that version makes of it (an error on recent
transformers, "keep the first ``n``" on older ones).
"""

from __future__ import annotations

import math

import torch
from transformers.cache_utils import DynamicLayer, StaticLayer

from .ops import tensor_nbytes

GROWTH_FACTOR = 1.25  # capacity grows geometrically: amortised O(1) copies per appended token
GROWTH_ALIGN = 16  # capacities are multiples of this many tokens
FIRST_ROOM_FRACTION = 16  # the first allocation has room for 1/16 of its tokens more...
FIRST_ROOM_MIN, FIRST_ROOM_MAX = 16, 256  # ...but at least 16 and at most 256 tokens


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def grown_capacity(needed: int, capacity: int) -> int:
    """Capacity (tokens) for storage that must hold ``needed`` tokens and holds ``capacity`` now.

    The first allocation (``capacity == 0``) is ``needed`` plus a sixteenth of it (at least 16 tokens, at
    most 256) of room for decoded tokens, rounded up to a multiple of 16: proportional to the prompt, so
    the bytes allocated stay within ~7% of the bytes held (a 300-token prompt: 320 tokens, not 300 + a
    256-token granule), and a 32K prefill neither reserves 8K spare tokens nor copies itself at the first
    decode step. Later: ``max(needed, 1.25 * capacity)`` rounded up to 16, so ``n`` appends cost ``O(n)``
    copies and ``O(log n)`` reallocations.
    """
    if capacity == 0:
        room = min(max(needed // FIRST_ROOM_FRACTION, FIRST_ROOM_MIN), FIRST_ROOM_MAX)
        return _round_up(max(needed, 0) + room, GROWTH_ALIGN)
    return _round_up(max(needed, math.ceil(GROWTH_FACTOR * capacity)), GROWTH_ALIGN)


def stock_crop_length(length: int, tokens_to_remove: int) -> int:
    """The length a ``DynamicLayer`` of ``length`` tokens has after ``crop(tokens_to_remove)`` on the
    installed transformers, or the error it raises: asked of a real (empty-width) ``DynamicLayer``, so
    every cache crops exactly as the stock one does on every transformers version."""
    if isinstance(tokens_to_remove, bool) or not isinstance(tokens_to_remove, int):
        raise TypeError(f"crop takes an int, got {type(tokens_to_remove).__name__} {tokens_to_remove!r}")
    probe = DynamicLayer()
    probe.lazy_initialization(torch.empty(1, 1, 0, 0), torch.empty(1, 1, 0, 0))
    probe.keys = probe.values = torch.empty(1, 1, length, 0)  # no bytes: only the shape is read
    probe.crop(tokens_to_remove)
    return probe.keys.shape[-2]


class RowMapped:
    """transformers' three batch operations (beam ``reorder_cache``, ``batch_repeat_interleave``,
    ``batch_select_indices``) as one map over batch rows: after ``super()``'s own (the stock keys and
    values), :meth:`_map_rows` applies the same row operation to every other per-row tensor the class
    holds. Put it before the cache or layer base class."""

    def _map_rows(self, fn) -> None:
        """Apply ``fn`` (a tensor -> tensor row operation on dim 0) to every extra per-row tensor held."""
        raise NotImplementedError(f"{type(self).__name__} must define _map_rows")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_rows(lambda t: t[indices])


class GrowableLayer(DynamicLayer):
    """A ``DynamicLayer`` whose ``keys``/``values`` (``[B, n, T, d]``) live in preallocated storage.

    ``DynamicLayer`` concatenates the whole cache with each new token (``O(T)`` bytes copied per step);
    here a step writes its tokens in place into spare capacity (:func:`grown_capacity`). With
    ``max_cache_len`` the storage is allocated once at that capacity and exceeding it raises; the valid
    length is still a Python int (the returned views change shape every step), so this is not what
    ``torch.compile`` / CUDA graphs need: :class:`StaticBufferLayer` is.

    ``keys``/``values`` are views of the valid tokens (``[:, :, :T]``), so every ``cache_utils`` operation
    written against them still works; assigning a tensor to them replaces the storage with it (capacity =
    its length). ``nbytes()`` counts the valid tokens only (the cache's formula, comparable with
    ``DynamicCache``); ``reserved_nbytes()`` counts the allocated storage; ``reallocations`` counts growths.
    """

    def __init__(self, max_cache_len: int | None = None):
        if max_cache_len is not None and (isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int)
                                          or max_cache_len < 1):
            raise ValueError(f"max_cache_len must be None (grow as needed) or an int >= 1, got {max_cache_len!r}")
        self.max_cache_len = max_cache_len
        self._key_storage: torch.Tensor | None = None
        self._value_storage: torch.Tensor | None = None
        self._length = 0
        self.reallocations = 0
        super().__init__()

    # keys/values: views of the valid part; assignment (cache_utils' offload, prefetch, ...) replaces storage
    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._key_storage is None else self._key_storage[:, :, : self._length]

    @keys.setter
    def keys(self, tensor: torch.Tensor | None) -> None:
        self._key_storage = tensor
        self._length = 0 if tensor is None or tensor.dim() < 2 else tensor.shape[-2]

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._value_storage is None else self._value_storage[:, :, : self._length]

    @values.setter
    def values(self, tensor: torch.Tensor | None) -> None:
        if tensor is not None and tensor.dim() >= 2 and self._key_storage is not None and tensor.shape[-2] != self._length:
            raise ValueError(f"values of {tensor.shape[-2]} tokens assigned to a layer holding {self._length} keys; "
                             "assign keys first, then values of the same length")
        self._value_storage = tensor

    @property
    def capacity(self) -> int:
        """Tokens the storage can hold before it must grow."""
        return 0 if self._key_storage is None or self._key_storage.dim() < 2 else self._key_storage.shape[-2]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        # value_states optional: some transformers versions' early initialisation passes the keys only
        self.device = key_states.device
        self._key_storage = self._value_storage = None
        self._length = 0
        self.is_initialized = True

    def _grow(self, needed: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if self.max_cache_len is not None:
            if needed > self.max_cache_len:
                raise ValueError(f"layer {getattr(self, 'layer_idx', '?')}: {needed} tokens do not fit max_cache_len="
                                 f"{self.max_cache_len}; build the cache with a larger max_cache_len (or None to grow)")
            capacity = self.max_cache_len
        else:
            capacity = grown_capacity(needed, self.capacity)
        batch, n = key_states.shape[:2]
        keys = key_states.new_empty(batch, n, capacity, key_states.shape[-1])
        values = value_states.new_empty(batch, value_states.shape[1], capacity, value_states.shape[-1])
        if self._length:
            keys[:, :, : self._length] = self.keys
            values[:, :, : self._length] = self.values
        self._key_storage, self._value_storage = keys, values
        self.reallocations += 1

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the new tokens after the valid ones (growing the storage if needed); return views of all."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        needed = self._length + new
        store = self._key_storage
        # empty (fresh, reset or cropped to 0): storage of another batch/dtype/device cannot be reused
        stale = store is None or (self._length == 0 and (
            store.shape[:2] != key_states.shape[:2] or store.shape[-1] != key_states.shape[-1]
            or store.dtype != key_states.dtype or store.device != key_states.device))
        if stale:
            self._key_storage = self._value_storage = None
        if stale or needed > self.capacity:
            self._grow(needed, key_states, value_states)
        self._key_storage[:, :, self._length : needed] = key_states
        self._value_storage[:, :, self._length : needed] = value_states
        self._length = needed
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._length if self.is_initialized else 0

    def host_length(self) -> int | None:
        """Valid tokens as a Python int (never a device sync: the length lives on the host)."""
        return self.get_seq_length()

    def reset(self) -> None:
        self._key_storage = self._value_storage = None
        self._length = 0
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        """Drop tokens exactly as ``DynamicLayer.crop`` does (:func:`stock_crop_length`); storage is kept."""
        length = stock_crop_length(self._length if self.is_initialized else 0, tokens_to_remove)
        if self.is_initialized:
            self._length = length

    def _rebuild(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """New storage of the current capacity holding ``keys``/``values`` (a new batch), valid part only."""
        capacity = max(self.capacity, keys.shape[-2])
        self._key_storage = keys.new_empty(*keys.shape[:2], capacity, keys.shape[-1])
        self._value_storage = values.new_empty(*values.shape[:2], capacity, values.shape[-1])
        self._key_storage[:, :, : keys.shape[-2]] = keys
        self._value_storage[:, :, : values.shape[-2]] = values

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch rows (beam search) in place: same storage, same capacity."""
        if self._length:
            idx = beam_idx.to(self._key_storage.device)
            self._key_storage[:, :, : self._length] = self.keys.index_select(0, idx)
            self._value_storage[:, :, : self._length] = self.values.index_select(0, idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._length:
            self._rebuild(self.keys.repeat_interleave(repeats, dim=0), self.values.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._length:
            self._rebuild(self.keys[indices, ...], self.values[indices, ...])

    def nbytes(self) -> int:
        """Bytes of the valid tokens' keys and values (what ``DynamicLayer`` would hold)."""
        return tensor_nbytes(self.keys, self.values) if self.is_initialized else 0

    def reserved_nbytes(self) -> int:
        """Bytes of the allocated storage (valid tokens + spare capacity)."""
        return tensor_nbytes(self._key_storage, self._value_storage) if self.is_initialized else 0


class StaticBufferLayer(StaticLayer):
    """Transformers' ``StaticLayer`` (fixed capacity, in-place updates at a 0-d device counter
    ``cumulative_length``, the whole storage returned so shapes never change, ``is_compileable``) with:

    * an eager overflow check: more than ``max_cache_len`` tokens raise ``ValueError`` naming it, checked
      against a host mirror of the length (no device sync); inside compiled code the length is only on
      the device, and the first eager update after compiled steps re-reads the counter once;
    * ``crop`` with ``DynamicLayer``'s arguments and results (:func:`stock_crop_length`), never below 0;
    * ``nbytes()`` (valid tokens) and ``reserved_nbytes()`` (the storage), like :class:`GrowableLayer`.
    """

    def __init__(self, max_cache_len: int):
        if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len < 1:
            raise ValueError(f"max_cache_len must be an int >= 1, got {max_cache_len!r}")
        super().__init__(max_cache_len)
        # host mirror of cumulative_length for the eager overflow check; None = unknown (compiled steps ran)
        self._host_length: int | None = 0

    @property
    def capacity(self) -> int:
        return self.max_cache_len

    @property
    def reallocations(self) -> int:
        """1 once the storage exists: it is never reallocated."""
        return int(self.is_initialized)

    def host_length(self) -> int | None:
        """Valid tokens as the host knows them without a device sync; ``None`` after compiled steps."""
        return self._host_length if self.is_initialized else 0

    def valid_tokens(self) -> int:
        """Valid tokens as a Python int (one host sync on GPU, unless the host mirror knows it)."""
        if not self.is_initialized:
            return 0
        if self._host_length is None:
            self._host_length = int(self.cumulative_length)
        return self._host_length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the new tokens at ``cumulative_length`` in place; return the full-capacity storage."""
        new = key_states.shape[-2]
        if torch.compiler.is_compiling():
            # the device counter advances inside the graph; reading it here would be a host sync
            self._host_length = None
        else:
            seen = self.valid_tokens()
            if seen + new > self.max_cache_len:
                raise ValueError(
                    f"layer {getattr(self, 'layer_idx', '?')}: {seen} cached + {new} new tokens do not fit "
                    f"max_cache_len={self.max_cache_len}; build the cache with a larger max_cache_len (or None to grow)")
            self._host_length = seen + new
        return super().update(key_states, value_states)

    def reset(self) -> None:
        super().reset()
        self._host_length = 0

    def crop(self, tokens_to_remove: int) -> None:
        """Drop tokens exactly as ``DynamicLayer.crop`` does; the storage stays, later updates overwrite."""
        length = stock_crop_length(self.valid_tokens(), tokens_to_remove)
        if self.is_initialized:
            self.cumulative_length.fill_(length)
            self._host_length = length

    def nbytes(self) -> int:
        """Bytes of the valid tokens' keys and values (one host sync unless the length is known)."""
        if not self.is_initialized:
            return 0
        per_token = (self.keys[:, :, :1].numel() * self.keys.element_size()
                     + self.values[:, :, :1].numel() * self.values.element_size())
        return self.valid_tokens() * per_token

    def reserved_nbytes(self) -> int:
        """Bytes of the fixed-capacity storage."""
        return tensor_nbytes(self.keys, self.values) if self.is_initialized else 0
