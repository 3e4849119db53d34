"""The Gradio app: Predict · Feature maps (per group) · Attributions · Fine-tune · About the architecture.

The only module that imports gradio. `Handlers` holds what every session shares read-only (the base
model, its metadata, the data source); each handler converts Gradio values, calls the package and
returns. Per-session things live in `gr.State`: the model this session uses (None = the shared base
model, never mutated), a freshly fine-tuned model waiting for "use this model", and a stop flag.
"""
from __future__ import annotations

import re

import functools
import inspect
import math
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from PIL import Image

from . import data, explain, faithfulness, finetune, specialization, verdicts, visualize, weights
from . import groups as cardinality  # not 'groups': knockout()'s argument of that name would shadow the module
from .model import ResNeXtConfig, config_macs, config_params, equal_budget_configs, \
    list_models, matched_base_width
from .predict import predict, predict_batch


def _import_spaces():
    """The `spaces` package when installed (Hugging Face Spaces preinstall it; ZeroGPU needs it), else None."""
    try:
        import spaces
    except ImportError:
        return None
    return spaces


spaces = _import_spaces()  # at import time, as the ZeroGPU docs show: before any model is loaded

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
SESSION_TTL = 3600  # seconds a session's fine-tuned model is kept after its last use
N_SAMPLES = 20  # sample gallery: two test images per class
MISCLASSIFIED_SLICE = 500  # test images scanned for the "misclassified examples" view
MISCLASSIFIED_SHOW = 24
DISPLAY = 224  # side of upscaled 32x32 images
CARDINALITIES = (1, 2, 4, 8, 16, 32)

# Seen by visitors, who cannot configure the server: no flags or variables here (the README tells operators).
NO_DATA_HELP = ("No CIFAR-10 test images are available on this server, so there are no samples here. "
                "Everything else works with your own images.")


def no_weights_help(path: str | Path | None, reason: str | None) -> str:
    """What to tell users when no checkpoint could be loaded."""
    return (f"**No model loaded** ({reason or 'no checkpoint'}). Train one with "
            f"`python -m resnext_demo.train --model resnext29_8x4d_micro --epochs 10 --out {path or weights.DEFAULT_WEIGHTS}` "
            "(about an hour on a 2-core CPU; `--subset 2000 --epochs 1` for a quick smoke model), or start "
            "the app with `--weights PATH` / `RESNEXT_DEMO_WEIGHTS=PATH`. You can also load an exported "
            "`.safetensors` checkpoint in the Fine-tune tab (this session only).")


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


def _if_image(seconds: int):
    """A booking for an event whose first argument is the image: none without one (the handler says so)."""
    return lambda image=None, *args, **kwargs: seconds if image is not None else 0


def _gpu(fn, duration, before=None):
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


def _delete_pending(sm: SessionModel | None) -> None:
    """gr.State delete_callback: remove the exported file of an expired session's fine-tune."""
    if sm is not None and sm.path:
        Path(sm.path).unlink(missing_ok=True)


def _friendly(fn):
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


def _friendly_gen(fn):
    """_friendly for generator handlers."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            yield from fn(*args, **kwargs)
        except gr.Error:
            raise
        except (data.ImageError, weights.CheckpointError, ValueError, FileNotFoundError) as e:
            raise gr.Error(str(e)) from e
    return wrapper


def _upscale(im: Image.Image, size: int = DISPLAY) -> Image.Image:
    """Nearest-neighbour upscale so each of the 32x32 pixels stays visible."""
    return visualize.upscale(im, size)


def _to_pil32(x: torch.Tensor) -> Image.Image:
    """3 x 32 x 32 uint8 tensor -> PIL image."""
    return Image.fromarray(x.permute(1, 2, 0).numpy())


def _layer_label(model: nn.Module, name: str, grouped: bool) -> str:
    if grouped:
        return f"{name} — grouped 3x3 conv, C={explain.groups_of(model, name)} groups"
    return f"{name} — {'stem' if name.endswith('conv1') else 'stage'} output (ungrouped)"


def layer_dropdown_choices(model: nn.Module | None) -> list[tuple[str, str]]:
    """(label, value) pairs: grouped convs first, then the stem and stage outputs."""
    if model is None:
        return []
    ch = explain.layer_choices(model)
    return [(_layer_label(model, n, True), n) for n in ch["grouped"]] + \
           [(_layer_label(model, n, False), n) for n in ch["stages"]]


def grouped_dropdown_choices(model: nn.Module | None) -> list[tuple[str, str]]:
    """(label, value) for every block's grouped conv (the Groups tab's block list)."""
    if model is None:
        return []
    return [(_layer_label(model, n, True), n) for n in model.grouped_convs()]


def architecture_text(name: str, cfg: ResNeXtConfig) -> str:
    """One paragraph naming the loaded network's layout and its computed size."""
    size = (f"{config_params(cfg) / 1e6:.2f} M parameters, {config_macs(cfg) / 1e6:.0f} MFLOPs (multiply-adds) per "
            f"32×32 image" if cfg.family in ("cifar", "fast") else f"cardinality {cfg.cardinality}")
    per_group = f"C={cfg.cardinality} groups, d={cfg.base_width} channels per group in stage 1 (doubling each stage)"
    if cfg.family == "cifar":
        return (f"**{name}**: ResNeXt-{2 + 3 * sum(cfg.depths)} with {per_group}, stage widths "
                f"{', '.join(map(str, cfg.widths))}, {size}.")
    if cfg.family == "fast":
        return (f"**{name}**: a fast ResNeXt — 3×3 stem, then each stage opens with a dense 3×3 conv + 2×2 max-pool "
                f"(32 → 16 → 8 → 4 px) followed by {'/'.join(map(str, cfg.depths))} ResNeXt bottlenecks "
                f"(identity shortcuts) with {per_group}; stage widths {', '.join(map(str, cfg.widths))}; {size}.")
    return f"**{name}**: {cfg.family} family, {size}."


def equal_budget_table(config: ResNeXtConfig, recipe_model: str | None = None) -> pd.DataFrame:
    """Parameters and MFLOPs of the loaded network at other C x d with the same budget (computed)."""
    if config.family not in ("cifar", "fast"):
        return pd.DataFrame({"note": ["table available for the ResNeXt-29 and fast families only"]})
    if recipe_model in list_models() and config.num_classes == 10:
        cfgs = list(equal_budget_configs(recipe_model, CARDINALITIES).values())
    else:
        from dataclasses import replace
        cfgs = [replace(config, cardinality=c, base_width=matched_base_width(config, c)) for c in CARDINALITIES]
    rows = []
    for c in cfgs:
        rows.append({"C (groups)": c.cardinality, "d (stage 1)": c.base_width,
                     "params (M)": round(config_params(c) / 1e6, 3), "MFLOPs": round(config_macs(c) / 1e6, 1),
                     "loaded": "◀" if (c.cardinality, c.base_width) == (config.cardinality, config.base_width) else ""})
    return pd.DataFrame(rows)


@functools.lru_cache(maxsize=4)
def _sweep_view(path: str, mtime_ns: int) -> tuple[pd.DataFrame, str, Image.Image] | None:
    """The About tab's sweep table, words and plot, built once per results file (it runs on every page load;
    `mtime_ns` makes a rewritten file a new entry)."""
    import json

    table = sweep_table(path)
    if table is None:
        return None
    results = json.loads(Path(path).read_text())
    rows = results["rows"]
    how = f", {rows[0]['epochs']} epochs each on {rows[0].get('device') or 'an unrecorded device'}"
    md = ("**Cardinality sweep** (`weights/sweep/results.json`): models of one parameter and FLOP budget at "
          f"different C, trained with the same recipe{how}. " + verdicts.sweep_md(results))
    return table, md, visualize.sweep_figure(results)


def sweep_table(path: str | Path = weights.SWEEP_RESULTS) -> pd.DataFrame | None:
    """The shipped cardinality sweep (`python -m resnext_demo.sweep collect`), one row per C, or None when
    there is none (or it is unreadable)."""
    import json

    try:
        rows = json.loads(Path(path).read_text())["rows"]
        return pd.DataFrame([{"C": r["C"], "d": r["d"], "model": r["model"], "params (M)": r["params_M"],
                              "MFLOPs": r["MFLOPs"], "top-1 % (mean ± half-range)":
                              f"{100 * r['top1_mean']:.2f} ± {100 * r['top1_spread']:.2f}",
                              "seeds": len(r["seeds"]), "epochs": r["epochs"]} for r in rows]) if rows else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


