"""``make check-gpu``: everything issue 12 asks of a GPU machine, in one command, with one report.

Runs with the interpreter that has CUDA torch (``python3``; no venv, no downloads). Steps:

1. ``packages``: the Python packages the build and the tests need (setuptools, pybind11, numpy,
   pyyaml, pytest, hypothesis); Horovod, DALI and Pillow are optional;
2. ``build``: ``setup.py build_ext --inplace`` with ``HVD_LARGEBATCH_CUDA=1`` and
   ``HVD_LARGEBATCH_CUDA_ARCHS`` set to the present GPU's compute capability;
3. ``horovod build`` (started in the background, runs while the tests do): when the Horovod source
   release is at ``--horovod-archive`` (default ``third_party/horovod-0.28.1.tar.gz``, git-ignored;
   fetch it on a machine with network with ``pip download --no-deps --no-binary :all:
   horovod==0.28.1 -d third_party`` and carry it), unpack and patch it
   (``scripts/horovod_source.py``, the fix ``make install`` applies) and build it with NCCL for the
   present architecture only into a temporary folder;
4. ``tests``: every test file that asks ``torch.cuda.is_available()`` (tests/lars/test_cuda_ops.py
   and the like; those needing Horovod or DALI skip themselves);
5. ``benchmarks``: ``benchmarks/bench_gpu.py`` (LARS variants, copy floor, launches; ResNet-50
   training throughput), with Horovod on the path when step 3 built it;
6. ``horovod job``: a 1-rank job of ``DistributedOptimizer(FusedLARS)`` on CUDA tensors, checked
   against ``FusedLARS`` alone (one rank: the averaged gradient is the local one);
7. ``dali batch``: one batch of JPEGs through the GPU pipeline when DALI is importable;
8. the report (``check-gpu.md`` / ``check-gpu.json``, see scripts/gpu_report.py) in ``--out``
   (default ``$CHECK_GPU_OUT`` or build/check-gpu) and, when ``$OUT`` is set, there too.

Without a CUDA device it prints one line saying why (CPU build of torch, no driver, no visible
device) and exits 1 before doing anything. Exit status: 0 when no step failed and every target
was met, 1 otherwise.
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from gpu_report import evaluate_targets, write_report  # noqa: E402
from horovod_source import SourceError, unpack  # noqa: E402

REQUIRED = {"setuptools": "setuptools", "pybind11": "pybind11", "numpy": "numpy",
            "yaml": "pyyaml", "pytest": "pytest", "hypothesis": "hypothesis"}
OPTIONAL = {"horovod.torch": "horovod (step 3 builds it from the archive)",
            "nvidia.dali": "nvidia-dali-cuda130", "PIL": "pillow"}
BUILD_NEEDS = ("setuptools", "pybind11")
HOROVOD_ARCHIVE = ROOT / "third_party" / "horovod-0.28.1.tar.gz"


def cuda_problem() -> str | None:
    """Why this interpreter's torch cannot use a CUDA device, or None when it can."""
    try:
        import torch
    except ImportError as e:
        return f"{sys.executable} cannot import torch ({e})"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build (torch.version.cuda is None)"
    if torch.cuda.is_available():
        return None
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return (f"torch {torch.__version__} is built for CUDA {torch.version.cuda} but no NVIDIA "
                "driver is installed (libcuda.so.1 cannot be loaded)")
    return (f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no device with the driver "
            f"present (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")


def machine() -> dict:
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    smi = shutil.which("nvidia-smi")
    driver = "unknown (no nvidia-smi)"
    if smi:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True)
        driver = out.stdout.strip().splitlines()[0] if out.returncode == 0 else "unknown"
    nvcc = shutil.which("nvcc")
    nvcc_version = "none"
    if nvcc:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
        nvcc_version = next((ln.split("release", 1)[1].strip() for ln in out.splitlines()
                             if "release" in ln), "unknown")
    return {"gpu": torch.cuda.get_device_name(0), "compute capability": f"{major}.{minor}",
            "driver": driver, "torch": torch.__version__, "torch CUDA": torch.version.cuda,
            "nvcc": nvcc_version, "python": sys.version.split()[0], "cpu cores": os.cpu_count()}


