"""Native multi-tensor LARS ops: sums of squares and the in-place fused update over tensor tables.

A *tensor table* (:class:`TensorTable`) describes a list of tensors to the native modules: for each
tensor its address, element count, dtype code, the addresses of its gradient and fp32 momentum
buffer, and the index of its hyperparameter group; after it, the tensors cut into chunks of at
most :data:`CHUNK` elements (per device type), the unit of parallel work. One native call then runs
over every chunk of every tensor, whatever their number and sizes: a LARS step is a norm pass and an
update pass (on CUDA: 3 kernel launches per step, 4 when the sums come from outside; no host
synchronization).

CPU and GPU: the norms are per-chunk fp32 partial sums (16 lanes on the CPU, a 256-thread block on
the GPU, so the two devices add in different orders) added per tensor in chunk order; the trust
ratio and the per-element update are the same ``csrc/lars_math.h`` functions on both (explicit fused
multiply-adds, IEEE division and square root, no flush-to-zero), so given the same sums the two
devices write the same bits, denormals included. Every NaN written (weights, momentum, trust
ratios, sums) is the canonical NaN: 0x7fffffff in fp32, 0x7fff in fp16 and bf16.

Functions (one native call each, tables built on the fly):

* :func:`sum_of_squares(tensors) <sum_of_squares>` -> fp32 ``[n]``: ``sum(t**2)`` per tensor.
* :func:`lars_sumsq(params, grads, dot=False) <lars_sumsq>` -> :class:`LarsSums`: ``||w||^2``,
  ``||g||^2`` (and ``<w, g>``) per tensor in one pass over both.
* :func:`lars_update_` applies the update in place, given the sums. Because the sums are inputs, a
  caller may first add partial sums over ranks or shards (they are additive; the combined
  denominator is ``||g + beta w||^2 = ||g||^2 + 2 beta <w, g> + beta^2 ||w||^2``), and may update
  contiguous *segments* of layers (views into flat buffers) with the full layer's sums.

:class:`TensorTable` keeps the table of a fixed list of tensors between calls and re-validates it
cheaply (addresses, dtypes, shapes, strides) when gradients are re-created every step; it is what
:class:`hvd_largebatch.lars.optimizer.FusedLARS` uses.

The maths (per tensor; lr, momentum m, weight decay beta, trust coefficient eta, eps):

* ``d = g + beta w``; trust ratio ``r = eta ||w|| / (||g|| + beta ||w|| + eps)`` (``denominator=
  "separate"``, You et al. 2017) or ``eta ||w|| / (||g + beta w|| + eps)`` (``"combined"``, as optax
  and SimCLR); ``r = 1`` without LARS (``lars=False``), when ``||w|| = 0`` or ``||g|| = 0``, and
  when the combined denominator is 0; ``r`` is NaN when a sum it reads is not finite (``||w||^2``,
  ``||g||^2``, and ``<w, g>`` for the combined denominator). Weight decay applies in every case.
* ``momentum_correction=True`` (torch form): ``u <- m u + r d; w <- w - lr u``.
  ``momentum_correction=False`` (paper / MLPerf form): ``v <- m v + lr r d; w <- w - v``. The two
  agree while lr is constant; when lr changes, the corrected form is Goyal et al.'s momentum
  correction (``v`` rescaled by ``lr_new / lr_old``). Nesterov: the step is ``r d + m u`` (resp.
  ``lr r d + m v``) instead of ``u`` (``v``).
* Momentum buffers are fp32 and start at zero, which makes the first step ``u = r d`` as in
  ``torch.optim.SGD``. Params may be fp32, fp16 or bf16, grads any of those (per tensor); all
  arithmetic is fp32 and the new weight is rounded to nearest even into the param's dtype.
* Non-finite sums (an inf or NaN in a gradient or weight, or an overflowing sum): with
  ``on_nonfinite="skip"`` (default) the whole call changes nothing (no weight, no buffer) and the
  returned ``nonfinite`` flag is set; ``"propagate"`` applies the update anyway. The decision is
  taken on the device from the sums: no host synchronization.

Devices: CPU tensors run in ``hvd_largebatch._C`` (OpenMP over ``torch.get_num_threads()``
threads), CUDA tensors in ``hvd_largebatch._C_cuda`` (imported on first use) on the tensors'
device and its current stream. The table goes to the GPU once per set of addresses
(:class:`DeviceTables`): steps that re-bind gradients at addresses seen before upload nothing.
Reductions are deterministic: per-chunk partial sums added in a fixed order (no atomics), so the
results do not depend on the number of threads. :mod:`hvd_largebatch.lars.reference` has the same
maths in plain PyTorch.
"""
from __future__ import annotations