class Handlers:
    """Every event handler of the app; shared read-only state only (per-session state comes in as args)."""

    def __init__(self, model: nn.Module | None, meta: dict | None, data_source: str | None,
                 weights_path: str | Path | None = None, load_error: str | None = None,
                 max_seconds: float = finetune.MAX_SECONDS):
        self.base = None
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
        self._spec_lock = threading.Lock()

    # ------------------------------------------------------------ shared helpers

    def active(self, session: SessionModel | None) -> SessionModel:
        """The session's model (fine-tuned or uploaded) or the shared base model, on the device models run on."""
        if session is not None:
            device = self.device()
            if next(session.model.parameters()).device != device:  # in a ZeroGPU worker: it arrives on the CPU
                session.model.to(device)  # in place: the worker holds its own pickled copy
            return session
        if self.base is None:
            raise gr.Error(no_weights_help(self.weights_path, self.load_error).replace("**", ""), duration=None)
        return self.base

    def device(self) -> torch.device:
        """Where models run: the shared model's device (in a ZeroGPU worker, after `use_gpu`)."""
        return next(self.base.model.parameters()).device if self.base is not None else torch.device("cpu")

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

    def source_label(self) -> str:
        """Which CIFAR-10 images the app shows, in words (the sample pack or the configured source)."""
        split = self.test_split()
        if split is None:
            return "none"
        if data.is_sample_pack(self.data_source):
            return (f"the sample pack shipped with the app ({len(split[1]):,} CIFAR-10 test images, and "
                    f"{self.cifar_subset_max() * len(data.CLASSES)} more set aside for fine-tuning)")
        return f"`{Path(self.data_source).name}` ({len(split[1]):,} test images)"

    def cifar_subset_max(self) -> int:
        """Most CIFAR-10 images per class a fine-tune can add: the sample pack holds a few, a full source plenty."""
        if not data.is_sample_pack(self.data_source):
            return finetune.MAX_CIFAR_PER_CLASS
        try:
            y = data.load_split(self.data_source, "train")[1]
        except (OSError, ValueError):
            return 0
        return min(finetune.MAX_CIFAR_PER_CLASS, int(torch.bincount(y, minlength=len(data.CLASSES)).min()))

    # ------------------------------------------------------------ ZeroGPU bookings (seconds; 0 = no GPU needed)

    def misclassified_seconds(self, *args, **kwargs) -> int:
        """A scan of the test images; nothing to book without them."""
        return GPU_SECONDS if self.test_split() is not None else 0

    def specialization_seconds(self, layer: str | None = None, session: SessionModel | None = None,
                               *args, **kwargs) -> int:
        """Short when the specialization is cached (a shipped or earlier result), long to compute; 0 without data."""
        sm = session or self.base
        if sm is None or self.test_split() is None:
            return 0
        return GPU_SECONDS if specialization.specialization_ready(sm.model, self.data_source) else SPECIALIZATION_GPU_SECONDS

    def train_seconds(self, cifar_per_class: int, train_layers: str, epochs: int, uploads: tuple) -> float:
        """A fine-tune's training estimate: epochs x images x TRAIN_SECONDS_PER_IMAGE, within
        [FINETUNE_MIN_SECONDS, max_seconds]; 0 when there is nothing to train."""
        n = sum(len(u) for u in uploads if isinstance(u, (list, tuple)))  # file lists (new class names are str)
        if self.data_source is not None and cifar_per_class:
            n += min(int(cifar_per_class), self.cifar_subset_max()) * len(data.CLASSES)
        if n == 0:
            return 0.0
        rate = TRAIN_SECONDS_PER_IMAGE.get(train_layers, max(TRAIN_SECONDS_PER_IMAGE.values()))
        estimate = max(1, min(int(epochs or 1), finetune.MAX_EPOCHS)) * n * rate
        return min(float(self.max_seconds), max(FINETUNE_MIN_SECONDS, estimate))

    def finetune_seconds(self, session: SessionModel | None, flag: StopFlag, cifar_per_class: int,
                         train_layers: str, epochs: int, lr: float, batch_size: int, *uploads) -> float:
        """A fine-tune's booking: its training estimate plus FINETUNE_GPU_MARGIN; 0 when it will not train
        (no images, or Stop pressed while it waited)."""
        if flag.armed and flag.event.is_set():
            return 0
        train = self.train_seconds(cifar_per_class, train_layers, epochs, uploads)
        return train + FINETUNE_GPU_MARGIN if train > 0 else 0

    def data_help(self) -> str:
        """Why there are no samples."""
        return f"{self._test_error}. {NO_DATA_HELP}" if self._test_error else NO_DATA_HELP

    def model_banner(self, session: SessionModel | None) -> str:
        """One line: which model this session uses."""
        if session is None and self.base is None:
            return no_weights_help(self.weights_path, self.load_error)
        sm = self.active(session)
        acc = sm.meta.get("accuracy")
        n = sm.meta["data"].get("test_images") if isinstance(sm.meta.get("data"), dict) else None
        on = f" on {n:,} test images" if isinstance(n, int) else ""  # a fine-tune's slice is not the whole split
        acc_s = f", CIFAR-10 test accuracy {100 * acc:.2f} %{on}" if isinstance(acc, (int, float)) else ""
        who = "the shared model" if session is None else "**your session's model** (only you see it)"
        return (f"Using {who}: `{sm.name}` — ResNeXt C={sm.model.config.cardinality}, "
                f"{len(sm.classes)} classes{acc_s}.")

    # ------------------------------------------------------------ Predict

    @_friendly
    def predict_label(self, image, k: int = 3, session: SessionModel | None = None) -> dict[str, float]:
        """API /predict: image in, top-k {class: probability} out."""
        if image is None:
            raise gr.Error("Upload an image first.")
        sm = self.active(session)
        p = predict(sm.model, image, sm.classes)
        return dict(list(p.probs.items())[:max(1, int(k))])

    @_friendly
    def predict_full(self, image, k: int = 3, session: SessionModel | None = None, truth: dict | None = None):
        """Predict tab: (top-k label dict, the 32x32 the model sees upscaled, markdown with time/device/truth)."""
        if image is None:
            raise gr.Error("Upload an image, paste one, use the webcam, or pick a sample.")
        sm = self.active(session)
        p = predict(sm.model, image, sm.classes)
        top = dict(list(p.probs.items())[:max(1, int(k))])
        info = (f"**{p.top_class}** ({100 * p.probs[p.top_class]:.1f} %) · inference {1000 * p.seconds:.1f} ms "
                f"on `{p.device}` · the model sees only the 32×32 picture on the right")
        if truth and truth.get("label") is not None:
            ok = truth["label"] == p.top_class
            info += (f"\n\nTrue label (CIFAR-10 test image #{truth['index']}): **{truth['label']}** — "
                     + ("**correct**" if ok else f"**incorrect** (predicted {p.top_class})"))
        return top, _upscale(p.image32), info

    @staticmethod
    def share_image(image):
        """The Predict tab's image for the Groups, Feature maps and Attributions tabs (unreadable files stay out)."""
        if image is None:
            return None, None, None
        try:
            data.open_image(image)
        except data.ImageError:  # the Predict handler already told the user why
            return gr.update(), gr.update(), gr.update()
        return image, image, image

    def auto_predict(self, image, k: int = 3, session: SessionModel | None = None, truth: dict | None = None):
        """predict_full after a user change; a cleared image clears the outputs instead of an error."""
        if image is None:
            return None, None, ""
        return self.predict_full(image, k, session, truth)

    def sample_gallery(self):
        """Gallery of test images with true labels, or a message on how to get a data source."""
        split = self.test_split()
        if split is None:
            return gr.Gallery(value=[], visible=False), self.data_help()
        x, y = split
        idx = list(range(min(N_SAMPLES, len(y))))  # interleaved classes: the first 20 hold 2 per class
        items = [(_upscale(_to_pil32(x[i]), 96), f"#{i} {data.CLASSES[int(y[i])]}") for i in idx]
        return gr.Gallery(value=items, visible=True), (f"{len(items)} CIFAR-10 test images from "
                                                        f"{self.source_label()}; click one to classify it.")

    def load_sample(self, index: int):
        """(32x32 image, truth dict) of test image `index`."""
        split = self.test_split()
        if split is None:
            raise gr.Error(self.data_help())
        x, y = split
        index = int(index) % len(y)
        return _to_pil32(x[index]), {"index": index, "label": data.CLASSES[int(y[index])]}

    def select_sample(self, evt: gr.SelectData):
        """Sample gallery click -> load that image (the first N_SAMPLES test images)."""
        return self.load_sample(evt.index)

    def random_sample(self):
        """A random test image with its true label."""
        split = self.test_split()
        if split is None:
            raise gr.Error(self.data_help())
        return self.load_sample(int(np.random.default_rng().integers(len(split[1]))))

    @_friendly
    def misclassified(self, session: SessionModel | None = None, progress=gr.Progress()):
        """Misclassified images among the first MISCLASSIFIED_SLICE test images: (gallery, indices, markdown)."""
        split = self.test_split()
        if split is None:
            return [], [], self.data_help()
        sm = self.active(session)
        if tuple(sm.classes[:10]) != data.CLASSES:
            raise gr.Error("This session's model does not use the CIFAR-10 classes, so CIFAR-10 errors are not defined.")
        x, y = split[0][:MISCLASSIFIED_SLICE], split[1][:MISCLASSIFIED_SLICE]
        progress(0, desc=f"classifying {len(y)} test images")
        probs = predict_batch(sm.model, x)
        pred = probs.argmax(1)
        wrong = torch.nonzero(pred != y).flatten().tolist()
        shown = wrong[:MISCLASSIFIED_SHOW]
        items = [(_upscale(_to_pil32(x[i]), 96),
                  f"{data.CLASSES[int(y[i])]}→{sm.classes[int(pred[i])]} {100 * float(probs[i, pred[i]]):.0f}%")
                 for i in shown]
        md = (f"{len(wrong)} of {len(y)} test images misclassified ({100 * (1 - len(wrong) / len(y)):.1f} % correct); "
              f"showing {len(shown)}. Click one to load it.")
        return items, shown, md

    def select_misclassified(self, indices: list[int], evt: gr.SelectData):
        """Misclassified gallery click -> load that test image."""
        return self.load_sample(indices[evt.index])

    # ------------------------------------------------------------ Feature maps

    @_friendly
    def feature_maps(self, image, layer: str, view: str = "channels", scale: str = "group",
                     session: SessionModel | None = None, shown: str = "activation"):
        """(grid image, raw range markdown, per-group stats chart) for one layer; `shown` 'activation' (after BN +
        ReLU, what the next layer receives) or 'conv' (a grouped conv's raw output, before BN)."""
        if image is None:
            raise gr.Error("Upload an image first (or classify one in the Predict tab).")
        sm = self.active(session)
        valid = [v for _, v in layer_dropdown_choices(sm.model)]
        if layer not in valid:
            raise gr.Error(f"Pick a layer from the list ({layer!r} is not a layer of this model).")
        x = data.preprocess(image)
        groups = explain.groups_of(sm.model, layer)
        node, fmap, stats = explain.shown_maps(sm.model, x, layer, before_bn=shown == "conv")
        grid, ranges = visualize.group_grid(explain.split_groups(fmap, groups), scale=scale, view=view)
        title = f"{node}: {groups} group{'s' if groups != 1 else ''} × {fmap.shape[1] // groups} channels, {fmap.shape[2]}×{fmap.shape[3]}"
        md = f"**{title}** — {verdicts.shown_maps_label(node, layer, groups)}; colour scale per {scale}.\n\n```\n{ranges}\n```"
        return grid, md, visualize.group_stats_figure(stats, title=title)

    # ------------------------------------------------------------ Attributions

    @staticmethod
    def method_params(method: str, steps: int, baseline: str, samples: int, noise: float, layer: str | None,
                      window: int, stride: int) -> dict:
        """The UI controls that `method` uses, as explain.attribute keyword arguments."""
        given = {"steps": int(steps), "baseline": baseline, "samples": int(samples), "noise": float(noise),
                 "layer": layer or None, "window": int(window), "stride": int(stride)}
        return {k: v for k, v in given.items() if k in explain.default_params(method)}

    @staticmethod
    def _decode(image) -> tuple[Image.Image, torch.Tensor]:
        """(the 32x32 picture, its normalized tensor), decoding the upload once per request."""
        im32 = data.prepare_image(image)
        return im32, data.normalize(data.pil_to_uint8(im32))

    def _target(self, sm: SessionModel, target: str | None, image) -> int:
        if not target or target == "predicted":
            return predict(sm.model, image, sm.classes).top_index
        if target not in sm.classes:
            raise gr.Error(f"{target!r} is not a class of this model ({', '.join(sm.classes)}).")
        return sm.classes.index(target)

    @staticmethod
    def _faithfulness_md(sm: SessionModel, x: torch.Tensor, values: np.ndarray, target: int) -> str:
        """One line: the map's deletion score against random orders and model-blind maps."""
        f = faithfulness.faithfulness(sm.model, x, [values], target)[0] if np.any(values) else None
        return verdicts.faithfulness_md(f, sm.classes[target])

    def _attr_md(self, a: explain.Attribution, sm: SessionModel, x: torch.Tensor | None = None,
                 signed: bool = True) -> str:
        params = ", ".join(f"{k}={v}" for k, v in a.params.items() if v is not None)
        shown = (f"map range [{float(a.values.min()):.4g}, {float(a.values.max()):.4g}]" if signed else
                 f"shown: |value|, 0 to {float(np.abs(a.values).max()):.4g}")
        md = (f"**{a.method}** for class **{sm.classes[a.target]}** · raw range [{a.raw_min:.4g}, {a.raw_max:.4g}]"
              f" · {shown}" + (f" · {params}" if params else ""))
        if a.note:
            md += f"\n\n**Note:** {a.note}"
        delta = verdicts.attribution_delta_md(a)
        if delta:
            md += "\n\n" + delta
        if x is not None:
            md += "\n\n" + self._faithfulness_md(sm, x, a.values, a.target)
        return md

    @_friendly
    def attribute(self, image, method: str, target: str = "predicted", signed: bool = True, opacity: float = 0.5,
                  steps: int = 32, baseline: str = "black", samples: int = 16, noise: float = 0.15,
                  layer: str | None = None, window: int = 8, stride: int = 4, session: SessionModel | None = None):
        """(overlay image, markdown with target, raw range and any note) for one method."""
        if image is None:
            raise gr.Error("Upload an image first (or classify one in the Predict tab).")
        sm = self.active(session)
        im32, x = self._decode(image)
        t = self._target(sm, target, im32)
        a = explain.attribute(sm.model, x, method, t,
                              **self.method_params(method, steps, baseline, samples, noise, layer, window, stride))
        return visualize.attribution_panels([a], im32, signed=bool(signed), opacity=float(opacity)), \
            self._attr_md(a, sm, x, bool(signed))

    @_friendly
    def compare(self, image, method_a: str, method_b: str, target: str = "predicted", signed: bool = True,
                opacity: float = 0.5, steps: int = 32, baseline: str = "black", samples: int = 16,
                noise: float = 0.15, layer: str | None = None, window: int = 8, stride: int = 4,
                session: SessionModel | None = None):
        """Two methods side by side on the same image and target: (image, markdown)."""
        if image is None:
            raise gr.Error("Upload an image first (or classify one in the Predict tab).")
        sm = self.active(session)
        im32, x = self._decode(image)
        t = self._target(sm, target, im32)
        attrs = [explain.attribute(sm.model, x, m, t, **self.method_params(m, steps, baseline, samples, noise,
                                                                            layer, window, stride))
                 for m in (method_a, method_b)]
        img = visualize.attribution_pair(attrs[0], attrs[1], im32, signed=bool(signed),
                                         opacity=float(opacity))
        return img, "\n\n".join(self._attr_md(a, sm, x, bool(signed)) for a in attrs)

    @staticmethod
    def param_visibility(method: str):
        """Show only the controls that `method` uses (steps, baseline, samples, noise, layer, window, stride)."""
        keys = explain.default_params(method) if method in explain.METHODS else {}
        return tuple(gr.update(visible=k in keys) for k in ("steps", "baseline", "samples", "noise", "layer",
                                                            "window", "stride"))

    # ------------------------------------------------------------ Groups (cardinality)

    @staticmethod
    def _grouped_layer(sm: SessionModel, layer: str | None) -> str:
        """The chosen block's grouped conv, checked against this model (its last block when none is chosen)."""
        convs = list(sm.model.grouped_convs())
        if not layer:
            return convs[-1]
        if layer not in convs:
            raise gr.Error(f"Pick a block from the list ({layer!r} is not a grouped conv of this model).")
        return layer

    @staticmethod
    def _contrast(sm: SessionModel, contrast: str | None, target: int, probs: dict[str, float]) -> int | None:
        """'none' -> None; 'runner-up' -> the most probable other class; else that class."""
        if not contrast or contrast == "none":
            return None
        if contrast == "runner-up":
            return next(sm.classes.index(c) for c in probs if sm.classes.index(c) != target)
        if contrast not in sm.classes:
            raise gr.Error(f"{contrast!r} is not a class of this model.")
        if sm.classes.index(contrast) == target:
            raise gr.Error("The contrast class must differ from the target class.")
        return sm.classes.index(contrast)

    def group_choices(self, layer: str | None, session: SessionModel | None = None):
        """Knock-out checkboxes for the chosen block: one per group, none ticked."""
        if session is None and self.base is None:
            return gr.update()
        sm = self.active(session)
        try:
            g = explain.groups_of(sm.model, self._grouped_layer(sm, layer))
        except gr.Error:
            return gr.update(choices=[], value=[])
        return gr.update(choices=[(f"g{i}", i) for i in range(g)], value=[])

    @_friendly
    def groups(self, image, layer: str, target: str = "predicted", contrast: str = "none",
               method: str = cardinality.GROUP_METHODS[0], mode: str = "zero", session: SessionModel | None = None):
        """Everything about one block's groups for one image: (importance figure, knock-out figure,
        per-group table, group Grad-CAM grid, markdown)."""
        if image is None:
            raise gr.Error("Upload an image first (or classify one in the Predict tab).")
        if method not in cardinality.GROUP_METHODS:
            raise gr.Error(f"Choose a method among {', '.join(cardinality.GROUP_METHODS)}.")
        if mode not in cardinality.ABLATIONS:
            raise gr.Error(f"Choose a knock-out among {', '.join(cardinality.ABLATIONS)}.")
        sm = self.active(session)
        layer = self._grouped_layer(sm, layer)
        im32, x = self._decode(image)
        pred = predict(sm.model, im32, sm.classes)
        t = pred.top_index if not target or target == "predicted" else self._target(sm, target, im32)
        c = self._contrast(sm, contrast, t, pred.probs)
        gi = cardinality.group_importance(sm.model, x, layer, t, method=method, contrast=c)
        ab = cardinality.ablation_ranking(sm.model, x, layer, t, mode)
        cams = cardinality.group_gradcam(sm.model, x, layer, t)
        live = [i for i, cam in enumerate(cams) if cam.any()]  # an empty map has no order to test
        scored = dict(zip(live, faithfulness.faithfulness(sm.model, x, cams[live], t))) if live else {}
        dels = [scored.get(i) for i in range(len(cams))]
        top_after = ab.probs.argmax(1)
        table = pd.DataFrame({
            "group": [f"g{i}" for i in range(len(gi.values))],
            "importance": np.round(gi.values.astype(np.float64), 4),
            # float64 before rounding: a rounded float32 shows as 0.5486000180244446 in the browser
            f"p({sm.classes[t]}) after knock-out": np.round(ab.probs[:, t].astype(np.float64), 4),
            "drop": np.round(ab.drop.astype(np.float64), 4),
            "top-1 after knock-out": [f"{sm.classes[j]} ({ab.probs[i, j]:.2f})" for i, j in enumerate(top_after)],
            "Grad-CAM max": [float(f"{cam.max():.3g}") for cam in cams],
            "deletion drop (random · best model-blind)": [
                f"{d.score:.3f} ({d.random_score:.3f} · {d.best_reference[1]:.3f})" if d else "empty map" for d in dels],
            "faithful?": [verdicts.faithfulness_short(d) for d in dels],
        })
        order = ab.ranking()
        what = f"**{sm.classes[t]}**" + (f" rather than **{sm.classes[c]}**" if c is not None else "")
        g_for, g_against = int(np.argmax(gi.values)), int(np.argmin(gi.values))
        flips = [i for i in range(len(top_after)) if top_after[i] != t]
        md = [f"**{layer}** · {len(gi.values)} groups · explaining {what} · prediction: {pred.top_class} "
              f"({pred.probs[pred.top_class]:.2f})",
              f"**Importance** ({method}): strongest evidence for it **g{g_for}** ({gi.values[g_for]:+.3g}), "
              f"strongest against **g{g_against}** ({gi.values[g_against]:+.3g}); all groups: {gi.total:+.3g}."
              + (f" Here positive means *favours {sm.classes[t]} over {sm.classes[gi.contrast]}*. The groups' total "
                 "is only this block's share of the margin (the shortcut and the other blocks carry the rest), so "
                 "it can be negative while the model prefers the class." if gi.contrast is not None else "")
              + (" " + verdicts.conductance_md(gi, cardinality.CONDUCTANCE_TOL) if gi.shortcut is not None else ""),
              f"**Knock-out** ({mode}, one group at a time): most harmful **g{order[0]}** "
              f"(p {ab.base[t]:.3f} → {ab.probs[order[0], t]:.3f})"
              + (f"; knocking out {', '.join(f'g{i}' for i in flips)} alone changes the top-1 class." if flips
                 else "; no single group changes the top-1 class: the block's paths are redundant for this image."),
              "**Group Grad-CAM**: where each group's evidence lies, on one shared colour scale (faint = weak group). "
              + verdicts.group_cams_md(dels)]
        return (visualize.group_importance_figure(gi, sm.classes), visualize.ablation_figure(ab, sm.classes), table,
                visualize.group_cam_grid(cams, im32), "\n\n".join(md))

    @_friendly
    def knockout(self, image, layer: str, groups: list | None = None, mode: str = "zero", k: int = 3,
                 session: SessionModel | None = None):
        """Live knock-out of the ticked groups: (top-k label, markdown of what changed)."""
        if image is None:
            raise gr.Error("Upload an image first (or classify one in the Predict tab).")
        sm = self.active(session)
        layer = self._grouped_layer(sm, layer)
        groups = sorted(int(g) for g in (groups or []))
        _, x = self._decode(image)
        base = cardinality.ablate_groups(sm.model, x, layer, [], mode)
        probs = cardinality.ablate_groups(sm.model, x, layer, groups, mode)
        top = np.argsort(-probs)[:max(1, int(k))]
        label = {sm.classes[i]: float(probs[i]) for i in top}
        b = int(base.argmax())
        if not groups:
            return label, f"No group knocked out: the model's own prediction ({sm.classes[b]} {base[b]:.3f})."
        a = int(probs.argmax())
        return label, (f"Knocked out {', '.join(f'g{g}' for g in groups)} of {layer} ({mode}): "
                       f"p({sm.classes[b]}) {base[b]:.3f} → {probs[b]:.3f}; top-1 "
                       + (f"stays **{sm.classes[a]}**." if a == b else f"becomes **{sm.classes[a]}** ({probs[a]:.3f})."))

    @_friendly
    def specialization(self, layer: str, session: SessionModel | None = None, progress=gr.Progress()):
        """Group specialization over the test set (computed once per checkpoint, cached on disk):
        (figure, top-9 montage, markdown)."""
        if self.data_source is None:
            raise gr.Error("Group specialization is measured on CIFAR-10 test images. " + NO_DATA_HELP)
        sm = self.active(session)
        layer = self._grouped_layer(sm, layer)
        if tuple(sm.classes[:10]) != data.CLASSES:
            raise gr.Error("Specialization is measured on CIFAR-10: this session's model uses other classes.")
        progress(0, desc=f"group statistics over {specialization.SPECIALIZATION_IMAGES} test images, for this model and "
                         f"{len(specialization.CONTROL_SEEDS)} untrained copies (once per checkpoint)")
        with self._spec_lock:  # two sessions asking at once compute it once
            spec = specialization.specialization_cached(
                sm.model, self.data_source, on_step=lambda i, n, what: progress(i / n, desc=f"step {i + 1}/{n}: {what}"))
        s = spec[layer]
        split = self.test_split()
        if split is None:
            raise gr.Error(self.data_help())
        montage = visualize.image_montage(split[0][torch.as_tensor(s.top_images)],
                                          [f"g{i} {data.CLASSES[int(c)][:5]}" for i, c in enumerate(s.preferred_class)])
        md = (f"**{layer}** over the first {min(specialization.SPECIALIZATION_IMAGES, len(split[1])):,} CIFAR-10 test images "
              f"(class-balanced) of {self.source_label()}, each number next to the same number for "
              f"{len(s.control_gap)} untrained copies of the architecture (random weights, BN statistics from "
              f"training images): what the grouping gives before any training.\n\n"
              + verdicts.specialization_md(s, list(data.CLASSES)))
        return visualize.specialization_figure(s, data.CLASSES), montage, md

    def compare_choices(self) -> list[str]:
        """Checkpoints to compare with: the shared model, the session's, an upload, and every other shipped
        checkpoint (e.g. the interim micro model, the sweep's models), by its path under weights/."""
        shipped = sorted(str(p.relative_to(weights.WEIGHTS_DIR)) for p in
                         [*weights.WEIGHTS_DIR.glob("*.safetensors"), *(weights.WEIGHTS_DIR / "sweep").glob("*.safetensors")]
                         if p != weights.DEFAULT_WEIGHTS and not p.name.endswith(".resume.safetensors"))
        return ["shared model", "this session's model", "uploaded checkpoint"] + shipped

    def _other_model(self, choice: str, file, session: SessionModel | None) -> SessionModel:
        """The model B of a comparison."""
        if choice == "shared model":
            return self.active(None)
        if choice == "this session's model":
            if session is None:
                raise gr.Error("This session uses the shared model: fine-tune one or load a checkpoint first.")
            return session
        if choice == "uploaded checkpoint":
            if not file:
                raise gr.Error("Choose a .safetensors checkpoint to compare with.")
            model, meta = weights.load_checkpoint(file)
            return SessionModel(model, meta, list(meta["classes"]), Path(file).name)
        if choice in self.compare_choices():  # only listed names: never an arbitrary path
            model, meta = weights.load_checkpoint(weights.WEIGHTS_DIR / choice)
            return SessionModel(model, meta, list(meta["classes"]), choice)
        raise gr.Error(f"Unknown model {choice!r}.")

    @_friendly
    def compare_models(self, image, other: str = "shared model", file=None, target: str = "predicted",
                       session: SessionModel | None = None):
        """This session's model (A) vs another (B) on one image: (label A, label B, Grad-CAM A, Grad-CAM B,
        importance A, importance B, markdown). Each model explains its own top class unless a class is chosen."""
        if image is None:
            raise gr.Error("Upload an image first (or classify one in the Predict tab).")
        a, b = self.active(session), self._other_model(other, file, session)
        im32, x = self._decode(image)
        outs, md = [], []
        for tag, sm in (("A", a), ("B", b)):
            pred = predict(sm.model, im32, sm.classes)
            if not target or target == "predicted":
                t = pred.top_index
            elif target in sm.classes:
                t = sm.classes.index(target)
            else:
                raise gr.Error(f"Model {tag} ({sm.name}) has no class {target!r}.")
            layer = list(sm.model.grouped_convs())[-1]
            cam = explain.attribute(sm.model, x, "Grad-CAM", t)
            gi = cardinality.group_importance(sm.model, x, layer, t)
            top = dict(list(pred.probs.items())[:5])
            outs.append((top, visualize.attribution_image(cam, im32, signed=False, opacity=0.6),
                         visualize.group_importance_figure(gi, sm.classes)))
            cfg = sm.model.config
            md.append(f"**{tag}: {sm.name}** — C={cfg.cardinality}, {sum(p.numel() for p in sm.model.parameters()) / 1e6:.2f} M "
                      f"params; top-1 **{pred.top_class}** ({pred.probs[pred.top_class]:.2f}); explaining "
                      f"{sm.classes[t]} at {layer}. " + self._faithfulness_md(sm, x, cam.values, t))
        (la, ca, ga), (lb, cb, gb) = outs
        return la, lb, ca, cb, ga, gb, "\n\n".join(md)

    # ------------------------------------------------------------ Fine-tune

    def stop(self, flag: StopFlag) -> str:
        """Ask this session's running (or queued) fine-tune to stop after the current step."""
        flag.event.set()
        return "Stopping after the current step…"

    @staticmethod
    def arm(flag: StopFlag) -> None:
        """Train click, before the fine-tune is queued: a fresh stop flag that the job will not clear."""
        flag.event.clear()
        flag.armed = True

    @_friendly_gen
    def finetune(self, session: SessionModel | None, flag: StopFlag, cifar_per_class: int, train_layers: str,
                 epochs: int, lr: float, batch_size: int, *uploads):
        """Generator: yields (status, curve DataFrame, result markdown, download path, pending model).

        `uploads` = 10 file lists (one per CIFAR-10 class), then MAX_NEW_CLASSES names, then their file lists.
        Armed by the Train click (see `arm`), a Stop pressed while the job waited in the queue ends it here;
        called without (gradio_client's /finetune), the job starts with a cleared flag.
        """
        armed, flag.armed = flag.armed, False
        if armed and flag.event.is_set():
            yield "Stopped before training started (Stop was pressed while the fine-tune waited in the queue).", \
                None, "", None, None
            return
        sm = self.active(session)
        n_new = finetune.MAX_NEW_CLASSES
        class_files = list(uploads[:len(data.CLASSES)])
        new_names = list(uploads[len(data.CLASSES):len(data.CLASSES) + n_new])
        new_files = list(uploads[len(data.CLASSES) + n_new:len(data.CLASSES) + 2 * n_new])
        names_with_files = [(n or "").strip() for n, f in zip(new_names, new_files) if f]
        if any(not n for n in names_with_files):
            raise gr.Error("Give each new class with images a name.")
        classes = finetune.target_classes(sm.classes, names_with_files)
        files: dict[str, list] = {}
        for name, fl in zip(data.CLASSES, class_files):
            if fl:
                if name not in classes:
                    raise gr.Error(f"This session's model has no class '{name}'.")
                files[name] = list(fl)
        for name, fl in zip(new_names, new_files):
            if fl:
                files[(name or "").strip()] = list(fl)
        ds = None
        if files:
            ds = finetune.build_dataset(files, classes)
        if cifar_per_class and int(cifar_per_class) > 0:
            if self.data_source is None:
                raise gr.Error("No CIFAR-10 images are available on this server: upload your own images instead.")
            if tuple(sm.classes[:10]) != data.CLASSES:
                raise gr.Error("A CIFAR-10 subset needs a model with the CIFAR-10 classes.")
            cifar = finetune.cifar_dataset(self.data_source, int(cifar_per_class))
            cifar.classes = classes
            ds = finetune.merge(ds, cifar)
        if ds is None:
            raise gr.Error("No training images: upload a few images per class, or choose a CIFAR-10 subset.")
        opts = finetune.Options(train_layers=train_layers, epochs=int(epochs), lr=float(lr), batch_size=int(batch_size))
        opts.check()
        if not armed:
            flag.event.clear()
        counts = ", ".join(f"{c}: {n}" for c, n in ds.counts().items() if n)
        yield f"Preparing {len(ds)} images ({counts})…", None, "", None, None
        test = self.test_split() if tuple(classes[:10]) == data.CLASSES else None
        # On ZeroGPU training stops at the estimate the GPU was booked for, so the booking is never overrun.
        limit = self.train_seconds(cifar_per_class, train_layers, epochs, uploads) if on_zero_gpu() else self.max_seconds
        result = None
        for u in finetune.run(sm.model, sm.classes, ds, opts, flag.event, test, limit):
            df = pd.DataFrame(u.curve) if u.curve else None
            if u.kind == "done":
                result = u.result
                break
            yield u.text, df, "", None, None
        if result.stopped and not flag.event.is_set():
            gr.Warning(f"Training reached the {int(limit)} s limit and stopped; the model so far is kept.")
        out_dir = Path(tempfile.mkdtemp(prefix="resnext-finetune-"))
        path = finetune.export(result, out_dir / "resnext-finetuned.safetensors", {**sm.meta, "source_name": sm.name})
        meta = weights.read_metadata(path)
        # From a ZeroGPU worker it goes back pickled, so on the CPU (a CUDA model in a result can hang the transfer)
        model = result.model.cpu() if on_zero_gpu() else result.model
        pending = SessionModel(model, meta, list(result.classes), f"fine-tuned from {sm.name}", str(path))
        yield ("Done. Press **Use this model** to use it in every tab (this session only), or download it.",
               pd.DataFrame(u.curve) if u.curve else None, result.summary(), str(path), pending)

    @staticmethod
    def curve_image(curve: pd.DataFrame | None) -> Image.Image | None:
        """The live fine-tune curve (the /finetune endpoint's table) drawn on two axes, or nothing yet."""
        if curve is None or len(curve) == 0 or "series" not in curve.columns:
            return None
        curve = curve.copy()
        for col in ("epoch", "value"):  # the browser sends the table back as text
            curve[col] = pd.to_numeric(curve[col], errors="coerce")
        return visualize.finetune_curve_figure(curve.dropna(subset=["epoch"]).to_dict("records"))

    def use_model(self, pending: SessionModel | None):
        """Make the last fine-tuned model this session's model: (session, banner)."""
        if pending is None:
            raise gr.Error("Train a model first.")
        return pending, self.model_banner(pending)

    def reset_model(self):
        """Back to the shared base model: (session, banner)."""
        return None, self.model_banner(None)

    @_friendly
    def load_checkpoint(self, file):
        """An uploaded checkpoint becomes this session's model: (session, banner)."""
        if not file:
            raise gr.Error("Choose a .safetensors checkpoint to upload.")
        model, meta = weights.load_checkpoint(file, self.device())  # on ZeroGPU: the CPU of the app's process
        sm = SessionModel(model, meta, list(meta["classes"]), Path(file).name)
        return sm, self.model_banner(sm)

    def model_controls(self, session: SessionModel | None):
        """Layer and class dropdowns that fit the session's model (its layers, its classes): Feature maps
        layer, Grad-CAM layer, attribution target, Groups block, Groups target, Groups contrast, and the
        Predict tab's top-k slider (at most the model's number of classes)."""
        if session is None and self.base is None:
            return (gr.update(),) * 7
        sm = self.active(session)
        layers = layer_dropdown_choices(sm.model)
        blocks = grouped_dropdown_choices(sm.model)
        return (gr.update(choices=layers, value=layers[0][1] if layers else None),
                gr.update(choices=layers, value=layers[-1][1] if layers else None),  # Grad-CAM's default layer
                gr.update(choices=["predicted"] + list(sm.classes), value="predicted"),
                gr.update(choices=blocks, value=blocks[-1][1] if blocks else None),
                gr.update(choices=["predicted"] + list(sm.classes), value="predicted"),
                gr.update(choices=["none", "runner-up"] + list(sm.classes), value="none"),
                gr.update(maximum=len(sm.classes), value=min(3, len(sm.classes))))

    # ------------------------------------------------------------ About

    @staticmethod
    def sweep(path: str | Path = weights.SWEEP_RESULTS):
        """(table update, markdown, accuracy-vs-C plot update) of the shipped cardinality sweep (written by
        `python -m resnext_demo.sweep`); hidden when there is none."""
        p = Path(path)
        view = _sweep_view(str(p), p.stat().st_mtime_ns if p.is_file() else 0)
        if view is None:
            return gr.update(visible=False), "", gr.update(visible=False)
        table, md, figure = view
        return gr.update(value=table, visible=True), md, gr.update(value=figure, visible=True)

    @_friendly
    def about(self, session: SessionModel | None = None, stage: int = 0):
        """(block diagram, equal-budget table, training curve or None, markdown) of the session's model."""
        sm = self.active(session)
        cfg = sm.model.config
        stage = max(0, min(int(stage), len(cfg.depths) - 1))
        diagram = visualize.block_diagram(cfg, stage=stage)
        recipe = (sm.meta.get("recipe") or {}).get("model")
        table = equal_budget_table(cfg, recipe)
        hist = sm.meta.get("history") or []
        curve = visualize.curve_figure(hist) if hist else None
        acc = sm.meta.get("accuracy")
        md = [architecture_text(sm.name, cfg)]
        if isinstance(acc, (int, float)):
            md.append(f"CIFAR-10 test accuracy recorded in the checkpoint: **{100 * acc:.2f} %**"
                      + (f" ({sm.meta['data']['test_images']} images)" if isinstance(sm.meta.get("data"), dict)
                         and sm.meta["data"].get("test_images") else "") + ".")
        if sm.meta.get("command"):
            # paths inside the project as the README writes them (relative), wherever the run happened
            command = re.sub(r"(?<=\s)/\S*?/(runs|weights)/", r"\1/", str(sm.meta["command"]))
            md.append(f"Trained with `{command}`"
                      + (f" on {sm.meta['device']}" if sm.meta.get("device") else "") + ".")
        init = sm.meta.get("init_from")
        if isinstance(init, dict):  # a warm restart: its curve covers this run only
            prev = init.get("accuracy")
            md.append(f"That run started from another checkpoint (sha256 `{str(init.get('sha256'))[:12]}…`"
                      + (f", {init.get('epochs')} epochs, {100 * prev:.2f} %" if isinstance(prev, (int, float)) else "")
                      + "); the curve shows the second run only.")
        if not hist:
            md.append("This checkpoint has no training history.")
        if self.test_split() is not None:
            md.append(f"CIFAR-10 images in this app: {self.source_label()}.")
        return diagram, table, curve, "\n\n".join(md)


