"""resnext_demo.ui.finetune_tab, called directly on the tiny model (no server, no browser)."""
from __future__ import annotations

import copy
import threading
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from resnext_demo import data, explain, finetune, weights
from resnext_demo.ui import finetune_tab, predict_tab, serving
from resnext_demo.ui.demo import model_controls
from resnext_demo.ui.context import Context
from tests.ui.uihelpers import run_finetune, same, state_dict_copy, synthetic_files, uploads


def test_finetune_new_class_use_and_download(ctx, tiny_model, tmp_path, image_path):
    before = state_dict_copy(tiny_model)
    files = {"cat": synthetic_files(tmp_path, "cat", 4, (200, 120, 40)),
             "ship": synthetic_files(tmp_path, "ship", 4, (30, 60, 200))}
    new = {"zebra": synthetic_files(tmp_path, "zebra", 4, (250, 250, 250))}
    outs = run_finetune(ctx, None, serving.StopFlag(), files, new, epochs=2, layers="all")
    status, df, result_md, path, pending = outs[-1]
    assert isinstance(df, pd.DataFrame) and {"epoch", "series", "value"} <= set(df.columns)
    assert "before" in result_md and "after" in result_md
    assert pending is not None and pending.classes[-1] == "zebra" and len(pending.classes) == 11
    assert same(before, state_dict_copy(tiny_model)), "the shared model was modified"
    # the download is a loadable checkpoint declaring its custom classes
    model, meta = weights.load_checkpoint(path)
    assert meta["classes"][-1] == "zebra" and meta["custom_classes"] is True
    assert meta["dtype"] == "float16" and "before this file's fp16 rounding" in meta["scored_in"]  # #28.8: as shipped
    # "use this model" swaps only the session's state
    session, banner = finetune_tab.use_model(ctx, pending)
    assert session is pending and "session" in banner
    if "data" in meta:  # its accuracy is on a CIFAR-10 slice, and the banner says how many images
        assert f"on {meta['data']['test_images']:,} test images" in banner
    probs = predict_tab.predict_label(ctx, image_path, 11, session)
    assert "zebra" in probs
    assert "zebra" not in predict_tab.predict_label(ctx, image_path, 10, None)
    fm_layer, at_layer, at_target, gr_layer, gr_target, gr_contrast, knock, top_k, *names = model_controls(ctx, session)
    assert knock["choices"] == [(f"g{i}", i) for i in range(4)] and knock["value"] == []
    assert [n["value"] for n in names] == ["zebra", "", ""]  # a new fine-tune can add images to its own class
    assert top_k["maximum"] == 11 == len(session.classes)  # the top-k slider follows the model's classes
    assert "zebra" in at_target["choices"] and fm_layer["value"] == "layer1.0.conv2"
    assert at_layer["value"] == explain.layer_choices(session.model)["stages"][-1]  # Grad-CAM's own default
    assert "zebra" in gr_target["choices"] and "zebra" in gr_contrast["choices"] and gr_layer["value"] == "layer3.0.conv2"
    # re-upload the exported file to continue
    s2, banner2 = finetune_tab.load_checkpoint(ctx, path)
    assert s2.classes == pending.classes and Path(path).name in banner2
    assert finetune_tab.reset_model(ctx)[0] is None


def test_finetune_stop_button(ctx, tmp_path):
    flag = serving.StopFlag()
    files = {c: synthetic_files(tmp_path, c, 5, (i * 25, 100, 200 - i * 20)) for i, c in enumerate(data.CLASSES[:4])}
    seen = []

    def on_step(out):
        seen.append(out)
        if len(seen) == 2:  # the first progress event after "Preparing…"
            finetune_tab.stop(flag)
    outs = run_finetune(ctx, None, flag, files, epochs=finetune.MAX_EPOCHS, on_step=on_step)
    _, _, result_md, path, pending = outs[-1]
    assert "Stopped" in result_md
    assert len(weights.read_metadata(path)["history"]) < finetune.MAX_EPOCHS


def test_finetune_wall_time_cap(tiny_model, tmp_path):
    h = Context(tiny_model, {"classes": list(data.CLASSES)}, None, max_seconds=0.0)
    files = {"cat": synthetic_files(tmp_path, "cat", 4, (200, 120, 40))}
    _, _, result_md, path, pending = run_finetune(h, None, serving.StopFlag(), files, epochs=5)[-1]
    assert "Stopped" in result_md and len(pending.meta["history"]) == 1


