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
``W'_b`` (hence the absorbed ``W'_UK``, ``W'_UV``) is folded once at patch time; the latent side costs one
``r x r`` matmul per *new* token and layer (DeepSeek-V3: 0.26 M multiply-adds, against 4.1 M for
``kv_a_proj`` and ``H * T * (r/N + p)`` = 1.3 G for a shard's attention at 32K), nothing per cached token.

Why not fold ``Q`` into ``kv_a_proj`` too (zero cost)? The norm weight ``g`` multiplies elementwise
after the RMS division and does not commute with ``Q``; folding would mean caching ``Q^T n`` (``n = x /
rms(x)``, exact because ``rms(Q^T x) = rms(x)``) and moving ``g`` into ``W'_b = W_b diag(g) Q``. That is
exact in real arithmetic but not in floating point when ``g`` is far from uniform: a channel that ``g``
suppresses can dominate ``n`` and, once rotated, every coordinate of ``z``; the useful signal is then
rounded away. TransMLA-converted models are the extreme case (an anchor channel ``10^4`` times larger
than the rest with ``g = 0``): folded that way, SmolLM2's perplexity at ``N = 1`` moved from 27.54 to
27.95 with Hadamard. Rotating ``c`` itself keeps ``N = 1`` equal to MLA to rounding for every model.

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

**Prefill stays exact MLA.** Forwards of more than ``max_absorbed_tokens`` new tokens expand the latent
per head with ``W'_b`` (each shard multiplies its slice by its columns and the partial products are
summed: exact) and run the model's attention implementation. Only decode uses the per-shard softmax.

Modes: **simulated** (``shard=None``: one process holds all ``N`` shards, laid out as ``[B, N, T, r/N]``
and computed in one batched call; for accuracy evaluation and CPU) and **distributed**
(``distributed=True``: ``torch.distributed`` initialised by the caller, one rank per shard; the cache of
rank ``i`` holds only shard ``i``, its attention only its weight slices; the sum is an all-reduce).

Memory formula (per layer, batch ``B``, ``T`` tokens, element size ``e``)::

    per shard: B * T * (r / N + p) * e        all shards: B * T * (r + N * p) * e
"""

from __future__ import annotations

import inspect
import math
import sys
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache

from .mla import (SUPPORTED_ATTN_IMPLEMENTATIONS, SUPPORTED_MODEL_TYPES, GrowableLayer, _mla_config, absorbed_attention,
                  mla_attention_modules)
from .ops import tensor_nbytes
from .hooks import PatchHandle, replace_forward, set_attribute
from .registry import MethodParams, Range, param, register_method

ROTATIONS = ("hadamard", "pca", None)
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


def check_layout(kv_lora_rank: int, num_shards: object, rotation: object) -> None:
    """Raise TypeError/ValueError (naming the parameter and what is allowed) unless ``num_shards`` splits a
    latent of ``kv_lora_rank`` values and ``rotation`` is supported for it.

    Heads are not split (every shard computes every head with its latent slice), so the head count
    puts no condition on ``num_shards``.
    """
    if isinstance(num_shards, bool) or not isinstance(num_shards, int):
        raise TypeError(f"num_shards must be an int, got {type(num_shards).__name__}")
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if num_shards > kv_lora_rank:
        raise ValueError(f"num_shards={num_shards} is larger than the latent (kv_lora_rank={kv_lora_rank}); "
                         f"allowed: divisors of {kv_lora_rank}")
    if kv_lora_rank % num_shards:
        divisors = [d for d in range(1, kv_lora_rank + 1) if kv_lora_rank % d == 0]
        raise ValueError(f"num_shards={num_shards} does not divide kv_lora_rank={kv_lora_rank}; allowed: {divisors}")
    if rotation not in ROTATIONS:
        raise ValueError(f"rotation must be one of {list(ROTATIONS)}, got {rotation!r}")
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
def calibration_latents(model: torch.nn.Module, calibration: torch.Tensor) -> list[torch.Tensor]:
    """Per attention layer, the latents ``c`` the model caches (``[tokens, r]``, float64) for ``calibration``
    (token ids ``[sequences, tokens]``).

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
        latents.append(attn.kv_a_layernorm(x).to(torch.float64).reshape(-1, attn.kv_lora_rank))
    return latents


