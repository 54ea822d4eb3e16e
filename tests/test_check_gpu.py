"""`make check-gpu` on a machine without CUDA, and the pure helpers of scripts/check_gpu.py,
scripts/gpu_report.py, scripts/horovod_source.py and benchmarks/bench_gpu.py against values
computed by hand."""
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "scripts"), str(REPO / "benchmarks")]
import check_gpu  # noqa: E402
import gpu_report  # noqa: E402
import horovod_source  # noqa: E402
from bench_gpu import launches_per_step  # noqa: E402
from bench_lars import copy_floor_ms  # noqa: E402

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")


@no_cuda
def test_script_stops_with_one_line_naming_the_cpu_build(tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "scripts/check_gpu.py", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"check-gpu: no CUDA device: torch {torch.__version__} is a CPU build "
        "(torch.version.cuda is None)"]
    assert not out.exists()  # stopped before any work


@no_cuda
@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_target_needs_no_install_and_fails_the_same_way(tmp_path):
    proc = subprocess.run(["make", "--no-print-directory", "check-gpu", f"PYTHON={sys.executable}",
                           f"CHECK_GPU_ARGS=--out {tmp_path / 'r'}"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "check-gpu: no CUDA device: " in proc.stderr and "CPU build" in proc.stderr
    assert "install.sh" not in proc.stdout + proc.stderr


# -- arithmetic and targets -----------------------------------------------------------------------
def test_copy_floor():
    # ResNet-50: 25,557,032 values x 28 B = 715,596,896 B; at 3.0e12 B/s: 0.2385322987 ms
    assert copy_floor_ms(25_557_032, 28, 3.0e12) == pytest.approx(0.2385322987, rel=1e-9)
    assert copy_floor_ms(1_000_000, 24, 1.0e9) == pytest.approx(24.0)


def test_launches_per_step_counts_kernels_only():
    names = ["hvdlb_norms", "Memcpy HtoD (Pageable -> Device)", "hvdlb_finalize", "hvdlb_update",
             "Memset (Device)", "hvdlb_norms", "hvdlb_finalize", "hvdlb_update"]
    assert launches_per_step(names, 2) == 3.0


def figures(passed=40, failed=0, fused_ms=0.25, floor_ms=0.22, launches=3.0, loop_ms=6.0,
            ratio=0.94):
    return {"tests": {"passed": passed, "failed": failed, "errors": 0, "skipped": 2, "failing": []},
            "lars": {"ms": {"FusedLARS": fused_ms, "per-tensor loop": loop_ms},
                     "floor_ms": {"fused": floor_ms, "carry": 0.19},
                     "launches": {"FusedLARS": launches}},
            "training": {"ratio": ratio}}


def test_targets_evaluated_against_hand_computed_values():
    targets = {t["target"]: t for t in gpu_report.evaluate_targets(figures())}
    bandwidth = targets["FusedLARS.step >= 85% of copy bandwidth"]
    assert bandwidth["value"] == pytest.approx(0.88) and bandwidth["met"]  # 0.22 / 0.25
    assert targets["FusedLARS.step in <= 4 launches"]["met"]
    speedup = targets["FusedLARS >= 20x the per-tensor loop"]
    assert speedup["value"] == pytest.approx(24.0) and speedup["shown"] == "24.0x"  # 6.0 / 0.25
    training = targets["training step >= 0.95x the plain loop's images/s"]
    assert training["met"] is False and training["status"] == "MISSED"
    assert targets["every CUDA test passes"]["shown"] == "40 passed, 0 failed, 2 skipped"


@pytest.mark.parametrize("change,target", [
    ({"floor_ms": 0.2}, "FusedLARS.step >= 85% of copy bandwidth"),  # 0.2 / 0.25 = 80%
    ({"launches": 5.0}, "FusedLARS.step in <= 4 launches"),
    ({"loop_ms": 4.9}, "FusedLARS >= 20x the per-tensor loop"),  # 19.6x
    ({"failed": 1}, "every CUDA test passes"),
    ({"passed": 0}, "every CUDA test passes"),  # nothing ran: not a pass
])
def test_each_target_can_be_missed(change, target):
    targets = {t["target"]: t for t in gpu_report.evaluate_targets(figures(**change))}
    assert targets[target]["met"] is False


def test_missing_figures_are_not_measured_rather_than_met():
    targets = gpu_report.evaluate_targets({})
    assert len(targets) == 5 and all(t["met"] is None for t in targets)
    assert {t["status"] for t in targets} == {"not measured"}


def test_report_written_as_markdown_and_json_in_every_folder(tmp_path):
    report = {"machine": {"gpu": "NVIDIA H100 80GB HBM3", "driver": "580.159.04"},
              "steps": [{"name": "build", "status": "ok", "seconds": 12.34, "detail": "sm_90"},
                        {"name": "dali batch", "status": "skipped", "seconds": 0.0,
                         "detail": "DALI is not importable"}],
              "figures": figures(), "tables": {"LARS step": ["FusedLARS 0.250"]}}
    report["targets"] = gpu_report.evaluate_targets(report["figures"])
    paths = gpu_report.write_report(report, [tmp_path / "a", tmp_path / "b" / "c"])
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [
        "a/check-gpu.md", "a/check-gpu.json", "b/c/check-gpu.md", "b/c/check-gpu.json"]
    assert json.loads((tmp_path / "b/c/check-gpu.json").read_text()) == report
    md = (tmp_path / "a/check-gpu.md").read_text()
    assert "- gpu: NVIDIA H100 80GB HBM3" in md
    assert "| build | ok | 12.3 | sm_90 |" in md
    assert "| FusedLARS.step >= 85% of copy bandwidth | 88.0% | met |" in md
    assert "| training step >= 0.95x the plain loop's images/s | 0.940x | MISSED |" in md
    assert "```\nFusedLARS 0.250\n```" in md


def test_junit_counts(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest" tests="5">'
        '<testcase classname="tests.lars.test_cuda_ops" name="a"/>'
        '<testcase classname="tests.lars.test_cuda_ops" name="b"><failure message="x"/></testcase>'
        '<testcase classname="tests.lars.test_cuda_ops" name="c"><skipped message="y"/></testcase>'
        '<testcase classname="tests.data.test_dali_gpu_path" name="d"><error message="z"/></testcase>'
        '<testcase classname="tests.lars.test_cuda_ops" name="e"/>'
        '</testsuite></testsuites>')
    assert check_gpu.junit_counts(xml) == {
        "passed": 2, "failed": 1, "errors": 1, "skipped": 1,
        "failing": ["tests.lars.test_cuda_ops::b", "tests.data.test_dali_gpu_path::d"]}


def test_cuda_test_selection_includes_the_cuda_ops_tests():
    files = check_gpu.cuda_test_files()
    assert "tests/lars/test_cuda_ops.py" in files
    assert "tests/test_check_gpu.py" in files  # asks torch.cuda.is_available() too
    assert "tests/lars/test_ops.py" not in files


# -- the Horovod source fix -----------------------------------------------------------------------
def make_archive(path, files):
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"horovod-0.28.1/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_unpack_raises_the_cxx_standard_in_both_cmake_files(tmp_path):
    archive = make_archive(tmp_path / "h.tar.gz", {
        "CMakeLists.txt": "project(horovod CXX)\nset(CMAKE_CXX_STANDARD 14)\nset(X 14)\n",
        "horovod/torch/CMakeLists.txt": "if(A)\n    set(CMAKE_CXX_STANDARD 14)\nendif()\n"})
    src = horovod_source.unpack(archive, tmp_path / "work")
    assert src == tmp_path / "work" / "horovod-0.28.1"
    assert (src / "CMakeLists.txt").read_text() == (
        "project(horovod CXX)\nset(CMAKE_CXX_STANDARD 17)\nset(X 14)\n")
    assert (src / "horovod/torch/CMakeLists.txt").read_text() == (
        "if(A)\n    set(CMAKE_CXX_STANDARD 17)\nendif()\n")
    horovod_source.patch_cxx17(src)  # idempotent
    assert "STANDARD 17" in (src / "CMakeLists.txt").read_text()


def test_unpack_names_the_file_the_fix_does_not_apply_to(tmp_path):
    archive = make_archive(tmp_path / "h.tar.gz", {
        "CMakeLists.txt": "set(CMAKE_CXX_STANDARD 14)\n",
        "horovod/torch/CMakeLists.txt": "set(CMAKE_CXX_STANDARD 20)\n"})
    with pytest.raises(horovod_source.SourceError, match=r"torch/CMakeLists.txt: no 'set\("):
        horovod_source.unpack(archive, tmp_path / "work")
    (tmp_path / "bad.tar.gz").write_bytes(b"not a tarball")
    proc = subprocess.run([sys.executable, "scripts/horovod_source.py", str(tmp_path / "bad.tar.gz"),
                           str(tmp_path / "w2")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("horovod source: ") and "cannot unpack it" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
