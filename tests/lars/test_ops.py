"""hvd_largebatch.lars.ops (native multi-tensor LARS) against the plain-PyTorch reference and hand maths.

The helpers at the top take a ``device`` so that tests/test_cuda_ops.py runs the same comparisons
on CUDA tensors.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hvd_largebatch import ops
from hvd_largebatch.errors import ConfigError
from hvd_largebatch.lars import reference as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# sizes around the chunk boundaries of both devices (4096 on CUDA, 16384 on CPU), odd sizes, empty
SIZES = [0, 1, 3, 17, 255, 4095, 4096, 4097, 16383, 16384, 16385, 3 * 16384 + 7, 100_003]
# large enough steps that every term of the update shows: lr * ratio * (g + wd w) is about 0.1 w
HYPER = dict(lr=0.7, momentum=0.9, weight_decay=0.05, trust_coefficient=0.02, eps=0.0)
OPTIONS = [
    {},
    {"nesterov": True},
    {"momentum_correction": False},
    {"momentum_correction": False, "nesterov": True},
    {"denominator": "combined"},
    {"lars": False},
    {"momentum": 0.0},
    {"eps": 0.3},
    {"weight_decay": 0.0},
]


# ------------------------------------------------------------------------------------------------
# helpers (also used by test_cuda_ops.py)


def option_id(options: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in options.items()) or "default"


def make_case(sizes, w_dtypes, g_dtypes, device="cpu", seed=0, zero_buffers=False):
    """Random weights / grads / fp32 buffers; dtypes cycle over the given lists."""
    gen = torch.Generator().manual_seed(seed)
    ws, gs, us = [], [], []
    for i, n in enumerate(sizes):
        wd = w_dtypes[i % len(w_dtypes)]
        gd = g_dtypes[i % len(g_dtypes)]
        ws.append(torch.randn(n, generator=gen).to(device=device, dtype=wd))
        gs.append(torch.randn(n, generator=gen).mul(0.3).to(device=device, dtype=gd))
        us.append(torch.zeros(n, device=device) if zero_buffers
                  else torch.randn(n, generator=gen).mul(0.1).to(device))
    return ws, gs, us


def clone_all(ts):
    return [t.clone() for t in ts]


def _scale(t):
    return float(t.float().abs().max()) if t.numel() else 0.0


def assert_weights_close(actual, expected):
    """Weights agree to fp32 rounding of the largest terms (16-bit weights: to one unit in the
    last place)."""
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype and a.shape == e.shape, i
        rtol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 8e-3}[a.dtype]
        torch.testing.assert_close(a, e, rtol=rtol, atol=1e-6 * _scale(e) + 1e-7,
                                   msg=lambda m: f"tensor {i}: {m}")


def assert_buffers_close(actual, expected):
    """fp32 buffers agree to rounding (m u + s may cancel: absolute slack at the tensor's scale)."""
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=2e-6 * _scale(e) + 1e-8,
                                   msg=lambda m: f"buffer {i}: {m}")


def run_native_and_reference(ws, gs, us, options, steps=2):
    """Apply `steps` updates with both implementations; returns (native, reference) states."""
    hyper = {**HYPER, **options}
    nw, nu = clone_all(ws), clone_all(us)
    rw, ru = clone_all(ws), clone_all(us)
    if hyper["momentum"] == 0:
        nu = ru = None
    dot = hyper.get("denominator") == "combined"
    for _ in range(steps):
        s = ops.lars_sumsq(nw, gs, dot=dot)
        info = ops.lars_update_(nw, gs, nu, s.w_sumsq, s.g_sumsq, s.wg_dot, **hyper)
        rs = ref.lars_sumsq(rw, gs, dot=dot)
        rratios, _ = ref.lars_update_(rw, gs, ru, *rs, **hyper)
    return (nw, nu, info.trust_ratios), (rw, ru, rratios)


# ------------------------------------------------------------------------------------------------
# sums of squares


@pytest.mark.parametrize("dtype", DTYPES)
def test_sum_of_squares_matches_reference_for_every_size(dtype):
    ts = [torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype) for n in SIZES]
    torch.testing.assert_close(ops.sum_of_squares(ts), ref.sum_of_squares(ts), rtol=1e-5, atol=0)


def test_sum_of_squares_hand_values():
    # 3^2 * n is exact in fp32 for these n; empty tensors give 0; mixed dtypes in one call
    sizes = [0, 1, 5, 16384, 16385, 1_000_000]
    ts = [torch.full((n,), 3.0, dtype=DTYPES[i % 3]) for i, n in enumerate(sizes)]
    assert ops.sum_of_squares(ts).tolist() == [9.0 * n for n in sizes]


