"""TPLA (tensor-parallel latent attention, Tang et al., arXiv 2508.15881) for DeepSeek-V2/V3 models:
the MLA latent is split across ``N`` shards, each shard caches only its slice.

The maths
---------
MLA caches per token the normalised latent ``c = g * n`` (``n = x / rms(x)``, ``x`` the latent rows of
``kv_a_proj_with_mqa``, ``g`` the weight of ``kv_a_layernorm``; ``r = kv_lora_rank`` values) and one RoPE key
``k^R`` (``p`` values) shared by all heads. Absorbed decode (``kvcompress.mla``) scores head ``h`` as
``s_h,t = q_lat_h . c_t + q^R_h . k^R_t`` with ``q_lat_h = W_UK_h^T q^N_h`` and outputs
``W_UV_h sum_t softmax(scale s_h)_t c_t``.

**Rotation (exact).** With an orthogonal ``Q`` (``r x r``: identity, Hadamard or PCA) TPLA caches
``z = Q^T c`` and uses ``W'_b = W_b Q`` instead of ``kv_b_proj``'s ``W_b``: ``W'_b z = W_b Q Q^T c = W_b c``.
``W'_b`` (hence the absorbed ``W'_UK``, ``W'_UV``) is folded from the live ``kv_b_proj`` weight and re-folded
only when that weight changes (:class:`TPLAWeights`); unless folded (below) the latent side costs one
``r x r`` matmul per *new* token and layer (DeepSeek-V3: 0.26 M multiply-adds, against 4.1 M for
``kv_a_proj`` and ``H * T * (r/N + p)`` = 1.3 G for a shard's attention at 32K), nothing per cached token.

**Folding ``Q`` into ``kv_a_proj`` (``fold_rotation=True``, opt-in).** The norm weight ``g`` multiplies
elementwise after the RMS division and does not commute with ``Q``, so the zero-cost fold caches
``z = Q^T n`` (``n = x / rms(x)``; computed as ``Q^T x / rms(Q^T x)`` from ``kv_a_proj``'s latent rows
replaced by ``Q^T W_a``, since ``rms(Q^T x) = rms(x)``) and moves ``g`` into ``W'_b = W_b diag(g) Q``:
``W'_b z = W_b diag(g) n = W_b c``. Decode then applies no rotation (the prompt's tokens still take one
``r x r`` product each, ``n Q``, beside the stock prefill). What is exact:

* ``N = 1``: in real arithmetic for any ``g`` (the whole latent is summed);
* ``N > 1``: equal to ``fold_rotation=False`` only when ``diag(g)`` commutes with ``Q`` (``g`` uniform;
  ``Q`` = identity is a no-op and not folded). Otherwise shard ``i`` holds ``(Q^T n)[S_i]`` instead of
  ``(Q^T c)[S_i]`` and sees the partial score ``(Q^T diag(g) W_UK^T q)[S_i] . (Q^T n)[S_i]`` instead of
  ``(Q^T W_UK^T q)[S_i] . (Q^T c)[S_i]``: another per-shard approximation, not a rounding difference (PCA
  is then taken on ``n``, what is cached);
* floating point, when ``g`` is far from uniform: a channel that ``g`` suppresses can dominate ``n`` and,
  once rotated, every coordinate of ``z``; the useful signal is then rounded away. TransMLA-converted
  models are the extreme case (an anchor channel ``10^4`` times larger than the rest with ``g = 0``):
  folded that way, SmolLM2's perplexity at ``N = 1`` moved from 27.54 to 27.95 with Hadamard. Rotating
  ``c`` itself (the default) keeps ``N = 1`` equal to MLA to rounding for every model.

**The norm is exact.** The RMSNorm is computed on the *full* latent of the new token(s) before
slicing: every shard computes the whole ``kv_a_proj`` output of the new token (a ``hidden x (r + p)``
matmul for one token) and keeps its slice. Local RMSNorm over a slice, one interference source the
paper names, therefore never happens here.

**Shards.** Shard ``i`` keeps ``z[S_i]`` (``S_i`` = the ``i``-th of ``N`` contiguous blocks of ``r / N``
coordinates) and a full copy of ``k^R`` (replicated, see below), and holds the columns ``S_i`` of
``W'_UK`` and ``W'_UV``. For every head it computes::

    s^i_h,t = q'_lat_h[S_i] . z_t[S_i] + q^R_h . k^R_t         (its slice of the latent score + full RoPE score)
    o^i_h   = W'_UV_h[:, S_i] sum_t softmax(scale s^i_h + mask)_t z_t[S_i]

and the output is ``o_h = sum_i o^i_h`` (one all-reduce of ``H * v_head_dim`` values per token and layer,
then ``o_proj``). The exact score is ``sum_i q'_lat[S_i] . z[S_i] + q^R . k^R``; shard ``i``'s softmax
misses the other shards' latent terms. **That per-shard softmax is TPLA's only approximation**; with
``N = 1`` it is absorbed MLA exactly (the rotation changes rounding only). It is also exact when
the latent of every token lies in one shard's coordinates (the other shards contribute ``z = 0``), which
is what PCA aims for on latents of low effective rank.

**RoPE key: replicated.** Every shard keeps all ``p`` values of ``k^R``. Positions then enter every
shard's softmax fully (splitting ``k^R`` would give each shard only part of the positional score, on top
of the latent's partial score), and it costs ``p`` values per token on each shard:
per-shard cache ``r / N + p`` instead of ``r + p`` (DeepSeek-V3, N = 2: 320 vs 576 values, 1.8x fewer
bytes read per decode step).

**Prefill in MLA form** (``prefill="mla"``, the default; the paper's split: prefill unchanged, decode on
the shards). The prompt (a forward on a layer's empty cache, or without a cache, whatever its length) and
every forward of more than ``max_absorbed_tokens`` new tokens run the model's own prefill: keys and values
of the new tokens are ``kv_b_proj`` of their full latent ``c`` (every shard computes ``c`` in full, so no
collective), those of tokens already cached come from the slices (``sum_i W'_b[:, S_i] z[S_i]``, an
all-reduce in distributed mode: exact), then the model's attention implementation. On an empty cache this
is bitwise the stock prefill. ``prefill="tpla"`` (the earlier behaviour) expands every token from the
slices (equal up to rounding) and lets a prompt of at most ``max_absorbed_tokens`` tokens take the
per-shard softmax: for such prompts of more than one token the two modes differ by TPLA's approximation
(a one-token prompt is exact either way: every shard's softmax is 1). Only decode uses the per-shard
softmax in the default mode. Under ``torch.compile`` the host does not know the cache length, so there a
forward of at most ``max_absorbed_tokens`` tokens is always a decode (generate's prefill runs eagerly).

Storage: ``TPLACache(max_cache_len=None)`` grows geometrically; with ``max_cache_len`` its layers are
static (``StaticLayer`` semantics, as for ``MLALatentCache``: fixed shapes, a device length counter passed
to the decode as every shard row's valid length, ``is_compileable``), so the decode step compiles with
``fullgraph=True`` and no recompiles. The folded weights a compiled step reads off the patch (not module
parameters) are marked as static addresses, so CUDA graphs read them in place rather than copy them into
the graph's inputs at every replay. A patched model also serves a cache of the stock latent
(``DynamicCache``, ``MLALatentCache``) or none, e.g. a plain ``model(input_ids, labels=...)``: the shard
slices are then cut from every cached latent at each forward (correct, not TPLA's memory or speed).
The attention forward itself is :func:`kvcompress.deepseek.deepseek_attention_forward`; this module
gives its decode step (:class:`TPLADecode`).

Modes: **simulated** (``shard=None``: one process holds all ``N`` shards, laid out as ``[B, N, T, r/N]``
and computed in one batched call; for accuracy evaluation and CPU) and **distributed**
(``distributed=True``: ``torch.distributed`` initialised by the caller, one rank per shard; the cache of
rank ``i`` holds only shard ``i``, its attention only its weight slices; the sum is an all-reduce).

Memory formula (per layer, batch ``B``, ``T`` tokens, element size ``e``)::

    per shard: B * T * (r / N + p) * e        all shards: B * T * (r + N * p) * e
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .deepseek import (SUPPORTED_MODEL_TYPES, CheckedLayersCache, LatentDecode, absorb_output, absorb_query,
                       attention_modules, check_attn_implementation, deepseek_attention_forward, deepseek_config,
                       modeling_file, rope_style)
from .hooks import PatchHandle, replace_forward, set_attribute
from .kernels import triton_usable
from .kernels.mla_decode import key_mask_from_attention_mask, mla_decode_attention
from .mla import absorbed_attention
from .storage import GrowableLayer, StaticBufferLayer
from .registry import MethodParams, Range, param, register_method

ROTATIONS = ("hadamard", "pca", None)
PREFILL_MODES = ("mla", "tpla")
_STATE_ATTRIBUTE = "kvcompress_tpla"


# -- validation -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TPLAParams(MethodParams):
    """The parameters of the registered method ``tpla`` (:func:`patch_tpla` and :class:`TPLACache`)."""

    method: ClassVar[str] = "tpla"

    num_shards: int = param(2, "latent shards N (each caches kv_lora_rank/N + the RoPE key)", Range(int, low=1),
                            note="must divide kv_lora_rank")
    rotation: str | None = param("hadamard", "orthogonal transform folded in before slicing",
                                 Range(str, choices=tuple(r for r in ROTATIONS if r is not None)), none_ok=True,
                                 note="hadamard needs kv_lora_rank a power of two")
    max_absorbed_tokens: int = param(16, "forwards of at most this many new tokens take the TPLA path "
                                     "(patch_model only)", Range(int, low=1))
    distributed: bool = param(False, "one torch.distributed rank per shard (world size = num_shards)", Range(bool))
    max_cache_len: int | None = param(None, "None (storage grows) or a fixed capacity in tokens "
                                      "(static shapes: compileable, CUDA graphs)", Range(int, low=1), none_ok=True)
    prefill: str = param("mla", "mla: the prompt (a forward on an empty cache) and long forwards run as ordinary "
                         "MLA with the model's kv_b_proj; tpla: short prompts take the per-shard softmax too "
                         "(patch_model only)", Range(str, choices=PREFILL_MODES))
    fold_rotation: bool = param(False, "fold the rotation into kv_a_proj's latent rows and kv_a_layernorm's "
                                "weight into the up-projections: no r x r matmul per new token (patch_model only)",
                                Range(bool), note="exact for N = 1 or a uniform kv_a_layernorm weight")


def check_layout(kv_lora_rank: int, num_shards: int, rotation: str | None) -> None:
    """Raise ValueError (naming the parameter and what is allowed) unless ``num_shards`` splits a latent of
    ``kv_lora_rank`` values and ``rotation`` is supported for it: the model-dependent rules (types and
    ranges are :class:`TPLAParams`'s, checked first by every caller).

    Heads are not split (every shard computes every head with its latent slice), so the head count
    puts no condition on ``num_shards``.
    """
    if num_shards > kv_lora_rank:
        raise ValueError(f"num_shards={num_shards} is larger than the latent (kv_lora_rank={kv_lora_rank}); "
                         f"allowed: divisors of {kv_lora_rank}")
    if kv_lora_rank % num_shards:
        divisors = [d for d in range(1, kv_lora_rank + 1) if kv_lora_rank % d == 0]
        raise ValueError(f"num_shards={num_shards} does not divide kv_lora_rank={kv_lora_rank}; allowed: {divisors}")
    if rotation == "hadamard" and kv_lora_rank & (kv_lora_rank - 1):
        raise ValueError(f"rotation='hadamard' needs kv_lora_rank to be a power of two (Sylvester Hadamard), got "
                         f"{kv_lora_rank}; use rotation='pca' or None for this model")


# -- rotations --------------------------------------------------------------------------------------
def hadamard_rotation(size: int) -> torch.Tensor:
    """The orthogonal Sylvester–Hadamard matrix ``H / sqrt(size)`` (float64) for a power-of-two ``size``.

    Every entry is ``+-1/sqrt(size)``: each latent coordinate is spread evenly over all coordinates, so a
    channel carrying a large share of the latent's energy gives every shard exactly ``1/N`` of it.
    """
    if size < 1 or size & (size - 1):
        raise ValueError(f"size must be a power of two, got {size}")
    from scipy.linalg import hadamard

    return torch.from_numpy(hadamard(size).astype("float64")) / math.sqrt(size)


def pca_rotation(latents: torch.Tensor) -> torch.Tensor:
    """Principal directions of ``latents`` (``[M, r]``) as the columns of an orthogonal ``r x r`` (float64).

    Eigenvectors of the uncentred second moment ``latents^T latents``, largest eigenvalue first, so shard 0
    gets the ``r/N`` strongest directions, shard 1 the next ones, and so on. Each column's sign is fixed
    (its largest-magnitude entry positive), so the result is deterministic for given activations.
    """
    x = latents.reshape(-1, latents.shape[-1]).to(torch.float64)
    _, vectors = torch.linalg.eigh(x.T @ x)
    vectors = vectors.flip(-1)  # descending eigenvalues
    pivot = vectors.abs().argmax(dim=0)
    signs = torch.sign(vectors[pivot, torch.arange(vectors.shape[1])])
    return vectors * torch.where(signs == 0, torch.ones_like(signs), signs)


def default_calibration(config, sequences: int = 4, tokens: int = 128, seed: int = 0) -> torch.LongTensor:
    """The deterministic default calibration input: ``sequences x tokens`` uniform random token ids drawn
    with ``torch.Generator`` seeded by ``seed``. Pass real text (e.g. ``transmla.calibration_tokens``) for
    trained models: PCA then sees the latents that model actually produces."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (sequences, tokens), generator=generator)


@torch.no_grad()
def calibration_latents(model: torch.nn.Module, calibration: torch.Tensor, weighted: bool = True) -> list[torch.Tensor]:
    """Per attention layer, the latents ``c`` the model caches (``[tokens, r]``, float64) for ``calibration``
    (token ids ``[sequences, tokens]``); with ``weighted=False`` the latents before ``kv_a_layernorm``'s
    weight, ``n = x / rms(x)`` (what ``fold_rotation=True`` caches, rotated).

    Computed from the decoder layers' inputs (``output_hidden_states``), no hooks: layer ``l``'s latent is
    ``kv_a_layernorm(kv_a_proj(input_layernorm(hidden_states[l]))[:r])``.
    """
    device = next(model.parameters()).device
    out = model(input_ids=calibration.to(device), output_hidden_states=True, use_cache=False)
    layers = model.model.layers
    latents = []
    for layer, hidden in zip(layers, out.hidden_states):
        attn = layer.self_attn
        x = attn.kv_a_proj_with_mqa(layer.input_layernorm(hidden))[..., : attn.kv_lora_rank]
        latent = attn.kv_a_layernorm(x) if weighted else unit_rms_norm(x, norm_epsilon(attn.kv_a_layernorm))
        latents.append(latent.to(torch.float64).reshape(-1, attn.kv_lora_rank))
    return latents


def norm_epsilon(norm: torch.nn.Module) -> float:
    """The epsilon of a DeepSeek RMSNorm (``variance_epsilon``, or ``eps``); ValueError if it has neither."""
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if not isinstance(eps, float):
        raise ValueError(f"fold_rotation=True needs kv_a_layernorm to be an RMSNorm with a float variance_epsilon, "
                         f"got {type(norm).__name__}; use fold_rotation=False")
    return eps


def unit_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / rms(x)`` computed as DeepSeek's RMSNorm does (in float32, back to ``x``'s dtype), without its weight."""
    x32 = x.to(torch.float32)
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


# -- the cache --------------------------------------------------------------------------------------
class _ShardStates:
    """What both TPLA cache layers share: ``keys`` = latent slices ``[B, n, T, r/N]`` and ``values`` = RoPE-key
    copies ``[B, n, T, p]``, where ``n`` is the number of shards held (``N`` simulated, 1 on a rank);
    ``keys[:, j]`` and ``values[:, j]`` are exactly what shard ``shards[j]`` holds."""

    layer_idx: int
    shards: tuple[int, ...]
    width: int
    rope_dim: int
    source: str | None  # "tpla", "tpla-folded" (a patch_tpla forward, fold_rotation) or "stock" (unpatched)

    def _set_layout(self, layer_idx: int, shards: tuple[int, ...], width: int, rope_dim: int) -> None:
        self.layer_idx, self.shards, self.width, self.rope_dim = layer_idx, shards, width, rope_dim
        self.source = None

    def check_states(self, latent: torch.Tensor, rope_key: torch.Tensor) -> None:
        """Raise (before any state changes) unless the states are this layer's shard slices."""
        want = (len(self.shards), self.width), (len(self.shards), self.rope_dim)
        for name, states, (n, width) in (("latent slices", latent, want[0]), ("rope keys", rope_key, want[1])):
            if not isinstance(states, torch.Tensor) or states.dim() != 4 or states.shape[1] != n or states.shape[-1] != width:
                shape = tuple(states.shape) if isinstance(states, torch.Tensor) else type(states).__name__
                raise ValueError(
                    f"TPLACache layer {self.layer_idx} expects the {name} as [batch, {n}, tokens, {width}], got "
                    f"{shape}; patch the model with kvcompress.tpla.patch_tpla using this cache's num_shards"
                )
        if latent.shape[0] != rope_key.shape[0] or latent.shape[2] != rope_key.shape[2]:
            raise ValueError("the latent slices and the rope keys must have the same batch size and token count")
        if self.is_initialized and self.keys.numel():
            if latent.dtype != self.keys.dtype or latent.device != self.keys.device:
                raise TypeError(f"layer {self.layer_idx}: got {latent.dtype} on {latent.device}, the cache holds "
                                f"{self.keys.dtype} on {self.keys.device}; use a new cache")
            if latent.shape[0] != self.keys.shape[0]:
                raise ValueError(f"batch size {latent.shape[0]} does not match the {self.keys.shape[0]} rows this "
                                 "TPLACache holds; use a new cache for another batch")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, tpla: bool = False,
               folded: bool = False, **kwargs):
        """Append the held shards' slices (from a TPLA forward, ``tpla=True``; ``folded=True``: slices of
        ``Q^T n`` from a ``fold_rotation`` patch, not of ``Q^T c``) and return every token's (a static layer:
        the whole capacity). From an unpatched model (the stock latent ``[B, 1, S, r]``, simulated caches
        only) the latent is cut into the same per-shard slices and handed back whole: TPLA's memory layout,
        exact stock attention (no per-shard softmax; that needs :func:`patch_tpla`). A layer keeps one
        kind: another kind later raises ValueError (the slices would mean something else)."""
        source = ("tpla-folded" if folded else "tpla") if tpla else "stock"
        if self.source is not None and source != self.source:
            raise ValueError(f"TPLACache layer {self.layer_idx} was filled by a {self.source} forward and now gets "
                             f"a {source} one: use a new cache after patching or unpatching the model (or "
                             "changing fold_rotation)")
        if source == "stock":
            n, r = len(self.shards), self.width * len(self.shards)
            if n == 1 and self.shards != (0,) or not (isinstance(key_states, torch.Tensor) and key_states.dim() == 4
                                                      and key_states.shape[1] == 1 and key_states.shape[-1] == r):
                raise ValueError(
                    f"TPLACache layer {self.layer_idx} got states of shape "
                    f"{tuple(getattr(key_states, 'shape', ()))} from an unpatched model; a rank's cache (shard="
                    f"{self.shards[0]}) or per-head states need the model patched with kvcompress.tpla.patch_tpla"
                )
            batch, _, length, _ = key_states.shape
            key_states = key_states.view(batch, length, n, self.width).transpose(1, 2).contiguous()
            value_states = value_states.expand(batch, n, length, value_states.shape[-1]).contiguous()
        self.check_states(key_states, value_states)
        self.source = source
        keys, values = super().update(key_states, value_states)
        if source == "stock":  # the unpatched model needs the whole latent and one RoPE key back
            batch, n, tokens, width = keys.shape
            keys = keys.transpose(1, 2).reshape(batch, 1, tokens, n * width)
            values = values[:, :1]
        return keys, values

    def reset(self) -> None:
        super().reset()
        self.source = None

    def shard_nbytes(self, shard: int) -> int:
        """Bytes of the valid tokens shard ``shard`` holds in this layer."""
        if not self.is_initialized or not self.keys.numel():
            return 0
        batch = self.keys.shape[0]
        return int(self.get_seq_length()) * batch * (self.keys.shape[-1] * self.keys.element_size()
                                                     + self.values.shape[-1] * self.values.element_size())


