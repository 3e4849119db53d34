"""How the app is served: queues and caps, ZeroGPU bookings, per-session state, errors shown as toasts.

The plumbing every tab module shares (events are wired and handlers run through it); no view code here.
"""
from __future__ import annotations

import functools
import logging
import inspect
import math
import os
import threading
from collections.abc import Callable
from types import ModuleType
from dataclasses import dataclass, field

import gradio as gr
import torch.nn as nn

from ..errors import UserError
from ..predict import predict_many

log = logging.getLogger("resnext_demo")  # user errors get one line here; bugs keep their traceback


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
# Predictions (classify, /predict, /predict_details, sample and gallery clicks) have a lane of their own, so
# they never wait behind an explanation: its slots are threads that mostly wait for the PredictBatcher, which
# runs their images as one forward pass (~10 ms per image alone, less per image in a batch).
PREDICT_POOL = "predict"
PREDICT_LIMIT = 16  # requests in the lane at once (= the largest batch that can form)
PREDICT_MAX_BATCH = 16
# How long the batcher's worker waits for more requests after the first: a few ms, against a ~10-30 ms forward.
# Requests that arrive while a batch computes form the next batch anyway, so under load the wait adds nothing;
# a lone request pays it once.
PREDICT_WAIT_S = 0.003
PREDICT_TIMEOUT_S = 120  # a request never waits forever on the batcher
# Handler threads (explanations, fine-tunes, races: everything wired through `gpu`) run at this niceness, and so
# do the torch threads they start. The server's event loop and the prediction batcher keep 0, so on a busy CPU a
# prediction's few milliseconds are not queued behind seconds of explanation work (Linux: niceness is per thread).
HANDLER_NICE = int(os.environ.get("RESNEXT_DEMO_HANDLER_NICE", "10"))  # 0 turns it off
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

    def arm(self) -> None:
        """The Train/Race click, unqueued, before its job is queued: a fresh flag that the job will not clear."""
        self.event.clear()
        self.armed = True

    def stopped_in_queue(self) -> bool:
        """At the job's start (consumes the arming): True when Stop was pressed while the armed job waited; a job
        started without its click (an API call) starts with a cleared flag."""
        armed, self.armed = self.armed, False
        if not armed:
            self.event.clear()
        return armed and self.event.is_set()

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


def lower_priority(nice: int = HANDLER_NICE) -> None:
    """Run this thread (and the threads it starts from now on) at niceness `nice`, once; a no-op where threads have
    no niceness of their own or it cannot be changed."""
    try:
        tid = threading.get_native_id()
        if os.getpriority(os.PRIO_PROCESS, tid) < nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
    except (AttributeError, OSError):
        pass


def background(fn: Callable) -> Callable:
    """`fn` run at HANDLER_NICE (see lower_priority): a model-running handler gives way to the event loop and the
    prediction batcher."""
    if inspect.isgeneratorfunction(fn):
        def call(*args, **kwargs):
            lower_priority()
            yield from fn(*args, **kwargs)
    else:
        def call(*args, **kwargs):
            lower_priority()
            return fn(*args, **kwargs)
    return functools.wraps(fn)(call)  # Gradio reads fn's signature (progress, gr.SelectData) through wraps


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
        return background(fn)
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


def user_error(message: str, **kwargs) -> gr.Error:
    """A toast for something the visitor can fix: one line in the server log, no traceback (it is not a bug)."""
    log.info("user error: %s", message)
    return gr.Error(message, print_exception=False, **kwargs)


def friendly(fn: Callable) -> Callable:
    """Turn the package's UserError into a toast; any other exception is a bug and keeps its traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            raise user_error(str(e)) from e
    return wrapper


def friendly_gen(fn: Callable) -> Callable:
    """friendly for generator handlers."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            yield from fn(*args, **kwargs)
        except UserError as e:
            raise user_error(str(e)) from e
    return wrapper


def require_image(image: object, message: str = NEEDS_IMAGE) -> None:
    """A handler that needs an image says so when there is none (its ZeroGPU booking was 0: see if_image)."""
    if image is None:
        raise user_error(message)


@dataclass(eq=False)  # identity, not field equality: images are arrays
class _Job:
    """One request waiting in the PredictBatcher."""

    model: nn.Module
    image: object
    classes: list[str]
    done: threading.Event = field(default_factory=threading.Event)
    result: object = None  # a Prediction, or the exception this image raised


class PredictBatcher:
    """Concurrent predictions as one forward pass: the fast lane's request threads hand their images to one
    worker thread, which waits PREDICT_WAIT_S for company, runs up to PREDICT_MAX_BATCH of them (those for the
    same model: a session's fine-tune never shares a batch with the shared model) through
    `predict.predict_many`, and gives each request its own result, or its own error, so a bad image fails
    alone. One batch computes at a time; requests arriving meanwhile form the next.

    Not Gradio's `batch=True`: there an exception fails every request of the batch, and there is no wait.
    """

    def __init__(self, max_batch: int = PREDICT_MAX_BATCH, wait_s: float = PREDICT_WAIT_S) -> None:
        self.max_batch, self.wait_s = max_batch, wait_s
        self._cond = threading.Condition()
        self._pending: list[_Job] = []
        self._worker: threading.Thread | None = None
        self.sizes: list[int] = []  # every batch's size, most recent last (bounded; tests and the load test read it)
        with self._cond:  # now, from the thread building the app: a handler thread would pass on its niceness
            self._start()

    def _start(self) -> None:
        """The worker thread, (re)started when it is not running (a ZeroGPU fork has none)."""
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._loop, name="predict-batcher", daemon=True)
            self._worker.start()

    def predict(self, model: nn.Module, image, classes: list[str]):
        """What predict.predict(model, image, classes) returns (or raises), computed beside concurrent requests."""
        job = _Job(model, image, list(classes))
        with self._cond:
            self._start()
            self._pending.append(job)
            self._cond.notify()
        if not job.done.wait(PREDICT_TIMEOUT_S):
            raise TimeoutError("The prediction took too long; please try again.")
        if isinstance(job.result, BaseException):
            raise job.result
        return job.result

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
            threading.Event().wait(self.wait_s)  # let concurrent requests join
            with self._cond:
                model = self._pending[0].model
                batch = [j for j in self._pending if j.model is model][:self.max_batch]
                self._pending = [j for j in self._pending if j not in batch]
            try:
                results = predict_many(model, [j.image for j in batch], batch[0].classes)
            except Exception as e:  # noqa: BLE001 — a failure of the whole pass goes to every request of it
                results = [e] * len(batch)
            for j, r in zip(batch, results):
                j.result = r
                j.done.set()
            self.sizes = (self.sizes + [len(batch)])[-1000:]
