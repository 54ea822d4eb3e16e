"""FusedLARS against ReferenceLARS, torch.optim.SGD and hand-computed momentum forms."""
from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from torch import nn

from hvd_largebatch import FusedLARS, ops, param_groups
from hvd_largebatch.errors import ConfigError
from hvd_largebatch.lars.reference import ReferenceLARS
from test_ops import option_id

OPTIONS = [
    {},
    {"nesterov": True},
    {"momentum_correction": False},
    {"momentum_correction": False, "nesterov": True},
    {"denominator": "combined"},
    {"momentum": 0.0},
    {"carry_weight_norms": True},
]


class TinyNet(nn.Module):
    """conv (no bias) + BN (zero gamma) + linear with bias: two param groups, varied sizes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, bias=False)
        self.bn = nn.BatchNorm2d(8)
        nn.init.zeros_(self.bn.weight)
        self.fc = nn.Linear(8 * 6 * 6, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def twin_models(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    a = TinyNet().to(dtype)
    return a, copy.deepcopy(a)


def set_random_grads(step, *models, scale=0.1):
    gen = torch.Generator().manual_seed(1000 + step)
    for tensors in zip(*(m.parameters() for m in models)):
        g = torch.randn(tensors[0].shape, generator=gen) * scale
        for p in tensors:
            p.grad = g.to(p.dtype)


def assert_params_close(model_a, model_b, rtol=1e-5):
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        scale = float(b.detach().float().abs().max()) if b.numel() else 0.0
        torch.testing.assert_close(a, b, rtol=rtol, atol=1e-6 * scale + 1e-7,
                                   msg=lambda m: f"{name}: {m}")


def lr_at(step):
    """A warmup then decay, so the lr changes at every step."""
    return 0.4 * (step + 1) if step < 4 else 1.6 * 0.8 ** (step - 3)


# ------------------------------------------------------------------------------------------------
# against the reference optimizer


@pytest.mark.parametrize("options", OPTIONS, ids=option_id)
def test_many_steps_with_changing_lr_match_reference(options):
    fused_model, ref_model = twin_models()
    hyper = {"lr": 0.1, "momentum": 0.9, "trust_coefficient": 0.02, **options}
    ref_options = {k: v for k, v in hyper.items() if k != "carry_weight_norms"}
    fused = FusedLARS(param_groups(fused_model, weight_decay=5e-3), **hyper)
    ref = ReferenceLARS(param_groups(ref_model, weight_decay=5e-3), **ref_options)
    for step in range(10):
        for opt in (fused, ref):
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
        set_random_grads(step, fused_model, ref_model)
        fused.step()
        ref.step()
    assert_params_close(fused_model, ref_model)
    if hyper["momentum"]:
        for p, q in zip(fused_model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(fused.state[p]["momentum_buffer"],
                                       ref.state[q]["momentum_buffer"], rtol=1e-5, atol=1e-7)


def test_last_trust_ratios_match_the_reference_formula():
    model, _ = twin_models()
    opt = FusedLARS(param_groups(model, weight_decay=1e-3), lr=0.1, trust_coefficient=0.01)
    set_random_grads(0, model)
    model.fc.bias.grad = None  # no gradient: no update, NaN ratio
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    weights = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    grads = [p.grad for g in opt.param_groups for p in g["params"]]
    opt.step()
    ratios = opt.last_trust_ratios()
    flat = [p for g in opt.param_groups for p in g["params"]]
    assert ratios.shape == (len(flat),)
    for i, (p, w, g) in enumerate(zip(flat, weights, grads)):
        if p is model.fc.bias:
            assert torch.isnan(ratios[i])
            assert torch.equal(p, before["fc.bias"]) and p not in opt.state
            continue
        lars = p.dim() > 1
        if not lars or float(w.norm()) == 0:  # BN / bias group, or zero-gamma BN weight
            assert ratios[i].item() == 1.0
        else:
            expected = 0.01 * w.norm() / (g.norm() + 1e-3 * w.norm())
            assert ratios[i].item() == pytest.approx(expected.item(), rel=1e-5)
    assert not bool(opt.last_step_skipped())


def test_mixed_dtypes_in_one_group_match_reference():
    torch.manual_seed(3)
    shapes = [(16, 8), (300,), (5, 5, 3), (1,)]
    dtypes = [torch.bfloat16, torch.float32, torch.float16, torch.float32]
    fused_params = [nn.Parameter(torch.randn(s).to(d)) for s, d in zip(shapes, dtypes)]
    ref_params = [nn.Parameter(p.detach().clone()) for p in fused_params]
    fused = FusedLARS(fused_params, lr=0.5, weight_decay=1e-2, trust_coefficient=0.05)
    ref = ReferenceLARS(ref_params, lr=0.5, weight_decay=1e-2, trust_coefficient=0.05)
    for step in range(3):
        for p, q in zip(fused_params, ref_params):
            g = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
            p.grad, q.grad = g.to(p.dtype), g.to(q.dtype)
        fused.step()
        ref.step()
    for p, q in zip(fused_params, ref_params):
        assert p.dtype == q.dtype and fused.state[p]["momentum_buffer"].dtype == torch.float32
        rtol = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[p.dtype]
        torch.testing.assert_close(p, q, rtol=rtol, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# momentum correction: the two forms by hand


def _run_scalar(momentum_correction, lrs, g=1.0, w0=10.0, m=0.9):
    p = nn.Parameter(torch.tensor([w0]))
    opt = FusedLARS([p], lr=lrs[0], momentum=m, lars=False,
                    momentum_correction=momentum_correction)
    trace = []
    for lr in lrs:
        opt.param_groups[0]["lr"] = lr
        p.grad = torch.tensor([g])
        opt.step()
        trace.append(p.item())
    return np.array(trace)


def test_momentum_forms_by_hand_when_lr_changes():
    lrs, g, m, w0 = [1.0, 0.5, 0.25, 2.0], 1.0, 0.9, 10.0
    # corrected (torch) form: u <- m u + g; w <- w - lr u
    u, w, corrected = 0.0, w0, []
    # raw form: v <- m v + lr g; w <- w - v
    v, w_raw, raw = 0.0, w0, []
    for lr in lrs:
        u = m * u + g
        w -= lr * u
        corrected.append(w)
        v = m * v + lr * g
        w_raw -= v
        raw.append(w_raw)
    np.testing.assert_allclose(_run_scalar(True, lrs), corrected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_run_scalar(False, lrs), raw, rtol=1e-6, atol=1e-6)
    assert abs(corrected[1] - raw[1]) > 0.4  # they differ as soon as lr changes


def test_momentum_forms_agree_at_constant_lr():
    fused_a, _ = twin_models(seed=5)
    fused_b = copy.deepcopy(fused_a)
    opt_a = FusedLARS(param_groups(fused_a, 1e-3), lr=0.3, momentum_correction=True)
    opt_b = FusedLARS(param_groups(fused_b, 1e-3), lr=0.3, momentum_correction=False)
    for step in range(8):
        set_random_grads(step, fused_a, fused_b)
        opt_a.step()
        opt_b.step()
    assert_params_close(fused_a, fused_b, rtol=1e-5)
    for p, q in zip(fused_a.parameters(), fused_b.parameters()):  # v = lr u
        torch.testing.assert_close(0.3 * opt_a.state[p]["momentum_buffer"],
                                   opt_b.state[q]["momentum_buffer"], rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------------------------------------------
# lars=False is SGD


@pytest.mark.parametrize("kwargs", [
    dict(momentum=0.9, weight_decay=1e-4),
    dict(momentum=0.9, weight_decay=5e-4, nesterov=True),
    dict(momentum=0.0, weight_decay=1e-2),
    dict(momentum=0.95),
])
def test_without_lars_it_is_torch_sgd(kwargs):
    fused_model, sgd_model = twin_models(seed=2)
    fused = FusedLARS(fused_model.parameters(), lr=0.2, lars=False, **kwargs)
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.2, **kwargs)
    sched = [torch.optim.lr_scheduler.StepLR(o, step_size=5, gamma=0.3) for o in (fused, sgd)]
    for step in range(15):
        set_random_grads(step, fused_model, sgd_model)
        fused.step()
        sgd.step()
        for s in sched:
            s.step()
    assert fused.param_groups[0]["lr"] == pytest.approx(0.2 * 0.3**3)
    assert_params_close(fused_model, sgd_model, rtol=2e-6)


# ------------------------------------------------------------------------------------------------
# state, re-creation, closures


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_mid_run(dtype):
    straight, resumed = twin_models(seed=4, dtype=dtype)
    opt = FusedLARS(param_groups(straight, 1e-3), lr=0.2, nesterov=True)
    opt_r = FusedLARS(param_groups(resumed, 1e-3), lr=0.2, nesterov=True)
    for step in range(4):
        set_random_grads(step, straight, resumed)
        opt.step()
        opt_r.step()
    buffer = io.BytesIO()
    torch.save(opt_r.state_dict(), buffer)
    buffer.seek(0)
    opt_r = FusedLARS(param_groups(resumed, 0.5), lr=9.0)  # wrong values, replaced by the load
    opt_r.load_state_dict(torch.load(buffer))
    assert opt_r.param_groups[0]["lr"] == 0.2 and opt_r.param_groups[0]["weight_decay"] == 1e-3
    for p in resumed.parameters():
        assert opt_r.state[p]["momentum_buffer"].dtype == torch.float32
    for step in range(4, 8):
        set_random_grads(step, straight, resumed)
        opt.step()
        opt_r.step()
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_load_state_dict_rejects_mismatched_buffers():
    model, _ = twin_models()
    opt = FusedLARS(model.parameters(), lr=0.1)
    set_random_grads(0, model)
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["momentum_buffer"] = torch.zeros(3)
    with pytest.raises(ValueError, match="momentum_buffer of param 0 has shape"):
        FusedLARS(model.parameters(), lr=0.1).load_state_dict(sd)


def test_sgd_state_continues_as_fused_lars():
    """An SGD run switched to FusedLARS (lars=False) mid-run continues exactly like SGD."""
    a, b = twin_models(seed=9)
    sgd_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    sgd_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    for step in range(3):
        set_random_grads(step, a, b)
        sgd_a.step()
        sgd_b.step()
    fused = FusedLARS(b.parameters(), lars=False)
    fused.load_state_dict(sgd_b.state_dict())
    assert fused.param_groups[0]["lr"] == 0.1 and fused.param_groups[0]["lars"] is False
    for step in range(3, 6):
        set_random_grads(step, a, b)
        sgd_a.step()
        fused.step()
    assert_params_close(a, b, rtol=2e-6)


def test_recreating_from_param_groups_keeps_every_hyperparameter():
    """hvd.DistributedOptimizer calls __init__(optimizer.param_groups) on a subclass."""
    model, _ = twin_models()
    opt = FusedLARS(param_groups(model, 2e-4), lr=0.7, momentum=0.8, trust_coefficient=0.005,
                    eps=1e-9, nesterov=True, momentum_correction=False, denominator="combined",
                    on_nonfinite="propagate", carry_weight_norms=True)
    again = type("Wrapped", (FusedLARS,), {})(opt.param_groups)
    strip = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    assert [{k: v for k, v in g.items() if k != "params"} for g in again.param_groups] == strip
    assert strip[1]["lars"] is False and strip[1]["weight_decay"] == 0.0


def test_closure_is_evaluated_with_grad_and_returned():
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    opt = FusedLARS(model.parameters(), lr=0.1)
    x = torch.randn(4, 5)
    before = model.weight.detach().clone()

    def closure():
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() > 0
    assert not torch.equal(model.weight, before)


# ------------------------------------------------------------------------------------------------
# non-finite gradients


def test_nonfinite_gradient_skips_the_step_and_reports_it():
    model, ref_model = twin_models()
    opt = FusedLARS(param_groups(model, 1e-3), lr=0.1)
    ref = ReferenceLARS(param_groups(ref_model, 1e-3), lr=0.1)
    set_random_grads(0, model, ref_model)
    opt.step()
    ref.step()
    snapshot = copy.deepcopy((model.state_dict(), opt.state_dict()["state"]))
    set_random_grads(1, model)
    model.fc.weight.grad[3, 4] = float("nan")
    opt.step()
    assert bool(opt.last_step_skipped())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), snapshot[0].values()))
    for k, st in opt.state_dict()["state"].items():
        assert torch.equal(st["momentum_buffer"], snapshot[1][k]["momentum_buffer"])
    set_random_grads(2, model, ref_model)  # training goes on as if the bad step never happened
    opt.step()
    ref.step()
    assert not bool(opt.last_step_skipped())
    assert_params_close(model, ref_model)


def test_nonfinite_gradient_propagates_when_asked():
    model, _ = twin_models()
    opt = FusedLARS(model.parameters(), lr=0.1, on_nonfinite="propagate")
    set_random_grads(0, model)
    model.fc.weight.grad[0, 0] = float("inf")
    opt.step()
    assert not bool(opt.last_step_skipped())
    assert bool(opt.last_step_info().nonfinite)
    assert not torch.isfinite(model.fc.weight).all()


# ------------------------------------------------------------------------------------------------
# carried weight norms and the hook for distributed wrappers


def test_carried_weight_norms_give_bitwise_the_same_steps():
    plain, carried = twin_models(seed=6)
    opt_p = FusedLARS(param_groups(plain, 1e-3), lr=0.2)
    opt_c = FusedLARS(param_groups(carried, 1e-3), lr=0.2, carry_weight_norms=True)
    for step in range(6):
        set_random_grads(step, plain, carried)
        if step == 3:  # weights changed between steps through autograd-visible in-place ops
            with torch.no_grad():
                plain.fc.weight.mul_(1.5)
                carried.fc.weight.mul_(1.5)
        if step == 4:  # ... and behind autograd's back: the user must say so
            plain.conv.weight.data.mul_(0.5)
            carried.conv.weight.data.mul_(0.5)
            opt_c.forget_weight_norms()
        opt_p.step()
        opt_c.step()
        assert torch.equal(opt_p.last_trust_ratios(), opt_c.last_trust_ratios())
    for p, q in zip(plain.parameters(), carried.parameters()):
        assert torch.equal(p, q)


def test_step_with_sumsq_equals_step():
    a, b = twin_models(seed=7)
    opt_a = FusedLARS(param_groups(a, 1e-3), lr=0.2, denominator="combined")
    opt_b = FusedLARS(param_groups(b, 1e-3), lr=0.2, denominator="combined")
    for step in range(3):
        set_random_grads(step, a, b)
        opt_a.step()
        assert opt_b.needs_dot()
        sums = opt_b.compute_sumsq()
        info = opt_b.step_with_sumsq(sums.w_sumsq.clone(), sums.g_sumsq.clone(),
                                     sums.wg_dot.clone())
        assert torch.equal(info.trust_ratios, opt_a.last_step_info().trust_ratios)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert opt_b.step_params() == [p for g in opt_b.param_groups for p in g["params"]]


def test_sharded_segments_with_layer_sums_equal_whole_layers():
    """The sharded driver's use: segments of a flat buffer as params, whole-layer sums."""
    torch.manual_seed(8)
    shapes = [(40, 30), (30,), (10, 40)]
    layers = [nn.Parameter(torch.randn(s)) for s in shapes]
    whole = FusedLARS([{"params": layers[::2]}, {"params": layers[1:2], "lars": False}], lr=0.3,
                      weight_decay=1e-2, trust_coefficient=0.05)
    flat = torch.cat([p.detach().flatten() for p in layers])
    sizes = [p.numel() for p in layers]
    bounds = np.cumsum([0] + sizes)
    cuts = sorted(set([0, 555, 1200, 1230, 1300, int(bounds[-1])] + bounds.tolist()))
    segments, owner = [], []
    for a, b in zip(cuts[:-1], cuts[1:]):
        segments.append(flat[a:b])
        owner.append(int(np.searchsorted(bounds, a, side="right") - 1))
    seg_groups = [{"params": [s for s, o in zip(segments, owner) if o != 1]},
                  {"params": [s for s, o in zip(segments, owner) if o == 1], "lars": False}]
    sharded = FusedLARS(seg_groups, lr=0.3, weight_decay=1e-2, trust_coefficient=0.05)
    for step in range(3):
        flat_grad = torch.randn(flat.numel(), generator=torch.Generator().manual_seed(step))
        for p, a, b in zip(layers, bounds[:-1], bounds[1:]):
            p.grad = flat_grad[a:b].view(p.shape).clone()
        for s, a in zip(segments, cuts[:-1]):
            s.grad = flat_grad[a:a + s.numel()]
        whole.step()
        part = sharded.compute_sumsq()  # partial sums, table order = seg_groups order
        owner_of = {id(s): o for s, o in zip(segments, owner)}
        index = torch.tensor([owner_of[id(s)] for g in seg_groups for s in g["params"]])
        w_layer = torch.zeros(3).index_add_(0, index, part.w_sumsq)
        g_layer = torch.zeros(3).index_add_(0, index, part.g_sumsq)
        sharded.step_with_sumsq(w_layer[index].contiguous(), g_layer[index].contiguous())
        torch.testing.assert_close(flat, torch.cat([p.detach().flatten() for p in layers]),
                                   rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# param_groups and bad input


def test_param_groups_exclude_bn_and_biases():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.LayerNorm(4), shared, shared,
                          nn.Linear(4, 2, bias=False))
    model[0].weight.requires_grad_(False)
    groups = param_groups(model, weight_decay=1e-4)
    assert [g["params"] for g in groups][0] == [shared.weight, model[5].weight]
    assert groups[0]["weight_decay"] == 1e-4 and "lars" not in groups[0]
    assert groups[1]["params"] == [model[0].bias, model[1].weight, model[1].bias, model[2].weight,
                                   model[2].bias, shared.bias]
    assert groups[1]["weight_decay"] == 0.0 and groups[1]["lars"] is False
    (everything,) = param_groups(model, weight_decay=1e-4, exclude_bn_and_bias=False)
    assert len(everything["params"]) == 8
    with pytest.raises(ConfigError, match="weight_decay"):
        param_groups(model, weight_decay=-1)


