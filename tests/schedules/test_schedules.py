"""Schedules: exact values against hand computation and the papers' numbers
(/work/shared/reference/papers.md), update counts, noise-scale invariance of Smith's
conversion, properties over random schedules against a brute-force reference, bad input."""
from __future__ import annotations

import math
import re
from fractions import Fraction

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from hvd_largebatch.errors import ConfigError
from hvd_largebatch.schedules import (
    PRESETS, SHAPES, Phase, Schedule, accumulation_steps, equal_noise_lr, from_config,
    increase_batch, linear_scaling_lr, noise_scale, preset, step_decay)

IMAGENET = 1_281_167
CIFAR = 50_000
PROPERTY = settings(max_examples=60, deadline=None)


def approx(x):
    return pytest.approx(x, rel=1e-12, abs=1e-15)


def raises_key(key):
    """Expect a ConfigError whose key (and message prefix) is ``key``."""
    return pytest.raises(ConfigError, match=rf"^{re.escape(key)}: ")


# -- scalar rules ----------------------------------------------------------------------------

def test_linear_scaling_rule_goyal():
    # Goyal: lr = 0.1 * kn / 256; kn = 8192 -> 3.2
    assert linear_scaling_lr(0.1, 256, 8192) == approx(3.2)
    assert linear_scaling_lr(0.1, 256, 256) == approx(0.1)


def test_equal_noise_rules_smith():
    # B ~ lr: (0.1, 128) -> (0.5, 640); B ~ 1/(1-m): 640 at 0.9 -> 3200 at 0.98, same lr 0.5
    assert equal_noise_lr(0.1, 128, 0.9, 640, 0.9) == approx(0.5)
    assert equal_noise_lr(0.5, 640, 0.9, 3200, 0.98) == approx(0.5)
    assert equal_noise_lr(0.1, 128, 0.9, 3200, 0.98) == approx(0.5)


def test_noise_scale_formula():
    # g = lr / (1 - m) * (N / B - 1): 0.1 / 0.1 * (50000 / 128 - 1) = 389.625
    assert noise_scale(0.1, 128, 0.9, CIFAR) == approx(389.625)
    assert noise_scale(3.2, 8192, 0.0, 8192 * 3) == approx(6.4)


def test_accumulation_steps_by_hand():
    assert accumulation_steps(1024, 256) == 4
    assert accumulation_steps(1024, 1024) == 1
    assert accumulation_steps(96, 40) == 3      # 3 x 32
    assert accumulation_steps(98, 30) == 7      # 4, 5, 6 do not divide 98; 7 x 14
    assert accumulation_steps(97, 30) == 97     # prime: micro-batches of 1


# -- Goyal 1 hour ----------------------------------------------------------------------------

def test_goyal_1h_phases():
    s = preset("goyal_1h")
    assert s.dataset_size == IMAGENET and s.epochs == 90 and s.workers == 256 and s.nesterov
    assert [(p.start_epoch, p.end_epoch) for p in s.phases] == [
        (0, 5), (5, 30), (30, 60), (60, 80), (80, 90)]
    assert {p.global_batch for p in s.phases} == {8192}
    assert {p.momentum for p in s.phases} == {0.9}
    assert [p.shape for p in s.phases] == ["linear"] + ["constant"] * 4
    assert [p.lr_start for p in s.phases] == [approx(x) for x in (0.1, 3.2, 0.32, 0.032, 0.0032)]
    assert s.phases[0].lr_end == approx(3.2)
    assert "Goyal" in s.source
    s.validate(256)  # 32 images per worker


