"""xKV over the MLA latent: cross-layer SVD of DeepSeek's latent cache (:class:`XKVLatentCache`, method ``xkv_mla``).

The maths
---------
An MLA layer ``l`` caches per token ``t`` the latent ``c^l_t`` (``kv_lora_rank`` values, ``d_c``) and one
rotated RoPE key ``k^{R,l}_t`` (``qk_rope_head_dim``, ``p``) (:mod:`kvcompress.mla`). xKV's observation --
adjacent layers share their dominant singular vectors -- holds for the latent as well, so the latents of
``G`` adjacent layers (a *group*) are stacked side by side over the ``T`` compressed tokens of one batch row,
``C_g = [C_1 | ... | C_G]`` (``T x G*d_c``), and factored by a truncated SVD::

    C_g ≈ A [B_1 | ... | B_G],     A = U_r S_r  (T x r, shared by the group),  B_l  (r x d_c, per layer)

so layer ``l``'s latent is ``c^l_t ≈ a_t B_l``. By Eckart–Young the Frobenius error is the root of the sum
of the discarded squared singular values. The RoPE keys stay exact (``rope_rank=None``: they are small in
DeepSeek's layout, 64 of 576 values), or are factored the same way, as rotated, with their own rank.

Absorbed attention runs directly on the factor. With the absorbed query ``q^L_h = W_UK_h^T q^N_h``
(:func:`kvcompress.deepseek.absorb_query`)::

    q^L_h . c_t       ≈ (q^L_h B_l^T) . a_t                    (B_l folded into the query: r values)
    sum_t w_t c_t     ≈ (sum_t w_t a_t) B_l                    (B_l applied after the weighted sum)

and ``W_UV_h`` then applies as in MLA. Per step a compressed token costs ``r`` reads instead of ``d_c``;
nothing of size ``T x d_c`` is rebuilt. Both paths are exact in real arithmetic; in floating point the
factored path (:func:`factored_latent_attention`, ``patch_xkv_mla``) and the rebuilt path (the cache
handing ``A B_l`` to ``patch_mla`` or to the stock model) differ by rounding only (tests).

Memory
------
Per group, batch row and segment of ``L`` tokens: ``L*r*f + G*r*d_c*m`` for the latent (``f``, ``m`` the
bytes of a factor and a matrix entry: the states' element size ``e``, or 1 with ``factor_bits=8`` /
``matrix_bits=8``, plus the 8-bit scales: ``L + r`` for a factor, ``d_c`` for a matrix, in ``e`` bytes), plus
``G*L*p*e`` for exact RoPE keys (or ``L*r_p*f + G*r_p*p*m`` factored). Tokens not compressed (the last
``window`` of a prompt, every decoded token until the next multi-token update) cost ``(d_c + p)*e`` per
layer. :meth:`XKVLatentCache.nbytes` measures the tensors held and :meth:`XKVLatentCache.expected_nbytes`
evaluates this formula.

When compression happens
------------------------
As in :class:`kvcompress.xkv.XKVCache`: at the end of every multi-token update of a group's last layer
(the prefill, or the prompt of a later turn), every exact token older than the ``window`` most recent ones
is compressed, if at least ``min_compress_tokens`` are due; with ``merge_segments`` into the group's last
segment by an incremental SVD (:func:`kvcompress.ops.extend_truncated_svd`), else into a new segment. The
prefill itself attends over the exact latent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .deepseek import (SUPPORTED_MODEL_TYPES, CheckedLayersCache, absorb_output, absorb_query, check_attn_implementation,
                       deepseek_attention_forward, modeling_file, project_latent, rope_style)
from .hooks import PatchHandle, replace_forward, set_attribute
from .mla import AbsorbedWeights, MLADecode, _mla_config, mla_attention_modules
from .ops import SVD_METHODS, extend_truncated_svd, tensor_nbytes, truncated_svd
from .registry import MethodParams, Range, param, register_method
from .storage import GrowableLayer, RowMapped, stock_crop_length
from .xkv.compression import Rank, default_group_size, dequantize_columns, quantize_columns, quantize_factor

_STATE_ATTRIBUTE = "kvcompress_xkv_mla"
_RANK = (Range(int, low=1), Range(float, low=0.0, high=1.0, low_open=True))


@dataclass(frozen=True)
class XKVLatentParams(MethodParams):
    """The parameters of :class:`XKVLatentCache` and :func:`patch_xkv_mla` (the registered method ``xkv_mla``)."""

    method: ClassVar[str] = "xkv_mla"

    group_size: int | None = param(None, "adjacent layers sharing one SVD of their latents (None: divisor "
                                   "nearest 4)", Range(int, low=1), none_ok=True,
                                   note="must divide the number of full-attention layers")
    latent_rank: Rank = param(0.5, "rank of the group's latent SVD: absolute, fraction of group_size*kv_lora_rank, "
                       "None = full", *_RANK, none_ok=True, note="int at most group_size*kv_lora_rank")
    rope_rank: Rank = param(None, "None: RoPE keys stay exact; else rank of the group's RoPE-key SVD (absolute "
                            "or fraction of group_size*qk_rope_head_dim)", *_RANK, none_ok=True,
                            note="int at most group_size*qk_rope_head_dim")
    window: int = param(64, "most recent prompt tokens kept exact", Range(int, low=0))
    min_compress_tokens: int = param(32, "fewest tokens worth a compression", Range(int, low=1))
    merge_segments: bool = param(True, "later compressions extend the last segment by an incremental SVD "
                                 "instead of starting a new one", Range(bool))
    svd_method: str = param("auto", "factorisation route: auto, exact, gram32, randomized",
                            Range(str, choices=SVD_METHODS), note="auto = exact on CPU, gram32 on GPU")
    factor_bits: int | None = param(None, "store the token factors in 8 bits (a scale per row and per "
                                    "component) or as the states (None)", Range(int, choices=(8,)), none_ok=True)
    matrix_bits: int | None = param(None, "store the reconstruction matrices in 8 bits (a scale per column) "
                                    "or as the states (None)", Range(int, choices=(8,)), none_ok=True)
    max_absorbed_tokens: int = param(16, "forwards of at most this many new tokens take the factored path "
                                     "(patch_model only)", Range(int, low=1))


def resolve_latent_rank(name: str, rank: Rank, width: int, what: str) -> int:
    """Absolute rank for a group of feature width ``width`` (``what`` names it in the error): ``None`` is
    ``width``, a fraction ``f`` is ``ceil(f * width)``, an int must be at most ``width``."""
    if rank is None:
        return width
    if isinstance(rank, float):
        return max(1, math.ceil(rank * width))
    if rank > width:
        raise ValueError(f"{name}={rank} is out of range: allowed ranks are 1..{width} ({what}), a float in "
                         "(0, 1], or None for full rank")
    return rank


# -- what a group shares ---------------------------------------------------------------------------------
@dataclass
class _Factor:
    """A token factor ``[B, L, r]``: float, or int8 with entry ``(t, i) = q[t, i] * scale[t] * channel[i]``
    (:func:`kvcompress.xkv.compression.quantize_factor`)."""

    data: torch.Tensor
    scale: torch.Tensor | None = None
    channel: torch.Tensor | None = None

    @classmethod
    def make(cls, left: torch.Tensor, bits: int | None) -> "_Factor":
        return cls(*quantize_factor(left)) if bits == 8 else cls(left.contiguous())

    def value(self, dtype: torch.dtype) -> torch.Tensor:
        if self.scale is None:
            return self.data
        return (self.data.float() * self.scale.float() * self.channel.float()).to(dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.data, self.scale, self.channel) if t is not None]

    def map(self, fn) -> "_Factor":
        return _Factor(*(None if t is None else fn(t) for t in (self.data, self.scale, self.channel)))


@dataclass
class _Matrix:
    """A reconstruction matrix ``[B, r, W]``: float, or int8 with one scale per column (``quantize_columns``)."""

    data: torch.Tensor
    scale: torch.Tensor | None = None

    @classmethod
    def make(cls, right: torch.Tensor, bits: int | None) -> "_Matrix":
        return cls(*quantize_columns(right)) if bits == 8 else cls(right.contiguous())

    def value(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_columns(self.data, self.scale, dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.data, self.scale) if t is not None]

    def map(self, fn) -> "_Matrix":
        return _Matrix(fn(self.data), None if self.scale is None else fn(self.scale))


@dataclass
class LatentSegment:
    """Tokens ``[start, start + length)`` of every layer of a group: the latent's token factor ``[B, L, r]``
    and, when the RoPE keys are factored too, theirs ``[B, L, r_p]`` (else ``None``: each layer holds them)."""

    start: int
    length: int
    factor: _Factor
    rope_factor: _Factor | None
    dtype: torch.dtype

    def tensors(self) -> list[torch.Tensor]:
        return self.factor.tensors() + (self.rope_factor.tensors() if self.rope_factor is not None else [])


@dataclass
class _LatentGroup:
    layer_indices: list[int]
    segments: list[LatentSegment] = field(default_factory=list)

    def nbytes(self) -> int:
        return sum(tensor_nbytes(*s.tensors()) for s in self.segments)


@dataclass
class SegmentView:
    """One compressed segment as one layer reads it, in the states' dtype: ``factor [B, L, r]`` and
    ``right [B, r, d_c]`` (the latent is ``factor @ right``); the RoPE keys either exact (``rope [B, L, p]``)
    or factored (``rope_factor [B, L, r_p]`` @ ``rope_right [B, r_p, p]``)."""

    factor: torch.Tensor
    right: torch.Tensor
    rope: torch.Tensor | None = None
    rope_factor: torch.Tensor | None = None
    rope_right: torch.Tensor | None = None

    def latent(self) -> torch.Tensor:
        return torch.bmm(self.factor, self.right)

    def rope_key(self) -> torch.Tensor:
        return self.rope if self.rope is not None else torch.bmm(self.rope_factor, self.rope_right)


@dataclass
class LatentParts:
    """A layer's tokens in order for :func:`factored_latent_attention`: its compressed segments, then the
    exact tail (``tail_latent [B, t, d_c]``, ``tail_rope [B, t, p]``)."""

    segments: list[SegmentView]
    tail_latent: torch.Tensor
    tail_rope: torch.Tensor


# -- the layers ------------------------------------------------------------------------------------------
class XKVLatentLayer(RowMapped, GrowableLayer):
    """One layer of an :class:`XKVLatentCache`.

    ``keys``/``values`` (the ``cache_utils`` names) are the exact tail: latent ``[B, 1, t, d_c]`` and RoPE
    key ``[B, 1, t, p]``, in growable storage. Per compressed segment of its group the layer holds its
    reconstruction matrix ``rights[j]`` ``[B, r, d_c]`` and either its exact RoPE keys ``ropes[j]``
    ``[B, 1, L, p]`` or their matrix ``rope_rights[j]`` ``[B, r_p, p]``; the token factors are the group's.

    ``update`` returns every token's latent and RoPE key (the compressed ones rebuilt, ``A B_l``), which the
    stock model and ``patch_mla`` attend over; ``update(..., factored=True)`` (``patch_xkv_mla``) returns
    ``(LatentParts, None)`` instead, read before this update's compression.
    """

    def __init__(self, cache: "XKVLatentCache", layer_idx: int, group: _LatentGroup, position_in_group: int):
        super().__init__()
        self._cache = cache
        self.layer_idx = layer_idx
        self.group = group
        self.position_in_group = position_in_group
        self.rights: list[_Matrix] = []
        self.ropes: list[torch.Tensor | None] = []
        self.rope_rights: list[_Matrix | None] = []

    # -- validation ----------------------------------------------------------------------------------
    def check_states(self, latent: torch.Tensor, rope_key: torch.Tensor) -> None:
        """Raise (before any state changes) unless the states are this layer's latent and RoPE key."""
        cache = self._cache
        for name, states, width in (("latent", latent, cache.kv_lora_rank), ("rope key", rope_key, cache.qk_rope_head_dim)):
            if not isinstance(states, torch.Tensor) or states.dim() != 4 or states.shape[1] != 1 or states.shape[-1] != width:
                raise ValueError(
                    f"XKVLatentCache layer {self.layer_idx} expects the {name} as [batch, 1, tokens, {width}], got "
                    f"{tuple(getattr(states, 'shape', ()))}; per-head states come from transformers < 5.17 "
                    "(patch the model with patch_xkv_mla or patch_mla) or from a model of another config")
        if latent.shape[0] != rope_key.shape[0] or latent.shape[2] != rope_key.shape[2]:
            raise ValueError("the latent and the rope key must have the same batch size and token count")
        ref = self.keys
        if ref is not None:
            if latent.dtype != ref.dtype:
                raise TypeError(f"dtype mismatch at layer {self.layer_idx}: got {latent.dtype}; this XKVLatentCache "
                                "holds another dtype (use a new cache)")
            if latent.device != ref.device:
                raise ValueError(f"device mismatch at layer {self.layer_idx}: got {latent.device}, the cache lives "
                                 f"on {ref.device}")
            if latent.shape[0] != ref.shape[0]:
                raise ValueError(f"batch size {latent.shape[0]} does not match the {ref.shape[0]} rows this "
                                 "XKVLatentCache holds; use a new cache for another batch")

    # -- the cache_utils contract --------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, factored: bool = False, **kwargs):
        """Append the latent (``key_states``) and RoPE key (``value_states``); return every token's, or with
        ``factored=True`` the layer's :class:`LatentParts`. A multi-token update of the group's last layer
        then compresses the group (after what it returns was read)."""
        self.check_states(key_states, value_states)
        compresses = key_states.shape[-2] > 1 and self.position_in_group == len(self.group.layer_indices) - 1
        super().update(key_states, value_states)
        out = (self.parts(), None) if factored else self.full_states()
        if compresses:
            self._cache.compress_group(self.group)
        return out

    def compressed_tokens(self) -> int:
        return sum(s.length for s in self.group.segments[: len(self.rights)])

    def get_seq_length(self) -> int:
        """Tokens held (compressed + exact)."""
        return (self.compressed_tokens() + self._length) if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def views(self) -> list[SegmentView]:
        """This layer's compressed segments, dequantised, in token order."""
        out = []
        for segment, right, rope, rope_right in zip(self.group.segments, self.rights, self.ropes, self.rope_rights):
            dtype = segment.dtype
            view = SegmentView(segment.factor.value(dtype), right.value(dtype))
            if rope is not None:
                view.rope = rope[:, 0]
            else:
                view.rope_factor, view.rope_right = segment.rope_factor.value(dtype), rope_right.value(dtype)
            out.append(view)
        return out

    def parts(self) -> LatentParts:
        return LatentParts(self.views(), self.keys[:, 0], self.values[:, 0])

    def full_states(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every token's latent ``[B, 1, T, d_c]`` and RoPE key ``[B, 1, T, p]``, compressed ones rebuilt."""
        if not self.rights:
            return self.keys, self.values
        views = self.views()
        latent = torch.cat([v.latent() for v in views] + [self.keys[:, 0]], dim=1)
        rope = torch.cat([v.rope_key() for v in views] + [self.values[:, 0]], dim=1)
        return latent[:, None], rope[:, None]

    def host_length(self) -> int:
        return self.get_seq_length()

    def crop(self, tokens_to_remove: int) -> None:
        """``DynamicLayer.crop``'s rule (:func:`kvcompress.storage.stock_crop_length`) within the exact tail;
        ValueError if it would cut into compressed tokens."""
        held = self.get_seq_length()
        length = stock_crop_length(held, tokens_to_remove)
        compressed = self.compressed_tokens()
        if length < compressed:
            raise ValueError(f"cannot crop({tokens_to_remove}): layer {self.layer_idx} holds {compressed} "
                             f"compressed tokens that cannot be cut; allowed: crop(-1)..crop(-{held - compressed})")
        if self.is_initialized:
            self._length = length - compressed

    def reset(self) -> None:
        super().reset()
        self.rights, self.ropes, self.rope_rights = [], [], []

    def _map_rows(self, fn) -> None:
        self.rights = [m.map(fn) for m in self.rights]
        self.ropes = [None if t is None else fn(t) for t in self.ropes]
        self.rope_rights = [None if m is None else m.map(fn) for m in self.rope_rights]

    def nbytes(self) -> int:
        """Bytes of the exact tail and of this layer's matrices and RoPE keys (the factors: the cache's)."""
        return super().nbytes() + self._own_nbytes()

    def reserved_nbytes(self) -> int:
        return super().reserved_nbytes() + self._own_nbytes()

    def _own_nbytes(self) -> int:
        tensors = [t for m in self.rights for t in m.tensors()] + [t for t in self.ropes if t is not None]
        tensors += [t for m in self.rope_rights if m is not None for t in m.tensors()]
        return tensor_nbytes(*tensors)


class XKVLatentCache(RowMapped, CheckedLayersCache):
    """xKV's cross-layer SVD over the latent cache of a DeepSeek-V2/V3 (or TransMLA-converted) model.

    Use it with a model patched by :func:`patch_xkv_mla` (decode attends over the rank-``r`` factors
    directly), with ``patch_mla`` or with the stock model (both attend over the rebuilt latent)::

        handle = patch_xkv_mla(model)
        cache = XKVLatentCache(model.config, group_size=2, latent_rank=0.5)
        out = model.generate(**inputs, past_key_values=cache, max_new_tokens=64)
        print(cache.nbytes())

    Args:
        config: the model or its config (``model_type`` deepseek_v2 / deepseek_v3).
        group_size: adjacent layers sharing one SVD; must divide ``num_hidden_layers`` (None: the divisor
            nearest 4).
        latent_rank: rank ``r`` of a group's latent SVD: an int in ``1..group_size*kv_lora_rank``, a fraction of that
            width, or None (full rank: exact up to rounding).
        rope_rank: None (RoPE keys exact) or the rank of the group's RoPE-key SVD, as ``latent_rank`` over
            ``group_size*qk_rope_head_dim``.
        window, min_compress_tokens, merge_segments, svd_method, factor_bits, matrix_bits: see
            :class:`XKVLatentParams` and the module docstring.
    """

    def __init__(self, config, group_size: int | None = XKVLatentParams.group_size,
                 latent_rank: Rank = XKVLatentParams.latent_rank, rope_rank: Rank = XKVLatentParams.rope_rank,
                 window: int = XKVLatentParams.window, min_compress_tokens: int = XKVLatentParams.min_compress_tokens,
                 merge_segments: bool = XKVLatentParams.merge_segments, svd_method: str = XKVLatentParams.svd_method,
                 factor_bits: int | None = XKVLatentParams.factor_bits,
                 matrix_bits: int | None = XKVLatentParams.matrix_bits):
        cfg = _mla_config(config, "XKVLatentCache")
        self.params = XKVLatentParams(group_size=group_size, latent_rank=latent_rank, rope_rank=rope_rank, window=window,
                                      min_compress_tokens=min_compress_tokens, merge_segments=merge_segments,
                                      svd_method=svd_method, factor_bits=factor_bits, matrix_bits=matrix_bits)
        self.num_layers = cfg.num_hidden_layers
        self.kv_lora_rank = cfg.kv_lora_rank
        self.qk_rope_head_dim = cfg.qk_rope_head_dim
        if group_size is None:
            group_size = default_group_size(self.num_layers)
        if self.num_layers % group_size:
            divisors = [g for g in range(1, self.num_layers + 1) if self.num_layers % g == 0]
            raise ValueError(f"group_size={group_size} does not divide num_hidden_layers={self.num_layers}; "
                             f"allowed: {divisors} (or None)")
        self.group_size = group_size
        self.rank = resolve_latent_rank("latent_rank", latent_rank, group_size * self.kv_lora_rank, "group_size * kv_lora_rank")
        self.rope_rank = None if rope_rank is None else resolve_latent_rank(
            "rope_rank", rope_rank, group_size * self.qk_rope_head_dim, "group_size * qk_rope_head_dim")
        self.groups = [_LatentGroup(list(range(g, g + group_size))) for g in range(0, self.num_layers, group_size)]
        layers = [XKVLatentLayer(self, i, self.groups[i // group_size], i % group_size) for i in range(self.num_layers)]
        super().__init__(layers=layers)

    def check_module(self, module: torch.nn.Module) -> None:
        """Raise ValueError if ``module`` (a DeepSeek attention) does not produce what this cache holds."""
        if module.kv_lora_rank != self.kv_lora_rank or module.qk_rope_head_dim != self.qk_rope_head_dim:
            raise ValueError(
                f"cache/model mismatch: the model's attention has kv_lora_rank={module.kv_lora_rank} and "
                f"qk_rope_head_dim={module.qk_rope_head_dim}, this XKVLatentCache was built for kv_lora_rank="
                f"{self.kv_lora_rank} and qk_rope_head_dim={self.qk_rope_head_dim}; build it from this model's config")

    # -- compression ---------------------------------------------------------------------------------
    def _factorise(self, stacked: torch.Tensor, rank: int, previous: LatentSegment | None, rope: bool,
                   rights: list[torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        if previous is None:
            return truncated_svd(stacked, rank, self.params.svd_method)
        old = previous.rope_factor if rope else previous.factor
        return extend_truncated_svd(old.value(previous.dtype), torch.cat(rights, dim=-1), stacked, rank,
                                    self.params.svd_method)

    def compress_group(self, group: _LatentGroup) -> None:
        """Compress every exact token of ``group``'s layers older than the ``window`` most recent ones (see
        the module docstring); nothing when fewer than ``min_compress_tokens`` are due."""
        params = self.params
        layers = [self.layers[i] for i in group.layer_indices]
        tail = layers[0]._length
        if any(layer._length != tail or len(layer.rights) != len(group.segments) for layer in layers):
            raise RuntimeError("layers of an xKV group disagree on their tokens")  # a bug, not user input
        count = max(tail - params.window, 0)
        if count < params.min_compress_tokens:
            return
        dtype = layers[0].keys.dtype
        merge = params.merge_segments and bool(group.segments)
        previous = group.segments[-1] if merge else None
        latents = torch.cat([layer.keys[:, 0, :count] for layer in layers], dim=-1)  # [B, n, G*d_c]
        old_rights = [layer.rights[-1].value(dtype) for layer in layers] if merge else None
        left, right = self._factorise(latents, self.rank, previous, False, old_rights)
        rope_factor, rope_rights = None, None
        if self.rope_rank is not None:
            ropes = torch.cat([layer.values[:, 0, :count] for layer in layers], dim=-1)
            old = [layer.rope_rights[-1].value(dtype) for layer in layers] if merge else None
            rope_left, rope_right = self._factorise(ropes, self.rope_rank, previous, True, old)
            rope_factor = _Factor.make(rope_left, params.factor_bits)
            rope_rights = rope_right.chunk(len(layers), dim=-1)
        start = previous.start if merge else (group.segments[-1].start + group.segments[-1].length
                                              if group.segments else 0)
        length = (previous.length if merge else 0) + count
        segment = LatentSegment(start, length, _Factor.make(left, params.factor_bits), rope_factor, dtype)
        if merge:
            group.segments[-1] = segment
        else:
            group.segments.append(segment)
        for i, (layer, layer_right) in enumerate(zip(layers, right.chunk(len(layers), dim=-1))):
            matrix = _Matrix.make(layer_right, params.matrix_bits)
            rope_exact = None
            rope_matrix = None if rope_rights is None else _Matrix.make(rope_rights[i], params.matrix_bits)
            if rope_rights is None:
                rope_exact = layer.values[:, :, :count].clone()
                if merge:
                    rope_exact = torch.cat([layer.ropes[-1], rope_exact], dim=2)
            if merge:
                layer.rights[-1], layer.ropes[-1], layer.rope_rights[-1] = matrix, rope_exact, rope_matrix
            else:
                layer.rights.append(matrix)
                layer.ropes.append(rope_exact)
                layer.rope_rights.append(rope_matrix)
            # the compressed tokens leave the tail: fresh storage for what remains (frees the prefill's)
            remaining_latent, remaining_rope = layer.keys[:, :, count:].clone(), layer.values[:, :, count:].clone()
            layer.keys = remaining_latent
            layer.values = remaining_rope

    # -- memory and batch operations -----------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes of every tensor held: the groups' token factors, the layers' matrices, RoPE keys and tails."""
        return sum(g.nbytes() for g in self.groups) + sum(layer.nbytes() for layer in self.layers)

    def reserved_nbytes(self) -> int:
        """As :meth:`nbytes` with the tails' spare capacity."""
        return sum(g.nbytes() for g in self.groups) + sum(layer.reserved_nbytes() for layer in self.layers)

    def expected_nbytes(self) -> int:
        """The memory formula of the module docstring on the current segments and tails."""
        total = 0
        for group in self.groups:
            layer0 = self.layers[group.layer_indices[0]]
            if not layer0.is_initialized:
                continue
            for j, segment in enumerate(group.segments):
                e = torch.empty((), dtype=segment.dtype).element_size()
                batch, length, r = segment.factor.data.shape
                total += _factor_bytes(batch, length, r, e, self.params.factor_bits)
                total += len(group.layer_indices) * _matrix_bytes(batch, r, self.kv_lora_rank, e, self.params.matrix_bits)
                if segment.rope_factor is None:
                    total += len(group.layer_indices) * batch * length * self.qk_rope_head_dim * e
                else:
                    rp = segment.rope_factor.data.shape[-1]
                    total += _factor_bytes(batch, length, rp, e, self.params.factor_bits)
                    total += len(group.layer_indices) * _matrix_bytes(batch, rp, self.qk_rope_head_dim, e,
                                                                      self.params.matrix_bits)
            for i in group.layer_indices:
                layer = self.layers[i]
                if layer.keys is not None:
                    total += layer.keys.shape[0] * layer._length * (self.kv_lora_rank + self.qk_rope_head_dim) * \
                        layer.keys.element_size()
        return total

    def _map_rows(self, fn) -> None:
        for group in self.groups:
            for segment in group.segments:
                segment.factor = segment.factor.map(fn)
                if segment.rope_factor is not None:
                    segment.rope_factor = segment.rope_factor.map(fn)

    def reset(self) -> None:
        super().reset()
        for group in self.groups:
            group.segments = []


def _factor_bytes(batch: int, length: int, rank: int, e: int, bits: int | None) -> int:
    if bits == 8:  # int8 entries + a scale per row and per component
        return batch * (length * rank + (length + rank) * e)
    return batch * length * rank * e


def _matrix_bytes(batch: int, rank: int, width: int, e: int, bits: int | None) -> int:
    if bits == 8:  # int8 entries + a scale per column
        return batch * (rank * width + width * e)
    return batch * rank * width * e


# -- attention over the factors --------------------------------------------------------------------------
def factored_latent_attention(q_latent: torch.Tensor, q_rope: torch.Tensor, parts: LatentParts,
                              mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """:func:`kvcompress.mla.absorbed_attention` over a layer's :class:`LatentParts`, never rebuilding the
    compressed latents: a segment's scores are ``(q_latent B^T) A^T`` and its share of the output
    ``(w A) B`` (the module docstring); RoPE scores from the exact keys, or ``(q_rope B_p^T) A_p^T``.

    Args:
        q_latent: ``[B, H, S, d_c]`` (the absorbed query), q_rope: ``[B, H, S, p]`` (rotated).
        parts: the layer's segments and exact tail, ``T`` tokens in all.
        mask: as :func:`~kvcompress.mla.absorbed_attention` (``None``: causal; boolean or additive ``[B|1, 1, S, T]``).
        scale: the softmax scale.

    Returns:
        ``[B, H, S, d_c]``: per head the attention-weighted sum of the latents (apply ``W_UV`` next).
    """
    batch, heads, queries, width = q_latent.shape
    ql = q_latent.reshape(batch, heads * queries, width)
    qr = q_rope.reshape(batch, heads * queries, q_rope.shape[-1])
    pieces = []
    for view in parts.segments:
        score = torch.bmm(torch.bmm(ql, view.right.transpose(1, 2)), view.factor.transpose(1, 2))
        if view.rope is not None:
            score = score + torch.bmm(qr, view.rope.transpose(1, 2))
        else:
            score = score + torch.bmm(torch.bmm(qr, view.rope_right.transpose(1, 2)), view.rope_factor.transpose(1, 2))
        pieces.append(score)
    pieces.append(torch.baddbmm(torch.bmm(qr, parts.tail_rope.transpose(1, 2)), ql, parts.tail_latent.transpose(1, 2)))
    scores = (torch.cat(pieces, dim=-1) * scale).view(batch, heads, queries, -1)
    tokens = scores.shape[-1]
    lowest = torch.finfo(scores.dtype).min  # as absorbed_attention: a fully masked row is uniform, not NaN
    if mask is None:
        if queries > 1:
            rows = torch.arange(tokens - queries, tokens, device=scores.device)[:, None]
            scores = scores.masked_fill(~(torch.arange(tokens, device=scores.device)[None, :] <= rows), lowest)
    elif mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask[..., -tokens:], lowest)
    else:
        scores = scores + mask[..., -tokens:].to(scores.dtype)
    work = torch.float64 if scores.dtype == torch.float64 else torch.float32
    weights = torch.softmax(scores, dim=-1, dtype=work).to(q_latent.dtype).view(batch, heads * queries, tokens)
    pos = 0
    out = None
    for view in parts.segments:
        length = view.factor.shape[1]
        piece = torch.bmm(torch.bmm(weights[..., pos : pos + length], view.factor), view.right)
        out = piece if out is None else out + piece
        pos += length
    tail = torch.bmm(weights[..., pos:], parts.tail_latent)
    out = tail if out is None else out + tail
    return out.view(batch, heads, queries, width)


# -- the patch ---------------------------------------------------------------------------------------------
@dataclass
class _NewLatent:
    """What :meth:`XKVLatentDecode.project` hands to ``store``: the stock latent and whether this forward decodes."""

    latent: torch.Tensor
    decode: bool


class XKVLatentDecode(MLADecode):
    """The decode step of a model patched by :func:`patch_xkv_mla`: with an :class:`XKVLatentCache`, short
    forwards attend over the factors (:func:`factored_latent_attention`); with any other cache, or for the
    prefill, exactly :class:`kvcompress.mla.MLADecode`. ``factored_calls`` counts the factored forwards."""

    method = "patch_xkv_mla"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.factored_calls = 0

    def check_cache(self, module, cache) -> None:
        if isinstance(cache, XKVLatentCache):
            cache.check_module(module)
        else:
            super().check_cache(module, cache)

    def project(self, module, hidden_states, cache, decode):
        latent, k_rot = project_latent(module, hidden_states)
        return _NewLatent(latent, decode), k_rot

    def store(self, module, cache, latent, k_rot, compiling):
        if isinstance(cache, XKVLatentCache) and latent.decode:
            parts, _ = cache.update(latent.latent, k_rot, module.layer_idx, factored=True)
            return parts
        return super().store(module, cache, latent.latent, k_rot, compiling)

    def decode(self, module, q_nope, q_rot, stored, attention_mask, compiling):
        if not isinstance(stored, LatentParts):
            return super().decode(module, q_nope, q_rot, stored, attention_mask, compiling)
        self.factored_calls += 1
        w_uk, w_uv_t = self._weights(module, compiling)
        out_latent = factored_latent_attention(absorb_query(q_nope, w_uk), q_rot, stored, attention_mask, module.scaling)
        return absorb_output(out_latent, w_uv_t)


def _xkv_mla_forward(self, hidden_states: torch.Tensor, *args, **kwargs):
    """Forward of an attention patched by :func:`patch_xkv_mla` (bound to the module)."""
    return deepseek_attention_forward(self, getattr(self, _STATE_ATTRIBUTE), hidden_states, *args, **kwargs)


def patch_xkv_mla(model: torch.nn.Module, max_absorbed_tokens: int = XKVLatentParams.max_absorbed_tokens) -> PatchHandle:
    """Install factored decode on every DeepSeek-V2/V3 attention of ``model``: with an :class:`XKVLatentCache`,
    forwards of at most ``max_absorbed_tokens`` new tokens attend over the group factors without rebuilding
    the latent; everything else is :func:`kvcompress.mla.patch_mla`'s (absorbed decode over an
    ``MLALatentCache``/``DynamicCache``, the stock prefill). ``handle.remove()`` restores the stock forward.

    Args:
        model: a DeepSeek-V2/V3 model (``eager`` or ``sdpa`` attention).
        max_absorbed_tokens: an int >= 1.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    cfg = _mla_config(model, "patch_xkv_mla")
    XKVLatentParams(max_absorbed_tokens=max_absorbed_tokens)
    check_attn_implementation(cfg, "patch_xkv_mla")
    modules = mla_attention_modules(model)
    if not modules:
        raise ValueError(f"no DeepSeek MLA attention (kv_b_proj) found in {type(model).__name__}")
    if any(hasattr(m, a) for m in modules for a in (_STATE_ATTRIBUTE, "kvcompress_mla", "kvcompress_tpla")):
        raise ValueError("this model is already patched (by patch_xkv_mla, patch_mla or patch_tpla); call remove() "
                         "on that handle first")
    rope = rope_style(cfg)
    states = [XKVLatentDecode(AbsorbedWeights.build(m), max_absorbed_tokens, rope,
                              modeling_file(m, rope, "patch_xkv_mla")) for m in modules]
    handle = PatchHandle(model, "xkv_mla")
    for module, state in zip(modules, states):
        set_attribute(module, _STATE_ATTRIBUTE, state, handle)
        replace_forward(module, _xkv_mla_forward, handle)
    return handle


# -- the registered method ---------------------------------------------------------------------------------
def _build_xkv_mla(model_or_config, max_absorbed_tokens: int = XKVLatentParams.max_absorbed_tokens,
                   **params) -> XKVLatentCache:
    return XKVLatentCache(model_or_config, **params)  # max_absorbed_tokens belongs to the patch


def _install_xkv_mla(model, handle: PatchHandle, max_absorbed_tokens: int = XKVLatentParams.max_absorbed_tokens,
                     **params) -> None:
    handle.add_undo(patch_xkv_mla(model, max_absorbed_tokens=max_absorbed_tokens).remove)


register_method(
    "xkv_mla",
    summary="xKV over the MLA latent: adjacent layers share one low-rank factor of DeepSeek's latent",
    build=_build_xkv_mla,
    params=XKVLatentParams,
    families=SUPPORTED_MODEL_TYPES,
    install=_install_xkv_mla,
    cache_class="kvcompress.xkv_latent.XKVLatentCache",
    doc="docs/xkv_mla.md",
)
