"""Data sources and preprocessing of arbitrary user images."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from resnext_demo import data


def test_shared_archive_splits_have_official_sizes(cifar_source: str) -> None:
    x, y = data.load_split(cifar_source, "train")
    assert x.shape == (50_000, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert torch.bincount(y, minlength=10).tolist() == [5000] * 10
    xt, yt = data.load_split(cifar_source, "test")
    assert xt.shape == (10_000, 3, 32, 32)
    assert torch.bincount(yt, minlength=10).tolist() == [1000] * 10
    assert torch.bincount(yt[:1000], minlength=10).tolist() == [100] * 10  # prefixes are balanced
    assert 60 < x[:1000].float().mean() < 200  # real pictures, not zeros


def _folder_tree(root, n_per_class: int = 3, size: int = 32) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in data.CLASSES[:3]:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n_per_class):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.png")


def test_image_folder_directory_and_tarball_agree(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RESNEXT_DEMO_CACHE", str(tmp_path / "cache"))
    _folder_tree(tmp_path / "tree")
    x1, y1 = data.load_split(tmp_path / "tree", "train")
    with tarfile.open(tmp_path / "tree.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "tree", arcname="tree")
    x2, y2 = data.load_split(tmp_path / "tree.tar.gz", "train")
    assert x1.shape == (9, 3, 32, 32) and torch.equal(x1, x2) and torch.equal(y1, y2)
    assert sorted(y1.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # PNG is lossless: the first stored image comes back exactly.
    first = np.array(Image.open(tmp_path / "tree" / "train" / "airplane" / "0.png"))
    assert torch.equal(x1[y1 == 0][0], torch.from_numpy(first).permute(2, 0, 1))
    # Cached: a second load reads the cache, not the tree.
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 4
    x3, _ = data.load_split(tmp_path / "tree.tar.gz", "train")
    assert torch.equal(x2, x3)


# ---------------------------------------------------------------- the shipped sample pack, the Hub source


def test_shipped_sample_pack_is_small_balanced_and_documented() -> None:
    """At most 50 test images per class (issue 12), its two parts disjoint, the source and rule in its metadata."""
    import json

    from safetensors import safe_open

    from resnext_demo import assets

    assert data.sample_source() == str(data.SAMPLE_PACK) and data.is_sample_pack(data.sample_source())
    test, test_y = data.load_split(data.SAMPLE_PACK, "test")
    train, train_y = data.load_split(data.SAMPLE_PACK, "train")
    assert test.dtype == train.dtype == torch.uint8 and test.shape[1:] == (3, 32, 32)
    assert len(test_y) + len(train_y) <= 500
    per_class = torch.bincount(torch.cat([test_y, train_y]), minlength=10)
    assert per_class.tolist() == [assets.PER_CLASS] * 10
    assert torch.bincount(test_y[:10], minlength=10).tolist() == [1] * 10  # prefixes are balanced
    flat = {bytes(im.numpy().tobytes()) for im in test}
    assert not any(bytes(im.numpy().tobytes()) in flat for im in train)  # no fine-tune image is ever scored
    with safe_open(str(data.SAMPLE_PACK), "pt") as f:
        meta = json.loads(f.metadata()[data.PACK_KEY])
    assert meta["source"] == "cifar10-jpeg.tar.gz" and len(meta["source_sha256"]) == 64
    assert "first 50 images of each class" in meta["rule"] and meta["classes"] == list(data.CLASSES)
    assert "python -m resnext_demo.assets pack" in meta["command"]


def test_sample_pack_is_the_first_images_of_the_shared_archive(cifar_source, tmp_path) -> None:
    """Rebuilding the pack from the archive it names gives the shipped file byte for byte."""
    from resnext_demo import assets

    if data.sha256_file(cifar_source) != _pack_meta()["source_sha256"]:
        pytest.skip("the CIFAR-10 source here is not the archive the pack was made from")
    out = assets.build_pack(cifar_source, tmp_path / "pack.safetensors")
    assert out.read_bytes() == data.SAMPLE_PACK.read_bytes()


def _pack_meta() -> dict:
    import json

    from safetensors import safe_open
    with safe_open(str(data.SAMPLE_PACK), "pt") as f:
        return json.loads(f.metadata()[data.PACK_KEY])


def test_build_pack_rule_on_an_image_folder(tmp_path, monkeypatch) -> None:
    """Per class the first images in file-name order; 'train' = the last ones per class, disjoint from 'test'."""
    from resnext_demo import assets

    monkeypatch.setenv("RESNEXT_DEMO_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(1)
    files = {}
    for c in data.CLASSES:
        d = tmp_path / "tree" / "test" / c
        d.mkdir(parents=True)
        files[c] = []
        for i in range(7):
            a = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(a).save(d / f"{i:02d}.png")
            files[c].append(a)
    out = assets.build_pack(tmp_path / "tree", tmp_path / "pack.safetensors", per_class=5, finetune_per_class=2)
    x, y = data.load_split(out, "test")
    xt, yt = data.load_split(out, "train")
    assert y.tolist() == list(range(10)) * 3 and yt.tolist() == list(range(10)) * 2
    for c in range(10):
        want = [torch.from_numpy(a).permute(2, 0, 1) for a in files[data.CLASSES[c]]]
        assert all(torch.equal(a, b) for a, b in zip(x[y == c], want[:3]))
        assert all(torch.equal(a, b) for a, b in zip(xt[yt == c], want[3:5]))
    again = assets.build_pack(tmp_path / "tree", tmp_path / "again.safetensors", per_class=5, finetune_per_class=2)
    assert again.read_bytes() == out.read_bytes()  # deterministic: its sha256 keys the shipped analysis
    with pytest.raises(ValueError, match="only 7 test images"):
        assets.build_pack(tmp_path / "tree", tmp_path / "big.safetensors", per_class=8)


def test_a_safetensors_file_that_is_no_pack_is_refused(tmp_path) -> None:
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="not a CIFAR-10 sample pack"):
        data.load_split(tmp_path / "model.safetensors", "test")
    with pytest.raises(FileNotFoundError):
        data.load_split(tmp_path / "missing.safetensors", "test")


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """huggingface_hub offline (no network), its cache in tmp_path/hub; our decoded cache in tmp_path/cache."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("RESNEXT_DEMO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "hub"


