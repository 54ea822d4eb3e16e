"""Image models of the three papers, built by name from the ``model:`` section of a config.

* ``resnet50`` -- ResNet-50 (He et al. 2016), bottleneck blocks [3, 4, 6, 3]. Option ``variant``:
  ``"v1.5"`` puts the stride of a down-sampling block on its 3x3 convolution (torchvision, NVIDIA),
  ``"goyal"`` puts it on the first 1x1 convolution, as the original ResNet and the Caffe2 model of
  Goyal et al. do. Both have 25,557,032 parameters with 1000 classes.
* ``wrn`` -- Wide ResNet for 32x32 images (Zagoruyko & Komodakis 2016), pre-activation basic
  blocks, options ``depth`` (6n + 4) and ``widen_factor``; ``wrn_16_4`` and ``wrn_28_10`` are the
  two networks of Smith et al. and of the WRN paper (2,748,890 and 36,479,194 parameters with 10
  classes).
* ``small_resnet`` -- a post-activation ResNet with three stages (``width``, 2 ``width``,
  4 ``width`` channels) of ``blocks`` basic blocks each, for 8x8 to 32x32 images: the demo model,
  fast on a CPU.
* ``torchvision.<name>`` -- any ``torchvision.models`` constructor (torchvision is imported only
  then, and is optional).

Initialisation (Goyal et al. section 5.1): convolutions He-normal with fan_out (Caffe2's
``MSRAFill``), fully connected layer N(0, 0.01^2) with zero bias, BN gamma = 1 and beta = 0,
except the last BN of every residual block of ``resnet50`` and ``small_resnet``, whose gamma
starts at 0 (``zero_init_residual``) so that every block starts as the identity. Pre-activation
blocks (``wrn``) have no BN after their last convolution, hence no zero-gamma.

Ghost batch norm (:func:`use_ghost_batch_norm`, ``train.bn_group``): every ``BatchNorm2d``
normalizes each fixed group of ``group`` consecutive samples with that group's statistics, so
that a sample's output depends only on its group, not on the per-rank or micro-batch size: the
same global batch gives the same activations on any world size (Goyal et al. keep n = 32
samples per BN for this reason).
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch import nn

from hvd_largebatch.errors import ConfigError

RESNET50_VARIANTS = ("v1.5", "goyal")


def init_weights(model: nn.Module) -> None:
    """He-normal (fan_out) convolutions, N(0, 0.01) linear weights, zero biases, BN (1, 0)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.01)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


def projection(cin: int, cout: int, stride: int) -> nn.Module | None:
    """1x1 convolution + BN shortcut when the shape changes, else None (identity)."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))


class Bottleneck(nn.Module):
    """1x1 (reduce) -> 3x3 -> 1x1 (expand x4), BN after each, ReLU after the sum.

    ``stride_on_1x1`` selects Goyal's / the original placement of the stride (on ``conv1``)
    instead of ResNet v1.5's (on ``conv2``). ``last_bn`` is ``bn3``, zero-initialised.
    """

    expansion = 4

    def __init__(self, cin: int, mid: int, stride: int, stride_on_1x1: bool):
        super().__init__()
        cout = mid * self.expansion
        self.conv1 = conv1x1(cin, mid, stride if stride_on_1x1 else 1)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = conv3x3(mid, mid, 1 if stride_on_1x1 else stride)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = conv1x1(mid, cout)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = projection(cin, cout, stride)
        self.relu = nn.ReLU(inplace=True)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.relu(out + identity)


class BasicBlock(nn.Module):
    """Post-activation 3x3 -> 3x3 block (ResNet-18/34 style); ``last_bn`` is ``bn2``."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = projection(cin, cout, stride)
        self.relu = nn.ReLU(inplace=True)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.relu(out + identity)


def zero_last_bn_gammas(model: nn.Module) -> int:
    """Set gamma = 0 on the ``last_bn`` of every residual block; return how many were set."""
    count = 0
    for m in model.modules():
        if isinstance(m, (Bottleneck, BasicBlock)):
            nn.init.zeros_(m.last_bn.weight)
            count += 1
    return count


