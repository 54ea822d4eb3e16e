"""What every rank of a distributed optimizer must agree on, and the first place two ranks differ.

:func:`describe_optimizer` turns a wrapped optimizer and its wrapper settings into plain Python
values (names, shapes, dtypes of the parameters; the optimizer class; every hyperparameter of every
group; the wrapper's mode). The wrapper gathers these descriptions from all ranks once, before the
first collective, and :func:`mismatch_message` names the first difference and the ranks that
disagree, so that a misconfigured job fails with a message instead of hanging in a collective whose
tensors differ in number or shape. Nothing here imports Horovod.
"""
from __future__ import annotations

import numbers
from typing import Any, Sequence

import torch

_ABSENT = "<absent>"


def _plain(value: Any) -> Any:
    """A comparable, printable form of a hyperparameter (tensors become numbers or lists)."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, str, numbers.Number)):
        return value
    return repr(value)


def describe_optimizer(optimizer: torch.optim.Optimizer, names: dict, settings: dict) -> dict:
    """The description ranks must agree on.

    ``names``: parameter -> name (from ``named_parameters``); ``settings``: the wrapper's own
    options (mode, op, compression, ...), plain values.
    """
    params, groups = [], []
    for gi, group in enumerate(optimizer.param_groups):
        groups.append({k: _plain(v) for k, v in group.items() if k != "params"})
        for p in group["params"]:
            params.append({"name": names.get(p), "shape": list(p.shape), "dtype": str(p.dtype),
                           "requires_grad": bool(p.requires_grad), "group": gi,
                           "device": p.device.type})
    cls = type(optimizer)
    return {"wrapper": dict(settings), "optimizer": f"{cls.__module__}.{cls.__qualname__}",
            "param_groups": groups, "params": params}


def first_difference(a: Any, b: Any, path: str = "") -> tuple[str, Any, Any] | None:
    """``(path, value in a, value in b)`` at the first place (depth first, in order) where two
    descriptions differ, or None. Missing dict keys and list items show as ``"<absent>"``."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            sub = f"{path}.{key}" if path else str(key)
            if key not in b or key not in a:
                return sub, a.get(key, _ABSENT), b.get(key, _ABSENT)
            found = first_difference(a[key], b[key], sub)
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        for i in range(max(len(a), len(b))):
            if i >= len(a) or i >= len(b):
                return (f"{path}[{i}]", a[i] if i < len(a) else _ABSENT,
                        b[i] if i < len(b) else _ABSENT)
            found = first_difference(a[i], b[i], f"{path}[{i}]")
            if found:
                return found
        return None
    if a != b and not (a != a and b != b):  # NaN == NaN for this purpose
        return path, a, b
    return None


def mismatch_message(descriptions: Sequence[dict]) -> str | None:
    """None when all ranks' descriptions equal rank 0's; otherwise a message naming the first
    difference (rank 0 against the lowest differing rank) and every rank that differs."""
    reference = descriptions[0]
    differing = [r for r, d in enumerate(descriptions) if r and first_difference(reference, d)]
    if not differing:
        return None
    first = differing[0]
    path, mine, theirs = first_difference(reference, descriptions[first])
    where = ""
    if path.startswith("params["):
        named = [v["name"] for v in (mine, theirs) if isinstance(v, dict) and "name" in v]
        index = int(path[len("params["):path.index("]")])
        if not named and index < len(reference["params"]):
            named = [reference["params"][index]["name"]]
        if named:
            where = f" (parameter {named[0]!r})"
    return (f"ranks disagree on {path}{where}: rank 0 has {mine!r}, rank {first} has {theirs!r}; "
            f"ranks that differ from rank 0: {differing}")
