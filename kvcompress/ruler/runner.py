"""Run kvcompress methods on a RULER JSONL dataset: greedy answers, RULER scores, cache bytes.

Each method is a :class:`kvcompress.bench.spec.MethodSpec` (``dynamic``, ``xkv:rank_k=0.25:rank_v=0.375``,
parsed and checked by :func:`kvcompress.bench.spec.parse_method_specs`).
Every sample (or batch of samples of one task, ``batch_size``) gets a fresh cache; the prompt is the
sample's user message in the model's chat template (when it has one) followed by the task's answer
prefix, and up to ``tokens_to_generate`` tokens are decoded greedily. ``cache_bytes`` is the cache's
``nbytes()`` after prefill and decoding (for a batch: the batch's bytes divided by its rows; rows of
one task differ by a few tokens only, so left padding adds at most a few tokens' bytes per row).
``seconds`` is the whole ``generate`` call and ``prefill_seconds`` the part until generate first asks
for next-token scores (the prefill forward; on CUDA after a synchronisation), both per row of a batch.
"""

from __future__ import annotations

import time

import torch

from ..bench.spec import MethodSpec, install_method, install_method_needed, make_cache
from .generate import build_prompt
from .results import ResultsFile, cache_nbytes
from .scoring import score


class PrefillTimer:
    """A logits processor that notes when ``generate`` first asks for next-token scores: by then the prompt's
    forward (the prefill) has run. It passes the scores through unchanged."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.at is None:
            if scores.is_cuda:  # kernels are asynchronous: wait for the prefill itself
                torch.cuda.synchronize(scores.device)
            self.at = time.perf_counter()
        return scores


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
def generate_batch(model, tokenizer, prompts: list[str], cache, max_new_tokens: int,
                   timer: PrefillTimer | None = None) -> tuple[list[str], list[int], int]:
    """Greedy answers to ``prompts`` (left-padded batch) with ``cache`` (``None``: the one a patched
    model builds); returns texts, prompt lengths and the padded prompt width. ``timer`` notes the end of
    the prefill."""
    device = next(model.parameters()).device
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    finally:
        tokenizer.padding_side = old_side
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _eos_ids(model, tokenizer)[0]
    if cache is not None:
        from ..patch import GENERATE_CACHE_KWARG  # "cache" on recent transformers, "past_key_values" on 5.17

        enc[GENERATE_CACHE_KWARG] = cache
    if timer is not None:
        from transformers import LogitsProcessorList

        enc["logits_processor"] = LogitsProcessorList([timer])
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                         temperature=None, top_p=None, top_k=None, eos_token_id=_eos_ids(model, tokenizer),
                         pad_token_id=pad_id)
    width = enc["input_ids"].shape[1]
    texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    lengths = enc["attention_mask"].sum(dim=1).tolist()
    return texts, lengths, width


def run_ruler(model, tokenizer, samples: list[dict], methods: list[MethodSpec], results_dir, *,
              batch_size: int = 1, chat_template: bool | None = None, max_new_tokens: int | None = None,
              progress: bool = True, desc: str = "RULER") -> dict[str, list[dict]]:
    """Evaluate every method on every sample, appending per-sample records to
    ``results_dir/<method>.jsonl``; samples already recorded there are skipped (resume).

    Returns every method's records (old and new), keyed by method label; ``desc`` names the progress bar.
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
    bar = tqdm(total=total, desc=desc, disable=not progress)
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
                    for records in _run_batch_or_split(model, tokenizer, batch, m, handle, chat_template,
                                                       max_new_tokens, bar):
                        files[m.label].append(records)
                        bar.update(len(records))
        finally:
            if handle is not None:
                handle.remove()
    bar.close()
    return {m.label: files[m.label].records() for m in methods}


def _out_of_memory(error: BaseException) -> bool:
    """A device allocation failure (CUDA's ``OutOfMemoryError``, or the same message from another backend)."""
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(error, oom) or (isinstance(error, RuntimeError) and "out of memory" in str(error))


def _run_batch_or_split(model, tokenizer, batch: list[dict], m: MethodSpec, handle, chat_template,
                        max_new_tokens, bar):
    """Yield the records of ``batch``; when the device runs out of memory, free what the failed batch
    held and run its two halves instead (down to one sample, which re-raises), so a long run survives a
    batch that does not fit next to whatever else holds the device. Each record keeps the batch size it
    actually ran with."""
    try:
        records = _run_batch(model, tokenizer, batch, m, handle, chat_template, max_new_tokens)
    except Exception as error:
        if len(batch) == 1 or not _out_of_memory(error):
            raise
        del error  # its traceback holds the failed batch's tensors
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = (len(batch) + 1) // 2
        bar.write(f"{m.label}: out of memory at batch {len(batch)} ({batch[0]['task']}); running {half} + "
                  f"{len(batch) - half}")
        for part in (batch[:half], batch[half:]):
            yield from _run_batch_or_split(model, tokenizer, part, m, handle, chat_template, max_new_tokens, bar)
        return
    yield records


def _run_batch(model, tokenizer, batch: list[dict], m: MethodSpec, handle, chat_template, max_new_tokens) -> list[dict]:
    cache = None if handle is not None else make_cache(m, model)
    new_tokens = min(s["tokens_to_generate"] for s in batch)
    if max_new_tokens is not None:
        new_tokens = min(new_tokens, max_new_tokens)
    prompts = [build_prompt(tokenizer, s, chat_template) for s in batch]
    timer = PrefillTimer()
    t0 = time.perf_counter()
    texts, lengths, _ = generate_batch(model, tokenizer, prompts, cache, new_tokens, timer)
    seconds = time.perf_counter() - t0
    prefill = (timer.at - t0) if timer.at is not None else seconds
    used = handle.last_cache if handle is not None else cache
    nbytes = cache_nbytes(used) / len(batch)
    records = []
    for s, text, n_prompt in zip(batch, texts, lengths):
        records.append(dict(
            id=s["id"], task=s["task"], length=s["length"], index=s["index"], method=m.label,
            tool="kvcompress", prediction=text, answers=s["answers"], metric=s["metric"],
            score=score(text, s["answers"], s["metric"]), cache_bytes=nbytes, prompt_tokens=n_prompt,
            new_tokens=len(tokenizer(text, add_special_tokens=False)["input_ids"]),
            seconds=seconds / len(batch), prefill_seconds=prefill / len(batch), batch_size=len(batch),
        ))
    return records
