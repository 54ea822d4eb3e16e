"""Per-rank script: fp16 loss scaling through our DistributedOptimizer(FusedLARS(loss_scale=...)).

Usage: loss_scale_ranks.py MODE (replicated | sharded). Every rank holds the same model; its
gradient at step s is a fixed function of (s, rank), times the loss scale S (what backward of
``S * loss`` gives). At OVERFLOW_STEP only the LAST rank puts an inf in one gradient element.
Checked on every rank, against a one-process FusedLARS on the unscaled mean gradient of all ranks
that skips that step: the same skipped steps, the same scale after every step (by hand: halved at
the overflow, doubled after GROWTH clean steps), weights equal to the reference within fp32
rounding of the allreduce, and bitwise equal across ranks.
Prints "RANK r/size LOSS SCALE OK <max error>"; any failure exits non-zero.
"""
import copy
import sys

import horovod.torch as hvd
import torch
from torch import nn

from hvd_largebatch import DistributedOptimizer, FusedLARS, param_groups
from hvd_largebatch.lars.loss_scale import DynamicLossScale

STEPS, OVERFLOW_STEP, GROWTH = 8, 3, 2
HYPER = dict(lr=0.3, momentum=0.9, trust_coefficient=0.02)

mode = sys.argv[1]
hvd.init()
rank, size = hvd.rank(), hvd.size()
torch.set_num_threads(1)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(10, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 4))
ref_model = copy.deepcopy(model)
scaler = DynamicLossScale(init_scale=2.0 ** 12, growth_interval=GROWTH)
opt = DistributedOptimizer(FusedLARS(param_groups(model, 1e-3), loss_scale=scaler, **HYPER),
                           named_parameters=model.named_parameters(), op=hvd.Average,
                           shard_optimizer_state=mode == "sharded")
ref = FusedLARS(param_groups(ref_model, 1e-3), **HYPER)


def grads(step, r):
    gen = torch.Generator().manual_seed(1000 * step + r)
    return [torch.randn(p.shape, generator=gen) * 0.01 for p in model.parameters()]


expected_scale, clean = 2.0 ** 12, 0
worst = 0.0
for step in range(STEPS):
    opt.zero_grad()
    for p, g in zip(model.parameters(), grads(step, rank)):
        p.grad = g * scaler.scale  # sharded mode copies it into its flat buffer
    overflow = step == OVERFLOW_STEP
    if overflow and rank == size - 1:
        next(model.parameters()).grad.view(-1)[3] = float("inf")
    opt.step()
    assert bool(opt.last_step_skipped()) == overflow, (step, "skip")
    if overflow:
        expected_scale, clean = expected_scale / 2, 0
    else:
        for p, *gs in zip(ref_model.parameters(), *(grads(step, r) for r in range(size))):
            p.grad = torch.stack(gs).mean(0)
        ref.step()
        clean += 1
        if clean == GROWTH:
            expected_scale, clean = expected_scale * 2, 0
    assert scaler.scale.item() == expected_scale, (step, scaler.scale.item(), expected_scale)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        worst = max(worst, float((p - q).abs().max() / (q.abs().max() + 1e-12)))
assert worst < 1e-5, worst
flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()] + [scaler.scale.reshape(1)])
everyone = hvd.allgather(flat.unsqueeze(0), name="final")
assert all(torch.equal(everyone[0], row) for row in everyone), "ranks differ"
print(f"RANK {rank}/{size} LOSS SCALE OK {worst:.2e}", flush=True)
