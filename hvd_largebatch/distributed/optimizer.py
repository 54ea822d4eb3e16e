"""``DistributedOptimizer``: Horovod's wrapper, with exact LARS norms and the gradient noise scale.

A drop-in replacement for ``hvd.DistributedOptimizer`` (same arguments and methods:
``synchronize()``, ``skip_synchronize()``, ``set_backward_passes_per_step()``); swapping one for the
other is a one-line change in a Horovod script. It wraps a
:class:`~hvd_largebatch.lars.optimizer.FusedLARS` (any mode) or a plain torch optimizer (replicated mode),
is itself a ``torch.optim.Optimizer`` sharing the wrapped optimizer's ``param_groups`` (lr
schedulers and the trainer drive it), and does not re-create the wrapped optimizer (nothing kept
outside ``param_groups`` is lost, unlike Horovod's wrapper).

Why a wrapper of its own: LARS scales each layer's step by ``||w|| / ||g||`` where ``g`` must be
the gradient of the *global* batch. This wrapper takes the norms on the averaged gradient, exactly
and cheaply, in two modes:

* replicated (default, :class:`~hvd_largebatch.distributed.exchange.ReplicatedExchange`): allreduce per
  gradient, started from autograd hooks as Horovod does (tensor fusion, overlap with backward);
  ``||w||^2`` is computed while the exchange is in flight, ``||g||^2`` on the averaged gradients.
* sharded (``shard_optimizer_state=True``, :class:`~hvd_largebatch.distributed.sharded.ShardedExchange`):
  reduce-scatter of flat per-dtype buffers (or an allreduce of which each rank keeps its shard:
  ``sharded_exchange``; by default the allreduce for CPU tensors under Gloo, whose reduce-scatter
  is several times slower, and the reduce-scatter otherwise), each rank updates its shard with
  exact layer norms (one allreduce of a ``[2 or 3] x layers`` table of partial sums), then an
  allgather of weights. Optimizer memory per rank: 1 / world size. Parameters become views of the
  flat buffers (wrap after moving the model to its device; channels-last parameters become
  contiguous).

Units and conventions. ``op=hvd.Average`` expects each rank's loss to be the mean over its
samples; ``op=hvd.Sum`` expects each rank's loss to be the sum over its samples divided by the
*global* batch (as :mod:`hvd_largebatch.training.trainer` does). Either way the exchanged gradient is the mean
gradient of the global batch, and with ``backward_passes_per_step = k`` the k micro-batch
gradients are accumulated locally and exchanged once.

Gradient noise scale (:mod:`hvd_largebatch.distributed.noise_scale`): when the global batch is known
(``global_batch=`` or :meth:`DistributedOptimizer.set_global_batch`, in samples per update) and
there is more than one rank, each step also measures ``|G_b|^2`` of every rank's local mean
gradient (b = global batch / world size, all micro-batches) and ``|G_B|^2`` of the averaged one,
and folds them into EMAs; :meth:`DistributedOptimizer.noise_scale` is the simple noise scale
B_simple = tr(Sigma) / |G|^2 in samples. The local norm is taken before the exchange overwrites or
consumes each gradient (per tensor in replicated mode, per flat buffer in sharded mode) and is
averaged over ranks through a one-element allreduce started during the exchange (replicated) or one
extra element of the layer-sums allreduce (sharded). No host synchronization is added per step:
values stay tensors until :meth:`~DistributedOptimizer.noise_scale` is read.

``op=hvd.Adasum`` is refused: Adasum combines each rank's *update* computed from its *local*
gradient, so LARS would see local norms (horovod #2914) and no averaged gradient ever exists to
take exact norms of.

All ranks must agree on the parameters (names, shapes, dtypes) and the optimizer (class,
hyperparameters per group, wrapper settings); this is checked once at construction with one
``allgather_object`` and a disagreement raises
:class:`~hvd_largebatch.errors.DistributedMismatchError` on every rank, naming the first difference
and the ranks, instead of hanging in a collective.

Sharded-mode state: ``state_dict()`` is this rank's shard (under its ``"shard"`` key, with an
empty ``"state"``, so that ``hvd.broadcast_optimizer_state`` has nothing to send: ranks' shards
differ); ``gathered_state_dict()`` (collective) is the full state in the wrapped optimizer's own
format, for checkpoints, and ``load_state_dict`` takes either (a full state on any world size:
load the same one on every rank).
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager

import horovod.torch as hvd
import torch

from hvd_largebatch.distributed.consistency import describe_optimizer, mismatch_message
from hvd_largebatch.distributed.exchange import ExchangeConfig, ReplicatedExchange
from hvd_largebatch.distributed.noise_scale import NoiseScaleEstimator
from hvd_largebatch.distributed.sharded import ShardedExchange
from hvd_largebatch.errors import ConfigError, DistributedMismatchError

_OPS = {hvd.Average: "Average", hvd.Sum: "Sum", hvd.Adasum: "Adasum"}


class DistributedOptimizer(torch.optim.Optimizer):
    """Horovod data-parallel wrapper with allreduce-aware LARS norms (see the module docstring).

    Args (as ``hvd.DistributedOptimizer`` unless noted):
        optimizer: the optimizer to wrap (``FusedLARS``; any torch optimizer in replicated mode).
        named_parameters: ``model.named_parameters()``: names for Horovod and for error messages.
        compression: ``hvd.Compression.none`` or ``hvd.Compression.fp16``.
        backward_passes_per_step: micro-batches accumulated locally per exchange.
        op: ``hvd.Average`` or ``hvd.Sum`` (``hvd.Adasum`` is refused, see the module docstring).
        gradient_predivide_factor: with ``op=hvd.Average``, scale by ``1 / f`` before the sum and
            ``f / size`` after it.
        num_groups, groups: Horovod's explicit fusion groups; not supported (must stay 0 / None).
        sparse_as_dense: densify sparse gradients (otherwise a sparse gradient is an error).
        process_set: only the global process set is supported.
        shard_optimizer_state: (new) sharded mode; needs a ``FusedLARS``.
        sharded_exchange: (new) ``"reducescatter"``, ``"allreduce"`` or ``"auto"`` (default: the
            second for CPU tensors under Gloo, else the first; see :mod:`hvd_largebatch.distributed.sharded`).
        global_batch: (new) samples per update over all ranks; enables the noise-scale estimate.
        noise_scale_decay: (new) EMA factor of the noise-scale estimator per step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, named_parameters=None,
                 compression=hvd.Compression.none, backward_passes_per_step: int = 1,
                 op=hvd.Average, gradient_predivide_factor: float = 1.0, num_groups: int = 0,
                 groups=None, sparse_as_dense: bool = False,
                 process_set=hvd.global_process_set, shard_optimizer_state: bool = False,
                 sharded_exchange: str = "auto", global_batch: int | None = None,
                 noise_scale_decay: float = 0.99):
        _check_arguments(optimizer, backward_passes_per_step, op, gradient_predivide_factor,
                         num_groups, groups, process_set, shard_optimizer_state, sharded_exchange)
        names = _parameter_names(optimizer, named_parameters)
        self._noise = NoiseScaleEstimator(noise_scale_decay)
        self._global_batch = None
        self.set_global_batch(global_batch)
        size, rank = hvd.size(), hvd.rank()
        settings = {"shard_optimizer_state": bool(shard_optimizer_state),
                    "sharded_exchange": sharded_exchange, "op": _OPS[op],
                    "backward_passes_per_step": int(backward_passes_per_step),
                    "compression": getattr(compression, "__name__", type(compression).__name__),
                    "gradient_predivide_factor": float(gradient_predivide_factor),
                    "sparse_as_dense": bool(sparse_as_dense), "global_batch": global_batch}
        if size > 1:
            description = describe_optimizer(optimizer, names, settings)
            message = mismatch_message(hvd.allgather_object(description, name="hvdlb.agree"))
            if message:
                raise DistributedMismatchError(f"DistributedOptimizer: {message}")

        # torch.optim.Optimizer bookkeeping (hooks, profiling); param_groups and state are then
        # read through to the wrapped optimizer (properties below)
        super().__init__([dict(g) for g in optimizer.param_groups], optimizer.defaults)
        self.optimizer = optimizer
        self.shard_optimizer_state = bool(shard_optimizer_state)
        self.backward_passes_per_step = int(backward_passes_per_step)
        self.op = op
        config = ExchangeConfig(compression, op, float(gradient_predivide_factor),
                                bool(sparse_as_dense), size)
        self._names = names
        self._params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        if shard_optimizer_state:
            self._exchange = ShardedExchange(optimizer, names, config, rank, sharded_exchange)
        else:
            self._exchange = ReplicatedExchange(optimizer, names, self._params, config)
        self._delay = {p: self.backward_passes_per_step for p in self._params}
        self._synchronized = False
        self._should_synchronize = True
        self._hooks = [p.register_post_accumulate_grad_hook(self._grad_accumulated)
                       for p in self._params]

    # The wrapped optimizer owns groups and state; torch.optim.Optimizer.__init__ assigns its own
    # (placeholders) before the wrapped optimizer is attached. Reading through (rather than copying
    # references) survives load_state_dict, which replaces the lists and dicts.

    @property
    def param_groups(self) -> list[dict]:
        if "optimizer" in self.__dict__:
            return self.optimizer.param_groups
        return self.__dict__["_init_param_groups"]

    @param_groups.setter
    def param_groups(self, value) -> None:
        if "optimizer" in self.__dict__:
            self.optimizer.param_groups = value
        else:
            self.__dict__["_init_param_groups"] = value

    @property
    def defaults(self) -> dict:
        if "optimizer" in self.__dict__:
            return self.optimizer.defaults
        return self.__dict__["_init_defaults"]

    @defaults.setter
    def defaults(self, value) -> None:
        self.__dict__["_init_defaults"] = value

    @property
    def state(self):
        """Replicated: the wrapped optimizer's state. Sharded: the shard optimizer's state, keyed
        by segment tensors (momentum buffers of this rank's shard only)."""
        if "_exchange" in self.__dict__:
            return self._exchange.state
        return self.__dict__["_init_state"]

    @state.setter
    def state(self, value) -> None:
        self.__dict__["_init_state"] = value

    def add_param_group(self, param_group: dict) -> None:
        if "optimizer" not in self.__dict__:  # torch.optim.Optimizer.__init__ registering groups
            super().add_param_group(param_group)
            return
        raise NotImplementedError("DistributedOptimizer: add parameter groups to the optimizer "
                                  "before wrapping it (every rank must agree on them)")

    # -- Horovod's interface -------------------------------------------------------------------

    def set_backward_passes_per_step(self, passes: int) -> None:
        """Micro-batches per exchange from now on (call between steps)."""
        if isinstance(passes, bool) or not isinstance(passes, int) or passes <= 0:
            raise ConfigError("backward_passes_per_step", f"must be an int > 0 (got {passes!r})")
        if self._exchange.in_flight:
            raise RuntimeError("set_backward_passes_per_step() called while gradients are being "
                               "exchanged; call it between optimizer steps")
        self.backward_passes_per_step = passes
        for p in self._delay:
            self._delay[p] = passes

    def _grad_accumulated(self, p: torch.Tensor) -> None:
        if self._delay[p] <= 0:
            raise RuntimeError(
                f"the gradient of {self._names[p]!r} was computed more than "
                f"backward_passes_per_step={self.backward_passes_per_step} times before step(); "
                "raise backward_passes_per_step to accumulate gradients locally")
        self._delay[p] -= 1
        if self._delay[p] == 0:
            self._exchange.grad_ready(p, self._measure_noise)

    def synchronize(self) -> None:
        """Finish the gradient exchange (starting what backward did not start).

        Replicated mode: ``p.grad`` then holds the averaged gradient. Sharded mode: the shard
        optimizer holds the averaged gradient of this rank's shard; ``p.grad`` keeps the local
        accumulated gradient (``sharded_exchange="reducescatter"``) or holds the averaged one
        (``"allreduce"``, without compression).
        """
        self._exchange.synchronize(self._measure_noise)
        for p in self._delay:
            self._delay[p] = self.backward_passes_per_step
        self._synchronized = True

    @contextmanager
    def skip_synchronize(self):
        """Within this context ``step()`` does not synchronize (call ``synchronize()`` first)."""
        self._should_synchronize = False
        try:
            yield
        finally:
            self._should_synchronize = True

    @torch.no_grad()
    def step(self, closure=None):
        """Exchange (unless inside ``skip_synchronize()``), exact norms, update. The closure, if
        given, runs first (it usually calls backward); its loss is returned."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._should_synchronize:
            if self._synchronized:
                warnings.warn("optimizer.step() called after optimizer.synchronize() outside "
                              "optimizer.skip_synchronize(); the exchange runs only once")
            else:
                self.synchronize()
        loss_scale = getattr(self.optimizer, "loss_scale", None)
        # the step updates the loss scale: take 1 / S^2 of the gradients' scale before it
        unscale_sq = (loss_scale.scale.square().reciprocal()
                      if loss_scale is not None and self._measure_noise else None)
        measured = self._exchange.step(self._measure_noise)
        self._synchronized = False
        if measured is not None:
            if unscale_sq is not None:
                measured = [m * unscale_sq for m in measured]
            b = self._global_batch / hvd.size()
            self._noise.update(*measured, small_batch=b, large_batch=self._global_batch)
        return loss

    @torch.no_grad()
    def step_after_exchange(self, step_fn) -> None:
        """Replicated mode: finish the exchange, then call ``step_fn()`` in place of the exact-norm
        step, e.g. the replay of a CUDA graph of the wrapped optimizer's ``step()`` captured on
        these very ``p.grad`` tensors. After the allreduce every rank holds the same gradients and
        weights, so the wrapped optimizer's own norms are the exact ones. The noise scale is not
        measured (its collective cannot be part of the captured step)."""
        if self.shard_optimizer_state:
            raise ConfigError("shard_optimizer_state", "step_after_exchange needs replicated "
                              "optimizer state (the sharded step has collectives inside)")
        self._exchange.synchronize(measure_noise=False, weight_sums=False)
        for p in self._delay:
            self._delay[p] = self.backward_passes_per_step
        step_fn()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients. Sharded mode always zeroes in place (``p.grad`` are views of the
        flat gradient buffer), whatever ``set_to_none``."""
        if self._exchange.in_flight:
            raise RuntimeError("optimizer.zero_grad() was called after loss.backward() but before "
                               "optimizer.step() or optimizer.synchronize(): the gradients are "
                               "being exchanged")
        if self.shard_optimizer_state:
            self._exchange.zero_grad()
        else:
            self.optimizer.zero_grad(set_to_none=set_to_none)

    # -- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Replicated: the wrapped optimizer's state dict. Sharded: this rank's shard (see
        :meth:`ShardedExchange.state_dict <hvd_largebatch.distributed.sharded.ShardedExchange.state_dict>`);
        use :meth:`gathered_state_dict` for a checkpoint."""
        if self.shard_optimizer_state:
            return self._exchange.state_dict()
        return self.optimizer.state_dict()

    def gathered_state_dict(self) -> dict:
        """The full state in the wrapped optimizer's format on every rank (collective in sharded
        mode: every rank must call it); loadable by any world size and either mode."""
        if self.shard_optimizer_state:
            return self._exchange.gathered_state_dict()
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a full state (either mode) or, in sharded mode, this rank's own shard."""
        if self._exchange.in_flight:
            raise RuntimeError("load_state_dict() called while gradients are being exchanged")
        if self.shard_optimizer_state:
            self._exchange.load_state_dict(state_dict)
        else:
            self.optimizer.load_state_dict(state_dict)
        for p in self._delay:
            self._delay[p] = self.backward_passes_per_step

    # -- LARS reporting --------------------------------------------------------------------------

    def last_trust_ratios(self) -> torch.Tensor:
        """fp32, one per parameter of ``param_groups`` (flattened): the last step's trust ratios
        (needs a ``FusedLARS``). Same on every rank; no communication."""
        if self.shard_optimizer_state:
            return self._exchange.last_trust_ratios()
        return self._lars_report("last_trust_ratios")

    def last_step_skipped(self) -> torch.Tensor:
        """0-dim bool tensor: the last step met non-finite sums and was skipped (every rank)."""
        if self.shard_optimizer_state:
            return self._exchange.last_step_skipped()
        return self._lars_report("last_step_skipped")

    def _lars_report(self, name: str):
        method = getattr(self.optimizer, name, None)
        if method is None:
            raise TypeError(f"{name}() needs a FusedLARS; the wrapped optimizer is a "
                            f"{type(self.optimizer).__name__}")
        return method()

    # -- gradient noise scale ------------------------------------------------------------------

    def set_global_batch(self, global_batch: int | None) -> None:
        """Samples per update over all ranks (None: stop measuring the noise scale)."""
        if global_batch is not None and (isinstance(global_batch, bool)
                                         or not isinstance(global_batch, int) or global_batch <= 0):
            raise ConfigError("global_batch",
                              f"must be a positive int or None (got {global_batch!r})")
        self._global_batch = global_batch

    @property
    def _measure_noise(self) -> bool:
        return self._global_batch is not None and hvd.size() > 1

    def noise_scale(self) -> float | None:
        """The smoothed simple noise scale B_simple = tr(Sigma) / |G|^2, in samples (reads one
        value from the device); None until it can be estimated (see
        :meth:`hvd_largebatch.distributed.noise_scale.NoiseScaleEstimator.value`)."""
        return self._noise.value()

    def noise_scale_averages(self) -> torch.Tensor | None:
        """``[tr(Sigma), |G|^2]`` averages on the device (no synchronization); see
        :meth:`NoiseScaleEstimator.averages <hvd_largebatch.distributed.noise_scale.NoiseScaleEstimator.averages>`."""
        return self._noise.averages()

    def noise_scale_state_dict(self) -> dict:
        """The noise-scale estimator's averages (CPU tensors; same on every rank)."""
        return self._noise.state_dict()

    def load_noise_scale_state_dict(self, state: dict) -> None:
        """Continue the estimator from :meth:`noise_scale_state_dict`'s result."""
        device = next((p.device for g in self.param_groups for p in g["params"]), None)
        self._noise.load_state_dict(state, device)

    def noise_scale_stats(self) -> dict:
        """The estimator's tensors (no synchronization): ``noise_scale``, ``grad_sq`` (|G|^2),
        ``trace`` (tr Sigma, per sample), last step's ``local_sq`` / ``global_sq``, ``steps``."""
        return self._noise.stats()


