"""The named models: one explicit table, name -> config, so every name a checkpoint, a test or the README uses
can be found with grep. The equal-budget members' widths d are written out; tests check them against
`budget.equal_budget_configs` and `budget.airbench_x_widths` (parameters and MACs within a few %).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import replace

import torch
import torch.nn as nn

from .model import ResNeXtConfig, build_from_config, count_macs, count_params

# Bases the sweeps vary (C and d change, everything else stays).
_SMALL = ResNeXtConfig(stem_width=32, widths=(128, 256, 512), cardinality=8, base_width=16)  # half the paper's widths
_TINY = ResNeXtConfig(stem_width=32, widths=(64, 128, 256), cardinality=8, base_width=8)  # a quarter
_FAST = ResNeXtConfig(depths=(1, 2, 2), stem_width=32, widths=(64, 256, 256), cardinality=8, base_width=8,
                      family="fast")
# airbench94's dense net (`bench --train`'s reference, the fast recipe's anchor: 1.97 M parameters, 118 M MACs).
AIRBENCH94 = ResNeXtConfig(depths=(1, 1, 1), stem_width=24, widths=(64, 256, 256), cardinality=1, base_width=64,
                           family="airbench")


# The same skeleton 1.5x wider (96/384/384: 4.42 M parameters, 256 M MACs), between airbench94 and airbench95.
AIRBENCH94_WIDE = replace(AIRBENCH94, widths=(96, 384, 384))


def _airbench_x(cardinality: int, d1: int, d: int, dense: ResNeXtConfig = AIRBENCH94) -> ResNeXtConfig:
    """A dense airbench skeleton with each stage's 3x3 as a bottleneck of C groups of d (d1 in stage 1)."""
    return replace(dense, family="airbench_x", cardinality=cardinality, base_width=d1, group_widths=(d1, d, d))


MODELS: dict[str, ResNeXtConfig] = {
    # The paper's CIFAR models (Table 7): 34.4 M and 68.1 M parameters.
    "resnext29_8x64d": ResNeXtConfig(cardinality=8, base_width=64),
    "resnext29_16x64d": ResNeXtConfig(cardinality=16, base_width=64),
    "resnext29_32x4d": ResNeXtConfig(cardinality=32, base_width=4),
    # CPU-demo sized references: a half and a quarter of the paper's widths (stem 32).
    "resnext29_8x16d_small": _SMALL,
    "resnext29_8x8d_tiny": _TINY,
    # The first interim default (trainable on a 2-core CPU in about an hour).
    "resnext29_8x4d_micro": ResNeXtConfig(stem_width=16, widths=(32, 64, 128), cardinality=8, base_width=4),
    # The paper's Table 3 comparison at CPU size: same parameters and MACs (within 6 %: d is an integer, so the
    # match is coarse at high C on narrow nets). C = 16 on the tiny widths would miss by 8.5 %: left out.
    "resnet29_tiny": replace(_TINY, cardinality=1, base_width=31),
    "resnext29_2x20d_tiny": replace(_TINY, cardinality=2, base_width=20),
    "resnext29_4x13d_tiny": replace(_TINY, cardinality=4, base_width=13),
    "resnet29_small": replace(_SMALL, cardinality=1, base_width=62),
    "resnext29_4x26d_small": replace(_SMALL, cardinality=4, base_width=26),
    "resnext29_16x9d_small": replace(_SMALL, cardinality=16, base_width=9),
    # The fast family (FastResNeXt), named by weighted layers and C x d like the paper.
    "resnext20_8x8d_fast": _FAST,  # the CPU-trained model (docs/model-card.md)
    "resnext14_8x4d_fast": replace(_FAST, depths=(1, 1, 1), base_width=4),
    "resnext14_16x4d_fast_wide": replace(_FAST, depths=(1, 1, 1), widths=(96, 384, 384), cardinality=16,
                                         base_width=4),
    # 2.4x resnext20_8x8d_fast's multiply-adds, still ~1.8x faster than resnet18-CIFAR at batch 1 on the CPU.
    "resnext20_16x8d_fast_wide": replace(_FAST, widths=(96, 384, 384), cardinality=16),
    # airbench96-sized widths (128/384/512): the GPU-trained candidates; resnext23_16x8d_fast_large is the default.
    "resnext23_16x8d_fast_large": replace(_FAST, depths=(2, 2, 2), widths=(128, 384, 512), cardinality=16),
    "resnext20_32x8d_fast_large": replace(_FAST, widths=(128, 384, 512), cardinality=32),
    # The first cardinality sweep, at resnext20_8x8d_fast's budget (C = 32 would miss it by 9-10 %).
    "resnet20_fast": replace(_FAST, cardinality=1, base_width=33),
    "resnext20_2x21d_fast": replace(_FAST, cardinality=2, base_width=21),
    "resnext20_4x13d_fast": replace(_FAST, cardinality=4, base_width=13),
    "resnext20_16x5d_fast": replace(_FAST, cardinality=16, base_width=5),
    # The fast-recipe sweep: airbench94 and its ResNeXt counterparts at its budget (docs/training-fast.md).
    "airbench94": AIRBENCH94,
    "airbench94x_1x229d": _airbench_x(1, 57, 229),
    "airbench94x_2x155d": _airbench_x(2, 38, 155),
    "airbench94x_4x102d": _airbench_x(4, 27, 102),
    "airbench94x_8x66d": _airbench_x(8, 17, 66),
    "airbench94x_16x41d": _airbench_x(16, 11, 41),
    "airbench94x_32x25d": _airbench_x(32, 6, 25),
    # Their 1.5x-wide pair (budget matched to airbench94_wide the same way; docs/training-fast.md).
    "airbench94_wide": AIRBENCH94_WIDE,
    "airbench94x_32x37d_wide": _airbench_x(32, 10, 37, AIRBENCH94_WIDE),
    # The seed recipe: torchvision's ImageNet ResNeXt-50 with a new head.
    "resnext50_32x4d": ResNeXtConfig(depths=(3, 4, 6, 3), stem_width=64, widths=(256, 512, 1024, 2048),
                                     cardinality=32, base_width=4, family="torchvision"),
}


