"""matplotlib on the file-only Agg backend, for the run report, the LR schedule plot and the LR range test.

matplotlib is imported inside these functions: it is heavy, and training never needs it.
"""
from __future__ import annotations

from pathlib import Path

from . import logs


def pyplot():
    """matplotlib's pyplot on the Agg backend; None, with a warning, where matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        logs.warn('matplotlib is not installed, so no plots were drawn (pip install matplotlib)')
        return None
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
