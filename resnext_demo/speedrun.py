"""The fast recipe: airbench's training method (Jordan 2024, `airbench94.py`) for any model of the family, in
our own code. `python -m resnext_demo.train --recipe fast --model airbench94 ...` runs `main` here.

What it does, and why (docs/training-fast.md has the measurements):
- Whole data set on the device, normalized once, stored as float16, reflect-padded by `translate` pixels: a
  batch is one gather; random translation by up to 2 pixels (reflect, not black borders).
- Alternating flip: each image gets a random flip once, then every odd epoch flips all of them, so two
  consecutive epochs see both mirror images of every picture (less repetition than a coin per epoch).
- Patch-whitening stem: conv1's weights are the whitened principal components of training patches and stay
  frozen; its bias (airbench94's 2x2 stem has one) trains for the first `whiten_bias_epochs` only.
- Identity (Dirac) init of every conv with no shortcut around it (Downsample and plain 3x3s): an implicit
  residual path. Bottleneck convs keep PyTorch's init: their block already has an explicit shortcut.
- BatchNorm without a trained scale (weights stay 1, only biases learn) and momentum 0.6 (running statistics
  follow the fast-moving weights); BN biases get `bias_scaler` x the learning rate.
- Decoupled hyperparameters: the loss is summed over the batch, lr is "per 1024 examples" and divided by
  1 + 1/(1 - momentum) (the step size Nesterov momentum adds); weight decay is per 1024 examples and
  divided by the lr, so lr, momentum, wd and batch size can each change without retuning the others.
- Nesterov SGD, batch 1024, a triangular schedule (0.2 -> 1 at 23 % -> 0.07), label smoothing 0.2.
- Lookahead: from epoch 3, every 5 steps the weights are pulled to an EMA whose decay grows as (t/T)^3.
- Test-time augmentation (level 2): the mean of the logits of the image and its mirror, and of both shifted by
  one pixel up-left and down-right (6 views); level 1: mirror only.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import data, weights
from .model import Bottleneck, count_macs, count_params, whiten_init
from .splits import balanced_subset
from .zoo import build_model


@dataclass
class FastRecipe:
    """airbench94's hyperparameters in decoupled form; stored in the checkpoint's metadata."""

    model: str = "airbench94"
    epochs: float = 9.9  # fractional: the last epoch stops part-way
    batch_size: int = 1024
    lr: float = 11.5  # per 1024 examples (decoupled from batch size and momentum)
    momentum: float = 0.85
    weight_decay: float = 0.0153  # per 1024 examples (decoupled from the learning rate)
    bias_scaler: float = 64.0  # BatchNorm biases learn this much faster (same decay)
    label_smoothing: float = 0.2
    bn_momentum: float = 0.6  # airbench's convention: weight of the old running statistics
    whiten_bias_epochs: int = 3
    ema_start_epochs: int = 3
    ema_every: int = 5
    ema_decay_base: float = 0.95
    ema_decay_pow: float = 3.0
    translate: int = 2
    flip: bool = True  # alternating flip
    tta_level: int = 2  # 0 none, 1 mirror, 2 mirror + translate
    identity_init: bool = True
    bf16: bool = True  # autocast on CUDA and on CPUs with native bf16
    channels_last: bool = True
    eval_every_epoch: bool = True  # plain test accuracy after each epoch (the curve); off saves time
    seed: int = 0
    recipe: str = "fast"


def use_bf16(device: torch.device, wanted: bool = True) -> bool:
    """bf16 autocast where it is fast: CUDA, or a CPU with AVX512-BF16/AMX (emulated elsewhere: slower)."""
    if not wanted:
        return False
    return device.type == "cuda" or (torch.backends.mkldnn.is_available()
                                     and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))


def identity_init(model: nn.Module) -> int:
    """Dirac init (the first min(in, out) filters pass their input through) of every conv except the stem and
    those inside bottlenecks (which have a real shortcut); returns how many convs it set."""
    inside = {id(m) for b in model.modules() if isinstance(b, Bottleneck) for m in b.modules()}
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and name != "conv1" and id(m) not in inside:
            with torch.no_grad():
                if m.groups > 1:  # each group's own identity
                    nn.init.dirac_(m.weight, groups=m.groups)
                else:
                    nn.init.dirac_(m.weight[:m.in_channels])
            n += 1
    return n


def prepare(model: nn.Module, train_images: torch.Tensor, recipe: FastRecipe) -> None:
    """Recipe-time model changes: whitened frozen stem, identity init, BN momentum, BN scales frozen at 1."""
    whiten_init(model.conv1, data.normalize(train_images[:5000]))
    model.conv1.weight.requires_grad_(False)
    if recipe.identity_init:
        identity_init(model)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 1 - recipe.bn_momentum  # PyTorch's momentum is the weight of the new batch
            if m.weight is not None:
                m.weight.data.fill_(1.0)
                m.weight.requires_grad_(False)


def optimizer(model: nn.Module, recipe: FastRecipe) -> torch.optim.SGD:
    """Nesterov SGD with decoupled lr and weight decay; BN biases at `bias_scaler` x the lr, same decay."""
    kilostep = 1024 * (1 + 1 / (1 - recipe.momentum))
    lr = recipe.lr / kilostep
    wd = recipe.weight_decay * recipe.batch_size / kilostep  # decay per step, as a fraction of the weights
    bn_bias = {id(m.bias) for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.bias is not None}
    biases = [p for p in model.parameters() if id(p) in bn_bias]
    others = [p for p in model.parameters() if id(p) not in bn_bias and p.requires_grad]  # + the whitening bias
    groups = [dict(params=biases, lr=lr * recipe.bias_scaler, weight_decay=wd / (lr * recipe.bias_scaler)),
              dict(params=others, lr=lr, weight_decay=wd / lr)]
    for g in groups:
        g["initial_lr"] = g["lr"]
    return torch.optim.SGD(groups, momentum=recipe.momentum, nesterov=True)


def lr_factor(step: int, total: int, start: float = 0.2, peak: float = 0.23, end: float = 0.07) -> float:
    """airbench94's triangle: `start` -> 1 at `peak` of training -> `end` at its last step."""
    top = int(peak * total)
    if step < top:
        return start + (1 - start) * step / top
    return 1 + (end - 1) * (step - top) / max(1, total - top)


