"""Fine-tuning on a user's own images (the UI's Fine-tune tab, without any UI).

Plain functions: build a uint8 dataset from uploaded files per class (or a CIFAR-10 subset), split off
a held-out part, run `train.fit` on a deep copy of the caller's model under server-side caps, measure
before/after accuracy (held-out part, and a CIFAR-10 test slice to show forgetting), export a checkpoint.
The caller's model is never modified: every run trains its own `copy.deepcopy`.
"""
from __future__ import annotations

import copy
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from . import data, verdicts, weights
from .errors import UserError
from .beforeafter import Comparison, compare, correct
from .predict import predict_logits
from .splits import balanced_indices, balanced_subset, complement
from .trainer import TrainConfig, fit
from .model import device_of

# Server-side caps (shown in the UI): a fine-tune must stay usable on a 2-core CPU.
MAX_IMAGES = 500  # uploaded images in all (extra files are refused, not silently dropped)
MAX_EPOCHS = 20
MAX_SECONDS = 300.0  # wall time of one run; training stops cleanly after it
MAX_NEW_CLASSES = 3
MAX_CIFAR_PER_CLASS = 100  # CIFAR-10 subset option: at most 1,000 training images
MAX_BATCH_SIZE = 128
HOLDOUT_FRACTION = 0.2  # of each class, at least one image when a class has two or more
FORGETTING_SLICE = 500  # CIFAR-10 test images used to measure forgetting
TRAIN_LAYERS = ("head", "last_stage", "all")
LIMITS = {"images": MAX_IMAGES, "epochs": MAX_EPOCHS, "batch_size": MAX_BATCH_SIZE, "new_classes": MAX_NEW_CLASSES}


@dataclass
class Dataset:
    """uint8 images N x 3 x 32 x 32, int64 labels, and the class names the labels index."""

    x: torch.Tensor
    y: torch.Tensor
    classes: list[str]

    def __len__(self) -> int:
        return len(self.y)

    def counts(self) -> dict[str, int]:
        """Images per class."""
        return {c: int((self.y == i).sum()) for i, c in enumerate(self.classes)}


def _clean_name(name: str) -> str:
    return " ".join(str(name).split()).strip()


def target_classes(base_classes: Sequence[str], new_names: Sequence[str]) -> list[str]:
    """The model's classes plus the non-empty new names (validated: unique, at most MAX_NEW_CLASSES)."""
    base = list(base_classes)
    new = [_clean_name(n) for n in new_names if n and _clean_name(n)]
    if len(new) > MAX_NEW_CLASSES:
        raise UserError(f"At most {MAX_NEW_CLASSES} new classes per run.")
    for n in new:
        if n in base:
            raise UserError(f"'{n}' is already a class of the model: put its images in that class's zone.")
        if len(n) > 40:
            raise UserError(f"Class name '{n[:40]}…' is too long (40 characters at most).")
    if len(set(new)) != len(new):
        raise UserError("New class names must be different from each other.")
    return base + new


def build_dataset(files: dict[str, Sequence[str | Path | bytes]], classes: Sequence[str],
                  max_images: int = MAX_IMAGES) -> Dataset:
    """Decode uploaded files per class name into a Dataset; data.ImageError names the bad file."""
    classes = list(classes)
    total = sum(len(v or []) for v in files.values())
    if total > max_images:
        raise UserError(f"{total} images uploaded; the limit is {max_images} per run.")
    xs, ys = [], []
    for name, paths in files.items():
        if not paths:
            continue
        if name not in classes:
            raise UserError(f"Images given for '{name}', which is not one of the classes {classes}.")
        for p in paths:
            try:
                im = data.prepare_image(p)
            except data.ImageError as e:
                label = Path(p).name if isinstance(p, (str, Path)) else "an upload"
                raise data.ImageError(f"{label} ({name}): {e}") from e
            xs.append(data.pil_to_uint8(im))
            ys.append(classes.index(name))
    if not xs:
        raise UserError("No training images: upload a few images per class, or choose a CIFAR-10 subset.")
    return Dataset(torch.cat(xs), torch.tensor(ys, dtype=torch.int64), classes)


def cifar_dataset(source: str | Path | None, per_class: int, seed: int = 0) -> Dataset:
    """A balanced subset of CIFAR-10's training split (per_class images of each class)."""
    per_class = int(per_class)
    if not 1 <= per_class <= MAX_CIFAR_PER_CLASS:
        raise UserError(f"CIFAR-10 subset: 1 to {MAX_CIFAR_PER_CLASS} images per class.")
    x, y = data.load_split(source, "train")
    x, y = balanced_subset(x, y, per_class * len(data.CLASSES), seed)
    return Dataset(x, y, list(data.CLASSES))