class Steps:
    """Runs named steps, records status / seconds / detail, prints one line per step."""

    def __init__(self):
        self.records: list[dict] = []

    def run(self, name: str, fn) -> str:
        """``fn()`` returns (status, detail); an exception is a failure naming it."""
        t0 = time.perf_counter()
        try:
            status, detail = fn()
        except Exception as e:  # noqa: BLE001 - every failure goes into the report
            status, detail = "failed", f"{type(e).__name__}: {e}"
        record = {"name": name, "status": status, "seconds": time.perf_counter() - t0,
                  "detail": detail}
        self.records.append(record)
        print(f"[check-gpu] {name}: {status} ({record['seconds']:.1f} s) {detail}", flush=True)
        return status

    def skip(self, name: str, why: str) -> None:
        self.run(name, lambda: ("skipped", why))


def importable(module: str) -> bool:
    """True when ``module`` (dotted names too) can be found without importing it fully."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing(modules: dict) -> list[str]:
    """The pip names of the modules that cannot be found."""
    return [pip for module, pip in modules.items() if not importable(module)]


def _env(extra_paths: list[str] = (), **more) -> dict:
    env = dict(os.environ, **more)
    env["PYTHONPATH"] = os.pathsep.join([*extra_paths, str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _logged(cmd: list[str], log: Path, env: dict, timeout: float = 300.0) -> int:
    """Run ``cmd`` in the repository with its output in ``log``; its exit status (a command
    running past ``timeout`` seconds is killed and the step fails naming it)."""
    with open(log, "w") as f:
        return subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                              timeout=timeout).returncode


def _tail(log: Path, n: int = 3) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return " / ".join(lines[-n:])


# -- steps --------------------------------------------------------------------------------------
def build_extension(py: str, arch: str, logs: Path):
    log = logs / "build_ext.log"
    env = _env(HVD_LARGEBATCH_CUDA="1", HVD_LARGEBATCH_CUDA_ARCHS=arch)
    if _logged([py, "setup.py", "build_ext", "--inplace"], log, env) != 0:
        return "failed", f"setup.py build_ext failed: {_tail(log)} (log: {log})"
    code = "import json, hvd_largebatch as h; print(json.dumps(h.build_info()))"
    out = subprocess.run([py, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True)
    if out.returncode != 0:
        return "failed", f"the built package does not import: {out.stderr.strip()[-300:]}"
    info = json.loads(out.stdout.strip().splitlines()[-1])
    if not info.get("cuda"):
        return "failed", f"no CUDA module in the build: {info.get('cuda_status')}"
    return "ok", f"sm_{arch}; build_info: {info['cuda']}"


def cuda_test_files() -> list[str]:
    """Test files that ask torch.cuda.is_available(): the tests that can use a CUDA device."""
    files = sorted(glob.glob(str(ROOT / "tests" / "**" / "test_*.py"), recursive=True))
    return [os.path.relpath(f, ROOT) for f in files
            if "torch.cuda.is_available()" in Path(f).read_text()]


def junit_counts(path: Path) -> dict:
    """passed / failed / errors / skipped and the failing test ids of a pytest JUnit XML file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failing": []}
    for suite in suites:
        for case in suite.iter("testcase"):
            kinds = {child.tag for child in case}
            test_id = f"{case.get('classname')}::{case.get('name')}"
            if "failure" in kinds:
                counts["failed"] += 1
                counts["failing"].append(test_id)
            elif "error" in kinds:
                counts["errors"] += 1
                counts["failing"].append(test_id)
            elif "skipped" in kinds:
                counts["skipped"] += 1
            else:
                counts["passed"] += 1
    return counts


