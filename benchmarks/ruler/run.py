"""RULER accuracy of kvcompress methods against the stock cache: ``kvcompress ruler`` as a script.

    python -m benchmarks.ruler.run --length 1024 --tasks niah_single_1,vt --samples 4 \\
        --methods dynamic,xkv:rank_k=0.25:rank_v=0.375 --out results/ruler

Every option is ``kvcompress ruler``'s (``--help`` lists them). The code is ``kvcompress.ruler``; the
peers (other tools evaluated on the very same samples) are in ``peers/``.
"""

from __future__ import annotations

import sys

from kvcompress.cli import main

if __name__ == "__main__":
    sys.exit(main(["ruler", *sys.argv[1:]]))