def test_goyal_1h_exact_values():
    s = preset("goyal_1h")
    per_epoch = 1281167 // 8192  # 156 full batches; 3215 images dropped per epoch
    assert per_epoch == 156 and s.epoch_batches(0) == [8192] * 156
    # warmup start: the base lr 0.1
    p = s.at(0, 0)
    assert (p.epoch_float, p.lr, p.global_batch, p.momentum, p.phase) == (0.0, 0.1, 8192, 0.9, 0)
    # warmup middle: 0.1 + (3.2 - 0.1) * ef / 5, ef = 2 + 78 * 8192 / N
    ef = 2 + 78 * 8192 / IMAGENET
    p = s.at(2, 78)
    assert p.epoch_float == approx(ef) and p.lr == approx(0.1 + 3.1 * ef / 5) and p.phase == 0
    # last warmup iteration, just below 3.2; first one after it exactly 3.2
    ef = 4 + 155 * 8192 / IMAGENET
    assert s.at(4, 155).lr == approx(0.1 + 3.1 * ef / 5) and s.at(4, 155).lr < 3.2
    assert s.at(5, 0).lr == approx(3.2) and s.at(5, 0).phase == 1
    # each milestone: x0.1 at 30, 60, 80
    for epoch, before, after in ((30, 3.2, 0.32), (60, 0.32, 0.032), (80, 0.032, 0.0032)):
        assert s.at(epoch - 1, 155).lr == approx(before)
        assert s.at(epoch, 0).lr == approx(after)
    assert s.at(89, 155).lr == approx(0.0032)


def test_goyal_1h_update_counts():
    s = preset("goyal_1h")
    assert s.total_updates == 90 * 156 == 14040  # executed: drop_last per epoch
    assert s.nominal_updates == approx(90 * 1281167 / 8192)
    assert round(s.nominal_updates) == 14075  # papers.md: 14,075 updates
    assert s.phase_updates == (5 * 156, 25 * 156, 30 * 156, 20 * 156, 10 * 156)


def test_gradual_warmup_is_linear_per_iteration_within_an_epoch():
    s = preset("goyal_1h")
    lrs = [s.at(1, i).lr for i in range(156)]
    steps = [b - a for a, b in zip(lrs, lrs[1:])]
    assert all(step == pytest.approx(3.1 / 5 * 8192 / IMAGENET, rel=1e-9) for step in steps)


def test_constant_warmup():
    s = from_config({"preset": "goyal_1h", "warmup": {"mode": "constant"}})
    assert s.at(0, 0).lr == approx(0.1) and s.at(4, 155).lr == approx(0.1)
    assert s.at(5, 0).lr == approx(3.2)
    # Smith's conversion leaves the warmup's rise alone: only lr drops become batch increases
    s = from_config({"preset": "smith_30min", "warmup": {"mode": "constant"}})
    assert [p.global_batch for p in s.phases] == [8192, 8192, 16384, 16384, 16384]
    assert [p.lr_start for p in s.phases] == [approx(x) for x in (0.1, 3.2, 0.64, 0.064, 0.0064)]


# -- Smith 30 minutes (reconstruction) --------------------------------------------------------

