"""The only checkpoint reader/writer: safetensors tensors + JSON metadata in the safetensors header.

Nothing here unpickles: a checkpoint is plain tensors plus a JSON string, so loading a file a user
uploads can at worst fail, never run code. The metadata holds the model config, so a checkpoint alone
rebuilds its model, and the data facts (classes, mean/std) that loading checks against `data.py`.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from . import data
from .errors import UserError
from .familiarity import TENSOR_PREFIX, Familiarity, embed
from .model import ResNeXtConfig, build_from_config

FORMAT = "resnext-demo/1"
META_KEY = "resnext_demo"
WEIGHTS_DIR = data.PROJECT_ROOT / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "default.safetensors"
SWEEP_RESULTS = WEIGHTS_DIR / "sweep" / "results.json"  # the cardinality sweep's (resnext_demo.sweep)


class CheckpointError(UserError):
    """A file that is not a usable checkpoint; the message is meant for the user."""


def code_commit() -> str:
    """The git commit of this code (recorded in checkpoints), or 'unknown' outside a checkout.
    $RESNEXT_DEMO_COMMIT wins: a copy of the tree without .git (a lent GPU machine) still records it."""
    if os.environ.get("RESNEXT_DEMO_COMMIT"):
        return os.environ["RESNEXT_DEMO_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=data.PROJECT_ROOT, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _unwrap(model: nn.Module) -> nn.Module:
    """The module itself under DDP / torch.compile / EMA wrappers."""
    for attr in ("module", "_orig_mod"):
        while hasattr(model, attr) and isinstance(getattr(model, attr), nn.Module):
            model = getattr(model, attr)
    return model


def state_digest(model: nn.Module, float32: bool = False) -> str:
    """sha256 (64 hex chars) of a model's parameters and buffers in order, names included: equal weights, equal
    digest. With `float32`, every tensor is cast to float32 first (integer buffers too), the form train.py prints
    so that DDP ranks can be compared; without, the raw bytes (specialization.model_digest, a cache key)."""
    h = hashlib.sha256()
    for name, t in _unwrap(model).state_dict().items():
        t = t.detach().cpu()
        h.update(name.encode())
        h.update((t.float() if float32 else t).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict | None = None, half: bool = False,
                    extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write model weights and metadata atomically (temp file + rename); `half` stores floats as fp16.
    The model's calibration and familiarity detector, when it carries them, are written too."""
    from safetensors.torch import save_file

    model = _unwrap(model)
    config: ResNeXtConfig = model.config
    classes = list((meta or {}).get("classes") or data.CLASSES)
    full = {**(meta or {}), "format": FORMAT, "config": config.to_dict(), "classes": classes,
            "mean": list(data.MEAN), "std": list(data.STD), "dtype": "float16" if half else "float32"}
    full.setdefault("code_commit", code_commit())
    full.pop("calibration", None)  # only what the model carries now: a stale entry would mislabel it
    full.pop("familiarity", None)
    if getattr(model, "calibration", None):
        full["calibration"] = model.calibration
    fam: Familiarity | None = getattr(model, "familiarity", None)
    if fam is not None:
        full["familiarity"] = fam.meta()
    if len(classes) != config.num_classes:
        raise ValueError(f"{len(classes)} class names for a {config.num_classes}-class model")
    tensors = {}
    for k, v in model.state_dict().items():
        v = v.detach().to("cpu")
        tensors[k] = (v.half() if half and v.is_floating_point() else v).contiguous().clone()
    for k, v in (extra_tensors or {}).items():  # e.g. optimizer momentum for resuming training
        tensors[f"extra.{k}"] = v.detach().to("cpu").contiguous().clone()
    if fam is not None:
        tensors.update({k: v.contiguous().clone() for k, v in fam.tensors().items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={META_KEY: json.dumps(full)})
        os.replace(tmp, path)  # a crash mid-write never leaves a half checkpoint under the real name
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_metadata(path: str | Path) -> dict:
    """The checkpoint's metadata, validated; raises CheckpointError with a clear message."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"No checkpoint at {path}.")
    try:  # parse first: a valid safetensors header length may start with any byte, 0x80 and 'P' included
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for every malformed header
        with open(path, "rb") as fh:
            head = fh.read(4)
        if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05") or head == b"PK\x03\x04":
            kind = "a PyTorch pickle (.pt/.pth)" if head[:1] == b"\x80" else "a zip-based PyTorch file (.pt/.pth: a pickle in a zip)"
            raise CheckpointError(f"{path.name} looks like {kind}. Only .safetensors checkpoints are "
                                  "accepted: unpickling a file can run arbitrary code.") from e
        raise CheckpointError(f"{path.name} is not a valid safetensors file (truncated or corrupted?): {e}") from e
    if META_KEY not in header:
        raise CheckpointError(f"{path.name} is a safetensors file but not a resnext-demo checkpoint "
                              "(it has no resnext_demo metadata).")
    try:
        meta = json.loads(header[META_KEY])
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path.name}: unsupported checkpoint format {meta.get('format')!r}.")
        meta["config"] = ResNeXtConfig.from_dict(meta["config"])
    except CheckpointError:
        raise
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path.name}: its metadata is damaged ({e}).") from e
    _check_data_facts(meta, path.name)
    return meta


def _check_data_facts(meta: dict, name: str) -> None:
    """The checkpoint's normalization must be ours; its classes CIFAR-10's unless it declares its own."""
    if [round(v, 6) for v in meta.get("mean", [])] != [round(v, 6) for v in data.MEAN] or \
            [round(v, 6) for v in meta.get("std", [])] != [round(v, 6) for v in data.STD]:
        raise CheckpointError(f"{name}: trained with other normalization (mean/std {meta.get('mean')}/"
                              f"{meta.get('std')}) than this app uses ({list(data.MEAN)}/{list(data.STD)}).")
    classes = meta.get("classes")
    if not isinstance(classes, list) or len(classes) != meta["config"].num_classes or len(set(classes)) != len(classes):
        raise CheckpointError(f"{name}: its class list does not match its {meta['config'].num_classes}-class head.")
    if not meta.get("custom_classes") and tuple(classes) != data.CLASSES:
        raise CheckpointError(f"{name}: its classes {classes} are not CIFAR-10's, and it does not declare "
                              "custom classes.")


def load_checkpoint(path: str | Path = DEFAULT_WEIGHTS, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model from a checkpoint and load its weights (float32, eval mode); returns (model, meta)."""
    from safetensors.torch import load_file

    meta = read_metadata(path)
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{Path(path).name}: its tensors cannot be read (truncated?): {e}") from e
    state = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()
             if not k.startswith(("extra.", TENSOR_PREFIX))}
    model = build_from_config(meta["config"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{Path(path).name}: its weights do not fit its own config ({e}).") from e
    attach_trust(model, meta, tensors, Path(path).name)
    return model.to(device).eval(), meta


def attach_trust(model: nn.Module, meta: dict, tensors: dict[str, torch.Tensor], name: str) -> None:
    """Set `model.calibration` (its metadata entry, with the temperature every shown probability uses) and
    `model.familiarity` (the unfamiliar-image detector, or None) from a checkpoint's metadata and tensors.
    Plain attributes, so every copy the app makes of the model (eval views, fine-tunes) carries them."""
    cal = meta.get("calibration") or None
    if cal is not None:
        t = cal.get("temperature") if isinstance(cal, dict) else None
        if not isinstance(t, (int, float)) or not math.isfinite(t) or not 0.01 <= t <= 100:
            raise CheckpointError(f"{name}: its calibration temperature {t!r} is not a number in [0.01, 100].")
    model.calibration = cal
    try:
        fam = Familiarity.from_checkpoint(meta.get("familiarity"), tensors)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{name}: its familiarity metadata is damaged ({e}).") from e
    if fam is not None:  # one tiny forward: a detector that does not fit the model fails here, not per request
        try:
            with torch.inference_mode():
                fam.score(embed(model.eval(), torch.zeros(1, 3, data.IMAGE_SIZE, data.IMAGE_SIZE))[1])
        except (RuntimeError, IndexError, ValueError) as e:
            raise CheckpointError(f"{name}: its familiarity detector does not fit the model ({e}).") from e
    model.familiarity = fam


def load_extra_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The non-model tensors saved with `extra_tensors` (training state for resuming)."""
    from safetensors.torch import load_file

    return {k[len("extra."):]: v for k, v in load_file(str(path)).items() if k.startswith("extra.")}
