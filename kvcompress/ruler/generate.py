"""RULER's synthetic tasks, generated offline with fixed seeds, written as a JSONL dataset.

The tasks follow the definitions of RULER (Hsieh et al., "RULER: What's the Real Context Size of Your
Long-Context Language Models?", 2024), its templates, needle formats and task parameters:

=================  ==========  ========================================================================
task               haystack    what is asked
=================  ==========  ========================================================================
niah_single_1      repeat      1 key (word) -> 1 value (7-digit number)
niah_single_2      essay       1 key (word) -> 1 number
niah_single_3      essay       1 key (word) -> 1 uuid
niah_multikey_1    essay       4 keys hidden, 1 asked (numbers)
niah_multikey_2    needles     the haystack is made of other needles (word keys, numbers)
niah_multikey_3    needles     the same with uuid keys and uuid values
niah_multivalue    essay       1 key with 4 values, all asked
niah_multiquery    essay       4 keys, all 4 asked
vt                 noise       variable tracking: 1 chain of 4 hops, name every variable of the value
cwe                word list   common words: the 10 words repeated most in a numbered list
fwe                coded text  frequent words: the 3 most frequent coded words (Zipf, alpha 2)
qa_1               documents   single-document question (SQuAD substitute, see below)
qa_2               documents   two-hop question across two documents (HotpotQA substitute)
=================  ==========  ========================================================================

Offline substitutes (documented in docs/benchmarks.md): the "essay" haystack is generated English
(``words.essay_sentence``) instead of Paul Graham's essays; keys and common words come from the
vocabulary in ``words`` instead of ``wonderwords``; QA documents describe invented towns, people and
companies (so the answer cannot come from the model's memory) instead of SQuAD / HotpotQA paragraphs.

Lengths: like RULER, a sample of length ``L`` satisfies ``tokens(input) + tokens_to_generate <= L``
with as much haystack as fits, where ``input = context + question + answer_prefix`` (without the chat
template, which the runner adds). The fit is exact to one haystack unit (a noise sentence, an essay
word, a list entry, a coded word, a distractor needle or a QA document).

Needle depths: single-needle tasks place their needle at depth ``d_i`` for sample ``i``, the base-2
van der Corput sequence (0, 1/2, 1/4, 3/4, 1/8, ...), so any first ``N`` samples are spread evenly
over the context; further needles get random depths from RULER's grid of 40. Everything random is
drawn from ``random.Random(f"{seed}/{task}/{length}/{index}")``: sample ``i`` is the same whatever
the number of samples, and the same on every machine for a given tokenizer.

Each JSONL line holds: ``id, task, length, index, seed, context, question, answer_prefix, answers,
metric, tokens_to_generate, input_tokens, needles, depths``. The model input is
``context + question`` (the user message) and the answer is generated after ``answer_prefix``.
"""

from __future__ import annotations

import json
import random
import string
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from . import words as W

TokenCounter = Callable[[str], int]

NEEDLE = "One of the special magic {kind} for {key} is: {value}."
NOISE = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again."]
MIN_LENGTH = 256  # tokens: the smallest sample length generated (room for a haystack beside the question)
DEPTH_GRID = [round(100 * i / 39) / 100 for i in range(40)]  # RULER's 40 evenly spaced depths


@dataclass(frozen=True)
class TaskSpec:
    """One RULER task: its family, RULER's generation budget and metric, and its parameters."""

    family: str  # niah | vt | cwe | fwe | qa
    tokens_to_generate: int
    metric: str  # string_match_all | string_match_part
    params: dict = field(default_factory=dict)


def _niah(haystack: str, key: str = "words", value: str = "numbers", num_k: int = 1, num_v: int = 1,
          num_q: int = 1) -> TaskSpec:
    return TaskSpec("niah", 128, "string_match_all",
                    dict(haystack=haystack, key=key, value=value, num_k=max(num_k, num_q), num_v=num_v, num_q=num_q))


