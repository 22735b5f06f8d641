"""The ``kvcompress`` console script (pyproject.toml: ``kvcompress = "kvcompress_cli:main"``).

It lives outside the ``kvcompress`` package on purpose: importing anything from the package first runs
``kvcompress/__init__.py``, which imports torch and transformers (seconds) and registers every method. A
Ctrl-C during those seconds happened before :func:`kvcompress.cli.main` could catch it, so it printed a
traceback and ended with the signal's status instead of ``interrupted`` and 130. This module imports
nothing of the package until its handler is in place.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Run ``kvcompress`` with ``argv`` (default: the command line): exit status 0 on success, 2 for bad
    arguments, 130 after Ctrl-C, also while the package is still being imported."""
    try:
        from kvcompress.cli import main as run
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
