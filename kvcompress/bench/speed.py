"""Speed and memory of KV-cache methods against stock transformers caches, measured in the same run.

For each entry (``dynamic`` always first) on one model, batch and context: prefill seconds, decode
ms/step and tokens/s, cache bytes held (``nbytes()``, ``cache_bytes``; stock caches: their layers' keys and
values) and allocated (``reserved_nbytes()``, ``reserved_bytes``: the growable storage's spare capacity
included; stock caches allocate what they hold), peak
memory above what the process held when the run started (CUDA ``max_memory_allocated`` on GPU; on CPU
the kernel's resident-set high-water mark over the resident set at the start, after freed memory is
handed back to the system so that memory an earlier row freed is not silently reused: an exact peak,
``setup["cpu_peak"] == "rss-high-water-mark"``, which also counts allocator slack; without Linux 4.0+
and glibc the resident set sampled every 2 ms, ``"rss-sampled"``), the share of greedy tokens equal to ``dynamic``'s, and every
figure's ratio to ``dynamic`` (stock ``DynamicCache``, eager). On GPU it also gives the bytes floor of a
decode step, ``(weights + cache bytes) / measured copy bandwidth``: the time a step would take if it
only had to read the weights and the cache once. And the largest batch (at this context) and context
(at this batch) that fit ``budget_gib``, extrapolated linearly from each entry's measured per-row peak
(compressed caches carry a few fixed-size factors, so this is an estimate).

Entries are registry methods (``--methods``) and stock baselines (``--baselines``: compare
against stock with the same launch-overhead treatment): ``static`` (``StaticCache``, eager) and
``static-compiled`` (``StaticCache`` + generate()'s automatic ``torch.compile`` of the decode step with
mode ``reduce-overhead``, i.e. CUDA graphs, as transformers 5.17 and 5.24 both do when a compilable
cache is passed on GPU). When ``static-compiled`` is measured every entry also gets ratios to it
(``<key>_vs_compiled``). Compilation is kept out of the timed runs (a warm-up identical to the timed
call on the same cache) and checked: compiles at warm-up, recompiles in the timed runs and cudagraph
skips are reported. Methods run eager; with ``compile_methods`` (``--compile-methods``) every method but
``dynamic`` also gets a row ``<label>-compiled``, measured like ``static-compiled`` (same compile config,
warm-up and counts) with the method's attention patch applied, if it has one (the patched model is what
gets compiled). generate() compiles only a cache with ``is_compileable``, i.e. a static capacity: a method
declaring a ``max_cache_len`` parameter (registry) whose spec leaves it unset gets ``context + new_tokens``
in that row; a cache that is still not compileable makes the row a skipped one with the reason. Compiled
method rows also report the share of greedy tokens equal to their eager row's.

On MLA models (DeepSeek) ``dynamic`` is stock transformers' attention, which caches the latent and
expands it into per-head K/V over the whole context at every step: its peak memory (that expansion
included) is the reference for MLA methods.

Timing goes through ``model.generate`` (greedy, exactly ``new_tokens`` steps, random prompt tokens): a
logits processor stamps the time of every step, so prefill = start to first step and decode = mean
time between later steps; each entry runs once untimed first, exactly as timed. Models: ``smollm2`` (the real model) or random-weight shapes of
``llama-3.1-8b``, ``deepseek-v2-lite`` and ``deepseek-v3-attn`` (V3's attention with small dense MLPs
and experts off), optionally cut to ``layers`` layers (per-layer costs are unchanged, totals shrink).
An out-of-memory entry becomes a skipped row ("out of memory") and the run goes on.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from .plotting import pyplot, save_figure

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
        from ..models import load_smollm2

        if layers is not None:
            raise ValueError("layers applies to the random-weight shapes only, not to smollm2")
        model, _ = load_smollm2(dtype=dtype, device=device)
        return model
    from transformers import AutoModelForCausalLM

    cfg = shape_config(name, layers)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


class _StepClock:
    """A logits processor that records when each generation step's logits arrive and, into ``logits`` when
    given (untimed runs only: the copy to the host would be timed), a float32 CPU copy of the first
    ``LOGIT_STEPS`` steps' logits."""

    def __init__(self, sync, logits: list | None = None):
        self.sync, self.times, self.logits = sync, [], logits

    def __call__(self, input_ids, scores):
        self.sync()
        self.times.append(time.perf_counter())
        if self.logits is not None and len(self.logits) < LOGIT_STEPS:
            self.logits.append(scores.detach().float().cpu())
        return scores


# steps whose logits are compared with dynamic's (the first; later ones follow diverging tokens anyway)
LOGIT_STEPS = 8


