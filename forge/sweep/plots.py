"""PNG figures: matplotlib without a display, files written whole (the stage cards' plots), and
the bar charts of a sweep's figures (forge-analyze): one file per figure, one bar per point,
coloured by model; a failed point keeps its place, marked with its failure class instead of a bar."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from forge.sweep.analyze import Point


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend: files only, no display on nodes, CI or ssh."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: Path) -> None:
    """The figure as a PNG at `path`, written to a temporary name and moved into place (a kill
    never leaves half a file), then closed."""
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    pyplot().close(fig)
    tmp.replace(path)


def plot_figures(points: list[Point], out: Path, figures: dict[str, tuple[str, str]]) -> list[Path]:
    """Write one PNG per entry of figures ({column: (title, file name)}); returns their paths."""
    plt = pyplot()
    models = sorted({p.model for p in points})
    palette = plt.get_cmap("tab10")
    colours = {m: palette(i % 10) for i, m in enumerate(models)}
    cpu = any(p.figures.get("gpus") == 0 for p in points)
    labels = [p.label + (" *" if p.best else "") for p in points]
    written = []
    for column, (title, name) in figures.items():
        values = [p.figures.get(column) or 0.0 for p in points]
        fig, ax = plt.subplots(figsize=(9, 1.2 + 0.45 * len(points)))
        bars = ax.barh(range(len(points)), values, color=[colours[p.model] for p in points])
        top = max(values) or 1.0
        for i, (p, bar) in enumerate(zip(points, bars, strict=True)):
            note = f"{p.figures[column]:,.3g}" if p.figures.get(column) is not None else (p.failure_class or p.status)
            ax.text(bar.get_width() + top * 0.01, i, note, va="center", fontsize=8)
        ax.set_yticks(range(len(points)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, top * 1.25)
        ax.set_xlabel(title + (" (a CPU-engine task counts as 1 GPU)" if cpu and "GPU" in title else ""))
        ax.set_title(f"{title} (* = best per model)", fontsize=10)
        if len(models) > 1:
            handles = [plt.Rectangle((0, 0), 1, 1, color=colours[m]) for m in models]
            ax.legend(handles, models, fontsize=7, loc="lower right")
        fig.tight_layout()
        path = out / name
        save_png(fig, path)
        written.append(path)
    return written
