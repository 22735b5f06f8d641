r"""RoRoPE and FreqFold: a change of basis of the key space that commutes with RoPE, and the choice of the
components that keep RoPE.

The maths, per layer
--------------------
GQA scores query head ``i`` against key head ``g(i)``: ``s_i = q_i . k_g(i)``, both rotated by RoPE, whose
pair ``p`` (dims ``p`` and ``p + d/2`` of a head) turns by ``w_p * position``. Embed ``q_i`` into the
``D``-dim key space at its group's slot (``E_i q_i``): ``s_i = (E_i q_i) . k``.

1. *RoRoPE*. For a block ``b`` of ``f`` adjacent pairs (``f = freq_fold``; ``f = 1`` is plain RoRoPE) the
   ``G f`` two-dimensional components ``(k[g, p], k[g, p + d/2])`` of the key all turn by the same angle if
   their frequencies are taken equal (exact for ``f = 1``; FreqFold approximates the block's frequencies by
   their geometric mean). Any invertible ``A_b`` mixing them, applied alike to both coordinates, then
   commutes with RoPE, and ``q . k = (A_b^-T q) . (A_b k)``. The paper takes ``A_b = U_b``, the orthogonal
   PCA basis of the calibration keys (``rorope_basis="key"``). The default ``"qk"`` takes
   ``A_b = W^T L^T`` with ``Cq = L L^T`` (query second moment over the block, all heads) and
   ``L^T Ck L = W S W^T``: queries come out white and keys uncorrelated, so ``S_c`` is component ``c``'s
   share of the score energy. Together the blocks give ``s_i = (B E_i q_i) . (A k)`` with ``B = A^-T``.
2. ``rope_dim / 2`` components keep RoPE: their keys form DeepSeek's one shared ``k_rot`` and each head's
   query gets its own ``q_rot``. Which ones: every layer must use the same frequencies (DeepSeek has one
   RoPE table), so each block ``b`` gets ``n_b`` slots, allotted greedily by the component energy summed
   over layers times the block's *position sensitivity* ``m_b``, and each layer keeps its top ``n_b``
   components of block ``b``. The other components lose RoPE and join the no-RoPE keys ``k_nope``
   (``D - rope_dim`` dims). A component of energy ``S`` that loses its rotation changes the score at
   distance ``t`` by ``q^T (R(w t) - I) k``, of mean square ``S * 2 (1 - cos(w t))`` for a rotation-blind
   (isotropic) pair, so ``m_b`` is ``1 - cos(w_b t)`` averaged over a distribution of distances
   (``rope_selection``): ``"rotation"`` uniform on ``[0, L]`` (``m_b = 1 - sinc(w_b L)``), ``"log_rotation"``
   ``t = 1 .. L`` with weight ``1 / t`` (attention is mostly local), ``"energy"`` ``m_b = 1`` (position
   blind), and ``"frequency"`` keeps the fastest-turning blocks whole, highest frequency first.
   ``L = rope_context`` (default ``max_position_embeddings``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .source import _Source


def _blocks(src: _Source, fold: int) -> list[list[tuple[int, int]]]:
    """Block ``b``: the ``(kv_head, pair)`` components of pairs ``[b f, (b + 1) f)``, kv_head-major."""
    pairs = src.head_dim // 2
    return [[(g, p) for g in range(src.kv_heads) for p in range(b * fold, (b + 1) * fold)]
            for b in range(pairs // fold)]


def _block_frequencies(src: _Source, fold: int) -> torch.Tensor:
    """One frequency per block: the geometric mean of its pairs' frequencies (exact for ``fold = 1``)."""
    freqs = src.inv_freq.double().view(-1, fold)
    return freqs.log().mean(dim=1).exp().float() if fold > 1 else src.inv_freq.clone()


@dataclass
class _LayerBasis:
    """RoRoPE bases of one layer. Per block ``b``: ``keys[b]`` (rows: components, applied to the key
    coordinates of the block) and ``queries[b] = keys[b]^-T`` (applied to query coordinates), so that
    ``(queries q) . (keys k) = q . k``; rows sorted by energy, whose values are ``energies[b]``."""

    keys: list[torch.Tensor]  # [G f, G f] each
    queries: list[torch.Tensor]
    energies: torch.Tensor  # [blocks, G f]


