"""`curves.png` in a run folder: the losses (and `val/knn_top1` when it was measured) against the step, drawn
from `logs/metrics.csv` at the end of a run, for a look without TensorBoard. PIL only: no plotting library
is a dependency of ddmim."""
from __future__ import annotations

import csv
import math
from pathlib import Path

from PIL import Image, ImageDraw

from ddmim.atomic import atomic_path

WIDTH, PANEL_HEIGHT, MARGIN = 640, 220, 48
# (panel title, [(column, colour)])
PANELS = (("loss", (("train/loss", (31, 119, 180)), ("val/loss", (214, 39, 40)))),
          ("k-NN top-1 %", (("val/knn_top1", (44, 160, 44)),)))


def read_series(metrics: Path) -> dict[str, list[tuple[int, float]]]:
    """column -> [(step, value)] for every non-empty finite cell."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(metrics, newline="") as f:
        for row in csv.DictReader(f):
            for column, cell in row.items():
                if column == "step" or not cell:
                    continue
                try:
                    step, value = int(float(row["step"])), float(cell)
                except (TypeError, ValueError):
                    continue
                if math.isfinite(value):
                    series.setdefault(column, []).append((step, value))
    return series


def _panel(draw: ImageDraw.ImageDraw, top: int, title: str, lines, series, last_step: int) -> None:
    values = [v for column, _ in lines for _, v in series.get(column, [])]
    low, high = min(values), max(values)
    if high == low:
        low, high = low - 1, high + 1
    left, right, bottom = MARGIN, WIDTH - 12, top + PANEL_HEIGHT - 28
    draw.rectangle((left, top + 16, right, bottom), outline=(0, 0, 0))
    draw.text((left, top + 2), title, fill=(0, 0, 0))
    draw.text((4, top + 16), f"{high:.3g}", fill=(0, 0, 0))
    draw.text((4, bottom - 10), f"{low:.3g}", fill=(0, 0, 0))
    draw.text((left, bottom + 4), "step 0", fill=(0, 0, 0))
    draw.text((right - 60, bottom + 4), f"step {last_step}", fill=(0, 0, 0))
    legend_x = left + 120
    for column, colour in lines:
        points = [(left + (right - left) * s / max(last_step, 1),
                   bottom - (bottom - top - 16) * (v - low) / (high - low)) for s, v in series.get(column, [])]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points if len(points) < 50 else []:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        if points:
            draw.text((legend_x, top + 2), column, fill=colour)
            legend_x += 8 * len(column) + 16


def write_curves(metrics: Path, out: Path) -> Path | None:
    """The picture, one panel per group that has values; None when the CSV holds no values to draw."""
    series = read_series(metrics)
    panels = [(title, lines) for title, lines in PANELS if any(series.get(c) for c, _ in lines)]
    if not panels:
        return None
    last_step = max(s for points in series.values() for s, _ in points)
    image = Image.new("RGB", (WIDTH, PANEL_HEIGHT * len(panels)), "white")
    draw = ImageDraw.Draw(image)
    for i, (title, lines) in enumerate(panels):
        _panel(draw, i * PANEL_HEIGHT, title, lines, series, last_step)
    with atomic_path(out) as tmp:
        image.save(tmp, format="PNG")
    return out