def test_smith_30min_reconstruction():
    s = preset("smith_30min")
    assert [p.global_batch for p in s.phases] == [8192, 8192, 16384, 16384, 16384]
    # first drop /10 at 30 -> batch x2 and lr / 5; later drops stay lr / 10
    assert [p.lr_start for p in s.phases] == [approx(x) for x in (0.1, 3.2, 0.64, 0.064, 0.0064)]
    assert "reconstruction" in s.source
    assert s.total_updates == 30 * (1281167 // 8192) + 60 * (1281167 // 16384) == 9360
    assert round(s.nominal_updates) == 9384  # papers.md derived figure
    assert s.phases == increase_batch(preset("goyal_1h"), 16384).phases


# -- LARS 32K --------------------------------------------------------------------------------

def test_lars_32k():
    s = preset("lars_32k")
    assert s.epochs == 100 and {p.global_batch for p in s.phases} == {32768}
    assert s.at(0, 0).lr == 0.0
    ef = 6 + 10 * 32768 / IMAGENET  # warmup: linear 0 -> 40 over 12 epochs
    assert s.at(6, 10).lr == approx(40 * ef / 12)
    assert s.at(12, 0).lr == approx(40.0)
    # poly power 2 over epochs 12..100: at epoch 56, x = 0.5 -> 40 * 0.25
    assert s.at(56, 0).lr == approx(10.0)
    ef = 99 + 38 * 32768 / IMAGENET
    assert s.at(99, 38).lr == approx(40 * (1 - (ef - 12) / 88) ** 2)
    assert s.total_updates == 100 * (1281167 // 32768) == 3900
    s.validate(256)


# -- Smith's Wide ResNet CIFAR-10 schedules ----------------------------------------------------

# papers.md table: (B per phase, lr per phase, momentum, derived updates, reported updates)
WRN = {
    "smith_wrn_original": ([128] * 4, [0.1, 0.02, 0.004, 0.0008], 0.9, 78125),
    "smith_wrn_increasing_batch": ([128, 640, 3200, 5120], [0.1, 0.1, 0.1, 0.032], 0.9, 29141),
    "smith_wrn_increased_lr": ([640, 3200, 5120, 5120], [0.5, 0.5, 0.16, 0.032], 0.9, 6406),
    "smith_wrn_increased_momentum": ([3200, 5120, 5120, 5120], [0.5, 0.16, 0.032, 0.0064],
                                     0.98, 2305),
}
WRN_EPOCHS = [60, 60, 40, 40]


@pytest.mark.parametrize("name", sorted(WRN))
def test_smith_wrn_schedules(name):
    batches, lrs, momentum, derived = WRN[name]
    s = preset(name)
    assert s.dataset_size == CIFAR and s.epochs == 200
    assert [p.end_epoch for p in s.phases] == [60, 120, 160, 200]
    assert [p.global_batch for p in s.phases] == batches
    assert [p.lr_start for p in s.phases] == [approx(x) for x in lrs]
    assert {p.momentum for p in s.phases} == {momentum}
    # the papers' count: sum of epochs x N / B, and its rounding in papers.md
    nominal = sum(e * CIFAR / b for e, b in zip(WRN_EPOCHS, batches))
    assert s.nominal_updates == approx(nominal) and round(nominal) == derived
    # executed with drop_last: floor(N / B) per epoch, by hand
    assert s.total_updates == sum(e * (CIFAR // b) for e, b in zip(WRN_EPOCHS, batches))
    # drop_last loses < 1 batch per epoch, hence < 1 update per epoch
    assert 0 <= s.nominal_updates - s.total_updates < s.epochs
    s.validate(s.workers)


def test_smith_wrn_executed_counts_by_hand():
    got = {name: preset(name).total_updates for name in WRN}
    assert got == {
        "smith_wrn_original": 200 * 390,                                  # 78,000
        "smith_wrn_increasing_batch": 60 * 390 + 60 * 78 + 40 * 15 + 40 * 9,  # 29,040
        "smith_wrn_increased_lr": 60 * 78 + 60 * 15 + 80 * 9,             # 6,300
        "smith_wrn_increased_momentum": 60 * 15 + 140 * 9,                # 2,160
    }


def test_smith_wrn_counts_match_reported_figures():
    # Reported: "~80,000" (one significant figure: +-5,000), "~29,000" (two: +-500),
    # "< 6,500", "< 2,500". Both the papers' count and the executed count must agree.
    for count in ("nominal_updates", "total_updates"):
        value = {name: getattr(preset(name), count) for name in WRN}
        assert abs(value["smith_wrn_original"] - 80_000) <= 5_000
        assert abs(value["smith_wrn_increasing_batch"] - 29_000) <= 500
        assert value["smith_wrn_increased_lr"] < 6_500
        assert value["smith_wrn_increased_momentum"] < 2_500


def test_smith_wrn_noise_scale():
    original = preset("smith_wrn_original")
    # the conversion keeps lr / (B (1 - m)) phase by phase (the noise scale for B << N) ...
    for name in ("smith_wrn_increasing_batch", "smith_wrn_increased_lr",
                 "smith_wrn_increased_momentum"):
        for p, q in zip(original.phases, preset(name).phases):
            assert q.lr_start / (q.global_batch * (1 - q.momentum)) == approx(
                p.lr_start / (p.global_batch * (1 - p.momentum)))
    # ... so the full g of the converted phase is the original's times (N - B') / (N - B)
    for p, q in zip(original.phases, preset("smith_wrn_increasing_batch").phases):
        g0 = noise_scale(p.lr_start, p.global_batch, p.momentum, CIFAR)
        g1 = noise_scale(q.lr_start, q.global_batch, q.momentum, CIFAR)
        assert g1 / g0 == pytest.approx((CIFAR - q.global_batch) / (CIFAR - p.global_batch),
                                        rel=1e-12)


def test_exact_noise_rule_on_wrn():
    s = from_config({"preset": "smith_wrn_increasing_batch",
                     "batch_increase": {"rule": "noise_scale"}})
    assert [p.global_batch for p in s.phases] == [128, 640, 3200, 5120]
    # phase 1 by hand: 0.02 * (50000/128 - 1) / (50000/640 - 1) = 0.02 * 389.625 / 77.125
    assert s.phases[1].lr_start == approx(0.02 * 389.625 / 77.125)
    for p, q in zip(preset("smith_wrn_original").phases, s.phases):
        assert noise_scale(q.lr_start, q.global_batch, q.momentum, CIFAR) == approx(
            noise_scale(p.lr_start, p.global_batch, p.momentum, CIFAR))


# -- epoch_batches and at() by hand ----------------------------------------------------------

def two_phase(n, end0, b0, end1, b1, drop_last=True):
    return Schedule(n, [Phase(0.0, end0, b0, 0.9, 1.0, 1.0), Phase(end0, end1, b1, 0.9, 0.5, 0.5)],
                    drop_last=drop_last)


def test_mid_epoch_boundary_by_hand():
    s = two_phase(1000, 1.5, 100, 3.0, 300)
    assert s.epoch_batches(0) == [100] * 10
    assert s.epoch_batches(1) == [100] * 5 + [300]  # 500 + 300 = 800; 1100 > 1000: dropped
    assert s.epoch_batches(2) == [300] * 3
    assert s.total_updates == 10 + 6 + 3 and s.phase_updates == (15, 4)
    assert s.at(1, 4).epoch_float == approx(1.4) and s.at(1, 4).phase == 0
    p = s.at(1, 5)
    assert (p.epoch_float, p.global_batch, p.phase, p.lr) == (1.5, 300, 1, 0.5)
    assert s.at(1, 5).epoch_float == approx(1.5)


def test_partial_last_batch_without_drop_last():
    s = two_phase(1000, 1.5, 100, 3.0, 300, drop_last=False)
    assert s.epoch_batches(1) == [100] * 5 + [300, 200]
    assert s.epoch_batches(2) == [300, 300, 300, 100]
    assert s.at(2, 3).global_batch == 100 and s.at(2, 3).epoch_float == approx(2.9)


def test_boundary_between_batches_and_fractional_end():
    # boundary at 0.55 epochs = sample 550: the iteration starting at 500 is still phase 0
    s = two_phase(1000, 0.55, 100, 2.25, 200)
    assert s.epoch_batches(0) == [100] * 6 + [200] * 2
    assert s.num_epochs == 3 and s.epochs == 2.25
    assert s.epoch_batches(2) == [200, 200]  # iterations starting before sample 250


def test_decimal_boundaries_are_exact():
    # 0.1 epochs of 50,000 samples is 5,000 samples: 5 iterations of 1,000, not 6
    s = two_phase(50_000, 0.1, 1000, 1.0, 2000)
    assert s.epoch_batches(0)[:6] == [1000] * 5 + [2000]


def test_imagenet_scale_epoch():
    s = from_config({"preset": "goyal_1h", "batch": 256})
    assert s.phases[1].lr_start == approx(0.1)
    assert s.epoch_batches(0) == [256] * (1281167 // 256)  # 5,004 iterations
    assert s.total_updates == 90 * 5004


def test_out_of_range():
    s = two_phase(1000, 1.0, 100, 2.0, 100)
    with pytest.raises(IndexError):
        s.epoch_batches(2)
    with pytest.raises(IndexError):
        s.at(0, 10)


# -- properties over random schedules ---------------------------------------------------------

@st.composite
def random_schedules(draw):
    n = draw(st.integers(20, 3000))
    drop_last = draw(st.booleans())
    ends = sorted(set(draw(st.lists(st.integers(1, 400), min_size=1, max_size=5))))  # 1/100 ep
    if not drop_last:
        ends[-1] = -(-ends[-1] // 100) * 100  # whole epochs
        ends = sorted(set(ends))
    phases, start = [], 0.0
    for end in ends:
        shape = draw(st.sampled_from(SHAPES))
        lr0 = draw(st.floats(0.01, 10))
        lr1 = lr0 if shape == "constant" else draw(st.floats(0.0, 10))
        phases.append(Phase(start, end / 100, draw(st.integers(max(1, n // 64), n)),
                            draw(st.floats(0.0, 0.99)), lr0, lr1, shape,
                            draw(st.floats(0.5, 3.0))))
        start = end / 100
    return Schedule(n, phases, drop_last=drop_last), [Fraction(e, 100) for e in ends]


def reference_epoch(schedule, ends, epoch):
    """Brute force: walk the samples one iteration at a time in exact arithmetic."""
    n, out, s = schedule.dataset_size, [], 0
    while s < n:
        position = epoch + Fraction(s, n)
        if position >= ends[-1]:
            break
        batch = schedule.phases[next(k for k, e in enumerate(ends) if position < e)].global_batch
        if schedule.drop_last and s + batch > n:
            break
        out.append(min(batch, n - s))
        s += batch
    return out


@PROPERTY
@given(random_schedules())
def test_epoch_batches_match_brute_force(case):
    schedule, ends = case
    total = 0
    for epoch in range(schedule.num_epochs):
        batches = schedule.epoch_batches(epoch)
        assert batches == reference_epoch(schedule, ends, epoch)
        assert len(batches) == schedule.epoch_iterations(epoch) >= 1
        if epoch + 1 <= ends[-1]:  # a full epoch
            if schedule.drop_last:
                assert sum(batches) <= schedule.dataset_size
            else:
                assert sum(batches) == schedule.dataset_size
        total += len(batches)
    assert schedule.total_updates == total == sum(schedule.phase_updates)


@PROPERTY
@given(random_schedules())
def test_at_agrees_with_epoch_batches(case):
    schedule, ends = case
    n = schedule.dataset_size
    for epoch in range(schedule.num_epochs):
        consumed = 0
        for i, batch in enumerate(schedule.epoch_batches(epoch)):
            point = schedule.at(epoch, i)
            position = epoch + Fraction(consumed, n)
            k = next(j for j, e in enumerate(ends) if position < e)
            phase = schedule.phases[k]
            assert point.global_batch == batch
            assert point.epoch_float == pytest.approx(float(position), rel=1e-12)
            assert point.phase == k and point.momentum == phase.momentum
            assert point.lr == phase.lr_at(point.epoch_float)
            lo, hi = sorted((phase.lr_start, phase.lr_end))
            assert lo - 1e-12 <= point.lr <= hi + 1e-12
            consumed += batch


@PROPERTY
@given(n=st.integers(100, 5_000), iterations=st.integers(2, 100), warmup=st.integers(1, 12),
       start_lr=st.floats(0.0, 1.0), peak=st.floats(1.5, 20.0))
def test_gradual_warmup_is_monotonic(n, iterations, warmup, start_lr, peak):
    batch = max(1, n // iterations)
    s = from_config({"dataset_size": n, "epochs": warmup / 4 + 1, "batch": batch, "lr": peak,
                     "warmup": {"epochs": warmup / 4, "start_lr": start_lr}})
    lrs = []
    for epoch in range(s.num_epochs):
        for i in range(s.epoch_iterations(epoch)):
            point = s.at(epoch, i)
            if point.phase == 0:
                assert point.lr == pytest.approx(
                    start_lr + (peak - start_lr) * point.epoch_float / (warmup / 4), rel=1e-12)
                lrs.append(point.lr)
            else:
                assert point.lr == peak
    assert lrs[0] == start_lr
    assert all(b > a for a, b in zip(lrs, lrs[1:])) and lrs[-1] < peak


@st.composite
def step_schedules(draw):
    n = draw(st.integers(1000, 1_000_000))
    batch = draw(st.integers(1, n // 100))
    milestones = sorted(set(draw(st.lists(st.integers(1, 99), min_size=1, max_size=4))))
    factor = draw(st.sampled_from([0.1, 0.2, 0.5, 0.25, 1 / 3]))
    lr, momentum = draw(st.floats(0.01, 10.0)), draw(st.floats(0.0, 0.99))
    phases = step_decay(0.0, 100.0, batch=batch, momentum=momentum, lr=lr,
                        milestones=milestones, factor=factor)
    return Schedule(n, phases), factor, draw(st.integers(batch, n - 1))


@PROPERTY
@given(step_schedules())
def test_increase_batch_keeps_the_noise_scale(case):
    original, factor, cap = case
    n = original.dataset_size
    exact = increase_batch(original, cap, rule="noise_scale")
    linear = increase_batch(original, cap)
    for converted in (exact, linear):
        assert [(p.start_epoch, p.end_epoch, p.momentum) for p in converted.phases] == \
            [(p.start_epoch, p.end_epoch, p.momentum) for p in original.phases]
        batches = [p.global_batch for p in converted.phases]
        assert batches[0] == original.phases[0].global_batch
        assert all(a <= b <= cap for a, b in zip(batches, batches[1:]))
    for p, q, r in zip(original.phases, exact.phases, linear.phases):
        g = noise_scale(p.lr_start, p.global_batch, p.momentum, n)
        # exact rule: the same g = lr / (1 - m) (N / B - 1)
        assert noise_scale(q.lr_start, q.global_batch, q.momentum, n) == pytest.approx(g, rel=1e-9)
        # papers' rule: the same lr / B, so g scaled by (N - B') / (N - B)
        assert r.lr_start / r.global_batch == pytest.approx(p.lr_start / p.global_batch, rel=1e-12)
        assert noise_scale(r.lr_start, r.global_batch, r.momentum, n) == pytest.approx(
            g * (n - r.global_batch) / (n - p.global_batch), rel=1e-9)
    # Smith's rule: an lr drop becomes a batch increase while under the cap, then goes to the lr
    for a, b in zip(linear.phases, linear.phases[1:]):
        if a.global_batch == cap:
            assert b.lr_start == pytest.approx(a.lr_start * factor, rel=1e-12)
        elif b.global_batch < cap and (a.global_batch / factor).is_integer():
            assert b.global_batch == a.global_batch / factor
            assert b.lr_start == pytest.approx(a.lr_start, rel=1e-12)
    assert linear.total_updates <= original.total_updates


# -- config ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(PRESETS))
def test_to_config_round_trip(name):
    s = preset(name)
    assert from_config(s.to_config()) == s
    assert from_config(yaml.safe_load(yaml.safe_dump(s.to_config()))) == s


def test_explicit_recipe_equals_preset():
    s = from_config({"dataset_size": 50000, "epochs": 200, "batch": 128, "lr": 0.1,
                     "decay": {"type": "step", "milestones": [60, 120, 160], "factor": 0.2},
                     "batch_increase": {"max_batch": 5120}})
    assert s.phases == preset("smith_wrn_increasing_batch").phases


def test_preset_overrides():
    s = from_config({"preset": "goyal_1h", "batch": 4096})
    assert s.phases[0].lr_start == approx(0.1) and s.phases[0].lr_end == approx(1.6)
    assert s.total_updates == 90 * (1281167 // 4096)
    assert "overridden: batch" in s.name
    s = from_config({"preset": "goyal_1h", "warmup": {"epochs": 10}})
    assert s.phases[0].shape == "linear" and s.phases[0].end_epoch == 10
    s = from_config({"preset": "goyal_1h", "decay": {"type": "cosine"}})  # replaces the section
    assert [p.shape for p in s.phases] == ["linear", "cosine"]
    assert s.at(47, 78).lr == pytest.approx(3.2 * 0.5 * (1 + math.cos(math.pi * (
        47 + 78 * 8192 / IMAGENET - 5) / 85)), rel=1e-12)
    s = from_config({"preset": "smith_30min", "batch_increase": None})
    assert s.phases == preset("goyal_1h").phases
    s = from_config({"preset": "goyal_1h", "lr": 2.0, "warmup": {"start_lr": 0.5}})
    assert s.phases[0].lr_start == 0.5 and s.phases[1].lr_start == 2.0
    s = from_config({"preset": "smith_wrn_original", "base_lr": "5e-2"})  # YAML string float
    assert s.phases[0].lr_start == approx(0.05)


def test_with_dataset_size():
    s = preset("smith_wrn_original").with_dataset_size(10_000)
    assert s.dataset_size == 10_000 and s.phases == preset("smith_wrn_original").phases
    assert s.total_updates == 200 * (10_000 // 128)


# -- bad input -------------------------------------------------------------------------------

def steps(milestones, factor=0.2):
    return {"type": "step", "milestones": milestones, "factor": factor}


WRN_RECIPE = {"dataset_size": 50000, "epochs": 200, "batch": 128, "lr": 0.1,
              "decay": {"type": "step", "milestones": [60, 120, 160], "factor": 0.2}}


@pytest.mark.parametrize("change, key", [
    ({"decay": steps([60, 30])}, "schedule.decay.milestones"),
    ({"decay": steps([60, 60])}, "schedule.decay.milestones"),
    ({"decay": steps([60, 200])}, "schedule.decay.milestones"),
    ({"warmup": {"epochs": 80, "start_lr": 0.01}}, "schedule.decay.milestones"),  # inside warmup
    ({"decay": {"type": "step", "milestones": [60], "factor": 1.5}}, "schedule.decay.factor"),
    ({"decay": {"type": "step", "milestones": [60], "gamma": 0.1}}, "schedule.decay.gamma"),
    ({"decay": {"type": "exp"}}, "schedule.decay.type"),
    ({"decay": {"type": "poly", "power": 0}}, "schedule.decay.power"),
    ({"decay": {"type": "cosine", "end_lr": 0.2}}, "schedule.decay.end_lr"),
    ({"batch": 60_000}, "schedule.batch"),
    ({"batch": 128.5}, "schedule.batch"),
    ({"batch": "many"}, "schedule.batch"),
    ({"lr": 0}, "schedule.lr"),
    ({"lr": -0.1}, "schedule.lr"),
    ({"lr": None}, "schedule.lr"),
    ({"base_lr": 0.1, "base_batch": 256}, "schedule.base_lr"),  # both lr and base_lr
    ({"momentum": 1.0}, "schedule.momentum"),
    ({"momentum": -0.1}, "schedule.momentum"),
    ({"warmup": {"epochs": 200, "start_lr": 0.01}}, "schedule.warmup.epochs"),
    ({"warmup": {"epochs": 250, "start_lr": 0.01}}, "schedule.warmup.epochs"),
    ({"warmup": {"epochs": 5}}, "schedule.warmup.start_lr"),  # no base_lr to start from
    ({"warmup": {"epochs": 5, "start_lr": 0.01, "mode": "exp"}}, "schedule.warmup.mode"),
    ({"warmup": {"length": 5}}, "schedule.warmup.length"),
    ({"epochs": 0}, "schedule.epochs"),
    ({"dataset_size": 0}, "schedule.dataset_size"),
    ({"batchsize": 128}, "schedule.batchsize"),
    ({"drop_last": "yes"}, "schedule.drop_last"),
    ({"batch_increase": {"max_batch": 60_000}}, "schedule.batch_increase.max_batch"),
    ({"batch_increase": {"max_batch": 64}}, "schedule.batch_increase.max_batch"),
    ({"batch_increase": {"max_batch": 5120, "rule": "sqrt"}}, "schedule.batch_increase.rule"),
    ({"batch_increase": {"max_batch": 5120}, "decay": {"type": "poly"}}, "schedule.batch_increase"),
    ({"batch_increase": {"max_batch": 5120}, "decay": {"type": "cosine"},
      "warmup": {"epochs": 5, "start_lr": 0.01}}, "schedule.batch_increase"),
    ({"phases": [{"end_epoch": 1, "global_batch": 1, "momentum": 0, "lr_start": 1}]},
     "schedule.epochs"),
])
def test_bad_recipe(change, key):
    with raises_key(key):
        from_config({**WRN_RECIPE, **change})


def test_bad_momentum_moves():
    with raises_key("schedule.base_momentum"):
        from_config({"preset": "smith_wrn_original", "base_momentum": 1.0})


def test_bad_preset_and_section():
    with raises_key("schedule.preset"):
        from_config({"preset": "goyal_2h"})
    with raises_key("schedule.preset"):
        from_config({"preset": ["goyal_1h"]})
    with raises_key("schedule.batchsize"):
        from_config({"preset": "goyal_1h", "batchsize": 1})
    with raises_key("schedule"):
        from_config(["goyal_1h"])


def phase(**change):
    return {"end_epoch": 10, "global_batch": 100, "momentum": 0.9, "lr_start": 0.1, **change}


@pytest.mark.parametrize("phases, key", [
    ([phase(global_batch=2000)], "schedule.phases[0].global_batch"),
    ([phase(global_batch=0)], "schedule.phases[0].global_batch"),
    ([phase(lr_start=-1)], "schedule.phases[0].lr_start"),
    ([phase(lr_start=0)], "schedule.phases[0].lr_start"),
    ([phase(momentum=1)], "schedule.phases[0].momentum"),
    ([phase(end_epoch=0)], "schedule.phases[0].end_epoch"),
    ([phase(), phase(end_epoch=5)], "schedule.phases[1].end_epoch"),
    ([phase(lr_end=0.2)], "schedule.phases[0].lr_end"),
    ([phase(shape="step")], "schedule.phases[0].shape"),
    ([phase(power=2)], "schedule.phases[0].power"),
    ([phase(lr=0.1)], "schedule.phases[0].lr"),
    ([phase(end_epoch=9.5)], "schedule.drop_last"),  # partial last epoch without drop_last
    ([], "schedule.phases"),
])
def test_bad_phases(phases, key):
    with raises_key(key):
        from_config({"dataset_size": 1000, "drop_last": False, "phases": phases})


def test_phases_must_be_contiguous():
    with raises_key("schedule.phases[1].start_epoch"):
        Schedule(1000, [Phase(0, 1, 10, 0.9, 0.1, 0.1), Phase(2, 3, 10, 0.9, 0.1, 0.1)])


def test_validate_world_size():
    s = preset("smith_wrn_increasing_batch")
    s.validate(128)  # 128, 640, 3200, 5120 all divide by 128
    s.validate(64, micro_batches=2)
    with raises_key("schedule.phases[0].global_batch"):
        s.validate(3)
    with raises_key("schedule.phases[0].global_batch"):
        s.validate(128, micro_batches=2)  # 128 / 128 ranks = 1 sample, not 2 micro-batches
    with raises_key("schedule.phases[1].global_batch"):
        preset("smith_wrn_increased_momentum").validate(25)  # 3200 = 25 x 128; 5120 is not
    with raises_key("world_size"):
        s.validate(0)
    with raises_key("micro_batches"):
        s.validate(8, micro_batches=0)


def test_with_dataset_size_smaller_than_batch():
    with raises_key("schedule.dataset_size"):
        preset("goyal_1h").with_dataset_size(8000)
