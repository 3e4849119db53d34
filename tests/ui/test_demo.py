"""resnext_demo.ui.demo, called directly on the tiny model (no server, no browser)."""
from __future__ import annotations

import gradio as gr
import pytest

from resnext_demo import data
from resnext_demo.ui import about_tab, predict_tab
from resnext_demo.ui.demo import build_demo, share_image


def test_build_demo_has_named_endpoints(tiny_model):
    demo = build_demo(tiny_model, {"classes": list(data.CLASSES)}, None)
    names = {d.get("api_name") for d in demo.config["dependencies"]}
    for n in ("predict", "classify", "random_sample", "misclassified", "feature_maps", "attribute", "compare",
              "finetune", "stop", "use_model", "reset_model", "load_checkpoint", "about", "groups", "knockout",
              "specialization", "compare_models", "race", "stop_race"):
        assert n in names, n
    assert isinstance(demo, gr.Blocks)


def test_build_demo_without_model_explains_how_to_get_one(image_path):
    demo = build_demo(None, None, None, weights_path="weights/default.safetensors", load_error="No checkpoint")
    h = demo.ctx
    assert "python -m resnext_demo.train" in h.model_banner(None)
    with pytest.raises(gr.Error, match="resnext_demo.train"):
        predict_tab.predict_label(h, image_path, 3, None)
    with pytest.raises(gr.Error):
        about_tab.about(h, None, 0)


def test_share_image_skips_unreadable_files(image_path, tmp_path):
    assert share_image(image_path) == (image_path,) * 3
    assert share_image(None) == (None,) * 3
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    assert share_image(str(bad)) == (None,) * 3  # #28.7: the other tabs drop the previous image


def test_an_image_from_elsewhere_clears_the_galleries_highlight(tiny_model):
    """The sample gallery's highlight means "this is the image shown": an upload, a random test image or a
    pick in the misclassified gallery clears it, and the clearing returns a Gallery with nothing selected."""
    demo = build_demo(tiny_model, {"classes": list(data.CLASSES)}, data.default_source())
    cfg = demo.config
    elem = {c["id"]: c.get("props", {}).get("elem_id") for c in cfg["components"]}
    gallery = next(i for i, e in elem.items() if e == "sample-gallery")
    clearing = {(elem.get(t[0]) or t[1], t[1]): d for d in cfg["dependencies"] for t in d["targets"]
                if gallery in d["outputs"] and t[1] in ("input", "click", "select")}
    assert {("predict-image", "input"), ("random-btn", "click")} <= set(clearing), set(clearing)
    assert any(k[1] == "select" for k in clearing), "a misclassified pick must clear it too"
    for dep in clearing.values():
        out = demo.fns[dep["id"]].fn()
        for update in out if isinstance(out, list) else [out]:
            assert isinstance(update, gr.Gallery) and update.selected_index is None


def test_theme_fonts_cover_the_letters_at_every_weight():
    """#28.8: Gradio's SourceSansPro-SemiBold.woff2 holds only "A", "B" and some Cyrillic, so semibold headings drew a
    thin, small A ("CIFAR-10"); every font file the theme loads must hold the whole Latin alphabet and digits."""
    import re
    from pathlib import Path

    from fontTools.ttLib import TTFont

    from resnext_demo.ui import THEME
    static = Path(gr.__file__).parent / "templates" / "frontend"
    files = re.findall(r"url\('([^']+\.woff2)'\)", "\n".join(THEME._font_css))
    assert len(files) >= 4  # regular and heavy of the text and the code font
    needed = {ord(c) for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-"}
    for f in files:
        missing = needed - set(TTFont(static / f).getBestCmap())
        assert not missing, (f, "".join(sorted(map(chr, missing))))
