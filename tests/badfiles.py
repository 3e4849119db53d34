"""Hostile and odd input files, generated on the fly (nothing from CIFAR-10, nothing stored in git).

Each maker writes one file into a folder and returns its path; `make_all` builds every one of them.
Used by tests/test_hardening.py (through the real server) and handy for poking the app by hand:
`python -m tests.badfiles /tmp/bad` writes them all.
"""
from __future__ import annotations

import io
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

BOMB_SIDE = 20_000  # a 400 MP image in a ~50 kB file


def noise(size: tuple[int, int], seed: int = 0, channels: int = 3) -> np.ndarray:
    """Smooth-ish random colours (H x W x C uint8): blocks of colour plus noise, like a tiny photo."""
    w, h = size
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (max(1, h // 8), max(1, w // 8), channels)).astype(np.float64)
    base = np.kron(base, np.ones((8, 8, 1)))[:h, :w]
    if base.shape[0] < h or base.shape[1] < w:  # sides that are not multiples of 8
        base = np.pad(base, ((0, h - base.shape[0]), (0, w - base.shape[1]), (0, 0)), mode="edge")
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def rgb(size: tuple[int, int] = (48, 40), seed: int = 0) -> Image.Image:
    return Image.fromarray(noise(size, seed))


def _save(im: Image.Image, path: Path, **kw) -> Path:
    im.save(path, **kw)
    return path


def empty(d: Path) -> Path:
    p = d / "empty.png"
    p.write_bytes(b"")
    return p


def text_as_png(d: Path) -> Path:
    p = d / "notes.png"
    p.write_text("This is a shopping list, not a picture.\n" * 20)
    return p


def truncated_png(d: Path) -> Path:
    buf = io.BytesIO()
    rgb((64, 64), 1).save(buf, "PNG")
    p = d / "truncated.png"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return p


def truncated_jpeg(d: Path) -> Path:
    buf = io.BytesIO()
    rgb((256, 256), 2).save(buf, "JPEG", quality=90)
    p = d / "truncated.jpg"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return p


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def bomb_png(d: Path, side: int = BOMB_SIDE, name: str = "bomb.png") -> Path:
    """A real, valid 1-bit PNG of side x side black pixels (400 MP by default) that is only ~50 kB."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    p = d / name
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                  + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))
    return p


def bomb_png_100mp(d: Path) -> Path:
    """100 MP: over the app's 64 MP cap but under PIL's own hard limit (~179 MP), so only our check stops it."""
    return bomb_png(d, 10_000, "bomb-100mp.png")


def png16(d: Path) -> Path:
    """16-bit greyscale PNG using the whole 0..65535 range."""
    a = noise((48, 40), 3, 1)[..., 0].astype(np.uint16) * 257
    return _save(Image.fromarray(a), d / "sixteen-bit.png")


def cmyk_jpeg(d: Path) -> Path:
    return _save(rgb((48, 40), 4).convert("CMYK"), d / "cmyk.jpg", quality=92)


def palette_png(d: Path) -> Path:
    return _save(rgb((48, 40), 5).convert("P", palette=Image.Palette.ADAPTIVE, colors=16), d / "palette.png")


def la_png(d: Path) -> Path:
    a = noise((48, 40), 6, 2)
    a[:, :20, 1] = 0  # left half fully transparent
    return _save(Image.fromarray(a, "LA"), d / "grey-alpha.png")


def rgba_png(d: Path) -> Path:
    a = noise((48, 40), 7, 4)
    a[:, :24, 3] = 0
    return _save(Image.fromarray(a, "RGBA"), d / "transparent.png")


def _frames(n: int = 3) -> list[Image.Image]:
    return [rgb((48, 40), 10 + i) for i in range(n)]


def animated_gif(d: Path) -> Path:
    f = _frames()
    return _save(f[0], d / "animated.gif", save_all=True, append_images=f[1:], duration=100, loop=0)


def animated_webp(d: Path) -> Path:
    f = _frames()
    return _save(f[0], d / "animated.webp", save_all=True, append_images=f[1:], duration=100, loop=0, lossless=True)


def one_pixel(d: Path) -> Path:
    return _save(Image.new("RGB", (1, 1), (200, 30, 30)), d / "one-pixel.png")


def tall(d: Path) -> Path:
    return _save(rgb((1, 2000), 8), d / "one-by-2000.png")


def wide(d: Path) -> Path:
    return _save(rgb((2000, 1), 9), d / "2000-by-one.png")


def exif_rotated(d: Path) -> tuple[Path, Path]:
    """(JPEG stored sideways with EXIF orientation 6, the same picture stored upright as PNG).

    Orientation 6 = 'rotate 90° clockwise to display': the stored pixels are the upright picture
    turned 90° counter-clockwise. The PNG is made from the JPEG's own decoded pixels, so the two must
    give the same prediction when the orientation is applied."""
    upright = rgb((40, 72), 11)  # portrait
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    jpg = _save(stored, d / "rotated.jpg", quality=95, exif=exif.tobytes())
    with Image.open(jpg) as im:
        decoded = im.convert("RGB").transpose(Image.Transpose.ROTATE_270)
    png = _save(decoded, d / "rotated-upright.png")
    return jpg, png


def large_photo(d: Path, megapixels: float = 50.0) -> Path:
    """A smooth JPEG of about `megapixels` MP (3:2), made in ~1 s and a few MB."""
    w = int((megapixels * 1e6 * 1.5) ** 0.5)
    h = int(w / 1.5)
    small = rgb((48, 32), 12).resize((w // 16, h // 16), Image.Resampling.BILINEAR)
    big = small.resize((w, h), Image.Resampling.NEAREST)
    return _save(big, d / f"photo-{megapixels:.0f}mp.jpg", quality=80)


BROKEN = {"empty": empty, "text renamed .png": text_as_png, "truncated PNG": truncated_png,
          "truncated JPEG": truncated_jpeg, "decompression bomb": bomb_png,
          "100 MP bomb": bomb_png_100mp}
ODD = {"16-bit PNG": png16, "CMYK JPEG": cmyk_jpeg, "palette PNG": palette_png, "LA PNG": la_png,
       "RGBA PNG": rgba_png, "animated GIF": animated_gif, "animated WebP": animated_webp, "1x1": one_pixel,
       "1x2000": tall, "2000x1": wide}


def make_all(d: Path) -> dict[str, Path]:
    d.mkdir(parents=True, exist_ok=True)
    out = {name: fn(d) for name, fn in {**BROKEN, **ODD}.items()}
    out["EXIF-rotated JPEG"], out["EXIF upright PNG"] = exif_rotated(d)
    out["50 MP photo"] = large_photo(d)
    return out


if __name__ == "__main__":
    for k, v in make_all(Path(sys.argv[1] if len(sys.argv) > 1 else "bad-inputs")).items():
        print(f"{k:20s} {v} ({v.stat().st_size} bytes)")