class Lookahead:
    """An EMA of the weights (and BN statistics) that the model is pulled back to (Lookahead-style)."""

    def __init__(self, model: nn.Module):
        self.tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
        self.ema = [t.detach().clone() for t in self.tensors]

    @torch.no_grad()
    def update(self, decay: float) -> None:
        """Move the EMA toward the model by 1 - decay, then copy it into the model."""
        for e, t in zip(self.ema, self.tensors):
            e.lerp_(t, 1 - decay)
            t.copy_(e)


class Batches:
    """The training set on the device, augmented airbench's way; `epoch(e)` yields (images, labels) batches."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, recipe: FastRecipe, device: torch.device):
        self.recipe, self.device, self.pad = recipe, device, recipe.translate
        g = torch.Generator().manual_seed(recipe.seed)
        self.preflip = (torch.rand(len(y), generator=g) < 0.5).to(device) if recipe.flip else None
        xn = data.normalize(x.to(device))
        self.x = (F.pad(xn, (self.pad,) * 4, mode="reflect") if self.pad else xn).half()
        self.y = y.to(device)
        self.steps = max(1, len(y) // recipe.batch_size)

    def epoch(self, e: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch's batches: a seeded order and shifts (the same on CPU and GPU), flips alternating."""
        g = torch.Generator().manual_seed(self.recipe.seed * 100_003 + e)
        order = torch.randperm(len(self.y), generator=g).to(self.device)
        bs, size = self.recipe.batch_size, self.x.shape[-1] - 2 * self.pad
        ar = torch.arange(size, device=self.device)
        for i in range(self.steps):
            idx = order[i * bs:(i + 1) * bs]
            xb = self.x[idx]
            if self.pad:
                dy, dx = (torch.randint(0, 2 * self.pad + 1, (2, len(idx)), generator=g).to(self.device))
                rows = (dy[:, None] + ar)[:, None, :, None]
                cols = (dx[:, None] + ar)[:, None, None, :]
                xb = xb[torch.arange(len(idx), device=self.device)[:, None, None, None],
                        torch.arange(3, device=self.device)[None, :, None, None], rows, cols]
            if self.preflip is not None:
                flip = self.preflip[idx] ^ bool(e % 2)
                xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(3), xb)
            xb = xb.float()
            if self.recipe.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yield xb, self.y[idx]