class TPLALayer(_ShardStates, GrowableLayer):
    """One layer of a :class:`TPLACache` in growable storage (:class:`kvcompress.storage.GrowableLayer`):
    ``keys`` = latent slices ``[B, n, T, r/N]``, ``values`` = RoPE-key copies ``[B, n, T, p]``."""

    def __init__(self, layer_idx: int, shards: tuple[int, ...], width: int, rope_dim: int,
                 max_cache_len: int | None = None):
        super().__init__(max_cache_len)
        self._set_layout(layer_idx, shards, width, rope_dim)


class StaticTPLALayer(_ShardStates, StaticBufferLayer):
    """One layer of a :class:`TPLACache` built with ``max_cache_len``: fixed-capacity storage
    (:class:`kvcompress.storage.StaticBufferLayer`, ``StaticLayer`` semantics, ``is_compileable``).

    ``keys`` ``[B, n, max_cache_len, r/N]`` and ``values`` ``[B, n, max_cache_len, p]`` are allocated once
    at the first update; ``cumulative_length`` (0-d, on the device) counts the valid tokens, and the
    TPLA decode passes it to the attention as the valid length of every shard row.
    """

    def __init__(self, layer_idx: int, shards: tuple[int, ...], width: int, rope_dim: int, max_cache_len: int):
        super().__init__(max_cache_len)
        self._set_layout(layer_idx, shards, width, rope_dim)


