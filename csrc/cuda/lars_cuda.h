// CUDA multi-tensor LARS launchers (kernels.cu), bound in module.cpp. Same contract as the CPU
// entry points (cpu/lars_cpu.h); the table, the partials and the outputs are device addresses,
// `groups` is a host array copied into the kernel arguments. Everything is enqueued on `stream`
// of `device`, which must be the caller's current device (std::invalid_argument otherwise: no
// device switch here, see kernels.cu); nothing waits for the device.
#pragma once

#include <cstdint>

namespace hvdlb {

// Norm pass: two launches (per-chunk partials over all chunks, then one block adding them per
// tensor in a fixed order and setting the non-finite flag).
void lars_norms_cuda(int device, int64_t stream, const int64_t* table, int64_t n, int64_t nch,
                     int32_t mode, float* w_part, float* g_part, float* w_sq, float* g_sq,
                     float* wg, int32_t* flag);

// Update pass: one launch (two with check_sums: a one-block finiteness check first; more than
// one when there are more than kMaxGroupsPerLaunch groups). The update kernel reads *flag on the
// device and skips its writes when it is set and skip_nonfinite.
void lars_update_cuda(int device, int64_t stream, const int64_t* table, int64_t n, int64_t nch,
                      const void* groups, int64_t ngroups, const float* w_sq, const float* g_sq,
                      const float* wg, float* ratios, int32_t* flag, bool check_sums,
                      bool skip_nonfinite, float* w_part);

}  // namespace hvdlb
