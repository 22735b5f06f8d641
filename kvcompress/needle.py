"""A small needle-in-a-haystack prompt builder (RULER's "niah_single_1" shape), used by the demo, the
integration tests and the xKV measurements.

The haystack is RULER's repeated noise sentences; the needle is "One of the special magic numbers for
{key} is: {number}." placed at a relative ``depth`` of the context, and the question asks for the number.
The full RULER generator with all its tasks is ``kvcompress.ruler``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
KEYS = ["amber-falcon", "silent-river", "copper-lantern", "velvet-meadow", "hollow-summit", "crimson-harbor",
        "frozen-orchard", "golden-thistle", "quiet-canyon", "scarlet-willow", "misty-beacon", "iron-garden"]


@dataclass
class NeedlePrompt:
    messages: list[dict]
    answer: str
    depth: float
    key: str


def needle_prompt(tokenizer, context_tokens: int, depth: float, seed: int = 0) -> NeedlePrompt:
    """A chat prompt of about ``context_tokens`` tokens of haystack with one needle at ``depth`` in [0, 1]."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(seed)
    key = KEYS[seed % len(KEYS)]
    number = str(rng.randint(1_000_000, 9_999_999))
    needle = f" One of the special magic numbers for {key} is: {number}. "
    noise_tokens = len(tokenizer.encode(NOISE, add_special_tokens=False))
    repeats = max(1, (context_tokens - 60) // noise_tokens)
    sentences = [NOISE] * repeats
    sentences.insert(int(round(depth * repeats)), needle)
    context = "".join(sentences)
    question = f"What is the special magic number for {key} mentioned in the provided text?"
    content = (
        "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
        f"I will quiz you about the numbers afterwards.\n{context}\n{question} Answer with the number only."
    )
    return NeedlePrompt([{"role": "user", "content": content}], number, depth, key)


def encode_chat(tokenizer, messages: list[dict]):
    """Token ids and attention mask of a chat prompt with the generation prompt appended."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)
