"""The cardinality lab: two members of the equal-budget airbench94x family trained from scratch side by side with
the fast recipe (speedrun), step by step, on the same seed, data order and augmentation; tested after every epoch
on the same test images. No UI here: the Lab tab (ui/lab_tab.py) drives `race` and draws its curve.

Each model trains exactly as `python -m resnext_demo.train --recipe fast` would on the same subset (same seeds,
same Trainer): interleaving the two runs' steps changes neither, so the race's accuracies are the recipe's.
"""
from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from . import data, weights
from .beforeafter import mcnemar_p
from .budget import config_macs, config_params
from .errors import UserError
from .speedrun import FastRecipe, Trainer, predict_views
from .splits import balanced_subset
from .zoo import airbench_family, build_model, get_config

DEFAULT_A, DEFAULT_B = "airbench94x_1x229d", "airbench94x_8x66d"  # C = 1 (a ResNet bottleneck) vs C = 8
DEFAULT_TRAIN_PER_CLASS = 200  # 2,000 training images: the default race takes about 2 minutes on 2 CPU cores
DEFAULT_TEST_PER_CLASS = 100
DEFAULT_EPOCHS = 8
MAX_TRAIN_PER_CLASS = {"cpu": 500, "cuda": 5000}  # a GPU races on the whole training split
MAX_TEST_PER_CLASS = 1000
MAX_EPOCHS = 10
MAX_SECONDS = 600.0  # wall time of one race; both models stop cleanly after it
BUDGET_TOLERANCE = 0.05  # parameters and MACs within 5 %: an equal-budget comparison
UPDATE_EVERY_S = 2.0  # a progress line at most this often between epochs


@dataclass(frozen=True)
class Member:
    """One model of the family with its budget."""

    name: str
    cardinality: int
    params: int
    macs: int

    @property
    def label(self) -> str:
        return f"C = {self.cardinality} ({self.name})"


def members() -> dict[str, Member]:
    """The equal-budget family by name, smallest C first."""
    return dict(_members())


@functools.cache  # fixed tables: counted once, not at every dropdown change, check and redraw
def _members() -> tuple[tuple[str, Member], ...]:
    return tuple((name, Member(name, c, config_params(get_config(name)), config_macs(get_config(name))))
                 for c, name in sorted(airbench_family().items()))


def budget_gap(a: Member, b: Member) -> float:
    """The larger relative difference of the two models' parameters and multiply-adds."""
    return max(abs(a.params - b.params) / max(a.params, b.params), abs(a.macs - b.macs) / max(a.macs, b.macs))


@dataclass
class RaceOptions:
    """What the visitor chose; `check` enforces the server's caps."""

    a: str = DEFAULT_A
    b: str = DEFAULT_B
    train_per_class: int = DEFAULT_TRAIN_PER_CLASS
    test_per_class: int = DEFAULT_TEST_PER_CLASS
    epochs: int = DEFAULT_EPOCHS
    seed: int = 0

    def check(self, device_type: str = "cpu") -> None:
        """Raise UserError for an unknown model or a setting beyond the caps."""
        known = members()
        for name in (self.a, self.b):
            if name not in known:
                raise UserError(f"Unknown model {name!r}: choose one of {', '.join(known)}.")
        if self.a == self.b:
            raise UserError("Choose two different models (two cardinalities) to race.")
        cap = MAX_TRAIN_PER_CLASS.get(device_type, MAX_TRAIN_PER_CLASS["cpu"])
        if not 10 <= int(self.train_per_class) <= cap:
            raise UserError(f"Training images: 10 to {cap} per class on this server.")
        if not 10 <= int(self.test_per_class) <= MAX_TEST_PER_CLASS:
            raise UserError(f"Test images: 10 to {MAX_TEST_PER_CLASS} per class.")
        if not 1 <= int(self.epochs) <= MAX_EPOCHS:
            raise UserError(f"Epochs: 1 to {MAX_EPOCHS}.")


def recipe_for(name: str, n_train: int, epochs: int, seed: int) -> FastRecipe:
    """The fast recipe for a race: its hyperparameters are per 1,024 examples, so a small training set only needs
    a smaller batch (at least ~8 steps an epoch) for the schedule and the lookahead to have steps to work with."""
    batch = 1024
    while batch > 64 and n_train // batch < 8:
        batch //= 2
    return replace(FastRecipe(), model=name, epochs=float(epochs), batch_size=batch, seed=seed,
                   eval_every_epoch=False, tta_level=0)


