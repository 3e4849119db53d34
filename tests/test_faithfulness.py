"""faithfulness.py: deletion scores (properties, batched = one at a time), the model-blind reference maps, the
verdict in words, and the issue's gates on the shipped checkpoint (true maps beat random orders; a centre prior
beats random too, so the references are needed)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from resnext_demo import data, explain, faithfulness, verdicts, weights


def test_deletion_score_properties(tiny_model, x):
    values = np.random.default_rng(0).normal(size=(32, 32))
    d = faithfulness.deletion_score(tiny_model, x, values, target=4)
    assert d.fractions.shape == d.probs.shape == d.random_probs.shape == (len(faithfulness.DELETION_FRACTIONS),)
    assert ((0 <= d.probs) & (d.probs <= 1)).all() and 0 <= d.base <= 1
    again = faithfulness.deletion_score(tiny_model, x, values, target=4)
    assert np.array_equal(d.probs, again.probs) and np.array_equal(d.random_probs, again.random_probs)
    # Deleting nothing keeps the probability; deleting everything gives the blurred image's probability.
    full = faithfulness.deletion_score(tiny_model, x, values, target=4, fractions=(0.0, 1.0))
    blurred = explain._baseline("blur", x)
    with torch.no_grad():
        p_blur = float(torch.softmax(tiny_model(blurred), 1)[0, 4])
    assert full.probs[0] == pytest.approx(d.base, abs=1e-6) and full.probs[1] == pytest.approx(p_blur, abs=1e-5)
    with pytest.raises(ValueError, match="finite"):
        faithfulness.deletion_score(tiny_model, x, np.full((32, 32), np.nan), target=4)
    grey = faithfulness.deletion_score(tiny_model, x, values, target=4, fractions=(1.0,), fill="mean", patch=1)
    with torch.no_grad():
        p_grey = float(torch.softmax(tiny_model(torch.zeros_like(x)), 1)[0, 4])
    assert grey.probs[0] == pytest.approx(p_grey, abs=1e-5)
    with pytest.raises(ValueError, match="fill"):
        faithfulness.deletion_score(tiny_model, x, values, target=4, fill="noise")


def test_deletion_of_true_maps_beats_random_on_the_shipped_checkpoint(shipped_checkpoint, cifar_test):
    """The issue's gate: on a fixed slice of 40 test images, removing what IG / Grad-CAM mark as evidence
    lowers the true class's probability more than random removal for most images, and for clearly more
    images than the same map reversed (least important first) does, or the test could not fail.
    (On the 93.2 % default, IG wins on 29 of 40 at 16 steps and its reversal on 9; Grad-CAM 27 vs 13.)"""
    model, _ = weights.load_checkpoint(shipped_checkpoint)
    images, labels = cifar_test
    wins = {"Integrated Gradients": 0, "Grad-CAM": 0, "reversed Integrated Gradients": 0, "reversed Grad-CAM": 0}
    for i in range(40):
        xi, t = data.normalize(images[i:i + 1]), int(labels[i])
        ig = explain.attribute(model, xi, "Integrated Gradients", t, steps=16).values
        cam = explain.attribute(model, xi, "Grad-CAM", t).values
        names = ("Integrated Gradients", "Grad-CAM", "reversed Integrated Gradients", "reversed Grad-CAM")
        # one batched forward for the four maps (equal to one at a time: test_batched_deletion_scores_...)
        for name, d in zip(names, faithfulness.deletion_scores(model, xi, [ig, cam, -ig, -cam], t)):
            wins[name] += d.score > d.random_score
    assert wins["Integrated Gradients"] > 20 and wins["Grad-CAM"] >= 24, wins  # a majority; Grad-CAM clearly
    assert wins["reversed Grad-CAM"] < 20, wins
    for name in ("Integrated Gradients", "Grad-CAM"):
        assert wins[name] - wins["reversed " + name] >= 8, wins


def test_batched_deletion_scores_equal_one_at_a_time(tiny_model, x):
    rng = np.random.default_rng(1)
    maps = rng.normal(size=(3, 32, 32))
    batched = faithfulness.deletion_scores(tiny_model, x, maps, target=6)
    for m, d in zip(maps, batched):
        one = faithfulness.deletion_score(tiny_model, x, m, target=6)
        np.testing.assert_allclose(d.probs, one.probs, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(d.random_probs, one.random_probs, rtol=1e-4, atol=1e-6)


def test_reference_maps_are_a_centre_gaussian_and_sobel_edges(x):
    refs = faithfulness.reference_maps(x)
    assert list(refs) == list(faithfulness.REFERENCES)
    r = np.hypot(*np.meshgrid(np.arange(32) - 15.5, np.arange(32) - 15.5))
    np.testing.assert_allclose(refs["centre prior"], np.exp(-r ** 2 / (2 * 8.0 ** 2)), rtol=1e-6)
    # Sobel by hand on the grey image (edge-replicated border)
    rgb = data.denormalize(x)[0].numpy()
    grey = np.pad(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2], 1, mode="edge")
    gx = (grey[:-2, 2:] + 2 * grey[1:-1, 2:] + grey[2:, 2:]) - (grey[:-2, :-2] + 2 * grey[1:-1, :-2] + grey[2:, :-2])
    gy = (grey[2:, :-2] + 2 * grey[2:, 1:-1] + grey[2:, 2:]) - (grey[:-2, :-2] + 2 * grey[:-2, 1:-1] + grey[:-2, 2:])
    np.testing.assert_allclose(refs["image edges"], np.hypot(gx, gy), rtol=1e-4, atol=1e-6)


def test_faithfulness_scores_the_references_like_any_map(tiny_model, x):
    maps = np.random.default_rng(2).normal(size=(2, 32, 32))
    got = faithfulness.faithfulness(tiny_model, x, maps, target=4)
    refs = faithfulness.reference_maps(x)
    for f, m in zip(got, maps):  # the map itself: the plain deletion test
        one = faithfulness.deletion_score(tiny_model, x, m, target=4)
        assert f.score == pytest.approx(one.score, abs=1e-5) and f.random_score == pytest.approx(one.random_score, abs=1e-5)
    for name, ref in refs.items():  # each reference: its own deletion score, the same for every map
        assert got[0].references[name] == pytest.approx(faithfulness.deletion_score(tiny_model, x, ref, 4).score, abs=1e-5)
        assert got[1].references[name] == got[0].references[name]
    best = max(got[0].references.values())
    want = ("no better than random" if got[0].score <= got[0].random_score
            else "beats references" if got[0].score > best else "beats random only")
    assert got[0].verdict == want


def test_faithfulness_verdict_in_words():
    d = faithfulness.Deletion(np.array([0.1]), np.array([0.5]), np.array([0.8]), 0.9)  # drop 0.4, random drop 0.1
    blind = faithfulness.Faithfulness(d, {"centre prior": 0.45, "image edges": 0.2})
    assert blind.verdict == "beats random only" and blind.best_reference == ("centre prior", 0.45)
    md = verdicts.faithfulness_md(blind, "cat")
    assert "not the centre prior" in md and "✓" not in md and "0.450" in md
    good = faithfulness.Faithfulness(d, {"centre prior": 0.3, "image edges": 0.2})
    assert good.verdict == "beats references" and "✓" in verdicts.faithfulness_md(good, "cat")
    bad = faithfulness.Faithfulness(faithfulness.Deletion(np.array([0.1]), np.array([0.85]), np.array([0.8]), 0.9), {"centre prior": 0.3})
    assert bad.verdict == "no better than random" and "✗" in verdicts.faithfulness_md(bad, "cat")
    assert "1 beat random orders, 0 also" in verdicts.group_cams_md([blind, None, bad])


def test_model_blind_references_on_the_shipped_checkpoint(shipped_checkpoint, cifar_test):
    """The issue's finding, kept as a gate: on the first 40 test images the centre prior beats random orders on
    most images (so 'better than random' alone is too easy), while Grad-CAM beats both references more often
    than Saliency does."""
    model, _ = weights.load_checkpoint(shipped_checkpoint)
    images, labels = cifar_test
    centre_wins, beats_all = 0, {"Grad-CAM": 0, "Saliency": 0}
    for i in range(40):
        xi, t = data.normalize(images[i:i + 1]), int(labels[i])
        maps = [explain.attribute(model, xi, m, t).values for m in beats_all]
        scored = faithfulness.faithfulness(model, xi, maps, t)
        centre_wins += scored[0].references["centre prior"] > scored[0].random_score
        for m, f in zip(beats_all, scored):
            beats_all[m] += f.verdict == "beats references"
    assert centre_wins >= 20, centre_wins
    assert beats_all["Grad-CAM"] > beats_all["Saliency"], beats_all