def test_hub_source_reads_the_hubs_parquet_layout(offline_hub) -> None:
    """hf://datasets/uoft-cs/cifar10 through huggingface_hub.snapshot_download (offline, from a local copy in
    the Hub's cache layout): each split's images come back exactly, classes interleaved; both splits are
    decoded and cached at the first call, so the Hub is not asked again."""
    from tests import hub_layout

    test = hub_layout.synthetic_split(30, seed=0)
    train = hub_layout.synthetic_split(20, seed=1)
    hub_layout.write_hub_copy(offline_hub, {"test": test, "train": train})
    x, y = data.load_split(hub_layout.SOURCE, "test")
    assert x.shape == (30, 3, 32, 32) and x.dtype == torch.uint8
    assert y[:10].tolist() == list(range(10))
    images, labels = test
    for c in range(10):  # PNG is lossless: each class's images in the file's order
        want = torch.from_numpy(images[labels == c]).permute(0, 3, 1, 2)
        assert torch.equal(x[y == c], want)
    assert len(list((offline_hub.parent / "cache").glob("cifar10-hub-*.safetensors"))) == 2
    import shutil
    shutil.rmtree(offline_hub)  # the decoded cache serves the train split now
    xt, yt = data.load_split(hub_layout.SOURCE, "train")
    assert len(yt) == 20 and torch.equal(xt[yt == 0][0], torch.from_numpy(train[0][0]).permute(2, 0, 1))


def test_hub_source_with_other_classes_or_missing_files_is_a_clear_error(offline_hub) -> None:
    from huggingface_hub.errors import LocalEntryNotFoundError

    from tests import hub_layout

    with pytest.raises(LocalEntryNotFoundError):  # nothing cached and no network: says so, never hangs
        data.load_split(hub_layout.SOURCE, "test")
    hub_layout.write_hub_copy(offline_hub, {"test": hub_layout.synthetic_split(10, 0)})
    assert len(data.load_split(hub_layout.SOURCE, "test")[1]) == 10
    with pytest.raises(ValueError, match="no 'train' parquet"):
        data.load_split(hub_layout.SOURCE, "train")
    hub_layout.write_hub_copy(offline_hub, {"test": hub_layout.synthetic_split(10, 0)},
                              classes=tuple(reversed(data.CLASSES)))
    with pytest.raises(ValueError, match="not CIFAR-10's"):  # another revision (a commit), read afresh
        data.load_split(f"{hub_layout.SOURCE}@{hub_layout.COMMIT}", "test")