import importlib
import math
import numbers
from collections import OrderedDict
from dataclasses import dataclass
from operator import attrgetter, is_
from typing import NamedTuple, Sequence

import numpy as np
import torch

from hvd_largebatch.errors import ConfigError

#: dtype codes of the native modules (csrc/lars_math.h: DType)
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
#: elements per chunk, the unit of parallel work: on CPU a few per thread's cache, on CUDA one
#: thread block's work (small, so a ResNet-50 step has several blocks per SM and a short tail)
CHUNK = {"cpu": 16384, "cuda": 4096}
#: the hyperparameters that may be held on the device (0-dim fp32 tensors read by the kernels)
DEVICE_HYPERS = ("lr", "momentum", "weight_decay", "trust_coefficient")
#: one hyperparameter group as the native modules read it (csrc/lars_math.h: LarsGroup); a
#: non-zero ``<name>_at`` is the address of a device-held value that replaces ``<name>``
GROUP_DTYPE = np.dtype([("lr", "<f4"), ("momentum", "<f4"), ("weight_decay", "<f4"),
                        ("trust_coefficient", "<f4"), ("eps", "<f4"), ("flags", "<i4"),
                        ("grad_scale_at", "<i8")]
                       + [(f"{name}_at", "<i8") for name in DEVICE_HYPERS])
FLAG_LARS, FLAG_NESTEROV, FLAG_MOMENTUM_CORRECTION, FLAG_COMBINED = 1, 2, 4, 8
NORM_W, NORM_G, NORM_WG, SUM_W = 1, 2, 4, 8
DENOMINATORS = ("separate", "combined")
NONFINITE_POLICIES = ("skip", "propagate")

_ROW = 8  # int64 columns of a tensor row (csrc/lars_math.h: TensorRow)
_COL_W, _COL_G, _COL_U, _COL_NUMEL, _COL_WDT, _COL_GDT, _COL_GROUP, _COL_CHUNK = range(_ROW)

_FP32_MAX = float(np.finfo(np.float32).max)
_data_ptr = torch.Tensor.data_ptr
_stride = torch.Tensor.stride
_get_device = torch.Tensor.get_device
_dtype = attrgetter("dtype")
_shape = attrgetter("shape")
_version = attrgetter("_version")


class LarsHyper(NamedTuple):
    """Hyperparameters of one group of tensors (see the module docstring for the maths).

    ``lr``, ``momentum``, ``weight_decay`` and ``trust_coefficient`` may each be a number or a
    0-dim fp32 tensor on the tensors' device, read by the kernels when they run (so a schedule can
    update it in place, with no host synchronization and under a captured CUDA graph). A tensor's
    value is not validated (that would synchronize); the caller keeps it finite and >= 0
    (``trust_coefficient`` > 0). A tensor ``momentum`` counts as non-zero (buffers are kept).
    """

    lr: float | torch.Tensor
    momentum: float | torch.Tensor = 0.9
    weight_decay: float | torch.Tensor = 0.0
    trust_coefficient: float | torch.Tensor = 0.001
    eps: float = 0.0
    nesterov: bool = False
    momentum_correction: bool = True
    lars: bool = True
    denominator: str = "separate"

    def validated(self, where: str = "", device: torch.device | None = None) -> "LarsHyper":
        """A normalized copy (floats, bools), or :class:`ConfigError` naming the bad field.

        ``where`` prefixes the key in the error, e.g. ``"param_groups[1]."``; ``device``: where
        tensor-held values must live (None: not checked).
        """
        values = self._asdict()
        for name in ("lr", "momentum", "weight_decay", "trust_coefficient", "eps"):
            value = values[name]
            if isinstance(value, torch.Tensor) and name in DEVICE_HYPERS:
                _check_device_hyper(where + name, value, device)
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                kind = ("a number or a 0-dim fp32 tensor" if name in DEVICE_HYPERS
                        else "a number")
                raise ConfigError(where + name, f"must be {kind} (got {value!r})")
            value = float(value)
            if not math.isfinite(value) or abs(value) > _FP32_MAX:
                raise ConfigError(where + name, f"must be finite in fp32 (got {value!r})")
            if value < 0:
                raise ConfigError(where + name, f"must be >= 0 (got {value!r})")
            values[name] = value
        eta = values["trust_coefficient"]
        if not isinstance(eta, torch.Tensor) and eta <= 0:
            raise ConfigError(where + "trust_coefficient",
                              f"must be > 0 (got {values['trust_coefficient']!r})")
        for name in ("nesterov", "momentum_correction", "lars"):
            if not isinstance(values[name], (bool, np.bool_)):
                raise ConfigError(where + name, f"must be True or False (got {values[name]!r})")
            values[name] = bool(values[name])
        if values["nesterov"] and not LarsHyper(**values).has_momentum:
            raise ConfigError(where + "nesterov", "Nesterov momentum needs momentum > 0")
        if values["denominator"] not in DENOMINATORS:
            raise ConfigError(where + "denominator",
                              f"must be one of {DENOMINATORS} (got {values['denominator']!r})")
        return LarsHyper(**values)

    @property
    def needs_dot(self) -> bool:
        """True when the trust ratio needs ``<w, g>`` (LARS with the combined denominator)."""
        return bool(self.lars) and self.denominator == "combined"

    @property
    def has_momentum(self) -> bool:
        """True unless momentum is the number 0 (a device-held momentum may become non-zero)."""
        return isinstance(self.momentum, torch.Tensor) or self.momentum != 0

    def flags(self) -> int:
        return ((FLAG_LARS if self.lars else 0) | (FLAG_NESTEROV if self.nesterov else 0)
                | (FLAG_MOMENTUM_CORRECTION if self.momentum_correction else 0)
                | (FLAG_COMBINED if self.denominator == "combined" else 0))


