"""The CIFAR ResNeXt-29 family (Xie et al. 2017, "Aggregated Residual Transformations", §5, Table 7).

Written for explanation methods: every ReLU is its own non-inplace module used once per forward, and
the residual add is `out = out + shortcut` — Captum's DeepLift/GuidedBackprop and layer methods hook
modules and silently give wrong answers when one module runs twice or a tensor is modified in place.
This file imports nothing else of the project.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import Bottleneck as TorchvisionBottleneck
from torchvision.models.resnet import ResNet


@dataclass(frozen=True)
class ResNeXtConfig:
    """Everything needed to rebuild a model; stored in every checkpoint's metadata."""

    depths: tuple[int, ...] = (3, 3, 3)  # blocks per stage (29 = 9 blocks x 3 convs + stem + fc)
    stem_width: int = 64  # channels of the 3x3 stem conv
    widths: tuple[int, ...] = (256, 512, 1024)  # output channels of each stage
    cardinality: int = 8  # C: groups of the 3x3 conv
    base_width: int = 64  # d: channels per group in stage 1; doubles each stage like the widths
    num_classes: int = 10
    family: str = "cifar"  # "cifar" (ResNeXt-29), "fast" (FastResNeXt), "airbench" (airbench94's dense net),
    # "airbench_x" (its ResNeXt counterpart, AirbenchNet) or "torchvision" (the resnext50 seed)
    group_widths: tuple[int, ...] = ()  # d of each stage when set (airbench_x); else base_width doubling per stage

    def to_dict(self) -> dict:
        """JSON-friendly dict (tuples become lists)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ResNeXtConfig":
        """Inverse of to_dict; unknown keys are an error so a foreign config is not half-read."""
        d = dict(d)
        for k in ("depths", "widths", "group_widths"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    def group_width(self, stage: int) -> int:
        """Channels per group in the grouped 3x3 conv of `stage` (0-based)."""
        return self.group_widths[stage] if self.group_widths else self.base_width * 2**stage

    def bottleneck_width(self, stage: int) -> int:
        """Channels of the grouped conv (C x d) in `stage`."""
        return self.cardinality * self.group_width(stage)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution without bias (a BN follows)."""
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


def _relu() -> nn.Module:
    return nn.ReLU(inplace=False)


