"""One image through the network: layer names and feature maps, per-group statistics of a map, and Captum
attributions (the methods, baselines and defaults that groups.py and faithfulness.py reuse). Computations
only: tensors, arrays and dataclasses come out, never images (visualize.py draws them).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from captum.attr import (DeepLift, GuidedBackprop, GuidedGradCam, IntegratedGradients, LayerAttribution,
                         LayerGradCam, Occlusion, Saliency)
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.transforms.functional import gaussian_blur

from . import data
from .errors import UserError
from .predict import eval_view
from .model import device_of

# Concurrency (this module, groups, faithfulness and specialization): the model passed in is shared by every
# user of the app. FX tracing flips its train/eval mode and Captum hooks its modules, so both work on
# `predict.eval_view(model)`, a copy of the module tree that shares the weight tensors: the shared model is
# never hooked, switched or changed. Only this module and groups.py import captum.

# Captum warns on every GuidedBackprop/DeepLift call that it hooks the ReLUs (and removes the hooks
# after): expected here, and on the private view, so it is noise in a server log. Set once at import.
warnings.filterwarnings("ignore", message=r"Setting (forward, )?backward hooks", category=UserWarning)

# ---------------------------------------------------------------- layers and feature maps


def is_torchvision(model: nn.Module) -> bool:
    """The torchvision seed, whose Bottleneck calls one ReLU module three times (FX nodes relu, relu_1, …)."""
    return getattr(getattr(model, "config", None), "family", "cifar") == "torchvision"


def _stem_node(model: nn.Module) -> str:
    """The stem's activation (what the 'conv1' stage shows): the conv output before ReLU is less readable."""
    return "relu" if is_torchvision(model) else "act1"


def layer_choices(model: nn.Module) -> dict[str, list[str]]:
    """Names for the UI: every block's grouped 3x3 conv ('grouped') and the stem + stage outputs ('stages')."""
    return {"grouped": list(model.grouped_convs()), "stages": ["conv1", *model.stage_names]}


def _node(model: nn.Module, layer: str) -> str:
    """The FX node / module path for a UI layer name.

    - a grouped conv ('layer1.0.conv2') is its own node: the conv output, before BN and ReLU;
    - 'conv1' (stage list) is the stem after its activation: node 'act1' ('relu' for the seed);
    - a stage ('layer2') is accepted by torchvision as a parent module: it returns that module's last
      node, i.e. the last block's output after its final ReLU ('layer2.N.act3');
    - anything else is passed through, so any node of `get_graph_node_names` works (e.g. 'layer1.0.act2').
    """
    return _stem_node(model) if layer == "conv1" else layer


def groups_of(model: nn.Module, layer: str) -> int:
    """The number of groups of `layer`'s conv (1 for stage outputs and anything that is not a conv)."""
    head, _, last = layer.rpartition(".")
    if last in ("bn2", "act2", "relu_1"):  # BN and ReLU after a grouped conv keep its channel groups
        layer = f"{head}.conv2"
    try:
        m = model.get_submodule(layer)
    except AttributeError as e:
        raise UserError(f"unknown layer {layer!r}; choose one of {layer_choices(model)}") from e
    return m.groups if isinstance(m, nn.Conv2d) else 1


def check_image(model: nn.Module, x: torch.Tensor, target: int | None = None) -> None:
    """ValueError for a batch or a wrong target (the group views and deletion tests explain one image)."""
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one normalized image 1 x 3 x H x W, got shape {tuple(x.shape)}")
    k = getattr(getattr(model, "config", None), "num_classes", None)
    if target is not None and (not isinstance(target, (int, np.integer)) or target < 0 or (k and target >= k)):
        raise UserError(f"target must be a class index in [0, {k}), not {target!r}")