def _check_device_hyper(key: str, value: torch.Tensor, device: torch.device | None) -> None:
    if value.dtype != torch.float32 or value.dim() != 0:
        raise ConfigError(key, "a device-held value must be a 0-dim float32 tensor (got "
                          f"{tuple(value.shape)} {value.dtype})")
    if device is not None and value.device != device:
        raise ConfigError(key, f"is on {value.device} but the params are on {device}")


def pack_groups(hypers: Sequence[LarsHyper], grad_scale: torch.Tensor | None = None) -> np.ndarray:
    """The native group array (``GROUP_DTYPE``) of validated hyperparameters. A tensor-held value
    is passed by address (its slot holds NaN: the kernels read the tensor); the tensors must
    outlive every call that uses the array. ``grad_scale``: the loss scale S (0-dim fp32 on the
    tensors' device) when the gradients are scaled by it (fp16 loss scaling), else None."""
    out = np.zeros(len(hypers), dtype=GROUP_DTYPE)
    if grad_scale is not None:
        out["grad_scale_at"] = grad_scale.data_ptr()
    for i, h in enumerate(hypers):
        row = out[i]
        for name in DEVICE_HYPERS:
            value = getattr(h, name)
            if isinstance(value, torch.Tensor):
                row[name], row[f"{name}_at"] = math.nan, value.data_ptr()
            else:
                row[name] = value
        row["eps"], row["flags"] = h.eps, h.flags()
    return out


class LarsSums(NamedTuple):
    """Per-tensor sums (fp32 ``[n]`` each, in table order) and the non-finite flag of a norm pass.

    ``wg_dot`` (``<w, g>``) is None unless requested; ``w_sumsq`` / ``g_sumsq`` are None when the
    weights / grads were not summed. ``nonfinite``: int32 ``[1]``, 1 when a computed sum is not
    finite.
    """

    w_sumsq: torch.Tensor | None
    g_sumsq: torch.Tensor | None
    wg_dot: torch.Tensor | None
    nonfinite: torch.Tensor


@dataclass(frozen=True)
class LarsStepInfo:
    """What an update call did, as device tensors (reading them is the only synchronization).

    ``trust_ratios``: fp32 ``[n]``, the ratio applied to each tensor (1 where LARS is off or a
    norm is zero). ``nonfinite``: int32 ``[1]``, 1 when a sum was not finite. ``skip_nonfinite``:
    the policy in force, so :attr:`skipped` says whether the update was dropped.
    """

    trust_ratios: torch.Tensor
    nonfinite: torch.Tensor
    skip_nonfinite: bool

    @property
    def skipped(self) -> torch.Tensor:
        """bool ``[1]``: True when the update was not applied (non-finite sums, policy "skip")."""
        return self.nonfinite.bool() & self.skip_nonfinite


# ------------------------------------------------------------------------------------------------
# backends


class _CpuBackend:
    def __init__(self):
        from hvd_largebatch import _C

        self._C = _C

    def norms(self, *args):
        self._C.lars_norms(*args, torch.get_num_threads())

    def update(self, *args):
        self._C.lars_update(*args, torch.get_num_threads())


