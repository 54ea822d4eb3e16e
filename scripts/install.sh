#!/usr/bin/env bash
# Installs everything hvd-largebatch needs into ./.venv, idempotently (`make install` runs this).
#
# Steps: prerequisites (C++ compiler, nvcc unless HVD_LARGEBATCH_CUDA=0, cmake) -> OpenMPI from
# Debian when mpirun is missing -> .venv with torch, mpi4py, pybind11, pytest, DALI -> Horovod 0.28.1
# built once from its source release with the C++17 fix and cached as a wheel outside the repo ->
# check that Horovod has PyTorch, Gloo and MPI -> the package itself in editable mode.
#
# The venv is marked complete (the stamp file) only after every step succeeded; a failed step
# prints what is missing and the log file, removes the stamp, and exits non-zero, so a later
# `make test` installs again instead of running against a half-built venv.
#
# Environment:
#   PYTHON                 interpreter for the venv (default python3; 3.10+)
#   TORCH_SPEC             pip requirement for torch (default torch==2.13.0; on a GPU cluster use
#                          the CUDA build you run, e.g. "torch==2.13.0" from the CUDA index)
#   DALI_SPEC              pip requirement for DALI (default: the build matching torch's CUDA major:
#                          nvidia-dali-cuda120 for CUDA 12, nvidia-dali-cuda130 for CUDA 13 or a CPU
#                          torch; with a CUDA torch also the NPP, nvJPEG and cuFFT wheels DALI loads)
#   HVD_LARGEBATCH_CUDA    auto|1|0: build the CUDA kernels (0 = CPU-only, no nvcc needed)
#   NVCC                   the nvcc to use (default: PATH, then $CUDA_HOME/bin, /usr/local/cuda/bin)
#   HVD_LARGEBATCH_CACHE   wheel / source / log cache (default ~/.cache/hvd-largebatch)
#   HOROVOD_GPU_OPERATIONS e.g. NCCL on a GPU cluster; part of the cached wheel's key
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$ROOT/.venv"
STAMP="$VENV/.hvd-largebatch-installed"
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
DALI_VERSION=2.4.0
HOROVOD_VERSION=0.28.1
CACHE=${HVD_LARGEBATCH_CACHE:-$HOME/.cache/hvd-largebatch}
LOGS="$CACHE/logs"
LOG="$LOGS/install-$(date +%Y%m%d-%H%M%S).log"
mkdir -p "$LOGS" "$CACHE/wheels" "$CACHE/src"
: >"$LOG"

STEP="starting"
say() { printf '[install] %s\n' "$*"; }
die() {
  printf '\n[install] ERROR: %s\n[install] log: %s\n' "$1" "${2:-$LOG}" >&2
  rm -f "$STAMP"
  exit 1
}
trap 'die "step \"$STEP\" failed (exit $?)"' ERR
# run a command with its output in the log; on failure show the log's tail and stop
logged() {
  if ! "$@" >>"$LOG" 2>&1; then
    tail -n 25 "$LOG" >&2
    die "step \"$STEP\" failed: $*"
  fi
}

rm -f "$STAMP"

STEP="prerequisites"
command -v "$PYTHON" >/dev/null || die "python interpreter '$PYTHON' not found (set PYTHON=...)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
  die "Python 3.10+ is required; $PYTHON is $("$PYTHON" -V 2>&1)"
CXX_BIN=${CXX:-g++}
command -v "$CXX_BIN" >/dev/null ||
  die "no C++ compiler: '$CXX_BIN' not found (apt-get install g++, or set CXX)"
echo 'int main(){return 0;}' | "$CXX_BIN" -std=c++17 -x c++ - -o /dev/null 2>>"$LOG" ||
  die "the C++ compiler '$CXX_BIN' cannot compile C++17"
case "${HVD_LARGEBATCH_CUDA:-auto}" in
  0) say "HVD_LARGEBATCH_CUDA=0: CPU kernels only" ;;
  *)
    if [ -n "${NVCC:-}" ]; then
      [ -x "$NVCC" ] || die "nvcc not found at NVCC=$NVCC (the CUDA toolkit); HVD_LARGEBATCH_CUDA=0 builds the CPU kernels only"
    else
      NVCC=$(command -v nvcc || true)
      if [ -z "$NVCC" ] && [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then
        NVCC="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
      fi
      [ -n "$NVCC" ] || die "nvcc (the CUDA toolkit) not found on PATH or in \$CUDA_HOME/bin: install it, set NVCC or CUDA_HOME; HVD_LARGEBATCH_CUDA=0 builds the CPU kernels only"
    fi
    export NVCC
    say "nvcc: $NVCC"
    ;;
esac

apt_install() {
  command -v apt-get >/dev/null || die "need Debian packages ($*) but apt-get is not available; install them by hand"
  [ "$(id -u)" = 0 ] || die "need Debian packages ($*): run as root or install them with sudo"
  say "apt-get install $*"
  logged apt-get update -qq
  DEBIAN_FRONTEND=noninteractive logged apt-get install -y -qq "$@"
}

STEP="OpenMPI"
if ! command -v mpirun >/dev/null || ! command -v mpicxx >/dev/null; then
  apt_install openmpi-bin libopenmpi-dev
fi
command -v mpirun >/dev/null || die "mpirun still missing after installing OpenMPI"
STEP="shellcheck"
command -v shellcheck >/dev/null || apt_install shellcheck

STEP="virtual environment"
[ -x "$VENV/bin/python" ] || logged "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

STEP="PyTorch"
say "PyTorch ($TORCH_SPEC)"
logged "${PIP[@]}" install "$TORCH_SPEC"
TORCH_CUDA=$("$VENV/bin/python" -c 'import torch; print((torch.version.cuda or "").split(".")[0])')

STEP="Python packages"
# DALI's CUDA build must match torch's CUDA major. A CUDA build of DALI loads NPP, nvJPEG and cuFFT
# from the NVIDIA wheels next to it (its RUNPATH names nvidia/{npp,nvjpeg,cufft}/lib and
# nvidia/cu13/lib); pip installs only those missing. A CPU torch keeps the CUDA 13 build alone,
# as DALI's CPU operators need none of them.
DALI_LIBS=()
if [ -z "${DALI_SPEC:-}" ]; then
  case "$TORCH_CUDA" in
    12) DALI_SPEC="nvidia-dali-cuda120==$DALI_VERSION"
        DALI_LIBS=(nvidia-npp-cu12 nvidia-nvjpeg-cu12 nvidia-cufft-cu12) ;;
    13) DALI_SPEC="nvidia-dali-cuda130==$DALI_VERSION"
        DALI_LIBS=("nvidia-npp>=13,<14" "nvidia-nvjpeg>=13,<14" "nvidia-cufft>=12,<13") ;;
    "") DALI_SPEC="nvidia-dali-cuda130==$DALI_VERSION" ;;
    *) die "torch is built for CUDA $TORCH_CUDA, DALI $DALI_VERSION only for CUDA 12 and 13: set DALI_SPEC" ;;
  esac
