"""resnext_demo.ui.lab_tab, called directly (no server): a tiny race on an image-folder stand-in for CIFAR-10, its
exports opened in Groups, budgets, caps, bookings, Stop."""
from __future__ import annotations

from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd
import pytest

from resnext_demo import data, race, weights
from resnext_demo.ui import groups_tab, lab_tab, serving
from resnext_demo.ui.context import Context
from tests.conftest import make_image_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return str(make_image_folder(tmp_path_factory.mktemp("lab"), 10, 10))


@pytest.fixture
def lab_ctx(tiny_model, folder) -> Context:
    return Context(tiny_model, {"classes": list(data.CLASSES)}, folder, "tiny.safetensors")


def _race(ctx, flag=None, a=race.DEFAULT_A, b=race.DEFAULT_B, epochs=1):
    return list(lab_tab.run_race(ctx, None, flag or serving.StopFlag(), a, b, 10, 10, epochs))


def test_a_race_ends_with_curves_a_verdict_and_two_models_for_groups(lab_ctx, image_path):
    outs = _race(lab_ctx, epochs=2)
    status, curve, verdict, path_a, path_b, pair = outs[-1]
    assert status.startswith("Finished") and "2 epoch(s)" in status
    assert isinstance(curve, pd.DataFrame) and set(curve.columns) == {"epoch", "model", "series", "value"}
    assert set(curve["model"]) == {race.members()[race.DEFAULT_A].label, race.members()[race.DEFAULT_B].label}
    assert verdict.startswith("**") and "100 training images" in verdict
    assert all(o[0] for o in outs[:-1]) and outs[0][0].startswith("Loading 100 training")
    a, b = pair
    assert a.path == path_a and b.path == path_b and Path(path_b).is_file()
    assert weights.read_metadata(path_a)["race"]["against"] == race.DEFAULT_B
    # "Open A and B in Groups": A is the session's model, B the checkpoint the comparison loads
    session, banner, other, file = lab_tab.open_in_groups(lab_ctx, pair)
    assert session is a and "session" in banner and other["value"] == "uploaded checkpoint" and file == path_b
    la, lb, *images, md = groups_tab.compare_models(lab_ctx, image_path, "uploaded checkpoint", file, "predicted", session)
    assert "C=1," in md and "C=8," in md and all(im is not None for im in images)
    img = lab_tab.curve_image(curve.astype(str))  # what the browser sends back
    assert np.asarray(img).shape[2] == 3
    # a second race replaces the first one's files
    new = list(lab_tab.run_race(lab_ctx, pair, serving.StopFlag(), race.DEFAULT_A, race.DEFAULT_B, 10, 10, 1))[-1]
    assert not Path(path_a).exists() and Path(new[3]).is_file()
    lab_tab.delete_exports(new[-1])
    assert not Path(new[3]).exists()


def test_open_in_groups_needs_a_race(lab_ctx):
    with pytest.raises(gr.Error, match="Race first"):
        lab_tab.open_in_groups(lab_ctx, None)


def test_bad_choices_are_toasts_and_no_data_says_so(lab_ctx, ctx):
    with pytest.raises(gr.Error, match="two different"):
        _race(lab_ctx, b=race.DEFAULT_A)
    with pytest.raises(gr.Error, match="10 to 500"):
        list(lab_tab.run_race(lab_ctx, None, serving.StopFlag(), race.DEFAULT_A, race.DEFAULT_B, 600, 10, 1))
    with pytest.raises(gr.Error, match="No CIFAR-10 images"):
        _race(ctx)  # the context without a data source


def test_stop_pressed_while_queued_ends_before_training(lab_ctx):
    flag = serving.StopFlag()
    lab_tab.arm(flag)
    lab_tab.stop(flag)
    assert lab_tab.race_seconds(lab_ctx, None, flag, race.DEFAULT_A, race.DEFAULT_B, 10, 10, 1) == 0  # no booking
    outs = _race(lab_ctx, flag)
    assert outs == [("Stopped before the race started.", None, "", None, None, None)]


def test_booking_grows_with_the_request_and_is_capped(lab_ctx, ctx):
    flag = serving.StopFlag()
    small = lab_tab.race_seconds(lab_ctx, None, flag, race.DEFAULT_A, race.DEFAULT_B, 10, 10, 1)
    big = lab_tab.race_seconds(lab_ctx, None, flag, race.DEFAULT_A, race.DEFAULT_B, 500, 100, 10)
    assert small == lab_tab.RACE_MIN_SECONDS + lab_tab.RACE_GPU_MARGIN < big <= lab_tab.ZERO_GPU_RACE_SECONDS
    assert lab_tab.race_seconds(ctx, None, flag, race.DEFAULT_A, race.DEFAULT_B, 10, 10, 1) == 0  # no data


def test_budget_line_names_both_and_warns_beyond_five_percent(monkeypatch):
    md = lab_tab.budget_md(race.DEFAULT_A, race.DEFAULT_B)
    assert "C = 1" in md and "C = 8" in md and "Not an equal budget" not in md
    fam = race.members()
    skewed = {**fam, "wide": race.Member("wide", 4, int(fam[race.DEFAULT_A].params * 1.3), fam[race.DEFAULT_A].macs)}
    monkeypatch.setattr(race, "members", lambda: skewed)
    assert "Not an equal budget" in lab_tab.budget_md(race.DEFAULT_A, "wide")
    assert lab_tab.budget_md("nope", "wide") == ""
    assert [v for _, v in lab_tab.member_choices()] == list(skewed)


def test_a_race_asks_for_no_more_images_than_the_server_has(lab_ctx):
    """The image-folder source has 10 training and 10 test images per class: more is refused, not shortened."""
    assert lab_tab.race_caps(lab_ctx) == (10, 10)
    with pytest.raises(gr.Error, match="10 training images per class; choose at most 10"):
        list(lab_tab.run_race(lab_ctx, None, serving.StopFlag(), race.DEFAULT_A, race.DEFAULT_B, 20, 10, 1))
    with pytest.raises(gr.Error, match="10 test images per class"):
        list(lab_tab.run_race(lab_ctx, None, serving.StopFlag(), race.DEFAULT_A, race.DEFAULT_B, 10, 20, 1))


def test_the_sample_pack_races_on_what_it_has():
    """A Space without CIFAR-10 races on the sample pack: its sliders stop at what the pack holds."""
    ctx = Context(None, None, str(data.SAMPLE_PACK))
    assert lab_tab.race_caps(ctx) == race.available(str(data.SAMPLE_PACK)) == (10, 40)
    assert lab_tab.race_caps(Context(None, None, None)) == (0, 0)
