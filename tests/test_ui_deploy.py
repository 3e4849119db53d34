"""Deployment behaviour of the UI: ZeroGPU bookings (spaces.GPU) that fit free quotas; Stop while queued.

The real `spaces` package with a stand-in for its scheduler is in test_zerogpu.py."""
from __future__ import annotations

import functools
import math
import inspect
import pickle
import sys
import types

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from resnext_demo import data, finetune, race
from resnext_demo.ui import demo as ui, finetune_tab, groups_tab, lab_tab, serving
from resnext_demo.ui.context import Context


# Free ZeroGPU quotas (issue 12): about 2 min of GPU a day for an anonymous visitor, 5 min with a free account;
# a booking counts 1.5x on the newest cards.
ANONYMOUS_QUOTA_S, NEWEST_CARD_FACTOR = 120, 1.5


def _fake_spaces(bookings: list) -> types.ModuleType:
    """A stand-in for `spaces` on ZeroGPU: GPU(duration=...) runs the function here and records the seconds
    booked (a callable duration is evaluated on the call's arguments, as the real one does)."""
    mod = types.ModuleType("spaces")

    def GPU(task=None, *, duration=None):  # noqa: N802 (the real name)
        def book(args, kwargs):
            bookings.append(duration(*args, **kwargs) if callable(duration) else duration)

        def deco(fn):
            if inspect.isgeneratorfunction(fn):
                @functools.wraps(fn)
                def booked_gen(*args, **kwargs):
                    book(args, kwargs)
                    yield from fn(*args, **kwargs)
                return booked_gen

            @functools.wraps(fn)
            def booked(*args, **kwargs):
                book(args, kwargs)
                return fn(*args, **kwargs)
            return booked
        return deco if task is None else deco(task)
    mod.GPU = GPU
    return mod


@pytest.fixture
def zero_gpu(monkeypatch) -> list:
    """The app as on ZeroGPU, with the stand-in `spaces`; returns the list of bookings made."""
    bookings: list = []
    monkeypatch.setitem(sys.modules, "spaces", _fake_spaces(bookings))
    monkeypatch.setattr(serving, "spaces", serving.import_spaces())
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    return bookings


def test_gpu_wrapper_books_only_on_zero_gpu_and_only_what_needs_a_model(zero_gpu, monkeypatch):
    ran = []

    def fn(x):
        ran.append(x)
        return x + 1

    def gen(x):
        yield x
        yield x + 1

    wrapped = serving.gpu(fn, lambda x: 0 if x is None else 7 * x, before=lambda: ran.append("before"))
    assert wrapped(2) == 3 and zero_gpu == [14] and ran == ["before", 2]  # booked, `before` ran in the worker
    with pytest.raises(TypeError):
        wrapped(None)  # duration 0: runs here, unbooked (and fn's own error comes through)
    assert zero_gpu == [14] and ran == ["before", 2, None]
    assert list(serving.gpu(gen, 5)(1)) == [1, 2] and zero_gpu == [14, 5]
    assert list(serving.gpu(gen, lambda x: 0)(1)) == [1, 2] and zero_gpu == [14, 5]
    monkeypatch.setenv("SPACES_ZERO_GPU", "false")  # `spaces` installed, but not on ZeroGPU: no booking, only
    assert _runs_unbooked(serving.gpu(fn, 42), fn, zero_gpu)  # the niced thread of every model-running handler
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    monkeypatch.setitem(sys.modules, "spaces", None)  # `import spaces` raises ImportError
    monkeypatch.setattr(serving, "spaces", serving.import_spaces())
    assert serving.spaces is None and not serving.on_zero_gpu() and _runs_unbooked(serving.gpu(fn, 42), fn, zero_gpu)


