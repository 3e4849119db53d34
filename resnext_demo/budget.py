"""Budget arithmetic of the family: parameters and multiply-adds of a config without training it, and the
group widths d that give another cardinality the same budget (the paper's Table 3 comparison, §3.3).

`zoo.py` holds the named models; the equal-budget members there are written out by name and checked against
`equal_budget_configs` / `airbench_x_widths` by tests/test_model.py and tests/test_speedrun.py.
"""
from __future__ import annotations

import functools
from dataclasses import replace

import torch

from .model import ResNeXtConfig, build_from_config, count_macs, count_params
from .zoo import AIRBENCH94, get_config


def matched_base_width(config: ResNeXtConfig, cardinality: int) -> int:
    """Bottleneck width d that gives `cardinality` groups the parameter count of `config` (paper §3.3).

    Solves the block cost in*C*d + 9*C*d^2 + C*d*out for d, then checks the neighbours on the whole
    network, since d is an integer and the rounding matters at large C.
    """
    cin = cout = config.widths[0]
    c0, d0 = config.cardinality, config.base_width
    target = (cin + cout) * c0 * d0 + 9 * c0 * d0 * d0
    guess = min(range(1, 4 * d0 * c0 + 1),
                key=lambda d: abs((cin + cout) * cardinality * d + 9 * cardinality * d * d - target))
    p0, m0 = config_params(config), config_macs(config)

    def worst(d: int) -> float:  # the larger relative miss of parameters and multiply-adds
        c = replace(config, cardinality=cardinality, base_width=d)
        return max(abs(config_params(c) - p0) / p0, abs(config_macs(c) - m0) / m0)

    return min(range(max(1, guess - 2), guess + 3), key=worst)


def config_macs(config: ResNeXtConfig, size: int = 32) -> int:
    """Multiply-adds of a config on a size x size input (cifar family: without building it; = count_macs)."""
    if config.family == "fast":
        return _fast_counts(config, size)[1]
    if config.family != "cifar":
        return _built_counts(config, size)[1]
    hw = size * size
    total = 27 * config.stem_width * hw
    cin = config.stem_width
    for i, (depth, cout) in enumerate(zip(config.depths, config.widths)):
        w = config.bottleneck_width(i)
        for b in range(depth):
            c = cin if b == 0 else cout
            hw_out = hw // 4 if (i > 0 and b == 0) else hw
            total += c * w * hw + 9 * w * w // config.cardinality * hw_out + w * cout * hw_out
            if c != cout or (i > 0 and b == 0):
                total += c * cout * hw_out
            hw = hw_out
        cin = cout
    return total + cin * config.num_classes


def config_params(config: ResNeXtConfig) -> int:
    """Parameters of a config (cifar family: counted without building it; equals count_params)."""
    if config.family == "fast":
        return _fast_counts(config)[0]
    if config.family != "cifar":
        return _built_counts(config)[0]
    total = 27 * config.stem_width + 2 * config.stem_width  # stem conv + BN
    cin = config.stem_width
    for i, (depth, cout) in enumerate(zip(config.depths, config.widths)):
        w = config.bottleneck_width(i)
        for b in range(depth):
            c = cin if b == 0 else cout
            total += c * w + 9 * w * w // config.cardinality + w * cout + 2 * (2 * w + cout)
            if c != cout or (i > 0 and b == 0):
                total += c * cout + 2 * cout
        cin = cout
    return total + cin * config.num_classes + config.num_classes


def _fast_counts(config: ResNeXtConfig, size: int = 32) -> tuple[int, int]:
    """(params, MACs) of a FastResNeXt config in closed form (BN: 2 parameters per channel, no MACs)."""
    params, macs = 27 * config.stem_width + 2 * config.stem_width, 27 * config.stem_width * size * size
    cin, hw = config.stem_width, size * size
    for i, (depth, cout) in enumerate(zip(config.depths, config.widths)):
        params += 9 * cin * cout + 2 * cout  # Downsample: its conv runs before the pool, on the finer grid
        macs += 9 * cin * cout * hw
        hw //= 4
        w = config.bottleneck_width(i)
        block = cout * w + 9 * w * w // config.cardinality + w * cout
        params += depth * (block + 2 * (2 * w + cout))
        macs += depth * block * hw
        cin = cout
    return params + cin * config.num_classes + config.num_classes, macs + cin * config.num_classes


@functools.lru_cache(maxsize=512)
def _built_counts(config: ResNeXtConfig, size: int = 32) -> tuple[int, int]:
    """(params, MACs) of a family without a closed form, built on the meta device (no memory, no arithmetic)
    and cached: the equal-budget search asks for dozens of neighbouring configs."""
    with torch.device("meta"):
        m = build_from_config(config)
    return count_params(m), count_macs(m, size)

def equal_budget_configs(reference: str, cardinalities: tuple[int, ...]) -> dict[str, ResNeXtConfig]:
    """Models with the complexity of `reference` at other cardinalities, named like the paper (C x d)."""
    base, suffix = get_config(reference), reference.split("_", 2)[-1]
    depth = reference.split("_", 1)[0].removeprefix("resnext")  # weighted layers: 29 or 20
    out = {}
    for c in cardinalities:
        d = matched_base_width(base, c)
        name = f"resnet{depth}_{suffix}" if c == 1 else f"resnext{depth}_{c}x{d}d_{suffix}"
        out[name] = replace(base, cardinality=c, base_width=d)
    return out


def airbench_x_widths(cardinality: int, reference: ResNeXtConfig = AIRBENCH94) -> tuple[int, int]:
    """(d of stage 1, d of stages 2-3) giving the dense `reference`'s (airbench94's) parameters and MACs at
    `cardinality`: each stage's bottleneck (2*w*cout + 9*w*w/C, w = C*d) near the dense 3x3's 9*cout^2, then the
    neighbours checked on the whole network for the smaller of the larger relative misses."""
    p0, m0 = config_params(reference), config_macs(reference)

    def near(cout: int) -> int:
        return min(range(1, 4 * cout), key=lambda d: abs(2 * cout * cardinality * d + 9 * cardinality * d * d
                                                         - 9 * cout * cout))

    def worst(d1: int, d: int) -> float:
        c = replace(reference, family="airbench_x", cardinality=cardinality, base_width=d1, group_widths=(d1, d, d))
        return max(abs(config_params(c) - p0) / p0, abs(config_macs(c) - m0) / m0)

    g1, g = near(reference.widths[0]), near(reference.widths[1])
    return min(((d1, d) for d1 in range(max(1, g1 - 2), g1 + 3) for d in range(max(1, g - 2), g + 3)),
               key=lambda t: worst(*t))

