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
