"""Training: `fit()` is a generator shared by the CLI (`python -m resnext_demo.train`) and the UI's
fine-tune tab, so both get the same recipe, live progress and a way to stop.

The whole uint8 dataset sits on the training device and is augmented there (random crop with
padding, flip, optional cutout), so no data loader can be the bottleneck. Random choices (order, crops,
flips, cutout) come from a CPU generator seeded per epoch: CPU and GPU runs see the same batches, and a
resumed run continues exactly where it stopped.
"""
from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from . import data
from .predict import predict_logits


@dataclass
class TrainConfig:
    """The training recipe; stored in the checkpoint's metadata."""

    model: str = "resnext20_8x8d_fast"  # the CPU-trained model's architecture (docs/model-card.md)
    epochs: int = 30
    batch_size: int = 128  # global batch (split across processes under torchrun)
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    schedule: str = "cosine"  # "cosine" (linear warm-up then cosine), "onecycle" (triangle), "constant"
    warmup_epochs: float = 1.0
    crop_padding: int = 4
    flip: bool = True
    cutout: int = 0  # side of the erased square, 0 = off
    whiten: bool = False  # fast family: stem conv initialised to patch whitening (airbench)
    ema_decay: float = 0.0  # 0 = off; e.g. 0.999 evaluates and saves an exponential moving average
    teachers: str = ""  # comma-separated checkpoints: train on their mean softmax instead of the labels
    teacher_tta: bool = False  # teachers also see the mirrored batch (their flip-TTA softmax, a better target)
    bf16: bool = True  # autocast on CUDA, and on CPUs with native bf16 (AVX512-BF16/AMX), see cpu_bf16_fast()
    channels_last: bool = True
    compile: bool = False
    seed: int = 0
    train_layers: str = "all"  # "all", "last_stage" or "head" (fine-tuning)
    max_seconds: float | None = None  # wall-time cap (the UI's server-side limit)
    log_every: int = 10  # steps between "step" events


