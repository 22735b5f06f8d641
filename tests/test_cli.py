"""The ``kvcompress`` command line: --help, and the ``methods`` table built from the registry declarations."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvcompress.cli import VERBS, main
from kvcompress.registry import get_method, list_methods

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_every_verb(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: kvcompress" in out
    for verb in VERBS:
        assert verb in out


def test_no_verb_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: kvcompress" in capsys.readouterr().out


def test_methods_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["methods", "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps at the terminal's width
    assert "usage: kvcompress methods" in out and "patch_model" in out
    assert ", ".join(list_methods()) in out


def test_methods_table_comes_from_the_declarations(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in list_methods():
        method = get_method(name)
        row = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert method.families_text() in row and method.summary in row
        for param in method.params:
            line = next(line for line in out.splitlines() if line.strip().startswith(param.name + " "))
            assert repr(param.default) in line and param.allowed() in line
            assert param.help in out
    assert "int >= 1, float in (0, 1] or None" in out  # xkv's ranks, in words


def test_methods_one_and_unknown(capsys):
    assert main(["methods", "xkv"]) == 0
    out = capsys.readouterr().out
    assert "xkv parameters" in out and "dynamic" not in out
    assert main(["methods", "nope"]) == 2
    assert f"unknown method 'nope'; known methods: {', '.join(list_methods())}" in capsys.readouterr().err


def test_module_entry_point_runs():
    """``python -m kvcompress methods``: the same main() the console script calls."""
    result = subprocess.run([sys.executable, "-m", "kvcompress", "methods"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("METHOD")


def _package_sources():
    from pathlib import Path

    import kvcompress

    root = Path(kvcompress.__file__).parent
    return sorted(root.rglob("*.py"))


def test_the_package_never_imports_benchmarks_nor_edits_sys_path():
    """``kvcompress ruler`` and ``bench`` run from a wheel: nothing in the package reaches for the source
    checkout's benchmarks/ directory or puts a directory on ``sys.path``."""
    import ast

    sources = _package_sources()
    assert any(p.name == "speed.py" and p.parent.name == "bench" for p in sources)
    for path in sources:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] == "benchmarks" for a in node.names), path
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                assert (node.module or "").split(".")[0] != "benchmarks", path
            elif isinstance(node, ast.Attribute) and node.attr == "path":
                assert not (isinstance(node.value, ast.Name) and node.value.id == "sys"), f"sys.path in {path}"