def activation_node(model: nn.Module, layer: str) -> str:
    """The node after a grouped conv's BN + ReLU (for true sparsity): 'layer1.0.conv2' -> 'layer1.0.act2'."""
    head, _, last = layer.rpartition(".")
    if last != "conv2":
        return _node(model, layer)  # stage outputs are already after their activation
    # The seed's torchvision Bottleneck reuses one ReLU module; its 2nd call is FX node 'relu_1'.
    return f"{head}.relu_1" if is_torchvision(model) else f"{head}.act2"


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
    `python -m tools.loadtest`). FX stays the fallback for nodes that are not modules."""
    nodes = {_node(model, name): name for name in layers}  # FX node -> the caller's name
    view = eval_view(model)  # hooks and tracing (which calls .train()/.eval()) land on a private view
    device = device_of(model)
    hooked = _hooked_maps(view, x.to(device), nodes)
    if hooked is not None:
        return {name: hooked[name].detach().float().cpu() for name in layers}
    try:
        extractor = create_feature_extractor(view, return_nodes=nodes)
    except ValueError as e:  # torchvision's message lists no valid names; ours does
        raise UserError(f"{e}\nValid layers: {layer_choices(model)} or any FX node name "
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
        raise UserError(f"unknown attribution method {method!r}; choose one of {', '.join(METHODS)}")


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
    raise UserError(f"unknown baseline {kind!r}; choose one of {', '.join(BASELINES)}")


def _params(model: nn.Module, method: str, params: dict) -> dict:
    """Defaults merged with the caller's params, validated; ValueError names the bad one."""
    p = default_params(method)
    unknown = set(params) - set(p)
    if unknown:
        raise UserError(f"{method} has no parameter(s) {', '.join(sorted(unknown))}; "
                         f"it takes {', '.join(p) or 'none'}")
    p.update(params)
    for k in ("steps", "samples", "window", "stride"):
        if k in p and (not isinstance(p[k], (int, np.integer)) or p[k] < 1):
            raise UserError(f"{method}: {k} must be a positive integer, not {p[k]!r}")
    if p.get("internal_batch_size") is not None and int(p["internal_batch_size"]) < 1:
        raise UserError(f"{method}: internal_batch_size must be a positive integer or None")
    if "baseline" in p and p["baseline"] not in BASELINES:
        raise UserError(f"{method}: unknown baseline {p['baseline']!r}; choose one of {', '.join(BASELINES)}")
    if "noise" in p and not (0 <= float(p["noise"]) <= 10):
        raise UserError(f"{method}: noise must be between 0 and 10 (fraction of the input range)")
    if "window" in p and p["window"] > data.IMAGE_SIZE:
        raise UserError(f"{method}: window must be at most {data.IMAGE_SIZE}")
    if "upsample" in p and p["upsample"] not in ("bilinear", "nearest"):
        raise UserError(f"{method}: upsample must be 'bilinear' or 'nearest'")
    if "layer" in p:
        if p["layer"] is None:
            p["layer"] = layer_choices(model)["stages"][-1]
        try:
            model.get_submodule(_node(model, p["layer"]))
        except AttributeError as e:
            raise UserError(f"{method}: unknown layer {p['layer']!r}; choose one of {layer_choices(model)}") from e
    return p


def attribute(model: nn.Module, x: torch.Tensor, method: str, target: int, **params) -> Attribution:
    """Attribute the `target` logit of `model` at the normalized 1 x 3 x 32 x 32 input `x` to its pixels.

    Raises ValueError on an unknown method, parameter or target. The model is not modified.
    """
    _check_method(method)
    p = _params(model, method, params)
    num_classes = getattr(getattr(model, "config", None), "num_classes", None)
    if not isinstance(target, (int, np.integer)) or target < 0 or (num_classes and target >= num_classes):
        raise UserError(f"target must be a class index in [0, {num_classes}), not {target!r}")
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one normalized image 1 x 3 x H x W, got shape {tuple(x.shape)}")
    target = int(target)
    view = eval_view(model)  # Captum hooks and DeepLift's module attributes land here, not on `model`
    device = device_of(model)
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
    if method in ("DeepLift", "GuidedBackprop", "Guided Grad-CAM") and is_torchvision(model):
        notes.append("unreliable on the torchvision seed model: its blocks reuse one in-place ReLU")
    return Attribution(values, raw_min, raw_max, method, target, p, "; ".join(notes) or None)
