"""TransMLA: convert a GQA model (Llama, Qwen2, Mistral) into transformers' DeepSeek-V3 architecture with
multi-head latent attention (Meng et al., "TransMLA: Multi-Head Latent Attention Is All You Need", 2025).

The converted model is a stock ``DeepseekV3ForCausalLM`` (dense MLP in every layer), so the MLA caches of
this package and transformers' own ``DynamicCache`` (which stores DeepSeek's latent) apply to it unchanged.

One module per stage of the conversion, each with its part of the maths:

- :mod:`.source`: reading the source model (geometry, RoPE, supported settings, :func:`is_lossless`);
- :mod:`.calibration`: offline calibration tokens and the per-layer second moment of the attention input;
- :mod:`.rorope`: RoRoPE/FreqFold, a per-frequency change of key basis that commutes with RoPE, and which
  components keep RoPE (items 1-2 of the construction);
- :mod:`.convert`: the balanced K/V PCA latent, the norm anchors, the DeepSeek-V3 config and
  :func:`convert_gqa_to_mla` (items 3-6);
- :mod:`.distill`: recovery training against the source model;
- :mod:`.checkpoint`: :func:`save_converted`, the converted model as a standard DeepSeek-V3 checkpoint.

:mod:`.checks` holds the argument checks they share (every argument is checked before any work).

Lossless setting: ``rope_dim = D``, ``kv_lora_rank = D + 1``, ``freq_fold = 1`` (the defaults; ``D = G d``
for ``G`` KV heads of dim ``d``): every key keeps RoPE at its own frequency (per-slot frequencies go into a
``longrope`` table whose short and long factors are equal, i.e. static), the latent is the values, and the
model's logits equal the source's within float tolerance with ``D + rope_dim + 1 = 2 G d + 1`` cached
elements per token and layer (the source caches ``2 G d``). Anything smaller is lossy; see docs/transmla.md.
"""

from .calibration import SPLITS, calibration_text, calibration_tokens
from .checkpoint import save_converted
from .convert import ANCHOR_RATIO, convert_gqa_to_mla, kv_elements_per_token
from .distill import CHECKPOINT_FILE, TRAIN_CHOICES, distill_from_teacher
from .source import SUPPORTED_MODEL_TYPES, is_lossless

__all__ = [
    "ANCHOR_RATIO",
    "SPLITS",
    "SUPPORTED_MODEL_TYPES",
    "CHECKPOINT_FILE",
    "TRAIN_CHOICES",
    "calibration_text",
    "calibration_tokens",
    "convert_gqa_to_mla",
    "distill_from_teacher",
    "is_lossless",
    "kv_elements_per_token",
    "save_converted",
]
