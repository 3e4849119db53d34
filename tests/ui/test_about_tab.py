"""resnext_demo.ui.about_tab, called directly on the tiny model (no server, no browser)."""
from __future__ import annotations

import json

from PIL import Image

from resnext_demo import data, report
from resnext_demo.budget import config_params
from resnext_demo.ui import about_tab
from resnext_demo.ui.context import Context


def test_about_is_computed_from_the_model(ctx, tiny_model):
    diagram, table, curve, md = about_tab.about(ctx, None, 1)
    assert isinstance(diagram, Image.Image)
    assert list(table["C (groups)"]) == list(report.CARDINALITIES)
    loaded = table[table["loaded"] != ""]
    assert len(loaded) == 1 and loaded["params (M)"].iloc[0] == round(config_params(tiny_model.config) / 1e6, 3)
    assert curve is None and "no training history" in md
    hist = [{"epoch": 1, "train_loss": 2.0, "train_acc": 0.2, "test_acc": 0.3, "seconds": 1.0, "complete": True},
            {"epoch": 2, "train_loss": 1.5, "train_acc": 0.4, "test_acc": 0.45, "seconds": 2.0, "complete": True}]
    h2 = Context(tiny_model, {"classes": list(data.CLASSES), "history": hist, "accuracy": 0.45}, None)
    _, _, curve2, md2 = about_tab.about(h2, None, 0)
    assert isinstance(curve2, Image.Image) and "45.00 %" in md2
    cmd = "python -m resnext_demo.train --model m --out /elsewhere/proj/runs/gpu/x.safetensors --resume"
    h3 = Context(tiny_model, {"classes": list(data.CLASSES), "command": cmd}, None)
    assert "`python -m resnext_demo.train --model m --out runs/gpu/x.safetensors --resume`" in about_tab.about(h3, None, 0)[3]


def test_sweep_table_when_shipped(tmp_path):
    assert report.read_sweep(tmp_path / "missing.json") is None
    assert about_tab.sweep(tmp_path / "missing.json")[0]["visible"] is False
    p = tmp_path / "results.json"
    p.write_text('{"results": [{"cardinality": 1, "top1": 0.81}]}')  # not what `sweep collect` writes: hidden
    assert report.read_sweep(p) is None and about_tab.sweep(p)[0]["visible"] is False
    rows = [{"C": c, "d": d, "model": f"m{c}", "params_M": 1.0, "MFLOPs": 100.0, "top1_mean": acc, "top1_spread": 0.001,
             "seeds": [0, 1], "epochs": 3, "device": "cpu"} for c, d, acc in ((1, 20, 0.81), (8, 4, 0.84))]
    p.write_text(json.dumps({"rows": rows, "runs": []}))
    t = report.sweep_table(report.read_sweep(p))
    assert list(t["C"]) == [1, 8] and list(t["top-1 % (mean ± half-range)"]) == ["81.00 ± 0.10", "84.00 ± 0.10"]
    upd, md, plot = about_tab.sweep(p)
    assert upd["visible"] is True and plot["visible"] is True and "3 epochs each on cpu" in md
    assert "cardinality matters" in md  # 3 points apart, seeds 0.2 apart
    p.write_text("not json")
    assert report.read_sweep(p) is None


def test_about_names_the_checkpoint_a_run_started_from(tiny_model):
    meta = {"classes": list(data.CLASSES), "history": [{"epoch": 1, "train_loss": 1.0, "train_acc": 0.5, "test_acc": 0.5}],
            "init_from": {"sha256": "ab" * 32, "epochs": 4, "accuracy": 0.6873}}
    h = Context(tiny_model, meta, None, "x.safetensors")
    md = about_tab.about(h, None, 0)[3]
    assert "abababababab" in md and "68.73 %" in md and "second run" in md


def test_stage_slider_counts_like_the_diagram_and_the_layer_names(ctx, tiny_model):
    """#28.8: the slider at 2 drew a diagram titled "stage 3"; now stage 2 is layer2 in both."""
    import numpy as np

    from resnext_demo import charts
    drawn = np.asarray(about_tab.about(ctx, None, 2)[0])
    assert (drawn == np.asarray(charts.block_diagram(tiny_model.config, 1))).all()
    assert not (drawn == np.asarray(charts.block_diagram(tiny_model.config, 2))).all()