def _rorope_basis(src: _Source, wk: torch.Tensor, wq: torch.Tensor, moment: torch.Tensor, fold: int,
                  block_freq: torch.Tensor, basis: str) -> _LayerBasis:
    """Per block of ``fold`` RoPE pairs, a change of basis of the ``G fold`` key components that commutes
    with RoPE (it mixes whole 2-D components, the same way for both coordinates).

    ``basis="key"`` (the paper's RoRoPE): the orthogonal PCA basis of the keys, ``sum_t a a^T + b b^T``.
    ``basis="qk"``: with ``Cq = L L^T`` the queries' second moment over the block (all query heads, each on
    its group's components) and ``L^T Ck L = W S W^T``, keys use ``A = W^T L^T`` and queries ``A^-T =
    W^T L^-1``: query components come out white and key components uncorrelated with energies ``S``, so
    ``S_c`` is component ``c``'s share of the score energy ``E (q . k)^2``.
    Components are ranked by energy (within a block they share the frequency, so every position weight of
    :func:`_block_weights` keeps this order).
    """
    d, half, rep = src.head_dim, src.head_dim // 2, src.heads // src.kv_heads
    key_moment = wk @ moment @ wk.T  # [D, D]
    query_moments = [wq[i * d : (i + 1) * d] @ moment @ wq[i * d : (i + 1) * d].T for i in range(src.heads)]
    keys, queries, energies = [], [], []
    for b, comps in enumerate(_blocks(src, fold)):
        a_idx = torch.tensor([g * d + p for g, p in comps])
        ck = key_moment[a_idx][:, a_idx] + key_moment[a_idx + half][:, a_idx + half]
        cq = torch.zeros_like(ck)
        for i in range(src.heads):
            own = [n for n, (g, _) in enumerate(comps) if g == i // rep]
            pairs = torch.tensor([comps[n][1] for n in own])
            block = query_moments[i][pairs][:, pairs] + query_moments[i][pairs + half][:, pairs + half]
            cq[torch.tensor(own)[:, None], torch.tensor(own)[None, :]] += block
        if basis == "key":
            energy, vecs = torch.linalg.eigh(ck)
            key_rows = vecs.T
            query_rows = key_rows
            query_e = ((key_rows @ cq) * key_rows).sum(dim=1)
            energy = energy.clamp_min(0) * query_e.clamp_min(0)
        else:
            eye = torch.eye(len(comps), dtype=torch.float64)
            chol = torch.linalg.cholesky(cq + eye * (1e-9 * float(cq.diagonal().mean()) + 1e-30))
            energy, vecs = torch.linalg.eigh(chol.T @ ck @ chol)
            key_rows = vecs.T @ chol.T
            query_rows = torch.linalg.solve_triangular(chol, vecs, upper=False).T  # W^T L^-1
        energy = energy.clamp_min(0)
        order = torch.argsort(energy, descending=True, stable=True)
        keys.append(key_rows[order])
        queries.append(query_rows[order])
        energies.append(energy[order])
    return _LayerBasis(keys, queries, torch.stack(energies))


ROPE_SELECTIONS = ("rotation", "log_rotation", "energy", "frequency")


def _block_weights(block_freq: torch.Tensor, selection: str, context: int) -> torch.Tensor:
    """Position sensitivity ``m_b`` of each block: the mean of ``1 - cos(w_b t)`` over the distances ``t`` of
    ``selection`` (module docstring, item 2); ``"frequency"`` gives the frequencies themselves."""
    w = block_freq.double()
    if selection == "rotation":  # t uniform on [0, L]: 1 - sin(w L) / (w L)
        wl = w * context
        return torch.where(wl > 0, 1.0 - torch.sin(wl) / wl.clamp_min(1e-300), torch.zeros_like(wl))
    if selection == "log_rotation":  # t = 1 .. L, weight 1 / t
        t = torch.arange(1, context + 1, dtype=torch.float64)
        weight = 1.0 / t
        return (1.0 - torch.cos(w[:, None] * t[None])) @ weight / weight.sum()
    if selection == "energy":
        return torch.ones_like(w)
    return w  # "frequency"


def _allot_slots(bases: list[_LayerBasis], rope_pairs: int, per_block: int, weights: torch.Tensor,
                 selection: str = "rotation") -> list[int]:
    """How many RoPE slots each block gets: greedily, by the component energy summed over layers times the
    block's weight; ``selection="frequency"`` fills whole blocks in order of decreasing weight instead."""
    counts = [0] * len(weights)
    if selection == "frequency":
        for b in torch.argsort(weights, descending=True, stable=True).tolist():
            counts[b] = min(per_block, rope_pairs - sum(counts))
        return counts
    total = torch.stack([b.energies for b in bases]).sum(dim=0) * weights[:, None]  # [blocks, G f]
    for _ in range(rope_pairs):
        best, best_gain = None, -1.0
        for b, n in enumerate(counts):
            if n < per_block and float(total[b, n]) > best_gain:
                best, best_gain = b, float(total[b, n])
        counts[best] += 1
    return counts


def _rope_positions(slot: int, rope_dim: int, interleave: bool) -> tuple[int, int]:
    """Where slot ``s``'s two coordinates sit in DeepSeek's ``k_rot``/``q_rot`` (see ``rope_interleave``)."""
    return (2 * slot, 2 * slot + 1) if interleave else (slot, slot + rope_dim // 2)


@dataclass
class _Split:
    """Rows (over the ``D`` key-space coordinates) of the layer's key and query transforms, split into
    the components that keep RoPE (in DeepSeek's ``k_rot`` layout) and those that do not."""

    key_rope: torch.Tensor  # [rope_dim, D]
    key_nope: torch.Tensor  # [D - rope_dim, D]
    query_rope: torch.Tensor
    query_nope: torch.Tensor


def _split(src: _Source, basis: _LayerBasis, fold: int, counts: list[int], rope_dim: int, interleave: bool) -> _Split:
    d, half, D = src.head_dim, src.head_dim // 2, src.key_dim
    rope = [torch.zeros(rope_dim, D, dtype=torch.float64) for _ in range(2)]
    nope = [[], []]
    slot = 0
    for b, comps in enumerate(_blocks(src, fold)):
        a_cols = torch.tensor([g * d + p for g, p in comps])
        for c in range(len(comps)):
            if c < counts[b]:
                pa, pb = _rope_positions(slot, rope_dim, interleave)
                slot += 1
            for which, rows in enumerate((basis.keys[b], basis.queries[b])):
                row_a = torch.zeros(D, dtype=torch.float64)
                row_b = torch.zeros(D, dtype=torch.float64)
                row_a[a_cols] = rows[c]
                row_b[a_cols + half] = rows[c]
                if c < counts[b]:
                    rope[which][pa], rope[which][pb] = row_a, row_b
                else:
                    nope[which] += [row_a, row_b]
    stacked = [torch.stack(n) if n else torch.zeros(0, D, dtype=torch.float64) for n in nope]
    return _Split(rope[0], stacked[0], rope[1], stacked[1])
