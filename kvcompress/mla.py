"""MLA (multi-head latent attention, DeepSeek-V2/V3): a latent-only cache and absorbed decode.

The maths
---------
DeepSeek's attention compresses every token ``t`` into a normalised latent ``c_t`` (``kv_lora_rank``
values, ``r``) and one rotated RoPE key ``k^R_t`` (``qk_rope_head_dim``, ``p``) shared by all heads. Head
``h``'s key and value are rebuilt from the latent with the two halves of ``kv_b_proj``::

    k_h,t = [W_UK_h c_t ; k^R_t]        (W_UK_h: nope x r)
    v_h,t = W_UV_h c_t                  (W_UV_h: v x r)

Stock ``transformers`` caches only ``(c, k^R)`` but runs ``kv_b_proj`` over *every cached token* at every
step to rebuild all heads' keys and values: ``H * (nope + v) * T`` elements written and read per layer and
step. Matrix products associate, so with query ``q_h = [q^N_h ; q^R_h]``::

    q_h . k_h,t  = (W_UK_h^T q^N_h) . c_t  +  q^R_h . k^R_t       (W_UK folded into the query)
    sum_t a_h,t v_h,t = W_UV_h (sum_t a_h,t c_t)                  (W_UV applied after the weighted sum)

The *absorbed* path therefore maps each query into latent space once (``q_latent_h = W_UK_h^T q^N_h``,
``r`` values), scores it against the cached ``c`` and ``k^R`` (every head reads the same cache, like
multi-query attention with head dim ``r + p``), takes the softmax, sums the latents with those weights and
only then applies ``W_UV_h`` and ``o_proj``. Per step and layer it reads the cache once, ``T * (r + p)``
elements, and never materialises a per-head key or value. It is exact in real arithmetic; in floating
point it differs from the stock path by rounding only (tests: fp32 logits within 1e-4, same tokens).

Prefill (more than ``max_absorbed_tokens`` new tokens) is compute-bound and keeps the stock recipe:
expand the latent with ``kv_b_proj`` and call the model's attention implementation, which gives results
bitwise equal to the unpatched model.

``MLALatentCache`` holds per layer exactly ``c`` ``[B, 1, T, r]`` and ``k^R`` ``[B, 1, T, p]``:
``nbytes() = layers * B * T * (r + p) * element_size``.

torch.compile / CUDA graphs
--------------------------
``MLALatentCache(config, max_cache_len=N)`` has ``StaticLayer`` semantics (fixed-capacity storage at
static addresses, a 0-d device length counter, ``is_compileable``), so ``generate`` compiles the patched
decode step like it does for ``StaticCache``. The patched forward then passes the full-capacity latent and
``kv_lengths`` (the device counter) to the decode attention: no shape or Python value changes between
steps (no recompiles), no host syncs, no graph breaks (``fullgraph=True``). On CUDA the Triton kernel is
called through a ``torch.library.triton_op`` inside compiled code, so inductor keeps it in the graph and
mode ``reduce-overhead`` captures the whole step in a CUDA graph.

The forward
-----------
The attention forward (argument binding, projections, RoPE, prefill) is
:func:`kvcompress.deepseek.deepseek_attention_forward`, shared with TPLA; this module gives its decode
step, :class:`MLADecode`. A patched model serves any cache holding the latent (``MLALatentCache``,
``DynamicCache``) or none (``use_cache=False``, a plain forward with ``labels``) like the stock model.

Which transformers versions
---------------------------
In transformers 5.17 through 5.24 DeepSeek-V2/V3 attention hands the cache the latent (``[B, 1, S, r]``
and ``[B, 1, S, p]``), so ``MLALatentCache`` also works on an unpatched model (without the speed-up).
Older versions handed the cache decompressed per-head K/V; the cache cannot recover the latent from them
without ``kv_b_proj``'s weights, so it *refuses* them with a ValueError saying so. A model patched with
:func:`patch_mla` never hits that case on any version: the patched forward computes the latent itself and
only ever passes the latent to the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .deepseek import (SUPPORTED_ATTN_IMPLEMENTATIONS, SUPPORTED_MODEL_TYPES, CheckedLayersCache, LatentDecode,
                       absorb_output, absorb_query, attention_modules, check_attn_implementation,
                       deepseek_attention_forward, deepseek_config, modeling_file, rope_style)
from .kernels import triton_usable
from .kernels.mla_decode import key_mask_from_attention_mask, mla_decode_attention
from .registry import MethodParams, Range, param, register_method
from .ops import tensor_nbytes
from .hooks import PatchHandle, replace_forward, set_attribute
from .storage import GrowableLayer, StaticBufferLayer

_STATE_ATTRIBUTE = "kvcompress_mla"


@dataclass(frozen=True)
class MLAParams(MethodParams):
    """The parameters of the registered method ``mla`` (:func:`patch_mla` and :class:`MLALatentCache`)."""

    method: ClassVar[str] = "mla"

    max_absorbed_tokens: int = param(16, "forwards of at most this many new tokens take the absorbed path "
                                     "(patch_model only)", Range(int, low=1))
    max_cache_len: int | None = param(None, "None (storage grows) or a fixed capacity in tokens "
                                      "(static shapes: compileable, CUDA graphs)", Range(int, low=1), none_ok=True)


def _mla_config(config, what: str = "MLA latent caching"):
    """The text config of a DeepSeek-V2/V3 model or config; raises ValueError for anything else."""
    return deepseek_config(config, what)


# -- the cache ----------------------------------------------------------------------------------------


class _LatentLayerNames:
    """What the MLA cache layers share: ``keys``/``values`` hold the latent and the RoPE key (the names
    ``cache_utils`` uses), ``latent``/``rope_key`` say so, and ``check_states`` validates new states
    (shapes, dtypes and devices only, so it is traceable by torch.compile)."""

    layer_idx: int
    kv_lora_rank: int
    qk_rope_head_dim: int

    def _set_widths(self, layer_idx: int, kv_lora_rank: int, qk_rope_head_dim: int) -> None:
        self.layer_idx = layer_idx
        self.kv_lora_rank = kv_lora_rank
        self.qk_rope_head_dim = qk_rope_head_dim

    @property
    def latent(self) -> torch.Tensor | None:
        """The latent storage (``keys``; a static layer returns its whole capacity), None before the first update."""
        return self.keys if self.is_initialized else None

    @property
    def rope_key(self) -> torch.Tensor | None:
        """The RoPE-key storage (``values``), None before the first update."""
        return self.values if self.is_initialized else None

    def check_states(self, latent: torch.Tensor, rope_key: torch.Tensor) -> None:
        """Raise (before any state changes) unless the states are this layer's latent and RoPE key."""
        for name, states, width in (("latent", latent, self.kv_lora_rank), ("rope key", rope_key, self.qk_rope_head_dim)):
            if not isinstance(states, torch.Tensor) or states.dim() != 4:
                raise ValueError(f"MLALatentCache expects the {name} as a 4-D tensor [batch, 1, tokens, {width}]")
        if latent.shape[1] != 1 or rope_key.shape[1] != 1:
            raise ValueError(
                f"layer {self.layer_idx} got states of shapes {tuple(latent.shape)} and {tuple(rope_key.shape)}: "
                "per-head (decompressed) keys/values, as older transformers versions' DeepSeek attention passes. "
                "MLALatentCache stores only the latent and cannot recover it without kv_b_proj; patch the model "
                "with kvcompress.mla.patch_mla(model) (it passes the latent on any version) or use DynamicCache"
            )
        if latent.shape[-1] != self.kv_lora_rank or rope_key.shape[-1] != self.qk_rope_head_dim:
            raise ValueError(
                f"cache/model mismatch at layer {self.layer_idx}: got latent width {latent.shape[-1]} and rope key "
                f"width {rope_key.shape[-1]}, but this MLALatentCache was built for kv_lora_rank="
                f"{self.kv_lora_rank} and qk_rope_head_dim={self.qk_rope_head_dim}; build it from this model's config"
            )
        if latent.shape[0] != rope_key.shape[0] or latent.shape[2] != rope_key.shape[2]:
            raise ValueError("the latent and the rope key must have the same batch size and token count")
        if latent.dtype != rope_key.dtype:
            raise TypeError(f"the latent ({latent.dtype}) and the rope key ({rope_key.dtype}) must share a dtype")
        if self.is_initialized:
            if latent.dtype != self.keys.dtype:
                raise TypeError(
                    f"dtype mismatch at layer {self.layer_idx}: the model produced {latent.dtype} but this "
                    f"MLALatentCache holds {self.keys.dtype}; allowed: {self.keys.dtype} (use a new cache for another dtype)"
                )
            if latent.device != self.keys.device:
                raise ValueError(
                    f"device mismatch at layer {self.layer_idx}: the model runs on {latent.device} but this "
                    f"MLALatentCache lives on {self.keys.device}; allowed: {self.keys.device}"
                )
            if self.keys.numel() and latent.shape[0] != self.keys.shape[0]:
                raise ValueError(
                    f"batch size {latent.shape[0]} does not match the {self.keys.shape[0]} rows this MLALatentCache "
                    "holds; use a new cache for another batch"
                )