@dataclass
class Progress:
    """One event from fit(): kind 'step' (running averages), 'epoch' (with the accuracy on fit's `eval_set`)
    or 'done'."""

    kind: str
    epoch: int
    step: int
    steps_per_epoch: int
    loss: float
    acc: float
    lr: float
    seconds: float
    eval_acc: float | None = None  # on the images passed as eval_set: a validation or held-out split, or test
    stopped: bool = False
    history: list[dict] = field(default_factory=list)
    state: dict | None = None  # 'epoch'/'done' only: tensors to resume from (optimizer, EMA)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at `step` of `total`."""
    if schedule == "constant":
        return 1.0
    if schedule == "onecycle":  # linear up for 25 % of training, linear down to 0
        peak = max(1, total // 4)
        return step / peak if step < peak else max(0.0, (total - step) / max(1, total - peak))
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def augment(x: torch.Tensor, g: torch.Generator, padding: int = 4, flip: bool = True, cutout: int = 0) -> torch.Tensor:
    """uint8 batch on any device -> normalized float batch, randomly cropped/flipped/cut out."""
    b, _, h, w = x.shape
    dev = x.device
    if padding:
        xp = F.pad(x, (padding,) * 4)
        oy = torch.randint(0, 2 * padding + 1, (b,), generator=g).to(dev)
        ox = torch.randint(0, 2 * padding + 1, (b,), generator=g).to(dev)
        rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, None, :]
        x = xp[torch.arange(b, device=dev)[:, None, None, None], torch.arange(3, device=dev)[None, :, None, None], rows, cols]
    if flip:
        m = (torch.rand(b, generator=g) < 0.5).to(dev).view(b, 1, 1, 1)
        x = torch.where(m, x.flip(3), x)
    x = data.normalize(x)
    if cutout:
        cy = torch.randint(0, h, (b,), generator=g).to(dev)[:, None, None, None]
        cx = torch.randint(0, w, (b,), generator=g).to(dev)[:, None, None, None]
        r = torch.arange(h, device=dev).view(1, 1, h, 1)
        c = torch.arange(w, device=dev).view(1, 1, 1, w)
        hole = ((r - cy).abs() <= cutout // 2) & ((c - cx).abs() <= cutout // 2)
        x = x.masked_fill(hole, 0.0)  # 0 after normalization = the mean colour
    return x


def cpu_bf16_fast() -> bool:
    """True where CPU bf16 autocast is native (AVX512-BF16 or AMX): 1.6-1.9x the fp32 training speed on
    Zen 4 (`python -m resnext_demo.bench --train`); elsewhere it is emulated and slower than fp32."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(last stage, head) of any model of the family."""
    return getattr(model, model.stage_names[-1]), model.fc


def trainable_modules(model: nn.Module, which: str) -> list[nn.Module]:
    """The modules that `train_layers` = 'all' / 'last_stage' / 'head' trains."""
    last, head = _parts(model)
    return {"all": [model], "last_stage": [last, head], "head": [head]}[which]


def _set_train_mode(model: nn.Module, train: list[nn.Module]) -> None:
    """Train mode only inside the trained modules: frozen BatchNorms keep their statistics."""
    model.eval()
    for m in train:
        m.train()


@dataclass(eq=False)
class _Run:
    """What fit() sets up once: the network it steps (DDP/compiled wrapper or the model), the optimizer and
    EMA, the data on the device and the schedule's length."""

    net: nn.Module
    train_mods: list[nn.Module]
    params: list[nn.Parameter]
    opt: torch.optim.Optimizer
    ema: nn.Module | None
    teachers: list[nn.Module]
    criterion: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    device: torch.device
    world: int
    rank: int
    local_bs: int
    steps: int
    bf16: bool


def _trainable_params(model: nn.Module, train_mods: list[nn.Module]) -> list[nn.Parameter]:
    """Freeze everything, then unfreeze the trained modules: the optimizer's parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for m in train_mods for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


def _setup(model: nn.Module, train: tuple[torch.Tensor, torch.Tensor], cfg: TrainConfig,
           device: str | torch.device | None, resume_state: dict | None, teachers: list[nn.Module] | None) -> _Run:
    """Move the model (and teachers) to the device, wrap it, build the optimizer/EMA and restore a resume state."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    world = dist.get_world_size() if dist.is_initialized() else 1
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    train_mods = trainable_modules(model, cfg.train_layers)
    params = _trainable_params(model, train_mods)
    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                          weight_decay=cfg.weight_decay)
    ema = None
    if cfg.ema_decay > 0:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn  # only EMA runs pay for it
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    if resume_state:
        _restore_state(opt, params, ema, resume_state)
    teachers = [t.to(device).eval() for t in teachers or []]
    for t in teachers:
        if cfg.channels_last:
            t.to(memory_format=torch.channels_last)
    # soft targets already carry the teachers' smoothing: no label smoothing on top of them
    criterion = nn.CrossEntropyLoss(label_smoothing=0.0 if teachers else cfg.label_smoothing)
    local_bs = max(1, cfg.batch_size // world)
    return _Run(net, train_mods, params, opt, ema, teachers, criterion, train[0].to(device), train[1].to(device),
                device, world, dist.get_rank() if dist.is_initialized() else 0, local_bs,
                max(1, (len(train[1]) // world) // local_bs), cfg.bf16 and (device.type == "cuda" or cpu_bf16_fast()))


def _step(run: _Run, model: nn.Module, cfg: TrainConfig, idx: torch.Tensor, g: torch.Generator
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step on the examples `idx`: (logits, loss, labels)."""
    xb = augment(run.x[idx], g, cfg.crop_padding, cfg.flip, cfg.cutout)
    if cfg.channels_last:
        xb = xb.contiguous(memory_format=torch.channels_last)
    yb = run.y[idx]
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.bf16):
        target = soft_targets(run.teachers, xb, cfg.teacher_tta) if run.teachers else yb
        out = run.net(xb)
        loss = run.criterion(out.float(), target)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    run.opt.step()
    if run.ema is not None:
        run.ema.update_parameters(model)
    return out, loss, yb


def _epoch(run: _Run, model: nn.Module, cfg: TrainConfig, epoch: int, t0: float,
           stop: threading.Event | None) -> Iterator[Progress]:
    """One epoch's steps, yielding 'step' events; returns (mean loss, train accuracy, stopped early?)."""
    g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)  # per epoch: resume is exact
    order = torch.randperm(len(run.y), generator=g)[run.rank::run.world]
    total, warmup = cfg.epochs * run.steps, int(cfg.warmup_epochs * run.steps)
    _set_train_mode(model, run.train_mods)
    loss_sum = torch.zeros((), device=run.device)
    correct = torch.zeros((), device=run.device)
    seen, stopped = 0, False
    for step in range(run.steps):
        for pg in run.opt.param_groups:
            pg["lr"] = cfg.lr * lr_factor(epoch * run.steps + step, total, warmup, cfg.schedule)
        out, loss, yb = _step(run, model, cfg, order[step * run.local_bs:(step + 1) * run.local_bs].to(run.device), g)
        # Accumulate on the device; read back only when reporting (a .item() per step stalls a GPU).
        loss_sum += loss.detach() * len(yb)
        correct += (out.argmax(1) == yb).sum()
        seen += len(yb)
        stopped = (stop is not None and stop.is_set()) or \
            (cfg.max_seconds is not None and time.perf_counter() - t0 > cfg.max_seconds)
        if (step + 1) % cfg.log_every == 0 or step + 1 == run.steps or stopped:
            yield Progress("step", epoch, step + 1, run.steps, loss_sum.item() / seen, correct.item() / seen,
                           run.opt.param_groups[0]["lr"], time.perf_counter() - t0)
        if stopped:
            break
    return loss_sum.item() / max(1, seen), correct.item() / max(1, seen), stopped


def fit(model: nn.Module, train: tuple[torch.Tensor, torch.Tensor], cfg: TrainConfig,
        eval_set: tuple[torch.Tensor, torch.Tensor] | None = None, device: str | torch.device | None = None,
        start_epoch: int = 0, resume_state: dict | None = None, history: list[dict] | None = None,
        stop: threading.Event | None = None, teachers: list[nn.Module] | None = None) -> Iterator[Progress]:
    """Train `model` in place on uint8 images/labels, yielding Progress events; `stop` ends it early. Each epoch
    is scored on `eval_set` (a validation or held-out split; stored as the history's 'test_acc', the checkpoint
    format's name). With `teachers` (distillation) the targets are their mean softmax on the same batch."""
    run = _setup(model, train, cfg, device, resume_state, teachers)
    history, t0, stopped = list(history or []), time.perf_counter(), False
    for epoch in range(start_epoch, cfg.epochs):
        t_epoch = time.perf_counter()
        loss, acc, stopped = yield from _epoch(run, model, cfg, epoch, t0, stop)
        if run.world > 1:  # BN statistics are per rank; rank 0's are the ones evaluated and saved
            for b in model.buffers():
                dist.broadcast(b, 0)
        scored = run.ema.module if run.ema is not None else model
        eval_acc = accuracy(scored, *eval_set, run.device, run.bf16) if eval_set is not None else None
        history.append({"epoch": epoch + 1, "train_loss": loss, "train_acc": acc, "test_acc": eval_acc,
                        "seconds": round(time.perf_counter() - t0, 2),
                        "epoch_seconds": round(time.perf_counter() - t_epoch, 2), "complete": not stopped})
        yield Progress("epoch", epoch + 1, run.steps, run.steps, loss, acc, run.opt.param_groups[0]["lr"],
                       time.perf_counter() - t0, eval_acc, stopped, history, _training_state(run.opt, run.params, run.ema))
        if stopped:
            break
    if run.ema is not None:  # what we evaluated is what we hand back
        model.load_state_dict(run.ema.module.state_dict())
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    last = history[-1] if history else {}
    yield Progress("done", last.get("epoch", start_epoch), run.steps, run.steps, last.get("train_loss", float("nan")),
                   last.get("train_acc", float("nan")), 0.0, time.perf_counter() - t0, last.get("test_acc"), stopped,
                   history)


@torch.no_grad()  # not inference_mode: its tensors cannot enter the student's autograd graph
def soft_targets(teachers: list[nn.Module], x: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """The teachers' mean softmax on a normalized batch: an ensemble's knowledge as a training target.
    `tta` averages each teacher over the batch and its mirror image (one forward pass of both)."""
    views = torch.cat([x, x.flip(3)]) if tta else x
    p = torch.stack([t(views).float().softmax(1) for t in teachers]).mean(0)
    return p.view(-1, len(x), p.shape[1]).mean(0)  # (views, batch, classes) -> batch x classes


def _training_state(opt: torch.optim.Optimizer, params: list[nn.Parameter], ema) -> dict[str, torch.Tensor]:
    """Optimizer momentum and EMA tensors, flat, for a safetensors resume file."""
    state = {}
    for i, p in enumerate(params):
        buf = opt.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            state[f"optim.{i}"] = buf
    if ema is not None:
        for k, v in ema.module.state_dict().items():
            state[f"ema.{k}"] = v
        state["ema_n_averaged"] = ema.n_averaged
    return state


def _restore_state(opt: torch.optim.Optimizer, params: list[nn.Parameter], ema, state: dict) -> None:
    """Inverse of _training_state."""
    for i, p in enumerate(params):
        if f"optim.{i}" in state:
            opt.state[p]["momentum_buffer"] = state[f"optim.{i}"].to(p.device, p.dtype).clone()
    if ema is not None and "ema_n_averaged" in state:
        ema.module.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("ema.")})
        ema.n_averaged.copy_(state["ema_n_averaged"])


@torch.inference_mode()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: str | torch.device | None = None,
             bf16: bool = False) -> float:
    """Top-1 accuracy of `model` on uint8 images (restores the model's train/eval mode)."""
    was = model.training
    logits = predict_logits(model, x, device=device, bf16=bf16)
    model.train(was)
    return (logits.argmax(1).cpu() == y.cpu()).float().mean().item()

