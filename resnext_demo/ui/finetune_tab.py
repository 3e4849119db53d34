"""Fine-tune: train this session's own copy of the model on uploads (+ CIFAR-10 images), watch it learn, use it in
every tab, download it, or continue from an exported checkpoint."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pandas as pd
from PIL import Image

from .. import charts, data, finetune, report, weights
from .context import PRIVATE, Context, Page
from .serving import TRAIN_LIMIT, TRAIN_POOL, SessionModel, StopFlag, friendly, friendly_gen, on_zero_gpu, user_error

# A fine-tune books its training estimate on ZeroGPU (epochs x images x the rate below, at least
# FINETUNE_MIN_SECONDS) plus FINETUNE_GPU_MARGIN for what happens outside the training loop (decoding uploads,
# before/after scores, export), and its training stops at that estimate. The rates are ~5x what the default model
# takes per image and epoch on the 2-core development CPU (1.4 ms head, 4 ms all), so a run normally ends within.
TRAIN_SECONDS_PER_IMAGE = {"head": 0.01, "last_stage": 0.015, "all": 0.02}
FINETUNE_MIN_SECONDS = 10
FINETUNE_GPU_MARGIN = 20
ZERO_GPU_TRAIN_SECONDS = 60  # training cap on ZeroGPU: the largest booking, 80 s, costs 120 s on the newest cards
EXPORT_NAME = "resnext-finetuned.safetensors"  # the name a download gets
EXPORT_PREFIX = "resnext-finetune-"  # each export's own temporary folder


def split_uploads(uploads: tuple) -> tuple[list, list, list]:
    """The tab's upload inputs -> (files per CIFAR class, new class names, new classes' files)."""
    n_old, n_new = len(data.CLASSES), finetune.MAX_NEW_CLASSES
    return (list(uploads[:n_old]), list(uploads[n_old:n_old + n_new]), list(uploads[n_old + n_new:n_old + 2 * n_new]))


def train_seconds(ctx: Context, cifar_per_class: int, train_layers: str, epochs: int, uploads: tuple) -> float:
    """A fine-tune's training estimate: epochs x images x TRAIN_SECONDS_PER_IMAGE, within
    [FINETUNE_MIN_SECONDS, max_seconds]; 0 when there is nothing to train."""
    n = sum(len(u) for u in uploads if isinstance(u, (list, tuple)))  # file lists (new class names are str)
    if ctx.data_source is not None and cifar_per_class:
        n += min(int(cifar_per_class), ctx.cifar_subset_max()) * len(data.CLASSES)
    if n == 0:
        return 0.0
    rate = TRAIN_SECONDS_PER_IMAGE.get(train_layers, max(TRAIN_SECONDS_PER_IMAGE.values()))
    estimate = max(1, min(int(epochs or 1), finetune.MAX_EPOCHS)) * n * rate
    return min(float(ctx.max_seconds), max(FINETUNE_MIN_SECONDS, estimate))


def finetune_seconds(ctx: Context, session: SessionModel | None, pending: SessionModel | None, flag: StopFlag,
                     cifar_per_class: int, train_layers: str, epochs: int, lr: float, batch_size: int,
                     *uploads) -> float:
    """A fine-tune's ZeroGPU booking: its training estimate plus FINETUNE_GPU_MARGIN; 0 when it will not train
    (no images, or Stop pressed while it waited)."""
    if flag.armed and flag.event.is_set():
        return 0
    train = train_seconds(ctx, cifar_per_class, train_layers, epochs, uploads)
    return train + FINETUNE_GPU_MARGIN if train > 0 else 0


def stop(flag: StopFlag) -> str:
    """Ask this session's running (or queued) fine-tune to stop after the current step."""
    flag.event.set()
    return report.FINETUNE_STOPPING


def arm(flag: StopFlag) -> None:
    """Train click, before the fine-tune is queued: a fresh stop flag that the job will not clear."""
    flag.arm()


