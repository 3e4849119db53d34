"""CIFAR-10 facts, data sources and preprocessing of arbitrary user images.

Sources for `load_split`:
- a torchvision CIFAR-10 root (`CIFAR10(root, download=...)`; torchvision md5-checks its files),
- an image-folder tree `<root>/{train,test}/<class>/*.jpg`, as a directory or a `.tar.gz` read in place
  (like `../shared/cifar10/cifar10-jpeg.tar.gz`),
- a Hugging Face Hub dataset in the Hub's parquet layout, `hf://datasets/uoft-cs/cifar10`,
- the sample pack shipped in the repository (`SAMPLE_PACK`, 500 test images; `python -m resnext_demo.assets`),
  which the app uses when none of the full sources is configured.
Decoded splits are cached as uint8 safetensors in a git-ignored cache folder, keyed by the source's
content, so the 60,000 JPEGs are decoded once per machine.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError

CLASSES: tuple[str, ...] = ("airplane", "automobile", "bird", "cat", "deer",
                            "dog", "frog", "horse", "ship", "truck")
# Per-channel statistics of the CIFAR-10 training set (the usual values, as used by the paper's code).
MEAN: tuple[float, ...] = (0.4914, 0.4822, 0.4465)
STD: tuple[float, ...] = (0.2470, 0.2435, 0.2616)
IMAGE_SIZE = 32
# Transparent pixels are composited on white: a cut-out object on white looks like a photo on a bright
# background, whereas black would read as a dark scene.
BACKGROUND = (255, 255, 255)
# Decoding more pixels than this is refused (decompression bombs); 64 MP covers any camera photo.
MAX_PIXELS = 64_000_000

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED_ARCHIVE = PROJECT_ROOT.parent / "shared" / "cifar10" / "cifar10-jpeg.tar.gz"
ASSETS_DIR = Path(__file__).resolve().parent / "assets"  # files shipped with the package (resnext_demo.assets)
SAMPLE_PACK = ASSETS_DIR / "cifar10-test-sample.safetensors"
PACK_KEY = "resnext_demo_sample_pack"  # the pack's metadata (JSON: source, its sha256, selection rule, classes)
HUB_PREFIX = "hf://datasets/"  # a dataset on the Hugging Face Hub, e.g. hf://datasets/uoft-cs/cifar10[@revision]
_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")


class ImageError(UserError):
    """An input image that cannot be used; the message is meant for the user."""


def cache_dir() -> Path:
    """Where decoded splits are cached: $RESNEXT_DEMO_CACHE or <project>/.cache (git-ignored)."""
    return Path(os.environ.get("RESNEXT_DEMO_CACHE", PROJECT_ROOT / ".cache"))


def default_source() -> str | None:
    """The data source to use when none is given: $RESNEXT_DEMO_DATA, else the shared archive if present."""
    env = os.environ.get("RESNEXT_DEMO_DATA")
    if env:
        return env
    return str(SHARED_ARCHIVE) if SHARED_ARCHIVE.is_file() else None


def sample_source() -> str | None:
    """The sample pack shipped with the app (a few CIFAR-10 test images), when present: the app's data
    whenever no full CIFAR-10 source is configured (a Hugging Face Space has no `../shared`)."""
    return str(SAMPLE_PACK) if SAMPLE_PACK.is_file() else None


def is_sample_pack(source: str | Path | None) -> bool:
    """Whether `source` names a sample pack (one .safetensors file) rather than a full CIFAR-10 source."""
    return source is not None and str(source).endswith(".safetensors")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file (recorded in checkpoints so a result names its exact data)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def source_id(source: str | Path) -> str:
    """A short content key for a source: sha256 of an archive, or of a directory's file listing."""
    if str(source).startswith(HUB_PREFIX):  # not a local path: the name (and revision) is the key
        return hashlib.sha256(str(source).encode()).hexdigest()[:16]
    p = Path(source)
    if p.is_file():
        return sha256_file(p)[:16]
    h = hashlib.sha256(str(p.resolve()).encode())
    for f in sorted(p.rglob("*")):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.relative_to(p)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _decode_32(raw: bytes) -> np.ndarray:
    """A stored 32x32 training image -> HxWx3 uint8 (resized only if a folder holds other sizes)."""
    with Image.open(io.BytesIO(raw)) as im:
        im = im.convert("RGB")
        if im.size != (IMAGE_SIZE, IMAGE_SIZE):
            im = _square_resize(im)
        return np.asarray(im, dtype=np.uint8)


