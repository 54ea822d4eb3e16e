"""fp16 dynamic loss scaling fused into FusedLARS, against torch.amp.GradScaler with the reference
LARS (overflow steps included) and against FusedLARS on unscaled gradients (bitwise)."""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F

from hvd_largebatch import FusedLARS, param_groups
from hvd_largebatch.errors import ConfigError
from hvd_largebatch.lars.loss_scale import DynamicLossScale
from hvd_largebatch.lars.reference import ReferenceLARS
from test_fused_lars import TinyNet

HYPER = dict(lr=0.5, momentum=0.9, trust_coefficient=0.02)
OVERFLOW_STEPS = {3, 4, 9}  # a gradient element is set to inf after backward at these steps


def batch(step):
    gen = torch.Generator().manual_seed(step)
    return torch.randn(16, 3, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)


def backward(model, scaled_loss_fn, step):
    x, y = batch(step)
    scaled_loss_fn(F.cross_entropy(model(x), y)).backward()
    if step in OVERFLOW_STEPS:
        next(model.parameters()).grad.view(-1)[5] = float("inf")


@pytest.mark.parametrize("denominator", ["separate", "combined"])
def test_matches_grad_scaler_with_the_reference_lars(denominator):
    torch.manual_seed(0)
    ours_model = TinyNet()
    ref_model = copy.deepcopy(ours_model)
    scaler = DynamicLossScale("cpu", init_scale=2.0 ** 10, growth_interval=3)
    ours = FusedLARS(param_groups(ours_model, 1e-3), denominator=denominator, loss_scale=scaler,
                     **HYPER)
    grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=3)
    ref = ReferenceLARS(param_groups(ref_model, 1e-3), denominator=denominator, **HYPER)
    scales, skipped = [], []
    for step in range(14):
        for opt in (ours, ref):
            opt.zero_grad(set_to_none=True)
        backward(ours_model, scaler.scale_loss, step)
        backward(ref_model, grad_scaler.scale, step)
        ours.step()
        grad_scaler.step(ref)
        grad_scaler.update()
        skipped.append(bool(ours.last_step_skipped()))
        scales.append((scaler.scale.item(), grad_scaler.get_scale()))
    assert skipped == [s in OVERFLOW_STEPS for s in range(14)]
    assert all(a == b for a, b in scales), scales
    # by hand: 2^10, three clean steps double it, each overflow halves it
    assert [a for a, _ in scales][:6] == [2.0 ** 10, 2.0 ** 10, 2.0 ** 11, 2.0 ** 10, 2.0 ** 9,
                                          2.0 ** 9]
    for p, q in zip(ours_model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_the_scale_is_unscaled_exactly_inside_the_step():
    """Loss-scaled gradients with the scale folded into the kernels give bitwise the step of the
    unscaled gradients (a power-of-two scale is exact)."""
    torch.manual_seed(1)
    scaled_model = TinyNet()
    plain_model = copy.deepcopy(scaled_model)
    scaler = DynamicLossScale("cpu", init_scale=2.0 ** 16, growth_interval=2)
    scaled = FusedLARS(param_groups(scaled_model, 1e-3), loss_scale=scaler, **HYPER)
    plain = FusedLARS(param_groups(plain_model, 1e-3), **HYPER)
    for step in range(6):
        gen = torch.Generator().manual_seed(100 + step)
        for p, q in zip(scaled_model.parameters(), plain_model.parameters()):
            g = torch.randn(p.shape, generator=gen) * 1e-3
            q.grad = g
            p.grad = g * scaler.scale  # what backward of scale * loss gives
        scaled.step()
        plain.step()
    assert scaler.scale.item() == 2.0 ** 19  # grown every 2 clean steps
    for p, q in zip(scaled_model.parameters(), plain_model.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(scaled.state[p]["momentum_buffer"], plain.state[q]["momentum_buffer"])


def test_loss_scale_needs_the_skip_policy():
    model = TinyNet()
    with pytest.raises(ConfigError, match='on_nonfinite: must be "skip" with a loss scale'):
        FusedLARS(param_groups(model, 1e-3), on_nonfinite="propagate",
                  loss_scale=DynamicLossScale()).step()


def test_loss_scale_on_another_device_is_named():
    model = TinyNet()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt = FusedLARS(param_groups(model, 1e-3), loss_scale=DynamicLossScale("meta"))
    with pytest.raises(ConfigError, match="loss_scale: is on meta but the params are on cpu"):
        opt.step()


@pytest.mark.parametrize("kwargs,key", [({"init_scale": 0.0}, "init_scale"),
                                        ({"growth_factor": 1.0}, "growth_factor"),
                                        ({"backoff_factor": 1.0}, "backoff_factor"),
                                        ({"growth_interval": 0}, "growth_interval")])
def test_bad_loss_scale_settings_are_named(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        DynamicLossScale(**kwargs)


def test_state_dict_round_trip_keeps_the_tensors():
    scaler = DynamicLossScale(init_scale=2.0 ** 8, growth_interval=2)
    for found in (0, 0, 1, 0):
        scaler.update(torch.tensor([found]))
    buffer = io.BytesIO()
    torch.save(scaler.state_dict(), buffer)
    buffer.seek(0)
    fresh = DynamicLossScale()
    scale_tensor = fresh.scale
    fresh.load_state_dict(torch.load(buffer))
    assert fresh.scale is scale_tensor
    assert fresh.scale.item() == 2.0 ** 8 and fresh.growth_tracker.item() == 1
    assert fresh.growth_interval == 2
