"""explain.py: feature maps and per-group views against hand computations; Captum attributions' properties."""
from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from resnext_demo import data, explain


# Fewer steps/samples where a test checks side effects, not values: keeps the file fast.
CHEAP = {"Integrated Gradients": {"steps": 4}, "SmoothGrad": {"samples": 2}, "Occlusion": {"window": 16, "stride": 16}}


@pytest.fixture
def x() -> torch.Tensor:
    """A fixed normalized input (a smooth random image, so gradients are not pure noise)."""
    gen = torch.Generator().manual_seed(1)
    img = F.interpolate(torch.rand(1, 3, 8, 8, generator=gen), size=32, mode="bilinear")
    return data.normalize(img)


def _hooked_outputs(model, modules: dict[str, str], x):
    """Outputs of named modules captured with plain forward hooks (the reference for feature_maps)."""
    got, handles = {}, []
    for key, path in modules.items():
        handles.append(model.get_submodule(path).register_forward_hook(
            lambda m, i, o, key=key: got.__setitem__(key, o.detach().clone())))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return got


def test_layer_choices_and_groups(tiny_model):
    ch = explain.layer_choices(tiny_model)
    assert ch["grouped"] == list(tiny_model.grouped_convs()) == ["layer1.0.conv2", "layer2.0.conv2", "layer3.0.conv2"]
    assert ch["stages"] == ["conv1", "layer1", "layer2", "layer3"]
    assert all(explain.groups_of(tiny_model, n) == 4 for n in ch["grouped"])
    assert all(explain.groups_of(tiny_model, n) == 1 for n in ch["stages"])
    assert explain.groups_of(tiny_model, explain.activation_node(tiny_model, "layer2.0.conv2")) == 4
    with pytest.raises(ValueError, match="unknown layer"):
        explain.groups_of(tiny_model, "layer9")


def test_feature_maps_match_forward_hooks(tiny_model, x):
    layers = explain.layer_choices(tiny_model)
    names = layers["stages"] + layers["grouped"] + ["layer1.0.act2"]
    maps = explain.feature_maps(tiny_model, x, names)
    # conv1 = the stem after its ReLU; a stage = its last block's output; a grouped conv = before BN.
    ref = _hooked_outputs(tiny_model, {"conv1": "act1", "layer1": "layer1", "layer2": "layer2", "layer3": "layer3",
                                       **{n: n for n in layers["grouped"]}, "layer1.0.act2": "layer1.0.act2"}, x)
    assert list(maps) == names
    for n in names:
        assert maps[n].shape == ref[n].shape and maps[n].dtype == torch.float32 and not maps[n].requires_grad
        torch.testing.assert_close(maps[n], ref[n])
    assert maps["layer1"].min() >= 0 and maps["layer1.0.conv2"].min() < 0  # after vs before the ReLU


def test_feature_maps_leave_model_alone(tiny_model, x):
    tiny_model.train()  # even a training-mode model is neither switched nor are its BN statistics touched
    before = copy.deepcopy(tiny_model.state_dict())
    maps = explain.feature_maps(tiny_model, x, ["layer2"])
    assert tiny_model.training
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, before[k]), k
    tiny_model.eval()
    torch.testing.assert_close(maps["layer2"], explain.feature_maps(tiny_model, x, ["layer2"])["layer2"])
    with pytest.raises(ValueError, match="Valid layers"):
        explain.feature_maps(tiny_model, x, ["no.such.layer"])


def test_split_groups_round_trip():
    fmap = torch.randn(1, 12, 5, 7)
    g = explain.split_groups(fmap, 4)
    assert g.shape == (4, 3, 5, 7)
    assert torch.equal(torch.cat(list(g)), fmap[0])
    for i in range(4):
        assert torch.equal(g[i], fmap[0, 3 * i:3 * (i + 1)])
    assert torch.equal(explain.split_groups(fmap[0], 4), g)  # C x H x W accepted too
    with pytest.raises(ValueError):
        explain.split_groups(fmap, 5)


def test_group_stats_by_hand():
    fmap = torch.randn(1, 8, 4, 4)
    act = torch.relu(fmap + 0.3)
    s = explain.group_stats(fmap, 2, activated=act)
    for g in range(2):
        part, a = fmap[0, 4 * g:4 * g + 4], act[0, 4 * g:4 * g + 4]
        assert s.mean[g] == pytest.approx(part.mean().item(), abs=1e-6)
        assert s.l1[g] == pytest.approx(part.abs().mean().item(), abs=1e-6)
        assert s.max[g] == pytest.approx(part.max().item(), abs=1e-6)
        assert s.sparsity[g] == pytest.approx((a == 0).float().mean().item())
    s2 = explain.group_stats(fmap, 2)  # without `activated`: fraction of values <= 0 of fmap itself
    assert s2.sparsity[0] == pytest.approx((fmap[0, :4] <= 0).float().mean().item())
    assert all(len(a) == 2 for a in (s.mean, s.l1, s.sparsity, s.max))


