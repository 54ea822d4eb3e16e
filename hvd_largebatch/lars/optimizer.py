"""FusedLARS: LARS (You et al. 2017) with Goyal et al.'s momentum correction, as a real optimizer.

:class:`FusedLARS` is a ``torch.optim.Optimizer``: every hyperparameter lives in ``param_groups``
(lr schedulers work; ``hvd.DistributedOptimizer``, which re-creates the optimizer by calling
``__init__(param_groups)``, loses nothing), state is ``state[p]["momentum_buffer"]`` (fp32), and
``state_dict`` / ``load_state_dict`` round-trip. It knows nothing of Horovod.

A step is two native calls over all tensors of all groups (CPU: OpenMP; CUDA: 3 kernel launches,
no host synchronization): a norm pass giving per-tensor ``||w||^2``, ``||g||^2`` (and ``<w, g>``
for the combined denominator), then the update pass (:mod:`hvd_largebatch.lars.ops` has the maths).

Group keys (all with defaults in ``__init__``): ``lr``, ``momentum``, ``weight_decay``,
``trust_coefficient``, ``eps``, ``nesterov``, ``momentum_correction``, ``lars`` (False: plain SGD
with momentum and weight decay for this group, e.g. BN and biases; see :func:`param_groups`),
``denominator`` ("separate" or "combined"), and two step-wide options that every group must share:
``on_nonfinite`` ("skip": a step that meets a non-finite gradient or weight changes nothing;
"propagate") and ``carry_weight_norms`` (see below).

Hook for distributed wrappers (the Horovod drivers of this package). ``step()`` is
``step_with_sumsq(*compute_sumsq())`` with the norms taken from the local tensors. A wrapper that
knows better norms splits it::

    sums = opt.compute_sumsq()            # LarsSums, fp32 [n] each, in opt.step_params() order
    ... add partial sums over ranks / shards into full-layer sums (they are additive) ...
    opt.step_with_sumsq(w_sumsq, g_sumsq, wg_dot)   # wg_dot only if opt.needs_dot()

``step_params()`` lists the tensors the update will touch: the params that have a ``.grad``, group
by group. Those may be whole layers or contiguous segments of layers (views into flat buffers,
with the segment's slice of the flat gradient as ``.grad``); in the sharded case pass each
segment its whole layer's sums. ``compute_sumsq(weights=..., grads=...)`` can also compute the
weight and gradient sums in separate passes (e.g. weights while the gradient allreduce is in
flight). Non-finite sums from any rank skip the step on every rank that receives them.

Device-held schedule: ``lr``, ``momentum``, ``weight_decay`` and ``trust_coefficient`` may be
0-dim fp32 tensors on the params' device instead of numbers. The kernels read them when they run,
so a training loop updates them in place (``group["lr"].fill_(lr)``: no host synchronization,
no re-packing of the groups), and a captured CUDA graph of ``step()`` replays with the current
values. Their values are not validated (that would synchronize); ``state_dict`` saves them and
``load_state_dict`` copies loaded values into the same tensors.

``carry_weight_norms=True``: the update pass also leaves the per-chunk ``||w||^2`` of the new
weights, so the next step's norm pass reads only the gradients (24 instead of 28 bytes per fp32
element moved). Valid only while the weights are not modified between steps; this is checked with
the weights' autograd version counters and addresses, which do not see writes that bypass them
(``p.data.copy_(...)``, Horovod's in-place collectives such as ``hvd.broadcast_parameters``,
native code). After such writes call
:meth:`FusedLARS.forget_weight_norms`. Off by default; ignored for groups using the combined
denominator (which read the weights anyway).
"""
from __future__ import annotations

from itertools import compress, repeat
from operator import attrgetter, is_

import torch
from torch import nn

from hvd_largebatch.errors import ConfigError
from hvd_largebatch.lars import ops
from hvd_largebatch.lars.loss_scale import DynamicLossScale
from hvd_largebatch.lars.ops import LarsHyper, LarsStepInfo, LarsSums, TensorTable

_grad = attrgetter("grad")
_HYPER_KEYS = LarsHyper._fields
_STEP_KEYS = ("on_nonfinite", "carry_weight_norms")


