"""NVIDIA kvpress presses on the very same RULER JSONL samples, written as our per-sample records.

kvpress pins ``transformers<5.3`` while kvcompress needs 5.17+, so this script runs in its own
virtual environment and imports only the standard-library modules of ``kvcompress.ruler`` (the dataset
reader, the prompt builder, the scoring and the results files), without running ``kvcompress/__init__``
(which needs the newer transformers); see :func:`ruler_modules`::

    python -m venv /tmp/kvpress-venv
    /tmp/kvpress-venv/bin/pip install torch==2.13.0           # the local CPU build; on GPU the CUDA one
    /tmp/kvpress-venv/bin/pip install kvpress==0.5.5 'transformers<5.3' gguf tqdm
    PYTHONPATH=. /tmp/kvpress-venv/bin/python -m benchmarks.ruler.peers.kvpress_eval \\
        --dataset results/ruler/dataset.jsonl --out results/ruler/results \\
        --gguf "$(python -c 'from kvcompress.models import find_smollm2_gguf; print(find_smollm2_gguf())')" \\
        --presses no_press,snapkv:0.6,knorm:0.6,streaming_llm:0.6,expected_attention:0.6

Any JSONL in RULER's format runs the same way, e.g. the needle sweep's prompts
(``--dataset results/needles/dataset.jsonl --out results/needles/results``; see benchmarks/needle_sweep.py).

Press specs: ``no_press``; ``NAME:RATIO`` with NAME one of ``PRESSES`` (``kvzip`` is KVzip, which scores
every context token by how much attention it gets while the model is made to repeat the context; it
runs two to three extra prefill-sized passes); ``adakv_SCORER:RATIO`` is AdaKV (head-wise budgets: the
lowest scores over all heads of a layer are evicted, each head keeping at least ``alpha_safeguard`` =
0.2 of its share) around the scorer press SCORER (one of ``ADAKV_SCORERS``), e.g.
``adakv_expected_attention:0.8``.

Protocol (kvpress's own pipeline, re-implemented in a few lines so prompts match ours exactly): the
prompt is built as for our methods (chat template + answer prefix); everything before the sample's
question is the *context*, prefilled with the press active, so it is compressed without seeing the
question (kvpress's query-agnostic RULER setting); then the question and answer prefix are fed
uncompressed and the answer is decoded greedily. ``compression_ratio`` in a press spec is the fraction
of context tokens the press removes (so the cache ratio is about ``1 - compression_ratio``).

Bytes: ``cache_bytes_allocated`` is the stock ``DynamicCache``'s keys+values after decoding, the same
measure as ours. Presses that evict per head (AdaKV, KVzip) do not shrink that cache: kvpress keeps the
evicted pairs in it and hides them from attention with a fake key (its ``attention_patch.py``), listed
per layer in ``masked_key_indices``. ``cache_bytes`` is therefore the allocated bytes minus those masked
pairs' keys and values: what the press keeps, as a ragged per-head layout would store it. For presses
that remove tokens (SnapKV, Knorm, ...) nothing is masked and the two are equal. ``prefill_seconds`` is
the context prefill with the press (its scoring included) plus the question's forward, up to the first
next-token logits.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

PRESSES = {
    "snapkv": "SnapKVPress",
    "knorm": "KnormPress",
    "streaming_llm": "StreamingLLMPress",
    "expected_attention": "ExpectedAttentionPress",
    "tova": "TOVAPress",
    "kvzip": "KVzipPress",
}
ADAKV_SCORERS = ("expected_attention", "snapkv", "knorm", "tova")  # scorer presses AdaKVPress wraps
ADAKV_PREFIX = "adakv_"


def parse_press_spec(spec: str) -> tuple[str, str | None, float] | None:
    """``no_press`` -> None; ``snapkv:0.6`` -> ``("snapkv", None, 0.6)``; ``adakv_snapkv:0.6`` ->
    ``("adakv", "snapkv", 0.6)``. Raises ``ValueError`` naming the allowed names and ratios."""
    if spec == "no_press":
        return None
    name, _, ratio = spec.partition(":")
    allowed = (f"no_press, one of {', '.join(PRESSES)}, or {ADAKV_PREFIX}SCORER with SCORER one of "
               f"{', '.join(ADAKV_SCORERS)} (as name:ratio)")
    inner = None
    if name.startswith(ADAKV_PREFIX):
        name, inner = "adakv", name[len(ADAKV_PREFIX):]
        if inner not in ADAKV_SCORERS:
            raise ValueError(f"press must be {allowed}, got {spec!r}")
    elif name not in PRESSES:
        raise ValueError(f"press must be {allowed}, got {spec!r}")
    try:
        value = float(ratio)
    except ValueError:
        raise ValueError(f"press {spec!r}: the compression ratio after ':' must be a float in [0, 1)") from None
    if not 0.0 <= value < 1.0:
        raise ValueError(f"press {spec!r}: compression ratio must be in [0, 1), got {value}")
    return name, inner, value


def make_press(spec: str):
    """``no_press`` -> None; ``snapkv:0.6`` -> ``SnapKVPress(compression_ratio=0.6)``;
    ``adakv_expected_attention:0.8`` -> ``AdaKVPress(press=ExpectedAttentionPress(compression_ratio=0.8))``."""
    parsed = parse_press_spec(spec)
    if parsed is None:
        return None
    name, inner, value = parsed
    _stub_unused_imports()
    import kvpress

    if name == "adakv":
        return kvpress.AdaKVPress(press=getattr(kvpress, PRESSES[inner])(compression_ratio=value))
    return getattr(kvpress, PRESSES[name])(compression_ratio=value)


def masked_nbytes(model, cache) -> int:
    """Bytes of the key/value pairs that head-wise presses hide from attention instead of removing them
    (``masked_key_indices`` of each attention module, set during the prefill; see the module docstring)."""
    total = 0
    for layer, cache_layer in zip(model.model.layers, cache.layers):
        indices = getattr(layer.self_attn, "masked_key_indices", None)
        if indices is None:
            continue
        pairs = len(indices[0])
        total += pairs * (cache_layer.keys.shape[-1] * cache_layer.keys.element_size()
                          + cache_layer.values.shape[-1] * cache_layer.values.element_size())
    return total


def point_config_at_tokenizer(model, tokenizer, directory: str) -> None:
    """KVzipPress loads the tokenizer with ``AutoTokenizer.from_pretrained(model.config.name_or_path)``;
    a model read from a GGUF file has no tokenizer files beside it, so the tokenizer is saved to
    ``directory`` and the config's ``name_or_path`` pointed there."""
    tokenizer.save_pretrained(directory)
    model.config.name_or_path = directory


