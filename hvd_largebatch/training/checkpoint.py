"""Crash-safe training checkpoints: one file, replaced atomically, readable without pickle code.

``save_checkpoint`` writes the new checkpoint to a temporary file in the same folder, flushes
and fsyncs it, then ``os.replace``\\ s it over the old one and fsyncs the folder: a crash at any
moment leaves either the previous checkpoint or the new one, never a torn file (temporary files
of a crashed writer are removed by the next save). The file holds only tensors, numbers,
strings, lists and dicts, so ``load_checkpoint`` uses ``torch.load(weights_only=True)``.

Contents (written by ``hvd_largebatch.training.trainer``): ``format``/``version``, ``model_name``,
``model_options``, ``num_classes``, ``model`` (state dict), ``optimizer`` (full state, gathered
when sharded), ``epoch`` and ``step`` (the next iteration to run), ``updates`` (optimizer steps
so far), ``skipped_steps`` (updates skipped for non-finite gradients so far), ``sampler``
(``GlobalSampler.state_dict()``), ``rng`` (every rank's torch generator states), ``world_size``,
``config`` (the whole config) and ``schedule`` (its explicit form). The trainer never writes
non-finite weights or BN statistics (it stops instead, keeping the previous file).

Also here: the checks of ``output.dir`` before a run (:func:`check_output_dir`: writable; a
checkpoint there is replaced only with ``--overwrite``) and of a resumed config against the
checkpoint's (:func:`resume_changes`).
"""
from __future__ import annotations

import glob
import os
import tempfile

import torch

from hvd_largebatch.errors import ConfigError, DataError
from hvd_largebatch.training.config import flatten

FORMAT = "hvd-largebatch-checkpoint"
VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"
_TMP_PREFIX = ".checkpoint-"
_TMP_SUFFIX = ".tmp"


def save_checkpoint(state: dict, path: str) -> None:
    """Write ``state`` (plus the format marker) to ``path`` atomically."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    for stale in glob.glob(os.path.join(directory, f"{_TMP_PREFIX}*{_TMP_SUFFIX}")):
        _remove(stale)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=_TMP_SUFFIX, dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 -> what open() would have given
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(directory)


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint on the CPU; DataError naming ``path`` if it is missing, unreadable or
    not an hvd-largebatch checkpoint."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{path}: checkpoint not found") from None
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing here
        raise DataError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DataError(f"{path}: not an hvd-largebatch checkpoint")
    if state.get("version") != VERSION:
        raise DataError(f"{path}: checkpoint version {state.get('version')}, this build reads {VERSION}")
    return state


def check_model_matches(state: dict, path: str, name: str, options: dict, num_classes: int) -> None:
    """ConfigError if the checkpoint holds another model than the config builds."""
    theirs = (state["model_name"], state["model_options"], state["num_classes"])
    ours = (name, dict(options), num_classes)
    if theirs[0] != ours[0]:
        raise ConfigError("model.name", f"{path} holds a {theirs[0]} model, this config trains "
                          f"{ours[0]}; resume with the config it was written with")
    if theirs[1] != ours[1]:
        raise ConfigError("model.options", f"{path} holds {theirs[0]} with options {theirs[1]}, "
                          f"this config has {ours[1]}")
    if theirs[2] != ours[2]:
        raise ConfigError("model.num_classes", f"{path} holds a model with {theirs[2]} classes, "
                          f"this config's has {ours[2]}")


def check_output_dir(output_dir: str, *, resuming: bool, overwrite: bool) -> None:
    """ConfigError naming ``output.dir`` when it cannot be created or written, or when it holds a
    checkpoint that a fresh start (not ``resuming``) would replace and ``overwrite`` is not set.
    Called on the rank that writes (rank 0) before any work."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as e:
        raise ConfigError("output.dir", f"{output_dir}: cannot write there "
                          f"({e.strerror or e})") from None
    if not resuming and not overwrite and os.path.exists(os.path.join(output_dir, CHECKPOINT_NAME)):
        raise ConfigError("output.dir", f"{output_dir} holds {CHECKPOINT_NAME} of an earlier run: "
                          f"continue it with --resume auto, start over (replacing its checkpoint "
                          f"and metrics) with --overwrite, or choose another output.dir")


#: config keys whose change makes a checkpoint's optimizer state wrong, and why
RESUME_REFUSED = {
    "optimizer.momentum_correction": "the momentum buffers hold u (true: w -= lr u) or v = lr u "
                                     "(false: w -= v); continuing in the other form would scale "
                                     "every step by lr or 1 / lr",
}
#: what a key absent from an older checkpoint's config meant
RESUME_DEFAULTS = {"optimizer.momentum_correction": True, "optimizer.denominator": "separate"}


def resume_changes(saved: dict, current: dict, path: str) -> list[str]:
    """One line per config key (dotted) whose value differs between the checkpoint's config
    ``saved`` and the ``current`` one (both ``Config.to_dict()`` forms), ``output.*`` aside
    (where and how results are written changes no update); ConfigError for a change in
    :data:`RESUME_REFUSED`. Everything else may change on resume (a new lr, optimizer, weight
    decay...): the run continues from the checkpoint's weights, momentum and data position with
    the new values, and the user is told which."""
    old, new = {**RESUME_DEFAULTS, **flatten(saved)}, flatten(current)
    lines = []
    for key in list(new) + [k for k in old if k not in new]:
        before, after = old.get(key, "<absent>"), new.get(key, "<absent>")
        if before == after or key.startswith("output."):
            continue
        if key in RESUME_REFUSED:
            raise ConfigError(key, f"{path} was written with {before!r}, this config has "
                              f"{after!r}: {RESUME_REFUSED[key]}; resume with {key}={before!r} "
                              f"or start over")
        lines.append(f"{key} = {after!r} (the checkpoint was written with {before!r})")
    return lines


def resolve_resume(resume: str | None, output_dir: str) -> str | None:
    """The checkpoint ``--resume`` names: ``auto`` is ``output_dir/checkpoint.pt`` if it exists
    (else None: start from scratch); a path must exist (DataError otherwise)."""
    if resume is None:
        return None
    if resume == "auto":
        path = os.path.join(output_dir, CHECKPOINT_NAME)
        return path if os.path.exists(path) else None
    if not os.path.isfile(resume):
        raise DataError(f"{resume}: --resume checkpoint not found")
    return resume


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
