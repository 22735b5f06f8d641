"""TransMLA: convert a GQA model (Llama, Qwen2, Mistral) into transformers' DeepSeek-V3 architecture with
multi-head latent attention (Meng et al., "TransMLA: Multi-Head Latent Attention Is All You Need", 2025).

The converted model is a stock ``DeepseekV3ForCausalLM`` (dense MLP in every layer), so the MLA caches of
this package and transformers' own ``DynamicCache`` (which stores DeepSeek's latent) apply to it unchanged.

The maths, per layer (``G`` KV heads of dim ``d``, ``H`` query heads, ``D = G d`` key dims)
---------------------------------------------------------------------------------------------
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
   RoPE table), so each block ``b`` gets ``n_b`` slots, allotted greedily by the component score summed
   over layers, energy times ``1 - sinc(w_b L)`` (how far RoPE turns over ``L = max_position_embeddings``
   tokens), and each layer keeps its top ``n_b`` components of block ``b``. The other components lose
   RoPE and join the no-RoPE keys ``k_nope`` (``D - rope_dim`` dims).
3. *Low-rank latent*. With ``alpha = ||V|| / ||k_nope||`` (balanced KV, calibration norms), PCA of
   ``x = [alpha k_nope; V]`` (second moment, so biases are included) keeps ``r = kv_lora_rank - 1``
   directions ``P``: the latent is ``y = P^T x``; ``k_nope ~ P_K y / alpha``, ``V ~ P_V y``. Head ``i``'s
   no-RoPE key is ``(S_nope B E_i)^T P_K y / alpha`` (``d`` dims) so its no-RoPE query is simply the
   original ``q_i``: ``qk_nope_head_dim = v_head_dim = d``, ``qk_rope_head_dim = rope_dim``.
4. *Softmax scale*. DeepSeek scales by ``(d + rope_dim)^-1/2``; queries are multiplied by
   ``sqrt((d + rope_dim) / d)`` (and by the source RoPE's attention factor squared) so scores are unchanged.
5. *The latent RMSNorm* (``kv_a_layernorm``) is not linear. The latent carries one extra *anchor* entry:
   ``kv_a_proj_with_mqa`` gives it weight 0 and bias ``C = Y_max / rho`` (``Y_max`` a data-free bound on
   ``||y||``, ``rho = 1e-4``), so ``rms = sqrt((C^2 + ||y||^2) / n + eps)`` equals the constant
   ``sqrt(C^2 / n + eps)`` to a relative ``rho^2 / 2 = 5e-9``, below float32 resolution. The norm's weight
   is that constant on the latent entries (they come out as ``y`` itself) and 0 on the anchor (cached as 0).
   The anchor costs one cached element per token and layer: ``kv_lora_rank = r + 1``.
6. Query biases (Qwen2, Llama with ``attention_bias``) cannot sit in DeepSeek's bias-free ``q_proj``; such
   models use the ``q_lora`` path with the same anchor: ``q_a`` is the identity plus an anchor of bias
   ``C_q``, ``q_a_layernorm`` undoes the constant rms, the anchor comes out as exactly 1 and ``q_b_proj``'s
   anchor column is the query bias (``q_lora_rank = hidden_size + 1``; no effect on the cache).

Lossless setting: ``rope_dim = D``, ``kv_lora_rank = D + 1``, ``freq_fold = 1`` (the defaults): every key
keeps RoPE at its own frequency (per-slot frequencies go into a ``longrope`` table whose short and long
factors are equal, i.e. static), the latent is the values, and the model's logits equal the source's
within float tolerance with ``D + rope_dim + 1 = 2 G d + 1`` cached elements per token and layer (the
source caches ``2 G d``). Anything smaller is lossy; see docs/transmla.md.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .models import text_config

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
ANCHOR_RATIO = 1e-4  # rho: the latent's bounded norm over the anchor; rho^2 is below float32 resolution
_SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


# --------------------------------------------------------------------------------------------------
# Source model geometry and validation
# --------------------------------------------------------------------------------------------------
@dataclass
class _Source:
    """What the conversion needs to know about the GQA model."""

    config: object
    layers: list
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    inv_freq: torch.Tensor  # float32, head_dim // 2
    rope_scale: float  # RoPE attention factor of the source (multiplies cos and sin)
    has_query_bias: bool

    @property
    def key_dim(self) -> int:
        return self.kv_heads * self.head_dim


def _inspect_source(model) -> _Source:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a transformers causal LM (torch.nn.Module), got {type(model).__name__}")
    config = text_config(model)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise TypeError(
            f"convert_gqa_to_mla supports GQA models of type {SUPPORTED_MODEL_TYPES}; got model_type="
            f"{model_type!r} ({type(model).__name__})"
        )
    base = getattr(model, "model", None)
    layers = list(getattr(base, "layers", []))
    if not layers or not hasattr(model, "lm_head"):
        raise TypeError(f"{type(model).__name__} has no model.layers / lm_head; expected a *ForCausalLM model")
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if heads % kv_heads:
        raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE pairs, got head_dim={head_dim}")
    if getattr(config, "mlp_bias", False):
        raise ValueError("mlp_bias=True is not representable: DeepSeek-V3's dense MLP has no biases")
    params = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"source rope_type {rope_type!r} is not supported (it depends on the sequence length, or is unknown); "
            f"supported: {_SUPPORTED_ROPE_TYPES}"
        )
    if (params.get("partial_rotary_factor") or 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported (every head dim must be rotary)")
    rotary = getattr(base, "rotary_emb", None)
    inv_freq = getattr(rotary, "inv_freq", None)
    if inv_freq is None or inv_freq.dtype != torch.float32 or inv_freq.numel() != head_dim // 2:
        from .ops import rope_inv_freq

        inv_freq = rope_inv_freq(config)
    rope_scale = float(getattr(rotary, "attention_scaling", 1.0) or 1.0)
    if getattr(config, "sliding_window", None) is not None:
        warnings.warn(
            f"the source uses sliding-window attention (window {config.sliding_window}); the converted model "
            "attends to the whole context, so they agree only on sequences up to the window",
            stacklevel=3,
        )
    attn = layers[0].self_attn
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        if not isinstance(getattr(attn, name, None), torch.nn.Linear):
            raise TypeError(f"layer 0's attention has no Linear {name}; not a GQA attention block")
    if getattr(attn, "q_norm", None) is not None or getattr(attn, "k_norm", None) is not None:
        raise TypeError("attention with q_norm/k_norm is not supported")
    has_query_bias = any(
        layer.self_attn.q_proj.bias is not None and bool(layer.self_attn.q_proj.bias.detach().abs().max() > 0)
        for layer in layers
    )
    return _Source(config, layers, config.hidden_size, heads, kv_heads, head_dim,
                   inv_freq.detach().float().cpu(), rope_scale, has_query_bias)


def _check_settings(src: _Source, kv_lora_rank, rope_dim, freq_fold, dtype) -> tuple[int, int]:
    key_dim = src.key_dim
    if not isinstance(freq_fold, int) or isinstance(freq_fold, bool) or freq_fold < 1 or (src.head_dim // 2) % freq_fold:
        allowed = [f for f in range(1, src.head_dim // 2 + 1) if (src.head_dim // 2) % f == 0]
        raise ValueError(f"freq_fold must divide head_dim/2 = {src.head_dim // 2}: allowed {allowed}, got {freq_fold!r}")
    if rope_dim is None:
        rope_dim = key_dim
    if not isinstance(rope_dim, int) or isinstance(rope_dim, bool) or rope_dim % 2 or not 2 <= rope_dim <= key_dim:
        raise ValueError(
            f"rope_dim must be an even int in [2, num_key_value_heads * head_dim = {key_dim}], got {rope_dim!r}"
        )
    max_rank = 2 * key_dim - rope_dim + 1
    if kv_lora_rank is None:
        kv_lora_rank = max_rank
    if not isinstance(kv_lora_rank, int) or isinstance(kv_lora_rank, bool) or not 2 <= kv_lora_rank <= max_rank:
        raise ValueError(
            f"kv_lora_rank must be an int in [2, 2 * kv_heads * head_dim - rope_dim + 1 = {max_rank}] "
            f"(one entry is the norm anchor), got {kv_lora_rank!r}"
        )
    if dtype not in (torch.float32, torch.float64, torch.bfloat16):
        raise TypeError(
            f"model dtype {dtype} is not supported (the latent-norm anchor overflows float16); allowed: "
            "float32, float64, bfloat16 (convert in one of them, then cast)"
        )
    return kv_lora_rank, rope_dim


def is_lossless(model, kv_lora_rank: int | None = None, rope_dim: int | None = None, freq_fold: int = 1) -> bool:
    """Whether these settings reproduce ``model``'s logits (all keys keep RoPE, full-rank latent, no folding)."""
    src = _inspect_source(model)
    kv_lora_rank, rope_dim = _check_settings(src, kv_lora_rank, rope_dim, freq_fold, torch.float32)
    return rope_dim == src.key_dim and kv_lora_rank == 2 * src.key_dim - rope_dim + 1 and freq_fold == 1


