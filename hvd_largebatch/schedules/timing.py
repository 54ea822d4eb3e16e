"""Predicted time per iteration and time to train of a data-parallel job: a first-order model.

Pure functions of stated inputs; nothing here measures anything. Units are in every name:
seconds (``_s``), bytes, images per second per GPU (``img/s``), Gbit/s (10^9 bits per second)
and microseconds (``_us``). A *rank* is one GPU; the *per-rank batch* is global batch / world
size; an *iteration* is one optimizer update (one global batch).

The model of one iteration, and every assumption it makes:

1. **Compute** = per-rank batch / per-GPU throughput. The throughput is an input (images/s that
   one GPU trains, forward + backward, at the job's precision). Gradient accumulation over K
   micro-batches runs the same images at the same images/s: it changes neither the compute
   time nor the bytes exchanged (one exchange per update), only the overlap window (4). The
   throughput is assumed not to depend on the (micro-)batch size: at small per-GPU batches
   real GPUs lose throughput to fixed per-iteration costs (kernel launches, small kernels),
   which this model does not see.
2. **Gradient exchange**, alpha-beta model of a ring over p participants, payload n bytes,
   link bandwidth B (bytes/s) and per-step latency alpha:
   reduce-scatter = allgather = (p - 1) / p x n / B + (p - 1) x alpha;
   allreduce = reduce-scatter + allgather = 2 (p - 1) / p x n / B + 2 (p - 1) x alpha.
   *Flat*: one ring over all W ranks; ``network`` is each rank's bandwidth.
   *Hierarchical* (``intra_node`` given): reduce-scatter over the G GPUs of a node on the
   intra-node link, allreduce of the node's n bytes between the N = W / G nodes at the node's
   network bandwidth (G rings, one per GPU's shard, share the node's links), allgather in the
   node; ``network`` is then the bandwidth of one node. The payload is the parameter count x
   the gradient's bytes per element. Contention, congestion, in-network reduction (SHARP),
   tree and recursive-halving/doubling algorithms (whose latency grows with log p) are not
   modelled.
3. **Sharded optimizer state** (``shard_optimizer_state``): reduce-scatter of the gradients,
   one allreduce of the per-layer norm table (its few kilobytes count as latency only), the
   shard's update, allgather of the weights (bytes per weight element). The reduce-scatter
   starts when the whole flat buffer's gradients are final (``distributed/sharded.py``), so
   none of it overlaps backward. (On CPU tensors under Gloo the trainer allreduces instead;
   this model is of GPU jobs.)
4. **Overlap** (replicated mode): Horovod allreduces each gradient from its autograd hook, so
   the exchange can run under the rest of backward. ``overlap`` is the fraction of the exchange
   so hidden, at most the backward time of the last micro-batch, taken as 2/3 of its compute
   (backward ~ 2 x forward in FLOPs: gradients with respect to inputs and to weights).
   exposed = exchange - min(overlap x exchange, 2/3 x compute / K).
5. **Optimizer step** = bytes it touches / GPU memory bandwidth: fp32 weights, gradients and
   momentum, 4 bytes each; momentum SGD reads w, g, m and writes m, w (5 x 4 bytes per
   parameter); LARS adds a norm pass reading w and g (7 x 4). In sharded mode a rank updates
   parameters / W. Kernel launch costs are not counted.
6. **Input pipeline**: when a per-GPU input throughput (images/s decoded and augmented for
   one GPU) is given, the pipeline runs ahead of the GPU (prefetching) and an iteration takes
   max(GPU time, per-rank batch / input throughput); the bound says which one decided.

Time to train = sum over phases of updates x seconds per iteration; evaluation, start-up,
checkpoints and data loading at epoch boundaries are not counted.
"""
from __future__ import annotations

from dataclasses import dataclass

#: share of one micro-batch's compute spent in backward (backward ~ 2 x forward)
BACKWARD_SHARE = 2.0 / 3.0
#: bytes the optimizer step reads and writes per parameter (fp32 w, g, m: see item 5)
OPTIMIZER_BYTES_PER_PARAMETER = {"sgd": 5 * 4, "lars": 7 * 4}
#: bytes per element of a gradient or weight dtype
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class Link:
    """A link: ``gbit_per_s`` (10^9 bits per second, one direction) and ``latency_us`` (the
    latency of one ring step, microseconds)."""

    gbit_per_s: float
    latency_us: float

    @property
    def bytes_per_s(self) -> float:
        return self.gbit_per_s * 1e9 / 8

    @property
    def latency_s(self) -> float:
        return self.latency_us * 1e-6


@dataclass(frozen=True)
class Topology:
    """``ranks`` GPUs. Flat (``intra_node`` None): one ring, ``network`` per rank.
    Hierarchical: nodes of ``gpus_per_node`` GPUs joined by ``intra_node``; ``network`` per
    node."""

    ranks: int
    network: Link
    gpus_per_node: int = 1
    intra_node: Link | None = None

    @property
    def nodes(self) -> int:
        return self.ranks // self.gpus_per_node


