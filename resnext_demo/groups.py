"""Cardinality: what each of a block's C groups (paths) does for one image: the activation that carries
them, per-group importance (Gradient x Activation; Conductance with the shortcut's share), knock-outs and
per-group Grad-CAM. Built on explain.py; hooks and backward passes run on `predict.eval_view(model)`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from captum.attr import LayerGradCam, LayerGradientXActivation

from . import calibration, data
from .errors import UserError
from .faithfulness import Faithfulness, faithfulness
from .explain import _baseline, check_image, groups_of, is_torchvision, split_groups
from .predict import eval_view
from .model import device_of

# A ResNeXt block's grouped 3x3 conv computes C independent paths; group g owns the contiguous channels
# [g*w, (g+1)*w) of the conv's output, and the block's BN + ReLU after it are per channel, so the paths
# stay separate until the 1x1 conv3 aggregates them. Every view below looks at the block's activation
# after that ReLU ('act2'): the exact signal each path hands to the aggregation.

GROUP_METHODS: tuple[str, ...] = ("Gradient x Activation", "Conductance")
ABLATIONS: tuple[str, ...] = ("zero", "mean")


def group_output(model: nn.Module, layer: str) -> str:
    """Module path of the activation that carries `layer`'s groups: 'layer1.0.conv2' -> 'layer1.0.act2'.

    The torchvision seed calls one ReLU module three times per block, so there its per-channel BN
    ('bn2') stands in: hooks on a reused module would fire on all three calls."""
    if layer not in model.grouped_convs():
        raise UserError(f"{layer!r} is not a grouped conv; choose one of {', '.join(model.grouped_convs())}")
    head = layer.rpartition(".")[0]
    return f"{head}.bn2" if is_torchvision(model) else f"{head}.act2"


def _group_channels(model: nn.Module, layer: str, groups: list[int] | tuple[int, ...]) -> torch.Tensor:
    """Boolean channel mask (length C) of the listed groups of `layer`."""
    conv = model.grouped_convs()[layer]
    g, w = conv.groups, conv.out_channels // conv.groups
    bad = [i for i in groups if not 0 <= int(i) < g]
    if bad:
        raise UserError(f"{layer} has groups 0..{g - 1}; got {bad}")
    mask = torch.zeros(conv.out_channels, dtype=torch.bool)
    for i in groups:
        mask[int(i) * w:(int(i) + 1) * w] = True
    return mask


@dataclass
class GroupImportance:
    """Signed attribution of one class's logit to each group of a block (positive = evidence for it)."""

    values: np.ndarray  # G: the group's channels and positions summed
    total: float  # the whole layer's attribution; values.sum() equals it
    method: str
    layer: str
    target: int
    contrast: int | None  # when set, values explain logit[target] - logit[contrast] ("why not that class?")
    # Conductance only (None otherwise). The part of f(x) - f(black) that flows through the block's shortcut,
    # computed from the shortcut's own tensor (not as a remainder), so groups + shortcut = change is a check.
    shortcut: float | None = None
    shortcut_kind: str | None = None  # "identity" or "projection" (a 1x1 conv + BN), read from the block
    change: float | None = None  # f(x) - f(black): what the groups and the shortcut together must add up to
    steps: int | None = None  # integration steps used (doubled until the values settled)
    step_error: float | None = None  # largest change of any group or the shortcut from steps/2 to steps

    @property
    def completeness_gap(self) -> float | None:
        """groups + shortcut - (f(x) - f(black)): 0 for an exact integral, so its size shows the error left."""
        if self.shortcut is None or self.change is None:
            return None
        return float(self.values.sum() + self.shortcut - self.change)


# Conductance doubles its steps until no group and not the shortcut moves more than this (logit) from half
# the steps, and groups + shortcut match f(x) - f(black) as closely. On the micro model (the first default) that took
# 256-512 steps; at Captum's usual 32 (Gauss-Legendre, left sum) group totals were off by up to 0.46 logit.
CONDUCTANCE_TOL = 0.02
CONDUCTANCE_MAX_STEPS = 512