TASKS: dict[str, TaskSpec] = {
    "niah_single_1": _niah("repeat"),
    "niah_single_2": _niah("essay"),
    "niah_single_3": _niah("essay", value="uuids"),
    "niah_multikey_1": _niah("essay", num_k=4),
    "niah_multikey_2": _niah("needle"),
    "niah_multikey_3": _niah("needle", key="uuids", value="uuids"),
    "niah_multivalue": _niah("essay", num_v=4),
    "niah_multiquery": _niah("essay", num_q=4),
    "vt": TaskSpec("vt", 30, "string_match_all", dict(num_chains=1, num_hops=4)),
    "cwe": TaskSpec("cwe", 120, "string_match_all", dict(num_cw=10)),
    "fwe": TaskSpec("fwe", 50, "string_match_all", dict(alpha=2.0, coded_wordlen=6)),
    "qa_1": TaskSpec("qa", 32, "string_match_part", dict(hops=1)),
    "qa_2": TaskSpec("qa", 32, "string_match_part", dict(hops=2)),
}


def parse_tasks(spec: str | Iterable[str] | None) -> list[str]:
    """``"all"``/None -> every task; ``"niah"`` -> every niah task; else a comma list of task names."""
    if spec is None:
        return list(TASKS)
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    out: list[str] = []
    for name in names:
        if name == "all":
            matched = list(TASKS)
        elif name in TASKS:
            matched = [name]
        else:
            matched = [t for t in TASKS if t.startswith(name + "_")]
            if not matched:
                raise ValueError(f"tasks: unknown task {name!r}; allowed: all, niah, qa, {', '.join(TASKS)}")
        out.extend(m for m in matched if m not in out)
    if not out:
        raise ValueError(f"tasks must name at least one task; allowed: all, {', '.join(TASKS)}")
    return out


def van_der_corput(i: int) -> float:
    """The ``i``-th point of the base-2 van der Corput sequence in [0, 1): 0, .5, .25, .75, .125, ..."""
    out, denom = 0.0, 1.0
    while i:
        denom *= 2
        i, bit = divmod(i, 2)
        out += bit / denom
    return out


def hf_token_counter(tokenizer) -> TokenCounter:
    """Count tokens with a Hugging Face tokenizer, without special tokens."""
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


# -- random values ----------------------------------------------------------------------------------
def _number(rng: random.Random) -> str:
    return str(rng.randint(10**6, 10**7 - 1))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


_KEYS = W.key_words()


def _draw(rng: random.Random, kind: str, taken: set[str]) -> str:
    """A fresh random word key / number / uuid not in ``taken`` (which it joins)."""
    while True:
        value = {"words": lambda: rng.choice(_KEYS), "numbers": lambda: _number(rng), "uuids": lambda: _uuid(rng)}[kind]()
        if value not in taken:
            taken.add(value)
            return value


class _Essay:
    """A seeded endless essay; ``take(n)`` is always a prefix of ``take(n + 1)``."""

    def __init__(self, rng: random.Random):
        self.rng, self.words = rng, []

    def take(self, n: int) -> list[str]:
        if len(self.words) < n:
            self.words.extend(W.essay_words(self.rng, n - len(self.words) + 200))
        return self.words[:n]

    def sentences(self, n: int) -> list[str]:
        """The first ``n`` words cut at sentence boundaries (the last one closed with a full stop)."""
        text = " ".join(self.take(n))
        units = [s + "." for s in text.split(". ") if s]
        units[-1] = units[-1].rstrip(".") + "." if units else ""
        return units


def _insert(units: list[str], items: list[str], positions: list[int]) -> list[str]:
    """Insert ``items[j]`` before unit ``positions[j]`` (positions in the original list, any order)."""
    out = list(units)
    for pos, item in sorted(zip(positions, items), key=lambda p: p[0], reverse=True):
        out.insert(pos, item)
    return out


@dataclass
class _Built:
    context: str
    question: str
    answer_prefix: str
    answers: list[str]
    needles: list[str]
    depths: list[float] | None = None


