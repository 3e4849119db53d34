"""Specialization over a dataset: how each group of every block behaves over many labelled images (class
preference, colour and blur sensitivity, correlations), next to untrained copies of the architecture;
cached per checkpoint and data source (safetensors under the data cache, or shipped in assets/).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torchvision.transforms.functional import gaussian_blur

from . import data, weights
from .explain import groups_of
from .groups import group_output
from .predict import eval_view
from .model import device_of


SPECIALIZATION_IMAGES = 2000  # a balanced prefix of the test split: stable class means, ~1 forward/s-budget on a CPU


@dataclass
class Specialization:
    """How each group of a block behaves over a set of labelled images (arrays have G rows)."""

    layer: str
    class_means: np.ndarray  # G x K: mean activation of the group on each class's images
    selectivity: np.ndarray  # G: (mu_max - mu_others) / (mu_max + mu_others), 0 = no class preference
    top_images: np.ndarray  # G x 9: indices (into the images given) that most activate the group
    top_values: np.ndarray  # G x 9: their activations
    correlation: np.ndarray  # G x G: Pearson correlation of the groups' activations across images
    colour: np.ndarray  # G: relative change of the group's activation when images lose their colour
    blur: np.ndarray  # G: relative change when images lose edges and texture (Gaussian blur)
    mean: np.ndarray  # G: mean activation over all images (0 = a dead group)
    # Do the groups partition the channels by function? Mean correlation (across images) of channel pairs
    # inside one group vs pairs from different groups, and the fraction of random channel partitions of the
    # same sizes whose groups differ in colour sensitivity at least as much as the real ones (small = the
    # real groups are organised by colour, as AlexNet's two GPU groups were).
    within_corr: float = float("nan")
    between_corr: float = float("nan")
    colour_p: float = float("nan")
    # The same statistics for untrained copies of the architecture (one value per seed; empty = not computed):
    # what the grouping alone produces, so a verdict can say what training added (see untrained_copy).
    control_gap: np.ndarray = field(default_factory=lambda: np.zeros(0))  # within_corr - between_corr
    control_colour_p: np.ndarray = field(default_factory=lambda: np.zeros(0))
    control_selectivity: np.ndarray = field(default_factory=lambda: np.zeros(0))  # mean over groups

    @property
    def preferred_class(self) -> np.ndarray:
        """G: the class each group fires most for."""
        return self.class_means.argmax(1)

    @property
    def gap(self) -> float:
        """How much more a group's channels correlate with each other than with other groups' channels."""
        return self.within_corr - self.between_corr


def _grey(x: torch.Tensor) -> torch.Tensor:
    """uint8 N x 3 x H x W -> the same images in greyscale (ITU-R 601 luma in all three channels)."""
    w = torch.tensor([0.299, 0.587, 0.114]).reshape(1, 3, 1, 1)
    return (x.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8).expand_as(x)


def _channel_means(view: nn.Module, x_uint8: torch.Tensor, paths: dict[str, str], batch_size: int,
                   transform=None) -> dict[str, torch.Tensor]:
    """N x C spatial mean of every channel at each module path ({layer: path}), one pass over the images."""
    out: dict[str, list[torch.Tensor]] = {layer: [] for layer in paths}
    handles = [view.get_submodule(path).register_forward_hook(
        lambda _m, _i, o, layer=layer: out[layer].append(o.float().mean((2, 3)).cpu())) for layer, path in paths.items()]
    device = device_of(view)
    try:
        with torch.inference_mode():
            for i in range(0, len(x_uint8), batch_size):
                xb = x_uint8[i:i + batch_size]
                view(data.normalize((transform(xb) if transform else xb).to(device)))
    finally:
        for h in handles:
            h.remove()
    return {layer: torch.cat(v) for layer, v in out.items()}


def _within_between(ch: torch.Tensor, groups: int) -> tuple[float, float]:
    """Mean correlation of channel pairs in the same group and in different groups (dead channels left out)."""
    c = ch.shape[1]
    gid = torch.arange(c) // (c // groups)
    alive = ch.std(0) > 0
    if alive.sum() < 2:
        return float("nan"), float("nan")
    r = torch.corrcoef(ch[:, alive].double().T)
    g = gid[alive]
    same = g[:, None] == g[None, :]
    off = ~torch.eye(len(g), dtype=torch.bool)
    within, between = r[same & off], r[~same]
    return (float(within.mean()) if within.numel() else float("nan"),
            float(between.mean()) if between.numel() else float("nan"))


def _partition_p(per_channel: torch.Tensor, groups: int, trials: int = 500, seed: int = 0) -> float:
    """Fraction of random equal-size channel partitions whose group means of `per_channel` vary at least as
    much as the real groups' (a permutation test; small = the real grouping follows this property)."""
    w = len(per_channel) // groups
    spread = lambda v: float(v.reshape(groups, w).mean(1).var())  # noqa: E731
    real = spread(per_channel)
    gen = torch.Generator().manual_seed(seed)
    hits = sum(spread(per_channel[torch.randperm(len(per_channel), generator=gen)]) >= real - 1e-15
               for _ in range(trials))
    return (hits + 1) / (trials + 1)  # +1: the real partition is one of the possible ones