# --------------------------------------------------------------------------------------------------
# Calibration data (offline, deterministic)
# --------------------------------------------------------------------------------------------------
def calibration_text(split: str = "calibration") -> str:
    """English reference text shipped with Python itself (``pydoc_data.topics``, ~460k characters).

    ``split="calibration"`` joins the even-numbered topics (sorted by name), ``"heldout"`` the odd-numbered
    ones, so conversion and evaluation never see the same text. Deterministic for a given Python version.
    """
    if split not in ("calibration", "heldout"):
        raise ValueError(f"split must be 'calibration' or 'heldout', got {split!r}")
    from pydoc_data.topics import topics

    names = sorted(topics)[0 if split == "calibration" else 1 :: 2]
    return "\n\n".join(topics[name].strip() for name in names)


def calibration_tokens(
    model,
    tokenizer=None,
    num_sequences: int = 8,
    seq_len: int = 512,
    split: str = "calibration",
    seed: int = 0,
    progress: bool = True,
) -> torch.LongTensor:
    """Deterministic calibration token ids ``[num_sequences, seq_len]`` without any download.

    With a tokenizer: consecutive windows of :func:`calibration_text` (``split``). Without one (e.g. a tiny
    random model): text sampled from the model itself, from its BOS token, with ``torch`` seeded by ``seed``
    (the global RNG state is restored afterwards).
    """
    for name, value in (("num_sequences", num_sequences), ("seq_len", seq_len)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if tokenizer is not None:
        ids = tokenizer(calibration_text(split), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        if ids.numel() < num_sequences * seq_len:
            raise ValueError(
                f"num_sequences * seq_len must be at most {ids.numel()} tokens of {split} text, "
                f"got {num_sequences} * {seq_len}"
            )
        return ids[: num_sequences * seq_len].view(num_sequences, seq_len).clone()
    from tqdm.auto import tqdm

    config = text_config(model)
    bos = config.bos_token_id if config.bos_token_id is not None else 0
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed + (1 << 20) * (split == "heldout"))
        start = torch.full((num_sequences, 1), bos, dtype=torch.long, device=device)
        with tqdm(total=seq_len - 1, desc="sampling calibration text", disable=not progress) as bar:

            def tick(input_ids, scores):  # a logits processor that only advances the progress bar
                bar.update(1)
                return scores

            out = model.generate(start, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                                 max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1,
                                 attention_mask=torch.ones_like(start), pad_token_id=bos,
                                 logits_processor=[tick])
    return out[:, :seq_len].cpu()


def _as_token_batch(calibration) -> torch.LongTensor:
    if isinstance(calibration, torch.Tensor):
        tokens = calibration
    elif isinstance(calibration, (list, tuple)) and calibration and all(isinstance(t, torch.Tensor) for t in calibration):
        tokens = torch.stack([t.reshape(-1) for t in calibration])
    else:
        raise TypeError(
            "calibration must be None (built-in offline text), a LongTensor of token ids [sequences, tokens] "
            f"or a list of equal-length 1-D LongTensors; got {type(calibration).__name__}"
        )
    if tokens.dim() == 1:
        tokens = tokens[None]
    if tokens.dim() != 2 or tokens.numel() == 0 or tokens.dtype not in (torch.long, torch.int32, torch.int64):
        raise ValueError(f"calibration token ids must be a non-empty 2-D integer tensor, got shape {tuple(tokens.shape)}")
    return tokens.long()


@torch.no_grad()
def _input_moments(model, src: _Source, tokens: torch.LongTensor, progress: bool) -> list[torch.Tensor]:
    """Per layer, ``sum_t h~_t h~_t^T / n`` of the attention input ``h~ = [input_layernorm(x); 1]`` (float64)."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    moments = [torch.zeros(src.hidden + 1, src.hidden + 1, dtype=torch.float64, device=device) for _ in src.layers]
    count = 0
    for row in tqdm(tokens, desc="calibration forward", disable=not progress):
        hidden_states = model(input_ids=row[None].to(device), output_hidden_states=True, use_cache=False).hidden_states
        for layer, moment, x in zip(src.layers, moments, hidden_states):
            h = layer.input_layernorm(x)[0].double()
            h = torch.cat([h, torch.ones_like(h[:, :1])], dim=1)
            moment += h.T @ h
        count += row.numel()
    return [(m / count).cpu() for m in moments]


# --------------------------------------------------------------------------------------------------
# The linear algebra of one layer
# --------------------------------------------------------------------------------------------------
def _augmented(linear: torch.nn.Linear) -> torch.Tensor:
    """``[W | b]`` in float64 (``b = 0`` when absent), so ``[W | b] @ [h; 1] = W h + b``."""
    weight = linear.weight.detach().double().cpu()
    bias = linear.bias.detach().double().cpu() if linear.bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64)
    return torch.cat([weight, bias[:, None]], dim=1)


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
    ``(queries q) . (keys k) = q . k``; rows sorted by importance, whose values are ``scores[b]``."""

    keys: list[torch.Tensor]  # [G f, G f] each
    queries: list[torch.Tensor]
    scores: torch.Tensor  # [blocks, G f]


def _rorope_basis(src: _Source, wk: torch.Tensor, wq: torch.Tensor, moment: torch.Tensor, fold: int,
                  block_freq: torch.Tensor, basis: str) -> _LayerBasis:
    """Per block of ``fold`` RoPE pairs, a change of basis of the ``G fold`` key components that commutes
    with RoPE (it mixes whole 2-D components, the same way for both coordinates).

    ``basis="key"`` (the paper's RoRoPE): the orthogonal PCA basis of the keys, ``sum_t a a^T + b b^T``.
    ``basis="qk"``: with ``Cq = L L^T`` the queries' second moment over the block (all query heads, each on
    its group's components) and ``L^T Ck L = W S W^T``, keys use ``A = W^T L^T`` and queries ``A^-T =
    W^T L^-1``: query components come out white and key components uncorrelated with energies ``S``, so
    ``S_c`` is component ``c``'s share of the score energy ``E (q . k)^2``.
    Components are ranked by energy times ``1 - sinc(w_b L)`` (how much RoPE moves over ``L`` tokens).
    """
    d, half, rep = src.head_dim, src.head_dim // 2, src.heads // src.kv_heads
    key_moment = wk @ moment @ wk.T  # [D, D]
    query_moments = [wq[i * d : (i + 1) * d] @ moment @ wq[i * d : (i + 1) * d].T for i in range(src.heads)]
    context = float(getattr(src.config, "max_position_embeddings", 4096) or 4096)
    keys, queries, scores = [], [], []
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
        wl = float(block_freq[b]) * context
        motion = 1.0 - math.sin(wl) / wl if wl > 0 else 0.0
        score = energy.clamp_min(0) * motion
        order = torch.argsort(score, descending=True, stable=True)
        keys.append(key_rows[order])
        queries.append(query_rows[order])
        scores.append(score[order])
    return _LayerBasis(keys, queries, torch.stack(scores))


def _allot_slots(bases: list[_LayerBasis], rope_pairs: int, per_block: int) -> list[int]:
    """Greedy: how many RoPE slots each block gets, by the component score summed over layers."""
    total = torch.stack([b.scores for b in bases]).sum(dim=0)  # [blocks, G f]
    counts = [0] * total.shape[0]
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


def _spectral_norm(matrix: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(matrix, ord=2)) if matrix.numel() else 0.0


def _convert_layer(src: _Source, layer, moment: torch.Tensor, split: _Split, kv_lora_rank: int, balance_kv: bool,
                   norm_eps: float) -> tuple[dict[str, torch.Tensor], dict]:
    """The DeepSeek-V3 attention weights of one layer (float64) and some statistics of the fit."""
    attn = layer.self_attn
    d, H, G, D = src.head_dim, src.heads, src.kv_heads, src.key_dim
    rep, rope_dim = H // G, split.key_rope.shape[0]
    wq, wk, wv = _augmented(attn.q_proj), _augmented(attn.k_proj), _augmented(attn.v_proj)

    # Low-rank latent: PCA of [alpha k_nope; V] (second moment of the augmented input, so biases count).
    knope = split.key_nope @ wk  # [D - rope_dim, hidden + 1]
    k_energy = float(torch.trace(knope @ moment @ knope.T)) if knope.numel() else 0.0
    v_energy = float(torch.trace(wv @ moment @ wv.T))
    alpha = math.sqrt(v_energy / k_energy) if balance_kv and k_energy > 0 and v_energy > 0 else 1.0
    stacked = torch.cat([alpha * knope, wv])  # [2D - rope_dim, hidden + 1]
    cov = stacked @ moment @ stacked.T
    evals, evecs = torch.linalg.eigh(cov)
    rank = kv_lora_rank - 1
    basis = evecs.flip(1)[:, :rank]  # P: [2D - rope_dim, r]
    kept_energy = float(evals.flip(0)[:rank].clamp_min(0).sum() / evals.clamp_min(0).sum().clamp_min(1e-300))
    latent = basis.T @ stacked  # [r, hidden + 1]: y = latent @ [h; 1]
    decode_k, decode_v = basis[: knope.shape[0]] / alpha, basis[knope.shape[0] :]  # k_nope ~ decode_k y

    # Anchor: a data-free bound on ||y|| from ||h|| <= max|input_layernorm.weight| * sqrt(hidden).
    h_max = float(layer.input_layernorm.weight.detach().double().abs().max()) * math.sqrt(src.hidden) * 1.01
    y_max = _spectral_norm(latent[:, :-1]) * h_max + float(latent[:, -1].norm())
    anchor = max(y_max, 1e-6) / ANCHOR_RATIO
    norm_const = math.sqrt(anchor**2 / kv_lora_rank + norm_eps)

    kv_a = torch.zeros(kv_lora_rank + rope_dim, src.hidden + 1, dtype=torch.float64)
    kv_a[:rank] = latent
    kv_a[rank, -1] = anchor
    kv_a[kv_lora_rank:] = split.key_rope @ wk
    kv_a_norm = torch.full((kv_lora_rank,), norm_const, dtype=torch.float64)
    kv_a_norm[rank] = 0.0

    q_scale = math.sqrt((d + rope_dim) / d) * src.rope_scale**2
    q_rows, kv_b_rows = [], []
    for i in range(H):
        g = i // rep
        embed = torch.zeros(D, d, dtype=torch.float64)  # E_i: query coordinates -> key space at group g
        embed[g * d : (g + 1) * d] = torch.eye(d, dtype=torch.float64)
        q_i = wq[i * d : (i + 1) * d]
        q_rows += [q_scale * q_i, q_scale * (split.query_rope @ embed @ q_i)]
        k_block = (split.query_nope @ embed).T @ decode_k  # [d, r]
        v_block = decode_v[g * d : (g + 1) * d]  # [d, r]
        zero = torch.zeros(d, 1, dtype=torch.float64)
        kv_b_rows += [torch.cat([k_block, zero], 1), torch.cat([v_block, zero], 1)]
    query = torch.cat(q_rows)  # [H (d + rope_dim), hidden + 1]

    prefix = "self_attn."
    weights = {
        prefix + "kv_a_proj_with_mqa.weight": kv_a[:, :-1],
        prefix + "kv_a_proj_with_mqa.bias": kv_a[:, -1],
        prefix + "kv_a_layernorm.weight": kv_a_norm,
        prefix + "kv_b_proj.weight": torch.cat(kv_b_rows),
        prefix + "o_proj.weight": attn.o_proj.weight.detach().double().cpu(),
        prefix + "o_proj.bias": (attn.o_proj.bias.detach().double().cpu() if attn.o_proj.bias is not None
                                 else torch.zeros(src.hidden, dtype=torch.float64)),
    }
    if src.has_query_bias:
        n_q = src.hidden + 1
        q_anchor = h_max / ANCHOR_RATIO
        q_const = math.sqrt(q_anchor**2 / n_q + norm_eps)
        q_a = torch.zeros(n_q, src.hidden + 1, dtype=torch.float64)
        q_a[: src.hidden, : src.hidden] = torch.eye(src.hidden, dtype=torch.float64)
        q_a[src.hidden, -1] = q_anchor
        q_norm = torch.full((n_q,), q_const, dtype=torch.float64)
        q_norm[src.hidden] = q_const / q_anchor  # the anchor comes out as exactly 1
        weights |= {
            prefix + "q_a_proj.weight": q_a[:, :-1],
            prefix + "q_a_proj.bias": q_a[:, -1],
            prefix + "q_a_layernorm.weight": q_norm,
            prefix + "q_b_proj.weight": query,  # columns: h, then the anchor (= the query bias)
        }
    else:
        weights[prefix + "q_proj.weight"] = query[:, :-1]
    stats = {"kv_energy_kept": kept_energy, "balance_alpha": alpha,
             "nope_key_share": k_energy / max(k_energy + float(torch.trace(kv_a[kv_lora_rank:] @ moment
                                                                                  @ kv_a[kv_lora_rank:].T)), 1e-300)}
    return weights, stats


# --------------------------------------------------------------------------------------------------
# RoPE table of the converted model
# --------------------------------------------------------------------------------------------------
def _longrope_factors(target: torch.Tensor, theta: float, rope_dim: int) -> list[float]:
    """Factors ``e_s`` with transformers' longrope formula ``1 / (e_s * theta ** (2 s / rope_dim))`` giving
    ``target[s]`` (float32), nudged by a few ulps so that CPU float32 arithmetic hits it bit for bit."""
    shape = torch.arange(0, rope_dim, 2, dtype=torch.int64).float() / rope_dim
    power = theta**shape  # exactly as transformers computes it
    factors = (1.0 / (target.double() * power.double())).float()
    for _ in range(16):
        got = 1.0 / (factors * power)
        wrong = got != target
        if not wrong.any():
            break
        step = torch.where(got > target, torch.full_like(factors, math.inf), torch.full_like(factors, -math.inf))
        factors = torch.where(wrong, torch.nextafter(factors, step), factors)
    return [float(f) for f in factors]


def _deepseek_config(src: _Source, kv_lora_rank: int, rope_dim: int, slot_freq: torch.Tensor, interleave: bool):
    from transformers import DeepseekV3Config

    cfg = src.config
    theta = float((getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    factors = _longrope_factors(slot_freq, theta, rope_dim)
    max_pos = cfg.max_position_embeddings
    rope_parameters = {"rope_type": "longrope", "rope_theta": theta, "short_factor": factors, "long_factor": factors,
                       "factor": 1.0, "attention_factor": 1.0, "original_max_position_embeddings": max_pos}
    return DeepseekV3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        moe_intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=src.heads, num_key_value_heads=src.heads,  # MLA expands keys per query head
        n_shared_experts=1, n_routed_experts=1, num_experts_per_tok=1, n_group=1, topk_group=1,
        first_k_dense_replace=cfg.num_hidden_layers,  # every layer keeps a dense MLP
        kv_lora_rank=kv_lora_rank, q_lora_rank=src.hidden + 1 if src.has_query_bias else None,
        qk_rope_head_dim=rope_dim, qk_nope_head_dim=src.head_dim, v_head_dim=src.head_dim,
        hidden_act=cfg.hidden_act, max_position_embeddings=max_pos,
        initializer_range=getattr(cfg, "initializer_range", 0.02), rms_norm_eps=cfg.rms_norm_eps,
        pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        rope_parameters=rope_parameters, rope_interleave=interleave,
        attention_bias=True,  # kv_a_proj_with_mqa needs a bias for the norm anchor
        attention_dropout=0.0,
    )


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------
def convert_gqa_to_mla(
    model,
    kv_lora_rank: int | None = None,
    rope_dim: int | None = None,
    calibration: torch.Tensor | list | None = None,
    *,
    tokenizer=None,
    freq_fold: int = 1,
    rorope_basis: str = "qk",
    balance_kv: bool = True,
    rope_interleave: bool = True,
    recovery_steps: int = 0,
    recovery_lr: float = 1e-4,
    progress: bool = True,
):
    r"""Convert a Llama/Qwen2/Mistral causal LM into a ``DeepseekV3ForCausalLM`` with latent attention.

    Per token and layer the converted model caches ``kv_lora_rank + rope_dim`` numbers (DeepSeek's latent
    ``c_kv`` and the shared RoPE key) instead of ``2 * num_key_value_heads * head_dim``. The module
    docstring of ``kvcompress.transmla`` derives the construction; in short, per layer
    :math:`q_i \cdot k_{g(i)} = (A^{-T} E_i q_i)\cdot(A k)` with RoRoPE's change of basis :math:`A`
    (per block of RoPE frequencies, so it commutes with RoPE), ``rope_dim / 2`` components keep RoPE,
    and the rest plus the values are compressed by one PCA ``[alpha k_nope; V] ~ P P^T [alpha k_nope; V]``
    with ``kv_lora_rank - 1`` directions (one latent entry anchors the latent RMSNorm).

    Args:
        model: the source model (not modified). Supported ``model_type``: ``llama``, ``mistral``, ``qwen2``.
        kv_lora_rank: cached latent size per token and layer, in ``[2, 2 * G * d - rope_dim + 1]``
            (``G`` KV heads of dim ``d``); ``None`` = the maximum (lossless latent).
        rope_dim: dims of the shared RoPE key, even, in ``[2, G * d]``; ``None`` = ``G * d`` (every key
            component keeps its RoPE: lossless).
        calibration: token ids ``[sequences, tokens]`` (or a list of 1-D tensors) whose activations choose
            the bases. ``None``: :func:`calibration_tokens` (8 x 512 tokens of Python's bundled docs when a
            ``tokenizer`` is given, else text sampled from the model with a fixed seed). Optional in the
            lossless setting (any bases are exact there; without data it uses the identity moments).
        tokenizer: tokenizer for the default calibration text.
        freq_fold: FreqFold, number of adjacent RoPE frequencies treated as one (divides ``d / 2``);
            1 = exact frequencies.
        rorope_basis: ``"qk"`` (default): per frequency block, the basis that whitens the queries and
            decorrelates the keys, ranking components by their share of the score energy; ``"key"``: the
            paper's orthogonal PCA of the keys alone. Both commute with RoPE.
        balance_kv: scale no-RoPE keys to the values' norm before the joint PCA (the paper's BKV).
        rope_interleave: DeepSeek's ``rope_interleave`` layout for the converted config.
        recovery_steps: if > 0, that many steps of :func:`distill_from_teacher` on the calibration tokens.
        recovery_lr: AdamW learning rate of the recovery training.
        progress: show tqdm bars.

    Returns:
        ``DeepseekV3ForCausalLM`` in eval mode on the source's device and dtype, with ``transmla_info``
        (a dict: settings, cache elements per token, per-layer energy kept, recovery losses).

    Raises:
        TypeError: unsupported model type/architecture or dtype (float16), bad ``calibration`` type.
        ValueError: ``kv_lora_rank``, ``rope_dim``, ``freq_fold``, ``rorope_basis`` or ``recovery_steps``
            out of range, odd head dim, sequence-length-dependent RoPE.
    """
    from transformers import AutoModelForCausalLM

    src = _inspect_source(model)
    param = next(model.parameters())
    kv_lora_rank, rope_dim = _check_settings(src, kv_lora_rank, rope_dim, freq_fold, param.dtype)
    if rorope_basis not in ("qk", "key"):
        raise ValueError(f"rorope_basis must be 'qk' or 'key', got {rorope_basis!r}")
    if not isinstance(recovery_steps, int) or isinstance(recovery_steps, bool) or recovery_steps < 0:
        raise ValueError(f"recovery_steps must be an int >= 0, got {recovery_steps!r}")
    lossless = rope_dim == src.key_dim and kv_lora_rank == 2 * src.key_dim - rope_dim + 1 and freq_fold == 1
    tokens = None
    if calibration is not None:
        tokens = _as_token_batch(calibration)
        if int(tokens.max()) >= src.config.vocab_size or int(tokens.min()) < 0:
            raise ValueError(f"calibration token ids must be in [0, vocab_size={src.config.vocab_size})")
    elif not lossless or recovery_steps > 0:
        tokens = calibration_tokens(model, tokenizer, progress=progress)

    was_training = model.training
    model.eval()
    try:
        if tokens is None:  # lossless without data: any orthogonal bases are exact at full rank
            moments = [torch.eye(src.hidden + 1, dtype=torch.float64) for _ in src.layers]
        else:
            moments = _input_moments(model, src, tokens, progress)
    finally:
        model.train(was_training)

    block_freq = _block_frequencies(src, freq_fold)
    wks = [_augmented(layer.self_attn.k_proj) for layer in src.layers]
    wqs = [_augmented(layer.self_attn.q_proj) for layer in src.layers]
    bases = [_rorope_basis(src, wk, wq, m, freq_fold, block_freq, rorope_basis) for wk, wq, m in zip(wks, wqs, moments)]
    counts = _allot_slots(bases, rope_dim // 2, src.kv_heads * freq_fold)
    slot_freq = torch.cat([block_freq[b].repeat(n) for b, n in enumerate(counts)])

    config = _deepseek_config(src, kv_lora_rank, rope_dim, slot_freq, rope_interleave)
    attn_impl = getattr(src.config, "_attn_implementation", None)
    new = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                           **({"attn_implementation": attn_impl} if attn_impl else {}))
    norm_eps = new.model.layers[0].self_attn.kv_a_layernorm.variance_epsilon

    from tqdm.auto import tqdm

    state, layer_stats = {}, []
    for index, (layer, moment, basis) in enumerate(
        tqdm(list(zip(src.layers, moments, bases)), desc="converting layers", disable=not progress)
    ):
        split = _split(src, basis, freq_fold, counts, rope_dim, rope_interleave)
        weights, stats = _convert_layer(src, layer, moment, split, kv_lora_rank, balance_kv, norm_eps)
        layer_stats.append(stats)
        prefix = f"model.layers.{index}."
        state |= {prefix + k: v for k, v in weights.items()}
        for name in ("input_layernorm.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight",
                     "mlp.up_proj.weight", "mlp.down_proj.weight"):
            state[prefix + name] = layer.get_submodule(name.rsplit(".", 1)[0]).weight.detach()
    state["model.embed_tokens.weight"] = model.get_input_embeddings().weight.detach()
    state["model.norm.weight"] = model.model.norm.weight.detach()
    state["lm_head.weight"] = model.lm_head.weight.detach()
    expected = dict(new.state_dict())
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    if missing or unexpected:  # a transformers version with other parameter names: fail loudly
        raise RuntimeError(f"DeepSeek-V3 parameter names differ: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
    with torch.no_grad():
        for name, value in state.items():
            if tuple(expected[name].shape) != tuple(value.shape):
                raise RuntimeError(f"{name}: built {tuple(value.shape)}, DeepSeek-V3 expects {tuple(expected[name].shape)}")
            expected[name].copy_(value.to(torch.float32).cpu())
    if config.tie_word_embeddings:
        new.tie_weights()
    new.to(device=param.device, dtype=param.dtype).eval()
    if getattr(model, "generation_config", None) is not None:
        new.generation_config = model.generation_config
    new.transmla_info = {
        "kv_lora_rank": kv_lora_rank, "rope_dim": rope_dim, "freq_fold": freq_fold, "rorope_basis": rorope_basis,
        "balance_kv": balance_kv,
        "lossless": lossless, "rope_slots_per_block": counts,
        "cache_elements_per_token": {"source": kv_elements_per_token(model), "converted": kv_elements_per_token(new)},
        "layers": layer_stats, "calibration_tokens": 0 if tokens is None else tokens.numel(), "recovery_losses": [],
    }
    if recovery_steps:
        new.transmla_info["recovery_losses"] = distill_from_teacher(
            new, model, tokens, steps=recovery_steps, lr=recovery_lr, progress=progress
        )
    return new


def kv_elements_per_token(model_or_config) -> int:
    """Numbers the KV cache holds per token, summed over layers.

    GQA (Llama/Qwen2/Mistral): ``2 * num_key_value_heads * head_dim * layers``. DeepSeek MLA (latent
    caching, as transformers' DynamicCache and the MLA caches do): ``(kv_lora_rank + qk_rope_head_dim) * layers``.
    Multiply by the element size for bytes.
    """
    config = text_config(model_or_config)
    if getattr(config, "kv_lora_rank", None):
        return (config.kv_lora_rank + config.qk_rope_head_dim) * config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_key_value_heads * head_dim * config.num_hidden_layers


def distill_from_teacher(
    student,
    teacher,
    tokens: torch.Tensor,
    steps: int = 50,
    lr: float = 1e-4,
    temperature: float = 1.0,
    batch_size: int = 1,
    progress: bool = True,
) -> list[float]:
    r"""Recovery training: minimise :math:`\mathrm{KL}(p_\text{teacher} \,\|\, p_\text{student})` of the
    next-token distributions (at ``temperature``), averaged over tokens, for ``steps`` AdamW steps.

    Only the student's attention projections train (``q_proj``/``q_a_proj``/``q_b_proj``,
    ``kv_a_proj_with_mqa``, ``kv_b_proj``, ``o_proj``); the norms, MLPs and embeddings stay frozen. Step
    ``s`` uses rows ``s * batch_size, ...`` (cyclically) of ``tokens``. Ctrl-C stops early and keeps the steps done (a
    warning says how many). The student is left in eval mode; ``requires_grad`` flags are restored.

    Returns:
        The loss of every step done.
    """
    from tqdm.auto import tqdm

    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a positive float, got {lr!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be a positive float, got {temperature!r}")
    tokens = _as_token_batch(tokens)
    device = next(student.parameters()).device
    flags = {name: p.requires_grad for name, p in student.named_parameters()}
    trained = []
    for name, p in student.named_parameters():
        train = ".self_attn." in name and "layernorm" not in name
        p.requires_grad_(train)
        if train:
            trained.append(p)
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    losses: list[float] = []
    student.train()
    try:
        for step in tqdm(range(steps), desc="recovery distillation", disable=not progress):
            rows = torch.arange(step * batch_size, (step + 1) * batch_size) % len(tokens)
            row = tokens[rows].to(device)
            with torch.no_grad():
                target = F.log_softmax(teacher(input_ids=row, use_cache=False).logits.float() / temperature, -1)
            logits = student(input_ids=row, use_cache=False).logits.float() / temperature
            loss = F.kl_div(F.log_softmax(logits, -1).flatten(0, 1), target.flatten(0, 1), log_target=True,
                            reduction="batchmean")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    except KeyboardInterrupt:
        warnings.warn(f"recovery distillation interrupted after {len(losses)} of {steps} steps", stacklevel=2)
    finally:
        for name, p in student.named_parameters():
            p.requires_grad_(flags[name])
        student.eval()
    return losses