def ring_reduce_scatter_s(nbytes: float, participants: int, link: Link) -> float:
    """Seconds of a ring reduce-scatter (or allgather) of ``nbytes`` over ``participants``:
    (p - 1) / p x n / B + (p - 1) x latency."""
    p = participants
    return (p - 1) / p * nbytes / link.bytes_per_s + (p - 1) * link.latency_s


def ring_allreduce_s(nbytes: float, participants: int, link: Link) -> float:
    """Seconds of a ring allreduce: 2 (p - 1) / p x n / B + 2 (p - 1) x latency."""
    return 2 * ring_reduce_scatter_s(nbytes, participants, link)


def reduce_scatter_s(nbytes: float, topology: Topology) -> float:
    """Seconds of a reduce-scatter (equally: allgather) of ``nbytes`` over the topology; the
    hierarchical form is the intra-node one followed by the inter-node one at node bandwidth."""
    if topology.intra_node is None:
        return ring_reduce_scatter_s(nbytes, topology.ranks, topology.network)
    return (ring_reduce_scatter_s(nbytes, topology.gpus_per_node, topology.intra_node)
            + ring_reduce_scatter_s(nbytes, topology.nodes, topology.network))


def allreduce_s(nbytes: float, topology: Topology) -> float:
    """Seconds of an allreduce of ``nbytes`` (reduce-scatter + allgather) over the topology."""
    return 2 * reduce_scatter_s(nbytes, topology)


def latency_only_allreduce_s(topology: Topology) -> float:
    """Seconds of an allreduce of a negligible payload (the sharded mode's norm table)."""
    return allreduce_s(0.0, topology)


@dataclass(frozen=True)
class System:
    """The inputs of the model (module docstring). ``gpu_throughput``: images/s per GPU;
    ``overlap``: fraction 0..1 of the replicated exchange hidden under backward;
    ``memory_gb_s``: GPU memory bandwidth, 10^9 bytes/s; ``input_throughput``: images/s per
    GPU that the input pipeline delivers (None: not a bound); ``gradient_bytes`` /
    ``weight_bytes``: bytes per element exchanged."""

    gpu_throughput: float
    topology: Topology
    overlap: float = 0.0
    memory_gb_s: float = 2000.0
    input_throughput: float | None = None
    gradient_bytes: int = 4
    weight_bytes: int = 4


@dataclass(frozen=True)
class IterationTime:
    """Seconds of one iteration and its parts (per rank; all ranks are alike)."""

    compute_s: float
    exchange_s: float          # the whole exchange
    exposed_exchange_s: float  # the part not hidden under backward
    optimizer_s: float
    input_s: float | None      # per-rank batch / input throughput
    iteration_s: float
    bound: str                 # "gpu" or "input"


def compute_s(per_rank_batch: int, gpu_throughput: float) -> float:
    """Seconds one GPU computes forward + backward of its per-rank batch (all micro-batches)."""
    return per_rank_batch / gpu_throughput


def optimizer_step_s(parameters: int, optimizer: str, memory_gb_s: float) -> float:
    """Seconds of the optimizer step over ``parameters`` (those this rank updates)."""
    return parameters * OPTIMIZER_BYTES_PER_PARAMETER[optimizer] / (memory_gb_s * 1e9)


def exposed_exchange_s(exchange: float, overlap: float, backward_window: float) -> float:
    """The part of ``exchange`` seconds not hidden: exchange - min(overlap x exchange, window)."""
    return exchange - min(overlap * exchange, backward_window)


def iteration_time(per_rank_batch: int, micro_batches: int, parameters: int, system: System,
                   optimizer: str = "sgd", sharded: bool = False) -> IterationTime:
    """Seconds of one iteration (module docstring, items 1-6). ``parameters``: elements of the
    gradient (trainable parameters); ``optimizer``: ``sgd`` or ``lars``."""
    topo = system.topology
    compute = compute_s(per_rank_batch, system.gpu_throughput)
    if sharded:
        exchange = (reduce_scatter_s(parameters * system.gradient_bytes, topo)
                    + latency_only_allreduce_s(topo)
                    + reduce_scatter_s(parameters * system.weight_bytes, topo))  # allgather
        exposed = exchange
        updated = -(-parameters // topo.ranks)
    else:
        exchange = allreduce_s(parameters * system.gradient_bytes, topo)
        exposed = exposed_exchange_s(exchange, system.overlap,
                                     BACKWARD_SHARE * compute / micro_batches)
        updated = parameters
    step = optimizer_step_s(updated, optimizer, system.memory_gb_s)
    gpu = compute + exposed + step
    loading = (per_rank_batch / system.input_throughput
               if system.input_throughput is not None else None)
    bound = "input" if loading is not None and loading > gpu else "gpu"
    return IterationTime(compute, exchange, exposed, step, loading,
                         loading if bound == "input" else gpu, bound)