def _split_class(parts: tuple[str, ...]) -> tuple[str, str] | None:
    """('...', 'train', 'cat', 'x.jpg') -> ('train', 'cat'); None for files outside the layout."""
    if len(parts) < 3 or not parts[-1].lower().endswith(_IMAGE_EXTS):
        return None
    return parts[-3], parts[-2]


def _read_image_folder(source: Path) -> dict[str, tuple[list[np.ndarray], list[int]]]:
    """Decode every image of an image-folder tree (directory or .tar.gz) into {split: (images, labels)}."""
    out: dict[str, tuple[list[np.ndarray], list[int]]] = {}

    def add(parts: tuple[str, ...], raw: bytes) -> None:
        key = _split_class(parts)
        if key is None:
            return
        split, cls = key
        if cls not in CLASSES:
            raise ValueError(f"{source}: folder {cls!r} is not a CIFAR-10 class ({', '.join(CLASSES)})")
        imgs, labels = out.setdefault(split, ([], []))
        imgs.append(_decode_32(raw))
        labels.append(CLASSES.index(cls))

    if source.is_file():
        with tarfile.open(source, "r:*") as tar:  # streamed in place, never extracted to disk
            for member in tar:
                if member.isfile():
                    add(tuple(Path(member.name).parts), tar.extractfile(member).read())
    else:
        for f in sorted(source.rglob("*")):
            if f.is_file():
                add(f.relative_to(source).parts, f.read_bytes())
    return out


