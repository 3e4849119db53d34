"""How the app is served: queues and caps, ZeroGPU bookings, per-session state, errors shown as toasts.

The plumbing shared by `ui` (which wires events with it) and `handlers` (which run in it); no view code here.
"""
from __future__ import annotations

import functools
import inspect
import math
import os
import threading
from collections.abc import Callable
from types import ModuleType
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import torch.nn as nn

from . import data, weights


def import_spaces() -> ModuleType | None:
    """The `spaces` package when installed (Hugging Face Spaces preinstall it; ZeroGPU needs it), else None."""
    try:
        import spaces
    except ImportError:
        return None
    return spaces


spaces = import_spaces()  # at import time, as the ZeroGPU docs show: before any model is loaded

HEAVY = "heavy"  # one concurrency pool for every model-running event
HEAVY_LIMIT = 2  # at most this many model-running events at once (2 cores, each op uses them all anyway)
# Fine-tunes hold a slot for minutes: they get a pool of their own, so two of them never stall everyone's
# predictions; at most TRAIN_LIMIT run at once and the others wait in the queue.
TRAIN_POOL = "finetune"
TRAIN_LIMIT = 1
# Pass to launch(max_file_size=...): bounds every upload (a 50 MP camera JPEG is ~30 MB; a paper-size
# fp32 checkpoint to continue from ~140 MB); Gradio refuses bigger files while they stream in (413).
MAX_FILE_SIZE = "200mb"
QUEUE_MAX = 32  # waiting requests beyond this are refused with "queue full"
SESSION_TTL = 3600  # seconds a session's fine-tuned model is kept after its last use
# ZeroGPU (the only Space hardware of a free account): each model-running event books a GPU for a stated number
# of seconds, which must fit in the visitor's daily quota (about 2 min anonymous, 5 min with a free account) and
# counts 1.5x on the newest cards; shorter bookings are also scheduled sooner, and a call that overruns its
# booking may be aborted. So: short bookings, and none for a request that needs no model (no image, no data).
GPU_SECONDS_QUICK = 10  # one forward pass: classify, predict, a live knock-out
GPU_SECONDS = 20  # an explanation (feature maps, attributions, the Groups analysis, compare) or a test-image scan
SPECIALIZATION_GPU_SECONDS = 60  # group statistics over the test images when not cached yet (seconds on a GPU)
# A fine-tune books its training estimate (epochs x images x the rate below, at least FINETUNE_MIN_SECONDS)
# plus FINETUNE_GPU_MARGIN for what happens outside the training loop (decoding uploads, before/after scores,
# export), and its training stops at that estimate. The rates are ~5x what the default model takes per image
# and epoch on the 2-core development CPU (1.4 ms head, 4 ms all), so a run normally ends well within them.
TRAIN_SECONDS_PER_IMAGE = {"head": 0.01, "last_stage": 0.015, "all": 0.02}
FINETUNE_MIN_SECONDS = 10
FINETUNE_GPU_MARGIN = 20
ZERO_GPU_TRAIN_SECONDS = 60  # training cap on ZeroGPU: the largest booking, 80 s, costs 120 s on the newest cards
NEEDS_IMAGE = "Upload an image first (or classify one in the Predict tab)."  # the analysis tabs without an image


@dataclass
class SessionModel:
    """A model with its metadata and class names (the session's active or pending model)."""

    model: nn.Module
    meta: dict
    classes: list[str]
    name: str
    path: str | None = None  # exported checkpoint file, for fine-tuned models


class StopFlag:
    """A per-session stop signal; deep-copying (what gr.State does per session) makes a fresh one.

    `armed` is set by the Train click itself (an unqueued event) and consumed when the fine-tune starts:
    a Stop pressed while the job still waits in the queue is then kept instead of being cleared.
    Pickling (ZeroGPU hands a GPU function's arguments to its worker process that way) keeps the state
    of that moment; a Stop pressed later does not reach a ZeroGPU worker, whose run ends at the caps.
    """

    def __init__(self) -> None:
        self.event = threading.Event()
        self.armed = False

    def __deepcopy__(self, memo) -> "StopFlag":
        return StopFlag()

    def __getstate__(self) -> dict:
        return {"stop": self.event.is_set(), "armed": self.armed}

    def __setstate__(self, state: dict) -> None:
        self.__init__()
        self.armed = bool(state.get("armed"))
        if state.get("stop"):
            self.event.set()


def on_zero_gpu() -> bool:
    """Whether the app runs on ZeroGPU hardware (Hugging Face sets SPACES_ZERO_GPU, which `spaces` reads too)."""
    return spaces is not None and os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")


def if_image(seconds: int) -> Callable[..., int]:
    """A booking for an event whose first argument is the image: none without one (the handler says so)."""
    return lambda image=None, *args, **kwargs: seconds if image is not None else 0


def gpu(fn: Callable, duration: int | Callable[..., float], before: Callable | None = None) -> Callable:
    """`fn` for a model-running event. On ZeroGPU: booked through `spaces.GPU` for `duration` seconds (a number,
    or a function of the event's arguments) and run in the forked worker that holds the GPU, after `before()`
    there; a request whose duration is 0 needs no model and runs here, without a booking. Elsewhere `fn` itself.

    The worker receives pickled copies of the arguments and sends its results back pickled, so what `fn`
    returns must live on the CPU (a CUDA tensor or model in a result can hang or fail the transfer).
    """
    if not on_zero_gpu():
        return fn
    seconds = duration if callable(duration) else (lambda *args, **kwargs: duration)

    def booking(*args, **kwargs) -> int:
        return int(math.ceil(seconds(*args, **kwargs)))

    if inspect.isgeneratorfunction(fn):  # generators (the fine-tune) need generator wrappers at both ends
        def in_worker(*args, **kwargs):
            if before:
                before()
            yield from fn(*args, **kwargs)
        booked = spaces.GPU(duration=booking)(functools.wraps(fn)(in_worker))

        def call(*args, **kwargs):
            yield from (booked if booking(*args, **kwargs) > 0 else fn)(*args, **kwargs)
    else:
        def in_worker(*args, **kwargs):
            if before:
                before()
            return fn(*args, **kwargs)
        booked = spaces.GPU(duration=booking)(functools.wraps(fn)(in_worker))

        def call(*args, **kwargs):
            return (booked if booking(*args, **kwargs) > 0 else fn)(*args, **kwargs)
    return functools.wraps(fn)(call)  # Gradio reads fn's signature (progress, gr.SelectData) through wraps


def delete_pending(sm: SessionModel | None) -> None:
    """gr.State delete_callback: remove the exported file of an expired session's fine-tune."""
    if sm is not None and sm.path:
        Path(sm.path).unlink(missing_ok=True)


def friendly(fn: Callable) -> Callable:
    """Turn the package's user-facing errors into gr.Error (a toast), never a server crash."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (data.ImageError, weights.CheckpointError, ValueError, FileNotFoundError) as e:
            raise gr.Error(str(e)) from e
    return wrapper


def friendly_gen(fn: Callable) -> Callable:
    """friendly for generator handlers."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            yield from fn(*args, **kwargs)
        except gr.Error:
            raise
        except (data.ImageError, weights.CheckpointError, ValueError, FileNotFoundError) as e:
            raise gr.Error(str(e)) from e
    return wrapper


def require_image(image: object, message: str = NEEDS_IMAGE) -> None:
    """A handler that needs an image says so when there is none (its ZeroGPU booking was 0: see if_image)."""
    if image is None:
        raise gr.Error(message)