class FusedLARS(torch.optim.Optimizer):
    """LARS / SGD with momentum over native multi-tensor kernels (see the module docstring).

    Args (defaults for every group; each may be overridden per group):
        lr: learning rate (global, per update); a number or a 0-dim fp32 tensor on the params'
            device (so may momentum, weight_decay and trust_coefficient: see the module doc).
        momentum: m; 0 disables the buffers.
        weight_decay: beta, applied as ``g + beta w`` (also where LARS is off).
        trust_coefficient: eta (0.001 in You et al. 2017).
        eps: added to the trust-ratio denominator.
        nesterov: torch-style Nesterov momentum.
        momentum_correction: True: ``u <- m u + r d; w <- w - lr u`` (torch form; equivalent to
            Goyal et al.'s correction when lr changes). False: ``v <- m v + lr r d; w <- w - v``.
        lars: apply the trust ratio (False: ratio 1, i.e. SGD).
        denominator: "separate" ``||g|| + beta ||w|| + eps`` or "combined" ``||g + beta w|| + eps``.
        on_nonfinite: "skip" or "propagate".
        carry_weight_norms: reuse the update pass's ``||w||^2`` in the next norm pass.
        loss_scale: a :class:`~hvd_largebatch.lars.loss_scale.DynamicLossScale` when the
            gradients are loss-scaled (fp16): the step unscales them inside the kernels, skips
            on overflow and updates the scale (needs ``on_nonfinite="skip"``).
    """

    def __init__(self, params, lr=0.1, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001,
                 eps=0.0, nesterov=False, momentum_correction=True, lars=True,
                 denominator="separate", on_nonfinite="skip", carry_weight_norms=False,
                 loss_scale: DynamicLossScale | None = None):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, eps=eps, nesterov=nesterov,
                        momentum_correction=momentum_correction, lars=lars,
                        denominator=denominator, on_nonfinite=on_nonfinite,
                        carry_weight_norms=carry_weight_norms)
        _validate_group(defaults, "")
        if loss_scale is not None and not isinstance(loss_scale, DynamicLossScale):
            raise ConfigError("loss_scale", f"must be a DynamicLossScale (got {loss_scale!r})")
        #: the fp16 loss scale the gradients carry (None: unscaled gradients)
        self.loss_scale = loss_scale
        self._hyper_key = None
        self._layout = None
        self._binding: _Binding | None = None
        self._state_generation = 0
        self._last: LarsStepInfo | None = None
        self._last_binding: _Binding | None = None
        super().__init__(params, defaults)

    # -- groups ------------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        group = self.param_groups[index]
        _validate_group(group, f"param_groups[{index}].", _params_device([group]))
        for i, p in enumerate(group["params"]):
            if p.dtype not in ops.DTYPE_CODES:
                raise ConfigError(f"param_groups[{index}].params",
                                  f"param {i} has dtype {p.dtype}; FusedLARS supports fp32, "
                                  "fp16, bf16")
        self._hyper_key = None

    def _hypers(self):
        """The packed group array; re-validates the groups and the step-wide options (needs_dot,
        skip, carry, which groups have momentum) when any group value changed."""
        groups = self.param_groups
        key = (tuple(tuple(map(_key, (g[k] for k in _HYPER_KEYS + _STEP_KEYS))) for g in groups),
               id(self.loss_scale))
        if key != self._hyper_key:
            device = _params_device(groups)
            hypers = [_validate_group(g, f"param_groups[{i}].", device)
                      for i, g in enumerate(groups)]
            for k in _STEP_KEYS:
                values = {g[k] for g in groups}
                if len(values) > 1:
                    raise ConfigError(f"param_groups[*].{k}",
                                      "is a step-wide option; groups disagree "
                                      f"({sorted(map(str, values))})")
            if self.loss_scale is not None:
                if groups[0]["on_nonfinite"] != "skip":
                    raise ConfigError("on_nonfinite", 'must be "skip" with a loss scale (an '
                                      "overflow must skip the step and lower the scale)")
                _check_scale_device(self.loss_scale, _params_device(groups))
            self._packed = ops.pack_groups(
                hypers, None if self.loss_scale is None else self.loss_scale.scale)
            self._needs_dot = any(h.needs_dot for h in hypers)
            self._skip = groups[0]["on_nonfinite"] == "skip"
            self._carry = bool(groups[0]["carry_weight_norms"]) and not self._needs_dot
            self._momentum_on = tuple(h.has_momentum for h in hypers)
            self._device_values = [g[k] for g in groups for k in ops.DEVICE_HYPERS
                                   if isinstance(g[k], torch.Tensor)]  # kept alive: see pack
            self._hyper_key = key
        return self._packed

    def needs_dot(self) -> bool:
        """True when some group's trust ratio needs ``<w, g>`` (LARS, combined denominator)."""
        self._hypers()
        return self._needs_dot

    # -- binding the table to this step's tensors --------------------------------------------------

    def _bind(self) -> TensorTable | None:
        """The table over this step's params with grads (None if there are none), up to date."""
        self._hypers()
        groups = self.param_groups
        layout = tuple((id(g["params"]), len(g["params"])) for g in groups)
        if layout != self._layout:
            self._layout = layout
            self._flat = [p for g in groups for p in g["params"]]
            self._flat_group = [gi for gi, g in enumerate(groups) for _ in g["params"]]
            self._binding = None
        params, group_of = self._flat, self._flat_group
        grads = list(map(_grad, params))
        present = None
        if any(map(is_, grads, repeat(None))):
            present = tuple(g is not None for g in grads)
            if not any(present):
                return None
            params = list(compress(params, present))
            grads = list(compress(grads, present))
            group_of = list(compress(group_of, present))
        binding = self._binding
        if binding is None or binding.present != present:
            binding = self._binding = _Binding(present, TensorTable(params, grads, None, group_of),
                                               len(self._flat))
        else:
            try:
                binding.table.rebind(params, grads)
            except ops.LayoutChanged:  # a param was re-pointed to storage of another size
                binding.table = TensorTable(params, grads, None, group_of)
        table = binding.table
        buffers_key = (id(self.state), self._state_generation, self._momentum_on, id(table),
                       table.weights_generation)
        if binding.buffers_key != buffers_key:
            table.rebind(momentum_buffers=self._buffers(params, group_of))
            binding.buffers_key = buffers_key
        return table

    def _buffers(self, params, group_of) -> list[torch.Tensor | None]:
        buffers = []
        for p, gi in zip(params, group_of):
            if not self._momentum_on[gi]:
                buffers.append(None)
                continue
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = torch.zeros_like(
                    p, dtype=torch.float32, memory_format=torch.preserve_format)
            buffers.append(buf)
        return buffers

    # -- stepping ----------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """One LARS step over every param with a gradient; returns the closure's loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        table = self._bind()
        if table is None:
            return loss
        sums = table.sumsq(weights=True, grads=True, dot=self._needs_dot,
                           reuse_weight_sums=self._carry)
        self._apply(table, sums.w_sumsq, sums.g_sumsq, sums.wg_dot, sums.nonfinite)
        return loss

    @torch.no_grad()
    def compute_sumsq(self, *, weights: bool = True, grads: bool = True) -> LarsSums:
        """Per-tensor ``||w||^2``, ``||g||^2`` (and ``<w, g>`` when :meth:`needs_dot`), fp32
        ``[n]``, in :meth:`step_params` order, in one native pass. ``<w, g>`` comes with
        ``grads``."""
        table = self._bind()
        if table is None:
            raise RuntimeError("compute_sumsq: no param has a gradient")
        return table.sumsq(weights=weights, grads=grads, dot=grads and self._needs_dot,
                           reuse_weight_sums=self._carry)

    @torch.no_grad()
    def step_with_sumsq(self, w_sumsq: torch.Tensor, g_sumsq: torch.Tensor,
                        wg_dot: torch.Tensor | None = None) -> LarsStepInfo:
        """The update pass with caller-supplied sums (fp32 ``[n]``, :meth:`step_params` order).

        The sums are checked for non-finite values on the device (no host synchronization).
        """
        table = self._bind()
        if table is None:
            raise RuntimeError("step_with_sumsq: no param has a gradient")
        return self._apply(table, w_sumsq, g_sumsq, wg_dot, None)

    def _apply(self, table, w_sumsq, g_sumsq, wg_dot, nonfinite) -> LarsStepInfo:
        info = table.update_(w_sumsq, g_sumsq, wg_dot, self._packed, skip_nonfinite=self._skip,
                             nonfinite=nonfinite, carry_weight_sums=self._carry)
        if self.loss_scale is not None:  # halve after an overflow, grow after clean steps
            self.loss_scale.update(info.nonfinite)
        self._last = info
        self._last_binding = self._binding
        return info

    def step_params(self) -> list[torch.Tensor]:
        """The params the next update touches (those with a ``.grad``), in table order."""
        table = self._bind()
        return [] if table is None else table.weights

    def forget_weight_norms(self) -> None:
        """Forget the carried ``||w||^2`` (call after modifying weights behind autograd's back)."""
        if self._binding is not None:
            self._binding.table.forget_weight_sums()

    # -- reporting ---------------------------------------------------------------------------------

    def last_trust_ratios(self) -> torch.Tensor:
        """fp32 tensor with one entry per param of ``param_groups`` (flattened in order): the trust
        ratio of the last step; NaN for params that had no gradient. No synchronization."""
        if self._last is None:
            raise RuntimeError("last_trust_ratios: no step has been taken")
        ratios = self._last.trust_ratios
        binding = self._last_binding
        if binding.present is None:
            return ratios.clone()
        out = torch.full((binding.total,), float("nan"), dtype=torch.float32, device=ratios.device)
        out[binding.positions(ratios.device)] = ratios
        return out

    def last_step_skipped(self) -> torch.Tensor:
        """0-dim bool tensor: True when the last step met non-finite sums and was skipped."""
        if self._last is None:
            raise RuntimeError("last_step_skipped: no step has been taken")
        return self._last.skipped.reshape(())

    def table_uploads(self) -> int:
        """Host-to-device copies of the current tensor table so far (0 on the CPU, where the
        kernels read the host table). Constant in the steady state: steps whose gradients sit at
        addresses seen before reuse a copy (:class:`~hvd_largebatch.lars.ops.DeviceTables`)."""
        binding = self._binding
        if binding is None or binding.table.device_tables is None:
            return 0
        return binding.table.device_tables.uploads

    def last_step_info(self) -> LarsStepInfo | None:
        """The :class:`~hvd_largebatch.lars.ops.LarsStepInfo` of the last update (in table order)."""
        return self._last

    # -- state -------------------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict) -> None:
        """Load as ``torch.optim.Optimizer`` does, but keep momentum buffers fp32 in the params'
        memory layout (the base class would cast them to a bf16 / fp16 param's dtype). Group keys
        the saved groups lack take this optimizer's defaults, so a ``torch.optim.SGD`` state
        (whose ``momentum_buffer`` is the torch-form ``u``) continues as FusedLARS.

        Device-held hyperparameters stay the same tensor objects: the loaded values are copied
        into them (a captured CUDA graph keeps reading them); a loaded tensor value for a
        hyperparameter this optimizer holds as a number becomes a number."""
        previous = [{k: g[k] for k in ops.DEVICE_HYPERS} for g in self.param_groups]
        buffers, state = {}, {}
        for key, value in state_dict["state"].items():
            if isinstance(value, dict) and "momentum_buffer" in value:
                value = dict(value)
                buffers[key] = value.pop("momentum_buffer")
            state[key] = value
        super().load_state_dict({**state_dict, "state": state})
        for index, group in enumerate(self.param_groups):
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            loaded = {k: group[k] for k in ops.DEVICE_HYPERS}
            group.update(previous[index])
            load_group_values(group, loaded)
            _validate_group(group, f"param_groups[{index}].", _params_device([group]))
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        by_id = dict(zip(saved_ids, params))
        for key, buf in buffers.items():
            p = by_id.get(key)
            if p is None or buf is None:
                continue
            if tuple(buf.shape) != tuple(p.shape):
                raise ValueError(f"state_dict: momentum_buffer of param {key} has shape "
                                 f"{tuple(buf.shape)}, the param has {tuple(p.shape)}")
            self.state[p]["momentum_buffer"] = torch.empty_like(
                p, dtype=torch.float32, memory_format=torch.preserve_format).copy_(buf)
        self._state_generation += 1
        self._hyper_key = None