class ResNet50(nn.Module):
    """ResNet-50 for 224x224 ImageNet images (any size >= 32 works: global average pooling)."""

    def __init__(self, num_classes: int = 1000, variant: str = "v1.5", zero_init_residual: bool = True):
        super().__init__()
        if variant not in RESNET50_VARIANTS:
            raise ConfigError("model.options.variant",
                              f"must be one of {', '.join(RESNET50_VARIANTS)}, got {variant!r}")
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64),
            nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1))
        stages, cin = [], 64
        for mid, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            layers = []
            for b in range(blocks):
                layers.append(Bottleneck(cin, mid, stride if b == 0 else 1, variant == "goyal"))
                cin = mid * Bottleneck.expansion
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self)
        if zero_init_residual:
            zero_last_bn_gammas(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class WideBlock(nn.Module):
    """Pre-activation block of a Wide ResNet: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = conv3x3(cout, cout)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.relu = nn.ReLU(inplace=True)
        # projection shortcut on the pre-activated input, no BN (as in the WRN paper's code)
        self.shortcut = None if (stride == 1 and cin == cout) else conv1x1(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu(self.bn1(x))
        out = self.conv1(act)
        out = self.conv2(self.dropout(self.relu(self.bn2(out))))
        return out + (x if self.shortcut is None else self.shortcut(act))


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` for 32x32 images: 3 groups of (depth - 4) / 6 blocks with
    16k, 32k, 64k channels (strides 1, 2, 2), then BN-ReLU, global average pool and FC."""

    def __init__(self, num_classes: int = 10, depth: int = 28, widen_factor: int = 10,
                 dropout: float = 0.0):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ConfigError("model.options.depth", f"must be 6n + 4 with n >= 1, got {depth}")
        if widen_factor < 1:
            raise ConfigError("model.options.widen_factor", f"must be >= 1, got {widen_factor}")
        if not 0 <= dropout < 1:
            raise ConfigError("model.options.dropout", f"must be in [0, 1), got {dropout}")
        n = (depth - 4) // 6
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.stem = conv3x3(3, 16)
        groups, cin = [], 16
        for width, stride in zip(widths, (1, 2, 2)):
            groups.append(nn.Sequential(*[WideBlock(cin if b == 0 else width, width,
                                                    stride if b == 0 else 1, dropout)
                                          for b in range(n)]))
            cin = width
        self.groups = nn.Sequential(*groups)
        self.bn = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.groups(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class SmallResNet(nn.Module):
    """Three stages of ``blocks`` basic blocks (``width``, 2 ``width``, 4 ``width`` channels,
    strides 1, 2, 2) after a 3x3 stem: 78,042 parameters at width 16 with 10 classes; for 8x8 to 32x32 images."""

    def __init__(self, num_classes: int = 10, width: int = 16, blocks: int = 1,
                 zero_init_residual: bool = True):
        super().__init__()
        if width < 1:
            raise ConfigError("model.options.width", f"must be >= 1, got {width}")
        if blocks < 1:
            raise ConfigError("model.options.blocks", f"must be >= 1, got {blocks}")
        self.stem = nn.Sequential(conv3x3(3, width), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        stages, cin = [], width
        for mult, stride in ((1, 1), (2, 2), (4, 2)):
            cout = width * mult
            stages.append(nn.Sequential(*[BasicBlock(cin if b == 0 else cout, cout,
                                                     stride if b == 0 else 1)
                                          for b in range(blocks)]))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self)
        if zero_init_residual:
            zero_last_bn_gammas(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def _wrn(depth: int, widen_factor: int) -> Callable[..., WideResNet]:
    def build(num_classes: int = 10, dropout: float = 0.0) -> WideResNet:
        return WideResNet(num_classes, depth, widen_factor, dropout)
    build.__doc__ = f"WRN-{depth}-{widen_factor}."
    return build


#: model name -> builder(num_classes, **options)
MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet50": ResNet50,
    "wrn": WideResNet,
    "wrn_16_4": _wrn(16, 4),
    "wrn_28_10": _wrn(28, 10),
    "small_resnet": SmallResNet,
}
TORCHVISION_PREFIX = "torchvision."


def model_options(name: str) -> dict[str, object]:
    """The options (keyword -> default) that model ``name`` accepts; ConfigError if unknown.

    torchvision models accept any keyword (checked by torchvision when built)."""
    if name.startswith(TORCHVISION_PREFIX):
        return {}
    if name not in MODELS:
        raise ConfigError("model.name", f"unknown model {name!r}; known: "
                          f"{', '.join(MODELS)}, or {TORCHVISION_PREFIX}<name>")
    params = inspect.signature(MODELS[name]).parameters
    return {k: p.default for k, p in params.items() if k != "num_classes"}


def check_model_options(name: str, options: dict) -> None:
    """ConfigError naming ``model.options.<key>`` for an option model ``name`` does not take
    (types are checked by ``hvd_largebatch.training.config`` against :func:`model_options` defaults)."""
    known = model_options(name)
    if name.startswith(TORCHVISION_PREFIX):
        return
    for key in options:
        if key not in known:
            raise ConfigError(f"model.options.{key}",
                              f"{name} takes no such option; it takes {', '.join(known) or 'none'}")


def build_model(name: str, num_classes: int, options: dict | None = None) -> nn.Module:
    """Build model ``name`` with ``num_classes`` outputs and ``options`` (the config's
    ``model.options``). Randomness comes from torch's global generator: seed it first."""
    options = dict(options or {})
    if num_classes < 1:
        raise ConfigError("model.num_classes", f"must be >= 1, got {num_classes}")
    if name.startswith(TORCHVISION_PREFIX):
        return _torchvision_model(name[len(TORCHVISION_PREFIX):], num_classes, options)
    check_model_options(name, options)
    return MODELS[name](num_classes=num_classes, **options)


def _torchvision_model(name: str, num_classes: int, options: dict) -> nn.Module:
    try:
        import torchvision.models as tvm
    except Exception as e:  # ImportError, or a torchvision built for another torch
        raise ConfigError("model.name", f"torchvision.{name} needs a working torchvision ({e})") from e
    builder = getattr(tvm, name, None)
    if not callable(builder):
        raise ConfigError("model.name", f"torchvision.models has no model {name!r}")
    try:
        return builder(num_classes=num_classes, **options)
    except TypeError as e:
        raise ConfigError("model.options", f"torchvision.{name}: {e}") from e


class GhostBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training-mode statistics are those of each group of ``group``
    consecutive samples (the batch must hold a multiple of ``group`` samples).

    Each group is normalized with its own mean and biased variance over (samples, H, W), then
    scaled by gamma and shifted by beta. The running statistics do not move in ``forward``: each
    forward adds its groups' means and unbiased variances to a pending sum, and
    :func:`ghost_bn_statistics` / :func:`apply_ghost_bn_statistics` (called once per optimizer
    step, with the sums added over ranks in between) move them by one momentum update towards
    the mean over all groups of the global batch. So they are the same on every rank and on any
    world size and micro-batching (up to summation order). Evaluation mode is plain
    ``BatchNorm2d``; parameters, buffers and ``state_dict`` keys are those of ``BatchNorm2d``.
    """

    group: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        n, c, h, w = x.shape
        if n % self.group:
            raise ValueError(f"ghost batch norm: a batch of {n} samples is not a multiple of the "
                             f"group of {self.group} (train.bn_group)")
        xg = x.reshape(n // self.group, self.group, c, h * w).float()  # fp32 statistics
        var, mean = torch.var_mean(xg, dim=(1, 3), correction=0, keepdim=True)
        y = ((xg - mean) * torch.rsqrt(var + self.eps)).reshape(n, c, h, w)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        y = y.to(x.dtype)
        if self.track_running_stats:
            with torch.no_grad():
                count = self.group * h * w
                unbiased = var.flatten(1).sum(0) * (count / max(count - 1, 1))
                pending = torch.cat([mean.flatten(1).sum(0), unbiased,
                                     mean.new_full((1,), n // self.group)])
                old = getattr(self, "_pending", None)
                self._pending = pending if old is None else old + pending
        return y


def ghost_bn_statistics(model: nn.Module) -> torch.Tensor | None:
    """The pending group statistics of every ``GhostBatchNorm2d`` of ``model`` as one fp32
    vector (per layer: sum of group means [C], sum of unbiased group variances [C], number of
    groups [1]); None when no layer has any. Sum it over ranks, then
    :func:`apply_ghost_bn_statistics`."""
    parts = [m._pending.float() for m in model.modules()
             if isinstance(m, GhostBatchNorm2d) and getattr(m, "_pending", None) is not None]
    return torch.cat(parts) if parts else None


def apply_ghost_bn_statistics(model: nn.Module, pending: torch.Tensor) -> None:
    """One momentum update of every ghost BN layer's running statistics towards the mean over
    the groups in ``pending`` (from :func:`ghost_bn_statistics`, summed over ranks)."""
    offset = 0
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, GhostBatchNorm2d) or getattr(m, "_pending", None) is None:
                continue
            c = m.num_features
            part = pending[offset:offset + 2 * c + 1].to(m.running_mean.dtype)
            offset += 2 * c + 1
            m.num_batches_tracked += 1
            f = m.momentum if m.momentum is not None else 1.0 / float(m.num_batches_tracked)
            groups = part[2 * c]
            m.running_mean.mul_(1 - f).add_(part[:c] / groups, alpha=f)
            m.running_var.mul_(1 - f).add_(part[c:2 * c] / groups, alpha=f)
            m._pending = None


def use_ghost_batch_norm(model: nn.Module, group: int) -> int:
    """Turn every ``BatchNorm2d`` of ``model`` into a :class:`GhostBatchNorm2d` of ``group``
    samples, in place (same parameters and buffers); return how many were turned."""
    if group < 1:
        raise ConfigError("train.bn_group", f"must be >= 1, got {group}")
    count = 0
    for m in model.modules():
        if type(m) in (nn.BatchNorm2d, GhostBatchNorm2d):
            m.__class__ = GhostBatchNorm2d
            m.group = int(group)
            count += 1
    return count


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (elements)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
