"""The fast family (FastResNeXt, the default architecture): its layout, its whitening init, and that every
per-group view and Captum method works on it unchanged, each checked against an independent computation."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from captum.attr import LayerGradCam, LayerGradientXActivation

from resnext_demo import data, explain, groups
from resnext_demo.model import Bottleneck, Downsample, FastResNeXt, ResNeXtConfig, whiten_init
from resnext_demo.zoo import build_model, get_config

TINY_FAST = ResNeXtConfig(depths=(1, 2, 1), stem_width=8, widths=(16, 32, 64), cardinality=4, base_width=2,
                          family="fast")


@pytest.fixture
def fast_model() -> FastResNeXt:
    """A tiny seeded fast-family model in eval mode with randomised BN statistics."""
    torch.manual_seed(0)
    m = FastResNeXt(TINY_FAST)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
            mod.weight.data.uniform_(0.5, 1.5)
    return m.eval()


@pytest.fixture
def x() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return data.normalize(F.interpolate(torch.rand(1, 3, 8, 8, generator=gen), size=32, mode="bilinear"))


def test_default_architecture_is_a_fast_resnext() -> None:
    cfg = get_config("resnext20_8x8d_fast")
    m = build_model("resnext20_8x8d_fast")
    assert isinstance(m, FastResNeXt) and cfg.cardinality == 8 and cfg.base_width == 8
    convs = m.grouped_convs()
    assert len(convs) == sum(cfg.depths)  # one grouped conv per bottleneck, none in the downsampling convs
    # group width d doubles each stage, like the CIFAR ResNeXt-29: d = 8, 16, 32 (C x d = 64, 128, 256)
    assert [c.out_channels // c.groups for c in convs.values()] == [8, 16, 16, 32, 32]
    weighted = [mod for mod in m.modules() if isinstance(mod, (nn.Conv2d, nn.Linear)) and
                not any(mod is d[0] for d in (b.downsample for b in m.modules() if isinstance(b, Bottleneck)) if d)]
    assert len(weighted) == 20  # the "20" of the name


def test_downsampling_happens_before_the_grouped_convs(fast_model, x) -> None:
    """Stage N's Downsample halves the grid, then only identity-shortcut bottlenecks follow: 16, 8, 4."""
    sizes = {}
    hooks = [fast_model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: sizes.__setitem__(n, o.shape[-1]))
             for n in fast_model.grouped_convs()]
    with torch.no_grad():
        fast_model(x)
    for h in hooks:
        h.remove()
    assert sizes == {"layer1.1.conv2": 16, "layer2.1.conv2": 8, "layer2.2.conv2": 8, "layer3.1.conv2": 4}
    for name in fast_model.stage_names:
        stage = fast_model.get_submodule(name)
        assert isinstance(stage[0], Downsample)
        assert all(isinstance(b, Bottleneck) and b.downsample is None for b in stage[1:])


def test_whitening_init_decorrelates_patches() -> None:
    """The stem's first filters applied to 3x3 patches give uncorrelated outputs of variance
    eig / (eig + eps): checked against the covariance computed directly from the conv's outputs."""
    gen = torch.Generator().manual_seed(0)
    imgs = data.normalize(F.interpolate(torch.rand(64, 3, 12, 12, generator=gen), size=32, mode="bilinear"))
    conv = nn.Conv2d(3, 16, 3, padding=1, bias=False)
    before = conv.weight[8:].clone()
    whiten_init(conv, imgs, eps=1e-6)
    with torch.no_grad():
        out = F.conv2d(imgs, conv.weight[:8])[:, :, :, :]  # valid positions only, as the patches
    z = out.permute(0, 2, 3, 1).reshape(-1, 8)
    cov = torch.cov(z.T.double())
    off = cov - torch.diag(torch.diag(cov))
    assert off.abs().max() < 1e-3 and torch.allclose(torch.diag(cov), torch.ones(8, dtype=torch.float64), atol=1e-2)
    assert torch.equal(conv.weight[8:], -conv.weight[:8])  # each filter with its negative (ReLU keeps both signs)
    assert not torch.equal(before, conv.weight[8:])


def test_feature_maps_and_every_method_work(fast_model, x) -> None:
    ch = explain.layer_choices(fast_model)
    assert ch["grouped"] == list(fast_model.grouped_convs())
    maps = explain.feature_maps(fast_model, x, ch["stages"] + ch["grouped"])
    with torch.no_grad():
        ref = fast_model.layer2(fast_model.layer1(fast_model.act1(fast_model.bn1(fast_model.conv1(x)))))
    assert torch.allclose(maps["layer2"], ref, atol=1e-6)
    for n in ch["grouped"]:
        assert explain.groups_of(fast_model, n) == 4 and maps[n].shape[1] % 4 == 0
    for method in explain.METHODS:
        a = explain.attribute(fast_model, x, method, target=3)
        assert a.values.shape == (32, 32) and np.isfinite(a.values).all() and np.any(a.values), method


def test_integrated_gradients_completeness(fast_model, x) -> None:
    a = explain.attribute(fast_model, x, "Integrated Gradients", target=2, steps=64, baseline="black")
    with torch.no_grad():
        diff = (fast_model(x)[0, 2] - fast_model(explain._baseline("black", x))[0, 2]).item()
    assert a.values.sum() == pytest.approx(diff, rel=0.05, abs=1e-3)


@pytest.mark.parametrize("layer", ["layer1.1.conv2", "layer2.2.conv2"])
def test_group_views_match_plain_captum_and_a_hand_edited_model(fast_model, x, layer) -> None:
    act_name = groups.group_output(fast_model, layer)
    assert act_name == layer.replace("conv2", "act2")
    act = fast_model.get_submodule(act_name)
    c = fast_model.config.cardinality
    gi = groups.group_importance(fast_model, x, layer, target=2)
    ref = LayerGradientXActivation(fast_model, act).attribute(x.clone().requires_grad_(), target=2)
    np.testing.assert_allclose(gi.values, ref.detach().double().reshape(c, -1).sum(1).numpy(), rtol=1e-5, atol=1e-7)
    # knocking out every group = the block with bn2 zeroed by hand
    edited = copy.deepcopy(fast_model)
    bn = edited.get_submodule(layer.replace("conv2", "bn2"))
    with torch.no_grad():
        bn.weight.zero_()
        bn.bias.zero_()
        want = torch.softmax(edited(x), 1)[0].numpy()
    np.testing.assert_allclose(groups.ablate_groups(fast_model, x, layer, list(range(c))), want, rtol=1e-5, atol=1e-7)
    # group Grad-CAMs add up to plain LayerGradCam on the block's activation
    cams = groups.group_gradcam(fast_model, x, layer, target=3, relu=False)
    lg = LayerGradCam(fast_model, act).attribute(x, target=3)
    full = F.interpolate(lg.detach(), size=(32, 32), mode="bilinear", align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(cams.sum(0), full, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("cfg", [TINY_FAST, ResNeXtConfig(depths=(2, 1, 3), stem_width=24, widths=(48, 96, 160),
                                                          cardinality=16, base_width=3, num_classes=7, family="fast")])
def test_closed_form_counts_equal_the_built_model(cfg) -> None:
    """config_params / config_macs (closed form, used by the About tab's equal-budget search) = counting."""
    from resnext_demo.model import count_macs, count_params
    from resnext_demo.budget import config_macs, config_params
    m = FastResNeXt(cfg)
    assert (config_params(cfg), config_macs(cfg)) == (count_params(m), count_macs(m))
