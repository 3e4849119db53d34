"""What re-encoding the JPEG copy of CIFAR-10 changes: `python -m tools.jpeg_reencode [--split test]`.

Why it exists: the copy is baseline JPEG at quality 75 with 4:2:0 chroma (../shared/cifar10/README.md), and what
that first encoding cost cannot be measured without the original PNG-exact images, which these machines do not
have. The obvious stand-in, "compress it once more and see what that costs", only works if a second encoding
changes the images about as much as the first did. This measures whether it does: each image is decoded,
encoded again with Pillow at each quality (4:2:0), decoded, and compared with the copy (docs/training-fast.md).
"""
from __future__ import annotations

import argparse
import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

QUALITIES = (95, 90, 75, 50)
ARCHIVE = Path(__file__).resolve().parents[1].parent / "shared" / "cifar10" / "cifar10-jpeg.tar.gz"


def jpeg_members(archive: str | Path, split: str = "test") -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every .jpg of `split` in the tar archive, read in place."""
    with tarfile.open(archive) as tf:
        for m in tf:
            if m.isfile() and m.name.endswith(".jpg") and f"/{split}/" in f"/{m.name}":
                yield m.name, tf.extractfile(m).read()


def reencode(image: Image.Image, quality: int) -> tuple[Image.Image, bool]:
    """`image` encoded again as baseline JPEG at `quality`, 4:2:0, and decoded; and whether the quantization
    tables are the ones the original file carries (same tables: same encoder settings)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=quality, subsampling=2)
    out = Image.open(io.BytesIO(buf.getvalue()))
    return out, getattr(image, "quantization", None) == out.quantization


def measure(files: Iterator[tuple[str, bytes]], qualities: tuple[int, ...] = QUALITIES, limit: int | None = None
            ) -> dict[int, dict]:
    """Per quality: images, share bit-identical after re-encoding, mean absolute change (grey levels 0-255),
    PSNR (dB) of the re-encoded image against the copy, and the share whose tables match the copy's."""
    acc = {q: {"identical": 0, "abs": 0.0, "sq": 0.0, "tables": 0} for q in qualities}
    n = 0
    for _, raw in files:
        im = Image.open(io.BytesIO(raw))
        a = np.asarray(im.convert("RGB"), dtype=np.float64)
        for q in qualities:
            out, same_tables = reencode(im, q)
            diff = np.asarray(out.convert("RGB"), dtype=np.float64) - a
            acc[q]["identical"] += int(not diff.any())
            acc[q]["abs"] += float(np.abs(diff).mean())
            acc[q]["sq"] += float((diff ** 2).mean())
            acc[q]["tables"] += int(same_tables)
        n += 1
        if limit is not None and n >= limit:
            break
    mse = {q: acc[q]["sq"] / max(1, n) for q in qualities}
    return {q: {"images": n, "identical": acc[q]["identical"] / max(1, n), "mean_abs": acc[q]["abs"] / max(1, n),
                "psnr_db": float("inf") if mse[q] == 0 else 10 * np.log10(255 ** 2 / mse[q]),
                "same_tables": acc[q]["tables"] / max(1, n)} for q in qualities}


def report(rows: dict[int, dict]) -> str:
    """Markdown table of measure()."""
    lines = ["| re-encoded at quality (4:2:0) | images | bit-identical | mean abs change (0-255) | PSNR vs the copy "
             "| same quantization tables |", "|---:|---:|---:|---:|---:|---:|"]
    for q, r in rows.items():
        lines.append(f"| {q} | {r['images']:,} | {100 * r['identical']:.1f} % | {r['mean_abs']:.2f} | "
                     f"{r['psnr_db']:.1f} dB | {100 * r['same_tables']:.0f} % |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[int, dict]:
    """CLI: print the table for one split of the archive."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archive", default=str(ARCHIVE))
    ap.add_argument("--split", default="test", choices=("train", "test"))
    ap.add_argument("--limit", type=int, default=None, help="stop after this many images")
    args = ap.parse_args(argv)
    rows = measure(jpeg_members(args.archive, args.split), limit=args.limit)
    print(report(rows))
    return rows


if __name__ == "__main__":
    main()
