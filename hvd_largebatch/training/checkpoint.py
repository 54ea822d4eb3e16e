"""Crash-safe training checkpoints: one file, replaced atomically, readable without pickle code.

``save_checkpoint`` writes the new checkpoint to a temporary file in the same folder, flushes
and fsyncs it, then ``os.replace``\\ s it over the old one and fsyncs the folder: a crash at any
moment leaves either the previous checkpoint or the new one, never a torn file (temporary files
of a crashed writer are removed by the next save). The file holds only tensors, numbers,
strings, lists and dicts, so ``load_checkpoint`` uses ``torch.load(weights_only=True)``.

Contents (written by ``hvd_largebatch.training.trainer``): ``format``/``version``, ``model_name``,
``model_options``, ``num_classes``, ``model`` (state dict), ``optimizer`` (full state, gathered
when sharded), ``epoch`` and ``step`` (the next iteration to run), ``updates`` (optimizer steps
so far), ``sampler`` (``GlobalSampler.state_dict()``), ``rng`` (every rank's torch generator
states), ``world_size``, ``config`` (the whole config) and ``schedule`` (its explicit form).
"""
from __future__ import annotations

import glob
import os
import tempfile

import torch

from hvd_largebatch.errors import ConfigError, DataError

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
