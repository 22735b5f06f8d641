"""A needle sweep: single-needle retrieval prompts of several lengths, filler styles, needle formats and
depths, written as RULER-format samples (so the RULER runner, results files and the peers' adapter run
them unchanged). Standard library only, like ``generate``, whose length fitting it uses.

Filler styles (``STYLES``):

- ``noise``: RULER's five noise sentences repeated ("The grass is green. The sky is blue. ...").
- ``essay``: varied generated sentences (``words.essay_sentence``, RULER's essay substitute).
- ``distract``: the essay filler plus 1 to 3 distractor needles in the same format as the real one, with
  other keys and other values, at other depths.

Needle formats (``FORMATS``): RULER's "One of the special magic numbers for K is: N.", a passcode, a
vault code, and a secret word whose answer is an invented word instead of a number. Numbers have 6 or 7
digits; no value of a prompt is a substring of another one, and fillers hold no digits, so an answer is
found only where the model copied it.

Prompt ``i`` of a sweep has style ``STYLES[i % 3]``; with ``j = i // 3``, format ``FORMATS[j % 4]`` and
length ``lengths[j % len(lengths)]``; its needle depth is ``0.05 + 0.9 * v(i)`` with ``v`` the base-2
van der Corput sequence, so any first N prompts spread over 0.05..0.95. Everything random is drawn from
``random.Random(f"{seed}/needle_{style}/{format}/{length}/{i}")``: prompt ``i`` does not depend on how
many prompts are asked for, and its id ``needle_<style>/<format>/<length>/<i>`` names everything it
depends on but the seed. Lengths are fitted exactly as RULER's: ``tokens(context + question +
answer_prefix) + TOKENS_TO_GENERATE <= length`` with as much filler as fits (to one filler sentence).

A sample is RULER's record (``id, task, length, index, seed, context, question, answer_prefix, answers,
metric, tokens_to_generate, input_tokens, needles, depths``; ``task`` is ``needle_<style>``) plus
``style, format, key, depth, distractors`` (the distractor needles) and ``distractor_answers``. The
metric is ``string_match_all`` with the one answer: found when the needle's value appears in the answer.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

from . import words as W
from .generate import (_KEYS, MIN_LENGTH, NOISE, _SYLLABLES, TokenCounter, _Built, _Essay, _fit, _insert,
                       van_der_corput)

STYLES = ("noise", "essay", "distract")
DEFAULT_LENGTHS = (2048, 3072, 4096, 6144, 8192)
DEFAULT_PROMPTS = 24
TOKENS_TO_GENERATE = 32
HEAD = ("Some special values are hidden within the following text. Make sure to memorize them. "
        "I will quiz you about one of them afterwards.\n")


@dataclass(frozen=True)
class NeedleFormat:
    """How a needle is written and asked for: ``{key}`` and ``{value}`` are filled in; ``value`` is
    ``number`` (6-7 digits) or ``word`` (an invented word)."""

    needle: str
    question: str
    prefix: str
    value: str = "number"


FORMATS: dict[str, NeedleFormat] = {
    "magic": NeedleFormat("One of the special magic numbers for {key} is: {value}.",
                          "What is the special magic number for {key} mentioned in the provided text?",
                          "The special magic number for {key} mentioned in the provided text is"),
    "passcode": NeedleFormat("The passcode of {key} is {value}.",
                             "What is the passcode of {key} mentioned in the provided text?",
                             "The passcode of {key} mentioned in the provided text is"),
    "vault": NeedleFormat("Remember it well: the secret code for the {key} vault is {value}.",
                          "What is the secret code for the {key} vault mentioned in the provided text?",
                          "The secret code for the {key} vault mentioned in the provided text is"),
    "word": NeedleFormat("The secret word of {key} is {value}.",
                         "What is the secret word of {key} mentioned in the provided text?",
                         "The secret word of {key} mentioned in the provided text is", value="word"),
}
_VOCABULARY = frozenset(W.NOUNS) | frozenset(W.ADJECTIVES) | frozenset(W.VERBS)


def _clashes(value: str, taken: set[str]) -> bool:
    return any(value in other or other in value for other in taken)


def _value(rng: random.Random, kind: str, taken: set[str]) -> str:
    """A fresh number (6 or 7 digits) or invented word, neither containing nor contained in any value in
    ``taken`` (which it joins); a word also never occurs inside a filler word."""
    while True:
        if kind == "number":
            digits = rng.choice((6, 7))
            value = str(rng.randint(10 ** (digits - 1), 10**digits - 1))
        else:
            value = "".join(rng.choice(_SYLLABLES) for _ in range(3 + rng.randrange(2)))
            if len(value) < 7 or any(value in w for w in _VOCABULARY):
                continue
        if not _clashes(value, taken):
            taken.add(value)
            return value


@dataclass(frozen=True)
class PromptPlan:
    """What prompt ``index`` of a sweep is: its filler style, needle format, length and needle depth."""

    index: int
    style: str
    format: str
    length: int
    depth: float


def plan(prompts: int = DEFAULT_PROMPTS, lengths: Iterable[int] = DEFAULT_LENGTHS,
         styles: Iterable[str] = STYLES) -> list[PromptPlan]:
    """The sweep's prompts in order (see the module docstring for the rotation)."""
    if isinstance(prompts, bool) or not isinstance(prompts, int) or prompts < 1:
        raise ValueError(f"prompts must be a positive int, got {prompts!r}")
    lengths = list(lengths)
    if not lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < MIN_LENGTH for n in lengths):
        raise ValueError(f"lengths must be a non-empty list of ints >= {MIN_LENGTH} (tokens), got {lengths!r}")
    styles = list(styles)
    unknown = [s for s in styles if s not in STYLES]
    if not styles or unknown:
        raise ValueError(f"styles must be a non-empty list from {', '.join(STYLES)}, got {styles!r}")
    names = list(FORMATS)
    out = []
    for i in range(prompts):
        j = i // len(styles)
        out.append(PromptPlan(i, styles[i % len(styles)], names[j % len(names)], lengths[j % len(lengths)],
                              round(0.05 + 0.9 * van_der_corput(i), 6)))
    return out


