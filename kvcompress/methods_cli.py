"""List the KV-cache methods kvcompress knows: for each, the model types it supports, its cache class and
its parameters (default, allowed values, meaning). Everything printed comes from the method declarations
in kvcompress/registry.py, the same ones that check make_cache() and patch_model() arguments.

Use a method from Python with  kvcompress.patch_model(model, "xkv", rank_k=0.25)  (every later
model.generate() and text-generation pipeline on that model uses it) or
kvcompress.make_cache("xkv", model, ...) for one cache."""

from __future__ import annotations

import argparse
import sys

from .registry import Method, get_method, list_methods

HELP = "list the methods, the models they support and their parameters"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("method", nargs="?", default=None,
                        help="show only this method (default: all); one of " + ", ".join(list_methods()))


def _columns(rows: list[list[str]], indent: str = "") -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return [indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows]


def format_methods(methods: list[Method]) -> str:
    """The overview table, then each method's parameter table."""
    rows = [["METHOD", "MODELS (config.model_type)", "CACHE CLASS", "SUMMARY"]]
    rows += [[m.name, m.families_text(), m.cache_class or "-", m.summary] for m in methods]
    lines = _columns(rows)
    for m in methods:
        lines.append("")
        where = f" (see {m.doc})" if m.doc else ""
        if not m.params:
            lines.append(f"{m.name}: no parameters{where}")
            continue
        lines.append(f"{m.name} parameters{where}:")
        param_rows = [["NAME", "DEFAULT", "ALLOWED / MEANING"]]
        for p in m.params:
            param_rows.append([p.name, repr(p.default), p.allowed()])
            param_rows.append(["", "", p.help])
        lines += _columns(param_rows, indent="  ")
    return "\n".join(line.rstrip() for line in lines)


def run(args: argparse.Namespace) -> int:
    try:
        methods = [get_method(args.method)] if args.method else [get_method(n) for n in list_methods()]
    except ValueError as error:
        print(f"kvcompress methods: {error}", file=sys.stderr)
        return 2
    print(format_methods(methods))
    return 0