# -- NIAH -------------------------------------------------------------------------------------------
def _niah_builder(spec: TaskSpec, rng: random.Random, first_depth: float) -> Callable[[int], _Built]:
    p = spec.params
    kind = p["value"]
    taken: set[str] = set()
    keys = [_draw(rng, p["key"], taken) for _ in range(p["num_k"])]
    values = [[_draw(rng, kind, taken) for _ in range(p["num_v"])] for _ in keys]
    needles = [NEEDLE.format(kind=kind, key=k, value=v) for k, vs in zip(keys, values) for v in vs]
    rng.shuffle(needles)
    depths = [first_depth] + [rng.choice(DEPTH_GRID) for _ in needles[1:]]
    queried = rng.sample(range(len(keys)), p["num_q"])
    answers = [v for i in queried for v in values[i]]
    query_keys = [keys[i] for i in queried]
    query = query_keys[0] if len(query_keys) == 1 else ", ".join(query_keys[:-1]) + ", and " + query_keys[-1]
    single = p["num_q"] * p["num_v"] == 1
    noun = kind[:-1] if single else kind
    if single:
        head = (f"A special magic {noun} is hidden within the following text. Make sure to memorize it. "
                f"I will quiz you about the {noun} afterwards.\n")
        question = f"\nWhat is the special magic {noun} for {query} mentioned in the provided text?"
        prefix = f" The special magic {noun} for {query} mentioned in the provided text is"
    else:
        head = (f"Some special magic {noun} are hidden within the following text. Make sure to memorize it. "
                f"I will quiz you about the {noun} afterwards.\n")
        question = f"\nWhat are all the special magic {noun} for {query} mentioned in the provided text?"
        prefix = f" The special magic {noun} for {query} mentioned in the provided text are"
    essay = _Essay(rng) if p["haystack"] == "essay" else None
    distractor_rng_seed = rng.getrandbits(64)
    distractors: list[str] = []

    def build(n: int) -> _Built:
        if p["haystack"] == "repeat":
            units = [NOISE[j % len(NOISE)] for j in range(n)]
            sep = " "
        elif p["haystack"] == "essay":
            units = essay.sentences(n)
            sep = " "
        else:  # needle: distractor needles with fresh keys and values (never the real ones)
            drng = random.Random(distractor_rng_seed + len(distractors))
            while len(distractors) < n:
                distractors.append(NEEDLE.format(kind=kind, key=_draw(drng, p["key"], taken),
                                                 value=_draw(drng, kind, taken)))
            units = distractors[:n]
            sep = "\n"
        positions = [round(d * len(units)) for d in depths]
        haystack = sep.join(_insert(units, needles, positions))
        return _Built(head + haystack, question, prefix, answers, list(needles), depths)

    return build


# -- variable tracking --------------------------------------------------------------------------------
def _chain(rng: random.Random, hops: int, name_len: int, taken: set[str]) -> tuple[list[str], list[str], str]:
    names = []
    while len(names) < hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=name_len))
        if name not in taken:
            taken.add(name)
            names.append(name)
    value = str(rng.randint(10000, 99999))
    lines = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]}" for j in range(hops)]
    return names, lines, value


def _noise_with(rng_positions: random.Random, n: int, lines: list[str]) -> str:
    units = [NOISE[j % len(NOISE)] for j in range(max(n, len(lines)))]
    positions = sorted(rng_positions.sample(range(len(units) + 1), len(lines)))
    return " ".join(_insert(units, lines, positions))


def _vt_builder(spec: TaskSpec, rng: random.Random, first_depth: float) -> Callable[[int], _Built]:
    hops = spec.params["num_hops"]
    taken: set[str] = set()
    example_names, example_lines, example_value = _chain(rng, hops, 3, taken)
    names, lines, value = _chain(rng, hops, 5, taken)
    example_seed, position_seed = rng.getrandbits(64), rng.getrandbits(64)
    head = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    ask = "\nQuestion: Find all variables that are assigned the value {v} in the text above."
    prefix = (" Answer: According to the chain(s) of variable assignment in the text above, {n} variables are "
              "assigned the value {v}, they are:")
    # one worked example first, as RULER does, with its own short chain
    example = (head + _noise_with(random.Random(example_seed), 20, example_lines) + ask.format(v=example_value)
               + prefix.format(n=hops + 1, v=example_value) + " " + " ".join(example_names) + "\n\n")

    def build(n: int) -> _Built:
        context = example + head + _noise_with(random.Random(position_seed), n, lines)
        return _Built(context, ask.format(v=value), prefix.format(n=hops + 1, v=value), list(names), list(lines))

    return build


