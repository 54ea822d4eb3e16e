"""The time-to-train model (hvd_largebatch.schedules.timing) against hand computation: ring
allreduce bytes and latency for W = 1, 2, 256, hierarchical and sharded exchanges, overlap 0 and
1, micro-batches, the optimizer step and the input-bound case."""
from __future__ import annotations

import pytest

from hvd_largebatch.schedules.timing import (Link, System, Topology, allreduce_s, iteration_time,
                                             optimizer_step_s, reduce_scatter_s,
                                             ring_allreduce_s)

GBIT_100 = Link(100.0, 10.0)   # 12.5e9 bytes/s, 10 us per ring step
MB_100 = 100e6                 # bytes


def test_link_units():
    assert GBIT_100.bytes_per_s == 12.5e9 and GBIT_100.latency_s == pytest.approx(1e-5)


def test_one_rank_exchanges_nothing():
    assert ring_allreduce_s(MB_100, 1, GBIT_100) == 0
    it = iteration_time(32, 1, 25_000_000, System(100.0, Topology(1, GBIT_100)))
    assert it.exchange_s == 0 and it.exposed_exchange_s == 0
    assert it.iteration_s == pytest.approx(0.32 + 25e6 * 20 / 2000e9)


@pytest.mark.parametrize("ranks,expected", [
    (2, 2 * 1 / 2 * 100e6 / 12.5e9 + 2 * 1 * 10e-6),        # 8 ms + 20 us
    (256, 2 * 255 / 256 * 100e6 / 12.5e9 + 2 * 255 * 10e-6),  # 15.94 ms + 5.1 ms
])
def test_ring_allreduce_bytes_and_latency(ranks, expected):
    assert ring_allreduce_s(MB_100, ranks, GBIT_100) == pytest.approx(expected, rel=1e-12)
    assert allreduce_s(MB_100, Topology(ranks, GBIT_100)) == pytest.approx(expected, rel=1e-12)


def test_latency_term_alone():
    # no payload: 2 (W - 1) steps of 10 us
    assert ring_allreduce_s(0.0, 256, GBIT_100) == pytest.approx(2 * 255 * 10e-6)
    assert ring_allreduce_s(MB_100, 256, Link(100.0, 0.0)) == pytest.approx(
        2 * 255 / 256 * 100e6 / 12.5e9)


def test_hierarchical_is_intra_node_reduce_scatter_inter_node_allreduce_intra_node_allgather():
    nvlink, ethernet = Link(640.0, 0.0), Link(50.0, 0.0)  # 80e9 and 6.25e9 bytes/s
    topo = Topology(256, ethernet, gpus_per_node=8, intra_node=nvlink)
    intra = 2 * 7 / 8 * MB_100 / 80e9
    inter = 2 * 31 / 32 * MB_100 / 6.25e9
    assert topo.nodes == 32
    assert allreduce_s(MB_100, topo) == pytest.approx(intra + inter, rel=1e-12)
    assert reduce_scatter_s(MB_100, topo) == pytest.approx((intra + inter) / 2, rel=1e-12)
    # one node: the network is not used
    assert allreduce_s(MB_100, Topology(8, ethernet, 8, nvlink)) == pytest.approx(intra)


def test_overlap_zero_and_one():
    topo = Topology(256, GBIT_100)
    exchange = ring_allreduce_s(25e6 * 4, 256, GBIT_100)
    # compute 32 / 100 = 0.32 s; backward 2/3 of it, far longer than the exchange
    none = iteration_time(32, 1, 25_000_000, System(100.0, topo, overlap=0.0))
    full = iteration_time(32, 1, 25_000_000, System(100.0, topo, overlap=1.0))
    half = iteration_time(32, 1, 25_000_000, System(100.0, topo, overlap=0.5))
    assert none.exchange_s == full.exchange_s == pytest.approx(exchange)
    assert none.exposed_exchange_s == pytest.approx(exchange)
    assert full.exposed_exchange_s == 0
    assert half.exposed_exchange_s == pytest.approx(exchange / 2)
    assert none.iteration_s - full.iteration_s == pytest.approx(exchange)


def test_overlap_is_capped_by_the_last_micro_batchs_backward():
    topo = Topology(256, Link(1.0, 0.0))  # slow: 2 x 255/256 x 1e8 / 1.25e8 = 1.59 s
    exchange = 2 * 255 / 256 * 1e8 / 1.25e8
    one = iteration_time(64, 1, 25_000_000, System(100.0, topo, overlap=1.0))
    four = iteration_time(64, 4, 25_000_000, System(100.0, topo, overlap=1.0))
    assert one.compute_s == four.compute_s == pytest.approx(0.64)  # same images/s
    assert one.exposed_exchange_s == pytest.approx(exchange - 2 / 3 * 0.64)
    assert four.exposed_exchange_s == pytest.approx(exchange - 2 / 3 * 0.16)


def test_sharded_exchange_is_reduce_scatter_norm_table_and_allgather_without_overlap():
    link = Link(8.0, 1.0)  # 1e9 bytes/s, 1 us
    system = System(100.0, Topology(4, link), overlap=1.0, memory_gb_s=1000.0)
    it = iteration_time(32, 1, 1_000_000, system, optimizer="lars", sharded=True)
    rs = 3 / 4 * 4e6 / 1e9 + 3 * 1e-6
    table = 2 * 3 * 1e-6
    assert it.exchange_s == pytest.approx(rs + table + rs, rel=1e-12)
    assert it.exposed_exchange_s == it.exchange_s
    assert it.optimizer_s == pytest.approx(250_000 * 28 / 1e12)  # a quarter of the parameters
    replicated = iteration_time(32, 1, 1_000_000, system, optimizer="lars")
    assert replicated.exchange_s == pytest.approx(2 * rs)


def test_optimizer_step_is_bytes_touched_over_memory_bandwidth():
    assert optimizer_step_s(25_557_032, "sgd", 732.0) == pytest.approx(25_557_032 * 20 / 732e9)
    assert optimizer_step_s(25_557_032, "lars", 732.0) == pytest.approx(25_557_032 * 28 / 732e9)


def test_input_pipeline_bound():
    topo = Topology(8, GBIT_100)
    gpu = iteration_time(32, 1, 1_000_000, System(100.0, topo, input_throughput=200.0))
    assert gpu.bound == "gpu" and gpu.input_s == pytest.approx(0.16)
    slow = iteration_time(32, 1, 1_000_000, System(100.0, topo, input_throughput=50.0))
    assert slow.bound == "input" and slow.iteration_s == pytest.approx(32 / 50)
    assert iteration_time(32, 1, 1_000_000, System(100.0, topo)).input_s is None


def test_gradient_dtype_halves_the_bytes():
    topo = Topology(2, Link(8.0, 0.0))
    fp32 = iteration_time(32, 1, 1_000_000, System(100.0, topo))
    fp16 = iteration_time(32, 1, 1_000_000, System(100.0, topo, gradient_bytes=2))
    assert fp32.exchange_s == pytest.approx(4e6 / 1e9)
    assert fp16.exchange_s == pytest.approx(2e6 / 1e9)
