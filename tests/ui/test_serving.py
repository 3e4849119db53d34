"""serving: only UserError becomes a toast; a bug keeps its type (and its traceback in the log)."""
from __future__ import annotations

import logging

import gradio as gr
import pytest
from PIL import Image

from resnext_demo import data, explain, weights
from resnext_demo.errors import UserError
from resnext_demo.ui import serving


def test_library_user_errors_share_one_type():
    assert issubclass(data.ImageError, UserError) and issubclass(weights.CheckpointError, UserError)


@pytest.mark.parametrize("wrap", ["plain", "generator"])
def test_friendly_toasts_user_errors_only(wrap, caplog):
    def boom(exc):
        raise exc

    def gen(exc):
        yield 1
        raise exc

    if wrap == "plain":
        call = serving.friendly(boom)
    else:
        call = lambda exc: list(serving.friendly_gen(gen)(exc))  # noqa: E731
    with caplog.at_level(logging.INFO, logger="resnext_demo"), pytest.raises(gr.Error) as toast:
        call(data.ImageError("not an image"))
    assert toast.value.message == "not an image" and toast.value.print_exception is False
    assert "user error: not an image" in caplog.text
    with pytest.raises(ValueError) as bug:  # a programming error is not dressed up as a hint to the visitor
        call(ValueError("shape mismatch"))
    assert not isinstance(bug.value, gr.Error)


def test_api_values_a_caller_chose_are_user_errors(tiny_model):
    x = data.preprocess(Image.new("RGB", (32, 32), (120, 60, 30)))
    with pytest.raises(UserError, match="unknown attribution method"):
        explain.attribute(tiny_model, x, "Nope", 0)


def test_handlers_run_niced_and_the_batcher_does_not(tiny_model, image_path):
    """#31: a model-running handler lowers its own thread's priority (and its torch threads'); the prediction
    batcher, started with the context, keeps the server's, even when niced handlers hand it work."""
    import os
    import threading

    from resnext_demo import data
    from resnext_demo.ui.context import Context

    if not hasattr(os, "getpriority") or serving.HANDLER_NICE <= os.getpriority(os.PRIO_PROCESS, 0):
        pytest.skip("threads have no niceness of their own here, or HANDLER_NICE is off")
    ctx = Context(tiny_model, {"classes": list(data.CLASSES)}, None)
    seen = {}

    def handler(image):
        seen["handler"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        return ctx.batcher.predict(ctx.base.model, image, ctx.base.classes)

    t = threading.Thread(target=lambda: seen.setdefault("result", serving.background(handler)(image_path)))
    t.start()
    t.join(60)
    assert seen["handler"] == serving.HANDLER_NICE and seen["result"].top_class in data.CLASSES
    assert os.getpriority(os.PRIO_PROCESS, ctx.batcher._worker.native_id) == os.getpriority(os.PRIO_PROCESS, 0)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == os.getpriority(os.PRIO_PROCESS, 0)


def test_background_keeps_generators_generators():
    import inspect

    def gen(n):
        yield from range(n)
    assert inspect.isgeneratorfunction(serving.background(gen)) and list(serving.background(gen)(3)) == [0, 1, 2]
    assert serving.background(lambda x: x + 1)(1) == 2
