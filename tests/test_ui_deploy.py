"""Deployment behaviour of the UI: spaces.GPU (ZeroGPU) only where `spaces` exists; Stop while queued."""
from __future__ import annotations

import functools
import pickle
import sys
import types

import numpy as np
import pytest
from PIL import Image

from resnext_demo import data, finetune, ui


def _fake_spaces(calls: list) -> types.ModuleType:
    """A stand-in for the `spaces` package: GPU(duration=...) marks the function and records the call."""
    mod = types.ModuleType("spaces")

    def GPU(task=None, *, duration=None):  # noqa: N802 (the real name)
        def deco(fn):
            @functools.wraps(fn)  # as the real one does (Gradio names unnamed events after the function)
            def wrapped(*args, **kwargs):
                return fn(*args, **kwargs)
            wrapped.gpu_duration = duration
            wrapped.inner = fn
            calls.append((fn, duration))
            return wrapped
        return deco if task is None else deco(task)
    mod.GPU = GPU
    return mod


def test_gpu_wrapper_applies_spaces_gpu_only_when_importable(monkeypatch):
    def fn(x):
        return x + 1
    calls: list = []
    monkeypatch.setitem(sys.modules, "spaces", _fake_spaces(calls))
    monkeypatch.setattr(ui, "spaces", ui._import_spaces())
    wrapped = ui._gpu(fn, duration=42)
    assert wrapped is not fn and wrapped.gpu_duration == 42 and wrapped(1) == 2
    assert ui._gpu(fn).gpu_duration == ui.GPU_SECONDS
    monkeypatch.setitem(sys.modules, "spaces", None)  # `import spaces` raises ImportError
    monkeypatch.setattr(ui, "spaces", ui._import_spaces())
    assert ui.spaces is None
    assert ui._gpu(fn, duration=42) is fn


def test_build_demo_decorates_the_model_running_events(monkeypatch, tiny_model):
    calls: list = []
    monkeypatch.setitem(sys.modules, "spaces", _fake_spaces(calls))
    monkeypatch.setattr(ui, "spaces", ui._import_spaces())
    demo = ui.build_demo(tiny_model, {"classes": list(data.CLASSES)}, None, max_seconds=120)
    by_name = {f.api_name: f.fn for f in demo.fns.values()}
    for name in ("classify", "predict", "auto_predict", "misclassified", "feature_maps", "attribute", "compare",
                 "groups", "knockout", "compare_models"):
        assert getattr(by_name[name], "gpu_duration", None) == ui.GPU_SECONDS, name
    assert by_name["specialization"].gpu_duration > ui.GPU_SECONDS  # a pass over the test split
    assert by_name["finetune"].gpu_duration == 120 + ui.FINETUNE_GPU_MARGIN
    for name in ("stop", "use_model", "reset_model", "random_sample", "about"):  # no model run on a GPU
        assert not hasattr(by_name[name], "gpu_duration"), name


def test_train_click_arms_the_stop_flag_unqueued_before_the_queued_finetune(tiny_model):
    demo = ui.build_demo(tiny_model, {"classes": list(data.CLASSES)}, None)
    deps = {d["id"]: d for d in demo.config["dependencies"]}
    ft = next(d for d in deps.values() if d["api_name"] == "finetune")
    arm = deps[ft["trigger_after"]]
    assert arm["queue"] is False and demo.fns[arm["id"]].fn == demo.handlers.arm
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
    h = ui.Handlers(tiny_model, {"classes": list(data.CLASSES)}, None)
    flag = ui.StopFlag()
    h.arm(flag)  # the Train click
    h.stop(flag)  # Stop while the job still waits in the queue
    outs = list(h.finetune(None, flag, 0, "head", 1, 0.05, 8, *class_files))
    assert len(outs) == 1 and "Stopped before training started" in outs[0][0] and outs[0][4] is None
    assert not flag.armed
    # the next Train click starts afresh and trains
    h.arm(flag)
    status, _, result_md, path, pending = list(h.finetune(None, flag, 0, "head", 1, 0.05, 8, *class_files))[-1]
    assert pending is not None and "Finished" in result_md


def test_finetune_without_arm_clears_an_old_stop(tiny_model, class_files):
    """gradio_client's /finetune has no arm step: a Stop from an earlier run must not stop the new one."""
    h = ui.Handlers(tiny_model, {"classes": list(data.CLASSES)}, None)
    flag = ui.StopFlag()
    h.stop(flag)
    *_, (status, _, result_md, path, pending) = h.finetune(None, flag, 0, "head", 1, 0.05, 8, *class_files)
    assert pending is not None and "Finished" in result_md


def test_stop_flag_pickles_with_its_state():
    """ZeroGPU pickles a GPU function's arguments into its worker: a threading.Event alone cannot be."""
    flag = ui.StopFlag()
    flag.armed = True
    flag.event.set()
    copy = pickle.loads(pickle.dumps(flag))
    assert copy.armed and copy.event.is_set() and copy.event is not flag.event
    assert not pickle.loads(pickle.dumps(ui.StopFlag())).event.is_set()