class Bottleneck(nn.Module):
    """ResNeXt block (form (c) of the paper's Fig. 3): 1x1 -> grouped 3x3 (stride here) -> 1x1, BN after each.
    `act` makes each activation module (ReLU; GELU in the airbench families)."""

    def __init__(self, in_ch: int, out_ch: int, cardinality: int, group_width: int, stride: int = 1,
                 act: Callable[[], nn.Module] = _relu):
        super().__init__()
        width = cardinality * group_width
        self.conv1 = conv1x1(in_ch, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = act()
        # The aggregated transformations: C groups of `group_width` channels each; output channels
        # [g*group_width, (g+1)*group_width) belong to group g (the per-group views rely on this).
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=cardinality, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.act2 = act()
        self.conv3 = conv1x1(width, out_ch)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(conv1x1(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))
        self.act3 = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = out + shortcut  # not +=: in-place ops break autograd hooks used by Captum
        return self.act3(out)


class ResNeXt(nn.Module):
    """CIFAR ResNeXt: 3x3 stem, stages `layer1..N` of bottleneck blocks, global pool, `fc`."""

    def __init__(self, config: ResNeXtConfig, zero_init_residual: bool = False):
        super().__init__()
        self.config = config
        self.conv1 = nn.Conv2d(3, config.stem_width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(config.stem_width)
        self.act1 = nn.ReLU(inplace=False)
        cin = config.stem_width
        self.stage_names: list[str] = []
        for i, (depth, cout) in enumerate(zip(config.depths, config.widths)):
            self.add_module(f"layer{i + 1}", nn.Sequential(*self.stage_blocks(i, cin, cout, depth)))
            self.stage_names.append(f"layer{i + 1}")
            cin = cout
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, config.num_classes)
        _init_weights(self, zero_init_residual)

    def stage_blocks(self, i: int, cin: int, cout: int, depth: int) -> list[nn.Module]:
        """Stage i's blocks: bottlenecks, the first one carrying the stride (after stage 1) and projection."""
        return [Bottleneck(cin if b == 0 else cout, cout, self.config.cardinality, self.config.group_width(i),
                           stride=2 if (i > 0 and b == 0) else 1) for b in range(depth)]

    def forward_features(self, x: torch.Tensor, stages: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Stem and all stages: N x widths[-1] x H/4 x W/4; `stages` collects the stem's and each stage's
        output on the way (what familiarity.py describes an image by)."""
        x = self.act1(self.bn1(self.conv1(x)))
        if stages is not None:
            stages.append(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
            if stages is not None:
                stages.append(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pool and classifier (or the pooled features if `pre_logits`)."""
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a fresh `num_classes` classifier and keep the config in step."""
        self.fc = nn.Linear(self.fc.in_features, num_classes).to(self.fc.weight.device)
        self.config = replace(self.config, num_classes=num_classes)

    def grouped_convs(self) -> dict[str, nn.Conv2d]:
        """Every block's grouped 3x3 conv by its stable module name, e.g. 'layer2.0.conv2'."""
        return {n: m for n, m in self.named_modules() if n.endswith("conv2") and isinstance(m, nn.Conv2d)
                and m.groups == self.config.cardinality and m.kernel_size == (3, 3) and n != "conv1"}


class Downsample(nn.Module):
    """A stage's entry in the fast family: dense 3x3 conv, 2x2 max-pool, BN, ReLU (airbench's order).

    The conv runs before the pool so it still sees the finer grid; everything after it runs at a
    quarter of the pixels, which is where the CPU time goes at this model size (memory-bound BN/ReLU).
    """

    def __init__(self, in_ch: int, out_ch: int, act: Callable[[], nn.Module] = _relu):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.bn = nn.BatchNorm2d(out_ch)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.pool(self.conv(x))))


class FastResNeXt(ResNeXt):
    """A ResNeXt built to train fast on a CPU: airbench's skeleton with ResNeXt blocks.

    Stem 3x3 conv at 32x32, then each stage `layerN` = Downsample (dense conv + pool: 16x16, 8x8, 4x4)
    followed by `depths[N]` ResNeXt bottlenecks (`layerN.1`, ...) with identity shortcuts, so all the
    grouped convs work on already-downsampled maps. Same module names inside the blocks as `ResNeXt`
    (conv2 grouped, act2 after it), so every per-group view works unchanged.
    """

    def stage_blocks(self, i: int, cin: int, cout: int, depth: int) -> list[nn.Module]:
        """Stage i's blocks: the Downsample, then `depth` bottlenecks with identity shortcuts."""
        return [Downsample(cin, cout)] + [Bottleneck(cout, cout, self.config.cardinality, self.config.group_width(i))
                                          for _ in range(depth)]


def _gelu() -> nn.Module:
    return nn.GELU()


class PlainBlock(nn.Module):
    """airbench94's second conv of a stage: 3x3 conv (dense at C=1), BN, GELU. Named like a bottleneck's middle
    (conv2, bn2, act2) so the per-group views find it. No shortcut: airbench's identity init is its residual."""

    def __init__(self, ch: int, cardinality: int = 1):
        super().__init__()
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1, groups=cardinality, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)
        self.act2 = _gelu()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(self.bn2(self.conv2(x)))


