"""The speed/memory benchmark on tiny random models: what it measures is real (cache bytes match the
tensors, dynamic comes first and is the ratio's reference, decode steps happen), skips are explained,
outputs are written, bad input is refused. Timings themselves are not asserted (benchmarks, not tests)."""

from __future__ import annotations

import json

import pytest
import torch

from kvcompress.bench import speed
from kvcompress.bench.spec import parse_method_specs as parse_methods
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
    # allocated next to held: stock allocates what it holds, xKV's exact tail has room for decoded tokens
    assert dyn["reserved_bytes"] == dyn["cache_bytes"] and dyn["reserved_bytes_ratio"] == 1.0
    assert xkv["cache_bytes"] < xkv["reserved_bytes"] < 0.7 * dyn["reserved_bytes"]
    assert xkv["reserved_bytes_ratio"] == pytest.approx(xkv["reserved_bytes"] / dyn["reserved_bytes"])
    assert dyn["cache_bytes_ratio"] == 1.0 and dyn["decode_ms_ratio"] == 1.0
    for r in (dyn, xkv):
        assert r["prefill_s"] > 0 and r["decode_ms"] > 0 and r["tokens_per_s"] == pytest.approx(2000 / r["decode_ms"])
        assert r["max_batch_at_context"] >= 1 and r["max_context_at_batch"] > 200
    assert xkv["max_batch_at_context"] >= dyn["max_batch_at_context"] or xkv["peak_bytes"] > dyn["peak_bytes"]
    assert out["setup"]["bandwidth_bytes_per_s"] is None  # no bytes floor on CPU
    paths = speed.write_outputs(out, tmp_path, "t")
    assert json.loads(paths["json"].read_text())["results"][1]["method"] == xkv["method"]
    md = paths["md"].read_text()
    assert "| `dynamic` |" in md and "max batch" in md and "allocated MiB" in md
    header = next(line for line in md.splitlines() if line.startswith("| method"))
    row = next(line for line in md.splitlines() if line.startswith(f"| `{xkv['method']}`"))
    cells = dict(zip([c.strip() for c in header.split("|")[1:-1]], [c.strip() for c in row.split("|")[1:-1]]))
    assert cells["allocated MiB"] == f"{xkv['reserved_bytes'] / 2**20:.1f}"


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


def test_static_baseline_is_measured_and_generates_dynamics_tokens(llama):
    out = speed.bench(llama, parse_methods("dynamic"), batch=2, context=40, new_tokens=4, repeats=1, budget_gib=1.0,
                      baselines="static", progress=False)
    assert [r["method"] for r in out["results"]] == ["dynamic", "static"]
    dyn, static = out["results"]
    assert static["kind"] == "stock" and "skipped" not in static
    assert static["same_tokens"] == 1.0 and dyn["same_tokens"] == 1.0  # greedy, fp32: the same tokens
    cfg = llama.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    # preallocated for context + new tokens (one more slot than dynamic, which never caches the last token)
    assert static["cache_bytes"] == cfg.num_hidden_layers * 2 * 2 * cfg.num_key_value_heads * (40 + 4) * head_dim * 4
    assert static["prefill_s"] > 0 and static["decode_ms"] > 0 and static["peak_bytes"] >= 0
    assert static["tokens_per_s"] == pytest.approx(2000 / static["decode_ms"])
    assert static["cache_bytes_ratio"] == pytest.approx(static["cache_bytes"] / dyn["cache_bytes"])
    assert static["reserved_bytes"] == static["cache_bytes"]  # a stock cache allocates what it holds
    assert static["max_batch_at_context"] >= 1
    assert "tokens_per_s_vs_compiled" not in static  # no static-compiled row, no second ratio
    md = speed.markdown(out)
    assert "| `static` |" in md and "StaticCache" in md and "(x compiled)" not in md


def test_static_compiled_is_skipped_on_cpu_with_its_reason(llama):
    out = speed.bench(llama, parse_methods("dynamic"), context=16, new_tokens=2, repeats=1,
                      baselines=["static-compiled"], progress=False)
    row = out["results"][-1]
    assert row["method"] == "static-compiled" and "needs CUDA" in row["skipped"]
    assert "tokens_per_s_vs_compiled" not in out["results"][0]
    assert "skipped: needs CUDA" in speed.markdown(out)