def test_ruler_and_bench_modules_import_with_benchmarks_unimportable(tmp_path):
    """In a fresh interpreter where ``import benchmarks`` fails (as in a wheel install), every module the
    ruler and bench verbs use imports and the verbs' parsers build."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'benchmarks':\n"
        "            raise ImportError('benchmarks is not installed')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import kvcompress.cli, kvcompress.bench.speed, kvcompress.bench.spec, kvcompress.ruler.runner\n"
        "import kvcompress.ruler.report, kvcompress.ruler.generate\n"
        "kvcompress.cli.build_parser()\n"
        "assert not any(m.split('.')[0] == 'benchmarks' for m in sys.modules)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# -- --help keeps the examples' line breaks ------------------------------------------------------------
@pytest.mark.parametrize("verb", ["ruler", "bench"])
def test_help_keeps_the_examples_line_breaks(verb, capsys):
    import importlib

    with pytest.raises(SystemExit) as exit_info:
        main([verb, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    doc = importlib.import_module(VERBS[verb]).__doc__.splitlines()
    continued = [(line, nxt) for line, nxt in zip(doc, doc[1:]) if line.endswith("\\")]
    assert continued  # the examples that go on over two lines
    for line, nxt in continued:
        assert f"{line}\n{nxt}\n" in out, line


# -- every argument is checked before anything is loaded -------------------------------------------------
@pytest.fixture
def no_model_load(monkeypatch):
    """Loading a model fails the test: a bad argument must end the command before."""
    from kvcompress import models
    from kvcompress.bench import speed
    from kvcompress.ruler import runner

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(models, "load_smollm2", refuse)
    monkeypatch.setattr(speed, "load_model", refuse)
    monkeypatch.setattr(speed, "bench", refuse)
    monkeypatch.setattr(runner, "run_ruler", refuse)


BAD_BENCH = [
    (["--methods", "nosuch"], "--methods", "unknown method 'nosuch'; known methods: dynamic, xkv"),
    (["--methods", "xkv:rnak_k=2"], "--methods", "has no parameter 'rnak_k'; allowed parameters: group_size"),
    (["--methods", "xkv:rank_k=2.0"], "--methods", "rank_k=2.0 is out of range; allowed: int >= 1, float in (0, 1]"),
    (["--methods", "xkv:rank_k"], "--methods", "is not param=value"),
    (["--methods", "dynamic,dynamic"], "--methods", "each method may appear once"),
    (["--layers", "0"], "--layers", "expected an int >= 1, got 0"),
    (["--layers", "2"], "--layers", "not smollm2"),
    (["--budget-gib", "-1"], "--budget-gib", "expected a number > 0, got -1"),
    (["--batch", "0"], "--batch", "expected an int >= 1"),
    (["--context", "1"], "--context", "expected an int >= 2"),
    (["--new-tokens", "x"], "--new-tokens", "expected an int >= 2, got 'x'"),
    (["--repeats", "0"], "--repeats", "expected an int >= 1"),
    (["--prefill-chunk", "0"], "--prefill-chunk", "expected an int >= 1"),
    (["--baselines", "stat"], "--baselines", "allowed: dynamic, static, static-compiled"),
    (["--device", "gpu"], "--device", "allowed: auto, cpu, cuda or cuda:N"),
    (["--compile-backend", "nope"], "--compile-backend", "allowed: "),
]
BAD_RULER = [
    (["--methods", "nosuch"], "--methods", "unknown method 'nosuch'"),
    (["--methods", "xkv:window=-1"], "--methods", "window=-1 is out of range; allowed: int >= 0"),
    (["--methods", "mla"], "--methods mla", "does not support model_type='llama'"),
    (["--samples", "0"], "--samples", "expected an int >= 1, got 0"),
    (["--length", "0"], "--length", "expected an int >= 256, got 0"),
    (["--length", "1024", "100"], "--length", "expected an int >= 256, got 100"),
    (["--batch-size", "0"], "--batch-size", "expected an int >= 1, got 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens", "expected an int >= 1"),
    (["--tasks", "foo"], "--tasks", "unknown task 'foo'; allowed: all, niah, qa"),
    (["--dataset", "/nonexistent/d.jsonl"], "--dataset", "no such file"),
    (["--device", "gpu"], "--device", "allowed: auto, cpu, cuda or cuda:N"),
    (["--report-only", "--generate-only"], "--report-only", "exclude each other"),
]


@pytest.mark.parametrize("verb,argv,option,message",
                         [("bench", *case) for case in BAD_BENCH] + [("ruler", *case) for case in BAD_RULER])
def test_bad_arguments_exit_2_naming_the_option_before_any_load(verb, argv, option, message, no_model_load, capsys,
                                                                  tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main([verb, *argv, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"kvcompress {verb}: error:" in err and option in err and message in err, err


@pytest.mark.parametrize("verb", ["bench", "ruler"])
def test_cuda_without_cuda_is_a_usage_error(verb, no_model_load, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as exit_info:
        main([verb, "--device", "cuda"])
    assert exit_info.value.code == 2
    assert "--device cuda: CUDA is not available on this machine" in capsys.readouterr().err


def test_ruler_dataset_checks(no_model_load, capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    vt = tmp_path / "vt.jsonl"
    vt.write_text('{"task": "vt", "id": "vt/1024/0"}\n')
    for argv, message in ((["--dataset", str(bad)], "not a RULER JSONL dataset"),
                          (["--dataset", str(vt), "--tasks", "niah"], "holds no sample of the tasks asked for"),
                          (["--dataset", str(vt), "--generate-only"], "cannot be combined with --dataset")):
        with pytest.raises(SystemExit) as exit_info:
            main(["ruler", *argv, "--out", str(tmp_path)])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_ruler_report_only_without_results_is_an_error(no_model_load, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["ruler", "--report-only", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert f"--report-only: no results in {tmp_path / 'results'}" in capsys.readouterr().err


def test_ruler_min_length_matches_the_generator():
    from kvcompress import ruler_cli
    from kvcompress.ruler import generate

    assert ruler_cli.MIN_LENGTH == generate.MIN_LENGTH


# -- Ctrl-C at any point ends with "interrupted" and 130 -----------------------------------------------
def test_ctrl_c_while_building_the_parser_or_validating(monkeypatch, capsys):
    from kvcompress import bench_cli, cli

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_cli, "validate", interrupt)
    assert main(["bench"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"
    monkeypatch.setattr(cli, "build_parser", interrupt)
    assert main(["methods"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"


def test_sigint_during_start_up_exits_130():
    """A real SIGINT while the verbs' parsers are built (start-up, before any verb runs)."""
    code = ("import os, signal, sys\n"
            "import kvcompress.bench_cli as b, kvcompress.cli as c\n"
            "b.add_arguments = lambda parser: os.kill(os.getpid(), signal.SIGINT)\n"
            "sys.exit(c.main(['bench']))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip() == "interrupted" and "Traceback" not in result.stderr



# SIGINT at the first import of torch, the slow part of start-up (seconds), reached deterministically: a
# finder that the import system asks before any other (it finds nothing itself)
_INTERRUPT_AT_TORCH = """
import importlib.abc, os, signal, sys

class InterruptAtTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            print("SIGINT while importing torch", flush=True)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, InterruptAtTorch())
"""


def _console_script() -> tuple[str, str]:
    """(module, function) of the ``kvcompress`` console script, as pyproject.toml declares it."""
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["kvcompress"].partition(":")
    return module, function


@pytest.mark.parametrize("verb", ["methods", "bench"])
def test_sigint_while_the_package_imports_torch_exits_130(verb):
    """Ctrl-C during ``import kvcompress`` (torch, transformers: the seconds before any verb runs), through
    the console script pyproject.toml declares: "interrupted" and status 130, no traceback."""
    module, function = _console_script()
    code = _INTERRUPT_AT_TORCH + f"from {module} import {function}\nsys.exit({function}())\n"
    result = subprocess.run([sys.executable, "-c", code, verb], capture_output=True, text=True, timeout=300,
                            cwd=ROOT)
    assert "SIGINT while importing torch" in result.stdout, (result.stdout, result.stderr)
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip() == "interrupted" and "Traceback" not in result.stderr


def test_console_script_module_imports_nothing_heavy():
    """The console script's own module is outside the package: importing it runs neither
    kvcompress/__init__ nor torch, so its Ctrl-C handling is in place before they start."""
    module, function = _console_script()
    code = (f"import sys\nfrom {module} import {function}\n"
            "print(sorted(m for m in ('torch', 'transformers', 'kvcompress') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# -- the demo's summary ----------------------------------------------------------------------------------
def test_demo_summary_names_the_model_says_whether_the_answers_agree_and_gives_both_ratios():
    from kvcompress.demo import Answer, summary

    dense = Answer("DynamicCache", "4212345", object(), 4 * 2**20, 1.0)  # stock: allocated = held
    xkv = Answer("XKVCache", "4212345", object(), 2**20, 2.0, reserved=2 * 2**20)
    text = "\n".join(summary([dense, xkv], "4212345", "SmolLM2-135M-Instruct"))
    assert "same answer: yes, SmolLM2-135M-Instruct gave the same answer with both caches ('4212345')" in text
    assert "DynamicCache:     4.00 MiB held,     4.00 MiB allocated" in text
    assert "XKVCache:     1.00 MiB held,     2.00 MiB allocated" in text
    assert "memory saving: 4.00x smaller held (75% less; nbytes), 2.00x smaller allocated (50% less; " \
           "reserved_nbytes" in text
    assert text.count("(found)") == 2
    other = "\n".join(summary([dense, Answer("XKVCache", "42", object(), 2**20, 2.0)], "4212345", "M"))
    assert "same answer: no, M answered '4212345' with DynamicCache and '42' with XKVCache" in other
    assert "(MISSED)" in other and "4.00x smaller held" in other and "4.00x smaller allocated" in other


def test_demo_measures_what_each_cache_allocates():
    """The demo's figures come from the caches: stock caches allocate what they hold, kvcompress caches
    report their storage's spare capacity too."""
    from transformers import DynamicCache, LlamaConfig

    from kvcompress.ops import cache_nbytes, cache_reserved_nbytes
    from kvcompress.xkv import XKVCache

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                         intermediate_size=32, vocab_size=32)
    stock, xkv = DynamicCache(config=config), XKVCache(config, group_size=2)
    for cache in (stock, xkv):
        for layer in range(2):
            cache.update(torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16), layer)
    assert cache_reserved_nbytes(stock) == cache_nbytes(stock) == 2 * 2 * 2 * 40 * 16 * 4
    assert cache_reserved_nbytes(xkv) == xkv.reserved_nbytes() > cache_nbytes(xkv) == xkv.nbytes()


