"""Every UI handler called directly on the tiny model (no server, no browser)."""
from __future__ import annotations

import json

import copy
import threading
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from resnext_demo import data, explain, finetune, groups, report, serving, ui, weights
from resnext_demo.handlers import DISPLAY, MISCLASSIFIED_SHOW, N_SAMPLES, Handlers, layer_dropdown_choices
from resnext_demo.model import config_params
from resnext_demo.predict import predict_batch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread (and do not fight a background job for both cores)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _state_dict_copy(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def image_path(tmp_path: Path) -> str:
    """A synthetic 48x40 image file (no CIFAR data)."""
    rng = np.random.default_rng(0)
    p = tmp_path / "synthetic.png"
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(p)
    return str(p)


@pytest.fixture
def handlers(tiny_model) -> Handlers:
    """Handlers over the tiny model, no data source."""
    return Handlers(tiny_model, {"classes": list(data.CLASSES)}, None, "tiny.safetensors")


def _synthetic_files(tmp_path: Path, name: str, n: int, colour: tuple[int, int, int]) -> list[str]:
    out = []
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    for i in range(n):
        a = np.clip(np.array(colour)[None, None] + rng.normal(0, 20, (36, 36, 3)), 0, 255).astype(np.uint8)
        p = tmp_path / f"{name}-{i}.png"
        Image.fromarray(a).save(p)
        out.append(str(p))
    return out


def _uploads(files: dict[str, list[str]], new: dict[str, list[str]] | None = None) -> list:
    """The positional `uploads` of Handlers.finetune: 10 class zones, new names, new zones."""
    new = dict(new or {})
    names = list(new) + [""] * (finetune.MAX_NEW_CLASSES - len(new))
    zones = list(new.values()) + [None] * (finetune.MAX_NEW_CLASSES - len(new))
    return [files.get(c) for c in data.CLASSES] + names + zones


def _run_finetune(h: Handlers, session, flag, files, new=None, epochs=1, layers="head", on_step=None):
    outs = []
    for out in h.finetune(session, flag, 0, layers, epochs, 0.05, 8, *_uploads(files, new)):
        outs.append(out)
        if on_step:
            on_step(out)
    return outs


# ---------------------------------------------------------------- build


def test_build_demo_has_named_endpoints(tiny_model):
    demo = ui.build_demo(tiny_model, {"classes": list(data.CLASSES)}, None)
    names = {d.get("api_name") for d in demo.config["dependencies"]}
    for n in ("predict", "classify", "random_sample", "misclassified", "feature_maps", "attribute", "compare",
              "finetune", "stop", "use_model", "reset_model", "load_checkpoint", "about", "groups", "knockout",
              "specialization", "compare_models"):
        assert n in names, n
    assert isinstance(demo, gr.Blocks)


def test_build_demo_without_model_explains_how_to_get_one(image_path):
    demo = ui.build_demo(None, None, None, weights_path="weights/default.safetensors", load_error="No checkpoint")
    h = demo.handlers
    assert "python -m resnext_demo.train" in h.model_banner(None)
    with pytest.raises(gr.Error, match="resnext_demo.train"):
        h.predict_label(image_path, 3, None)
    with pytest.raises(gr.Error):
        h.about(None, 0)


# ---------------------------------------------------------------- Predict


def test_predict_label_top_k(handlers, image_path):
    out = handlers.predict_label(image_path, 4, None)
    assert len(out) == 4 and set(out) <= set(data.CLASSES)
    assert list(out.values()) == sorted(out.values(), reverse=True)
    assert all(0 <= v <= 1 for v in out.values())


def test_predict_full_shows_input_time_and_truth(handlers, image_path):
    top, seen, info = handlers.predict_full(image_path, 2, None, None)
    assert len(top) == 2
    assert seen.size == (DISPLAY, DISPLAY)
    assert "ms" in info and "cpu" in info
    pred = next(iter(top))
    _, _, ok = handlers.predict_full(image_path, 2, None, {"index": 7, "label": pred})
    assert "correct" in ok and "incorrect" not in ok
    wrong = next(c for c in data.CLASSES if c != pred)
    _, _, bad = handlers.predict_full(image_path, 2, None, {"index": 7, "label": wrong})
    assert "incorrect" in bad and wrong in bad


def test_auto_predict_on_clear_and_change(handlers, image_path):
    assert handlers.auto_predict(None, 3, None, None) == (None, None, "")
    assert len(handlers.auto_predict(image_path, 2, None, None)[0]) == 2


def test_predict_bad_input_is_a_gradio_error(handlers, tmp_path):
    with pytest.raises(gr.Error):
        handlers.predict_full(None, 3, None, None)
    bad = tmp_path / "not-an-image.png"
    bad.write_bytes(b"hello, not a png")
    with pytest.raises(gr.Error, match="not an image"):
        handlers.predict_label(str(bad), 3, None)


def test_share_image_skips_unreadable_files(image_path, tmp_path):
    assert Handlers.share_image(image_path) == (image_path,) * 3
    assert Handlers.share_image(None) == (None,) * 3
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    assert all(isinstance(u, dict) and "value" not in u for u in Handlers.share_image(str(bad)))


def _visitor_message(md: str) -> bool:
    """Says what is missing, and nothing a visitor of a Space cannot use (flags, variables, commands)."""
    return "No CIFAR-10 test images" in md and not any(w in md for w in ("--", "RESNEXT_", "python", "`"))


def test_without_data_the_samples_say_so_in_visitor_words(handlers):
    gallery, md = handlers.sample_gallery()
    assert _visitor_message(md)
    with pytest.raises(gr.Error) as e:
        handlers.random_sample()
    assert _visitor_message(str(e.value))
    items, idx, md = handlers.misclassified(None, progress=lambda *a, **k: None)
    assert items == [] and _visitor_message(md)
    assert handlers.misclassified_seconds(None) == 0 and handlers.specialization_seconds("layer2.0.conv2") == 0


def test_the_sample_pack_gives_every_data_view(tiny_model, tmp_path, image_path):
    """No full source: gallery, random and misclassified test images, About, specialization and a fine-tune
    with a CIFAR-10 subset and the forgetting check all come from the shipped sample pack."""
    h = Handlers(tiny_model, {"classes": list(data.CLASSES)}, data.sample_source(), "tiny.safetensors")
    x, y = h.test_split()
    gallery, md = h.sample_gallery()
    assert len(gallery.value) == N_SAMPLES and "sample pack" in md and "400" in md
    im, truth = h.random_sample()
    assert im.size == (32, 32) and truth["label"] in data.CLASSES and 0 <= truth["index"] < len(y)
    items, idx, md = h.misclassified(None, progress=lambda *a, **k: None)
    assert 0 < len(items) == len(idx) <= MISCLASSIFIED_SHOW and "of 400 test images" in md
    for (_, caption), i in zip(items, idx):  # "true→predicted 62%", short enough not to be cut
        true, rest = caption.split("→")
        assert true == data.CLASSES[int(y[i])] and rest.split()[0] in data.CLASSES and true != rest.split()[0]
        assert caption.endswith("%") and len(caption) <= 24
    assert "sample pack" in h.about(None, 0)[3]
    assert h.cifar_subset_max() == 10
    status, _, result_md, path, pending = list(h.finetune(None, serving.StopFlag(), 10, "head", 1, 0.05, 32,
                                                          *_uploads({})))[-1]
    assert "80 training / 20 held-out" in result_md and "test slice (400 images, forgetting)" in result_md
    assert next(pending.model.parameters()).device.type == "cpu"


def test_samples_from_cifar(tiny_model, cifar_source):
    h = Handlers(tiny_model, {"classes": list(data.CLASSES)}, cifar_source)
    gallery, md = h.sample_gallery()
    assert len(gallery.value) == N_SAMPLES
    im, truth = h.random_sample()
    assert im.size == (32, 32) and truth["label"] in data.CLASSES
    im5, t5 = h.load_sample(5)
    x, y = h.test_split()
    assert np.array_equal(np.asarray(im5), x[5].permute(1, 2, 0).numpy()) and t5["label"] == data.CLASSES[int(y[5])]
    items, idx, md = h.misclassified(None, progress=lambda *a, **k: None)
    assert len(items) == len(idx) <= MISCLASSIFIED_SHOW
    probs = predict_batch(tiny_model, x[idx])
    assert all(int(probs[j].argmax()) != int(y[i]) for j, i in enumerate(idx))
    assert "misclassified" in md


# ---------------------------------------------------------------- Feature maps


def test_feature_maps_every_layer(handlers, tiny_model, image_path):
    for _, layer in layer_dropdown_choices(tiny_model):
        grid, md, stats = handlers.feature_maps(image_path, layer, "channels", "group", None)
        assert isinstance(grid, Image.Image) and isinstance(stats, Image.Image)
        assert f"{explain.groups_of(tiny_model, layer)} group" in md
    for view in ("channels", "summary"):
        for scale in ("channel", "group", "layer"):
            grid, md, _ = handlers.feature_maps(image_path, "layer1.0.conv2", view, scale, None)
            assert grid.size[0] > 0


def test_feature_maps_bad_layer(handlers, image_path):
    with pytest.raises(gr.Error):
        handlers.feature_maps(image_path, "layer9.0.conv2", "channels", "group", None)
    with pytest.raises(gr.Error):
        handlers.feature_maps(None, "layer1.0.conv2", "channels", "group", None)


# ---------------------------------------------------------------- Attributions


@pytest.mark.parametrize("method", explain.METHODS)
def test_attribute_every_method(handlers, image_path, method):
    img, md = handlers.attribute(image_path, method, "predicted", True, 0.5, steps=4, samples=2, window=8, stride=8)
    assert isinstance(img, Image.Image)
    assert method in md and "raw range" in md


def test_attribute_target_and_params(handlers, image_path):
    img, md = handlers.attribute(image_path, "Grad-CAM", "ship", False, 0.3, layer="layer2.0.conv2")
    assert "**ship**" in md and "layer2.0.conv2" in md
    with pytest.raises(gr.Error):
        handlers.attribute(image_path, "Saliency", "zebra")
    with pytest.raises(gr.Error):
        handlers.attribute(image_path, "Occlusion", "predicted", window=64)  # larger than the image
    assert Handlers_params("Integrated Gradients") == {"steps", "baseline"}
    assert Handlers_params("Occlusion") == {"window", "stride", "baseline"}


def Handlers_params(method):
    return set(Handlers.method_params(method, 8, "black", 4, 0.1, None, 8, 4))


def test_param_visibility_follows_method():
    vis = Handlers.param_visibility("SmoothGrad")
    shown = [u["visible"] for u in vis]
    assert shown == [False, False, True, True, False, False, False]
    assert [u["visible"] for u in Handlers.param_visibility("Grad-CAM")][4] is True


def test_compare_two_methods(handlers, image_path):
    img, md = handlers.compare(image_path, "Saliency", "Grad-CAM", "predicted", True, 0.5)
    assert isinstance(img, Image.Image)
    assert "Saliency" in md and "Grad-CAM" in md


# ---------------------------------------------------------------- Fine-tune


def test_finetune_new_class_use_and_download(handlers, tiny_model, tmp_path, image_path):
    before = _state_dict_copy(tiny_model)
    files = {"cat": _synthetic_files(tmp_path, "cat", 4, (200, 120, 40)),
             "ship": _synthetic_files(tmp_path, "ship", 4, (30, 60, 200))}
    new = {"zebra": _synthetic_files(tmp_path, "zebra", 4, (250, 250, 250))}
    outs = _run_finetune(handlers, None, serving.StopFlag(), files, new, epochs=2, layers="all")
    status, df, result_md, path, pending = outs[-1]
    assert isinstance(df, pd.DataFrame) and {"epoch", "series", "value"} <= set(df.columns)
    assert "before" in result_md and "after" in result_md
    assert pending is not None and pending.classes[-1] == "zebra" and len(pending.classes) == 11
    assert _same(before, _state_dict_copy(tiny_model)), "the shared model was modified"
    # the download is a loadable checkpoint declaring its custom classes
    model, meta = weights.load_checkpoint(path)
    assert meta["classes"][-1] == "zebra" and meta["custom_classes"] is True
    # "use this model" swaps only the session's state
    session, banner = handlers.use_model(pending)
    assert session is pending and "session" in banner
    if "data" in meta:  # its accuracy is on a CIFAR-10 slice, and the banner says how many images
        assert f"on {meta['data']['test_images']:,} test images" in banner
    probs = handlers.predict_label(image_path, 11, session)
    assert "zebra" in probs
    assert "zebra" not in handlers.predict_label(image_path, 10, None)
    fm_layer, at_layer, at_target, gr_layer, gr_target, gr_contrast, top_k = handlers.model_controls(session)
    assert top_k["maximum"] == 11 == len(session.classes)  # the top-k slider follows the model's classes
    assert "zebra" in at_target["choices"] and fm_layer["value"] == "layer1.0.conv2"
    assert at_layer["value"] == explain.layer_choices(session.model)["stages"][-1]  # Grad-CAM's own default
    assert "zebra" in gr_target["choices"] and "zebra" in gr_contrast["choices"] and gr_layer["value"] == "layer3.0.conv2"
    # re-upload the exported file to continue
    s2, banner2 = handlers.load_checkpoint(path)
    assert s2.classes == pending.classes and Path(path).name in banner2
    assert handlers.reset_model()[0] is None


def test_finetune_stop_button(handlers, tmp_path):
    flag = serving.StopFlag()
    files = {c: _synthetic_files(tmp_path, c, 5, (i * 25, 100, 200 - i * 20)) for i, c in enumerate(data.CLASSES[:4])}
    seen = []

    def on_step(out):
        seen.append(out)
        if len(seen) == 2:  # the first progress event after "Preparing…"
            handlers.stop(flag)
    outs = _run_finetune(handlers, None, flag, files, epochs=finetune.MAX_EPOCHS, on_step=on_step)
    _, _, result_md, path, pending = outs[-1]
    assert "Stopped" in result_md
    assert len(weights.read_metadata(path)["history"]) < finetune.MAX_EPOCHS


def test_finetune_wall_time_cap(tiny_model, tmp_path):
    h = Handlers(tiny_model, {"classes": list(data.CLASSES)}, None, max_seconds=0.0)
    files = {"cat": _synthetic_files(tmp_path, "cat", 4, (200, 120, 40))}
    _, _, result_md, path, pending = _run_finetune(h, None, serving.StopFlag(), files, epochs=5)[-1]
    assert "Stopped" in result_md and len(pending.meta["history"]) == 1


def test_finetune_rejects_bad_input(handlers, tmp_path):
    flag = serving.StopFlag()
    with pytest.raises(gr.Error, match="No training images"):
        _run_finetune(handlers, None, flag, {})
    with pytest.raises(gr.Error, match="No CIFAR-10 images are available"):
        list(handlers.finetune(None, flag, 5, "head", 1, 0.01, 8, *_uploads({})))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"garbage")
    with pytest.raises(gr.Error, match="bad.jpg"):
        _run_finetune(handlers, None, flag, {"cat": [str(bad)] * 2})
    files = {"cat": _synthetic_files(tmp_path, "c", 3, (1, 2, 3))}
    with pytest.raises(gr.Error, match="Epochs"):
        list(handlers.finetune(None, flag, 0, "head", finetune.MAX_EPOCHS + 1, 0.01, 8, *_uploads(files)))
    with pytest.raises(gr.Error, match="name"):
        _run_finetune(handlers, None, flag, files, {"": _synthetic_files(tmp_path, "x", 2, (9, 9, 9))})
    with pytest.raises(gr.Error):
        handlers.use_model(None)


