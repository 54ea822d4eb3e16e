"""One rank of tests/test_data_multirank.py: two epochs of an image folder through DaliLoader.

Usage: data_union.py FOLDER OUT_DIR. The global batch grows mid-epoch (4 -> 8 at epoch 0.4) and
every epoch ends with a partial batch. Each iteration allreduces the number of samples read (a
collective per step, as in training: a rank with fewer iterations would hang the job). Saves
``OUT_DIR/rank<r>.pt``: per epoch, per iteration, the images, labels and the allreduced count.
"""
import sys

import torch
import horovod.torch as hvd

from hvd_largebatch.data import DaliLoader, FileIndex, GlobalSampler, ImageTransform
from hvd_largebatch.schedules import Phase, Schedule


def main(folder: str, out_dir: str) -> None:
    hvd.init()
    index = FileIndex.from_folder(folder)
    schedule = Schedule(dataset_size=len(index), drop_last=False,
                        phases=(Phase(0.0, 0.4, 4, 0.9, 0.1, 0.1), Phase(0.4, 2.0, 8, 0.9, 0.1, 0.1)))
    sampler = GlobalSampler(len(index), schedule, hvd.size(), hvd.rank(), seed=5, drop_last=False)
    transform = ImageTransform(crop_size=8, resize_shorter=8, mean=(0, 0, 0), std=(1, 1, 1))
    loader = DaliLoader(index, sampler, transform, num_threads=1)
    record = []
    for epoch in range(2):
        steps = []
        for images, labels in loader.epoch(epoch):
            total = hvd.allreduce(torch.tensor(len(labels)), op=hvd.Sum, name=f"count.{epoch}.{len(steps)}")
            steps.append({"images": images, "labels": labels, "global": int(total)})
        record.append(steps)
    torch.save(record, f"{out_dir}/rank{hvd.rank()}.pt")
    hvd.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:3])
