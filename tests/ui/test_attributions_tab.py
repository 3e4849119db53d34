"""resnext_demo.ui.attributions_tab, called directly on the tiny model (no server, no browser)."""
from __future__ import annotations

import gradio as gr
import pytest
from PIL import Image

from resnext_demo import explain
from resnext_demo.ui import attributions_tab, groups_tab


@pytest.mark.parametrize("method", explain.METHODS)
def test_attribute_every_method(ctx, image_path, method):
    img, md = attributions_tab.attribute(ctx, image_path, method, "predicted", True, 0.5, steps=4, samples=2, window=8, stride=8)
    assert isinstance(img, Image.Image)
    assert method in md and "raw range" in md


def test_attribute_target_and_params(ctx, image_path):
    img, md = attributions_tab.attribute(ctx, image_path, "Grad-CAM", "ship", False, 0.3, layer="layer2.0.conv2")
    assert "**ship**" in md and "layer2.0.conv2" in md
    with pytest.raises(gr.Error):
        attributions_tab.attribute(ctx, image_path, "Saliency", "zebra")
    with pytest.raises(gr.Error):
        attributions_tab.attribute(ctx, image_path, "Occlusion", "predicted", window=64)  # larger than the image
    assert _params("Integrated Gradients") == {"steps", "baseline"}
    assert _params("Occlusion") == {"window", "stride", "baseline"}


def _params(method):
    return set(attributions_tab.method_params(method, 8, "black", 4, 0.1, None, 8, 4))


def test_param_visibility_follows_method():
    vis = attributions_tab.param_visibility("SmoothGrad")
    shown = [u["visible"] for u in vis]
    assert shown == [False, False, True, True, False, False, False]
    assert [u["visible"] for u in attributions_tab.param_visibility("Grad-CAM")][4] is True


def test_compare_two_methods(ctx, image_path):
    """#28.4: the main view gets the Method dropdown's method (A), the comparison box the other (B)."""
    img_a, md_a, img_b, md_b = attributions_tab.compare(ctx, image_path, "Saliency", "Grad-CAM", "predicted", True, 0.5)
    assert isinstance(img_a, Image.Image) and isinstance(img_b, Image.Image)
    assert md_a.count("**Saliency** for class") == 1 and "Grad-CAM" not in md_a
    assert md_b.startswith("**Grad-CAM** for class") and "Saliency" not in md_b
    single, _ = attributions_tab.attribute(ctx, image_path, "Saliency", "predicted", True, 0.5)
    assert img_a.size == single.size  # the same one-row view as Explain


def test_comparison_box_hidden_until_compare(tiny_model):
    """#28.4: no empty "Comparison" box on a fresh page."""
    from resnext_demo import data
    from resnext_demo.ui.demo import build_demo
    demo = build_demo(tiny_model, {"classes": list(data.CLASSES)}, None)
    box = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "at-cmp-box")
    assert box.visible is False


def test_attribution_markdown_reports_faithfulness(ctx, image_path):
    _, md = attributions_tab.attribute(ctx, image_path, "Saliency")
    assert "Faithfulness (deletion)" in md and "random orders" in md


def test_heat_maps_and_conductance_say_how_far_to_trust_them(ctx, image_path):
    _, md = attributions_tab.attribute(ctx, image_path, "Integrated Gradients")
    assert "centre prior" in md and "image edges" in md and "**Convergence:**" in md
    _, _, table, _, md = groups_tab.analyse(ctx, image_path, "layer2.0.conv2", "predicted", "none", "Conductance", "zero")
    assert "projection shortcut" in md and "**Convergence:**" in md and "model-blind maps" in md
    assert "faithful?" in table.columns
