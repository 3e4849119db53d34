"""Before/after scores of a fine-tune: per-image correctness of two models on the same images, Wilson intervals
and exact McNemar tests, so a change on a dozen held-out images is read against chance.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn

from . import data
from .predict import predict_batch

if TYPE_CHECKING:
    from .finetune import Dataset


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (95 % for z = 1.96) of a proportion k / n: honest for a dozen images and at 0 or n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_p(worse: int, better: int) -> float:
    """Exact two-sided McNemar p-value: of the images whose correctness changed, `worse` went wrong and `better`
    right; if the accuracy did not change, each of them is a fair coin flip."""
    n = worse + better
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(worse, better) + 1)) / 2 ** n)


@dataclass
class Comparison:
    """One accuracy measured before and after the fine-tune on the same images (per image, for a paired test)."""

    label: str
    correct_before: np.ndarray  # bool per image
    correct_after: np.ndarray

    @property
    def n(self) -> int:
        return len(self.correct_after)

    @property
    def before(self) -> float:
        return float(self.correct_before.mean())

    @property
    def after(self) -> float:
        return float(self.correct_after.mean())

    @property
    def change(self) -> float:
        """after - before (a fraction; > 0 = better)."""
        return self.after - self.before

    @property
    def p(self) -> float:
        """McNemar's exact p-value of the change (small = unlikely to be chance)."""
        worse = int((self.correct_before & ~self.correct_after).sum())
        return mcnemar_p(worse, int((~self.correct_before & self.correct_after).sum()))

    def cell(self, when: str) -> str:
        """'58.3 % (32–81)': the accuracy before or after with its 95 % Wilson interval."""
        c = self.correct_before if when == "before" else self.correct_after
        lo, hi = wilson_interval(int(c.sum()), len(c))
        return f"{100 * c.mean():.1f} % ({100 * lo:.0f}–{100 * hi:.0f})"


def correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, among: list[int] | None = None) -> np.ndarray:
    """Per image: is the top class right (among all outputs, or only among the class indices `among`)?
    A class the model has no output for (a new class, before) is never predicted."""
    probs = predict_batch(model, x)
    if among is not None:
        keep = torch.zeros(probs.shape[1], dtype=torch.bool)
        keep[[c for c in among if c < probs.shape[1]]] = True
        probs = torch.where(keep, probs, torch.full_like(probs, -1.0))
    return (probs.argmax(1) == y).numpy()


def compare(before: nn.Module, after: nn.Module, hold: Dataset, trained: list[int],
            cifar: tuple[torch.Tensor, torch.Tensor] | None) -> dict[str, Comparison]:
    """The before/after accuracies a user needs to judge a fine-tune: the held-out images (all classes, and
    choosing only among the `trained` class indices), and on a CIFAR-10 test slice everything (forgetting) and
    the images of the trained classes (10-way, and choosing only among them)."""
    def pair(label: str, x: torch.Tensor, y: torch.Tensor, among: list[int] | None = None) -> Comparison:
        return Comparison(label, correct(before, x, y, among), correct(after, x, y, among))

    rows: dict[str, Comparison] = {}
    if len(hold):
        rows["holdout"] = pair("held-out part of your data", hold.x, hold.y)
        if 2 <= len(trained) < len(hold.classes):
            rows["holdout_among"] = pair(f"held-out, choosing only among the {len(trained)} trained classes",
                                         hold.x, hold.y, trained)
    if cifar is not None:
        rows["cifar"] = pair(f"CIFAR-10 test slice ({len(cifar[1])} images, forgetting)", *cifar)
        mine = torch.isin(cifar[1], torch.tensor(trained))
        if 0 < len(trained) < len(data.CLASSES) and mine.any():
            x, y = cifar[0][mine], cifar[1][mine]
            rows["cifar_trained"] = pair(f"CIFAR-10 slice, images of the trained classes ({int(mine.sum())})", x, y)
            if len(trained) >= 2:
                rows["cifar_among"] = pair("…the same images, choosing only among the trained classes", x, y, trained)
    return rows
