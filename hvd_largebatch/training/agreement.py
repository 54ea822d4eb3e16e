"""What every rank of a training job must agree on at setup, and the check that they do.

Ranks that run different configs, data or code do not fail by themselves: they wait in a
collective the others never start (a different ``train.log_every``), or run on with silently
different models (a different ``data.image_size`` or ``train.seed``). The trainer therefore
compares, before the first step, in two rounds (each one allgather of a SHA-256 digest per rank;
the full descriptions are gathered only when the digests differ):

1. right after the config is read (:func:`describe_config`): the package version and every key of
   the *resolved* config (defaults filled in), except :data:`EXEMPT_KEYS`;
2. after the data is indexed and the checkpoint read (:func:`describe_run`): per data set, its
   size, a fingerprint of its sample paths *relative to the data root* and of its labels (and
   class names), and the class count; and the point the run resumes from.

A difference raises the same ``DistributedMismatchError`` on every rank, naming the first differing key (in
the order above), rank 0's value, the lowest differing rank's value and every rank that differs
from rank 0.

Keys exempt from the string comparison (:data:`EXEMPT_KEYS`), because they may rightly differ
per node and cannot change what is computed:

* ``data.path``: the data root, which may be staged to node-local disks at another mount point;
  the data itself is compared through the index fingerprint (paths relative to the root, labels),
  so a different or incomplete copy is still caught;
* ``data.workers``, ``data.prefetch``: the loader's CPU threads and queue depth on this node (a
  node with fewer cores may use fewer); neither changes which samples are read, their order, or
  any collective.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

from hvd_largebatch.distributed.consistency import first_difference
from hvd_largebatch.errors import DistributedMismatchError
from hvd_largebatch.training.config import flatten

#: config keys not compared as values, and why (see the module docstring)
EXEMPT_KEYS = {
    "data.path": "node-local copies of the data may be mounted elsewhere; the data is compared "
                 "through the index fingerprint",
    "data.workers": "loader threads of this node",
    "data.prefetch": "loader queue depth of this node",
}


def package_version() -> str:
    """The installed ``hvd-largebatch`` version ("unknown" when it is not installed)."""
    from importlib import metadata

    try:
        return metadata.version("hvd-largebatch")
    except metadata.PackageNotFoundError:
        return "unknown"


def describe_config(config: dict) -> dict:
    """Round 1: the package version and every resolved config key but the exempt ones."""
    keys = {k: v for k, v in flatten(config).items() if k not in EXEMPT_KEYS}
    return {"hvd-largebatch version": package_version(), **keys}


def describe_data(name: str, size: int, fingerprint: str | None, num_classes: int) -> dict:
    """Round 2 entries of one data set (``fingerprint`` None for synthetic data)."""
    out = {f"{name} set size": size, f"{name} set class count": num_classes}
    if fingerprint is not None:
        out[f"{name} set fingerprint (paths relative to data.path, labels)"] = fingerprint
    return out


def digest(description: dict) -> str:
    return hashlib.sha256(json.dumps(description, default=repr).encode("utf-8")).hexdigest()


def check_agreement(hvd, description: dict, what: str) -> None:
    """Collective: ``DistributedMismatchError`` on every rank when any rank's ``description`` differs from
    rank 0's. One allgather of digests; a second one of the descriptions only on a mismatch."""
    if hvd.size() == 1:
        return
    digests = hvd.allgather_object(digest(description), name=f"hvdlb.agree.{what}")
    if len(set(digests)) == 1:
        return
    descriptions = hvd.allgather_object(description, name=f"hvdlb.agree.{what}.full")
    raise DistributedMismatchError(mismatch(descriptions, what))


def mismatch(descriptions: list[dict], what: str) -> str:
    """The message for gathered descriptions that differ (first key in rank 0's order)."""
    reference = descriptions[0]
    differing = [r for r, d in enumerate(descriptions) if r and digest(d) != digest(reference)]
    first = differing[0]
    other = descriptions[first]
    for key in list(reference) + [k for k in other if k not in reference]:
        mine, theirs = reference.get(key, "<absent>"), other.get(key, "<absent>")
        if first_difference(mine, theirs) is not None:
            break
    ranks = ", ".join(map(str, differing))
    return (f"ranks disagree on {key} ({what}): rank 0 has {_show(mine)}, rank {first} has "
            f"{_show(theirs)}; ranks that differ from rank 0: {ranks} of {len(descriptions)}. "
            f"Every rank must run the same config, data and package version")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."