def _stack(images: list[np.ndarray], labels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack decoded images, interleaving classes (a0 b0 c0 … a1 b1 …) so every prefix is balanced:
    a folder tree is sorted by class, and `x[:1000]` should not be 1,000 airplanes."""
    y = torch.tensor(labels, dtype=torch.int64)
    rank = torch.zeros_like(y)
    for c in y.unique():
        pos = torch.nonzero(y == c).flatten()
        rank[pos] = torch.arange(len(pos))
    order = torch.argsort(rank * (int(y.max()) + 1) + y)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)[order].contiguous()
    return x, y[order]


def _is_image_folder(p: Path) -> bool:
    return p.is_file() and p.name.endswith((".tar.gz", ".tgz", ".tar")) or (p / "train").is_dir() or (p / "test").is_dir()


def load_split(source: str | Path | None, split: str, download: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N x 3 x 32 x 32 uint8) and labels (N int64, indices into CLASSES) of 'train' or 'test'."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    if source is None:
        source = default_source()
    if source is None:
        raise FileNotFoundError("no CIFAR-10 source: set RESNEXT_DEMO_DATA to a torchvision CIFAR-10 root "
                                "(or pass --download), an image-folder directory / .tar.gz or hf://datasets/uoft-cs/cifar10")
    if str(source).startswith(HUB_PREFIX):
        return _load_hub(str(source), split)
    p = Path(source).expanduser()
    if is_sample_pack(p):
        return _load_pack(p, split)
    if not _is_image_folder(p):
        return _load_torchvision(p, split, download)
    if not p.exists():
        raise FileNotFoundError(f"data source {p} does not exist")
    return _cached(source_id(p), split, lambda: _read_image_folder(p), f"{p} has no '{split}/<class>/' images")


def _cached(key: str, split: str, read, missing: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`split` from the decoded cache, else decode with `read()` -> {split: (images, labels)} and cache every
    split it returns (an archive is read in one pass); `missing` is the error when `split` is not among them."""
    from safetensors.torch import load_file, save_file

    cache = cache_dir() / f"cifar10-{key}-v2-{split}.safetensors"
    if cache.is_file():
        t = load_file(cache)
        return t["images"], t["labels"]
    splits = read()
    if split not in splits:
        raise ValueError(missing)
    cache.parent.mkdir(parents=True, exist_ok=True)
    result = None
    for name, (imgs, labels) in splits.items():
        x, y = _stack(imgs, labels)
        tmp = cache.with_name(f"cifar10-{key}-v2-{name}.safetensors.{os.getpid()}.tmp")
        save_file({"images": x, "labels": y}, tmp)
        os.replace(tmp, cache.with_name(f"cifar10-{key}-v2-{name}.safetensors"))  # atomic: a killed run never leaves half a cache
        if name == split:
            result = (x, y)
    return result


def _load_pack(p: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A sample pack's 'test' part, or its 'train' part: test images set aside for fine-tuning (resnext_demo.assets)."""
    from safetensors import safe_open

    if not p.is_file():
        raise FileNotFoundError(f"data source {p} does not exist")
    with safe_open(str(p), "pt") as f:
        meta = json.loads((f.metadata() or {}).get(PACK_KEY, "{}"))
        if meta.get("classes") != list(CLASSES) or f"{split}.images" not in f.keys():
            raise ValueError(f"{p.name} is not a CIFAR-10 sample pack with a '{split}' part")
        return f.get_tensor(f"{split}.images"), f.get_tensor(f"{split}.labels")


def _load_hub(source: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A split of a Hugging Face Hub dataset in the Hub's parquet layout (`hf://datasets/<owner>/<name>[@rev]`,
    e.g. uoft-cs/cifar10: `plain_text/test-00000-of-00001.parquet`). The first call downloads both splits' files
    through huggingface_hub (into HF_HUB_CACHE; offline with HF_HUB_OFFLINE=1) and decodes them into our cache,
    keyed by the name: later calls, a fine-tune's training subset included, touch neither the network nor the Hub."""
    def read() -> dict[str, tuple[list[np.ndarray], list[int]]]:
        from huggingface_hub import snapshot_download

        repo, _, revision = source[len(HUB_PREFIX):].partition("@")
        patterns = [p for s in ("train", "test") for p in (f"*{s}-*.parquet", f"*{s}/*.parquet")]
        folder = Path(snapshot_download(repo, repo_type="dataset", revision=revision or None, allow_patterns=patterns))
        found = {}
        for s in ("train", "test"):
            files = sorted(f for f in folder.rglob("*.parquet") if f.name.startswith(f"{s}-") or f.parent.name == s)
            if files:
                found[s] = _read_parquet(files)
        return found

    return _cached(f"hub-{source_id(source)}", split, read, f"{source} has no '{split}' parquet files")


def _read_parquet(files: list[Path]) -> tuple[list[np.ndarray], list[int]]:
    """Decode Hub parquet files: an image column ('img' or 'image', {bytes, path} cells) and a 'label' column
    whose class names, when the file records them, must be CIFAR-10's in order."""
    import pyarrow.parquet as pq

    images, labels = [], []
    for f in files:
        table = pq.read_table(f)
        col = next((c for c in ("img", "image") if c in table.column_names), None)
        if col is None or "label" not in table.column_names:
            raise ValueError(f"{f.name}: expected an 'img' (or 'image') and a 'label' column, found {table.column_names}")
        try:
            names = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]["label"]["names"]
        except (TypeError, KeyError, ValueError):
            names = None  # a plain parquet file: labels are taken as CIFAR-10 class indices
        if names is not None and tuple(names) != CLASSES:
            raise ValueError(f"{f.name}: its classes {names} are not CIFAR-10's {list(CLASSES)}")
        images += [_decode_32(cell["bytes"]) for cell in table.column(col).to_pylist()]
        labels += table.column("label").to_pylist()
    return images, labels


def _load_torchvision(root: Path, split: str, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's CIFAR-10 (download when allowed); it verifies the files' md5 before reading them."""
    from torchvision.datasets import CIFAR10

    try:
        ds = CIFAR10(str(root), train=(split == "train"), download=download)
    except RuntimeError as e:
        raise FileNotFoundError(f"{root}: {e} (pass download=True / --download to fetch CIFAR-10)") from e
    if tuple(ds.classes) != CLASSES:
        raise ValueError(f"{root}: unexpected classes {ds.classes}")
    x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(ds.targets, dtype=torch.int64)


def source_record(source: str | None, n_train: int, n_test: int, n_val: int) -> dict:
    """The data a run read: its source, the archive's sha256 (or a folder's id) and the split sizes."""
    p = Path(source) if source else None
    digest = sha256_file(p) if p and p.is_file() else (source_id(p) if p and p.exists() else None)
    return {"source": str(source), "sha256": digest, "train_images": n_train, "test_images": n_test,
            "val_images": n_val}


# ---------------------------------------------------------------- user images

def open_image(file: str | Path | bytes | io.IOBase, draft: int | None = None) -> Image.Image:
    """Open a user image with bounded decoding; raises ImageError with a human message.

    `draft`: for JPEGs, let libjpeg decode at a reduced scale whose sides stay >= this many pixels
    (a 50 MP photo then decodes in milliseconds and a few MB)."""
    try:
        src = io.BytesIO(file) if isinstance(file, (bytes, bytearray)) else file
        if isinstance(src, (str, Path)) and Path(src).stat().st_size == 0:
            raise ImageError("The file is empty.")
        im = Image.open(src)  # reads the header only
        # Checked here rather than through PIL's global MAX_IMAGE_PIXELS: that global is shared by every
        # server thread, and a temporary change races with concurrent requests.
        if im.width * im.height > MAX_PIXELS:
            raise ImageError(_too_large())
        if draft and im.format == "JPEG" and min(im.size) > draft:
            im.draft("RGB", (draft, draft))
        im.load()  # decode now, so truncated files fail here and not later
        return im
    except ImageError:
        raise
    except Image.DecompressionBombError as e:  # beyond PIL's own hard limit (~179 MP)
        raise ImageError(_too_large()) from e
    except UnidentifiedImageError as e:
        raise ImageError("This file is not an image format I can read (PNG, JPEG, GIF, WebP, BMP, TIFF…).") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"The image file is damaged or truncated ({e}).") from e


def _too_large() -> str:
    return f"The image is too large to decode safely (limit {MAX_PIXELS // 1_000_000} MP)."


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: EXIF orientation applied, first frame of animations, transparency on white."""
    if getattr(im, "n_frames", 1) > 1:
        im.seek(0)
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        # 16-bit and 32-bit images: scale their nominal range to 8 bits instead of clipping at 255.
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else (1.0 if im.mode == "F" and a.max() <= 1 else 255.0)
        im = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    if im.mode in ("LA", "La", "PA", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        bg = Image.new("RGB", im.size, BACKGROUND)
        bg.paste(im, mask=im.getchannel("A"))
        return bg
    if im.mode == "LAB":
        from PIL import ImageCms
        im = ImageCms.applyTransform(im, ImageCms.buildTransform(ImageCms.createProfile("LAB"),
                                                                 ImageCms.createProfile("sRGB"), "LAB", "RGB"))
    return im.convert("RGB")


def _square_resize(im: Image.Image, size: int = IMAGE_SIZE) -> Image.Image:
    """Centre-crop to the largest square, then antialiased (Lanczos) downscale to size x size."""
    w, h = im.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    # reducing_gap: shrink by integer box filtering first, so a 50 MP photo resizes in milliseconds.
    return im.resize((size, size), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)


def prepare_image(image: Image.Image | np.ndarray | str | Path | bytes) -> Image.Image:
    """Any user image -> the 32x32 RGB picture the model actually sees."""
    if isinstance(image, np.ndarray):
        a = image
        if a.dtype != np.uint8:
            a = np.clip(a * (255.0 if a.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        if a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (1, 2, 3, 4)):
            im = Image.fromarray(a.squeeze(2) if a.ndim == 3 and a.shape[2] == 1 else a)
        else:
            raise ImageError(f"Expected an H x W (x C) image array, got shape {a.shape}.")
    elif isinstance(image, Image.Image):
        im = image
    else:
        im = open_image(image, draft=4 * IMAGE_SIZE)  # JPEG's own fast downscale, before decoding
    if im.width < 1 or im.height < 1:
        raise ImageError("The image has no pixels.")
    return _square_resize(to_rgb(im))


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 (or 0..1 float) N x 3 x H x W -> normalized float tensor."""
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Inverse of normalize, to 0..1 floats (for display)."""
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1)


def pil_to_uint8(im: Image.Image) -> torch.Tensor:
    """A 32x32 RGB PIL image -> 1 x 3 x 32 x 32 uint8 tensor."""
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).unsqueeze(0)


def preprocess(image: Image.Image | np.ndarray | str | Path | bytes) -> torch.Tensor:
    """Any user image -> 1 x 3 x 32 x 32 normalized float tensor, ready for the model."""
    return normalize(pil_to_uint8(prepare_image(image)))