def test_two_sessions_finetunes_are_isolated(handlers, tiny_model, tmp_path, image_path):
    """Two users fine-tune at the same time: each gets its own model; nobody else's changes."""
    base = _state_dict_copy(tiny_model)
    flag_a, flag_b = copy.deepcopy(serving.StopFlag()), copy.deepcopy(serving.StopFlag())  # what gr.State does per session
    assert flag_a.event is not flag_b.event
    files_a = {"cat": _synthetic_files(tmp_path, "a-cat", 4, (250, 0, 0)), "dog": _synthetic_files(tmp_path, "a-dog", 4, (0, 250, 0))}
    files_b = {"ship": _synthetic_files(tmp_path, "b-ship", 4, (0, 0, 250))}
    new_b = {"kite": _synthetic_files(tmp_path, "b-kite", 4, (250, 250, 0))}
    results: dict[str, list] = {}
    errors = []

    def run(name, flag, files, new):
        try:
            results[name] = _run_finetune(handlers, None, flag, files, new, epochs=2, layers="all")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=run, args=("a", flag_a, files_a, None)),
               threading.Thread(target=run, args=("b", flag_b, files_b, new_b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    pa, pb = results["a"][-1][-1], results["b"][-1][-1]
    assert pa.model is not pb.model and pa.model is not tiny_model and pb.model is not tiny_model
    assert pa.classes == list(data.CLASSES) and pb.classes == list(data.CLASSES) + ["kite"]
    assert _same(base, _state_dict_copy(tiny_model)), "the shared model was modified"
    sa, _ = handlers.use_model(pa)
    sb, _ = handlers.use_model(pb)
    assert "kite" in handlers.predict_label(image_path, 11, sb)
    assert "kite" not in handlers.predict_label(image_path, 11, sa)
    assert results["a"][-1][3] != results["b"][-1][3]  # separate exported files


def test_load_checkpoint_refuses_pickles(handlers, tiny_checkpoint, tmp_path):
    session, banner = handlers.load_checkpoint(str(tiny_checkpoint))
    assert isinstance(session, serving.SessionModel) and "tiny.safetensors" in banner
    pt = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, pt)
    with pytest.raises(gr.Error, match="pickle"):
        handlers.load_checkpoint(str(pt))
    with pytest.raises(gr.Error):
        handlers.load_checkpoint(None)


def test_stop_flag_is_per_session():
    a = serving.StopFlag()
    b = copy.deepcopy(a)
    a.event.set()
    assert not b.event.is_set()


# ---------------------------------------------------------------- About


def test_about_is_computed_from_the_model(handlers, tiny_model):
    diagram, table, curve, md = handlers.about(None, 1)
    assert isinstance(diagram, Image.Image)
    assert list(table["C (groups)"]) == list(report.CARDINALITIES)
    loaded = table[table["loaded"] != ""]
    assert len(loaded) == 1 and loaded["params (M)"].iloc[0] == round(config_params(tiny_model.config) / 1e6, 3)
    assert curve is None and "no training history" in md
    hist = [{"epoch": 1, "train_loss": 2.0, "train_acc": 0.2, "test_acc": 0.3, "seconds": 1.0, "complete": True},
            {"epoch": 2, "train_loss": 1.5, "train_acc": 0.4, "test_acc": 0.45, "seconds": 2.0, "complete": True}]
    h2 = Handlers(tiny_model, {"classes": list(data.CLASSES), "history": hist, "accuracy": 0.45}, None)
    _, _, curve2, md2 = h2.about(None, 0)
    assert isinstance(curve2, Image.Image) and "45.00 %" in md2
    cmd = "python -m resnext_demo.train --model m --out /elsewhere/proj/runs/gpu/x.safetensors --resume"
    h3 = Handlers(tiny_model, {"classes": list(data.CLASSES), "command": cmd}, None)
    assert "`python -m resnext_demo.train --model m --out runs/gpu/x.safetensors --resume`" in h3.about(None, 0)[3]


def test_sweep_table_when_shipped(tmp_path):
    assert report.read_sweep(tmp_path / "missing.json") is None
    assert Handlers.sweep(tmp_path / "missing.json")[0]["visible"] is False
    p = tmp_path / "results.json"
    p.write_text('{"results": [{"cardinality": 1, "top1": 0.81}]}')  # not what `sweep collect` writes: hidden
    assert report.read_sweep(p) is None and Handlers.sweep(p)[0]["visible"] is False
    rows = [{"C": c, "d": d, "model": f"m{c}", "params_M": 1.0, "MFLOPs": 100.0, "top1_mean": acc, "top1_spread": 0.001,
             "seeds": [0, 1], "epochs": 3, "device": "cpu"} for c, d, acc in ((1, 20, 0.81), (8, 4, 0.84))]
    p.write_text(json.dumps({"rows": rows, "runs": []}))
    t = report.sweep_table(report.read_sweep(p))
    assert list(t["C"]) == [1, 8] and list(t["top-1 % (mean ± half-range)"]) == ["81.00 ± 0.10", "84.00 ± 0.10"]
    upd, md, plot = Handlers.sweep(p)
    assert upd["visible"] is True and plot["visible"] is True and "3 epochs each on cpu" in md
    assert "cardinality matters" in md  # 3 points apart, seeds 0.2 apart
    p.write_text("not json")
    assert report.read_sweep(p) is None


# ---------------------------------------------------------------- Groups (cardinality)


def test_groups_analysis(handlers, tiny_model, image_path):
    before = _state_dict_copy(tiny_model)
    imp, abl, table, cams, md = handlers.groups(image_path, "layer2.0.conv2", "predicted", "runner-up",
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
    assert _same(before, _state_dict_copy(tiny_model))
    _, _, t2, _, md2 = handlers.groups(image_path, "layer1.0.conv2", "ship", "none", "Conductance", "mean")
    assert "ship" in md2 and "shortcut" in md2 and len(t2) == 4


def test_groups_bad_choices_are_gradio_errors(handlers, image_path):
    with pytest.raises(gr.Error, match="Upload"):
        handlers.groups(None, "layer2.0.conv2")
    with pytest.raises(gr.Error, match="block"):
        handlers.groups(image_path, "layer2")  # a stage, not a grouped conv
    with pytest.raises(gr.Error, match="differ"):
        handlers.groups(image_path, "layer2.0.conv2", "cat", "cat")
    with pytest.raises(gr.Error, match="method"):
        handlers.groups(image_path, "layer2.0.conv2", method="LRP")


def test_live_knockout(handlers, tiny_model, image_path):
    label, md = handlers.knockout(image_path, "layer2.0.conv2", [], "zero", 3)
    assert "No group" in md and len(label) == 3
    label, md = handlers.knockout(image_path, "layer2.0.conv2", [0, 1, 2, 3], "zero", 10)
    want = groups.ablate_groups(tiny_model, data.preprocess(image_path), "layer2.0.conv2", [0, 1, 2, 3])
    assert label == pytest.approx({data.CLASSES[i]: float(p) for i, p in enumerate(want)})
    assert "g0, g1, g2, g3" in md
    assert handlers.group_choices("layer1.0.conv2")["choices"] == [(f"g{i}", i) for i in range(4)]


def test_specialization_needs_data_then_uses_the_cache(handlers, tiny_model, tmp_path, monkeypatch):
    with pytest.raises(gr.Error, match="No CIFAR-10 test images") as e:
        handlers.specialization("layer2.0.conv2")
    assert "RESNEXT_DEMO_DATA" not in str(e.value)
    gen = torch.Generator().manual_seed(0)
    images = (torch.rand(40, 3, 32, 32, generator=gen) * 255).to(torch.uint8)
    labels = torch.arange(40) % 10
    monkeypatch.setattr(data, "load_split", lambda source, split: (images, labels))
    monkeypatch.setattr(data, "source_id", lambda source: "fake")
    monkeypatch.setenv("RESNEXT_DEMO_CACHE", str(tmp_path))
    h = Handlers(tiny_model, {"classes": list(data.CLASSES)}, "fake-source", "tiny.safetensors")
    fig, montage, md = h.specialization("layer2.0.conv2")
    assert isinstance(fig, Image.Image) and montage.size[1] == 4 * (2 * 32 + 2)  # one row per group
    assert "selectivity" in md and "Colour" in md
    assert "5 untrained copies" in md  # every verdict next to the untrained control
    assert len(list(tmp_path.glob("analysis/*.safetensors"))) == 1


def test_compare_models(handlers, tiny_model, tiny_checkpoint, image_path):
    la, lb, ca, cb, ga, gb, md = handlers.compare_models(image_path, "shared model")
    assert la == lb and len(la) == 5  # the same model on both sides agrees with itself
    assert "Faithfulness" in md and md.count("C=4") == 2
    other = copy.deepcopy(tiny_model)
    with torch.no_grad():
        other.fc.bias[3] += 5  # B strongly prefers class 3
    p = weights.save_checkpoint(Path(tiny_checkpoint).with_name("other.safetensors"), other, {})
    la, lb, *_ = handlers.compare_models(image_path, "uploaded checkpoint", str(p))
    assert next(iter(lb)) == data.CLASSES[3] and la != lb
    with pytest.raises(gr.Error, match="shared model"):
        handlers.compare_models(image_path, "this session's model", None, "predicted", None)
    with pytest.raises(gr.Error, match="checkpoint"):
        handlers.compare_models(image_path, "uploaded checkpoint", None)


def test_compare_with_every_shipped_checkpoint(handlers, tiny_model, image_path, tmp_path, monkeypatch):
    """Shipped checkpoints other than the default are listed by their path under weights/ and loadable;
    the default, resume states and names not listed are not."""
    monkeypatch.setattr(weights, "WEIGHTS_DIR", tmp_path)
    monkeypatch.setattr(weights, "DEFAULT_WEIGHTS", tmp_path / "default.safetensors")
    for name in ("default.safetensors", "micro.safetensors", "x.resume.safetensors", "sweep/m-s0.safetensors"):
        weights.save_checkpoint(tmp_path / name, tiny_model, {})
    extra = handlers.compare_choices()[3:]
    assert extra == ["micro.safetensors", "sweep/m-s0.safetensors"]
    for choice in extra:
        la, lb, *_ = handlers.compare_models(image_path, choice)
        assert la == lb  # the same weights on both sides
    with pytest.raises(gr.Error, match="Unknown model"):
        handlers.compare_models(image_path, "../default.safetensors")


def test_attribution_markdown_reports_faithfulness(handlers, image_path):
    _, md = handlers.attribute(image_path, "Saliency")
    assert "Faithfulness (deletion)" in md and "random orders" in md


def test_about_names_the_checkpoint_a_run_started_from(tiny_model):
    meta = {"classes": list(data.CLASSES), "history": [{"epoch": 1, "train_loss": 1.0, "train_acc": 0.5, "test_acc": 0.5}],
            "init_from": {"sha256": "ab" * 32, "epochs": 4, "accuracy": 0.6873}}
    h = Handlers(tiny_model, meta, None, "x.safetensors")
    md = h.about(None, 0)[3]
    assert "abababababab" in md and "68.73 %" in md and "second run" in md


def test_feature_maps_show_what_the_next_layer_receives(handlers, tiny_model, image_path):
    _, md, _ = handlers.feature_maps(image_path, "layer2.0.conv2", "channels", "layer", None)
    assert "layer2.0.act2" in md and "what the block's next 1×1 conv receives" in md
    act = explain.feature_maps(tiny_model, data.preprocess(image_path), ["layer2.0.act2"])["layer2.0.act2"]
    assert f"all: min {float(act.min()):.4g}, max {float(act.max()):.4g}" in md  # the ranges are the activation's
    _, md, _ = handlers.feature_maps(image_path, "layer2.0.conv2", "channels", "layer", None, "conv")
    assert "layer2.0.conv2:" in md and "before BN and ReLU" in md


def test_heat_maps_and_conductance_say_how_far_to_trust_them(handlers, image_path):
    _, md = handlers.attribute(image_path, "Integrated Gradients")
    assert "centre prior" in md and "image edges" in md and "**Convergence:**" in md
    _, _, table, _, md = handlers.groups(image_path, "layer2.0.conv2", "predicted", "none", "Conductance", "zero")
    assert "projection shortcut" in md and "**Convergence:**" in md and "model-blind maps" in md
    assert "faithful?" in table.columns


def test_finetune_curve_is_drawn_from_the_endpoint_table():
    rows = [{"epoch": 0.5, "series": "train loss", "value": 1.0}, {"epoch": 1.0, "series": "held-out accuracy", "value": 0.5}]
    assert isinstance(Handlers.curve_image(pd.DataFrame(rows)), Image.Image)
    assert Handlers.curve_image(None) is None and Handlers.curve_image(pd.DataFrame()) is None
    as_text = pd.DataFrame(rows).astype(str)  # what a browser's table sends back
    assert np.array_equal(np.asarray(Handlers.curve_image(as_text)), np.asarray(Handlers.curve_image(pd.DataFrame(rows))))


def test_upload_counts_read_the_zones_in_the_fine_tunes_order():
    """The count line under the drop zones takes the same inputs, in the same order, as /finetune's uploads."""
    n_new = finetune.MAX_NEW_CLASSES
    zones = [["a.png", "b.png"]] + [None] * (len(data.CLASSES) - 2) + [["t.png"]]
    names, new = ["robot"] + [""] * (n_new - 1), [["r1.png", "r2.png", "r3.png"]] + [None] * (n_new - 1)
    md = Handlers.upload_counts(*zones, *names, *new)
    assert "**airplane** 2" in md and "**truck** 1" in md and "**robot** 3" in md
    assert "6 in all" in md and "ship" not in md


def test_an_image_from_elsewhere_clears_the_galleries_highlight(tiny_model):
    """The sample gallery's highlight means "this is the image shown": an upload, a random test image or a
    pick in the misclassified gallery clears it, and the clearing returns a Gallery with nothing selected."""
    demo = ui.build_demo(tiny_model, {"classes": list(data.CLASSES)}, data.default_source())
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