class TPLACache(CheckedLayersCache):
    """Per-shard latent caches for TPLA decode of a DeepSeek-V2/V3 model patched by :func:`patch_tpla`.

    Shard ``i`` holds per layer and token ``r/N`` latent values (its slice of the rotated latent) and the
    ``p`` values of the RoPE key: ``shard_nbytes(i) = sum_layers B * T * (r/N + p) * element_size``.

    Args:
        config: the model or its config (DeepSeek-V2/V3).
        num_shards: ``N``; must divide ``kv_lora_rank``.
        rotation: ``"hadamard"``, ``"pca"`` or ``None``; must match the patch (checked at every forward).
        shard: ``None`` (simulated: this cache holds all ``N`` shards) or the rank ``i`` in ``[0, N)`` whose
            shard alone this cache holds (distributed).
        max_cache_len: ``None`` (storage grows geometrically) or a fixed capacity in tokens, with the same
            meaning as for :class:`kvcompress.mla.MLALatentCache`: static layers
            (:class:`StaticTPLALayer`: shapes fixed, updates in place at a device counter, the whole
            storage returned, ``is_compileable``). More tokens than ``max_cache_len`` raise ValueError.
    """

    def __init__(self, config, num_shards: int = TPLAParams.num_shards, rotation: str | None = TPLAParams.rotation,
                 shard: int | None = None, max_cache_len: int | None = TPLAParams.max_cache_len):
        cfg = deepseek_config(config, "TPLACache")
        TPLAParams(num_shards=num_shards, rotation=rotation, max_cache_len=max_cache_len)
        check_layout(cfg.kv_lora_rank, num_shards, rotation)
        if shard is not None and (isinstance(shard, bool) or not isinstance(shard, int) or not 0 <= shard < num_shards):
            raise ValueError(f"shard must be None (simulated) or an int in [0, {num_shards}), got {shard!r}")
        self.num_layers = cfg.num_hidden_layers
        self.kv_lora_rank, self.qk_rope_head_dim = cfg.kv_lora_rank, cfg.qk_rope_head_dim
        self.num_shards, self.rotation, self.shard = num_shards, rotation, shard
        self.width = cfg.kv_lora_rank // num_shards
        self.shards = tuple(range(num_shards)) if shard is None else (shard,)
        if max_cache_len is None:
            layers = [TPLALayer(i, self.shards, self.width, self.qk_rope_head_dim) for i in range(self.num_layers)]
        else:
            layers = [StaticTPLALayer(i, self.shards, self.width, self.qk_rope_head_dim, max_cache_len)
                      for i in range(self.num_layers)]
        super().__init__(layers=layers)

    def shard_nbytes(self, shard: int) -> int:
        """Bytes shard ``shard`` holds (all layers, valid tokens), from the tensors' shapes and dtypes."""
        if shard not in self.shards:
            raise ValueError(f"this TPLACache holds shards {list(self.shards)}, not {shard!r}")
        return sum(layer.shard_nbytes(shard) for layer in self.layers)

    def nbytes(self) -> int:
        """Bytes of every valid token this cache holds (all shards it holds)."""
        return sum(layer.nbytes() for layer in self.layers)

    def reserved_nbytes(self) -> int:
        """Bytes of the allocated storage (valid tokens + spare capacity), >= :meth:`nbytes`."""
        return sum(layer.reserved_nbytes() for layer in self.layers)

    def expected_shard_nbytes(self) -> int:
        """The formula for one shard: ``sum_layers B * T * (r/N + p) * element_size``."""
        total = 0
        for layer in self.layers:
            if layer.is_initialized and layer.keys.numel():
                batch, tokens = layer.keys.shape[0], int(layer.get_seq_length())
                total += batch * tokens * (self.width + self.qk_rope_head_dim) * layer.keys.element_size()
        return total


