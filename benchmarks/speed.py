"""Speed and memory of KV-cache methods against the stock ``DynamicCache``, measured in the same run.

For each method (``dynamic`` always first) on one model, batch and context: prefill seconds, decode
ms/step and tokens/s, cache bytes (``nbytes()``; stock caches: their layers' keys and values), peak
memory above the weights (CUDA ``max_memory_allocated`` on GPU; peak RSS sampled every 2 ms on CPU,
which also counts allocator slack), and every figure's ratio to ``dynamic``. On GPU it also gives the
bytes floor of a decode step, ``(weights + cache bytes) / measured copy bandwidth``: the time a step
would take if it only had to read the weights and the cache once. And the largest batch (at this
context) and context (at this batch) that fit ``budget_gib``, extrapolated linearly from the measured
per-row peak (compressed caches carry a few fixed-size factors, so this is an estimate).

Timing goes through ``model.generate`` (greedy, exactly ``new_tokens`` steps, random prompt tokens): a
logits processor stamps the time of every step, so prefill = start to first step and decode = mean
time between later steps. Models: ``smollm2`` (the real model) or random-weight shapes of
``llama-3.1-8b``, ``deepseek-v2-lite`` and ``deepseek-v3-attn`` (V3's attention with small dense MLPs
and experts off), optionally cut to ``layers`` layers (per-layer costs are unchanged, totals shrink).
"""

from __future__ import annotations

import gc
import json
import os
import threading
import time
from pathlib import Path

import torch

from benchmarks.plotting import pyplot, save_figure

SHAPES = ("smollm2", "llama-3.1-8b", "deepseek-v2-lite", "deepseek-v3-attn")


def shape_config(name: str, layers: int | None = None):
    """The config of a named random-weight shape (public architecture numbers of each model)."""
    import transformers

    if name == "llama-3.1-8b":
        cfg = transformers.LlamaConfig(
            vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
            rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                 high_freq_factor=4.0, original_max_position_embeddings=8192),
            tie_word_embeddings=False)
    elif name == "deepseek-v2-lite":
        cfg = transformers.DeepseekV2Config(
            vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
            num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512,
            q_lora_rank=None, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, n_routed_experts=64,
            num_experts_per_tok=6, n_shared_experts=2, first_k_dense_replace=1, n_group=1, topk_group=1,
            max_position_embeddings=32768)
    elif name == "deepseek-v3-attn":
        n = layers or 61
        cfg = transformers.DeepseekV3Config(
            vocab_size=129280, hidden_size=7168, intermediate_size=2048, num_hidden_layers=n,
            num_attention_heads=128, num_key_value_heads=128, kv_lora_rank=512, q_lora_rank=1536,
            qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, n_routed_experts=1, num_experts_per_tok=1,
            first_k_dense_replace=n, n_group=1, topk_group=1, max_position_embeddings=163840)
    else:
        raise ValueError(f"model must be one of {', '.join(SHAPES)}, got {name!r}")
    if layers is not None:
        cfg.num_hidden_layers = layers
        if hasattr(cfg, "layer_types") and cfg.layer_types:
            cfg.layer_types = cfg.layer_types[:layers]
    return cfg


def load_model(name: str, device: str, dtype: torch.dtype, layers: int | None = None):
    """``smollm2`` from its GGUF file, or a named shape with random weights built on ``device``."""
    if name == "smollm2":
        from kvcompress.models import load_smollm2

        model, _ = load_smollm2(dtype=dtype, device=device)
        if layers is not None:
            raise ValueError("layers applies to the random-weight shapes only, not to smollm2")
        return model
    from transformers import AutoModelForCausalLM

    cfg = shape_config(name, layers)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


class _StepClock:
    """A logits processor that only records when each generation step's logits arrive."""

    def __init__(self, sync):
        self.sync, self.times = sync, []

    def __call__(self, input_ids, scores):
        self.sync()
        self.times.append(time.perf_counter())
        return scores


