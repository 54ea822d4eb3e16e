"""Per-rank script: rehearse several job configs (``train --synthetic``) in one Horovod job.

Usage: jobs_rehearsal.py OUT_DIR CONFIG... Every config runs through ``hvd_largebatch.training.trainer``
with ``synthetic=True`` and the overrides in ``SMALL`` (a small model on 8x8 images, so that
all of jobs/configs rehearse in seconds on CPU ranks); its outputs go to
``OUT_DIR/<config stem>-synthetic``. Rank 0 prints ``REHEARSED <config> <summary.json>`` per config.
"""
import os
import sys

import horovod.torch as hvd
import torch

from hvd_largebatch.training.config import load_config
from hvd_largebatch.training.trainer import train

#: the swaps that make a rehearsal cheap; everything else (schedule, optimizer, train) is the config's
SMALL = ["model.name=small_resnet", "model.options={width: 4, blocks: 1}", "data.image_size=8",
         "output.tensorboard=false", "output.plots=false", "output.progress=false"]

torch.set_num_threads(1)
hvd.init()
out_dir = sys.argv[1]
for path in sys.argv[2:]:
    stem = os.path.splitext(os.path.basename(path))[0]
    cfg = load_config(path, [*SMALL, f"output.dir={os.path.join(out_dir, stem)}"])
    summary = train(cfg, synthetic=True)
    if hvd.rank() == 0:
        print(f"REHEARSED {path} {os.path.join(summary['output_dir'], 'summary.json')}", flush=True)
