"""resnext_demo.ui.predict_tab, called directly on the tiny model (no server, no browser)."""
from __future__ import annotations

import gradio as gr
import numpy as np
import pytest

from resnext_demo import data
from resnext_demo.predict import predict_batch
from resnext_demo.ui import about_tab, finetune_tab, groups_tab, predict_tab, serving
from resnext_demo.ui.context import DISPLAY, Context
from resnext_demo.ui.predict_tab import MISCLASSIFIED_SHOW, N_SAMPLES
from tests.ui.uihelpers import uploads


def test_predict_label_top_k(ctx, image_path):
    out = predict_tab.predict_label(ctx, image_path, 4, None)
    assert len(out) == 4 and set(out) <= set(data.CLASSES)
    assert list(out.values()) == sorted(out.values(), reverse=True)
    assert all(0 <= v <= 1 for v in out.values())


def test_predict_full_shows_input_time_and_truth(ctx, image_path):
    top, seen, info = predict_tab.predict_full(ctx, image_path, 2, None, None)
    assert len(top) == 2
    assert seen.size == (DISPLAY, DISPLAY)
    assert "ms" in info and "cpu" in info
    pred = next(iter(top))
    _, _, ok = predict_tab.predict_full(ctx, image_path, 2, None, {"index": 7, "label": pred})
    assert "correct" in ok and "incorrect" not in ok
    wrong = next(c for c in data.CLASSES if c != pred)
    _, _, bad = predict_tab.predict_full(ctx, image_path, 2, None, {"index": 7, "label": wrong})
    assert "incorrect" in bad and wrong in bad


def test_auto_predict_on_clear_and_change(ctx, image_path, tmp_path):
    assert predict_tab.auto_predict(ctx, None, 3, None, None) == (None, None, "")
    assert len(predict_tab.auto_predict(ctx, image_path, 2, None, None)[0]) == 2
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.warns(UserWarning):  # gr.Warning outside a request: a Python warning
        label, seen, md = predict_tab.auto_predict(ctx, str(bad), 2, None, None)
    assert (label, seen) == (None, None) and md.startswith("**No prediction:**")  # #28.7: the old answer goes


def test_predict_bad_input_is_a_gradio_error(ctx, tmp_path):
    with pytest.raises(gr.Error):
        predict_tab.predict_full(ctx, None, 3, None, None)
    bad = tmp_path / "not-an-image.png"
    bad.write_bytes(b"hello, not a png")
    with pytest.raises(gr.Error, match="not an image"):
        predict_tab.predict_label(ctx, str(bad), 3, None)


def _visitor_message(md: str) -> bool:
    """Says what is missing, and nothing a visitor of a Space cannot use (flags, variables, commands)."""
    return "No CIFAR-10 test images" in md and not any(w in md for w in ("--", "RESNEXT_", "python", "`"))


def test_without_data_the_samples_say_so_in_visitor_words(ctx):
    gallery, md = predict_tab.sample_gallery(ctx)
    assert _visitor_message(md)
    with pytest.raises(gr.Error) as e:
        predict_tab.random_sample(ctx)
    assert _visitor_message(str(e.value))
    items, idx, md = predict_tab.misclassified(ctx, None, progress=lambda *a, **k: None)
    assert items == [] and _visitor_message(md)
    assert predict_tab.misclassified_seconds(ctx, None) == 0 and groups_tab.specialization_seconds(ctx, "layer2.0.conv2") == 0


def test_the_sample_pack_gives_every_data_view(tiny_model, tmp_path, image_path):
    """No full source: gallery, random and misclassified test images, About, specialization and a fine-tune
    with a CIFAR-10 subset and the forgetting check all come from the shipped sample pack."""
    h = Context(tiny_model, {"classes": list(data.CLASSES)}, data.sample_source(), "tiny.safetensors")
    x, y = h.test_split()
    gallery, md = predict_tab.sample_gallery(h)
    assert len(gallery.value) == N_SAMPLES and "sample pack" in md and "400" in md
    im, truth = predict_tab.random_sample(h)
    assert im.size == (32, 32) and truth["label"] in data.CLASSES and 0 <= truth["index"] < len(y)
    items, idx, md = predict_tab.misclassified(h, None, progress=lambda *a, **k: None)
    assert 0 < len(items) == len(idx) <= MISCLASSIFIED_SHOW and "of 400 test images" in md
    for (_, caption), i in zip(items, idx):  # "true→predicted 62%", short enough not to be cut
        true, rest = caption.split("→")
        assert true == data.CLASSES[int(y[i])] and rest.split()[0] in data.CLASSES and true != rest.split()[0]
        assert caption.endswith("%") and len(caption) <= 24
    assert "sample pack" in about_tab.about(h, None, 0)[3]
    assert h.cifar_subset_max() == 10
    status, _, result_md, path, pending = list(finetune_tab.run_finetune(h, None, None, serving.StopFlag(), 10, "head", 1, 0.05, 32,
                                                          *uploads({})))[-1]
    # CIFAR-10 images are trained on, never held out (#28.2): no held-out row, the test slice scores forgetting
    assert "100 training images, 100 of them CIFAR-10 / 0 of your images held out" in result_md
    assert "held-out part" not in result_md and "test slice (400 images, forgetting)" in result_md
    assert next(pending.model.parameters()).device.type == "cpu"


def test_samples_from_cifar(tiny_model, cifar_source):
    h = Context(tiny_model, {"classes": list(data.CLASSES)}, cifar_source)
    gallery, md = predict_tab.sample_gallery(h)
    assert len(gallery.value) == N_SAMPLES
    im, truth = predict_tab.random_sample(h)
    assert im.size == (32, 32) and truth["label"] in data.CLASSES
    im5, t5 = predict_tab.load_sample(h, 5)
    x, y = h.test_split()
    assert np.array_equal(np.asarray(im5), x[5].permute(1, 2, 0).numpy()) and t5["label"] == data.CLASSES[int(y[5])]
    items, idx, md = predict_tab.misclassified(h, None, progress=lambda *a, **k: None)
    assert len(items) == len(idx) <= MISCLASSIFIED_SHOW
    probs = predict_batch(tiny_model, x[idx])
    assert all(int(probs[j].argmax()) != int(y[i]) for j, i in enumerate(idx))
    assert "misclassified" in md
