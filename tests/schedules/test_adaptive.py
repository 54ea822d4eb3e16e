"""The adaptive batch's pure parts (``schedules.adaptive``, ``Schedule.with_batch_from``,
``schedule.batch_increase: {mode: adaptive}``): config reading and bad input, the exact split
of a schedule at an iteration against a sample-by-sample reference, the rounding of a grown
batch, the decision rule at its threshold, replaying recorded decisions, and the bounds ``plan``
shows against hand counts."""
from __future__ import annotations

import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvd_largebatch.errors import ConfigError
from hvd_largebatch.schedules import AdaptiveBatch, accumulation_steps, from_config
from hvd_largebatch.schedules.adaptive import (BatchDecision, decide, decision_due, grown_batch,
                                               next_iteration, replay, update_bounds)

PROPERTY = settings(max_examples=80, deadline=None)


def raises_key(key):
    return pytest.raises(ConfigError, match=rf"^{re.escape(key)}: ")


def adaptive(n=1000, batch=10, epochs=3, **rule):
    return from_config({"dataset_size": n, "epochs": epochs, "batch": batch, "lr": 0.1,
                        "batch_increase": {"mode": "adaptive", **rule}})


# -- config ----------------------------------------------------------------------------------

def test_config_defaults_and_round_trip():
    s = from_config({"dataset_size": 1000, "epochs": 10, "batch": 10, "lr": 0.1,
                     "warmup": {"epochs": 2, "start_lr": 0.01},
                     "decay": {"type": "step", "milestones": [6], "factor": 0.1},
                     "batch_increase": {"mode": "adaptive", "max_batch": 80}})
    assert s.adaptive == AdaptiveBatch(max_batch=80, factor=2.0, margin=None, interval=100,
                                       start_epoch=2.0, smoothing=0.9)  # starts after warmup
    assert s.adaptive.threshold == 2.0
    assert [p.global_batch for p in s.phases] == [10, 10, 10]  # the batch so far: the first
    again = from_config(s.to_config())
    assert again == s and again.adaptive == s.adaptive
    grown = s.with_batch_from(3, 5, 20)
    assert from_config(grown.to_config()) == grown  # a decided schedule reads back too


def test_preset_override_replaces_the_rule_mapping():
    # smith_30min converts its decay with {max_batch: 16384}; mode adaptive replaces the mapping
    s = from_config({"preset": "smith_30min",
                     "batch_increase": {"mode": "adaptive", "max_batch": 65536, "margin": 3}})
    assert s.adaptive.max_batch == 65536 and s.adaptive.threshold == 3.0
    assert len({p.global_batch for p in s.phases}) == 1  # no rule-based increase


@pytest.mark.parametrize("rule, key", [
    ({"max_batch": 5}, "schedule.batch_increase.max_batch"),           # below the first batch
    ({"max_batch": 2000}, "schedule.batch_increase.max_batch"),        # above N
    ({"max_batch": 80, "factor": 1}, "schedule.batch_increase.factor"),
    ({"max_batch": 80, "margin": 0}, "schedule.batch_increase.margin"),
    ({"max_batch": 80, "interval": 0}, "schedule.batch_increase.interval"),
    ({"max_batch": 80, "smoothing": 1.0}, "schedule.batch_increase.smoothing"),
    ({"max_batch": 80, "start_epoch": 3}, "schedule.batch_increase.start_epoch"),
    ({"max_batch": 80, "rule": "linear"}, "schedule.batch_increase.rule"),  # not an adaptive key
    ({"max_batch": 80, "mode": "sometimes"}, "schedule.batch_increase.mode"),
    ({"factor": 2}, "schedule.batch_increase.max_batch"),
])
def test_bad_rule(rule, key):
    with raises_key(key):
        adaptive(**{"mode": "adaptive", **rule})


@pytest.mark.parametrize("extra", [
    {"warmup": {"epochs": 1, "start_lr": 0.01}},            # linear warmup, start_epoch 0 given
    {"decay": {"type": "cosine"}},                          # the lr curve would restart
    {"decay": {"type": "poly", "power": 2}},
])
def test_the_lr_must_be_constant_where_the_batch_may_change(extra):
    section = {"dataset_size": 1000, "epochs": 3, "batch": 10, "lr": 0.1, **extra,
               "batch_increase": {"mode": "adaptive", "max_batch": 80, "start_epoch": 0}}
    with raises_key("schedule.batch_increase.start_epoch"):
        from_config(section)


def test_explicit_phases_take_only_an_adaptive_rule():
    phases = [{"end_epoch": 2, "global_batch": 10, "momentum": 0.9, "lr_start": 0.1}]
    s = from_config({"dataset_size": 100, "phases": phases,
                     "batch_increase": {"mode": "adaptive", "max_batch": 40}})
    assert s.adaptive.max_batch == 40
    with raises_key("schedule.batch_increase"):
        from_config({"dataset_size": 100, "phases": phases, "batch_increase": {"max_batch": 40}})


# -- the split ---------------------------------------------------------------------------------