class _Binding:
    """The table of one set of params-with-grads and what was last bound into it."""

    def __init__(self, present: tuple[bool, ...] | None, table: TensorTable, total: int):
        self.present = present  # which params of the flattened groups have grads (None: all)
        self.table = table
        self.total = total
        self.buffers_key = None
        self._positions: dict[torch.device, torch.Tensor] = {}

    def positions(self, device: torch.device) -> torch.Tensor:
        """Indices of the table's params in the flattened groups, cached per device."""
        if device not in self._positions:
            index = [i for i, has in enumerate(self.present) if has]
            self._positions[device] = torch.tensor(index, device=device)
        return self._positions[device]


def load_group_values(group: dict, saved: dict) -> None:
    """``group.update(saved)`` (``params`` excepted), keeping device-held hyperparameters the same
    tensor objects: a saved value is copied into them (kernels, captured graphs and training loops
    keep reading them); a saved tensor for a hyperparameter the group holds as a number becomes a
    number."""
    for key, value in saved.items():
        if key == "params":
            continue
        current = group.get(key)
        if key in ops.DEVICE_HYPERS and isinstance(current, torch.Tensor):
            current.fill_(value)
        elif key in ops.DEVICE_HYPERS and isinstance(value, torch.Tensor):
            group[key] = value.item()
        else:
            group[key] = value


