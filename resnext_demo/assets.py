"""The files shipped in `resnext_demo/assets/`, and the commands that make them.

- The **sample pack** (`data.SAMPLE_PACK`): the first 50 images of each class of a CIFAR-10 test split, so an
  app without a full CIFAR-10 source (a Hugging Face Space) still has a gallery, random and misclassified test
  images, a CIFAR-10 subset to fine-tune on and a forgetting check. One safetensors file of uint8 tensors; its
  metadata names the source archive (file name and sha256), the selection rule and the command.
- The default checkpoint's **group-specialization cache** on the sample pack, so the first visitor of the
  Groups tab's specialization view does not wait for it. Its name holds the checkpoint's digest: a new default
  checkpoint needs `python -m resnext_demo.assets specialization` (a test fails until then).

    python -m resnext_demo.assets pack --data ../shared/cifar10/cifar10-jpeg.tar.gz
    python -m resnext_demo.assets specialization
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from . import data

PER_CLASS = 50  # at most 500 images: a few MB in the repository
FINETUNE_PER_CLASS = 10  # of those, the last ones per class: the fine-tune tab's CIFAR-10 subset, never scored
FORMAT = "resnext-demo CIFAR-10 sample pack v1"


def _interleave(per_class: list[torch.Tensor]) -> torch.Tensor:
    """[indices of class 0, of class 1, …] (equal lengths) -> c0[0] c1[0] … c9[0] c0[1] …: every prefix is balanced."""
    return torch.stack(per_class, 1).reshape(-1)


def build_pack(source: str | Path, out: str | Path = data.SAMPLE_PACK, per_class: int = PER_CLASS,
               finetune_per_class: int = FINETUNE_PER_CLASS) -> Path:
    """Write the sample pack from `source`'s test split: per class, the first `per_class` images in the split's
    order (file names sorted); the last `finetune_per_class` of them form the pack's 'train' part."""
    from safetensors.torch import save_file

    x, y = data.load_split(source, "test")
    chosen = []
    for c, name in enumerate(data.CLASSES):
        idx = torch.nonzero(y == c).flatten()[:per_class]
        if len(idx) < per_class:
            raise ValueError(f"{source}: only {len(idx)} test images of class {name!r}, {per_class} needed")
        chosen.append(idx)
    keep = per_class - finetune_per_class
    test = _interleave([i[:keep] for i in chosen])
    train = _interleave([i[keep:] for i in chosen])
    p = Path(source)
    meta = {
        "format": FORMAT,
        "source": p.name,
        "source_sha256": data.sha256_file(p) if p.is_file() else None,
        "rule": (f"the first {per_class} images of each class of the source's test split, in the source's order "
                 f"(file names sorted for an image folder); per class the first {keep} form 'test' (gallery, "
                 f"random and misclassified images, forgetting check, group specialization) and the last "
                 f"{finetune_per_class} 'train' (the fine-tune tab's CIFAR-10 subset, so no scored image is trained on)"),
        "classes": list(data.CLASSES),
        "command": f"python -m resnext_demo.assets pack --data {p.name}",
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # One metadata key: safetensors writes several in a random order, and the pack's bytes (its sha256 keys the
    # shipped specialization cache) must not change when it is rebuilt from the same source.
    save_file({"test.images": x[test].contiguous(), "test.labels": y[test].contiguous(),
               "train.images": x[train].contiguous(), "train.labels": y[train].contiguous()}, str(out),
              {data.PACK_KEY: json.dumps(meta)})
    return out


def build_specialization(weights_path: str | Path | None = None, source: str | Path = data.SAMPLE_PACK) -> Path:
    """Compute the checkpoint's group specialization on the sample pack into `assets/` (replacing any other)."""
    from . import specialization, weights

    model, _ = weights.load_checkpoint(weights_path or weights.DEFAULT_WEIGHTS)
    name = specialization.specialization_file(model, str(source))
    for old in data.ASSETS_DIR.glob("groups-*.safetensors"):  # one checkpoint's cache ships at a time
        if old.name != name:
            old.unlink()
    specialization.specialization_cached(model, str(source), cache=str(data.ASSETS_DIR), rebuild=True)
    return data.ASSETS_DIR / name


def main(argv: list[str] | None = None) -> None:
    """`python -m resnext_demo.assets pack|specialization`: rebuild a shipped asset and print its sha256."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    pk = sub.add_parser("pack", help="the CIFAR-10 sample pack from a full source's test split")
    pk.add_argument("--data", default=data.default_source(), help="full CIFAR-10 source (default: as the app)")
    pk.add_argument("--out", default=str(data.SAMPLE_PACK))
    sp = sub.add_parser("specialization", help="the default checkpoint's group specialization on the sample pack")
    sp.add_argument("--weights", default=None, help="checkpoint (default weights/default.safetensors)")
    args = ap.parse_args(argv)
    if args.what == "pack":
        if not args.data:
            ap.error("no full CIFAR-10 source: pass --data or set RESNEXT_DEMO_DATA")
        out = build_pack(args.data, args.out)
    else:
        out = build_specialization(args.weights)
    print(f"{out} ({out.stat().st_size:,} bytes) sha256 {data.sha256_file(out)}")


if __name__ == "__main__":
    main()