def _check_arguments(optimizer, passes, op, predivide, num_groups, groups, process_set,
                     shard, sharded_exchange) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"DistributedOptimizer wraps a torch.optim.Optimizer, not "
                        f"{type(optimizer).__name__}")
    if isinstance(optimizer, DistributedOptimizer):
        raise TypeError("this optimizer is already a DistributedOptimizer")
    if isinstance(passes, bool) or not isinstance(passes, int) or passes <= 0:
        raise ConfigError("backward_passes_per_step", f"must be an int > 0 (got {passes!r})")
    if op == hvd.Adasum:
        raise ConfigError("op", "Adasum is not supported: it combines updates computed from each "
                          "rank's local gradient, so LARS would scale layers by local gradient "
                          "norms (horovod #2914); use hvd.Average or hvd.Sum")
    if op not in (hvd.Average, hvd.Sum):
        raise ConfigError("op", f"must be hvd.Average or hvd.Sum (got {op!r})")
    if predivide != 1.0 and op != hvd.Average:
        raise ConfigError("gradient_predivide_factor", "needs op=hvd.Average")
    if not predivide > 0:
        raise ConfigError("gradient_predivide_factor", f"must be > 0 (got {predivide!r})")
    if num_groups or groups is not None:
        raise ConfigError("groups", "explicit allreduce groups are not supported (Horovod's "
                          "tensor fusion already batches the gradients); leave groups unset")
    if process_set is not hvd.global_process_set:
        raise ConfigError("process_set", "only the global process set is supported")
    if sharded_exchange not in ("auto", "reducescatter", "allreduce"):
        raise ConfigError("sharded_exchange", f"must be 'auto', 'reducescatter' or 'allreduce' "
                          f"(got {sharded_exchange!r})")
    if shard and not hasattr(optimizer, "step_with_sumsq"):
        raise ConfigError("shard_optimizer_state",
                          f"needs a FusedLARS (an optimizer with compute_sumsq / step_with_sumsq), "
                          f"not {type(optimizer).__name__}")


def _parameter_names(optimizer: torch.optim.Optimizer, named_parameters) -> dict:
    """parameter -> unique name; unnamed optimizer parameters are an error, as in Horovod."""
    if named_parameters is None:
        return {p: f"param.{gi}.{j}" for gi, g in enumerate(optimizer.param_groups)
                for j, p in enumerate(g["params"])}
    pairs = list(named_parameters)
    if any(not (isinstance(x, tuple) and len(x) == 2) for x in pairs):
        raise ValueError("named_parameters must be (name, parameter) pairs, usually "
                         "model.named_parameters()")
    seen, names = set(), {}
    for name, p in pairs:
        if name in seen:
            raise ValueError(f"named_parameters: duplicate name {name!r}")
        seen.add(name)
        names.setdefault(p, name)
    unnamed = [f"param_groups[{gi}].params[{j}] (shape {tuple(p.shape)})"
               for gi, g in enumerate(optimizer.param_groups) for j, p in enumerate(g["params"])
               if p not in names]
    if unnamed:
        raise ValueError(f"named_parameters does not name every optimizer parameter: "
                         f"{', '.join(unnamed[:5])}")
    return names
