"""Build hvd-largebatch and its native modules.

Two extension modules are built from ``csrc/``:

* ``hvd_largebatch._C``: C++17 CPU kernels (OpenMP when the compiler supports it). Always built.
* ``hvd_largebatch._C_cuda``: CUDA kernels, built when the CUDA toolkit is found. The CUDA runtime
  is linked statically (``libcudart_static.a``), so importing the module needs no GPU and no
  driver; the package imports it lazily, on the first CUDA tensor. IEEE arithmetic: no
  ``--use_fast_math`` (no flush-to-zero, IEEE-rounded division and square root), so that the GPU
  writes the same bits as the CPU kernels (csrc/lars_math.h).

The CUDA rule: the toolkit's major version must be the one PyTorch was built with
(``torch.version.cuda``), so that the extension loads wherever that PyTorch runs: a CUDA 13
runtime needs a driver >= 580, which a machine running a CUDA 12 PyTorch may not have. The build
stops with a message naming both versions otherwise. With a CPU-only PyTorch any toolkit is used.

Environment:

* ``HVD_LARGEBATCH_CUDA=auto|1|0`` (default ``auto``): build the CUDA module when nvcc is found /
  always (fail without nvcc) / never.
* ``HVD_LARGEBATCH_CUDA_ARCHS`` (default ``80;90``): SASS targets; PTX of the highest is embedded
  too, so newer GPUs JIT-compile it.
* ``HVD_LARGEBATCH_MARCH`` (default ``x86-64-v3``: AVX2 + FMA, any x86 server since 2013): the
  ``-march`` of the CPU kernels; ``native`` tunes for the build machine.
* ``NVCC``: the nvcc to use; ``CUDA_HOME``: the toolkit root (default: the directory above ``nvcc`` on PATH, or /usr/local/cuda).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = "csrc"
CXX_FLAGS = ["-O3", "-std=c++17", "-fvisibility=hidden"]


def _cuda_mode() -> str:
    mode = os.environ.get("HVD_LARGEBATCH_CUDA", "auto").strip().lower()
    if mode not in {"auto", "0", "1"}:
        sys.exit(f"HVD_LARGEBATCH_CUDA must be auto, 0 or 1 (got {mode!r})")
    return mode


def _find_nvcc() -> str | None:
    explicit = os.environ.get("NVCC")
    if explicit:
        if not Path(explicit).exists():
            sys.exit(f"NVCC={explicit} does not exist")
        return explicit
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.exists() else None


def _cuda_home(nvcc: str) -> Path:
    """Toolkit root: the one holding include/cuda_runtime.h (nvcc may be a symlink elsewhere)."""
    candidates = [os.environ.get("CUDA_HOME"), str(Path(os.path.realpath(nvcc)).parents[1]),
                  str(Path(nvcc).parents[1]), "/usr/local/cuda"]
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_runtime.h").exists():
            return Path(c)
    sys.exit(f"nvcc found at {nvcc} but no CUDA toolkit (include/cuda_runtime.h); set CUDA_HOME")


def _cuda_major(nvcc: str) -> int:
    """The toolkit's major version, from ``nvcc --version`` ("release 13.0, V13.0.48")."""
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"release (\d+)\.", out)
    if found is None:
        sys.exit(f"could not read the CUDA version from `{nvcc} --version`:\n{out}")
    return int(found.group(1))


def _check_cuda_matches_torch(nvcc: str) -> None:
    """Stop unless the toolkit's major version is PyTorch's (see the module docstring)."""
    try:
        import torch
    except ImportError:  # building without torch (an isolated build): nothing to match
        return
    if not torch.version.cuda:
        return
    torch_major, nvcc_major = int(torch.version.cuda.split(".")[0]), _cuda_major(nvcc)
    if torch_major != nvcc_major:
        sys.exit(f"nvcc at {nvcc} is CUDA {nvcc_major} but this PyTorch ({torch.__version__}) was "
                 f"built for CUDA {torch.version.cuda}: the extension would need a driver for CUDA "
                 f"{nvcc_major}. Point NVCC or CUDA_HOME at a CUDA {torch_major} toolkit, or build "
                 "without the CUDA kernels: HVD_LARGEBATCH_CUDA=0")


def _cuda_archs() -> list[str]:
    raw = os.environ.get("HVD_LARGEBATCH_CUDA_ARCHS", "80;90")
    archs = [a.strip() for a in raw.replace(",", ";").split(";") if a.strip()]
    if not archs or not all(a.isdigit() for a in archs):
        sys.exit(f"HVD_LARGEBATCH_CUDA_ARCHS must list compute capabilities like 80;90 (got {raw!r})")
    return archs


