"""Helpers of the tab tests: model state comparisons, synthetic uploads, a fine-tune run to its end."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from resnext_demo import data, finetune
from resnext_demo.ui import finetune_tab
from resnext_demo.ui.context import Context


def state_dict_copy(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def synthetic_files(tmp_path: Path, name: str, n: int, colour: tuple[int, int, int]) -> list[str]:
    """`n` noisy PNGs of one colour, named after `name`."""
    out = []
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    for i in range(n):
        a = np.clip(np.array(colour)[None, None] + rng.normal(0, 20, (36, 36, 3)), 0, 255).astype(np.uint8)
        p = tmp_path / f"{name}-{i}.png"
        Image.fromarray(a).save(p)
        out.append(str(p))
    return out


def uploads(files: dict[str, list[str]], new: dict[str, list[str]] | None = None) -> list:
    """The positional `uploads` of finetune_tab.run_finetune: 10 class zones, new names, new zones."""
    new = dict(new or {})
    names = list(new) + [""] * (finetune.MAX_NEW_CLASSES - len(new))
    zones = list(new.values()) + [None] * (finetune.MAX_NEW_CLASSES - len(new))
    return [files.get(c) for c in data.CLASSES] + names + zones


def run_finetune(ctx: Context, session, flag, files, new=None, epochs=1, layers="head", on_step=None, pending=None):
    """Every output of one fine-tune."""
    outs = []
    for out in finetune_tab.run_finetune(ctx, session, pending, flag, 0, layers, epochs, 0.05, 8, *uploads(files, new)):
        outs.append(out)
        if on_step:
            on_step(out)
    return outs