# Pass to launch(css=...) (Gradio 6 takes css there): 32x32 pictures are drawn large and with sharp pixels.
CSS = """
#predict-image img, #fm-image img, #at-image img, #gr-image img, #gr-montage img, #predict-seen img {
  image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain;
}
#ft-curve { display: none; }  /* the fine-tune endpoint's table: drawn as #ft-plot instead */
/* Table headers break between words only ("importance", not "importanc e"). */
#gr-table th, #gr-table th *, #ab-sweep th, #ab-sweep th * { word-break: normal !important; overflow-wrap: normal !important; }
"""

GROUPS_TEXT = """
**What no other explainer shows: the C parallel paths of every ResNeXt block.** A block's grouped 3×3
conv splits into C groups; each computes its own transformation and the 1×1 conv after it sums them.
Here you see, for one image, which groups carry the evidence (and which argue against), what happens when
you remove them, where each one looks, and — over the test set — what each group responds to.
"""

ABOUT_TEXT = """
### What a ResNeXt block is
A ResNet bottleneck block maps its input through 1×1 → 3×3 → 1×1 convolutions. ResNeXt (Xie et al.,
2017, *Aggregated Residual Transformations*) splits the middle into **C parallel paths** of **d**
channels each — the *cardinality* C — whose outputs are summed. Implemented as one **grouped 3×3
convolution** (`groups=C`): output channels `[g·d, (g+1)·d)` are computed only from input channels of
group g. The paper's finding: at equal parameters and FLOPs, more groups (larger C, smaller d) beat
a wider single path. The diagram is drawn from the loaded model's config; the table recomputes
parameters and FLOPs for other C×d with the same budget.
"""


