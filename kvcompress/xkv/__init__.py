"""xKV: cross-layer SVD compression of the KV cache (Chang et al., "xKV: Cross-Layer SVD for KV-Cache
Compression", 2025), as a real ``transformers.Cache`` that stores the factors and frees the full tensors.

The maths
---------
Take ``G`` adjacent attention layers (a *group*). For one batch row, stack the group's keys of ``T``
prompt tokens side by side: ``K_g = [K_1 | K_2 | ... | K_G]``, a ``T x (G*H*d)`` matrix (``H`` KV heads of
dim ``d``). Adjacent layers share their dominant singular vectors, so a truncated SVD

    K_g ≈ U_r (S_r V_r^T) = A [B_1 | B_2 | ... | B_G]

keeps one token-side factor ``A`` (``T x r``, shared by the group) and one small reconstruction matrix
``B_l`` (``r x H*d``) per layer; layer ``l``'s keys are ``A @ B_l``. Values are factored the same way,
separately, with their own rank. By Eckart–Young the Frobenius error is the root of the sum of the
discarded squared singular values, the least any rank-``r`` factorisation can reach.

Per group and batch row, ``T`` compressed tokens cost ``T*(r_k + r_v) + G*(r_k + r_v)*H*d`` elements
instead of ``2*G*T*H*d``; tokens kept exact (first ``sink`` tokens, last ``window`` tokens, everything that
arrives during decode) cost ``2*H*d`` per layer each. ``XKVCache.nbytes()`` measures the tensors held; the
docs give the formula and tests check one against the other.

RoPE
----
Keys are compressed *before* RoPE, where their low-rank structure lives (the paper's choice). Models
hand the cache keys that are already rotated, and no positions. The cache therefore numbers the tokens
of each batch row by their slot ``p = 0, 1, 2, ...`` in the cache, un-rotates a key by ``-p`` before the
SVD and rotates the reconstruction by ``+p`` on read. The two rotations are inverse, so with full rank
the round trip is exact whatever the model's true positions are. For compression quality what matters
is that the slot differs from the model's position by a constant per row: then the un-rotated keys of
that row are the true pre-RoPE keys times one fixed orthogonal matrix (a rotation by that constant),
which has the same singular values and so compresses exactly as well. That holds for plain prompts
(slot = position) and for left-padded batches (transformers gives the real tokens positions
``slot - num_pads``). Padding tokens themselves are masked by attention and their keys only spend a
little rank. ``pre_rope=False`` compresses the rotated keys as they come (measured in docs/xkv.md).

What stays exact, and when compression happens
-----------------------------------------------
At the end of every multi-token update of a group's last layer (the prefill, or the prompt of a later
turn on the same cache), every token of the group's exact tail that is older than the ``window`` most
recent ones is compressed into a new *segment*, except the first ``sink`` tokens of the sequence, which
stay exact forever. Tokens generated one at a time stay exact until the next multi-token update folds
them in (so a conversation's earlier answers get compressed when the user's next turn arrives). Layers of
a group that run before its last layer keep their prefill exact for the few layers until then.
"""

from __future__ import annotations

from ..registry import register_method
from .attention import SUPPORTED_MODEL_TYPES, XKV_ATTENTION_PREFIX, _install_xkv, patch_xkv, xkv_attention_forward
from .cache import ForwardContext, GrowableXKVLayer, StaticXKVLayer, XKVCache, XKVLayer, XKVParams, tail_capacity
from .compression import Rank, _rope_table_dtype, default_group_size

__all__ = ["XKVCache", "XKVLayer", "GrowableXKVLayer", "StaticXKVLayer", "ForwardContext", "XKVParams",
           "XKV_ATTENTION_PREFIX", "SUPPORTED_MODEL_TYPES", "Rank", "default_group_size", "patch_xkv",
           "xkv_attention_forward", "tail_capacity"]

register_method(
    "xkv",
    summary="cross-layer SVD: adjacent layers share one low-rank token factor (xKV)",
    build=XKVCache,
    params=XKVParams,
    families=("llama", "qwen2", "mistral"),
    install=_install_xkv,
    cache_class="kvcompress.xkv.XKVCache",
    doc="docs/xkv.md",
)