@pytest.mark.parametrize("kwargs,key", [
    ({"lr": -1.0}, "param_groups[0].lr"),
    ({"momentum": 0.0, "nesterov": True}, "param_groups[0].nesterov"),
    ({"denominator": "both"}, "param_groups[0].denominator"),
    ({"on_nonfinite": "zero"}, "param_groups[0].on_nonfinite"),
    ({"carry_weight_norms": 1}, "param_groups[0].carry_weight_norms"),
])
def test_bad_group_values_are_named(kwargs, key):
    p = nn.Parameter(torch.zeros(3))
    with pytest.raises(ConfigError) as err:
        FusedLARS([{"params": [p], **kwargs}])
    assert err.value.key == key


def test_bad_values_set_later_fail_at_the_step():
    model, _ = twin_models()
    opt = FusedLARS(param_groups(model, 1e-4), lr=0.1)
    set_random_grads(0, model)
    opt.param_groups[1]["lr"] = float("nan")
    with pytest.raises(ConfigError, match=r"param_groups\[1\].lr"):
        opt.step()
    opt.param_groups[1]["lr"] = 0.1
    opt.param_groups[1]["on_nonfinite"] = "propagate"
    with pytest.raises(ConfigError, match="step-wide option"):
        opt.step()


def test_unsupported_param_dtype_is_rejected():
    with pytest.raises(ConfigError, match="float64"):
        FusedLARS([nn.Parameter(torch.zeros(2, dtype=torch.float64))])
    assert ops.DTYPE_CODES.keys() == {torch.float32, torch.float16, torch.bfloat16}