def run_tests(py: str, logs: Path, figures: dict):
    files = cuda_test_files()
    xml, log = logs / "tests.xml", logs / "tests.log"
    rc = _logged([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                  *files], log, _env())
    if not xml.exists():
        return "failed", f"pytest exited {rc} without a result: {_tail(log)} (log: {log})"
    counts = junit_counts(xml)
    figures["tests"] = counts
    detail = (f"{', '.join(files)}: {counts['passed']} passed, {counts['failed']} failed, "
              f"{counts['errors']} errors, {counts['skipped']} skipped")
    if counts["failing"]:
        detail += "; failing: " + ", ".join(counts["failing"][:10])
    return ("ok" if counts["failed"] + counts["errors"] == 0 and rc == 0 else "failed"), detail


def find_nccl() -> tuple[str, str] | None:
    """(include folder, library file) of NCCL: the nvidia-nccl wheel beside torch, else the
    system's."""
    roots = []
    spec = importlib.util.find_spec("nvidia")
    if spec and spec.submodule_search_locations:
        roots += list(spec.submodule_search_locations)
    for root in roots:
        headers = glob.glob(os.path.join(root, "**", "nccl.h"), recursive=True)
        libs = glob.glob(os.path.join(root, "**", "libnccl.so*"), recursive=True)
        if headers and libs:
            return os.path.dirname(headers[0]), sorted(libs)[0]
    for inc, lib in (("/usr/include", "/usr/lib/x86_64-linux-gnu/libnccl.so.2"),
                     ("/usr/local/cuda/include", "/usr/local/cuda/lib64/libnccl.so.2")):
        if os.path.exists(os.path.join(inc, "nccl.h")) and os.path.exists(lib):
            return inc, lib
    return None


class HorovodBuild:
    """Builds Horovod from the source archive in the background, into ``work/site``."""

    def __init__(self, py: str, archive: Path, arch: str, work: Path, logs: Path):
        self.site, self.log = work / "site", logs / "horovod-build.log"
        self.nccl_lib_dir = None
        src = unpack(archive, work)
        nccl = find_nccl()
        if nccl is None:
            raise SourceError("no NCCL found (nccl.h and libnccl.so in the nvidia-nccl wheel or "
                              "the system)")
        include, library = nccl
        # CMake's find_library wants libnccl.so; the wheel ships only libnccl.so.2
        link_dir = work / "nccl-lib"
        link_dir.mkdir()
        (link_dir / "libnccl.so").symlink_to(library)
        self.nccl_lib_dir = os.path.dirname(library)
        env = dict(os.environ, HOROVOD_GPU_OPERATIONS="NCCL", HOROVOD_WITH_PYTORCH="1",
                   HOROVOD_WITHOUT_MXNET="1", HOROVOD_WITHOUT_TENSORFLOW="1",
                   HOROVOD_BUILD_CUDA_CC_LIST=arch, HOROVOD_NCCL_INCLUDE=include,
                   HOROVOD_NCCL_LIB=str(link_dir), HOROVOD_NCCL_LINK="SHARED",
                   MAKEFLAGS=f"-j{os.cpu_count() or 4}")
        self._log_file = open(self.log, "w")
        self.proc = subprocess.Popen(
            [py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index",
             "--target", str(self.site), str(src)],
            cwd=work, env=env, stdout=self._log_file, stderr=subprocess.STDOUT)
        self.started = time.perf_counter()

    def wait(self, deadline_s: float):
        try:
            rc = self.proc.wait(timeout=max(1.0, deadline_s - (time.perf_counter() - self.started)))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return "failed", f"not finished within {deadline_s:.0f} s (log: {self.log})"
        finally:
            self._log_file.close()
        if rc != 0:
            return "failed", f"pip install of the patched source failed: {_tail(self.log)} (log: {self.log})"
        return "ok", f"built in {time.perf_counter() - self.started:.0f} s into {self.site}"

    def env_paths(self) -> tuple[list[str], dict]:
        ld = os.pathsep.join(filter(None, [self.nccl_lib_dir, os.environ.get("LD_LIBRARY_PATH")]))
        return [str(self.site)], {"LD_LIBRARY_PATH": ld}