def airbench_family() -> dict[int, str]:
    """The equal-budget airbench94x models by cardinality C (the fast sweep's members)."""
    return {c.cardinality: n for n, c in MODELS.items()
            if c.family == "airbench_x" and c.widths == AIRBENCH94.widths}


def list_models() -> list[str]:
    """Names accepted by `build_model`."""
    return list(MODELS)


def get_config(name: str, num_classes: int = 10) -> ResNeXtConfig:
    """The config of a named model."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(list_models())}")
    return replace(MODELS[name], num_classes=num_classes)


def build_model(name: str, num_classes: int = 10, zero_init_residual: bool = False,
                pretrained: bool = False) -> nn.Module:
    """Build a named model; `pretrained` (seed recipe only) uses ImageNet weights from the local cache."""
    if pretrained and get_config(name).family != "torchvision":
        raise ValueError("pretrained weights exist only for the torchvision seed recipe (resnext50_32x4d)")
    return build_from_config(get_config(name, num_classes), zero_init_residual, pretrained)


def describe(name: str) -> dict:
    """Name, config, parameters and MACs of a named model (measured on the built model, never typed in)."""
    cfg = get_config(name)
    m = build_from_config(cfg)
    return {"name": name, "cardinality": cfg.cardinality, "base_width": cfg.base_width,
            "params": count_params(m), "macs": count_macs(m)}


def cpu_latency_ms(model: nn.Module, budget_s: float = 2.0) -> float:
    """Median single-image (batch 1, 32x32) forward time in ms, eval + inference_mode + channels_last."""
    model = model.eval().to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    times: list[float] = []
    with torch.inference_mode():
        for _ in range(3):  # warm-up: first calls pick kernels and allocate
            model(x)
        while len(times) < 5 or (sum(times) < budget_s and len(times) < 50):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


if __name__ == "__main__":  # python -m resnext_demo.zoo [--latency]: the family table of docs/model-card.md
    import sys

    latency = "--latency" in sys.argv
    print("| name | C x d | params (M) | MFLOPs |" + (f" CPU ms/image ({torch.get_num_threads()} threads) |" if latency else ""))
    print("|---|---|---:|---:|" + ("---:|" if latency else ""))
    for n in list_models():
        d = describe(n)
        ms = f" {cpu_latency_ms(build_model(n)):.1f} |" if latency else ""
        print(f"| `{n}` | {d['cardinality']} x {d['base_width']}d | {d['params'] / 1e6:.2f} | {d['macs'] / 1e6:.0f} |{ms}")
