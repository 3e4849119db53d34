"""The app's event handlers: convert Gradio values, call the package, return what the views show.

`Handlers` holds what every session shares read-only (the base model, its metadata, the data source).
Per-session things come in as arguments from `gr.State`: the model this session uses (None = the shared base
model, never mutated), a freshly fine-tuned model waiting for "use this model", and a stop flag. The words and
tables come from `report`; `ui` lays out the tabs and wires these handlers to them through `serving`.
"""
from __future__ import annotations

import functools
import tempfile
import threading
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from PIL import Image

from . import data, explain, faithfulness, finetune, report, specialization, visualize, weights
from . import groups as cardinality  # not 'groups': knockout()'s argument of that name would shadow the module
from .model import count_params, device_of
from .predict import predict, predict_batch
from .serving import (FINETUNE_GPU_MARGIN, FINETUNE_MIN_SECONDS, GPU_SECONDS, SPECIALIZATION_GPU_SECONDS,
                      TRAIN_SECONDS_PER_IMAGE, PredictBatcher, SessionModel, StopFlag, friendly, friendly_gen,
                      on_zero_gpu, require_image)

N_SAMPLES = 20  # sample gallery: two test images per class
MISCLASSIFIED_SLICE = 500  # test images scanned for the "misclassified examples" view
MISCLASSIFIED_SHOW = 24
DISPLAY = 224  # side of upscaled 32x32 images


def _upscale(im: Image.Image, size: int = DISPLAY) -> Image.Image:
    """Nearest-neighbour upscale so each of the 32x32 pixels stays visible."""
    return visualize.upscale(im, size)


def _to_pil32(x: torch.Tensor) -> Image.Image:
    """3 x 32 x 32 uint8 tensor -> PIL image."""
    return Image.fromarray(x.permute(1, 2, 0).numpy())


def layer_dropdown_choices(model: nn.Module | None) -> list[tuple[str, str]]:
    """(label, value) pairs: grouped convs first, then the stem and stage outputs."""
    if model is None:
        return []
    ch = explain.layer_choices(model)
    return [(report.layer_label(n, explain.groups_of(model, n)), n) for n in ch["grouped"]] + \
           [(report.layer_label(n, None), n) for n in ch["stages"]]


def grouped_dropdown_choices(model: nn.Module | None) -> list[tuple[str, str]]:
    """(label, value) for every block's grouped conv (the Groups tab's block list)."""
    if model is None:
        return []
    return [(report.layer_label(n, explain.groups_of(model, n)), n) for n in model.grouped_convs()]


@functools.lru_cache(maxsize=4)
def _sweep_view(path: str, mtime_ns: int) -> tuple[pd.DataFrame, str, Image.Image] | None:
    """The About tab's sweep table, words and plot, built once per results file (it runs on every page load;
    `mtime_ns` makes a rewritten file a new entry)."""
    results = report.read_sweep(path)
    if results is None:
        return None
    return report.sweep_table(results), report.sweep_md(results), visualize.sweep_figure(results)


def _split_uploads(uploads: tuple) -> tuple[list, list, list]:
    """The Fine-tune tab's upload inputs -> (files per CIFAR class, new class names, new classes' files)."""
    n_old, n_new = len(data.CLASSES), finetune.MAX_NEW_CLASSES
    return (list(uploads[:n_old]), list(uploads[n_old:n_old + n_new]),
            list(uploads[n_old + n_new:n_old + 2 * n_new]))


def _n_heldin(sm: SessionModel) -> int:
    """How many held-in images the session model's unfamiliar-image threshold was fitted on."""
    fam = getattr(sm.model, "familiarity", None)
    return len(fam.heldin) if fam is not None else 0


