// pybind11 module hvd_largebatch._C: CPU kernels and build information.
#include <pybind11/pybind11.h>

#include "common.h"

#if HVD_LB_OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

static py::dict build_info() {
  py::dict info;
  info["cpu_kernels"] = true;
  info["openmp"] = static_cast<bool>(HVD_LB_OPENMP);
#if HVD_LB_OPENMP
  info["openmp_max_threads"] = omp_get_max_threads();
#endif
  info["compiler"] = HVD_LB_COMPILER;
  info["cxx_standard"] = static_cast<long>(__cplusplus);
#if defined(__AVX512F__)
  info["simd"] = "avx512";
#elif defined(__AVX2__)
  info["simd"] = "avx2";
#elif defined(__SSE4_2__)
  info["simd"] = "sse4.2";
#else
  info["simd"] = "baseline";
#endif
  return info;
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "hvd-largebatch CPU kernels";
  m.def("build_info", &build_info, "What this CPU module was built with.");
}