def _key(value):
    """A group value as a cache key: a tensor by identity and address (comparing tensors by value
    would synchronize with the device, and in-place updates must not re-pack the groups)."""
    return ("tensor", id(value), value.data_ptr()) if isinstance(value, torch.Tensor) else value


def _check_scale_device(loss_scale: DynamicLossScale, device: torch.device | None) -> None:
    if device is not None and loss_scale.scale.device != device:
        raise ConfigError("loss_scale", f"is on {loss_scale.scale.device} but the params are on "
                          f"{device}")


def _params_device(groups: list[dict]) -> torch.device | None:
    for g in groups:
        for p in g["params"]:
            return p.device
    return None


def _validate_group(group: dict, where: str, device: torch.device | None = None) -> LarsHyper:
    hyper = LarsHyper(**{k: group[k] for k in _HYPER_KEYS}).validated(where, device)
    if group["on_nonfinite"] not in ops.NONFINITE_POLICIES:
        raise ConfigError(where + "on_nonfinite",
                          f"must be one of {ops.NONFINITE_POLICIES} "
                          f"(got {group['on_nonfinite']!r})")
    if not isinstance(group["carry_weight_norms"], bool):
        raise ConfigError(where + "carry_weight_norms",
                          f"must be True or False (got {group['carry_weight_norms']!r})")
    return hyper