# -- the cache --------------------------------------------------------------------------------------
class TPLALayer(GrowableLayer):
    """One layer of a :class:`TPLACache`: ``keys`` = latent slices ``[B, n, T, r/N]`` and ``values`` =
    RoPE-key copies ``[B, n, T, p]``, where ``n`` is the number of shards held (``N`` simulated, 1 on a rank).
    ``keys[:, j]`` and ``values[:, j]`` are exactly what shard ``shards[j]`` holds. Stored in growable
    preallocated storage (:class:`kvcompress.mla.GrowableLayer`)."""

    def __init__(self, layer_idx: int, shards: tuple[int, ...], width: int, rope_dim: int,
                 max_cache_len: int | None = None):
        super().__init__(max_cache_len)
        self.layer_idx, self.shards, self.width, self.rope_dim = layer_idx, shards, width, rope_dim
        self.source: str | None = None  # "tpla" (a patch_tpla forward) or "stock" (an unpatched model)

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

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, tpla: bool = False, **kwargs):
        """Append the held shards' slices (from a TPLA forward, ``tpla=True``) and return
        every token's. From an unpatched model (the stock latent ``[B, 1, S, r]``, simulated caches only) the
        latent is cut into the same per-shard slices and handed back whole: TPLA's memory layout, exact
        stock attention (no per-shard softmax; that needs :func:`patch_tpla`)."""
        source = "tpla" if tpla else "stock"
        if self.source is not None and source != self.source:
            raise ValueError(f"TPLACache layer {self.layer_idx} was filled by a {self.source} forward and now gets "
                             f"a {source} one: use a new cache after patching or unpatching the model")
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
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        if source == "stock":  # the unpatched model needs the whole latent and one RoPE key back
            batch, n, tokens, width = keys.shape
            keys = keys.transpose(1, 2).reshape(batch, 1, tokens, n * width)
            values = values[:, :1]
        return keys, values

    def reset(self) -> None:
        super().reset()
        self.source = None

    def shard_nbytes(self, shard: int) -> int:
        """Bytes shard ``shard`` holds in this layer, measured from its tensor slices."""
        if not self.is_initialized:
            return 0
        j = self.shards.index(shard)
        return tensor_nbytes(self.keys[:, j], self.values[:, j])

