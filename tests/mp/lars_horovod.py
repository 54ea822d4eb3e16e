"""Per-rank script: hvd.DistributedOptimizer(FusedLARS) against a one-process reference.

Every rank trains the same small model (same seed) on its own slice of a fixed global batch with
hvd.DistributedOptimizer(FusedLARS(param_groups(...))), after hvd.broadcast_parameters and
hvd.broadcast_optimizer_state. Each rank also trains a copy with ReferenceLARS on the whole global
batch: averaging the ranks' gradients of their mean losses (equal slices) gives the gradient of the
global mean loss, so after every step the two models must agree. Ranks must end bitwise equal.
Prints "RANK r/size LARS OK <max error>" on success; any failure exits non-zero.
"""
import copy

import horovod.torch as hvd
import torch
from torch import nn

from hvd_largebatch import FusedLARS, param_groups
from hvd_largebatch.lars.reference import ReferenceLARS

STEPS = 6
PER_RANK = 8
HYPER = dict(lr=0.5, momentum=0.9, nesterov=True, trust_coefficient=0.02)

hvd.init()
rank, size = hvd.rank(), hvd.size()
torch.set_num_threads(1)

torch.manual_seed(123 + rank)  # different on purpose: broadcast_parameters must fix it
model = nn.Sequential(nn.Linear(10, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 4))
hvd.broadcast_parameters(model.state_dict(), root_rank=0)

gen = torch.Generator().manual_seed(7)
x_all = torch.randn(PER_RANK * size, 10, generator=gen)
y_all = torch.randint(0, 4, (PER_RANK * size,), generator=gen)
x_mine = x_all[rank * PER_RANK:(rank + 1) * PER_RANK]
y_mine = y_all[rank * PER_RANK:(rank + 1) * PER_RANK]
loss_fn = nn.CrossEntropyLoss()

ref_model = copy.deepcopy(model)
opt = hvd.DistributedOptimizer(FusedLARS(param_groups(model, weight_decay=1e-3), **HYPER),
                               named_parameters=model.named_parameters())
ref = ReferenceLARS(param_groups(ref_model, weight_decay=1e-3), **HYPER)
assert isinstance(opt, FusedLARS)
assert opt.param_groups[1]["lars"] is False and opt.param_groups[0]["nesterov"] is True

# with empty state, broadcast_optimizer_state first runs one step on zero gradients (so weight
# decay acts once); the reference does the same
hvd.broadcast_optimizer_state(opt, root_rank=0)
for p in ref_model.parameters():
    p.grad = torch.zeros_like(p)
ref.step()
assert len(opt.state) == len(list(model.parameters()))

worst = 0.0
for step in range(STEPS):
    lr = HYPER["lr"] * (step + 1) / STEPS  # warmup: lr changes every step
    for o in (opt, ref):
        for group in o.param_groups:
            group["lr"] = lr
    opt.zero_grad()
    loss_fn(model(x_mine), y_mine).backward()
    opt.step()
    assert not bool(opt.last_step_skipped())
    ref.zero_grad()
    loss_fn(ref_model(x_all), y_all).backward()
    ref.step()
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        err = float((p - q).detach().abs().max() / q.detach().abs().max().clamp(min=1e-12))
        worst = max(worst, err)
        assert err < 1e-4, (rank, step, name, err)

flat = torch.cat([p.detach().flatten() for p in model.parameters()])
gathered = hvd.allgather(flat.unsqueeze(0), name="final_params")
assert all(torch.equal(gathered[0], gathered[r]) for r in range(size)), rank
print(f"RANK {rank}/{size} LARS OK {worst:.2e}", flush=True)