_NORM_MODULES = tuple(t for t in (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm,
                                  nn.LocalResponseNorm, getattr(nn, "RMSNorm", None)) if t)


def param_groups(model: nn.Module, weight_decay: float,
                 exclude_bn_and_bias: bool = True) -> list[dict]:
    """Parameter groups for FusedLARS: ``[{"params": ..., "weight_decay": weight_decay},
    {"params": ..., "weight_decay": 0.0, "lars": False}]``.

    With ``exclude_bn_and_bias`` (Goyal et al.: no weight decay on BN; You et al.'s later practice:
    no LARS on BN and biases), the second group takes the parameters of normalization layers,
    every parameter named ``bias``, and any other tensor with fewer than 2 dimensions; otherwise
    everything is in the first group. Frozen parameters (``requires_grad=False``) are left out,
    shared ones appear once; empty groups are omitted. Order follows ``model.modules()``, so it is
    the same on every rank.
    """
    if (isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float))
            or weight_decay < 0):
        raise ConfigError("weight_decay", f"must be a number >= 0 (got {weight_decay!r})")
    decayed, excluded, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            plain = exclude_bn_and_bias and (isinstance(module, _NORM_MODULES) or name == "bias"
                                             or p.dim() < 2)
            (excluded if plain else decayed).append(p)
    groups = []
    if decayed:
        groups.append({"params": decayed, "weight_decay": float(weight_decay)})
    if excluded:
        groups.append({"params": excluded, "weight_decay": 0.0, "lars": False})
    return groups
