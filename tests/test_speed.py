"""The speed/memory benchmark on tiny random models: what it measures is real (cache bytes match the
tensors, dynamic comes first and is the ratio's reference, decode steps happen), skips are explained,
outputs are written, bad input is refused. Timings themselves are not asserted (benchmarks, not tests)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import speed
from benchmarks.ruler.runner import parse_methods
from conftest import tiny_model


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def test_bench_measures_every_method_against_dynamic(llama, tmp_path):
    methods = parse_methods("xkv:rank_k=0.25:rank_v=0.25:window=8")
    out = speed.bench(llama, methods, batch=2, context=200, new_tokens=4, repeats=1, budget_gib=1.0, progress=False)
    rows = {r["method"]: r for r in out["results"]}
    assert [r["method"] for r in out["results"]][0] == "dynamic"  # added and measured first
    dyn, xkv = rows["dynamic"], rows["xkv:rank_k=0.25:rank_v=0.25:window=8"]
    cfg = llama.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    # generate() caches prompt + all generated tokens but the last one
    tokens = 200 + 4 - 1
    assert dyn["cache_bytes"] == cfg.num_hidden_layers * 2 * 2 * cfg.num_key_value_heads * tokens * head_dim * 4
    assert xkv["cache_bytes"] < 0.7 * dyn["cache_bytes"]
    assert xkv["cache_bytes_ratio"] == pytest.approx(xkv["cache_bytes"] / dyn["cache_bytes"])
    assert dyn["cache_bytes_ratio"] == 1.0 and dyn["decode_ms_ratio"] == 1.0
    for r in (dyn, xkv):
        assert r["prefill_s"] > 0 and r["decode_ms"] > 0 and r["tokens_per_s"] == pytest.approx(2000 / r["decode_ms"])
        assert r["max_batch_at_context"] >= 1 and r["max_context_at_batch"] > 200
    assert xkv["max_batch_at_context"] >= dyn["max_batch_at_context"] or xkv["peak_bytes"] > dyn["peak_bytes"]
    assert out["setup"]["bandwidth_bytes_per_s"] is None  # no bytes floor on CPU
    paths = speed.write_outputs(out, tmp_path, "t")
    assert json.loads(paths["json"].read_text())["results"][1]["method"] == xkv["method"]
    md = paths["md"].read_text()
    assert "| `dynamic` |" in md and "max batch" in md


def test_bench_skips_an_unsupported_method_with_its_reason():
    model = tiny_model("deepseek_v2")
    out = speed.bench(model, parse_methods("dynamic,xkv"), context=64, new_tokens=2, repeats=1, progress=False)
    rows = {r["method"]: r for r in out["results"]}
    assert "cache_bytes" in rows["dynamic"]
    assert "skipped" in rows["xkv"] and "deepseek" in rows["xkv"]["skipped"].lower()
    assert "skipped" in speed.markdown(out)


def test_bench_rejects_bad_input(llama):
    for kwargs, name in ((dict(batch=0), "batch"), (dict(context=1), "context"), (dict(new_tokens=1), "new_tokens"),
                         (dict(repeats=True), "repeats")):
        with pytest.raises(ValueError, match=name):
            speed.bench(llama, parse_methods("dynamic"), progress=False, **kwargs)
    with pytest.raises(ValueError, match="model must be one of"):
        speed.shape_config("llama-2")


def test_shapes_have_the_published_sizes():
    from transformers import AutoModelForCausalLM

    expected = {"llama-3.1-8b": 8.03e9, "deepseek-v2-lite": 15.7e9}
    for name, params in expected.items():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(speed.shape_config(name))
        assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=0.01), name
    cfg = speed.shape_config("deepseek-v3-attn", layers=2)
    assert (cfg.num_hidden_layers, cfg.kv_lora_rank, cfg.num_attention_heads) == (2, 512, 128)