@dataclass
class Racer:
    """One side of the race: the model, its trainer, and per-epoch history."""

    member: Member
    model: nn.Module
    trainer: Trainer
    history: list[dict] = field(default_factory=list)
    pred: np.ndarray | None = None  # the last test predictions (uint8 class per test image)


def _racer(member: Member, train: tuple[torch.Tensor, torch.Tensor], recipe: FastRecipe, device: torch.device) -> Racer:
    """A model built and prepared as `train --recipe fast` does: seeded build, then seeded Trainer."""
    torch.manual_seed(recipe.seed)
    model = build_model(member.name)
    torch.manual_seed(recipe.seed)
    return Racer(member, model, Trainer(model, train, recipe, device))


@dataclass
class RaceUpdate:
    """One event of `race`: 'step' (a progress line), 'epoch' (the curve grew) or 'done' (with the result)."""

    kind: str
    text: str
    curve: list[dict]
    result: RaceResult | None = None


@dataclass
class RaceResult:
    """Both models after the race, their curves and the paired test of their last predictions."""

    a: Racer
    b: Racer
    y: np.ndarray  # the test labels
    seconds: float
    stopped: bool
    n_train: int
    batch_size: int

    def accuracy(self, r: Racer) -> float:
        return float((r.pred == self.y).mean())

    @property
    def p(self) -> float:
        """Exact McNemar p-value of the gap on the same test images (the test-set part of the noise)."""
        a_only = int(((self.a.pred == self.y) & (self.b.pred != self.y)).sum())
        b_only = int(((self.b.pred == self.y) & (self.a.pred != self.y)).sum())
        return mcnemar_p(a_only, b_only)


def _test(r: Racer, test: tuple[torch.Tensor, torch.Tensor], device: torch.device) -> float:
    """Plain test accuracy of one side now; keeps its predictions."""
    logits = predict_views(r.model, test[0], 0, device, r.trainer.bf16)[0]
    r.pred = logits.argmax(1).to(torch.uint8).numpy()
    r.model.train()
    return float((r.pred == test[1].numpy()).mean())


def _progress(done: int, total: int, t0: float, epoch: int, epochs: int) -> str:
    """'epoch 2/5 · 41 % · 38 s elapsed · 95 images/s · about 55 s left' (images = both models' training images)."""
    elapsed = time.perf_counter() - t0
    rate = done / elapsed if elapsed > 0 else 0.0
    left = f" · about {(total - done) / rate:.0f} s left" if rate > 0 and done < total else ""
    return (f"epoch {epoch}/{epochs} · {100 * done / max(1, total):.0f} % · {elapsed:.0f} s elapsed · "
            f"{rate:.0f} training images/s{left}")


def _epoch(a: Racer, b: Racer, e: int, should_stop) -> Iterator[tuple[int, bool]]:
    """Epoch `e` of both runs, one step of each in turn: yields (images trained so far this epoch, stopped)."""
    seen = 0
    sums = {id(r): [0.0, 0] for r in (a, b)}
    for (la, _, na), (lb, _, nb) in zip(a.trainer.steps(e), b.trainer.steps(e)):
        sums[id(a)][0] += float(la)
        sums[id(b)][0] += float(lb)
        sums[id(a)][1] += na
        sums[id(b)][1] += nb
        seen += na + nb
        stopped = should_stop()
        yield seen, stopped
        if stopped:
            break
    for r in (a, b):
        r.trainer.end_epoch()
        r.history.append({"epoch": e + 1, "train_loss": sums[id(r)][0] / max(1, sums[id(r)][1])})


