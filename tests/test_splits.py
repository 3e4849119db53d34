"""splits: the one class-balanced sampler (subset, validation hold-out, the fine-tune's held-out part)."""
from __future__ import annotations

import torch

from resnext_demo import splits


def _colour_classes(n_per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n_per_class uint8 images of each of 10 classes, labels shuffled; image i carries i // 256 in one pixel so
    that adding i to every pixel (mod 256) keeps all images distinct."""
    y = torch.arange(10).repeat(n_per_class)[torch.randperm(10 * n_per_class, generator=torch.Generator().manual_seed(0))]
    x = torch.zeros(len(y), 3, 32, 32, dtype=torch.uint8)
    x[:, 0, 0, 1] = torch.arange(len(y)) // 256
    return x, y


def test_subset_is_balanced() -> None:
    x, y = _colour_classes(30)
    xs, ys = splits.balanced_subset(x, y, 50)
    assert len(ys) == 50 and torch.bincount(ys).tolist() == [5] * 10


def test_split_validation_is_balanced_disjoint_and_seeded() -> None:
    x, y = _colour_classes(30)
    x = x + torch.arange(len(y)).view(-1, 1, 1, 1).to(x.dtype)  # every image distinct, to check disjointness
    (xt, yt), (xv, yv) = splits.split_validation(x, y, 50, seed=3)
    assert torch.bincount(yv).tolist() == [5] * 10 and len(yt) + len(yv) == len(y)
    seen = {tuple(im.flatten().tolist()) for im in xt}
    assert not any(tuple(im.flatten().tolist()) in seen for im in xv)
    assert torch.equal(splits.split_validation(x, y, 50, seed=3)[1][0], xv)
    assert not torch.equal(splits.split_validation(x, y, 50, seed=4)[1][0], xv)

def test_balanced_indices_take_per_class_counts_or_a_function_of_them() -> None:
    """A fixed count per class, or one computed from each class's size (the fine-tune's held-out fraction);
    the same seed draws the same images, and the complement keeps the original order."""
    y = torch.tensor([0] * 10 + [1] * 4 + [2] * 2)
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    idx = splits.balanced_indices(y, 2, g())
    assert torch.bincount(y[idx]).tolist() == [2, 2, 2] and torch.equal(idx, splits.balanced_indices(y, 2, g()))
    half = splits.balanced_indices(y, lambda n: n // 2, g())
    assert torch.bincount(y[half]).tolist() == [5, 2, 1]
    rest = splits.complement(len(y), half)
    assert sorted(rest.tolist() + half.tolist()) == list(range(len(y))) and rest.tolist() == sorted(rest.tolist())