class AirbenchNet(ResNeXt):
    """airbench94's skeleton (Jordan 2024, `airbench94.py`) with this family's interface and module names.

    `conv1`: 2x2 conv without padding (3 -> stem_width, with a bias; the fast recipe sets its weight to patch
    whitening) + GELU at 31x31; stages `layerN` = Downsample (3x3 conv, 2x2 max-pool, BN, GELU: 15, 7, 3) and
    `depths[N]` blocks; global max-pool; `fc` without bias; logits x 1/9 (airbench's output scale, which its
    learning rates assume). Family "airbench": each block is a PlainBlock (airbench94 itself at depths 1,1,1).
    Family "airbench_x": ResNeXt bottlenecks (1x1 -> grouped 3x3 -> 1x1, identity shortcut, GELU), so every
    grouped conv is followed by a 1x1 that mixes its groups' channels (a grouped conv feeding another grouped
    conv would only make C separate thin networks). PyTorch's default conv init, as airbench.
    """

    logit_scale = 1 / 9

    def __init__(self, config: ResNeXtConfig):
        nn.Module.__init__(self)
        self.config = config
        self.conv1 = nn.Conv2d(3, config.stem_width, 2, bias=True)
        self.act1 = _gelu()
        cin = config.stem_width
        self.stage_names = []
        for i, (depth, cout) in enumerate(zip(config.depths, config.widths)):
            self.add_module(f"layer{i + 1}", nn.Sequential(*self.stage_blocks(i, cin, cout, depth)))
            self.stage_names.append(f"layer{i + 1}")
            cin = cout
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(cin, config.num_classes, bias=False)

    def stage_blocks(self, i: int, cin: int, cout: int, depth: int) -> list[nn.Module]:
        """Stage i: the Downsample, then `depth` plain blocks (airbench) or bottlenecks (airbench_x)."""
        c = self.config
        if c.family == "airbench":
            return [Downsample(cin, cout, _gelu)] + [PlainBlock(cout, c.cardinality) for _ in range(depth)]
        return [Downsample(cin, cout, _gelu)] + [Bottleneck(cout, cout, c.cardinality, c.group_width(i), act=_gelu)
                                                 for _ in range(depth)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and all stages: N x widths[-1] x 3 x 3 on a 32x32 input."""
        x = self.act1(self.conv1(x))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global max-pool and the scaled classifier (or the pooled features if `pre_logits`)."""
        x = torch.flatten(self.pool(x), 1)
        return x if pre_logits else self.fc(x) * self.logit_scale

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh bias-free head, the config kept in step."""
        self.fc = nn.Linear(self.fc.in_features, num_classes, bias=False).to(self.fc.weight.device)
        self.config = replace(self.config, num_classes=num_classes)


def _init_weights(model: nn.Module, zero_init_residual: bool) -> None:
    """He init for convs, BN as identity; optionally each block's last BN at 0 (block starts as identity)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:  # trains faster, but only for training
        for m in model.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)