def test_sum_of_squares_of_many_tensors_in_one_call():
    gen = torch.Generator().manual_seed(1)
    sizes = torch.randint(0, 3000, (300,), generator=gen).tolist()
    ts = [torch.randn(n, generator=gen).to(DTYPES[i % 3]) for i, n in enumerate(sizes)]
    out = ops.sum_of_squares(ts)
    assert out.shape == (300,) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref.sum_of_squares(ts), rtol=1e-5, atol=0)


def test_sum_of_squares_of_several_million_elements():
    t = torch.randn(3_000_001, generator=torch.Generator().manual_seed(2))
    exact = t.double().pow(2).sum().float()
    torch.testing.assert_close(ops.sum_of_squares([t])[0], exact, rtol=2e-6, atol=0)


def test_sums_do_not_depend_on_threads_or_on_the_other_tensors():
    gen = torch.Generator().manual_seed(3)
    ts = [torch.randn(n, generator=gen) for n in (200_000, 5, 70_001, 1_000_003)]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.sum_of_squares(ts)
        torch.set_num_threads(2)
        two = ops.sum_of_squares(ts)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
    alone = torch.cat([ops.sum_of_squares([t]) for t in ts])
    assert torch.equal(one, alone)


def test_lars_sumsq_gives_norms_and_dot_in_one_pass():
    ws, gs, _ = make_case(SIZES, DTYPES, DTYPES[::-1])
    s = ops.lars_sumsq(ws, gs, dot=True)
    w_sq, g_sq, _ = ref.lars_sumsq(ws, gs)
    torch.testing.assert_close(s.w_sumsq, w_sq, rtol=1e-5, atol=0)
    torch.testing.assert_close(s.g_sumsq, g_sq, rtol=1e-5, atol=0)
    # <w, g> against the float64 dot of the same values, within the worst-case error of fp32
    # summation in any order (Higham: |error| <= gamma_{n+1} sum |w_i g_i|, gamma_k = k u /
    # (1 - k u), u = 2^-24; the +1 covers the product roundings): a bound from the values
    # themselves, exact (0) for empty tensors, which an absolute tolerance is not
    u = 2.0 ** -24
    for i, (w, g) in enumerate(zip(ws, gs)):
        products = w.double() * g.double()
        k = w.numel() + 1
        bound = k * u / (1 - k * u) * products.abs().sum().item()
        assert abs(s.wg_dot[i].item() - products.sum().item()) <= bound, (i, w.numel(), w.dtype)
    assert s.nonfinite.item() == 0
    assert ops.lars_sumsq(ws, gs).wg_dot is None


# ------------------------------------------------------------------------------------------------
# the update against the reference


@pytest.mark.parametrize("options", OPTIONS, ids=option_id)
def test_update_matches_reference_for_each_option(options):
    ws, gs, us = make_case(SIZES, [torch.float32], [torch.float32])
    (nw, nu, nr), (rw, ru, rr) = run_native_and_reference(ws, gs, us, options)
    assert_weights_close(nw, rw)
    if nu is not None:
        assert_buffers_close(nu, ru)
    # ||g + beta w|| from sums cancels when g is close to -beta w (here: the 1-element tensor)
    torch.testing.assert_close(nr, rr, rtol=1e-4 if "denominator" in options else 5e-6, atol=0)


@pytest.mark.parametrize("w_dtype,g_dtype", list(itertools.product(DTYPES, DTYPES)),
                         ids=lambda d: str(d).replace("torch.", ""))
def test_update_matches_reference_for_each_dtype_pair(w_dtype, g_dtype):
    ws, gs, us = make_case([1, 4097, 20_000, 0, 33], [w_dtype], [g_dtype])
    # one step: after it, 16-bit weights may differ by one unit where the fp32 result sat next
    # to a rounding boundary, and that would feed into a second step's buffers
    (nw, nu, nr), (rw, ru, rr) = run_native_and_reference(ws, gs, us, {"nesterov": True}, steps=1)
    assert_weights_close(nw, rw)
    assert_buffers_close(nu, ru)
    torch.testing.assert_close(nr, rr, rtol=5e-6, atol=0)


