"""Selective reconstruction for xKV decode: which chunks of a compressed segment a decode step rebuilds.

The maths
---------
A segment of ``T`` tokens holds keys ``k_t = R(p_t) (A_k B_l)[t, h]`` (layer ``l``, KV head ``h``; ``R`` the
rotate-half RoPE of the token's slot, absent when keys are stored rotated). Cut the segment into ``C``
chunks of ``chunk`` consecutive tokens (the last one may be shorter). Each chunk has a landmark, computed
once when the segment is compressed (:func:`kvcompress.xkv.compression.chunk_landmarks`): the mean of its
key factor rows ``Abar_c`` (shared by the group's layers, ``r_k`` numbers) and the chunk means of its cos/sin
table, the matrix ``M_c = mean_t R(p_t)``. A decode step rebuilds the ``C`` landmark keys of its layer,
``L_c = M_c (Abar_c B_l)[h]`` -- the chunk's mean key when its rows agree -- which costs ``1/chunk`` of
rebuilding every key, and scores each KV head's chunks by its query heads' best score::

    score[h, c] = max_{j in heads of h} c_s * q_j . L_c[h]       (-inf for a chunk with no valid token)

A softmax weight ``exp(q . k_t)`` summed over a chunk is at least ``n_c exp(q . mean_t k_t)`` (Jensen), so
a chunk whose landmark scores high holds weight worth attending exactly. The ``n`` best chunks per KV head
(``topk``, then sorted by position) are handed on as token indices; attention then rebuilds exactly those
tokens' keys and values and attends over them together with every exact token (sinks, window, decoded
tail, outliers) in one softmax (:class:`kvcompress.kernels.xkv_decode.SelectedPart`). With ``n = C``
nothing is dropped: callers keep the plain factored segment then (the full reconstruction).

Every step here is a fixed-shape tensor op (matmul, ``topk``, ``gather``): no host synchronisation, so
it is traced by ``torch.compile`` and replayed by CUDA graphs like the rest of the decode step.
"""

from __future__ import annotations

import torch

from ..ops import apply_rope

__all__ = ["landmark_scores", "select_chunks"]


def landmark_scores(query: torch.Tensor, landmarks: torch.Tensor, key_right: torch.Tensor,
                    cos: torch.Tensor | None, sin: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """``score [B, H, C]`` of every chunk for every KV head (float32; see the module docstring).

    Args:
        query: ``[B, Hq, 1, d]`` post-RoPE decode query.
        landmarks: ``[B, C, r_k]`` chunk means of the key factor rows.
        key_right: ``[B, r_k, H*d]`` the layer's key reconstruction matrix (states' dtype).
        cos, sin: ``[C, rotary_dim]`` chunk means of the segment's RoPE table, or ``None`` (keys stored rotated).
        scaling: the softmax scale.
    """
    batch, q_heads, _, head_dim = query.shape
    kv_heads = key_right.shape[-1] // head_dim
    chunks = landmarks.shape[1]
    keys = torch.matmul(landmarks.to(key_right.dtype), key_right).view(batch, chunks, kv_heads, head_dim)
    if cos is not None:
        keys = apply_rope(keys, cos[:, None, :].float(), sin[:, None, :].float())  # float32 maths
    q = query[:, :, 0, :].float().view(batch, kv_heads, q_heads // kv_heads, head_dim)
    scores = torch.matmul(q, keys.float().permute(0, 2, 3, 1)) * scaling  # [B, H, G, C]
    return scores.amax(dim=2)


def select_chunks(query: torch.Tensor, landmarks: torch.Tensor, key_right: torch.Tensor, cos: torch.Tensor | None,
                  sin: torch.Tensor | None, scaling: float, tokens: int, chunk: int, keep: int,
                  valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens of the ``keep`` best chunks of each KV head: ``(index, index_valid)``, both ``[B, H, keep*chunk]``.

    ``index`` holds segment-relative token positions (int64, in increasing order per head; a short last
    chunk's missing positions are clamped to ``tokens - 1``), ``index_valid`` whether each one is attended:
    inside the segment and valid in ``valid [B, tokens]`` (the segment's columns of the decode mask: padding,
    outlier rows; ``None`` = all). Chunks without a valid token score ``-inf`` (chosen last).
    """
    if not 1 <= keep <= landmarks.shape[1]:
        raise ValueError(f"keep={keep} chunks is out of range; allowed: 1..{landmarks.shape[1]} (the segment's chunks)")
    scores = landmark_scores(query, landmarks, key_right, cos, sin, scaling)  # [B, H, C]
    batch, chunks = landmarks.shape[:2]
    if valid is not None:
        padded = torch.nn.functional.pad(valid, (0, chunks * chunk - tokens))
        any_valid = padded.view(batch, chunks, chunk).any(dim=-1)  # [B, C]
        scores = scores.masked_fill(~any_valid[:, None, :], float("-inf"))
    top = scores.topk(keep, dim=-1).indices.sort(dim=-1).values  # [B, H, keep], in token order
    offsets = torch.arange(chunk, device=top.device)
    index = (top[..., None] * chunk + offsets).flatten(-2)  # [B, H, keep*chunk]
    inside = index < tokens
    index = index.clamp_max(tokens - 1)
    if valid is None:
        return index, inside
    heads = index.shape[1]
    picked = valid.gather(1, index.flatten(1)).view(batch, heads, -1)
    return index, inside & picked
