"""Per-rank script: ``hvd-largebatch train CONFIG`` that also saves the inputs of its first steps.

Usage: train_dump.py STEPS OUT_DIR CONFIG. Every rank saves ``OUT_DIR/rank<r>.pt``: for each of
the first STEPS iterations, the list of its micro-batches ``(images, labels)`` in order, as the
trainer fed them to the model. The run's final checkpoint is in the config's output.dir.
"""
import sys

import torch

from hvd_largebatch.cli.main import main
from hvd_largebatch.training import trainer as train_module

steps, out_dir, config = int(sys.argv[1]), sys.argv[2], sys.argv[3]
seen: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
micro_step, iteration = train_module.Trainer._micro_step, train_module.Trainer._iteration


def recording_iteration(self, epoch, bar):
    if len(seen) < steps:
        seen.append([])
    iteration(self, epoch, bar)
    if len(seen) == steps and self.updates == steps:
        torch.save(seen, f"{out_dir}/rank{self.run.rank}.pt")


def recording_micro_step(self, images, labels, scale):
    if len(seen) <= steps and self.updates < steps:
        seen[-1].append((images.clone(), labels.clone()))
    micro_step(self, images, labels, scale)


train_module.Trainer._iteration = recording_iteration
train_module.Trainer._micro_step = recording_micro_step
sys.exit(main(["train", config]))