def test_mixed_dtypes_in_one_call_keep_tensors_aligned_with_their_norms():
    sizes = [10, 5000, 3, 17000, 1, 0, 999]
    ws, gs, us = make_case(sizes, DTYPES, [torch.float32, torch.bfloat16])
    (nw, nu, nr), (rw, ru, rr) = run_native_and_reference(ws, gs, us, {}, steps=1)
    assert_weights_close(nw, rw)
    assert_buffers_close(nu, ru)
    torch.testing.assert_close(nr, rr, rtol=5e-6, atol=0)


def test_update_of_three_hundred_tensors_and_a_large_one():
    gen = torch.Generator().manual_seed(5)
    sizes = torch.randint(0, 2000, (299,), generator=gen).tolist() + [2_500_000]
    ws, gs, us = make_case(sizes, [torch.float32], [torch.float32], seed=5)
    (nw, nu, nr), (rw, ru, rr) = run_native_and_reference(ws, gs, us, {}, steps=1)
    assert_weights_close(nw, rw)
    assert_buffers_close(nu, ru)
    torch.testing.assert_close(nr, rr, rtol=5e-6, atol=0)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(sizes=st.lists(st.integers(0, 9000), min_size=1, max_size=12),
       dtypes=st.lists(st.sampled_from(DTYPES), min_size=1, max_size=3),
       options=st.sampled_from(OPTIONS), seed=st.integers(0, 2**16),
       lr=st.floats(1e-3, 10.0), wd=st.floats(0.0, 0.5), eta=st.floats(1e-4, 1.0))
def test_update_matches_reference_property(sizes, dtypes, options, seed, lr, wd, eta):
    ws, gs, us = make_case(sizes, dtypes, dtypes[::-1], seed=seed)
    options = {"lr": lr, "weight_decay": wd, "trust_coefficient": eta, **options}
    (nw, nu, nr), (rw, ru, rr) = run_native_and_reference(ws, gs, us, options, steps=1)
    assert_weights_close(nw, rw)
    if nu is not None:
        assert_buffers_close(nu, ru)
    torch.testing.assert_close(nr, rr, rtol=5e-6, atol=0)


# ------------------------------------------------------------------------------------------------
# hand-computed cases


def _one_step(w, g, u=None, **hyper):
    ws, gs = [w], [g]
    s = ops.lars_sumsq(ws, gs, dot=True)
    return ops.lars_update_(ws, gs, None if u is None else [u], s.w_sumsq, s.g_sumsq, s.wg_dot,
                            **hyper)


@pytest.mark.parametrize("denominator,expected_ratio", [
    ("separate", 0.01 * 5 / (1 + 0.1 * 5)),        # ||w|| = 5, ||g|| = 1, beta = 0.1
    ("combined", 0.01 * 5 / np.sqrt(1.1**2 + 0.2**2)),  # ||g + beta w|| = ||(1.1, -0.2)||
])
def test_trust_ratio_and_step_by_hand(denominator, expected_ratio):
    w = torch.tensor([3.0, 4.0])
    g = torch.tensor([0.8, -0.6])  # orthogonal to w, so the two denominators differ
    u = torch.tensor([0.5, -0.25])
    info = _one_step(w, g, u, lr=2.0, momentum=0.9, weight_decay=0.1, trust_coefficient=0.01,
                     denominator=denominator)
    assert info.trust_ratios.item() == pytest.approx(expected_ratio, rel=1e-6)
    d = np.array([0.8 + 0.3, -0.6 + 0.4])
    u_new = 0.9 * np.array([0.5, -0.25]) + expected_ratio * d
    np.testing.assert_allclose(u.numpy(), u_new, rtol=1e-6)
    np.testing.assert_allclose(w.numpy(), np.array([3.0, 4.0]) - 2.0 * u_new, rtol=1e-6)


def test_raw_form_puts_lr_inside_the_momentum():
    w, g, u = torch.tensor([3.0, 4.0]), torch.tensor([0.8, -0.6]), torch.tensor([0.5, -0.25])
    info = _one_step(w, g, u, lr=2.0, momentum=0.9, weight_decay=0.1, trust_coefficient=0.01,
                     momentum_correction=False, nesterov=True)
    r = info.trust_ratios.item()
    s = 2.0 * r * np.array([1.1, -0.2])
    v = 0.9 * np.array([0.5, -0.25]) + s
    np.testing.assert_allclose(u.numpy(), v, rtol=1e-6)
    np.testing.assert_allclose(w.numpy(), np.array([3.0, 4.0]) - (s + 0.9 * v), rtol=1e-6)