def run_benchmarks(py: str, logs: Path, figures: dict, tables: dict, paths, extra_env):
    out, log = logs / "bench_gpu.json", logs / "bench_gpu.log"
    rc = _logged([py, "benchmarks/bench_gpu.py", "--json", str(out)], log,
                 _env(paths, **extra_env))
    print(log.read_text(errors="replace"), end="", flush=True)
    if rc != 0 or not out.exists():
        return "failed", f"bench_gpu.py exited {rc}: {_tail(log)} (log: {log})"
    res = json.loads(out.read_text())
    figures["lars"], figures["training"] = res["lars"], res["training"]
    tables.update({f"{name} (benchmarks/bench_gpu.py)": lines for name, lines in res["tables"].items()})
    return "ok", (f"FusedLARS {res['lars']['ms']['FusedLARS']:.3f} ms/step; training ratio "
                  f"{res['training']['ratio']:.3f}")


def horovod_job() -> str:
    """The 1-rank DistributedOptimizer(FusedLARS) check (runs in a child process)."""
    import horovod.torch as hvd
    import torch
    from torch import nn

    from hvd_largebatch import DistributedOptimizer, FusedLARS, param_groups

    hvd.init()
    torch.cuda.set_device(hvd.local_rank())

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                             nn.Linear(8 * 14 * 14, 10)).cuda()

    a, b = model(), model()
    dist = DistributedOptimizer(FusedLARS(param_groups(a, 1e-4), lr=0.5, trust_coefficient=0.02),
                                named_parameters=a.named_parameters())
    alone = FusedLARS(param_groups(b, 1e-4), lr=0.5, trust_coefficient=0.02)
    gen = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(3):
        x = torch.randn(16, 3, 16, 16, device="cuda", generator=gen)
        y = torch.randint(0, 10, (16,), device="cuda", generator=gen)
        for m, opt in ((a, dist), (b, alone)):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
    worst = max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters()))
    assert all(p.is_cuda for p in a.parameters())
    if worst > 1e-6:
        raise SystemExit(f"DistributedOptimizer(FusedLARS) on 1 rank differs from FusedLARS by {worst:.2e}")
    return f"size {hvd.size()}, 3 steps on {torch.cuda.get_device_name()}; max |diff| vs FusedLARS {worst:.1e}"