class TPLACache(Cache):
    """Per-shard latent caches for TPLA decode of a DeepSeek-V2/V3 model patched by :func:`patch_tpla`.

    Shard ``i`` holds per layer and token ``r/N`` latent values (its slice of the rotated latent) and the
    ``p`` values of the RoPE key: ``shard_nbytes(i) = sum_layers B * T * (r/N + p) * element_size``.

    Args:
        config: the model or its config (DeepSeek-V2/V3).
        num_shards: ``N``; must divide ``kv_lora_rank``.
        rotation: ``"hadamard"``, ``"pca"`` or ``None``; must match the patch (checked at every forward).
        shard: ``None`` (simulated: this cache holds all ``N`` shards) or the rank ``i`` in ``[0, N)`` whose
            shard alone this cache holds (distributed).
        max_cache_len: ``None`` (storage grows geometrically) or a fixed capacity in tokens.
    """

    def __init__(self, config, num_shards: int = TPLAParams.num_shards, rotation: str | None = TPLAParams.rotation,
                 shard: int | None = None,
                 max_cache_len: int | None = None):
        cfg = _mla_config(config)
        check_layout(cfg.kv_lora_rank, num_shards, rotation)
        if shard is not None and (isinstance(shard, bool) or not isinstance(shard, int) or not 0 <= shard < num_shards):
            raise ValueError(f"shard must be None (simulated) or an int in [0, {num_shards}), got {shard!r}")
        self.num_layers = cfg.num_hidden_layers
        self.kv_lora_rank, self.qk_rope_head_dim = cfg.kv_lora_rank, cfg.qk_rope_head_dim
        self.num_shards, self.rotation, self.shard = num_shards, rotation, shard
        self.width = cfg.kv_lora_rank // num_shards
        self.shards = tuple(range(num_shards)) if shard is None else (shard,)
        layers = [TPLALayer(i, self.shards, self.width, self.qk_rope_head_dim, max_cache_len)
                  for i in range(self.num_layers)]
        super().__init__(layers=layers)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if not isinstance(layer_idx, int) or not 0 <= layer_idx < self.num_layers:
            raise ValueError(f"cache/model mismatch: layer_idx {layer_idx!r} but this TPLACache has "
                             f"{self.num_layers} layers; build it from this model's config")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def shard_nbytes(self, shard: int) -> int:
        """Bytes shard ``shard`` holds (all layers), measured from the tensors."""
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
                batch, _, tokens, _ = layer.keys.shape
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
) -> torch.Tensor:
    """Each shard's own absorbed attention over its latent slice: ``softmax(scale * (q_i z_i^T + q^R k^R^T) + mask) z_i``.

    Args:
        q_latent: ``[B, H, S, n * w]``, the queries in (rotated) latent space, the held shards' slices side by side.
        q_rope: ``[B, H, S, p]``.
        latent_shards: ``[B, n, T, w]``: shard ``j``'s latent slice for every token.
        rope_shards: ``[B, n, T, p]``: each shard's copy of the RoPE key.
        mask, scale: as :func:`kvcompress.mla.absorbed_attention`.

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
    from .kernels import triton_usable

    if latent_rows.dtype != torch.float64 and triton_usable(latent_rows):
        # the Triton decode kernel: each shard row reads its slice once for all heads
        from .kernels.mla_decode import key_mask_from_attention_mask, mla_decode_attention

        key_mask = key_mask_from_attention_mask(mask, batch, tokens)
        if key_mask is not None:
            key_mask = key_mask.repeat_interleave(n, dim=0)
        out = mla_decode_attention(q_lat, q_rot, latent_rows, rope_rows, scale, key_mask=key_mask)
    else:
        if mask is not None and mask.shape[0] > 1:
            mask = mask.repeat_interleave(n, dim=0)
        out = absorbed_attention(q_lat, q_rot, latent_rows, rope_rows, mask, scale)
    return out.view(batch, n, heads, queries, width).permute(0, 2, 3, 1, 4).reshape(batch, heads, queries, n * width)


# -- folded weights and the patched forward ---------------------------------------------------------
@dataclass
class TPLAWeights:
    """One attention's TPLA weights, restricted to the shards this process holds (float64 maths, stored in
    the module's dtype).

    ``rotation``: ``Q`` (``[r, r]``; ``None`` for the identity): new tokens' latents become ``z = Q^T c``
    (every shard rotates the full latent of new tokens, so it is not sliced). ``kv_b``: ``W_b Q``
    restricted to the held columns, ``[H * (nope + v), n * w]``; ``w_uk`` (``[H, nope, n*w]``) and ``w_uv_t``
    (``[H, n*w, v]``) are views of it.
    """

    rotation: torch.Tensor | None
    kv_b: torch.Tensor
    w_uk: torch.Tensor
    w_uv_t: torch.Tensor

    @classmethod
    def fold(cls, module: torch.nn.Module, rotation: torch.Tensor | None, columns: slice) -> "TPLAWeights":
        weight = module.kv_b_proj.weight.detach()
        if rotation is None:
            kv_b = weight[:, columns].contiguous()
        else:
            q = rotation.to(weight.device, torch.float64)
            kv_b = (weight.to(torch.float64) @ q)[:, columns].to(weight.dtype).contiguous()
            rotation = q.to(weight.dtype)
        per_head = kv_b.view(module.num_heads, module.qk_nope_head_dim + module.v_head_dim, -1)
        return cls(rotation, kv_b, per_head[:, : module.qk_nope_head_dim], per_head[:, module.qk_nope_head_dim :].transpose(1, 2))


@dataclass
class _TPLAState:
    weights: TPLAWeights
    num_shards: int
    rotation: str | None
    shard: int | None  # None: simulated (all shards)
    group: object  # torch.distributed process group (distributed mode) or None
    max_absorbed_tokens: int
    rope: str
    modeling: object
    tpla_calls: int = 0
    expanded_calls: int = 0

    @property
    def held(self) -> int:
        return self.num_shards if self.shard is None else 1

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Sum over shards: a no-op in simulated mode (the held columns already sum), an all-reduce otherwise."""
        if self.shard is not None:
            import torch.distributed as dist

            dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=self.group)
        return partial