class MLALatentLayer(_LatentLayerNames, GrowableLayer):
    """One layer of an :class:`MLALatentCache`: the latent ``c`` (``keys``, ``[B, 1, T, kv_lora_rank]``) and
    the rotated RoPE key (``values``, ``[B, 1, T, qk_rope_head_dim]``), appended token by token.

    The names ``keys``/``values`` are the ones ``cache_utils`` layers use (crop, reorder, batch ops and
    offloading work on them unchanged); :attr:`latent` and :attr:`rope_key` say what they hold.
    """

    def __init__(self, layer_idx: int, kv_lora_rank: int, qk_rope_head_dim: int, max_cache_len: int | None = None):
        super().__init__(max_cache_len)
        self._set_widths(layer_idx, kv_lora_rank, qk_rope_head_dim)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``key_states`` (the latent) and ``value_states`` (the rope key); return the whole sequence's."""
        self.check_states(key_states, value_states)
        return super().update(key_states, value_states, *args, **kwargs)


class StaticMLALatentLayer(_LatentLayerNames, StaticBufferLayer):
    """One layer of an :class:`MLALatentCache` built with ``max_cache_len``: fixed-capacity storage that a
    compiled / CUDA-graph-captured decode step can update (:class:`kvcompress.storage.StaticBufferLayer`,
    transformers' ``StaticLayer`` recipe).

    ``keys`` (the latent, ``[B, 1, max_cache_len, kv_lora_rank]``) and ``values`` (the RoPE key,
    ``[B, 1, max_cache_len, qk_rope_head_dim]``) are allocated once at the first update and marked as static
    addresses; ``cumulative_length`` is a 0-d device tensor counting the valid tokens. An update writes the
    new tokens in place and returns the *whole* storage, so shapes never change between steps; the tail
    past ``cumulative_length`` is stale and must be masked (the mask transformers builds for a static cache
    does, and the patched attention also passes ``kv_lengths = cumulative_length`` to the decode kernel).
    ``is_compileable = True`` (inherited) makes ``generate`` compile the decode step on GPU, as for
    ``StaticCache``.
    """

    def __init__(self, layer_idx: int, kv_lora_rank: int, qk_rope_head_dim: int, max_cache_len: int):
        super().__init__(max_cache_len)
        self._set_widths(layer_idx, kv_lora_rank, qk_rope_head_dim)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the new tokens at ``cumulative_length`` in place; return the full-capacity storage."""
        self.check_states(key_states, value_states)
        return super().update(key_states, value_states)



class MLALatentCache(CheckedLayersCache):
    """KV cache for DeepSeek-V2/V3 that holds, per layer and token, only the latent ``c`` and the rotated
    RoPE key: ``layers * batch * tokens * (kv_lora_rank + qk_rope_head_dim) * element_size`` bytes, nothing
    per head (DeepSeek-V2-Lite: 576 values per token and layer instead of 16 heads * (192 + 128) = 5120).

    Use it with a model patched by :func:`patch_mla` for absorbed decode::

        handle = patch_mla(model)
        cache = MLALatentCache(model.config)
        out = model.generate(**inputs, past_key_values=cache, max_new_tokens=64)
        print(cache.nbytes())

    It also works on an unpatched model on transformers >= 5.17 (same memory, stock speed).

    Without ``max_cache_len`` each layer keeps its tokens in preallocated storage that grows geometrically
    (see :class:`GrowableLayer`): a decode step writes one token in place instead of re-copying the cache.
    With it the layers are static (:class:`StaticMLALatentLayer`) and the cache is compileable::

        cache = MLALatentCache(model.config, max_cache_len=prompt_len + max_new_tokens)
        model.generate(..., past_key_values=cache, compile_config=CompileConfig(mode="reduce-overhead",
                       fullgraph=True))   # on CUDA generate compiles the decode step by itself
    ``nbytes()`` counts the valid tokens (the formula), ``reserved_nbytes()`` the allocated storage.

    Args:
        config: the model or its config; must be a DeepSeek-V2/V3 (``model_type`` deepseek_v2 / deepseek_v3).
        max_cache_len: ``None`` (grow as needed) or the fixed capacity in tokens, allocated at the first
            update. With it the layers are :class:`StaticMLALatentLayer` (``StaticLayer`` semantics: updates
            in place at a device-tensor position, the full-capacity storage is returned, ``is_compileable``),
            so ``generate`` compiles the decode step on GPU like ``StaticCache`` and a patched model's step
            can be captured in a CUDA graph. More tokens than ``max_cache_len`` raise ValueError (in eager
            updates; compiled steps cannot check without a host sync).
    """

    def __init__(self, config, max_cache_len: int | None = MLAParams.max_cache_len):
        cfg = _mla_config(config)
        self.num_layers = cfg.num_hidden_layers
        self.kv_lora_rank = cfg.kv_lora_rank
        self.qk_rope_head_dim = cfg.qk_rope_head_dim
        # not stored as ``self.max_cache_len``: transformers 5.17's Cache has a read-only property of that
        # name (deprecated there; get_max_length() answers max_cache_len for the static layers)
        if max_cache_len is None:
            layers = [MLALatentLayer(i, self.kv_lora_rank, self.qk_rope_head_dim) for i in range(self.num_layers)]
        else:  # fixed capacity: StaticLayer semantics, so generate() can compile the decode step
            layers = [StaticMLALatentLayer(i, self.kv_lora_rank, self.qk_rope_head_dim, max_cache_len)
                      for i in range(self.num_layers)]
        super().__init__(layers=layers)

    def check_module(self, module: torch.nn.Module) -> None:
        """Raise ValueError if ``module`` (a DeepSeek attention) does not produce what this cache holds."""
        if module.kv_lora_rank != self.kv_lora_rank or module.qk_rope_head_dim != self.qk_rope_head_dim:
            raise ValueError(
                f"cache/model mismatch: the model's attention has kv_lora_rank={module.kv_lora_rank} and "
                f"qk_rope_head_dim={module.qk_rope_head_dim}, this MLALatentCache was built for kv_lora_rank="
                f"{self.kv_lora_rank} and qk_rope_head_dim={self.qk_rope_head_dim}; build it from this model's config"
            )
        if not 0 <= module.layer_idx < self.num_layers:
            raise ValueError(
                f"cache/model mismatch: attention layer {module.layer_idx} but this MLALatentCache has "
                f"{self.num_layers} layers; build it from this model's config"
            )

    def nbytes(self) -> int:
        """Bytes of every valid token's latent and RoPE key, measured from the tensors themselves."""
        return sum(layer.nbytes() for layer in self.layers)

    def reserved_nbytes(self) -> int:
        """Bytes of the allocated storage (valid tokens + spare capacity), >= :meth:`nbytes`."""
        return sum(layer.reserved_nbytes() for layer in self.layers)

    def expected_nbytes(self) -> int:
        """The memory formula on the current token counts: ``sum_layers B * T * (r + p) * element_size``."""
        total = 0
        for layer in self.layers:
            if layer.is_initialized and layer.keys.numel():
                batch = layer.keys.shape[0]
                tokens = int(layer.get_seq_length())  # static layers: the valid tokens, not the capacity
                total += batch * tokens * (self.kv_lora_rank + self.qk_rope_head_dim) * layer.keys.element_size()
        return total


