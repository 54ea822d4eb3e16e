"""The CUDA kernels (hvd_largebatch._C_cuda): the reference comparisons of test_ops.py on CUDA
tensors, CPU/GPU agreement, launch count and the absence of host synchronization.

Skipped on machines without a CUDA device (torch.cuda.is_available() is False).
"""
from __future__ import annotations

import importlib
import itertools
import subprocess
import sys

import pytest
import torch
from torch import nn

from hvd_largebatch import FusedLARS, ops, param_groups
from hvd_largebatch.lars import reference as ref
from hvd_largebatch.lars.reference import ReferenceLARS
from test_ops import (DTYPES, HYPER, OPTIONS, SIZES, assert_buffers_close, assert_weights_close,
                      bits, check_canonical_nans, check_infinite_gradient_gives_nan_ratio,
                      check_nonfinite_skip, check_nonfinite_sum_gives_nan_ratio, check_rounding,
                      check_segments_with_layer_sums, check_table_carry, check_widening,
                      clone_all, make_case, option_id, run_native_and_reference)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device (torch.cuda.is_available() is False)")
CUDA = "cuda"


@pytest.mark.parametrize("dtype", DTYPES)
def test_sum_of_squares_matches_reference_and_cpu(dtype):
    ts = [torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype) for n in SIZES]
    on_gpu = ops.sum_of_squares([t.to(CUDA) for t in ts])
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.float32
    torch.testing.assert_close(on_gpu.cpu(), ref.sum_of_squares(ts), rtol=1e-5, atol=0)
    torch.testing.assert_close(on_gpu.cpu(), ops.sum_of_squares(ts), rtol=2e-6, atol=0)


def test_sums_are_deterministic_and_do_not_depend_on_the_other_tensors():
    gen = torch.Generator().manual_seed(3)
    ts = [torch.randn(n, generator=gen).to(CUDA) for n in (200_000, 5, 70_001, 3_000_003)]
    first = ops.sum_of_squares(ts)
    for _ in range(3):
        assert torch.equal(ops.sum_of_squares(ts), first)
    assert torch.equal(torch.cat([ops.sum_of_squares([t]) for t in ts]), first)


@pytest.mark.parametrize("options", OPTIONS, ids=option_id)
def test_update_matches_reference_for_each_option(options):
    ws, gs, us = make_case(SIZES, [torch.float32], [torch.float32], device=CUDA)
    (nw, nu, nr), (rw, ru, rr) = run_native_and_reference(ws, gs, us, options)
    assert_weights_close(nw, rw)
    if nu is not None:
        assert_buffers_close(nu, ru)
    torch.testing.assert_close(nr, rr, rtol=1e-4 if "denominator" in options else 5e-6, atol=0)


@pytest.mark.parametrize("w_dtype,g_dtype", list(itertools.product(DTYPES, DTYPES)),
                         ids=lambda d: str(d).replace("torch.", ""))
def test_update_matches_reference_for_each_dtype_pair(w_dtype, g_dtype):
    ws, gs, us = make_case([1, 4097, 20_000, 0, 33], [w_dtype], [g_dtype], device=CUDA)
    (nw, nu, nr), (rw, ru, rr) = run_native_and_reference(ws, gs, us, {"nesterov": True}, steps=1)
    assert_weights_close(nw, rw)
    assert_buffers_close(nu, ru)
    torch.testing.assert_close(nr, rr, rtol=5e-6, atol=0)


@pytest.mark.parametrize("w_dtype,g_dtype", list(itertools.product(DTYPES, DTYPES)),
                         ids=lambda d: str(d).replace("torch.", ""))
def test_cpu_and_gpu_compute_the_same_elements(w_dtype, g_dtype):
    """Same inputs and the same sums: the per-element maths of lars_math.h gives bitwise the same
    weights, buffers and trust ratios on both devices, subnormal values included (no
    flush-to-zero), and the same canonical NaN where a tensor meets a NaN (on_nonfinite
    "propagate")."""
    sizes = [3, 5000, 70_001, 0, 300]
    ws, gs, us = make_case(sizes, [w_dtype], [g_dtype])
    for t in (ws[1], gs[1]):  # subnormals of the tensor's dtype, and of fp32 in the buffers
        t[:64] = torch.finfo(t.dtype).tiny * torch.linspace(-0.9, 0.9, 64)
    us[1][:64] = torch.finfo(torch.float32).tiny * torch.linspace(-0.9, 0.9, 64)
    gs[4][11] = float("nan")
    sums = ops.lars_sumsq(ws, gs, dot=True)
    results = {}
    for device in ("cpu", CUDA):
        w = [t.to(device) for t in ws]
        u = [t.to(device) for t in us]
        info = ops.lars_update_(w, [t.to(device) for t in gs], u, sums.w_sumsq.to(device),
                                sums.g_sumsq.to(device), sums.wg_dot.to(device),
                                lr=[0.7, 0.7, 0.1, 0.2, 0.3],
                                denominator=["separate", "combined"] * 2 + ["separate"],
                                nesterov=[False, True, True, False, False],
                                on_nonfinite="propagate",
                                **{k: v for k, v in HYPER.items() if k != "lr"})
        results[device] = [t.cpu() for t in w + u] + [info.trust_ratios.cpu()]
    for a, b in zip(results["cpu"], results[CUDA]):
        assert torch.equal(bits(a), bits(b))
    assert torch.isnan(results[CUDA][4].float()).all()  # the NaN tensor: canonical on both