def training_set(ctx: Context, sm: SessionModel, cifar_per_class: int, uploads: tuple):
    """(class names after training, dataset) from the tab's `uploads`. A name typed in a new-class box that is
    already one of the model's own classes (one a previous fine-tune added) adds images to that class."""
    class_files, new_names, new_files = split_uploads(uploads)
    named = [((n or "").strip(), f) for n, f in zip(new_names, new_files) if f]
    if any(not n for n, _ in named):
        raise user_error("Give each new class with images a name.")
    classes = finetune.target_classes(sm.classes, [n for n, _ in named if n not in sm.classes])
    files: dict[str, list] = {}
    for name, fl in [*zip(data.CLASSES, class_files), *named]:
        if fl:
            if name not in classes:
                raise user_error(f"This session's model has no class '{name}'.")
            files[name] = files.get(name, []) + list(fl)
    ds = finetune.build_dataset(files, classes) if files else None
    cifar = None
    if cifar_per_class and int(cifar_per_class) > 0:
        if ctx.data_source is None:
            raise user_error("No CIFAR-10 images are available on this server: upload your own images instead.")
        if tuple(sm.classes[:10]) != data.CLASSES:
            raise user_error("A CIFAR-10 subset needs a model with the CIFAR-10 classes.")
        cifar = finetune.cifar_dataset(ctx.data_source, int(cifar_per_class))
        cifar.classes = classes
    if ds is None and cifar is None:
        raise user_error("No training images: upload a few images per class, or choose a CIFAR-10 subset.")
    return classes, ds, cifar


def delete_export(sm: SessionModel | None) -> None:
    """Remove a fine-tune's exported file and the folder made for it (the download was copied by Gradio);
    also gr.State's delete_callback when a session expires."""
    if sm is not None and sm.path and Path(sm.path).parent.name.startswith(EXPORT_PREFIX):
        shutil.rmtree(Path(sm.path).parent, ignore_errors=True)


def _export(result: finetune.Result, sm: SessionModel) -> SessionModel:
    """The finished fine-tune written to a folder of its own, as the session's pending model."""
    path = finetune.export(result, Path(tempfile.mkdtemp(prefix=EXPORT_PREFIX)) / EXPORT_NAME,
                           {**sm.meta, "source_name": sm.name})
    # From a ZeroGPU worker it goes back pickled, so on the CPU (a CUDA model in a result can hang the transfer)
    model = result.model.cpu() if on_zero_gpu() else result.model
    return SessionModel(model, weights.read_metadata(path), list(result.classes), f"fine-tuned from {sm.name}",
                        str(path))


@friendly_gen
def run_finetune(ctx: Context, session: SessionModel | None, pending: SessionModel | None, flag: StopFlag,
                 cifar_per_class: int, train_layers: str, epochs: int, lr: float, batch_size: int, *uploads):
    """Generator: yields (status, curve DataFrame, result markdown, download path, pending model).

    `uploads` = 10 file lists (one per CIFAR-10 class), then MAX_NEW_CLASSES names, then their file lists.
    Armed by the Train click (see `arm`), a Stop pressed while the job waited in the queue ends it here;
    called without (gradio_client's /finetune), the job starts with a cleared flag.
    """
    if flag.stopped_in_queue():
        yield report.FINETUNE_STOPPED_IN_QUEUE, None, "", None, pending
        return
    sm = ctx.active(session)
    classes, ds, cifar = training_set(ctx, sm, cifar_per_class, uploads)
    opts = finetune.Options(train_layers=train_layers, epochs=int(epochs), lr=float(lr), batch_size=int(batch_size))
    opts.check()
    yield report.preparing_md(ds.counts() if ds else {}, len(cifar) if cifar else 0), None, "", None, pending
    test = ctx.test_split() if tuple(classes[:10]) == data.CLASSES else None
    # On ZeroGPU training stops at the estimate the GPU was booked for, so the booking is never overrun.
    limit = train_seconds(ctx, cifar_per_class, train_layers, epochs, uploads) if on_zero_gpu() else ctx.max_seconds
    for u in finetune.run(sm.model, sm.classes, ds, opts, flag.event, test, limit, extra=cifar):
        curve = pd.DataFrame(u.curve) if u.curve else None
        if u.kind == "done":
            break
        yield u.text, curve, "", None, pending
    if u.result.stopped and not flag.event.is_set():
        gr.Warning(f"Training reached the {int(limit)} s limit and stopped; the model so far is kept.")
    if pending is not None and pending is not session:
        delete_export(pending)  # replaced: its download is gone from the page
    new = _export(u.result, sm)
    yield report.FINETUNE_DONE, curve, u.result.summary(), new.path, new