def test_zero_weights_get_ratio_one_and_a_plain_step():
    # zero-gamma BN: ||w|| = 0 -> ratio 1, the step is lr * g
    w, g = torch.zeros(64), torch.linspace(-1, 1, 64)
    info = _one_step(w, g, torch.zeros(64), lr=0.5, momentum=0.9, weight_decay=1e-4)
    assert info.trust_ratios.item() == 1.0
    torch.testing.assert_close(w, -0.5 * g, rtol=0, atol=0)


def test_zero_grads_get_ratio_one_and_weight_decay_still_applies():
    w0 = torch.linspace(-2, 2, 100)
    w = w0.clone()
    info = _one_step(w, torch.zeros(100), torch.zeros(100), lr=0.5, momentum=0.9,
                     weight_decay=0.1)
    assert info.trust_ratios.item() == 1.0
    torch.testing.assert_close(w, w0 - 0.5 * (0.1 * w0), rtol=1e-7, atol=1e-7)


def test_zero_size_tensor_among_others():
    ws = [torch.randn(7), torch.empty(0), torch.randn(3, 0, 2), torch.randn(5)]
    gs = [torch.randn_like(w) for w in ws]
    us = [torch.zeros_like(w) for w in ws]
    before = clone_all(ws)
    s = ops.lars_sumsq(ws, gs)
    info = ops.lars_update_(ws, gs, us, s.w_sumsq, s.g_sumsq, lr=0.1)
    assert info.trust_ratios[1].item() == 1.0 and info.trust_ratios[2].item() == 1.0
    assert not torch.equal(ws[0], before[0]) and not torch.equal(ws[3], before[3])


def check_segments_with_layer_sums(device):
    """Sharded mode: segments (views cutting through layers at odd offsets) updated with their
    whole layer's sums give exactly the whole-layer update."""
    sizes = [1000, 7, 40_000, 333]
    ws, gs, us = make_case(sizes, [torch.float32], [torch.float32], device=device, seed=9)
    whole_w, whole_u = clone_all(ws), clone_all(us)
    s = ops.lars_sumsq(whole_w, gs)
    ops.lars_update_(whole_w, gs, whole_u, s.w_sumsq, s.g_sumsq, **HYPER)

    flat_w, flat_g, flat_u = torch.cat(ws), torch.cat(gs), torch.cat(us)
    layer_of_element = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    layer_of_element = layer_of_element.to(device)
    cuts = [0, 501, 999, 1003, 20_000, 41_000, sum(sizes)]  # unaligned, cross layer boundaries
    seg_w, seg_g, seg_u, owners = [], [], [], []
    for a, b in zip(cuts[:-1], cuts[1:]):
        for layer in layer_of_element[a:b].unique().tolist():
            idx = (layer_of_element[a:b] == layer).nonzero()
            lo, hi = a + int(idx.min()), a + int(idx.max()) + 1
            seg_w.append(flat_w[lo:hi]), seg_g.append(flat_g[lo:hi]), seg_u.append(flat_u[lo:hi])
            owners.append(layer)
    # partial sums per segment, added per layer (what an allreduce of partials would give)
    part = ops.lars_sumsq(seg_w, seg_g)
    owner = torch.tensor(owners, device=device)
    w_layer = torch.zeros(len(sizes), device=device).index_add_(0, owner, part.w_sumsq)
    torch.testing.assert_close(w_layer, s.w_sumsq, rtol=1e-5, atol=0)
    # the update uses the whole-layer sums, as the sharded driver will after its allreduce
    ops.lars_update_(seg_w, seg_g, seg_u, s.w_sumsq[owner].contiguous(),
                     s.g_sumsq[owner].contiguous(), **HYPER)
    assert torch.equal(flat_w, torch.cat(whole_w))
    assert torch.equal(flat_u, torch.cat(whole_u))


def test_segments_with_full_layer_sums_equal_the_whole_layer_update():
    check_segments_with_layer_sums("cpu")


def test_per_tensor_hyperparameters_in_one_call():
    ws, gs, us = make_case([100, 200, 300], [torch.float32], [torch.float32])
    lrs, lars_flags = [0.1, 0.2, 0.3], [True, False, True]
    nw, nu = clone_all(ws), clone_all(us)
    s = ops.lars_sumsq(nw, gs)
    info = ops.lars_update_(nw, gs, nu, s.w_sumsq, s.g_sumsq, lr=lrs, lars=lars_flags,
                            weight_decay=0.01)
    for i in range(3):
        rw, ru = [ws[i].clone()], [us[i].clone()]
        rs = ref.lars_sumsq(rw, [gs[i]])
        ratio, _ = ref.lars_update_(rw, [gs[i]], ru, *rs, lr=lrs[i], lars=lars_flags[i],
                                    weight_decay=0.01)
        torch.testing.assert_close(nw[i], rw[0], rtol=1e-6, atol=1e-7)
        assert info.trust_ratios[i].item() == pytest.approx(ratio.item(), rel=1e-6)
    assert info.trust_ratios[1].item() == 1.0


