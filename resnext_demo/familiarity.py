"""Does an image look like CIFAR-10 at all? Gaussian distances in the model's feature space, layer by layer.

Scores computed from the logits (max softmax, energy, max logit) do not catch nonsense: noise and flat
images get confident logits. Nor did k-nearest-neighbour distance on normalised penultimate features on
this model (27 % of synthetic far images flagged; docs/trust.md). What works here is Mahalanobis distance
(Lee et al., 2018) at several depths: the stem's and every stage's output is described by each channel's
spatial mean and standard deviation (low-level statistics: noise, flat colours, stripes and text pages are
far off there), fitted by one Gaussian per layer on training images, and the last stage's pooled features
(what the classifier reads) by one Gaussian per class with a shared covariance. Each layer's distance
becomes a tail probability among held-in images the model never trained on; an image's score is
1 - the smallest of them (its most surprising layer), and the threshold flags 5 % of the held-in images.

A checkpoint carries it: tensors `familiarity.*` (means, precisions, the held-in scores, ~3.7 MB for the
default model) and its settings and provenance in the metadata. `python -m resnext_demo.calibrate` builds it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from . import data
from .model import device_of

FLAG_RATE = 0.05  # the share of held-in CIFAR-10 images the threshold flags
TENSOR_PREFIX = "familiarity."
RIDGE = 1e-3  # added to each covariance, relative to its mean variance, so dead channels stay invertible


@dataclass
class LayerGaussian:
    """One depth's reference: class means (K x D, K = 1 when class-agnostic), shared precision (D x D), and
    the sorted distances of the held-in images."""

    stage: int  # 0 = the stem's output, i = stage i's output
    stats: str  # "mean+std" (per channel, over positions) or "mean" (the pooled vector)
    means: torch.Tensor
    precision: torch.Tensor
    heldin: torch.Tensor

    def describe(self, stages: list[torch.Tensor]) -> torch.Tensor:
        """This layer's description of each image of a batch, from the collected stage outputs."""
        return describe(stages, self.stage, self.stats)

    def distance(self, v: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance of each row of `v` to the nearest class mean."""
        d = v[:, None, :] - self.means[None]
        return ((d @ self.precision) * d).sum(-1).min(1).values

    def tail(self, v: torch.Tensor) -> torch.Tensor:
        """Share of held-in images at least as far as each row of `v` (1 = ordinary, 0 = beyond all of them)."""
        return _tail(self.heldin, self.distance(v))


def describe(stages: list[torch.Tensor], stage: int, stats: str) -> torch.Tensor:
    """N x D: stage `stage`'s output pooled per channel: its mean ("mean"), or its mean and std ("mean+std")."""
    o = stages[stage].float()
    return o.mean((2, 3)) if stats == "mean" else torch.cat([o.mean((2, 3)), o.std((2, 3))], 1)


def _tail(sorted_ref: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return 1.0 - torch.searchsorted(sorted_ref, s.contiguous(), right=False).float() / max(len(sorted_ref), 1)


@dataclass
class Familiarity:
    """A model's "looks like its training data" detector: one Gaussian per depth, a threshold, held-in scores."""

    layers: list[LayerGaussian]
    threshold: float  # scores above it are flagged
    heldin: torch.Tensor  # sorted combined scores of the held-in images
    info: dict = field(default_factory=dict)  # what it was built and fitted on

    def score(self, stages: list[torch.Tensor]) -> torch.Tensor:
        """Per image: 1 - the smallest tail probability over the layers (higher = stranger)."""
        return 1.0 - torch.stack([g.tail(g.describe(stages)) for g in self.layers]).min(0).values

    def rarity(self, scores: torch.Tensor) -> torch.Tensor:
        """Share of held-in images that score at least as high as each of `scores` (1 = ordinary)."""
        return _tail(self.heldin, scores.float())

    def with_classes(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, new: list[int]) -> "Familiarity":
        """The same detector, its class-conditional layers also knowing the classes `new` (their mean over the
        uint8 images `x` labelled `y`): a head-only fine-tune's new classes then look familiar."""
        layers = []
        for g in self.layers:
            if len(g.means) > 1 and new:
                _, (v,) = describe_all(model, x, [(g.stage, g.stats)])
                extra = torch.stack([v[y == c].mean(0) for c in new])
                g = LayerGaussian(g.stage, g.stats, torch.cat([g.means, extra]), g.precision, g.heldin)
            layers.append(g)
        return Familiarity(layers, self.threshold, self.heldin, {**self.info, "added_classes": len(new)})

    def tensors(self) -> dict[str, torch.Tensor]:
        """What `weights.save_checkpoint` stores."""
        out = {TENSOR_PREFIX + "heldin": self.heldin.float()}
        for i, g in enumerate(self.layers):
            out.update({f"{TENSOR_PREFIX}{i}.{k}": getattr(g, k).float() for k in ("means", "precision", "heldin")})
        return out

    def meta(self) -> dict:
        """The metadata entry (JSON)."""
        return {"threshold": self.threshold, "layers": [{"stage": g.stage, "stats": g.stats,
                                                         "classes": len(g.means)} for g in self.layers], **self.info}

    @classmethod
    def from_checkpoint(cls, meta: dict | None, tensors: dict[str, torch.Tensor]) -> "Familiarity | None":
        """Rebuild from a checkpoint's metadata entry and tensors; None when it has none."""
        if not meta or TENSOR_PREFIX + "heldin" not in tensors:
            return None
        layers = [LayerGaussian(int(spec["stage"]), str(spec["stats"]),
                                *(tensors[f"{TENSOR_PREFIX}{i}.{k}"].float() for k in ("means", "precision", "heldin")))
                  for i, spec in enumerate(meta["layers"])]
        info = {k: v for k, v in meta.items() if k not in ("threshold", "layers")}
        return cls(layers, float(meta["threshold"]), tensors[TENSOR_PREFIX + "heldin"].float(), info)


def supports(model: nn.Module) -> bool:
    """Whether the model exposes its stage outputs (`forward_features(x, stages)`) and pooled features."""
    import inspect

    f = getattr(model, "forward_features", None)
    return f is not None and "stages" in inspect.signature(f).parameters and hasattr(model, "forward_head")


def embed(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(logits, [stem output, each stage's output]) of a normalized batch in one forward pass; the logits are
    exactly model(x)'s."""
    stages: list[torch.Tensor] = []
    logits = model.forward_head(model.forward_features(x, stages=stages))
    return logits, stages


def _check_eval(model: nn.Module) -> None:
    if model.training:
        raise ValueError("the model must be in eval mode: train-mode BatchNorm would describe the batch, not the image")


def describe_all(model: nn.Module, x: torch.Tensor, spec: list[tuple[int, str]], batch_size: int = 500
                 ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and each (stage, stats) description of uint8 images N x 3 x 32 x 32, batched (CPU float32); the
    model must be in eval mode (train-mode BN would use batch statistics)."""
    _check_eval(model)
    view, device = model, device_of(model)
    logits, descs = [], [[] for _ in spec]
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            xb = data.normalize(x[i:i + batch_size].to(device)).contiguous(memory_format=torch.channels_last)
            lo, stages = embed(view, xb)
            logits.append(lo.float().cpu())
            for j, (stage, stats) in enumerate(spec):
                descs[j].append(describe(stages, stage, stats).cpu())
    return torch.cat(logits), [torch.cat(d) for d in descs]


def _gaussian(v: torch.Tensor, y: torch.Tensor | None, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class means (or the one mean) and the shared precision of descriptions `v`."""
    v = v.double()
    means = v.mean(0, keepdim=True) if y is None else torch.stack([v[y == c].mean(0) for c in range(num_classes)])
    centred = v - (means[0] if y is None else means[y])
    cov = centred.T @ centred / len(v)
    cov += RIDGE * cov.diagonal().mean() * torch.eye(len(cov), dtype=cov.dtype)
    return means.float(), torch.linalg.inv(cov).float()


# Stem, stage 1 and stage 2 by their channels' mean and std (one Gaussian each), the last stage by the pooled
# vector the classifier reads, per class (spec as (stage, stats, per_class); stage -1 = the last).
DEFAULT_SPEC = ((0, "mean+std", False), (1, "mean+std", False), (2, "mean+std", False), (-1, "mean", True))


def build(model: nn.Module, reference: tuple[torch.Tensor, torch.Tensor], heldin: torch.Tensor,
          spec: tuple = DEFAULT_SPEC, rate: float = FLAG_RATE, info: dict | None = None) -> Familiarity:
    """Fit the Gaussians on `reference` (uint8 images, labels) and the threshold on `heldin` (uint8 images the
    model never trained on) so that `rate` of them are flagged."""
    n_stages = 1 + len(model.stage_names)
    layers_spec = [((s % n_stages), stats, per_class) for s, stats, per_class in spec]
    x, y = reference
    _, ref = describe_all(model, x, [(s, st) for s, st, _ in layers_spec])
    _, held = describe_all(model, heldin, [(s, st) for s, st, _ in layers_spec])
    k = model.fc.out_features
    layers = []
    for (stage, stats, per_class), v, h in zip(layers_spec, ref, held):
        means, prec = _gaussian(v, y if per_class else None, k)
        g = LayerGaussian(stage, stats, means, prec, torch.empty(0))
        g.heldin = g.distance(h).sort().values
        layers.append(g)
    scores = 1.0 - torch.stack([g.tail(v) for g, v in zip(layers, held)]).min(0).values
    threshold = float(torch.quantile(scores, 1.0 - rate))
    return Familiarity(layers, threshold, scores.sort().values, {"rate": rate, **(info or {})})


def scores_uint8(model: nn.Module, fam: Familiarity, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """The familiarity score of each uint8 image (N x 3 x 32 x 32); the model must be in eval mode."""
    _check_eval(model)
    view, device, out = model, device_of(model), []
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            xb = data.normalize(x[i:i + batch_size].to(device)).contiguous(memory_format=torch.channels_last)
            out.append(fam.score([s.float().cpu() for s in embed(view, xb)[1]]))
    return torch.cat(out) if out else torch.empty(0)


def auroc(inside: torch.Tensor, outside: torch.Tensor) -> float:
    """Probability that an outside image scores higher than an inside one (ties count half)."""
    a, b = inside.double(), outside.double()
    greater = (b[:, None] > a[None]).double().sum() + 0.5 * (b[:, None] == a[None]).double().sum()
    return float(greater / (len(a) * len(b)))
