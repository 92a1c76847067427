"""matplotlib, imported only when a command is asked for a picture: it is an
optional extra (``pip install 'jitckpt[plot]'``), never needed to train."""

from __future__ import annotations

from typing import Any

INSTALL_HINT = "pip install 'jitckpt[plot]'"


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only: no display needed,
    and a headless training node has none)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotUnavailable(
            f"--plot needs matplotlib, which is not installed ({exc}); {INSTALL_HINT}"
        ) from None
    return plt
