"""The native build and the installer's failure messages."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import hvd_largebatch
from hvd_largebatch import _C

REPO = Path(__file__).resolve().parents[2]


def test_build_info_reports_cpu_module():
    info = hvd_largebatch.build_info()
    cpu = info["cpu"]
    assert cpu["cpu_kernels"] is True
    assert cpu["cxx_standard"] >= 201703
    assert isinstance(cpu["openmp"], bool)
    assert cpu["compiler"] and cpu["compiler"] != "unknown"
    assert info["cpu"] == dict(_C.build_info())


@pytest.mark.skipif(shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists(),
                    reason="no nvcc on this machine, so no CUDA module was built")
def test_cuda_module_built_for_sm80_sm90_and_imports_without_gpu():
    info = hvd_largebatch.build_info()
    assert info["cuda"] is not None, info.get("cuda_status")
    assert {"sm_80", "sm_90"} <= set(info["cuda"]["archs"])
    assert info["cuda"]["cuda_runtime"] == "static"
    # the module imported on a machine that may have no driver: it reports instead of failing
    assert isinstance(info["cuda_devices"], int) and info["cuda_status"]


def test_import_does_not_load_cuda_or_horovod():
    code = ("import sys, hvd_largebatch; "
            "print(any(m.startswith(('horovod', 'hvd_largebatch._C_cuda')) for m in sys.modules))")
    out = subprocess.run([os.sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _installer_in(tmp_path: Path) -> Path:
    """A copy of the installer in an empty project root, so failures cannot touch the real venv."""
    (tmp_path / "scripts").mkdir()
    target = tmp_path / "scripts" / "install.sh"
    shutil.copy(REPO / "scripts" / "install.sh", target)
    return target


def _run_installer(tmp_path: Path, **env) -> subprocess.CompletedProcess:
    script = _installer_in(tmp_path)
    full_env = {**os.environ, "HVD_LARGEBATCH_CACHE": str(tmp_path / "cache"), **env}
    return subprocess.run(["bash", str(script)], capture_output=True, text=True, env=full_env,
                          timeout=60)


def test_installer_without_cxx_compiler_names_it_and_the_log(tmp_path):
    proc = _run_installer(tmp_path, CXX="/nonexistent/g++")
    assert proc.returncode != 0
    assert "no C++ compiler" in proc.stderr and "/nonexistent/g++" in proc.stderr
    assert "log: " + str(tmp_path / "cache" / "logs") in proc.stderr
    assert not (tmp_path / ".venv").exists()


def test_installer_without_nvcc_names_it_and_the_cpu_only_switch(tmp_path):
    proc = _run_installer(tmp_path, NVCC="/nonexistent/nvcc")
    assert proc.returncode != 0
    assert "nvcc not found" in proc.stderr and "HVD_LARGEBATCH_CUDA=0" in proc.stderr
    assert not (tmp_path / ".venv").exists()


def test_setup_rejects_bad_cuda_mode():
    proc = subprocess.run([os.sys.executable, "setup.py", "--name"], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "HVD_LARGEBATCH_CUDA": "maybe"})
    assert proc.returncode != 0
    assert "HVD_LARGEBATCH_CUDA must be auto, 0 or 1" in proc.stderr


def _setup_with(tmp_path: Path, nvcc_release: str, torch_cuda: str | None):
    """``setup.py --name`` with a stand-in nvcc of that release and a stand-in torch built for
    ``torch_cuda`` (None: a CPU build)."""
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {nvcc_release}, "
                    f"V{nvcc_release}.1'\n")
    nvcc.chmod(0o755)
    fake = tmp_path / "fake" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(f"__version__ = '9.9.9'\nclass version:\n"
                                      f"    cuda = {torch_cuda!r}\n")
    env = {**os.environ, "NVCC": str(nvcc), "HVD_LARGEBATCH_CUDA": "1",
           "PYTHONPATH": str(tmp_path / "fake")}
    return subprocess.run([os.sys.executable, "setup.py", "--name"], cwd=REPO,
                          capture_output=True, text=True, env=env)


def test_setup_stops_when_nvcc_is_not_torchs_cuda(tmp_path):
    proc = _setup_with(tmp_path, "13.0", "12.4")
    assert proc.returncode != 0
    assert ("is CUDA 13 but this PyTorch (9.9.9) was built for CUDA 12.4" in proc.stderr
            and "HVD_LARGEBATCH_CUDA=0" in proc.stderr), proc.stderr


@pytest.mark.parametrize("torch_cuda", ["13.1", None], ids=["same-major", "cpu-torch"])
def test_setup_accepts_nvcc_of_torchs_cuda_major(tmp_path, torch_cuda):
    proc = _setup_with(tmp_path, "13.0", torch_cuda)
    assert proc.returncode == 0 and proc.stdout.split()[-1] == "hvd-largebatch", proc.stderr
