"""Models: parameter counts from the architectures by hand, zero-gamma placement, strides, init
statistics, output shapes and option checking."""
import math
import sys

import pytest
import torch
from torch import nn

from hvd_largebatch.errors import ConfigError
from hvd_largebatch.models import (BasicBlock, Bottleneck, ResNet50, SmallResNet, WideResNet,
                                   build_model, count_parameters)


def bn(c):  # gamma + beta
    return 2 * c


def resnet50_count(classes=1000):
    """He et al.'s ResNet-50, counted layer by layer (convolutions have no bias)."""
    total = 7 * 7 * 3 * 64 + bn(64)
    cin = 64
    for mid, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            out = 4 * mid
            total += cin * mid + bn(mid) + 9 * mid * mid + bn(mid) + mid * out + bn(out)
            if b == 0:  # projection shortcut: 1x1 conv + BN (64 -> 256 in stage 1 too)
                total += cin * out + bn(out)
            cin = out
    return total + 2048 * classes + classes


def wrn_count(depth, k, classes=10):
    """Zagoruyko & Komodakis' WRN-depth-k: pre-activation blocks, 1x1 projection (no BN) when
    the shape changes."""
    n = (depth - 4) // 6
    total = 9 * 3 * 16
    cin = 16
    for width, stride in ((16 * k, 1), (32 * k, 2), (64 * k, 2)):
        for b in range(n):
            c = cin if b == 0 else width
            total += bn(c) + 9 * c * width + bn(width) + 9 * width * width
            if b == 0 and (c != width or stride != 1):
                total += c * width
        cin = width
    return total + bn(64 * k) + 64 * k * classes + classes


def test_parameter_counts_match_architecture_and_published_figures():
    assert resnet50_count() == 25_557_032  # torchvision / Caffe2 figure
    assert wrn_count(28, 10) == 36_479_194  # "36.5M" in the WRN paper
    assert wrn_count(16, 4) == 2_748_890  # "2.7M"
    assert count_parameters(ResNet50()) == resnet50_count()
    assert count_parameters(ResNet50(variant="goyal")) == resnet50_count()
    assert count_parameters(build_model("wrn_28_10", 10)) == wrn_count(28, 10)
    assert count_parameters(build_model("wrn_16_4", 10)) == wrn_count(16, 4)
    assert count_parameters(build_model("wrn", 100, {"depth": 10, "widen_factor": 1})) == wrn_count(10, 1, 100)


def test_small_resnet_count():
    w = 16
    expected = 9 * 3 * w + bn(w)
    for cin, cout in ((w, w), (w, 2 * w), (2 * w, 4 * w)):
        expected += 9 * cin * cout + bn(cout) + 9 * cout * cout + bn(cout)
        if cin != cout:
            expected += cin * cout + bn(cout)
    expected += 4 * w * 10 + 10
    assert count_parameters(SmallResNet(10, width=w)) == expected == 78_042


@pytest.mark.parametrize("model", [ResNet50(), SmallResNet(10, width=8, blocks=2)],
                         ids=["resnet50", "small_resnet"])
def test_zero_gamma_on_last_bn_of_every_residual_block_only(model):
    blocks = [m for m in model.modules() if isinstance(m, (Bottleneck, BasicBlock))]
    assert len(blocks) == (16 if isinstance(model, ResNet50) else 6)
    last = {id(b.bn3 if isinstance(b, Bottleneck) else b.bn2) for b in blocks}
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        expected = 0.0 if id(m) in last else 1.0
        assert torch.all(m.weight == expected)
        assert torch.all(m.bias == 0)
    assert sum(id(m) in last for m in bns) == len(blocks)
    assert all(torch.all(m.weight == 1) for m in ResNet50(zero_init_residual=False).modules()
               if isinstance(m, nn.BatchNorm2d))


def test_zero_gamma_block_is_the_identity_at_init():
    block = BasicBlock(8, 8, stride=1)
    from hvd_largebatch.models import zero_last_bn_gammas

    assert zero_last_bn_gammas(block) == 1
    x = torch.rand(4, 8, 6, 6)  # non-negative, like the output of the previous ReLU
    assert torch.equal(block(x), x)


def test_stride_placement_v1_5_vs_goyal():
    for variant, (s1, s2) in (("v1.5", (1, 2)), ("goyal", (2, 1))):
        model = ResNet50(variant=variant)
        for stage in list(model.stages)[1:]:
            first = stage[0]
            assert (first.conv1.stride[0], first.conv2.stride[0]) == (s1, s2)
            assert first.shortcut[0].stride == (2, 2)
            assert all(b.conv1.stride == b.conv2.stride == (1, 1) for b in list(stage)[1:])
        assert all(b.conv1.stride == b.conv2.stride == (1, 1) for b in model.stages[0])


def test_init_statistics():
    torch.manual_seed(0)
    model = ResNet50()
    conv = model.stages[3][1].conv2  # 512 x 512 x 3 x 3 = 2.36M weights
    fan_out = conv.out_channels * 9
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.01)
    assert abs(conv.weight.mean().item()) < 1e-3 * math.sqrt(2 / fan_out) * 10
    stem = model.stem[0]  # fan_out = 64 * 49
    assert stem.weight.std().item() == pytest.approx(math.sqrt(2 / (64 * 49)), rel=0.05)
    assert model.fc.weight.std().item() == pytest.approx(0.01, rel=0.01)
    assert abs(model.fc.weight.mean().item()) < 1e-4
    assert torch.all(model.fc.bias == 0)


