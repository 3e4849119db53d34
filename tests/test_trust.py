"""calibration.py, familiarity.py, calibrate.py: probabilities a visitor can believe, and the unfamiliar-image flag.

Unit tests on tiny models and synthetic logits; the shipped checkpoint's own calibration and detector are
re-measured on images (`slow` where they need the whole archive)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from resnext_demo import calibrate, calibration, data, familiarity, finetune, oodsets, predict, report, weights
from tests.conftest import make_tiny_model


def _overconfident(n: int = 4000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose softmax is calibrated at T = 1, multiplied by 3: an over-confident model."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 10, generator=g) * 1.5
    y = torch.multinomial(torch.softmax(logits, 1), 1, generator=g)[:, 0]
    return logits * 3, y


def test_reliability_of_a_calibrated_model_is_small_and_of_an_overconfident_one_large():
    logits, y = _overconfident()
    assert calibration.reliability(logits / 3, y).ece < 0.03
    bad = calibration.reliability(logits, y)
    assert bad.ece > 0.1 and bad.confidence > bad.accuracy
    assert sum(bad.bin_counts) == len(y)


@pytest.mark.parametrize("objective", ["ece", "nll"])
def test_fitted_temperature_recovers_the_scale_and_lowers_ece_on_other_images(objective):
    fit_logits, fit_y = _overconfident(seed=1)
    t = calibration.fit_temperature(fit_logits, fit_y, objective)
    assert t == pytest.approx(3.0, rel=0.15)
    logits, y = _overconfident(seed=2)  # images the temperature was not fitted on
    assert calibration.reliability(logits, y, t).ece < calibration.reliability(logits, y).ece / 3


def test_temperature_never_changes_top1():
    logits, _ = _overconfident(500)
    for t in (0.1, 0.62, 1.0, 7.0):
        assert torch.equal(torch.softmax(logits / t, 1).argmax(1), logits.argmax(1))


def test_reliability_dict_round_trip():
    logits, y = _overconfident(300)
    rel = calibration.reliability(logits, y, 2.0)
    back = calibration.Reliability.from_dict(rel.to_dict())
    assert back.n == rel.n and back.bin_counts == rel.bin_counts
    assert back.ece == pytest.approx(rel.ece, abs=1e-5)
    assert [math.isnan(v) for v in back.bin_accuracy] == [math.isnan(v) for v in rel.bin_accuracy]


def test_halves_are_each_classes_first_500_and_the_rest():
    y = torch.arange(10).repeat(1000)  # interleaved like data.load_split
    x = torch.arange(10000)[:, None]
    (xf, yf), (xr, yr) = calibrate.halves(x, y)
    assert len(yf) == len(yr) == 5000
    assert torch.bincount(yf).tolist() == [500] * 10
    assert set(xf[:, 0].tolist()).isdisjoint(xr[:, 0].tolist())
    assert xf[:, 0].max() < 5000  # the first 500 of each class are the first 5,000 of the interleaved split


def _tiny_detector(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    ref = (torch.randint(0, 256, (200, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(10).repeat(20))
    held = torch.randint(0, 256, (100, 3, 32, 32), generator=g, dtype=torch.uint8)
    return familiarity.build(model, ref, held, info={"fitted_on": "random images (test)"}), held


def test_detector_flags_its_rate_of_heldin_images_and_orders_scores():
    model = make_tiny_model()
    fam, held = _tiny_detector(model)
    s = familiarity.scores_uint8(model, fam, held)
    assert (s > fam.threshold).float().mean().item() == pytest.approx(familiarity.FLAG_RATE, abs=0.02)
    assert torch.all(fam.heldin[1:] >= fam.heldin[:-1])
    r = fam.rarity(s)
    assert torch.all((r >= 0) & (r <= 1))
    order = s.argsort()
    assert torch.all(r[order][1:] <= r[order][:-1] + 1e-6)  # stranger scores are rarer


def test_checkpoint_round_trip_keeps_calibration_and_detector(tmp_path):
    model = make_tiny_model()
    fam, held = _tiny_detector(model)
    model.calibration = {"temperature": 0.5, "fitted_on": "test"}
    model.familiarity = fam
    path = weights.save_checkpoint(tmp_path / "t.safetensors", model, {"accuracy": None})
    loaded, meta = weights.load_checkpoint(path)
    assert loaded.calibration["temperature"] == 0.5 and meta["calibration"]["fitted_on"] == "test"
    assert meta["familiarity"]["threshold"] == pytest.approx(fam.threshold)
    assert torch.allclose(familiarity.scores_uint8(loaded, loaded.familiarity, held),
                          familiarity.scores_uint8(model, fam, held))
    # a model without them writes none, and loads without them
    bare = weights.save_checkpoint(tmp_path / "b.safetensors", make_tiny_model(), {"calibration": {"temperature": 2}})
    m2, meta2 = weights.load_checkpoint(bare)
    assert m2.calibration is None and m2.familiarity is None and "calibration" not in meta2


def test_predict_applies_the_temperature_and_keeps_top1(tmp_path):
    model = make_tiny_model()
    im = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    bare = predict.predict(model, im, data.CLASSES)
    assert bare.temperature == 1.0 and bare.score is None and not bare.unfamiliar
    model.calibration = {"temperature": 0.25}
    model.familiarity, _ = _tiny_detector(model)
    cal = predict.predict(model, im, data.CLASSES)
    assert cal.top_index == bare.top_index
    with torch.inference_mode():
        logits = model(data.preprocess(im))[0]
    expected = torch.softmax(logits / 0.25, 0)
    assert cal.probs[cal.top_class] == pytest.approx(float(expected.max()), abs=1e-5)
    assert cal.score is not None and cal.unfamiliar == (cal.score > model.familiarity.threshold)
    assert torch.allclose(predict.predict_batch(model, data.pil_to_uint8(cal.image32)),
                          expected[None], atol=1e-5)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), "hot", 1e9])
def test_damaged_temperature_is_refused(tmp_path, bad):
    model = make_tiny_model()
    model.calibration = {"temperature": bad}
    path = weights.save_checkpoint(tmp_path / "t.safetensors", model, {})
    with pytest.raises(weights.CheckpointError, match="temperature"):
        weights.load_checkpoint(path)


def test_detector_that_does_not_fit_the_model_is_refused(tmp_path):
    model = make_tiny_model()
    fam, _ = _tiny_detector(model)
    fam.layers[-1].means = fam.layers[-1].means[:, :5]  # wrong feature width
    model.familiarity = fam
    path = weights.save_checkpoint(tmp_path / "t.safetensors", model, {})
    with pytest.raises(weights.CheckpointError, match="familiarity"):
        weights.load_checkpoint(path)


def test_auroc():
    a, b = torch.tensor([0.0, 1, 2]), torch.tensor([3.0, 4])
    assert familiarity.auroc(a, b) == 1.0 and familiarity.auroc(b, a) == 0.0
    assert familiarity.auroc(a, a) == pytest.approx(0.5)


def test_ood_sets_shapes_and_far_kinds():
    far = oodsets.far_sets(n=6)
    assert {"noise", "flat colour", "checkerboard", "text page"} <= set(far)
    assert all(v.shape == (6, 3, 32, 32) and v.dtype == torch.uint8 for v in far.values())
    flat = far["flat colour"].float()
    assert torch.all(flat.std((2, 3)) == 0)
    near = oodsets.near_sets(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8))
    assert all(v.shape == (4, 3, 32, 32) for v in near.values())


def test_finetune_keeps_or_drops_the_detector_and_says_so():
    base = make_tiny_model()
    base.calibration = {"temperature": 0.5, "fitted_on": "base images"}
    base.familiarity, _ = _tiny_detector(base)
    classes = [*data.CLASSES, "lion"]
    g = torch.Generator().manual_seed(3)
    train = finetune.Dataset(torch.randint(0, 256, (22, 3, 32, 32), generator=g, dtype=torch.uint8),
                             torch.cat([torch.arange(11), torch.arange(11)]), classes)
    hold = finetune.Dataset(train.x[:4], train.y[:4], classes)
    head = finetune.prepare_model(base, data.CLASSES, classes)
    note = finetune.adapt_trust(base, head, train, hold, "head", 10)
    assert head.calibration["temperature"] == 0.5 and "kept" in note and "too few" in note
    assert head.familiarity is not None and len(head.familiarity.layers[-1].means) == 11
    predict.predict(head, np.zeros((32, 32, 3), np.uint8), classes)  # the extended detector runs
    whole = finetune.prepare_model(base, data.CLASSES, classes)
    note = finetune.adapt_trust(base, whole, train, hold, "all", 10)
    assert whole.familiarity is None and "off" in note


def test_report_words():
    p = predict.Prediction({"cat": 0.9, "dog": 0.1}, 0, "cat", Image.new("RGB", (32, 32)), 0.01, "cpu",
                           unfamiliar=True, score=1.0, rarity=0.0, temperature=0.6)
    md = report.prediction_md(p, None, 5000)
    assert "does not look like any of the 2 classes" in md and "none of 5,000" in md and "Closest class: **cat**" in md
    assert "Calibrated (temperature 0.6)" in md
    assert report.unfamiliar_note(p, 5000).startswith("⚠️")
    p.unfamiliar, p.rarity = False, 0.4
    assert report.unfamiliar_md(p, 5000, 2) == "" and report.unfamiliar_note(p, 5000) == ""
    p.score, p.temperature = None, 1.0
    assert "unavailable" in report.trust_line(p) and "Not calibrated" in report.trust_line(p)


# ------------------------------------------------------------ the shipped checkpoint


@pytest.fixture(scope="module")
def shipped(shipped_checkpoint):
    return weights.load_checkpoint(shipped_checkpoint)


def test_shipped_checkpoint_is_calibrated_and_has_a_detector(shipped):
    model, meta = shipped
    cal, fam = meta["calibration"], meta["familiarity"]
    assert 0.3 < model.calibration["temperature"] < 1.0  # label smoothing left it under-confident
    assert cal["fitted_on"] == calibrate.FIT_RULE and fam["fitted_on"] == calibrate.FIT_RULE
    assert cal["reporting"]["after"]["ece"] < cal["reporting"]["before"]["ece"]
    assert model.familiarity is not None


def test_shipped_detector_flags_noise_and_flat_images_not_sample_images(shipped):
    model, _ = shipped
    rng = np.random.default_rng(0)
    for im in (rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), np.full((32, 32, 3), 128, np.uint8),
               np.full((40, 40, 3), (200, 30, 30), np.uint8)):
        assert predict.predict(model, im, data.CLASSES).unfamiliar
    far = oodsets.far_sets(n=10, seed=1)
    s = familiarity.scores_uint8(model, model.familiarity, torch.cat(list(far.values())))
    assert (s > model.familiarity.threshold).float().mean() >= 0.9
    x, _ = data.load_split(data.SAMPLE_PACK, "test")  # CIFAR-10 test images (inside the fitting half: ~5 %)
    s = familiarity.scores_uint8(model, model.familiarity, x)
    assert (s > model.familiarity.threshold).float().mean() <= 0.12


@pytest.mark.slow
def test_calibration_lowers_ece_on_reporting_images(shipped, cifar_test):
    model, meta = shipped
    _, (x, y) = calibrate.halves(*cifar_test)
    x, y = x[:1000], y[:1000]  # 100 per class of the reporting half
    logits = calibrate.predict_logits(model, x)
    t = model.calibration["temperature"]
    before, after = calibration.reliability(logits, y), calibration.reliability(logits, y, t)
    assert after.ece < 0.05 < before.ece
    assert abs(after.confidence - after.accuracy) < 0.03
    s = familiarity.scores_uint8(model, model.familiarity, x)
    assert (s > model.familiarity.threshold).float().mean() <= 0.10
