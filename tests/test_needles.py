"""The needle sweep: its prompt builder (lengths within budget, needle once, distractors distinct,
deterministic, styles/formats/depths spread), its table, and a run of the runner on a tiny random model.
Tokens are counted with a regex stand-in; one slow test uses SmolLM2's tokenizer."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from benchmarks import needle_sweep as S
from kvcompress.bench.spec import parse_method_specs
from kvcompress.quantized import backend_available
from kvcompress.ruler import needles as N
from kvcompress.ruler import runner
from kvcompress.ruler.generate import hf_token_counter

from conftest import tiny_model
from test_ruler import char_tokenizer


def word_count(text: str) -> int:
    """A stand-in tokenizer: every word, number and punctuation mark is one token."""
    return len(re.findall(r"\w+|[^\w\s]", text))


UNIT = 40  # regex tokens of the largest filler unit (an essay sentence)
LENGTHS = [512, 768, 1024, 1536, 2048]


@pytest.fixture(scope="module")
def sweep():
    return N.sweep_dataset(word_count, 24, LENGTHS, progress=False)


def test_the_sweep_is_deterministic_and_prompt_i_does_not_depend_on_the_count(sweep):
    assert N.sweep_dataset(word_count, 24, LENGTHS, progress=False) == sweep
    assert N.sweep_dataset(word_count, 5, LENGTHS, progress=False) == sweep[:5]
    other = N.sweep_dataset(word_count, 3, LENGTHS, seed=7, progress=False)
    assert [s["id"] for s in other] == [s["id"] for s in sweep[:3]]
    assert all(a["context"] != b["context"] for a, b in zip(other, sweep))
    assert len({s["id"] for s in sweep}) == 24


def test_styles_formats_lengths_and_depths_are_spread(sweep):
    assert Counter(s["style"] for s in sweep) == {"noise": 8, "essay": 8, "distract": 8}
    assert set(Counter(s["format"] for s in sweep)) == set(N.FORMATS)
    assert {s["length"] for s in sweep} == set(LENGTHS)
    for style in N.STYLES:  # each style meets every format and at least four lengths
        mine = [s for s in sweep if s["style"] == style]
        assert {s["format"] for s in mine} == set(N.FORMATS) and len({s["length"] for s in mine}) >= 4
    depths = sorted(s["depth"] for s in sweep)
    assert 0.05 <= depths[0] and depths[-1] <= 0.95
    assert all(sum(lo <= d < lo + 0.1 for d in depths) >= 1 for lo in (0.05 + 0.1 * k for k in range(9)))
    for s in sweep:  # the needle sits at its depth of the filler (characters as a proxy for tokens)
        filler = s["context"][len(N.HEAD):]
        at = filler.index(s["needles"][0]) / len(filler)
        assert abs(at - s["depth"]) < 0.05, (s["id"], at, s["depth"])


def test_lengths_fit_the_budget_to_one_filler_unit(sweep):
    for s in sweep:
        n = word_count(s["context"] + s["question"] + s["answer_prefix"])
        budget = s["length"] - N.TOKENS_TO_GENERATE
        assert n == s["input_tokens"] and budget - UNIT <= n <= budget, (s["id"], n, budget)


def test_the_needle_and_its_value_occur_exactly_once(sweep):
    for s in sweep:
        (needle,), (value,) = s["needles"], s["answers"]
        assert s["context"].count(needle) == 1 and s["context"].count(value) == 1, s["id"]
        assert value in needle and s["key"] in needle and s["key"] in s["question"] + s["answer_prefix"]
        assert value not in s["question"] + s["answer_prefix"]
        if N.FORMATS[s["format"]].value == "number":
            assert re.fullmatch(r"\d{6,7}", value), value
        else:
            assert re.fullmatch(r"[a-z]{7,}", value), value
        # nothing else in the filler looks like an answer: no digits outside the needles
        rest = s["context"].replace(needle, "")
        for d in s["distractors"]:
            rest = rest.replace(d, "")
        assert not re.search(r"\d", rest), s["id"]


def test_distractors_are_distinct_needles_of_the_same_format(sweep):
    for s in sweep:
        if s["style"] != "distract":
            assert s["distractors"] == [] and s["distractor_answers"] == []
            continue
        assert 1 <= len(s["distractors"]) <= 3
        values = s["answers"] + s["distractor_answers"]
        assert all(a == b or (a not in b and b not in a) for a in values for b in values), values
        fmt = N.FORMATS[s["format"]].needle
        pattern = re.escape(fmt).replace(re.escape("{key}"), r"(\S+?)").replace(re.escape("{value}"), r"(\w+)")
        found = re.findall(pattern, s["context"])
        keys = [k for k, _ in found]
        assert len(found) == 1 + len(s["distractors"]) and len(set(keys)) == len(keys), found
        assert sorted(v for _, v in found) == sorted(values)
        for d in s["distractors"]:
            assert s["context"].count(d) == 1 and s["key"] not in d


def test_the_plan_rejects_bad_input():
    with pytest.raises(ValueError, match="prompts must be a positive int"):
        N.plan(0)
    with pytest.raises(ValueError, match="lengths must be a non-empty list of ints >= 256"):
        N.plan(3, [100])
    with pytest.raises(ValueError, match="styles must be a non-empty list from noise, essay, distract"):
        N.plan(3, [1024], ["prose"])
    assert [p.style for p in N.plan(4, [1024], ["essay"])] == ["essay"] * 4


def test_distractor_hits_are_counted_separately():
    sample = {"distractor_answers": ["123456"], "answers": ["7654321"]}
    assert N.distractor_hit("It is 123456.", sample) and not N.distractor_hit("It is 7654321.", sample)


# -- the table ------------------------------------------------------------------------------------------
def _rec(method, sid, score, nbytes, tool="kvcompress", prediction="", prefill=0.5):
    return dict(id=sid, method=method, tool=tool, score=score, cache_bytes=nbytes, prediction=prediction,
                prefill_seconds=prefill)


def test_summary_counts_found_per_style_and_length_and_the_ratio():
    samples = {"a": dict(style="noise", length=2048, distractor_answers=[]),
               "b": dict(style="essay", length=4096, distractor_answers=[]),
               "c": dict(style="distract", length=4096, distractor_answers=["111111"])}
    recs = [_rec("dynamic", "a", 1.0, 100), _rec("dynamic", "b", 1.0, 200), _rec("dynamic", "c", 0.0, 200),
            _rec("quantized", "a", 1.0, 25), _rec("quantized", "b", 0.0, 50),
            _rec("quantized", "c", 0.0, 50, prediction="it is 111111"),
            dict(_rec("kvpress:kvzip:0.5", "a", 0.0, 50, tool="kvpress"), prefill_seconds=None)]
    rows = {r["method"]: r for r in S.summarize(recs, samples)}
    assert rows["dynamic"]["found"] == 2 and rows["dynamic"]["styles"] == {"noise": (1, 1), "essay": (1, 1),
                                                                          "distract": (0, 1)}
    assert rows["quantized"]["lengths"] == {2048: (1, 1), 4096: (0, 2)}
    assert rows["quantized"]["distractor_hits"] == 1 and rows["quantized"]["ratio"] == pytest.approx(0.25)
    assert rows["kvpress:kvzip:0.5"]["ratio"] == pytest.approx(0.5)  # on the one prompt it shares
    assert rows["kvpress:kvzip:0.5"]["prefill_seconds"] is None
    table = S.markdown_table(S.summarize(recs, samples))
    assert "| `quantized` | kvcompress | **1/3** | 1/1 | 0/1 | 0/1 | 1/1 | 0/2 | 1 |" in table
    assert table.splitlines()[2].startswith("| `dynamic` ")


# -- running -------------------------------------------------------------------------------------------
@pytest.mark.skipif(not (backend_available("hqq") or backend_available("quanto")), reason="no quantized backend")
def test_the_runner_runs_the_sweep_and_records_prefill_seconds(tmp_path):
    tokenizer = char_tokenizer()
    model = tiny_model("llama", max_position_embeddings=4096)
    samples = N.sweep_dataset(hf_token_counter(tokenizer), 3, [1024], progress=False)
    backend = "hqq" if backend_available("hqq") else "quanto"
    methods = parse_method_specs(f"dynamic,quantized:backend={backend}:nbits=2:q_group_size=16")
    out = runner.run_ruler(model, tokenizer, samples, methods, tmp_path / "results", max_new_tokens=4,
                           progress=False)
    for recs in out.values():
        assert sorted(r["id"] for r in recs) == sorted(s["id"] for s in samples)
        for r in recs:
            assert 0 < r["prefill_seconds"] <= r["seconds"] and r["cache_bytes"] > 0
    dyn = {r["id"]: r["cache_bytes"] for r in out["dynamic"]}
    quant = {r["id"]: r["cache_bytes"] for r in out[methods[1].label]}
    assert all(quant[i] < 0.5 * dyn[i] for i in dyn)  # 2-bit groups of 16 plus a 128-token fp32 residual
    md = S.write_report(sum(out.values(), []), {s["id"]: s for s in samples}, tmp_path, "t")
    assert f"| `{methods[1].label}` | kvcompress |" in md.read_text()


def test_the_script_refuses_bad_arguments_before_loading(capsys):
    for argv, message in ((["--methods", "quantized:backend=quanto:nbits=3"], "nbits=3 is not supported"),
                          (["--methods", "tpla"], "does not support model_type='llama'"),
                          (["--styles", "prose"], "styles must be"),
                          (["--lengths", "100"], "expected an int >= 256"),
                          (["--report-only", "--out", "/nonexistent"], "no /nonexistent/dataset.jsonl")):
        with pytest.raises(SystemExit) as raised:
            S.main(argv)
        assert raised.value.code == 2 and message in capsys.readouterr().err, argv


@pytest.mark.slow
def test_smollm2_prompts_fit_their_lengths(smollm2):
    _, tokenizer = smollm2
    count = hf_token_counter(tokenizer)
    for s in N.sweep_dataset(count, 6, [2048, 3072], progress=False):
        budget = s["length"] - N.TOKENS_TO_GENERATE
        assert budget - 60 <= count(s["context"] + s["question"] + s["answer_prefix"]) <= budget, s["id"]
