"""evaluate: top-1, per class, ensembles (the CLI's --split val and uploads are in test_train.py, test_weights.py)."""
from __future__ import annotations

import torch


class _Fixed(torch.nn.Module):
    """Returns preset logits for the images in the order predict_logits feeds them (one pass per call)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits, self.i = logits, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.logits[self.i:self.i + len(x)]
        self.i = (self.i + len(x)) % len(self.logits)
        return out


def test_ensemble_accuracy_averages_probabilities() -> None:
    """Each model is right on half the images; where it is wrong it is only mildly so, so the mean softmax
    is right everywhere (an argmax vote would tie); a model with itself scores its own accuracy."""
    from resnext_demo.evaluate import ensemble_accuracy, evaluate
    y = torch.arange(8) % 2
    x = torch.zeros(8, 3, 32, 32, dtype=torch.uint8)

    def probs(right: torch.Tensor, p_right: float, p_wrong: float) -> torch.Tensor:
        p = torch.where(right, p_right, 1 - p_wrong)  # probability of the true class
        out = torch.zeros(8, 10)
        out[torch.arange(8), y], out[torch.arange(8), 1 - y] = p, 1 - p
        return (out + 1e-9).log()

    first = torch.arange(8) < 4
    a, b = _Fixed(probs(first, 0.99, 0.6)), _Fixed(probs(~first, 0.99, 0.6))
    assert evaluate(a, x, y)["top1"] == 0.5 and evaluate(b, x, y)["top1"] == 0.5
    assert ensemble_accuracy([a, b], x, y) == 1.0 and ensemble_accuracy([a, b], x, y, tta=True) == 1.0
    assert ensemble_accuracy([a, a], x, y) == 0.5