def upload_counts(cifar_per_class: int | None, *values) -> str:
    """The drop zones' files (10 CIFAR classes, then the new classes' names and files) counted per class, and the
    CIFAR-10 training images the slider adds (trained on, never held out)."""
    zones, names, new = split_uploads(values)
    counts = {c: len(f or []) for c, f in zip(data.CLASSES, zones)}
    for i, (name, files) in enumerate(zip(names, new)):
        counts[(name or "").strip() or f"new class {i + 1}"] = len(files or [])
    holdout = {c: finetune.holdout_count(n) for c, n in counts.items()}
    return report.upload_counts_md(counts, holdout, int(cifar_per_class or 0) * len(data.CLASSES))


def curve_image(curve: pd.DataFrame | None) -> Image.Image | None:
    """The live fine-tune curve (the /finetune endpoint's table) drawn on two axes, or nothing yet."""
    if curve is None or len(curve) == 0 or "series" not in curve.columns:
        return None
    curve = curve.copy()
    for col in ("epoch", "value"):  # the browser sends the table back as text
        curve[col] = pd.to_numeric(curve[col], errors="coerce")
    return charts.finetune_curve_figure(curve.dropna(subset=["epoch"]).to_dict("records"))


def use_model(ctx: Context, pending: SessionModel | None):
    """Make the last fine-tuned model this session's model: (session, banner)."""
    if pending is None:
        raise user_error("Train a model first.")
    return pending, ctx.model_banner(pending)


def reset_model(ctx: Context):
    """Back to the shared base model: (session, banner)."""
    return None, ctx.model_banner(None)


@friendly
def load_checkpoint(ctx: Context, file):
    """An uploaded checkpoint becomes this session's model: (session, banner)."""
    if not file:
        raise user_error("Choose a .safetensors checkpoint to upload.")
    model, meta = weights.load_checkpoint(file, ctx.device())  # on ZeroGPU: the CPU of the app's process
    sm = SessionModel(model, meta, list(meta["classes"]), Path(file).name)
    return sm, ctx.model_banner(sm)


def new_class_names(ctx: Context, session: SessionModel | None) -> list:
    """The new-class name boxes after a model switch: the session model's own classes beyond CIFAR-10 (a previous
    fine-tune's) fill the first boxes, so more images can go to them; the other boxes are emptied."""
    own = ctx.active(session).classes[len(data.CLASSES):] if (session or ctx.base) else []
    return [gr.update(value=own[i] if i < len(own) else "") for i in range(finetune.MAX_NEW_CLASSES)]


def _zones(p: Page) -> tuple[list, list, list]:
    """The drop zones: one per CIFAR-10 class, then the new classes' names and zones."""
    zones, new_names, new_zones = [], [], []
    for row in (data.CLASSES[:5], data.CLASSES[5:]):
        with gr.Row():
            for c in row:
                zones.append(gr.File(file_count="multiple", file_types=["image"], label=c, height=300,
                                     elem_id=f"zone-{c}", elem_classes=["ft-zone"]))
    with gr.Accordion("New classes (optional; a class a previous fine-tune added is listed here)", open=False):
        with gr.Row():
            for i in range(finetune.MAX_NEW_CLASSES):
                with gr.Column():
                    new_names.append(gr.Textbox(label=f"New class {i + 1} name", elem_id=f"new-name-{i}"))
                    new_zones.append(gr.File(file_count="multiple", file_types=["image"], height=150,
                                             label=f"New class {i + 1} images", elem_id=f"new-zone-{i}",
                                             elem_classes=["ft-zone"]))
    return zones, new_names, new_zones