def group_specialization(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, layers: list[str] | None = None,
                         batch_size: int = 250) -> dict[str, Specialization]:
    """Specialization of every group of `layers` (default: every block) over uint8 images N x 3 x 32 x 32.

    Three passes over the images: as they are, in greyscale, and blurred."""
    layers = list(model.grouped_convs()) if layers is None else layers
    if len(images) != len(labels) or len(images) < 9:
        raise ValueError("need at least 9 images, with one label each")
    view = eval_view(model)
    paths = {layer: group_output(model, layer) for layer in layers}
    plain = _channel_means(view, images, paths, batch_size)
    grey = _channel_means(view, images, paths, batch_size, _grey)
    blurred = _channel_means(view, images, paths, batch_size,
                             lambda b: gaussian_blur(b.float(), [5, 5], [1.5, 1.5]).round().to(torch.uint8))
    k = getattr(getattr(model, "config", None), "num_classes", None) or int(labels.max()) + 1
    onehot = F.one_hot(labels.long(), k).double()  # N x K
    counts = onehot.sum(0).clamp(min=1)
    result = {}
    for layer in layers:
        g = groups_of(model, layer)
        n = len(images)
        a = plain[layer].double().reshape(n, g, -1).mean(2)  # N x G: a group's mean = mean of its channels
        a_grey = grey[layer].double().reshape(n, g, -1).mean(2)
        a_blur = blurred[layer].double().reshape(n, g, -1).mean(2)
        cm = (onehot.T @ a / counts[:, None]).T  # G x K
        best = cm.max(1).values
        others = (cm.sum(1) - best) / max(k - 1, 1)
        sel = torch.where(best + others > 0, (best - others) / (best + others), torch.zeros_like(best))
        top = torch.topk(a.T, 9, dim=1)
        alive = a.std(0) > 0  # a dead group has no variance: its correlations are undefined, shown as 0
        corr = torch.zeros(g, g, dtype=torch.float64)
        idx = alive.nonzero()[:, 0]
        if len(idx):
            corr[idx[:, None], idx[None, :]] = torch.corrcoef(a[:, alive].T).reshape(len(idx), len(idx))
        scale = a.mean(0).clamp(min=1e-12)
        ch = plain[layer].double()
        ch_colour = (ch - grey[layer].double()).abs().mean(0) / ch.mean(0).clamp(min=1e-12)
        within, between = _within_between(ch, g)
        result[layer] = Specialization(
            layer, cm.numpy(), sel.numpy(), top.indices.numpy(), top.values.numpy(), corr.numpy(),
            ((a - a_grey).abs().mean(0) / scale).numpy(), ((a - a_blur).abs().mean(0) / scale).numpy(),
            a.mean(0).numpy(), within, between, _partition_p(ch_colour, g) if g > 1 else float("nan"))
    return result


def model_digest(model: nn.Module) -> str:
    """16 hex chars of weights.state_digest (parameters and buffers): the cache key of a model's analyses."""
    return weights.state_digest(model)[:16]


def _from_tensor(t: torch.Tensor) -> np.ndarray | float:
    """Cache tensor -> the Specialization field: 0-d tensors are the float fields."""
    return float(t) if t.dim() == 0 else t.numpy()


def specialization_file(model: nn.Module, source: str, n: int = SPECIALIZATION_IMAGES) -> str:
    """The cache file name of a model's specialization on a source: its key is the weights, the data and n."""
    return f"groups-v3-{model_digest(model)}-{data.source_id(source)}-n{n}.safetensors"


