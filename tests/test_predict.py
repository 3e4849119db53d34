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


# ---------------------------------------------------------------- the fast lane (issue 31)


def test_predict_many_gives_each_image_what_predict_gives_it_alone(tiny_model):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (40 + i, 36, 3), dtype=np.uint8) for i in range(5)]
    images.insert(2, b"not an image")  # a bad image in the middle of the batch fails alone
    many = predict.predict_many(tiny_model, images, data.CLASSES)
    assert isinstance(many[2], data.ImageError)
    for im, got in zip(images, many):
        if isinstance(im, bytes):
            continue
        alone = predict.predict(tiny_model, im, data.CLASSES)
        assert got.top_class == alone.top_class and list(got.probs) == list(alone.probs)
        assert all(abs(got.probs[c] - alone.probs[c]) < 1e-6 for c in alone.probs)
        assert np.array_equal(np.asarray(got.image32), np.asarray(alone.image32))


def test_batcher_runs_concurrent_requests_together_and_a_bad_image_fails_alone(tiny_model):
    import threading

    from resnext_demo.ui.serving import PredictBatcher

    batcher = PredictBatcher(max_batch=16, wait_s=0.05)
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(7)] + [b"\x89PNG broken"]
    results: dict[int, object] = {}
    start = threading.Barrier(len(images))

    def ask(i: int) -> None:
        start.wait()
        try:
            results[i] = batcher.predict(tiny_model, images[i], data.CLASSES)
        except data.ImageError as e:
            results[i] = e

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert isinstance(results[7], data.ImageError)
    for i in range(7):
        alone = predict.predict(tiny_model, images[i], data.CLASSES)
        assert results[i].top_class == alone.top_class
        assert abs(results[i].probs[alone.top_class] - alone.probs[alone.top_class]) < 1e-6
    assert sum(batcher.sizes) == len(images) and max(batcher.sizes) > 1  # they shared forward passes


def test_batcher_never_mixes_models(tiny_model):
    import copy
    import threading

    from resnext_demo.ui.serving import PredictBatcher

    other = copy.deepcopy(tiny_model)
    with torch.no_grad():
        other.fc.bias += torch.arange(10.0) * 5  # a different model: class 9 wins everywhere
    batcher = PredictBatcher(wait_s=0.05)
    im = np.zeros((32, 32, 3), np.uint8)
    out = {}
    threads = [threading.Thread(target=lambda k=k, m=m: out.__setitem__(k, batcher.predict(m, im, data.CLASSES)))
               for k, m in (("a", tiny_model), ("b", other))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert out["a"].top_class == predict.predict(tiny_model, im, data.CLASSES).top_class
    assert out["b"].top_class == "truck"


def test_predict_logits_leaves_the_callers_mode_alone(tiny_model) -> None:
    """Scoring a model that is training (fit's per-epoch accuracy, a fine-tune) runs in eval mode on a view and
    hands the model back in the mode it had, down to each module (a frozen stage stays in eval)."""
    from resnext_demo.predict import predict_logits

    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    tiny_model.eval()
    want = predict_logits(tiny_model, x)
    tiny_model.train()
    tiny_model.layer1.eval()
    modes = [m.training for m in tiny_model.modules()]
    assert torch.allclose(predict_logits(tiny_model, x), want, atol=1e-5)  # eval-mode BN, not batch statistics
    assert [m.training for m in tiny_model.modules()] == modes
    assert predict_logits(tiny_model, x[:0]).shape == (0, want.shape[1])