def race(opts: RaceOptions, train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
         device: str | torch.device = "cpu", stop: threading.Event | None = None,
         max_seconds: float = MAX_SECONDS) -> Iterator[RaceUpdate]:
    """Race opts.a against opts.b on uint8 `train` / `test` images, yielding progress and the curve (rows of
    epoch, model, series, value); the last update carries the RaceResult."""
    device = torch.device(device)
    fam = members()
    recipe = recipe_for(opts.a, len(train[1]), opts.epochs, opts.seed)
    a, b = (_racer(fam[n], train, replace(recipe, model=n), device) for n in (opts.a, opts.b))
    curve: list[dict] = []
    t0, stopped, last = time.perf_counter(), False, 0.0
    total = 2 * a.trainer.total * recipe.batch_size

    def should_stop() -> bool:
        return (stop is not None and stop.is_set()) or time.perf_counter() - t0 > max_seconds
    done_before = 0
    for e in range(opts.epochs):
        for seen, stopped in _epoch(a, b, e, should_stop):
            if time.perf_counter() - last > UPDATE_EVERY_S:
                last = time.perf_counter()
                yield RaceUpdate("step", _progress(done_before + seen, total, t0, e + 1, opts.epochs), list(curve))
        done_before += seen
        for r in (a, b):
            r.history[-1]["test_acc"] = _test(r, test, device)
            curve += [{"epoch": e + 1, "model": r.member.label, "series": s, "value": r.history[-1][k]}
                      for s, k in (("test accuracy", "test_acc"), ("train loss", "train_loss"))]
        yield RaceUpdate("epoch", _progress(done_before, total, t0, e + 1, opts.epochs), list(curve))
        if stopped or a.trainer.done:
            break
    for r in (a, b):
        r.model.eval()
    res = RaceResult(a, b, test[1].numpy(), time.perf_counter() - t0, stopped, len(train[1]), recipe.batch_size)
    yield RaceUpdate("done", "", curve, res)


def _per_class(labels: torch.Tensor) -> int:
    """Images of the rarest class."""
    return int(torch.bincount(labels, minlength=len(data.CLASSES)).min())


def available(source) -> tuple[int, int]:
    """(training, test) images per class the source has for every class (the sample pack: 10 and 40)."""
    return _per_class(data.load_split(source, "train")[1]), _per_class(data.load_split(source, "test")[1])


def race_data(source, opts: RaceOptions) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The race's balanced training and test subsets of CIFAR-10 (seeded like `train --subset/--test-subset`);
    asking for more images per class than the source has is refused, not quietly shortened."""
    if source is None:
        raise UserError("No CIFAR-10 images are available on this server, so there is nothing to race on.")
    subsets = []
    for split, want, what in (("train", opts.train_per_class, "training"), ("test", opts.test_per_class, "test")):
        x, y = data.load_split(source, split)
        if int(want) > (have := _per_class(y)):
            raise UserError(f"This server has {have} {what} images per class; choose at most {have}.")
        subsets.append(balanced_subset(x, y, int(want) * len(data.CLASSES), opts.seed))
    return subsets[0], subsets[1]


def sweep_spread(results: dict | None, cardinality: int) -> dict | None:
    """The shipped sweep's seed-to-seed spread for one C: {'n', 'sd', 'range', 'epochs'} in accuracy fractions."""
    for row in (results or {}).get("rows", []):
        if row.get("C") == cardinality and row.get("top1_per_seed"):
            accs = np.asarray(row["top1_per_seed"], dtype=float)
            return {"n": len(accs), "sd": float(accs.std(ddof=1)) if len(accs) > 1 else 0.0,
                    "range": float(accs.max() - accs.min()), "epochs": row.get("epochs"), "mean": float(accs.mean())}
    return None


def command(result: RaceResult, r: Racer) -> str:
    """The `train` command that trains this side alone to the same weights (same subsets, seed, batch, epochs)."""
    rec = r.trainer.recipe
    return (f"python -m resnext_demo.train --recipe fast --model {r.member.name} --subset {result.n_train} "
            f"--test-subset {len(result.y)} --epochs {rec.epochs:g} --batch-size {rec.batch_size} --seed {rec.seed}")


def export(result: RaceResult, r: Racer, path: str | Path) -> Path:
    """One side of the race as an fp16 checkpoint (like the shipped model); its accuracy is on the race's test
    subset, which the metadata says."""
    other = result.b if r is result.a else result.a
    meta = {"classes": list(data.CLASSES), "recipe": asdict(r.trainer.recipe), "history": r.history,
            "accuracy": result.accuracy(r), "scored_in": "float32, before this file's fp16 rounding",
            "data": {"train_images": result.n_train, "test_images": len(result.y)}, "command": command(result, r),
            "race": {"against": other.member.name, "against_accuracy": result.accuracy(other),
                     "paired_p": result.p, "seconds": round(result.seconds, 1), "stopped": result.stopped}}
    return weights.save_checkpoint(path, r.model, meta, half=True)
