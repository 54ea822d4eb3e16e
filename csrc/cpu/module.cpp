// pybind11 module hvd_largebatch._C: CPU kernels and build information.
#include <pybind11/pybind11.h>

#include "common.h"
#include "cpu/lars_cpu.h"

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

template <class T>
static T* addr(int64_t a) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(a));
}

// The LARS entry points take addresses (Python ints from tensor.data_ptr(), 0 = absent); the
// tables and their checks are built by hvd_largebatch/lars/ops.py. See cpu/lars_cpu.h.
static void lars_norms(int64_t table, int64_t n, int64_t nch, int32_t mode, int64_t w_part,
                       int64_t g_part, int64_t w_sq, int64_t g_sq, int64_t wg, int64_t flag,
                       int threads) {
  hvdlb::lars_norms_cpu(addr<const int64_t>(table), n, nch, mode, addr<float>(w_part),
                        addr<float>(g_part), addr<float>(w_sq), addr<float>(g_sq), addr<float>(wg),
                        addr<int32_t>(flag), threads);
}

static void lars_update(int64_t table, int64_t n, int64_t nch, int64_t groups, int64_t ngroups,
                        int64_t w_sq, int64_t g_sq, int64_t wg, int64_t ratios, int64_t flag,
                        bool check_sums, bool skip_nonfinite, int64_t w_part, int threads) {
  hvdlb::lars_update_cpu(addr<const int64_t>(table), n, nch, addr<const void>(groups), ngroups,
                         addr<const float>(w_sq), addr<const float>(g_sq), addr<const float>(wg),
                         addr<float>(ratios), addr<int32_t>(flag), check_sums, skip_nonfinite,
                         addr<float>(w_part), threads);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "hvd-largebatch CPU kernels";
  m.def("build_info", &build_info, "What this CPU module was built with.");
  m.def("lars_norms", &lars_norms, py::call_guard<py::gil_scoped_release>(),
        "Norm pass over a tensor table: per-chunk partials, then per-tensor sums and a non-finite "
        "flag.");
  m.def("lars_update", &lars_update, py::call_guard<py::gil_scoped_release>(),
        "Update pass over a tensor table: trust ratios, then the in-place LARS/SGD update.");
}