def dali_batch() -> str:
    """One batch of JPEGs through the GPU pipeline (runs in a child process)."""
    import numpy as np
    from PIL import Image

    from hvd_largebatch.data import DaliLoader, FileIndex, GlobalSampler, ImageTransform

    with tempfile.TemporaryDirectory() as tmp:
        for k in range(8):
            os.makedirs(os.path.join(tmp, f"c{k % 2}"), exist_ok=True)
            pixels = np.random.default_rng(k).integers(0, 255, (64 + 8 * k, 80, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(tmp, f"c{k % 2}", f"{k}.jpg"), quality=90)
        index = FileIndex.from_folder(tmp)
        sampler = GlobalSampler.for_validation(len(index), len(index), 1, 0)
        loader = DaliLoader(index, sampler, ImageTransform(crop_size=32, resize_shorter=40),
                            train=False, device_id=0)
        ((images, labels),) = list(loader.epoch(0))
        loader.close()
    if images.device.type != "cuda" or tuple(images.shape) != (8, 3, 32, 32):
        raise SystemExit(f"unexpected batch: {tuple(images.shape)} on {images.device}")
    return f"8 JPEGs -> {tuple(images.shape)} {images.dtype} on {images.device}"


def run_child(py: str, flag: str, logs: Path, paths=(), extra_env=None):
    log = logs / f"{flag.strip('-')}.log"
    rc = _logged([py, "scripts/check_gpu.py", flag], log, _env(paths, **(extra_env or {})))
    if rc != 0:
        return "failed", f"{_tail(log)} (log: {log})"
    return "ok", _tail(log, 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path,
                        default=Path(os.environ.get("CHECK_GPU_OUT", ROOT / "build" / "check-gpu")),
                        help="report folder (default $CHECK_GPU_OUT or build/check-gpu)")
    parser.add_argument("--horovod-archive", type=Path,
                        default=Path(os.environ.get("HOROVOD_ARCHIVE", HOROVOD_ARCHIVE)))
    parser.add_argument("--horovod-timeout", type=float, default=360.0,
                        help="seconds the Horovod build may take")
    parser.add_argument("--run-horovod-job", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run-dali-batch", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    problem = cuda_problem()
    if problem is not None:
        print(f"check-gpu: no CUDA device: {problem}", file=sys.stderr)
        return 1
    if args.run_horovod_job or args.run_dali_batch:
        print(horovod_job() if args.run_horovod_job else dali_batch())
        return 0
    import torch

    py = sys.executable
    arch = "%d%d" % torch.cuda.get_device_capability(0)
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine(), "steps": [], "figures": {}, "tables": {}}
    print("[check-gpu] " + ", ".join(f"{k} {v}" for k, v in report["machine"].items()), flush=True)
    steps, figures = Steps(), report["figures"]
    lacking = missing(REQUIRED)
    steps.run("packages", lambda: (
        "failed" if lacking else "ok",
        (f"missing: {', '.join(lacking)} (python3 -m pip install {' '.join(lacking)}; without "
         "network, carry their wheels)" if lacking else "all required present")
        + f"; optional missing: {', '.join(missing(OPTIONAL)) or 'none'}"))
    can_build = not any(REQUIRED[m] in lacking for m in BUILD_NEEDS)
    built = can_build and steps.run("build", lambda: build_extension(py, arch, logs)) == "ok"
    if not can_build:
        steps.skip("build", f"needs {', '.join(REQUIRED[m] for m in BUILD_NEEDS)}")

    hvd_build, work = None, Path(tempfile.mkdtemp(prefix="check-gpu-horovod-"))
    if not args.horovod_archive.exists():
        steps.skip("horovod build", f"no Horovod source at {args.horovod_archive} (fetch it with "
                   "`pip download --no-deps --no-binary :all: horovod==0.28.1 -d third_party` "
                   "on a machine with network and carry it)")
    elif not built:
        steps.skip("horovod build", "the extension did not build")
    else:
        def start():
            nonlocal hvd_build
            hvd_build = HorovodBuild(py, args.horovod_archive, arch, work, logs)
            return "ok", f"started in the background (log: {hvd_build.log})"
        steps.run("horovod build start", start)

    if not built:
        steps.skip("tests", "the extension did not build")
    elif "pytest" in lacking or "hypothesis" in lacking:
        steps.skip("tests", "needs pytest and hypothesis")
    else:
        steps.run("tests", lambda: run_tests(py, logs, figures))

    paths, extra_env = [], {}
    if hvd_build is not None:
        if steps.run("horovod build", lambda: hvd_build.wait(args.horovod_timeout)) == "ok":
            paths, extra_env = hvd_build.env_paths()
    if built:
        steps.run("benchmarks", lambda: run_benchmarks(py, logs, figures, report["tables"],
                                                       paths, extra_env))
    else:
        steps.skip("benchmarks", "the extension did not build")
    if paths:
        steps.run("horovod job", lambda: run_child(py, "--run-horovod-job", logs, paths, extra_env))
    else:
        steps.skip("horovod job", "Horovod was not built (see the horovod build step)")
    if built and importable("nvidia.dali"):
        steps.run("dali batch", lambda: run_child(py, "--run-dali-batch", logs))
    else:
        steps.skip("dali batch", "DALI is not importable" if built else "the extension did not build")
    shutil.rmtree(work, ignore_errors=True)

    report["steps"] = steps.records
    report["targets"] = evaluate_targets(figures)
    folders = [args.out] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])
    for path in write_report(report, folders):
        print(f"[check-gpu] wrote {path}")
    for t in report["targets"]:
        print(f"[check-gpu] target: {t['target']}: {t['shown']} -> {t['status']}")
    ok = all(s["status"] != "failed" for s in steps.records) and all(
        t["met"] for t in report["targets"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