def _tpla_forward(self, hidden_states: torch.Tensor, *args, **kwargs):
    """Forward of a TPLA-patched DeepSeek attention: per-shard softmax for short inputs (decode), exact
    MLA expansion for long ones (prefill). The cache receives only the held shards' slices."""
    from .mla import _rotate

    state: _TPLAState = getattr(self, _STATE_ATTRIBUTE)
    if args:
        bound = inspect.signature(type(self).forward).bind(self, hidden_states, *args, **kwargs)
        kwargs = {k: v for k, v in bound.arguments.items() if k not in ("self", "hidden_states", "kwargs")}
        kwargs.update(bound.arguments.get("kwargs", {}))
    attention_mask = kwargs.pop("attention_mask", None)
    position_embeddings = kwargs.pop("position_embeddings", None)
    cache = kwargs.pop("cache", None)
    legacy_cache = kwargs.pop("past_key_values", None)
    cache = cache if cache is not None else legacy_cache
    implementation = self.config._attn_implementation
    if implementation not in SUPPORTED_ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation {implementation!r} is not supported by TPLA; allowed: "
                         f"{list(SUPPORTED_ATTN_IMPLEMENTATIONS)}")
    if cache is not None:
        if not isinstance(cache, TPLACache):
            raise TypeError(f"a TPLA-patched model needs a TPLACache, got {type(cache).__name__}")
        if (cache.num_shards, cache.rotation, cache.shard) != (state.num_shards, state.rotation, state.shard):
            raise ValueError(
                f"cache/patch mismatch: TPLACache(num_shards={cache.num_shards}, rotation={cache.rotation!r}, "
                f"shard={cache.shard}) but the model is patched with num_shards={state.num_shards}, "
                f"rotation={state.rotation!r}, shard={state.shard}"
            )

    batch, length = hidden_states.shape[:-1]
    if self.q_lora_rank is None:
        q = self.q_proj(hidden_states)
    else:
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
    q = q.view(batch, length, -1, self.qk_head_dim).transpose(1, 2)
    q_nope, q_rot = torch.split(q, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)

    w = state.weights
    x, k_rot = torch.split(self.kv_a_proj_with_mqa(hidden_states), [self.kv_lora_rank, self.qk_rope_head_dim], -1)
    z = self.kv_a_layernorm(x)  # the model's own norm on the FULL latent of the new tokens: exact, no local norm
    if w.rotation is not None:
        z = z @ w.rotation  # rows: z^T = c^T Q, i.e. z = Q^T c
    k_rot = k_rot.view(batch, 1, length, self.qk_rope_head_dim)
    q_rot, k_rot = _rotate(state, self, q_rot, k_rot, position_embeddings)

    n, width = state.held, self.kv_lora_rank // state.num_shards
    z = z.view(batch, length, state.num_shards, width).transpose(1, 2)  # [B, N, S, w]
    if state.shard is not None:
        z = z[:, state.shard : state.shard + 1]
    latent, rope_key = z.contiguous(), k_rot.expand(batch, n, length, self.qk_rope_head_dim).contiguous()
    if cache is not None:
        latent, rope_key = cache.update(latent, rope_key, self.layer_idx, tpla=True)

    if length <= state.max_absorbed_tokens and not self.training:
        state.tpla_calls += 1
        heads = q_nope.shape[1]
        q_heads = q_nope.transpose(0, 1).reshape(heads, batch * length, self.qk_nope_head_dim)
        q_latent = torch.bmm(q_heads, w.w_uk).view(heads, batch, length, n * width).transpose(0, 1)
        out_latent = tpla_attention(q_latent, q_rot, latent, rope_key, attention_mask, self.scaling)
        out_heads = out_latent.transpose(0, 1).reshape(heads, batch * length, n * width)
        out = torch.bmm(out_heads, w.w_uv_t).view(heads, batch, length, self.v_head_dim)  # sums the held shards
        out = state.reduce(out.permute(1, 2, 0, 3).reshape(batch, length, heads * self.v_head_dim).contiguous())
        return self.o_proj(out), None

    # Prefill: exact MLA. Each shard's columns of W'_b times its slice, summed over shards.
    state.expanded_calls += 1
    tokens = latent.shape[2]
    kv = state.reduce(F.linear(latent.transpose(1, 2).reshape(batch, tokens, n * width), w.kv_b).contiguous())
    kv = kv.view(batch, tokens, -1, self.qk_nope_head_dim + self.v_head_dim).transpose(1, 2)
    k_nope, value_states = torch.split(kv, [self.qk_nope_head_dim, self.v_head_dim], dim=-1)
    key_states = torch.cat((k_nope, rope_key[:, :1].expand(-1, k_nope.shape[1], -1, -1)), dim=-1)
    query_states = torch.cat((q_nope, q_rot), dim=-1)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    attention = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, state.modeling.eager_attention_forward)
    attn_output, attn_weights = attention(self, query_states, key_states, value_states, attention_mask,
                                          dropout=0.0, scaling=self.scaling, **kwargs)
    return self.o_proj(attn_output.reshape(batch, length, -1).contiguous()), attn_weights


