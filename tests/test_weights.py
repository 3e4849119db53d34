"""Checkpoint I/O: bit-identical round trips, and clear refusals of anything else."""
from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from resnext_demo import weights
from resnext_demo.model import ResNeXt


def test_round_trip_is_bit_identical(tiny_model, tiny_checkpoint) -> None:
    x = torch.randn(4, 3, 32, 32)
    loaded, meta = weights.load_checkpoint(tiny_checkpoint)
    assert torch.equal(tiny_model(x), loaded(x))
    assert meta["config"] == tiny_model.config and meta["classes"] == list(weights.data.CLASSES)
    assert not loaded.training


def test_metadata_records_provenance(tiny_checkpoint) -> None:
    meta = weights.read_metadata(tiny_checkpoint)
    for key in ("format", "config", "classes", "mean", "std", "code_commit", "dtype"):
        assert key in meta


def test_fp16_storage_loads_as_float32(tmp_path, tiny_model) -> None:
    p = weights.save_checkpoint(tmp_path / "h.safetensors", tiny_model, half=True)
    m, meta = weights.load_checkpoint(p)
    assert meta["dtype"] == "float16" and all(v.dtype != torch.float16 for v in m.state_dict().values())
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(m(x), tiny_model(x), atol=0.05)


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path, tiny_model) -> None:
    p = tmp_path / "a.safetensors"
    weights.save_checkpoint(p, tiny_model)
    weights.save_checkpoint(p, tiny_model)  # overwrite in place
    assert [f.name for f in tmp_path.iterdir()] == ["a.safetensors"]


def test_custom_classes_round_trip(tmp_path, tiny_model) -> None:
    tiny_model.reset_classifier(2)
    p = weights.save_checkpoint(tmp_path / "c.safetensors", tiny_model, {"classes": ["cat", "hat"], "custom_classes": True})
    m, meta = weights.load_checkpoint(p)
    assert meta["classes"] == ["cat", "hat"] and m(torch.randn(1, 3, 32, 32)).shape == (1, 2)
    with pytest.raises(ValueError):
        weights.save_checkpoint(tmp_path / "bad.safetensors", tiny_model, {"classes": ["only-one"]})


def _expect(path, match: str) -> None:
    with pytest.raises(weights.CheckpointError, match=match):
        weights.load_checkpoint(path)


def test_truncated_file_is_refused(tmp_path, tiny_checkpoint) -> None:
    raw = tiny_checkpoint.read_bytes()
    for n in (4, 100, len(raw) // 2, len(raw) - 1):
        (tmp_path / "t.safetensors").write_bytes(raw[:n])
        _expect(tmp_path / "t.safetensors", "not a valid safetensors|truncated")


def test_pickle_is_refused_without_unpickling(tmp_path, tiny_model) -> None:
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps(Boom()))
    _expect(tmp_path / "evil.pt", "pickle")
    torch.save(tiny_model.state_dict(), tmp_path / "sd.pth")  # a zip-format torch checkpoint
    _expect(tmp_path / "sd.pth", "pickle")


def test_every_header_length_loads(tmp_path, tiny_model) -> None:
    """The first 8 bytes are the header length: a low byte of 0x80 (or 'P') is a valid checkpoint, not a
    pickle. Metadata of growing length walks the length's low byte over every value save_file can write."""
    seen = set()
    for k in range(0, 300):
        p = weights.save_checkpoint(tmp_path / "h.safetensors", tiny_model, {"pad": "x" * k})
        low = p.read_bytes()[0]
        if low in seen:
            continue
        seen.add(low)
        m, meta = weights.load_checkpoint(p)
        assert meta["pad"] == "x" * k and torch.equal(m.fc.weight, tiny_model.fc.weight)
    assert 0x80 in seen and len(seen) == 256 // 8  # headers are padded to 8 bytes: 32 possible low bytes


def test_pickle_protocols_and_zip_named_clearly(tmp_path) -> None:
    for proto in (2, 3, 4, 5):
        (tmp_path / f"p{proto}.pt").write_bytes(pickle.dumps({"w": [1, 2]}, protocol=proto))
        _expect(tmp_path / f"p{proto}.pt", "looks like a PyTorch pickle")
    (tmp_path / "z.pt").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    _expect(tmp_path / "z.pt", "zip-based PyTorch file")
    (tmp_path / "junk.safetensors").write_bytes(b"\x80\x00" + b"\0" * 100)  # 0x80 but no protocol byte
    _expect(tmp_path / "junk.safetensors", "not a valid safetensors")


