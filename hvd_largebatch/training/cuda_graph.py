"""``train.cuda_graph: optimizer``: the optimizer step captured once in a CUDA graph and replayed.

At GPU speed a ResNet-50 step of 32 images per GPU takes about 10 ms, and the Python and launch
overhead of an optimizer step matters. :class:`CapturedStep` runs a step function eagerly for
``warmup`` calls (the tensor tables are built and uploaded, momentum buffers allocated), then
captures one call in a CUDA graph on a side stream and from then on replays it: the kernels of a
FusedLARS step (norm pass and update) with no Python and one launch.

What makes the replay right: the step reads its inputs from tensors that stay in place, the
gradients (``zero_grad(set_to_none=False)``, replicated exchange without compression, so the
allreduce writes into ``p.grad``), and the schedule (lr and momentum held on the device, filled
before each replay; the fp16 loss scale is a device tensor too). The Horovod exchange stays
outside the graph (``DistributedOptimizer.step_after_exchange``).
"""
from __future__ import annotations

from typing import Callable

import torch


class CapturedStep:
    """``step()`` eagerly for ``warmup`` calls, then captured and replayed (see module doc).

    ``graph_factory`` makes the graph object (``torch.cuda.CUDAGraph`` by default; a stand-in
    with the same ``capture(fn)`` / ``replay()`` use lets the CPU tests run the same flow).
    """

    def __init__(self, step: Callable[[], object], warmup: int = 3,
                 graph_factory: Callable[[], object] | None = None):
        self.step = step
        self.warmup = warmup
        self.graph_factory = graph_factory or torch.cuda.CUDAGraph
        self.graph = None
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        if self.calls <= self.warmup:
            self.step()
            return
        if self.graph is None:
            self.graph = self.graph_factory()
            if isinstance(self.graph, torch.cuda.CUDAGraph):
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side), torch.cuda.graph(self.graph):
                    self.step()
                torch.cuda.current_stream().wait_stream(side)
            else:
                self.graph.capture(self.step)
        self.graph.replay()
