"""What the network computes inside: feature maps per group, per-group statistics, Captum attributions.

Computations only: tensors, arrays and dataclasses come out, never images (see visualize.py). This is
the only module that imports captum.

Concurrency: the model passed in is shared by every user of the app. FX tracing flips its train/eval
mode and Captum hooks its modules, so both work on `predict.eval_view(model)`, a copy of the module
tree that shares the weight tensors: the shared model is never hooked, switched or changed.
"""
from __future__ import annotations

import hashlib
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from captum.attr import (DeepLift, GuidedBackprop, GuidedGradCam, IntegratedGradients, LayerAttribution,
                         LayerGradCam, LayerGradientXActivation, Occlusion, Saliency)
from safetensors.torch import load_file, save_file
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.transforms.functional import gaussian_blur

from . import data
from .predict import eval_view

# Captum warns on every GuidedBackprop/DeepLift call that it hooks the ReLUs (and removes the hooks
# after): expected here, and on the private view, so it is noise in a server log. Set once at import.
warnings.filterwarnings("ignore", message=r"Setting (forward, )?backward hooks", category=UserWarning)

# ---------------------------------------------------------------- layers and feature maps


def _prefix(model: nn.Module) -> str:
    """Module-path prefix of the stages: '' for our CIFAR ResNeXt, 'net.' for the torchvision seed."""
    return "net." if getattr(getattr(model, "config", None), "family", "cifar") == "torchvision" else ""


def _stem_node(model: nn.Module) -> str:
    """The stem's activation (what the 'conv1' stage shows): the conv output before ReLU is less readable."""
    return _prefix(model) + ("relu" if _prefix(model) else "act1")


def layer_choices(model: nn.Module) -> dict[str, list[str]]:
    """Names for the UI: every block's grouped 3x3 conv ('grouped') and the stem + stage outputs ('stages')."""
    p = _prefix(model)
    return {"grouped": list(model.grouped_convs()),
            "stages": [p + "conv1"] + [p + s for s in model.stage_names]}


def _node(model: nn.Module, layer: str) -> str:
    """The FX node / module path for a UI layer name.

    - a grouped conv ('layer1.0.conv2') is its own node: the conv output, before BN and ReLU;
    - 'conv1' (stage list) is the stem after its activation: node 'act1' ('net.relu' for the seed);
    - a stage ('layer2') is accepted by torchvision as a parent module: it returns that module's last
      node, i.e. the last block's output after its final ReLU ('layer2.N.act3');
    - anything else is passed through, so any node of `get_graph_node_names` works (e.g. 'layer1.0.act2').
    """
    return _stem_node(model) if layer == _prefix(model) + "conv1" else layer


def groups_of(model: nn.Module, layer: str) -> int:
    """The number of groups of `layer`'s conv (1 for stage outputs and anything that is not a conv)."""
    head, _, last = layer.rpartition(".")
    if last in ("bn2", "act2", "relu_1"):  # BN and ReLU after a grouped conv keep its channel groups
        layer = f"{head}.conv2"
    try:
        m = model.get_submodule(layer)
    except AttributeError as e:
        raise ValueError(f"unknown layer {layer!r}; choose one of {layer_choices(model)}") from e
    return m.groups if isinstance(m, nn.Conv2d) else 1


def activation_node(model: nn.Module, layer: str) -> str:
    """The node after a grouped conv's BN + ReLU (for true sparsity): 'layer1.0.conv2' -> 'layer1.0.act2'."""
    head, _, last = layer.rpartition(".")
    if last != "conv2":
        return _node(model, layer)  # stage outputs are already after their activation
    # The seed's torchvision Bottleneck reuses one ReLU module; its 2nd call is FX node 'relu_1'.
    return f"{head}.relu_1" if _prefix(model) else f"{head}.act2"


def _hooked_maps(view: nn.Module, x: torch.Tensor, nodes: dict[str, str]) -> dict[str, torch.Tensor] | None:
    """Outputs of `nodes` (module paths) via forward hooks on the private view; None when a node is not a
    module or a module runs more than once (a reused ReLU), where only FX tracing can tell the calls apart."""
    try:
        mods = {node: view.get_submodule(node) for node in nodes}
    except AttributeError:
        return None
    got: dict[str, list[torch.Tensor]] = {node: [] for node in nodes}
    handles = [m.register_forward_hook(lambda _m, _i, o, node=node: got[node].append(o)) for node, m in mods.items()]
    try:
        with torch.inference_mode():
            view(x)
    finally:
        for h in handles:
            h.remove()
    if any(len(v) != 1 for v in got.values()):
        return None
    return {nodes[node]: v[0] for node, v in got.items()}


def feature_maps(model: nn.Module, x: torch.Tensor, layers: list[str]) -> dict[str, torch.Tensor]:
    """Outputs (1 x C x H x W, detached float32 CPU) of `layers` for a normalized 1 x 3 x 32 x 32 input.

    Forward hooks on a private view whenever the layers are modules (always for our CIFAR ResNeXt):
    FX tracing patches `nn.Module.__call__` process-wide while it runs, so a prediction or fine-tune in
    another server thread fails during a trace ("module is not installed as a submodule"; found by
    `python -m resnext_demo.loadtest`). FX stays the fallback for nodes that are not modules."""
    nodes = {_node(model, name): name for name in layers}  # FX node -> the caller's name
    view = eval_view(model)  # hooks and tracing (which calls .train()/.eval()) land on a private view
    device = next(model.parameters()).device
    hooked = _hooked_maps(view, x.to(device), nodes)
    if hooked is not None:
        return {name: hooked[name].detach().float().cpu() for name in layers}
    try:
        extractor = create_feature_extractor(view, return_nodes=nodes)
    except ValueError as e:  # torchvision's message lists no valid names; ours does
        raise ValueError(f"{e}\nValid layers: {layer_choices(model)} or any FX node name "
                         "(torchvision.models.feature_extraction.get_graph_node_names)") from e
    extractor.eval()
    with torch.inference_mode():
        out = extractor(x.to(device))
    return {name: out[name].detach().float().cpu() for name in layers}