fi
say "Python packages (torch CUDA: ${TORCH_CUDA:-none}; DALI: $DALI_SPEC${DALI_LIBS[*]:+ with ${DALI_LIBS[*]}})"
logged "${PIP[@]}" install "$TORCH_SPEC" numpy pyyaml psutil cloudpickle packaging \
  "setuptools>=64" wheel "pybind11>=2.12" mpi4py pytest pytest-timeout hypothesis \
  "$DALI_SPEC" "${DALI_LIBS[@]}" scikit-learn matplotlib tensorboard pillow tqdm

STEP="Horovod"
TORCH_VERSION=$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')
PY_TAG=$("$VENV/bin/python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
HVD_FLAGS="gpu=${HOROVOD_GPU_OPERATIONS:-none}"
KEY="horovod-$HOROVOD_VERSION-$PY_TAG-torch-$TORCH_VERSION-$HVD_FLAGS"
WHEEL_DIR="$CACHE/wheels/$KEY"
have_horovod() {
  "$VENV/bin/python" - <<EOF 2>>"$LOG"
import importlib.metadata as md, sys
try:
    ok = md.version("horovod") == "$HOROVOD_VERSION"
    import horovod.torch  # noqa: F401  (fails when built against another torch)
except Exception:
    ok = False
marker = "$VENV/.horovod-key"
try:
    ok = ok and open(marker).read().strip() == "$KEY"
except OSError:
    ok = False
sys.exit(0 if ok else 1)
EOF
}
if have_horovod; then
  say "Horovod $HOROVOD_VERSION already installed ($KEY)"
else
  if ! ls "$WHEEL_DIR"/horovod-*.whl >/dev/null 2>&1; then
    command -v cmake >/dev/null || apt_install cmake
    BUILD_LOG="$LOGS/horovod-build-$(date +%Y%m%d-%H%M%S).log"
    say "building Horovod $HOROVOD_VERSION from source (once; ~5 min on 2 cores); log: $BUILD_LOG"
    SRC="$CACHE/src/horovod-$HOROVOD_VERSION.tar.gz"
    if [ ! -f "$SRC" ]; then
      "${PIP[@]}" download --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" \
        -d "$CACHE/src" >>"$BUILD_LOG" 2>&1 || die "could not download the Horovod source release" "$BUILD_LOG"
    fi
    WORK=$(mktemp -d)
    # unpacks and applies the C++17 fix (PyTorch >= 2.1 headers need it; horovod #3998)
    HSRC=$("$VENV/bin/python" "$ROOT/scripts/horovod_source.py" "$SRC" "$WORK" 2>>"$BUILD_LOG") ||
      die "$(tail -n 1 "$BUILD_LOG")" "$BUILD_LOG"
    mkdir -p "$WHEEL_DIR.tmp"
    if ! (cd "$HSRC" && PATH="$VENV/bin:$PATH" HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 \
      HOROVOD_WITHOUT_MXNET=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 MAKEFLAGS="-j$(nproc)" \
      "${PIP[@]}" wheel --no-build-isolation --no-deps -w "$WHEEL_DIR.tmp" .) >>"$BUILD_LOG" 2>&1; then
      tail -n 25 "$BUILD_LOG" >&2
      rm -rf "$WORK" "$WHEEL_DIR.tmp"
      die "the Horovod build failed" "$BUILD_LOG"
    fi
    rm -rf "$WORK" "$WHEEL_DIR"
    mv "$WHEEL_DIR.tmp" "$WHEEL_DIR"
  fi
  say "installing the cached Horovod wheel from $WHEEL_DIR"
  logged "${PIP[@]}" install --force-reinstall --no-deps "$WHEEL_DIR"/horovod-*.whl
  echo "$KEY" >"$VENV/.horovod-key"
fi

STEP="hvd-largebatch (native extension)"
say "building hvd-largebatch (native extension) in editable mode"
logged "${PIP[@]}" install --no-build-isolation --no-deps -e "$ROOT"
"$VENV/bin/python" -c 'import json, hvd_largebatch as h; print("[install] built:", json.dumps(h.build_info()))' ||
  die "hvd_largebatch does not import after the build"

STEP="Horovod build check"
"$VENV/bin/python" -m hvd_largebatch.distributed.horovod_check || die "Horovod lacks a required component (see above)"

touch "$STAMP"
say "done (log: $LOG)"