def test_more_groups_than_one_launch_holds():
    """More than 48 distinct hyperparameter sets: several update launches, one skip decision."""
    n = 150
    ws, gs, us = make_case([37 + i for i in range(n)], [torch.float32], [torch.float32],
                           device=CUDA)
    lrs = [0.01 * (i + 1) for i in range(n)]
    nw, nu = clone_all(ws), clone_all(us)
    s = ops.lars_sumsq(nw, gs)
    info = ops.lars_update_(nw, gs, nu, s.w_sumsq, s.g_sumsq, lr=lrs, weight_decay=0.01)
    for i in (0, 47, 48, 49, 95, 96, 149):
        rw, ru = [ws[i].clone()], [us[i].clone()]
        rs = ref.lars_sumsq(rw, [gs[i]])
        ratio, _ = ref.lars_update_(rw, [gs[i]], ru, *rs, lr=lrs[i], weight_decay=0.01)
        assert_weights_close([nw[i]], rw)
        assert info.trust_ratios[i].item() == pytest.approx(ratio.item(), rel=5e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_conversions_match_torch(dtype):
    check_widening(dtype, CUDA)
    check_rounding(dtype, CUDA)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_nonfinite_grad_skips_the_whole_call(bad):
    check_nonfinite_skip(bad, CUDA)


@pytest.mark.parametrize("on_nonfinite", ["skip", "propagate"])
@pytest.mark.parametrize("which", ["w", "g", "wg"])
@pytest.mark.parametrize("denominator", ["separate", "combined"])
def test_nonfinite_sum_gives_a_nan_trust_ratio(denominator, which, on_nonfinite):
    for bad in (float("inf"), float("nan")):
        check_nonfinite_sum_gives_nan_ratio(denominator, which, bad, on_nonfinite, CUDA)


@pytest.mark.parametrize("denominator", ["separate", "combined"])
def test_infinite_gradient_gives_a_nan_trust_ratio(denominator):
    check_infinite_gradient_gives_nan_ratio(denominator, CUDA)


@pytest.mark.parametrize("w_dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_every_nan_written_is_the_canonical_nan(w_dtype):
    check_canonical_nans(w_dtype, CUDA)


def test_segments_with_full_layer_sums_equal_the_whole_layer_update():
    check_segments_with_layer_sums(CUDA)


def test_table_rebinds_new_grads_and_carries_weight_sums():
    check_table_carry(CUDA)


# ------------------------------------------------------------------------------------------------
# the optimizer on the GPU


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 30 * 30, 100)).to(CUDA)


def _set_grads(step, *models):
    gen = torch.Generator().manual_seed(step)
    for tensors in zip(*(m.parameters() for m in models)):
        g = (torch.randn(tensors[0].shape, generator=gen) * 0.1).to(CUDA)
        for p in tensors:
            p.grad = g.clone()


@pytest.mark.parametrize("options", [{}, {"momentum_correction": False, "nesterov": True},
                                     {"denominator": "combined"}, {"carry_weight_norms": True}],
                         ids=["default", "raw-nesterov", "combined", "carry"])
def test_fused_lars_matches_reference_on_gpu(options):
    model = _model()
    twin = _model()
    fused = FusedLARS(param_groups(model, 1e-3), lr=0.5, trust_coefficient=0.02, **options)
    ref_options = {k: v for k, v in options.items() if k != "carry_weight_norms"}
    reference = ReferenceLARS(param_groups(twin, 1e-3), lr=0.5, trust_coefficient=0.02,
                              **ref_options)
    for step in range(6):
        for opt in (fused, reference):
            for group in opt.param_groups:
                group["lr"] = 0.5 * (step + 1)
        _set_grads(step, model, twin)
        fused.step()
        reference.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        scale = float(q.detach().abs().max())
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6 * scale + 1e-7)


def test_step_launches_three_kernels():
    model = _model()
    opt = FusedLARS(param_groups(model, 1e-4), lr=0.1)
    _set_grads(0, model)
    opt.step()  # builds and uploads the tables
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        opt.step()
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
    ours = [k for k in kernels if "hvdlb" in k]
    assert len(ours) == 3, kernels  # norms, finalize, update
    assert len(kernels) <= 4, kernels