def merge(a: Dataset | None, b: Dataset | None) -> Dataset:
    """Two datasets over the same class list, concatenated."""
    if a is None or b is None:
        if a is None and b is None:
            raise UserError("No training images.")
        return a if b is None else b
    if a.classes != b.classes[:len(a.classes)] and b.classes != a.classes[:len(b.classes)]:
        raise ValueError("datasets with different classes")
    classes = a.classes if len(a.classes) >= len(b.classes) else b.classes
    return Dataset(torch.cat([a.x, b.x]), torch.cat([a.y, b.y]), classes)


def holdout_count(n: int, fraction: float = HOLDOUT_FRACTION) -> int:
    """How many of a class's n images are held out: round(fraction * n), at least 1 when n >= 2."""
    return 0 if n < 2 else max(1, round(fraction * n))


def holdout_split(ds: Dataset, fraction: float = HOLDOUT_FRACTION, seed: int = 0) -> tuple[Dataset, Dataset]:
    """(train, held-out): per class, round(fraction * n) images (at least 1 when n >= 2) are held out."""
    ho = balanced_indices(ds.y, lambda n: holdout_count(n, fraction), torch.Generator().manual_seed(seed))
    tr = complement(len(ds.y), ho)
    return Dataset(ds.x[tr], ds.y[tr], ds.classes), Dataset(ds.x[ho], ds.y[ho], ds.classes)


def prepare_model(model: nn.Module, old_classes: Sequence[str], classes: Sequence[str]) -> nn.Module:
    """A deep copy of `model` whose head has len(classes) outputs; existing classes keep their weights."""
    m = copy.deepcopy(model)
    if len(classes) != len(old_classes):
        head = m.fc
        w, b = head.weight.detach().clone(), head.bias.detach().clone()
        m.reset_classifier(len(classes))
        head = m.fc
        with torch.no_grad():  # new classes start from fresh rows; old ones keep what they knew
            head.weight[:len(old_classes)] = w
            head.bias[:len(old_classes)] = b
    return m


@dataclass
class Options:
    """What the user chose; validated against the caps by `check`."""

    train_layers: str = "head"
    epochs: int = 3
    lr: float = 0.01
    batch_size: int = 32
    seed: int = 0

    def check(self) -> None:
        """Raise UserError with a user-facing message when an option is out of range."""
        if self.train_layers not in TRAIN_LAYERS:
            raise UserError(f"What to train must be one of {', '.join(TRAIN_LAYERS)}.")
        if not 1 <= int(self.epochs) <= MAX_EPOCHS:
            raise UserError(f"Epochs must be between 1 and {MAX_EPOCHS}.")
        if not 0 < float(self.lr) <= 1.0:
            raise UserError("The learning rate must be in (0, 1].")
        if not 1 <= int(self.batch_size) <= MAX_BATCH_SIZE:
            raise UserError(f"Batch size must be between 1 and {MAX_BATCH_SIZE}.")


@dataclass
class Update:
    """One event of `run`: 'step'/'epoch' progress, 'scoring' (training over, the before/after scores running),
    or 'done' with the result."""

    kind: str
    text: str
    curve: list[dict] = field(default_factory=list)  # rows {step, series, value} for a line plot
    result: "Result | None" = None


MIN_REFIT = 200  # held-out images needed to re-fit the temperature; fewer would fit noise


def adapt_trust(base: nn.Module, new: nn.Module, train: Dataset, hold: Dataset, train_layers: str,
                n_base_classes: int) -> str:
    """Give the fine-tuned model a temperature and an unfamiliar-image detector it has earned, and say which.

    Temperature: re-fitted (NLL) on the held-out images when there are at least MIN_REFIT, else the base
    model's. Detector: kept when only the head trained (the features it reads did not change), with the new
    classes' training images added; dropped otherwise (it would describe other features)."""
    from . import calibration

    lines = []
    base_cal = getattr(base, "calibration", None)
    if len(hold) >= MIN_REFIT:
        t = calibration.fit_temperature(predict_logits(new, hold.x), hold.y, "nll")
        new.calibration = {"temperature": t, "method": "temperature scaling (NLL)",
                           "fitted_on": f"{len(hold)} held-out images of this fine-tune"}
        lines.append(f"Probabilities: temperature re-fitted on the {len(hold)} held-out images (T = {t:g}).")
    elif base_cal:
        new.calibration = {**base_cal, "fitted_on": f"kept from the base model ({base_cal.get('fitted_on')})"}
        lines.append(f"Probabilities: the base model's temperature (T = {base_cal['temperature']:g}) is kept — "
                     f"{len(hold)} held-out images are too few to re-fit it (≥ {MIN_REFIT} needed), so the "
                     "fine-tuned model's probabilities are calibrated only as far as the base model's were.")
    fam = getattr(base, "familiarity", None)
    if fam is None:
        new.familiarity = None
    elif train_layers == "head":
        added = list(range(n_base_classes, len(train.classes)))
        new.familiarity = fam.with_classes(new, train.x, train.y, [c for c in added if (train.y == c).any()])
        lines.append("Unfamiliar-image check: kept (only the head trained, so the features it reads are the base "
                     "model's)" + (", with your new classes' training images added." if added else "."))
    else:
        new.familiarity = None
        lines.append("Unfamiliar-image check: off for this model — training the "
                     f"{'last stage' if train_layers == 'last_stage' else 'whole network'} changed the features it "
                     "reads, and its reference images are not part of the app.")
    return " ".join(lines)