def split_groups(fmap: torch.Tensor, groups: int) -> torch.Tensor:
    """(1 x) C x H x W -> G x C/G x H x W: group g holds channels [g*w, (g+1)*w), as the conv computes them."""
    if fmap.dim() == 4:
        if fmap.shape[0] != 1:
            raise ValueError(f"split_groups takes one image, got a batch of {fmap.shape[0]}")
        fmap = fmap[0]
    c, h, w = fmap.shape
    if groups < 1 or c % groups:
        raise ValueError(f"{c} channels cannot be split into {groups} groups")
    return fmap.reshape(groups, c // groups, h, w)  # contiguous channel blocks: exactly the conv's groups


@dataclass
class GroupStats:
    """Per-group numbers (each array has length G)."""

    mean: np.ndarray  # mean value over the group's channels and positions
    l1: np.ndarray  # mean |value|: the group's "energy", comparable across groups of equal width
    sparsity: np.ndarray  # fraction of values <= 0, i.e. zeroed by a ReLU (see group_stats)
    max: np.ndarray  # largest value


def group_stats(fmap: torch.Tensor, groups: int, activated: torch.Tensor | None = None) -> GroupStats:
    """Mean, mean |x| (L1 energy), sparsity and max of each group of `fmap`.

    Sparsity is the fraction of a group's values that are <= 0, computed on `activated` when given,
    else on `fmap`. On a stage output (after its ReLU) that is exactly the fraction of dead units. For a
    grouped conv, `fmap` is the conv output before BN, so pass its activation too
    (`feature_maps(model, x, [activation_node(model, layer)])`) to get the fraction the block's ReLU
    really zeroes; without it the number is only the fraction of negative pre-BN responses.
    """
    g = split_groups(fmap, groups).double().flatten(1)  # G x (w*H*W); float64 so sums are exact enough
    a = g if activated is None else split_groups(activated, groups).double().flatten(1)
    return GroupStats(mean=g.mean(1).numpy(), l1=g.abs().mean(1).numpy(),
                      sparsity=(a <= 0).double().mean(1).numpy(), max=g.amax(1).numpy())


def shown_maps(model: nn.Module, x: torch.Tensor, layer: str, before_bn: bool = False) -> tuple[str, torch.Tensor, GroupStats]:
    """What the Feature-maps view shows for `layer`: (the node shown, its maps 1 x C x H x W, per-group stats).

    A grouped conv is shown after its BN and ReLU ('layerS.B.act2'), what the next 1x1 conv receives:
    BN rescales every channel, so before it a group's strength is not what the next layer sees (the
    strongest group before BN is often not the strongest after). `before_bn` shows the raw conv output
    instead, with sparsity still measured after the ReLU. Stage outputs are already after their ReLU."""
    groups = groups_of(model, layer)
    act = activation_node(model, layer)
    if groups == 1 or act == layer:
        fmap = feature_maps(model, x, [layer])[layer]
        return layer, fmap, group_stats(fmap, groups)
    if not before_bn:
        fmap = feature_maps(model, x, [act])[act]
        return act, fmap, group_stats(fmap, groups)
    maps = feature_maps(model, x, [layer, act])
    return layer, maps[layer], group_stats(maps[layer], groups, maps[act])


# ---------------------------------------------------------------- attributions

METHODS: tuple[str, ...] = ("Integrated Gradients", "Saliency", "SmoothGrad", "Grad-CAM", "Guided Grad-CAM",
                            "Occlusion", "DeepLift", "GuidedBackprop")
BASELINES: tuple[str, ...] = ("black", "mean", "blur", "noise")

_DEFAULTS: dict[str, dict] = {
    # steps: 32 Gauss-Legendre points are enough for completeness within a few % on these models;
    # internal_batch_size None = all steps in one forward/backward pass.
    "Integrated Gradients": {"steps": 32, "baseline": "black", "internal_batch_size": None},
    "Saliency": {},
    # noise: stdev as a fraction of the input's value range (the SmoothGrad paper's 10-20 %).
    "SmoothGrad": {"samples": 16, "noise": 0.15},
    "Grad-CAM": {"layer": None, "relu": True, "upsample": "bilinear"},  # layer None = last stage
    "Guided Grad-CAM": {"layer": None},
    "Occlusion": {"window": 8, "stride": 4, "baseline": "mean"},  # mean = a grey patch
    "DeepLift": {"baseline": "black"},
    "GuidedBackprop": {},
}


SMOOTHGRAD_SEED = 0


def default_params(method: str) -> dict:
    """The tunable parameters of `method` with their defaults (layer None means the last stage)."""
    _check_method(method)
    return dict(_DEFAULTS[method])


@dataclass
class Attribution:
    """A 32 x 32 signed map of how much each pixel drove the target class's logit."""

    values: np.ndarray  # H x W float32, finite; channels summed for pixel methods
    raw_min: float  # range of the raw attribution tensor (before channel sum / upsampling)
    raw_max: float
    method: str
    target: int
    params: dict = field(default_factory=dict)  # the parameters actually used (defaults filled in)
    note: str | None = None  # why the map is empty or was repaired; None when it is fine
    # Integrated Gradients only: Captum's convergence delta, sum of the attributions - (f(x) - f(baseline)),
    # 0 for an exact integral; and f(x) - f(baseline) itself, to read the delta against.
    delta: float | None = None
    change: float | None = None


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; choose one of {', '.join(METHODS)}")


def _baseline(kind: str, x: torch.Tensor) -> torch.Tensor:
    """A reference input in normalized space: what 'absence of signal' means for IG, DeepLift, Occlusion."""
    if kind == "black":  # pixel value 0, normalized
        return data.normalize(torch.zeros_like(x))
    if kind == "mean":  # the dataset mean colour = 0 after normalization
        return torch.zeros_like(x)
    if kind == "blur":  # keeps colours, removes edges and texture
        return gaussian_blur(x, kernel_size=[9, 9], sigma=[3.0, 3.0])
    if kind == "noise":  # uniform pixel noise; a local seeded generator so results are reproducible
        gen = torch.Generator().manual_seed(0)
        return data.normalize(torch.rand(x.shape, generator=gen)).to(x.device)
    raise ValueError(f"unknown baseline {kind!r}; choose one of {', '.join(BASELINES)}")


def _params(model: nn.Module, method: str, params: dict) -> dict:
    """Defaults merged with the caller's params, validated; ValueError names the bad one."""
    p = default_params(method)
    unknown = set(params) - set(p)
    if unknown:
        raise ValueError(f"{method} has no parameter(s) {', '.join(sorted(unknown))}; "
                         f"it takes {', '.join(p) or 'none'}")
    p.update(params)
    for k in ("steps", "samples", "window", "stride"):
        if k in p and (not isinstance(p[k], (int, np.integer)) or p[k] < 1):
            raise ValueError(f"{method}: {k} must be a positive integer, not {p[k]!r}")
    if p.get("internal_batch_size") is not None and int(p["internal_batch_size"]) < 1:
        raise ValueError(f"{method}: internal_batch_size must be a positive integer or None")
    if "baseline" in p and p["baseline"] not in BASELINES:
        raise ValueError(f"{method}: unknown baseline {p['baseline']!r}; choose one of {', '.join(BASELINES)}")
    if "noise" in p and not (0 <= float(p["noise"]) <= 10):
        raise ValueError(f"{method}: noise must be between 0 and 10 (fraction of the input range)")
    if "window" in p and p["window"] > data.IMAGE_SIZE:
        raise ValueError(f"{method}: window must be at most {data.IMAGE_SIZE}")
    if "upsample" in p and p["upsample"] not in ("bilinear", "nearest"):
        raise ValueError(f"{method}: upsample must be 'bilinear' or 'nearest'")
    if "layer" in p:
        if p["layer"] is None:
            p["layer"] = layer_choices(model)["stages"][-1]
        try:
            model.get_submodule(_node(model, p["layer"]))
        except AttributeError as e:
            raise ValueError(f"{method}: unknown layer {p['layer']!r}; choose one of {layer_choices(model)}") from e
    return p


def attribute(model: nn.Module, x: torch.Tensor, method: str, target: int, **params) -> Attribution:
    """Attribute the `target` logit of `model` at the normalized 1 x 3 x 32 x 32 input `x` to its pixels.

    Raises ValueError on an unknown method, parameter or target. The model is not modified.
    """
    _check_method(method)
    p = _params(model, method, params)
    num_classes = getattr(getattr(model, "config", None), "num_classes", None)
    if not isinstance(target, (int, np.integer)) or target < 0 or (num_classes and target >= num_classes):
        raise ValueError(f"target must be a class index in [0, {num_classes}), not {target!r}")
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one normalized image 1 x 3 x H x W, got shape {tuple(x.shape)}")
    target = int(target)
    view = eval_view(model)  # Captum hooks and DeepLift's module attributes land here, not on `model`
    device = next(model.parameters()).device
    # inference_mode(False)/enable_grad: the caller may be inside no_grad (e.g. a UI handler); clone()
    # also turns an inference-mode tensor into a normal one that autograd accepts.
    with torch.inference_mode(False), torch.enable_grad():
        x = x.detach().to(device, torch.float32).clone().requires_grad_()
        raw = _run(view, x, method, target, p)
    raw, delta = raw if isinstance(raw, tuple) else (raw, None)  # IG also returns its convergence delta
    raw = raw.detach().float().cpu()
    a = _finish(raw, method, target, p, model)
    if delta is not None:
        a.delta = float(delta.sum())
        a.change = float(raw.double().sum()) - a.delta
    return a


def _run(view: nn.Module, x: torch.Tensor, method: str, target: int,
         p: dict) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The raw Captum attribution (1 x 3 x H x W, or 1 x 1 x h x w for Grad-CAM); IG adds its convergence delta."""
    if method == "Integrated Gradients":
        return IntegratedGradients(view).attribute(
            x, baselines=_baseline(p["baseline"], x), target=target, n_steps=p["steps"],
            internal_batch_size=p["internal_batch_size"] or p["steps"], return_convergence_delta=True)
    if method == "Saliency":
        return Saliency(view).attribute(x, target=target, abs=True)
    if method == "SmoothGrad":
        # What Captum's NoiseTunnel(nt_type="smoothgrad") computes (the mean of |gradient| over noisy copies),
        # with the noise drawn from a local generator seeded 0: the same image gives the same map, and no
        # other request's random numbers are touched (NoiseTunnel draws from the process-wide generator).
        stdev = float(p["noise"]) * float(x.detach().max() - x.detach().min())  # noise relative to this input's range
        noise = torch.randn((p["samples"], *x.shape[1:]), generator=torch.Generator().manual_seed(SMOOTHGRAD_SEED))
        noisy = (x.detach() + stdev * noise.to(x.device)).requires_grad_()
        return Saliency(view).attribute(noisy, target=target, abs=True).mean(0, keepdim=True)
    if method == "Grad-CAM":
        layer = view.get_submodule(_node(view, p["layer"]))
        return LayerGradCam(view, layer).attribute(x, target=target, relu_attributions=p["relu"])
    if method == "Guided Grad-CAM":
        layer = view.get_submodule(_node(view, p["layer"]))
        return GuidedGradCam(view, layer).attribute(x, target=target)
    if method == "Occlusion":
        w, s = p["window"], p["stride"]
        n_windows = ((x.shape[2] - w) // s + 1) * ((x.shape[3] - w) // s + 1)
        return Occlusion(view).attribute(
            x, sliding_window_shapes=(x.shape[1], w, w), strides=(x.shape[1], s, s),
            baselines=_baseline(p["baseline"], x), target=target,
            perturbations_per_eval=min(n_windows, 64))  # all windows in one or two batched forwards
    if method == "DeepLift":
        return DeepLift(view).attribute(x, baselines=_baseline(p["baseline"], x), target=target)
    if method == "GuidedBackprop":
        return GuidedBackprop(view).attribute(x, target=target)
    raise AssertionError(method)  # unreachable: _check_method ran


_EMPTY_NOTES = {
    "Grad-CAM": "all zeros: Grad-CAM is 0 where ReLU kills the gradient (no positive evidence for this "
                "class at this layer); try another layer or turn off relu to see the negative evidence",
    "Guided Grad-CAM": "all zeros: its Grad-CAM factor is 0 at this layer for this class; try another layer",
    "Occlusion": "all zeros: hiding any window does not change this logit; try a larger window",
}


def _finish(raw: torch.Tensor, method: str, target: int, p: dict, model: nn.Module) -> Attribution:
    """Raw tensor -> finite 32 x 32 map plus a note when it is degenerate."""
    notes = []
    finite = torch.isfinite(raw)
    raw_min = float(raw[finite].min()) if finite.any() else 0.0
    raw_max = float(raw[finite].max()) if finite.any() else 0.0
    if not finite.all():  # never hand NaN/inf to the UI: zero them and say so
        notes.append(f"{int((~finite).sum())} non-finite values (NaN/inf) were replaced by 0")
        raw = torch.where(finite, raw, torch.zeros_like(raw))
    if method == "Grad-CAM":  # one coarse map per image at the layer's resolution -> input resolution
        m = LayerAttribution.interpolate(raw, (data.IMAGE_SIZE, data.IMAGE_SIZE), interpolate_mode=p["upsample"])
        values = m[0, 0]
    elif method == "Occlusion":
        # The window spans all 3 channels, so Captum writes the same logit change into each: one copy
        # (the mean) keeps the map in logit units instead of tripling it.
        values = raw[0].mean(0)
    else:
        values = raw[0].sum(0)  # pixel methods: a pixel's attribution is the sum over its R, G, B
    if values.shape != (data.IMAGE_SIZE, data.IMAGE_SIZE):  # other input sizes: show at 32x32 anyway
        values = F.interpolate(values[None, None], size=(data.IMAGE_SIZE,) * 2, mode="bilinear")[0, 0]
    values = values.numpy().astype(np.float32)
    if not np.any(values):
        notes.append(_EMPTY_NOTES.get(method, "all zeros: the target logit's gradient vanishes at this input"))
    if method in ("DeepLift", "GuidedBackprop", "Guided Grad-CAM") and _prefix(model):
        notes.append("unreliable on the torchvision seed model: its blocks reuse one in-place ReLU")
    return Attribution(values, raw_min, raw_max, method, target, p, "; ".join(notes) or None)


# ---------------------------------------------------------------- cardinality: what each group does
#
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
        raise ValueError(f"{layer!r} is not a grouped conv; choose one of {', '.join(model.grouped_convs())}")
    head = layer.rpartition(".")[0]
    return f"{head}.bn2" if _prefix(model) else f"{head}.act2"


def _group_channels(model: nn.Module, layer: str, groups: list[int] | tuple[int, ...]) -> torch.Tensor:
    """Boolean channel mask (length C) of the listed groups of `layer`."""
    conv = model.grouped_convs()[layer]
    g, w = conv.groups, conv.out_channels // conv.groups
    bad = [i for i in groups if not 0 <= int(i) < g]
    if bad:
        raise ValueError(f"{layer} has groups 0..{g - 1}; got {bad}")
    mask = torch.zeros(conv.out_channels, dtype=torch.bool)
    for i in groups:
        mask[int(i) * w:(int(i) + 1) * w] = True
    return mask


def _check_image(model: nn.Module, x: torch.Tensor, target: int | None = None) -> None:
    """ValueError for a batch or a wrong target (the group views explain one image)."""
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one normalized image 1 x 3 x H x W, got shape {tuple(x.shape)}")
    k = getattr(getattr(model, "config", None), "num_classes", None)
    if target is not None and (not isinstance(target, (int, np.integer)) or target < 0 or (k and target >= k)):
        raise ValueError(f"target must be a class index in [0, {k}), not {target!r}")


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
# the steps, and groups + shortcut match f(x) - f(black) as closely. On the shipped micro model that takes
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
        raise ValueError(f"unknown group method {method!r}; choose one of {', '.join(GROUP_METHODS)}")
    _check_image(model, x, target)
    if contrast is not None:
        _check_image(model, x, contrast)
    if int(steps) < 2 or int(max_steps) < int(steps):
        raise ValueError("Conductance needs steps >= 2 and max_steps >= steps")
    groups = groups_of(model, layer)
    view = eval_view(model)
    module = view.get_submodule(group_output(model, layer))
    t, c = int(target), (None if contrast is None else int(contrast))

    def forward(inp: torch.Tensor) -> torch.Tensor:  # one output column: the logit or the logit margin
        z = view(inp).float()
        return z[:, t:t + 1] if c is None else z[:, t:t + 1] - z[:, c:c + 1]

    device = next(model.parameters()).device
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
        raise ValueError(f"unknown ablation {mode!r}; choose one of {', '.join(ABLATIONS)}")
    view = eval_view(model)
    handle = view.get_submodule(group_output(model, layer)).register_forward_hook(_ablation_hook(masks, mode))
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            return view(x.to(device).expand(len(masks), -1, -1, -1)).float().cpu()
    finally:
        handle.remove()


def ablate_groups(model: nn.Module, x: torch.Tensor, layer: str, groups: list[int], mode: str = "zero") -> np.ndarray:
    """Class probabilities (K) when the listed groups of `layer` are knocked out (0, or their spatial mean).

    'zero' removes the paths entirely; 'mean' keeps each channel's average but erases where it fired.
    An empty list changes nothing (bit-identical to the plain forward)."""
    _check_image(model, x)
    mask = _group_channels(model, layer, groups)[None]
    return torch.softmax(_ablated_logits(model, x, layer, mask, mode), 1)[0].numpy()


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
    _check_image(model, x, target)
    g = groups_of(model, layer)
    masks = torch.stack([torch.zeros_like(_group_channels(model, layer, []))]
                        + [_group_channels(model, layer, [i]) for i in range(g)])
    p = torch.softmax(_ablated_logits(model, x, layer, masks, mode), 1).numpy()
    return GroupAblation(p[0], p[1:], int(target), mode)


def group_gradcam(model: nn.Module, x: torch.Tensor, layer: str, target: int, relu: bool = True) -> np.ndarray:
    """Grad-CAM restricted to each group: G x 32 x 32, map g = [ReLU] sum over g's channels of alpha_c * A_c.

    alpha_c is the channel's spatially averaged gradient of the target logit (Grad-CAM's weights), A_c
    its activation after the block's ReLU. Without `relu` the G maps sum to the layer's Grad-CAM."""
    _check_image(model, x, target)
    g = groups_of(model, layer)
    view = eval_view(model)
    module = view.get_submodule(group_output(model, layer))
    device = next(model.parameters()).device
    with torch.inference_mode(False), torch.enable_grad():
        xx = x.detach().to(device, torch.float32).clone().requires_grad_()
        per_channel = LayerGradCam(view, module).attribute(xx, target=int(target), attr_dim_summation=False)
    maps = split_groups(per_channel.detach().float().cpu(), g).sum(1)  # G x h x w
    if relu:
        maps = maps.clamp(min=0)
    maps = F.interpolate(maps[:, None], size=(data.IMAGE_SIZE,) * 2, mode="bilinear", align_corners=False)[:, 0]
    return maps.numpy()


# ---------------------------------------------------------------- faithfulness

DELETION_FRACTIONS: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5)


@dataclass
class Deletion:
    """The target's probability as the most important squares are removed, against random orders."""

    fractions: np.ndarray  # F: fraction of the image removed
    probs: np.ndarray  # F: target probability, most-important-first order
    random_probs: np.ndarray  # F: the same for random orders (mean over `n_random` draws)
    base: float  # target probability of the untouched image

    @property
    def score(self) -> float:
        """Mean probability drop over the fractions for the map (higher = the map found what matters)."""
        return float(self.base - self.probs.mean())

    @property
    def random_score(self) -> float:
        """The same drop for a random map: what a map must beat to be informative."""
        return float(self.base - self.random_probs.mean())


