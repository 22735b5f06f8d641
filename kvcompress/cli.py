"""The ``kvcompress`` command line.

Each verb lives in its own module, which defines ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``, and may define ``validate(args, parser)``, which checks the arguments (calling
``parser.error``, exit status 2) before ``run`` loads anything; this file only lists the verbs. Add a verb
by adding one line to ``VERBS``. A verb's module docstring is its ``--help`` description, printed with
its line breaks (examples stay copyable).
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
        sub = verbs.add_parser(verb, help=module.HELP, description=module.__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run, _validate=getattr(module, "validate", None), _parser=sub)
    return parser


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 2
    if args._validate is not None:
        args._validate(args, args._parser)
    return int(args._run(args) or 0)


def main(argv: list[str] | None = None) -> int:
    """Run a verb; exit status 0 on success, 2 for bad arguments, 130 after Ctrl-C (at any point, the
    verbs' start-up included). The console script (``kvcompress_cli``) also catches a Ctrl-C during the
    package's import, which happens before this module exists."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