def _stub_unused_imports() -> None:
    """kvpress imports ``datasets`` and ``fire`` at import time, only for two presses that download
    statistics from a hub (DuoAttention, ExpectedAttentionStats), which we do not use. Where those
    packages are missing (the offline GPU machine, where pyarrow would not fit the transfer), stand-ins
    that raise if ever called let ``import kvpress`` succeed."""
    import importlib.util
    import types

    for name, attrs in (("datasets", ("load_dataset",)), ("fire", ("Fire",))):
        if name not in sys.modules and importlib.util.find_spec(name) is None:
            module = types.ModuleType(name)

            def unavailable(*args, _name=name, **kwargs):
                raise ImportError(f"{_name} is not installed (stubbed by kvpress_eval: this press is not supported)")

            for attr in attrs:
                setattr(module, attr, unavailable)
            sys.modules[name] = module


def ruler_modules():
    """``kvcompress.ruler``'s ``generate``, ``results`` and ``scoring`` modules (standard library only).

    Where ``kvcompress`` is not imported yet, it is registered as a bare package (its directory, found on
    the path or next to this checkout's benchmarks/, without running its ``__init__``, which imports the
    caches and needs a transformers newer than kvpress allows), so only these three modules load.
    """
    import importlib
    import importlib.util
    import types

    if "kvcompress" not in sys.modules:
        spec = importlib.util.find_spec("kvcompress")
        if spec is not None and spec.submodule_search_locations:
            where = list(spec.submodule_search_locations)
        else:  # not installed in this environment: the checkout this script lives in
            where = [str(Path(__file__).resolve().parents[3] / "kvcompress")]
        package = types.ModuleType("kvcompress")
        package.__path__ = where
        sys.modules["kvcompress"] = package
    return tuple(importlib.import_module(f"kvcompress.ruler.{name}") for name in ("generate", "results", "scoring"))


def split_prompt(prompt: str, sample: dict) -> tuple[str, str]:
    """``(context part, question part)`` of a full prompt: the question starts at the sample's question."""
    at = prompt.rfind(sample["question"])
    if at < 0:
        raise ValueError(f"sample {sample['id']}: question not found in the prompt")
    return prompt[:at], prompt[at:]