def logit_agreement(ref_logits: list, ref_tokens: torch.Tensor, logits: list, tokens: torch.Tensor) -> dict | None:
    """How close a row's next-token logits are to the reference's (``dynamic``) over the first steps.

    Step ``i``'s logits of a batch row are compared only while that row's tokens before step ``i`` equal
    the reference's (after a different greedy token the two continue different texts); entries that are
    not finite in either (e.g. the end-of-sequence logit that ``min_new_tokens`` sets to -inf) are left
    out. Returns ``logit_max_err`` / ``logit_mean_err`` (max / mean absolute difference), ``logit_std``
    (the reference logits' standard deviation, for scale) and ``logit_steps`` (steps compared), or None.
    """
    steps = min(len(ref_logits), len(logits), ref_tokens.shape[1], tokens.shape[1])
    if steps == 0 or ref_tokens.shape != tokens.shape or ref_logits[0].shape != logits[0].shape:
        return None
    equal_before = torch.ones(tokens.shape[0], dtype=torch.bool)
    diffs, refs, compared = [], [], 0
    for i in range(steps):
        if not equal_before.any():
            break
        a, b = ref_logits[i][equal_before], logits[i][equal_before]
        finite = torch.isfinite(a) & torch.isfinite(b)
        diffs.append((a - b).abs()[finite])
        refs.append(a[finite])
        compared += 1
        equal_before &= tokens[:, i] == ref_tokens[:, i]
    diff, ref = torch.cat(diffs), torch.cat(refs)
    if diff.numel() == 0:
        return None
    return dict(logit_max_err=float(diff.max()), logit_mean_err=float(diff.mean()), logit_std=float(ref.std()),
                logit_steps=compared)


def _libc():
    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


def _release_freed_memory() -> None:
    """Collect garbage and hand the memory glibc keeps after ``free`` back to the system (``malloc_trim``),
    so that the resident set is what is in use: a run that reuses memory an earlier run freed then grows
    the resident set by what it allocates instead of not at all."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _status_kib(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (``VmRSS``, ``VmHWM``) in bytes, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (VmHWM) to the current resident set (Linux 4.0+)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


# what the CPU peak figures are (setup["cpu_peak"]): the kernel's exact resident-set high-water mark,
# else the resident set sampled every 2 ms
CPU_PEAK_SOURCE = "rss-high-water-mark" if _reset_peak_rss() and _LIBC is not None else "rss-sampled"


class _CPUPeak:
    """Highest resident set of this process while active, above the resident set at entry.

    Entry releases freed memory (:func:`_release_freed_memory`) and resets the kernel's high-water mark;
    exit reads it: an exact peak, whatever the allocator reused. Where either is unavailable the resident
    set is sampled every 2 ms instead (a peak that misses short spikes and memory reused from earlier runs).
    """

    def __init__(self):
        self.exact = CPU_PEAK_SOURCE == "rss-high-water-mark"
        self.peak = self.start = 0
        self._stop = threading.Event()
        self._thread = None if self.exact else threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __enter__(self):
        _release_freed_memory()
        if self.exact:
            _reset_peak_rss()
            self.start = self.peak = _status_kib("VmRSS") or 0
        else:
            self.start = self.peak = _rss()
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.exact:
            self.peak = max(self.start, _status_kib("VmHWM") or 0)
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def copy_bandwidth(device: str) -> float | None:
    """Measured device-memory bandwidth in bytes/s (a copy reads and writes each byte); None on CPU."""
    if not str(device).startswith("cuda"):
        return None
    from .hardware import copy_bandwidth as measure

    return measure(device)


# Stock transformers caches measured as bench entries (not registry methods: they are the references)
BASELINES: tuple[str, ...] = ("dynamic", "static", "static-compiled")
# generate()'s automatic compilation defaults (CompileConfig in transformers 5.17 and 5.24): inductor with
# "reduce-overhead", i.e. CUDA graphs for the decode step, prefill left eager
COMPILE_BACKEND = "inductor"
COMPILE_MODE = "reduce-overhead"


def parse_baselines(spec: str | Iterable[str] | None) -> list[str]:
    """``"static,static-compiled"`` -> the stock baselines to measure besides ``dynamic``, in table order.

    ``dynamic`` (stock ``DynamicCache``, eager) is always measured and may be named; an empty spec or
    ``None`` means just ``dynamic``. Unknown names raise ``ValueError`` naming ``--baselines`` and the
    allowed values.
    """
    if spec is None:
        return []
    items = [s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    unknown = [s for s in items if s not in BASELINES]
    if unknown:
        raise ValueError(f"--baselines: unknown baseline(s) {', '.join(repr(u) for u in unknown)}; allowed: "
                         f"{', '.join(BASELINES)} (comma-separated; stock transformers caches, not registry methods)")
    return [b for b in BASELINES[1:] if b in items]


def _generate(model, input_ids, new_tokens: int, sync, *, method=None, cache=None, gen_kwargs: dict | None = None,
              logits: list | None = None):
    """One timed greedy generation of exactly ``new_tokens`` steps.

    Either ``method`` (a registry ``MethodSpec``: its cache is built, or the model patched, here) or a
    ready ``cache`` (the stock baselines; ``gen_kwargs`` adds e.g. ``compile_config``). ``logits``, a list,
    receives the first steps' logits (see :class:`_StepClock`). Returns
    ``(prefill_s, decode_s_per_step, cache, new_token_ids)``.
    """
    from transformers import LogitsProcessorList

    from ..patch import GENERATE_CACHE_KWARG
    from .spec import install_method, make_cache

    handle = install_method(method, model) if method is not None else None
    try:
        if cache is None and handle is None:
            cache = make_cache(method, model)
        kwargs = {GENERATE_CACHE_KWARG: cache} if cache is not None else {}
        kwargs.update(gen_kwargs or {})
        clock = _StepClock(sync, logits)
        sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, temperature=None,
                                 top_p=None, top_k=None, logits_processor=LogitsProcessorList([clock]), pad_token_id=0,
                                 **kwargs)
        sync()
        used = handle.last_cache if handle is not None else cache
    finally:
        if handle is not None:
            handle.remove()
    steps = clock.times
    prefill = steps[0] - t0
    decode = (steps[-1] - steps[0]) / (len(steps) - 1) if len(steps) > 1 else float("nan")
    return prefill, decode, used, out[:, input_ids.shape[1]:].cpu()


def _dynamo_counts() -> dict[str, int]:
    """Frames dynamo converted (one per compile or recompile) and inductor's cudagraph skips so far."""
    from torch._dynamo.utils import counters

    return {"frames": int(counters["frames"]["total"]), "cudagraph_skips": int(counters["inductor"]["cudagraph_skips"])}


