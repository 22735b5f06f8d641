"""Offline RULER: generator (deterministic, exact lengths, needles once, answers recoverable), RULER's
scoring on hand-written cases, method parsing, the runner (records, resume after an interrupt) and the
report. Tokens are counted with a tiny regex tokenizer (or a character tokenizer for the tiny model);
one slow test uses SmolLM2's real tokenizer and model."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import torch

from kvcompress.bench.spec import MethodSpec, install_method_needed, parse_method_specs
from kvcompress.ruler import generate as G
from kvcompress.ruler import report, runner
from kvcompress.ruler.results import ResultsFile, method_slug
from kvcompress.ruler.scoring import score, string_match_all, string_match_part
from conftest import tiny_model


def word_count(text: str) -> int:
    """A stand-in tokenizer: every word, number and punctuation mark is one token."""
    return len(re.findall(r"\w+|[^\w\s]", text))


# the largest haystack unit of each family, in regex tokens (a noise sentence, a needle, a document ...)
TOLERANCE = {"niah": 40, "vt": 6, "cwe": 6, "fwe": 8, "qa": 120}


@pytest.fixture(scope="module")
def dataset():
    return G.generate_dataset(word_count, "all", [1024, 2048], samples=4, progress=False)


def test_generator_is_deterministic_and_seeded(dataset):
    again = G.generate_dataset(word_count, "all", [1024, 2048], samples=4, progress=False)
    assert again == dataset
    other = G.generate_dataset(word_count, "niah_single_1", [1024], samples=1, seed=7, progress=False)
    assert other[0]["context"] != dataset[0]["context"]
    # sample i does not depend on how many samples are asked for
    one = G.generate_dataset(word_count, "vt", [1024], samples=2, progress=False)
    assert one[1] == next(s for s in dataset if s["id"] == "vt/1024/1")


def test_every_task_and_length_is_present(dataset):
    assert {(s["task"], s["length"]) for s in dataset} == {(t, n) for t in G.TASKS for n in (1024, 2048)}
    assert len({s["id"] for s in dataset}) == len(dataset)


def test_lengths_fit_the_budget_to_one_haystack_unit(dataset):
    for s in dataset:
        spec = G.TASKS[s["task"]]
        n = word_count(s["context"] + s["question"] + s["answer_prefix"])
        assert n == s["input_tokens"]
        budget = s["length"] - spec.tokens_to_generate
        assert budget - TOLERANCE[spec.family] <= n <= budget, (s["id"], n, budget)


def test_needles_occur_exactly_once_and_answers_are_in_the_context(dataset):
    for s in dataset:
        for needle in s["needles"]:
            assert s["context"].count(needle) == 1, (s["id"], needle)
        for answer in s["answers"]:
            assert answer in s["context"], (s["id"], answer)
        if s["task"].startswith("niah"):
            for answer in s["answers"]:  # values are unique: no distractor repeats them
                assert s["context"].count(answer) == 1, (s["id"], answer)


def test_niah_answers_recoverable_from_the_context(dataset):
    for s in (s for s in dataset if s["task"].startswith("niah")):
        pairs = re.findall(r"One of the special magic \w+ for (\S+) is: (\S+)\.", s["context"])
        keys = re.search(r"magic \w+ for (.+) mentioned", s["question"]).group(1)
        queried = re.split(r", and |, ", keys)
        found = [v for q in queried for k, v in pairs if k == q]
        assert sorted(found) == sorted(s["answers"]), s["id"]


def test_vt_chain_recoverable(dataset):
    for s in (s for s in dataset if s["task"] == "vt"):
        value = re.search(r"assigned the value (\d+)", s["question"]).group(1)
        main = s["context"].rsplit("Memorize and track", 1)[1]  # after the worked example
        assign = dict((a, b) for a, b in re.findall(r"VAR (\w+) = (?:VAR )?(\w+)", main))
        names, frontier = set(), {value}
        while frontier:
            new = {a for a, b in assign.items() if b in frontier and a not in names}
            names |= new
            frontier = new
        assert names == set(s["answers"]) and len(names) == 5, s["id"]


def test_cwe_and_fwe_answers_are_the_most_frequent(dataset):
    for s in (s for s in dataset if s["task"] == "cwe"):
        listing = s["context"].rsplit("most often.\n", 1)[1]
        counts = Counter(re.findall(r"\d+\. (\w+)", listing)).most_common()
        top = {w for w, _ in counts[:10]}
        assert top == set(s["answers"]) and counts[9][1] > counts[10][1], s["id"]
    for s in (s for s in dataset if s["task"] == "fwe"):
        text = s["context"].split("coded words. ", 1)[1]
        counts = Counter(w for w in text.split() if w != "....").most_common()
        assert [w for w, _ in counts[:3]] == s["answers"] and counts[2][1] > counts[3][1], s["id"]


def test_qa_answer_in_the_gold_documents(dataset):
    for s in (s for s in dataset if s["task"].startswith("qa")):
        assert any(a in doc for a in s["answers"] for doc in s["needles"]), s["id"]
        hops = G.TASKS[s["task"]].params["hops"]
        assert len(s["needles"]) == hops


def test_single_needle_depths_are_spread_evenly():
    assert [G.van_der_corput(i) for i in range(5)] == [0.0, 0.5, 0.25, 0.75, 0.125]
    ds = G.generate_dataset(word_count, "niah_single_1", [2048], samples=8, progress=False)
    for s in ds:
        needle = s["needles"][0]
        hay = s["context"].split("\n", 1)[1]
        where = hay.index(needle) / len(hay)
        assert abs(where - s["depths"][0]) < 0.03, (s["id"], where, s["depths"])
    assert sorted(s["depths"][0] for s in ds) == [i / 8 for i in range(8)]


def test_generator_rejects_bad_input():
    with pytest.raises(ValueError, match="tasks"):
        G.parse_tasks("niah_single_9")
    with pytest.raises(ValueError, match="lengths"):
        G.generate_dataset(word_count, "vt", [100], samples=1, progress=False)
    with pytest.raises(ValueError, match="samples"):
        G.generate_dataset(word_count, "vt", [1024], samples=0, progress=False)
    assert G.parse_tasks("niah,vt") == [t for t in G.TASKS if t.startswith("niah")] + ["vt"]


# -- scoring: RULER's definitions on hand-written cases ------------------------------------------------
def test_string_match_all():
    assert string_match_all("The numbers are 123 and 456.", ["123", "456"]) == 1.0
    assert string_match_all("only 123", ["123", "456", "789", "000"]) == 0.25
    assert string_match_all("APPLE, pear", ["apple", "Pear", "plum"]) == pytest.approx(2 / 3)  # case-insensitive
    assert string_match_all("  \x00 nothing\t", ["x"]) == 0.0


def test_string_match_part():
    assert string_match_part("It was Doran Fell.", ["Doran Fell", "Fell"]) == 1.0
    assert string_match_part("it was doran", ["Doran Fell", "Dorian"]) == 0.0
    assert string_match_part("the answer: PARIS", ["paris", "France"]) == 1.0
    assert score("x", ["x"], "string_match_all") == 1.0
    with pytest.raises(ValueError, match="metric"):
        score("x", ["x"], "exact_match")
    with pytest.raises(ValueError, match="answers"):
        string_match_all("x", [])


# -- methods -----------------------------------------------------------------------------------------
def test_parse_methods():
    ms = parse_method_specs("dynamic, xkv:rank_k=0.25:rank_v=8:group_size=None:pre_rope=false")
    assert ms[0] == MethodSpec("dynamic", "dynamic", {})
    assert ms[1].params == {"rank_k": 0.25, "rank_v": 8, "group_size": None, "pre_rope": False}
    with pytest.raises(ValueError, match="param=value"):
        parse_method_specs("xkv:rank_k")
    with pytest.raises(ValueError, match="once"):
        parse_method_specs("dynamic,dynamic")
    with pytest.raises(ValueError, match="at least one"):
        parse_method_specs(" , ")
    assert method_slug("xkv:rank_k=0.25:rank_v=0.375") == "xkv_rank_k-0.25_rank_v-0.375"


# -- runner on a tiny random model -----------------------------------------------------------------------
def char_tokenizer():
    """A character-level fast tokenizer built in memory (ASCII + 4 specials, fits the tiny vocab of 160)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + [chr(c) for c in range(32, 127)] + ["\n"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def tiny():
    tokenizer = char_tokenizer()
    model = tiny_model("llama", max_position_embeddings=4096)
    samples = G.generate_dataset(G.hf_token_counter(tokenizer), "niah_single_1,qa_1", [1024], samples=2,
                                 progress=False)
    return model, tokenizer, samples


METHODS = "dynamic,xkv:rank_k=0.25:rank_v=0.375:window=16"


def test_runner_records_every_sample(tiny, tmp_path):
    model, tokenizer, samples = tiny
    out = runner.run_ruler(model, tokenizer, samples, parse_method_specs(METHODS), tmp_path, batch_size=2,
                           max_new_tokens=4, progress=False)
    assert set(out) == {"dynamic", "xkv:rank_k=0.25:rank_v=0.375:window=16"}
    for recs in out.values():
        assert sorted(r["id"] for r in recs) == sorted(s["id"] for s in samples)
        for r in recs:
            assert 0.0 <= r["score"] <= 1.0 and r["cache_bytes"] > 0 and r["prompt_tokens"] > 800
    dyn = {r["id"]: r["cache_bytes"] for r in out["dynamic"]}
    xkv = {r["id"]: r["cache_bytes"] for r in out["xkv:rank_k=0.25:rank_v=0.375:window=16"]}
    assert all(xkv[i] < 0.6 * dyn[i] for i in dyn)  # the compressed cache is really smaller
    # dynamic's bytes are the full K/V of prompt + generated tokens (layers x K,V x heads x dim x fp32)
    cfg = model.config
    per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    r = out["dynamic"][0]
    assert r["cache_bytes"] % per_token == 0 and r["cache_bytes"] // per_token >= r["prompt_tokens"]


def test_runner_resumes_after_interrupt(tiny, tmp_path, monkeypatch):
    model, tokenizer, samples = tiny
    methods = parse_method_specs(METHODS)
    calls = []
    real = runner.generate_batch

    def interrupt_on_third(*args, **kwargs):
        calls.append(len(args[2]))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "generate_batch", interrupt_on_third)
    with pytest.raises(KeyboardInterrupt):
        runner.run_ruler(model, tokenizer, samples, methods, tmp_path, max_new_tokens=3, progress=False)
    done = {m.label: ResultsFile(tmp_path, m.label).done_ids() for m in methods}
    assert sum(len(v) for v in done.values()) == 2  # two samples finished before the interrupt
    # a line cut short by a kill is ignored and its sample redone
    with ResultsFile(tmp_path, "dynamic").path.open("a") as f:
        f.write('{"id": "niah_single_1/1024/1", "method": "dyn')
    calls.clear()
    monkeypatch.setattr(runner, "generate_batch", lambda *a, **k: (calls.append(len(a[2])), real(*a, **k))[1])
    out = runner.run_ruler(model, tokenizer, samples, methods, tmp_path, max_new_tokens=3, progress=False)
    assert sum(calls) == 2 * len(samples) - 2  # only the unfinished samples ran
    for recs in out.values():
        assert sorted(r["id"] for r in recs) == sorted(s["id"] for s in samples)


