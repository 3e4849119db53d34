"""Training: `fit()` is a generator shared by the CLI (`python -m resnext_demo.train`) and the UI's
fine-tune tab, so both get the same recipe, live progress and a way to stop.

The whole uint8 dataset sits on the training device and is augmented there (random crop with
padding, flip, optional cutout), so no data loader can be the bottleneck. Random choices (order, crops,
flips, cutout) come from a CPU generator seeded per epoch: CPU and GPU runs see the same batches, and a
resumed run continues exactly where it stopped.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from . import data, weights
from .evaluate import predict_logits
from .model import count_macs, count_params
from .zoo import build_model


@dataclass
class TrainConfig:
    """The training recipe; stored in the checkpoint's metadata."""

    model: str = "resnext29_8x8d_tiny"
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
    """One event from fit(): kind 'step' (running averages), 'epoch' (with test accuracy) or 'done'."""

    kind: str
    epoch: int
    step: int
    steps_per_epoch: int
    loss: float
    acc: float
    lr: float
    seconds: float
    test_acc: float | None = None
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


def split_validation(x: torch.Tensor, y: torch.Tensor, n: int, seed: int = 0
                     ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(train, val): a class-balanced hold-out of n training images for recipe choices (the test split
    stays untouched until the final report)."""
    g = torch.Generator().manual_seed(seed)
    k = n // len(y.unique())
    val = torch.cat([torch.nonzero(y == c).flatten()[torch.randperm(int((y == c).sum()), generator=g)[:k]]
                     for c in y.unique()])
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[val] = False
    return (x[keep], y[keep]), (x[val], y[val])


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


def fit(model: nn.Module, train: tuple[torch.Tensor, torch.Tensor], cfg: TrainConfig,
        test: tuple[torch.Tensor, torch.Tensor] | None = None, device: str | torch.device | None = None,
        start_epoch: int = 0, resume_state: dict | None = None, history: list[dict] | None = None,
        stop: threading.Event | None = None, teachers: list[nn.Module] | None = None) -> Iterator[Progress]:
    """Train `model` in place on uint8 images/labels, yielding Progress events; `stop` ends it early.
    With `teachers` (distillation) the targets are their mean softmax on the same augmented batch."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    train_mods = trainable_modules(model, cfg.train_layers)
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for m in train_mods for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                          weight_decay=cfg.weight_decay)
    ema = None
    if cfg.ema_decay > 0:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    if resume_state:
        _restore_state(opt, params, ema, resume_state)
    teachers = [t.to(device).eval() for t in teachers or []]
    for t in teachers:
        if cfg.channels_last:
            t.to(memory_format=torch.channels_last)
    # soft targets already carry the teachers' smoothing: no label smoothing on top of them
    criterion = nn.CrossEntropyLoss(label_smoothing=0.0 if teachers else cfg.label_smoothing)
    x_all, y_all = train[0].to(device), train[1].to(device)
    n = len(y_all)
    local_bs = max(1, cfg.batch_size // world)
    steps = max(1, (n // world) // local_bs)
    total, warmup = cfg.epochs * steps, int(cfg.warmup_epochs * steps)
    use_bf16 = cfg.bf16 and (device.type == "cuda" or cpu_bf16_fast())
    history = list(history or [])
    t0 = time.perf_counter()
    stopped = False
    loss_sum = correct = seen = 0.0
    for epoch in range(start_epoch, cfg.epochs):
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)  # per epoch: resume is exact
        order = torch.randperm(n, generator=g)[rank::world]
        t_epoch = time.perf_counter()
        _set_train_mode(model, train_mods)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        seen = 0
        for step in range(steps):
            for pg in opt.param_groups:
                pg["lr"] = cfg.lr * lr_factor(epoch * steps + step, total, warmup, cfg.schedule)
            idx = order[step * local_bs:(step + 1) * local_bs].to(device)
            xb = augment(x_all[idx], g, cfg.crop_padding, cfg.flip, cfg.cutout)
            if cfg.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yb = y_all[idx]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                target = soft_targets(teachers, xb, cfg.teacher_tta) if teachers else yb
                out = net(xb)
                loss = criterion(out.float(), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ema is not None:
                ema.update_parameters(model)
            # Accumulate on the device; read back only when reporting (a .item() per step stalls a GPU).
            loss_sum += loss.detach() * len(yb)
            correct += (out.argmax(1) == yb).sum()
            seen += len(yb)
            stopped = (stop is not None and stop.is_set()) or \
                (cfg.max_seconds is not None and time.perf_counter() - t0 > cfg.max_seconds)
            if (step + 1) % cfg.log_every == 0 or step + 1 == steps or stopped:
                yield Progress("step", epoch, step + 1, steps, loss_sum.item() / seen, correct.item() / seen,
                               opt.param_groups[0]["lr"], time.perf_counter() - t0)
            if stopped:
                break
        if world > 1:  # BN statistics are per rank; rank 0's are the ones evaluated and saved
            for b in model.buffers():
                dist.broadcast(b, 0)
        eval_model = ema.module if ema is not None else model
        test_acc = None
        if test is not None:
            test_acc = accuracy(eval_model, test[0], test[1], device, use_bf16)
        history.append({"epoch": epoch + 1, "train_loss": loss_sum.item() / max(1, seen),
                        "train_acc": correct.item() / max(1, seen), "test_acc": test_acc,
                        "seconds": round(time.perf_counter() - t0, 2),
                        "epoch_seconds": round(time.perf_counter() - t_epoch, 2), "complete": not stopped})
        yield Progress("epoch", epoch + 1, steps, steps, history[-1]["train_loss"], history[-1]["train_acc"],
                       opt.param_groups[0]["lr"], time.perf_counter() - t0, test_acc, stopped, history,
                       _training_state(opt, params, ema))
        if stopped:
            break
    if ema is not None:  # what we evaluated is what we hand back
        model.load_state_dict(ema.module.state_dict())
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    last = history[-1] if history else {}
    yield Progress("done", last.get("epoch", start_epoch), steps, steps,
                   last.get("train_loss", float("nan")), last.get("train_acc", float("nan")), 0.0,
                   time.perf_counter() - t0, last.get("test_acc"), stopped, history)


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


def compact_resume(path: str | Path) -> Path:
    """Rewrite a resume state small enough to commit: fp16 weights, the epoch and curve, no momentum (it
    restarts from zero when resumed; the data order still continues exactly). EMA runs keep their average."""
    model, meta = weights.load_checkpoint(path)
    ema = {k: v for k, v in weights.load_extra_tensors(path).items() if k.startswith("ema")}
    meta = {k: v for k, v in meta.items() if k not in ("format", "config", "classes", "mean", "std", "dtype")}
    meta["compacted"] = "fp16 weights, momentum dropped (restarts from zero at the resumed epoch)"
    return weights.save_checkpoint(path, model, meta, half=True,
                                   extra_tensors={k: (v.half() if v.is_floating_point() else v) for k, v in ema.items()})


subset = data.balanced_subset  # moved to data (the fast recipe uses it too); kept under its old name


def _parser() -> argparse.ArgumentParser:
    """The CLI's flags: the run's own (data, output, resume, validation) and one per TrainConfig field."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " (--recipe fast: see speedrun)")
    d = TrainConfig()
    ap.add_argument("--model", default=d.model)
    ap.add_argument("--data", default=None, help="CIFAR-10 source (torchvision root, image folder or .tar.gz); "
                    "default $RESNEXT_DEMO_DATA or ../shared/cifar10/cifar10-jpeg.tar.gz")
    ap.add_argument("--download", action="store_true", help="let torchvision download CIFAR-10 into --data")
    ap.add_argument("--out", default=str(weights.WEIGHTS_DIR / "trained.safetensors"))
    ap.add_argument("--resume", action="store_true", help="continue from <out>.resume.safetensors if present")
    ap.add_argument("--compact-resume", action="store_true",
                    help="only rewrite <out>.resume.safetensors small enough to commit (fp16, no momentum) and exit")
    ap.add_argument("--subset", type=int, default=None, help="train on a balanced subset (smoke runs)")
    ap.add_argument("--test-subset", type=int, default=None, help="evaluate on a balanced test subset")
    ap.add_argument("--val", type=int, default=0, metavar="N",
                    help="hold out N training images as a validation split: epochs are scored on it and the "
                         "test split is read only once, at the end (recipe choices never see it)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--half", action="store_true", help="store weights as fp16")
    ap.add_argument("--init-from", default=None, metavar="CKPT",
                    help="start from this checkpoint's weights (same architecture) with a fresh schedule")
    for name, val in asdict(d).items():
        if name in ("model",):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(val, bool):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=val)
        else:
            ap.add_argument(flag, type=type(val) if val is not None else float, default=val)
    return ap


def _distributed(device_flag: str | None) -> tuple[int, int, torch.device]:
    """(world size, rank, device) under torchrun (gloo on CPU, NCCL on GPUs) or alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        backend = "nccl" if torch.cuda.is_available() and device_flag != "cpu" else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    rank = dist.get_rank() if world > 1 else 0
    device = torch.device(device_flag or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available()
                                          else "cpu"))
    return world, rank, device


def _warm_start(model: nn.Module, path: str, cfg: TrainConfig) -> dict:
    """--init-from: copy a checkpoint's weights into `model` (same architecture); what to record about it."""
    init_model, init_meta = weights.load_checkpoint(path)
    if init_meta["config"] != model.config:
        sys.exit(f"{path} is a {init_meta['config']}, not {cfg.model}")
    model.load_state_dict(init_model.state_dict())
    return {"path": str(path), "sha256": data.sha256_file(path), "accuracy": init_meta.get("accuracy"),
            "epochs": init_meta.get("epochs"), "command": init_meta.get("command")}


def _load_teachers(paths: str) -> tuple[list[nn.Module], list[dict]]:
    """--teachers: the checkpoints to distill from, and what to record about each (path, sha256, accuracy)."""
    models, record = [], []
    for path in filter(None, (p.strip() for p in paths.split(","))):
        teacher, meta = weights.load_checkpoint(path)
        models.append(teacher)
        record.append({"path": path, "sha256": data.sha256_file(path), "model": meta.get("recipe", {}).get("model"),
                       "accuracy": meta.get("accuracy"), "val_accuracy": meta.get("val_accuracy"),
                       "train_images": meta.get("data", {}).get("train_images")})
    return models, record


def _resume(model: nn.Module, resume_path: Path, cfg: TrainConfig) -> tuple[int, dict | None, list[dict]]:
    """(epoch reached, optimizer/EMA tensors, history) from a resume file, its weights loaded into `model`."""
    resumed, meta = weights.load_checkpoint(resume_path)
    if meta["recipe"]["model"] != cfg.model:
        sys.exit(f"{resume_path} is a {meta['recipe']['model']} run, not {cfg.model}")
    model.load_state_dict(resumed.state_dict())
    return meta["epoch"], weights.load_extra_tensors(resume_path), meta["history"]


_data_record = data.source_record


def _report(events: Iterator[Progress], cfg: TrainConfig, model: nn.Module, resume_path: Path, meta: dict,
            rank: int, history: list[dict]) -> list[dict]:
    """Drive fit(): a progress bar per epoch, one line and a resume file per epoch (rank 0); the final history
    (`history`, the resumed one, when fit() ends without a 'done' event)."""
    from tqdm import tqdm

    bar = None
    for ev in events:
        if rank != 0:
            continue
        if ev.kind == "step":
            if bar is None:
                bar = tqdm(total=ev.steps_per_epoch, desc=f"epoch {ev.epoch + 1}/{cfg.epochs}", leave=False,
                           disable=None)
            bar.n = ev.step
            bar.set_postfix(loss=f"{ev.loss:.3f}", acc=f"{ev.acc:.3f}", lr=f"{ev.lr:.4f}", refresh=True)
        elif ev.kind == "epoch":
            if bar is not None:
                bar.close()
                bar = None
            print(f"epoch {ev.epoch}/{cfg.epochs} loss {ev.loss:.4f} train {ev.acc:.4f} test {ev.test_acc:.4f} "
                  f"({ev.seconds:.0f}s)", flush=True)
            weights.save_checkpoint(resume_path, model, {**meta, "epoch": ev.epoch, "history": ev.history},
                                    extra_tensors=ev.state)
        elif ev.kind == "done":
            history = ev.history
    return history


def main(argv: list[str] | None = None) -> None:
    """CLI: train a named model on CIFAR-10 and write a safetensors checkpoint (+ .curve.json).
    `--recipe fast` hands the other flags to the fast (airbench) recipe, `speedrun.main`."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", choices=("standard", "fast"), default="standard")
    recipe, argv = pre.parse_known_args(sys.argv[1:] if argv is None else argv)
    if recipe.recipe == "fast":
        from . import speedrun  # its own module and flags (python -m resnext_demo.train --recipe fast --help)
        speedrun.main(argv)
        return
    args = _parser().parse_args(argv)
    cfg = TrainConfig(**{k: getattr(args, k) for k in asdict(TrainConfig())})
    out = Path(args.out)
    resume_path = out.with_suffix(".resume.safetensors")
    if args.compact_resume:
        path = compact_resume(resume_path)
        print(f"{path}: {path.stat().st_size / 1e6:.1f} MB")
        return

    world, rank, device = _distributed(args.device)
    torch.manual_seed(cfg.seed)
    source = args.data or data.default_source()
    if rank != 0:
        dist.barrier()  # rank 0 decodes and caches the data first; the others then read the cache
    x_tr, y_tr = subset(*data.load_split(source, "train", download=args.download), args.subset, cfg.seed)
    x_te, y_te = subset(*data.load_split(source, "test", download=args.download), args.test_subset, cfg.seed)
    if rank == 0 and world > 1:
        dist.barrier()
    model = build_model(cfg.model, zero_init_residual=True)
    val = None
    if args.val:
        (x_tr, y_tr), val = split_validation(x_tr, y_tr, args.val, cfg.seed)
    if cfg.whiten and not args.resume:
        from .model import whiten_init
        whiten_init(model.conv1, data.normalize(x_tr[:5000]))
    init = _warm_start(model, args.init_from, cfg) if args.init_from else None  # a fresh schedule and history
    teachers, teacher_record = _load_teachers(cfg.teachers)
    start, state, history = 0, None, []
    if args.resume and resume_path.is_file():
        start, state, history = _resume(model, resume_path, cfg)
        if rank == 0:
            print(f"resuming {cfg.model} at epoch {start}")
    meta = {"recipe": asdict(cfg), "command": "python -m resnext_demo.train " + " ".join(argv or sys.argv[1:]),
            "data": _data_record(source, len(y_tr), len(y_te), args.val),
            "params": count_params(model), "macs": count_macs(model), "world_size": world, "init_from": init,
            "teachers": teacher_record or None,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"}
    t_start = time.perf_counter()
    history = _report(fit(model, (x_tr, y_tr), cfg, val or (x_te, y_te), device, start, state, history,
                          teachers=teachers),
                      cfg, model, resume_path, meta, rank, history)
    if rank == 0:
        final = {**meta, "epochs": len(history), "history": history, "accuracy": history[-1]["test_acc"],
                 "wall_seconds": round(time.perf_counter() - t_start, 1),
                 # over all resumed pieces of the run (wall_seconds is only the last piece)
                 "train_seconds_total": round(sum(h.get("epoch_seconds", 0) for h in history), 1)}
        if val is not None:  # epochs were scored on the validation split: now, once, the test split
            from .evaluate import evaluate
            plain, tta = evaluate(model, x_te, y_te, device=device), evaluate(model, x_te, y_te, tta=True, device=device)
            final.update(val_accuracy=history[-1]["test_acc"], accuracy=plain["top1"], accuracy_tta=tta["top1"],
                         per_class=plain["per_class"],  # and the curve says what its accuracy was measured on
                         history=[{("val_acc" if k == "test_acc" else k): v for k, v in h.items()} for h in history])
            history = final["history"]
        weights.save_checkpoint(out, model, final, half=args.half)
        out.with_suffix(".curve.json").write_text(json.dumps(history, indent=1))
        resume_path.unlink(missing_ok=True)
        print(f"saved {out} (test top-1 {final['accuracy']:.4f})")
    print(f"rank {rank} final-params-sha256 {weights.state_digest(model, float32=True)}", flush=True)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