def test_channels_last_tensors_update_like_contiguous_ones():
    gen = torch.Generator().manual_seed(11)
    w, g, u = (torch.randn(8, 3, 5, 5, generator=gen) for _ in range(3))
    wc, gc, uc = (t.contiguous(memory_format=torch.channels_last) for t in (w, g, u))
    s = ops.lars_sumsq([w], [g])
    sc = ops.lars_sumsq([wc], [gc])  # other memory order, other summation order: close, not equal
    torch.testing.assert_close(sc.w_sumsq, s.w_sumsq, rtol=1e-6, atol=0)
    for ws, gs, us in (([w], [g], [u]), ([wc], [gc], [uc])):
        ops.lars_update_(ws, gs, us, s.w_sumsq, s.g_sumsq, **HYPER)
    assert wc.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(wc, w, rtol=0, atol=0)
    torch.testing.assert_close(uc, u, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# fp16 / bf16 conversion (lars_math.h) against torch's conversions, through the public op


def _all_fp16_values():
    return torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)


def _all_bf16_values():
    return torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


def _negate_through_update(w, g):
    """w <- w - g (lr 1, no momentum, no decay, no LARS): 16-bit g are widened, w rounded."""
    sums = torch.zeros(1, device=w.device)
    ops.lars_update_([w], [g], None, sums, sums, lr=1.0, momentum=0.0, lars=False,
                     on_nonfinite="propagate")


def check_widening(dtype, device):
    g = (_all_fp16_values if dtype == torch.float16 else _all_bf16_values)().to(device)
    w = torch.zeros(g.numel(), device=device)
    _negate_through_update(w, g)
    expected = -g.float()
    finite = torch.isfinite(expected)
    assert torch.equal(w[finite], expected[finite])
    assert torch.equal(torch.isnan(w), torch.isnan(expected))
    assert torch.equal(w[torch.isinf(expected)], expected[torch.isinf(expected)])


def check_rounding(dtype, device):
    grid = (_all_fp16_values if dtype == torch.float16 else _all_bf16_values)().double()
    grid = grid[torch.isfinite(grid)].unique()
    ties = (grid[:-1] + grid[1:]) / 2  # exactly halfway: round to even
    gen = torch.Generator().manual_seed(4)
    randoms = torch.cat([torch.randn(100_000, generator=gen) * 10.0 ** e for e in range(-9, 6)])
    specials = torch.tensor([0.0, -0.0, 65504.0, 65519.0, 65520.0, 70000.0, 1e-8, -3e-8, 6e-8,
                             float("inf"), float("-inf"), 3.0e38, 1e-40, -1e-45])
    x = torch.cat([ties.float(), randoms, specials]).to(device)
    w = torch.zeros(x.numel(), dtype=dtype, device=device)
    _negate_through_update(w, x)
    expected = (torch.zeros_like(x) - x).to(dtype)  # 0 - 0 is +0
    assert torch.equal(w.view(torch.int16), expected.view(torch.int16))
    nan = torch.full((3,), float("nan"), device=device)
    w = torch.zeros(3, dtype=dtype, device=device)
    _negate_through_update(w, nan)
    assert torch.isnan(w.float()).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_16_bit_value_widens_exactly(dtype):
    check_widening(dtype, "cpu")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp32_rounds_to_16_bits_like_torch(dtype):
    check_rounding(dtype, "cpu")


# ------------------------------------------------------------------------------------------------
# non-finite values


def check_nonfinite_skip(bad, device):
    ws, gs, us = make_case([100, 5000, 30], DTYPES, [torch.float32], device=device)
    gs[1][17] = bad
    before_w, before_u = clone_all(ws), clone_all(us)
    s = ops.lars_sumsq(ws, gs)
    assert s.nonfinite.item() == 1
    info = ops.lars_update_(ws, gs, us, s.w_sumsq, s.g_sumsq, **HYPER)
    assert info.nonfinite.item() == 1 and bool(info.skipped)
    for a, b in zip(ws + us, before_w + before_u):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_nonfinite_grad_skips_the_whole_call(bad):
    check_nonfinite_skip(bad, "cpu")