@dataclass
class Result:
    """A finished (or stopped) fine-tune: the new model and its numbers."""

    model: nn.Module
    classes: list[str]
    before: dict
    after: dict
    history: list[dict]
    stopped: bool
    seconds: float
    options: dict
    n_train: int  # every image trained on, n_extra of them CIFAR-10 training images
    n_holdout: int  # the visitor's own images held out (CIFAR-10 training images are never held out)
    n_extra: int = 0
    comparisons: dict[str, Comparison] = field(default_factory=dict)  # see `compare`
    trust: str = ""  # which temperature and unfamiliar-image check the model got (adapt_trust)

    @property
    def custom_classes(self) -> bool:
        return tuple(self.classes) != data.CLASSES

    def summary(self) -> str:
        """Markdown: before/after accuracies with 95 % intervals and paired p-values, then the verdicts."""
        lines = [f"**{'Stopped' if self.stopped else 'Finished'}** after {self.seconds:.1f} s "
                 f"({len(self.history)} epoch(s), {self.n_train} training images"
                 + (f", {self.n_extra} of them CIFAR-10" if self.n_extra else "")
                 + f" / {self.n_holdout} of your images held out).",
                 "", "| | images | before | after | change | paired p |", "|---|---|---|---|---|---|"]
        lines += [f"| {c.label} | {c.n} | {c.cell('before')} | {c.cell('after')} | {100 * c.change:+.1f} | {verdicts.p_text(c.p)} |"
                  for c in self.comparisons.values()]
        lines += ["", "Accuracy (95 % Wilson interval); change in points; paired p: McNemar's exact test on the images "
                      "whose answer changed.", ""]
        return "\n".join(lines + verdicts.finetune_md(self.comparisons) + ([""] + [self.trust] if self.trust else []))


def _splits(dataset: Dataset | None, extra: Dataset | None, seed: int) -> tuple[Dataset, Dataset]:
    """(training images, held-out images): the visitor's images split per class, CIFAR-10's `extra` all trained on
    (never held out, so every held-out score is on the visitor's own images)."""
    if dataset is None and extra is None:
        raise UserError("No training images: upload a few images per class, or choose a CIFAR-10 subset.")
    if dataset is None:
        return extra, Dataset(extra.x[:0], extra.y[:0], extra.classes)
    if len(dataset) < 2 and extra is None:
        raise UserError("Upload at least two images.")
    train_ds, hold_ds = holdout_split(dataset, seed=seed)
    if len(train_ds) == 0 and extra is None:
        raise UserError("Every class needs at least two images: one is held out for the before/after score.")
    return merge(train_ds if len(train_ds) else None, extra), hold_ds


def _train(new: nn.Module, train_ds: Dataset, hold_ds: Dataset, cfg: TrainConfig, device: torch.device,
           stop: threading.Event | None, start: float | None) -> Iterator[Update]:
    """fit() on the copy, as Updates with the curve so far; returns (history, stopped, curve)."""
    # The held-out score before training starts the curve at epoch 0 (and puts all series in the first plot).
    curve: list[dict] = [] if start is None else [{"epoch": 0.0, "series": "held-out accuracy", "value": start}]
    history, stopped = [], False
    holdout = (hold_ds.x, hold_ds.y) if len(hold_ds) else None
    for ev in fit(new, (train_ds.x, train_ds.y), cfg, holdout, device, stop=stop):
        if ev.kind == "step":
            x = ev.epoch + ev.step / ev.steps_per_epoch
            curve += [{"epoch": round(x, 3), "series": "train loss", "value": ev.loss},
                      {"epoch": round(x, 3), "series": "train accuracy", "value": ev.acc}]
            yield Update("step", f"epoch {ev.epoch + 1}/{cfg.epochs}, step {ev.step}/{ev.steps_per_epoch}: "
                                 f"loss {ev.loss:.3f}, accuracy {ev.acc:.3f} ({ev.seconds:.1f} s)", list(curve))
        elif ev.kind == "epoch":
            if ev.eval_acc is not None:
                curve.append({"epoch": float(ev.epoch), "series": "held-out accuracy", "value": ev.eval_acc})
            yield Update("epoch", f"epoch {ev.epoch}/{cfg.epochs} done: loss {ev.loss:.3f}, accuracy {ev.acc:.3f}"
                                  + (f", held-out {ev.eval_acc:.3f}" if ev.eval_acc is not None else "")
                                  + (" (stopped)" if ev.stopped else ""), list(curve))
        elif ev.kind == "done":
            history, stopped = ev.history, ev.stopped
    return history, stopped, curve


