"""The ``kvcompress`` command line: --help, and the ``methods`` table built from the registry declarations."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvcompress.cli import VERBS, main
from kvcompress.registry import get_method, list_methods


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