def group_importance(model: nn.Module, x: torch.Tensor, layer: str, target: int, method: str = "Gradient x Activation",
                     contrast: int | None = None, steps: int = 32, max_steps: int = CONDUCTANCE_MAX_STEPS,
                     tol: float = CONDUCTANCE_TOL) -> GroupImportance:
    """Attribution of the `target` logit to each group of `layer`'s grouped conv.

    'Gradient x Activation' (Captum's LayerGradientXActivation) is one backward pass. 'Conductance' (black-image
    baseline) integrates along the path from the baseline, starting at `steps` and doubling them (up to
    `max_steps`) until no group and not the shortcut moves more than `tol` logit from half the steps and
    groups + shortcut match f(x) - f(black) within `tol`; the block's shortcut share is integrated from its own
    tensor. With `contrast`, the explained output is logit[target] - logit[contrast].
    """
    if method not in GROUP_METHODS:
        raise UserError(f"unknown group method {method!r}; choose one of {', '.join(GROUP_METHODS)}")
    check_image(model, x, target)
    if contrast is not None:
        check_image(model, x, contrast)
    if int(steps) < 2 or int(max_steps) < int(steps):
        raise UserError("Conductance needs steps >= 2 and max_steps >= steps")
    groups = groups_of(model, layer)
    view = eval_view(model)
    module = view.get_submodule(group_output(model, layer))
    t, c = int(target), (None if contrast is None else int(contrast))

    def forward(inp: torch.Tensor) -> torch.Tensor:  # one output column: the logit or the logit margin
        z = view(inp).float()
        return z[:, t:t + 1] if c is None else z[:, t:t + 1] - z[:, c:c + 1]

    device = device_of(model)
    xx = x.detach().to(device, torch.float32)
    if method == "Conductance":
        block = view.get_submodule(layer.rpartition(".")[0])
        n = int(steps) + int(steps) % 2  # even: the half-step estimate uses every other point
        while True:
            fine, coarse, change = _block_conductance(block, module, forward, xx, _baseline("black", xx), n, groups)
            error = float(np.abs(fine - coarse).max())
            if max(error, abs(fine.sum() - change)) <= tol or 2 * n > max_steps:
                break
            n *= 2
        kind = None if not hasattr(block, "downsample") else "identity" if block.downsample is None else "projection"
        return GroupImportance(fine[:groups], float(fine[:groups].sum()), method, layer, t, c, float(fine[groups]),
                               kind, change, n, error)
    with torch.inference_mode(False), torch.enable_grad():
        attr = LayerGradientXActivation(forward, module).attribute(xx.clone().requires_grad_(), target=0)
    per_group = split_groups(attr.detach().double().cpu(), groups).flatten(1).sum(1).numpy()
    return GroupImportance(per_group, float(attr.detach().double().sum()), method, layer, t, c)