def _runs_unbooked(wrapped, fn, zero_gpu: list) -> bool:
    """`wrapped` is `fn` run at the handlers' niceness (in a thread of its own here), booking nothing."""
    import threading

    before, out = list(zero_gpu), []
    t = threading.Thread(target=lambda: out.append(wrapped(1)))
    t.start()
    t.join(10)
    return wrapped.__wrapped__ is fn and out == [2] and zero_gpu == before


@pytest.mark.slow
def test_every_model_running_event_books_a_short_gpu_and_no_other_does(zero_gpu, tiny_model, class_files, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setenv("RESNEXT_DEMO_CACHE", str(tmp_path / "cache"))
    demo = ui.build_demo(tiny_model, {"classes": list(data.CLASSES)}, data.sample_source(), max_seconds=120)
    by_name = {f.api_name: f.fn for f in demo.fns.values()}
    img = class_files[data.CLASSES.index("cat")][0]
    no_progress = {"progress": lambda *a, **k: None}
    layer = "layer2.0.conv2"
    calls = {  # event: (arguments, seconds it books)
        "classify": ((img, 3, None, None), {}, serving.GPU_SECONDS_QUICK),
        "predict": ((img, 3, None), {}, serving.GPU_SECONDS_QUICK),
        "auto_predict": ((img, 3, None, None), {}, serving.GPU_SECONDS_QUICK),
        "knockout": ((img, layer, [0]), {}, serving.GPU_SECONDS_QUICK),
        "feature_maps": ((img, layer), {}, serving.GPU_SECONDS),
        "attribute": ((img, "Saliency"), {}, serving.GPU_SECONDS),
        "compare": ((img, "Saliency", "Grad-CAM"), {}, serving.GPU_SECONDS),
        "groups": ((img, layer), {}, serving.GPU_SECONDS),
        "compare_models": ((img, "shared model"), {}, serving.GPU_SECONDS),
        "misclassified": ((None,), no_progress, serving.GPU_SECONDS),
        "specialization": ((layer, None), no_progress, groups_tab.SPECIALIZATION_GPU_SECONDS),  # not cached yet
    }
    for name, (args, kwargs, seconds) in calls.items():
        zero_gpu.clear()
        by_name[name](*args, **kwargs)
        assert zero_gpu == [seconds], name
    zero_gpu.clear()
    by_name["specialization"](layer, None, **no_progress)  # now cached: a file read
    assert zero_gpu == [serving.GPU_SECONDS]
    # a fine-tune books its estimate: 2 epochs x 4 images, at least FINETUNE_MIN_SECONDS, plus the margin
    zero_gpu.clear()
    *_, (status, _, result_md, path, pending) = by_name["finetune"](None, None, serving.StopFlag(), 0, "head", 2, 0.05, 8,
                                                                    *class_files)
    assert zero_gpu == [finetune_tab.FINETUNE_MIN_SECONDS + finetune_tab.FINETUNE_GPU_MARGIN] and "Finished" in result_md
    assert next(pending.model.parameters()).device.type == "cpu"  # what leaves a GPU worker is on the CPU
    # requests that need no model book nothing: no image, a fine-tune with nothing to train or stopped in the queue
    zero_gpu.clear()
    for name in ("classify", "predict", "feature_maps", "attribute", "groups", "knockout", "compare_models"):
        with pytest.raises(gr.Error, match="Upload an image"):
            by_name[name](None, *calls[name][0][1:])
    assert by_name["auto_predict"](None, 3, None, None) == (None, None, "")
    nothing = [None] * len(data.CLASSES) + [""] * finetune.MAX_NEW_CLASSES + [None] * finetune.MAX_NEW_CLASSES
    with pytest.raises(gr.Error, match="No training images"):
        list(by_name["finetune"](None, None, serving.StopFlag(), 0, "head", 1, 0.05, 8, *nothing))
    flag = serving.StopFlag()
    finetune_tab.arm(flag)
    finetune_tab.stop(flag)
    assert "Stopped before training" in list(by_name["finetune"](None, None, flag, 0, "head", 1, 0.05, 8, *class_files))[0][0]
    # a race books its estimate and sends its models back on the CPU; stopped in the queue it books nothing
    zero_gpu.clear()
    args = (None, serving.StopFlag(), race.DEFAULT_A, race.DEFAULT_B, 10, 10, 1)
    *_, (status, curve, verdict, path_a, path_b, pair) = by_name["race"](*args)
    assert zero_gpu == [math.ceil(lab_tab.race_seconds(demo.ctx, *args))] and status.startswith("Finished")
    assert all(next(sm.model.parameters()).device.type == "cpu" for sm in pair)
    zero_gpu.clear()
    flag = serving.StopFlag()
    lab_tab.arm(flag)
    lab_tab.stop(flag)
    assert list(by_name["race"](None, flag, *args[2:]))[0][0] == "Stopped before the race started."
    # events that run no model never book one
    by_name["stop_race"](serving.StopFlag())
    by_name["random_sample"]()
    by_name["about"](None, 0)
    by_name["stop"](serving.StopFlag())
    by_name["use_model"](pending)
    by_name["reset_model"]()
    assert zero_gpu == []


def test_no_data_books_no_gpu(zero_gpu, tiny_model):
    demo = ui.build_demo(tiny_model, {"classes": list(data.CLASSES)}, None)
    by_name = {f.api_name: f.fn for f in demo.fns.values()}
    items, _, md = by_name["misclassified"](None, progress=lambda *a, **k: None)
    assert items == [] and "No CIFAR-10 test images" in md
    with pytest.raises(gr.Error, match="No CIFAR-10 test images"):
        by_name["specialization"]("layer2.0.conv2", None, progress=lambda *a, **k: None)
    assert zero_gpu == []


def test_bookings_fit_an_anonymous_visitors_daily_quota(zero_gpu, tiny_model):
    """Every booking, the largest fine-tune included, fits 2 min of quota even at 1.5x on the newest cards."""
    demo = ui.build_demo(tiny_model, {"classes": list(data.CLASSES)}, data.sample_source())
    h = demo.ctx
    assert h.max_seconds == finetune_tab.ZERO_GPU_TRAIN_SECONDS  # the fine-tune's cap is lowered on ZeroGPU
    biggest = [["x.png"] * finetune.MAX_IMAGES] + [None] * (len(data.CLASSES) - 1) + [""] * finetune.MAX_NEW_CLASSES \
        + [None] * finetune.MAX_NEW_CLASSES
    most = finetune_tab.finetune_seconds(h, None, None, serving.StopFlag(), finetune.MAX_CIFAR_PER_CLASS, "all", finetune.MAX_EPOCHS, 0.01, 8,
                              *biggest)
    bookings = [serving.GPU_SECONDS_QUICK, serving.GPU_SECONDS, groups_tab.SPECIALIZATION_GPU_SECONDS, most]
    assert most == finetune_tab.ZERO_GPU_TRAIN_SECONDS + finetune_tab.FINETUNE_GPU_MARGIN
    assert all(NEWEST_CARD_FACTOR * b <= ANONYMOUS_QUOTA_S for b in bookings), bookings


def test_fine_tune_booking_grows_with_epochs_and_images(tiny_model):
    """The estimate (hence the booking and, on ZeroGPU, the training cap) follows epochs x images x rate."""
    h = Context(tiny_model, {"classes": list(data.CLASSES)}, data.sample_source(), max_seconds=300)

    def uploads(n):
        return [["x.png"] * n] + [None] * (len(data.CLASSES) - 1) + [""] * finetune.MAX_NEW_CLASSES \
            + [None] * finetune.MAX_NEW_CLASSES

    rate = finetune_tab.TRAIN_SECONDS_PER_IMAGE
    assert finetune_tab.train_seconds(h, 0, "head", 3, uploads(0)) == 0
    assert finetune_tab.train_seconds(h, 0, "all", 20, uploads(400)) == pytest.approx(20 * 400 * rate["all"])
    assert finetune_tab.train_seconds(h, 0, "all", 10, uploads(400)) == pytest.approx(10 * 400 * rate["all"])
    assert finetune_tab.train_seconds(h, 0, "head", 20, uploads(400)) < finetune_tab.train_seconds(h, 0, "all", 20, uploads(400))
    # CIFAR-10 images count too, as many as the sample pack has (10 per class)
    assert finetune_tab.train_seconds(h, 50, "all", 20, uploads(0)) == pytest.approx(20 * 100 * rate["all"])
    assert finetune_tab.train_seconds(h, 0, "head", 1, uploads(2)) == finetune_tab.FINETUNE_MIN_SECONDS
    assert finetune_tab.train_seconds(h, 0, "all", 20, uploads(500)) == 200.0 < h.max_seconds
    assert finetune_tab.train_seconds(Context(tiny_model, None, None, max_seconds=30), 5, "all", 20, uploads(500)) == 30


def test_train_click_arms_the_stop_flag_unqueued_before_the_queued_finetune(tiny_model):
    demo = ui.build_demo(tiny_model, {"classes": list(data.CLASSES)}, None)
    deps = {d["id"]: d for d in demo.config["dependencies"]}
    ft = next(d for d in deps.values() if d["api_name"] == "finetune")
    arm = deps[ft["trigger_after"]]
    assert arm["queue"] is False and demo.fns[arm["id"]].fn == finetune_tab.arm
    assert not ft["trigger_only_on_success"]


@pytest.fixture
def class_files(tmp_path) -> list:
    """Finetune `uploads`: four synthetic images for 'cat', no new classes."""
    files = []
    for i in range(4):
        p = tmp_path / f"cat-{i}.png"
        Image.fromarray(np.full((36, 36, 3), 40 * i, np.uint8)).save(p)
        files.append(str(p))
    return [files if c == "cat" else None for c in data.CLASSES] + [""] * finetune.MAX_NEW_CLASSES \
        + [None] * finetune.MAX_NEW_CLASSES


def test_stop_pressed_while_queued_is_kept(tiny_model, class_files):
    h = Context(tiny_model, {"classes": list(data.CLASSES)}, None)
    flag = serving.StopFlag()
    finetune_tab.arm(flag)  # the Train click
    finetune_tab.stop(flag)  # Stop while the job still waits in the queue
    outs = list(finetune_tab.run_finetune(h, None, None, flag, 0, "head", 1, 0.05, 8, *class_files))
    assert len(outs) == 1 and "Stopped before training started" in outs[0][0] and outs[0][4] is None
    assert not flag.armed
    # the next Train click starts afresh and trains
    finetune_tab.arm(flag)
    status, _, result_md, path, pending = list(finetune_tab.run_finetune(h, None, None, flag, 0, "head", 1, 0.05, 8, *class_files))[-1]
    assert pending is not None and "Finished" in result_md


def test_finetune_without_arm_clears_an_old_stop(tiny_model, class_files):
    """gradio_client's /finetune has no arm step: a Stop from an earlier run must not stop the new one."""
    h = Context(tiny_model, {"classes": list(data.CLASSES)}, None)
    flag = serving.StopFlag()
    finetune_tab.stop(flag)
    *_, (status, _, result_md, path, pending) = finetune_tab.run_finetune(h, None, None, flag, 0, "head", 1, 0.05, 8, *class_files)
    assert pending is not None and "Finished" in result_md


def test_stop_flag_pickles_with_its_state():
    """ZeroGPU pickles a GPU function's arguments into its worker: a threading.Event alone cannot be."""
    flag = serving.StopFlag()
    flag.armed = True
    flag.event.set()
    copy = pickle.loads(pickle.dumps(flag))
    assert copy.armed and copy.event.is_set() and copy.event is not flag.event
    assert not pickle.loads(pickle.dumps(serving.StopFlag())).event.is_set()
