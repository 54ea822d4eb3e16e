// pybind11 module hvd_largebatch._C_cuda: CUDA kernels (static CUDA runtime) and build information.
#include <pybind11/pybind11.h>

#include <cuda_runtime_api.h>

#include "common.h"

namespace py = pybind11;

static py::dict build_info() {
  py::dict info;
  info["cuda_kernels"] = true;
  info["cuda_archs"] = HVD_LB_CUDA_ARCHS;
  info["cuda_runtime_version"] = CUDART_VERSION;
  info["cuda_runtime"] = "static";
  return info;
}

// Number of visible GPUs, or 0 with the runtime's reason when there is no driver or device.
static py::tuple device_status() {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return py::make_tuple(0, std::string(cudaGetErrorString(err)));
  }
  return py::make_tuple(count, std::string("ok"));
}

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "hvd-largebatch CUDA kernels";
  m.def("build_info", &build_info, "What this CUDA module was built with.");
  m.def("device_status", &device_status, "(device count, status message) of the CUDA runtime.");
}
