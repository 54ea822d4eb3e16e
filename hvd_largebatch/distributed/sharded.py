"""Sharded optimizer state: reduce-scatter, exact per-layer norms from partial sums, allgather.

:class:`ShardedExchange` is the ``shard_optimizer_state=True`` mode of
:class:`hvd_largebatch.distributed.DistributedOptimizer` (layout: :mod:`hvd_largebatch.distributed.sharding`).

At construction the trainable parameters are moved into one flat, zero-padded buffer per dtype
(``p.data`` becomes a view of it; so does ``p.grad``, so autograd accumulates straight into the
flat gradient buffer). Each rank builds a private optimizer of the wrapped class over its
*segments* (views of its shard, cut at layer boundaries): momentum buffers exist only for the
shard, i.e. optimizer memory / world size. A step:

1. when a buffer's last gradient is final (and, when the noise scale is measured, its local
   ``||g||^2`` has been taken in one fused pass), its reduce-scatter starts (one per dtype;
   Horovod's op, compression and scale factors); meanwhile the rank computes its segments'
   ``||w||^2``. With ``exchange="allreduce"`` (``sharded_exchange`` of the wrapper) the buffer is
   allreduced in place instead and the rank reads its shard's slice: the same result and memory,
   twice the bytes in theory, but with the Gloo controller Horovod 0.28.1's reduce-scatter of a CPU
   buffer is 3-5x slower than its allreduce of the same buffer (measured with
   benchmarks/bench_distributed.py), so ``"auto"`` picks the allreduce for CPU tensors under Gloo
   and the reduce-scatter otherwise (NCCL, MPI);
2. one norm pass over the reduced shard gives per-segment ``||g||^2`` (and ``<w, g>``); they are
   added into a ``[rows x layers]`` table of partial sums, and one Sum-allreduce of that table (plus
   the local ``||g||^2``) makes every layer's sums exact on every rank;
3. each segment is updated with its whole layer's sums; if any layer's sums are non-finite and the
   policy is "skip", every rank skips (the sums of all segments are poisoned with NaN);
4. an allgather of the updated shards rebuilds the full weights.

State dicts hold the rank's shard (:meth:`ShardedExchange.state_dict`);
:meth:`ShardedExchange.gathered_state_dict` (collective) rebuilds the full state in the wrapped
optimizer's own format, which :meth:`ShardedExchange.load_state_dict` splits again for any world
size.
"""
from __future__ import annotations

import math

import horovod.torch as hvd
import torch

from hvd_largebatch.distributed.exchange import ExchangeConfig, dense_grad, squared_norm
from hvd_largebatch.distributed.sharding import ShardLayout, flatten_into_buffers, layer_view
from hvd_largebatch.lars import reference
from hvd_largebatch.lars.optimizer import load_group_values


