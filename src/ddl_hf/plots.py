"""The PNG figures of the commands: `ddl train`'s loss curve, `ddl compare`'s loss against tokens and
FLOPs, `ddl audit`'s gate panels.

`png_figure` holds what every figure shares: matplotlib's file-only backend (the commands run on
machines without a display), the layout, the resolution and closing the figure once saved, so a
long `ddl compare` never accumulates open figures.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DPI = 120


@contextmanager
def png_figure(path: str | Path, *subplots_args, suptitle: str | None = None, **subplots_kwargs) -> Iterator[tuple]:
    """`with png_figure(path, figsize=(7, 4.5)) as (figure, axes): ...` draws on `plt.subplots(...)`
    and saves the figure to `path` as a PNG when the block ends (nothing is saved when it raises)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(*subplots_args, **subplots_kwargs)
    try:
        yield figure, axes
        if suptitle is not None:
            figure.suptitle(suptitle)
        figure.tight_layout()
        figure.savefig(path, dpi=DPI)
    finally:
        plt.close(figure)


def label_axes(axes, xlabel: str, ylabel: str, title: str, grid: bool = True) -> None:
    """Axis labels, title, a light grid (unless `grid` is False) and the legend of the labelled lines."""
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    if grid:
        axes.grid(alpha=0.3)
    axes.legend()


def color_cycle() -> list[str]:
    """The colours matplotlib gives successive lines, to draw a line and its band in one colour."""
    import matplotlib

    return matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]


__all__ = ["png_figure", "label_axes", "color_cycle"]