def reference_batches(n, batch, new, epoch, iteration, epochs):
    """Every epoch's batches, sample by sample: ``batch`` until iteration ``iteration`` of
    ``epoch``, ``new`` from there on, each epoch's remainder dropped."""
    out = []
    for e in range(epochs):
        s, sizes = 0, []
        while True:
            b = batch if (e, len(sizes)) < (epoch, iteration) else new
            if s + b > n:
                break
            sizes.append(b)
            s += b
        out.append(sizes)
    return out


@PROPERTY
@given(n=st.integers(50, 2_000_000), batch=st.integers(1, 40), grow=st.integers(2, 6),
       where=st.floats(0, 0.999), epochs=st.integers(1, 3))
def test_split_is_exact_at_any_iteration(n, batch, grow, where, epochs):
    s = adaptive(n=n, batch=batch, epochs=epochs, max_batch=min(n, batch * grow))
    epoch = min(int(where * epochs), epochs - 1)
    iterations = n // batch
    if iterations > 5_000:  # large N: test near both ends of the epoch, cheaply
        iteration = int(where * 5_000) if where < 0.5 else iterations - 1 - int(where * 5_000)
        iteration = max(0, min(iteration, iterations - 1))
    else:
        iteration = min(int(where * iterations), iterations - 1)
    new = min(n, batch * grow)
    got = s.with_batch_from(epoch, iteration, new)
    for e in range(epochs):
        expected_len = (n // batch if e < epoch else
                        n // new if e > epoch else
                        iteration + (n - iteration * batch) // new)
        assert got.epoch_iterations(e) == expected_len
    if n <= 20_000:
        assert [got.epoch_batches(e) for e in range(epochs)] == \
            reference_batches(n, batch, new, epoch, iteration, epochs)
    b = got.epoch_batches(epoch)
    assert b[:iteration] == [batch] * iteration
    if n - iteration * batch < new:  # the rest of the epoch is less than one new batch
        assert len(b) == iteration
        return
    point = got.at(epoch, iteration)
    assert point.global_batch == new and point.lr == 0.1
    assert point.epoch_float == pytest.approx(epoch + iteration * batch / n, abs=1e-12)


def test_split_keeps_the_step_decay():
    s = from_config({"dataset_size": 1000, "epochs": 4, "batch": 10, "lr": 0.1,
                     "decay": {"type": "step", "milestones": [1.5, 3], "factor": 0.1},
                     "batch_increase": {"mode": "adaptive", "max_batch": 80}})
    got = s.with_batch_from(1, 20, 40)  # epoch 1.2: inside the first constant phase
    assert [(p.start_epoch, p.end_epoch, p.global_batch) for p in got.phases] == \
        [(0, 1.2, 10), (1.2, 1.5, 40), (1.5, 3, 40), (3, 4, 40)]
    for e in range(4):
        for i in range(got.epoch_iterations(e)):
            point = got.at(e, i)
            lr = 0.1 if point.epoch_float < 1.5 else 0.01 if point.epoch_float < 3 else 0.001
            assert point.lr == pytest.approx(lr, rel=1e-12)
    # at a milestone the existing boundary is used: no empty phase
    at_milestone = s.with_batch_from(1, 50, 20)
    assert [p.end_epoch for p in at_milestone.phases] == [1.5, 3, 4]
    assert [p.global_batch for p in at_milestone.phases] == [10, 20, 20]
    # the first iteration of an epoch: the boundary is the whole epoch
    assert [(p.start_epoch, p.global_batch) for p in s.with_batch_from(2, 0, 20).phases] == \
        [(0, 10), (1.5, 10), (2.0, 20), (3, 20)]


def test_a_curved_phase_is_not_split():
    s = from_config({"dataset_size": 1000, "epochs": 4, "batch": 10, "lr": 0.1,
                     "warmup": {"epochs": 1, "start_lr": 0.01},
                     "batch_increase": {"mode": "adaptive", "max_batch": 80}})
    with pytest.raises(ValueError, match="linear lr"):
        s.with_batch_from(0, 50, 20)


def test_next_iteration():
    s = adaptive(n=1000, batch=300, epochs=2, max_batch=600)  # 3 iterations per epoch
    assert next_iteration(s, 0, 1) == (0, 1)  # after 1 iteration of epoch 0
    assert next_iteration(s, 0, 2) == (0, 2)
    assert next_iteration(s, 0, 3) == (1, 0)
    assert next_iteration(s, 1, 3) is None


# -- the rule ----------------------------------------------------------------------------------

@pytest.mark.parametrize("batch, factor, cap, world, max_rank, group, expected", [
    (16, 2, 144, 2, 128, None, 32),
    (128, 2, 144, 2, 128, None, 144),     # the cap
    (16, 2, 144, 3, 128, None, 30),       # 32 does not split over 3 ranks: 3 x 10
    (48, 2, 1000, 2, 8, None, 96),        # 48 per rank: 6 micro-batches of 8
    (50, 2, 1000, 2, 8, None, 98),        # 50 per rank -> 7 micro-batches of 7 (49)
    (48, 2.1, 1000, 2, 16, 4, 96),        # ghost BN groups of 4: 50 -> 12 groups -> 48 per rank
    (140, 2, 144, 2, 128, None, 144),
    (142, 2, 143, 2, 128, None, 142),     # rounding leaves nothing larger: kept
])
def test_grown_batch(batch, factor, cap, world, max_rank, group, expected):
    rule = AdaptiveBatch(max_batch=cap, factor=factor)
    assert grown_batch(batch, rule, world, max_rank, group) == expected


@PROPERTY
@given(batch=st.integers(1, 4096), factor=st.floats(1.01, 8), world=st.integers(1, 64),
       max_rank=st.integers(1, 512), cap_extra=st.integers(0, 100_000))
def test_grown_batch_always_splits(batch, factor, world, max_rank, cap_extra):
    rule = AdaptiveBatch(max_batch=batch + cap_extra, factor=factor)
    got = grown_batch(batch, rule, world, max_rank)
    assert got == batch or batch < got <= min(rule.max_batch, math.floor(batch * factor))
    if got > batch:
        per_rank = got // world
        assert per_rank * world == got
        k = accumulation_steps(per_rank, max_rank)  # what the trainer's micro-batch plan takes
        assert per_rank % k == 0 and per_rank // k <= max_rank


def test_decide_at_the_threshold():
    rule = AdaptiveBatch(max_batch=1000, factor=2, margin=3)
    assert decide(48.0, 16, rule, 2, 128) == 32          # B_simple = 3 x 16 exactly: grows
    assert decide(47.99, 16, rule, 2, 128) == 16
    assert decide(None, 16, rule, 2, 128) == 16          # not resolved yet
    assert decide(math.nan, 16, rule, 2, 128) == 16
    assert decide(1e9, 16, AdaptiveBatch(max_batch=1000, factor=4), 2, 128) == 64


def test_decisions_are_due_every_interval_from_start_epoch_below_the_cap():
    s = adaptive(n=1000, batch=10, epochs=3, max_batch=80, interval=10, start_epoch=1)
    assert not decision_due(s, 90, 0, 90)     # next iteration at epoch 0.9
    assert decision_due(s, 100, 1, 0)         # epoch 1.0
    assert not decision_due(s, 105, 1, 5)     # not a multiple of the interval
    assert not decision_due(s.with_batch_from(1, 0, 80), 110, 1, 10)  # at the cap
    assert decision_due(adaptive(max_batch=80), 100, 1, 0)  # the default interval, 100
    assert not decision_due(adaptive(max_batch=80), 0, 0, 0)  # before the first update


def test_replay_and_a_checkpoint_from_another_schedule():
    s = adaptive(n=1000, batch=10, epochs=3, max_batch=80, interval=10)
    decisions = [BatchDecision(10, 0, 10, 25.0, 10, 20).to_dict(),
                 BatchDecision(20, 0, 20, 30.0, 20, 20).to_dict(),   # kept: nothing applied
                 BatchDecision(30, 0, 30, 50.0, 20, 40).to_dict()]
    got = replay(s, decisions)
    assert got == s.with_batch_from(0, 10, 20).with_batch_from(0, 30, 40)
    assert got.epoch_batches(0)[:12] == [10] * 10 + [20] * 2
    with raises_key("schedule.batch_increase"):
        replay(adaptive(n=1000, batch=20, epochs=3, max_batch=80), decisions)


# -- bounds ------------------------------------------------------------------------------------

def test_update_bounds_by_hand():
    # N 1000, B 10, 3 epochs, decide every 10 updates, x2 up to 80 (1 rank):
    # epoch 0: 10 x 10, 10 x 20, 10 x 40 (700 samples), then 3 x 80 (60 dropped) = 33;
    # epochs 1-2: 12 x 80 each -> 57. Never growing: 300.
    s = adaptive(n=1000, batch=10, epochs=3, max_batch=80, interval=10)
    fewest, most, fastest = update_bounds(s, 1, 1000)
    assert (fewest, most) == (57, 300)
    assert fastest.epoch_batches(0) == [10] * 10 + [20] * 10 + [40] * 10 + [80] * 3
    # from epoch 1: 100 updates at 10, then 10 x 20, 10 x 40, 5 x 80 in epoch 1, 12 x 80
    late = adaptive(n=1000, batch=10, epochs=3, max_batch=80, interval=10, start_epoch=1)
    assert update_bounds(late, 1, 1000)[:2] == (137, 300)
    # on 3 ranks the cap rounds to 78 (x2 of 39 -> 78: 10 -> 18 -> 36 -> 72 -> 78)
    fewest3, _, fastest3 = update_bounds(adaptive(n=1000, batch=12, epochs=1, max_batch=80,
                                                  interval=5), 3, 1000)
    assert sorted(set(fastest3.epoch_batches(0))) == [12, 24, 48, 78]
    assert fewest3 == len(fastest3.epoch_batches(0))
