"""Run kvcompress methods on a RULER JSONL dataset: greedy answers, RULER scores, cache bytes.

Each method is a spec ``name[:param=value[:param=value...]]`` (``dynamic``,
``xkv:rank_k=0.25:rank_v=0.375``); values are parsed as int, float, bool or None, else kept as text.
Every sample (or batch of samples of one task, ``batch_size``) gets a fresh cache; the prompt is the
sample's user message in the model's chat template (when it has one) followed by the task's answer
prefix, and up to ``tokens_to_generate`` tokens are decoded greedily. ``cache_bytes`` is the cache's
``nbytes()`` after prefill and decoding (for a batch: the batch's bytes divided by its rows; rows of
one task differ by a few tokens only, so left padding adds at most a few tokens' bytes per row).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from .generate import model_input
from .results import ResultsFile, cache_nbytes
from .scoring import score


@dataclass(frozen=True)
class MethodSpec:
    """A method as given on the command line: ``label`` is the spec text, ``name`` and ``params`` parsed."""

    label: str
    name: str
    params: dict = field(default_factory=dict)


def parse_value(text: str):
    """``"None"`` -> None, ``"true"``/``"false"`` -> bool, then int, then float, else the text itself."""
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_methods(spec: str | Iterable[str]) -> list[MethodSpec]:
    """Parse ``"dynamic,xkv:rank_k=0.25:rank_v=0.375"`` into :class:`MethodSpec` s (labels must differ)."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not items:
        raise ValueError("methods must name at least one method, e.g. 'dynamic,xkv:rank_k=0.25:rank_v=0.375'")
    out = []
    for item in items:
        name, *pairs = item.split(":")
        params = {}
        for pair in pairs:
            if "=" not in pair:
                raise ValueError(f"methods: {pair!r} in {item!r} is not param=value (expected name:param=value:...)")
            key, value = pair.split("=", 1)
            params[key.strip()] = parse_value(value)
        out.append(MethodSpec(item, name.strip().lower(), params))
    labels = [m.label for m in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f"methods: each method may appear once, got {labels}")
    return out


def _registry():
    try:
        from kvcompress import registry
    except ImportError:  # an older kvcompress without the registry: the two founding methods only
        return None
    return registry


def available_methods() -> list[str]:
    """Names accepted by :func:`make_cache` (the registry's when it exists)."""
    registry = _registry()
    return list(registry.list_methods()) if registry else ["dynamic", "xkv"]


def make_cache(method: MethodSpec, model):
    """A fresh cache for ``method`` on ``model``: ``kvcompress.registry.make_cache`` when the registry
    exists (it validates names and parameters), else ``DynamicCache`` / ``XKVCache`` directly."""
    registry = _registry()
    if registry is not None:
        return registry.make_cache(method.name, model, **method.params)
    if method.name == "dynamic":
        from transformers import DynamicCache

        if method.params:
            raise ValueError(f"method 'dynamic' takes no parameters, got {sorted(method.params)}")
        return DynamicCache(config=model.config)
    if method.name == "xkv":
        from kvcompress import XKVCache

        return XKVCache(model.config, **method.params)
    raise ValueError(f"unknown method {method.name!r}; allowed: {', '.join(available_methods())}")


def install_method_needed(method: MethodSpec) -> bool:
    """True for registry methods with an ``install`` step (they change the model's attention)."""
    registry = _registry()
    return registry is not None and getattr(registry.get_method(method.name), "install", None) is not None


def install_method(method: MethodSpec, model):
    """For registry methods that change the model's attention (an ``install`` step, e.g. MLA), patch
    the model with ``kvcompress.patch.patch_model`` and return the handle (its ``last_cache`` is the
    cache each ``generate`` built); ``None`` for plain cache methods."""
    if not install_method_needed(method):
        return None
    from kvcompress.patch import patch_model

    return patch_model(model, method.name, **method.params)


def build_prompt(tokenizer, sample: dict, chat_template: bool | None = None) -> str:
    """The text fed to the model: the user message in the chat template (``None``: when the tokenizer
    has one), then the answer prefix, as RULER does for chat models."""
    use_template = bool(getattr(tokenizer, "chat_template", None)) if chat_template is None else chat_template
    if use_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": model_input(sample)}], tokenize=False,
                                             add_generation_prompt=True)
        return text + sample["answer_prefix"].lstrip()
    return model_input(sample) + sample["answer_prefix"]


