"""Saving a converted model as a standard DeepSeek-V3 checkpoint (``config.json`` + safetensors).

Everything the converted model needs lives in the stock ``DeepseekV3ForCausalLM`` state dict and in
standard ``DeepseekV3Config`` fields: the per-slot RoPE frequencies are a ``longrope`` table (equal short
and long factors) in ``rope_parameters``, the norm anchors are the biases that ``attention_bias=True``
creates, and every layer is dense through ``first_k_dense_replace = num_hidden_layers``. So plain
``transformers.AutoModelForCausalLM.from_pretrained(path)`` rebuilds it with the same logits, without
``trust_remote_code``. Only ``model.transmla_info`` (statistics of the conversion) is not part of the
model; :func:`save_converted` writes it next to the checkpoint as ``transmla_info.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

INFO_FILE = "transmla_info.json"
_ARCHITECTURE = "DeepseekV3ForCausalLM"


def _check_converted(model) -> None:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type != "deepseek_v3" or type(model).__name__ != _ARCHITECTURE:
        raise TypeError(f"model must be a {_ARCHITECTURE} made by convert_gqa_to_mla, got "
                        f"{type(model).__name__} (model_type {model_type!r})")
    if not isinstance(getattr(model, "transmla_info", None), dict):
        raise TypeError(f"model is a {_ARCHITECTURE} without transmla_info, so it was not made by "
                        "convert_gqa_to_mla (or was loaded from disk); save it with model.save_pretrained(path)")


def _saved_tensor_names(path: Path) -> set[str]:
    from safetensors import safe_open

    names = set()
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            names |= set(handle.keys())
    return names


def _verify(model, path: Path) -> None:
    """The written checkpoint reads back as the same DeepSeek-V3 config and holds every tensor."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    problems = []
    if config.model_type != "deepseek_v3":
        problems.append(f"model_type {config.model_type!r}, expected 'deepseek_v3'")
    if list(getattr(config, "architectures", None) or []) != [_ARCHITECTURE]:
        problems.append(f"architectures {config.architectures!r}, expected [{_ARCHITECTURE!r}]")
    for field in ("kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
                  "num_hidden_layers", "first_k_dense_replace", "attention_bias", "rope_interleave",
                  "rope_parameters"):
        if getattr(config, field, None) != getattr(model.config, field, None):
            problems.append(f"{field} reads back as {getattr(config, field, None)!r}, "
                            f"the model has {getattr(model.config, field, None)!r}")
    expected = set(model.state_dict())
    if getattr(model.config, "tie_word_embeddings", False):
        expected.discard("lm_head.weight")  # tied to the embedding: stored once
    missing = expected - _saved_tensor_names(path)
    if missing:
        problems.append(f"tensors missing from the safetensors files: {sorted(missing)[:5]}")
    if problems:
        raise RuntimeError(f"the checkpoint written to {path} does not round-trip: " + "; ".join(problems))


def save_converted(model, path: str | os.PathLike, tokenizer=None) -> Path:
    """Write a model made by :func:`convert_gqa_to_mla` as a standard DeepSeek-V3 checkpoint.

    The directory gets ``config.json`` (``model_type: deepseek_v3``, ``architectures:
    [DeepseekV3ForCausalLM]``), the weights as safetensors, ``generation_config.json``, the tokenizer
    files when ``tokenizer`` is given, and ``transmla_info.json`` (the conversion's statistics, which are
    not part of the model). ``transformers.AutoModelForCausalLM.from_pretrained(path)`` then loads a model
    with the same logits (no ``trust_remote_code``); ``model.save_pretrained(path)`` writes the same
    checkpoint without the checks and the info file.

    The checkpoint uses two standard DeepSeek-V3 config features that the real DeepSeek-V3 weights do
    not: attention biases (``attention_bias=True``; the norm anchors live in ``kv_a_proj_with_mqa.bias``)
    and a ``longrope`` RoPE table. Serving engines whose DeepSeek-V3 attention has no biases or only
    knows DeepSeek's YaRN RoPE would compute something else; check the engine before serving it.

    Args:
        model: a ``DeepseekV3ForCausalLM`` returned by :func:`convert_gqa_to_mla` (any device and dtype).
        path: directory to write (created if missing; files of the same names are overwritten).
        tokenizer: optional tokenizer with ``save_pretrained``, saved into the same directory.

    Returns:
        The directory as a :class:`pathlib.Path`.

    Raises:
        TypeError: ``model`` is not a converted DeepSeek-V3 model, ``path`` is not a str or path, or
            ``tokenizer`` has no ``save_pretrained``. Checked before anything is written.
        ValueError: ``path`` is an existing file.
        RuntimeError: the written config or weights do not read back as the model's.
    """
    _check_converted(model)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike directory, got {type(path).__name__}")
    if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):
        raise TypeError(f"tokenizer must be None or have save_pretrained, got {type(tokenizer).__name__}")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"path must be a directory, {str(path)!r} is an existing file")

    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    with open(path / INFO_FILE, "w", encoding="utf-8") as handle:
        json.dump(model.transmla_info, handle, indent=1, default=float)
    _verify(model, path)
    return path
