"""Rendering: arrays and numbers -> PIL images and matplotlib figures. Never touches a model.

Figures are made with matplotlib's object API (no pyplot state, safe across threads/users) and
closed by rendering them straight to an image.
"""
from __future__ import annotations

import io

import numpy as np
from matplotlib.figure import Figure
from PIL import Image


def figure_to_image(fig: Figure, dpi: int = 100) -> Image.Image:
    """Render a matplotlib figure to an RGB PIL image (the figure is discarded)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def confusion_figure(confusion: list[list[int]] | np.ndarray, classes: list[str] | tuple[str, ...]) -> Image.Image:
    """Confusion matrix (rows true, columns predicted) as a labelled heatmap with counts."""
    cm = np.asarray(confusion)
    fig = Figure(figsize=(1 + 0.6 * len(classes), 0.8 + 0.6 * len(classes)))
    ax = fig.add_subplot()
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    return figure_to_image(fig)