@torch.no_grad()
def whiten_init(conv: nn.Conv2d, images: torch.Tensor, eps: float = 5e-4) -> None:
    """Set a 3-input stem conv to patch whitening (airbench): the top eigenvectors of the covariance of
    k x k patches of `images` (normalized, N x 3 x H x W), scaled to unit variance, each with its negative,
    so the first layer starts decorrelated instead of random; leftover filters keep their init."""
    k = conv.kernel_size[0]
    patches = F.unfold(images.float(), k).transpose(1, 2).reshape(-1, 3 * k * k)
    patches = patches - patches.mean(0)
    eigval, eigvec = torch.linalg.eigh(patches.T @ patches / len(patches))
    n = min(conv.out_channels // 2, len(eigval))
    top = eigvec[:, -n:].flip(1) / (eigval[-n:].flip(0) + eps).sqrt()  # largest first
    filters = torch.cat([top, -top], 1).T.reshape(2 * n, 3, k, k)
    conv.weight[:2 * n] = filters.to(conv.weight)


class TorchvisionResNeXt(ResNet):
    """The seed recipe: torchvision's resnext50_32x4d (a torchvision `ResNet`, so its module names are
    torchvision's own: 'conv1', 'layer1.0.conv2', 'fc') with a new head and this family's interface.

    Its blocks reuse one in-place ReLU (torchvision's Bottleneck), so DeepLift and GuidedBackprop are
    not reliable on it; gradient and layer methods (Saliency, IG, Grad-CAM) are fine.
    """

    def __init__(self, config: ResNeXtConfig, pretrained: bool = False):
        from torchvision.models import ResNeXt50_32X4D_Weights

        super().__init__(TorchvisionBottleneck, [3, 4, 6, 3], groups=32, width_per_group=4,
                         num_classes=1000 if pretrained else config.num_classes)
        self.config = config
        if pretrained:
            self.load_state_dict(_cached_imagenet_state(ResNeXt50_32X4D_Weights.IMAGENET1K_V2))
            self.fc = nn.Linear(self.fc.in_features, config.num_classes)
        self.stage_names = ["layer1", "layer2", "layer3", "layer4"]

    def forward_features(self, x: torch.Tensor, stages: list[torch.Tensor] | None = None) -> torch.Tensor:
        """ImageNet stem and the four stages (a 32x32 input ends at 1x1); `stages` as in ResNeXt's."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            if stages is not None:
                stages.append(x)
            x = layer(x)
        if stages is not None:
            stages.append(x)
        return x

    # the same avgpool + fc head as the CIFAR family, so the same code drives it
    forward_head = ResNeXt.forward_head
    forward = ResNeXt.forward
    reset_classifier = ResNeXt.reset_classifier

    def grouped_convs(self) -> dict[str, nn.Conv2d]:
        """Every block's grouped 3x3 conv, e.g. 'layer1.0.conv2'."""
        return {n: m for n, m in self.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1}


def _cached_imagenet_state(weights) -> dict:
    """ImageNet weights from the local torch hub cache only: this never downloads."""
    from pathlib import Path

    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not path.is_file():
        raise FileNotFoundError(f"ImageNet weights not in the local torch cache ({path}); "
                                "build without pretrained=True or download them once with torchvision.")
    return torch.load(path, map_location="cpu", weights_only=True)  # our own cache, and weights_only


# Named members of the family. MACs and parameters of each are computed by `describe()` (and listed
# in docs/model-card.md by `python -m resnext_demo.model`), never typed in by hand.
_CONFIGS: dict[str, ResNeXtConfig] = {
    # The paper's CIFAR models (Table 7): 34.4 M and 68.1 M parameters.
    "resnext29_8x64d": ResNeXtConfig(cardinality=8, base_width=64),
    "resnext29_16x64d": ResNeXtConfig(cardinality=16, base_width=64),
    "resnext29_32x4d": ResNeXtConfig(cardinality=32, base_width=4),
    # CPU-demo sized references: a half and a quarter of the paper's widths (stem 32).
    "resnext29_8x16d_small": ResNeXtConfig(stem_width=32, widths=(128, 256, 512), cardinality=8, base_width=16),
    "resnext29_8x8d_tiny": ResNeXtConfig(stem_width=32, widths=(64, 128, 256), cardinality=8, base_width=8),
    # Trainable on a 2-core CPU in about an hour (the interim default until a GPU-trained one ships).
    "resnext29_8x4d_micro": ResNeXtConfig(stem_width=16, widths=(32, 64, 128), cardinality=8, base_width=4),
}


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
    base, suffix = _CONFIGS[reference], reference.split("_", 2)[-1]
    depth = reference.split("_", 1)[0].removeprefix("resnext")  # weighted layers: 29 or 20
    out = {}
    for c in cardinalities:
        d = matched_base_width(base, c)
        name = f"resnet{depth}_{suffix}" if c == 1 else f"resnext{depth}_{c}x{d}d_{suffix}"
        out[name] = replace(base, cardinality=c, base_width=d)
    return out


# The paper's Table 3 comparison at CPU size: same parameters and FLOPs (each within 6 %: d is an
# integer, so the match is coarse at high C on narrow nets), cardinality 1 (a plain, wider ResNet
# bottleneck) up to 16 (narrower groups). C=16 on the tiny widths would miss by 8.5 %, so it is left out.
_CONFIGS.update(equal_budget_configs("resnext29_8x8d_tiny", (1, 2, 4)))
_CONFIGS.update(equal_budget_configs("resnext29_8x16d_small", (1, 4, 16)))
# The fast family (FastResNeXt), named by weighted layers and C x d like the paper; the default is
# resnext20_8x8d_fast (chosen with `python -m resnext_demo.bench --train`, see docs/training.md).
_CONFIGS.update({
    "resnext20_8x8d_fast": ResNeXtConfig(depths=(1, 2, 2), stem_width=32, widths=(64, 256, 256), cardinality=8,
                                         base_width=8, family="fast"),
    "resnext14_8x4d_fast": ResNeXtConfig(depths=(1, 1, 1), stem_width=32, widths=(64, 256, 256), cardinality=8,
                                         base_width=4, family="fast"),
    "resnext14_16x4d_fast_wide": ResNeXtConfig(depths=(1, 1, 1), stem_width=32, widths=(96, 384, 384),
                                               cardinality=16, base_width=4, family="fast"),
    # 2.4x the default's multiply-adds, still ~1.8x faster than resnet18-CIFAR at batch 1 on the CPU.
    "resnext20_16x8d_fast_wide": ResNeXtConfig(depths=(1, 2, 2), stem_width=32, widths=(96, 384, 384),
                                               cardinality=16, base_width=8, family="fast"),
    # airbench96-sized widths (128/384/512) for the GPU-trained candidates; 2x faster than resnet18-CIFAR.
    "resnext23_16x8d_fast_large": ResNeXtConfig(depths=(2, 2, 2), stem_width=32, widths=(128, 384, 512),
                                                cardinality=16, base_width=8, family="fast"),
    "resnext20_32x8d_fast_large": ResNeXtConfig(depths=(1, 2, 2), stem_width=32, widths=(128, 384, 512),
                                                cardinality=32, base_width=8, family="fast"),
})
# The cardinality sweep of the fast family at the default's budget (C=32 would miss it by 9-10 %).
_CONFIGS.update(equal_budget_configs("resnext20_8x8d_fast", (1, 2, 4, 16)))
# airbench94's dense net (`bench --train`'s reference, the fast recipe's anchor: 1.97 M parameters, 118 M MACs)
# and its ResNeXt counterparts at the same budget: each stage's plain 3x3 conv becomes a bottleneck with a
# grouped 3x3 of C groups of d channels (d of stage 1, stages 2 and 3). The d's come from
# `airbench_x_widths(C)`; tests/test_speedrun.py checks parameters and MACs within 5 % of airbench94.
AIRBENCH94 = ResNeXtConfig(depths=(1, 1, 1), stem_width=24, widths=(64, 256, 256), cardinality=1, base_width=64,
                           family="airbench")
_AIRBENCH_X = {"airbench94x_1x229d": (1, 57, 229), "airbench94x_2x155d": (2, 38, 155),
               "airbench94x_4x102d": (4, 27, 102), "airbench94x_8x66d": (8, 17, 66),
               "airbench94x_16x41d": (16, 11, 41), "airbench94x_32x25d": (32, 6, 25)}
_CONFIGS["airbench94"] = AIRBENCH94
_CONFIGS.update({name: replace(AIRBENCH94, family="airbench_x", cardinality=c, base_width=d1, group_widths=(d1, d, d))
                 for name, (c, d1, d) in _AIRBENCH_X.items()})


def airbench_family() -> dict[int, str]:
    """The equal-budget airbench94x models by cardinality C (the fast sweep's members)."""
    return {c: name for name, (c, _, _) in _AIRBENCH_X.items()}


def airbench_x_widths(cardinality: int) -> tuple[int, int]:
    """(d of stage 1, d of stages 2-3) giving airbench94's parameters and MACs at `cardinality`: each stage's
    bottleneck (2*w*cout + 9*w*w/C, w = C*d) near the dense 3x3's 9*cout^2, then the neighbours checked on the
    whole network for the smaller of the larger relative misses."""
    p0, m0 = config_params(AIRBENCH94), config_macs(AIRBENCH94)

    def near(cout: int) -> int:
        return min(range(1, 4 * cout), key=lambda d: abs(2 * cout * cardinality * d + 9 * cardinality * d * d
                                                         - 9 * cout * cout))

    def worst(d1: int, d: int) -> float:
        c = replace(AIRBENCH94, family="airbench_x", cardinality=cardinality, base_width=d1, group_widths=(d1, d, d))
        return max(abs(config_params(c) - p0) / p0, abs(config_macs(c) - m0) / m0)

    g1, g = near(AIRBENCH94.widths[0]), near(AIRBENCH94.widths[1])
    return min(((d1, d) for d1 in range(max(1, g1 - 2), g1 + 3) for d in range(max(1, g - 2), g + 3)),
               key=lambda t: worst(*t))


_CONFIGS["resnext50_32x4d"] = ResNeXtConfig(depths=(3, 4, 6, 3), stem_width=64, widths=(256, 512, 1024, 2048),
                                            cardinality=32, base_width=4, family="torchvision")


def list_models() -> list[str]:
    """Names accepted by `build_model`."""
    return list(_CONFIGS)


def get_config(name: str, num_classes: int = 10) -> ResNeXtConfig:
    """The config of a named model."""
    if name not in _CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(list_models())}")
    return replace(_CONFIGS[name], num_classes=num_classes)


