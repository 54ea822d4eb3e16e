"""Per-rank script: the trainer's update is the exact global-batch mean gradient step.

Usage: train_exact.py CONFIG. The config's schedule reads every sample once per epoch
(drop_last: false) with a global batch whose last, partial batch splits unevenly over the ranks,
and ``train.max_per_rank_batch`` forces uneven micro-batches. The model is a BN-free linear
classifier, so the distributed run must equal plain single-process SGD on the whole global batch
of every iteration (mean cross-entropy), which this script computes alongside from the image
files with Pillow. Prints "RANK r EXACT OK <max abs difference>" on success, and rank 0 checks
that the final checkpoint's optimizer state equals the reference's momentum buffers.
"""
import copy
import os
import sys

import horovod.torch as hvd
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from hvd_largebatch.data import GlobalSampler
from hvd_largebatch.lars.optimizer import param_groups
from hvd_largebatch.training.checkpoint import CHECKPOINT_NAME, load_checkpoint
from hvd_largebatch.training.config import load_config
from hvd_largebatch.training.setup import image_transform, setup_run
from hvd_largebatch.training.trainer import Trainer

torch.set_num_threads(1)
hvd.init()
cfg = load_config(sys.argv[1])
run = setup_run(cfg, resume=None, synthetic=False, world_size=hvd.size(), rank=hvd.rank(),
                local_rank=hvd.local_rank())
torch.manual_seed(0)
run.model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, run.data.num_classes))
reference = copy.deepcopy(run.model)
Trainer(run, hvd).fit()

# the same epochs on one process: every iteration's whole global batch, mean loss
t = image_transform(cfg.data)
mean, std = torch.tensor(t.mean).view(3, 1, 1), torch.tensor(t.std).view(3, 1, 1)
index = run.data.train
images = torch.stack([
    (torch.from_numpy(np.asarray(Image.open(index.path(i)).convert("RGB"), dtype=np.float32))
     .permute(2, 0, 1) / 255 - mean) / std
    for i in range(len(index))])
labels = torch.from_numpy(index.labels)
o = cfg.optimizer
opt = torch.optim.SGD([{k: v for k, v in g.items() if k != "lars"}
                       for g in param_groups(reference, o.weight_decay)],
                      lr=0.1, weight_decay=o.weight_decay)
everything = GlobalSampler(run.schedule.dataset_size, run.schedule, 1, 0, seed=cfg.train.seed,
                           drop_last=False)
sizes = set()
for epoch in range(run.schedule.num_epochs):
    for step in range(everything.num_steps(epoch)):
        point = run.schedule.at(epoch, step)
        for group in opt.param_groups:
            group["lr"], group["momentum"] = point.lr, point.momentum
        batch = everything.global_indices(epoch, step)
        sizes.add(len(batch))
        opt.zero_grad()
        F.cross_entropy(reference(images[batch]), labels[batch]).backward()
        opt.step()
assert len(sizes) == 2, sizes  # full batches and one partial batch per epoch
worst = max((a - b).abs().max().item() for a, b in zip(run.model.parameters(), reference.parameters()))
assert worst < 1e-5, worst
print(f"RANK {hvd.rank()} EXACT OK {worst:.2e}", flush=True)
if hvd.rank() == 0:  # the checkpoint holds every momentum buffer, gathered from the shards
    saved = load_checkpoint(os.path.join(cfg.output.dir, CHECKPOINT_NAME))["optimizer"]["state"]
    expected = opt.state_dict()["state"]
    assert sorted(saved) == sorted(expected)
    for key, state in expected.items():
        diff = (saved[key]["momentum_buffer"] - state["momentum_buffer"]).abs().max().item()
        assert diff < 1e-5, (key, diff)
    print("checkpoint momentum OK", flush=True)
