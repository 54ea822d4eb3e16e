"""Per-rank script: the trainer with ``train.cuda_graph: optimizer``'s flow, on the CPU.

Usage: train_captured.py CONFIG [dotted.key=value overrides...]. The trainer captures its
optimizer step (``Trainer.capture_optimizer_step``) with a stand-in for a CUDA graph that keeps
what a graph needs to hold: ``capture`` does not run the step (as CUDA capture does not), and every
``replay`` checks that the step would replay right: the gradients are the very tensors (same
addresses) seen at capture, and the step re-packs nothing (the schedule comes from device-held
tensors, not from Python values a graph would have frozen). Then it runs the step. The test
compares the final checkpoint with a normal run's. Prints "RANK r CAPTURED OK <replays>".
"""
import sys

import horovod.torch as hvd
import torch

from hvd_largebatch.training.config import load_config
from hvd_largebatch.training.setup import agreed_run
from hvd_largebatch.training.trainer import Trainer

torch.set_num_threads(1)
hvd.init()
cfg = load_config(sys.argv[1], sys.argv[2:])
trainer = Trainer(agreed_run(cfg, hvd, resume=None, synthetic=False), hvd)
inner = trainer.optimizer.optimizer


class StandInGraph:
    replays = 0

    def capture(self, step):
        self.step = step
        self.grads = [p.grad.data_ptr() for p in trainer.model.parameters()]
        self.packed = inner._packed

    def replay(self):
        grads = [p.grad.data_ptr() for p in trainer.model.parameters()]
        assert grads == self.grads, "the gradients moved: a graph would read stale memory"
        self.step()
        assert inner._packed is self.packed, "the step re-packed its groups: a graph would not"
        StandInGraph.replays += 1


trainer.capture_optimizer_step(graph_factory=StandInGraph)
trainer.fit()
assert StandInGraph.replays > 0
print(f"RANK {hvd.rank()} CAPTURED OK {StandInGraph.replays}", flush=True)
