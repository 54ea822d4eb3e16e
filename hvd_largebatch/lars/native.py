"""What the native modules were built with: ``hvd_largebatch.build_info()``."""
from __future__ import annotations

import importlib
from importlib import metadata


def build_info() -> dict:
    """Describe the native build.

    Returns a dict with ``version``, ``cpu`` (the CPU module's compiler, C++ standard, OpenMP and
    SIMD level) and ``cuda``: the CUDA module's architectures and runtime version when it was
    built (``None`` otherwise), plus ``cuda_devices`` / ``cuda_status`` as the CUDA runtime sees
    this machine (0 devices and the runtime's reason when there is no GPU or driver).
    """
    from hvd_largebatch import _C

    try:
        version = metadata.version("hvd-largebatch")
    except metadata.PackageNotFoundError:
        version = "unknown"
    info = {"version": version, "cpu": dict(_C.build_info()), "cuda": None}
    try:
        cuda = importlib.import_module("hvd_largebatch._C_cuda")
    except ImportError as exc:
        info["cuda_status"] = f"CUDA kernels not built ({exc})"
        return info
    info["cuda"] = dict(cuda.build_info())
    info["cuda"]["archs"] = [f"sm_{a}" for a in info["cuda"].pop("cuda_archs").split(";")]
    devices, status = cuda.device_status()
    info["cuda_devices"], info["cuda_status"] = int(devices), status
    return info
