"""Gradient noise scale estimator (McCandlish et al. 2018, appendix A), single process.

The reference is the definition: per-sample gradients G + noise with covariance Sigma, so that the
mean gradient of b samples has E |G_b|^2 = |G|^2 + tr(Sigma) / b, and B_simple = tr(Sigma) / |G|^2.
(The multi-rank check is in tests/mp/distributed_training.py, NOISE.)
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hvd_largebatch.distributed.noise_scale import NoiseScaleEstimator, unbiased_estimates


@settings(max_examples=50, deadline=None)
@given(grad_sq=st.floats(0.01, 100.0), trace=st.floats(0.0, 1e4), b=st.integers(1, 512),
       ranks=st.integers(2, 64))
def test_expected_norms_give_back_grad_sq_and_trace(grad_sq, trace, b, ranks):
    big = b * ranks
    local = torch.tensor(grad_sq + trace / b, dtype=torch.float64)
    global_ = torch.tensor(grad_sq + trace / big, dtype=torch.float64)
    g2, tr = unbiased_estimates(local, global_, b, big)
    assert math.isclose(float(g2), grad_sq, rel_tol=1e-9, abs_tol=1e-9 * trace)
    assert math.isclose(float(tr), trace, rel_tol=1e-9, abs_tol=1e-9)


def test_monte_carlo_recovers_known_noise_scale_with_correlated_noise():
    """Sigma = A A^T (correlated, anisotropic); each 'step' draws W ranks x b samples."""
    gen = torch.Generator().manual_seed(3)
    dim, ranks, b, steps = 512, 4, 8, 300
    g = torch.randn(dim, generator=gen, dtype=torch.float64)
    g *= 2.0 / g.norm()  # |G|^2 = 4
    a = torch.randn(dim, dim, generator=gen, dtype=torch.float64) / dim ** 0.5
    trace = float((a * a).sum())  # tr(A A^T)
    est = NoiseScaleEstimator(decay=0.99)
    for _ in range(steps):
        z = torch.randn(ranks, b, dim, generator=gen, dtype=torch.float64)
        samples = g + z @ a.T  # per-sample gradients, covariance A A^T
        local = samples.mean(1)  # each rank's mean gradient (b samples)
        local_sq = local.pow(2).sum(1).mean()  # averaged over ranks
        global_sq = samples.reshape(-1, dim).mean(0).pow(2).sum()
        est.update(local_sq, global_sq, b, b * ranks)
    stats = est.stats()
    assert stats["steps"] == steps
    assert abs(float(stats["grad_sq"]) - 4.0) < 0.1 * 4.0, float(stats["grad_sq"])
    assert abs(float(stats["trace"]) - trace) < 0.1 * trace, (float(stats["trace"]), trace)
    assert abs(est.value() - trace / 4.0) < 0.1 * trace / 4.0


def test_ema_of_constant_estimates_is_that_constant_and_ratio_needs_no_correction():
    est = NoiseScaleEstimator(decay=0.9)
    local, global_ = torch.tensor(1.0 + 32.0 / 4), torch.tensor(1.0 + 32.0 / 16)
    for _ in range(3):
        est.update(local, global_, 4, 16)
    stats = est.stats()
    assert float(stats["grad_sq"]) == pytest.approx(1.0)
    assert float(stats["trace"]) == pytest.approx(32.0)
    assert float(stats["noise_scale"]) == pytest.approx(32.0)
    assert est.value() == pytest.approx(32.0)


def test_ema_weights_recent_steps_by_decay():
    est = NoiseScaleEstimator(decay=0.5)
    # step 1: |G|^2 = 1, tr = 8; step 2: |G|^2 = 3, tr = 8 (b = 1, B = 2)
    for grad_sq, trace in ((1.0, 8.0), (3.0, 8.0)):
        est.update(torch.tensor(grad_sq + trace), torch.tensor(grad_sq + trace / 2), 1, 2)
    # EMA: 0.5 * (0.5 * 1) + 0.5 * 3 = 1.75, corrected by 1 - 0.25; tr: 6 / 0.75 = 8
    stats = est.stats()
    assert float(stats["grad_sq"]) == pytest.approx(1.75 / 0.75)
    assert float(stats["trace"]) == pytest.approx(8.0)
    assert est.value() == pytest.approx(8.0 / (1.75 / 0.75))
    assert float(stats["grad_sq_step"]) == pytest.approx(3.0)


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_a_non_finite_step_leaves_the_averages_alone(bad):
    """An overflowing (skipped) step must not poison the EMAs: the same figures as without it."""
    with_bad, without = NoiseScaleEstimator(decay=0.5), NoiseScaleEstimator(decay=0.5)
    for grad_sq, trace in ((1.0, 8.0), (None, None), (3.0, 8.0)):
        if grad_sq is None:
            with_bad.update(torch.tensor(bad), torch.tensor(1.0), 1, 2)
            continue
        for est in (with_bad, without):
            est.update(torch.tensor(grad_sq + trace), torch.tensor(grad_sq + trace / 2), 1, 2)
    a, b = with_bad.stats(), without.stats()
    assert a["steps"] == 3 and b["steps"] == 2
    for key in ("noise_scale", "grad_sq", "trace"):
        assert float(a[key]) == pytest.approx(float(b[key]))
    assert with_bad.value() == pytest.approx(8.0 / (1.75 / 0.75))


def test_value_is_none_until_estimable():
    est = NoiseScaleEstimator()
    assert est.value() is None and est.stats() == {}
    # a noisy first step with |G_B|^2 well below |G_b|^2 / (B / b): the |G|^2 estimate is negative
    est.update(torch.tensor(10.0), torch.tensor(1.0), 4, 16)
    assert float(est.stats()["grad_sq"]) < 0
    assert est.value() is None


def test_bad_arguments():
    with pytest.raises(ValueError, match="small batch < large batch"):
        unbiased_estimates(torch.tensor(1.0), torch.tensor(1.0), 8, 8)
    with pytest.raises(ValueError, match="decay"):
        NoiseScaleEstimator(decay=1.0)


def test_state_round_trip_continues_exactly():
    # a resumed run must continue the averages (an adaptive batch decides from them)
    steps = [(torch.tensor(3.0 + k), torch.tensor(1.0 + 0.1 * k)) for k in range(6)]
    straight = NoiseScaleEstimator(0.7)
    for local, global_ in steps:
        straight.update(local, global_, 4, 16)
    first = NoiseScaleEstimator(0.7)
    for local, global_ in steps[:3]:
        first.update(local, global_, 4, 16)
    resumed = NoiseScaleEstimator(0.7)
    resumed.load_state_dict(first.state_dict())
    for local, global_ in steps[3:]:
        resumed.update(local, global_, 4, 16)
    assert torch.equal(resumed.averages(), straight.averages())
    assert resumed.steps == straight.steps == 6 and resumed.value() == straight.value()
    empty = NoiseScaleEstimator()
    empty.load_state_dict(NoiseScaleEstimator().state_dict())
    assert empty.averages() is None and empty.value() is None