class _CudaBackend:
    """The CUDA entry points, called on the tensors' device and its current stream. The device is
    made current with torch's guard when another one is (the native side never switches: see
    csrc/cuda/kernels.cu); torch's guard creates no context on the device it restores."""

    def __init__(self, device: torch.device):
        try:
            self._C = importlib.import_module("hvd_largebatch._C_cuda")
        except ImportError as exc:
            raise RuntimeError(
                "hvd_largebatch was built without its CUDA kernels (hvd_largebatch._C_cuda is "
                f"missing: {exc}); rebuild with nvcc on PATH or HVD_LARGEBATCH_CUDA=1") from exc
        self._index = device.index if device.index is not None else torch.cuda.current_device()

    def _call(self, entry, args) -> None:
        if torch.cuda.current_device() == self._index:
            entry(self._index, torch.cuda.current_stream(self._index).cuda_stream, *args)
            return
        with torch.cuda.device(self._index):
            entry(self._index, torch.cuda.current_stream(self._index).cuda_stream, *args)

    def norms(self, *args):
        self._call(self._C.lars_norms, args)

    def update(self, *args):
        self._call(self._C.lars_update, args)


_CPU_BACKEND: _CpuBackend | None = None


def _backend(device: torch.device):
    global _CPU_BACKEND
    if device.type == "cpu":
        if _CPU_BACKEND is None:
            _CPU_BACKEND = _CpuBackend()
        return _CPU_BACKEND
    if device.type == "cuda":
        return _CudaBackend(device)
    raise TypeError(f"LARS ops run on CPU and CUDA tensors, not on {device.type}")


# ------------------------------------------------------------------------------------------------
# validation helpers