class _PeakRSS:
    """Peak resident set size of this process while active, sampled every 2 ms (Linux /proc)."""

    def __init__(self):
        self.peak = self.start = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __enter__(self):
        self.start = self.peak = _rss()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def copy_bandwidth(device: str, gib: float = 1.0) -> float | None:
    """Measured device-memory bandwidth in bytes/s (a copy reads and writes each byte); None on CPU."""
    if not str(device).startswith("cuda"):
        return None
    n = int(gib * 2**30) // 4
    src = torch.empty(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * 4 / best


def _generate(model, method, input_ids, new_tokens: int, sync):
    """One timed greedy generation; returns (prefill_s, decode_s_per_step, cache)."""
    from transformers import LogitsProcessorList

    from benchmarks.ruler.runner import install_method, make_cache

    try:
        from kvcompress.patch import GENERATE_CACHE_KWARG
    except ImportError:
        GENERATE_CACHE_KWARG = "past_key_values"
    handle = install_method(method, model)
    try:
        cache = None if handle is not None else make_cache(method, model)
        kwargs = {GENERATE_CACHE_KWARG: cache} if cache is not None else {}
        clock = _StepClock(sync)
        sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                           logits_processor=LogitsProcessorList([clock]), pad_token_id=0, **kwargs)
        sync()
        used = handle.last_cache if handle is not None else cache
    finally:
        if handle is not None:
            handle.remove()
    steps = clock.times
    prefill = steps[0] - t0
    decode = (steps[-1] - steps[0]) / (len(steps) - 1) if len(steps) > 1 else float("nan")
    return prefill, decode, used