def test_finetune_rejects_bad_input(ctx, tmp_path):
    flag = serving.StopFlag()
    with pytest.raises(gr.Error, match="No training images"):
        run_finetune(ctx, None, flag, {})
    with pytest.raises(gr.Error, match="No CIFAR-10 images are available"):
        list(finetune_tab.run_finetune(ctx, None, None, flag, 5, "head", 1, 0.01, 8, *uploads({})))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"garbage")
    with pytest.raises(gr.Error, match="bad.jpg"):
        run_finetune(ctx, None, flag, {"cat": [str(bad)] * 2})
    files = {"cat": synthetic_files(tmp_path, "c", 3, (1, 2, 3))}
    with pytest.raises(gr.Error, match="Epochs"):
        list(finetune_tab.run_finetune(ctx, None, None, flag, 0, "head", finetune.MAX_EPOCHS + 1, 0.01, 8, *uploads(files)))
    with pytest.raises(gr.Error, match="name"):
        run_finetune(ctx, None, flag, files, {"": synthetic_files(tmp_path, "x", 2, (9, 9, 9))})
    with pytest.raises(gr.Error):
        finetune_tab.use_model(ctx, None)


def test_two_sessions_finetunes_are_isolated(ctx, tiny_model, tmp_path, image_path):
    """Two users fine-tune at the same time: each gets its own model; nobody else's changes."""
    base = state_dict_copy(tiny_model)
    flag_a, flag_b = copy.deepcopy(serving.StopFlag()), copy.deepcopy(serving.StopFlag())  # what gr.State does per session
    assert flag_a.event is not flag_b.event
    files_a = {"cat": synthetic_files(tmp_path, "a-cat", 4, (250, 0, 0)), "dog": synthetic_files(tmp_path, "a-dog", 4, (0, 250, 0))}
    files_b = {"ship": synthetic_files(tmp_path, "b-ship", 4, (0, 0, 250))}
    new_b = {"kite": synthetic_files(tmp_path, "b-kite", 4, (250, 250, 0))}
    results: dict[str, list] = {}
    errors = []

    def run(name, flag, files, new):
        try:
            results[name] = run_finetune(ctx, None, flag, files, new, epochs=2, layers="all")
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
    assert same(base, state_dict_copy(tiny_model)), "the shared model was modified"
    sa, _ = finetune_tab.use_model(ctx, pa)
    sb, _ = finetune_tab.use_model(ctx, pb)
    assert "kite" in predict_tab.predict_label(ctx, image_path, 11, sb)
    assert "kite" not in predict_tab.predict_label(ctx, image_path, 11, sa)
    assert results["a"][-1][3] != results["b"][-1][3]  # separate exported files


def test_load_checkpoint_refuses_pickles(ctx, tiny_checkpoint, tmp_path):
    session, banner = finetune_tab.load_checkpoint(ctx, str(tiny_checkpoint))
    assert isinstance(session, serving.SessionModel) and "tiny.safetensors" in banner
    pt = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, pt)
    with pytest.raises(gr.Error, match="pickle"):
        finetune_tab.load_checkpoint(ctx, str(pt))
    with pytest.raises(gr.Error):
        finetune_tab.load_checkpoint(ctx, None)


def test_stop_flag_is_per_session():
    a = serving.StopFlag()
    b = copy.deepcopy(a)
    a.event.set()
    assert not b.event.is_set()


def test_finetune_curve_is_drawn_from_the_endpoint_table():
    rows = [{"epoch": 0.5, "series": "train loss", "value": 1.0}, {"epoch": 1.0, "series": "held-out accuracy", "value": 0.5}]
    assert isinstance(finetune_tab.curve_image(pd.DataFrame(rows)), Image.Image)
    assert finetune_tab.curve_image(None) is None and finetune_tab.curve_image(pd.DataFrame()) is None
    as_text = pd.DataFrame(rows).astype(str)  # what a browser's table sends back
    assert np.array_equal(np.asarray(finetune_tab.curve_image(as_text)), np.asarray(finetune_tab.curve_image(pd.DataFrame(rows))))


def test_upload_counts_read_the_zones_in_the_fine_tunes_order():
    """The count line under the drop zones takes the same inputs, in the same order, as /finetune's uploads."""
    n_new = finetune.MAX_NEW_CLASSES
    zones = [["a.png", "b.png"]] + [None] * (len(data.CLASSES) - 2) + [["t.png"]]
    names, new = ["robot"] + [""] * (n_new - 1), [["r1.png", "r2.png", "r3.png"]] + [None] * (n_new - 1)
    md = finetune_tab.upload_counts(0, *zones, *names, *new)
    assert "**airplane** 2" in md and "**truck** 1" in md and "**robot** 3" in md
    assert "6 in all" in md and "ship" not in md and "CIFAR-10" not in md
    # the CIFAR-10 slider (per class) adds training images that are never held out
    md = finetune_tab.upload_counts(3, *zones, *names, *new)
    assert "6 in all; 2 held out" in md and "+ 30 CIFAR-10 training images (trained on, never held out)" in md
