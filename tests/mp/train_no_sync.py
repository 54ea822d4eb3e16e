"""Per-rank script: no device-to-host synchronization inside a training iteration.

Usage: train_no_sync.py CONFIG [dotted.key=value overrides...]. Every way a tensor's value reaches Python
(``item``, ``tolist``, ``cpu``, ``numpy``, ``__bool__``, ``__float__``, ``__int__``,
``__index__``) is counted while ``Trainer._iteration`` runs, except inside ``_flush_window`` (the
log boundary, where the trainer reduces its metrics on purpose); evaluation and checkpoints run
outside iterations. On a GPU each of these is a synchronization; on the CPU they are what would
be one. On a GPU, ``torch.cuda.set_sync_debug_mode("error")`` is on inside iterations too (outside
the flush), so any synchronizing CUDA call of torch raises. Prints "RANK r NO SYNC OK
<iterations>" or the first offending call's stack.
"""
import sys
import traceback

import horovod.torch as hvd
import torch

from hvd_largebatch.training.config import load_config
from hvd_largebatch.training.setup import agreed_run
from hvd_largebatch.training.trainer import Trainer

CONVERSIONS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
state = {"iteration": False, "flush": False, "iterations": 0}
offending = []


def counted(name, original):
    def conversion(self, *args, **kwargs):
        if state["iteration"] and not state["flush"] and not offending:
            offending.append((name, "".join(traceback.format_stack(limit=12))))
        return original(self, *args, **kwargs)
    return conversion


def sync_debug(mode: str) -> None:
    if trainer.device.type == "cuda":
        torch.cuda.set_sync_debug_mode(mode)


def flag(key, original, count=False):
    def wrapped(*args, **kwargs):
        state[key] = True
        sync_debug("error" if state["iteration"] and not state["flush"] else "default")
        try:
            return original(*args, **kwargs)
        finally:
            state[key] = False
            sync_debug("error" if state["iteration"] and not state["flush"] else "default")
            state["iterations"] += count
    return wrapped


torch.set_num_threads(1)
hvd.init()
cfg = load_config(sys.argv[1], sys.argv[2:])
trainer = Trainer(agreed_run(cfg, hvd, resume=None, synthetic=False), hvd)
Trainer._iteration = flag("iteration", Trainer._iteration, count=True)
Trainer._flush_window = flag("flush", Trainer._flush_window)
for name in CONVERSIONS:
    setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
trainer.fit()
if offending:
    name, stack = offending[0]
    print(f"RANK {hvd.rank()} SYNC in an iteration: Tensor.{name}\n{stack}", flush=True)
    sys.exit(1)
print(f"RANK {hvd.rank()} NO SYNC OK {state['iterations']}", flush=True)