def test_foreign_class_folder_is_a_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RESNEXT_DEMO_CACHE", str(tmp_path / "cache"))
    (tmp_path / "t" / "train" / "unicorn").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(tmp_path / "t" / "train" / "unicorn" / "0.png")
    with pytest.raises(ValueError, match="not a CIFAR-10 class"):
        data.load_split(tmp_path / "t", "train")


def test_missing_torchvision_root_without_download_is_clear(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="download"):
        data.load_split(tmp_path / "nothing-here", "test")


def _rgb(w: int = 64, h: int = 48) -> Image.Image:
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None]
    a[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    a[..., 2] = 128
    return Image.fromarray(a)


MODES = ["RGB", "L", "LA", "P", "RGBA", "CMYK", "1", "I;16", "I", "F", "YCbCr", "HSV", "PA", "RGBX"]


@pytest.mark.parametrize("mode", MODES)
def test_preprocess_every_mode(mode: str) -> None:
    im = _rgb()
    if mode == "I;16":
        im = Image.fromarray((np.asarray(im.convert("L"), np.uint16) * 257).astype("<u2"))
        assert im.mode == "I;16"
    elif mode == "PA":
        im = im.convert("RGBA").convert("PA")
    else:
        im = im.convert(mode)
    x = data.preprocess(im)
    assert x.shape == (1, 3, 32, 32) and x.dtype == torch.float32 and torch.isfinite(x).all()
    # Every mode keeps the picture: the left-to-right brightness ramp survives conversion.
    shown = np.asarray(data.prepare_image(im).convert("L"), np.float32)
    if mode not in ("1", "HSV"):  # 1-bit dithers; HSV's channel order changes brightness
        assert shown[:, -4:].mean() > shown[:, :4].mean() + 20


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    a = np.full((8, 8), 32768, np.uint16)  # mid-grey in 16 bits
    out = np.asarray(data.prepare_image(Image.fromarray(a.astype("<u2"))))
    assert 120 < out.mean() < 136


def test_transparency_is_composited_on_white() -> None:
    im = Image.new("RGBA", (40, 40), (255, 0, 0, 0))  # fully transparent red
    assert np.asarray(data.prepare_image(im)).min() == 255
    la = Image.new("LA", (40, 40), (0, 0))
    assert np.asarray(data.prepare_image(la)).min() == 255


def test_exif_orientation_is_applied() -> None:
    im = Image.new("RGB", (60, 30), "black")
    im.paste((255, 255, 255), (0, 0, 30, 30))  # white on the left half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the left half ends up on top
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif, quality=95)
    out = np.asarray(data.prepare_image(buf.getvalue()).convert("L"), np.float32)
    assert out[:8].mean() > 200 and out[-8:].mean() < 60


def test_first_frame_of_animation() -> None:
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    out = np.asarray(data.prepare_image(buf.getvalue()))
    assert out[..., 0].mean() > 200 and out[..., 2].mean() < 50


@pytest.mark.parametrize("size", [(1, 1), (1000, 3), (3, 1000), (4000, 3000)])
def test_odd_sizes_become_32x32(size) -> None:
    out = data.prepare_image(_rgb(*size))
    assert out.size == (32, 32) and out.mode == "RGB"


def test_non_square_is_centre_cropped() -> None:
    """A wide image keeps its centre square, undistorted: the outer thirds are cut."""
    im = Image.new("RGB", (96, 32), (255, 0, 0))
    im.paste((0, 255, 0), (32, 0, 64, 32))
    out = np.asarray(data.prepare_image(im))
    assert out[..., 1].min() == 255 and out[..., 0].max() == 0


def test_numpy_and_bytes_inputs_match_pil() -> None:
    im = _rgb()
    buf = io.BytesIO()
    im.save(buf, "PNG")
    ref = data.preprocess(im)
    assert torch.equal(ref, data.preprocess(np.asarray(im)))
    assert torch.equal(ref, data.preprocess(buf.getvalue()))
    assert torch.allclose(ref, data.preprocess(np.asarray(im).astype(np.float32) / 255), atol=0.02)