def build_from_config(config: ResNeXtConfig, zero_init_residual: bool = False, pretrained: bool = False) -> nn.Module:
    """Build a model from its config (what a checkpoint stores)."""
    if config.family == "torchvision":
        return TorchvisionResNeXt(config, pretrained=pretrained)
    if config.family == "fast":
        return FastResNeXt(config, zero_init_residual=zero_init_residual)
    if config.family in ("airbench", "airbench_x"):
        return AirbenchNet(config)
    if config.family != "cifar":
        raise ValueError(f"unknown model family {config.family!r}")
    return ResNeXt(config, zero_init_residual=zero_init_residual)


def build_model(name: str, num_classes: int = 10, zero_init_residual: bool = False,
                pretrained: bool = False) -> nn.Module:
    """Build a named model; `pretrained` (seed recipe only) uses ImageNet weights from the local cache."""
    if pretrained and get_config(name).family != "torchvision":
        raise ValueError("pretrained weights exist only for the torchvision seed recipe (resnext50_32x4d)")
    return build_from_config(get_config(name, num_classes), zero_init_residual, pretrained)


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's parameters (CPU for a parameterless module)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def count_params(model: nn.Module) -> int:
    """Number of parameters (BN buffers excluded, as in the paper)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, size: int = 32) -> int:
    """Multiply-adds of one forward on a 3 x size x size image (the paper's 'FLOPs')."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size, device=device_of(model)))
    model.train(was_training)
    return counter.get_total_flops() // 2  # the counter reports 2 FLOPs per multiply-add


def describe(name: str) -> dict:
    """Name, config, parameters and MACs of a named model."""
    cfg = get_config(name)
    m = build_from_config(cfg)
    return {"name": name, "cardinality": cfg.cardinality, "base_width": cfg.base_width,
            "params": count_params(m), "macs": count_macs(m)}


def cpu_latency_ms(model: nn.Module, budget_s: float = 2.0) -> float:
    """Median single-image (batch 1, 32x32) forward time in ms, eval + inference_mode + channels_last."""
    import statistics
    import time

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


if __name__ == "__main__":  # python -m resnext_demo.model [--latency]: the family table of docs/model-card.md
    import sys

    latency = "--latency" in sys.argv
    print("| name | C x d | params (M) | MFLOPs |" + (f" CPU ms/image ({torch.get_num_threads()} threads) |" if latency else ""))
    print("|---|---|---:|---:|" + ("---:|" if latency else ""))
    for n in list_models():
        d = describe(n)
        ms = f" {cpu_latency_ms(build_model(n)):.1f} |" if latency else ""
        print(f"| `{n}` | {d['cardinality']} x {d['base_width']}d | {d['params'] / 1e6:.2f} | {d['macs'] / 1e6:.0f} |{ms}")