def test_static_compiled_plumbing_on_cpu_compiles_once_outside_the_timed_runs(llama):
    # the eager backend traces with dynamo like inductor would, in about a second: what it checks is
    # that generate() really compiled (one frame at warm-up) and that the timed runs did not recompile
    out = speed.bench(llama, parse_methods("dynamic"), batch=2, context=24, new_tokens=3, repeats=2,
                      baselines="dynamic,static-compiled", compile_backend="eager", progress=False)
    dyn, comp = out["results"]
    assert comp["method"] == "static-compiled" and "skipped" not in comp, comp
    assert comp["compile_backend"] == "eager" and comp["compile_mode"] is None
    assert comp["compiled"] and comp["compiles_warmup"] >= 1
    assert comp["recompiles_timed"] == 0 and comp["cudagraph_skips"] == 0 and dyn["recompiles_timed"] == 0
    assert comp["same_tokens"] == 1.0
    assert comp["tokens_per_s_vs_compiled"] == 1.0
    assert dyn["tokens_per_s_vs_compiled"] == pytest.approx(dyn["tokens_per_s"] / comp["tokens_per_s"])
    md = speed.markdown(out)
    assert "(x compiled)" in md and "0 recompile(s)" in md and "WARNING" not in md


def test_bad_baselines_are_refused_naming_the_option_and_the_allowed_values(llama, capsys):
    with pytest.raises(ValueError, match=r"--baselines.*'compiled'.*allowed: dynamic, static, static-compiled"):
        speed.bench(llama, parse_methods("dynamic"), baselines="static,compiled", progress=False)
    assert speed.parse_baselines("static-compiled, STATIC,dynamic") == ["static", "static-compiled"]
    assert speed.parse_baselines(None) == [] and speed.parse_baselines("dynamic") == []

    from kvcompress import bench_cli
    from kvcompress.cli import main

    assert bench_cli.BASELINE_NAMES == speed.BASELINES  # the CLI's import-free copy
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--baselines", "static,bogus"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--baselines" in err and "'bogus'" in err and "static-compiled" in err


def test_mla_table_says_dynamic_is_the_stock_expand_path():
    model = tiny_model("deepseek_v2")
    out = speed.bench(model, parse_methods("dynamic"), context=32, new_tokens=2, repeats=1, progress=False)
    assert out["setup"]["mla"] is True
    assert "expands the latent" in speed.markdown(out)


def test_notes_warn_about_compiles_inside_the_timed_runs():
    row = dict(method="static-compiled", compile_backend="inductor", compile_mode="reduce-overhead", warmup_s=60.0,
               compiles_warmup=0, compiled=False, recompiles_timed=2, cudagraph_skips=1)
    text = "\n".join(speed.notes(dict(setup=dict(mla=False), results=[dict(method="dynamic"), row])))
    assert "did not compile" in text and "skipped CUDA graphs" in text
    assert "recompiled inside the timed runs of: `static-compiled` (2)" in text


def test_an_out_of_memory_entry_is_a_row_and_the_run_goes_on(llama, monkeypatch):
    real = speed._generate

    def generate(model, input_ids, new_tokens, sync, *, method=None, **kwargs):
        if method is not None and method.name == "xkv":
            raise speed._OOM("CUDA out of memory. Tried to allocate 7.00 GiB")
        return real(model, input_ids, new_tokens, sync, method=method, **kwargs)

    monkeypatch.setattr(speed, "_generate", generate)
    out = speed.bench(llama, parse_methods("dynamic,xkv"), context=16, new_tokens=2, repeats=1, baselines="static",
                      progress=False)
    rows = {r["method"]: r for r in out["results"]}
    assert rows["xkv"]["skipped"].startswith("out of memory: CUDA out of memory")
    assert "decode_ms" in rows["static"] and rows["static"]["same_tokens"] == 1.0


