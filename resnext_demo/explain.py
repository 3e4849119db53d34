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
                         LayerConductance, LayerGradCam, LayerGradientXActivation, NoiseTunnel, Occlusion, Saliency)
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
    raw = raw.detach().float().cpu()
    return _finish(raw, method, target, p, model)


def _run(view: nn.Module, x: torch.Tensor, method: str, target: int, p: dict) -> torch.Tensor:
    """The raw Captum attribution (1 x 3 x H x W, or 1 x 1 x h x w for Grad-CAM)."""
    if method == "Integrated Gradients":
        return IntegratedGradients(view).attribute(
            x, baselines=_baseline(p["baseline"], x), target=target, n_steps=p["steps"],
            internal_batch_size=p["internal_batch_size"] or p["steps"])
    if method == "Saliency":
        return Saliency(view).attribute(x, target=target, abs=True)
    if method == "SmoothGrad":
        stdev = float(p["noise"]) * float(x.detach().max() - x.detach().min())  # noise relative to this input's range
        return NoiseTunnel(Saliency(view)).attribute(
            x, nt_type="smoothgrad", nt_samples=p["samples"], nt_samples_batch_size=p["samples"],
            stdevs=stdev, target=target, abs=True)
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
    # Conductance only: the part of f(x) - f(black) that bypasses the groups through the block's identity
    # shortcut (completeness over all paths: groups + shortcut = f(x) - f(black)).
    shortcut: float | None = None


def group_importance(model: nn.Module, x: torch.Tensor, layer: str, target: int, method: str = "Gradient x Activation",
                     contrast: int | None = None, steps: int = 32) -> GroupImportance:
    """Attribution of the `target` logit to each group of `layer`'s grouped conv (Captum layer methods).

    'Gradient x Activation' (LayerGradientXActivation) is one backward pass; 'Conductance'
    (LayerConductance, black-image baseline, `steps` points) satisfies completeness: the groups sum to
    f(x) - f(baseline) together with the block's shortcut (reported as `shortcut`). With `contrast`, the
    explained output is logit[target] - logit[contrast].
    """
    if method not in GROUP_METHODS:
        raise ValueError(f"unknown group method {method!r}; choose one of {', '.join(GROUP_METHODS)}")
    _check_image(model, x, target)
    if contrast is not None:
        _check_image(model, x, contrast)
    groups = groups_of(model, layer)
    view = eval_view(model)
    module = view.get_submodule(group_output(model, layer))
    t, c = int(target), (None if contrast is None else int(contrast))

    def forward(inp: torch.Tensor) -> torch.Tensor:  # one output column: the logit or the logit margin
        z = view(inp).float()
        return z[:, t:t + 1] if c is None else z[:, t:t + 1] - z[:, c:c + 1]

    device = next(model.parameters()).device
    shortcut = None
    with torch.inference_mode(False), torch.enable_grad():
        xx = x.detach().to(device, torch.float32).clone().requires_grad_()
        if method == "Conductance":
            attr, d = LayerConductance(forward, module).attribute(
                xx, baselines=_baseline("black", xx), target=0, n_steps=int(steps),
                internal_batch_size=int(steps), return_convergence_delta=True)
            shortcut = -float(d.detach().sum())  # Captum's delta = sum(attr) - (f(x) - f(baseline))
        else:
            attr = LayerGradientXActivation(forward, module).attribute(xx, target=0)
    per_group = split_groups(attr.detach().double().cpu(), groups).flatten(1).sum(1).numpy()
    return GroupImportance(per_group, float(attr.detach().double().sum()), method, layer, t, c, shortcut)


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

    @property
    def preferred_class(self) -> np.ndarray:
        """G: the class each group fires most for."""
        return self.class_means.argmax(1)


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
    return f"groups-v2-{model_digest(model)}-{data.source_id(source)}-n{n}.safetensors"


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


