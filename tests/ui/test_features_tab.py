"""resnext_demo.ui.features_tab, called directly on the tiny model (no server, no browser)."""
from __future__ import annotations

import gradio as gr
import pytest
from PIL import Image

from resnext_demo import data, explain
from resnext_demo.ui import features_tab
from resnext_demo.ui.context import layer_choices


def test_feature_maps_every_layer(ctx, tiny_model, image_path):
    for _, layer in layer_choices(tiny_model):
        grid, md, stats = features_tab.feature_maps(ctx, image_path, layer, "channels", "group", None)
        assert isinstance(grid, Image.Image) and isinstance(stats, Image.Image)
        assert f"{explain.groups_of(tiny_model, layer)} group" in md
    for view in ("channels", "summary"):
        for scale in ("channel", "group", "layer"):
            grid, md, _ = features_tab.feature_maps(ctx, image_path, "layer1.0.conv2", view, scale, None)
            assert grid.size[0] > 0


def test_feature_maps_bad_layer(ctx, image_path):
    with pytest.raises(gr.Error):
        features_tab.feature_maps(ctx, image_path, "layer9.0.conv2", "channels", "group", None)
    with pytest.raises(gr.Error):
        features_tab.feature_maps(ctx, None, "layer1.0.conv2", "channels", "group", None)


def test_feature_maps_show_what_the_next_layer_receives(ctx, tiny_model, image_path):
    _, md, _ = features_tab.feature_maps(ctx, image_path, "layer2.0.conv2", "channels", "layer", None)
    assert "layer2.0.act2" in md and "what the block's next 1×1 conv receives" in md
    act = explain.feature_maps(tiny_model, data.preprocess(image_path), ["layer2.0.act2"])["layer2.0.act2"]
    assert f"all: min {float(act.min()):.4g}, max {float(act.max()):.4g}" in md  # the ranges are the activation's
    _, md, _ = features_tab.feature_maps(ctx, image_path, "layer2.0.conv2", "channels", "layer", None, "conv")
    assert "layer2.0.conv2:" in md and "before BN and ReLU" in md
