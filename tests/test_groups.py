"""Cardinality views (explain.py): group importance, knock-outs, group Grad-CAM, deletion, specialization.

Each property is checked against an independent computation (plain Captum, a hand-edited model, plain
hooks), so a bug in the group bookkeeping cannot pass by agreeing with itself."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import LayerFeatureAblation, LayerGradCam, LayerGradientXActivation

from resnext_demo import data, explain, weights

LAYER = "layer2.0.conv2"  # tiny model: C=4 groups of 4 channels at 16 x 16


@pytest.fixture
def x() -> torch.Tensor:
    """A smooth random normalized image (gradients are not pure noise)."""
    gen = torch.Generator().manual_seed(3)
    return data.normalize(F.interpolate(torch.rand(1, 3, 8, 8, generator=gen), size=32, mode="bilinear"))


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, model.training


def _assert_untouched(model, snap):
    state, training = snap
    assert model.training == training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in model.modules())


def test_group_output_names(tiny_model):
    assert explain.group_output(tiny_model, LAYER) == "layer2.0.act2"
    with pytest.raises(ValueError, match="not a grouped conv"):
        explain.group_output(tiny_model, "layer2")


@pytest.mark.parametrize("method", explain.GROUP_METHODS)
def test_group_importance_sums_to_layer_attribution(tiny_model, x, method):
    snap = _snapshot(tiny_model)
    gi = explain.group_importance(tiny_model, x, LAYER, target=2, method=method, steps=16)
    assert gi.values.shape == (4,) and np.isfinite(gi.values).all()
    assert gi.values.sum() == pytest.approx(gi.total, rel=1e-9, abs=1e-12)
    if method == "Gradient x Activation":  # the total is plain Captum on the block's activation
        ref = LayerGradientXActivation(tiny_model, tiny_model.get_submodule("layer2.0.act2")).attribute(
            x.clone().requires_grad_(), target=2)
        np.testing.assert_allclose(gi.values, ref.detach().double().reshape(4, -1).sum(1).numpy(), rtol=1e-5, atol=1e-7)
    else:  # completeness over all paths: groups + the block's shortcut = f(x) - f(black)
        with torch.no_grad():
            change = float(tiny_model(x)[0, 2] - tiny_model(data.normalize(torch.zeros_like(x)))[0, 2])
        assert gi.values.sum() + gi.shortcut == pytest.approx(change, abs=1e-4)
    _assert_untouched(tiny_model, snap)


def test_contrast_is_the_difference_of_two_explanations(tiny_model, x):
    """Gradient x Activation is linear in the explained output: (t vs c) = (t) - (c)."""
    a = explain.group_importance(tiny_model, x, LAYER, 1)
    b = explain.group_importance(tiny_model, x, LAYER, 7)
    ab = explain.group_importance(tiny_model, x, LAYER, 1, contrast=7)
    np.testing.assert_allclose(ab.values, a.values - b.values, rtol=1e-5, atol=1e-7)


def test_ablating_no_group_is_bit_identical(tiny_model, x):
    with torch.no_grad():
        plain = torch.softmax(tiny_model(x), 1)[0].numpy()
    assert np.array_equal(explain.ablate_groups(tiny_model, x, LAYER, []), plain)


def test_ablating_all_groups_equals_a_block_without_its_paths(tiny_model, x):
    """Zeroing every group = a model whose bn2 outputs 0 (scale and shift zeroed) by hand."""
    snap = _snapshot(tiny_model)
    got = explain.ablate_groups(tiny_model, x, LAYER, [0, 1, 2, 3])
    edited = copy.deepcopy(tiny_model)
    bn = edited.get_submodule("layer2.0.bn2")
    with torch.no_grad():
        bn.weight.zero_()
        bn.bias.zero_()
        want = torch.softmax(edited(x), 1)[0].numpy()
        plain = torch.softmax(tiny_model(x), 1)[0].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert not np.allclose(got, plain, atol=1e-4)  # the knock-out really changes the output
    _assert_untouched(tiny_model, snap)


@pytest.mark.parametrize("mode", explain.ABLATIONS)
def test_ablation_ranking_matches_single_knockouts_and_captum(tiny_model, x, mode):
    r = explain.ablation_ranking(tiny_model, x, LAYER, target=5, mode=mode)
    assert r.probs.shape == (4, 10) and np.allclose(r.probs.sum(1), 1, atol=1e-5)
    for g in range(4):  # the batched table equals each knock-out run on its own
        np.testing.assert_allclose(r.probs[g], explain.ablate_groups(tiny_model, x, LAYER, [g], mode), rtol=1e-4, atol=1e-6)
    assert sorted(r.ranking()) == [0, 1, 2, 3] and r.drop[r.ranking()[0]] == r.drop.max()
    # Captum's LayerFeatureAblation with one mask id per group reproduces the drops (zero ablation, or
    # each channel's own spatial mean as the layer baseline).
    act = tiny_model.get_submodule("layer2.0.act2")
    with torch.no_grad():
        grab = []
        h = act.register_forward_hook(lambda m, i, o: grab.append(o))
        tiny_model(x)
        h.remove()
    baseline = 0.0 if mode == "zero" else grab[0].mean((2, 3), keepdim=True)[0]
    mask = torch.arange(4).repeat_interleave(4).reshape(1, 16, 1, 1)
    fa = LayerFeatureAblation(lambda inp: torch.softmax(tiny_model(inp), 1), act).attribute(
        x, layer_baselines=baseline, target=5, layer_mask=mask, perturbations_per_eval=4)
    np.testing.assert_allclose(fa[0, ::4, 0, 0].double().numpy(), r.drop, rtol=1e-4, atol=1e-6)


def test_ablation_rejects_bad_groups_and_modes(tiny_model, x):
    with pytest.raises(ValueError, match="groups 0..3"):
        explain.ablate_groups(tiny_model, x, LAYER, [4])
    with pytest.raises(ValueError, match="unknown ablation"):
        explain.ablate_groups(tiny_model, x, LAYER, [0], mode="noise")
    with pytest.raises(ValueError, match="target"):
        explain.ablation_ranking(tiny_model, x, LAYER, target=10)


def test_group_gradcams_sum_to_the_layer_gradcam(tiny_model, x):
    cams = explain.group_gradcam(tiny_model, x, LAYER, target=3, relu=False)
    assert cams.shape == (4, 32, 32)
    layer = LayerGradCam(tiny_model, tiny_model.get_submodule("layer2.0.act2")).attribute(x, target=3)
    ref = F.interpolate(layer.detach(), size=(32, 32), mode="bilinear", align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(cams.sum(0), ref, rtol=1e-4, atol=1e-6)
    relu = explain.group_gradcam(tiny_model, x, LAYER, target=3)
    assert (relu >= 0).all() and relu.max() > 0
    # Each ReLU'd group map is 0 exactly where its coarse map was <= 0 everywhere around (bilinear keeps signs).
    assert np.all(relu[cams.max(axis=(1, 2)) <= 0] == 0)


def test_deletion_score_properties(tiny_model, x):
    values = np.random.default_rng(0).normal(size=(32, 32))
    d = explain.deletion_score(tiny_model, x, values, target=4)
    assert d.fractions.shape == d.probs.shape == d.random_probs.shape == (len(explain.DELETION_FRACTIONS),)
    assert ((0 <= d.probs) & (d.probs <= 1)).all() and 0 <= d.base <= 1
    again = explain.deletion_score(tiny_model, x, values, target=4)
    assert np.array_equal(d.probs, again.probs) and np.array_equal(d.random_probs, again.random_probs)
    # Deleting nothing keeps the probability; deleting everything gives the blurred image's probability.
    full = explain.deletion_score(tiny_model, x, values, target=4, fractions=(0.0, 1.0))
    blurred = explain._baseline("blur", x)
    with torch.no_grad():
        p_blur = float(torch.softmax(tiny_model(blurred), 1)[0, 4])
    assert full.probs[0] == pytest.approx(d.base, abs=1e-6) and full.probs[1] == pytest.approx(p_blur, abs=1e-5)
    with pytest.raises(ValueError, match="finite"):
        explain.deletion_score(tiny_model, x, np.full((32, 32), np.nan), target=4)
    grey = explain.deletion_score(tiny_model, x, values, target=4, fractions=(1.0,), fill="mean", patch=1)
    with torch.no_grad():
        p_grey = float(torch.softmax(tiny_model(torch.zeros_like(x)), 1)[0, 4])
    assert grey.probs[0] == pytest.approx(p_grey, abs=1e-5)
    with pytest.raises(ValueError, match="fill"):
        explain.deletion_score(tiny_model, x, values, target=4, fill="noise")


def test_deletion_of_true_maps_beats_random_on_the_shipped_checkpoint(shipped_checkpoint, cifar_test):
    """The issue's gate: on a fixed slice of 40 test images, removing what IG / Grad-CAM mark as evidence
    lowers the true class's probability more than random removal for most images; the reversed map
    (least important first) must not, or the test could not fail."""
    model, _ = weights.load_checkpoint(shipped_checkpoint)
    images, labels = cifar_test
    wins = {"Integrated Gradients": 0, "Grad-CAM": 0, "reversed Grad-CAM": 0}
    for i in range(40):
        xi, t = data.normalize(images[i:i + 1]), int(labels[i])
        ig = explain.attribute(model, xi, "Integrated Gradients", t, steps=16).values
        cam = explain.attribute(model, xi, "Grad-CAM", t).values
        for name, v in (("Integrated Gradients", ig), ("Grad-CAM", cam), ("reversed Grad-CAM", -cam)):
            d = explain.deletion_score(model, xi, v, t)
            wins[name] += d.score > d.random_score
    assert wins["Integrated Gradients"] >= 24 and wins["Grad-CAM"] >= 24, wins
    assert wins["reversed Grad-CAM"] < 20, wins


@pytest.fixture
def labelled() -> tuple[torch.Tensor, torch.Tensor]:
    """60 smooth random uint8 images with balanced labels (6 per class)."""
    gen = torch.Generator().manual_seed(5)
    imgs = F.interpolate(torch.rand(60, 3, 8, 8, generator=gen), size=32, mode="bilinear")
    return (imgs * 255).round().to(torch.uint8), torch.arange(60) % 10


def test_specialization_invariants(tiny_model, labelled):
    images, labels = labelled
    snap = _snapshot(tiny_model)
    spec = explain.group_specialization(tiny_model, images, labels, batch_size=16)
    assert list(spec) == list(tiny_model.grouped_convs())
    s = spec[LAYER]
    assert s.class_means.shape == (4, 10) and s.top_images.shape == (4, 9) and s.correlation.shape == (4, 4)
    # Balanced classes: the mean of the class means is the overall mean.
    np.testing.assert_allclose(s.class_means.mean(1), s.mean, rtol=1e-9)
    assert ((0 <= s.selectivity) & (s.selectivity <= 1)).all()  # activations after a ReLU are >= 0
    np.testing.assert_allclose(s.correlation, s.correlation.T, atol=1e-12)
    alive = s.mean > 0
    np.testing.assert_allclose(np.diag(s.correlation)[alive], 1, atol=1e-9)
    # The top images really are the most activating ones: recompute their activation with a plain hook.
    maps = explain.feature_maps(tiny_model, data.normalize(images), ["layer2.0.act2"])["layer2.0.act2"]
    per_group = maps.reshape(60, 4, -1).double().mean(2)
    np.testing.assert_allclose(s.top_values, per_group.T.sort(1, descending=True).values[:, :9].numpy(), rtol=1e-5)
    assert (s.preferred_class == s.class_means.argmax(1)).all()
    _assert_untouched(tiny_model, snap)


def test_colour_sensitivity_is_zero_for_grey_images(tiny_model, labelled):
    images, labels = labelled
    grey = explain._grey(images).contiguous()
    s = explain.group_specialization(tiny_model, grey, labels)[LAYER]
    assert np.allclose(s.colour, 0) and (s.blur > 0).any()
    c = explain.group_specialization(tiny_model, images, labels)[LAYER]
    assert (c.colour > 0).any()


def test_specialization_cache_round_trip(tiny_model, tmp_path, monkeypatch, labelled):
    images, labels = labelled
    calls = []
    monkeypatch.setattr(data, "load_split", lambda source, split: calls.append(split) or (images, labels))
    monkeypatch.setattr(data, "source_id", lambda source: "fake-source")
    first = explain.specialization_cached(tiny_model, "src", n=60, cache=str(tmp_path))
    again = explain.specialization_cached(tiny_model, "src", n=60, cache=str(tmp_path))
    assert calls == ["test"]  # the second call read the cache
    assert list(again) == list(first)
    for layer in first:
        for f in ("class_means", "selectivity", "top_images", "correlation", "colour", "blur", "mean"):
            assert np.array_equal(getattr(first[layer], f), getattr(again[layer], f))
    changed = copy.deepcopy(tiny_model)
    with torch.no_grad():
        changed.fc.weight.add_(1)
    assert explain.model_digest(changed) != explain.model_digest(tiny_model)  # another checkpoint, another entry
    explain.specialization_cached(changed, "src", n=60, cache=str(tmp_path))
    assert calls == ["test", "test"] and len(list(tmp_path.glob("*.safetensors"))) == 2


def test_within_between_and_partition_statistics():
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(200, 2, generator=gen)
    # 2 groups of 3 channels; each group's channels are noisy copies of one signal -> within >> between.
    ch = base.repeat_interleave(3, 1) + 0.01 * torch.rand(200, 6, generator=gen)
    within, between = explain._within_between(ch, 2)
    assert within > 0.99 and abs(between) < 0.3
    # A property that separates the groups perfectly is (almost) never matched by random partitions ...
    assert explain._partition_p(torch.tensor([0.0, 0.1, 0.2, 5.0, 5.1, 5.2]), 2, trials=200) < 0.15
    # ... and one that does not separate them is matched by every partition.
    assert explain._partition_p(torch.ones(6), 2, trials=50) == 1.0


def test_specialization_scalars_survive_the_cache(tiny_model, tmp_path, monkeypatch, labelled):
    images, labels = labelled
    monkeypatch.setattr(data, "load_split", lambda source, split: (images, labels))
    monkeypatch.setattr(data, "source_id", lambda source: "fake-source")
    first = explain.specialization_cached(tiny_model, "src", n=60, cache=str(tmp_path))[LAYER]
    again = explain.specialization_cached(tiny_model, "src", n=60, cache=str(tmp_path))[LAYER]
    for f in ("within_corr", "between_corr", "colour_p"):
        assert isinstance(getattr(again, f), float) and getattr(again, f) == pytest.approx(getattr(first, f), nan_ok=True)
    assert 0 < first.colour_p <= 1


def test_cli_prints_a_row_per_block_and_method(tiny_checkpoint, tmp_path, monkeypatch, labelled, capsys):
    images, labels = labelled
    monkeypatch.setattr(data, "load_split", lambda source, split: (images, labels))
    monkeypatch.setattr(data, "source_id", lambda source: "fake-source")
    monkeypatch.setenv("RESNEXT_DEMO_CACHE", str(tmp_path))
    explain.main(["--weights", str(tiny_checkpoint), "--data", "src", "--n", "60", "--faithfulness", "2"])
    out = capsys.readouterr().out
    assert all(f"| {layer} | 4 |" in out for layer in ("layer1.0.conv2", "layer2.0.conv2", "layer3.0.conv2"))
    assert all(f"| {m} | " in out and "/2 |" in out for m in explain.METHODS)
    assert list(tmp_path.glob("analysis/groups-v2-*.safetensors"))


def test_batched_deletion_scores_equal_one_at_a_time(tiny_model, x):
    rng = np.random.default_rng(1)
    maps = rng.normal(size=(3, 32, 32))
    batched = explain.deletion_scores(tiny_model, x, maps, target=6)
    for m, d in zip(maps, batched):
        one = explain.deletion_score(tiny_model, x, m, target=6)
        np.testing.assert_allclose(d.probs, one.probs, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(d.random_probs, one.random_probs, rtol=1e-4, atol=1e-6)