def bench(model, methods, *, batch: int = 1, context: int = 4096, new_tokens: int = 32, repeats: int = 2,
          budget_gib: float | None = None, progress: bool = True, on_result=None) -> dict:
    """Measure every method (``dynamic`` first, added if missing) on ``model``; see the module docstring.

    Returns ``{"setup": {...}, "results": [per-method dicts]}``; ``on_result(partial)`` is called after
    each method so an interrupted run keeps what it measured.
    """
    from tqdm.auto import tqdm

    from benchmarks.ruler.results import cache_nbytes
    from benchmarks.ruler.runner import MethodSpec

    for name, value, low in (("batch", batch, 1), ("context", context, 2), ("new_tokens", new_tokens, 2),
                             ("repeats", repeats, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if not any(m.name == "dynamic" and not m.params for m in methods):
        methods = [MethodSpec("dynamic", "dynamic", {})] + list(methods)
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = copy_bandwidth(str(device))
    vocab = model.config.get_text_config().vocab_size if hasattr(model.config, "get_text_config") else model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, vocab, (batch, context), generator=g).to(device)
    warm_ids = input_ids[:1, : min(context, 128)]
    setup = dict(device=torch.cuda.get_device_name(device) if cuda else "cpu", dtype=str(next(model.parameters()).dtype),
                 batch=batch, context=context, new_tokens=new_tokens, repeats=repeats, weights_bytes=weights,
                 bandwidth_bytes_per_s=bandwidth, torch=torch.__version__, threads=torch.get_num_threads())
    results: list[dict] = []
    for m in tqdm(methods, desc="bench", disable=not progress):
        row = dict(method=m.label)
        try:
            _generate(model, m, warm_ids, 2, sync)  # warm-up: kernels, allocator, lazy imports
        except (ValueError, TypeError) as e:  # e.g. xkv on an MLA model: say so and go on
            row["skipped"] = str(e)
            results.append(row)
            continue
        best = None
        for _ in range(repeats):
            # caches with reference cycles (a layer points back to its cache) outlive ``del`` until the
            # cycle collector runs: collect first, or the baseline would include the previous run's cache
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                prefill, decode, cache = _generate(model, m, input_ids, new_tokens, sync)
                peak = torch.cuda.max_memory_allocated(device) - base
            else:
                with _PeakRSS() as rss:
                    prefill, decode, cache = _generate(model, m, input_ids, new_tokens, sync)
                peak = rss.peak - rss.start
            run = dict(prefill_s=prefill, decode_ms=1000 * decode, peak_bytes=peak, cache_bytes=cache_nbytes(cache))
            del cache
            best = run if best is None else {k: min(best[k], run[k]) for k in run}
        row.update(best)
        row["tokens_per_s"] = batch / (row["decode_ms"] / 1000)
        if bandwidth:
            row["floor_ms"] = 1000 * (weights + row["cache_bytes"]) / bandwidth
            row["decode_over_floor"] = row["decode_ms"] / row["floor_ms"]
        if budget_gib:
            free = budget_gib * 2**30 - weights
            per_row = max(row["peak_bytes"], row["cache_bytes"]) / batch
            row["max_batch_at_context"] = max(0, int(free // per_row))
            row["max_context_at_batch"] = max(0, int(free // (per_row / (context + new_tokens) * batch)))
        results.append(row)
        _add_ratios(results)
        if on_result:
            on_result(dict(setup=setup, results=results))
    return dict(setup=setup, results=results)


def _add_ratios(results: list[dict]) -> None:
    """Every measured figure divided by dynamic's (which is always measured first)."""
    ref = results[0]
    for r in results:
        if "skipped" in r:
            continue
        for key in ("prefill_s", "decode_ms", "cache_bytes", "peak_bytes", "tokens_per_s"):
            r[key + "_ratio"] = r[key] / ref[key] if ref.get(key) else None


def _f(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(out: dict) -> str:
    """The results as a markdown table (ratios are method / dynamic)."""
    s = out["setup"]
    bw = f", copy bandwidth {s['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s" if s.get("bandwidth_bytes_per_s") else ""
    lines = [f"{s['device']}, {s['dtype']}, batch {s['batch']}, context {s['context']}, {s['new_tokens']} decode "
             f"steps, weights {s['weights_bytes'] / 2**20:.0f} MiB{bw}; best of {s['repeats']}", ""]
    cols = ["method", "prefill s", "(x)", "decode ms/step", "(x)", "tokens/s", "cache MiB", "(x)", "peak MiB", "(x)"]
    floor = any("floor_ms" in r for r in out["results"])
    budget = any("max_batch_at_context" in r for r in out["results"])
    cols += ["floor ms", "decode/floor"] if floor else []
    cols += ["max batch", "max context"] if budget else []
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in out["results"]:
        if "skipped" in r:
            lines.append(f"| `{r['method']}` | skipped: {r['skipped'][:120]} |" + " |" * (len(cols) - 2))
            continue
        cells = [f"`{r['method']}`", _f(r["prefill_s"], ".3f"), _f(r["prefill_s_ratio"], ".2f"),
                 _f(r["decode_ms"], ".2f"), _f(r["decode_ms_ratio"], ".2f"), _f(r["tokens_per_s"], ".0f"),
                 _f(r["cache_bytes"] / 2**20, ".1f"), _f(r["cache_bytes_ratio"], ".3f"),
                 _f(r["peak_bytes"] / 2**20, ".0f"), _f(r["peak_bytes_ratio"], ".2f")]
        if floor:
            cells += [f"{r['floor_ms']:.2f}", f"{r['decode_over_floor']:.1f}"]
        if budget:
            cells += [str(r["max_batch_at_context"]), str(r["max_context_at_batch"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(out: dict, path: str | Path) -> Path | None:
    """Bars of each method's ratios to dynamic (cache bytes, peak memory, decode time, prefill time)."""
    plt = pyplot()
    if plt is None:
        return None
    rows = [r for r in out["results"] if "skipped" not in r]
    keys = [("cache_bytes_ratio", "cache bytes"), ("peak_bytes_ratio", "peak memory"),
            ("decode_ms_ratio", "decode ms/step"), ("prefill_s_ratio", "prefill s")]
    keys = [(k, label) for k, label in keys if any(r.get(k) is not None for r in rows)]  # drop unmeasured
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)), 4))
    width = 0.8 / len(keys)
    for j, (key, label) in enumerate(keys):
        ax.bar([i + j * width for i in range(len(rows))], [r.get(key) or 0 for r in rows], width, label=label)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
    ax.set_xticklabels([r["method"].replace(":", "\n") for r in rows], fontsize=7)
    ax.set_ylabel("ratio to dynamic")
    s = out["setup"]
    ax.set_title(f"{s['device']}: batch {s['batch']}, context {s['context']}", fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def write_outputs(out: dict, out_dir: str | Path, stem: str = "bench") -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md"}
    paths["json"].write_text(json.dumps(out, indent=1))
    paths["md"].write_text(markdown(out))
    png = plot(out, out_dir / f"{stem}.png")
    if png:
        paths["png"] = png
    return paths