# ------------------------------------------------------------------------------------------------
# hyperparameters held in tensors, read by the kernels when they run


def momentum_at(step):
    """Momentum changes too (Smith et al. scale it with the batch)."""
    return 0.9 if step < 5 else 0.95


def device_held(model, device="cpu", **options):
    """FusedLARS whose lr, momentum, weight decay and trust coefficient are 0-dim tensors, and the
    float-form twin's settings."""
    groups = param_groups(model, weight_decay=5e-3)
    for g in groups:
        g["weight_decay"] = torch.tensor(g["weight_decay"], device=device)
    opt = FusedLARS(groups, lr=torch.tensor(0.0, device=device),
                    momentum=torch.tensor(0.0, device=device),
                    trust_coefficient=torch.tensor(0.02, device=device), **options)
    for g in opt.param_groups[1:]:  # one tensor per value, shared by the groups
        g["lr"], g["momentum"] = opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"]
    return opt


def set_schedule(opt, step):
    """What the trainer does every iteration: floats assigned, or tensors filled in place."""
    for g in opt.param_groups:
        if isinstance(g["lr"], torch.Tensor):
            g["lr"].fill_(lr_at(step))
            g["momentum"].fill_(momentum_at(step))
        else:
            g["lr"], g["momentum"] = lr_at(step), momentum_at(step)