def _is_dense(t: torch.Tensor) -> bool:
    """True when the tensor's elements fill one block of memory without overlap (any dim order)."""
    if t.numel() == 0:
        return True
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and the same element order in memory (strides of size-1 dims do not matter)."""
    return a.shape == b.shape and all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape)
                                      if n != 1)


def _check_dense(kind: str, i: int, t, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{kind}[{i}] must be a tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{kind}[{i}] has layout {t.layout}; LARS ops need dense tensors")
    if t.dtype not in DTYPE_CODES:
        raise TypeError(f"{kind}[{i}] has dtype {t.dtype}; supported: fp32, fp16, bf16")
    if t.device != device:
        raise ValueError(f"{kind}[{i}] is on {t.device} but {kind}[0] is on {device}; "
                         "all tensors of one call must be on one device")
    if not _is_dense(t):
        raise ValueError(f"{kind}[{i}] is not dense (strides {tuple(t.stride())} for shape "
                         f"{tuple(t.shape)}); pass a contiguous tensor or view")


def _check_partner(kind: str, i: int, t, w: torch.Tensor, fp32_only: bool) -> None:
    _check_dense(kind, i, t, w.device)
    if fp32_only and t.dtype != torch.float32:
        raise TypeError(f"{kind}[{i}] has dtype {t.dtype}; momentum buffers must be fp32")
    if not _same_layout(t, w):
        raise ValueError(f"{kind}[{i}] has shape {tuple(t.shape)} / strides {tuple(t.stride())} "
                         f"but params[{i}] has {tuple(w.shape)} / {tuple(w.stride())}")


def _check_sums(name: str, t, n: int, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be an fp32 tensor of {n} sums, got {type(t).__name__}")
    if t.dtype != torch.float32 or t.numel() != n or t.device != device or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous fp32 tensor of {n} elements on {device} "
                         f"(got {t.dtype}, {t.numel()} elements, {t.device})")


# ------------------------------------------------------------------------------------------------
# the table


class DeviceTables:
    """Device copies of a tensor table, one per distinct content of its host rows (at most
    ``capacity``, the least recently used dropped first).

    Gradients are often re-created every step, at addresses seen before: after
    ``zero_grad(set_to_none=True)`` a caching allocator hands the same blocks back, and sharded
    optimizer state alternates between the local gradient and the reduced shard. Re-binding to
    such addresses finds its copy here and uploads nothing. A copy is never overwritten (a queued
    kernel may still read it). ``uploads`` counts the copies made.
    """

    def __init__(self, upload, capacity: int = 4):
        self._upload = upload  # host int64 array -> device tensor holding a copy
        self._capacity = capacity
        self._copies: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.uploads = 0

    def get(self, host: np.ndarray) -> torch.Tensor:
        key = host.tobytes()
        copy = self._copies.get(key)
        if copy is None:
            copy = self._copies[key] = self._upload(host)
            self.uploads += 1
            if len(self._copies) > self._capacity:
                self._copies.popitem(last=False)
        else:
            self._copies.move_to_end(key)
        return copy


def _upload_to(device: torch.device):
    def upload(host: np.ndarray) -> torch.Tensor:
        # pinned staging makes the copy asynchronous on the current stream
        return torch.from_numpy(host).pin_memory().to(device, non_blocking=True)
    return upload


class LayoutChanged(ValueError):
    """A tensor given to :meth:`TensorTable.rebind` no longer has the element count of its row."""


class TensorTable:
    """The native table of a fixed list of tensors, kept between calls.

    ``weights``: the tensors (params) summed and updated; ``grads``: None (sums of squares of the
    weights only) or one gradient per weight; ``momentum_buffers``: None or one fp32 tensor (or
    None) per weight; ``group_index``: the hyperparameter group of each tensor (default 0). Tensors must
    be dense (contiguous, channels-last, or any other dense order, with the same order for a
    weight, its grad and its buffer) and all on one device.

    :meth:`rebind` points the table at new gradient tensors (or moved weights) of the same shapes,
    re-checking only addresses, dtypes, shapes and strides; :meth:`sumsq` and :meth:`update_` run
    the native passes.
    """

    def __init__(self, weights: Sequence[torch.Tensor], grads: Sequence[torch.Tensor] | None = None,
                 momentum_buffers: Sequence[torch.Tensor | None] | None = None,
                 group_index: Sequence[int] | None = None):
        weights = list(weights)
        n = len(weights)
        if n == 0:
            raise ValueError("a tensor table needs at least one tensor")
        if not isinstance(weights[0], torch.Tensor):
            raise TypeError(f"params[0] must be a tensor, got {type(weights[0]).__name__}")
        for i, w in enumerate(weights):
            _check_dense("params", i, w, weights[0].device)
        self.device = weights[0].device
        self.n = n
        self._backend = _backend(self.device)
        self._has_grads = grads is not None
        chunk = CHUNK[self.device.type]
        numels = np.fromiter((w.numel() for w in weights), dtype=np.int64, count=n)
        chunks_per = np.maximum(1, -(-numels // chunk))
        self.nch = int(chunks_per.sum())
        self._host = np.zeros(_ROW * n + 3 * self.nch, dtype=np.int64)
        self._rows = self._host[:_ROW * n].reshape(n, _ROW)
        chunk_begin = np.concatenate(([0], np.cumsum(chunks_per)[:-1]))
        self._rows[:, _COL_NUMEL] = numels
        self._rows[:, _COL_CHUNK] = chunk_begin
        chunk_rows = self._host[_ROW * n:].reshape(self.nch, 3)
        tensor_of_chunk = np.repeat(np.arange(n, dtype=np.int64), chunks_per)
        starts = (np.arange(self.nch, dtype=np.int64) - chunk_begin[tensor_of_chunk]) * chunk
        chunk_rows[:, 0] = tensor_of_chunk
        chunk_rows[:, 1] = starts
        chunk_rows[:, 2] = np.minimum(chunk, numels[tensor_of_chunk] - starts)

        groups = np.zeros(n, dtype=np.int64) if group_index is None else np.asarray(
            group_index, dtype=np.int64)
        if groups.shape != (n,) or (groups < 0).any():
            raise ValueError(f"group_index must hold {n} non-negative ints")
        self._rows[:, _COL_GROUP] = groups
        self.num_groups = int(groups.max()) + 1

        #: bumped whenever the weights are re-validated (new objects, addresses or layouts)
        self.weights_generation = 0
        self._grads: list[torch.Tensor] = []
        self._set_weights(weights)
        if grads is not None:
            self._set_grads(list(grads))
        self._set_buffers(momentum_buffers)

        #: device copies of the table (None on the CPU, where the kernels read ``_host``)
        self.device_tables = None if self.device.type == "cpu" else DeviceTables(
            _upload_to(self.device))
        self._device_table: torch.Tensor | None = None
        f32 = dict(dtype=torch.float32, device=self.device)
        self._w_part = torch.zeros(self.nch, **f32)
        self._g_part = torch.zeros(2 * self.nch, **f32)
        # weight versions for which _w_part holds the per-chunk ||w||^2 (None: stale)
        self._w_part_versions: list[int] | None = None

    # -- binding ---------------------------------------------------------------------------------

    @property
    def weights(self) -> list[torch.Tensor]:
        return list(self._weights)

    def _set_weights(self, weights: list[torch.Tensor]) -> None:
        if len(weights) != self.n:
            raise ValueError(f"expected {self.n} params, got {len(weights)}")
        for i, w in enumerate(weights):
            _check_dense("params", i, w, self.device)
            if w.numel() != self._rows[i, _COL_NUMEL]:
                raise LayoutChanged(f"params[{i}] has {w.numel()} elements; the table was built "
                                    f"for {self._rows[i, _COL_NUMEL]}")
        self._weights = weights
        self._w_ptrs = list(map(_data_ptr, weights))
        self._w_shapes = list(map(_shape, weights))
        self._w_strides = list(map(_stride, weights))
        self._rows[:, _COL_W] = self._w_ptrs
        self._rows[:, _COL_WDT] = [DTYPE_CODES[w.dtype] for w in weights]
        self._dirty = True
        self._w_part_versions = None
        self.weights_generation += 1

    def _set_grads(self, grads: list[torch.Tensor]) -> None:
        if len(grads) != self.n:
            raise ValueError(f"expected {self.n} grads (one per param), got {len(grads)}")
        for i, (g, w) in enumerate(zip(grads, self._weights)):
            _check_partner("grads", i, g, w, fp32_only=False)
        self._grads = grads
        self._g_ptrs = list(map(_data_ptr, grads))
        self._g_meta = self._grad_meta(grads)
        self._rows[:, _COL_G] = self._g_ptrs
        self._rows[:, _COL_GDT] = [DTYPE_CODES[g.dtype] for g in grads]
        self._dirty = True
        self._has_grads = True

    def _set_buffers(self, buffers: Sequence[torch.Tensor | None] | None) -> None:
        buffers = [None] * self.n if buffers is None else list(buffers)
        if len(buffers) != self.n:
            raise ValueError(f"expected {self.n} momentum buffers (or None), got {len(buffers)}")
        for i, (u, w) in enumerate(zip(buffers, self._weights)):
            if u is not None:
                _check_partner("momentum_buffers", i, u, w, fp32_only=True)
        self._buffers = buffers
        self._rows[:, _COL_U] = [0 if u is None else u.data_ptr() for u in buffers]
        self._dirty = True
        groups = self._rows[:, _COL_GROUP]
        no_buffer = np.array([u is None for u in buffers])
        self._groups_missing_buffers = np.unique(groups[no_buffer])

    @staticmethod
    def _grad_meta(ts: list[torch.Tensor]) -> list:
        return list(zip(map(_dtype, ts), map(_shape, ts), map(_stride, ts), map(_get_device, ts)))

    def rebind(self, weights: Sequence[torch.Tensor] | None = None,
               grads: Sequence[torch.Tensor] | None = None,
               momentum_buffers: Sequence[torch.Tensor | None] | None = None) -> "TensorTable":
        """Point the table at these tensors (None: keep the current ones); returns self.

        Weights: the same objects at the same addresses with the same shapes and strides are
        accepted as they are; anything else is validated in full (and a changed element count
        raises :class:`LayoutChanged`). Grads: new tensors are accepted when dtype, shape,
        strides and device equal the previous grads'; otherwise validated in full. Buffers are
        always validated.
        """
        if weights is not None:
            weights = weights if isinstance(weights, list) else list(weights)
            if (len(weights) != self.n or not all(map(is_, weights, self._weights))
                    or list(map(_data_ptr, weights)) != self._w_ptrs
                    or list(map(_shape, weights)) != self._w_shapes
                    or list(map(_stride, weights)) != self._w_strides):
                self._set_weights(weights)
        if grads is not None:
            grads = grads if isinstance(grads, list) else list(grads)
            try:
                ptrs = list(map(_data_ptr, grads))
                same = len(grads) == self.n and (
                    (all(map(is_, grads, self._grads)) and ptrs == self._g_ptrs)
                    or self._grad_meta(grads) == self._g_meta)
            except RuntimeError:  # e.g. a sparse gradient has no data_ptr: say so below
                same = False
            if not same:
                self._set_grads(grads)
            elif ptrs != self._g_ptrs:
                self._grads, self._g_ptrs = grads, ptrs
                self._rows[:, _COL_G] = ptrs
                self._dirty = True
            else:
                self._grads = grads
        if momentum_buffers is not None:
            self._set_buffers(momentum_buffers)
        return self

    def _table_ptr(self) -> int:
        if self.device_tables is None:
            return self._host.ctypes.data
        if self._dirty or self._device_table is None:
            self._device_table = self.device_tables.get(self._host)
            self._dirty = False
        return self._device_table.data_ptr()

    # -- passes ------------------------------------------------------------------------------------

    def sumsq(self, *, weights: bool = True, grads: bool = True, dot: bool = False,
              reuse_weight_sums: bool = False) -> LarsSums:
        """One norm pass: per-tensor ``||w||^2``, ``||g||^2`` and ``<w, g>`` as requested.

        ``reuse_weight_sums``: take ``||w||^2`` from the per-chunk sums the last update with
        ``carry_weight_sums=True`` (or the last norm pass) left, when the weights' autograd version
        counters and addresses show they have not been modified since; otherwise recompute. The
        check cannot see writes that bypass version counters (``p.data.copy_()``, raw native
        writes): after such writes call :meth:`forget_weight_sums`.
        """
        if (grads or dot) and not self._has_grads:
            raise ValueError("this table has no grads: only sums of squares of the weights")
        if not (weights or grads or dot):
            raise ValueError("sumsq: nothing requested")
        mode = (NORM_G if grads else 0) | (NORM_WG if dot else 0)
        if weights:  # with dot the weights are read anyway: their fresh sums cost nothing
            reuse = reuse_weight_sums and not dot and self._weight_sums_current()
            mode |= SUM_W if reuse else NORM_W
        rows = iter(torch.empty(weights + grads + dot, self.n, dtype=torch.float32,
                                device=self.device))
        w_sq = next(rows) if weights else None
        g_sq = next(rows) if grads else None
        wg = next(rows) if dot else None
        flag = torch.empty(1, dtype=torch.int32, device=self.device)
        self._backend.norms(self._table_ptr(), self.n, self.nch, mode, self._w_part.data_ptr(),
                            self._g_part.data_ptr(), 0 if w_sq is None else w_sq.data_ptr(),
                            0 if g_sq is None else g_sq.data_ptr(),
                            0 if wg is None else wg.data_ptr(), flag.data_ptr())
        if mode & NORM_W:
            self._w_part_versions = list(map(_version, self._weights))
        return LarsSums(w_sq, g_sq, wg, flag)

    def _weight_sums_current(self) -> bool:
        return (self._w_part_versions is not None
                and list(map(_version, self._weights)) == self._w_part_versions)

    def forget_weight_sums(self) -> None:
        """Drop the carried per-chunk ``||w||^2``: the next norm pass re-reads the weights."""
        self._w_part_versions = None

    def update_(self, w_sumsq: torch.Tensor, g_sumsq: torch.Tensor, wg_dot: torch.Tensor | None,
                groups: np.ndarray, *, skip_nonfinite: bool = True,
                nonfinite: torch.Tensor | None = None,
                carry_weight_sums: bool = False) -> LarsStepInfo:
        """The update pass, in place, with the given per-tensor sums and group array.

        ``groups``: :func:`pack_groups` output, indexed by the table's ``group_index``.
        ``nonfinite``: the flag of the norm pass that produced these very sums, unmodified (saves
        a check on the device); by default the sums are checked here. ``carry_weight_sums``: also
        keep the per-chunk ``||w||^2`` of the weights as they leave the call, for the next
        :meth:`sumsq` with ``reuse_weight_sums``.
        """
        if not self._has_grads:
            raise ValueError("this table has no grads: it cannot run an update")
        if not isinstance(groups, np.ndarray) or groups.dtype != GROUP_DTYPE:
            raise TypeError("groups must come from ops.pack_groups")
        if len(groups) < self.num_groups:
            raise ValueError(f"the table uses {self.num_groups} groups; {len(groups)} given")
        has_momentum = (groups["momentum"] != 0) | (groups["momentum_at"] != 0)
        if self._groups_missing_buffers.size and has_momentum[self._groups_missing_buffers].any():
            momentum = groups["momentum"][self._rows[:, _COL_GROUP]]
            i = next(i for i, u in enumerate(self._buffers)
                     if u is None and has_momentum[self._rows[i, _COL_GROUP]])
            raise ValueError(f"params[{i}] has no momentum buffer but its group has momentum "
                             f"{momentum[i]:g}" + (" (device-held)" if np.isnan(momentum[i]) else ""))
        flags = groups["flags"]
        needs_dot = (((flags & FLAG_LARS) != 0) & ((flags & FLAG_COMBINED) != 0)).any()
        if wg_dot is None and needs_dot:
            raise ValueError('denominator="combined" needs the <w, g> sums (wg_dot)')
        _check_sums("w_sumsq", w_sumsq, self.n, self.device)
        _check_sums("g_sumsq", g_sumsq, self.n, self.device)
        if wg_dot is not None:
            _check_sums("wg_dot", wg_dot, self.n, self.device)
        check = nonfinite is None
        if check:
            nonfinite = torch.empty(1, dtype=torch.int32, device=self.device)
        ratios = torch.empty(self.n, dtype=torch.float32, device=self.device)
        self._backend.update(self._table_ptr(), self.n, self.nch, groups.ctypes.data, len(groups),
                             w_sumsq.data_ptr(), g_sumsq.data_ptr(),
                             0 if wg_dot is None else wg_dot.data_ptr(), ratios.data_ptr(),
                             nonfinite.data_ptr(), check, bool(skip_nonfinite),
                             self._w_part.data_ptr() if carry_weight_sums else 0)
        self._w_part_versions = list(map(_version, self._weights)) if carry_weight_sums else None
        return LarsStepInfo(ratios, nonfinite, bool(skip_nonfinite))


# ------------------------------------------------------------------------------------------------
# functions


def sum_of_squares(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """fp32 ``[len(tensors)]``: the sum of squares of each tensor, accumulated in fp32 (one call).

    Tensors may be fp32, fp16 or bf16, of any sizes (zero-size gives 0), dense, on one device.
    """
    tensors = list(tensors)
    if not tensors:
        return torch.zeros(0, dtype=torch.float32)
    return TensorTable(tensors).sumsq(weights=True, grads=False).w_sumsq


def lars_sumsq(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], *,
               dot: bool = False) -> LarsSums:
    """``||w||^2``, ``||g||^2`` and (``dot=True``) ``<w, g>`` per tensor, in one pass over both."""
    return TensorTable(params, grads).sumsq(weights=True, grads=True, dot=dot)


def _per_tensor(name: str, value, n: int) -> list:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        return [value] * n
    if len(value) != n:
        raise ConfigError(name, f"per-tensor values must number {n} (got {len(value)})")
    return list(value)


def lars_update_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                 momentum_buffers: Sequence[torch.Tensor | None] | None,
                 w_sumsq: torch.Tensor, g_sumsq: torch.Tensor, wg_dot: torch.Tensor | None = None,
                 *, lr, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001, eps=0.0,
                 nesterov=False, momentum_correction=True, lars=True, denominator="separate",
                 on_nonfinite: str = "skip", grad_scale: torch.Tensor | None = None) -> LarsStepInfo:
    """Apply the LARS (or, with ``lars=False``, SGD) update in place, in one native call.

    ``params`` / ``grads`` / ``momentum_buffers``: equal-length lists (buffers: fp32, zero before
    the first step, or None / all None when ``momentum`` is 0); any dense views, e.g. segments of
    a flat buffer. ``w_sumsq`` / ``g_sumsq`` / ``wg_dot``: fp32 ``[n]`` per-tensor ``||w||^2``,
    ``||g||^2``, ``<w, g>`` (``wg_dot`` only for ``denominator="combined"``), e.g. a whole layer's
    sums for each of its segments. Every hyperparameter is a number (or bool / str) for all tensors
    or a sequence with one value per tensor; ``lr``, ``momentum``, ``weight_decay`` and
    ``trust_coefficient`` may also be 0-dim fp32 tensors on the params' device (see
    :class:`LarsHyper`). ``grad_scale``: a 0-dim fp32 tensor S on the params' device when the
    grads (and so ``g_sumsq`` and ``wg_dot``) are S times the true ones (fp16 loss scaling): the
    update uses grad / S. Returns a :class:`LarsStepInfo`.
    """
    params = list(params)
    n = len(params)
    if n == 0:
        raise ValueError("lars_update_: no params")
    if on_nonfinite not in NONFINITE_POLICIES:
        raise ConfigError("on_nonfinite",
                          f"must be one of {NONFINITE_POLICIES} (got {on_nonfinite!r})")
    columns = [_per_tensor(name, value, n) for name, value in (
        ("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay),
        ("trust_coefficient", trust_coefficient), ("eps", eps), ("nesterov", nesterov),
        ("momentum_correction", momentum_correction), ("lars", lars), ("denominator", denominator))]
    index_of: dict[tuple, int] = {}
    hypers: list[LarsHyper] = []
    group_index = []
    for values in zip(*columns):
        if values not in index_of:
            index_of[values] = len(hypers)
            hypers.append(LarsHyper(*values).validated(device=params[0].device))
        group_index.append(index_of[values])
    if grad_scale is not None:
        _check_device_hyper("grad_scale", grad_scale, params[0].device)
    table = TensorTable(params, grads, momentum_buffers, group_index)
    return table.update_(w_sumsq, g_sumsq, wg_dot, pack_groups(hypers, grad_scale),
                         skip_nonfinite=on_nonfinite == "skip")