def _specialization_path(model: nn.Module, source: str, n: int, cache: str | None = None,
                         rebuild: bool = False) -> Path:
    """Where a specialization is (or goes): `cache`, else the data cache, else a file shipped in assets/."""
    path = (Path(cache) if cache else data.cache_dir() / "analysis") / specialization_file(model, source, n)
    if cache is None and not rebuild and not path.is_file() and (data.ASSETS_DIR / path.name).is_file():
        path = data.ASSETS_DIR / path.name  # the default checkpoint's, shipped: the first visitor does not wait
    return path


def specialization_ready(model: nn.Module, source: str, n: int = SPECIALIZATION_IMAGES) -> bool:
    """Whether `specialization_cached` would only read a file (so a GPU booking for it can be short)."""
    return _specialization_path(model, source, n).is_file()


CONTROL_SEEDS: tuple[int, ...] = (0, 1, 2, 3, 4)
CONTROL_CALIBRATION = 2000  # training images that set an untrained copy's BN statistics


def untrained_copy(model: nn.Module, seed: int, images: torch.Tensor, batch_size: int = 250) -> nn.Module:
    """`model`'s architecture freshly initialized from `seed`, its BN statistics recalibrated on uint8 `images`
    (training images), in eval mode: what the architecture does before any training."""
    from .model import build_from_config

    # Seeded through the process-wide generator (the layers' own init draws from it); fork_rng puts the
    # caller's state back afterwards.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        copy = build_from_config(model.config).to(device_of(model))
    bns = [m for m in copy.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:  # momentum None = a plain average over the calibration batches
        bn.reset_running_stats()
        bn.momentum = None
    copy.train()
    device = device_of(copy)
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            copy(data.normalize(images[i:i + batch_size].to(device)))
    return copy.eval()


def specialization_control(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, calibration: torch.Tensor,
                           result: dict[str, Specialization], seeds: tuple[int, ...] = CONTROL_SEEDS,
                           on_step: Callable[[int], object] | None = None) -> None:
    """Fill `result`'s control_* fields: `group_specialization` on the same images for untrained copies of the
    architecture (one per seed, BN recalibrated on the uint8 training images `calibration`); `on_step(i)` is
    called before copy i (for a progress bar)."""
    controls = []
    for i, s in enumerate(seeds):
        if on_step is not None:
            on_step(i)
        controls.append(group_specialization(untrained_copy(model, s, calibration), images, labels, list(result)))
    for layer, spec in result.items():
        spec.control_gap = np.array([c[layer].gap for c in controls])
        spec.control_colour_p = np.array([c[layer].colour_p for c in controls])
        spec.control_selectivity = np.array([float(np.mean(c[layer].selectivity)) for c in controls])


def specialization_cached(model: nn.Module, source: str, n: int = SPECIALIZATION_IMAGES,
                          cache: str | None = None, rebuild: bool = False,
                          on_step: Callable[[int, int, str], object] | None = None) -> dict[str, Specialization]:
    """`group_specialization` of every block on the first `n` test images of `source`, with its untrained
    control (`specialization_control`, CONTROL_SEEDS, the first CONTROL_CALIBRATION training images), computed
    once per checkpoint and data source and kept as safetensors under the data cache ('analysis/'); without
    `cache`, a file shipped in resnext_demo/assets/ (`python -m resnext_demo.assets specialization`) is read too.
    When it computes, `on_step(step, steps, what)` reports each of its 1 + len(CONTROL_SEEDS) passes."""
    path = _specialization_path(model, source, n, cache, rebuild)
    names = [f.name for f in Specialization.__dataclass_fields__.values() if f.name != "layer"]
    if path.is_file() and not rebuild:
        t = load_file(str(path))
        layers = sorted({k.rsplit("/", 1)[0] for k in t}, key=list(model.grouped_convs()).index)
        return {layer: Specialization(layer, *(_from_tensor(t[f"{layer}/{f}"]) for f in names)) for layer in layers}
    steps = 1 + len(CONTROL_SEEDS)
    report = on_step or (lambda *a: None)
    images, labels = data.load_split(source, "test")
    report(0, steps, f"the trained model's groups over {min(n, len(labels)):,} test images")
    result = group_specialization(model, images[:n], labels[:n])
    specialization_control(model, images[:n], labels[:n], data.load_split(source, "train")[0][:CONTROL_CALIBRATION],
                           result, on_step=lambda i: report(1 + i, steps, f"untrained copy {i + 1} of {steps - 1}"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({f"{layer}/{f}": torch.tensor(np.array(getattr(s, f))).contiguous()
               for layer, s in result.items() for f in names}, str(tmp))
    tmp.replace(path)  # atomic: a concurrent reader sees the old file or the whole new one
    return result