def test_foreign_safetensors_is_refused(tmp_path) -> None:
    save_file({"w": torch.zeros(3)}, tmp_path / "foreign.safetensors")
    _expect(tmp_path / "foreign.safetensors", "not a resnext-demo checkpoint")
    save_file({"w": torch.zeros(3)}, tmp_path / "odd.safetensors", metadata={"resnext_demo": "{not json"})
    _expect(tmp_path / "odd.safetensors", "damaged")


def test_random_bytes_and_missing_file(tmp_path) -> None:
    (tmp_path / "noise.safetensors").write_bytes(torch.randint(0, 256, (5000,), dtype=torch.uint8).numpy().tobytes())
    _expect(tmp_path / "noise.safetensors", "not a valid safetensors")
    _expect(tmp_path / "absent.safetensors", "No checkpoint")


def test_other_normalization_or_classes_are_refused(tmp_path, tiny_model, tiny_checkpoint) -> None:
    meta = weights.read_metadata(tiny_checkpoint)
    tensors = {k: v.contiguous() for k, v in tiny_model.state_dict().items()}
    for change, match in (({"mean": [0.5, 0.5, 0.5]}, "normalization"),
                          ({"classes": [f"c{i}" for i in range(10)]}, "not CIFAR-10"),
                          ({"classes": ["a"] * 10}, "class list")):
        bad = {**meta, "config": meta["config"].to_dict(), **change}
        save_file(tensors, tmp_path / "x.safetensors", metadata={"resnext_demo": json.dumps(bad)})
        _expect(tmp_path / "x.safetensors", match)


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path, tiny_model, tiny_checkpoint) -> None:
    meta = weights.read_metadata(tiny_checkpoint)
    bigger = {**meta, "config": {**meta["config"].to_dict(), "stem_width": 16}}
    save_file({k: v.contiguous() for k, v in tiny_model.state_dict().items()}, tmp_path / "m.safetensors",
              metadata={"resnext_demo": json.dumps(bigger)})
    _expect(tmp_path / "m.safetensors", "do not fit")


def test_default_weights_path_is_under_weights() -> None:
    assert weights.DEFAULT_WEIGHTS.parent.name == "weights" and weights.DEFAULT_WEIGHTS.suffix == ".safetensors"


def test_shipped_checkpoint_loads(shipped_checkpoint) -> None:
    model, meta = weights.load_checkpoint(shipped_checkpoint)
    assert isinstance(model, ResNeXt) and meta["config"].cardinality >= 8
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_shipped_checkpoint_keeps_its_recorded_accuracy(shipped_checkpoint, cifar_test) -> None:
    """On a fixed, class-balanced 1,000-image slice of the test split the shipped model scores what its
    metadata claims for the whole split (within 3 points of sampling noise), and far above chance."""
    from resnext_demo.predict import predict_batch
    model, meta = weights.load_checkpoint(shipped_checkpoint)
    images, labels = cifar_test
    acc = float((predict_batch(model, images[:1000]).argmax(1) == labels[:1000]).float().mean())
    assert acc >= meta["accuracy"] - 0.03 and acc > 0.5, (acc, meta["accuracy"])


def test_shipped_checkpoint_survives_upscaled_reencoded_uploads(shipped_checkpoint, cifar_test) -> None:
    """Test images upscaled to 64 and 640 px and re-encoded (PNG, JPEG q90), then sent through the app's
    upload path, lose at most 3 points against the plain 32x32 forward on the same 100 images (a guard: a broken
    resize or colour path costs far more; the 1.10-1.30 point loss in docs/model-card.md is measured on 2,000 at 8
    settings)."""
    from resnext_demo.evaluate import upload_accuracy
    from resnext_demo.predict import predict_logits
    model, _ = weights.load_checkpoint(shipped_checkpoint)
    images, labels = cifar_test[0][:100], cifar_test[1][:100]
    plain = (predict_logits(model, images).argmax(1) == labels).float().mean().item()
    for key, acc in upload_accuracy(model, images, labels, sizes=(64, 640)).items():
        assert acc >= plain - 0.03, (key, acc, plain)