_OOM = getattr(torch, "OutOfMemoryError", getattr(torch.cuda, "OutOfMemoryError", RuntimeError))


def bench(model, methods, *, batch: int = 1, context: int = 4096, new_tokens: int = 32, repeats: int = 2,
          budget_gib: float | None = None, baselines: str | Iterable[str] | None = None,
          compile_backend: str | None = None, prefill_chunk: int | None = None, compile_methods: bool = False,
          progress: bool = True, on_result=None, random_weights: bool | None = None) -> dict:
    """Measure every method (``dynamic`` first, added if missing) and stock baseline on ``model``.

    Every entry is first run once exactly as timed (same batch, context and steps) so that per-shape
    compilation (Triton kernels, torch.compile) stays out of the timed runs; methods run eager
    (``disable_compile``: generate() would compile a compileable cache by itself on CUDA).

    ``baselines``: extra stock references measured after the methods (see :func:`parse_baselines`):

    - ``static``: ``StaticCache`` preallocated for ``context + new_tokens``, eager (``disable_compile``,
      since generate() would otherwise compile it by itself on CUDA);
    - ``static-compiled``: the same cache with generate()'s automatic compilation of the decode forward
      (``CompileConfig(backend, mode="reduce-overhead")``: CUDA graphs; prefill stays eager). The warm-up is
      one identical generate() on the same cache (same shapes, same static addresses), so the timed runs
      neither compile nor re-record graphs; compiles at warm-up, recompiles in the timed runs and cudagraph
      skips are reported. On CPU it is a skipped row (reduce-overhead means CUDA graphs, and inductor takes
      tens of seconds even on tiny models) unless ``compile_backend`` is given, e.g. ``"eager"`` to check
      the plumbing (then its timings mean nothing).

    ``compile_methods``: every method but ``dynamic`` (whose compiled counterpart is ``static-compiled``)
    also gets a row ``<label>-compiled``, measured after the baselines exactly as ``static-compiled`` is
    (same compile config, warm-up, counts, ``compile_backend`` and CPU rule), with the method's patch
    (``install`` step) applied for the whole row, since the patched model is what generate() compiles.
    generate() compiles only caches with ``is_compileable``, which needs a static capacity: a method that
    declares a ``max_cache_len`` parameter (registry) and whose spec leaves it unset gets
    ``max_cache_len = context + new_tokens`` in this row; a cache that is still not compileable makes the
    row a skipped one saying why. ``same_tokens_as_eager``: the share of its greedy tokens equal to the
    method's eager row's.

    Agreement with ``dynamic``: ``same_tokens`` (share of equal greedy tokens) and, from each row's untimed
    warm-up run, ``logit_max_err`` / ``logit_mean_err`` over the first ``LOGIT_STEPS`` steps (see
    :func:`logit_agreement`). The prompt is random token ids, on which greedy choices are often near-ties,
    so the logit error is the figure that says how close a cache is; ``random_weights`` (the caller knows)
    is only recorded and printed with the table.

    Returns ``{"setup": {...}, "results": [per-entry dicts]}``; ``on_result(partial)`` is called after
    each entry so an interrupted run keeps what it measured.
    """
    from tqdm.auto import tqdm

    from ..ops import cache_nbytes, cache_reserved_nbytes
    from .spec import MethodSpec, make_cache

    for name, value, low in (("batch", batch, 1), ("context", context, 2), ("new_tokens", new_tokens, 2),
                             ("repeats", repeats, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    extra = parse_baselines(baselines)
    if not any(m.name == "dynamic" and not m.params for m in methods):
        methods = [MethodSpec("dynamic", "dynamic", {})] + list(methods)
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = copy_bandwidth(str(device))
    text_cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, text_cfg.vocab_size, (batch, context), generator=g).to(device)
    setup = dict(device=torch.cuda.get_device_name(device) if cuda else "cpu", dtype=str(next(model.parameters()).dtype),
                 batch=batch, context=context, new_tokens=new_tokens, repeats=repeats, weights_bytes=weights,
                 bandwidth_bytes_per_s=bandwidth, torch=torch.__version__, threads=torch.get_num_threads(),
                 model_type=getattr(text_cfg, "model_type", None), layers=getattr(text_cfg, "num_hidden_layers", None),
                 mla=getattr(text_cfg, "kv_lora_rank", None) is not None, budget_gib=budget_gib, baselines=extra,
                 prefill_chunk=prefill_chunk, compile_methods=bool(compile_methods),
                 cpu_peak=None if cuda else CPU_PEAK_SOURCE, prompt="random token ids", random_weights=random_weights,
                 logit_steps=min(LOGIT_STEPS, new_tokens))
    import transformers

    setup["transformers"] = transformers.__version__
    # dynamic's generated tokens (the reference of "same_tokens") and every row's (label -> tokens)
    state: dict = {"tokens": {}}
    results: list[dict] = []

    def finish(row: dict, best: dict, tokens: torch.Tensor, warm: tuple | None = None) -> None:
        """Derived figures of a measured row (tokens/s, agreement with dynamic, bytes floor, fit-in-budget
        estimate); ``warm``: the untimed run's ``(first steps' logits, tokens)``."""
        row.update(best)
        row["tokens_per_s"] = batch / (row["decode_ms"] / 1000)
        state["tokens"][row["method"]] = tokens
        if "dynamic_tokens" not in state and row["method"] == "dynamic":
            state["dynamic_tokens"] = tokens
            state["dynamic_warm"] = warm
        ref = state.get("dynamic_tokens")
        # greedy tokens equal to stock dynamic's (1.0 for exact caches up to kernel rounding; info only)
        row["same_tokens"] = float((tokens == ref).float().mean()) if ref is not None and ref.shape == tokens.shape else None
        ref_warm = state.get("dynamic_warm")
        if warm is not None and ref_warm is not None:
            row.update(logit_agreement(ref_warm[0], ref_warm[1], warm[0], warm[1]) or {})
        if bandwidth:
            row["floor_ms"] = 1000 * (weights + row["cache_bytes"]) / bandwidth
            row["decode_over_floor"] = row["decode_ms"] / row["floor_ms"]
        if budget_gib:
            # linear in batch (and context): the measured peak per row, whatever the method keeps (a
            # preallocated static cache, compressed factors, the stock expand-per-step transients)
            free = budget_gib * 2**30 - weights
            per_row = max(row["peak_bytes"], row["cache_bytes"]) / batch
            row["max_batch_at_context"] = max(0, int(free // per_row))
            row["max_context_at_batch"] = max(0, int(free // (per_row / (context + new_tokens) * batch)))

    def timed(run, held: int = 0, base: int | None = None):
        """Best of ``repeats`` calls of ``run() -> (prefill, decode, cache, tokens)``; peak memory above
        ``base`` (CUDA; default: allocated just before each run) or above the CPU bytes in use at the start
        (:class:`_CPUPeak`) plus ``held`` bytes allocated before the run and reused by it (CPU). Returns ``(best, last tokens, frames dynamo
        compiled during the runs)``: anything but 0 means a (re)compile inside the timed runs."""
        best, tokens = None, None
        frames = _dynamo_counts()["frames"]
        for _ in range(repeats):
            # caches with reference cycles (a layer points back to its cache) outlive ``del`` until the
            # cycle collector runs: collect first, or the baseline would include the previous run's cache
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                run_base = torch.cuda.memory_allocated(device) if base is None else base
                prefill, decode, cache, tokens = run()
                peak = torch.cuda.max_memory_allocated(device) - run_base
            else:
                with _CPUPeak() as mem:
                    prefill, decode, cache, tokens = run()
                peak = mem.peak - mem.start + held
            one = dict(prefill_s=prefill, decode_ms=1000 * decode, peak_bytes=peak, cache_bytes=cache_nbytes(cache),
                       reserved_bytes=cache_reserved_nbytes(cache))
            del cache
            best = one if best is None else {k: min(best[k], one[k]) for k in one}
        return best, tokens, _dynamo_counts()["frames"] - frames

    def static_cache(max_len: int):
        from transformers import StaticCache

        return StaticCache(config=model.config, max_cache_len=max_len)

    # methods and ``static`` run eager: generate() would otherwise compile any compileable cache by itself
    # on CUDA, with the compile inside the timed runs; compiled stock is its own row, ``static-compiled``
    eager = dict(disable_compile=True)
    if prefill_chunk is not None:
        # generate()'s chunked prefill, for every row alike: the prompt's activations are then those of one
        # chunk, so the cache (not the prefill's MLP buffers) decides how many rows fit; xKV compresses
        # after each chunk (one segment per chunk)
        if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be a positive int or None, got {prefill_chunk!r}")
        eager["prefill_chunk_size"] = prefill_chunk
    entries = [("method", m) for m in methods] + [("baseline", b) for b in extra]
    if compile_methods:
        entries += [("compiled", m) for m in methods if m.name != "dynamic"]
    for kind, item in tqdm(entries, desc="bench", disable=not progress):
        label = item if kind == "baseline" else item.label + ("-compiled" if kind == "compiled" else "")
        row: dict = dict(method=label, kind="stock" if kind == "baseline" or label == "dynamic" else "method")
        try:
            if kind == "method" or item == "static":
                def run(item=item, logits=None):
                    if kind == "method":
                        return _generate(model, input_ids, new_tokens, sync, method=item, gen_kwargs=eager,
                                         logits=logits)
                    return _generate(model, input_ids, new_tokens, sync, cache=static_cache(context + new_tokens),
                                     gen_kwargs=eager, logits=logits)

                t0 = time.perf_counter()
                logits: list = []
                try:
                    # warm-up = the timed call itself (same batch, context and steps): kernels that compile
                    # per shape (Triton, torch.compile inside a method) do so here, not in the timed runs.
                    # Only this untimed run keeps the first steps' logits
                    warm_tokens = run(logits=logits)[3]
                except (ValueError, TypeError) as e:  # e.g. xkv on an MLA model: say so and go on
                    if kind != "method":
                        raise
                    row["skipped"] = str(e)
                else:
                    row["warmup_s"] = time.perf_counter() - t0
                    best, tokens, row["recompiles_timed"] = timed(run)
                    finish(row, best, tokens, (logits, warm_tokens))
            elif kind == "baseline":  # static-compiled
                _bench_compiled(model, row, input_ids, new_tokens, sync, cuda, device, compile_backend,
                                lambda: static_cache(context + new_tokens), timed, finish, cache_nbytes, prefill_chunk)
            else:  # a method's compiled row
                spec, reason = _compiled_spec(model, item, context + new_tokens)
                if spec is None:
                    row["skipped"] = reason
                else:
                    if "max_cache_len" in spec.params:
                        row["max_cache_len"] = spec.params["max_cache_len"]
                    _bench_compiled(model, row, input_ids, new_tokens, sync, cuda, device, compile_backend,
                                    lambda spec=spec: make_cache(spec, model), timed, finish, cache_nbytes,
                                    prefill_chunk, method=spec)
                    eager_tokens, tokens = state["tokens"].get(item.label), state["tokens"].get(label)
                    if "skipped" not in row:
                        row["same_tokens_as_eager"] = (float((tokens == eager_tokens).float().mean())
                                                       if eager_tokens is not None and tokens is not None
                                                       and eager_tokens.shape == tokens.shape else None)
        except _OOM as e:
            # the largest batch that fits is one of the targets: an OOM is a result, not a crash
            row = dict(method=label, kind=row["kind"], skipped=f"out of memory: {str(e).splitlines()[0][:200]}")
            if item == "static-compiled" or kind == "compiled":
                torch._dynamo.reset()  # drop the graphs and their memory pools
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        results.append(row)
        _add_ratios(results)
        if on_result:
            on_result(dict(setup=setup, results=results))
    return dict(setup=setup, results=results)


def _compiled_spec(model, item, capacity: int):
    """The spec of ``item``'s compiled row and ``None``, or ``None`` and why the row is skipped.

    A method that declares a ``max_cache_len`` parameter in the registry and whose spec leaves it unset
    gets ``max_cache_len = capacity`` (a static capacity is what makes a cache compileable); an explicit
    value, ``None`` included, is kept. The row is skipped when the cache cannot be built for this model or
    is not ``is_compileable``.
    """
    from ..registry import get_method
    from .spec import MethodSpec, make_cache

    try:
        declared = get_method(item.name).param_map
    except (ValueError, TypeError):  # an unknown name (make_cache says so below)
        declared = {}
    params = dict(item.params)
    if "max_cache_len" in declared and "max_cache_len" not in params:
        params["max_cache_len"] = capacity
    spec = MethodSpec(item.label, item.name, params)
    try:
        probe = make_cache(spec, model)  # caches allocate at their first update: building one is cheap
    except (ValueError, TypeError) as e:  # e.g. xkv on an MLA model: the eager row says the same
        return None, str(e)
    if not getattr(probe, "is_compileable", False):
        why = (f"max_cache_len={params['max_cache_len']!r}" if "max_cache_len" in declared
               else "no max_cache_len parameter")
        return None, f"{item.label} cache ({type(probe).__name__}) is not compileable ({why})"
    return spec, None


def _bench_compiled(model, row: dict, input_ids, new_tokens: int, sync, cuda: bool, device, backend: str | None,
                    cache_factory, timed, finish, cache_nbytes, prefill_chunk: int | None = None,
                    method=None) -> None:
    """A compiled row (see :func:`bench`): ``static-compiled``, or a method's ``<label>-compiled``; fills
    ``row`` in place.

    ``cache_factory()`` builds the row's one cache (after the memory baseline is taken); ``method``, a
    ``MethodSpec`` with an ``install`` step, is patched into the model for the whole row (warm-up and timed
    runs alike, so the compiled graphs see one unchanging model) and removed at the end.
    """
    from transformers import CompileConfig

    from .spec import install_method

    if not cuda and backend is None:
        row["skipped"] = (f"needs CUDA: mode {COMPILE_MODE!r} is CUDA graphs and generate() compiles only on GPU "
                          "(--compile-backend eager checks the plumbing on CPU)")
        return
    backend = backend or COMPILE_BACKEND
    mode = COMPILE_MODE if backend == "inductor" else None  # torch.compile takes a mode for inductor only
    config = CompileConfig(backend=backend, mode=mode)
    if not cuda:
        config._compile_all_devices = True  # generate()'s switch to compile off-GPU (meant for tests)
    row.update(compile_backend=backend, compile_mode=mode)
    gen_kwargs = dict(compile_config=config)
    if prefill_chunk is not None:
        gen_kwargs["prefill_chunk_size"] = prefill_chunk
    # a clean slate: the compile counts are this row's, and the recompile limit is not shared with
    # whatever this process compiled before (other shapes of an earlier bench call)
    torch._dynamo.reset()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)  # before the cache and graph pools exist
    else:
        base = None
    try:
        handle = install_method(method, model) if method is not None else None
    except (ValueError, TypeError) as e:  # the patch refuses this model: the eager row says the same
        row["skipped"] = str(e)
        return
    try:
        cache = cache_factory()
        before = _dynamo_counts()
        t0 = time.perf_counter()
        try:
            # warm-up = the timed call itself: same shapes and the same cache (its tensors are static addresses
            # for the CUDA graphs), so the timed runs replay graphs instead of compiling or re-recording. A
            # patched model keeps its attention patch and uses this cache (a caller's cache wins over the patch's)
            logits: list = []
            warm_tokens = _generate(model, input_ids, new_tokens, sync, cache=cache, gen_kwargs=gen_kwargs,
                                    logits=logits)[3]
        except _OOM:
            raise
        except Exception as e:  # a compile failure is a finding to report, not a reason to lose the other rows
            row["skipped"] = f"failed to compile: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            torch._dynamo.reset()
            return
        warm = _dynamo_counts()
        row["warmup_s"] = time.perf_counter() - t0
        row["compiles_warmup"] = warm["frames"] - before["frames"]
        # after the reset above a compiled decode step must convert at least one frame; none means generate()
        # found its compile criteria unmet (it only logs a warning) and the row ran eager
        row["compiled"] = row["compiles_warmup"] > 0

        def run():
            with torch.inference_mode():  # its tensors were made in inference mode (generate's prefill)
                cache.reset()  # zero in place: the addresses the graphs were recorded with stay valid
            return _generate(model, input_ids, new_tokens, sync, cache=cache, gen_kwargs=gen_kwargs)

        best, tokens, row["recompiles_timed"] = timed(run, held=cache_nbytes(cache), base=base)
        after = _dynamo_counts()
        row["cudagraph_skips"] = after["cudagraph_skips"] - before["cudagraph_skips"]
        finish(row, best, tokens, (logits, warm_tokens))
        del cache
    finally:
        if handle is not None:
            handle.remove()
    torch._dynamo.reset()  # frees the graphs' memory pools for whatever runs next
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


_RATIO_KEYS = ("prefill_s", "decode_ms", "cache_bytes", "reserved_bytes", "peak_bytes", "tokens_per_s")


def _add_ratios(results: list[dict]) -> None:
    """Every measured figure divided by ``dynamic``'s, wherever it sits in the list (else the first row's):
    ``<key>_ratio``; and by ``static-compiled``'s when it was measured: ``<key>_vs_compiled``."""
    ref = next((r for r in results if r["method"] == "dynamic" and "skipped" not in r), results[0])
    compiled = next((r for r in results if r["method"] == "static-compiled" and "skipped" not in r), None)
    for r in results:
        if "skipped" in r:
            continue
        for key in _RATIO_KEYS:
            r[key + "_ratio"] = r[key] / ref[key] if ref.get(key) else None
            if compiled is not None:
                r[key + "_vs_compiled"] = r[key] / compiled[key] if compiled.get(key) else None


def _f(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def notes(out: dict) -> list[str]:
    """What the table's rows and ratios are, in words (printed under the table)."""
    s, rows = out["setup"], out["results"]
    names = {r["method"] for r in rows}
    compiled_methods = any(r["method"].endswith("-compiled") and r["method"] != "static-compiled" for r in rows)
    lines = ["(x): ÷ `dynamic` (stock `DynamicCache`, eager; methods run eager too"
             + (", `<method>-compiled` rows aside)" if compiled_methods else ")")
             + ("; (x compiled): ÷ `static-compiled`" if any("tokens_per_s_vs_compiled" in r for r in rows) else "")
             + "; tokens/s = batch ÷ decode s/step."]
    lines.append("cache MiB: the bytes the cache holds (`nbytes()`, the memory formula's figure); allocated MiB: the "
                 "bytes its storage has allocated (`reserved_nbytes()`, spare capacity for decoded tokens included; a "
                 "stock cache allocates what it holds).")
    if any(r.get("logit_steps") for r in rows):
        std = next((r.get("logit_std") for r in rows if r["method"] == "dynamic" and r.get("logit_std")), None)
        scale = f" (`dynamic`'s logits have std {std:.3g})" if std else ""
        weights = " into a model with random weights" if s.get("random_weights") else ""
        lines.append("Agreement with `dynamic`: same tokens = share of greedy tokens equal to `dynamic`'s; logit err = "
                     f"max / mean |logit - `dynamic`'s| over the first {s.get('logit_steps')} steps, a step compared "
                     f"only while the tokens before it agree{scale}. The prompt is {s['context']} random token ids"
                     f"{weights}, not text: greedy choices on it are often near-ties, so a small logit difference "
                     "flips a token and the texts part from there; a low share of same tokens is expected, the "
                     "logit error says how close the cache is.")
    elif rows:
        lines.append("same tokens: share of greedy tokens equal to `dynamic`'s, on a prompt of random token ids.")
    if s.get("mla"):
        lines.append("MLA model: `dynamic` is stock transformers' expand-per-step path: its cache holds the latent "
                     "(kv_lora_rank + rope dims per token and layer) and every step expands the latent into per-head "
                     "K/V (kv_b_proj) over the whole context; its peak memory, expansion included, is the reference.")
    if s.get("prefill_chunk"):
        lines.append(f"Chunked prefill ({s['prefill_chunk']} tokens a chunk) for every row: peak memory holds one "
                     "chunk's activations; xKV compresses after each chunk, one segment per chunk.")
    if "static" in names or "static-compiled" in names:
        lines.append("`static`/`static-compiled`: stock `StaticCache` preallocated for context + new tokens (counted "
                     "in cache and peak); `static` runs eager (disable_compile).")
    if compiled_methods:
        lines.append("`<method>-compiled`: the method's cache (and attention patch, if any) with generate()'s "
                     "compiled decode forward, as `static-compiled`; methods that declare `max_cache_len` get "
                     f"context + new tokens ({s['context'] + s['new_tokens']}) unless their spec sets it.")
    for r in rows:
        name = r["method"]
        # static-compiled and the methods' compiled rows: every row measured through _bench_compiled
        if "compiles_warmup" in r and "skipped" not in r:
            if not r.get("compiled", True):
                lines.append(f"WARNING, `{name}` did not compile (generate()'s compile criteria unmet): it ran eager")
            if r.get("cudagraph_skips"):
                lines.append(f"WARNING, `{name}` skipped CUDA graphs (see TORCH_LOGS=perf_hints for why): "
                             "launch overhead is not removed")
            same = r.get("same_tokens_as_eager")
            eager = f"; same tokens as eager `{name[:-len('-compiled')]}`: {same:.2f}" if same is not None else ""
            lines.append(f"`{name}`: generate()'s decode forward compiled (backend {r['compile_backend']}, "
                         f"mode {r['compile_mode']}; prefill eager); warm-up {r['warmup_s']:.1f} s with "
                         f"{r['compiles_warmup']} compile(s); timed runs: {r['recompiles_timed']} recompile(s), "
                         f"{r['cudagraph_skips']} cudagraph skip(s){eager}.")
    recompiled = [f"`{r['method']}` ({r['recompiles_timed']})" for r in rows if r.get("recompiles_timed")]
    if recompiled:
        lines.append("WARNING, torch.compile recompiled inside the timed runs of: " + ", ".join(recompiled)
                     + " (their decode times include compilation)")
    if any("max_batch_at_context" in r for r in rows):
        lines.append(f"max batch/context: ({s.get('budget_gib') or 0:.1f} GiB - weights) ÷ measured peak per row, "
                     "extrapolated linearly (an estimate).")
    return lines


def markdown(out: dict) -> str:
    """The results as a markdown table (ratios to dynamic, and to static-compiled when measured), with notes."""
    s = out["setup"]
    rows = out["results"]
    bw = f", copy bandwidth {s['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s" if s.get("bandwidth_bytes_per_s") else ""
    layers = f", {s['layers']} layers" if s.get("layers") else ""
    weights = " (random)" if s.get("random_weights") else ""
    prompt = f" ({s['prompt']})" if s.get("prompt") else ""
    lines = [f"{s['device']}, {s['dtype']}{layers}, batch {s['batch']}, context {s['context']}{prompt}, "
             f"{s['new_tokens']} decode steps, weights {s['weights_bytes'] / 2**20:.0f} MiB{weights}{bw}; "
             f"best of {s['repeats']}", ""]
    vs_compiled = any("tokens_per_s_vs_compiled" in r for r in rows)
    floor = any("floor_ms" in r for r in rows)
    budget = any("max_batch_at_context" in r for r in rows)
    cols = ["method", "prefill s", "(x)", "decode ms/step", "tokens/s", "(x)"]
    cols += ["(x compiled)"] if vs_compiled else []
    cols += ["cache MiB", "(x)", "allocated MiB", "(x)", "peak MiB", "(x)"]
    cols += ["(x compiled)"] if vs_compiled else []
    logit = any(r.get("logit_steps") for r in rows)
    cols += ["same tokens"] + (["logit err max/mean"] if logit else [])
    cols += ["floor ms", "decode/floor"] if floor else []
    cols += ["max batch", "max context"] if budget else []
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| `{r['method']}` | skipped: {r['skipped'][:160]} |" + " |" * (len(cols) - 2))
            continue
        cells = [f"`{r['method']}`", _f(r["prefill_s"], ".3f"), _f(r["prefill_s_ratio"], ".2f"),
                 _f(r["decode_ms"], ".2f"), _f(r["tokens_per_s"], ".0f"), _f(r["tokens_per_s_ratio"], ".2f")]
        cells += [_f(r.get("tokens_per_s_vs_compiled"), ".2f")] if vs_compiled else []
        reserved = r.get("reserved_bytes")  # absent in results written before it was measured
        cells += [_f(r["cache_bytes"] / 2**20, ".1f"), _f(r["cache_bytes_ratio"], ".3f"),
                  _f(None if reserved is None else reserved / 2**20, ".1f"), _f(r.get("reserved_bytes_ratio"), ".3f"),
                  _f(r["peak_bytes"] / 2**20, ".0f"), _f(r["peak_bytes_ratio"], ".2f")]
        cells += [_f(r.get("peak_bytes_vs_compiled"), ".2f")] if vs_compiled else []
        cells += [_f(r.get("same_tokens"), ".2f")]
        if logit:
            cells += [f"{r['logit_max_err']:.3g} / {r['logit_mean_err']:.2g}" if r.get("logit_steps") else "-"]
        if floor:
            cells += [f"{r['floor_ms']:.2f}", f"{r['decode_over_floor']:.1f}"]
        if budget:
            cells += [str(r["max_batch_at_context"]), str(r["max_context_at_batch"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [""] + ["- " + n for n in notes(out)]
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
    if not rows or not keys:  # every entry skipped (e.g. out of memory): the table says why, no plot
        return None
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
