"""The two pieces every benchmark plot shares: a headless pyplot (or None without matplotlib) and saving."""

from __future__ import annotations

from pathlib import Path


_missing_noted = False  # the note on a missing matplotlib is printed once per process, not once per plot


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, or ``None`` when matplotlib is missing (saying so once)."""
    global _missing_noted
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not _missing_noted:
            _missing_noted = True
            print("matplotlib is not installed (pip install 'kvcompress[bench]'): no plots are written")
        return None
    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Lay out, write as a 120-dpi PNG (creating the folder) and close ``fig``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
