"""predict.py: probabilities are a sorted distribution, odd inputs work, the shared model is left alone."""
from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from PIL import Image

from resnext_demo import data, predict


def _check(p: predict.Prediction, classes=data.CLASSES):
    values = list(p.probs.values())
    assert set(p.probs) == set(classes)
    assert sum(values) == pytest.approx(1.0, abs=1e-5)
    assert values == sorted(values, reverse=True)
    assert p.top_class == next(iter(p.probs)) == classes[p.top_index]
    assert p.image32.size == (32, 32) and p.image32.mode == "RGB"
    assert p.seconds > 0 and p.device == "cpu"


def test_select_device():
    assert predict.select_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("make", [
    lambda: Image.new("RGBA", (40, 30), (255, 0, 0, 128)),
    lambda: Image.new("L", (32, 32), 77),
    lambda: Image.new("RGB", (3000, 1000), (10, 200, 30)),  # huge and not square
    lambda: np.random.default_rng(0).integers(0, 256, (50, 64, 3), dtype=np.uint8),
    lambda: np.random.default_rng(0).random((20, 20)),  # float array in 0..1
])
def test_predict_odd_images(tiny_model, make):
    _check(predict.predict(tiny_model, make(), data.CLASSES))


def test_predict_bytes_and_path(tiny_model, tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (0, 0, 255)).save(buf, format="PNG")
    _check(predict.predict(tiny_model, buf.getvalue(), data.CLASSES))
    path = tmp_path / "im.png"
    path.write_bytes(buf.getvalue())
    _check(predict.predict(tiny_model, str(path), data.CLASSES))
    with pytest.raises(data.ImageError):
        predict.predict(tiny_model, b"not an image", data.CLASSES)


def test_predict_matches_batch_and_model(tiny_model):
    img = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    p = predict.predict(tiny_model, img, data.CLASSES)
    batch = predict.predict_batch(tiny_model, data.pil_to_uint8(p.image32))
    with torch.no_grad():
        direct = torch.softmax(tiny_model(data.preprocess(img)), 1)[0]
    for i, c in enumerate(data.CLASSES):
        assert p.probs[c] == pytest.approx(batch[0, i].item(), abs=1e-6)
        assert p.probs[c] == pytest.approx(direct[i].item(), abs=1e-6)


def test_predict_batch_shapes(tiny_model):
    x = torch.randint(0, 256, (7, 3, 32, 32), dtype=torch.uint8)
    out = predict.predict_batch(tiny_model, x, batch_size=3)  # batches of 3, 3, 1 agree with one batch
    assert out.shape == (7, 10) and out.dtype == torch.float32
    torch.testing.assert_close(out.sum(1), torch.ones(7))
    torch.testing.assert_close(out, predict.predict_batch(tiny_model, x))
    assert predict.predict_batch(tiny_model, x[:0]).shape == (0, 10)


def test_predict_never_changes_the_model(tiny_model):
    tiny_model.train()  # a train-mode model is used through an eval view: BN statistics untouched
    before = copy.deepcopy(tiny_model.state_dict())
    img = Image.new("RGB", (32, 32), (100, 50, 0))
    p_train = predict.predict(tiny_model, img, data.CLASSES)
    predict.predict_batch(tiny_model, torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    assert tiny_model.training
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert p_train.probs == pytest.approx(predict.predict(tiny_model.eval(), img, data.CLASSES).probs)


def test_predict_checks_class_count(tiny_model):
    with pytest.raises(ValueError, match="class names"):
        predict.predict(tiny_model, Image.new("RGB", (8, 8)), ["a", "b"])