def test_nonfinite_propagate_applies_the_update():
    ws, gs, us = make_case([100, 5000, 30], [torch.float32], [torch.float32])
    gs[1][17] = float("inf")
    before = clone_all(ws)
    s = ops.lars_sumsq(ws, gs)
    info = ops.lars_update_(ws, gs, us, s.w_sumsq, s.g_sumsq, on_nonfinite="propagate", **HYPER)
    assert info.nonfinite.item() == 1 and not bool(info.skipped)
    assert not torch.isfinite(ws[1]).all()
    assert torch.isfinite(ws[0]).all() and not torch.equal(ws[0], before[0])


def test_nonfinite_supplied_sums_skip_the_call():
    """Sums from outside (e.g. after an allreduce) are checked on the device too."""
    ws, gs, us = make_case([100, 200], [torch.float32], [torch.float32])
    before = clone_all(ws)
    s = ops.lars_sumsq(ws, gs)
    g_sq = s.g_sumsq.clone()
    g_sq[0] = float("inf")
    info = ops.lars_update_(ws, gs, us, s.w_sumsq, g_sq, **HYPER)
    assert bool(info.skipped)
    assert all(torch.equal(a, b) for a, b in zip(ws, before))


# non-finite sums give a non-finite trust ratio; every NaN written is the canonical one