def test_runner_splits_a_batch_that_runs_out_of_memory(tiny, tmp_path, monkeypatch):
    model, tokenizer, samples = tiny
    methods = parse_method_specs("dynamic")
    single = runner.run_ruler(model, tokenizer, samples, methods, tmp_path / "one", max_new_tokens=3,
                              progress=False)["dynamic"]
    real = runner.generate_batch
    sizes = []

    def fits_one(*args, **kwargs):  # a device that holds one prompt at a time
        sizes.append(len(args[2]))
        if len(args[2]) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 22.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "generate_batch", fits_one)
    split = runner.run_ruler(model, tokenizer, samples, methods, tmp_path / "split", batch_size=2,
                             max_new_tokens=3, progress=False)["dynamic"]
    assert sizes.count(2) == 2 and sizes.count(1) == len(samples)  # each failed pair ran again in halves
    assert sorted(r["id"] for r in split) == sorted(s["id"] for s in samples)
    assert all(r["batch_size"] == 1 for r in split)
    # the halves are the batch-of-one runs: the same answers and bytes
    assert {r["id"]: (r["prediction"], r["cache_bytes"]) for r in split} == \
        {r["id"]: (r["prediction"], r["cache_bytes"]) for r in single}

    def always(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(runner, "generate_batch", always)  # one sample that does not fit: the error stands
    with pytest.raises(torch.OutOfMemoryError):
        runner.run_ruler(model, tokenizer, samples, methods, tmp_path / "none", batch_size=2, max_new_tokens=3,
                         progress=False)

    def broken(*args, **kwargs):
        raise ValueError("not a memory error")

    monkeypatch.setattr(runner, "generate_batch", broken)  # any other error is not retried
    with pytest.raises(ValueError, match="not a memory error"):
        runner.run_ruler(model, tokenizer, samples, methods, tmp_path / "bad", batch_size=2, max_new_tokens=3,
                         progress=False)


def test_transmla_eval_runs_ruler_on_the_source_and_a_converted_model(tiny, tmp_path):
    import argparse

    from benchmarks import transmla_eval as E
    from kvcompress.transmla import convert_gqa_to_mla

    model, tokenizer, samples = tiny
    args = argparse.Namespace(ruler_out=str(tmp_path), ruler_batch=2, ruler_max_new_tokens=4)
    source = E.ruler_accuracy(model, tokenizer, "source (GQA)", samples, args, latent_cache=False)
    converted = convert_gqa_to_mla(model, progress=False)  # the lossless setting: the same model
    mla = E.ruler_accuracy(converted, tokenizer, "MLA kv32 rope16 +rec", samples, args, latent_cache=True)
    assert source["ruler_label"] == "dynamic" and mla["ruler_label"] == "transmla:kv32_rope16_rec"
    assert source["ruler_samples"] == mla["ruler_samples"] == len(samples)
    assert set(source["ruler_tasks"]) == {"niah_single_1", "qa_1"}
    assert source["ruler_average"] == sum(source["ruler_tasks"].values()) / 2
    ours = {r["id"]: r for r in ResultsFile(tmp_path / "results", "transmla:kv32_rope16_rec").records()}
    stock = {r["id"]: r for r in ResultsFile(tmp_path / "results", "dynamic").records()}
    assert {i: r["prediction"] for i, r in ours.items()} == {i: r["prediction"] for i, r in stock.items()}
    assert all(0 < ours[i]["cache_bytes"] < stock[i]["cache_bytes"] * 1.1 for i in ours)  # the latent cache
    assert mla == E.ruler_accuracy(converted, tokenizer, "MLA kv32 rope16 +rec", samples, args, True)  # resumed


def test_runner_rejects_bad_method_before_running(tiny, tmp_path):
    model, tokenizer, samples = tiny
    with pytest.raises(ValueError, match="unknown method"):
        runner.run_ruler(model, tokenizer, samples, [MethodSpec("snapkv", "snapkv", {})], tmp_path, progress=False)
    with pytest.raises((TypeError, ValueError), match="rank_k"):
        runner.run_ruler(model, tokenizer, samples, [MethodSpec("xkv:rank_k=7.5", "xkv", {"rank_k": 7.5})],
                         tmp_path, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        runner.run_ruler(model, tokenizer, samples, parse_method_specs("dynamic"), tmp_path, batch_size=0)
    assert not list(tmp_path.iterdir())


# -- report ----------------------------------------------------------------------------------------------
def _rec(method, task, i, score_, nbytes, tool="kvcompress"):
    return dict(id=f"{task}/1024/{i}", task=task, method=method, tool=tool, score=score_, cache_bytes=nbytes)


def test_report_accuracy_and_ratio(tmp_path):
    recs = [_rec("dynamic", "vt", 0, 1.0, 100), _rec("dynamic", "vt", 1, 0.5, 300),
            _rec("dynamic", "cwe", 2, 1.0, 200),
            _rec("xkv", "vt", 0, 0.0, 25), _rec("xkv", "vt", 1, 1.0, 75), _rec("xkv", "cwe", 2, 0.5, 50),
            _rec("kvpress:snapkv:0.75", "vt", 0, 1.0, 25, "kvpress")]
    rows = {r["method"]: r for r in report.summarize(recs[:6])}
    assert rows["dynamic"]["tasks"] == {"vt": 75.0, "cwe": 100.0} and rows["dynamic"]["average"] == 87.5
    assert rows["xkv"]["ratio"] == pytest.approx(0.25)
    assert rows["xkv"]["average"] == pytest.approx((50.0 + 50.0) / 2)
    rows = {r["method"]: r for r in report.summarize(recs)}
    assert rows["kvpress:snapkv:0.75"]["ratio"] == pytest.approx(0.25)  # compared on the shared sample only
    assert rows["dynamic"]["average"] == 75.0  # averaged over the tasks every method has (vt only)
    assert report.summarize(recs)[0]["method"] == "dynamic"
    assert report.common_ids(recs) == {"vt/1024/0"}
    same = {r["method"]: r for r in report.summarize(recs, report.common_ids(recs))}
    assert same["dynamic"]["n"] == 1 and same["dynamic"]["average"] == 100.0 and same["xkv"]["average"] == 0.0
    md, png = report.write_report(recs, tmp_path, "t")
    text = md.read_text()
    assert "| `xkv` | kvcompress | 3 |" in text and "0.250" in text
    assert "The same 1 samples for every method" in text
    if png is not None:
        assert png.stat().st_size > 1000 and (tmp_path / "accuracy_vs_ratio_same_samples.png").exists()


def test_report_counts_a_sample_once_and_groups_methods_into_lines(tmp_path):
    recs = [_rec("dynamic", "vt", 0, 1.0, 100), _rec("dynamic", "vt", 1, 0.0, 100),
            _rec("xkv:ratio=7", "vt", 0, 1.0, 20), _rec("xkv:ratio=7", "vt", 1, 0.0, 20),
            _rec("xkv:ratio=7", "vt", 1, 1.0, 20)]  # a second run of the method appended sample 1 again
    rows = {r["method"]: r for r in report.summarize(recs)}
    assert rows["xkv:ratio=7"]["n"] == 2 and rows["xkv:ratio=7"]["average"] == 50.0
    assert report.method_family("xkv:ratio=7:factor_bits=8") == report.method_family("xkv") == "xkv"
    assert report.method_family("quantized:nbits=2") == "quantized quanto"
    assert report.method_family("quantized:backend=hqq:nbits=4") == "quantized hqq"
    assert report.method_family("kvpress:adakv_snapkv:0.85") == "kvpress adakv_snapkv"
    assert report.method_family("xkv:ratio=7:select_budget=0.1") == "xkv select_budget=0.1"
    recs += [_rec("kvpress:kvzip:0.85", "vt", 0, 1.0, 15, "kvpress"), _rec("kvpress:kvzip:0.88", "vt", 0, 0.0, 12, "kvpress")]
    _, png = report.write_report(recs, tmp_path, "t")
    if png is not None:
        assert png.stat().st_size > 1000


# -- the real model ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_lengths_and_a_real_answer(smollm2, tmp_path):
    model, tokenizer = smollm2
    count = G.hf_token_counter(tokenizer)
    samples = G.generate_dataset(count, "niah_single_1,niah_single_2,cwe,qa_2", [1024], samples=1, progress=False)
    for s in samples:
        budget = 1024 - G.TASKS[s["task"]].tokens_to_generate
        assert budget - 80 <= count(s["context"] + s["question"] + s["answer_prefix"]) <= budget, s["id"]
    out = runner.run_ruler(model, tokenizer, samples[:1], parse_method_specs("dynamic"), tmp_path,
                           max_new_tokens=12, progress=False)
    rec = out["dynamic"][0]
    assert rec["score"] == 1.0, rec["prediction"]  # SmolLM2 finds a single needle at 1k with the stock cache
    assert json.loads(ResultsFile(tmp_path, "dynamic").path.read_text().splitlines()[0])["id"] == rec["id"]


def test_runner_patches_models_for_methods_with_an_install_step(tiny, tmp_path):
    """mla (and xkv) change the attention: the runner goes through patch_model and restores the model."""
    _, tokenizer, samples = tiny
    model = tiny_model("deepseek_v2", max_position_embeddings=4096)
    forwards = [layer.self_attn.forward for layer in model.model.layers]
    assert install_method_needed(parse_method_specs("mla")[0])
    assert install_method_needed(parse_method_specs("xkv")[0])  # fused decode (patch_xkv)
    assert not install_method_needed(parse_method_specs("dynamic")[0])
    out = runner.run_ruler(model, tokenizer, samples[:1], parse_method_specs("dynamic,mla"), tmp_path,
                           max_new_tokens=2, progress=False)
    assert out["mla"][0]["cache_bytes"] > 0 and out["mla"][0]["id"] == samples[0]["id"]
    assert [layer.self_attn.forward for layer in model.model.layers] == forwards  # patch removed
    from kvcompress.patch import active_patch

    assert active_patch(model) is None


def test_kvpress_adapter_validates_and_splits_without_kvpress():
    from benchmarks.ruler.peers import kvpress_eval as K

    assert K.make_press("no_press") is None
    for bad, match in (("snapkv", "ratio"), ("snapkv:1.5", r"\[0, 1\)"), ("h2o:0.5", "one of"),
                       ("adakv_kvzip:0.5", "adakv_SCORER with SCORER one of expected_attention, snapkv"),
                       ("adakv_snapkv", "ratio")):
        with pytest.raises(ValueError, match=match):
            K.make_press(bad)
    assert K.parse_press_spec("kvzip:0.3") == ("kvzip", None, 0.3)
    assert K.parse_press_spec("adakv_expected_attention:0.8") == ("adakv", "expected_attention", 0.8)
    sample = {"id": "x", "question": "\nWhat is it?"}
    assert K.split_prompt("<u>ctx text\nWhat is it?</u> The answer is", sample) == \
        ("<u>ctx text", "\nWhat is it?</u> The answer is")
    with pytest.raises(ValueError, match="question not found"):
        K.split_prompt("no question here", sample)


def test_kvpress_adapter_counts_masked_pairs_as_evicted():
    """Head-wise presses keep evicted pairs in the cache and list them in masked_key_indices: the adapter's
    cache_bytes leaves them out (head dim 16, fp32 keys and values)."""
    from types import SimpleNamespace

    import torch

    from benchmarks.ruler.peers import kvpress_eval as K

    def attention(indices):
        return SimpleNamespace(self_attn=SimpleNamespace(masked_key_indices=indices))

    three = (torch.tensor([0, 0, 0]), torch.tensor([0, 1, 1]), torch.tensor([5, 2, 7]))
    model = SimpleNamespace(model=SimpleNamespace(layers=[attention(three), attention(None)]))
    layer = SimpleNamespace(keys=torch.zeros(1, 2, 10, 16), values=torch.zeros(1, 2, 10, 16))
    cache = SimpleNamespace(layers=[layer, layer])
    assert K.masked_nbytes(model, cache) == 3 * 2 * 16 * 4


def test_kvpress_adapter_loads_the_ruler_modules_without_kvcompress_init():
    """In kvpress's environment (an older transformers) kvcompress/__init__ cannot run: the adapter loads
    only the standard-library modules of kvcompress.ruler, and neither torch nor transformers."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = ("import sys\n"
            "from benchmarks.ruler.peers import kvpress_eval as K\n"
            "generate, results, scoring = K.ruler_modules()\n"
            "assert scoring.score('It is 42.', ['42'], 'string_match_all') == 1.0\n"
            "assert callable(generate.build_prompt) and callable(results.cache_nbytes)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('kvcompress', 'torch', 'transformers')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120,
                         env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    loaded = eval(out.stdout)
    assert "kvcompress.xkv" not in loaded and "torch" not in loaded and "transformers" not in loaded, loaded
    assert "kvcompress.ruler.generate" in loaded