def _block_conductance(block: nn.Module, act: nn.Module, forward, x: torch.Tensor, baseline: torch.Tensor, n: int,
                       groups: int, chunk: int = 64) -> tuple[np.ndarray, np.ndarray, float]:
    """Conductance of a block's groups and of its shortcut on the straight path baseline -> x.

    The block computes relu(r + s): r = bn3(conv3(act2)) carries the groups, s the shortcut (the block's input,
    or its 1x1 projection). Along the path, conductance through a tensor a is the integral of dF/da . da; for
    r and s the gradient is the same (dF/d(r + s)), and r's conductance equals act2's summed over channels
    (bn3 . conv3 is affine). Trapezoid rule in the tensor's own space on n equal steps, computed in chunks
    of `chunk` points; returns (G groups + shortcut with n steps, the same with n/2 steps, f(x) - f(baseline)).
    """
    got: dict[str, torch.Tensor] = {}
    hooks = [act.register_forward_hook(lambda _m, _i, o: got.__setitem__("a", o)),
             block.bn3.register_forward_hook(lambda _m, _i, o: got.__setitem__("r", o))]
    if getattr(block, "downsample", None) is None:  # identity: the shortcut is the block's input itself
        hooks.append(block.register_forward_pre_hook(lambda _m, i: got.__setitem__("s", i[0])))
    else:
        hooks.append(block.downsample.register_forward_hook(lambda _m, _i, o: got.__setitem__("s", o)))
    alphas = torch.linspace(0, 1, n + 1, dtype=torch.float64)
    fine = torch.zeros(groups + 1, dtype=torch.float64)
    coarse = torch.zeros(groups + 1, dtype=torch.float64)
    ends = {}
    step = chunk - chunk % 2  # even, so chunks start on even points and the n/2 grid nests in each chunk
    try:
        for j in range(0, n, step):
            idx = list(range(j, min(j + step, n) + 1))  # overlaps the next chunk by one point
            a_ = alphas[idx].to(x.device, torch.float32).reshape(-1, 1, 1, 1)
            with torch.inference_mode(False), torch.enable_grad():
                out = forward(baseline + a_ * (x - baseline))
                ga, gz = torch.autograd.grad(out.sum(), [got["a"], got["r"]])
            ends.update({i: float(out[k].detach()) for k, i in enumerate(idx) if i in (0, n)})
            a, s = got["a"].detach().double(), got["s"].detach().double()
            ga, gz = ga.double(), gz.double()
            for every, total in ((1, fine), (2, coarse)):  # all points, then every other one (n/2 steps)
                per_group = _trapezoid(ga[::every], a[::every]).reshape(groups, -1).sum(1)
                total += torch.cat([per_group, _trapezoid(gz[::every], s[::every]).sum()[None]]).cpu()
    finally:
        for h in hooks:
            h.remove()
    return fine.numpy(), coarse.numpy(), ends[n] - ends[0]


