"""Selective reconstruction for xKV decode: which chunks of a compressed segment a decode step rebuilds.

Two scorers rank the chunks: **token scores** (``XKVCache(select_score="tokens")``, the default,
:func:`select_chunks_by_tokens`) and **chunk-mean landmarks** (``select_score="landmarks"``,
:func:`select_chunks`).

Token scores
------------
A chunk's weight in the softmax is carried by its best tokens, so the score of chunk ``c`` is the best
approximate score of its tokens. Keys compressed before RoPE are ``k_t = R(p_t) kt_t`` with
``kt_t = (A_k B_l)[t, h]``; inside a chunk the slot ``p_t`` is within ``chunk/2`` of the chunk's centre slot
``m_c``, and ``q . R(p_t) kt_t`` is approximated by ``q . R(m_c) kt_t = (R(m_c)^T q) . kt_t`` -- exact for
every frequency ``w`` with ``w (p_t - m_c)`` small, that is the slow frequencies that carry content. The
query rotated back to each chunk's centre is folded into the factor space once per chunk,
``w_c = B_l[h] R(m_c)^T q_j`` (``r_k`` numbers per query head), and each token costs a dot product with its
factor row::

    score[h, c] = max_{j in heads of h} max_{t in c, valid} c_s * A_k[t] . w_c[j]

That is ``r_k`` multiply-adds per token and query head, against ``r_k d`` per token and KV head for
rebuilding its key (``G/d`` of the rebuild: 5% for ``G = 3`` query heads per KV head and ``d = 64``), with
no landmark to store. Keys stored rotated (no RoPE table) make it exact: ``w = B_l[h] q_j`` for every chunk.
Padding and outlier rows are masked per token, so a chunk that mixes padding and real tokens is scored by
its real tokens only.

Chunk-mean landmarks
--------------------
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

__all__ = ["landmark_scores", "select_chunks", "select_chunks_by_tokens", "token_scores"]


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
    return _chunk_tokens(scores, tokens, chunk, keep, valid)


def token_scores(query: torch.Tensor, key_factor: torch.Tensor, key_right: torch.Tensor, cos: torch.Tensor | None,
                 sin: torch.Tensor | None, scaling: float, chunk: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``score [B, H, C]``: each chunk's best approximate token score for each KV head (float32; see "Token
    scores" in the module docstring).

    Args:
        query: ``[B, Hq, 1, d]`` post-RoPE decode query.
        key_factor: ``[B, T, r_k]`` the segment's key factor rows (states' dtype, dequantised).
        key_right: ``[B, r_k, H*d]`` the layer's key reconstruction matrix.
        cos, sin: ``[T, rotary_dim]`` the segment's RoPE table, or ``None`` (keys stored rotated).
        scaling: the softmax scale.
        chunk: tokens per chunk (the last chunk may be shorter).
        valid: ``[B, T]`` which tokens may be attended (``None`` = all); a chunk without one scores ``-inf``.
    """
    batch, q_heads, _, head_dim = query.shape
    tokens, rank = key_factor.shape[1:]
    kv_heads = key_right.shape[-1] // head_dim
    chunks = -(-tokens // chunk)
    q = query[:, :, 0, :].float().view(batch, kv_heads, q_heads // kv_heads, head_dim)
    if cos is not None:  # the query rotated back to each chunk's centre slot: [B, C, H, G, d]
        starts = torch.arange(chunks, device=query.device) * chunk
        centre = starts + (tokens - starts).clamp_max(chunk) // 2  # a short last chunk: its own centre
        c, s = cos[centre].float(), sin[centre].float()  # [C, rotary_dim]
        q = apply_rope(q[:, None].expand(batch, chunks, *q.shape[1:]), c[None, :, None, None], -s[None, :, None, None])
    else:
        q = q[:, None]  # one folded query for every chunk
    right = key_right.float().view(batch, rank, kv_heads, head_dim)
    folded = torch.einsum("bchgd,brhd->bchgr", q, right) * scaling  # [B, C or 1, H, G, r_k]
    rows = torch.nn.functional.pad(key_factor.float(), (0, 0, 0, chunks * chunk - tokens))
    rows = rows.view(batch, chunks, chunk, rank)
    folded = folded.expand(batch, chunks, *folded.shape[2:])
    scores = torch.einsum("bcsr,bchgr->bhgcs", rows, folded)  # [B, H, G, C, chunk]
    mask = torch.arange(chunks * chunk, device=query.device) < tokens  # the short last chunk's missing slots
    mask = mask.view(1, chunks, chunk).expand(batch, chunks, chunk)
    if valid is not None:
        mask = mask & torch.nn.functional.pad(valid, (0, chunks * chunk - tokens)).view(batch, chunks, chunk)
    scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
    return scores.amax(dim=-1).amax(dim=2)


def select_chunks_by_tokens(query: torch.Tensor, key_factor: torch.Tensor, key_right: torch.Tensor,
                            cos: torch.Tensor | None, sin: torch.Tensor | None, scaling: float, chunk: int, keep: int,
                            valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`select_chunks` with the chunks ranked by :func:`token_scores` (no landmarks): the tokens of the
    ``keep`` best chunks of each KV head, ``(index, index_valid)``, both ``[B, H, keep*chunk]``."""
    tokens = key_factor.shape[1]
    chunks = -(-tokens // chunk)
    if not 1 <= keep <= chunks:
        raise ValueError(f"keep={keep} chunks is out of range; allowed: 1..{chunks} (the segment's chunks)")
    scores = token_scores(query, key_factor, key_right, cos, sin, scaling, chunk, valid)
    return _chunk_tokens(scores, tokens, chunk, keep, valid)


def _chunk_tokens(scores: torch.Tensor, tokens: int, chunk: int, keep: int,
                  valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The token indices and validity of the ``keep`` best-scoring chunks per KV head (``scores [B, H, C]``)."""
    batch = scores.shape[0]
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
