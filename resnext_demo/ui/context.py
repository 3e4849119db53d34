"""What every tab shares: the loaded model and data (`Context`), the page's per-session states (`Page`), and the
resolvers that turn a tab's choices (target class, contrast class, block, layer) into what the library takes.

A tab module (`predict_tab`, `groups_tab`, …) holds its builder and its handlers; the handlers are plain
functions whose first argument is the `Context`, bound with functools.partial when the builder wires them.
"""
from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from .. import data, explain, faithfulness, finetune, report, visualize
from ..model import device_of
from ..predict import Prediction
from . import serving
from .serving import PredictBatcher, SessionModel

DISPLAY = 224  # side of upscaled 32x32 images
HEAVY_EVENT = {"concurrency_id": serving.HEAVY, "concurrency_limit": serving.HEAVY_LIMIT}  # model-running events…
PREDICT_EVENT = {"concurrency_id": serving.PREDICT_POOL, "concurrency_limit": serving.PREDICT_LIMIT}  # …but predictions
QUICK, SLOW = serving.if_image(serving.GPU_SECONDS_QUICK), serving.if_image(serving.GPU_SECONDS)  # image bookings
PRIVATE = {"api_visibility": "private"}  # page-only events: no endpoint for gradio_client


class Context:
    """What every session shares read-only: the base model, its metadata, the data source and its test split,
    the prediction batcher. Per-session things (the session's model, its stop flag) come in as arguments."""

    def __init__(self, model: nn.Module | None, meta: dict | None, data_source: str | None,
                 weights_path: str | Path | None = None, load_error: str | None = None,
                 max_seconds: float = finetune.MAX_SECONDS):
        self.base = None
        self.batcher = PredictBatcher()  # the fast lane: concurrent predictions share one forward pass
        if model is not None:
            meta = meta or {}
            classes = list(meta.get("classes") or data.CLASSES)
            name = Path(weights_path).name if weights_path else meta.get("recipe", {}).get("model", "model")
            self.base = SessionModel(model.eval(), meta, classes, name)
        self.data_source = data_source
        self.weights_path = weights_path
        self.load_error = load_error
        self.max_seconds = max_seconds
        self._test = None
        self._test_error: str | None = None
        self._lock = threading.Lock()

    def active(self, session: SessionModel | None) -> SessionModel:
        """The session's model (fine-tuned or uploaded) or the shared base model, on the device models run on."""
        if session is not None:
            device = self.device()
            if device_of(session.model) != device:  # in a ZeroGPU worker: it arrives on the CPU
                session.model.to(device)  # in place: the worker holds its own pickled copy
            return session
        if self.base is None:
            raise serving.user_error(self.no_model_help().replace("**", ""), duration=None)
        return self.base

    def device(self) -> torch.device:
        """Where models run: the shared model's device (in a ZeroGPU worker, after `use_gpu`)."""
        return device_of(self.base.model) if self.base is not None else torch.device("cpu")

    def use_gpu(self) -> None:
        """In a ZeroGPU worker (a fork holding a GPU): move the shared model onto it. The main process keeps
        it on the CPU, where ZeroGPU only emulates CUDA."""
        if self.base is not None and torch.cuda.is_available():
            self.base.model.to("cuda")

    def test_split(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The CIFAR-10 test split (loaded once, read-only), or None without a data source."""
        if self.data_source is None:
            return None
        if self._test is None and self._test_error is None:  # once loaded, no lock (forked workers copy locks)
            with self._lock:
                if self._test is None and self._test_error is None:
                    try:
                        self._test = data.load_split(self.data_source, "test")
                    except (OSError, ValueError) as e:  # missing/bad source: the app works without samples
                        self._test_error = f"Could not read the CIFAR-10 source {self.data_source}: {e}".rstrip(".")
        return self._test

    def require_test(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The test split, or a toast saying why there is none."""
        split = self.test_split()
        if split is None:
            raise serving.user_error(self.data_help())
        return split

    def source_label(self) -> str:
        """Which CIFAR-10 images the app shows, in words (the sample pack or the configured source)."""
        split = self.test_split()
        if split is None:
            return "none"
        pack = data.is_sample_pack(self.data_source)
        return report.source_label(self.data_source, len(split[1]),
                                   self.cifar_subset_max() * len(data.CLASSES) if pack else None)

    def cifar_subset_max(self) -> int:
        """Most CIFAR-10 images per class a fine-tune can add: the sample pack holds a few, a full source plenty."""
        if not data.is_sample_pack(self.data_source):
            return finetune.MAX_CIFAR_PER_CLASS
        try:
            y = data.load_split(self.data_source, "train")[1]
        except (OSError, ValueError):
            return 0
        return min(finetune.MAX_CIFAR_PER_CLASS, int(torch.bincount(y, minlength=len(data.CLASSES)).min()))

    def data_help(self) -> str:
        """Why there are no samples."""
        return report.data_help(self._test_error)

    def no_model_help(self) -> str:
        """How to get a model when none could be loaded."""
        return report.no_weights_help(self.weights_path, self.load_error)

    def model_banner(self, session: SessionModel | None) -> str:
        """One line: which model this session uses."""
        if session is None and self.base is None:
            return self.no_model_help()
        sm = self.active(session)
        return report.model_banner(sm.name, sm.model.config.cardinality, len(sm.classes), sm.meta, session is not None)


@dataclass
class Page:
    """What every tab's builder uses: the context, the per-session states and the page's model banner."""

    demo: gr.Blocks
    ctx: Context
    session: gr.State  # this session's model; None = the shared model
    pending: gr.State  # a fine-tuned model waiting for "Use this model"
    stop_flag: gr.State
    truth: gr.State  # the Predict tab's: the true label of a test image shown there
    mis_indices: gr.State  # the Predict tab's: test indices of the misclassified gallery
    lab: gr.State  # the Lab's: the two models of this session's last race (A, B)
    race_flag: gr.State  # the Lab's stop flag
    banner: gr.Markdown

    @property
    def classes(self) -> list[str]:
        """The shared model's classes (CIFAR-10's without a model): the class lists until a model switch."""
        return self.ctx.base.classes if self.ctx.base else list(data.CLASSES)

    @property
    def base_model(self) -> nn.Module | None:
        """The shared model, whose layers fill the layer lists until a model switch."""
        return self.ctx.base.model if self.ctx.base else None

    def gpu(self, fn: Callable, duration: int | Callable[..., float]) -> Callable:
        """`fn` bound to the context and booked on ZeroGPU for `duration` (see serving.gpu: seconds, or a function
        of the event's arguments), the shared model moved onto the GPU first."""
        return serving.gpu(bind(self.ctx, fn), duration, before=self.ctx.use_gpu)

    def bind(self, fn: Callable) -> Callable:
        """`fn` bound to the context, for events that run no model."""
        return bind(self.ctx, fn)


def bind(ctx: Context, fn: Callable) -> Callable:
    """`fn(ctx, ...)` as an event function of the other arguments. Not functools.partial: Gradio finds
    gr.SelectData arguments by the function's type hints, which a partial hides, and streams only what
    inspect sees as a generator function."""
    sig = inspect.signature(fn)
    if inspect.isgeneratorfunction(fn):
        def bound(*args, **kwargs):
            yield from fn(ctx, *args, **kwargs)
    else:
        def bound(*args, **kwargs):
            return fn(ctx, *args, **kwargs)
    bound = functools.wraps(fn)(bound)  # name and type hints (read in fn's module) for Gradio
    bound.__signature__ = sig.replace(parameters=list(sig.parameters.values())[1:])
    return bound


def ImageInput(**kwargs) -> gr.Image:  # noqa: N802 (used like a component class)
    """A gr.Image input that hands the uploaded file to our decoder untouched.

    gr.Image opens uploads with PIL and converts their mode itself before any handler runs, so broken
    files got Gradio's raw message and transparency / 16-bit were converted its way. Here the file
    path goes straight to data.open_image / data.to_rgb (pixel limits, EXIF, white background,
    16-bit scaling, human messages). A factory, not a subclass: Gradio writes a .pyi stub next to the
    source file of every Component subclass at import time (and fails on a read-only file system).
    """
    comp = gr.Image(**kwargs)
    gradio_preprocess = comp.preprocess

    def preprocess(payload):
        if payload is None or (payload.url and payload.url.startswith("data:")) or payload.path is None:
            return gradio_preprocess(payload)  # inline base64 (some webcam paths): Gradio decodes it
        return str(payload.path)

    comp.preprocess = preprocess
    return comp


# ---------------------------------------------------------------- resolvers: a tab's choices -> library arguments

def upscale(im: Image.Image, size: int = DISPLAY) -> Image.Image:
    """Nearest-neighbour upscale so each of the 32x32 pixels stays visible."""
    return visualize.upscale(im, size)


def to_pil32(x: torch.Tensor) -> Image.Image:
    """3 x 32 x 32 uint8 tensor -> PIL image."""
    return Image.fromarray(x.permute(1, 2, 0).numpy())


def decode(image) -> tuple[Image.Image, torch.Tensor]:
    """(the 32x32 picture, its normalized tensor), decoding the upload once per request."""
    im32 = data.prepare_image(image)
    return im32, data.normalize(data.pil_to_uint8(im32))


def require_cifar(sm: SessionModel, what: str) -> None:
    """Views measured on CIFAR-10 need a model with its classes; `what` says why otherwise."""
    if tuple(sm.classes[:10]) != data.CLASSES:
        raise serving.user_error(what)


def layer_choices(model: nn.Module | None) -> list[tuple[str, str]]:
    """(label, value) pairs: grouped convs first, then the stem and stage outputs (Feature maps, Grad-CAM)."""
    if model is None:
        return []
    ch = explain.layer_choices(model)
    return [(report.layer_label(n, explain.groups_of(model, n)), n) for n in ch["grouped"]] + \
           [(report.layer_label(n, None), n) for n in ch["stages"]]


def block_choices(model: nn.Module | None) -> list[tuple[str, str]]:
    """(label, value) for every block's grouped conv (the Groups tab's block list)."""
    if model is None:
        return []
    return [(report.layer_label(n, explain.groups_of(model, n)), n) for n in model.grouped_convs()]


def grouped_layer(sm: SessionModel, layer: str | None) -> str:
    """The chosen block's grouped conv, checked against this model (its last block when none is chosen)."""
    convs = list(sm.model.grouped_convs())
    if not layer:
        return convs[-1]
    if layer not in convs:
        raise serving.user_error(f"Pick a block from the list ({layer!r} is not a grouped conv of this model).")
    return layer


def target_index(sm: SessionModel, target: str | None, pred: Prediction, who: str = "") -> int:
    """'predicted' (or nothing) -> the prediction's top class; else that class of the model. `who` names the
    model in the error (a comparison has two)."""
    if not target or target == "predicted":
        return pred.top_index
    if target not in sm.classes:
        whose = f"Model {who} ({sm.name}) has" if who else "This model has"
        raise serving.user_error(f"{whose} no class {target!r} (its classes: {', '.join(sm.classes)}).")
    return sm.classes.index(target)


def contrast_index(sm: SessionModel, contrast: str | None, target: int, probs: dict[str, float]) -> int | None:
    """'none' -> None; 'runner-up' -> the most probable other class; else that class."""
    if not contrast or contrast == "none":
        return None
    if contrast == "runner-up":
        return next(sm.classes.index(c) for c in probs if sm.classes.index(c) != target)
    if contrast not in sm.classes:
        raise serving.user_error(f"{contrast!r} is not a class of this model.")
    if sm.classes.index(contrast) == target:
        raise serving.user_error("The contrast class must differ from the target class.")
    return sm.classes.index(contrast)


def n_heldin(sm: SessionModel) -> int:
    """How many held-in images the session model's unfamiliar-image threshold was fitted on."""
    fam = getattr(sm.model, "familiarity", None)
    return len(fam.heldin) if fam is not None else 0


def unfamiliar_note(sm: SessionModel, pred: Prediction) -> str:
    """The explanation tabs' one-line warning when their image is unfamiliar ("" otherwise)."""
    return report.unfamiliar_note(pred, n_heldin(sm))


def deletion_score(sm: SessionModel, x: torch.Tensor, values: np.ndarray, target: int):
    """A map's deletion score against random orders and model-blind maps (None for an empty map)."""
    return faithfulness.faithfulness(sm.model, x, [values], target)[0] if np.any(values) else None