def build_demo(model: nn.Module | None, meta: dict | None, data_source: str | None,
               weights_path: str | Path | None = None, load_error: str | None = None,
               max_seconds: float = finetune.MAX_SECONDS) -> gr.Blocks:
    """The whole app; `model` None shows how to get a checkpoint and keeps every tab alive."""
    if on_zero_gpu():
        max_seconds = min(max_seconds, ZERO_GPU_TRAIN_SECONDS)
    h = Handlers(model, meta, data_source, weights_path, load_error, max_seconds)
    test = h.test_split()  # read once, before any ZeroGPU worker is forked (workers then inherit it)
    n_scan = min(MISCLASSIFIED_SLICE, len(test[1])) if test is not None else MISCLASSIFIED_SLICE
    pack = data.is_sample_pack(data_source)
    base_model = h.base.model if h.base else None
    layer_choices = layer_dropdown_choices(base_model)
    grouped_choices = grouped_dropdown_choices(base_model)
    n_groups = explain.groups_of(base_model, grouped_choices[-1][1]) if grouped_choices else 0
    classes = h.base.classes if h.base else list(data.CLASSES)
    heavy = {"concurrency_id": HEAVY, "concurrency_limit": HEAVY_LIMIT}

    with gr.Blocks(title="ResNeXt on CIFAR-10") as demo:
        session = gr.State(None, time_to_live=SESSION_TTL)  # None = the shared model
        pending = gr.State(None, time_to_live=SESSION_TTL, delete_callback=_delete_pending)
        stop_flag = gr.State(StopFlag())
        truth = gr.State(None)
        mis_indices = gr.State([])
        gr.Markdown("# ResNeXt on CIFAR-10\nClassify an image, look inside the grouped convolutions, "
                    "see which pixels mattered, and fine-tune your own copy of the model.")
        banner = gr.Markdown(h.model_banner(None) if h.base else no_weights_help(weights_path, load_error),
                             elem_id="model-banner")

        with gr.Tabs():
            # ---------------------------------------------------------------- Predict
            with gr.Tab("Predict", id="predict"):
                with gr.Row():
                    with gr.Column():
                        image = ImageInput(type="filepath", format="png", sources=["upload", "clipboard", "webcam"],
                                         label="Image (any size; it is centre-cropped and shrunk to 32×32)",
                                         height=320, elem_id="predict-image")
                        # The API accepts k up to a fine-tuned model's class count; the page shows the model's own
                        # (set on load and on every model switch, see model_controls).
                        k = gr.Slider(1, len(classes) + finetune.MAX_NEW_CLASSES, value=3, step=1,
                                      label="Top-k classes shown")
                        with gr.Row():
                            predict_btn = gr.Button("Classify", variant="primary", elem_id="predict-btn")
                            random_btn = gr.Button("Random test image", elem_id="random-btn")
                    with gr.Column():
                        label = gr.Label(label="Prediction", elem_id="predict-label")
                        seen = gr.Image(label="What the model sees (32×32, enlarged)", interactive=False,
                                        format="png", elem_id="predict-seen")
                        info = gr.Markdown(elem_id="predict-info")
                gallery_md = gr.Markdown(NO_DATA_HELP if data_source is None else "Loading CIFAR-10 samples…",
                                         elem_id="gallery-md")
                gallery = gr.Gallery(label="CIFAR-10 test samples (true label in the caption)", columns=10,
                                     visible=data_source is not None,
                                     height=260, allow_preview=False, elem_id="sample-gallery")
                with gr.Accordion("Misclassified examples", open=False):
                    mis_btn = gr.Button(f"Find misclassified images among the first {n_scan} test images")
                    mis_md = gr.Markdown()
                    mis_gallery = gr.Gallery(columns=6, height="auto", allow_preview=False,  # captions fit
                                             label="Misclassified: true → predicted, confidence")
                api_btn = gr.Button(visible=False)  # carries the stable /predict endpoint

            # ---------------------------------------------------------------- Groups
            with gr.Tab("Groups (cardinality)", id="groups"):
                gr.Markdown(GROUPS_TEXT)
                with gr.Row():
                    with gr.Column(scale=1):
                        gr_image = ImageInput(type="filepath", format="png", label="Image", elem_id="gr-image")
                        gr_layer = gr.Dropdown(grouped_choices, value=grouped_choices[-1][1] if grouped_choices else None,
                                               label="Block (its grouped 3×3 conv)", elem_id="gr-layer")
                        gr_target = gr.Dropdown(["predicted"] + list(classes), value="predicted", label="Class explained")
                        gr_contrast = gr.Dropdown(["none", "runner-up"] + list(classes), value="none",
                                                  label="…rather than (counterfactual)",
                                                  info="explain the margin over another class: which groups argue for it?")
                        gr_method = gr.Radio(list(cardinality.GROUP_METHODS), value=cardinality.GROUP_METHODS[0],
                                             label="Importance method",
                                             info="Conductance also measures what flows through the shortcut, with "
                                                  "its convergence error (slower: up to 512 steps)")
                        gr_mode = gr.Radio(list(cardinality.ABLATIONS), value="zero", label="Knock-out",
                                           info="zero = remove the path; mean = keep its average, erase where it fired")
                        gr_btn = gr.Button("Analyse the groups", variant="primary", elem_id="gr-btn")
                    with gr.Column(scale=2):
                        gr_md = gr.Markdown(elem_id="gr-md")
                        gr_importance = gr.Image(label="Group importance (green = for, red = against)",
                                                 interactive=False, elem_id="gr-importance")
                        gr_cams = gr.Image(label="Group-restricted Grad-CAM: where did each group look?",
                                           show_label=False,  # the figure has its title; the badge hid panels'
                                           interactive=False, elem_id="gr-cams")
                        gr_ablation = gr.Image(label="Knock out each group in turn", interactive=False,
                                               elem_id="gr-ablation")
                        gr_table = gr.Dataframe(
                            pd.DataFrame(columns=["group", "importance", "p after knock-out", "drop",
                                                  "top-1 after knock-out", "Grad-CAM max",
                                                  "deletion drop (random · best model-blind)", "faithful?"]),
                            label="Per group: importance, knock-out effect, Grad-CAM, faithfulness",
                            interactive=False, wrap=True, elem_id="gr-table")
                with gr.Accordion("Live knock-out: tick groups to remove them", open=True):
                    with gr.Row():
                        gr_knock = gr.CheckboxGroup(choices=[(f"g{i}", i) for i in range(n_groups)], value=[],
                                                    label="Groups knocked out", elem_id="gr-knock")
                        gr_knock_label = gr.Label(label="Prediction with these groups removed", num_top_classes=3,
                                                  elem_id="gr-knock-label")
                    gr_knock_md = gr.Markdown(elem_id="gr-knock-md")
                with gr.Accordion("Specialization over the test set (once per checkpoint, cached)", open=False):
                    gr_spec_btn = gr.Button("Show group specialization for this block", elem_id="gr-spec-btn",
                                            interactive=data_source is not None)
                    gr_spec_md = gr.Markdown(NO_DATA_HELP if data_source is None else "", elem_id="gr-spec-md")
                    gr_spec = gr.Image(label="Class preference, correlation between groups, colour vs shape",
                                       interactive=False, elem_id="gr-spec")
                    gr_montage = gr.Image(label="The 9 test images that most activate each group", interactive=False,
                                          elem_id="gr-montage")
                with gr.Accordion("Compare checkpoints on this image", open=False):
                    with gr.Row():
                        cmp_other = gr.Dropdown(h.compare_choices(), value="shared model",
                                                label="Model B (model A = the one this session uses)", elem_id="cmp-other")
                        cmp_file = gr.File(label="Checkpoint B (.safetensors), for 'uploaded checkpoint'",
                                           file_count="single", file_types=[".safetensors"], height=100)
                        cmp_btn = gr.Button("Compare", elem_id="cmp-btn")
                    cmp_md = gr.Markdown(elem_id="cmp-md")
                    with gr.Row():
                        cmp_label_a = gr.Label(label="A: prediction", num_top_classes=5)
                        cmp_label_b = gr.Label(label="B: prediction", num_top_classes=5)
                    with gr.Row():
                        cmp_cam_a = gr.Image(label="A: Grad-CAM (last stage)", interactive=False)
                        cmp_cam_b = gr.Image(label="B: Grad-CAM (last stage)", interactive=False)
                    with gr.Row():
                        cmp_gi_a = gr.Image(label="A: group importance (last block)", interactive=False)
                        cmp_gi_b = gr.Image(label="B: group importance (last block)", interactive=False)

            # ---------------------------------------------------------------- Feature maps
            with gr.Tab("Feature maps (per group)", id="features"):
                gr.Markdown("A grouped 3×3 conv with C groups: output channels `[g·w, (g+1)·w)` come only from "
                            "group g's inputs. Each panel is one group. Stage outputs are shown ungrouped for comparison.")
                with gr.Row():
                    with gr.Column(scale=1):
                        fm_image = ImageInput(type="filepath", format="png", label="Image", elem_id="fm-image")
                        fm_layer = gr.Dropdown(choices=layer_choices, value=layer_choices[0][1] if layer_choices else None,
                                               label="Layer", elem_id="fm-layer")
                        fm_view = gr.Radio(["channels", "summary"], value="channels", label="View",
                                           info="each group's channels, or one summary map per group")
                        fm_scale = gr.Radio(["channel", "group", "layer"], value="group", label="Colour scale per")
                        fm_shown = gr.Radio([("after BN + ReLU (what the next layer receives)", "activation"),
                                             ("conv output, before BN", "conv")], value="activation",
                                            label="Grouped conv shown", elem_id="fm-shown")
                        fm_btn = gr.Button("Show feature maps", variant="primary", elem_id="fm-btn")
                    with gr.Column(scale=2):
                        fm_grid = gr.Image(label="Feature maps by group", interactive=False, elem_id="fm-grid")
                        fm_md = gr.Markdown()
                        fm_stats = gr.Image(label="Per-group statistics", interactive=False, elem_id="fm-stats")

            # ---------------------------------------------------------------- Attributions
            with gr.Tab("Attributions", id="attributions"):
                with gr.Row():
                    with gr.Column(scale=1):
                        at_image = ImageInput(type="filepath", format="png", label="Image", elem_id="at-image")
                        at_method = gr.Dropdown(list(explain.METHODS), value=explain.METHODS[0], label="Method",
                                                elem_id="at-method")
                        at_target = gr.Dropdown(["predicted"] + list(classes), value="predicted", label="Target class")
                        with gr.Row():
                            at_signed = gr.Checkbox(value=True, label="Signed (red +, blue −); off = absolute")
                            at_opacity = gr.Slider(0, 1, value=0.5, step=0.05, label="Overlay opacity")
                        with gr.Accordion("Parameters", open=True):
                            at_steps = gr.Slider(4, 128, value=32, step=1, label="Steps (Integrated Gradients)")
                            at_baseline = gr.Dropdown(list(explain.BASELINES), value="black",
                                                      label="Baseline (IG, DeepLift, Occlusion)")
                            at_samples = gr.Slider(2, 64, value=16, step=1, label="Samples (SmoothGrad)", visible=False)
                            at_noise = gr.Slider(0.0, 1.0, value=0.15, step=0.01, label="Noise level (SmoothGrad)",
                                                 visible=False)
                            at_layer = gr.Dropdown([(lbl, v) for lbl, v in layer_choices],
                                                   value=layer_choices[-1][1] if layer_choices else None,
                                                   label="Layer (Grad-CAM; the last stage unless you choose)",
                                                   visible=False)
                            at_window = gr.Slider(2, 16, value=8, step=1, label="Window (Occlusion)", visible=False)
                            at_stride = gr.Slider(1, 16, value=4, step=1, label="Stride (Occlusion)", visible=False)
                        at_btn = gr.Button("Explain", variant="primary", elem_id="at-btn")
                        with gr.Row():
                            at_method_b = gr.Dropdown(list(explain.METHODS), value="Grad-CAM", label="Compare with")
                            at_cmp_btn = gr.Button("Compare side by side", elem_id="at-cmp-btn")
                    with gr.Column(scale=3):  # wide: three ~280 px panels per method (image | map | overlay)
                        at_out = gr.Image(label="Attribution", show_label=False, interactive=False, elem_id="at-out")
                        at_md = gr.Markdown(elem_id="at-md")
                        at_cmp = gr.Image(label="Comparison", show_label=False, interactive=False, elem_id="at-cmp")
                        at_cmp_md = gr.Markdown()

            # ---------------------------------------------------------------- Fine-tune
            with gr.Tab("Fine-tune", id="finetune"):
                gr.Markdown(
                    f"Train **your own copy** of the model on your images (nobody else sees it). Drop a few images "
                    f"per class; {int(100 * finetune.HOLDOUT_FRACTION)} % of each class is held out to score it "
                    f"before and after. **Limits:** {finetune.MAX_IMAGES} images, {finetune.MAX_EPOCHS} epochs, "
                    f"{int(max_seconds)} s of training, batch ≤ {finetune.MAX_BATCH_SIZE}, "
                    f"{finetune.MAX_NEW_CLASSES} new classes (a new class replaces the head; old classes keep their weights).")
                zones = []
                for row in (data.CLASSES[:5], data.CLASSES[5:]):
                    with gr.Row():
                        for c in row:
                            zones.append(gr.File(file_count="multiple", file_types=["image"], label=c, height=120,
                                                 elem_id=f"zone-{c}"))
                new_names, new_zones = [], []
                with gr.Accordion("New classes (optional)", open=False):
                    with gr.Row():
                        for i in range(finetune.MAX_NEW_CLASSES):
                            with gr.Column():
                                new_names.append(gr.Textbox(label=f"New class {i + 1} name", elem_id=f"new-name-{i}"))
                                new_zones.append(gr.File(file_count="multiple", file_types=["image"], height=120,
                                                         label=f"New class {i + 1} images", elem_id=f"new-zone-{i}"))
                with gr.Row():
                    ft_cifar = gr.Slider(0, max(1, h.cifar_subset_max()), value=0, step=1,
                                         label="…and/or CIFAR-10 images (per class, 0 = none)" + (
                                             ": test images of the sample pack set aside for this, never scored"
                                             if pack else ": a subset of the training split"),
                                         interactive=data_source is not None)
                    ft_layers = gr.Radio(list(finetune.TRAIN_LAYERS), value="head", label="What to train",
                                         info="head = classifier only; last_stage = layer3 + head; all = every layer")
                with gr.Row():
                    ft_epochs = gr.Slider(1, finetune.MAX_EPOCHS, value=3, step=1, label="Epochs", elem_id="ft-epochs")
                    ft_lr = gr.Number(value=0.01, label="Learning rate", minimum=1e-5, maximum=1.0, elem_id="ft-lr")
                    ft_bs = gr.Slider(1, finetune.MAX_BATCH_SIZE, value=32, step=1, label="Batch size")
                with gr.Row():
                    ft_train = gr.Button("Train", variant="primary", elem_id="ft-train")
                    ft_stop = gr.Button("Stop", variant="stop", elem_id="ft-stop")
                ft_status = gr.Markdown(elem_id="ft-status")
                # The API returns the curve as a table (ft_curve); the page draws it on two axes (ft_plot). The
                # table is rendered but hidden by CSS: an unrendered component fires no change event.
                ft_plot = gr.Image(label="Loss and accuracy", show_label=False, interactive=False, elem_id="ft-plot")
                ft_curve = gr.Dataframe(interactive=False, elem_id="ft-curve")
                ft_result = gr.Markdown(elem_id="ft-result")
                with gr.Row():
                    ft_use = gr.Button("Use this model (this session only)", elem_id="ft-use")
                    ft_reset = gr.Button("Back to the shared model")
                    ft_download = gr.DownloadButton("Download fine-tuned checkpoint (.safetensors)", value=None,
                                                    elem_id="ft-download")
                ft_ckpt = gr.File(label="Continue from an exported checkpoint (.safetensors)", file_count="single",
                                  elem_id="ft-ckpt")

            # ---------------------------------------------------------------- About
            with gr.Tab("About the architecture", id="about"):
                gr.Markdown(ABOUT_TEXT)
                ab_md = gr.Markdown(elem_id="ab-md")
                ab_stage = gr.Slider(0, max(1, len(base_model.config.depths) - 1) if base_model else 2, value=0, step=1,
                                     label="Stage (0-based) drawn")
                ab_diagram = gr.Image(label="One block of the loaded model", show_label=False,  # titled figure
                                      interactive=False, elem_id="ab-diagram")
                with gr.Row():
                    ab_table = gr.Dataframe(label="Same budget, other cardinalities (computed by the code)",
                                            interactive=False, wrap=True)
                    ab_curve = gr.Image(label="Training curve of the loaded checkpoint", interactive=False,
                                        elem_id="ab-curve")
                ab_sweep_md = gr.Markdown()
                ab_sweep = gr.Dataframe(label="Cardinality sweep results", interactive=False, visible=False,
                                        elem_id="ab-sweep")
                ab_sweep_plot = gr.Image(label="Accuracy vs cardinality at one budget", interactive=False,
                                         visible=False, elem_id="ab-sweep-plot")
                ab_btn = gr.Button("Refresh", elem_id="ab-btn")

        # ---------------------------------------------------------------- events
        full_outputs = [label, seen, info]
        # model-running handlers: on ZeroGPU each books a GPU for its duration (none when it needs no model)
        gpu = functools.partial(_gpu, before=h.use_gpu)
        quick, slow = _if_image(GPU_SECONDS_QUICK), _if_image(GPU_SECONDS)
        predict_full, auto_predict, predict_label = gpu(h.predict_full, quick), gpu(h.auto_predict, quick), \
            gpu(h.predict_label, quick)
        misclassified, feature_maps = gpu(h.misclassified, h.misclassified_seconds), gpu(h.feature_maps, slow)
        attribute, compare = gpu(h.attribute, slow), gpu(h.compare, slow)
        train = gpu(h.finetune, h.finetune_seconds)
        predict_btn.click(predict_full, [image, k, session, truth], full_outputs, api_name="classify", **heavy)
        # any user change (upload, paste, webcam snapshot, clear) forgets the sample's true label and re-predicts
        image.input(lambda: None, None, truth, api_visibility="private", queue=False) \
            .then(auto_predict, [image, k, session, truth], full_outputs, api_visibility="private", **heavy)
        api_btn.click(predict_label, [image, k, session], label, api_name="predict", **heavy,
                      api_description="Classify one image: image file in, the top-k {class: probability} out "
                                      "(k defaults to 3). Stable endpoint for gradio_client.")
        # one input image for the three analysis tabs: copy it over whenever it changes
        image.change(h.share_image, image, [gr_image, fm_image, at_image], api_visibility="private", queue=False)
        random_btn.click(h.random_sample, None, [image, truth], api_name="random_sample") \
            .then(predict_full, [image, k, session, truth], full_outputs, api_visibility="private", **heavy)
        gallery.select(h.select_sample, None, [image, truth], api_visibility="private") \
            .then(predict_full, [image, k, session, truth], full_outputs, api_visibility="private", **heavy)
        mis_btn.click(misclassified, session, [mis_gallery, mis_indices, mis_md], api_name="misclassified", **heavy)
        mis_gallery.select(h.select_misclassified, mis_indices, [image, truth], api_visibility="private") \
            .then(predict_full, [image, k, session, truth], full_outputs, api_visibility="private", **heavy)
        if data_source is not None:
            demo.load(h.sample_gallery, None, [gallery, gallery_md], api_visibility="private")

        groups, knockout = gpu(h.groups, slow), gpu(h.knockout, quick)
        specialization, compare_models = gpu(h.specialization, h.specialization_seconds), gpu(h.compare_models, slow)
        gr_btn.click(groups, [gr_image, gr_layer, gr_target, gr_contrast, gr_method, gr_mode, session],
                     [gr_importance, gr_ablation, gr_table, gr_cams, gr_md], api_name="groups", **heavy)
        gr_layer.change(h.group_choices, [gr_layer, session], gr_knock, api_visibility="private", queue=False)
        gr_knock.change(knockout, [gr_image, gr_layer, gr_knock, gr_mode, k, session], [gr_knock_label, gr_knock_md],
                        api_name="knockout", trigger_mode="always_last", **heavy)
        gr_spec_btn.click(specialization, [gr_layer, session], [gr_spec, gr_montage, gr_spec_md],
                          api_name="specialization", **heavy)
        cmp_btn.click(compare_models, [gr_image, cmp_other, cmp_file, gr_target, session],
                      [cmp_label_a, cmp_label_b, cmp_cam_a, cmp_cam_b, cmp_gi_a, cmp_gi_b, cmp_md],
                      api_name="compare_models", **heavy)

        fm_inputs = [fm_image, fm_layer, fm_view, fm_scale, session, fm_shown]
        fm_btn.click(feature_maps, fm_inputs, [fm_grid, fm_md, fm_stats], api_name="feature_maps", **heavy)

        at_params = [at_steps, at_baseline, at_samples, at_noise, at_layer, at_window, at_stride]
        at_method.change(h.param_visibility, at_method, at_params, api_visibility="private", queue=False)
        at_btn.click(attribute, [at_image, at_method, at_target, at_signed, at_opacity, *at_params, session],
                     [at_out, at_md], api_name="attribute", **heavy)
        at_cmp_btn.click(compare, [at_image, at_method, at_method_b, at_target, at_signed, at_opacity, *at_params,
                                   session], [at_cmp, at_cmp_md], api_name="compare", **heavy)

        ft_inputs = [session, stop_flag, ft_cifar, ft_layers, ft_epochs, ft_lr, ft_bs, *zones, *new_names, *new_zones]
        # arm the stop flag at the click (unqueued), so a Stop pressed while the job waits in the queue counts
        ft_train.click(h.arm, stop_flag, None, api_visibility="private", queue=False) \
            .then(train, ft_inputs, [ft_status, ft_curve, ft_result, ft_download, pending],
                  api_name="finetune", concurrency_id=TRAIN_POOL, concurrency_limit=TRAIN_LIMIT)
        ft_stop.click(h.stop, stop_flag, ft_status, api_name="stop", queue=False)
        ft_curve.change(h.curve_image, ft_curve, ft_plot, api_visibility="private", queue=False)
        controls = [fm_layer, at_layer, at_target, gr_layer, gr_target, gr_contrast, k]
        ft_use.click(h.use_model, pending, [session, banner], api_name="use_model") \
            .success(h.model_controls, session, controls, api_visibility="private")
        ft_reset.click(h.reset_model, None, [session, banner], api_name="reset_model") \
            .success(h.model_controls, session, controls, api_visibility="private")
        ft_ckpt.upload(h.load_checkpoint, ft_ckpt, [session, banner], api_name="load_checkpoint") \
            .success(h.model_controls, session, controls, api_visibility="private")

        demo.load(lambda: gr.update(maximum=len(classes)), None, k, api_visibility="private", queue=False)
        demo.load(h.sweep, None, [ab_sweep, ab_sweep_md, ab_sweep_plot], api_visibility="private")
        ab_outputs = [ab_diagram, ab_table, ab_curve, ab_md]
        ab_btn.click(h.about, [session, ab_stage], ab_outputs, api_name="about")
        ab_stage.release(h.about, [session, ab_stage], ab_outputs, api_visibility="private")
        if h.base is not None:
            demo.load(h.about, [session, ab_stage], ab_outputs, api_visibility="private")

    demo.queue(max_size=QUEUE_MAX, default_concurrency_limit=HEAVY_LIMIT)
    demo.handlers = h  # for tests and the screenshot script
    return demo