def test_prefill_chunk_applies_to_every_row_and_keeps_tokens():

    model = tiny_model("llama")
    out = speed.bench(model, parse_methods("dynamic,xkv:group_size=2:window=8:sink=2:min_compress_tokens=8"),
                      batch=1, context=96, new_tokens=3, repeats=1, prefill_chunk=32, progress=False)
    assert out["setup"]["prefill_chunk"] == 32
    xkv_row = [r for r in out["results"] if r["method"].startswith("xkv")][0]
    assert xkv_row["cache_bytes"] < out["results"][0]["cache_bytes"]
    assert any("Chunked prefill" in line for line in speed.notes(out))
    with pytest.raises(ValueError, match="prefill_chunk"):
        speed.bench(model, parse_methods("dynamic"), batch=1, context=16, new_tokens=2, prefill_chunk=0, progress=False)


def test_compiled_method_row_compiles_once_and_generates_the_eager_rows_tokens():
    # mla declares max_cache_len: unset in the spec, the compiled row gives it context + new tokens, which
    # makes its cache compileable; the eager backend checks the plumbing on CPU (patch installed for the
    # whole row, one compile at warm-up, none in the timed runs, the same greedy tokens as eager mla)
    model = tiny_model("deepseek_v3")
    out = speed.bench(model, parse_methods("dynamic,mla,mla:max_cache_len=None"), batch=2, context=24, new_tokens=3,
                      repeats=2, baselines="static-compiled", compile_backend="eager", compile_methods=True,
                      progress=False)
    rows = {r["method"]: r for r in out["results"]}
    assert list(rows) == ["dynamic", "mla", "mla:max_cache_len=None", "static-compiled", "mla-compiled",
                          "mla:max_cache_len=None-compiled"]
    assert "dynamic-compiled" not in rows and out["setup"]["compile_methods"] is True
    comp = rows["mla-compiled"]
    assert "skipped" not in comp, comp
    assert comp["kind"] == "method" and comp["max_cache_len"] == 24 + 3
    assert comp["compile_backend"] == "eager" and comp["compiled"] and comp["compiles_warmup"] >= 1
    assert comp["recompiles_timed"] == 0 and comp["cudagraph_skips"] == 0
    assert comp["prefill_s"] > 0 and comp["decode_ms"] > 0 and comp["cache_bytes"] > 0
    assert comp["same_tokens_as_eager"] == 1.0  # greedy, fp32: compiled mla generates eager mla's tokens
    assert comp["tokens_per_s_vs_compiled"] == pytest.approx(comp["tokens_per_s"] / rows["static-compiled"]["tokens_per_s"])
    assert comp["decode_ms_ratio"] == pytest.approx(comp["decode_ms"] / rows["dynamic"]["decode_ms"])
    assert "same_tokens_as_eager" not in rows["mla"] and "compiles_warmup" not in rows["mla"]  # eager row unchanged
    # an explicit max_cache_len is kept: None (growing storage) is not compileable
    assert rows["mla:max_cache_len=None-compiled"]["skipped"] == (
        "mla:max_cache_len=None cache (MLALatentCache) is not compileable (max_cache_len=None)")
    from kvcompress.patch import active_patch

    assert active_patch(model) is None  # the row removed its patch
    md = speed.markdown(out)
    assert "| `mla-compiled` |" in md and "same tokens as eager `mla`: 1.00" in md and "WARNING" not in md
    assert json.loads(json.dumps(out))["results"][4]["method"] == "mla-compiled"


def test_compiled_row_of_a_method_without_max_cache_len_is_skipped_with_the_reason(llama, monkeypatch):
    from transformers import DynamicCache

    from kvcompress import registry

    # a method whose registry params lack max_cache_len, whatever the built-in ones declare by now
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    registry.register_method("uncapped", summary="test: a growing cache", build=lambda m: DynamicCache(config=m.config))
    out = speed.bench(llama, parse_methods("dynamic,uncapped,xkv:window=8"), context=16, new_tokens=2, repeats=1,
                      compile_methods=True, progress=False)
    rows = {r["method"]: r for r in out["results"]}
    assert "decode_ms" in rows["uncapped"] and "decode_ms" in rows["xkv:window=8"]  # eager rows measured
    assert rows["uncapped-compiled"] == dict(
        method="uncapped-compiled", kind="method",
        skipped="uncapped cache (DynamicCache) is not compileable (no max_cache_len parameter)")
    xkv = rows["xkv:window=8-compiled"]
    if "max_cache_len" in registry.get_method("xkv").param_map:
        # compileable with a capacity: on CPU without compile_backend it is skipped like static-compiled
        assert "needs CUDA" in xkv["skipped"] or "not compileable (max_cache_len=" in xkv["skipped"], xkv
    else:
        assert xkv["skipped"] == "xkv:window=8 cache (XKVCache) is not compileable (no max_cache_len parameter)"
    assert "skipped: uncapped cache (DynamicCache) is not compileable" in speed.markdown(out)