@pytest.mark.parametrize("method", explain.METHODS)
def test_every_method_gives_finite_map(tiny_model, x, method):
    a = explain.attribute(tiny_model, x, method, target=3)
    assert a.values.shape == (32, 32) and a.values.dtype == np.float32
    assert np.isfinite(a.values).all() and np.any(a.values)
    assert a.method == method and a.target == 3 and a.note is None
    assert set(a.params) == set(explain.default_params(method))
    assert a.raw_min <= a.raw_max


def test_saliency_is_abs_gradient(tiny_model, x):
    xg = x.clone().requires_grad_()
    tiny_model(xg)[0, 5].backward()
    expected = xg.grad.abs().sum(1)[0].numpy()  # |d logit / d pixel|, summed over R, G, B
    a = explain.attribute(tiny_model, x, "Saliency", target=5)
    np.testing.assert_allclose(a.values, expected, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("baseline", ["black", "mean", "blur"])
def test_integrated_gradients_completeness(tiny_model, x, baseline):
    a = explain.attribute(tiny_model, x, "Integrated Gradients", target=2, steps=64, baseline=baseline)
    with torch.no_grad():
        diff = (tiny_model(x)[0, 2] - tiny_model(explain._baseline(baseline, x))[0, 2]).item()
    assert a.values.sum() == pytest.approx(diff, rel=0.05, abs=1e-3)


def test_grad_cam_by_hand(tiny_model, x):
    acts = {}
    h = tiny_model.layer3.register_forward_hook(lambda m, i, o: acts.__setitem__("a", o))
    out = tiny_model(x)
    h.remove()
    grads = torch.autograd.grad(out[0, 7], acts["a"])[0]
    cam = torch.relu((grads.mean((2, 3), keepdim=True) * acts["a"]).sum(1, keepdim=True))
    expected = F.interpolate(cam, size=(32, 32), mode="bilinear")[0, 0].detach().numpy()
    a = explain.attribute(tiny_model, x, "Grad-CAM", target=7)
    assert a.params["layer"] == "layer3"
    assert (a.values >= 0).all()
    np.testing.assert_allclose(a.values, expected, rtol=1e-4, atol=1e-7)
    assert a.raw_max == pytest.approx(cam.max().item(), rel=1e-4)
    g = explain.attribute(tiny_model, x, "Grad-CAM", target=7, layer="layer1.0.conv2", relu=False)
    assert g.values.shape == (32, 32) and g.values.min() < 0  # without ReLU negative evidence shows


def test_degenerate_maps_get_a_note_not_nan(tiny_model, x):
    dead = copy.deepcopy(tiny_model)
    with torch.no_grad():
        dead.fc.weight[4] = 0  # class 4's logit is a constant: every gradient is zero
    for method in ("Grad-CAM", "Saliency"):
        a = explain.attribute(dead, x, method, target=4)
        assert not np.any(a.values) and "all zeros" in a.note
    with torch.no_grad():
        dead.fc.weight[4] = float("nan")
    a = explain.attribute(dead, x, "Saliency", target=4)
    assert np.isfinite(a.values).all() and "non-finite" in a.note
    assert np.isfinite([a.raw_min, a.raw_max]).all()


def test_attribute_leaves_model_alone(tiny_model, x):
    before = copy.deepcopy(tiny_model.state_dict())
    for mode in (False, True):
        tiny_model.train(mode)
        for method in explain.METHODS:
            explain.attribute(tiny_model, x, method, target=1, **CHEAP.get(method, {}))
        assert tiny_model.training is mode
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for m in tiny_model.modules():  # no Captum hook is left behind on the shared model
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
    assert all(p.grad is None for p in tiny_model.parameters())


def test_attribute_is_thread_safe(tiny_model, x):
    # Hook-based (GuidedBackprop, DeepLift) and plain gradient methods at once on one shared model.
    jobs = [("GuidedBackprop", 1), ("Saliency", 1), ("DeepLift", 2), ("Saliency", 2)] * 2
    serial = [explain.attribute(tiny_model, x, m, t).values for m, t in jobs]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda j: explain.attribute(tiny_model, x, *j).values, jobs))
    for s, p in zip(serial, parallel):
        np.testing.assert_allclose(s, p, rtol=1e-5, atol=1e-9)


def test_bad_requests_raise_clear_errors(tiny_model, x):
    with pytest.raises(ValueError, match="choose one of"):
        explain.attribute(tiny_model, x, "LIME", target=0)
    with pytest.raises(ValueError, match="no parameter"):
        explain.attribute(tiny_model, x, "Saliency", target=0, steps=3)
    with pytest.raises(ValueError, match="baseline"):
        explain.attribute(tiny_model, x, "DeepLift", target=0, baseline="white")
    with pytest.raises(ValueError, match="layer"):
        explain.attribute(tiny_model, x, "Grad-CAM", target=0, layer="layer7")
    with pytest.raises(ValueError, match="steps"):
        explain.attribute(tiny_model, x, "Integrated Gradients", target=0, steps=0)
    with pytest.raises(ValueError, match="target"):
        explain.attribute(tiny_model, x, "Saliency", target=10)