def answer(model, tokenizer, press, context: str, question: str, max_new_tokens: int, eos: set[int]):
    """Greedy answer with ``press`` applied while the context is prefilled; returns (text, cache, n_prompt,
    prefill_seconds)."""
    import torch
    from transformers import DynamicCache

    device = next(model.parameters()).device
    ctx = tokenizer(context, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
    q = tokenizer(question, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
    cache = DynamicCache()
    t0 = time.perf_counter()
    with torch.inference_mode():
        with press(model) if press is not None else nullcontext():
            model.model(input_ids=ctx, past_key_values=cache)
        # positions continue from the uncompressed context length, as in kvpress's pipeline
        pos = torch.arange(ctx.shape[1], ctx.shape[1] + q.shape[1], device=device).unsqueeze(0)
        out = model(input_ids=q, past_key_values=cache, position_ids=pos, logits_to_keep=1)
        pos = pos[:, -1:] + 1
        ids = [out.logits[0, -1].argmax()]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        prefill_seconds = time.perf_counter() - t0
        for i in range(max_new_tokens - 1):
            if ids[-1].item() in eos:
                break
            out = model(input_ids=ids[-1].view(1, 1), past_key_values=cache, position_ids=pos + i)
            ids.append(out.logits[0, -1].argmax())
    text = tokenizer.decode(torch.stack(ids), skip_special_tokens=True)
    return text, cache, ctx.shape[1] + q.shape[1], prefill_seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True, help="RULER JSONL written by 'kvcompress ruler'")
    parser.add_argument("--out", required=True, help="results directory (the same as our methods' to merge)")
    parser.add_argument("--presses", default="no_press,snapkv:0.6",
                        help="comma list: no_press, name:ratio or adakv_scorer:ratio (module docstring)")
    parser.add_argument("--gguf", default=os.environ.get("KVCOMPRESS_SMOLLM2_GGUF"),
                        help="SmolLM2 GGUF file (default: $KVCOMPRESS_SMOLLM2_GGUF)")
    parser.add_argument("--tasks", default=None, help="comma list of tasks (default: all in the dataset)")
    parser.add_argument("--samples", type=int, default=None, help="first N samples of each task and length")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--max-new-tokens", type=int, default=None)
    args = parser.parse_args(argv)

    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    generate, results, scoring = ruler_modules()
    read_jsonl, build_prompt = generate.read_jsonl, generate.build_prompt
    ResultsFile, cache_nbytes, score = results.ResultsFile, results.cache_nbytes, scoring.score

    if not args.gguf or not Path(args.gguf).is_file():
        parser.error("--gguf must name the SmolLM2 GGUF file (or set KVCOMPRESS_SMOLLM2_GGUF)")
    specs = [s.strip() for s in args.presses.split(",") if s.strip()]
    for s in specs:  # every spec is checked before kvpress or the model loads
        try:
            parse_press_spec(s)
        except ValueError as error:
            parser.error(f"--presses: {error}")
    presses = {s: make_press(s) for s in specs}
    samples = read_jsonl(args.dataset)
    if args.tasks:
        wanted = set(args.tasks.split(","))
        samples = [s for s in samples if s["task"] in wanted]
    if args.samples:
        samples = [s for s in samples if s["index"] < args.samples]
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    path = Path(args.gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=getattr(torch, args.dtype)).to(device).eval()
    eos = set(model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list)
              else [model.generation_config.eos_token_id])
    eos |= {tokenizer.eos_token_id} | ({tokenizer.convert_tokens_to_ids("<|im_end|>")}
                                       if "<|im_end|>" in tokenizer.get_vocab() else set())
    eos.discard(None)
    tokenizer_dir = None
    if any(s.startswith("kvzip:") for s in specs):
        import tempfile

        tokenizer_dir = tempfile.TemporaryDirectory(prefix="kvpress-tokenizer-")  # removed when main returns
        point_config_at_tokenizer(model, tokenizer, tokenizer_dir.name)
    labels = {s: f"kvpress:{s}" for s in specs}
    files = {s: ResultsFile(args.out, labels[s]) for s in specs}
    # sample-major order (index 0 of every task, then index 1, ...): a run cut short by a time limit
    # still covers every task and every press evenly
    samples = sorted(samples, key=lambda x: (x["index"], x["length"]))
    done = {s: files[s].done_ids() for s in specs}
    todo = [(s, x) for x in samples for s in specs if x["id"] not in done[s]]
    for spec, sample in tqdm(todo, desc="kvpress RULER"):
        context, question = split_prompt(build_prompt(tokenizer, sample), sample)
        n_new = sample["tokens_to_generate"] if args.max_new_tokens is None else min(args.max_new_tokens,
                                                                                    sample["tokens_to_generate"])
        t0 = time.perf_counter()
        text, cache, n_prompt, prefill_seconds = answer(model, tokenizer, presses[spec], context, question, n_new,
                                                        eos)
        seconds = time.perf_counter() - t0
        allocated = cache_nbytes(cache)
        files[spec].append([dict(
            id=sample["id"], task=sample["task"], length=sample["length"], index=sample["index"],
            method=labels[spec], tool="kvpress", prediction=text, answers=sample["answers"],
            metric=sample["metric"], score=score(text, sample["answers"], sample["metric"]),
            cache_bytes=allocated - masked_nbytes(model, cache), cache_bytes_allocated=allocated,
            prompt_tokens=n_prompt, new_tokens=len(tokenizer(text, add_special_tokens=False)["input_ids"]),
            seconds=seconds, prefill_seconds=prefill_seconds, batch_size=1,
        )])
    if tokenizer_dir is not None:
        tokenizer_dir.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