@pytest.mark.parametrize("options", [{}, {"momentum_correction": False}, {"nesterov": True},
                                     {"denominator": "combined"}, {"carry_weight_norms": True}],
                         ids=option_id)
def test_device_held_schedule_equals_the_float_form_bitwise(options):
    held_model, float_model = twin_models(seed=2)
    held = device_held(held_model, **options)
    floats = FusedLARS(param_groups(float_model, weight_decay=5e-3), trust_coefficient=0.02,
                       **options)
    packed = []
    for step in range(10):
        for opt in (held, floats):
            set_schedule(opt, step)
        set_random_grads(step, held_model, float_model)
        held.step()
        floats.step()
        packed.append(held._packed)
    assert all(p is packed[0] for p in packed)  # filled in place: the groups were packed once
    for p, q in zip(held_model.parameters(), float_model.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(held.state[p]["momentum_buffer"], floats.state[q]["momentum_buffer"])
    assert torch.equal(held.last_trust_ratios(), floats.last_trust_ratios())


def test_momentum_correction_stays_exact_with_a_device_held_lr():
    """Goyal et al.: with u <- m u + d; w <- w - lr u, an lr change rescales the step and leaves u
    alone; in the raw form v <- m v + lr d the old lr stays inside v. By hand, one scalar weight,
    no LARS, g = 1: lr 0.1 then 0.2."""
    for correction, expected in ((True, 10.0 - 0.1 * 1 - 0.2 * (0.9 + 1)),
                                 (False, 10.0 - 0.1 * 1 - (0.9 * 0.1 + 0.2))):
        w = nn.Parameter(torch.tensor([10.0]))
        lr = torch.tensor(0.1)
        opt = FusedLARS([w], lr=lr, momentum=0.9, lars=False, momentum_correction=correction)
        for value in (0.1, 0.2):
            lr.fill_(value)
            w.grad = torch.ones(1)
            opt.step()
        assert w.item() == pytest.approx(expected, rel=1e-6), correction


def test_state_dict_round_trip_keeps_the_device_held_tensors():
    straight_model, resumed_model = twin_models(seed=5)
    straight, resumed = device_held(straight_model), device_held(resumed_model)
    for step in range(4):
        for opt in (straight, resumed):
            set_schedule(opt, step)
        set_random_grads(step, straight_model, resumed_model)
        straight.step()
        resumed.step()
    buffer = io.BytesIO()
    torch.save(resumed.state_dict(), buffer)
    buffer.seek(0)
    fresh = device_held(resumed_model)  # new tensors, holding other values
    lr_tensor = fresh.param_groups[0]["lr"]
    fresh.load_state_dict(torch.load(buffer))
    assert fresh.param_groups[0]["lr"] is lr_tensor and lr_tensor.item() == pytest.approx(lr_at(3))
    assert fresh.param_groups[0]["weight_decay"].item() == pytest.approx(5e-3)
    for step in range(4, 8):
        for opt in (straight, fresh):
            set_schedule(opt, step)
        set_random_grads(step, straight_model, resumed_model)
        straight.step()
        fresh.step()
    for p, q in zip(straight_model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)


def test_loading_device_held_values_into_a_float_form_optimizer_gives_numbers():
    model, twin = twin_models(seed=6)
    held = device_held(model)
    set_schedule(held, 2)
    floats = FusedLARS(param_groups(twin, 1e-3))
    floats.load_state_dict(held.state_dict())
    assert floats.param_groups[0]["lr"] == pytest.approx(lr_at(2))
    assert isinstance(floats.param_groups[0]["lr"], float)


@pytest.mark.parametrize("value,message", [
    (torch.tensor(0.1, dtype=torch.float64), r"0-dim float32 tensor \(got \(\) torch.float64\)"),
    (torch.tensor([0.1]), r"0-dim float32 tensor \(got \(1,\) torch.float32\)"),
    (torch.tensor(0.1, device="meta"), "is on meta but the params are on cpu"),
])
def test_bad_device_held_values_are_named(value, message):
    model, _ = twin_models()
    with pytest.raises(ConfigError, match=r"lr: .*" + message):
        FusedLARS(param_groups(model, 1e-3), lr=value)


def test_eps_cannot_be_device_held():
    model, _ = twin_models()
    with pytest.raises(ConfigError, match=r"eps: must be a number \(got tensor"):
        FusedLARS(param_groups(model, 1e-3), eps=torch.tensor(0.1))
