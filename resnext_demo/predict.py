"""Inference: any user image -> class probabilities, plus the 32x32 picture the model actually saw."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from . import calibration, data, familiarity
from .model import device_of


def select_device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class Prediction:
    """One image's result; `seconds` covers preprocessing, forward, softmax and the familiarity score."""

    probs: dict[str, float]  # every class -> calibrated probability, sorted by descending probability
    top_index: int
    top_class: str
    image32: Image.Image  # the 32x32 RGB picture the model saw: show it, users are often surprised
    seconds: float
    device: str
    unfamiliar: bool = False  # the image does not look like the model's training images (see familiarity.py)
    score: float | None = None  # its familiarity score (higher = stranger); None: the model has no detector
    rarity: float | None = None  # share of held-in CIFAR-10 test images that score at least this far
    temperature: float = 1.0  # the calibration temperature the probabilities used


def eval_view(model: nn.Module) -> nn.Module:
    """A copy of the module tree in eval mode that shares the parameter and buffer tensors (no copy).

    The shared model is used by many requests at once, so nothing may flip its mode or hook it:
    `.eval()`, Captum's hooks and FX tracing (which calls `.train()`) land on this copy instead.
    Costs a few milliseconds and no tensor memory.
    """
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}  # deepcopy reuses memo hits
    fam = getattr(model, "familiarity", None)
    if fam is not None:  # read-only reference data: share it too
        memo[id(fam)] = fam
    for m in model.modules():  # hooks another request put on the original are not copied (nor deep-copied)
        for name, d in vars(m).items():
            if name.endswith(("_hooks", "_hooks_with_kwargs", "_hooks_always_called")) and isinstance(d, dict):
                memo[id(d)] = type(d)()
    return copy.deepcopy(model, memo).eval()


def predict(model: nn.Module, image: Image.Image | np.ndarray | str | Path | bytes,
            classes: list[str] | tuple[str, ...]) -> Prediction:
    """Classify one image (PIL, array, path or bytes); raises data.ImageError for unusable images."""
    out = predict_many(model, [image], classes)[0]
    if isinstance(out, Exception):
        raise out
    return out


def predict_many(model: nn.Module, images: list, classes: list[str] | tuple[str, ...]) -> list[Prediction | Exception]:
    """Classify several images in one forward pass (the fast lane's batches); each result is what `predict`
    gives that image alone, and an unusable image gets its data.ImageError in its place, not its neighbours.
    `seconds` is the whole call's time (what each request waited for the model)."""
    if model.training:  # train-mode BN would use batch statistics and update the shared buffers
        model = eval_view(model)
    device = device_of(model)
    t0 = time.perf_counter()
    prepared: list[Image.Image | Exception] = []
    for image in images:
        try:
            prepared.append(data.prepare_image(image))
        except data.ImageError as e:
            prepared.append(e)
    ok = [i for i, im in enumerate(prepared) if not isinstance(im, Exception)]
    if not ok:
        return prepared
    fam = getattr(model, "familiarity", None)
    with torch.inference_mode():
        x = data.normalize(torch.cat([data.pil_to_uint8(prepared[i]) for i in ok]).to(device))
        logits, stages = familiarity.embed(model, x) if fam is not None else (model(x), None)
        p = calibration.probabilities(model, logits).cpu()
        scores = fam.score([s.float().cpu() for s in stages]) if fam is not None else None
    seconds = time.perf_counter() - t0  # .cpu() above synchronises CUDA, so this is the real latency
    if len(classes) != p.shape[1]:
        raise ValueError(f"{len(classes)} class names for a model with {p.shape[1]} outputs")
    t = calibration.temperature_of(model)
    out: list[Prediction | Exception] = list(prepared)
    for row, i in enumerate(ok):
        order = torch.argsort(p[row], descending=True).tolist()
        probs = {classes[c]: float(p[row, c]) for c in order}
        extra = {} if scores is None else {"unfamiliar": bool(scores[row] > fam.threshold), "score": float(scores[row]),
                                           "rarity": float(fam.rarity(scores[row].reshape(1))[0])}
        out[i] = Prediction(probs, order[0], classes[order[0]], prepared[i], seconds, str(device), temperature=t, **extra)
    return out


def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 500, device: str | torch.device | None = None,
                   tta: bool = False, bf16: bool = False) -> torch.Tensor:
    """Logits (N x K float32, CPU) of uint8 images N x 3 x 32 x 32, in batches to bound memory; `tta` averages
    with the mirrored image. The one batched-inference path: scoring, calibration and the gallery use it."""
    if any(m.training for m in model.modules()):  # score in eval mode without flipping the caller's model
        model = eval_view(model)
    device = torch.device(device or device_of(model))
    outs = []
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            xb = data.normalize(x[i:i + batch_size].to(device)).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda"):
                out = model(xb).float()
                if tta:
                    out = (out + model(xb.flip(3)).float()) / 2
            outs.append(out.cpu())
    if not outs:  # empty input: keep the K dimension so callers can still index columns
        return torch.empty(0, getattr(getattr(model, "config", None), "num_classes", 0))
    return torch.cat(outs)


def predict_batch(model: nn.Module, x_uint8: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Calibrated probabilities (N x K float32, CPU) of uint8 images N x 3 x 32 x 32."""
    return calibration.probabilities(model, predict_logits(model, x_uint8, batch_size))