def deletion_score(model: nn.Module, x: torch.Tensor, values: np.ndarray, target: int,
                   fractions: tuple[float, ...] = DELETION_FRACTIONS, patch: int = 4, n_random: int = 4,
                   seed: int = 0, fill: str = "blur") -> Deletion:
    """Deletion test (Petsiuk et al. 2018): remove the `patch` x `patch` squares with the highest mean of
    `values` first (most positive = most evidence for the class) and track the target's probability;
    random square orders give the baseline.

    "Removed" = replaced by a blurred copy of the image (the 'blur' baseline): setting scattered pixels to
    grey adds sharp artefacts that destroy the prediction by themselves, so random deletion would "win"
    for no reason (measured on the shipped model: README, Groups). fill='mean' (grey) is kept to show it."""
    return deletion_scores(model, x, [values], target, fractions, patch, n_random, seed, fill)[0]


def deletion_scores(model: nn.Module, x: torch.Tensor, maps: list[np.ndarray] | np.ndarray, target: int,
                    fractions: tuple[float, ...] = DELETION_FRACTIONS, patch: int = 4, n_random: int = 4,
                    seed: int = 0, fill: str = "blur") -> list[Deletion]:
    """`deletion_score` of several maps of one image (e.g. each group's Grad-CAM) in one batched forward of
    1 + (n_random + len(maps)) * len(fractions) images; the random baseline is shared."""
    _check_image(model, x, target)
    h, w = x.shape[2], x.shape[3]
    if patch < 1 or h % patch or w % patch:
        raise ValueError(f"patch must divide the image size {h} x {w}")
    n = (h // patch) * (w // patch)
    gen = torch.Generator().manual_seed(seed)
    orders = [torch.randperm(n, generator=gen) for _ in range(n_random)]
    for values in maps:
        v = torch.as_tensor(np.asarray(values, dtype=np.float64))
        if v.shape != (h, w) or not torch.isfinite(v).all():
            raise ValueError(f"values must be a finite {h} x {w} map")
        pv = F.avg_pool2d(v[None, None], patch)[0, 0].flatten()  # one score per square
        # Ties (a Grad-CAM with zeros) are broken randomly rather than by position, so a flat region is not
        # deleted row by row from the top.
        jitter = torch.rand(n, generator=gen) * 1e-9 * float(pv.abs().max() or 1)
        orders.append(torch.argsort(pv + jitter, descending=True))
    fr = np.asarray(fractions, dtype=np.float64)
    x0 = x[0].detach().float().cpu()
    if fill not in ("blur", "mean"):
        raise ValueError(f"fill must be 'blur' or 'mean', not {fill!r}")
    blurred = _baseline(fill, x0[None])[0]  # 'mean' = 0 after normalization: grey
    batch = [x0]
    for order in orders:
        for f in fr:
            keep = torch.ones(n)
            keep[order[:int(round(f * n))]] = 0
            k = keep.reshape(1, 1, h // patch, w // patch).repeat_interleave(patch, 2).repeat_interleave(patch, 3)[0]
            batch.append(x0 * k + blurred * (1 - k))
    device = next(model.parameters()).device
    view = eval_view(model) if model.training else model
    with torch.inference_mode():
        p = torch.softmax(view(torch.stack(batch).to(device)).float(), 1)[:, int(target)].cpu().numpy()
    curves = p[1:].reshape(len(orders), len(fr))
    random = curves[:n_random].mean(0)
    return [Deletion(fr, c, random, float(p[0])) for c in curves[n_random:]]


# A map can beat random orders without knowing anything about the model: CIFAR-10 objects sit in the middle
# of the picture, and a map of the image's own edges points at the object too. Measured on the shipped
# checkpoint, such maps beat random orders on 27 of 40 images, as often as some attribution methods. So
# every map is also scored against these model-blind references, on the same image and the same random orders.
REFERENCES: tuple[str, ...] = ("centre prior", "image edges")


def reference_maps(x: torch.Tensor) -> dict[str, np.ndarray]:
    """Model-blind maps for one normalized 1 x 3 x H x W image: a centred Gaussian (sigma = H/4) and the edge
    strength of the image (Sobel gradient magnitude of its grey levels)."""
    h, w = x.shape[2], x.shape[3]
    yy, xx = np.mgrid[:h, :w]
    centre = np.exp(-((yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2) / (2 * (h / 4) ** 2))
    luma = torch.tensor([0.299, 0.587, 0.114]).reshape(1, 3, 1, 1)
    grey = (data.denormalize(x.detach().float().cpu()) * luma).sum(1, keepdim=True)
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    grad = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), torch.stack([sobel, sobel.T])[:, None])
    return {"centre prior": centre.astype(np.float32), "image edges": grad[0].pow(2).sum(0).sqrt().numpy()}


@dataclass
class Faithfulness:
    """A map's deletion test next to what the model-blind reference maps reach on the same image."""

    deletion: Deletion  # the map's curve and the random orders'
    references: dict[str, float]  # REFERENCES name -> its deletion score (same image, same random orders)

    @property
    def score(self) -> float:
        """The map's mean probability drop (Deletion.score)."""
        return self.deletion.score

    @property
    def random_score(self) -> float:
        """The random orders' mean drop."""
        return self.deletion.random_score

    @property
    def best_reference(self) -> tuple[str, float]:
        """The model-blind map with the largest drop: (name, score)."""
        return max(self.references.items(), key=lambda kv: kv[1])

    @property
    def verdict(self) -> str:
        """'beats references' (random orders and every model-blind map), 'beats random only', or 'no better than random'."""
        if self.score <= self.random_score:
            return "no better than random"
        return "beats references" if self.score > self.best_reference[1] else "beats random only"


def faithfulness(model: nn.Module, x: torch.Tensor, maps: list[np.ndarray] | np.ndarray, target: int,
                 **deletion) -> list[Faithfulness]:
    """Deletion test of each map against random orders and the model-blind REFERENCES, in one batched forward
    (`deletion` goes to deletion_scores). The references go first, so their scores do not depend on the maps."""
    refs = reference_maps(x)
    scored = deletion_scores(model, x, [*refs.values(), *maps], target, **deletion)
    ref_scores = {name: d.score for name, d in zip(refs, scored)}
    return [Faithfulness(d, ref_scores) for d in scored[len(refs):]]


# ---------------------------------------------------------------- specialization over a dataset

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
    device = next(view.parameters()).device
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
    """16 hex chars of the sha256 of the model's parameters and buffers: a cache key for its analyses."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


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
        copy = build_from_config(model.config).to(next(model.parameters()).device)
    bns = [m for m in copy.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:  # momentum None = a plain average over the calibration batches
        bn.reset_running_stats()
        bn.momentum = None
    copy.train()
    device = next(copy.parameters()).device
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            copy(data.normalize(images[i:i + batch_size].to(device)))
    return copy.eval()


def specialization_control(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, calibration: torch.Tensor,
                           result: dict[str, Specialization], seeds: tuple[int, ...] = CONTROL_SEEDS,
                           on_step=None) -> None:
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
                          on_step=None) -> dict[str, Specialization]:
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


# ---------------------------------------------------------------- command line


def faithfulness_table(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, randomized: nn.Module | None = None,
                       **deletion) -> dict[str, dict]:
    """For every attribution method at its defaults (true class as the target): on how many images its deletion
    score beats the random orders, each model-blind reference, and all of them, with the mean scores; rows for
    the references themselves; with `randomized` (e.g. an untrained_copy), the same method's map from that
    model as one more reference. `deletion` goes to deletion_scores."""
    n = len(images)
    rows = {m: {"n": n, "wins": 0, "scores": [], **{f"beats {r}": 0 for r in REFERENCES}, "beats all": 0}
            for m in METHODS}
    refs = {r: {"n": n, "wins": 0, "scores": []} for r in REFERENCES}
    randoms, ig_delta, ig_rel = [], [], []
    for i in range(n):
        xi, t = data.normalize(images[i:i + 1]), int(labels[i])
        attrs = [attribute(model, xi, m, t) for m in METHODS]
        maps = [a.values for a in attrs]
        if randomized is not None:  # the same method on the untrained copy: one more model-blind map per method
            maps += [attribute(randomized, xi, m, t).values for m in METHODS]
        scored = faithfulness(model, xi, maps, t, **deletion)
        randoms.append(scored[0].random_score)
        for r, v in scored[0].references.items():
            refs[r]["wins"] += v > scored[0].random_score
            refs[r]["scores"].append(v)
        for k, (m, f) in enumerate(zip(METHODS, scored)):
            row = rows[m]
            row["wins"] += f.score > f.random_score
            row["scores"].append(f.score)
            for r, v in f.references.items():
                row[f"beats {r}"] += f.score > v
            row["beats all"] += f.verdict == "beats references"
            if randomized is not None:
                other = scored[len(METHODS) + k].score
                row.setdefault("randomized", []).append(other)
                row["beats randomized"] = row.get("beats randomized", 0) + (f.score > other)
        ig = attrs[METHODS.index("Integrated Gradients")]
        ig_delta.append(abs(ig.delta))
        ig_rel.append(abs(ig.delta) / max(abs(ig.change), 1e-12))
    for row in [*rows.values(), *refs.values()]:
        row["score"] = float(np.mean(row.pop("scores")))
        if "randomized" in row:
            row["randomized"] = float(np.mean(row["randomized"]))
    rows["Integrated Gradients"].update(delta_median_rel=float(np.median(ig_rel)), delta_max=float(np.max(ig_delta)))
    return {**rows, **refs, "random orders": {"n": n, "score": float(np.mean(randoms))}}


def conductance_table(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, layers: list[str]) -> list[dict]:
    """Conductance of the true class at each of `layers` for each image: the steps it took to settle, the
    change from half the steps, the completeness gap, and how far the groups were at 32 steps."""
    rows = []
    for i in range(len(images)):
        xi, t = data.normalize(images[i:i + 1]), int(labels[i])
        for layer in layers:
            gi = group_importance(model, xi, layer, t, "Conductance")
            at32 = group_importance(model, xi, layer, t, "Conductance", steps=32, max_steps=32)
            rows.append({"image": i, "layer": layer, "shortcut": gi.shortcut_kind, "steps": gi.steps,
                         "step_error": gi.step_error, "gap": gi.completeness_gap,
                         "off_at_32": float(np.abs(at32.values - gi.values).max()),
                         "top_changes_at_32": int(np.argmax(at32.values)) != int(np.argmax(gi.values))})
    return rows


def _range(v: np.ndarray, fmt: str = ".2f") -> str:
    """'lo–hi' of an array (or 'n/a' when empty)."""
    return f"{np.min(v):{fmt}}–{np.max(v):{fmt}}" if len(v) else "n/a"


def main(argv: list[str] | None = None) -> None:
    """`python -m resnext_demo.explain`: (re)build the group-specialization cache of a checkpoint (with its
    untrained control) and print what it shows, the deletion faithfulness of every attribution method against
    random orders and model-blind maps, and optionally Conductance's convergence, as Markdown."""
    import argparse

    from . import weights
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--weights", default=str(weights.DEFAULT_WEIGHTS))
    ap.add_argument("--data", default=data.default_source(), help="CIFAR-10 source (default: $RESNEXT_DEMO_DATA or the shared archive)")
    ap.add_argument("--n", type=int, default=SPECIALIZATION_IMAGES, help="test images (a class-balanced prefix)")
    ap.add_argument("--rebuild", action="store_true", help="recompute even when cached")
    ap.add_argument("--faithfulness", type=int, default=40, metavar="N", help="test images for the deletion table (0: skip)")
    ap.add_argument("--randomized", action="store_true",
                    help="also score each method's map from an untrained copy of the model (seed 0)")
    ap.add_argument("--patch", type=int, default=4, help="deletion square size (1 = single pixels)")
    ap.add_argument("--fill", choices=("blur", "mean"), default="blur", help="what deleted squares become (mean = grey)")
    ap.add_argument("--conductance", type=int, default=0, metavar="N",
                    help="test images for the Conductance convergence table (first, middle and last block; 0: skip)")
    args = ap.parse_args(argv)
    if not args.data:
        ap.error("no CIFAR-10 source: pass --data or set RESNEXT_DEMO_DATA")
    model, _ = weights.load_checkpoint(args.weights)
    t0 = time.perf_counter()
    spec = specialization_cached(model, args.data, n=args.n, rebuild=args.rebuild)
    seeds = len(next(iter(spec.values())).control_gap)
    print(f"Group specialization of {args.weights} on the first {args.n} test images of {args.data}, and of {seeds} "
          f"untrained copies (BN recalibrated on {CONTROL_CALIBRATION} training images) ({time.perf_counter() - t0:.2f} s, "
          f"cache: .cache/analysis)\n")
    print("| block | C | selectivity mean (max) | untrained | group corr. | channel corr. within / between | gap "
          "| untrained gap | colour sens. range | colour partition p | untrained p | blur sens. range |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for layer, s in spec.items():
        g = len(s.mean)
        off = s.correlation[~np.eye(g, dtype=bool)].mean() if g > 1 else float("nan")
        print(f"| {layer} | {g} | {s.selectivity.mean():.2f} ({s.selectivity.max():.2f}) | {_range(s.control_selectivity)} "
              f"| {off:.2f} | {s.within_corr:.2f} / {s.between_corr:.2f} | {s.gap:.3f} | {_range(s.control_gap, '.3f')} "
              f"| {s.colour.min():.2f}–{s.colour.max():.2f} | {s.colour_p:.3f} | {_range(s.control_colour_p, '.3f')} "
              f"| {s.blur.min():.2f}–{s.blur.max():.2f} |")
    blocks = list(spec.values())
    per_seed = lambda f: [int(sum(f(b, k) for b in blocks)) for k in range(seeds)]  # noqa: E731 (blocks per seed)
    print(f"\nOf {len(blocks)} blocks (trained | each untrained copy | trained beyond every untrained copy):")
    print(f"- channels of a group correlate >= 0.02 more than across groups: {sum(b.gap >= 0.02 for b in blocks)} | "
          f"{per_seed(lambda b, k: b.control_gap[k] >= 0.02)} | {sum(b.gap > b.control_gap.max() for b in blocks)}")
    for alpha in (0.05, 0.01):
        print(f"- colour partition p < {alpha}: {sum(b.colour_p < alpha for b in blocks)} | "
              f"{per_seed(lambda b, k: b.control_colour_p[k] < alpha)} | "
              f"{sum(b.colour_p < alpha and b.colour_p < b.control_colour_p.min() for b in blocks)}")
    print(f"- mean selectivity: {_range(np.array([b.selectivity.mean() for b in blocks]))} | "
          f"{_range(np.concatenate([b.control_selectivity for b in blocks]))} | "
          f"{sum(b.selectivity.mean() > b.control_selectivity.max() for b in blocks)}")
    if args.faithfulness:
        images, labels = data.load_split(args.data, "test")
        randomized = None
        if args.randomized:
            randomized = untrained_copy(model, 0, data.load_split(args.data, "train")[0][:CONTROL_CALIBRATION])
        rows = faithfulness_table(model, images[:args.faithfulness], labels[:args.faithfulness], randomized,
                                  patch=args.patch, fill=args.fill)
        print(f"\nDeletion faithfulness on the first {args.faithfulness} test images (true class; higher drop = better; "
              f"{args.patch}x{args.patch} squares -> {args.fill}); 'beats X': images where the map's drop is larger\n")
        extra = " untrained copy's map: mean drop | beats it |" if randomized is not None else ""
        print("| map | mean drop | beats random | beats centre prior | beats image edges | beats all three |" + extra)
        print("|---|---|---|---|---|---|" + "---|---|" * bool(randomized))
        for name, r in rows.items():
            if name in METHODS:
                print(f"| {name} | {r['score']:.3f} | {r['wins']}/{r['n']} | {r['beats centre prior']}/{r['n']} "
                      f"| {r['beats image edges']}/{r['n']} | {r['beats all']}/{r['n']} |"
                      + (f" {r['randomized']:.3f} | {r['beats randomized']}/{r['n']} |" if randomized is not None else ""))
            elif name in REFERENCES:
                print(f"| {name} (model-blind) | {r['score']:.3f} | {r['wins']}/{r['n']} | | | |" + " | |" * bool(randomized))
            else:
                print(f"| {name} | {r['score']:.3f} | | | | |" + " | |" * bool(randomized))
        ig = rows["Integrated Gradients"]
        print(f"\nIntegrated Gradients at {_DEFAULTS['Integrated Gradients']['steps']} steps: convergence delta "
              f"median {100 * ig['delta_median_rel']:.1f} % of f(x) - f(black), worst {ig['delta_max']:.3f} logit")
    if args.conductance:
        images, labels = data.load_split(args.data, "test")
        convs = list(model.grouped_convs())
        layers = list(dict.fromkeys([convs[0], convs[len(convs) // 2], convs[-1]]))
        rows = conductance_table(model, images[:args.conductance], labels[:args.conductance], layers)
        print(f"\nConductance (true class, black baseline) on the first {args.conductance} test images: steps doubled "
              f"from 32 until nothing moves more than {CONDUCTANCE_TOL} logit (at most {CONDUCTANCE_MAX_STEPS})\n")
        print("| image | block | shortcut | steps | change from half the steps | groups + shortcut - logit change "
              "| largest group error at 32 steps | top group differs at 32 |\n|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['image']} | {r['layer']} | {r['shortcut']} | {r['steps']} | {r['step_error']:.4f} | {r['gap']:+.4f} "
                  f"| {r['off_at_32']:.3f} | {'yes' if r['top_changes_at_32'] else 'no'} |")


if __name__ == "__main__":
    main()