@pytest.mark.parametrize("name,size,classes", [
    ("resnet50", 64, 1000), ("wrn_16_4", 32, 10), ("small_resnet", 8, 10),
    ("small_resnet", 16, 10), ("small_resnet", 32, 7)])
def test_output_shapes(name, size, classes):
    torch.manual_seed(0)
    model = build_model(name, classes)
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, classes)
    out.sum().backward()  # trainable end to end
    assert all(p.grad is not None for p in model.parameters())


def test_bad_options_name_the_key():
    with pytest.raises(ConfigError, match=r"^model\.name: unknown model 'resnet51'"):
        build_model("resnet51", 10)
    with pytest.raises(ConfigError, match=r"^model\.options\.depht: .*takes depth, widen_factor"):
        build_model("wrn", 10, {"depht": 28})
    with pytest.raises(ConfigError, match=r"^model\.options\.depth: must be 6n \+ 4"):
        WideResNet(10, depth=27)
    with pytest.raises(ConfigError, match=r"^model\.options\.variant: must be one of v1\.5, goyal"):
        build_model("resnet50", 1000, {"variant": "v2"})
    with pytest.raises(ConfigError, match=r"^model\.num_classes"):
        build_model("small_resnet", 0)


def test_torchvision_models_need_torchvision(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    with pytest.raises(ConfigError, match=r"^model\.name: torchvision\.resnet18 needs a working torchvision"):
        build_model("torchvision.resnet18", 10)


# -- ghost batch norm -------------------------------------------------------------------------
def ghost_pair(group=4, channels=3):
    from hvd_largebatch.models import use_ghost_batch_norm

    torch.manual_seed(0)
    plain = nn.BatchNorm2d(channels)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5)
        plain.bias.uniform_(-1, 1)
    ghost = nn.Sequential(nn.BatchNorm2d(channels))
    ghost[0].load_state_dict(plain.state_dict())
    assert use_ghost_batch_norm(ghost, group) == 1
    return plain, ghost


def test_ghost_batch_norm_is_plain_batch_norm_per_group():
    from hvd_largebatch.models import apply_ghost_bn_statistics, ghost_bn_statistics

    plain, ghost = ghost_pair()
    x = (torch.randn(12, 3, 5, 5) * 3 + 1).requires_grad_()
    y = ghost(x)
    # reference: a fresh BatchNorm2d (same gamma / beta) on each group of 4 samples
    refs = [nn.BatchNorm2d(3) for _ in range(3)]
    for r in refs:
        r.load_state_dict(plain.state_dict())
    xr = x.detach().clone().requires_grad_()
    yr = torch.cat([r(xr[4 * g:4 * g + 4]) for g, r in enumerate(refs)])
    torch.testing.assert_close(y, yr, rtol=0, atol=2e-6)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    (yr * w).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=0, atol=2e-5)
    torch.testing.assert_close(ghost[0].weight.grad, sum(r.weight.grad for r in refs), rtol=1e-5, atol=1e-5)
    # running statistics move only when applied: one update towards the mean over the groups
    assert torch.equal(ghost[0].running_mean, torch.zeros(3))
    apply_ghost_bn_statistics(ghost, ghost_bn_statistics(ghost))
    m = ghost[0].momentum
    mean = sum(r.running_mean for r in refs) / 3  # each ref did one update from zeros: m * mean_g
    var = sum(r.running_var for r in refs) / 3
    torch.testing.assert_close(ghost[0].running_mean, mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ghost[0].running_var, var, rtol=1e-6, atol=1e-7)
    assert ghost[0].num_batches_tracked.item() == 1 and ghost_bn_statistics(ghost) is None
    assert m == 0.1


def test_ghost_batch_norm_statistics_do_not_depend_on_the_split():
    from hvd_largebatch.models import apply_ghost_bn_statistics, ghost_bn_statistics

    _, whole = ghost_pair()
    _, split = ghost_pair()
    x = torch.randn(24, 3, 4, 4)
    y_whole = whole(x)
    parts = [split(x[:8]), split(x[8:12])]  # micro-batches of one "rank"...
    other = ghost_pair()[1]
    parts.append(other(x[12:]))  # ...and another rank
    assert torch.equal(torch.cat(parts), y_whole)  # same groups, same outputs
    summed = ghost_bn_statistics(split) + ghost_bn_statistics(other)  # the allreduce
    apply_ghost_bn_statistics(split, summed)
    apply_ghost_bn_statistics(whole, ghost_bn_statistics(whole))
    torch.testing.assert_close(split[0].running_mean, whole[0].running_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(split[0].running_var, whole[0].running_var, rtol=1e-6, atol=1e-7)


def test_ghost_batch_norm_eval_and_errors():
    plain, ghost = ghost_pair()
    with torch.no_grad():
        for bn in (plain, ghost[0]):
            bn.running_mean.fill_(0.5)
            bn.running_var.fill_(2.0)
    plain.eval(), ghost.eval()
    x = torch.randn(5, 3, 4, 4)  # any batch in evaluation
    assert torch.equal(ghost(x), plain(x))
    ghost.train()
    with pytest.raises(ValueError, match="not a multiple of the group of 4"):
        ghost(x)
    from hvd_largebatch.models import use_ghost_batch_norm

    with pytest.raises(ConfigError, match="train.bn_group"):
        use_ghost_batch_norm(ghost, 0)