def specialization_cached(model: nn.Module, source: str, n: int = SPECIALIZATION_IMAGES,
                          cache: str | None = None, rebuild: bool = False) -> dict[str, Specialization]:
    """`group_specialization` of every block on the first `n` test images of `source`, computed once per
    checkpoint and data source and kept as safetensors under the data cache ('analysis/'); without `cache`, a
    file shipped in resnext_demo/assets/ (`python -m resnext_demo.assets specialization`) is read too."""
    path = _specialization_path(model, source, n, cache, rebuild)
    names = [f.name for f in Specialization.__dataclass_fields__.values() if f.name != "layer"]
    if path.is_file() and not rebuild:
        t = load_file(str(path))
        layers = sorted({k.rsplit("/", 1)[0] for k in t}, key=list(model.grouped_convs()).index)
        return {layer: Specialization(layer, *(_from_tensor(t[f"{layer}/{f}"]) for f in names)) for layer in layers}
    images, labels = data.load_split(source, "test")
    result = group_specialization(model, images[:n], labels[:n])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({f"{layer}/{f}": torch.tensor(np.array(getattr(s, f))).contiguous()
               for layer, s in result.items() for f in names}, str(tmp))
    tmp.replace(path)  # atomic: a concurrent reader sees the old file or the whole new one
    return result


# ---------------------------------------------------------------- command line


def faithfulness_table(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, **deletion) -> dict[str, dict]:
    """For every attribution method at its defaults: on how many images its deletion score beats the random
    orders, and the mean scores (true class as the target); `deletion` goes to deletion_score."""
    rows = {}
    for method in METHODS:
        wins, scores, randoms = 0, [], []
        for i in range(len(images)):
            xi, t = data.normalize(images[i:i + 1]), int(labels[i])
            d = deletion_score(model, xi, attribute(model, xi, method, t).values, t, **deletion)
            wins += d.score > d.random_score
            scores.append(d.score)
            randoms.append(d.random_score)
        rows[method] = {"wins": int(wins), "n": len(images), "score": float(np.mean(scores)),
                        "random": float(np.mean(randoms))}
    return rows


def main(argv: list[str] | None = None) -> None:
    """`python -m resnext_demo.explain`: (re)build the group-specialization cache of a checkpoint and print
    what it shows, plus the deletion faithfulness of every attribution method, as Markdown."""
    import argparse

    from . import weights
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--weights", default=str(weights.DEFAULT_WEIGHTS))
    ap.add_argument("--data", default=data.default_source(), help="CIFAR-10 source (default: $RESNEXT_DEMO_DATA or the shared archive)")
    ap.add_argument("--n", type=int, default=SPECIALIZATION_IMAGES, help="test images (a class-balanced prefix)")
    ap.add_argument("--rebuild", action="store_true", help="recompute even when cached")
    ap.add_argument("--faithfulness", type=int, default=40, metavar="N", help="test images for the deletion table (0: skip)")
    ap.add_argument("--patch", type=int, default=4, help="deletion square size (1 = single pixels)")
    ap.add_argument("--fill", choices=("blur", "mean"), default="blur", help="what deleted squares become (mean = grey)")
    args = ap.parse_args(argv)
    if not args.data:
        ap.error("no CIFAR-10 source: pass --data or set RESNEXT_DEMO_DATA")
    model, _ = weights.load_checkpoint(args.weights)
    t0 = time.perf_counter()
    spec = specialization_cached(model, args.data, n=args.n, rebuild=args.rebuild)
    print(f"Group specialization of {args.weights} on the first {args.n} test images of {args.data} "
          f"({time.perf_counter() - t0:.2f} s, cache: .cache/analysis)\n")
    print("| block | C | selectivity mean (max) | group corr. | channel corr. within / between groups "
          "| colour sens. range | colour partition p | blur sens. range |")
    print("|---|---|---|---|---|---|---|---|")
    for layer, s in spec.items():
        g = len(s.mean)
        off = s.correlation[~np.eye(g, dtype=bool)].mean() if g > 1 else float("nan")
        print(f"| {layer} | {g} | {s.selectivity.mean():.2f} ({s.selectivity.max():.2f}) | {off:.2f} "
              f"| {s.within_corr:.2f} / {s.between_corr:.2f} | {s.colour.min():.2f}–{s.colour.max():.2f} "
              f"| {s.colour_p:.3f} | {s.blur.min():.2f}–{s.blur.max():.2f} |")
    if args.faithfulness:
        images, labels = data.load_split(args.data, "test")
        rows = faithfulness_table(model, images[:args.faithfulness], labels[:args.faithfulness],
                                  patch=args.patch, fill=args.fill)
        print(f"\nDeletion faithfulness on the first {args.faithfulness} test images (true class; higher drop = better; "
              f"{args.patch}x{args.patch} squares -> {args.fill})\n")
        print("| method | beats random | mean drop | random drop |\n|---|---|---|---|")
        for method, r in rows.items():
            print(f"| {method} | {r['wins']}/{r['n']} | {r['score']:.3f} | {r['random']:.3f} |")


if __name__ == "__main__":
    main()
