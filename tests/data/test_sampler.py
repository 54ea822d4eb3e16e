"""GlobalSampler: exact-once reading, world-size independence, re-sharding and resume."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hvd_largebatch.data import FixedBatchSchedule, GlobalSampler, split_micro_batches
from hvd_largebatch.errors import ConfigError

WORLD_SIZES = (1, 2, 3, 4, 8)
UNIT = 24  # lcm of WORLD_SIZES: full batches divisible by every world size tested


class ListSchedule:
    """Test double of the schedule contract (docs/ARCHITECTURE.md): fixed per-epoch batch lists."""

    def __init__(self, dataset_size, epochs, drop_last):
        self.dataset_size = dataset_size
        self.drop_last = drop_last
        self._epochs = [list(b) for b in epochs]
        self.max_global_batch = max((max(b) for b in self._epochs if b), default=1)

    def epoch_batches(self, epoch):
        return list(self._epochs[epoch % len(self._epochs)])


@st.composite
def epoch_plans(draw, drop_last):
    """(N, global batches of one epoch): phases of batch UNIT*k lasting a few iterations each,
    so the batch changes mid-epoch; with drop_last=False a partial last batch takes the rest."""
    n = draw(st.integers(1, 400))
    phases = draw(st.lists(st.tuples(st.integers(1, 4), st.integers(1, 4)), min_size=1, max_size=4))
    batches, left = [], n
    for k, (mult, steps) in enumerate(phases):
        last = k == len(phases) - 1
        b = UNIT * mult
        taken = 0
        while left >= b and (last or taken < steps):
            batches.append(b)
            left -= b
            taken += 1
    if not drop_last and left:
        batches.append(left)
    return n, batches


def all_ranks(n, schedule, world_size, drop_last, seed=0):
    return [GlobalSampler(n, schedule, world_size, r, seed=seed, drop_last=drop_last)
            for r in range(world_size)]


def read_epoch(samplers, epoch):
    """Per iteration, the arrays of every rank (ranks iterated in lock step)."""
    return [list(step) for step in zip(*(s.epoch(epoch) for s in samplers))]


@settings(max_examples=60, deadline=None)
@given(data=st.data(), drop_last=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_exact_once_and_same_global_batch_for_every_world_size(data, drop_last, seed):
    n, batches = data.draw(epoch_plans(drop_last=drop_last))
    schedule = ListSchedule(n, [batches], drop_last)
    reference = None
    for world_size in WORLD_SIZES:
        steps = read_epoch(all_ranks(n, schedule, world_size, drop_last, seed), epoch=3)
        assert len(steps) == len(batches)  # every rank takes every iteration
        global_batches = []
        for b, per_rank in zip(batches, steps):
            sizes = [len(x) for x in per_rank]
            assert sum(sizes) == b
            assert max(sizes) - min(sizes) <= (0 if b % world_size == 0 else 1)
            assert all(x.dtype == np.int64 for x in per_rank)
            global_batches.append(np.concatenate(per_rank))
        order = np.concatenate(global_batches or [np.empty(0, np.int64)])
        assert len(np.unique(order)) == len(order)  # nothing read twice
        assert np.all((order >= 0) & (order < n))
        if not drop_last:
            assert np.array_equal(np.sort(order), np.arange(n))  # everything read once
        if reference is None:
            reference = global_batches
        else:  # the same global batch at every iteration, whatever the world size
            assert all(np.array_equal(a, b) for a, b in zip(reference, global_batches))


@settings(max_examples=40, deadline=None)
@given(data=st.data(), drop_last=st.booleans())
def test_resume_from_state_dict_on_another_world_size(data, drop_last):
    n, batches = data.draw(epoch_plans(drop_last=drop_last))
    # epoch 1: the full batches in reverse order, then the partial one (if any)
    next_batches = [b for b in batches if b % UNIT == 0][::-1] + [b for b in batches if b % UNIT]
    schedule = ListSchedule(n, [batches, next_batches], drop_last)
    w_before = data.draw(st.sampled_from(WORLD_SIZES))
    w_after = data.draw(st.sampled_from(WORLD_SIZES))
    stop = data.draw(st.integers(0, len(batches)))

    uninterrupted = [np.concatenate(s) for s in read_epoch(all_ranks(n, schedule, 1, drop_last), 0)]

    before = all_ranks(n, schedule, w_before, drop_last)
    iters = [s.epoch(0) for s in before]
    got = [np.concatenate([next(it) for it in iters]) for _ in range(stop)]
    states = [s.state_dict() for s in before]
    assert all(st_ == states[0] for st_ in states)  # every rank saves the same state
    assert states[0]["step"] == stop and states[0]["samples_seen"] == sum(batches[:stop])

    after = all_ranks(n, schedule, w_after, drop_last)
    for s in after:
        s.load_state_dict(states[0])
    got += [np.concatenate(step) for step in read_epoch(after, 0)]
    assert len(got) == len(uninterrupted)
    assert all(np.array_equal(a, b) for a, b in zip(got, uninterrupted))
    # the next epoch starts at its first iteration, with its own batches
    nxt = read_epoch(after, 1)
    assert [sum(len(x) for x in step) for step in nxt] == next_batches


def test_order_depends_only_on_seed_and_epoch_not_on_batch_sizes():
    n = 240
    small = ListSchedule(n, [[24] * 10], drop_last=False)
    mixed = ListSchedule(n, [[48, 24, 72, 96]], drop_last=False)
    for epoch in (0, 5):
        a = np.concatenate(list(GlobalSampler(n, small, 1, 0, seed=7, drop_last=False).epoch(epoch)))
        b = np.concatenate([np.concatenate(step) for step in
                            read_epoch(all_ranks(n, mixed, 4, False, seed=7), epoch)])
        assert np.array_equal(a, b)
    e0 = np.concatenate(list(GlobalSampler(n, small, 1, 0, seed=7, drop_last=False).epoch(0)))
    e1 = np.concatenate(list(GlobalSampler(n, small, 1, 0, seed=7, drop_last=False).epoch(1)))
    other_seed = np.concatenate(list(GlobalSampler(n, small, 1, 0, seed=8, drop_last=False).epoch(0)))
    assert not np.array_equal(e0, e1)  # reshuffled every epoch
    assert not np.array_equal(e0, other_seed)
    assert not np.array_equal(e0, np.arange(n))


def test_contiguous_rank_slices_by_hand():
    # no shuffle, so the permutation is 0..N-1 and the slices can be written down
    schedule = ListSchedule(10, [[4, 4, 2]], drop_last=False)
    r0 = GlobalSampler(10, schedule, 2, 0, shuffle=False, drop_last=False)
    r1 = GlobalSampler(10, schedule, 2, 1, shuffle=False, drop_last=False)
    assert [x.tolist() for x in r0.epoch(0)] == [[0, 1], [4, 5], [8]]
    assert [x.tolist() for x in r1.epoch(0)] == [[2, 3], [6, 7], [9]]
    # partial last batch of 2 samples on 3 ranks: slices [0:0], [0:1], [1:2] (floor(r*B/W))
    schedule = ListSchedule(8, [[6, 2]], drop_last=False)
    got = [[x.tolist() for x in GlobalSampler(8, schedule, 3, r, shuffle=False, drop_last=False).epoch(0)]
           for r in range(3)]
    assert got == [[[0, 1], []], [[2, 3], [6]], [[4, 5], [7]]]


def test_split_micro_batches():
    idx = np.arange(10, 20, dtype=np.int64)
    parts = split_micro_batches(idx, 3)
    assert [p.tolist() for p in parts] == [[10, 11, 12], [13, 14, 15], [16, 17, 18, 19]]
    assert [p.tolist() for p in split_micro_batches(idx[:2], 4)] == [[], [10], [], [11]]
    assert [p.tolist() for p in split_micro_batches(idx, 1)] == [idx.tolist()]
    with pytest.raises(ConfigError, match="micro_batches"):
        split_micro_batches(idx, 0)


def test_fixed_batch_schedule_and_validation_sampler():
    assert FixedBatchSchedule(10, 4).epoch_batches(0) == [4, 4, 2]
    assert FixedBatchSchedule(10, 4, drop_last=True).epoch_batches(3) == [4, 4]
    ranks = [GlobalSampler.for_validation(10, 4, 2, r) for r in range(2)]
    assert [[x.tolist() for x in s.epoch(0)] for s in ranks] == [[[0, 1], [4, 5], [8]],
                                                                  [[2, 3], [6, 7], [9]]]


def test_bad_schedules_are_config_errors():
    with pytest.raises(ConfigError, match="schedule.dataset_size"):
        GlobalSampler(100, ListSchedule(99, [[33, 33, 33]], False), 1, 0, drop_last=False)
    with pytest.raises(ConfigError, match="schedule.drop_last"):
        GlobalSampler(10, ListSchedule(10, [[5]], True), 1, 0, drop_last=False)
    with pytest.raises(ConfigError, match="rank"):
        GlobalSampler(10, ListSchedule(10, [[5]], True), 2, 2)
    bad = {
        "not divisible by world size 4": ListSchedule(20, [[8, 6, 6]], False),
        "reads 30 samples but the dataset has 20": ListSchedule(20, [[10, 10, 10]], True),
        "drop_last=False needs": ListSchedule(20, [[8, 8]], False),
    }
    for message, schedule in bad.items():
        sampler = GlobalSampler(20, schedule, 4, 0, drop_last=schedule.drop_last)
        with pytest.raises(ConfigError, match=message):
            next(sampler.epoch(0))


def test_state_from_another_run_is_refused():
    schedule = ListSchedule(48, [[24, 24]], False)
    sampler = GlobalSampler(48, schedule, 2, 0, seed=1, drop_last=False)
    next(sampler.epoch(0))
    state = sampler.state_dict()
    with pytest.raises(ConfigError, match="seed"):
        GlobalSampler(48, schedule, 2, 0, seed=2, drop_last=False).load_state_dict(state)
    changed = ListSchedule(48, [[12, 12, 24]], False)
    with pytest.raises(ConfigError, match="batch schedule changed"):
        GlobalSampler(48, changed, 2, 0, seed=1, drop_last=False).load_state_dict(state)


@pytest.mark.parametrize("drop_last", [False, True])
def test_real_schedule_with_growing_batch(drop_last):
    from hvd_largebatch.schedules import Phase, Schedule

    # Smith et al. style: the batch grows 32 -> 96 -> 192 at epochs 0.5 and 1.25 (mid-epoch)
    n = 1000
    schedule = Schedule(dataset_size=n, drop_last=drop_last, phases=(
        Phase(0.0, 0.5, 32, 0.9, 0.1, 0.1), Phase(0.5, 1.25, 96, 0.9, 0.1, 0.1),
        Phase(1.25, 3.0, 192, 0.9, 0.1, 0.1)))
    for epoch in range(3):
        batches = schedule.epoch_batches(epoch)
        reference = None
        for world_size in (1, 2, 4, 8):
            steps = read_epoch(all_ranks(n, schedule, world_size, drop_last, seed=11), epoch)
            assert len(steps) == len(batches)
            global_batches = [np.concatenate(step) for step in steps]
            for s, g in enumerate(global_batches):
                point = schedule.at(epoch, s)
                assert len(g) == batches[s]
                if s < len(batches) - 1 or drop_last:  # all but a partial last batch
                    assert len(g) == point.global_batch
            order = np.concatenate(global_batches)
            assert len(np.unique(order)) == len(order) == sum(batches)
            if not drop_last:
                assert sum(batches) == n
            if reference is None:
                reference = order
            assert np.array_equal(order, reference)
    epoch1 = schedule.epoch_batches(1)
    assert 96 in epoch1 and 192 in epoch1  # the batch grows inside epoch 1


def test_set_schedule_continues_from_the_position():
    from hvd_largebatch.schedules import from_config

    # an adaptive batch decision after 7 iterations of epoch 1: batch 8 -> 24 from there on
    n = 200
    base = from_config({"dataset_size": n, "epochs": 3, "batch": 8, "lr": 0.1,
                        "batch_increase": {"mode": "adaptive", "max_batch": 48}})
    grown = base.with_batch_from(1, 7, 24)
    switched = all_ranks(n, base, 2, True, seed=3)
    for s in switched:
        list(s.epoch(0))
    steps = []
    for step in zip(*(s.epoch(1) for s in switched)):
        steps.append(np.concatenate(step))
        if len(steps) == 7:
            break
    for s in switched:
        s.set_schedule(grown)
    steps += [np.concatenate(step) for step in zip(*(s.epoch(1) for s in switched))]
    # the same as a sampler that followed the grown schedule from the start
    reference = [np.concatenate(step) for step in read_epoch(all_ranks(n, grown, 2, True, seed=3), 1)]
    assert len(steps) == len(reference) == 7 + (n - 56) // 24
    assert all(np.array_equal(a, b) for a, b in zip(steps, reference))
    # a schedule that changes iterations already read is refused, the position kept
    with pytest.raises(ValueError, match="already"):
        switched[0].set_schedule(base.with_batch_from(1, 2, 16))
    assert switched[0].schedule is grown
