r"""Per-layer conversion into DeepSeek-V3's latent attention, the converted model's config, and
:func:`convert_gqa_to_mla`, which runs every stage (source, calibration, RoRoPE, latent, recovery).

The maths, per layer (after RoRoPE has split the key space, see :mod:`kvcompress.transmla.rorope`)
-----------------------------------------------------------------------------------------------
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

The RoPE table: DeepSeek has one, for all layers, over the ``rope_dim / 2`` slots; each slot's frequency
(its block's, from RoRoPE) goes into a ``longrope`` table whose short and long factors are equal, i.e. static.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, DeepseekV3Config

from ..models import text_config
from .calibration import _as_token_batch, _input_moments, calibration_tokens
from .checks import check_bool, check_int, check_positive_float
from .distill import distill_from_teacher
from .rorope import ROPE_SELECTIONS, _allot_slots, _block_frequencies, _block_weights, _rorope_basis, _split, _Split
from .source import _augmented, _check_settings, _eval_mode, _inspect_source, _Source

ANCHOR_RATIO = 1e-4  # rho: the latent's bounded norm over the anchor; rho^2 is below float32 resolution


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
    rope_selection: str = "rotation",
    rope_context: int | None = None,
    recovery_steps: int = 0,
    recovery_lr: float = 1e-4,
    progress: bool = True,
):
    r"""Convert a Llama/Qwen2/Mistral causal LM into a ``DeepseekV3ForCausalLM`` with latent attention.

    Per token and layer the converted model caches ``kv_lora_rank + rope_dim`` numbers (DeepSeek's latent
    ``c_kv`` and the shared RoPE key) instead of ``2 * num_key_value_heads * head_dim``. The module
    docstrings of ``kvcompress.transmla`` derive the construction; in short, per layer
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
        rope_selection: which frequencies keep RoPE when ``rope_dim < G * d``: components ranked by energy
            times their frequency's position sensitivity, the mean of ``1 - cos(w t)`` over distances ``t``
            uniform on ``[0, rope_context]`` (``"rotation"``, default) or weighted ``1 / t`` on ``1 ..
            rope_context`` (``"log_rotation"``); ``"energy"``: energy alone; ``"frequency"``: the highest
            frequencies, whole blocks at a time.
        rope_context: the distance range ``L`` of ``rope_selection``, an int >= 1; ``None`` =
            ``max_position_embeddings``.
        recovery_steps: if > 0, that many steps of :func:`distill_from_teacher` on the calibration tokens.
        recovery_lr: AdamW learning rate of the recovery training.
        progress: show tqdm bars.

    Returns:
        ``DeepseekV3ForCausalLM`` in eval mode on the source's device and dtype, with ``transmla_info``
        (a dict: settings, cache elements per token, per-layer energy kept, recovery losses).

    Raises:
        TypeError: unsupported model type/architecture or dtype (float16), bad ``calibration`` type, a
            ``tokenizer`` that is not callable.
        ValueError: ``kv_lora_rank``, ``rope_dim``, ``freq_fold``, ``rorope_basis``, ``rope_selection``,
            ``rope_context``, ``recovery_steps`` or
            ``recovery_lr`` (finite, > 0) out of range, a flag that is not a bool, calibration token ids out
            of the vocabulary, odd head dim, sequence-length-dependent RoPE. Every argument is checked
            before any work starts; a Ctrl-C during conversion leaves ``model`` as it was.
    """
    src = _inspect_source(model)
    param = next(model.parameters())
    kv_lora_rank, rope_dim = _check_settings(src, kv_lora_rank, rope_dim, freq_fold, param.dtype)
    if rorope_basis not in ("qk", "key"):
        raise ValueError(f"rorope_basis must be 'qk' or 'key', got {rorope_basis!r}")
    balance_kv = check_bool("balance_kv", balance_kv)
    if rope_selection not in ROPE_SELECTIONS:
        raise ValueError(f"rope_selection must be one of {ROPE_SELECTIONS}, got {rope_selection!r}")
    if rope_context is None:
        rope_context = int(getattr(src.config, "max_position_embeddings", None) or 4096)
    rope_context = check_int("rope_context", rope_context, 1)
    rope_interleave = check_bool("rope_interleave", rope_interleave)
    progress = check_bool("progress", progress)
    recovery_steps = check_int("recovery_steps", recovery_steps, 0)
    recovery_lr = check_positive_float("recovery_lr", recovery_lr)
    if tokenizer is not None and not callable(tokenizer):
        raise TypeError(f"tokenizer must be None or a callable tokenizer, got {type(tokenizer).__name__}")
    lossless = rope_dim == src.key_dim and kv_lora_rank == 2 * src.key_dim - rope_dim + 1 and freq_fold == 1
    tokens = None
    if calibration is not None:
        tokens = _as_token_batch(calibration, "calibration", src.config.vocab_size)

    with _eval_mode(model):  # sampling and calibration statistics without dropout
        if tokens is None and (not lossless or recovery_steps > 0):
            tokens = calibration_tokens(model, tokenizer, progress=progress)
        if tokens is None:  # lossless without data: any orthogonal bases are exact at full rank
            moments = [torch.eye(src.hidden + 1, dtype=torch.float64) for _ in src.layers]
        else:
            moments = _input_moments(model, src, tokens, progress)

    block_freq = _block_frequencies(src, freq_fold)
    wks = [_augmented(layer.self_attn.k_proj) for layer in src.layers]
    wqs = [_augmented(layer.self_attn.q_proj) for layer in src.layers]
    bases = [_rorope_basis(src, wk, wq, m, freq_fold, block_freq, rorope_basis) for wk, wq, m in zip(wks, wqs, moments)]
    weights = _block_weights(block_freq, rope_selection, rope_context)
    counts = _allot_slots(bases, rope_dim // 2, src.kv_heads * freq_fold, weights, rope_selection)
    slot_freq = torch.cat([block_freq[b].repeat(n) for b, n in enumerate(counts)])

    config = _deepseek_config(src, kv_lora_rank, rope_dim, slot_freq, rope_interleave)
    attn_impl = getattr(src.config, "_attn_implementation", None)
    # Built in the source's dtype, as from_pretrained builds it, so the RoPE buffers stay float32; a later
    # .to(dtype) would round the per-slot frequencies to bfloat16, unlike a reloaded checkpoint.
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten: keep the caller's RNG stream
        new = AutoModelForCausalLM.from_config(config, dtype=param.dtype,
                                               **({"attn_implementation": attn_impl} if attn_impl else {}))
    norm_eps = new.model.layers[0].self_attn.kv_a_layernorm.variance_epsilon

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
    new.to(device=param.device).eval()
    if getattr(model, "generation_config", None) is not None:
        new.generation_config = model.generation_config
    new.transmla_info = {
        "kv_lora_rank": kv_lora_rank, "rope_dim": rope_dim, "freq_fold": freq_fold, "rorope_basis": rorope_basis,
        "balance_kv": balance_kv, "rope_selection": rope_selection, "rope_context": rope_context,
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
