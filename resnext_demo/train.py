"""The training CLI: `python -m resnext_demo.train --model NAME [...]` trains a named model on CIFAR-10 with
`trainer.fit` and writes a safetensors checkpoint (+ .curve.json), a resume file per epoch, and under torchrun
one process per device. `--recipe fast` hands its flags to the fast (airbench) recipe, `speedrun.main`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from . import data, weights
from .evaluate import evaluate
from .model import count_macs, count_params, whiten_init
from .splits import balanced_subset, split_validation
from .trainer import Progress, TrainConfig, fit
from .zoo import build_model


def compact_resume(path: str | Path) -> Path:
    """Rewrite a resume state small enough to commit: fp16 weights, the epoch and curve, no momentum (it
    restarts from zero when resumed; the data order still continues exactly). EMA runs keep their average."""
    model, meta = weights.load_checkpoint(path)
    ema = {k: v for k, v in weights.load_extra_tensors(path).items() if k.startswith("ema")}
    meta = {k: v for k, v in meta.items() if k not in ("format", "config", "classes", "mean", "std", "dtype")}
    meta["compacted"] = "fp16 weights, momentum dropped (restarts from zero at the resumed epoch)"
    return weights.save_checkpoint(path, model, meta, half=True,
                                   extra_tensors={k: (v.half() if v.is_floating_point() else v) for k, v in ema.items()})


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
            print(f"epoch {ev.epoch}/{cfg.epochs} loss {ev.loss:.4f} train {ev.acc:.4f} {'val' if meta['data']['val_images'] else 'test'} {ev.eval_acc:.4f} "
                  f"({ev.seconds:.0f}s)", flush=True)
            weights.save_checkpoint(resume_path, model, {**meta, "epoch": ev.epoch, "history": ev.history},
                                    extra_tensors=ev.state)
        elif ev.kind == "done":
            history = ev.history
    return history


def _load_data(args: argparse.Namespace, cfg: TrainConfig, world: int, rank: int) -> tuple[str, tuple, tuple | None, tuple]:
    """(source, train, validation or None, test) as the flags ask (--subset, --test-subset, --val)."""
    source = args.data or data.default_source()
    if rank != 0:
        dist.barrier()  # rank 0 decodes and caches the data first; the others then read the cache
    train = balanced_subset(*data.load_split(source, "train", download=args.download), args.subset, cfg.seed)
    test = balanced_subset(*data.load_split(source, "test", download=args.download), args.test_subset, cfg.seed)
    if rank == 0 and world > 1:
        dist.barrier()
    val = None
    if args.val:
        train, val = split_validation(*train, args.val, cfg.seed)
    return source, train, val, test


def _final_record(model: nn.Module, meta: dict, history: list[dict], val: tuple | None, test: tuple,
                  device: torch.device, t_start: float) -> dict:
    """The checkpoint's metadata at the end: accuracy, timings, and for --val runs the test split scored once."""
    final = {**meta, "epochs": len(history), "history": history, "accuracy": history[-1]["test_acc"],
             "wall_seconds": round(time.perf_counter() - t_start, 1),
             # over all resumed pieces of the run (wall_seconds is only the last piece)
             "train_seconds_total": round(sum(h.get("epoch_seconds", 0) for h in history), 1)}
    if val is not None:  # epochs were scored on the validation split: now, once, the test split
        plain, tta = evaluate(model, *test, device=device), evaluate(model, *test, tta=True, device=device)
        final.update(val_accuracy=history[-1]["test_acc"], accuracy=plain["top1"], accuracy_tta=tta["top1"],
                     per_class=plain["per_class"],  # and the curve says what its accuracy was measured on
                     history=[{("val_acc" if k == "test_acc" else k): v for k, v in h.items()} for h in history])
    return final


def _run_meta(args: argparse.Namespace, argv: list[str] | None, cfg: TrainConfig, model: nn.Module, source: str,
              sizes: tuple[int, int], world: int, device: torch.device) -> dict:
    """What the checkpoint records about the run before it starts (recipe, command, data, budget, device)."""
    return {"recipe": asdict(cfg), "command": "python -m resnext_demo.train " + " ".join(argv or sys.argv[1:]),
            # train_subset: `evaluate --split val` re-draws the same validation images from it
            "data": {**data.source_record(source, *sizes, args.val), "train_subset": args.subset},
            "params": count_params(model), "macs": count_macs(model), "world_size": world,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"}


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
    source, train, val, test = _load_data(args, cfg, world, rank)
    model = build_model(cfg.model, zero_init_residual=True)
    if cfg.whiten and not args.resume:
        whiten_init(model.conv1, data.normalize(train[0][:5000]))
    meta = _run_meta(args, argv, cfg, model, source, (len(train[1]), len(test[1])), world, device)
    meta["init_from"] = _warm_start(model, args.init_from, cfg) if args.init_from else None  # a fresh schedule
    teachers, teacher_record = _load_teachers(cfg.teachers)
    meta["teachers"] = teacher_record or None
    start, state, history = 0, None, []
    if args.resume and resume_path.is_file():
        start, state, history = _resume(model, resume_path, cfg)
        if rank == 0:
            print(f"resuming {cfg.model} at epoch {start}")
    t_start = time.perf_counter()
    events = fit(model, train, cfg, val or test, device, start, state, history, teachers=teachers)
    history = _report(events, cfg, model, resume_path, meta, rank, history)
    if rank == 0:
        final = _final_record(model, meta, history, val, test, device, t_start)
        weights.save_checkpoint(out, model, final, half=args.half)
        out.with_suffix(".curve.json").write_text(json.dumps(final["history"], indent=1))
        resume_path.unlink(missing_ok=True)
        print(f"saved {out} (test top-1 {final['accuracy']:.4f})")
    print(f"rank {rank} final-params-sha256 {weights.state_digest(model, float32=True)}", flush=True)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