def _key(rng: random.Random, taken: set[str]) -> str:
    """A fresh ``adjective-noun`` key that neither contains nor is contained in a key in ``taken``
    ("old-harbor" and "bold-harbor" never meet in one prompt)."""
    while True:
        key = rng.choice(_KEYS)
        if not _clashes(key, taken):
            taken.add(key)
            return key


def _builder(p: PromptPlan, rng: random.Random):
    fmt = FORMATS[p.format]
    taken_keys: set[str] = set()
    taken_values: set[str] = set()
    key = _key(rng, taken_keys)
    value = _value(rng, fmt.value, taken_values)
    needle = fmt.needle.format(key=key, value=value)
    distractors, distractor_values, depths = [], [], [p.depth]
    if p.style == "distract":
        for _ in range(rng.randint(1, 3)):
            other = _value(rng, fmt.value, taken_values)
            distractors.append(fmt.needle.format(key=_key(rng, taken_keys), value=other))
            distractor_values.append(other)
            while True:  # a depth of its own, at least 0.05 away from every needle placed so far
                depth = round(rng.uniform(0.05, 0.95), 4)
                if all(abs(depth - d) >= 0.05 for d in depths):
                    depths.append(depth)
                    break
    essay = _Essay(rng) if p.style != "noise" else None
    question = "\n" + fmt.question.format(key=key)
    prefix = " " + fmt.prefix.format(key=key)
    items = [needle] + distractors

    def build(n: int) -> _Built:
        units = [NOISE[k % len(NOISE)] for k in range(n)] if essay is None else essay.sentences(n)
        haystack = " ".join(_insert(units, items, [round(d * len(units)) for d in depths]))
        return _Built(HEAD + haystack, question, prefix, [value], [needle], [p.depth])

    return build, key, distractors, distractor_values


def needle_sample(p: PromptPlan, count_tokens: TokenCounter, seed: int = 42,
                  hint: int | None = None) -> tuple[dict, int]:
    """The sample of plan ``p`` fitted to ``p.length`` tokens; returns ``(sample, filler_units)``."""
    if p.style not in STYLES or p.format not in FORMATS:
        raise ValueError(f"style must be one of {', '.join(STYLES)} and format one of {', '.join(FORMATS)}; got "
                         f"{p.style!r}, {p.format!r}")
    task = f"needle_{p.style}"
    rng = random.Random(f"{seed}/{task}/{p.format}/{p.length}/{p.index}")
    build, key, distractors, distractor_values = _builder(p, rng)
    units, built, n_tokens = _fit(build, count_tokens, p.length - TOKENS_TO_GENERATE, hint)
    sample = dict(
        id=f"{task}/{p.format}/{p.length}/{p.index}", task=task, length=p.length, index=p.index, seed=seed,
        context=built.context, question=built.question, answer_prefix=built.answer_prefix, answers=built.answers,
        metric="string_match_all", tokens_to_generate=TOKENS_TO_GENERATE, input_tokens=n_tokens,
        needles=built.needles, depths=built.depths, style=p.style, format=p.format, key=key, depth=p.depth,
        distractors=distractors, distractor_answers=distractor_values,
    )
    return sample, units


def sweep_dataset(count_tokens: TokenCounter, prompts: int = DEFAULT_PROMPTS,
                  lengths: Iterable[int] = DEFAULT_LENGTHS, seed: int = 42, styles: Iterable[str] = STYLES,
                  progress: bool = True) -> list[dict]:
    """Every prompt of :func:`plan`, fitted with ``count_tokens`` (e.g. ``generate.hf_token_counter``)."""
    from tqdm.auto import tqdm

    out, hints = [], {}
    for p in tqdm(plan(prompts, lengths, styles), desc="generating needles", disable=not progress):
        sample, hints[(p.style, p.length)] = needle_sample(p, count_tokens, seed, hints.get((p.style, p.length)))
        out.append(sample)
    return out


def distractor_hit(prediction: str, sample: dict) -> bool:
    """True when the answer names a distractor's value (case-insensitive)."""
    text = prediction.lower()
    return any(v.lower() in text for v in sample.get("distractor_answers", []))
