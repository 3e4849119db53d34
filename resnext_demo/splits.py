"""Class-balanced sampling, written once: a smoke-run subset, the validation hold-out that recipe choices are
made on, and the fine-tune tab's held-out part all draw per class from one seeded generator.

`balanced_indices` is the one sampler; the draws are what the earlier per-caller copies drew (the same
generator calls in the same order), so a stored run's validation split is the same images as before.
"""
from __future__ import annotations

from collections.abc import Callable

import torch


def balanced_indices(y: torch.Tensor, per_class: int | Callable[[int], int], g: torch.Generator) -> torch.Tensor:
    """Indices of a random `per_class` examples of each class present in `y` (ascending class order);
    `per_class` may be a function of that class's count (e.g. a held-out fraction)."""
    picked = []
    for c in y.unique():
        idx = torch.nonzero(y == c).flatten()
        k = per_class(len(idx)) if callable(per_class) else per_class
        picked.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    return torch.cat(picked) if picked else torch.empty(0, dtype=torch.long)


def complement(n: int, idx: torch.Tensor) -> torch.Tensor:
    """The indices in range(n) not in `idx`, in their original order."""
    keep = torch.ones(n, dtype=torch.bool)
    keep[idx] = False
    return torch.nonzero(keep).flatten()


def balanced_subset(x: torch.Tensor, y: torch.Tensor, n: int | None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A class-balanced random subset of n examples, shuffled (all of them, in order, if n is None)."""
    if n is None or n >= len(y):
        return x, y
    g = torch.Generator().manual_seed(seed)
    idx = balanced_indices(y, max(1, n // len(y.unique())), g)
    idx = idx[torch.randperm(len(idx), generator=g)]
    return x[idx], y[idx]


def split_validation(x: torch.Tensor, y: torch.Tensor, n: int, seed: int = 0
                     ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(train, val): a class-balanced hold-out of n training images for recipe choices (the test split
    stays untouched until the final report); train keeps the original order."""
    val = balanced_indices(y, n // len(y.unique()), torch.Generator().manual_seed(seed))
    keep = complement(len(y), val)
    return (x[keep], y[keep]), (x[val], y[val])
