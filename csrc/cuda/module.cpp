// pybind11 module hvd_largebatch._C_cuda: CUDA kernels (static CUDA runtime) and build information.
#include <pybind11/pybind11.h>

#include <cuda_runtime_api.h>

#include "common.h"
#include "cuda/lars_cuda.h"

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

template <class T>
static T* addr(int64_t a) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(a));
}

// The LARS entry points take the device index, the stream (cudaStream_t as an int) and addresses
// (Python ints from tensor.data_ptr(), 0 = absent); tables and checks come from
// hvd_largebatch/lars/ops.py. See cuda/lars_cuda.h.
static void lars_norms(int device, int64_t stream, int64_t table, int64_t n, int64_t nch,
                       int32_t mode, int64_t w_part, int64_t g_part, int64_t w_sq, int64_t g_sq,
                       int64_t wg, int64_t flag) {
  hvdlb::lars_norms_cuda(device, stream, addr<const int64_t>(table), n, nch, mode,
                         addr<float>(w_part), addr<float>(g_part), addr<float>(w_sq),
                         addr<float>(g_sq), addr<float>(wg), addr<int32_t>(flag));
}

static void lars_update(int device, int64_t stream, int64_t table, int64_t n, int64_t nch,
                        int64_t groups, int64_t ngroups, int64_t w_sq, int64_t g_sq, int64_t wg,
                        int64_t ratios, int64_t flag, bool check_sums, bool skip_nonfinite,
                        int64_t w_part) {
  hvdlb::lars_update_cuda(device, stream, addr<const int64_t>(table), n, nch,
                          addr<const void>(groups), ngroups, addr<const float>(w_sq),
                          addr<const float>(g_sq), addr<const float>(wg), addr<float>(ratios),
                          addr<int32_t>(flag), check_sums, skip_nonfinite, addr<float>(w_part));
}

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "hvd-largebatch CUDA kernels";
  m.def("build_info", &build_info, "What this CUDA module was built with.");
  m.def("device_status", &device_status, "(device count, status message) of the CUDA runtime.");
  m.def("lars_norms", &lars_norms, py::call_guard<py::gil_scoped_release>(),
        "Enqueue the norm pass over a device tensor table (2 kernels).");
  m.def("lars_update", &lars_update, py::call_guard<py::gil_scoped_release>(),
        "Enqueue the LARS/SGD update over a device tensor table (1 kernel, 2 with check_sums).");
}