def _settings(p: Page) -> SimpleNamespace:
    """The CIFAR-10 subset, the layers trained, epochs, learning rate and batch size."""
    ctx, c = p.ctx, SimpleNamespace()
    with gr.Row():
        c.cifar = gr.Slider(0, max(1, ctx.cifar_subset_max()), value=0, step=1,
                            label="…and/or CIFAR-10 images (per class, 0 = none)" + (
                                ": test images of the sample pack set aside for this; trained on, never held out or scored"
                                if data.is_sample_pack(ctx.data_source) else
                                ": from the training split; trained on, never held out or scored"),
                            interactive=ctx.data_source is not None, elem_id="ft-cifar")
        c.layers = gr.Radio(list(finetune.TRAIN_LAYERS), value="head", label="What to train",
                            info="head = classifier only; last_stage = layer3 + head; all = every layer")
    with gr.Row():
        c.epochs = gr.Slider(1, finetune.MAX_EPOCHS, value=3, step=1, label="Epochs", elem_id="ft-epochs")
        c.lr = gr.Number(value=0.01, label="Learning rate", minimum=1e-5, maximum=1.0, elem_id="ft-lr")
        c.bs = gr.Slider(1, finetune.MAX_BATCH_SIZE, value=32, step=1, label="Batch size")
    return c


def build(p: Page) -> SimpleNamespace:
    """Lay out the Fine-tune tab and wire its events; returns its model switches and new-class name boxes
    (demo re-fits the other tabs after a switch)."""
    gr.Markdown(report.finetune_intro(p.ctx.max_seconds, finetune.LIMITS, finetune.HOLDOUT_FRACTION))
    zones, new_names, new_zones = _zones(p)
    counts = gr.Markdown(report.upload_counts_md({}, {}), elem_id="ft-counts")
    s = _settings(p)
    with gr.Row():
        train = gr.Button("Train", variant="primary", elem_id="ft-train")
        stop_btn = gr.Button("Stop", variant="stop", elem_id="ft-stop")
    status = gr.Markdown(elem_id="ft-status")
    # The API returns the curve as a table (curve); the page draws it on two axes (plot). The table is
    # rendered but hidden by CSS: an unrendered component fires no change event.
    plot = gr.Image(label="Loss and accuracy", show_label=False, interactive=False, elem_id="ft-plot")
    curve = gr.Dataframe(interactive=False, elem_id="ft-curve")
    result = gr.Markdown(elem_id="ft-result")
    with gr.Row():
        use = gr.Button("Use this model (this session only)", elem_id="ft-use")
        reset = gr.Button("Back to the shared model")
        download = gr.DownloadButton("Download fine-tuned checkpoint (.safetensors, fp16 like the shipped model)", value=None, elem_id="ft-download")
    ckpt = gr.File(label="Continue from an exported checkpoint (.safetensors)", file_count="single", elem_id="ft-ckpt")

    inputs = [p.session, p.pending, p.stop_flag, s.cifar, s.layers, s.epochs, s.lr, s.bs, *zones, *new_names,
              *new_zones]
    # arm the stop flag at the click (unqueued), so a Stop pressed while the job waits in the queue counts
    train.click(arm, p.stop_flag, None, **PRIVATE, queue=False) \
        .then(p.gpu(run_finetune, p.bind(finetune_seconds)), inputs, [status, curve, result, download, p.pending],
              api_name="finetune", concurrency_id=TRAIN_POOL, concurrency_limit=TRAIN_LIMIT)
    stop_btn.click(stop, p.stop_flag, status, api_name="stop", queue=False)
    curve.change(curve_image, curve, plot, **PRIVATE, queue=False)
    gr.on([z.change for z in zones + new_zones] + [n.change for n in new_names] + [s.cifar.change], upload_counts,
          [s.cifar, *zones, *new_names, *new_zones], counts, **PRIVATE, queue=False)
    # the three ways this session changes model; demo re-fits the other tabs after each
    switches = [use.click(p.bind(use_model), p.pending, [p.session, p.banner], api_name="use_model"),
                reset.click(p.bind(reset_model), None, [p.session, p.banner], api_name="reset_model"),
                ckpt.upload(p.bind(load_checkpoint), ckpt, [p.session, p.banner], api_name="load_checkpoint")]
    return SimpleNamespace(model_switches=switches, new_names=new_names)