def test_compile_methods_cli_flag(monkeypatch, tmp_path):
    import argparse

    from kvcompress import bench_cli
    from kvcompress.cli import main

    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    assert parser.parse_args([]).compile_methods is False
    assert parser.parse_args(["--compile-methods"]).compile_methods is True
    seen = {}

    def bench(model, methods, **kwargs):
        seen.update(kwargs, methods=[m.label for m in methods])
        return {}

    def write_outputs(out, out_dir, stem="bench"):
        path = tmp_path / "bench.md"
        path.write_text("table\n")
        return {"md": path}

    monkeypatch.setattr(speed, "load_model", lambda *args: None)
    monkeypatch.setattr(speed, "bench", bench)
    monkeypatch.setattr(speed, "write_outputs", write_outputs)
    assert main(["bench", "--methods", "dynamic,mla", "--compile-methods", "--compile-backend", "eager",
                 "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert seen["compile_methods"] is True and seen["compile_backend"] == "eager"
    assert seen["methods"] == ["dynamic", "mla"]
    main(["bench", "--device", "cpu", "--out", str(tmp_path)])
    assert seen["compile_methods"] is False


def test_a_registry_method_declaring_max_cache_len_gets_the_capacity_and_an_oom_is_a_row(llama, monkeypatch):
    from transformers import DynamicCache, StaticCache

    from kvcompress import registry

    def build(model, max_cache_len=None):
        if max_cache_len is None:
            return DynamicCache(config=model.config)
        return StaticCache(config=model.config, max_cache_len=max_cache_len)

    # declared by the registry, not by name: any method with a max_cache_len parameter gets one
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    registry.register_method("capped", summary="test: static when given a capacity", build=build,
                             params=(registry.Param("max_cache_len", None, "capacity", (registry.Range(int, low=1),),
                                                    none_ok=True),))
    out = speed.bench(llama, parse_methods("capped"), batch=2, context=20, new_tokens=3, repeats=1,
                      compile_backend="eager", compile_methods=True, progress=False)
    assert [r["method"] for r in out["results"]] == ["dynamic", "capped", "capped-compiled"]
    comp = out["results"][-1]
    assert comp["max_cache_len"] == 23 and comp["compiled"] and comp["recompiles_timed"] == 0, comp
    assert comp["same_tokens_as_eager"] == 1.0 and comp["same_tokens"] == 1.0
    assert "tokens_per_s_vs_compiled" not in comp  # no static-compiled row, no second ratio

    real = speed._generate

    def generate(model, input_ids, new_tokens, sync, **kwargs):
        if "compile_config" in (kwargs.get("gen_kwargs") or {}):
            raise speed._OOM("CUDA out of memory. Tried to allocate 7.00 GiB")
        return real(model, input_ids, new_tokens, sync, **kwargs)

    monkeypatch.setattr(speed, "_generate", generate)
    out = speed.bench(llama, parse_methods("dynamic,capped"), context=16, new_tokens=2, repeats=1, baselines="static",
                      compile_backend="eager", compile_methods=True, progress=False)
    rows = {r["method"]: r for r in out["results"]}
    assert rows["capped-compiled"]["skipped"].startswith("out of memory: CUDA out of memory")
    assert "decode_ms" in rows["capped"] and "decode_ms" in rows["static"]


def test_ratios_are_to_dynamic_wherever_it_is_listed():
    rows = [dict(method="xkv", decode_ms=30.0), dict(method="dynamic", decode_ms=20.0)]
    for row in rows:
        for key in speed._RATIO_KEYS:
            row.setdefault(key, 1.0)
    speed._add_ratios(rows)
    assert rows[0]["decode_ms_ratio"] == 1.5 and rows[1]["decode_ms_ratio"] == 1.0


def test_cpu_peak_is_at_least_the_cache_for_every_row(llama):
    """The peak of a row is what its run held at its highest: never below the cache it ends with, also
    for rows after one that freed memory (which the process keeps and reuses without growing)."""
    out = speed.bench(llama, parse_methods("dynamic,xkv:rank_k=0.25:rank_v=0.375"), batch=2, context=256,
                      new_tokens=4, repeats=2, baselines="static", progress=False)
    rows = [r for r in out["results"] if "skipped" not in r]
    assert [r["method"] for r in rows] == ["dynamic", "xkv:rank_k=0.25:rank_v=0.375", "static"]
    for r in rows:
        assert r["peak_bytes"] >= r["cache_bytes"] > 0, r
    assert out["setup"]["cpu_peak"] == "rss-high-water-mark"  # Linux + glibc: the exact peak


def test_logit_agreement_compares_steps_while_the_tokens_before_them_agree():
    ref = [torch.tensor([[0.0, 1.0, float("-inf")], [2.0, 0.0, float("-inf")]]) for _ in range(3)]
    ours = [t.clone() for t in ref]
    ours[0][0, 0] += 0.5  # step 0, row 0
    ours[2][1, 1] -= 4.0  # step 2, row 1: compared only if row 1's tokens 0 and 1 agree
    tokens = torch.tensor([[1, 1, 1], [0, 0, 0]])
    same = speed.logit_agreement(ref, tokens, ours, tokens)
    assert same["logit_max_err"] == 4.0 and same["logit_steps"] == 3
    assert same["logit_mean_err"] == pytest.approx(4.5 / 12)  # 2 finite logits x 2 rows x 3 steps
    # row 1 picked another token at step 0: its later steps continue another text and are not compared
    other = torch.tensor([[1, 1, 1], [1, 0, 0]])
    parted = speed.logit_agreement(ref, tokens, ours, other)
    assert parted["logit_max_err"] == 0.5 and parted["logit_mean_err"] == pytest.approx(0.5 / 8)
    assert speed.logit_agreement(ref, tokens, ours, torch.zeros(3, 3, dtype=torch.long)) is None


def test_bench_reports_the_logit_error_against_dynamic_and_the_prompt_kind(llama):
    out = speed.bench(llama, parse_methods("dynamic,xkv:rank_k=0.125:rank_v=0.125:window=0:sink=0"), context=96,
                      new_tokens=4, repeats=1, baselines="static", progress=False, random_weights=True)
    rows = {r["method"]: r for r in out["results"]}
    assert rows["dynamic"]["logit_max_err"] == 0.0 and rows["dynamic"]["logit_steps"] == 4
    assert rows["static"]["logit_max_err"] < 1e-4  # the same attention over the same keys and values
    xkv = rows["xkv:rank_k=0.125:rank_v=0.125:window=0:sink=0"]
    assert xkv["logit_max_err"] > 1e-3 and xkv["logit_mean_err"] <= xkv["logit_max_err"]
    md = speed.markdown(out)
    assert "logit err max/mean" in md and "context 96 (random token ids)" in md and "(random)" in md
    assert "random token ids into a model with random weights" in md


def test_a_missing_matplotlib_is_noted_once(llama, monkeypatch, tmp_path, capsys):
    import builtins

    from kvcompress.bench import plotting

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.split(".")[0] == "matplotlib":
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    monkeypatch.setattr(plotting, "_missing_noted", False)
    out = speed.bench(llama, parse_methods("dynamic"), context=16, new_tokens=2, repeats=1, progress=False)
    for _ in range(3):  # the CLI writes the outputs after every row and at the end
        paths = speed.write_outputs(out, tmp_path, "t")
    assert "png" not in paths and paths["md"].exists()
    assert capsys.readouterr().out.count("matplotlib is not installed") == 1
