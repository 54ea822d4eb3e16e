"""The CUDA kernels (csrc/cuda/kernels.cu) run on the CPU under cuda-emu and are compared with the CPU kernels.

No GPU is needed. ``../shared/tools/cuda-emu`` (beside the repository) compiles kernels.cu for the
CPU: each GPU thread becomes a fiber, with real ``__syncthreads`` and warp-shuffle semantics, and
the emulator records undefined behaviour (threads of a block at different barriers, lanes of a warp
at different shuffles, deadlocks, bad launch configurations, oversized kernel arguments).
``tests/lars/cuda_emu/driver.cpp`` is linked with the emulated object and calls the CUDA entry points
``hvdlb::lars_norms_cuda`` / ``hvdlb::lars_update_cuda`` on a memory image written here.

How it works:

* Build: ``emu-build.sh csrc/cuda/kernels.cu`` and the driver are compiled in parallel and linked
  (with ``-ltbb`` when the TBB headers are installed: blocks then run in parallel). The result is
  cached in ``build/cuda-emu/<key>/``, the key a hash of csrc/'s headers and kernels, the driver,
  the emulator's files, the compiler version and the flags; later runs skip the compilation.
* Cases: the cases of tests/lars/test_cuda_ops.py written as tensor tables (layout of
  csrc/lars_math.h) in one image, and a list of norm / update calls per case. The same calls run on
  the CPU kernels (``hvd_largebatch._C``, on a copy of the image in this process) and in the driver
  (on the image file, once per thread schedule: ``emu::g_sched`` 0 round-robin with device 0 and
  the default stream; 2 warp priority with device 1 of 2 and a created stream).
* Comparisons:
  - sums of squares and dot products (per chunk and per tensor): the CPU adds in 16 lanes, the GPU
    per thread and then in shuffle trees, so the orders differ. Each backend's sums are checked
    against the float64 sum with Higham's bound for its own summation tree,
    ``|s - exact| <= gamma(depth) * sum|terms|``, ``gamma(k) = k u / (1 - k u)``, ``u = 2**-24``,
    ``depth`` the most roundings any term goes through (derived below from the chunk lengths).
    Where the same order is used twice on one backend (carried weight sums, kSumW, vs a fresh norm
    pass; a tensor alone vs among others; whole layers vs segments) the sums must be equal bit for
    bit.
  - updates: both backends get the SAME sums (the float64 sums rounded to fp32, written into the
    image), so weights, momentum buffers, trust ratios and flags must be identical bit for bit.
    NaN results are compared as "NaN on both" plus, in a separate test, their bits.
  - the two schedules must give byte-identical images (the reductions are deterministic).
  - every launch is on the requested device and stream, the current device is unchanged, a call
    for a device that is not current raises and launches nothing, the number of launches per call
    is the one of csrc/cuda/lars_cuda.h, and no undefined behaviour was recorded.
  - the emulated threads keep fp32 denormals (the CUDA build does not use --use_fast_math).

Skipped only when ../shared/tools/cuda-emu is absent; a missing or failing compiler is a failure.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from hvd_largebatch.lars.ops import DEVICE_HYPERS, GROUP_DTYPE
from test_ops import HYPER, OPTIONS, SIZES

REPO = Path(__file__).resolve().parents[2]
EMU = REPO.parent / "shared" / "tools" / "cuda-emu"
CSRC = REPO / "csrc"
DRIVER_SRC = Path(__file__).resolve().parent / "cuda_emu" / "driver.cpp"
CACHE = REPO / "build" / "cuda-emu"
DRIVER_FLAGS = ["-std=c++17", "-O1", "-pthread", "-w"]
SCHEDULES = {  # emu::g_sched -> (seed, device passed to the entry points, own stream)
    0: (1, 0, False),
    2: (7, 1, True),
}
RUN_TIMEOUT_S = 420

# ------------------------------------------------------------------------------------------------
# building the driver (cached)


def _compiler() -> str:
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        pytest.fail(f"cuda-emu needs a C++17 compiler: {cxx!r} not found (install g++ >= 9 or set "
                    "CXX)")
    out = subprocess.run([cxx, "-dumpfullversion", "-dumpversion"], capture_output=True, text=True)
    version = out.stdout.strip().splitlines()[0] if out.stdout.strip() else ""
    try:
        major = int(version.split(".")[0])
    except ValueError:
        pytest.fail(f"could not read the version of {cxx} (got {out.stdout!r} {out.stderr!r})")
    if major < 9:
        pytest.fail(f"cuda-emu needs g++ >= 9 (C++17 <execution>); {cxx} is {version}")
    return cxx


def _has_tbb(cxx: str) -> bool:
    """True when the TBB headers are installed: libstdc++'s parallel algorithms (which HIP-CPU uses
    to run blocks) then use TBB and the driver must link -ltbb."""
    probe = "#if __has_include(<tbb/tbb.h>)\nHVDLB_TBB_FOUND\n#endif\n"
    out = subprocess.run([cxx, "-std=c++17", "-E", "-x", "c++", "-"], input=probe,
                         capture_output=True, text=True)
    return out.returncode == 0 and "HVDLB_TBB_FOUND" in out.stdout


def _cache_key(cxx: str, tbb: bool) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in CSRC.rglob("*") if p.suffix in {".h", ".hpp", ".cuh", ".cu"})
    files += [DRIVER_SRC] + sorted(p for p in EMU.rglob("*") if p.is_file())
    for p in files:
        h.update(str(p.relative_to(p.parents[len(p.parts) - 2])).encode() + b"\0")
        h.update(p.read_bytes() + b"\0")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    h.update(f"{cxx}\0{version}\0{DRIVER_FLAGS}\0tbb={tbb}".encode())
    return h.hexdigest()[:20]


def _run_build(cmds: list[list[str]]) -> None:
    procs = [(c, subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
             for c in cmds]
    failures = []
    for cmd, p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            failures.append(f"$ {' '.join(map(str, cmd))}\n{out[-4000:]}")
    if failures:
        pytest.fail("building the emulated CUDA kernels failed:\n" + "\n".join(failures))


def build_driver() -> tuple[Path, dict]:
    """The driver executable (built or from the cache) and facts about the build."""
    cxx = _compiler()
    tbb = _has_tbb(cxx)
    key = _cache_key(cxx, tbb)
    CACHE.mkdir(parents=True, exist_ok=True)
    target = CACHE / key / "driver"
    info = {"key": key, "tbb": tbb, "cached": True, "build_s": 0.0}
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time (e.g. pytest-xdist workers)
        if target.exists():
            return target, info
        start = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix="tmp-", dir=CACHE))
        try:
            shim, hip = EMU / "shim", EMU / "hipcpu" / "include"
            _run_build([
                ["bash", str(EMU / "emu-build.sh"), str(CSRC / "cuda" / "kernels.cu"),
                 str(tmp / "kernels_emu.o"), "-I", str(CSRC)],
                [cxx, *DRIVER_FLAGS, "-I", str(shim), "-I", str(hip), "-I", str(CSRC), "-c",
                 str(DRIVER_SRC), "-o", str(tmp / "driver.o")],
            ])
            _run_build([[cxx, "-pthread", str(tmp / "driver.o"), str(tmp / "kernels_emu.o"), "-o",
                         str(tmp / "driver"), *(["-ltbb"] if tbb else [])]])
            for old in CACHE.iterdir():  # earlier keys: stale sources
                if old.is_dir() and old.name != key and old != tmp:
                    shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, CACHE / key)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        info.update(cached=False, build_s=time.monotonic() - start)
    return target, info


# ------------------------------------------------------------------------------------------------
# data: dtypes, the image, tensor tables (csrc/lars_math.h), groups

DT_CODE = {"f32": 0, "f16": 1, "bf16": 2}
STORAGE = {"f32": np.float32, "f16": np.float16, "bf16": np.uint16}
# bits of a NaN: exponent all ones and a non-zero mantissa
NAN_TEST = {np.dtype(np.float32): (np.uint32, 0x7fffffff, 0x7f800000),
            np.dtype(np.float16): (np.uint16, 0x7fff, 0x7c00),
            np.dtype(np.uint16): (np.uint16, 0x7fff, 0x7f80)}  # bf16 stored as uint16
U = 2.0 ** -24
ALIGN = 64

# csrc/lars_math.h: LarsGroup (64 bytes: values, flags, then addresses of the loss scale and of
# device-held values, image offsets here), as lars/ops.py packs it
GROUP_ADDRESSES = ["grad_scale_at"] + [f"{name}_at" for name in DEVICE_HYPERS]
LARS, NESTEROV, MOMENTUM_CORRECTION, COMBINED = 1, 2, 4, 8
NORM_W, NORM_G, NORM_WG, SUM_W = 1, 2, 4, 8
OP_FIELDS = ["kind", "case", "table", "n", "nch", "mode", "w_part", "g_part", "w_sq", "g_sq", "wg",
             "flag", "groups", "ngroups", "ratios", "check_sums", "skip", "carry", "ftz",
             "reserved"]  # driver.cpp: Field
CUDA_CHUNK = 4096  # hvd_largebatch/lars/ops.py: CHUNK["cuda"]
# The CUDA build is IEEE (setup.py: no --use_fast_math), so the emulated kernel threads keep fp32
# denormals (emu::g_ftz = false) and the results must match the CPU's for denormals too.
FTZ = False


def max_groups_per_launch() -> int:
    """kMaxGroupsPerLaunch of kernels.cu: the update makes ceil(ngroups / it) launches."""
    import re

    found = re.search(r"constexpr\s+int\s+kMaxGroupsPerLaunch\s*=\s*(\d+)\s*;",
                      (CSRC / "cuda" / "kernels.cu").read_text())
    assert found, "kernels.cu no longer defines kMaxGroupsPerLaunch: update this test"
    return int(found.group(1))


def to_storage(x: np.ndarray, dt: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if dt == "f32":
        return x.copy()
    if dt == "f16":
        return x.astype(np.float16)
    bits = x.view(np.uint32).astype(np.uint64)  # finite inputs: round to nearest even
    return ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def widen(a: np.ndarray, dt: str) -> np.ndarray:
    """Exact float64 values of stored elements."""
    with np.errstate(invalid="ignore"):  # signalling NaNs widen to quiet ones
        if dt == "bf16":
            return (a.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        return a.astype(np.float64)


def is_nan(a: np.ndarray) -> np.ndarray:
    utype, mag, inf = NAN_TEST[a.dtype]
    return (a.view(utype) & mag) > inf


def bits(a: np.ndarray) -> np.ndarray:
    return a.view(NAN_TEST[a.dtype][0]) if a.dtype in NAN_TEST else a


def gamma(k) -> np.ndarray:
    k = np.asarray(k, dtype=np.float64)
    return k * U / (1 - k * U)


class Image:
    """Bytes that both backends run on; offsets stand for addresses (0 = absent)."""

    def __init__(self):
        self.size = ALIGN
        self.parts: list[tuple[int, np.ndarray]] = []

    def alloc(self, nbytes: int) -> int:
        off = -(-self.size // ALIGN) * ALIGN
        self.size = off + max(int(nbytes), 1)
        return off

    def put(self, a: np.ndarray) -> int:
        a = np.ascontiguousarray(a)
        off = self.alloc(a.nbytes)
        self.parts.append((off, a.reshape(-1).view(np.uint8)))
        return off

    def build(self) -> np.ndarray:
        buf = np.zeros(-(-self.size // 4096) * 4096, dtype=np.uint8)
        for off, b in self.parts:
            buf[off:off + b.size] = b
        return buf


def view(buf: np.ndarray, off: int, dtype, count: int) -> np.ndarray:
    dtype = np.dtype(dtype)
    return buf[off:off + count * dtype.itemsize].view(dtype)


@dataclass
class Tensor:
    """One table row and the data it was created with."""

    w: np.ndarray
    wdt: str
    g: np.ndarray | None
    gdt: str
    u: np.ndarray | None
    group: int = 0
    w_off: int = 0
    g_off: int = 0
    u_off: int = 0

    @property
    def numel(self) -> int:
        return self.w.size


@dataclass
class Table:
    off: int
    tensors: list[Tensor]
    chunks: list[tuple[int, int, int]]  # (tensor, start, length)
    begin: list[int]  # first chunk of each tensor

    @property
    def n(self) -> int:
        return len(self.tensors)

    @property
    def nch(self) -> int:
        return len(self.chunks)


def make_group(lr=0.7, momentum=0.9, weight_decay=0.05, trust_coefficient=0.02, eps=0.0,
               nesterov=False, momentum_correction=True, lars=True, denominator="separate"):
    flags = ((LARS if lars else 0) | (NESTEROV if nesterov else 0)
             | (MOMENTUM_CORRECTION if momentum_correction else 0)
             | (COMBINED if denominator == "combined" else 0))
    return (lr, momentum, weight_decay, trust_coefficient, eps, flags, 0, 0, 0, 0, 0)


# ------------------------------------------------------------------------------------------------
# cases: calls plus what their results must satisfy


@dataclass
class Sums:
    """Per-tensor (and per-chunk) outputs of one norm call, or given sums of an update."""

    w_sq: int = 0
    g_sq: int = 0
    wg: int = 0
    flag: int = 0
    w_part: int = 0
    g_part: int = 0


class Case:
    def __init__(self, prog: "Program", name: str, ftz: bool = FTZ):
        self.prog, self.name, self.ftz = prog, name, ftz
        self.id = len(prog.cases)
        prog.cases.append(self)
        self.ops: list[dict] = []
        self.bitwise: list[tuple[str, int, np.dtype, int]] = []  # CPU == emulated, bit for bit
        self.checks = []  # fn(buf, backend): each backend's results against the references
        self.pairs = []  # fn(cpu_buf, emu_buf): extra cross-backend comparisons

    # -- memory ----------------------------------------------------------------------------------

    def put(self, a):
        return self.prog.img.put(a)

    def zeros(self, dtype, count):
        return self.put(np.zeros(count, dtype=dtype))

    def tensors(self, specs, seed=0, buffers=True, grads=True):
        """specs: (numel, w dtype, g dtype, group); random w, g (x0.3), u (x0.1)."""
        rng = np.random.default_rng(seed)
        out = []
        for numel, wdt, gdt, group in specs:
            w = to_storage(rng.standard_normal(numel, dtype=np.float32), wdt)
            g = to_storage(rng.standard_normal(numel, dtype=np.float32) * np.float32(0.3), gdt)
            u = (rng.standard_normal(numel, dtype=np.float32) * np.float32(0.1)) if buffers else None
            t = Tensor(w, wdt, g if grads else None, gdt if grads else "f32", u, group)
            t.w_off = self.put(t.w)
            t.g_off = self.put(t.g) if grads else 0
            t.u_off = self.put(t.u) if buffers else 0
            out.append(t)
        return out

    def table(self, tensors: list[Tensor], chunk: int = CUDA_CHUNK) -> Table:
        rows, chunks, begin = [], [], []
        for i, t in enumerate(tensors):
            begin.append(len(chunks))
            rows.append([t.w_off, t.g_off, t.u_off, t.numel, DT_CODE[t.wdt], DT_CODE[t.gdt],
                         t.group, len(chunks)])
            if t.numel == 0:
                chunks.append((i, 0, 0))
            for s in range(0, t.numel, chunk):
                chunks.append((i, s, min(chunk, t.numel - s)))
        flat = np.array([v for r in rows for v in r] + [v for c in chunks for v in c],
                        dtype=np.int64)
        return Table(self.put(flat), tensors, chunks, begin)

    def groups(self, groups: list[tuple]) -> tuple[int, int]:
        return self.put(np.array(groups, dtype=GROUP_DTYPE)), len(groups)

    def given_sums(self, tensors: list[Tensor], dot=True, override=None, index=None) -> Sums:
        """fp32 roundings of the exact sums of the initial data: the same input for both updates
        (index: per-row tensor indices, e.g. the layer of each segment)."""
        w_sq, g_sq, wg = (np.array(v, dtype=np.float32) for v in zip(*(
            (np.dot(widen(t.w, t.wdt), widen(t.w, t.wdt)),
             np.dot(widen(t.g, t.gdt), widen(t.g, t.gdt)),
             np.dot(widen(t.w, t.wdt), widen(t.g, t.gdt))) for t in tensors)))
        if index is not None:
            w_sq, g_sq, wg = w_sq[index], g_sq[index], wg[index]
        if override:
            override(w_sq, g_sq, wg)
        return Sums(w_sq=self.put(w_sq), g_sq=self.put(g_sq), wg=self.put(wg) if dot else 0,
                    flag=self.put(np.array([-1], dtype=np.int32)))

    def op(self, **fields):
        self.ops.append({"case": self.id, "ftz": int(self.ftz), **fields})

    def expect_bitwise(self, label: str, off: int, dtype, count: int):
        self.bitwise.append((label, off, np.dtype(dtype), count))

    # -- calls -------------------------------------------------------------------------------------

    def norms(self, table: Table, mode: int, data=None, w_part=None, label="norms") -> Sums:
        """A norm pass; checks its sums against float64 (data(buf): the (w, g) float64 values of
        each tensor at the time of the call; default: the initial data) and its flag."""
        n, nch = table.n, table.nch
        s = Sums(w_part=w_part if w_part is not None else self.zeros(np.float32, nch),
                 g_part=self.zeros(np.float32, 2 * nch), w_sq=self.zeros(np.float32, n),
                 g_sq=self.zeros(np.float32, n), wg=self.zeros(np.float32, n),
                 flag=self.put(np.array([-1], dtype=np.int32)))
        self.op(kind=1, table=table.off, n=n, nch=nch, mode=mode, w_part=s.w_part,
                g_part=s.g_part, w_sq=s.w_sq, g_sq=s.g_sq, wg=s.wg, flag=s.flag)
        if data is None:
            initial = [(widen(t.w, t.wdt), widen(t.g, t.gdt) if t.g is not None else None)
                       for t in table.tensors]
            data = lambda buf: initial  # noqa: E731
        self.checks.append(lambda buf, backend: check_norms(buf, backend, table, mode, s,
                                                            data(buf), f"{label}"))
        self.expect_bitwise(f"{label}: non-finite flag", s.flag, np.int32, 1)
        return s

    def update(self, table: Table, groups: tuple[int, int], sums: Sums, *, check_sums=True,
               skip=True, carry=0, flag=None) -> int:
        """An update with the given sums; weights, buffers, ratios and the flag must be the same
        bits on both backends. Returns the ratios' offset."""
        ratios = self.zeros(np.float32, table.n)
        self.op(kind=2, table=table.off, n=table.n, nch=table.nch, groups=groups[0],
                ngroups=groups[1], w_sq=sums.w_sq, g_sq=sums.g_sq, wg=sums.wg, ratios=ratios,
                flag=sums.flag if flag is None else flag, check_sums=int(check_sums),
                skip=int(skip), carry=carry)
        self.expect_bitwise("trust ratios", ratios, np.float32, table.n)
        self.expect_bitwise("flag", sums.flag if flag is None else flag, np.int32, 1)
        for i, t in enumerate(table.tensors):
            self.expect_bitwise(f"weights[{i}] ({t.wdt}, {t.numel})", t.w_off, STORAGE[t.wdt],
                                t.numel)
            if t.u_off:
                self.expect_bitwise(f"buffer[{i}] ({t.numel})", t.u_off, np.float32, t.numel)
        return ratios

    def launches(self) -> list[dict]:
        """Launches the calls of this case must make (csrc/cuda/lars_cuda.h)."""
        out = []
        for op in self.ops:
            if op["kind"] == 1:
                names = (["norms_kernel"] if op["mode"] & (NORM_W | NORM_G | NORM_WG) else [])
                out.append(names + ["finalize_kernel"])
            else:
                launches = -(-op["ngroups"] // max_groups_per_launch())
                out.append((["check_sums_kernel"] if op["check_sums"] else [])
                           + ["update_kernel"] * launches)
        return out


def current_weights(table: Table):
    """data(buf) for a norm pass after an update: the weights as they are in buf."""
    def data(buf):
        return [(widen(view(buf, t.w_off, STORAGE[t.wdt], t.numel), t.wdt),
                 widen(t.g, t.gdt) if t.g is not None else None) for t in table.tensors]
    return data


def sum_depths(table: Table, backend: str) -> tuple[np.ndarray, np.ndarray]:
    """Most roundings a term goes through, per chunk and per tensor, in each backend's order.

    CPU (csrc/cpu/lars_cpu.cpp): 16 lanes of sequential fmaf (ceil(len / 16) each), a 4-level
    tree, then the tensor's chunks added one after the other. CUDA (kernels.cu): per thread
    ceil(len / 256) fmaf, a 5-level shuffle tree per warp, another (<= 5 levels) over the warps;
    per tensor, lane-strided sums of ceil(nch / 32) partials and a 5-level tree.
    """
    lens = np.array([c[2] for c in table.chunks], dtype=np.int64)
    if backend == "cpu":
        chunk = -(-lens // 16) + 4
    else:
        chunk = -(-lens // 256) + 10
    counts = np.diff(np.array(table.begin + [table.nch]))
    tensor = np.array([chunk[b:b + k].max() for b, k in zip(table.begin, counts)])
    tensor += counts if backend == "cpu" else -(-counts // 32) + 5
    return chunk, tensor


def check_sum(label, got, exact, abs_sum, depth, n_terms):
    """|got - exact| <= gamma(depth) * sum|terms| (+ the float64 reference's own error)."""
    got64 = got.astype(np.float64)
    finite = np.isfinite(exact)
    tol = gamma(depth) * abs_sum + n_terms * 2.0 ** -52 * abs_sum
    with np.errstate(invalid="ignore"):
        err = np.abs(got64 - exact)
        # an inf or NaN among the terms: the same inf (sign included) or a NaN
        same_nonfinite = (np.isnan(got64) & np.isnan(exact)) | (got64 == exact)
    bad = np.where(finite, ~(err <= tol), ~same_nonfinite)
    if bad.any():
        i = np.flatnonzero(bad)[:5]
        raise AssertionError(f"{label}: {bad.sum()} sums outside Higham's bound, e.g. at {i}: "
                             f"got {got[i]}, exact {exact[i]}, bound {tol[i]}")


def check_norms(buf, backend, table: Table, mode, s: Sums, data, label):
    n, nch = table.n, table.nch
    do_w, do_g, do_wg = mode & NORM_W, mode & NORM_G, mode & NORM_WG
    sum_w = do_w or mode & SUM_W
    depth_chunk, depth_tensor = sum_depths(table, backend)
    lens = np.array([c[2] for c in table.chunks], dtype=np.int64)
    per_chunk = {"w": np.zeros(nch), "g": np.zeros(nch), "wg": np.zeros(nch)}
    abs_chunk = {k: np.zeros(nch) for k in per_chunk}
    for c, (t, start, length) in enumerate(table.chunks):
        w, g = data[t]
        x = w[start:start + length]
        y = g[start:start + length] if g is not None else None
        per_chunk["w"][c] = abs_chunk["w"][c] = np.dot(x, x)
        if y is not None:
            per_chunk["g"][c] = abs_chunk["g"][c] = np.dot(y, y)
            per_chunk["wg"][c] = np.dot(x, y)
            abs_chunk["wg"][c] = np.dot(np.abs(x), np.abs(y))
    tensor = {k: np.add.reduceat(v, table.begin) if nch else v for k, v in per_chunk.items()}
    abs_tensor = {k: np.add.reduceat(v, table.begin) if nch else v for k, v in abs_chunk.items()}
    numel = np.array([t.numel for t in table.tensors])
    w_part = view(buf, s.w_part, np.float32, nch)
    g_part = view(buf, s.g_part, np.float32, 2 * nch)
    w_sq, g_sq, wg = (view(buf, o, np.float32, n) for o in (s.w_sq, s.g_sq, s.wg))
    where = f"{label} ({backend})"
    if do_w:
        check_sum(f"{where}: per-chunk w^2", w_part, per_chunk["w"], abs_chunk["w"], depth_chunk,
                  lens)
    if sum_w:
        check_sum(f"{where}: ||w||^2", w_sq, tensor["w"], abs_tensor["w"], depth_tensor, numel)
    if do_g:
        check_sum(f"{where}: per-chunk g^2", g_part[0::2], per_chunk["g"], abs_chunk["g"],
                  depth_chunk, lens)
        check_sum(f"{where}: ||g||^2", g_sq, tensor["g"], abs_tensor["g"], depth_tensor, numel)
    if do_wg:
        check_sum(f"{where}: per-chunk <w, g>", g_part[1::2], per_chunk["wg"], abs_chunk["wg"],
                  depth_chunk, lens)
        check_sum(f"{where}: <w, g>", wg, tensor["wg"], abs_tensor["wg"], depth_tensor, numel)
    computed = [a for a, on in ((w_sq, sum_w), (g_sq, do_g), (wg, do_wg)) if on]
    expected_flag = int(any((~np.isfinite(a)).any() for a in computed))
    flag = int(view(buf, s.flag, np.int32, 1)[0])
    assert flag == expected_flag, f"{where}: non-finite flag {flag}, sums say {expected_flag}"


class Program:
    """All cases in one image and one list of calls."""

    def __init__(self):
        self.img = Image()
        self.cases: list[Case] = []

    def ops_array(self) -> np.ndarray:
        rows = [[op.get(f, 0) for f in OP_FIELDS] for c in self.cases for op in c.ops]
        return np.array(rows, dtype=np.int64).reshape(-1, len(OP_FIELDS))


# ------------------------------------------------------------------------------------------------
# the cases of tests/lars/test_cuda_ops.py

DTYPES = ["f32", "f16", "bf16"]
BUILDERS = {}


def case(name):
    def register(fn):
        BUILDERS[name] = fn
        return fn
    return register


def option_group(options: dict) -> tuple:
    return make_group(**{**HYPER, **options})


for _dt in DTYPES:
    @case(f"sum_of_squares[{_dt}]")
    def _sum_of_squares(c: Case, dt=_dt):
        """test_sum_of_squares_matches_reference_and_cpu, plus 3 million elements; the weight-only
        pass (no grads); the same sums for a tensor alone and among the others."""
        sizes = SIZES + ([3_000_003] if dt == "f32" else [1_000_001])
        ts = c.tensors([(n, dt, "f32", 0) for n in sizes], seed=len(dt), grads=False,
                       buffers=False)
        both = c.norms(c.table(ts), NORM_W)
        alone = c.norms(c.table(ts[-2:-1]), NORM_W, label="one tensor alone")
        n = len(ts)
        c.checks.append(lambda buf, backend: np.testing.assert_array_equal(
            view(buf, alone.w_sq, np.uint32, 1), view(buf, both.w_sq, np.uint32, n)[-2:-1],
            err_msg=f"{backend}: a tensor's sum depends on the other tensors"))


for _i, _options in enumerate(OPTIONS):
    _oid = ",".join(f"{k}={v}" for k, v in _options.items()) or "default"

    @case(f"update[{_oid}]")
    def _update(c: Case, options=_options, seed=_i):
        """test_update_matches_reference_for_each_option: SIZES, fp32, two steps (the second with
        the buffers of the first) with the same given sums on both backends."""
        hyper = {**HYPER, **options}
        ts = c.tensors([(n, "f32", "f32", 0) for n in SIZES], seed=seed,
                       buffers=hyper["momentum"] != 0)
        table = c.table(ts)
        c.norms(table, NORM_W | NORM_G | NORM_WG)
        sums = c.given_sums(ts)
        groups = c.groups([option_group(options)])
        c.update(table, groups, sums)
        c.update(table, groups, sums, check_sums=False)


for _w in DTYPES:
    for _g in DTYPES:
        @case(f"dtypes[{_w},{_g}]")
        def _dtypes(c: Case, w=_w, g=_g):
            """test_update_matches_reference_for_each_dtype_pair and
            test_cpu_and_gpu_compute_the_same_elements: four groups (lr, denominator, Nesterov per
            tensor) over sizes around the chunk boundaries."""
            sizes = [1, 3, 4097, 20_000, 0, 33, 5000, 70_001]
            groups = [option_group({"lr": lr, "denominator": d, "nesterov": nv})
                      for lr, d, nv in ((0.7, "separate", False), (0.7, "combined", True),
                                        (0.1, "separate", True), (0.2, "combined", False))]
            ts = c.tensors([(n, w, g, i % 4) for i, n in enumerate(sizes)],
                           seed=3 * DT_CODE[w] + DT_CODE[g])
            table = c.table(ts)
            c.norms(table, NORM_W | NORM_G | NORM_WG)
            c.update(table, c.groups(groups), c.given_sums(ts))


@case("many_groups")
def _many_groups(c: Case):
    """test_more_groups_than_one_launch_holds: 150 groups, three update launches."""
    n = 150
    ts = c.tensors([(37 + i, "f32", "f32", i) for i in range(n)], seed=11)
    table = c.table(ts)
    groups = [make_group(lr=0.01 * (i + 1), weight_decay=0.01, trust_coefficient=0.001)
              for i in range(n)]
    c.update(table, c.groups(groups), c.given_sums(ts, dot=False))


@case("many_tensors")
def _many_tensors(c: Case):
    """More than 1024 tensors (the one-block kernels loop over them), mixed dtypes and groups."""
    rng = np.random.default_rng(12)
    sizes = rng.integers(0, 300, 1500).tolist()
    ts = c.tensors([(n, DTYPES[i % 3], DTYPES[(i // 3) % 3], i % 3) for i, n in enumerate(sizes)],
                   seed=12)
    table = c.table(ts)
    groups = [option_group({}), option_group({"denominator": "combined"}),
              option_group({"nesterov": True, "momentum_correction": False})]
    c.norms(table, NORM_W | NORM_G | NORM_WG)
    c.update(table, c.groups(groups), c.given_sums(ts))


for _bad in ("inf", "nan"):
    @case(f"nonfinite[{_bad}]")
    def _nonfinite(c: Case, bad=_bad):
        """test_nonfinite_grad_skips_the_whole_call (skip with the norm pass's flag, weights,
        buffers unchanged; with carried weight sums) and test_nonfinite_propagate_applies_the_update
        (the update runs anyway: inf / NaN results)."""
        ts = c.tensors([(100, "f32", "f32", 0), (5000, "f16", "f32", 0), (30, "bf16", "f32", 0),
                        (4097, "f32", "bf16", 0)], seed=13)
        ts[1].g[17] = np.float32(bad)  # the image holds views of the data
        table = c.table(ts)
        groups = c.groups([option_group({})])
        s = c.norms(table, NORM_W | NORM_G)
        carry = c.zeros(np.float32, table.nch)
        # skip: flag of the norm pass, no check here; the carried sums are the current weights'
        sums = c.given_sums(ts, dot=False)
        c.update(table, groups, sums, check_sums=False, flag=s.flag, carry=carry)
        c.checks.append(lambda buf, backend: np.testing.assert_array_equal(
            view(buf, carry, np.uint32, table.nch), view(buf, s.w_part, np.uint32, table.nch),
            err_msg=f"{backend}: skipped update with carry: w_part is not the weights' sums"))
        c.checks.append(lambda buf, backend: check_unchanged(buf, backend, ts, "skip"))
        # the same tensors again with on_nonfinite="propagate" (copies: the skip must not change them)
        copies = c.tensors([(t.numel, t.wdt, t.gdt, 0) for t in ts], seed=13)
        copies[1].g[17] = np.float32(bad)
        c.update(c.table(copies), groups, c.given_sums(copies, dot=False), skip=False)


@case("nonfinite_supplied_sums")
def _nonfinite_supplied(c: Case):
    """test_nonfinite_supplied_sums_skip_the_call: sums from outside with an inf are checked on
    the device (check_sums) and the call is skipped."""
    ts = c.tensors([(100, "f32", "f32", 0), (200, "f32", "f32", 0)], seed=14)
    table = c.table(ts)

    def make_inf(w_sq, g_sq, wg):
        g_sq[0] = np.inf
    c.update(table, c.groups([option_group({})]), c.given_sums(ts, dot=False, override=make_inf))
    c.checks.append(lambda buf, backend: check_unchanged(buf, backend, ts, "supplied inf"))


def check_unchanged(buf, backend, ts: list[Tensor], what):
    for i, t in enumerate(ts):
        assert view(buf, t.w_off, STORAGE[t.wdt], t.numel).tobytes() == t.w.tobytes(), \
            f"{backend}: {what}: weights[{i}] changed"
        if t.u_off:
            assert view(buf, t.u_off, np.float32, t.numel).tobytes() == t.u.tobytes(), \
                f"{backend}: {what}: buffer[{i}] changed"


for _dt in DTYPES:
    @case(f"carry[{_dt}]")
    def _carry(c: Case, dt=_dt):
        """test_table_rebinds_new_grads_and_carries_weight_sums: the update's carried per-chunk
        ||w||^2 (then kSumW) equal a fresh norm pass over the new weights, bit for bit."""
        ts = c.tensors([(3000, dt, "f32", 0), (20_000, dt, "bf16", 0), (5, dt, "f16", 0)],
                       seed=15 + DT_CODE[dt])
        table = c.table(ts)
        s = c.norms(table, NORM_W | NORM_G)
        carried = c.zeros(np.float32, table.nch)
        c.update(table, c.groups([option_group({})]), c.given_sums(ts, dot=False),
                 check_sums=False, flag=s.flag, carry=carried)
        after = current_weights(table)
        summed = c.norms(table, SUM_W | NORM_G, data=after, w_part=carried, label="kSumW")
        fresh = c.norms(table, NORM_W, data=after, label="fresh norms after the update")

        def same(buf, backend):
            for what, a, b, k in (("per-chunk", carried, fresh.w_part, table.nch),
                                  ("per-tensor", summed.w_sq, fresh.w_sq, table.n)):
                np.testing.assert_array_equal(
                    view(buf, a, np.uint32, k), view(buf, b, np.uint32, k),
                    err_msg=f"{backend}: carried {what} ||w||^2 differ from a fresh norm pass")
        c.checks.append(same)


@case("segments")
def _segments(c: Case):
    """test_segments_with_full_layer_sums_equal_the_whole_layer_update: segments at odd offsets,
    updated with their whole layer's sums, give exactly the whole-layer update."""
    sizes = [1000, 7, 40_000, 333]
    whole = c.tensors([(n, "f32", "f32", 0) for n in sizes], seed=9)
    flat_w = np.concatenate([t.w for t in whole])
    flat_g = np.concatenate([t.g for t in whole])
    flat_u = np.concatenate([t.u for t in whole])
    w0, g0, u0 = c.put(flat_w), c.put(flat_g), c.put(flat_u)
    bounds = np.cumsum([0] + sizes)
    cuts = [0, 501, 999, 1003, 20_000, 41_000, int(bounds[-1])]
    segs, owners = [], []
    for a, b in zip(cuts[:-1], cuts[1:]):
        for layer in range(len(sizes)):
            lo, hi = max(a, bounds[layer]), min(b, bounds[layer + 1])
            if lo < hi:
                t = Tensor(flat_w[lo:hi], "f32", flat_g[lo:hi], "f32", flat_u[lo:hi], 0,
                           w0 + 4 * lo, g0 + 4 * lo, u0 + 4 * lo)
                segs.append(t)
                owners.append(layer)
    groups = c.groups([option_group({})])
    c.update(c.table(whole), groups, c.given_sums(whole, dot=False))
    c.update(c.table(segs), groups, c.given_sums(whole, dot=False, index=owners))
    total = int(bounds[-1])

    def same(buf, backend):
        whole_w = np.concatenate([view(buf, t.w_off, np.float32, t.numel) for t in whole])
        whole_u = np.concatenate([view(buf, t.u_off, np.float32, t.numel) for t in whole])
        np.testing.assert_array_equal(view(buf, w0, np.uint32, total), whole_w.view(np.uint32),
                                      err_msg=f"{backend}: segment update != whole-layer update")
        np.testing.assert_array_equal(view(buf, u0, np.uint32, total), whole_u.view(np.uint32),
                                      err_msg=f"{backend}: segment buffers != whole-layer buffers")
    c.checks.append(same)


@case("odd_chunks")
def _odd_chunks(c: Case):
    """Chunks that are not a multiple of a block's 1024-element stride (1000 elements), so every
    kernel loop ends part-way; mixed dtypes, raw-form Nesterov momentum."""
    ts = c.tensors([(2999, "f32", "bf16", 0), (1, "bf16", "f32", 0), (1024, "f16", "f16", 0),
                    (1025, "f32", "f32", 0), (0, "f16", "f32", 0)], seed=16)
    table = c.table(ts, chunk=1000)
    c.norms(table, NORM_W | NORM_G | NORM_WG)
    c.update(table, c.groups([option_group({"nesterov": True, "momentum_correction": False,
                                            "denominator": "combined"})]), c.given_sums(ts))


ALL_16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)


def _conversion_inputs(dt: str) -> np.ndarray:
    """fp32 values to round into dt: exact ties between neighbours, random magnitudes over 15
    decades, and special values (test_ops.check_rounding)."""
    grid = widen(ALL_16.view(np.float16) if dt == "f16" else ALL_16, dt)
    grid = np.unique(grid[np.isfinite(grid)])
    ties = ((grid[:-1] + grid[1:]) / 2).astype(np.float32)
    rng = np.random.default_rng(4)
    randoms = np.concatenate([rng.standard_normal(4000).astype(np.float32) * np.float32(10.0 ** e)
                              for e in range(-9, 6)])
    specials = np.array([0.0, -0.0, 65504.0, 65519.0, 65520.0, 70000.0, 1e-8, -3e-8, 6e-8,
                         np.inf, -np.inf, 3.0e38, 1e-40, -1e-45, np.nan], dtype=np.float32)
    return np.concatenate([ties, randoms, specials])


def _conversion_case(c: Case, dt: str):
    """test_16_bit_conversions_match_torch: w <- w - g with lr 1, no momentum, decay or LARS, so
    every 16-bit g widens into an fp32 w, and fp32 g (ties, randoms, specials) round into a 16-bit
    w; propagate (the inputs hold inf and NaN)."""
    widen_t = Tensor(np.zeros(1 << 16, np.float32), "f32",
                     ALL_16.view(np.float16) if dt == "f16" else ALL_16.copy(), dt, None)
    x = _conversion_inputs(dt)
    round_t = Tensor(np.zeros(x.size, STORAGE[dt]), dt, x, "f32", None)
    for t in (widen_t, round_t):
        t.w_off, t.g_off = c.put(t.w), c.put(t.g)
    table = c.table([widen_t, round_t])
    zero = c.put(np.zeros(2, np.float32))
    sums = Sums(w_sq=zero, g_sq=zero, flag=c.put(np.array([-1], np.int32)))
    c.update(table, c.groups([make_group(lr=1.0, momentum=0.0, weight_decay=0.0, lars=False)]),
             sums, skip=False)
    return widen_t, round_t


for _dt in ("f16", "bf16"):
    @case(f"conversions[{_dt}]")
    def _conversions(c: Case, dt=_dt):
        _conversion_case(c, dt)


@case("scheduled_values")
def _scheduled_values(c: Case):
    """Group values held in device memory (LarsGroup's *_at addresses, read when the kernels run):
    the same update as with the values in the group, on both backends."""
    sizes = [5000, 3, 0, 40_000]
    values = dict(lr=0.35, momentum=0.8, weight_decay=0.02, trust_coefficient=0.05)
    inline = c.tensors([(n, "f32", "f16", 0) for n in sizes], seed=17)
    held = c.tensors([(n, "f32", "f16", 0) for n in sizes], seed=17)
    c.update(c.table(inline), c.groups([make_group(**values, denominator="combined")]),
             c.given_sums(inline))
    group = np.array([make_group(lr=9.0, momentum=0.1, weight_decay=3.0, trust_coefficient=7.0,
                                 denominator="combined")], dtype=GROUP_DTYPE)
    for name, value in values.items():
        group[name + "_at"] = c.put(np.array([value], np.float32))
    c.update(c.table(held), (c.put(group), 1), c.given_sums(held))
    c.checks.append(same_updates(inline, held, "with device-held values"))


def same_updates(expected: list[Tensor], actual: list[Tensor], label: str):
    """A check: the weights and buffers of ``actual`` end bitwise equal to ``expected``'s."""
    def check(buf, backend):
        for i, (a, b) in enumerate(zip(expected, actual)):
            for what, x, y in (("weights", a.w_off, b.w_off), ("buffer", a.u_off, b.u_off)):
                np.testing.assert_array_equal(
                    view(buf, y, np.uint32, a.numel), view(buf, x, np.uint32, a.numel),
                    err_msg=f"{backend}: {what}[{i}] {label}")
    return check


@case("loss_scaled_grads")
def _loss_scaled_grads(c: Case):
    """fp16 loss scaling: gradients (and their sums) S = 2^16 times the true ones, S read from
    device memory (LarsGroup's grad_scale_at): bitwise the update of the unscaled gradients, on
    both backends."""
    sizes = [5000, 3, 40_000]
    scale = np.float32(2.0 ** 16)
    for denominator in ("separate", "combined"):
        plain = c.tensors([(n, "f32", "f32", 0) for n in sizes], seed=23)
        scaled = c.tensors([(n, "f32", "f32", 0) for n in sizes], seed=23)
        for t in scaled:  # exact: a power of two, far from overflow and underflow
            t.g = t.g * scale
            c.prog.img.parts.append((t.g_off, t.g.view(np.uint8)))  # overwrites the stored grads
        c.update(c.table(plain), c.groups([make_group(denominator=denominator)]),
                 c.given_sums(plain))
        group = np.array([make_group(denominator=denominator)], dtype=GROUP_DTYPE)
        group["grad_scale_at"] = c.put(np.array([scale], np.float32))
        c.update(c.table(scaled), (c.put(group), 1), c.given_sums(scaled))
        c.checks.append(same_updates(plain, scaled, f"({denominator}) with scaled gradients"))


# ------------------------------------------------------------------------------------------------
# running both backends


def run_cpu(image: np.ndarray, ops: np.ndarray) -> np.ndarray:
    from hvd_largebatch import _C

    buf = image.copy()
    base = buf.ctypes.data
    idx = {f: i for i, f in enumerate(OP_FIELDS)}

    def a(op, f):
        return base + int(op[idx[f]]) if op[idx[f]] else 0
    for op in ops:
        n, nch = int(op[idx["n"]]), int(op[idx["nch"]])
        groups = None
        if op[idx["groups"]]:
            groups = view(buf, int(op[idx["groups"]]), GROUP_DTYPE, int(op[idx["ngroups"]])).copy()
            for f in GROUP_ADDRESSES:
                groups[f] = np.where(groups[f] != 0, groups[f] + base, 0)
        table = view(buf, int(op[idx["table"]]), np.int64, 8 * n + 3 * nch).copy()
        rows = table[:8 * n].reshape(n, 8)
        for col in range(3):
            rows[:, col] = np.where(rows[:, col] != 0, rows[:, col] + base, 0)
        if op[idx["kind"]] == 1:
            _C.lars_norms(table.ctypes.data, n, nch, int(op[idx["mode"]]), a(op, "w_part"),
                          a(op, "g_part"), a(op, "w_sq"), a(op, "g_sq"), a(op, "wg"),
                          a(op, "flag"), 2)
        else:
            _C.lars_update(table.ctypes.data, n, nch, groups.ctypes.data, int(op[idx["ngroups"]]),
                           a(op, "w_sq"), a(op, "g_sq"), a(op, "wg"), a(op, "ratios"),
                           a(op, "flag"), bool(op[idx["check_sums"]]), bool(op[idx["skip"]]),
                           a(op, "carry"), 2)
    return buf


@dataclass
class EmuRun:
    sched: int
    device: int
    own_stream: bool
    buf: np.ndarray
    seconds: float
    lines: list[list[str]] = field(default_factory=list)


def start_emu(driver: Path, tmp: Path, image: np.ndarray, ops: np.ndarray, sched: int):
    seed, device, own_stream = SCHEDULES[sched]
    img_path, ops_path = tmp / f"image-{sched}.bin", tmp / "ops.bin"
    image.tofile(img_path)
    if not ops_path.exists():
        ops.tofile(ops_path)
    cmd = [str(driver), str(img_path), str(ops_path), str(sched), str(seed), str(device),
           str(int(own_stream))]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, img_path, time.monotonic()


def finish_emu(proc, img_path, started, sched) -> EmuRun:
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the emulated kernels (schedule {sched}) did not finish in {RUN_TIMEOUT_S} s "
                    f"(a hang the emulator did not diagnose?); last output:\n{out[-2000:]}")
    if proc.returncode != 0 or "DONE" not in out:
        pytest.fail(f"the driver (schedule {sched}) failed with exit status {proc.returncode}:\n"
                    f"{err[-4000:]}\n{out[-2000:]}")
    _, device, own_stream = SCHEDULES[sched]
    return EmuRun(sched, device, own_stream, np.fromfile(img_path, dtype=np.uint8),
                  time.monotonic() - started,
                  [line.split("\t") for line in out.splitlines() if line])


@dataclass
class Results:
    prog: Program
    cpu: np.ndarray
    emu: dict
    build: dict


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Results:
    if not EMU.is_dir():
        pytest.skip(f"cuda-emu is not installed at {EMU} (a copy of shared/ beside the repository)")
    driver, build = build_driver()
    prog = Program()
    for name, builder in BUILDERS.items():
        builder(Case(prog, name))
    image, ops = prog.img.build(), prog.ops_array()
    tmp = tmp_path_factory.mktemp("cuda-emu")
    started = [(s, *start_emu(driver, tmp, image, ops, s)) for s in SCHEDULES]
    cpu = run_cpu(image, ops)  # meanwhile
    emu = {s: finish_emu(p, path, t0, s) for s, p, path, t0 in started}
    return Results(prog, cpu, emu, build)


# ------------------------------------------------------------------------------------------------
# tests


def test_build_and_emulation_report(results):
    """Not a check of its own: prints what was built and how long the emulation took (-s)."""
    b = results.build
    print(f"\ncuda-emu driver {b['key']}: {'cached' if b['cached'] else 'built in %.1f s' % b['build_s']}"
          f", TBB {'on' if b['tbb'] else 'off'}")
    for s, run in results.emu.items():
        done = [ln for ln in run.lines if ln[0] == "DONE"][0]
        print(f"schedule {s}: {run.seconds:.1f} s, {done[1]} blocks, {done[2]} fiber switches")
    assert results.emu


@pytest.mark.parametrize("sched", list(SCHEDULES))
def test_no_undefined_behaviour_recorded(results, sched):
    run = results.emu[sched]
    names = {c.id: c.name for c in results.prog.cases}
    problems, shown = [], {}
    for ln in run.lines:  # lines: of kernels.cu (emu-build.sh keeps the line numbers)
        if ln[0] == "NRECORDS" and int(ln[2]) > 0:
            problems.append(f"case {names[int(ln[1])]}: {ln[2]} records, the first:")
        elif ln[0] == "RECORD":
            shown[ln[1]] = shown.get(ln[1], 0) + 1
            if shown[ln[1]] <= 8:
                problems.append(f"  {ln[2]}: kernel {ln[3]}, block {ln[4]}, thread {ln[5]}, "
                                f"lines {ln[6]}/{ln[7]}")
    assert not problems, (f"schedule {sched}: the emulator recorded undefined behaviour:\n"
                          + "\n".join(problems))


@pytest.mark.parametrize("sched", list(SCHEDULES))
def test_launches_use_the_current_device_and_the_stream(results, sched):
    run = results.emu[sched]
    cases = {c.id: c for c in results.prog.cases}
    errors = [f"case {cases[int(ln[1])].name}, call {ln[2]}: {ln[3]}" for ln in run.lines
              if ln[0] == "ERROR"]
    assert not errors, "the entry points raised:\n" + "\n".join(errors)
    op_case = [c for c in results.prog.cases for _ in c.ops]
    first_op = {}
    for i, c in enumerate(op_case):
        first_op.setdefault(c.id, i)
    got: dict[int, list[str]] = {}
    assert any(ln[0] == "GUARD" for ln in run.lines), "the driver did not check the device guard"
    for ln in run.lines:
        if ln[0] == "LAUNCH":
            op = int(ln[2])
            assert int(ln[4]) == run.device, f"{ln[3]} of case {op_case[op].name} ran on device " \
                f"{ln[4]}, not {run.device}"
            assert ln[8] == "1", f"{ln[3]} of case {op_case[op].name} is not on the caller's stream"
            got.setdefault(op, []).append(ln[3])
        elif ln[0] == "DEVICE":
            assert int(ln[3]) == run.device, (
                f"after a call on device {run.device} the current device is {ln[3]} "
                f"(case {op_case[int(ln[2])].name})")
        elif ln[0] == "GUARD":
            assert ln[1:] == ["1", "0"], (
                f"a call for device {run.device} while device {1 - run.device} is current must "
                f"raise and launch nothing (csrc/cuda/lars_cuda.h); it raised: {ln[1] == '1'}, "
                f"launches: {ln[2]}")
    for c in results.prog.cases:
        for k, expected in enumerate(c.launches()):
            op = first_op[c.id] + k
            names = [name.split("::")[-1] for name in got.get(op, [])]
            assert names == expected, f"case {c.name}, call {k}: launches {names}, expected {expected}"


def test_schedules_give_identical_results(results):
    runs = list(results.emu.values())
    for other in runs[1:]:
        differ = np.flatnonzero(runs[0].buf != other.buf)
        assert differ.size == 0, (f"schedules {runs[0].sched} and {other.sched} differ in "
                                  f"{differ.size} bytes, first at image offset {differ[0]}")


def _bitwise(cpu: np.ndarray, emu: np.ndarray, c: Case, what: str):
    for label, off, dtype, count in c.bitwise:
        a, b = view(cpu, off, dtype, count), view(emu, off, dtype, count)
        if dtype.kind == "i":
            np.testing.assert_array_equal(b, a, err_msg=f"{what}: {label}")
            continue
        nan_a, nan_b = is_nan(a), is_nan(b)
        assert np.array_equal(nan_a, nan_b), (
            f"{what}: {label}: NaN on one backend only at {np.flatnonzero(nan_a != nan_b)[:10]}")
        differ = (bits(a) != bits(b)) & ~nan_a
        if differ.any():
            i = np.flatnonzero(differ)[:8]
            raise AssertionError(f"{what}: {label}: {differ.sum()} of {count} elements differ, "
                                 f"e.g. at {i}: CPU {a[i]} ({bits(a)[i]}), emulated CUDA {b[i]} "
                                 f"({bits(b)[i]})")


@pytest.mark.parametrize("name", list(BUILDERS))
def test_emulated_cuda_matches_cpu_kernels(results, name):
    c = next(c for c in results.prog.cases if c.name == name)
    for check in c.checks:
        check(results.cpu, "CPU")
    for s, run in results.emu.items():
        for check in c.checks:
            check(run.buf, f"emulated CUDA, schedule {s}")
        _bitwise(results.cpu, run.buf, c, f"{name}, schedule {s}")
        for pair in c.pairs:
            pair(results.cpu, run.buf)


def test_nan_results_have_the_same_bits(results):
    """NaN results: the same bits on both backends (the canonical NaN of each dtype)."""
    differ = []
    run = results.emu[min(results.emu)]
    for c in results.prog.cases:
        for label, off, dtype, count in c.bitwise:
            if dtype.kind == "i":
                continue
            a, b = view(results.cpu, off, dtype, count), view(run.buf, off, dtype, count)
            nan = is_nan(a) & is_nan(b)
            bad = nan & (bits(a) != bits(b))
            if bad.any():
                pairs = sorted({(int(x), int(y)) for x, y in zip(bits(a)[bad], bits(b)[bad])})
                differ.append(f"{c.name}: {label}: {bad.sum()} NaNs, CPU/CUDA bits "
                              + ", ".join(f"{x:#x}/{y:#x}" for x, y in pairs[:6]))
    assert not differ, "NaN bits differ between CPU and emulated CUDA:\n" + "\n".join(differ)