CANONICAL_NAN = {torch.float32: 0x7fffffff, torch.float16: 0x7fff, torch.bfloat16: 0x7fff}
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor as non-negative int64."""
    width = 32 if t.dtype == torch.float32 else 16
    return t.view(_INT_VIEW[t.dtype]).to(torch.int64) & ((1 << width) - 1)


def assert_canonical_nan(t: torch.Tensor) -> None:
    nan = torch.isnan(t.float())
    assert nan.any(), "expected NaNs"
    assert (bits(t)[nan] == CANONICAL_NAN[t.dtype]).all(), [hex(b) for b in bits(t)[nan].tolist()]


# separate: eta ||w|| / (||g|| + beta ||w||) = 0.02 * 2 / (3 + 0.05 * 2) for w_sq 4, g_sq 9
FINITE_SUMS = {"w": 4.0, "g": 9.0, "wg": 1.0}


def check_nonfinite_sum_gives_nan_ratio(denominator, which, bad, on_nonfinite, device):
    sums = {k: torch.tensor([v], device=device) for k, v in FINITE_SUMS.items()}
    sums[which][0] = bad
    ws, gs, us = make_case([50], [torch.float32], [torch.float32], device=device)
    before = clone_all(ws)
    info = ops.lars_update_(ws, gs, us, sums["w"], sums["g"], sums["wg"],
                            **{**HYPER, "denominator": denominator, "on_nonfinite": on_nonfinite})
    expected = ref.trust_ratio(sums["w"][0].cpu(), sums["g"][0].cpu(), sums["wg"][0].cpu(),
                               weight_decay=HYPER["weight_decay"], eps=0.0, lars=True,
                               trust_coefficient=HYPER["trust_coefficient"],
                               denominator=denominator)
    ratio = info.trust_ratios.cpu()
    assert bool(info.nonfinite.item())  # the flag covers every sum given, wg included
    if which == "wg" and denominator == "separate":  # the separate ratio does not read <w, g>
        assert ratio.item() == pytest.approx(0.02 * 2 / (3 + 0.05 * 2), rel=1e-6)
        assert ratio.item() == expected.item()
    else:
        assert torch.isnan(expected)
        assert_canonical_nan(ratio)
    if on_nonfinite == "skip":
        assert torch.equal(ws[0], before[0])
    elif torch.isnan(ratio).any():
        assert_canonical_nan(ws[0])


@pytest.mark.parametrize("on_nonfinite", ["skip", "propagate"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
@pytest.mark.parametrize("which", ["w", "g", "wg"])
@pytest.mark.parametrize("denominator", ["separate", "combined"])
def test_nonfinite_sum_gives_a_nan_trust_ratio(denominator, which, bad, on_nonfinite):
    check_nonfinite_sum_gives_nan_ratio(denominator, which, bad, on_nonfinite, "cpu")


def check_infinite_gradient_gives_nan_ratio(denominator, device):
    """Through the whole op: an inf gradient element gave ratio 0 (separate) before."""
    ws, gs, us = make_case([300, 40], [torch.float32], [torch.float32], device=device)
    gs[0][7] = float("inf")
    s = ops.lars_sumsq(ws, gs, dot=denominator == "combined")
    info = ops.lars_update_(ws, gs, us, s.w_sumsq, s.g_sumsq, s.wg_dot,
                            **{**HYPER, "denominator": denominator, "on_nonfinite": "propagate"})
    assert_canonical_nan(info.trust_ratios[:1].cpu())
    assert torch.isfinite(info.trust_ratios[1:]).all()


@pytest.mark.parametrize("denominator", ["separate", "combined"])
def test_infinite_gradient_gives_a_nan_trust_ratio(denominator):
    check_infinite_gradient_gives_nan_ratio(denominator, "cpu")


# NaNs of every sign and payload, as fp32 bits
ODD_NANS = [0x7fc00000, 0xffc00000, 0x7f800001, 0xffbfffff, 0x7fa00000]


def check_canonical_nans(w_dtype, device):
    nans = torch.tensor(ODD_NANS, dtype=torch.int64).to(torch.int32).view(torch.float32)
    n = len(ODD_NANS)
    w = torch.ones(n, dtype=w_dtype, device=device)
    u = torch.zeros(n, device=device)
    one = torch.ones(1, device=device)
    ops.lars_update_([w], [nans.to(device)], [u], one, one, lr=0.5, momentum=0.9, lars=False,
                     on_nonfinite="propagate")
    assert_canonical_nan(w.cpu())
    assert_canonical_nan(u.cpu())
    s = ops.lars_sumsq([w], [nans.to(device)])
    assert_canonical_nan(s.w_sumsq.cpu())
    assert_canonical_nan(s.g_sumsq.cpu())


@pytest.mark.parametrize("w_dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_every_nan_written_is_the_canonical_nan(w_dtype):
    check_canonical_nans(w_dtype, "cpu")


# ------------------------------------------------------------------------------------------------
# the cached table


def check_table_carry(device):
    ws, gs, us = make_case([3000, 20_000, 5], [torch.float32], [torch.float32], device=device)
    plain_w, plain_u = clone_all(ws), clone_all(us)
    groups = ops.pack_groups([ops.LarsHyper(**HYPER)])
    table = ops.TensorTable(ws, gs, us)
    for step in range(4):
        grads = [torch.randn_like(w) for w in ws]  # new tensors every step, like set_to_none
        table.rebind(grads=grads)
        s = table.sumsq(reuse_weight_sums=True)
        table.update_(s.w_sumsq, s.g_sumsq, None, groups, nonfinite=s.nonfinite,
                      carry_weight_sums=True)
        fresh = ops.lars_sumsq(plain_w, grads)
        assert torch.equal(s.w_sumsq, fresh.w_sumsq)  # carried sums are the fresh ones, bitwise
        ops.lars_update_(plain_w, grads, plain_u, fresh.w_sumsq, fresh.g_sumsq, **HYPER)
    assert all(torch.equal(a, b) for a, b in zip(ws, plain_w))


def test_table_rebinds_new_grads_and_carries_weight_sums():
    check_table_carry("cpu")


def test_device_tables_copy_once_per_content():
    made = []
    tables = ops.DeviceTables(lambda host: made.append(host.copy()) or torch.from_numpy(made[-1]),
                              capacity=2)
    a, b, c = (np.arange(6, dtype=np.int64) + k for k in (0, 10, 20))
    first = tables.get(a)
    assert torch.equal(first, torch.from_numpy(a))
    assert tables.get(b) is not first and tables.get(a.copy()) is first  # same content: a hit
    assert tables.uploads == 2
    tables.get(c)  # evicts b, the least recently used
    assert tables.get(a) is first and tables.uploads == 3
    tables.get(b)
    assert tables.uploads == 4 and [m.tolist() for m in made] == [x.tolist() for x in (a, b, c, b)]


def test_table_rebinding_to_known_addresses_uploads_nothing():
    """On the CPU the kernels read the host table; here they read the copies of DeviceTables
    instead, as on a GPU, so a stale copy would show as a wrong update."""
    ws, gs, us = make_case([3000, 20_000, 5], [torch.float32], [torch.float32])
    plain_w, plain_u = clone_all(ws), clone_all(us)
    groups = ops.pack_groups([ops.LarsHyper(**HYPER)])
    table = ops.TensorTable(ws, gs, us)
    table.device_tables = ops.DeviceTables(lambda host: torch.from_numpy(host.copy()))
    buffers = [[torch.empty_like(w) for w in ws] for _ in range(2)]  # sharded mode alternates
    for step in range(7):
        grads = buffers[step % 2] if step < 6 else [torch.empty_like(w) for w in ws]
        for g in grads:
            g.normal_()
        table.rebind(grads=grads)
        s = table.sumsq()
        table.update_(s.w_sumsq, s.g_sumsq, None, groups, nonfinite=s.nonfinite)
        fresh = ops.lars_sumsq(plain_w, grads)
        ops.lars_update_(plain_w, grads, plain_u, fresh.w_sumsq, fresh.g_sumsq, **HYPER)
        assert all(torch.equal(a, b) for a, b in zip(ws, plain_w)), step
        assert table.device_tables.uploads == min(step + 1, 2) + (step == 6)


def test_carried_weight_sums_are_dropped_when_weights_change_in_place():
    ws, gs, us = make_case([3000, 20_000], [torch.float32], [torch.float32])
    groups = ops.pack_groups([ops.LarsHyper(**HYPER)])
    table = ops.TensorTable(ws, gs, us)
    s = table.sumsq()
    table.update_(s.w_sumsq, s.g_sumsq, None, groups, carry_weight_sums=True)
    ws[1].mul_(3.0)  # bumps the version counter
    s = table.sumsq(reuse_weight_sums=True)
    torch.testing.assert_close(s.w_sumsq, ref.sum_of_squares(ws), rtol=1e-5, atol=0)
    ws[0].data.mul_(2.0)  # invisible to version counters: forget explicitly
    table.forget_weight_sums()
    s = table.sumsq(reuse_weight_sums=True)
    torch.testing.assert_close(s.w_sumsq, ref.sum_of_squares(ws), rtol=1e-5, atol=0)


def test_rebind_validates_changed_grads():
    ws, gs, _ = make_case([10, 20], [torch.float32], [torch.float32])
    table = ops.TensorTable(ws, gs)
    with pytest.raises(ValueError, match=r"grads\[1\] has shape"):
        table.rebind(grads=[torch.zeros(10), torch.zeros(21)])
    with pytest.raises(ValueError, match=r"grads\[0\] is not dense"):
        table.rebind(grads=[torch.zeros(20)[::2], torch.zeros(20)])


# ------------------------------------------------------------------------------------------------
# bad input


def test_bad_tensors_are_named():
    w, g = [torch.zeros(4)], [torch.zeros(4)]
    sums = torch.zeros(1)
    with pytest.raises(TypeError, match=r"params\[0\] has dtype torch.float64"):
        ops.sum_of_squares([torch.zeros(3, dtype=torch.float64)])
    with pytest.raises(ValueError, match=r"params\[0\] is not dense"):
        ops.sum_of_squares([torch.zeros(4, 4)[:, ::2]])
    with pytest.raises(ValueError, match=r"all tensors of one call must be on one device"):
        ops.sum_of_squares([torch.zeros(3), torch.zeros(3, device="meta")])
    with pytest.raises(ValueError, match="expected 1 grads"):
        ops.lars_update_(w, g + g, None, sums, sums, lr=0.1, momentum=0.0)
    with pytest.raises(TypeError, match="momentum buffers must be fp32"):
        ops.lars_update_(w, g, [torch.zeros(4, dtype=torch.bfloat16)], sums, sums, lr=0.1)
    with pytest.raises(ValueError, match="has no momentum buffer"):
        ops.lars_update_(w, g, None, sums, sums, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="wg_dot"):
        ops.lars_update_(w, g, None, sums, sums, lr=0.1, momentum=0.0, denominator="combined")
    with pytest.raises(ValueError, match="g_sumsq must be a contiguous fp32 tensor of 1"):
        ops.lars_update_(w, g, None, sums, torch.zeros(2), lr=0.1, momentum=0.0)


@pytest.mark.parametrize("kwargs,key", [
    ({"lr": -0.1}, "lr"), ({"momentum": -1.0}, "momentum"),
    ({"weight_decay": float("nan")}, "weight_decay"),
    ({"trust_coefficient": 0.0}, "trust_coefficient"), ({"lr": 1e39}, "lr"),
    ({"momentum": 0.0, "nesterov": True}, "nesterov"), ({"denominator": "sum"}, "denominator"),
    ({"on_nonfinite": "ignore"}, "on_nonfinite"), ({"lr": [0.1, 0.2]}, "lr"),
])
def test_bad_hyperparameters_raise_config_errors(kwargs, key):
    w, g = [torch.zeros(4)], [torch.zeros(4)]
    with pytest.raises(ConfigError) as err:
        ops.lars_update_(w, g, [torch.zeros(4)], torch.zeros(1), torch.zeros(1),
                         **{"lr": 0.1, **kwargs})
    assert err.value.key == key
