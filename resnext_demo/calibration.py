"""How far to believe a probability: temperature scaling (Guo et al., 2017) and its reliability numbers.

A checkpoint's temperature T lives in its metadata entry `calibration` (with what it was fitted on and the
reliability before and after) and, once loaded, on the model as the plain attribute `model.calibration`
(`weights.load_checkpoint` sets it), so every copy the app makes of a model (eval views, fine-tune copies)
carries it. Every probability the app shows is `softmax(logits / T)` via `probabilities`; logits,
attributions and top-1 are untouched (T > 0 keeps the order of the classes).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

N_BINS = 15  # equal-width confidence bins, the usual choice for ECE on CIFAR-10 (Guo et al.)


def temperature_of(model: nn.Module) -> float:
    """The model's calibration temperature (1.0, i.e. the bare softmax, when it has none)."""
    cal = getattr(model, "calibration", None)
    return float(cal["temperature"]) if cal else 1.0


def probabilities(model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """Calibrated class probabilities of `model`'s logits (float32): softmax(logits / T) over the last dim."""
    return torch.softmax(logits.float() / temperature_of(model), dim=-1)


@dataclass
class Reliability:
    """Calibration of probabilities on labelled images: ECE, NLL, accuracy vs mean confidence, and the
    reliability diagram's bins (equal-width in top-1 probability)."""

    n: int
    accuracy: float
    confidence: float  # mean top-1 probability
    ece: float  # expected calibration error: sum over bins of |accuracy - confidence| weighted by bin size
    nll: float  # mean negative log-likelihood of the true class
    bin_counts: list[int]
    bin_accuracy: list[float]  # NaN in empty bins
    bin_confidence: list[float]

    def to_dict(self) -> dict:
        """JSON-ready (NaN bins become None)."""
        d = asdict(self)
        for k in ("bin_accuracy", "bin_confidence"):
            d[k] = [None if math.isnan(v) else round(v, 5) for v in d[k]]
        for k in ("accuracy", "confidence", "ece", "nll"):
            d[k] = None if math.isnan(d[k]) else round(d[k], 6)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Reliability":
        """Inverse of to_dict."""
        d = dict(d)
        for k in ("bin_accuracy", "bin_confidence"):
            d[k] = [math.nan if v is None else float(v) for v in d[k]]
        d["nll"] = math.nan if d.get("nll") is None else d["nll"]
        return cls(**d)


def reliability(logits: torch.Tensor, y: torch.Tensor, temperature: float = 1.0, n_bins: int = N_BINS) -> Reliability:
    """ECE, NLL and the reliability bins of softmax(logits / temperature) against labels `y`."""
    logp = torch.log_softmax(logits.float() / temperature, dim=1)
    conf, pred = logp.exp().max(1)
    rel = reliability_of_top1(conf, pred == y.long(), n_bins)
    rel.nll = -logp.gather(1, y.long()[:, None]).mean().item()
    return rel


def reliability_of_top1(conf: torch.Tensor, correct: torch.Tensor, n_bins: int = N_BINS) -> Reliability:
    """ECE and bins from each image's top-1 probability and whether top-1 was right (NLL unknown: NaN)."""
    conf, correct = conf.float(), correct.float()
    edges = torch.linspace(0, 1, n_bins + 1)
    which = torch.bucketize(conf, edges[1:-1], right=True)  # bin i holds (edges[i], edges[i+1]]
    counts = torch.bincount(which, minlength=n_bins)
    acc = torch.zeros(n_bins).index_add_(0, which, correct)
    cf = torch.zeros(n_bins).index_add_(0, which, conf)
    nonempty = counts > 0
    ece = ((acc - cf).abs()[nonempty].sum() / max(len(conf), 1)).item()
    per = counts.clamp(min=1)
    nan = torch.full((n_bins,), math.nan)
    return Reliability(len(conf), correct.mean().item(), conf.mean().item(), ece, math.nan, counts.tolist(),
                       torch.where(nonempty, acc / per, nan).tolist(), torch.where(nonempty, cf / per, nan).tolist())


def fit_temperature(logits: torch.Tensor, y: torch.Tensor, objective: str = "ece", lo: float = 0.05,
                    hi: float = 20.0, steps: int = 100) -> float:
    """The temperature in [lo, hi] that minimises `objective` on labels `y`: "ece" (15 bins; what the app
    reports) or "nll" (classic temperature scaling). On the default model both give the same NLL on the
    reporting half; the ECE choice is the better-calibrated one there (docs/trust.md). A log-spaced grid, then
    a finer one around its best point, not an optimiser: ECE is piecewise constant in T."""
    if objective not in ("ece", "nll"):
        raise ValueError(f"objective must be 'ece' or 'nll', not {objective!r}")
    logits, y = logits.float(), y.long()

    def loss(t: float) -> float:
        if objective == "nll":
            return torch.nn.functional.cross_entropy(logits / t, y).item()
        return reliability(logits, y, t).ece

    a, b = math.log(lo), math.log(hi)
    for _ in range(2):  # coarse, then fine around the coarse minimum
        grid = torch.linspace(a, b, steps).exp().tolist()
        best = min(range(steps), key=lambda i: loss(grid[i]))
        step = (b - a) / (steps - 1)
        a, b = a + max(best - 1, 0) * step, a + min(best + 1, steps - 1) * step
    return round(grid[best], 5)