def _openmp_flag(compiler_cmd: list[str]) -> bool:
    """True when the C++ compiler accepts -fopenmp (probe-compile a tiny program)."""
    src = "#include <omp.h>\nint main(){return omp_get_max_threads() > 0 ? 0 : 1;}\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probe.cpp"
        path.write_text(src)
        cmd = [*compiler_cmd, "-fopenmp", str(path), "-o", str(Path(tmp) / "probe")]
        return subprocess.run(cmd, capture_output=True).returncode == 0


class BuildExt(build_ext):
    """build_ext that adds OpenMP when available and compiles ``.cu`` sources with nvcc."""

    def build_extensions(self):
        compiler_cmd = list(self.compiler.compiler_so[:1])
        use_omp = _openmp_flag(compiler_cmd)
        for ext in self.extensions:
            ext.define_macros.append(("HVD_LB_OPENMP", "1" if use_omp else "0"))
            ext.define_macros.append(("HVD_LB_COMPILER", f'"{self._compiler_version(compiler_cmd)}"'))
            if use_omp:
                ext.extra_compile_args.append("-fopenmp")
                ext.extra_link_args.append("-fopenmp")
        super().build_extensions()

    @staticmethod
    def _compiler_version(cmd: list[str]) -> str:
        out = subprocess.run([*cmd, "--version"], capture_output=True, text=True).stdout
        return (out.splitlines() or ["unknown"])[0].replace('"', "'")

    def build_extension(self, ext):
        cu_sources = [s for s in ext.sources if s.endswith(".cu")]
        if cu_sources:
            ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
            ext.depends = [*ext.depends, *cu_sources]  # a changed .cu re-links the module
            ext.extra_objects.extend(self._nvcc_compile(ext, cu_sources))
        super().build_extension(ext)

    def _nvcc_compile(self, ext, sources: list[str]) -> list[str]:
        nvcc = ext.nvcc
        archs = ext.cuda_archs
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
        includes = [f"-I{p}" for p in ext.include_dirs] + [f"-I{sysconfig.get_paths()['include']}"]
        defines = [f"-D{k}={v}" if v is not None else f"-D{k}" for k, v in ext.define_macros
                   if k != "HVD_LB_COMPILER"]
        out_dir = Path(self.build_temp) / "cuda"
        out_dir.mkdir(parents=True, exist_ok=True)
        objects = []
        for src in sources:
            obj = out_dir / (Path(src).stem + ".o")
            cmd = [nvcc, "-c", src, "-o", str(obj), "-O3", "-std=c++17",
                   "-Xcompiler", "-fPIC,-fvisibility=hidden", "-lineinfo", *gencode, *includes,
                   *defines]
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
            objects.append(str(obj))
        return objects


def _headers() -> list[str]:
    """Every header under csrc/: a change to one rebuilds both modules (build_ext only compares
    the sources' timestamps otherwise, and would keep a module built from the old maths)."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / CSRC).rglob("*.h"))


def _extensions() -> list[Pybind11Extension]:
    cpu = Pybind11Extension(
        "hvd_largebatch._C",
        sources=sorted(str(p.relative_to(ROOT)) for p in (ROOT / CSRC).glob("cpu/*.cpp")),
        depends=_headers(),
        include_dirs=[CSRC],
        extra_compile_args=[*CXX_FLAGS, *_march_flags()],
        cxx_std=17,
    )
    exts = [cpu]
    mode = _cuda_mode()
    nvcc = None if mode == "0" else _find_nvcc()
    if mode == "1" and nvcc is None:
        sys.exit("HVD_LARGEBATCH_CUDA=1 but nvcc was not found (set CUDA_HOME or PATH)")
    if nvcc:
        _check_cuda_matches_torch(nvcc)
        home = _cuda_home(nvcc)
        archs = _cuda_archs()
        cuda = Pybind11Extension(
            "hvd_largebatch._C_cuda",
            sources=sorted(str(p.relative_to(ROOT)) for p in (ROOT / CSRC).glob("cuda/*.c*")),
            depends=_headers(),
            include_dirs=[CSRC, str(home / "include")],
            library_dirs=[str(home / "lib64")],
            # the static runtime: no libcudart.so needed at import; libcuda is dlopen'ed on use
            libraries=["cudart_static", "dl", "rt", "pthread"],
            define_macros=[("HVD_LB_CUDA_ARCHS", '"' + ";".join(archs) + '"')],
            extra_compile_args=list(CXX_FLAGS),
            cxx_std=17,
        )
        cuda.nvcc = nvcc
        cuda.cuda_archs = archs
        exts.append(cuda)
    return exts


def _march_flags() -> list[str]:
    import platform

    default = "x86-64-v3" if platform.machine() in {"x86_64", "AMD64"} else ""
    march = os.environ.get("HVD_LARGEBATCH_MARCH", default).strip()
    return [f"-march={march}"] if march else []


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildExt})
