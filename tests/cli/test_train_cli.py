"""``hvd-largebatch train`` on one process: bad input gets one ``error:`` line and no traceback;
a folder holding a checkpoint is not overwritten without ``--overwrite``."""
import os
import subprocess
import sys

import yaml

from hvd_largebatch.training.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from configs import small_digits_config
from launch import CLI, REPO


def train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *CLI, "train", *map(str, args)], capture_output=True,
                          text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})


def the_error(proc: subprocess.CompletedProcess) -> str:
    """The one line of a failed run (exit 2, no traceback, nothing else on stderr)."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hvd-largebatch train: error: "), proc.stderr
    return lines[0][len("hvd-largebatch train: error: "):]


def test_a_config_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    data = "model: {name: small_resnet}\n# r\u00e9glages\n".encode("latin-1")
    path.write_bytes(data)
    assert the_error(train(path)) == (f"config: {path} is not UTF-8 text (byte 0xe9 at offset "
                                      f"{data.index(0xe9)}); save it as UTF-8")


def test_an_output_dir_that_cannot_be_written(digits, tmp_path):
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "run"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(small_digits_config(digits, out)))
    assert the_error(train(cfg)) == (f"ConfigError: output.dir: {out}: cannot write there "
                                     f"(Not a directory)")


def test_yaml_flow_mapping_without_a_space_names_the_stray_key(digits, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(small_digits_config(digits, tmp_path / "out")))
    assert the_error(train(cfg, "--set", "schedule.decay={type:constant}")) == (
        "schedule.decay.type:constant: stray key 'type:constant': YAML reads 'type:constant' "
        "without a space after the colon as one key with no value; write 'type: constant'")


def test_a_folder_with_a_checkpoint_is_not_overwritten_without_overwrite(digits, tmp_path):
    out = tmp_path / "out"
    save_checkpoint({"written_by": "the earlier run"}, str(out / CHECKPOINT_NAME))
    (out / "metrics.csv").write_text("kind,updates\ntrain,1\n")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(small_digits_config(digits, out)))
    assert the_error(train(cfg)) == (
        f"ConfigError: output.dir: {out} holds {CHECKPOINT_NAME} of an earlier run: continue it "
        f"with --resume auto, start over (replacing its checkpoint and metrics) with "
        f"--overwrite, or choose another output.dir")
    assert load_checkpoint(str(out / CHECKPOINT_NAME)) == {
        "format": "hvd-largebatch-checkpoint", "version": 1, "written_by": "the earlier run"}
    assert (out / "metrics.csv").read_text() == "kind,updates\ntrain,1\n"
    proc = train(cfg, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert load_checkpoint(str(out / CHECKPOINT_NAME))["updates"] == 1438 // 64
    proc = train(cfg, "--overwrite", "--resume", "auto")
    assert proc.returncode == 2 and "not allowed with argument" in proc.stderr