def run(model: nn.Module, model_classes: Sequence[str], dataset: Dataset | None, opts: Options,
        stop: threading.Event | None = None, cifar_test: tuple[torch.Tensor, torch.Tensor] | None = None,
        max_seconds: float = MAX_SECONDS, extra: Dataset | None = None) -> Iterator[Update]:
    """Fine-tune a copy of `model` on the visitor's `dataset` (a part held out to score it) plus `extra` CIFAR-10
    training images (trained on only), yielding progress; the last Update carries the Result."""
    opts.check()
    train_ds, hold_ds = _splits(dataset, extra, opts.seed)
    device, base, classes = device_of(model), model, list(train_ds.classes)
    new = prepare_model(model, model_classes, classes)
    cifar = None
    if cifar_test is not None and tuple(classes[:len(data.CLASSES)]) == data.CLASSES:
        cifar = (cifar_test[0][:FORGETTING_SLICE], cifar_test[1][:FORGETTING_SLICE])
    # Before = the session's model as it is (a new class is simply never predicted by it).
    start = float(correct(base, hold_ds.x, hold_ds.y).mean()) if len(hold_ds) else None
    trained = sorted(set(train_ds.y.tolist()))  # the classes this fine-tune has training images of
    cfg = TrainConfig(model="fine-tune", epochs=int(opts.epochs), batch_size=min(int(opts.batch_size), len(train_ds)),
                      lr=float(opts.lr), weight_decay=5e-4, label_smoothing=0.0, schedule="cosine",
                      warmup_epochs=0.0, channels_last=device.type == "cuda", bf16=True, seed=int(opts.seed),
                      train_layers=opts.train_layers, max_seconds=float(max_seconds), log_every=1)
    t0 = time.perf_counter()
    history, stopped, curve = yield from _train(new, train_ds, hold_ds, cfg, device, stop, start)
    new.eval()
    scored = " and ".join(f"{n} {what}" for n, what in ((len(hold_ds), "held-out images of yours"),
                                                         (len(cifar[1]) if cifar else 0, "CIFAR-10 test images")) if n)
    yield Update("scoring", f"Training done. Scoring the model before and after on {scored or 'no images'}…", curve)
    trust = adapt_trust(base, new, train_ds, hold_ds, opts.train_layers, len(model_classes))
    rows = compare(base, new, hold_ds, trained, cifar)
    before, after = ({k: getattr(rows[k], when) if k in rows else None for k in ("holdout", "cifar")}
                     for when in ("before", "after"))
    res = Result(new, classes, before, after, history, stopped, time.perf_counter() - t0,
                 {**asdict(opts), "max_seconds": max_seconds}, len(train_ds), len(hold_ds),
                 len(extra) if extra is not None else 0, rows, trust)
    yield Update("done", res.summary(), curve, res)


def export(result: Result, path: str | Path, base_meta: dict | None = None) -> Path:
    """Write the fine-tuned model as an fp16 checkpoint, like the shipped model (half the size; it loads as fp32)
    (custom_classes=True when its classes are not CIFAR-10's); the metadata says its scores are the fp32 model's."""
    base_meta = base_meta or {}
    meta = {"classes": list(result.classes), "history": result.history,
            "scored_in": "float32, before this file's fp16 rounding",
            "accuracy": result.after.get("cifar"),
            "fine_tune": {"from": base_meta.get("source_name") or base_meta.get("recipe", {}).get("model"),
                          "options": result.options, "before": result.before, "after": result.after,
                          "n_train": result.n_train, "n_holdout": result.n_holdout, "stopped": result.stopped}}
    if result.custom_classes:
        meta["custom_classes"] = True
    if "cifar" in result.comparisons:  # say what "accuracy" was measured on (a slice, not the whole split)
        meta["data"] = {"test_images": result.comparisons["cifar"].n}
    return weights.save_checkpoint(path, result.model, meta, half=True)
