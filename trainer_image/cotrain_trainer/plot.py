"""Loss curves of a `cotrain run`: one PNG, one line per member, from the progress files.

Owns reading each member's loss series (its last run only: a restart trains from the start) and
drawing them with matplotlib's Agg backend, without pyplot's global state.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from cotrain_trainer.report import EVENT_STARTED, EVENT_STEP, read_events


def loss_series(progress_file: Path) -> list[tuple[int, float]]:
    """(step, loss) of the member's last run."""
    series: list[tuple[int, float]] = []
    for event in read_events(progress_file):
        if event.event == EVENT_STARTED:
            series = []
        elif event.event == EVENT_STEP and event.step is not None and event.loss is not None:
            series.append((event.step, event.loss))
    return series


def plot_losses(series: Mapping[str, list[tuple[int, float]]], path: Path, title: str) -> Path:
    """Write the loss curves to `path` (PNG) and return it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for label, points in series.items():
        if points:
            steps, losses = zip(*points, strict=True)
            axes.plot(steps, losses, marker="." if len(points) < 30 else None, label=label)
    axes.set_xlabel("step")
    axes.set_ylabel("training loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if any(series.values()):
        axes.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