def test_demo_checks_its_arguments_before_loading(no_model_load, capsys):
    for argv, message in ((["--depth", "2"], "argument --depth: expected a number in [0, 1], got 2.0"),
                          (["--context", "10"], "argument --context: expected an int >= 128"),
                          (["--max-new-tokens", "0"], "argument --max-new-tokens: expected an int >= 1"),
                          (["--device", "tpu"], "--device: unknown device 'tpu'")):
        with pytest.raises(SystemExit) as exit_info:
            main(["demo", *argv])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_ruler_report_only_titles_the_lengths_it_holds(tmp_path, capsys):
    """--report-only over 8k results (a --dataset run) says length 8192, not --length's default 4096."""
    import json

    (tmp_path / "results").mkdir()
    rows = [{"id": f"niah_single_1/8192/{i}", "task": "niah_single_1", "length": 8192, "index": i,
             "method": "dynamic", "tool": "kvcompress", "prediction": "1", "answers": ["1"], "metric": "all",
             "score": 100.0, "cache_bytes": 1000, "prompt_tokens": 8000, "new_tokens": 4, "seconds": 1.0,
             "prefill_seconds": 0.5, "batch_size": 1} for i in range(2)]
    (tmp_path / "results" / "dynamic.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["ruler", "--report-only", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "summary.md").read_text()
    assert "length 8192" in text and "4096" not in text.splitlines()[0]