def patch_tpla(
    model: torch.nn.Module,
    num_shards: int = TPLAParams.num_shards,
    rotation: str | None = TPLAParams.rotation,
    max_absorbed_tokens: int = TPLAParams.max_absorbed_tokens,
    distributed: bool = TPLAParams.distributed,
    calibration: torch.Tensor | None = None,
    process_group=None,
) -> PatchHandle:
    """Install TPLA attention on every DeepSeek-V2/V3 attention of ``model``; use it with a :class:`TPLACache`.

    The rotation is computed once (Hadamard; or PCA of each layer's latents on ``calibration``) and folded
    into a copy of ``kv_b_proj`` (the held columns) kept on the module; the model's own parameters are not
    changed, and ``handle.remove()`` restores the stock forward exactly.

    Args:
        model: a DeepSeek-V2/V3 model (``eager`` or ``sdpa`` attention).
        num_shards: ``N``, an int dividing ``kv_lora_rank``.
        rotation: ``"hadamard"`` (``kv_lora_rank`` a power of two), ``"pca"`` or ``None``.
        max_absorbed_tokens: forwards of at most this many new tokens take the TPLA path (int >= 1).
        distributed: ``False``: simulate all shards in this process. ``True``: ``torch.distributed`` must be
            initialised with world size ``N`` (of ``process_group``); this rank holds shard ``rank`` only.
        calibration: token ids ``[sequences, tokens]`` for PCA; ``None``: :func:`default_calibration`.
            In distributed mode rank 0's rotation is broadcast, so every rank folds the same one.
        process_group: the ``torch.distributed`` group (``None``: the default group).

    Returns:
        A :class:`~kvcompress.patch.PatchHandle`.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    cfg = _mla_config(model)
    check_layout(cfg.kv_lora_rank, num_shards, rotation)
    if isinstance(max_absorbed_tokens, bool) or not isinstance(max_absorbed_tokens, int) or max_absorbed_tokens < 1:
        raise ValueError(f"max_absorbed_tokens must be an int >= 1, got {max_absorbed_tokens!r}")
    if not isinstance(distributed, bool):
        raise TypeError(f"distributed must be True or False, got {distributed!r}")
    implementation = getattr(cfg, "_attn_implementation", None) or "eager"
    if implementation not in SUPPORTED_ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation {implementation!r} is not supported by patch_tpla; allowed: "
                         f"{list(SUPPORTED_ATTN_IMPLEMENTATIONS)}")
    shard = None
    if distributed:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("distributed=True needs torch.distributed initialised (init_process_group) first")
        world = dist.get_world_size(process_group)
        if world != num_shards:
            raise ValueError(f"distributed TPLA needs one rank per shard: world size {world} != num_shards={num_shards}")
        shard = dist.get_rank(process_group)
    modules = mla_attention_modules(model)
    if not modules:
        raise ValueError(f"no DeepSeek MLA attention (kv_b_proj) found in {type(model).__name__}")
    if any(hasattr(m, _STATE_ATTRIBUTE) or hasattr(m, "kvcompress_mla") for m in modules):
        raise ValueError("this model's attention is already patched (TPLA or MLA); remove that handle first")
    if calibration is not None and (not isinstance(calibration, torch.Tensor) or calibration.dim() != 2):
        raise ValueError("calibration must be a 2-D tensor of token ids [sequences, tokens] or None")

    r = cfg.kv_lora_rank
    if rotation is None:
        rotations = [None] * len(modules)
    elif rotation == "hadamard":
        rotations = [hadamard_rotation(r)] * len(modules)
    else:
        latents = calibration_latents(model, default_calibration(cfg) if calibration is None else calibration)
        rotations = [pca_rotation(lat) for lat in latents]
        if shard is not None:
            import torch.distributed as dist

            device = next(model.parameters()).device
            stacked = torch.stack(rotations).to(device)
            dist.broadcast(stacked, src=dist.get_global_rank(process_group, 0) if process_group else 0, group=process_group)
            rotations = list(stacked.cpu())
    width = r // num_shards
    columns = slice(None) if shard is None else slice(shard * width, (shard + 1) * width)
    rope = "complex" if cfg.model_type == "deepseek_v2" else ("interleave" if getattr(cfg, "rope_interleave", False) else "half")
    states = []
    for module, rot in zip(modules, rotations):
        modeling = sys.modules[type(module).__module__]
        with torch.no_grad():
            weights = TPLAWeights.fold(module, rot, columns)
        states.append(_TPLAState(weights, num_shards, rotation, shard, process_group, max_absorbed_tokens, rope, modeling))
    handle = PatchHandle(model, f"tpla N={num_shards} rotation={rotation}" + ("" if shard is None else f" shard={shard}"))
    for module, state in zip(modules, states):
        set_attribute(module, _STATE_ATTRIBUTE, state, handle)
        replace_forward(module, _tpla_forward, handle)
    return handle


# -- the registered method ---------------------------------------------------------------------------


def _build_tpla(model_or_config, num_shards: int, rotation, max_absorbed_tokens: int, distributed: bool) -> TPLACache:
    shard = None
    if distributed:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("tpla: distributed=True needs torch.distributed initialised (init_process_group) first")
        if dist.get_world_size() != num_shards:
            raise ValueError(f"tpla: world size {dist.get_world_size()} != num_shards={num_shards}")
        shard = dist.get_rank()
    return TPLACache(model_or_config, num_shards=num_shards, rotation=rotation, shard=shard)


def _install_tpla(model, handle: PatchHandle, num_shards: int, rotation, max_absorbed_tokens: int,
                  distributed: bool) -> None:
    handle.add_undo(patch_tpla(model, num_shards=num_shards, rotation=rotation,
                               max_absorbed_tokens=max_absorbed_tokens, distributed=distributed).remove)


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