@pytest.mark.parametrize("raw,msg", [(b"", "empty|not an image"), (b"hello, I am text", "not an image"),
                                     (None, "damaged or truncated")])
def test_bad_files_raise_image_error(raw, msg) -> None:
    if raw is None:
        buf = io.BytesIO()
        _rgb(200, 200).save(buf, "PNG")
        raw = buf.getvalue()[: len(buf.getvalue()) // 2]
    with pytest.raises(data.ImageError, match=msg):
        data.prepare_image(raw)


def test_decompression_bomb_is_refused() -> None:
    buf = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(buf, "PNG")  # 400 MP, a few kB on disk
    assert len(buf.getvalue()) < 200_000
    with pytest.raises(data.ImageError, match="too large"):
        data.prepare_image(buf.getvalue())


def test_normalize_round_trip() -> None:
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert torch.allclose(data.denormalize(data.normalize(x)), x.float() / 255, atol=1e-6)


def test_bombs_are_refused_from_the_header_without_decoding(tmp_path, monkeypatch) -> None:
    """What keeps a bomb cheap is that no pixel is decoded: refused from the header (our cap, then PIL's)."""
    from tests import badfiles

    def no_decoding(self):
        raise AssertionError("a bomb was decoded")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    for make in (badfiles.bomb_png, badfiles.bomb_png_100mp):
        with pytest.raises(data.ImageError, match="too large"):
            data.open_image(make(tmp_path))


def test_a_large_jpeg_is_decoded_at_a_reduced_scale(tmp_path) -> None:
    """A 50 MP photo is decoded by libjpeg's draft mode at a fraction of its size (what makes it fast), still
    at least `draft` pixels on its short side."""
    from tests import badfiles
    path = badfiles.large_photo(tmp_path)
    with Image.open(path) as im:
        full = im.size
    im = data.open_image(path, draft=4 * data.IMAGE_SIZE)
    assert min(im.size) >= 4 * data.IMAGE_SIZE and im.size[0] * im.size[1] <= full[0] * full[1] / 16


def _jpeg_tar(tmp_path, quality: int | None, n: int = 6) -> Path:
    """A tiny archive like the shared one: cifar10-jpeg/test/<class>/NNNN.jpg of smooth random 32x32 pictures,
    stored as JPEG at `quality` (None: near-lossless, standing in for the PNG originals)."""
    import tarfile
    rng = np.random.default_rng(0)
    path = tmp_path / f"q{quality}.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for i in range(n):
            small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            im = Image.fromarray(small).resize((32, 32), Image.BICUBIC)
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=quality or 100, subsampling=2 if quality else 0)
            info = tarfile.TarInfo(f"cifar10-jpeg/test/cat/{i:04d}.jpg")
            info.size = len(buf.getvalue())
            tf.addfile(info, io.BytesIO(buf.getvalue()))
        info = tarfile.TarInfo("cifar10-jpeg/train/cat/0000.jpg")  # another split: never read for "test"
        info.size = 3
        tf.addfile(info, io.BytesIO(b"bad"))
    return path


def test_reencoding_a_jpeg_at_its_own_settings_changes_far_less_than_the_first_encoding(tmp_path) -> None:
    """tools/jpeg_reencode: a q75 file encoded again at q75 has the same tables and barely moves, while the first
    q75 encoding of (near-)originals moved them more (on these noisy pictures 2x; on the real copy the second
    encoding leaves most images bit-identical): why re-compression cannot price the copy's first encoding."""
    from tools import jpeg_reencode as jr
    again = jr.measure(jr.jpeg_members(_jpeg_tar(tmp_path, 75), "test"), (75, 50))
    first = jr.measure(jr.jpeg_members(_jpeg_tar(tmp_path, None), "test"), (75,))
    assert again[75]["images"] == first[75]["images"] == 6
    assert again[75]["same_tables"] == 1.0 and again[50]["same_tables"] == 0.0 and first[75]["same_tables"] == 0.0
    assert again[50]["mean_abs"] > again[75]["mean_abs"] and first[75]["mean_abs"] > 1.5 * again[75]["mean_abs"]
    assert jr.report(again).count("\n") == 3 and "| 75 | 6 |" in jr.report(again)