def _trapezoid(grad: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Sum over consecutive points (dim 0) of mean gradient x change of value, per element: P x ... -> ..."""
    return ((grad[:-1] + grad[1:]) / 2 * (value[1:] - value[:-1])).sum(0)


def _ablation_hook(mask: torch.Tensor, mode: str):
    """Forward hook replacing the masked channels (per sample: mask is B x C) by 0 or their spatial mean."""
    def hook(_m, _inp, out):
        keep = ~mask.to(out.device)[:, :, None, None]
        repl = torch.zeros_like(out) if mode == "zero" else out.mean((2, 3), keepdim=True).expand_as(out)
        return torch.where(keep, out, repl)
    return hook


def _ablated_logits(model: nn.Module, x: torch.Tensor, layer: str, masks: torch.Tensor, mode: str) -> torch.Tensor:
    """Logits (B x K) of x repeated once per row of `masks` (B x C), each row knocking out its channels."""
    if mode not in ABLATIONS:
        raise UserError(f"unknown ablation {mode!r}; choose one of {', '.join(ABLATIONS)}")
    view = eval_view(model)
    handle = view.get_submodule(group_output(model, layer)).register_forward_hook(_ablation_hook(masks, mode))
    device = device_of(model)
    try:
        with torch.inference_mode():
            return view(x.to(device).expand(len(masks), -1, -1, -1)).float().cpu()
    finally:
        handle.remove()


def ablate_groups(model: nn.Module, x: torch.Tensor, layer: str, groups: list[int], mode: str = "zero") -> np.ndarray:
    """Calibrated class probabilities (K) when the listed groups of `layer` are knocked out (0, or their spatial mean).

    'zero' removes the paths entirely; 'mean' keeps each channel's average but erases where it fired.
    An empty list changes nothing (bit-identical to the plain forward)."""
    check_image(model, x)
    mask = _group_channels(model, layer, groups)[None]
    return calibration.probabilities(model, _ablated_logits(model, x, layer, mask, mode))[0].numpy()


@dataclass
class GroupAblation:
    """The effect of knocking out each group alone (one row per group)."""

    base: np.ndarray  # K: probabilities without ablation
    probs: np.ndarray  # G x K: probabilities with group g knocked out
    target: int
    mode: str

    @property
    def drop(self) -> np.ndarray:
        """G: how much each knock-out lowers the target's probability (negative = it rises)."""
        return self.base[self.target] - self.probs[:, self.target]

    def ranking(self) -> list[int]:
        """Groups from the most harmful knock-out to the least."""
        return [int(i) for i in np.argsort(-self.drop, kind="stable")]


def ablation_ranking(model: nn.Module, x: torch.Tensor, layer: str, target: int, mode: str = "zero") -> GroupAblation:
    """Knock out each group of `layer` in turn (one batched forward of G + 1 images) and record the probabilities."""
    check_image(model, x, target)
    g = groups_of(model, layer)
    masks = torch.stack([torch.zeros_like(_group_channels(model, layer, []))]
                        + [_group_channels(model, layer, [i]) for i in range(g)])
    p = calibration.probabilities(model, _ablated_logits(model, x, layer, masks, mode)).numpy()
    return GroupAblation(p[0], p[1:], int(target), mode)


def group_gradcam(model: nn.Module, x: torch.Tensor, layer: str, target: int, relu: bool = True) -> np.ndarray:
    """Grad-CAM restricted to each group: G x 32 x 32, map g = [ReLU] sum over g's channels of alpha_c * A_c.

    alpha_c is the channel's spatially averaged gradient of the target logit (Grad-CAM's weights), A_c
    its activation after the block's ReLU. Without `relu` the G maps sum to the layer's Grad-CAM."""
    check_image(model, x, target)
    g = groups_of(model, layer)
    view = eval_view(model)
    module = view.get_submodule(group_output(model, layer))
    device = device_of(model)
    with torch.inference_mode(False), torch.enable_grad():
        xx = x.detach().to(device, torch.float32).clone().requires_grad_()
        per_channel = LayerGradCam(view, module).attribute(xx, target=int(target), attr_dim_summation=False)
    maps = split_groups(per_channel.detach().float().cpu(), g).sum(1)  # G x h x w
    if relu:
        maps = maps.clamp(min=0)
    maps = F.interpolate(maps[:, None], size=(data.IMAGE_SIZE,) * 2, mode="bilinear", align_corners=False)[:, 0]
    return maps.numpy()


@dataclass
class GroupAnalysis:
    """Everything the Groups tab shows about one block for one image (the class explained and its contrast)."""

    layer: str
    target: int
    contrast: int | None
    importance: GroupImportance
    ablation: GroupAblation
    cams: np.ndarray  # G x H x W group Grad-CAMs on one shared scale
    deletions: list[Faithfulness | None]  # each group's map against random orders; None for an all-zero map


def analyse_groups(model: nn.Module, x: torch.Tensor, layer: str, target: int, method: str = GROUP_METHODS[0],
                   contrast: int | None = None, mode: str = "zero",
                   on_step: Callable[[float, str], object] | None = None) -> GroupAnalysis:
    """Importance, knock-outs, Grad-CAM and deletion test of every group of `layer` for one image;
    `on_step(fraction, what)` hears about each of the four analyses before it runs (the UI's progress bar)."""
    step = on_step or (lambda fraction, what: None)
    n = groups_of(model, layer)
    step(0.05, f"{method}: each of the {n} groups' share of the logit")
    importance = group_importance(model, x, layer, target, method=method, contrast=contrast)
    step(0.35, f"knocking out each of the {n} groups in turn")
    ablation = ablation_ranking(model, x, layer, target, mode)
    step(0.55, "Grad-CAM restricted to each group")
    cams = group_gradcam(model, x, layer, target)
    step(0.7, "deletion test of each group's map against random orders")
    live = [i for i, cam in enumerate(cams) if cam.any()]  # an empty map has no order to test
    scored = dict(zip(live, faithfulness(model, x, cams[live], target))) if live else {}
    return GroupAnalysis(layer, target, contrast, importance, ablation, cams, [scored.get(i) for i in range(n)])
