"""Evaluation: top-1, per-class accuracy, confusion matrix, optional flip test-time augmentation.

CLI: `python -m resnext_demo.evaluate --weights W --data D [--tta] [--json] [--out-dir DIR]`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn as nn

from . import data
from .predict import predict_logits
from .splits import balanced_subset, split_validation


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """K x K counts: row = true class, column = predicted class."""
    return torch.bincount(target * num_classes + pred, minlength=num_classes**2).view(num_classes, num_classes)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, classes: tuple[str, ...] | list[str] = data.CLASSES,
             tta: bool = False, device: str | torch.device | None = None) -> dict:
    """Top-1, per-class accuracy and confusion matrix of `model` on uint8 images/labels."""
    pred = predict_logits(model, x, device=device, tta=tta).argmax(1)
    cm = confusion_matrix(pred, y.cpu(), len(classes))
    per_class = (cm.diag().float() / cm.sum(1).clamp(min=1)).tolist()
    return {"top1": (pred == y.cpu()).float().mean().item(), "n": len(y), "tta": tta,
            "per_class": dict(zip(classes, per_class)), "confusion": cm.tolist(), "classes": list(classes)}


def mean_softmax(models: list[nn.Module], x: torch.Tensor, device: str | torch.device | None = None) -> torch.Tensor:
    """The models' mean softmax on uint8 images (argmax = the ensemble's prediction; CPU, float32)."""
    return sum(predict_logits(m, x, device=device).softmax(1) for m in models) / len(models)


def ensemble_accuracy(models: list[nn.Module], x: torch.Tensor, y: torch.Tensor, tta: bool = False,
                      device: str | torch.device | None = None) -> float:
    """Top-1 of the models' mean softmax (what `train --teachers` distills from); `tta` adds mirrored images."""
    probs = mean_softmax(models, x, device)
    if tta:
        probs = probs + mean_softmax(models, x.flip(3), device)
    return (probs.argmax(1) == y.cpu()).float().mean().item()


UPLOAD_SIZES = (64, 160, 320, 640)
UPLOAD_FORMATS = ("PNG", "JPEG")


def as_upload(image: torch.Tensor, size: int, fmt: str) -> bytes:
    """One 3 x 32 x 32 uint8 test image as a user might upload it: upscaled (bicubic) to size x size and
    re-encoded (PNG, or JPEG at quality 90)."""
    import io

    from PIL import Image

    im = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((size, size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


@torch.inference_mode()
def upload_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sizes: tuple[int, ...] = UPLOAD_SIZES,
                    formats: tuple[str, ...] = UPLOAD_FORMATS) -> dict[str, float]:
    """Top-1 when each image goes through the app's upload path (`data.prepare_image` on encoded bytes:
    decode, centre-crop, Lanczos down to 32x32) after `as_upload`; keys like 'JPEG 640'."""
    out = {}
    for fmt in formats:
        for size in sizes:
            batch = torch.cat([data.pil_to_uint8(data.prepare_image(as_upload(im, size, fmt))) for im in x])
            pred = predict_logits(model, batch).argmax(1)
            out[f"{fmt} {size}"] = (pred == y.cpu()).float().mean().item()
    return out


def validation_split(meta: dict, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's own validation images, from the training split `x, y`: the --val count, seed and --subset
    that the checkpoint's metadata records (a run without a validation split has none to score)."""
    record = meta.get("data") or {}
    n = record.get("val_images") or 0
    if not n:
        raise SystemExit("this checkpoint was not trained with a validation split (train --val N): no 'val' images")
    seed = (meta.get("recipe") or {}).get("seed", 0)
    x, y = balanced_subset(x, y, record.get("train_subset"), seed)
    return split_validation(x, y, n, seed)[1]


def _parser() -> argparse.ArgumentParser:
    """The CLI's flags."""
    from . import weights

    ap = argparse.ArgumentParser(description="Evaluate a checkpoint on a CIFAR-10 split.")
    ap.add_argument("--weights", default=str(weights.DEFAULT_WEIGHTS))
    ap.add_argument("--data", default=None, help="CIFAR-10 source (default $RESNEXT_DEMO_DATA or the shared archive)")
    ap.add_argument("--split", default="test", choices=["train", "val", "test"],
                    help="val: the training images the run held out (its --val N, seed and --subset, read from the checkpoint)")
    ap.add_argument("--ensemble", nargs="+", default=[], metavar="CKPT",
                    help="also score the mean softmax of --weights and these checkpoints")
    ap.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    ap.add_argument("--tta", action="store_true", help="also report flip test-time augmentation")
    ap.add_argument("--uploads", action="store_true",
                    help="also score the images upscaled to 64-640 px and re-encoded (PNG, JPEG) as uploads")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument("--out-dir", default=None, help="write confusion.png and metrics.json here")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return ap


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    from . import weights

    args = _parser().parse_args(argv)
    model, meta = weights.load_checkpoint(args.weights, args.device)
    x, y = data.load_split(args.data, "train" if args.split == "val" else args.split)
    if args.split == "val":
        x, y = validation_split(meta, x, y)
    if args.limit:
        x, y = x[:args.limit], y[:args.limit]
    res = evaluate(model, x, y, meta["classes"], device=args.device)
    if args.tta:
        res["top1_flip_tta"] = evaluate(model, x, y, meta["classes"], tta=True, device=args.device)["top1"]
    if args.ensemble:
        models = [model] + [weights.load_checkpoint(p, args.device)[0] for p in args.ensemble]
        plain = mean_softmax(models, x, args.device)  # once: the flip-TTA figure adds the mirrored pass to it
        both = plain + mean_softmax(models, x.flip(3), args.device)
        res["ensemble"] = {"weights": [str(args.weights), *args.ensemble],
                           "top1": (plain.argmax(1) == y).float().mean().item(),
                           "top1_flip_tta": (both.argmax(1) == y).float().mean().item()}
    if args.uploads:
        res["uploads"] = upload_accuracy(model, x, y)
    res["weights"] = str(args.weights)
    if args.out_dir:
        from .charts import confusion_figure

        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(res, indent=1))
        confusion_figure(res["confusion"], res["classes"]).save(out / "confusion.png")
    if args.json:
        print(json.dumps(res))
        return
    print(f"{args.weights}: top-1 {res['top1']:.4f} on {res['n']} {args.split} images"
          + (f", flip-TTA {res['top1_flip_tta']:.4f}" if args.tta else ""))
    for c, a in res["per_class"].items():
        print(f"  {c:12} {a:.4f}")
    if args.ensemble:
        e = res["ensemble"]
        print(f"  ensemble of {len(e['weights'])} (mean softmax): top-1 {e['top1']:.4f}, flip-TTA {e['top1_flip_tta']:.4f}")
    for k, a in res.get("uploads", {}).items():
        print(f"  upload {k:9} {a:.4f} ({100 * (a - res['top1']):+.2f} points)")


if __name__ == "__main__":
    main()