class Handlers:
    """Every event handler of the app; shared read-only state only (per-session state comes in as args)."""

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
        self._spec_lock = threading.Lock()

    # ------------------------------------------------------------ shared helpers

    def active(self, session: SessionModel | None) -> SessionModel:
        """The session's model (fine-tuned or uploaded) or the shared base model, on the device models run on."""
        if session is not None:
            device = self.device()
            if device_of(session.model) != device:  # in a ZeroGPU worker: it arrives on the CPU
                session.model.to(device)  # in place: the worker holds its own pickled copy
            return session
        if self.base is None:
            raise gr.Error(self.no_model_help().replace("**", ""), duration=None)
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

    @staticmethod
    def _decode(image) -> tuple[Image.Image, torch.Tensor]:
        """(the 32x32 picture, its normalized tensor), decoding the upload once per request."""
        im32 = data.prepare_image(image)
        return im32, data.normalize(data.pil_to_uint8(im32))

    @staticmethod
    def _cifar_model(sm: SessionModel, what: str) -> None:
        """Views measured on CIFAR-10 need a model with its classes."""
        if tuple(sm.classes[:10]) != data.CLASSES:
            raise gr.Error(what)

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

    # ------------------------------------------------------------ Predict

    @friendly
    def predict_label(self, image, k: int = 3, session: SessionModel | None = None) -> dict[str, float]:
        """API /predict: image in, top-k {class: probability} out."""
        require_image(image, "Upload an image first.")
        sm = self.active(session)
        p = self.batcher.predict(sm.model, image, sm.classes)
        return dict(list(p.probs.items())[:max(1, int(k))])

    @friendly
    def predict_full(self, image, k: int = 3, session: SessionModel | None = None, truth: dict | None = None):
        """Predict tab: (top-k label dict, the 32x32 the model sees upscaled, markdown with time/device/truth)."""
        require_image(image, "Upload an image, paste one, use the webcam, or pick a sample.")
        sm = self.active(session)
        p = self.batcher.predict(sm.model, image, sm.classes)
        return (dict(list(p.probs.items())[:max(1, int(k))]), _upscale(p.image32),
                report.prediction_md(p, truth, _n_heldin(sm)))

    @friendly
    def predict_details(self, image, session: SessionModel | None = None) -> dict:
        """API /predict_details: every class's calibrated probability, the temperature, and the unfamiliar-image
        flag with its score, threshold and rarity (None where the checkpoint has no detector)."""
        require_image(image, "Upload an image first.")
        sm = self.active(session)
        p = self.batcher.predict(sm.model, image, sm.classes)
        fam = getattr(sm.model, "familiarity", None)
        return {"top_class": p.top_class, "probabilities": p.probs, "temperature": p.temperature,
                "unfamiliar": p.unfamiliar if fam is not None else None, "score": p.score,
                "threshold": fam.threshold if fam is not None else None, "rarity": p.rarity}

    def _unfamiliar_note(self, sm: SessionModel, im32) -> str:
        """The explanation tabs' one-line warning when their image is unfamiliar ("" otherwise)."""
        return report.unfamiliar_note(predict(sm.model, im32, sm.classes), _n_heldin(sm))

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
        return gr.Gallery(value=items, visible=True), report.gallery_md(len(items), self.source_label())

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

    @friendly
    def misclassified(self, session: SessionModel | None = None, progress=gr.Progress()):
        """Misclassified images among the first MISCLASSIFIED_SLICE test images: (gallery, indices, markdown)."""
        split = self.test_split()
        if split is None:
            return [], [], self.data_help()
        sm = self.active(session)
        self._cifar_model(sm, "This session's model does not use the CIFAR-10 classes, so CIFAR-10 errors are not "
                              "defined.")
        x, y = split[0][:MISCLASSIFIED_SLICE], split[1][:MISCLASSIFIED_SLICE]
        progress(0, desc=f"classifying {len(y)} test images")
        probs = predict_batch(sm.model, x)
        pred = probs.argmax(1)
        wrong = torch.nonzero(pred != y).flatten().tolist()
        shown = wrong[:MISCLASSIFIED_SHOW]
        items = [(_upscale(_to_pil32(x[i]), 96), report.misclassified_caption(
                  data.CLASSES[int(y[i])], sm.classes[int(pred[i])], float(probs[i, pred[i]]))) for i in shown]
        return items, shown, report.misclassified_md(len(wrong), len(y), len(shown))

    def select_misclassified(self, indices: list[int], evt: gr.SelectData):
        """Misclassified gallery click -> load that test image."""
        return self.load_sample(indices[evt.index])

    # ------------------------------------------------------------ Feature maps

    @friendly
    def feature_maps(self, image, layer: str, view: str = "channels", scale: str = "group",
                     session: SessionModel | None = None, shown: str = "activation"):
        """(grid image, raw range markdown, per-group stats chart) for one layer; `shown` 'activation' (after BN +
        ReLU, what the next layer receives) or 'conv' (a grouped conv's raw output, before BN)."""
        require_image(image)
        sm = self.active(session)
        valid = [v for _, v in layer_dropdown_choices(sm.model)]
        if layer not in valid:
            raise gr.Error(f"Pick a layer from the list ({layer!r} is not a layer of this model).")
        x = data.preprocess(image)
        groups = explain.groups_of(sm.model, layer)
        node, fmap, stats = explain.shown_maps(sm.model, x, layer, before_bn=shown == "conv")
        grid, ranges = visualize.group_grid(explain.split_groups(fmap, groups), scale=scale, view=view)
        title = report.feature_maps_title(node, groups, tuple(fmap.shape))
        note = self._unfamiliar_note(sm, image)
        return grid, note + report.feature_maps_md(title, node, layer, groups, scale, ranges), \
            visualize.group_stats_figure(stats, title=title)

    # ------------------------------------------------------------ Attributions

    @staticmethod
    def method_params(method: str, steps: int, baseline: str, samples: int, noise: float, layer: str | None,
                      window: int, stride: int) -> dict:
        """The UI controls that `method` uses, as explain.attribute keyword arguments."""
        given = {"steps": int(steps), "baseline": baseline, "samples": int(samples), "noise": float(noise),
                 "layer": layer or None, "window": int(window), "stride": int(stride)}
        return {k: v for k, v in given.items() if k in explain.default_params(method)}

    def _target(self, sm: SessionModel, target: str | None, image) -> int:
        if not target or target == "predicted":
            return predict(sm.model, image, sm.classes).top_index
        if target not in sm.classes:
            raise gr.Error(f"{target!r} is not a class of this model ({', '.join(sm.classes)}).")
        return sm.classes.index(target)

    @staticmethod
    def _faithfulness(sm: SessionModel, x: torch.Tensor, values: np.ndarray, target: int):
        """The map's deletion score against random orders and model-blind maps (None for an empty map)."""
        return faithfulness.faithfulness(sm.model, x, [values], target)[0] if np.any(values) else None

    def _attributions(self, sm: SessionModel, image, methods: tuple[str, ...], target: str | None, params: tuple):
        """(32x32 picture, input tensor, one explain.Attribution per method) for one image and target."""
        im32, x = self._decode(image)
        t = self._target(sm, target, im32)
        return im32, x, [explain.attribute(sm.model, x, m, t, **self.method_params(m, *params)) for m in methods]

    def _attr_md(self, a: explain.Attribution, sm: SessionModel, x: torch.Tensor, signed: bool) -> str:
        return report.attribution_md(a, sm.classes, signed, self._faithfulness(sm, x, a.values, a.target))

    @friendly
    def attribute(self, image, method: str, target: str = "predicted", signed: bool = True, opacity: float = 0.5,
                  steps: int = 32, baseline: str = "black", samples: int = 16, noise: float = 0.15,
                  layer: str | None = None, window: int = 8, stride: int = 4, session: SessionModel | None = None):
        """(overlay image, markdown with target, raw range and any note) for one method."""
        require_image(image)
        sm = self.active(session)
        im32, x, (a,) = self._attributions(sm, image, (method,), target,
                                           (steps, baseline, samples, noise, layer, window, stride))
        return visualize.attribution_panels([a], im32, signed=bool(signed), opacity=float(opacity)), \
            self._unfamiliar_note(sm, im32) + self._attr_md(a, sm, x, bool(signed))

    @friendly
    def compare(self, image, method_a: str, method_b: str, target: str = "predicted", signed: bool = True,
                opacity: float = 0.5, steps: int = 32, baseline: str = "black", samples: int = 16,
                noise: float = 0.15, layer: str | None = None, window: int = 8, stride: int = 4,
                session: SessionModel | None = None):
        """Two methods side by side on the same image and target: (image, markdown)."""
        require_image(image)
        sm = self.active(session)
        im32, x, attrs = self._attributions(sm, image, (method_a, method_b), target,
                                            (steps, baseline, samples, noise, layer, window, stride))
        img = visualize.attribution_pair(attrs[0], attrs[1], im32, signed=bool(signed), opacity=float(opacity))
        return img, self._unfamiliar_note(sm, im32) + "\n\n".join(self._attr_md(a, sm, x, bool(signed)) for a in attrs)

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

    @friendly
    def groups(self, image, layer: str, target: str = "predicted", contrast: str = "none",
               method: str = cardinality.GROUP_METHODS[0], mode: str = "zero", session: SessionModel | None = None,
               progress=gr.Progress()):
        """Everything about one block's groups for one image: (importance figure, knock-out figure,
        per-group table, group Grad-CAM grid, markdown); the page names each analysis as it runs."""
        require_image(image)
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
        a = cardinality.analyse_groups(sm.model, x, layer, t, method, c, mode,
                                       on_step=lambda fraction, what: progress(fraction, desc=what))
        gi, ab, cams, dels = a.importance, a.ablation, a.cams, a.deletions
        progress(0.9, desc="drawing")
        md = report.unfamiliar_note(pred, _n_heldin(sm)) + report.groups_md(
            layer, pred, gi, ab, dels, sm.classes, t, c, method, mode, cardinality.CONDUCTANCE_TOL)
        return (visualize.group_importance_figure(gi, sm.classes), visualize.ablation_figure(ab, sm.classes),
                report.groups_table(gi, ab, cams, dels, sm.classes, t), visualize.group_cam_grid(cams, im32), md)

    @friendly
    def knockout(self, image, layer: str, groups: list | None = None, mode: str = "zero", k: int = 3,
                 session: SessionModel | None = None):
        """Live knock-out of the ticked groups: (top-k label, markdown of what changed)."""
        require_image(image)
        sm = self.active(session)
        layer = self._grouped_layer(sm, layer)
        groups = sorted(int(g) for g in (groups or []))
        _, x = self._decode(image)
        base = cardinality.ablate_groups(sm.model, x, layer, [], mode)
        probs = cardinality.ablate_groups(sm.model, x, layer, groups, mode)
        label = {sm.classes[i]: float(probs[i]) for i in np.argsort(-probs)[:max(1, int(k))]}
        return label, report.knockout_md(layer, groups, mode, base, probs, sm.classes)

    @friendly
    def specialization(self, layer: str, session: SessionModel | None = None, progress=gr.Progress()):
        """Group specialization over the test set (computed once per checkpoint, cached on disk):
        (figure, top-9 montage, markdown)."""
        if self.data_source is None:
            raise gr.Error("Group specialization is measured on CIFAR-10 test images. " + report.NO_DATA_HELP)
        sm = self.active(session)
        layer = self._grouped_layer(sm, layer)
        self._cifar_model(sm, "Specialization is measured on CIFAR-10: this session's model uses other classes.")
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
        md = report.specialization_md(layer, s, min(specialization.SPECIALIZATION_IMAGES, len(split[1])), self.source_label())
        return visualize.specialization_figure(s, data.CLASSES), montage, md

    def compare_choices(self) -> list[str]:
        """Checkpoints to compare with: the shared model, the session's, an upload, and every other shipped
        checkpoint (e.g. the interim micro model, the sweep's models), by its path under weights/."""
        shipped = sorted(str(p.relative_to(weights.WEIGHTS_DIR)) for p in
                         [*weights.WEIGHTS_DIR.glob("*.safetensors"), *(weights.WEIGHTS_DIR / "sweep").rglob("*.safetensors")]
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

    def _compare_one(self, tag: str, sm: SessionModel, im32: Image.Image, x: torch.Tensor, target: str | None):
        """One side of a checkpoint comparison: (top-5 label, Grad-CAM image, group importance figure, markdown)."""
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
        md = report.compare_md(tag, sm.name, sm.model.config.cardinality, count_params(sm.model), pred,
                               sm.classes[t], layer, self._faithfulness(sm, x, cam.values, t))
        return (dict(list(pred.probs.items())[:5]), visualize.attribution_image(cam, im32, signed=False, opacity=0.6),
                visualize.group_importance_figure(gi, sm.classes), md)

    @friendly
    def compare_models(self, image, other: str = "shared model", file=None, target: str = "predicted",
                       session: SessionModel | None = None):
        """This session's model (A) vs another (B) on one image: (label A, label B, Grad-CAM A, Grad-CAM B,
        importance A, importance B, markdown). Each model explains its own top class unless a class is chosen."""
        require_image(image)
        a, b = self.active(session), self._other_model(other, file, session)
        im32, x = self._decode(image)
        (la, ca, ga, ma), (lb, cb, gb, mb) = (self._compare_one(tag, sm, im32, x, target)
                                              for tag, sm in (("A", a), ("B", b)))
        return la, lb, ca, cb, ga, gb, f"{ma}\n\n{mb}"

    # ------------------------------------------------------------ Fine-tune

    def stop(self, flag: StopFlag) -> str:
        """Ask this session's running (or queued) fine-tune to stop after the current step."""
        flag.event.set()
        return report.FINETUNE_STOPPING

    @staticmethod
    def arm(flag: StopFlag) -> None:
        """Train click, before the fine-tune is queued: a fresh stop flag that the job will not clear."""
        flag.event.clear()
        flag.armed = True

    def _training_set(self, sm: SessionModel, cifar_per_class: int, uploads: tuple):
        """(class names after training, dataset) from the Fine-tune tab's `uploads`, laid out as `finetune` says."""
        class_files, new_names, new_files = _split_uploads(uploads)
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
        ds = finetune.build_dataset(files, classes) if files else None
        if cifar_per_class and int(cifar_per_class) > 0:
            if self.data_source is None:
                raise gr.Error("No CIFAR-10 images are available on this server: upload your own images instead.")
            self._cifar_model(sm, "A CIFAR-10 subset needs a model with the CIFAR-10 classes.")
            cifar = finetune.cifar_dataset(self.data_source, int(cifar_per_class))
            cifar.classes = classes
            ds = finetune.merge(ds, cifar)
        if ds is None:
            raise gr.Error("No training images: upload a few images per class, or choose a CIFAR-10 subset.")
        return classes, ds

    @friendly_gen
    def finetune(self, session: SessionModel | None, flag: StopFlag, cifar_per_class: int, train_layers: str,
                 epochs: int, lr: float, batch_size: int, *uploads):
        """Generator: yields (status, curve DataFrame, result markdown, download path, pending model).

        `uploads` = 10 file lists (one per CIFAR-10 class), then MAX_NEW_CLASSES names, then their file lists.
        Armed by the Train click (see `arm`), a Stop pressed while the job waited in the queue ends it here;
        called without (gradio_client's /finetune), the job starts with a cleared flag.
        """
        armed, flag.armed = flag.armed, False
        if armed and flag.event.is_set():
            yield report.FINETUNE_STOPPED_IN_QUEUE, None, "", None, None
            return
        sm = self.active(session)
        classes, ds = self._training_set(sm, cifar_per_class, uploads)
        opts = finetune.Options(train_layers=train_layers, epochs=int(epochs), lr=float(lr), batch_size=int(batch_size))
        opts.check()
        if not armed:
            flag.event.clear()
        yield report.preparing_md(ds.counts()), None, "", None, None
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
        yield report.FINETUNE_DONE, pd.DataFrame(u.curve) if u.curve else None, result.summary(), str(path), pending

    @staticmethod
    def upload_counts(*values) -> str:
        """The drop zones' files (10 CIFAR classes, then the new classes' names and files) counted per class."""
        zones, names, new = _split_uploads(values)
        counts = {c: len(f or []) for c, f in zip(data.CLASSES, zones)}
        for i, (name, files) in enumerate(zip(names, new)):
            counts[(name or "").strip() or f"new class {i + 1}"] = len(files or [])
        return report.upload_counts_md(counts)

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

    @friendly
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

    @friendly
    def trust(self, session: SessionModel | None = None):
        """About, "how far to believe an answer": (reliability diagram or None, per-set table, markdown)."""
        sm = self.active(session)
        cal = getattr(sm.model, "calibration", None)
        rep = (cal or {}).get("reporting") or {}
        fig = visualize.reliability_figure(rep["before"], rep["after"]) if rep.get("before") and rep.get("after") else None
        fam = getattr(sm.model, "familiarity", None)
        meta = {**sm.meta, "familiarity": fam.meta()} if fam is not None else sm.meta
        return fig, report.ood_table(meta if fam is not None else {}), report.trust_md(meta, cal, fam is not None)

    def about(self, session: SessionModel | None = None, stage: int = 0):
        """(block diagram, equal-budget table, training curve or None, markdown) of the session's model."""
        sm = self.active(session)
        cfg = sm.model.config
        diagram = visualize.block_diagram(cfg, stage=max(0, min(int(stage), len(cfg.depths) - 1)))
        table = report.equal_budget_table(cfg, (sm.meta.get("recipe") or {}).get("model"))
        hist = sm.meta.get("history") or []
        source = self.source_label() if self.test_split() is not None else None
        return diagram, table, visualize.curve_figure(hist) if hist else None, report.about_md(sm.name, cfg, sm.meta,
                                                                                                source)
