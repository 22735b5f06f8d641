"""Reading the GQA source model: its attention geometry, its RoPE, and which conversion settings it admits.

Notation used throughout the package: ``G`` KV heads of dim ``d``, ``H`` query heads, ``D = G d`` key dims.
The attention projections are read as augmented matrices ``[W | b]`` acting on ``[h; 1]``, so that biases
ride along with the weights in every second moment and change of basis.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..models import text_config
from ..ops import rope_inv_freq

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


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


def _augmented(linear: torch.nn.Linear) -> torch.Tensor:
    """``[W | b]`` in float64 (``b = 0`` when absent), so ``[W | b] @ [h; 1] = W h + b``."""
    weight = linear.weight.detach().double().cpu()
    bias = linear.bias.detach().double().cpu() if linear.bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64)
    return torch.cat([weight, bias[:, None]], dim=1)


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside; afterwards (also after an error or Ctrl-C) every submodule's own
    ``training`` flag as it was, so a model with mixed modes comes back mixed."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
