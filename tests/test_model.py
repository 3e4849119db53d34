"""The model family: paper parameter counts, Captum-safe activations, shapes, the config round trip."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn as nn

from resnext_demo.model import ResNeXt, ResNeXtConfig, count_macs, count_params
from resnext_demo.zoo import build_model, get_config, list_models
from resnext_demo.budget import config_macs, config_params

# Forward/backward on every named model; the paper-sized ones cost a second or two each on 2 cores.
ALL = list_models()


@pytest.mark.parametrize("name,params", [("resnext29_8x64d", 34.4e6), ("resnext29_16x64d", 68.1e6)])
def test_paper_parameter_counts(name: str, params: float) -> None:
    """Table 7 of the paper: 34.4 M and 68.1 M parameters, within 1 %."""
    n = count_params(build_model(name))
    assert abs(n - params) / params < 0.01, n


def test_config_counts_match_built_model() -> None:
    for name in ALL:
        cfg = get_config(name)
        if cfg.family != "torchvision":
            m = build_model(name)
            assert config_params(cfg) == count_params(m), name
            assert config_macs(cfg) == count_macs(m), name


def test_equal_budget_variants_have_equal_complexity() -> None:
    """Named C x d variants match their reference's params and MACs: the best integer d, and within 6 %
    (integer d makes the match coarse: e.g. at C=2 on the tiny widths no d gets both within 5 %)."""
    for ref in ("resnext29_8x8d_tiny", "resnext29_8x16d_small"):
        base = get_config(ref)
        p0, m0 = config_params(base), config_macs(base)

        def miss(cfg):
            return max(abs(config_params(cfg) - p0) / p0, abs(config_macs(cfg) - m0) / m0)

        named = {n: get_config(n) for n in list_models() if n.endswith(ref.rsplit("_", 1)[1]) and n != ref}
        assert len(named) >= 3
        for c, cfg in ((cfg.cardinality, cfg) for cfg in named.values()):
            neighbours = [replace(cfg, base_width=cfg.base_width + k) for k in (-1, 1) if cfg.base_width + k > 0]
            assert all(miss(cfg) <= miss(n) for n in neighbours), (ref, c)
            assert miss(cfg) < 0.06, (ref, c, miss(cfg))
            m = ResNeXt(cfg)  # and the analytic counts are the real ones
            assert (count_params(m), count_macs(m)) == (config_params(cfg), config_macs(cfg))
    assert get_config("resnet29_tiny").cardinality == get_config("resnet29_small").cardinality == 1


def _relus(model: nn.Module) -> list[nn.Module]:
    """The activation modules: ReLU, or GELU in the airbench families."""
    return [m for m in model.modules() if isinstance(m, (nn.ReLU, nn.GELU))]


@pytest.mark.parametrize("name", [n for n in ALL if get_config(n).family != "torchvision"])
def test_every_relu_distinct_non_inplace_and_called_once(name: str) -> None:
    model = build_model(name).eval()
    relus = _relus(model)
    assert len(relus) > 0 and len({id(r) for r in relus}) == len(relus)
    assert not any(getattr(r, "inplace", False) for r in relus)
    calls = {id(r): 0 for r in relus}
    hooks = [r.register_forward_hook(lambda m, i, o: calls.__setitem__(id(m), calls[id(m)] + 1)) for r in relus]
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert set(calls.values()) == {1}


def test_no_module_is_registered_twice() -> None:
    """A module reachable under two names would be hooked twice by Captum."""
    model = build_model("resnext29_8x8d_tiny")
    assert len(list(model.named_modules(remove_duplicate=False))) == len(list(model.named_modules()))


@pytest.mark.parametrize("name", ALL)
def test_forward_backward_shapes_and_finite(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name).train()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 10)
    out.logsumexp(1).sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient reaches {missing}"  # timm's check: every parameter is trained
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    feats = model.forward_features(x.detach())
    assert model.forward_head(feats).shape == (2, 10)
    assert model.forward_head(feats, pre_logits=True).ndim == 2


def test_grouped_convs_are_named_and_grouped(tiny_model) -> None:
    convs = tiny_model.grouped_convs()
    assert list(convs) == ["layer1.0.conv2", "layer2.0.conv2", "layer3.0.conv2"]
    assert all(c.groups == tiny_model.config.cardinality and c.kernel_size == (3, 3) for c in convs.values())
    assert dict(tiny_model.named_modules())["layer2.0.conv2"] is convs["layer2.0.conv2"]
    big = build_model("resnext29_8x64d")
    assert len(big.grouped_convs()) == 9
    assert big.grouped_convs()["layer3.2.conv2"].out_channels == 8 * 64 * 4


def test_reset_classifier_keeps_config_in_step(tiny_model) -> None:
    tiny_model.reset_classifier(3)
    assert tiny_model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    assert tiny_model.config.num_classes == 3


def test_config_dict_round_trip() -> None:
    for name in ALL:
        cfg = get_config(name)
        assert ResNeXtConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(TypeError):
        ResNeXtConfig.from_dict({"bogus": 1})


def test_unknown_model_name_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnext29_999x1d")


def test_seed_recipe_is_torchvision_resnext50_with_10_classes() -> None:
    m = build_model("resnext50_32x4d").eval()  # a 32x32 input ends at 1x1: batch-1 BN needs eval mode
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert all(c.groups == 32 for c in m.grouped_convs().values()) and len(m.grouped_convs()) == 16
    with pytest.raises(ValueError):
        build_model("resnext29_8x64d", pretrained=True)


def test_pretrained_seed_never_downloads(tmp_path, monkeypatch) -> None:
    """With an empty torch cache, asking for ImageNet weights fails fast instead of downloading."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match="local torch cache"):
        build_model("resnext50_32x4d", pretrained=True)


def test_zoo_table_writes_out_what_the_equal_budget_search_finds() -> None:
    """The zoo's equal-budget names are typed out (greppable); each must be exactly what the search returns,
    so a change to the budget arithmetic or to a reference cannot leave a stale table behind."""
    from resnext_demo.budget import equal_budget_configs

    for ref, cs in (("resnext29_8x8d_tiny", (1, 2, 4)), ("resnext29_8x16d_small", (1, 4, 16)),
                    ("resnext20_8x8d_fast", (1, 2, 4, 16))):
        for name, cfg in equal_budget_configs(ref, cs).items():
            assert get_config(name) == cfg, name
