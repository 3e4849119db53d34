"""Cardinality views (groups.py, specialization.py): group importance, knock-outs, group Grad-CAM,
specialization (the deletion tests are in test_faithfulness.py).

Each property is checked against an independent computation (plain Captum, a hand-edited model, plain
hooks), so a bug in the group bookkeeping cannot pass by agreeing with itself."""
from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import LayerConductance, LayerFeatureAblation, LayerGradCam, LayerGradientXActivation

from resnext_demo import data, explain, faithfulness, findings, groups, specialization, verdicts
from resnext_demo.model import ResNeXt

LAYER = "layer2.0.conv2"  # tiny model: C=4 groups of 4 channels at 16 x 16


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, model.training


def _assert_untouched(model, snap):
    state, training = snap
    assert model.training == training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in model.modules())


def test_group_output_names(tiny_model):
    assert groups.group_output(tiny_model, LAYER) == "layer2.0.act2"
    with pytest.raises(ValueError, match="not a grouped conv"):
        groups.group_output(tiny_model, "layer2")


@pytest.mark.parametrize("method", groups.GROUP_METHODS)
def test_group_importance_sums_to_layer_attribution(tiny_model, x, method):
    snap = _snapshot(tiny_model)
    gi = groups.group_importance(tiny_model, x, LAYER, target=2, method=method, steps=16, tol=1e-3)
    assert gi.values.shape == (4,) and np.isfinite(gi.values).all()
    assert gi.values.sum() == pytest.approx(gi.total, rel=1e-9, abs=1e-12)
    if method == "Gradient x Activation":  # the total is plain Captum on the block's activation
        ref = LayerGradientXActivation(tiny_model, tiny_model.get_submodule("layer2.0.act2")).attribute(
            x.clone().requires_grad_(), target=2)
        np.testing.assert_allclose(gi.values, ref.detach().double().reshape(4, -1).sum(1).numpy(), rtol=1e-5, atol=1e-7)
    else:  # completeness over all paths: groups + the block's shortcut = f(x) - f(black). The shortcut is
        # integrated from its own tensor (it used to be defined as the remainder, which made this hold by
        # construction), so the sum now holds only as far as the integral converged (tol).
        with torch.no_grad():
            change = float(tiny_model(x)[0, 2] - tiny_model(data.normalize(torch.zeros_like(x)))[0, 2])
        assert gi.change == pytest.approx(change, abs=1e-5)
        assert gi.values.sum() + gi.shortcut == pytest.approx(change, abs=1e-3)
        assert gi.completeness_gap == pytest.approx(gi.values.sum() + gi.shortcut - change, abs=1e-5)
        assert gi.shortcut_kind == "projection" and gi.step_error <= 1e-3
    _assert_untouched(tiny_model, snap)


def test_contrast_is_the_difference_of_two_explanations(tiny_model, x):
    """Gradient x Activation is linear in the explained output: (t vs c) = (t) - (c)."""
    a = groups.group_importance(tiny_model, x, LAYER, 1)
    b = groups.group_importance(tiny_model, x, LAYER, 7)
    ab = groups.group_importance(tiny_model, x, LAYER, 1, contrast=7)
    np.testing.assert_allclose(ab.values, a.values - b.values, rtol=1e-5, atol=1e-7)


def test_ablating_no_group_is_bit_identical(tiny_model, x):
    with torch.no_grad():
        plain = torch.softmax(tiny_model(x), 1)[0].numpy()
    assert np.array_equal(groups.ablate_groups(tiny_model, x, LAYER, []), plain)


def test_ablating_all_groups_equals_a_block_without_its_paths(tiny_model, x):
    """Zeroing every group = a model whose bn2 outputs 0 (scale and shift zeroed) by hand."""
    snap = _snapshot(tiny_model)
    got = groups.ablate_groups(tiny_model, x, LAYER, [0, 1, 2, 3])
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


@pytest.mark.parametrize("mode", groups.ABLATIONS)
def test_ablation_ranking_matches_single_knockouts_and_captum(tiny_model, x, mode):
    r = groups.ablation_ranking(tiny_model, x, LAYER, target=5, mode=mode)
    assert r.probs.shape == (4, 10) and np.allclose(r.probs.sum(1), 1, atol=1e-5)
    for g in range(4):  # the batched table equals each knock-out run on its own
        np.testing.assert_allclose(r.probs[g], groups.ablate_groups(tiny_model, x, LAYER, [g], mode), rtol=1e-4, atol=1e-6)
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
        groups.ablate_groups(tiny_model, x, LAYER, [4])
    with pytest.raises(ValueError, match="unknown ablation"):
        groups.ablate_groups(tiny_model, x, LAYER, [0], mode="noise")
    with pytest.raises(ValueError, match="target"):
        groups.ablation_ranking(tiny_model, x, LAYER, target=10)