def _eos_ids(model, tokenizer) -> list[int]:
    ids = set()
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    if im_end is not None:
        ids.add(im_end)
    return sorted(ids)


@torch.inference_mode()
def generate_batch(model, tokenizer, prompts: list[str], cache, max_new_tokens: int) -> tuple[list[str], list[int], int]:
    """Greedy answers to ``prompts`` (left-padded batch) with ``cache`` (``None``: the one a patched
    model builds); returns texts, prompt lengths and the padded prompt width."""
    device = next(model.parameters()).device
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    finally:
        tokenizer.padding_side = old_side
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _eos_ids(model, tokenizer)[0]
    if cache is not None:
        try:  # generate() takes "cache" on recent transformers, "past_key_values" on 5.17
            from kvcompress.patch import GENERATE_CACHE_KWARG
        except ImportError:
            GENERATE_CACHE_KWARG = "past_key_values"
        enc[GENERATE_CACHE_KWARG] = cache
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                         temperature=None, top_p=None, top_k=None, eos_token_id=_eos_ids(model, tokenizer),
                         pad_token_id=pad_id)
    width = enc["input_ids"].shape[1]
    texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    lengths = enc["attention_mask"].sum(dim=1).tolist()
    return texts, lengths, width


def run_ruler(model, tokenizer, samples: list[dict], methods: list[MethodSpec], results_dir, *,
              batch_size: int = 1, chat_template: bool | None = None, max_new_tokens: int | None = None,
              progress: bool = True) -> dict[str, list[dict]]:
    """Evaluate every method on every sample, appending per-sample records to
    ``results_dir/<method>.jsonl``; samples already recorded there are skipped (resume).

    Returns every method's records (old and new), keyed by method label.
    """
    from tqdm.auto import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 1):
        raise ValueError(f"max_new_tokens must be a positive int or None, got {max_new_tokens!r}")
    files = {m.label: ResultsFile(results_dir, m.label) for m in methods}
    for m in methods:  # fail on a bad method before any long work starts
        if install_method_needed(m):  # (raises for an unknown name)
            continue  # patch_model validates it when its turn comes
        make_cache(m, model)
    todo = {m.label: [s for s in samples if s["id"] not in files[m.label].done_ids()] for m in methods}
    total = sum(len(v) for v in todo.values())
    bar = tqdm(total=total, desc="RULER", disable=not progress)
    for m in methods:
        pending = todo[m.label]
        if not pending:
            continue
        groups: dict[tuple, list[dict]] = {}
        for s in pending:  # batch only samples of one task and length (near-equal prompt lengths)
            groups.setdefault((s["task"], s["length"]), []).append(s)
        handle = install_method(m, model)
        try:
            for group in groups.values():
                for start in range(0, len(group), batch_size):
                    batch = group[start : start + batch_size]
                    bar.set_postfix_str(f"{m.label} {batch[0]['task']}")
                    records = _run_batch(model, tokenizer, batch, m, handle, chat_template, max_new_tokens)
                    files[m.label].append(records)
                    bar.update(len(batch))
        finally:
            if handle is not None:
                handle.remove()
    bar.close()
    return {m.label: files[m.label].records() for m in methods}


def _run_batch(model, tokenizer, batch: list[dict], m: MethodSpec, handle, chat_template, max_new_tokens) -> list[dict]:
    cache = None if handle is not None else make_cache(m, model)
    new_tokens = min(s["tokens_to_generate"] for s in batch)
    if max_new_tokens is not None:
        new_tokens = min(new_tokens, max_new_tokens)
    t0 = time.perf_counter()
    texts, lengths, _ = generate_batch(
        model, tokenizer, [build_prompt(tokenizer, s, chat_template) for s in batch], cache, new_tokens)
    seconds = time.perf_counter() - t0
    used = handle.last_cache if handle is not None else cache
    nbytes = cache_nbytes(used) / len(batch)
    records = []
    for s, text, n_prompt in zip(batch, texts, lengths):
        records.append(dict(
            id=s["id"], task=s["task"], length=s["length"], index=s["index"], method=m.label,
            tool="kvcompress", prediction=text, answers=s["answers"], metric=s["metric"],
            score=score(text, s["answers"], s["metric"]), cache_bytes=nbytes, prompt_tokens=n_prompt,
            new_tokens=len(tokenizer(text, add_special_tokens=False)["input_ids"]),
            seconds=seconds / len(batch), batch_size=len(batch),
        ))
    return records