@torch.no_grad()
def predict_views(model: nn.Module, x: torch.Tensor, level: int = 2, device: torch.device | None = None,
                  bf16: bool = False, batch_size: int = 2000) -> tuple[torch.Tensor, torch.Tensor]:
    """(plain logits, TTA logits), float32 on the CPU, of uint8 images: TTA level 1 averages the mirror image,
    level 2 also the two one-pixel shifts (up-left, down-right; reflect padding) of both."""
    device = device or next(model.parameters()).device
    was = model.training
    model.eval()
    plain, tta = [], []
    for i in range(0, len(x), batch_size):
        xb = data.normalize(x[i:i + batch_size].to(device)).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            def mirror(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                a = model(v).float()
                return a, 0.5 * (a + model(v.flip(3)).float())
            p, m = mirror(xb)
            t = p if level == 0 else m
            if level >= 2:
                xp = F.pad(xb, (1,) * 4, mode="reflect")
                shifted = [mirror(xp[:, :, :-2, :-2])[1], mirror(xp[:, :, 2:, 2:])[1]]
                t = 0.5 * m + 0.25 * (shifted[0] + shifted[1])
        plain.append(p.cpu())
        tta.append(t.cpu())
    model.train(was)
    return torch.cat(plain), torch.cat(tta)


class Trainer:
    """One fast-recipe run between epochs: the prepared model, its optimizer, batches, step and lookahead."""

    def __init__(self, model: nn.Module, train: tuple[torch.Tensor, torch.Tensor], recipe: FastRecipe,
                 device: torch.device):
        model.to(device)
        if recipe.channels_last:
            model.to(memory_format=torch.channels_last)
        prepare(model, train[0], recipe)
        self.model, self.recipe, self.device = model, recipe, device
        self.opt = optimizer(model, recipe)
        self.batches = Batches(*train, recipe, device)
        self.total = max(1, math.ceil(self.batches.steps * recipe.epochs))
        self.bf16 = use_bf16(device, recipe.bf16)
        self.step, self.lookahead = 0, None

    def steps(self, e: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """Epoch `e`'s training steps one at a time (the Lab races two runs step by step): yields each step's
        summed loss and correct count (on the device) and its number of images; stops at the last step."""
        model, r = self.model, self.recipe
        if model.conv1.bias is not None:
            model.conv1.bias.requires_grad_(e < r.whiten_bias_epochs)
        model.train()
        for xb, yb in self.batches.epoch(e):
            for g in self.opt.param_groups:
                g["lr"] = g["initial_lr"] * lr_factor(self.step, self.total)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                out = model(xb)
            loss = F.cross_entropy(out.float(), yb, label_smoothing=r.label_smoothing, reduction="sum")
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.step += 1
            self.lookahead = _lookahead_step(model, self.lookahead, r, e, self.step, self.total)
            yield loss.detach(), (out.argmax(1) == yb).sum(), len(yb)
            if self.done:
                return

    def end_epoch(self) -> None:
        """The epoch ends on the averaged weights (once the lookahead has started)."""
        if self.lookahead is not None:
            self.lookahead.update(1.0)

    def epoch(self, e: int, should_stop) -> tuple[float, float, bool]:
        """Epoch `e` up to the last step or until should_stop(): (mean loss, accuracy, stopped)."""
        loss_sum, correct, seen, stopped = torch.zeros((), device=self.device), torch.zeros((), device=self.device), 0, False
        for loss, right, n in self.steps(e):
            loss_sum += loss  # summed on the device: one read-back per epoch
            correct += right
            seen += n
            stopped = should_stop()
            if stopped:
                break
        self.end_epoch()
        return loss_sum.item() / max(1, seen), correct.item() / max(1, seen), stopped

    @property
    def done(self) -> bool:
        """Every step of the run taken."""
        return self.step >= self.total


def fit_fast(model: nn.Module, train: tuple[torch.Tensor, torch.Tensor], recipe: FastRecipe,
             test: tuple[torch.Tensor, torch.Tensor] | None = None, device: str | torch.device | None = None,
             stop: threading.Event | None = None, max_seconds: float | None = None) -> Iterator[dict]:
    """Train `model` in place with the fast recipe on uint8 images; yields one dict per epoch (loss, accuracy,
    test accuracy when `test` and `eval_every_epoch`, seconds) and a last one with kind 'done' and the history."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(recipe.seed)
    run = Trainer(model, train, recipe, device)
    history, t0, stopped, train_s = [], time.perf_counter(), False, 0.0

    def should_stop() -> bool:
        return (stop is not None and stop.is_set()) or (max_seconds is not None and time.perf_counter() - t0 > max_seconds)
    for epoch in range(math.ceil(recipe.epochs)):
        t_epoch = time.perf_counter()
        loss, acc, stopped = run.epoch(epoch, should_stop)  # its .item() waits for the device
        train_s += time.perf_counter() - t_epoch
        test_acc = None
        if test is not None and recipe.eval_every_epoch:
            test_acc = (predict_views(model, test[0], 0, device, run.bf16)[0].argmax(1) == test[1].cpu()).float().mean().item()
        history.append({"epoch": epoch + 1, "steps": run.step, "train_loss": loss, "train_acc": acc, "test_acc": test_acc,
                        "seconds": round(time.perf_counter() - t0, 2), "train_seconds": round(train_s, 2),
                        "complete": not stopped})
        yield {"kind": "epoch", **history[-1]}
        if stopped or run.step >= run.total:
            break
    model.eval()
    yield {"kind": "done", "history": history, "stopped": stopped, "seconds": time.perf_counter() - t0,
           "train_seconds": train_s}


def _lookahead_step(model: nn.Module, lookahead: Lookahead | None, recipe: FastRecipe, epoch: int, step: int,
                    total: int) -> Lookahead | None:
    """airbench's schedule: from `ema_start_epochs`, every `ema_every` steps, decay base^every x (t/T)^pow."""
    if epoch < recipe.ema_start_epochs or step % recipe.ema_every:
        return lookahead
    if lookahead is None:
        return Lookahead(model)
    lookahead.update(recipe.ema_decay_base ** recipe.ema_every * (step / total) ** recipe.ema_decay_pow)
    return lookahead


def train_and_test(model: nn.Module, train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
                   recipe: FastRecipe, device: str | torch.device | None = None, max_seconds: float | None = None,
                   log=None) -> dict:
    """One run: fit, then plain and TTA predictions on `test`; accuracies, uint8 predictions, history, seconds."""
    t0 = time.perf_counter()
    done: dict = {}
    for ev in fit_fast(model, train, recipe, test, device, max_seconds=max_seconds):
        if ev["kind"] == "done":
            done = ev
        elif log is not None:
            log(ev)
    train_s = done.get("train_seconds", time.perf_counter() - t0)  # without the per-epoch test passes
    t1 = time.perf_counter()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    plain, tta = predict_views(model, test[0], recipe.tta_level, device, use_bf16(device, recipe.bf16))
    y = test[1].cpu()
    pred, pred_tta = plain.argmax(1), tta.argmax(1)
    return {"accuracy": (pred == y).float().mean().item(), "accuracy_tta": (pred_tta == y).float().mean().item(),
            "pred": pred.to(torch.uint8), "pred_tta": pred_tta.to(torch.uint8), "history": done.get("history", []),
            "stopped": done.get("stopped", True), "train_seconds": round(train_s, 2),
            "eval_seconds": round(time.perf_counter() - t1, 2)}


def _parser() -> argparse.ArgumentParser:
    """The run's flags (data, output, subsets, device) and one per FastRecipe field."""
    ap = argparse.ArgumentParser(description="Train with the fast (airbench) recipe: " + __doc__.split("\n")[0])
    ap.add_argument("--data", default=None, help="CIFAR-10 source (default $RESNEXT_DEMO_DATA or the shared archive)")
    ap.add_argument("--out", default=None, help="checkpoint path (default weights/<model>-fast.safetensors)")
    ap.add_argument("--subset", type=int, default=None, help="train on a balanced subset (smoke runs)")
    ap.add_argument("--test-subset", type=int, default=None, help="evaluate on a balanced test subset")
    ap.add_argument("--device", default=None)
    ap.add_argument("--half", action="store_true", help="store weights as fp16")
    ap.add_argument("--max-seconds", type=float, default=None, help="stop training after this many seconds")
    for name, val in asdict(FastRecipe()).items():
        if name == "recipe":
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(val, bool):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=val)
        else:
            ap.add_argument(flag, type=type(val), default=val)
    return ap


def main(argv: list[str] | None = None) -> dict:
    """CLI: train a named model with the fast recipe, report plain and TTA test top-1, save a checkpoint."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    recipe = FastRecipe(**{k: getattr(args, k) for k in asdict(FastRecipe()) if k != "recipe"})
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    source = args.data or data.default_source()
    train = balanced_subset(*data.load_split(source, "train"), args.subset, recipe.seed)
    test = balanced_subset(*data.load_split(source, "test"), args.test_subset, recipe.seed)
    torch.manual_seed(recipe.seed)
    model = build_model(recipe.model)
    meta = {"recipe": asdict(recipe), "command": "python -m resnext_demo.train --recipe fast " + " ".join(argv),
            "data": data.source_record(source, len(train[1]), len(test[1]), 0),
            "params": count_params(model), "macs": count_macs(model),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"}

    def log(ev: dict) -> None:
        acc = "" if ev["test_acc"] is None else f" test {ev['test_acc']:.4f}"
        print(f"epoch {ev['epoch']} loss {ev['train_loss']:.4f} train {ev['train_acc']:.4f}{acc} ({ev['seconds']:.0f}s)",
              flush=True)
    t0 = time.perf_counter()
    r = train_and_test(model, train, test, recipe, device, args.max_seconds, log)
    out = Path(args.out or weights.WEIGHTS_DIR / f"{recipe.model}-fast.safetensors")
    final = {**meta, "epochs": recipe.epochs if not r["stopped"] else len(r["history"]), "history": r["history"],
             "accuracy": r["accuracy"], "accuracy_tta": r["accuracy_tta"], "tta_level": recipe.tta_level,
             "train_seconds_total": r["train_seconds"], "wall_seconds": round(time.perf_counter() - t0, 1)}
    weights.save_checkpoint(out, model, final, half=args.half)
    out.with_suffix(".curve.json").write_text(json.dumps(r["history"], indent=1))
    print(f"saved {out} (test top-1 {r['accuracy']:.4f}, TTA {r['accuracy_tta']:.4f}, "
          f"train {r['train_seconds']:.0f}s)", flush=True)
    return final


if __name__ == "__main__":
    main()