# -- attention core ---------------------------------------------------------------------------------
def tpla_attention(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    latent_shards: torch.Tensor,
    rope_shards: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    kv_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each shard's own absorbed attention over its latent slice: ``softmax(scale * (q_i z_i^T + q^R k^R^T) + mask) z_i``.

    Args:
        q_latent: ``[B, H, S, n * w]``, the queries in (rotated) latent space, the held shards' slices side by side.
        q_rope: ``[B, H, S, p]``.
        latent_shards: ``[B, n, T, w]``: shard ``j``'s latent slice for every token.
        rope_shards: ``[B, n, T, p]``: each shard's copy of the RoPE key.
        mask, scale: as :func:`kvcompress.mla.absorbed_attention`.
        kv_lengths: ``None``, or int ``[B]`` on the cache's device: only the first ``kv_lengths[b]`` tokens
            exist (a fixed-capacity cache); then the decode kernel's semantics apply on every device, as in
            :func:`kvcompress.mla.latent_attention`.

    Returns:
        ``[B, H, S, n * w]``: shard ``j``'s attention-weighted latent slice in columns ``j*w:(j+1)*w``.
        Multiplying by the held ``W'_UV`` rows sums the shards' outputs (``sum_j W'_UV[:, S_j] o_j``).
    """
    batch, heads, queries, _ = q_latent.shape
    n, tokens, width = latent_shards.shape[1], latent_shards.shape[2], latent_shards.shape[3]
    # shards become extra batch rows (row b * n + j): one batched absorbed attention for all of them
    q_lat = q_latent.view(batch, heads, queries, n, width).permute(0, 3, 1, 2, 4).reshape(batch * n, heads, queries, width)
    q_rot = q_rope.unsqueeze(1).expand(batch, n, heads, queries, q_rope.shape[-1]).reshape(batch * n, heads, queries, -1)
    latent_rows = latent_shards.reshape(batch * n, tokens, width)  # a view of the cache storage
    rope_rows = rope_shards.reshape(batch * n, tokens, -1)
    if kv_lengths is not None or (latent_rows.dtype != torch.float64 and triton_usable(latent_rows)):
        # the decode kernel (or its reference): each shard row reads its slice once for all heads
        key_mask = key_mask_from_attention_mask(mask, batch, tokens)
        if key_mask is not None:
            key_mask = key_mask.repeat_interleave(n, dim=0)
        if kv_lengths is not None:
            kv_lengths = kv_lengths.repeat_interleave(n, dim=0)
        out = mla_decode_attention(q_lat, q_rot, latent_rows, rope_rows, scale, kv_lengths=kv_lengths,
                                   key_mask=key_mask)
    else:
        if mask is not None and mask.shape[0] > 1:
            mask = mask.repeat_interleave(n, dim=0)
        out = absorbed_attention(q_lat, q_rot, latent_rows, rope_rows, mask, scale)
    return out.view(batch, n, heads, queries, width).permute(0, 2, 3, 1, 4).reshape(batch, heads, queries, n * width)


# -- folded weights and the patched forward ---------------------------------------------------------
def _mark_static(*tensors: torch.Tensor | None) -> None:
    """Tag tensors a compiled decode step reads but that are not module parameters as fixed addresses, so
    CUDA graphs (``mode="reduce-overhead"``) read them in place instead of copying them into the graph's
    inputs at every replay (what ``StaticLayer`` does for its storage)."""
    if torch.compiler.is_compiling():
        return
    for tensor in tensors:
        if tensor is not None:
            torch._dynamo.mark_static_address(tensor)


class TPLAWeights:
    """One attention's TPLA weights, restricted to the shards this process holds, derived from the live
    weights at use.

    ``folded=False`` (new tokens' latents are rotated at run time): ``rotation`` is ``Q`` (``[r, r]`` in the
    weight's dtype; ``None`` for the identity) and new tokens' latents become ``z = Q^T c``; ``kv_b`` is
    ``W_b Q`` (float64 product, stored in the weight's dtype) restricted to the held columns,
    ``[H * (nope + v), n * w]``; ``w_uk`` (``[H, nope, n*w]``) and ``w_uv_t`` (``[H, n*w, v]``) are views of it.

    ``folded=True`` (``fold_rotation``; needs a rotation): ``kv_a`` is ``kv_a_proj_with_mqa``'s weight with
    its latent rows replaced by ``Q^T W_a`` (bias likewise), so the projection itself yields ``Q^T x``, and
    ``kv_b`` is ``W_b diag(g) Q`` (``g`` = ``kv_a_layernorm``'s weight, ``eps`` its epsilon): the cached
    latent is ``z = Q^T x / rms(x)`` (``rms(Q^T x) = rms(x)``) and ``W'_b z = W_b c``. ``rotation`` is still
    ``Q`` (the MLA-form prefill rotates its unit-normalised latent with it).

    :meth:`current` re-derives them when a source weight changed since the last fold: another tensor or
    storage (``model.to(...)``), dtype or device, or an in-place write (``load_state_dict``, an optimizer
    step: the tensor's version counter). The fold is one ``[H*(nope+v), r] x [r, r]`` product per layer
    (``folded``: and one ``[r, r] x [r, hidden]``), paid only after such a change; ``builds`` counts folds.
    The rotation itself (Hadamard, or PCA at patch time) is kept: any orthogonal ``Q`` is exact for ``N = 1``.
    Writes through ``weight.data`` bypass the version counter and are not seen.
    """

    def __init__(self, rotation: torch.Tensor | None, columns: slice, folded: bool = False):
        if folded and rotation is None:
            raise ValueError("folded TPLAWeights need a rotation (with rotation=None there is nothing to fold)")
        self.master = None if rotation is None else rotation.detach().to(torch.float64).cpu()
        self.columns, self.folded = columns, folded
        self.rotation: torch.Tensor | None = None
        self.kv_b = self.w_uk = self.w_uv_t = None
        self.kv_a = self.kv_a_bias = None
        self.eps: float | None = None
        self.builds = 0
        self._key: tuple | None = None

    @staticmethod
    def _key_of(*tensors: torch.Tensor | None) -> tuple:
        return tuple(None if t is None else (t._version, t.data_ptr(), t.dtype, t.device) for t in tensors)

    def _sources(self, module: torch.nn.Module) -> tuple:
        if not self.folded:
            return (module.kv_b_proj.weight,)
        return (module.kv_b_proj.weight, module.kv_a_proj_with_mqa.weight, module.kv_a_proj_with_mqa.bias,
                module.kv_a_layernorm.weight)

    @property
    def built(self) -> bool:
        return self._key is not None

    @torch.no_grad()
    def current(self, module: torch.nn.Module) -> "TPLAWeights":
        weight = module.kv_b_proj.weight
        key = self._key_of(*self._sources(module))
        if key != self._key:
            w = weight.detach()
            r = module.kv_lora_rank
            if self.master is None:
                kv_b = w if self.columns == slice(None) else w[:, self.columns].contiguous()
                self.rotation = None
            else:
                q = self.master.to(w.device)
                w64 = w.to(torch.float64)
                if self.folded:
                    w64 = w64 * module.kv_a_layernorm.weight.detach().to(device=w.device, dtype=torch.float64)
                kv_b = (w64 @ q)[:, self.columns].to(w.dtype).contiguous()
                self.rotation = q.to(w.dtype)
            if self.folded:
                a = module.kv_a_proj_with_mqa.weight.detach()
                q = self.master.to(a.device)
                self.kv_a = torch.cat(((q.T @ a[:r].to(torch.float64)).to(a.dtype), a[r:]))
                bias = module.kv_a_proj_with_mqa.bias
                self.kv_a_bias = None if bias is None else torch.cat(
                    ((q.T @ bias[:r].detach().to(torch.float64)).to(bias.dtype), bias[r:].detach()))
                self.eps = norm_epsilon(module.kv_a_layernorm)
            per_head = kv_b.view(module.num_heads, module.qk_nope_head_dim + module.v_head_dim, -1)
            self.kv_b = kv_b
            self.w_uk = per_head[:, : module.qk_nope_head_dim]
            self.w_uv_t = per_head[:, module.qk_nope_head_dim :].transpose(1, 2)
            _mark_static(self.kv_b, self.rotation, self.kv_a, self.kv_a_bias)
            self._key = key
            self.builds += 1
        return self


@dataclass
class NewLatent:
    """What :meth:`TPLADecode.project` hands to :meth:`TPLADecode.store` for the new tokens.

    ``stock``: the model's latent ``c`` ``[B, 1, S, r]`` (``None`` on the folded decode path, which never
    computes it). ``rotated``: ``None`` (the slices are cut from ``c Q``) or the folded form ``Q^T x / rms(x)``
    ``[B, 1, S, r]`` whose slices are cached as they are.
    """

    stock: torch.Tensor | None
    rotated: torch.Tensor | None = None


@dataclass
class Stored:
    """What :meth:`TPLADecode.store` returns: the held shards' slices ``[B, n, T, w]`` and RoPE keys
    ``[B, n, T, p]`` (a static layer: the whole capacity), the valid lengths (static layer) or ``None``, the
    weights matching the slices' form, the new tokens' latent, the tokens cached before this forward
    (``None`` when not known on the host) and, for a cache of the stock latent, every token's ``c`` and RoPE key."""

    slices: torch.Tensor
    rope_key: torch.Tensor
    kv_lengths: torch.Tensor | None
    weights: TPLAWeights
    new: NewLatent
    past: int | None
    stock_all: tuple[torch.Tensor, torch.Tensor] | None = None


def cached_tokens(cache, layer_idx: int) -> int | None:
    """Tokens ``cache`` holds for layer ``layer_idx`` before this forward's update, as a Python int; ``None``
    when only the device knows (a stock static layer). Never called inside compiled code."""
    if cache is None:
        return 0
    layers = getattr(cache, "layers", None)
    if layers is None:
        return None
    if layer_idx >= len(layers) or not layers[layer_idx].is_initialized:
        return 0  # DynamicCache appends its layers lazily
    layer = layers[layer_idx]
    if isinstance(layer, StaticBufferLayer):
        return layer.valid_tokens()
    if isinstance(layer, GrowableLayer):
        return layer.get_seq_length()
    length = layer.get_seq_length()
    return length if isinstance(length, int) else None


class TPLADecode(LatentDecode):
    """The TPLA decode step of one patched attention (kept on the module as ``kvcompress_tpla``).

    ``takes_decode``: forwards of at most ``max_absorbed_tokens`` new tokens take the per-shard softmax;
    with ``prefill="mla"`` not the first forward on a layer's cache (the prompt), nor any forward without a
    cache. ``project``: the new tokens' latent; with ``fold_rotation`` and a :class:`TPLACache` (or none), the
    decode path projects the rotated latent directly through the folded ``kv_a_proj`` rows (no ``r x r``
    matmul). ``store``: with a :class:`TPLACache` the held shards' slices are written; any other cache
    (``DynamicCache``, :class:`~kvcompress.mla.MLALatentCache`) keeps the stock latent (what the unpatched
    model would store, so the cache stays valid for it) and the slices are derived from every cached token
    at each forward (``T x r x r`` per layer: correct, not fast; use a TPLACache for TPLA's memory and speed).
    ``decode``: the per-shard softmax. ``expand``: ``prefill="mla"``: the new tokens' keys and values from
    the model's own ``kv_b_proj`` on their full latent (bitwise the stock prefill on an empty cache), the
    cached tokens' from each held shard's slice times its columns of ``W'_b``, summed over shards;
    ``prefill="tpla"``: every token's from the slices.
    """

    method = "patch_tpla"

    def __init__(self, weights: TPLAWeights, num_shards: int, rotation: str | None, shard: int | None, group,
                 max_absorbed_tokens: int, rope: str, modeling, prefill: str = TPLAParams.prefill,
                 folded: TPLAWeights | None = None):
        self.weights, self.num_shards, self.rotation, self.shard, self.group = weights, num_shards, rotation, shard, group
        self.max_absorbed_tokens, self.rope, self.modeling = max_absorbed_tokens, rope, modeling
        self.prefill, self.folded = prefill, folded
        self.tpla_calls = 0
        self.expanded_calls = 0

    @property
    def held(self) -> int:
        return self.num_shards if self.shard is None else 1

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Sum over shards: a no-op in simulated mode (the held columns already sum), an all-reduce otherwise."""
        if self.shard is not None:
            import torch.distributed as dist

            dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=self.group)
        return partial

    def _weights(self, module, compiling: bool, folded: bool = False) -> TPLAWeights:
        weights = self.folded if folded else self.weights
        if compiling:
            # compiled steps use the tensors of the last eager fold (generate's prefill runs eagerly)
            if not weights.built:
                raise RuntimeError("patch_tpla: a compiled step needs weights folded by an eager forward first; "
                                   "run one eager forward (the prefill) with the same kind of cache")
            return weights
        return weights.current(module)

    def _fold_applies(self, cache) -> bool:
        # a cache of the stock latent must keep c (an unpatched model reads it): no folded form there
        return self.folded is not None and (cache is None or isinstance(cache, TPLACache))

    def _slices(self, latent: torch.Tensor, rotation: torch.Tensor | None) -> torch.Tensor:
        """``[B, 1, T, r]`` latents -> the held shards' slices of ``latent Q`` (``Q`` = ``rotation``, ``None``:
        the identity), ``[B, n, T, w]``."""
        batch, _, tokens, r = latent.shape
        z = latent if rotation is None else latent @ rotation  # rows: z^T = c^T Q
        z = z.view(batch, tokens, self.num_shards, r // self.num_shards).transpose(1, 2)
        if self.shard is not None:
            z = z[:, self.shard : self.shard + 1]
        return z.contiguous()

    def check_cache(self, module, cache) -> None:
        if isinstance(cache, TPLACache) and (cache.num_shards, cache.rotation, cache.shard) != (
                self.num_shards, self.rotation, self.shard):
            raise ValueError(
                f"cache/patch mismatch: TPLACache(num_shards={cache.num_shards}, rotation={cache.rotation!r}, "
                f"shard={cache.shard}) but the model is patched with num_shards={self.num_shards}, "
                f"rotation={self.rotation!r}, shard={self.shard}"
            )

    def takes_decode(self, module, cache, tokens, compiling):
        if tokens > self.max_absorbed_tokens:
            return False
        if self.prefill == "tpla" or compiling:  # compiled: no host-side length to ask (a decode step)
            return True
        past = cached_tokens(cache, module.layer_idx)
        return past is None or past > 0

    def project(self, module, hidden_states, cache, decode):
        fold = self._fold_applies(cache)
        batch, length = hidden_states.shape[:-1]
        r, p = module.kv_lora_rank, module.qk_rope_head_dim
        if decode and fold:
            weights = self._weights(module, torch.compiler.is_compiling(), folded=True)
            compressed = F.linear(hidden_states, weights.kv_a, weights.kv_a_bias)  # [Q^T x ; k^R]
            rotated, k_rot = torch.split(compressed, [r, p], dim=-1)
            rotated = unit_rms_norm(rotated, weights.eps).view(batch, 1, length, r)
            return NewLatent(None, rotated), k_rot.view(batch, 1, length, p)
        compressed = module.kv_a_proj_with_mqa(hidden_states)
        x, k_rot = torch.split(compressed, [r, p], dim=-1)
        stock = module.kv_a_layernorm(x).view(batch, 1, length, r)
        rotated = None
        if fold:  # the folded cache holds Q^T x / rms(x): one r x r product per prompt token, not per decode step
            weights = self._weights(module, torch.compiler.is_compiling(), folded=True)
            rotated = (unit_rms_norm(x, weights.eps) @ weights.rotation).view(batch, 1, length, r)
        return NewLatent(stock, rotated), k_rot.view(batch, 1, length, p)

    def store(self, module, cache, latent, k_rot, compiling):
        new = latent
        folded = new.rotated is not None
        weights = self._weights(module, compiling, folded=folded)
        batch = k_rot.shape[0]
        stock_all = None
        past = None if compiling else cached_tokens(cache, module.layer_idx)
        if cache is not None and not isinstance(cache, TPLACache):
            latent_all, k_rot_all = cache.update(new.stock, k_rot, module.layer_idx)
            if latent_all.dim() != 4 or latent_all.shape[1] != 1 or latent_all.shape[-1] != module.kv_lora_rank:
                raise ValueError(
                    f"the cache ({type(cache).__name__}) returned states of shape {tuple(latent_all.shape)} for "
                    f"layer {module.layer_idx}; a TPLA-patched model needs a TPLACache or a cache of the stock "
                    f"latent [batch, 1, tokens, {module.kv_lora_rank}] (DynamicCache, MLALatentCache)"
                )
            stock_all = latent_all, k_rot_all
            slices, k_rot = self._slices(latent_all, weights.rotation), k_rot_all
        elif folded:
            slices = self._slices(new.rotated, None)
        else:
            slices = self._slices(new.stock, weights.rotation)
        rope_key = k_rot.expand(batch, self.held, k_rot.shape[2], k_rot.shape[-1])
        kv_lengths = None
        if isinstance(cache, TPLACache):
            slices, rope_key = cache.update(slices, rope_key.contiguous(), module.layer_idx, tpla=True, folded=folded)
            layer = cache.layers[module.layer_idx]
            if isinstance(layer, StaticTPLALayer):
                # the whole capacity came back: the valid length is the device counter (no host sync)
                kv_lengths = layer.cumulative_length.expand(batch).contiguous()
        return Stored(slices, rope_key, kv_lengths, weights, new, past, stock_all)

    def decode(self, module, q_nope, q_rot, stored, attention_mask, compiling):
        weights = stored.weights
        if not compiling:
            self.tpla_calls += 1
        q_latent = absorb_query(q_nope, weights.w_uk)
        out_latent = tpla_attention(q_latent, q_rot, stored.slices, stored.rope_key, attention_mask, module.scaling,
                                    stored.kv_lengths)
        return self.reduce(absorb_output(out_latent, weights.w_uv_t).contiguous())  # w_uv_t sums the held shards

    def _expand_slices(self, slices: torch.Tensor, weights: TPLAWeights) -> torch.Tensor:
        """``sum_i W'_b[:, S_i] z[S_i]`` for every token of ``slices`` ``[B, n, T, w]``: ``[B, T, H * (nope + v)]``."""
        batch, n, tokens, width = slices.shape
        return self.reduce(F.linear(slices.transpose(1, 2).reshape(batch, tokens, n * width), weights.kv_b).contiguous())

    def expand(self, module, stored, compiling):
        if not compiling:
            self.expanded_calls += 1
        if self.prefill == "mla" and not compiling and stored.new.stock is not None:
            if stored.stock_all is not None:  # a cache of the stock latent: exactly the stock prefill
                latent_all, k_rot_all = stored.stock_all
                return module.kv_b_proj(latent_all[:, 0]), k_rot_all
            if stored.past is not None:
                kv = module.kv_b_proj(stored.new.stock[:, 0])  # no collective: every rank has the full latent
                total = stored.past + kv.shape[1]
                if stored.past:
                    kv = torch.cat((self._expand_slices(stored.slices[:, :, : stored.past], stored.weights), kv), dim=1)
                # a static layer hands back its whole capacity: keep the valid tokens (the mask is cut to match)
                return kv, stored.rope_key[:, :1, :total]
        return self._expand_slices(stored.slices, stored.weights), stored.rope_key[:, :1]


def _tpla_forward(self, hidden_states: torch.Tensor, *args, **kwargs):
    """Forward of a TPLA-patched DeepSeek attention: per-shard softmax for short inputs (decode), exact
    MLA expansion for long ones (prefill)."""
    return deepseek_attention_forward(self, getattr(self, _STATE_ATTRIBUTE), hidden_states, *args, **kwargs)


def check_calibration(calibration: object, vocab_size: int) -> None:
    """Raise TypeError/ValueError (naming ``calibration``) unless it is None or a 2-D integer tensor of token
    ids in ``[0, vocab_size)``."""
    if calibration is None:
        return
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2:
        shape = tuple(calibration.shape) if isinstance(calibration, torch.Tensor) else type(calibration).__name__
        raise ValueError(f"calibration must be None or a 2-D tensor of token ids [sequences, tokens], got {shape}")
    if calibration.dtype.is_floating_point or calibration.dtype.is_complex or calibration.dtype == torch.bool:
        raise TypeError(f"calibration must hold integer token ids (torch.long or torch.int), got {calibration.dtype}")
    if calibration.numel() == 0:
        raise ValueError(f"calibration must hold at least one token id, got shape {tuple(calibration.shape)}")
    low, high = int(calibration.min()), int(calibration.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"calibration token ids must lie in [0, {vocab_size}) (the model's vocabulary), got ids "
                         f"from {low} to {high}")


def patch_tpla(
    model: torch.nn.Module,
    num_shards: int = TPLAParams.num_shards,
    rotation: str | None = TPLAParams.rotation,
    max_absorbed_tokens: int = TPLAParams.max_absorbed_tokens,
    distributed: bool = TPLAParams.distributed,
    calibration: torch.Tensor | None = None,
    process_group=None,
    prefill: str = TPLAParams.prefill,
    fold_rotation: bool = TPLAParams.fold_rotation,
) -> PatchHandle:
    """Install TPLA attention on every DeepSeek-V2/V3 attention of ``model``; use it with a :class:`TPLACache`
    (any other cache, or none, also works: see :class:`TPLADecode`).

    The rotation is computed once (Hadamard; or PCA of each layer's latents on ``calibration``); the
    rotated ``kv_b_proj`` columns are derived from the live weight at use (:class:`TPLAWeights`), so
    weights loaded or trained after patching, and ``model.to(dtype)``, take effect. The model's own
    parameters are not changed, and ``handle.remove()`` restores the stock forward exactly.

    Args:
        model: a DeepSeek-V2/V3 model (``eager`` or ``sdpa`` attention).
        num_shards: ``N``, an int dividing ``kv_lora_rank``.
        rotation: ``"hadamard"`` (``kv_lora_rank`` a power of two), ``"pca"`` or ``None``.
        max_absorbed_tokens: forwards of at most this many new tokens take the TPLA path (int >= 1).
        distributed: ``False``: simulate all shards in this process. ``True``: ``torch.distributed`` must be
            initialised with world size ``N`` (of ``process_group``); this rank holds shard ``rank`` only.
        calibration: token ids ``[sequences, tokens]`` (integers in ``[0, vocab_size)``) for PCA; ``None``:
            :func:`default_calibration`. In distributed mode rank 0's rotation is broadcast, so every rank
            folds the same one.
        process_group: the ``torch.distributed`` group (``None``: the default group).
        prefill: ``"mla"`` (the paper's split: prefill unchanged) or ``"tpla"``. ``"mla"``: a forward on a
            layer's empty cache (the prompt, whatever its length), any forward without a cache, and any
            forward of more than ``max_absorbed_tokens`` tokens run as ordinary MLA: the new tokens' keys and
            values are the model's ``kv_b_proj`` of their full latent ``c`` (every rank computes ``c`` in
            full, so no collective), cached tokens' come from the shards' slices (summed: exact). On an empty
            cache that is bitwise the stock prefill. ``"tpla"``: short prompts (at most
            ``max_absorbed_tokens``) take the per-shard softmax as decode does, and long forwards expand every
            token from the slices with ``W'_b`` (equal to ``"mla"`` up to rounding). The two differ beyond
            rounding only for prompts of at most ``max_absorbed_tokens`` tokens longer than one, where
            ``"tpla"``'s per-shard softmax is the approximation. Inside ``torch.compile`` the host does not
            know the cache length, so there every forward of at most ``max_absorbed_tokens`` is a decode.
        fold_rotation: ``False``: new tokens' latents are rotated at run time (``z = Q^T c``, one ``r x r``
            matmul per new token and layer). ``True`` (with a rotation; a no-op for ``rotation=None``): ``Q``
            is folded into ``kv_a_proj``'s latent rows and ``kv_a_layernorm``'s weight ``g`` into the
            up-projections (``W'_b = W_b diag(g) Q``); the cache holds ``z = Q^T x / rms(x)`` and decode
            applies no rotation. Exact in real arithmetic for ``N = 1``; for ``N > 1`` equal to
            ``fold_rotation=False`` only when ``diag(g)`` commutes with ``Q`` (``g`` uniform), since otherwise
            the shards split ``Q^T n`` instead of ``Q^T (g * n)`` (another per-shard approximation, not
            rounding), and PCA is then taken on ``n = x / rms(x)``. Serving a cache of the stock latent
            (``DynamicCache``) falls back to the run-time rotation.

    Returns:
        A :class:`~kvcompress.patch.PatchHandle`.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    cfg = deepseek_config(model, "patch_tpla")
    TPLAParams(num_shards=num_shards, rotation=rotation, max_absorbed_tokens=max_absorbed_tokens,
               distributed=distributed, prefill=prefill, fold_rotation=fold_rotation)
    check_layout(cfg.kv_lora_rank, num_shards, rotation)
    check_attn_implementation(cfg, "patch_tpla")
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    check_calibration(calibration, getattr(embeddings, "num_embeddings", cfg.vocab_size))
    shard = None
    if distributed:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("distributed=True needs torch.distributed initialised (init_process_group) first")
        world = dist.get_world_size(process_group)
        if world != num_shards:
            raise ValueError(f"distributed TPLA needs one rank per shard: world size {world} != num_shards={num_shards}")
        shard = dist.get_rank(process_group)
    modules = attention_modules(model)
    if not modules:
        raise ValueError(f"no DeepSeek MLA attention (kv_b_proj) found in {type(model).__name__}")
    if any(hasattr(m, _STATE_ATTRIBUTE) or hasattr(m, "kvcompress_mla") for m in modules):
        raise ValueError("this model's attention is already patched (TPLA or MLA); remove that handle first")

    r = cfg.kv_lora_rank
    if rotation is None:
        rotations = [None] * len(modules)
    elif rotation == "hadamard":
        rotations = [hadamard_rotation(r)] * len(modules)
    else:
        latents = calibration_latents(model, default_calibration(cfg) if calibration is None else calibration,
                                      weighted=not fold_rotation)
        rotations = [pca_rotation(lat) for lat in latents]
        if shard is not None:
            import torch.distributed as dist

            device = next(model.parameters()).device
            stacked = torch.stack(rotations).to(device)
            dist.broadcast(stacked, src=dist.get_global_rank(process_group, 0) if process_group else 0, group=process_group)
            rotations = list(stacked.cpu())
    width = r // num_shards
    columns = slice(None) if shard is None else slice(shard * width, (shard + 1) * width)
    rope = rope_style(cfg)
    states = []
    fold = fold_rotation and rotation is not None
    for module, rot in zip(modules, rotations):
        weights = TPLAWeights(rot, columns)
        folded = TPLAWeights(rot, columns, folded=True) if fold else None
        if fold:
            norm_epsilon(module.kv_a_layernorm)  # refuse a norm without an epsilon before anything changes
        (folded or weights).current(module)  # fold now: a compiled step never folds (the other form: at use)
        states.append(TPLADecode(weights, num_shards, rotation, shard, process_group, max_absorbed_tokens, rope,
                                 modeling_file(module, rope, "patch_tpla"), prefill=prefill, folded=folded))
    handle = PatchHandle(model, f"tpla N={num_shards} rotation={rotation} prefill={prefill}"
                         + (" folded" if fold else "") + ("" if shard is None else f" shard={shard}"))
    for module, state in zip(modules, states):
        set_attribute(module, _STATE_ATTRIBUTE, state, handle)
        replace_forward(module, _tpla_forward, handle)
    return handle


# -- the registered method ---------------------------------------------------------------------------


def _build_tpla(model_or_config, num_shards: int, rotation, max_absorbed_tokens: int, distributed: bool,
                max_cache_len: int | None = None, prefill: str = TPLAParams.prefill,
                fold_rotation: bool = TPLAParams.fold_rotation) -> TPLACache:
    shard = None
    if distributed:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("tpla: distributed=True needs torch.distributed initialised (init_process_group) first")
        if dist.get_world_size() != num_shards:
            raise ValueError(f"tpla: world size {dist.get_world_size()} != num_shards={num_shards}")
        shard = dist.get_rank()
    return TPLACache(model_or_config, num_shards=num_shards, rotation=rotation, shard=shard,
                     max_cache_len=max_cache_len)


def _install_tpla(model, handle: PatchHandle, num_shards: int, rotation, max_absorbed_tokens: int,
                  distributed: bool, max_cache_len: int | None = None, prefill: str = TPLAParams.prefill,
                  fold_rotation: bool = TPLAParams.fold_rotation) -> None:
    # max_cache_len belongs to the cache
    handle.add_undo(patch_tpla(model, num_shards=num_shards, rotation=rotation,
                               max_absorbed_tokens=max_absorbed_tokens, distributed=distributed, prefill=prefill,
                               fold_rotation=fold_rotation).remove)


register_method(
    "tpla",
    summary="TPLA: MLA latent split over N shards, per-shard softmax decode (tensor-parallel latent attention)",
    build=_build_tpla,
    params=TPLAParams,
    families=SUPPORTED_MODEL_TYPES,
    install=_install_tpla,
    cache_class="kvcompress.tpla.TPLACache",
    doc="docs/tpla.md",
)