def test_steps_do_not_synchronize_with_the_host():
    model = _model()
    opt = FusedLARS(param_groups(model, 1e-4), lr=0.1, carry_weight_norms=True)
    _set_grads(0, model)
    opt.step()
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(1, 4):
            for p in model.parameters():  # gradients re-created in place, as by backward
                p.grad.normal_()
            opt.step()
            opt.last_trust_ratios()
            opt.last_step_skipped()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert not bool(opt.last_step_skipped())


def test_steps_with_set_to_none_grads_upload_no_table():
    """Backward allocates new gradients after zero_grad(set_to_none=True); the caching allocator
    hands back the same blocks, so after the first steps no table is copied to the GPU again."""
    model = _model()
    opt = FusedLARS(param_groups(model, 1e-4), lr=0.1)
    x = torch.randn(8, 3, 32, 32, device=CUDA)
    counts = []
    for _ in range(10):
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()
        counts.append(opt.table_uploads())
    assert counts[0] >= 1 and counts[-1] == counts[3], counts


def test_native_entry_refuses_a_device_that_is_not_current():
    table = ops.TensorTable([torch.ones(10, device=CUDA)])
    native = importlib.import_module("hvd_largebatch._C_cuda")
    other = torch.cuda.current_device() + 1
    with pytest.raises(ValueError, match=f"tensors are on device {other} but the current device"):
        native.lars_norms(other, 0, table._table_ptr(), table.n, table.nch, ops.NORM_W, 0, 0, 0,
                          0, 0, 0)


def test_another_device_gets_no_context():
    """Tensors on device 1 while device 0 is current (and has no context): the op runs on device 1
    and leaves device 0 current, still without a context."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    code = ("import torch; from hvd_largebatch import ops\n"
            "t = torch.randn(1000, device='cuda:1')\n"
            "assert not torch._C._cuda_hasPrimaryContext(0)\n"
            "out = ops.sum_of_squares([t]).cpu()\n"
            "assert torch.cuda.current_device() == 0\n"
            "assert not torch._C._cuda_hasPrimaryContext(0), 'a context was created on device 0'\n"
            "print(float(out[0]), float(t.cpu().pow(2).sum()))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    ours, theirs = map(float, proc.stdout.split())
    assert ours == pytest.approx(theirs, rel=1e-5)


def test_current_device_is_restored():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    t = torch.randn(1000, device="cuda:1")
    torch.cuda.set_device(0)
    out = ops.sum_of_squares([t])
    assert torch.cuda.current_device() == 0
    torch.testing.assert_close(out.cpu(), ref.sum_of_squares([t.cpu()]), rtol=1e-5, atol=0)


def test_step_captured_in_a_cuda_graph_follows_a_device_held_schedule():
    """FusedLARS.step() captured once (lr and momentum 0-dim device tensors, fp16 loss scale)
    and replayed while the schedule changes equals eager steps of the float form, bitwise."""
    from hvd_largebatch.lars.loss_scale import DynamicLossScale

    graphed, eager = _model(), _model()
    lr = torch.tensor(0.0, device=CUDA)
    momentum = torch.tensor(0.0, device=CUDA)
    scaler = DynamicLossScale(CUDA, init_scale=2.0 ** 8, growth_interval=3)
    opt = FusedLARS(param_groups(graphed, 1e-4), lr=lr, momentum=momentum, loss_scale=scaler)
    ref = FusedLARS(param_groups(eager, 1e-4), lr=0.1)
    static_grads = [torch.zeros_like(p) for p in graphed.parameters()]
    for p, g in zip(graphed.parameters(), static_grads):
        p.grad = g
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: tables built and uploaded before the capture
        lr.fill_(0.0)
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    for p in graphed.parameters():  # the warm-up step at lr 0 moved nothing but the buffers
        opt.state[p]["momentum_buffer"].zero_()
    scaler.scale.fill_(2.0 ** 8)
    scaler.growth_tracker.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for step in range(6):
        value_lr, value_m = 0.1 * (step + 1), 0.9 if step < 3 else 0.95
        lr.fill_(value_lr)
        momentum.fill_(value_m)
        gen = torch.Generator().manual_seed(step)
        for g, q in zip(static_grads, eager.parameters()):
            fresh = (torch.randn(g.shape, generator=gen) * 0.1).to(CUDA)
            g.copy_(fresh * scaler.scale)
            q.grad = fresh
        graph.replay()
        for group in ref.param_groups:
            group["lr"], group["momentum"] = value_lr, value_m
        ref.step()
    torch.cuda.synchronize()
    assert scaler.scale.item() == 2.0 ** 10  # two growths of 3 clean steps
    for p, q in zip(graphed.parameters(), eager.parameters()):
        assert torch.equal(p, q)
