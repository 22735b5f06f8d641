"""The ``kvcompress`` command line.

Each verb lives in its own module, which defines ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``; this file only lists the verbs. Add a verb by adding one line to ``VERBS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# verb -> module implementing it
VERBS: dict[str, str] = {
    "demo": "kvcompress.demo",
    "ruler": "kvcompress.ruler_cli",
    "bench": "kvcompress.bench_cli",
    "methods": "kvcompress.methods_cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvcompress",
        description="KV-cache compression for Hugging Face transformers generation.",
        epilog="Run 'kvcompress VERB --help' for a verb's options.",
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, module_name in VERBS.items():
        module = importlib.import_module(module_name)
        sub = verbs.add_parser(verb, help=module.HELP, description=module.__doc__)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
