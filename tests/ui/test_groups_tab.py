"""resnext_demo.ui.groups_tab, called directly on the tiny model (no server, no browser)."""
from __future__ import annotations

import copy
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image

from resnext_demo import data, groups, weights
from resnext_demo.ui import groups_tab
from resnext_demo.ui.context import Context
from tests.ui.uihelpers import same, state_dict_copy


def test_groups_analysis(ctx, tiny_model, image_path):
    before = state_dict_copy(tiny_model)
    imp, abl, table, cams, md = groups_tab.analyse(ctx, image_path, "layer2.0.conv2", "predicted", "runner-up",
                                                "Gradient x Activation", "zero")
    assert all(isinstance(im, Image.Image) for im in (imp, abl, cams))
    assert list(table["group"]) == ["g0", "g1", "g2", "g3"]
    # the table is the explain functions' numbers, not a re-derivation
    x = data.preprocess(image_path)
    pred = int(np.argmax(groups.ablate_groups(tiny_model, x, "layer2.0.conv2", [])))
    runner = int(np.argsort(-groups.ablate_groups(tiny_model, x, "layer2.0.conv2", []))[1])
    gi = groups.group_importance(tiny_model, x, "layer2.0.conv2", pred, contrast=runner)
    np.testing.assert_allclose(table["importance"], np.round(gi.values, 4))
    assert "rather than" in md and "layer2.0.conv2" in md
    assert same(before, state_dict_copy(tiny_model))
    _, _, t2, _, md2 = groups_tab.analyse(ctx, image_path, "layer1.0.conv2", "ship", "none", "Conductance", "mean")
    assert "ship" in md2 and "shortcut" in md2 and len(t2) == 4


def test_groups_bad_choices_are_gradio_errors(ctx, image_path):
    with pytest.raises(gr.Error, match="Upload"):
        groups_tab.analyse(ctx, None, "layer2.0.conv2")
    with pytest.raises(gr.Error, match="block"):
        groups_tab.analyse(ctx, image_path, "layer2")  # a stage, not a grouped conv
    with pytest.raises(gr.Error, match="differ"):
        groups_tab.analyse(ctx, image_path, "layer2.0.conv2", "cat", "cat")
    with pytest.raises(gr.Error, match="method"):
        groups_tab.analyse(ctx, image_path, "layer2.0.conv2", method="LRP")


def test_live_knockout(ctx, tiny_model, image_path):
    label, md = groups_tab.knockout(ctx, image_path, "layer2.0.conv2", [], "zero", 3)
    assert "No group" in md and len(label) == 3
    label, md = groups_tab.knockout(ctx, image_path, "layer2.0.conv2", [0, 1, 2, 3], "zero", 10)
    want = groups.ablate_groups(tiny_model, data.preprocess(image_path), "layer2.0.conv2", [0, 1, 2, 3])
    assert label == pytest.approx({data.CLASSES[i]: float(p) for i, p in enumerate(want)})
    assert "g0, g1, g2, g3" in md
    assert groups_tab.group_choices(ctx, "layer1.0.conv2")["choices"] == [(f"g{i}", i) for i in range(4)]


def test_specialization_needs_data_then_uses_the_cache(ctx, tiny_model, tmp_path, monkeypatch):
    with pytest.raises(gr.Error, match="No CIFAR-10 test images") as e:
        groups_tab.specialize(ctx, "layer2.0.conv2")
    assert "RESNEXT_DEMO_DATA" not in str(e.value)
    gen = torch.Generator().manual_seed(0)
    images = (torch.rand(40, 3, 32, 32, generator=gen) * 255).to(torch.uint8)
    labels = torch.arange(40) % 10
    monkeypatch.setattr(data, "load_split", lambda source, split: (images, labels))
    monkeypatch.setattr(data, "source_id", lambda source: "fake")
    monkeypatch.setenv("RESNEXT_DEMO_CACHE", str(tmp_path))
    h = Context(tiny_model, {"classes": list(data.CLASSES)}, "fake-source", "tiny.safetensors")
    fig, montage, md = groups_tab.specialize(h, "layer2.0.conv2")
    assert isinstance(fig, Image.Image) and montage.size[1] == 4 * (2 * 32 + 2)  # one row per group
    assert "selectivity" in md and "Colour" in md
    assert "5 untrained copies" in md  # every verdict next to the untrained control
    assert len(list(tmp_path.glob("analysis/*.safetensors"))) == 1


def test_compare_models(ctx, tiny_model, tiny_checkpoint, image_path):
    la, lb, ca, cb, ga, gb, md = groups_tab.compare_models(ctx, image_path, "shared model")
    assert la == lb and len(la) == 5  # the same model on both sides agrees with itself
    assert "Faithfulness" in md and md.count("C=4") == 2
    other = copy.deepcopy(tiny_model)
    with torch.no_grad():
        other.fc.bias[3] += 5  # B strongly prefers class 3
    p = weights.save_checkpoint(Path(tiny_checkpoint).with_name("other.safetensors"), other, {})
    la, lb, *_ = groups_tab.compare_models(ctx, image_path, "uploaded checkpoint", str(p))
    assert next(iter(lb)) == data.CLASSES[3] and la != lb
    with pytest.raises(gr.Error, match="shared model"):
        groups_tab.compare_models(ctx, image_path, "this session's model", None, "predicted", None)
    with pytest.raises(gr.Error, match="checkpoint"):
        groups_tab.compare_models(ctx, image_path, "uploaded checkpoint", None)


def test_compare_with_every_shipped_checkpoint(ctx, tiny_model, image_path, tmp_path, monkeypatch):
    """Shipped checkpoints other than the default are listed by their path under weights/ and loadable;
    the default, resume states and names not listed are not."""
    monkeypatch.setattr(weights, "WEIGHTS_DIR", tmp_path)
    monkeypatch.setattr(weights, "DEFAULT_WEIGHTS", tmp_path / "default.safetensors")
    for name in ("default.safetensors", "micro.safetensors", "x.resume.safetensors", "sweep/m-s0.safetensors"):
        weights.save_checkpoint(tmp_path / name, tiny_model, {})
    extra = groups_tab.shipped_checkpoints()
    assert extra == ["micro.safetensors", "sweep/m-s0.safetensors"]
    for choice in extra:
        la, lb, *_ = groups_tab.compare_models(ctx, image_path, choice)
        assert la == lb  # the same weights on both sides
    with pytest.raises(gr.Error, match="Unknown model"):
        groups_tab.compare_models(ctx, image_path, "../default.safetensors")


def test_groups_table_fits_its_panel():
    """#28.5: one width per column (the verdict not clipped) and room for 32 rows without an inner scroll bar."""
    assert len(groups_tab.TABLE_WIDTHS) == len(groups_tab.TABLE_COLUMNS)
    assert sum(float(w.rstrip("%")) for w in groups_tab.TABLE_WIDTHS) <= 100