# -- common words extraction -------------------------------------------------------------------------
_CWE_VOCAB = W.common_words_vocabulary()


def _numbered(word_list: list[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(word_list))


def _cwe_builder(spec: TaskSpec, rng: random.Random, first_depth: float, length: int) -> Callable[[int], _Built]:
    num_cw = spec.params["num_cw"]
    # RULER's repetition counts: below 4k tokens common words appear 6 times and others once
    (freq_cw, freq_ucw), (ex_cw, ex_ucw, ex_words) = ((30, 3), (10, 3, 40)) if length >= 4096 else ((6, 1), (3, 1, 20))
    order = rng.sample(_CWE_VOCAB, len(_CWE_VOCAB))
    example_words = rng.sample(_CWE_VOCAB, ex_words)
    example_list = example_words[:num_cw] * ex_cw + example_words[num_cw:] * ex_ucw
    rng.shuffle(example_list)
    shuffle_seed = rng.getrandbits(64)
    head = ("Below is a numbered list of words. In these words, some appear more often than others. "
            "Memorize the ones that appear most often.\n")
    question = f"\nQuestion: What are the {num_cw} most common words in the above list?"
    prefix = f" Answer: The top {num_cw} words that appear most often in the list are:"
    example = (head + _numbered(example_list) + question + prefix + " "
               + _numbered(example_words[:num_cw]) + "\n\n")
    max_units = len(order) - num_cw

    def build(n: int) -> _Built:
        n = min(n, max_units)  # the vocabulary caps the list, as RULER's does
        common, uncommon = order[:num_cw], order[num_cw : num_cw + n]
        word_list = common * freq_cw + uncommon * freq_ucw
        random.Random(shuffle_seed).shuffle(word_list)
        return _Built(example + head + _numbered(word_list), question, prefix, list(common), [])

    build.max_units = max_units  # type: ignore[attr-defined]
    return build


# -- frequent words extraction ----------------------------------------------------------------------
def _fwe_builder(spec: TaskSpec, rng: random.Random, first_depth: float, length: int) -> Callable[[int], _Built]:
    from scipy.special import zeta

    alpha, wordlen = spec.params["alpha"], spec.params["coded_wordlen"]
    vocab_size = max(length // 50, 20)
    vocab: list[str] = []
    seen: set[str] = set()
    while len(vocab) < vocab_size:
        w = "".join(rng.choices(string.ascii_lowercase, k=wordlen))
        if w not in seen:
            seen.add(w)
            vocab.append(w)
    vocab[0] = "...."  # RULER treats the most frequent "word" as noise the model is told to ignore
    shuffle_seed = rng.getrandbits(64)
    head = ("Read the following coded text and track the frequency of each coded word. Find the three most "
            "frequently appeared coded words. ")
    question = ("\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three "
                "most frequently appeared words in the above coded text?")
    prefix = " Answer: According to the coded text above, the three most frequently appeared words are:"

    def build(n: int) -> _Built:
        counts = [int(n * k ** -alpha / zeta(alpha)) for k in range(1, vocab_size + 1)]
        text = [w for w, c in zip(vocab, counts) for _ in range(c)]
        random.Random(shuffle_seed).shuffle(text)
        return _Built(head + " ".join(text), question, prefix, vocab[1:4], [])

    return build


# -- QA substitutes ------------------------------------------------------------------------------------
_SYLLABLES = ("ka ri mo ten vel dor ash lin bru sa fe nor tal mi qua zen or el ba ru ko vin gar thi pe lo "
              "dra mer wyn cas tor ul fen").split()


def _name(rng: random.Random, taken: set[str], parts: int = 2) -> str:
    while True:
        name = "".join(rng.choice(_SYLLABLES) for _ in range(parts + rng.randrange(2))).capitalize()
        if name not in taken:
            taken.add(name)
            return name


def _town_doc(rng: random.Random, taken: set[str]) -> tuple[str, dict]:
    town, region, founder = _name(rng, taken), _name(rng, taken), f"{_name(rng, taken)} {_name(rng, taken)}"
    river, year, trade = _name(rng, taken), str(rng.randint(1100, 1950)), rng.choice(W.NOUNS)
    product = f"{rng.choice(W.ADJECTIVES)} {rng.choice(W.NOUNS)}s"
    facts = dict(town=town, region=region, founder=founder, river=river, year=year, product=product)
    text = (f"{town} is a town in the {rng.choice(['north', 'south', 'east', 'west'])} of {region}. It was founded in "
            f"{year} by {founder}, who arrived there as {W.article(trade)} {trade} trader. The river {river} runs "
            f"through its centre, and the town is best known for its {product}. {W.essay_sentence(rng)}")
    return text, facts


def _company_doc(rng: random.Random, taken: set[str], founder: str | None = None) -> tuple[str, dict]:
    company = f"{_name(rng, taken)} {rng.choice(['Works', 'Company', 'Foundry', 'Press', 'Guild', 'Mills'])}"
    founder = founder or f"{_name(rng, taken)} {_name(rng, taken)}"
    text = (f"The {company} was founded by {founder} and makes {rng.choice(W.ADJECTIVES)} {rng.choice(W.NOUNS)}s. "
            f"{W.essay_sentence(rng)} {W.essay_sentence(rng)}")
    return text, dict(company=company, founder=founder)


def _person_doc(rng: random.Random, taken: set[str], person: str, town: str) -> str:
    return (f"{person} was born in {town} and worked for many years as a maker of {rng.choice(W.NOUNS)}s. "
            f"{W.essay_sentence(rng)} {W.essay_sentence(rng)}")


def _qa_builder(spec: TaskSpec, rng: random.Random, first_depth: float) -> Callable[[int], _Built]:
    hops = spec.params["hops"]
    taken: set[str] = set()
    if hops == 1:
        gold_text, facts = _town_doc(rng, taken)
        which = rng.choice(["founder", "year", "river", "product", "region"])
        query = {
            "founder": f"Who founded {facts['town']}?",
            "year": f"In which year was {facts['town']} founded?",
            "river": f"Which river runs through {facts['town']}?",
            "product": f"What is {facts['town']} best known for?",
            "region": f"In which region is {facts['town']}?",
        }[which]
        gold, answers = [gold_text], [facts[which]]
    else:
        person, town = f"{_name(rng, taken)} {_name(rng, taken)}", _name(rng, taken)
        company_text, facts = _company_doc(rng, taken, founder=person)
        gold = [company_text, _person_doc(rng, taken, person, town)]
        query = f"In which town was the founder of the {facts['company']} born?"
        answers = [town]
    depths = [first_depth] + [rng.choice(DEPTH_GRID) for _ in gold[1:]]
    distractor_seed = rng.getrandbits(64)
    distractors: list[str] = []
    head = ("Answer the question based on the given documents. Only give me the answer and do not output any "
            "other words.\n\nThe following are given documents.\n\n")
    question = ("\n\nAnswer the question based on the given documents. Only give me the answer and do not output "
                f"any other words.\n\nQuestion: {query}")

    def build(n: int) -> _Built:
        drng = random.Random(distractor_seed + len(distractors))
        while len(distractors) < n:  # other towns, companies and people (never the gold names)
            choice = drng.randrange(3)
            if choice == 0:
                distractors.append(_town_doc(drng, taken)[0])
            elif choice == 1:
                distractors.append(_company_doc(drng, taken)[0])
            else:
                distractors.append(_person_doc(drng, taken, f"{_name(drng, taken)} {_name(drng, taken)}",
                                               _name(drng, taken)))
        docs = _insert(distractors[:n], gold, [round(d * n) for d in depths])
        body = "\n\n".join(f"Document {i + 1}:\n{d}" for i, d in enumerate(docs))
        return _Built(head + body, question, " Answer:", answers, list(gold), depths)

    return build


# -- fitting the length and writing the dataset --------------------------------------------------------
def _fit(build: Callable[[int], _Built], count: TokenCounter, budget: int, hint: int | None) -> tuple[int, _Built, int]:
    """Largest haystack size ``n >= 1`` whose input fits ``budget`` tokens (binary search from a hint)."""

    def tokens(n: int) -> tuple[_Built, int]:
        built = build(n)
        return built, count(built.context + built.question + built.answer_prefix)

    cap = getattr(build, "max_units", None)
    lo, hi = 1, max(2, hint or 64)
    built_lo, tok_lo = tokens(lo)
    if tok_lo > budget:
        raise ValueError(f"length is too small: even a 1-unit haystack takes {tok_lo} tokens > {budget}")
    if hint:  # start close to the previous sample's size
        lo_try = max(1, int(hint * 0.9))
        b, t = tokens(lo_try)
        if t <= budget:
            lo, built_lo, tok_lo = lo_try, b, t
    while True:  # grow hi until it no longer fits (or the cap is reached)
        if cap is not None and hi >= cap:
            b, t = tokens(cap)
            if t <= budget:
                return cap, b, t
            hi = cap
            break
        b, t = tokens(hi)
        if t > budget:
            break
        lo, built_lo, tok_lo, hi = hi, b, t, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        b, t = tokens(mid)
        if t <= budget:
            lo, built_lo, tok_lo = mid, b, t
        else:
            hi = mid
    return lo, built_lo, tok_lo


def generate_sample(task: str, length: int, index: int, count_tokens: TokenCounter, seed: int = 42,
                    hint: int | None = None) -> tuple[dict, int]:
    """One sample of ``task`` at ``length`` tokens; returns ``(sample, haystack_units)``."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}; got {task!r}")
    spec = TASKS[task]
    rng = random.Random(f"{seed}/{task}/{length}/{index}")
    depth = van_der_corput(index)
    if spec.family == "niah":
        build = _niah_builder(spec, rng, depth)
    elif spec.family == "vt":
        build = _vt_builder(spec, rng, depth)
    elif spec.family == "cwe":
        build = _cwe_builder(spec, rng, depth, length)
    elif spec.family == "fwe":
        build = _fwe_builder(spec, rng, depth, length)
    else:
        build = _qa_builder(spec, rng, depth)
    budget = length - spec.tokens_to_generate
    units, built, n_tokens = _fit(build, count_tokens, budget, hint)
    sample = dict(
        id=f"{task}/{length}/{index}", task=task, length=length, index=index, seed=seed,
        context=built.context, question=built.question, answer_prefix=built.answer_prefix,
        answers=built.answers, metric=spec.metric, tokens_to_generate=spec.tokens_to_generate,
        input_tokens=n_tokens, needles=built.needles, depths=built.depths,
    )
    return sample, units


def generate_dataset(count_tokens: TokenCounter, tasks: Iterable[str] | str | None = None,
                     lengths: Iterable[int] = (4096,), samples: int = 20, seed: int = 42,
                     progress: bool = True) -> list[dict]:
    """Every (task, length, index) sample, in that order; see the module docstring for the format."""
    from tqdm.auto import tqdm

    task_names = parse_tasks(tasks)
    lengths = list(lengths)
    for length in lengths:
        if isinstance(length, bool) or not isinstance(length, int) or length < MIN_LENGTH:
            raise ValueError(f"lengths must be ints >= {MIN_LENGTH} (tokens), got {length!r}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    out = []
    bar = tqdm(total=len(task_names) * len(lengths) * samples, desc="generating RULER", disable=not progress)
    for task in task_names:
        for length in lengths:
            hint = None
            for index in range(samples):
                sample, hint = generate_sample(task, length, index, count_tokens, seed, hint)
                out.append(sample)
                bar.update()
    bar.close()
    return out


def write_jsonl(rows: Iterable[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)  # never leave a half-written dataset behind
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


def model_input(sample: dict) -> str:
    """The user message of a sample (what goes inside the chat template)."""
    return sample["context"] + sample["question"]


def build_prompt(tokenizer, sample: dict, chat_template: bool | None = None) -> str:
    """The text fed to the model: the user message in the chat template (``None``: when the tokenizer
    has one), then the answer prefix, as RULER does for chat models."""
    use_template = bool(getattr(tokenizer, "chat_template", None)) if chat_template is None else chat_template
    if use_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": model_input(sample)}], tokenize=False,
                                             add_generation_prompt=True)
        return text + sample["answer_prefix"].lstrip()
    return model_input(sample) + sample["answer_prefix"]
