"""Images that are not CIFAR-10 objects, assembled offline, to measure the "unfamiliar image" signal.

Three kinds, each a dict {set name: uint8 N x 3 x 32 x 32}, every image passed through the app's own
upload path (`data.prepare_image`) so they are what the model would see:
- far: synthetic noise, flat colours, gradients, checkerboards, stripes, blobs and rendered text pages;
- package: photos and drawings shipped inside matplotlib and gradio (none of them is from CIFAR-10), each
  also as a few crops so that one photo is not one sample;
- near: CIFAR-10 test images inverted, rotated 90 degrees, or heavily blurred.
Seeded: the same call gives the same images.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from . import data

WORDS = ("the model sees only thirty two pixels and answers with ten classes while a page of text is none of "
         "them calibration temperature neighbour feature distance unfamiliar image report accuracy").split()


def _stack(images: list[Image.Image]) -> torch.Tensor:
    """PIL images of any size -> uint8 N x 3 x 32 x 32 through the app's upload path."""
    return torch.cat([data.pil_to_uint8(data.prepare_image(im)) for im in images])


def _rgb(a: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")


def _text_page(rng: np.random.Generator, size: int) -> Image.Image:
    """Black words on a white page, a few lines of them, in PIL's default font at a random size."""
    im = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(im)
    font_size = int(rng.integers(size // 14, size // 5))
    try:
        from PIL import ImageFont
        font = ImageFont.load_default(font_size)
    except (TypeError, OSError):  # old Pillow: bitmap font only
        font = None
    y = int(rng.integers(0, font_size))
    while y < size:
        draw.text((int(rng.integers(0, size // 8)), y), " ".join(rng.choice(WORDS, 6)), fill=(0, 0, 0), font=font)
        y += int(font_size * 1.4)
    return im


def far_sets(n: int = 100, seed: int = 0) -> dict[str, torch.Tensor]:
    """Synthetic images nothing like a CIFAR-10 object, `n` of each kind."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:64, 0:64] / 63.0
    sets: dict[str, list[Image.Image]] = {k: [] for k in ("noise", "flat colour", "gradient", "checkerboard",
                                                          "stripes", "blobs", "text page")}
    for i in range(n):
        size = (32, 256, 1024)[i % 3]  # small noise stays noise; a large noise photo averages towards grey
        sets["noise"].append(_rgb(rng.integers(0, 256, (size, size, 3))))
        sets["flat colour"].append(_rgb(np.broadcast_to(rng.integers(0, 256, 3), (32, 32, 3))))
        a, b, t = rng.integers(0, 256, 3), rng.integers(0, 256, 3), rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(t) * xx + np.sin(t) * yy - min(0, np.cos(t)) - min(0, np.sin(t))) / (abs(np.cos(t)) + abs(np.sin(t)))
        sets["gradient"].append(_rgb(a + (b - a) * ramp[..., None]))
        period = int(rng.integers(2, 17))
        board = ((np.arange(64)[:, None] // period + np.arange(64)[None] // period) % 2)[..., None]
        sets["checkerboard"].append(_rgb(np.where(board, a, b)))
        f = rng.uniform(2, 12)
        wave = 0.5 + 0.5 * np.sin(2 * np.pi * f * (np.cos(t) * xx + np.sin(t) * yy))
        sets["stripes"].append(_rgb(a + (b - a) * wave[..., None]))
        blob = _rgb(rng.integers(0, 256, (8, 8, 3))).resize((64, 64), Image.Resampling.BICUBIC)
        sets["blobs"].append(blob.filter(ImageFilter.GaussianBlur(2)))
        sets["text page"].append(_text_page(rng, 256))
    return {k: _stack(v) for k, v in sets.items()}


def _package_files() -> dict[str, list[Path]]:
    """Photos and drawings that ship inside matplotlib and gradio (found in their installed folders)."""
    def files(pkg: str, sub: str, names: tuple[str, ...]) -> list[Path]:
        spec = importlib.util.find_spec(pkg)
        root = Path(spec.origin).parent / sub if spec and spec.origin else None
        return [root / n for n in names if root and (root / n).is_file()]

    photos = (files("gradio", "media_assets/images", ("cheetah.jpg", "cheetah1.jpg", "groot.jpeg", "lion.jpg",
                                                       "tower.jpg"))
              + files("gradio", "test_data", ("cheetah2.jpg",))
              + files("matplotlib", "mpl-data/sample_data", ("grace_hopper.jpg",)))
    drawings = (files("gradio", "media_assets/images", ("hf-logo_transpng.png", "logo.png", "screenshot.gif"))
                + files("matplotlib", "mpl-data/sample_data", ("logo2.png", "Minduka_Present_Blue_Pack.png")))
    return {"photos (gradio, matplotlib)": photos, "drawings and logos": drawings}


def _crops(im: Image.Image, rng: np.random.Generator, n: int) -> list[Image.Image]:
    """The whole image and n-1 random square crops of 50-90 % of its short side."""
    out = [im]
    s = min(im.size)
    for _ in range(n - 1):
        c = int(s * rng.uniform(0.5, 0.9))
        x0, y0 = int(rng.integers(0, im.width - c + 1)), int(rng.integers(0, im.height - c + 1))
        out.append(im.crop((x0, y0, x0 + c, y0 + c)))
    return out


def package_sets(crops: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """The packages' photos and drawings, each as itself plus `crops - 1` random crops."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, paths in _package_files().items():
        ims = [c for p in paths for c in _crops(data.to_rgb(data.open_image(p)), rng, crops)]
        if ims:
            out[name] = _stack(ims)
    return out


def near_sets(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """CIFAR-10 images (uint8 N x 3 x 32 x 32) inverted, rotated 90 degrees, and blurred (Gaussian, radius 2)."""
    blurred = [_rgb(im.permute(1, 2, 0).numpy()).filter(ImageFilter.GaussianBlur(2)) for im in x]
    return {"CIFAR-10 inverted": 255 - x, "CIFAR-10 rotated 90°": x.rot90(1, (2, 3)).contiguous(),
            "CIFAR-10 blurred": torch.cat([data.pil_to_uint8(b) for b in blurred])}