def test_default_params_are_fresh_copies():
    p = explain.default_params("Integrated Gradients")
    assert p["steps"] == 32 and p["baseline"] in explain.BASELINES
    p["steps"] = 1
    assert explain.default_params("Integrated Gradients")["steps"] == 32
    assert explain.default_params("SmoothGrad") == {"samples": 16, "noise": 0.15}
    assert explain.default_params("Occlusion")["window"] == 8
    with pytest.raises(ValueError):
        explain.default_params("nope")


def test_torchvision_seed_model(x):
    from resnext_demo.zoo import build_model

    torch.manual_seed(0)
    seed = build_model("resnext50_32x4d").eval()  # torchvision's ResNeXt-50 (a ResNet subclass: torchvision's names)
    ch = explain.layer_choices(seed)
    assert ch["stages"] == ["conv1", "layer1", "layer2", "layer3", "layer4"]
    assert ch["grouped"][0] == "layer1.0.conv2" and explain.groups_of(seed, ch["grouped"][0]) == 32
    conv, stem = ch["grouped"][0], ch["stages"][0]
    act = explain.activation_node(seed, conv)
    maps = explain.feature_maps(seed, x, [stem, conv, act])
    assert maps[stem].shape == (1, 64, 16, 16) and maps[stem].min() >= 0  # the stem after its ReLU
    assert maps[conv].shape == maps[act].shape == (1, 128, 8, 8) and maps[act].min() >= 0
    a = explain.attribute(seed, x, "Grad-CAM", target=0)
    assert a.params["layer"] == "layer4" and a.values.shape == (32, 32) and np.isfinite(a.values).all()
    assert "unreliable" in explain.attribute(seed, x, "GuidedBackprop", target=0).note


# ---------------------------------------------------------------- issue 13: reproducible, converged, labelled


def test_smoothgrad_is_seeded_and_equals_captums_noise_tunnel(tiny_model, x):
    """Same image, same map (noise from a local generator, the process-wide RNG untouched); and the map is what
    Captum's NoiseTunnel(Saliency) gives when the global generator is seeded the same way."""
    from captum.attr import NoiseTunnel, Saliency

    state = torch.random.get_rng_state()
    a = explain.attribute(tiny_model, x, "SmoothGrad", 2)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert np.array_equal(a.values, explain.attribute(tiny_model, x, "SmoothGrad", 2).values)
    stdev = 0.15 * float(x.max() - x.min())
    torch.manual_seed(explain.SMOOTHGRAD_SEED)
    ref = NoiseTunnel(Saliency(tiny_model)).attribute(x.clone().requires_grad_(), nt_type="smoothgrad", nt_samples=16,
                                                      stdevs=stdev, target=2, abs=True)
    np.testing.assert_allclose(a.values, ref[0].sum(0).detach().numpy(), rtol=1e-5, atol=1e-9)


def test_integrated_gradients_reports_its_convergence_delta(tiny_model, x):
    with torch.no_grad():
        change = float(tiny_model(x)[0, 3] - tiny_model(data.normalize(torch.zeros_like(x)))[0, 3])
    for steps in (4, 64):
        a = explain.attribute(tiny_model, x, "Integrated Gradients", 3, steps=steps)
        assert a.change == pytest.approx(change, abs=1e-5)  # f(x) - f(black), by a plain forward
        assert a.delta == pytest.approx(float(a.values.astype(np.float64).sum()) - change, abs=1e-5)
    assert explain.attribute(tiny_model, x, "Saliency", 3).delta is None


def test_shown_maps_default_to_what_the_next_layer_receives(tiny_model, x):
    ref = _hooked_outputs(tiny_model, {"conv": "layer2.0.conv2", "act": "layer2.0.act2", "stage": "layer2"}, x)
    node, fmap, stats = explain.shown_maps(tiny_model, x, "layer2.0.conv2")
    assert node == "layer2.0.act2"
    torch.testing.assert_close(fmap, ref["act"])
    act = ref["act"][0].reshape(4, -1).double()
    np.testing.assert_allclose(stats.l1, act.abs().mean(1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(stats.sparsity, (act <= 0).double().mean(1).numpy())
    node, fmap, stats = explain.shown_maps(tiny_model, x, "layer2.0.conv2", before_bn=True)
    assert node == "layer2.0.conv2"
    torch.testing.assert_close(fmap, ref["conv"])
    np.testing.assert_allclose(stats.sparsity, (act <= 0).double().mean(1).numpy())  # still counted after the ReLU
    node, fmap, _ = explain.shown_maps(tiny_model, x, "layer2", before_bn=True)
    assert node == "layer2"
    torch.testing.assert_close(fmap, ref["stage"])