class ShardedExchange:
    """Reduce-scatter / sharded update / allgather over flat per-dtype buffers (module docstring).

    ``optimizer``: the wrapped optimizer (a ``FusedLARS`` or a subclass constructible as
    ``cls(param_groups, **optimizer.defaults)``); it keeps the public ``param_groups`` (full
    parameters, hyperparameters) and no state. ``names``: parameter -> name. ``exchange``:
    ``"reducescatter"``, ``"allreduce"`` or ``"auto"`` (step 1 of the module docstring).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, names: dict, config: ExchangeConfig,
                 rank: int, exchange: str = "auto"):
        self.optimizer = optimizer
        self.names = names
        self.config = config
        self.rank = rank
        positions, self.params, self.layer_group = {}, [], []
        position = 0
        for gi, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                positions[p] = position
                position += 1
                if p.requires_grad:
                    self.params.append(p)
                    self.layer_group.append(gi)
        if not self.params:
            raise ValueError("shard_optimizer_state: the optimizer has no trainable parameter")
        self.num_positions = position
        self.layer_position = [positions[p] for p in self.params]  # index in state_dict order
        self.layer_of = {p: i for i, p in enumerate(self.params)}
        device = self.params[0].device
        for p in self.params:
            if p.device != device:
                raise ValueError(f"shard_optimizer_state needs all parameters on one device; "
                                 f"{names[p]!r} is on {p.device}, {names[self.params[0]]!r} "
                                 f"on {device}")
        if exchange == "auto":
            gloo_cpu = device.type == "cpu" and hvd.gloo_enabled()
            exchange = "allreduce" if gloo_cpu else "reducescatter"
        self.exchange = exchange
        full_state = optimizer.state_dict() if optimizer.state else None
        optimizer.state.clear()

        self.layout = ShardLayout([p.numel() for p in self.params], [p.dtype for p in self.params],
                                  config.size)
        self.flat_params = flatten_into_buffers(self.params, self.layout, device)
        self.flat_grads = [torch.zeros_like(f) for f in self.flat_params]
        self.grad_views = []
        for i, p in enumerate(self.params):
            p.data = layer_view(self.flat_params, self.layout, i, p.shape)
            view = layer_view(self.flat_grads, self.layout, i, p.shape)
            if p.grad is not None:
                view.copy_(p.grad)
            p.grad = view
            self.grad_views.append(view)

        # the segments, ordered as the private optimizer's table (group by group)
        segments = self.layout.segments(rank)
        by_group = [[s for s in segments if self.layer_group[s.layer] == gi]
                    for gi in range(len(optimizer.param_groups))]
        self.segments = [s for group in by_group for s in group]
        self.segment_params = [self.flat_params[s.buffer][s.start:s.stop] for s in self.segments]
        for s, t in zip(self.segments, self.segment_params):
            t.grad = self.flat_grads[s.buffer][s.start:s.stop]
        self.shard_optimizer = None
        if self.segments:
            groups = []
            it = iter(self.segment_params)
            for group, members in zip(optimizer.param_groups, by_group):
                groups.append({**_hyper(group), "params": [next(it) for _ in members]})
            self.shard_optimizer = type(optimizer)(
                groups, **optimizer.defaults, loss_scale=getattr(optimizer, "loss_scale", None))
            table = self.shard_optimizer.step_params()
            if [t.data_ptr() for t in table] != [t.data_ptr() for t in self.segment_params]:
                raise RuntimeError("the shard optimizer orders its tensors unlike its param_groups")
        self.segment_layer = torch.tensor([s.layer for s in self.segments], dtype=torch.long,
                                          device=device)
        self.device = device
        self.pending = [len(b.layers) for b in self.layout.buffers]
        self.ready: set = set()
        self.handles: dict = {}
        self._w_sumsq: torch.Tensor | None = None
        self._local_parts: dict[int, torch.Tensor] = {}
        self.last_sums: torch.Tensor | None = None  # [rows, layers] full sums of the last step
        if full_state is not None:
            self.load_state_dict(full_state)

    # -- the exchange ------------------------------------------------------------------------

    @property
    def state(self):
        return self.shard_optimizer.state if self.shard_optimizer is not None else {}

    @property
    def in_flight(self) -> bool:
        return bool(self.handles) or bool(self.ready)

    def grad_ready(self, p: torch.Tensor, measure_noise: bool) -> None:
        """``p``'s gradient is final: make sure it sits in the flat buffer; when it completes its
        buffer, start that buffer's exchange."""
        i = self.layer_of[p]
        if i in self.ready:
            return
        view = self.grad_views[i]
        grad = p.grad
        if grad is None:
            view.zero_()
        elif grad is not view and (grad.is_sparse or grad.data_ptr() != view.data_ptr()):
            view.copy_(dense_grad(p, self.names[p], self.config.sparse_as_dense))
        p.grad = view
        self.ready.add(i)
        b = self.layout.layer_buffer[i]
        self.pending[b] -= 1
        if self.pending[b] == 0:
            self._start(b, measure_noise)

    def _start(self, b: int, measure_noise: bool) -> None:
        flat = self.flat_grads[b]
        if measure_noise:  # before an in-place allreduce overwrites the local gradient
            self._local_parts[b] = squared_norm([flat])
        compressed, ctx = self.config.compression.compress(flat)
        if self.exchange == "allreduce":
            handle = hvd.allreduce_async_(compressed, name=f"hvdlb.shard_grads.{b}",
                                          op=self.config.op, **self.config.scale_factors)
        else:
            handle = hvd.reducescatter_async(compressed, name=f"hvdlb.shard_grads.{b}",
                                             op=self.config.op, **self.config.scale_factors)
        self.handles[b] = (handle, ctx)

    def synchronize(self, measure_noise: bool) -> None:
        """Finish the exchange (starting what backward did not start); the segments' gradients
        then are the averaged gradient of this rank's shard. ``p.grad`` keeps the local
        (accumulated) gradient with ``exchange="reducescatter"`` and holds the averaged one with
        ``"allreduce"`` (without compression)."""
        for p in self.params:
            self.grad_ready(p, measure_noise)
        if self.shard_optimizer is not None:
            self._w_sumsq = self.shard_optimizer.compute_sumsq(weights=True, grads=False).w_sumsq
        for b, (handle, ctx) in sorted(self.handles.items()):
            shard = self.config.compression.decompress(hvd.synchronize(handle), ctx)
            if self.exchange == "allreduce":
                lo, hi = self.layout.buffers[b].shard_range(self.rank)
                shard = shard[lo:hi]
            for s, t in zip(self.segments, self.segment_params):
                if s.buffer == b:
                    t.grad = shard[s.shard_offset:s.shard_offset + s.numel]
        self.handles.clear()
        self.ready.clear()
        self.pending = [len(b.layers) for b in self.layout.buffers]

    def step(self, measure_noise: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Exact layer sums (one small allreduce), the shard's update, the allgather of weights."""
        shard_opt = self.shard_optimizer
        needs_dot = self.optimizer.needs_dot()
        rows = 3 if needs_dot else 2
        layers = len(self.params)
        partial = torch.zeros(rows, layers, dtype=torch.float32, device=self.device)
        if shard_opt is not None:
            for dst, src in zip(shard_opt.param_groups, self.optimizer.param_groups):
                dst.update(_hyper(src))
            w_sumsq = self._w_sumsq
            if w_sumsq is None:  # synchronize() did not run (skip_synchronize() without it)
                w_sumsq = shard_opt.compute_sumsq(weights=True, grads=False).w_sumsq
            sums = shard_opt.compute_sumsq(weights=False, grads=True)
            per_segment = [w_sumsq, sums.g_sumsq] + ([sums.wg_dot] if needs_dot else [])
            partial.index_add_(1, self.segment_layer, torch.stack(per_segment))
        self._w_sumsq = None
        local = None
        # (all buffers have their local norm unless measuring was turned on mid-step)
        if measure_noise and len(self._local_parts) == len(self.flat_grads):
            local = (torch.stack(list(self._local_parts.values())).sum()
                     * self.config.local_mean_factor ** 2)
        self._local_parts = {}
        message = partial.flatten()
        if local is not None:
            message = torch.cat([message, local.reshape(1)])
        total = hvd.allreduce(message, op=hvd.Sum, name="hvdlb.layer_sums")
        full = total[:rows * layers].view(rows, layers)
        self.last_sums = full
        if shard_opt is not None:
            mine = full.index_select(1, self.segment_layer)
            if self._skip_nonfinite():
                # one non-finite layer sum anywhere skips the step on every rank: 0 * inf = nan
                mine = mine + full.sum() * 0.0
            shard_opt.step_with_sumsq(mine[0], mine[1], mine[2] if needs_dot else None)
        elif getattr(self.optimizer, "loss_scale", None) is not None:
            # no shard here, but the loss scale must move as on every other rank
            self.optimizer.loss_scale.update(~torch.isfinite(full.sum()))
        handles = []
        for b, (flat, buf) in enumerate(zip(self.flat_params, self.layout.buffers)):
            lo, hi = buf.shard_range(self.rank)
            handles.append(hvd.allgather_async(flat[lo:hi], name=f"hvdlb.shard_params.{b}"))
        for flat, handle in zip(self.flat_params, handles):
            flat.copy_(hvd.synchronize(handle))
        if local is None:
            return None
        return total[-1] / self.config.size, full[1].sum()

    def zero_grad(self) -> None:
        """Zero the flat gradient buffers and point every ``p.grad`` back at its place in them."""
        for flat in self.flat_grads:
            flat.zero_()
        for p, view in zip(self.params, self.grad_views):
            p.grad = view

    # -- reporting ---------------------------------------------------------------------------

    def _skip_nonfinite(self) -> bool:
        return self.optimizer.param_groups[0].get("on_nonfinite", "skip") == "skip"

    def last_step_skipped(self) -> torch.Tensor:
        """0-dim bool: the last step met non-finite sums (on any rank) and was skipped."""
        if self.last_sums is None:
            raise RuntimeError("last_step_skipped: no step has been taken")
        return ~torch.isfinite(self.last_sums).all() & self._skip_nonfinite()

    def last_trust_ratios(self) -> torch.Tensor:
        """fp32, one entry per parameter of ``param_groups`` (flattened): the trust ratio of the
        last step, from the exact layer sums every rank holds (NaN for frozen parameters)."""
        if self.last_sums is None:
            raise RuntimeError("last_trust_ratios: no step has been taken")
        sums = self.last_sums
        out = torch.full((self.num_positions,), math.nan, dtype=torch.float32, device=self.device)
        for gi, group in enumerate(self.optimizer.param_groups):
            layers = [i for i, g in enumerate(self.layer_group) if g == gi]
            if not layers:
                continue
            index = torch.tensor(layers, dtype=torch.long, device=self.device)
            positions = torch.tensor([self.layer_position[i] for i in layers], device=self.device)
            out[positions] = reference.trust_ratio(
                sums[0][index], sums[1][index], sums[2][index] if sums.shape[0] == 3 else None,
                weight_decay=group["weight_decay"], trust_coefficient=group["trust_coefficient"],
                eps=group["eps"], lars=group["lars"], denominator=group["denominator"])
        return out

    # -- state -------------------------------------------------------------------------------

    def _public_groups(self) -> list[dict]:
        return self.optimizer.state_dict()["param_groups"]

    def state_dict(self) -> dict:
        """This rank's shard: the public ``param_groups``, an empty ``state`` (this rank holds no
        whole parameter's state), and ``shard``: rank, world size, layout, segments as ``[layer,
        offset in the layer, elements]`` and ``state``, keyed by segment index.

        With ``state`` empty, ``hvd.broadcast_optimizer_state`` finds nothing to broadcast (it
        would otherwise copy rank 0's shard over the others')."""
        state = self.shard_optimizer.state_dict()["state"] if self.shard_optimizer else {}
        return {"state": {}, "param_groups": self._public_groups(),
                "shard": {**self._shard_info(), "state": state}}

    def _shard_info(self) -> dict:
        return {"rank": self.rank, "world_size": self.config.size, "layout": self.layout.describe(),
                "segments": [[s.layer, s.offset, s.numel] for s in self.segments]}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a shard (from :meth:`state_dict` on the same rank and layout) or a full state in
        the wrapped optimizer's format (from :meth:`gathered_state_dict`, or a replicated run, of
        any world size): each rank keeps the slices of its segments."""
        saved_groups = state_dict["param_groups"]
        groups = self.optimizer.param_groups
        if len(saved_groups) != len(groups) or any(
                len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, groups)):
            raise ValueError("state_dict: its param_groups do not match the optimizer's (group "
                             "count or parameters per group)")
        if "shard" in state_dict:
            shard = state_dict["shard"]
            mine = self._shard_info()
            for key in ("world_size", "rank", "layout", "segments"):
                if shard.get(key) != mine[key]:
                    raise ValueError(
                        f"state_dict: a shard saved with {key}={shard.get(key)!r} cannot be "
                        f"loaded where {key}={mine[key]!r}; save gathered_state_dict() to change "
                        "world size or model")
            state = shard["state"]
        else:
            state = self._split_full_state(state_dict["state"])
        for group, saved in zip(groups, saved_groups):
            load_group_values(group, saved)  # device-held lr / momentum stay the same tensors
        if self.shard_optimizer is not None:
            current = self.shard_optimizer.state_dict()["param_groups"]
            for group, public in zip(current, groups):
                group.update(_hyper(public))
            self.shard_optimizer.load_state_dict({"state": state, "param_groups": current})

    def _split_full_state(self, full: dict) -> dict:
        state = {}
        for j, s in enumerate(self.segments):
            entry = full.get(self.layer_position[s.layer])
            if not entry:
                continue
            layer_numel = self.params[s.layer].numel()
            state[j] = {k: (v.reshape(-1)[s.offset:s.offset + s.numel].clone()
                            if isinstance(v, torch.Tensor) and v.numel() == layer_numel and v.dim()
                            else v) for k, v in entry.items()}
        return state

    def gathered_state_dict(self) -> dict:
        """The full state in the wrapped optimizer's ``state_dict`` format (as a replicated run
        would save it), on every rank. Collective: every rank must call it.

        Tensors shaped like their segment are per-element state (momentum buffers) and are
        reassembled with one allgather per (buffer, key); anything else (scalars) is taken as is.
        """
        local = self.shard_optimizer.state_dict()["state"] if self.shard_optimizer else {}
        dtypes, layers = {}, {}  # (buffer, key) -> dtype; layer -> {"tensors": [...], "other": {}}
        for j, entry in local.items():
            s = self.segments[j]
            info = layers.setdefault(s.layer, {"tensors": [], "other": {}})
            for k, v in entry.items():
                if isinstance(v, torch.Tensor) and v.shape == self.segment_params[j].shape:
                    dtypes[(s.buffer, k)] = v.dtype
                    if k not in info["tensors"]:
                        info["tensors"].append(k)
                else:
                    info["other"][k] = v
        everyone = hvd.allgather_object({"dtypes": dtypes, "layers": layers},
                                        name="hvdlb.gather_state.meta")
        all_dtypes, tensor_keys, state = {}, {}, {}
        for part in everyone:
            all_dtypes.update(part["dtypes"])
            for layer, info in part["layers"].items():
                state.setdefault(layer, {}).update(info["other"])
                keys = tensor_keys.setdefault(layer, [])
                keys.extend(k for k in info["tensors"] if k not in keys)
        for (b, k), dtype in sorted(all_dtypes.items(), key=lambda item: item[0]):
            buf = self.layout.buffers[b]
            flat = torch.zeros(buf.shard_size, dtype=dtype, device=self.device)
            for j, entry in local.items():
                s = self.segments[j]
                if s.buffer == b and k in entry:
                    flat[s.shard_offset:s.shard_offset + s.numel] = entry[k].reshape(-1)
            full = hvd.allgather(flat, name=f"hvdlb.gather_state.{b}.{k}")
            for layer, offset, numel in zip(buf.layers, buf.offsets, buf.numels):
                if k in tensor_keys.get(layer, ()):
                    shape = self.params[layer].shape
                    state[layer][k] = full[offset:offset + numel].view(shape).clone()
        return {"state": {self.layer_position[layer]: entry
                          for layer, entry in sorted(state.items())},
                "param_groups": self._public_groups()}


def _hyper(group: dict) -> dict:
    return {k: v for k, v in group.items() if k != "params"}