# -- absorbed attention ----------------------------------------------------------------------------------
def absorbed_attention(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    c_kv: torch.Tensor,
    k_rope: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Attention of latent-space queries over the cached latents: ``softmax(scale * (q_latent c^T + q_rope k_rope^T) + mask) c``.

    Every head attends over the same ``c_kv``/``k_rope`` (one shared "KV head" of width ``r + p``), so all
    heads' queries are stacked into one matrix per batch row and scored with a single batched matmul;
    nothing of size ``heads x tokens x head_dim`` is ever formed.

    Args:
        q_latent: ``[B, H, S, r]``, the no-RoPE query part already multiplied by ``W_UK`` (latent space).
        q_rope: ``[B, H, S, p]``, the rotated RoPE part of the query.
        c_kv: ``[B, T, r]`` (or ``[B, 1, T, r]``), the normalised latents of all ``T`` tokens.
        k_rope: ``[B, T, p]`` (or ``[B, 1, T, p]``), their rotated RoPE keys.
        mask: ``None`` (causal, the ``S`` queries being the last ``S`` of the ``T`` tokens), a boolean
            ``[B or 1, 1, S, T]`` tensor (True = attend) or an additive float mask of that shape.
        scale: the softmax scale (the module's ``scaling``).

    Returns:
        ``out_latent`` ``[B, H, S, r]``: per head, the attention-weighted sum of latents (apply ``W_UV`` next).
        Scores and mask are in the inputs' dtype and the softmax in float32 (float64 for float64 inputs),
        as in transformers' eager attention.
    """
    batch, heads, queries, rank = q_latent.shape
    if c_kv.dim() == 4:
        c_kv, k_rope = c_kv.flatten(1, 2), k_rope.flatten(1, 2)
    tokens = c_kv.shape[1]
    q_latent = q_latent.reshape(batch, heads * queries, rank)
    q_rope = q_rope.reshape(batch, heads * queries, q_rope.shape[-1])
    # scale * (q_latent c^T + q_rope k_rope^T) in two kernels, in the inputs' dtype (as eager attention)
    scores = torch.baddbmm(torch.bmm(q_rope, k_rope.transpose(1, 2)), q_latent, c_kv.transpose(1, 2),
                           beta=scale, alpha=scale).view(batch, heads, queries, tokens)
    lowest = torch.finfo(scores.dtype).min  # not -inf: a fully masked row gives uniform weights, not NaN (as eager)
    if mask is None:
        if queries > 1:
            # query i is token tokens - queries + i: it sees keys up to and including itself
            rows = torch.arange(tokens - queries, tokens, device=scores.device)[:, None]
            allowed = torch.arange(tokens, device=scores.device)[None, :] <= rows
            scores = scores.masked_fill(~allowed, lowest)
    elif mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask[..., -tokens:], lowest)
    else:
        scores = scores + mask[..., -tokens:].to(scores.dtype)
    work = torch.float64 if scores.dtype == torch.float64 else torch.float32  # softmax in float32 (or float64)
    weights = torch.softmax(scores, dim=-1, dtype=work).to(c_kv.dtype)
    out = torch.bmm(weights.view(batch, heads * queries, tokens), c_kv)
    return out.view(batch, heads, queries, rank)


def latent_attention(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    c_kv: torch.Tensor,
    k_rope: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    kv_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`absorbed_attention` through the Triton decode kernel when it can run
    (:func:`kvcompress.kernels.triton_usable`; not float64), else :func:`absorbed_attention` itself.

    The kernel reads the cache once for all heads and takes the mask as a per-key padding mask (the last
    query row of ``mask``) plus causality inside the new tokens, which is what transformers builds for
    DeepSeek (causal + padding); it computes scores in float32 where the plain path rounds them to the
    inputs' dtype first. Same arguments and result as :func:`absorbed_attention`.

    ``kv_lengths`` (int ``[B]`` on the cache's device): only the first ``kv_lengths[b]`` tokens of
    ``c_kv``/``k_rope`` exist (a fixed-capacity cache whose tail is stale). Then the kernel's semantics
    apply on every device (:func:`~kvcompress.kernels.mla_decode.mla_decode_attention`: the kernel, or its
    float32 reference on CPU), since the plain path has no notion of a valid length.
    """
    if kv_lengths is not None or (c_kv.dtype != torch.float64 and triton_usable(c_kv)):
        key_mask = key_mask_from_attention_mask(mask, q_latent.shape[0], c_kv.shape[-2])
        return mla_decode_attention(q_latent, q_rope, c_kv, k_rope, scale, kv_lengths=kv_lengths, key_mask=key_mask)
    return absorbed_attention(q_latent, q_rope, c_kv, k_rope, mask, scale)


@dataclass
class AbsorbedWeights:
    """The two halves of one attention's ``kv_b_proj`` arranged for the absorbed path, built at patch time.

    ``w_uk`` is ``[H, nope, r]`` (query side: ``q_latent_h = q^N_h @ w_uk[h]``) and ``w_uv_t`` is
    ``[H, r, v]`` (output side: ``o_h = out_latent_h @ w_uv_t[h]``). Both are views of ``kv_b_proj.weight``:
    no extra memory. Folding them further into ``q_proj``/``o_proj`` would save one small matmul each but
    make those weights ``r / nope`` = 4x larger (V2-Lite), more bytes per decode step, so it is not done.
    The views are rebuilt only if the weight tensor itself is replaced (``model.to(...)``).
    """

    w_uk: torch.Tensor
    w_uv_t: torch.Tensor
    source: torch.Tensor  # the kv_b_proj.weight they view
    builds: int = 1

    @staticmethod
    def views(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        weight = module.kv_b_proj.weight.detach()
        per_head = weight.view(module.num_heads, module.qk_nope_head_dim + module.v_head_dim, module.kv_lora_rank)
        return per_head[:, : module.qk_nope_head_dim], per_head[:, module.qk_nope_head_dim :].transpose(1, 2)

    @classmethod
    def build(cls, module: torch.nn.Module) -> "AbsorbedWeights":
        w_uk, w_uv_t = cls.views(module)
        return cls(w_uk, w_uv_t, module.kv_b_proj.weight)

    def current(self, module: torch.nn.Module) -> "AbsorbedWeights":
        weight = module.kv_b_proj.weight
        if weight is not self.source or weight.data_ptr() != self.w_uk.data_ptr():
            self.w_uk, self.w_uv_t = self.views(module)
            self.source = weight
            self.builds += 1
        return self


class MLADecode(LatentDecode):
    """The absorbed decode step of one patched attention (kept on the module as ``kvcompress_mla``).

    ``store`` hands the latent to the cache unchanged (any cache that holds the stock latent works:
    :class:`MLALatentCache` or ``DynamicCache``); ``decode`` is the absorbed attention; ``expand`` is
    ``kv_b_proj`` on the cached latent (the stock prefill). ``absorbed_calls`` / ``expanded_calls`` count
    the eager forwards of each kind.
    """

    method = "patch_mla"

    def __init__(self, weights: AbsorbedWeights, max_absorbed_tokens: int, rope: str, modeling):
        self.weights, self.max_absorbed_tokens, self.rope, self.modeling = weights, max_absorbed_tokens, rope, modeling
        self.absorbed_calls = 0
        self.expanded_calls = 0

    def check_cache(self, module, cache) -> None:
        if isinstance(cache, MLALatentCache):
            cache.check_module(module)

    def store(self, module, cache, latent, k_rot, compiling):
        kv_lengths = None
        if cache is not None:
            latent, k_rot = cache.update(latent, k_rot, module.layer_idx)
            layer = cache.layers[module.layer_idx] if isinstance(cache, MLALatentCache) else None
            if isinstance(layer, StaticMLALatentLayer):
                # the whole fixed-capacity storage came back: the valid length is the device counter (after
                # this update), never a Python int, so shapes and the graph stay the same at every step.
                # contiguous: the kernel reads LENS + b (an expanded 0-d tensor would have stride 0)
                kv_lengths = layer.cumulative_length.expand(latent.shape[0]).contiguous()
            if latent.dim() != 4 or latent.shape[1] != 1 or latent.shape[-1] != module.kv_lora_rank:
                raise ValueError(
                    f"the cache ({type(cache).__name__}) returned states of shape {tuple(latent.shape)} for layer "
                    f"{module.layer_idx}; the MLA path needs the latent [batch, 1, tokens, {module.kv_lora_rank}]: "
                    "use MLALatentCache or DynamicCache"
                )
        return latent, k_rot, kv_lengths

    def _weights(self, module, compiling):
        if compiling:
            # views taken inside the graph from kv_b_proj.weight (a parameter: a static input for CUDA
            # graphs, where a tensor kept on this object would be copied into the graph's inputs per replay)
            return AbsorbedWeights.views(module)
        weights = self.weights.current(module)
        return weights.w_uk, weights.w_uv_t

    def decode(self, module, q_nope, q_rot, stored, attention_mask, compiling):
        latent, k_rot, kv_lengths = stored
        if not compiling:
            self.absorbed_calls += 1
        w_uk, w_uv_t = self._weights(module, compiling)
        q_latent = absorb_query(q_nope, w_uk)
        out_latent = latent_attention(q_latent, q_rot, latent, k_rot, attention_mask, module.scaling, kv_lengths)
        return absorb_output(out_latent, w_uv_t)

    def expand(self, module, stored, compiling):
        latent, k_rot, _ = stored
        if not compiling:
            self.expanded_calls += 1
        return module.kv_b_proj(latent[:, 0]), k_rot


def _mla_forward(self, hidden_states: torch.Tensor, *args, **kwargs):
    """Forward of a patched DeepSeek-V2/V3 attention (bound to the module): absorbed for short inputs
    (decode), stock expansion for long ones (prefill). The cache only ever receives the latent."""
    return deepseek_attention_forward(self, getattr(self, _STATE_ATTRIBUTE), hidden_states, *args, **kwargs)


def mla_attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The DeepSeek-V2/V3 attention modules of ``model`` (those with ``kv_b_proj`` and ``kv_a_proj_with_mqa``)."""
    return attention_modules(model)


def patch_mla(model: torch.nn.Module, max_absorbed_tokens: int = MLAParams.max_absorbed_tokens) -> PatchHandle:
    """Install absorbed MLA attention on every DeepSeek-V2/V3 attention of ``model``.

    Forwards of at most ``max_absorbed_tokens`` new tokens (decode steps, short follow-up turns) take the
    absorbed path and never run ``kv_b_proj`` on the cache; longer ones (prefill) expand the latent like the
    stock model. ``handle.remove()`` restores the stock forward exactly. Works with ``MLALatentCache`` and
    with transformers' ``DynamicCache`` (which holds the same latent on transformers >= 5.17).

    Args:
        model: a DeepSeek-V2/V3 model (``model_type`` deepseek_v2 / deepseek_v3) using the ``eager`` or
            ``sdpa`` attention implementation.
        max_absorbed_tokens: an int >= 1.

    Returns:
        A :class:`~kvcompress.patch.PatchHandle`; also a context manager.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    cfg = _mla_config(model, "patch_mla")
    MLAParams(max_absorbed_tokens=max_absorbed_tokens)
    check_attn_implementation(cfg, "patch_mla")
    modules = mla_attention_modules(model)
    if not modules:
        raise ValueError(f"no DeepSeek MLA attention (kv_b_proj) found in {type(model).__name__}")
    if any(hasattr(m, _STATE_ATTRIBUTE) or hasattr(m, "kvcompress_tpla") for m in modules):
        raise ValueError("this model is already patched (by patch_mla or patch_tpla); call remove() on that handle first")
    rope = rope_style(cfg)
    states = [MLADecode(AbsorbedWeights.build(module), max_absorbed_tokens, rope, modeling_file(module, rope, "patch_mla"))
              for module in modules]
    # Everything is validated and built: now change the model.
    handle = PatchHandle(model, "mla")
    for module, state in zip(modules, states):
        set_attribute(module, _STATE_ATTRIBUTE, state, handle)
        replace_forward(module, _mla_forward, handle)
    return handle


# -- the registered method ---------------------------------------------------------------------------


def _build_mla(model_or_config, max_absorbed_tokens: int, max_cache_len: int | None = None) -> MLALatentCache:
    # max_absorbed_tokens belongs to the attention patch
    return MLALatentCache(model_or_config, max_cache_len=max_cache_len)


def _install_mla(model, handle: PatchHandle, max_absorbed_tokens: int, max_cache_len: int | None = None) -> None:
    # patch_mla validates (attention implementation, ...) before it changes anything, then records its
    # own undo steps; removing the outer handle removes it.
    handle.add_undo(patch_mla(model, max_absorbed_tokens=max_absorbed_tokens).remove)


register_method(
    "mla",
    summary="DeepSeek MLA: cache only the latent and RoPE key; absorbed attention for decode",
    build=_build_mla,
    params=MLAParams,
    families=SUPPORTED_MODEL_TYPES,
    install=_install_mla,
    cache_class="kvcompress.mla.MLALatentCache",
    doc="docs/mla.md",
)