def test_group_gradcams_sum_to_the_layer_gradcam(tiny_model, x):
    cams = groups.group_gradcam(tiny_model, x, LAYER, target=3, relu=False)
    assert cams.shape == (4, 32, 32)
    layer = LayerGradCam(tiny_model, tiny_model.get_submodule("layer2.0.act2")).attribute(x, target=3)
    ref = F.interpolate(layer.detach(), size=(32, 32), mode="bilinear", align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(cams.sum(0), ref, rtol=1e-4, atol=1e-6)
    relu = groups.group_gradcam(tiny_model, x, LAYER, target=3)
    assert (relu >= 0).all() and relu.max() > 0
    # Each ReLU'd group map is 0 exactly where its coarse map was <= 0 everywhere around (bilinear keeps signs).
    assert np.all(relu[cams.max(axis=(1, 2)) <= 0] == 0)


@pytest.fixture
def labelled() -> tuple[torch.Tensor, torch.Tensor]:
    """60 smooth random uint8 images with balanced labels (6 per class)."""
    gen = torch.Generator().manual_seed(5)
    imgs = F.interpolate(torch.rand(60, 3, 8, 8, generator=gen), size=32, mode="bilinear")
    return (imgs * 255).round().to(torch.uint8), torch.arange(60) % 10


def test_specialization_invariants(tiny_model, labelled):
    images, labels = labelled
    snap = _snapshot(tiny_model)
    spec = specialization.group_specialization(tiny_model, images, labels, batch_size=16)
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
    grey = specialization._grey(images).contiguous()
    s = specialization.group_specialization(tiny_model, grey, labels)[LAYER]
    assert np.allclose(s.colour, 0) and (s.blur > 0).any()
    c = specialization.group_specialization(tiny_model, images, labels)[LAYER]
    assert (c.colour > 0).any()


def test_specialization_cache_round_trip(tiny_model, tmp_path, monkeypatch, labelled):
    images, labels = labelled
    calls = []
    monkeypatch.setattr(data, "load_split", lambda source, split: calls.append(split) or (images, labels))
    monkeypatch.setattr(data, "source_id", lambda source: "fake-source")
    steps = []
    first = specialization.specialization_cached(tiny_model, "src", n=60, cache=str(tmp_path),
                                          on_step=lambda i, n, what: steps.append((i, n)))
    n = 1 + len(specialization.CONTROL_SEEDS)  # the model, then each untrained copy, reported before it runs
    assert steps == [(i, n) for i in range(n)]
    again = specialization.specialization_cached(tiny_model, "src", n=60, cache=str(tmp_path),
                                          on_step=lambda *a: steps.append(a))
    assert calls == ["test", "train"]  # the second call read the cache (train: the control's BN calibration)
    assert len(steps) == n  # and reported no work
    assert list(again) == list(first)
    for layer in first:
        for f in ("class_means", "selectivity", "top_images", "correlation", "colour", "blur", "mean",
                  "control_gap", "control_colour_p", "control_selectivity"):
            assert np.array_equal(getattr(first[layer], f), getattr(again[layer], f))
    changed = copy.deepcopy(tiny_model)
    with torch.no_grad():
        changed.fc.weight.add_(1)
    assert specialization.model_digest(changed) != specialization.model_digest(tiny_model)  # another checkpoint, another entry
    specialization.specialization_cached(changed, "src", n=60, cache=str(tmp_path))
    assert calls == ["test", "train", "test", "train"] and len(list(tmp_path.glob("*.safetensors"))) == 2


def test_within_between_and_partition_statistics():
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(200, 2, generator=gen)
    # 2 groups of 3 channels; each group's channels are noisy copies of one signal -> within >> between.
    ch = base.repeat_interleave(3, 1) + 0.01 * torch.rand(200, 6, generator=gen)
    within, between = specialization._within_between(ch, 2)
    assert within > 0.99 and abs(between) < 0.3
    # A property that separates the groups perfectly is (almost) never matched by random partitions ...
    assert specialization._partition_p(torch.tensor([0.0, 0.1, 0.2, 5.0, 5.1, 5.2]), 2, trials=200) < 0.15
    # ... and one that does not separate them is matched by every partition.
    assert specialization._partition_p(torch.ones(6), 2, trials=50) == 1.0


def test_specialization_scalars_survive_the_cache(tiny_model, tmp_path, monkeypatch, labelled):
    images, labels = labelled
    monkeypatch.setattr(data, "load_split", lambda source, split: (images, labels))
    monkeypatch.setattr(data, "source_id", lambda source: "fake-source")
    first = specialization.specialization_cached(tiny_model, "src", n=60, cache=str(tmp_path))[LAYER]
    again = specialization.specialization_cached(tiny_model, "src", n=60, cache=str(tmp_path))[LAYER]
    for f in ("within_corr", "between_corr", "colour_p"):
        assert isinstance(getattr(again, f), float) and getattr(again, f) == pytest.approx(getattr(first, f), nan_ok=True)
    assert 0 < first.colour_p <= 1


def test_cli_prints_a_row_per_block_and_method(tiny_checkpoint, tmp_path, monkeypatch, labelled, capsys):
    images, labels = labelled
    monkeypatch.setattr(data, "load_split", lambda source, split: (images, labels))
    monkeypatch.setattr(data, "source_id", lambda source: "fake-source")
    monkeypatch.setenv("RESNEXT_DEMO_CACHE", str(tmp_path))
    findings.main(["--weights", str(tiny_checkpoint), "--data", "src", "--n", "60", "--faithfulness", "2"])
    out = capsys.readouterr().out
    assert all(f"| {layer} | 4 |" in out for layer in ("layer1.0.conv2", "layer2.0.conv2", "layer3.0.conv2"))
    assert all(f"| {m} | " in out and "/2 |" in out for m in explain.METHODS)
    assert list(tmp_path.glob("analysis/groups-v3-*.safetensors"))
    assert "untrained gap" in out and "| centre prior (model-blind) |" in out and "| image edges (model-blind) |" in out
    assert "beats all three" in out and "convergence delta" in out


# ---------------------------------------------------------------- issue 13: converged Conductance, direct shortcut


def _two_block_model(config) -> ResNeXt:
    """The tiny model with two blocks in stage 1: layer1.1 has an identity shortcut, layer2.0 a projection."""
    torch.manual_seed(1)
    m = ResNeXt(replace(config, depths=(2, 1, 1)))
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


@pytest.mark.parametrize("layer,kind", [("layer1.1.conv2", "identity"), ("layer2.0.conv2", "projection")])
def test_conductance_matches_a_many_step_captum_reference(tiny_config, x, layer, kind):
    """Groups and shortcut against Captum's LayerConductance at 512 steps: the groups at act2; the shortcut at
    the projection's output, or (identity) as the conductance of the block's sum r + s minus that of r = bn3's
    output, both of which see the same gradient dF/d(r + s)."""
    m = _two_block_model(tiny_config)
    block = m.get_submodule(layer.rpartition(".")[0])
    assert (block.downsample is None) == (kind == "identity")
    gi = groups.group_importance(m, x, layer, 3, "Conductance", tol=1e-3)
    ref = dict(baselines=data.normalize(torch.zeros_like(x)), target=3, n_steps=512, method="riemann_trapezoid",
               internal_batch_size=513)
    want = LayerConductance(m, block.act2).attribute(x, **ref).detach().reshape(4, -1).sum(1).double().numpy()
    if kind == "identity":
        total = LayerConductance(m, block.act3).attribute(x, attribute_to_layer_input=True, **ref).sum()
        shortcut = float(total - LayerConductance(m, block.bn3).attribute(x, **ref).sum())
    else:
        shortcut = float(LayerConductance(m, block.downsample).attribute(x, **ref).sum())
    assert gi.shortcut_kind == kind and gi.steps >= 32
    np.testing.assert_allclose(gi.values, want, atol=3e-3)
    assert gi.shortcut == pytest.approx(shortcut, abs=3e-3)
    assert abs(gi.shortcut) > 0.01  # the shortcut carries something here, so the check has teeth


def test_conductance_step_error_is_the_change_from_half_the_steps(tiny_model, x):
    """The error estimate from every other point equals a separate run at half the steps; tol drives the doubling."""
    at64 = groups.group_importance(tiny_model, x, LAYER, 1, "Conductance", steps=64, max_steps=64)
    at32 = groups.group_importance(tiny_model, x, LAYER, 1, "Conductance", steps=32, max_steps=32)
    moved = max(np.abs(at64.values - at32.values).max(), abs(at64.shortcut - at32.shortcut))
    assert at64.steps == 64 and at64.step_error == pytest.approx(moved, rel=1e-6, abs=1e-9)
    loose = groups.group_importance(tiny_model, x, LAYER, 1, "Conductance", steps=8, tol=1.0)
    tight = groups.group_importance(tiny_model, x, LAYER, 1, "Conductance", steps=8, tol=1e-4, max_steps=128)
    assert loose.steps == 8 and tight.steps == 128  # stops at once when loose; doubles up to the cap when tight
    md = verdicts.conductance_md(tight, 1e-4)
    assert "not converged" in md and "projection shortcut" in md and "128 steps" in md


# ---------------------------------------------------------------- issue 13: untrained control


def test_untrained_copy_is_a_fresh_seeded_init_with_recalibrated_bn(tiny_model, labelled):
    images, _ = labelled
    state = torch.random.get_rng_state()
    a = specialization.untrained_copy(tiny_model, 3, images)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is untouched
    b = specialization.untrained_copy(tiny_model, 3, images)
    c = specialization.untrained_copy(tiny_model, 4, images)
    assert not a.training and all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert not torch.equal(a.conv1.weight, c.conv1.weight) and not torch.equal(a.conv1.weight, tiny_model.conv1.weight)
    torch.manual_seed(3)  # the same init by hand: the architecture's own constructor under that seed
    assert torch.equal(ResNeXt(tiny_model.config).conv1.weight, a.conv1.weight)
    # BN statistics = the calibration images' batch statistics of the conv before it (one batch of 60 here)
    with torch.no_grad():
        out = a.conv1(data.normalize(images))
    torch.testing.assert_close(a.bn1.running_mean, out.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.bn1.running_var, out.var((0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-5)


def test_specialization_control_is_the_statistics_of_untrained_copies(tiny_model, labelled):
    images, labels = labelled
    result = specialization.group_specialization(tiny_model, images, labels)
    specialization.specialization_control(tiny_model, images, labels, images, result, seeds=(0, 1))
    for k, seed in enumerate((0, 1)):  # recompute each control by hand: seeded init, BN from one batch, statistics
        torch.manual_seed(seed)
        m = ResNeXt(tiny_model.config)
        for bn in (mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)):
            bn.reset_running_stats()
            bn.momentum = None
        with torch.no_grad():
            m.train()(data.normalize(images))
        ref = specialization.group_specialization(m.eval(), images, labels)
        for layer, s in result.items():
            assert s.control_gap[k] == pytest.approx(ref[layer].within_corr - ref[layer].between_corr, abs=1e-9)
            assert s.control_colour_p[k] == pytest.approx(ref[layer].colour_p)
            assert s.control_selectivity[k] == pytest.approx(float(np.mean(ref[layer].selectivity)), abs=1e-9)


def test_specialization_verdicts_are_relative_to_the_control(tiny_model, labelled):
    images, labels = labelled
    s = specialization.group_specialization(tiny_model, images, labels)[LAYER]
    s.within_corr, s.between_corr, s.colour_p = 0.20, 0.08, 0.004
    s.control_gap, s.control_colour_p = np.array([0.01, 0.03]), np.array([0.3, 0.2])
    s.control_selectivity = np.full(2, 10.0)
    md = verdicts.specialization_md(s, data.CLASSES)
    assert "more than in every untrained copy" in md and "untrained copies do not reach" in md
    assert "no more than untrained copies" in md and "2 untrained copies: 0.01–0.03" in md
    s.control_gap, s.control_colour_p = np.array([0.01, 0.15]), np.array([0.002, 0.5])
    md = verdicts.specialization_md(s, data.CLASSES)
    assert "comes from the architecture" in md and "appears without training" in md and "below 0.05 in 1 of 2" in md


def test_analyse_groups_is_the_four_analyses_it_names(tiny_model, x):
    """One call for the Groups tab: the same numbers as the four analyses called one by one, a deletion test
    for every group with a map (None only for all-zero maps), and each step announced before it runs."""
    steps = []
    a = groups.analyse_groups(tiny_model, x, LAYER, 3, contrast=5, mode="mean",
                              on_step=lambda fraction, what: steps.append((fraction, what)))
    assert np.allclose(a.importance.values, groups.group_importance(tiny_model, x, LAYER, 3, contrast=5).values)
    assert np.allclose(a.ablation.probs, groups.ablation_ranking(tiny_model, x, LAYER, 3, "mean").probs)
    assert np.allclose(a.cams, groups.group_gradcam(tiny_model, x, LAYER, 3))
    assert len(a.deletions) == len(a.cams) == explain.groups_of(tiny_model, LAYER)
    assert all((d is None) == (not cam.any()) for d, cam in zip(a.deletions, a.cams))
    live = [i for i, cam in enumerate(a.cams) if cam.any()]
    if live:
        again = faithfulness.faithfulness(tiny_model, x, a.cams[live], 3)
        assert [a.deletions[i].score for i in live] == pytest.approx([f.score for f in again])
    assert [f for f, _ in steps] == sorted(f for f, _ in steps) and len(steps) == 4
    assert "Grad-CAM" in steps[2][1] and "deletion" in steps[3][1]
